//! The IPv4 header, as the north-south programs take it: a 20-byte header (IHL 5). IP
//! options (IHL > 5) are rare and a fixed L4 offset keeps the verifier simple: such a packet
//! is not parsed (fragments with options too), nor is a total length shorter than the header
//! or longer than the frame. Fragments: the flags and offset give `L3::frag`, the 16-bit
//! identification `L3::id`.
use crate::{
    ip::L3,
    parse::{ETH_HLEN, FRAG_FIRST, FRAG_LATER, FRAG_NONE, at},
};

pub const HLEN: usize = 20;
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;

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

#[inline(always)]
pub fn parse(start: usize, end: usize, frame_len: usize) -> Option<L3<u32>> {
    let ip: *mut Ipv4Hdr = at(start, end, ETH_HLEN)?;
    // SAFETY: bounds-checked against `end` by `at`.
    let (vhl, frag_off, tot_len, proto, id, saddr, daddr) = unsafe {
        (
            (*ip).vhl,
            u16::from_be((*ip).frag_off),
            u16::from_be((*ip).tot_len) as usize,
            (*ip).proto,
            (*ip).id,
            (*ip).saddr,
            (*ip).daddr,
        )
    };
    // Version 4, IHL 5 (no options).
    if vhl != 0x45 {
        return None;
    }
    if tot_len + ETH_HLEN > frame_len || tot_len < HLEN {
        return None;
    }
    let frag = if frag_off & IP_OFFSET != 0 {
        FRAG_LATER
    } else if frag_off & IP_MF != 0 {
        FRAG_FIRST
    } else {
        FRAG_NONE
    };
    Some(L3 {
        ip: ip as *mut u8,
        saddr,
        daddr,
        proto,
        l4_off: ETH_HLEN + HLEN,
        l4_len: tot_len - HLEN,
        frag,
        id: id as u32,
    })
}

/// The protocol of a quoted IPv4 header at `inner` (20 bytes, bounds-checked) that an ICMP
/// error's translation handles: no options, not a later fragment, TCP or UDP.
#[inline(always)]
pub fn quoted_proto(inner: *const u8) -> Option<u8> {
    let inner = inner as *const Ipv4Hdr;
    // SAFETY: the caller bounds-checked the 20 bytes.
    let (vhl, frag_off, proto) = unsafe {
        (
            (*inner).vhl,
            u16::from_be((*inner).frag_off),
            (*inner).proto,
        )
    };
    (vhl == 0x45
        && frag_off & IP_OFFSET == 0
        && (proto == lb_common::IPPROTO_TCP || proto == lb_common::IPPROTO_UDP))
        .then_some(proto)
}
