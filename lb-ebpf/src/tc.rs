//! North-south egress: tc on the node's interfaces (`--nodeport-iface`), after the node's
//! stack routed the packet. Sources are set here (from `LB4_NS_REV`, keyed by the packet's
//! tuple): a backend's reply to an external client leaves from the frontend the client sent
//! to; a client's packet forwarded to a backend on another node (eTP Cluster) leaves from
//! the node's address and the flow's SNAT port, so the reply comes back here. Everything
//! else leaves untouched. This program never drops a packet it does not understand.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::bpf_ktime_get_ns,
    macros::classifier,
    programs::TcContext,
};
use lb_common::{Ct4Key, ct_flags};

use crate::{conntrack, icmp, maps::LB4_NS_REV, nat, parse, xdp::client_key};

#[classifier]
pub fn nodeport_tc(ctx: TcContext) -> i32 {
    egress(&ctx)
}

#[inline(always)]
fn egress(ctx: &TcContext) -> i32 {
    let Some(pkt) = parse::parse(ctx.data(), ctx.data_end(), ctx.len() as usize) else {
        // Not TCP/UDP we understand: maybe an ICMP error about a translated flow.
        icmp::egress(ctx.data(), ctx.data_end());
        return TC_ACT_OK;
    };
    let key = Ct4Key {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        pad: [0; 3],
    };
    // SAFETY: copied out at once.
    let Some(rev) = (unsafe { LB4_NS_REV.get(&key) }).copied() else {
        return TC_ACT_OK;
    };
    if rev.flags & ct_flags::SNAT != 0 {
        return TC_ACT_OK; // a remote backend's reply to the node: restored in XDP
    }
    let tcp_flags = pkt.tcp_flags;
    if !nat::tc_restore_source(ctx, &pkt, &rev) {
        return TC_ACT_SHOT;
    }
    if rev.flags & ct_flags::SNAT_OUT == 0 {
        // SAFETY: a helper without arguments.
        let now = unsafe { bpf_ktime_get_ns() };
        conntrack::touch_reply(&client_key(&rev), tcp_flags, now);
    }
    TC_ACT_OK
}
