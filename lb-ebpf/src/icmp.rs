//! ICMP errors about translated flows, in XDP.
//!
//! A router between the node and the client answers a reply that is too big (fragmentation
//! needed) or undeliverable with an ICMP error to the reply's source: the frontend (a node
//! address or an external IP). The backend sent that reply, so the error is translated to it:
//! the outer destination becomes the backend, and the quoted packet becomes the one the
//! backend sent (source: the backend's address and port; for an SNAT flow, destination: the
//! node's SNAT address and port). The backend's stack then lowers its path MTU or fails the
//! connection as it should. The quoted packet's own L4 checksum is left alone (it covers data
//! the error no longer carries, and no stack checks it); the quoted IP header checksum and
//! the ICMP checksum are updated. The quoted UDP checksum is updated as well (it lies in the
//! quoted 8 bytes, and an incremental update needs no payload); TCP's lies beyond them.
//!
//! The other way, at tc egress: an error about a client's translated packet, sent by a local
//! backend (UDP port unreachable) or by the node (fragmentation needed on the way to the pod),
//! leaves with the quoted packet as the client sent it (to the frontend), and an error sent
//! by the backend comes from the frontend.
//!
//! Handled: destination unreachable (type 3, including fragmentation needed) and time
//! exceeded (type 11), quoting TCP or UDP with a 20-byte IP header, not fragmented. Other
//! ICMP (echo, errors about other packets, errors from remote backends about SNAT flows)
//! passes untouched.
use aya_ebpf::programs::XdpContext;
use lb_common::{Ct4Key, IPPROTO_TCP, IPPROTO_UDP, ct_flags, reasons};

use crate::{
    csum,
    maps::{LB4_CT_V2, LB4_FLOWREV_V2},
    parse::{ETH_HLEN, ETH_P_IP_WIRE, Ipv4Hdr, L4_OFF, at},
};

const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
/// The quoted IP header and the first 8 bytes of its L4 header.
const INNER_IP_OFF: usize = L4_OFF + 8;
const INNER_L4_OFF: usize = INNER_IP_OFF + 20;

/// The quoted L4 header's first 8 bytes as UDP has them.
#[repr(C)]
struct Quoted {
    sport: u16,
    dport: u16,
    len: u16,
    check: u16,
}

#[repr(C)]
struct IcmpHdr {
    kind: u8,
    code: u8,
    check: u16,
    rest: u32,
}

/// An ICMP error quoting a TCP or UDP packet, understood.
struct IcmpError {
    ip: *mut Ipv4Hdr,
    icmp: *mut IcmpHdr,
    inner: *mut Ipv4Hdr,
    ports: *mut Quoted,
    proto: u8,
}

