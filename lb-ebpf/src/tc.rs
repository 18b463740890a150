//! North-south egress: tc on the node's interfaces (`--nodeport-iface`), after the node's
//! stack routed the packet. Sources are set here (from `LB4_FLOWREV_V2` / `LB6_FLOWREV_V1`, keyed by the
//! packet's tuple): a backend's reply to an external client leaves from the frontend the client sent
//! to; a client's packet forwarded to a backend on another node (eTP Cluster) leaves from
//! the node's address and the flow's SNAT port, so the reply comes back here. Everything
//! else leaves untouched. This program never drops a packet it does not understand.
//! Fragments of TCP/UDP: the first one goes down this path like a whole packet, the later
//! ones with its ports, and get the same source address (`frag.rs`).
//!
//! Both families alike, generic over `F: ip::Ip` (IPv4 inlined, IPv6 a function of its
//! own, as in `xdp.rs`); IPv6 extension headers not walked pass untouched, counted as
//! `extension_header_not_understood`.
//!
//! Every path ends in one reason (`lb_common::reasons`), counted per CPU (`verdict.rs`); the
//! reason gives the verdict.
use aya_ebpf::{
    bindings::__sk_buff, helpers::generated::bpf_ktime_get_ns, macros::classifier,
    programs::TcContext,
};
use lb_common::{IPPROTO_TCP, RevValue, ct_flags, reasons};

use crate::{
    conntrack,
    family::{V4, V6},
    frag, hint, icmp,
    ip::{Ip, Refused},
    nat,
    parse::{self, Packet, TCP_SYN},
    verdict::tc_verdict,
};

#[classifier]
pub fn nodeport_tc(ctx: TcContext) -> i32 {
    tc_verdict(egress(&ctx))
}

/// Why the packet is dropped or passed (`lb_common::reasons`).
#[inline(always)]
fn egress(ctx: &TcContext) -> u32 {
    match parse::eth_proto(ctx.data(), ctx.data_end()) {
        Some(V4::ETH_P_WIRE) => family_egress::<V4>(ctx),
        Some(V6::ETH_P_WIRE) => egress_v6(ctx.skb.skb),
        _ => reasons::TC_NOT_PARSED,
    }
}

/// IPv6, as a function of its own (see `xdp.rs`).
#[inline(never)]
fn egress_v6(skb: *mut __sk_buff) -> u32 {
    family_egress::<V6>(&TcContext::new(skb))
}

#[inline(always)]
fn family_egress<F: Ip>(ctx: &TcContext) -> u32 {
    let (start, end, len) = (ctx.data(), ctx.data_end(), ctx.len() as usize);
    let l3 = match F::parse_l3(start, end, len) {
        Ok(l3) => l3,
        Err(Refused::NotParsed) => return reasons::TC_NOT_PARSED,
        Err(Refused::ExtensionHeader) => return reasons::TC_EXTENSION_HEADER_NOT_UNDERSTOOD,
    };
    if l3.proto == F::ICMP_PROTO {
        // Maybe an ICMP error about a translated flow.
        return icmp::egress::<F>(start, end, &l3);
    }
    let Some(mut pkt) = parse::l4::<F>(start, end, &l3) else {
        return reasons::TC_NOT_PARSED;
    };
    // A later fragment takes its first fragment's ports and decision (`frag.rs`).
    if pkt.frag == parse::FRAG_LATER && !frag::fill_ports::<F>(&mut pkt) {
        return reasons::TC_FRAGMENT_NOT_TRACKED;
    }
    let reason = translate::<F>(ctx, &pkt);
    let translated = reason == reasons::TC_REPLY_TRANSLATED || reason == reasons::TC_SNAT;
    frag::finish::<F>(&pkt, reason, translated, reasons::TC_FRAGMENT_TRANSLATED)
}

/// The path of a TCP/UDP packet (a later fragment with its first fragment's ports).
#[inline(always)]
fn translate<F: Ip>(ctx: &TcContext, pkt: &Packet<F::Addr>) -> u32 {
    let key = pkt.tuple();
    // A new flow's first reply finds its entry as a hint and makes it (`hint.rs`).
    let Some(rev) = hint::reply::<F>(&key) else {
        return reasons::TC_NOT_A_FLOW;
    };
    if rev.flags & ct_flags::SNAT != 0 {
        return reasons::TC_NOT_A_FLOW; // a remote backend's reply to the node: restored in XDP
    }
    let tcp_flags = pkt.tcp_flags;
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let reply = rev.flags & ct_flags::SNAT_OUT == 0;
    if reply && !reply_of_live_flow::<F>(&rev, pkt, now) {
        // The tuple belongs to a new connection (say, a client reaching the pod directly from a
        // port an old NodePort flow used): translating it would break that connection.
        let _ = F::flow_replies().remove(&key);
        return reasons::TC_STALE_FLOW;
    }
    if !nat::tc_restore_source::<F>(ctx, pkt, &rev) {
        return reasons::TC_DROPPED_REWRITE_FAILED;
    }
    if !reply {
        return reasons::TC_SNAT;
    }
    conntrack::touch_reply::<F>(&rev.client_key(), tcp_flags, now);
    reasons::TC_REPLY_TRANSLATED
}

/// Whether `pkt`, a packet from a backend, is a reply of the tracked flow `rev` names: the
/// flow is still alive, goes to this backend, and is not a closed connection whose tuple a new
/// connection (a SYN-ACK) now reuses.
#[inline(always)]
fn reply_of_live_flow<F: Ip>(rev: &RevValue<F::Addr>, pkt: &Packet<F::Addr>, now: u64) -> bool {
    // SAFETY: copied out at once.
    let Some(ct) = (unsafe { F::flows().get(&rev.client_key()) }).copied() else {
        return false;
    };
    if ct.backend_addr != pkt.saddr || ct.backend_port != pkt.sport {
        return false;
    }
    let reopened =
        pkt.proto == IPPROTO_TCP && pkt.tcp_flags & TCP_SYN != 0 && conntrack::closed(ct.flags);
    !reopened && conntrack::alive(&ct, pkt.proto, 0, now)
}
