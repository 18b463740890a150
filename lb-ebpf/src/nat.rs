//! Address and port rewriting of external flows.
//!
//! Destinations are rewritten in XDP, in place, with incremental checksum updates
//! (`csum.rs`): a client's packet gets its backend (DNAT), a remote backend's reply to the
//! node's SNAT port gets its client. Sources are rewritten at tc egress with the kernel's
//! checksum helpers, once the stack has routed the packet: a reply gets the frontend the
//! client used, a packet to a remote backend the node's address and SNAT port. (Rewriting a
//! source to one of the node's addresses in XDP would make the stack drop the packet as a
//! martian.) Both families alike; IPv6 has no header checksum, and its L4 checksums cover
//! the addresses through the pseudo-header as IPv4's do. A later fragment has no L4 header:
//! only its addresses (and IPv4's header checksum) change (the L4 checksum, over the whole datagram, is updated in the first fragment).
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::{CtValue, IPPROTO_UDP, RevValue};

use crate::{
    csum,
    ip::{Ip, write_addr},
    parse::{ETH_HLEN, Packet},
};

/// Rewrites a client's packet to go to the flow's backend (DNAT). The source of an SNAT flow
/// is set later, at tc egress: a packet with one of the node's own addresses as source would
/// be dropped by the stack as a martian when it is passed on.
#[inline(always)]
pub fn xdp_forward<F: Ip>(pkt: &Packet<F::Addr>, ct: &CtValue<F::Addr>) {
    rewrite::<F>(pkt, pkt.saddr, pkt.sport, ct.backend_addr, ct.backend_port);
}

/// Rewrites a remote backend's reply to an SNAT flow to go to the client; its source is set
/// to the frontend at tc egress, like the reply of a local backend.
#[inline(always)]
pub fn xdp_reply<F: Ip>(pkt: &Packet<F::Addr>, rev: &RevValue<F::Addr>) {
    rewrite::<F>(pkt, pkt.saddr, pkt.sport, rev.client_addr, rev.client_port);
}

/// Sets the IP header's addresses, updating IPv4's header checksum; gives the L4 checksum
/// `l4` with the address changes folded in (the pseudo-header of both families).
#[inline(always)]
fn rewrite_addrs<F: Ip>(pkt: &Packet<F::Addr>, saddr: F::Addr, daddr: F::Addr, mut l4: u16) -> u16 {
    let ip = pkt.ip;
    // SAFETY: the IP header was bounds-checked by the parser and is unchanged since.
    unsafe {
        let hdr_check = F::HDR_CHECK_OFF.map(|off| ip.add(off) as *mut u16);
        let mut ip_check = hdr_check.map_or(0, |c| *c);
        if saddr != pkt.saddr {
            if hdr_check.is_some() {
                ip_check = F::csum_addr(ip_check, pkt.saddr, saddr);
            }
            l4 = F::csum_addr(l4, pkt.saddr, saddr);
            write_addr(ip.add(F::SADDR_OFF), saddr);
        }
        if daddr != pkt.daddr {
            if hdr_check.is_some() {
                ip_check = F::csum_addr(ip_check, pkt.daddr, daddr);
            }
            l4 = F::csum_addr(l4, pkt.daddr, daddr);
            write_addr(ip.add(F::DADDR_OFF), daddr);
        }
        if let Some(c) = hdr_check {
            *c = ip_check;
        }
    }
    l4
}

/// Sets the packet's addresses and ports, updating the IP (IPv4) and L4 checksums. A later
/// fragment has no L4 header: its addresses (and IPv4's header checksum) only.
#[inline(always)]
fn rewrite<F: Ip>(pkt: &Packet<F::Addr>, saddr: F::Addr, sport: u16, daddr: F::Addr, dport: u16) {
    if !pkt.has_l4() {
        rewrite_addrs::<F>(pkt, saddr, daddr, 0);
        return;
    }
    // SAFETY: the pointers were bounds-checked by `parse` and the packet is unchanged since.
    unsafe {
        let old_l4 = *pkt.check;
        let mut l4 = rewrite_addrs::<F>(pkt, saddr, daddr, old_l4);
        if sport != pkt.sport {
            l4 = csum::replace2(l4, pkt.sport, sport);
            (*pkt.ports).sport = sport;
        }
        if dport != pkt.dport {
            l4 = csum::replace2(l4, pkt.dport, dport);
            (*pkt.ports).dport = dport;
        }
        if pkt.proto == IPPROTO_UDP {
            // UDP checksum 0 means "none" (IPv4; IPv6 refuses it in `parse`): keep it so; a
            // computed 0 is sent as 0xffff.
            if old_l4 != 0 {
                *pkt.check = if l4 == 0 { 0xffff } else { l4 };
            }
        } else {
            *pkt.check = l4;
        }
    }
}

/// tc: sets the packet's source to (`rev.frontend_addr`, `rev.frontend_port`): the frontend
/// the client used for a reply, the node's SNAT address and port for a packet to a remote
/// backend.
/// Returns false when a helper failed (the packet may then be half-written; the caller
/// drops it rather than leak the backend's address).
#[inline(always)]
pub fn tc_restore_source<F: Ip>(
    ctx: &TcContext,
    pkt: &Packet<F::Addr>,
    rev: &RevValue<F::Addr>,
) -> bool {
    let mangled = if pkt.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let check_off = pkt.check_off;
    let (old_addr, new_addr) = (pkt.saddr, rev.frontend_addr);
    let (old_port, new_port) = (pkt.sport, rev.frontend_port);
    if old_addr != new_addr {
        // A later fragment: the address (and IPv4's header checksum) only.
        if (pkt.has_l4()
            && !F::tc_l4_csum_addr(
                ctx,
                check_off,
                old_addr,
                new_addr,
                BPF_F_PSEUDO_HDR as u64 | mangled,
            ))
            || !F::tc_hdr_csum_addr(ctx, old_addr, new_addr)
            || ctx.store(ETH_HLEN + F::SADDR_OFF, &new_addr, 0).is_err()
        {
            return false;
        }
    }
    if !pkt.has_l4() {
        return true;
    }
    if old_port != new_port
        && (ctx
            .l4_csum_replace(check_off, old_port as u64, new_port as u64, mangled | 2)
            .is_err()
            || ctx.store(pkt.l4_off(), &new_port, 0).is_err())
    {
        return false;
    }
    true
}