#[inline(always)]
fn parse(start: usize, end: usize, frame_len: usize) -> Option<IcmpError> {
    let eth_proto: *mut u16 = at(start, end, 12)?;
    // SAFETY (all accesses): every pointer was bounds-checked against `end` by `at`.
    if unsafe { *eth_proto } != ETH_P_IP_WIRE {
        return None;
    }
    let ip: *mut Ipv4Hdr = at(start, end, ETH_HLEN)?;
    let icmp: *mut IcmpHdr = at(start, end, L4_OFF)?;
    let inner: *mut Ipv4Hdr = at(start, end, INNER_IP_OFF)?;
    let ports: *mut Quoted = at(start, end, INNER_L4_OFF)?;
    unsafe {
        // As for TCP/UDP (`parse.rs`): a total length beyond the frame or below the headers
        // read (here the quoted IP header and 8 bytes) is not understood, and passes untouched.
        let tot_len = u16::from_be((*ip).tot_len) as usize;
        if (*ip).vhl != 0x45
            || u16::from_be((*ip).frag_off) & 0x3fff != 0
            || (*ip).proto != IPPROTO_ICMP
            || tot_len + ETH_HLEN > frame_len
            || tot_len + ETH_HLEN < INNER_L4_OFF + 8
        {
            return None;
        }
        if (*icmp).kind != ICMP_DEST_UNREACH && (*icmp).kind != ICMP_TIME_EXCEEDED {
            return None;
        }
        let proto = (*inner).proto;
        if (*inner).vhl != 0x45
            || u16::from_be((*inner).frag_off) & 0x1fff != 0
            || (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
        {
            return None;
        }
        Some(IcmpError {
            ip,
            icmp,
            inner,
            ports,
            proto,
        })
    }
}

/// New values for the quoted packet (addresses and ports in network byte order).
struct Quote {
    saddr: u32,
    sport: u16,
    daddr: u32,
    dport: u16,
}

/// Rewrites the quoted packet, updating the quoted IP and UDP checksums and the ICMP
/// checksum.
#[inline(always)]
fn requote(e: &IcmpError, to: &Quote) {
    // SAFETY: pointers bounds-checked by `parse`; the packet is unchanged since.
    unsafe {
        let (inner, ports) = (e.inner, e.ports);
        let mut icmp_check = (*e.icmp).check;
        let old_inner_check = (*inner).check;
        let mut inner_check = old_inner_check;
        let old_l4_check = (*ports).check;
        let fix_l4 = e.proto == IPPROTO_UDP && old_l4_check != 0;
        let mut l4_check = old_l4_check;
        let old_src = (*inner).saddr;
        if old_src != to.saddr {
            inner_check = csum::replace4(inner_check, old_src, to.saddr);
            icmp_check = csum::replace4(icmp_check, old_src, to.saddr);
            l4_check = csum::replace4(l4_check, old_src, to.saddr);
            (*inner).saddr = to.saddr;
        }
        let old_dst = (*inner).daddr;
        if old_dst != to.daddr {
            inner_check = csum::replace4(inner_check, old_dst, to.daddr);
            icmp_check = csum::replace4(icmp_check, old_dst, to.daddr);
            l4_check = csum::replace4(l4_check, old_dst, to.daddr);
            (*inner).daddr = to.daddr;
        }
        let old_sport = (*ports).sport;
        if old_sport != to.sport {
            icmp_check = csum::replace2(icmp_check, old_sport, to.sport);
            l4_check = csum::replace2(l4_check, old_sport, to.sport);
            (*ports).sport = to.sport;
        }
        let old_dport = (*ports).dport;
        if old_dport != to.dport {
            icmp_check = csum::replace2(icmp_check, old_dport, to.dport);
            l4_check = csum::replace2(l4_check, old_dport, to.dport);
            (*ports).dport = to.dport;
        }
        (*inner).check = inner_check;
        icmp_check = csum::replace2(icmp_check, old_inner_check, inner_check);
        if fix_l4 {
            let l4_check = if l4_check == 0 { 0xffff } else { l4_check };
            (*ports).check = l4_check;
            icmp_check = csum::replace2(icmp_check, old_l4_check, l4_check);
        }
        (*e.icmp).check = icmp_check;
    }
}

/// Sets the outer header's source or destination, updating the IP checksum (ICMP has no
/// pseudo-header).
#[inline(always)]
fn set_outer(e: &IcmpError, saddr: u32, daddr: u32) {
    // SAFETY: as in `requote`.
    unsafe {
        let ip = e.ip;
        let mut check = (*ip).check;
        if (*ip).saddr != saddr {
            check = csum::replace4(check, (*ip).saddr, saddr);
            (*ip).saddr = saddr;
        }
        if (*ip).daddr != daddr {
            check = csum::replace4(check, (*ip).daddr, daddr);
            (*ip).daddr = daddr;
        }
        (*ip).check = check;
    }
}

/// XDP, for a packet that is not TCP or UDP as `parse.rs` understands it: translates an ICMP
/// error about a tracked flow's reply to the backend. Every packet passes; the reason says
/// whether it was translated, an ICMP error about no flow of ours, or not understood.
#[inline(always)]
pub fn ingress(ctx: &XdpContext) -> u32 {
    let Some(e) = parse(ctx.data(), ctx.data_end(), ctx.data_end() - ctx.data()) else {
        return reasons::XDP_NOT_PARSED;
    };
    match translate_ingress(&e) {
        Some(()) => reasons::XDP_ICMP_TRANSLATED,
        None => reasons::XDP_ICMP_NOT_TRACKED,
    }
}

#[inline(always)]
fn translate_ingress(e: &IcmpError) -> Option<()> {
    // SAFETY: pointers bounds-checked by `parse`.
    let (outer_src, outer_dst, inner_src, inner_dst, sport, dport) = unsafe {
        (
            (*e.ip).saddr,
            (*e.ip).daddr,
            (*e.inner).saddr,
            (*e.inner).daddr,
            (*e.ports).sport,
            (*e.ports).dport,
        )
    };
    // The error must be addressed to the frontend the quoted reply came from.
    if outer_dst != inner_src {
        return None;
    }
    // The quoted packet is a reply: frontend → client. Its flow is tracked under the client's
    // direction.
    let key = Ct4Key::new(inner_dst, inner_src, dport, sport, e.proto);
    let entry = LB4_CT_V2.get_ptr(&key)?;
    // SAFETY: a pointer from the lookup above; copied out at once.
    let ct = unsafe { *entry };
    let (quoted_dst, quoted_dport) = if ct.flags & ct_flags::SNAT != 0 {
        (ct.nat_addr, ct.nat_port)
    } else {
        (inner_dst, dport)
    };
    set_outer(e, outer_src, ct.backend_addr);
    requote(
        e,
        &Quote {
            saddr: ct.backend_addr,
            sport: ct.backend_port,
            daddr: quoted_dst,
            dport: quoted_dport,
        },
    );
    // Related to the flow, not a packet of it: the error neither marks the flow replied nor
    // refreshes it (see `conntrack`).
    Some(())
}

/// tc egress: an ICMP error about a client's packet, sent by a local backend (its UDP port
/// is closed) or by the node itself (the translated packet needs fragmenting on the way to
/// the pod), on its way to the client: the quoted packet becomes the one the client sent (to
/// the frontend), and an error from the backend comes from the frontend. Returns the reason:
/// translated, an ICMP error about no flow of ours, or not understood. Direct packet writes
/// (the verifier makes the skb head writable).
#[inline(always)]
pub fn egress(start: usize, end: usize, frame_len: usize) -> u32 {
    let Some(e) = parse(start, end, frame_len) else {
        return reasons::TC_NOT_PARSED;
    };
    match translate_egress(&e) {
        Some(()) => reasons::TC_ICMP_TRANSLATED,
        None => reasons::TC_ICMP_NOT_TRACKED,
    }
}

#[inline(always)]
fn translate_egress(e: &IcmpError) -> Option<()> {
    // SAFETY: pointers bounds-checked by `parse`.
    let (outer_src, outer_dst, inner_src, inner_dst, sport, dport) = unsafe {
        (
            (*e.ip).saddr,
            (*e.ip).daddr,
            (*e.inner).saddr,
            (*e.inner).daddr,
            (*e.ports).sport,
            (*e.ports).dport,
        )
    };
    if outer_dst != inner_src {
        return None; // not addressed to the quoted packet's sender
    }
    // The quoted packet went client → backend; its reply entry is backend → client.
    let key = Ct4Key::new(inner_dst, inner_src, dport, sport, e.proto);
    // SAFETY: copied out at once.
    let rev = unsafe { LB4_FLOWREV_V2.get(&key) }.copied()?;
    if rev.flags != 0 {
        return None; // entries of SNAT flows: not a reply to a client
    }
    let outer_src = if outer_src == inner_dst {
        rev.frontend_addr
    } else {
        outer_src
    };
    set_outer(e, outer_src, outer_dst);
    requote(
        e,
        &Quote {
            saddr: inner_src,
            sport,
            daddr: rev.frontend_addr,
            dport: rev.frontend_port,
        },
    );
    Some(())
}
