//! Header parsing with direct packet access, shared by XDP and tc.
//!
//! Only the simple, common shape is handled: Ethernet II (no VLAN tag), IPv4 with a 20-byte
//! header, TCP or UDP. Everything else is reported as not ours and passed on untouched:
//! - other EtherTypes (IPv6, ARP, VLAN-tagged frames);
//! - IPv4 with options (IHL > 5): rare, and a fixed L4 offset keeps the verifier simple
//!   (fragments with options too);
//! - truncated or inconsistent packets (a total length shorter than the headers or longer
//!   than the frame, a TCP data offset below 5, a UDP length below 8).
//!
//! Fragments of TCP and UDP are parsed (`Packet::frag`): the first one (offset 0, MF set)
//! carries the L4 header and is parsed like a whole packet, except that a UDP length may
//! exceed this fragment (it is the whole datagram's); a later one (offset > 0) has no L4
//! header: its ports are 0 and its L4 pointers null until `frag.rs` fills the ports in from
//! its first fragment, and only its IP header may be rewritten.
//!
//! Passing is always safe: a packet is never translated unless all of it was understood.
use lb_common::{Ct4Key, IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_HLEN: usize = 14;
pub const IP_HLEN: usize = 20;
/// Where the TCP/UDP header starts (no VLAN, no IP options).
pub const L4_OFF: usize = ETH_HLEN + IP_HLEN;
/// `ETH_P_IP` as it lies in memory on a little-endian machine (0x0800 big-endian).
pub const ETH_P_IP_WIRE: u16 = 0x0800u16.to_be();

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
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

#[repr(C)]
pub struct Ipv4Hdr {
    pub vhl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

/// The first 8 bytes of TCP and UDP alike: ports, then (UDP) length and checksum.
#[repr(C)]
pub struct Ports {
    pub sport: u16,
    pub dport: u16,
}

/// A TCP or UDP packet, understood. Pointers are into the packet and valid until the packet
/// is changed by a helper.
pub struct Packet {
    pub ip: *mut Ipv4Hdr,
    /// Null in a later fragment.
    pub ports: *mut Ports,
    /// The L4 checksum field; null in a later fragment.
    pub check: *mut u16,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// Offset of the L4 checksum from the start of the frame.
    pub check_off: usize,
    /// The IP identification field (network byte order): with the addresses and the
    /// protocol, what the fragments of one datagram share.
    pub id: u16,
    /// `FRAG_NONE`, `FRAG_FIRST` or `FRAG_LATER`.
    pub frag: u8,
}

impl Packet {
    /// The packet's tuple, as the flow maps key it.
    #[inline(always)]
    pub fn tuple(&self) -> Ct4Key {
        Ct4Key::new(self.saddr, self.daddr, self.sport, self.dport, self.proto)
    }

    /// Whether the packet holds the L4 header (it is not a later fragment).
    #[inline(always)]
    pub fn has_l4(&self) -> bool {
        self.frag != FRAG_LATER
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

/// Parses the frame whose directly readable part is `start..end` (`data`, `data_end` of the
/// context) and whose whole length is `frame_len`: an skb in tc may hold its payload outside
/// the linear part; the headers must be inside it.
#[inline(always)]
pub fn parse(start: usize, end: usize, frame_len: usize) -> Option<Packet> {
    let eth_proto: *mut u16 = at(start, end, 12)?;
    // SAFETY (all reads below): each pointer was bounds-checked against `end` by `at`.
    if unsafe { *eth_proto } != ETH_P_IP_WIRE {
        return None;
    }
    let ip: *mut Ipv4Hdr = at(start, end, ETH_HLEN)?;
    let (vhl, frag_off, tot_len, proto, id) = unsafe {
        (
            (*ip).vhl,
            u16::from_be((*ip).frag_off),
            u16::from_be((*ip).tot_len) as usize,
            (*ip).proto,
            (*ip).id,
        )
    };
    // Version 4, IHL 5 (no options).
    if vhl != 0x45 {
        return None;
    }
    if tot_len + ETH_HLEN > frame_len || tot_len < IP_HLEN {
        return None;
    }
    let frag = if frag_off & IP_OFFSET != 0 {
        FRAG_LATER
    } else if frag_off & IP_MF != 0 {
        FRAG_FIRST
    } else {
        FRAG_NONE
    };
    let (saddr, daddr) = unsafe { ((*ip).saddr, (*ip).daddr) };
    if frag == FRAG_LATER {
        if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
            return None;
        }
        return Some(Packet {
            ip,
            ports: core::ptr::null_mut(),
            check: core::ptr::null_mut(),
            saddr,
            daddr,
            sport: 0,
            dport: 0,
            proto,
            tcp_flags: 0,
            check_off: 0,
            id,
            frag,
        });
    }
    match proto {
        IPPROTO_TCP => {
            // A full 20-byte TCP header must be there.
            let tcp: *mut [u8; 20] = at(start, end, L4_OFF)?;
            if tot_len < IP_HLEN + 20 {
                return None;
            }
            let (doff, flags) = unsafe { ((*tcp)[12] >> 4, (*tcp)[13]) };
            if doff < 5 || IP_HLEN + doff as usize * 4 > tot_len {
                return None;
            }
            let ports = tcp as *mut Ports;
            let (sport, dport) = unsafe { ((*ports).sport, (*ports).dport) };
            Some(Packet {
                ip,
                ports,
                check: (tcp as usize + 16) as *mut u16,
                saddr,
                daddr,
                sport,
                dport,
                proto,
                tcp_flags: flags,
                check_off: L4_OFF + 16,
                id,
                frag,
            })
        }
        IPPROTO_UDP => {
            let udp: *mut [u16; 4] = at(start, end, L4_OFF)?;
            let len = unsafe { u16::from_be((*udp)[2]) } as usize;
            // A first fragment holds the header but only part of the datagram `len` counts.
            let holds = if frag == FRAG_FIRST {
                IP_HLEN + 8
            } else {
                IP_HLEN + len
            };
            if len < 8 || holds > tot_len {
                return None;
            }
            let ports = udp as *mut Ports;
            let (sport, dport) = unsafe { ((*ports).sport, (*ports).dport) };
            Some(Packet {
                ip,
                ports,
                check: (udp as usize + 6) as *mut u16,
                saddr,
                daddr,
                sport,
                dport,
                proto,
                tcp_flags: 0,
                check_off: L4_OFF + 6,
                id,
                frag,
            })
        }
        _ => None,
    }
}
