//! ICMP and ICMPv6 errors about translated flows, in XDP and tc, written once for both
//! families (`ip::Ip` gives the type numbers, the quoted header's length, the checksums).
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
//! Handled: IPv4's destination unreachable (type 3, including fragmentation needed) and time
//! exceeded (type 11), quoting TCP or UDP with a 20-byte IP header, not fragmented; IPv6's
//! destination unreachable (1), packet too big (2: path MTU discovery through a NodePort) and
//! time exceeded (3), quoting TCP or UDP right after the 40-byte header (no extension
//! headers), the error itself not fragmented (extension headers before it are walked as for
//! any packet, `ipv6.rs`). Other ICMP (echo, neighbour discovery, parameter problems, errors
//! about other packets, errors from remote backends about SNAT flows) passes untouched.
//!
//! Checksums: ICMP's covers the message only, so the outer address change touches the IPv4
//! header checksum alone; ICMPv6's covers a pseudo-header too (RFC 8200 8.1), so the outer
//! address change is folded into it as well as the quoted packet's changes. A quoted IPv6
//! header has no checksum; a quoted UDP checksum is updated in both families.
use lb_common::{CtKey, IPPROTO_UDP, ct_flags, reasons};

use crate::{
    csum,
    ip::{Ip, L3, read_addr, write_addr},
    parse::{FRAG_NONE, at_len},
};

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
struct IcmpError<A> {
    /// The outer IP header.
    ip: *mut u8,
    saddr: A,
    daddr: A,
    icmp: *mut IcmpHdr,
    /// The quoted IP header.
    inner: *mut u8,
    ports: *mut Quoted,
    proto: u8,
}

/// The ICMP error of the packet whose network header is `l3`, if it is one handled.
#[inline(always)]
fn parse<F: Ip>(start: usize, end: usize, l3: &L3<F::Addr>) -> Option<IcmpError<F::Addr>> {
    // As for TCP/UDP (`parse.rs`): a datagram length below the headers read (here the quoted
    // IP header and 8 bytes) is not understood, and passes untouched; so does a fragment.
    if l3.frag != FRAG_NONE || l3.l4_len < 8 + F::QUOTED_HLEN + 8 {
        return None;
    }
    // The ICMP header, the quoted IP header and the quoted ports, checked at once.
    let base = at_len(start, end, l3.l4_off, 8 + F::QUOTED_HLEN + 8)?;
    let icmp = base as *mut IcmpHdr;
    // SAFETY: inside the range checked.
    let (inner, ports) = unsafe { (base.add(8), base.add(8 + F::QUOTED_HLEN) as *mut Quoted) };
    // SAFETY: bounds-checked by `at`.
    if !F::is_icmp_error(unsafe { (*icmp).kind }) {
        return None;
    }
    let proto = F::quoted_proto(inner)?;
    Some(IcmpError {
        ip: l3.ip,
        saddr: l3.saddr,
        daddr: l3.daddr,
        icmp,
        inner,
        ports,
        proto,
    })
}

/// New values for the quoted packet (addresses and ports in network byte order).
struct Quote<A> {
    saddr: A,
    sport: u16,
    daddr: A,
    dport: u16,
}

