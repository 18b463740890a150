//! Address and port rewriting of external flows.
//!
//! Destinations are rewritten in XDP, in place, with incremental checksum updates
//! (`csum.rs`): a client's packet gets its backend (DNAT), a remote backend's reply to the
//! node's SNAT port gets its client. Sources are rewritten at tc egress with the kernel's
//! checksum helpers, once the stack has routed the packet: a reply gets the frontend the
//! client used, a packet to a remote backend the node's address and SNAT port. (Rewriting a
//! source to one of the node's addresses in XDP would make the stack drop the packet as a
//! martian.) A later IPv4 fragment has no L4 header: only its addresses and IP checksum
//! change (the L4 checksum, over the whole datagram, is updated in the first fragment).
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::{Ct4Value, IPPROTO_UDP, Rev4Value};

use crate::{
    csum,
    parse::{ETH_HLEN, L4_OFF, Packet},
};

/// Rewrites a client's packet to go to the flow's backend (DNAT). The source of an SNAT flow
/// is set later, at tc egress: a packet with one of the node's own addresses as source would
/// be dropped by the stack as a martian when it is passed on.
#[inline(always)]
pub fn xdp_forward(pkt: &Packet, ct: &Ct4Value) {
    rewrite(pkt, pkt.saddr, pkt.sport, ct.backend_addr, ct.backend_port);
}

/// Rewrites a remote backend's reply to an SNAT flow to go to the client; its source is set
/// to the frontend at tc egress, like the reply of a local backend.
#[inline(always)]
pub fn xdp_reply(pkt: &Packet, rev: &Rev4Value) {
    rewrite(pkt, pkt.saddr, pkt.sport, rev.client_addr, rev.client_port);
}

/// Sets the packet's addresses and ports, updating the IP and L4 checksums. A later fragment
/// has no L4 header: its addresses and IP checksum only.
#[inline(always)]
fn rewrite(pkt: &Packet, saddr: u32, sport: u16, daddr: u32, dport: u16) {
    if !pkt.has_l4() {
        // SAFETY: the IP header was bounds-checked by `parse` and is unchanged since.
        unsafe {
            let ip = pkt.ip;
            let mut ip_check = (*ip).check;
            if saddr != pkt.saddr {
                ip_check = csum::replace4(ip_check, pkt.saddr, saddr);
                (*ip).saddr = saddr;
            }
            if daddr != pkt.daddr {
                ip_check = csum::replace4(ip_check, pkt.daddr, daddr);
                (*ip).daddr = daddr;
            }
            (*ip).check = ip_check;
        }
        return;
    }
    // SAFETY: the pointers were bounds-checked by `parse` and the packet is unchanged since.
    unsafe {
        let ip = pkt.ip;
        let mut ip_check = (*ip).check;
        let old_l4 = *pkt.check;
        let mut l4 = old_l4;
        if saddr != pkt.saddr {
            ip_check = csum::replace4(ip_check, pkt.saddr, saddr);
            l4 = csum::replace4(l4, pkt.saddr, saddr);
            (*ip).saddr = saddr;
        }
        if daddr != pkt.daddr {
            ip_check = csum::replace4(ip_check, pkt.daddr, daddr);
            l4 = csum::replace4(l4, pkt.daddr, daddr);
            (*ip).daddr = daddr;
        }
        if sport != pkt.sport {
            l4 = csum::replace2(l4, pkt.sport, sport);
            (*pkt.ports).sport = sport;
        }
        if dport != pkt.dport {
            l4 = csum::replace2(l4, pkt.dport, dport);
            (*pkt.ports).dport = dport;
        }
        (*ip).check = ip_check;
        if pkt.proto == IPPROTO_UDP {
            // UDP checksum 0 means "none": keep it so; a computed 0 is sent as 0xffff.
            if old_l4 != 0 {
                *pkt.check = if l4 == 0 { 0xffff } else { l4 };
            }
        } else {
            *pkt.check = l4;
        }
    }
}

const SADDR_OFF: usize = ETH_HLEN + 12;
const IP_CHECK_OFF: usize = ETH_HLEN + 10;

/// tc: sets the packet's source to (`rev.frontend_addr`, `rev.frontend_port`): the frontend
/// the client used for a reply, the node's SNAT address and port for a packet to a remote
/// backend.
/// Returns false when a helper failed (the packet may then be half-written; the caller
/// drops it rather than leak the backend's address).
#[inline(always)]
pub fn tc_restore_source(ctx: &TcContext, pkt: &Packet, rev: &Rev4Value) -> bool {
    let mangled = if pkt.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let check_off = pkt.check_off;
    let (old_addr, new_addr) = (pkt.saddr, rev.frontend_addr);
    let (old_port, new_port) = (pkt.sport, rev.frontend_port);
    if !pkt.has_l4() {
        // A later fragment: the address and the IP checksum only.
        return old_addr == new_addr
            || (ctx
                .l3_csum_replace(IP_CHECK_OFF, old_addr as u64, new_addr as u64, 4)
                .is_ok()
                && ctx.store(SADDR_OFF, &new_addr, 0).is_ok());
    }
    if old_addr != new_addr {
        if ctx
            .l4_csum_replace(
                check_off,
                old_addr as u64,
                new_addr as u64,
                BPF_F_PSEUDO_HDR as u64 | mangled | 4,
            )
            .is_err()
            || ctx
                .l3_csum_replace(IP_CHECK_OFF, old_addr as u64, new_addr as u64, 4)
                .is_err()
            || ctx.store(SADDR_OFF, &new_addr, 0).is_err()
        {
            return false;
        }
    }
    if old_port != new_port
        && (ctx
            .l4_csum_replace(check_off, old_port as u64, new_port as u64, mangled | 2)
            .is_err()
            || ctx.store(L4_OFF, &new_port, 0).is_err())
    {
        return false;
    }
    true
}
