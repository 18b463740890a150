//! Header parsing with direct packet access, shared by XDP and tc and by both families.
//!
//! Only the simple, common shape is handled: Ethernet II (no VLAN tag), the family's network
//! header as `ipv4.rs` / `ipv6.rs` take it (`ip::Ip::parse_l3`), TCP or UDP. Everything else
//! is reported as not ours and passed on untouched:
//! - other EtherTypes (ARP, VLAN-tagged frames);
//! - network headers the family's parser refuses (IPv4 options, IPv6 extension headers not
//!   walked, truncated or inconsistent lengths);
//! - truncated or inconsistent L4 headers (a TCP data offset below 5 or beyond the datagram,
//!   a UDP length below 8 or beyond the datagram), and, in IPv6, a UDP checksum 0 (invalid
//!   there: the stack drops it).
//!
//! Fragments of TCP and UDP are parsed (`Packet::frag`): the first one (offset 0, MF set)
//! carries the L4 header and is parsed like a whole packet, except that a UDP length may
//! exceed this fragment (it is the whole datagram's); a later one (offset > 0) has no L4
//! header: its ports are 0 and its L4 pointers null until `frag.rs` fills the ports in from
//! its first fragment, and only its IP header may be rewritten.
//!
//! Passing is always safe: a packet is never translated unless all of it was understood.
use lb_common::{CtKey, IPPROTO_TCP, IPPROTO_UDP, MapAddr};

use crate::ip::{Ip, L3};

pub const ETH_HLEN: usize = 14;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// `Packet::frag`: a whole datagram.
pub const FRAG_NONE: u8 = 0;
/// `Packet::frag`: the first fragment (offset 0, MF set), with the L4 header.
pub const FRAG_FIRST: u8 = 1;
/// `Packet::frag`: a later fragment (offset > 0), no L4 header.
pub const FRAG_LATER: u8 = 2;

/// The first 8 bytes of TCP and UDP alike: ports, then (UDP) length and checksum.
#[repr(C)]
pub struct Ports {
    pub sport: u16,
    pub dport: u16,
}

/// A TCP or UDP packet of family `A`, understood. Pointers are into the packet and valid
/// until the packet is changed by a helper.
pub struct Packet<A> {
    /// The IP header's first byte.
    pub ip: *mut u8,
    /// Null in a later fragment.
    pub ports: *mut Ports,
    /// The L4 checksum field; null in a later fragment.
    pub check: *mut u16,
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// Offset of the L4 checksum from the start of the frame (the L4 header's is
    /// [`Packet::l4_off`]).
    pub check_off: usize,
    /// The fragment identification (`ip::L3::id`): with the addresses and the protocol,
    /// what the fragments of one datagram share.
    pub id: u32,
    /// `FRAG_NONE`, `FRAG_FIRST` or `FRAG_LATER`.
    pub frag: u8,
}

impl<A: MapAddr> Packet<A> {
    /// The packet's tuple, as the flow maps key it.
    #[inline(always)]
    pub fn tuple(&self) -> CtKey<A> {
        CtKey::new(self.saddr, self.daddr, self.sport, self.dport, self.proto)
    }

    /// Offset of the L4 header from the start of the frame (with the L4 header only): kept as
    /// the checksum's offset, one field less on the stack.
    #[inline(always)]
    pub fn l4_off(&self) -> usize {
        self.check_off - if self.proto == IPPROTO_TCP { 16 } else { 6 }
    }

    /// Whether the packet holds the L4 header (it is not a later fragment). Asked of the
    /// pointer itself, so the verifier sees the null check before the L4 header is touched.
    #[inline(always)]
    pub fn has_l4(&self) -> bool {
        !self.ports.is_null()
    }
}

/// A pointer to a `T` at `offset` into the packet `start..end`, if all of it lies inside
/// (the bounds check the verifier wants before any direct packet access).
#[inline(always)]
pub fn at<T>(start: usize, end: usize, offset: usize) -> Option<*mut T> {
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// A pointer to the `len` bytes at `offset` into the packet `start..end`, if all of them lie
/// inside: one bounds check for several headers read from one base (the verifier tracks the
/// range of the pointer checked, not of others derived apart).
#[inline(always)]
pub fn at_len(start: usize, end: usize, offset: usize, len: usize) -> Option<*mut u8> {
    if start + offset + len > end {
        return None;
    }
    Some((start + offset) as *mut u8)
}

/// The EtherType of the frame `start..end` as it lies in memory, if it has one.
#[inline(always)]
pub fn eth_proto(start: usize, end: usize) -> Option<u16> {
    let eth_proto: *const u16 = at(start, end, 12)?;
    // SAFETY: bounds-checked by `at`.
    Some(unsafe { *eth_proto })
}

/// The TCP or UDP packet whose network header is `l3`, in the frame whose directly readable
/// part is `start..end` (`data`, `data_end` of the context): an skb in tc may hold its
/// payload outside the linear part; the headers must be inside it.
#[inline(always)]
pub fn l4<F: Ip>(start: usize, end: usize, l3: &L3<F::Addr>) -> Option<Packet<F::Addr>> {
    let proto = l3.proto;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let mut pkt = Packet {
        ip: l3.ip,
        ports: core::ptr::null_mut(),
        check: core::ptr::null_mut(),
        saddr: l3.saddr,
        daddr: l3.daddr,
        sport: 0,
        dport: 0,
        proto,
        tcp_flags: 0,
        check_off: 0,
        id: l3.id,
        frag: l3.frag,
    };
    if l3.frag == FRAG_LATER {
        return Some(pkt);
    }
    let l4_off = l3.l4_off;
    let l4_len = l3.l4_len;
    // SAFETY (all reads below): each pointer was bounds-checked against `end` by `at`.
    if proto == IPPROTO_TCP {
        // A full 20-byte TCP header must be there.
        let tcp: *mut [u8; 20] = at(start, end, l4_off)?;
        if l4_len < 20 {
            return None;
        }
        // SAFETY: bounds-checked by `at` above.
        let (doff, flags) = unsafe { ((*tcp)[12] >> 4, (*tcp)[13]) };
        if doff < 5 || doff as usize * 4 > l4_len {
            return None;
        }
        pkt.tcp_flags = flags;
        pkt.ports = tcp as *mut Ports;
        pkt.check = (tcp as usize + 16) as *mut u16;
        pkt.check_off = l4_off + 16;
    } else {
        let udp: *mut [u16; 4] = at(start, end, l4_off)?;
        // SAFETY: bounds-checked by `at` above.
        let (len, check) = unsafe { (u16::from_be((*udp)[2]) as usize, (*udp)[3]) };
        // A first fragment holds the header but only part of the datagram `len` counts.
        let holds = if l3.frag == FRAG_FIRST { 8 } else { len };
        if len < 8 || holds > l4_len {
            return None;
        }
        if check == 0 && !F::UDP_CSUM_OPTIONAL {
            return None;
        }
        pkt.ports = udp as *mut Ports;
        pkt.check = (udp as usize + 6) as *mut u16;
        pkt.check_off = l4_off + 6;
    }
    // SAFETY: `ports` was bounds-checked above.
    unsafe {
        pkt.sport = (*pkt.ports).sport;
        pkt.dport = (*pkt.ports).dport;
    }
    Some(pkt)
}