/// Rewrites the quoted packet, updating the quoted IP (IPv4) and UDP checksums and the ICMP
/// checksum.
#[inline(always)]
fn requote<F: Ip>(e: &IcmpError<F::Addr>, to: &Quote<F::Addr>) {
    // SAFETY: pointers bounds-checked by `parse`; the packet is unchanged since.
    unsafe {
        let (inner, ports) = (e.inner, e.ports);
        let mut icmp_check = (*e.icmp).check;
        let inner_check = F::HDR_CHECK_OFF.map(|off| inner.add(off) as *mut u16);
        let old_inner_check = inner_check.map_or(0, |c| *c);
        let mut new_inner_check = old_inner_check;
        let old_l4_check = (*ports).check;
        let fix_l4 = e.proto == IPPROTO_UDP && old_l4_check != 0;
        let mut l4_check = old_l4_check;
        let old_src: F::Addr = read_addr(inner.add(F::SADDR_OFF));
        if old_src != to.saddr {
            new_inner_check = F::csum_addr(new_inner_check, old_src, to.saddr);
            icmp_check = F::csum_addr(icmp_check, old_src, to.saddr);
            l4_check = F::csum_addr(l4_check, old_src, to.saddr);
            write_addr(inner.add(F::SADDR_OFF), to.saddr);
        }
        let old_dst: F::Addr = read_addr(inner.add(F::DADDR_OFF));
        if old_dst != to.daddr {
            new_inner_check = F::csum_addr(new_inner_check, old_dst, to.daddr);
            icmp_check = F::csum_addr(icmp_check, old_dst, to.daddr);
            l4_check = F::csum_addr(l4_check, old_dst, to.daddr);
            write_addr(inner.add(F::DADDR_OFF), to.daddr);
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
        if let Some(c) = inner_check {
            *c = new_inner_check;
            icmp_check = csum::replace2(icmp_check, old_inner_check, new_inner_check);
        }
        if fix_l4 {
            let l4_check = if l4_check == 0 { 0xffff } else { l4_check };
            (*ports).check = l4_check;
            icmp_check = csum::replace2(icmp_check, old_l4_check, l4_check);
        }
        (*e.icmp).check = icmp_check;
    }
}

/// Sets the outer header's source and destination, updating IPv4's header checksum (ICMP
/// has no pseudo-header) or ICMPv6's checksum (which covers one).
#[inline(always)]
fn set_outer<F: Ip>(e: &IcmpError<F::Addr>, saddr: F::Addr, daddr: F::Addr) {
    // SAFETY: as in `requote`.
    unsafe {
        let ip = e.ip;
        let hdr_check = F::HDR_CHECK_OFF.map(|off| ip.add(off) as *mut u16);
        let mut hdr = hdr_check.map_or(0, |c| *c);
        let mut icmp = (*e.icmp).check;
        if e.saddr != saddr {
            hdr = F::csum_addr(hdr, e.saddr, saddr);
            if F::ICMP_PSEUDO_HDR {
                icmp = F::csum_addr(icmp, e.saddr, saddr);
            }
            write_addr(ip.add(F::SADDR_OFF), saddr);
        }
        if e.daddr != daddr {
            hdr = F::csum_addr(hdr, e.daddr, daddr);
            if F::ICMP_PSEUDO_HDR {
                icmp = F::csum_addr(icmp, e.daddr, daddr);
            }
            write_addr(ip.add(F::DADDR_OFF), daddr);
        }
        if let Some(c) = hdr_check {
            *c = hdr;
        }
        (*e.icmp).check = icmp;
    }
}

/// The quoted packet's addresses and ports.
#[inline(always)]
fn quoted<F: Ip>(e: &IcmpError<F::Addr>) -> (F::Addr, F::Addr, u16, u16) {
    // SAFETY: pointers bounds-checked by `parse`.
    unsafe {
        (
            read_addr(e.inner.add(F::SADDR_OFF)),
            read_addr(e.inner.add(F::DADDR_OFF)),
            (*e.ports).sport,
            (*e.ports).dport,
        )
    }
}

/// XDP, for an ICMP packet of family `F` (network header `l3`): translates an ICMP error
/// about a tracked flow's reply to the backend. Every packet passes; the reason says whether
/// it was translated, an ICMP error about no flow of ours, or not understood.
#[inline(always)]
pub fn ingress<F: Ip>(start: usize, end: usize, l3: &L3<F::Addr>) -> u32 {
    let Some(e) = parse::<F>(start, end, l3) else {
        return reasons::XDP_NOT_PARSED;
    };
    match translate_ingress::<F>(&e) {
        Some(()) => reasons::XDP_ICMP_TRANSLATED,
        None => reasons::XDP_ICMP_NOT_TRACKED,
    }
}

#[inline(always)]
fn translate_ingress<F: Ip>(e: &IcmpError<F::Addr>) -> Option<()> {
    let (inner_src, inner_dst, sport, dport) = quoted::<F>(e);
    // The error must be addressed to the frontend the quoted reply came from.
    if e.daddr != inner_src {
        return None;
    }
    // The quoted packet is a reply: frontend → client. Its flow is tracked under the client's
    // direction.
    let key = CtKey::new(inner_dst, inner_src, dport, sport, e.proto);
    let entry = F::flows().get_ptr(&key)?;
    // SAFETY: a pointer from the lookup above; copied out at once.
    let ct = unsafe { *entry };
    let (quoted_dst, quoted_dport) = if ct.flags & ct_flags::SNAT != 0 {
        (ct.nat_addr, ct.nat_port)
    } else {
        (inner_dst, dport)
    };
    set_outer::<F>(e, e.saddr, ct.backend_addr);
    requote::<F>(
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
/// is closed) or by the node itself (the translated packet needs fragmenting, or is too big
/// for the path, on the way to the pod), on its way to the client: the quoted packet becomes
/// the one the client sent (to the frontend), and an error from the backend comes from the
/// frontend. Returns the reason: translated, an ICMP error about no flow of ours, or not
/// understood. Direct packet writes (the verifier makes the skb head writable).
#[inline(always)]
pub fn egress<F: Ip>(start: usize, end: usize, l3: &L3<F::Addr>) -> u32 {
    let Some(e) = parse::<F>(start, end, l3) else {
        return reasons::TC_NOT_PARSED;
    };
    match translate_egress::<F>(&e) {
        Some(()) => reasons::TC_ICMP_TRANSLATED,
        None => reasons::TC_ICMP_NOT_TRACKED,
    }
}

#[inline(always)]
fn translate_egress<F: Ip>(e: &IcmpError<F::Addr>) -> Option<()> {
    let (inner_src, inner_dst, sport, dport) = quoted::<F>(e);
    if e.daddr != inner_src {
        return None; // not addressed to the quoted packet's sender
    }
    // The quoted packet went client → backend; its reply entry is backend → client.
    let key = CtKey::new(inner_dst, inner_src, dport, sport, e.proto);
    // The flow may not have had a reply yet: its entry may be a hint still.
    let rev = crate::hint::reply::<F>(&key)?;
    if rev.flags != 0 {
        return None; // entries of SNAT flows: not a reply to a client
    }
    let outer_src = if e.saddr == inner_dst {
        rev.frontend_addr
    } else {
        e.saddr
    };
    set_outer::<F>(e, outer_src, e.daddr);
    requote::<F>(
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
