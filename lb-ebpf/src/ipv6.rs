//! The IPv6 header and its extension headers, as the north-south programs take them.
//!
//! The fixed header (40 bytes; no checksum; the hop limit is left to the stack, as IPv4's
//! TTL) must hold a payload length that is not 0 (a jumbogram, or nothing) and fits in the
//! frame. Then at most [`MAX_EXT_HEADERS`] extension headers are walked, in a bounded loop:
//! - Hop-by-Hop Options (0), only first, as RFC 8200 4.1 wants it; its options are not read;
//! - Destination Options (60), its options not read either (they are for the final
//!   destination, which the translation does not change: the backend is behind it);
//! - Routing (43) with Segments Left 0: the destination is the final one. With segments
//!   left, the destination is the next hop of a source route, not the service: not walked;
//! - Fragment (44), which ends the walk: the headers after it (in the first fragment) are
//!   the fragmentable part, so only TCP or UDP directly after it is taken, by the Fragment
//!   header's next header (`L3::proto`) and its 32-bit identification (`L3::id`); an offset
//!   gives a later fragment, M alone the first one, neither an atomic fragment (RFC 6946),
//!   taken as a whole packet.
//!
//! Anything else known as an extension header (ESP, AH, Mobility, HIP, Shim6, the
//! experimental 253/254), a Hop-by-Hop header not first, a second Fragment header, a header
//! after the Fragment header, a Routing header with segments left, or more headers than the
//! bound is refused as `Refused::ExtensionHeader`: the packet passes untouched (never
//! mistranslated), counted under `extension_header_not_understood`. A header that runs past
//! the payload length or the directly readable part is `Refused::NotParsed`.
use crate::{
    ip::{L3, Refused},
    parse::{ETH_HLEN, FRAG_FIRST, FRAG_LATER, FRAG_NONE, at},
};

pub const HLEN: usize = 40;
/// Extension headers walked at most (Hop-by-Hop, Destination Options, Routing, Fragment).
pub const MAX_EXT_HEADERS: usize = 4;

pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PKT_TOOBIG: u8 = 2;
pub const ICMPV6_TIME_EXCEEDED: u8 = 3;

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_ESP: u8 = 50;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
const NEXTHDR_MOBILITY: u8 = 135;
const NEXTHDR_HIP: u8 = 139;
const NEXTHDR_SHIM6: u8 = 140;
const NEXTHDR_EXP1: u8 = 253;
const NEXTHDR_EXP2: u8 = 254;

/// The Fragment header's offset (in bytes: the 13-bit field in 8-byte units, shifted) and M.
const FRAG_OFFSET: u16 = 0xfff8;
const FRAG_MF: u16 = 0x0001;

#[repr(C)]
pub struct Ipv6Hdr {
    pub vtc_flow: u32,
    pub payload_len: u16,
    pub nexthdr: u8,
    pub hop_limit: u8,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
}

#[repr(C)]
struct FragHdr {
    nexthdr: u8,
    reserved: u8,
    frag_off: u16,
    id: u32,
}

/// Whether `next` is an IPv6 extension header (RFC 8200, IANA's list), walked or not.
#[inline(always)]
fn is_extension(next: u8) -> bool {
    matches!(
        next,
        NEXTHDR_HOP
            | NEXTHDR_ROUTING
            | NEXTHDR_FRAGMENT
            | NEXTHDR_ESP
            | NEXTHDR_AUTH
            | NEXTHDR_DEST
            | NEXTHDR_MOBILITY
            | NEXTHDR_HIP
            | NEXTHDR_SHIM6
            | NEXTHDR_EXP1
            | NEXTHDR_EXP2
    )
}

#[inline(always)]
pub fn parse(start: usize, end: usize, frame_len: usize) -> Result<L3<[u32; 4]>, Refused> {
    let ip: *mut Ipv6Hdr = at(start, end, ETH_HLEN).ok_or(Refused::NotParsed)?;
    // SAFETY (all reads below): each pointer was bounds-checked against `end` by `at`.
    let (version, payload_len, mut next, saddr, daddr) = unsafe {
        (
            *(ip as *const u8) >> 4,
            u16::from_be((*ip).payload_len) as usize,
            (*ip).nexthdr,
            (*ip).saddr,
            (*ip).daddr,
        )
    };
    if version != 6 || payload_len == 0 || ETH_HLEN + HLEN + payload_len > frame_len {
        return Err(Refused::NotParsed);
    }
    let payload_end = ETH_HLEN + HLEN + payload_len;
    let mut off = ETH_HLEN + HLEN;
    let mut frag = FRAG_NONE;
    let mut id = 0;
    for walked in 0..MAX_EXT_HEADERS {
        match next {
            NEXTHDR_HOP | NEXTHDR_DEST | NEXTHDR_ROUTING => {
                if next == NEXTHDR_HOP && walked != 0 {
                    return Err(Refused::ExtensionHeader);
                }
                let h: *const [u8; 8] = at(start, end, off).ok_or(Refused::NotParsed)?;
                // SAFETY: bounds-checked by `at` above.
                let (h_next, h_len, segments_left) = unsafe { ((*h)[0], (*h)[1], (*h)[3]) };
                if next == NEXTHDR_ROUTING && segments_left != 0 {
                    return Err(Refused::ExtensionHeader);
                }
                next = h_next;
                off += (h_len as usize + 1) * 8;
            }
            NEXTHDR_FRAGMENT => {
                let h: *const FragHdr = at(start, end, off).ok_or(Refused::NotParsed)?;
                // SAFETY: bounds-checked by `at` above.
                let (h_next, frag_off, h_id) =
                    unsafe { ((*h).nexthdr, u16::from_be((*h).frag_off), (*h).id) };
                next = h_next;
                id = h_id;
                off += 8;
                frag = if frag_off & FRAG_OFFSET != 0 {
                    FRAG_LATER
                } else if frag_off & FRAG_MF != 0 {
                    FRAG_FIRST
                } else {
                    FRAG_NONE
                };
                // The headers after it are the fragmentable part: not walked.
                break;
            }
            _ => break,
        }
    }
    // Past the bound, or a header not walked.
    if is_extension(next) {
        return Err(Refused::ExtensionHeader);
    }
    if off > payload_end {
        return Err(Refused::NotParsed);
    }
    Ok(L3 {
        ip: ip as *mut u8,
        saddr,
        daddr,
        proto: next,
        l4_off: off,
        l4_len: payload_end - off,
        frag,
        id,
    })
}

/// The protocol of a quoted IPv6 header at `inner` (40 bytes, bounds-checked) that an ICMPv6
/// error's translation handles: TCP or UDP right after the fixed header (a quoted packet with
/// extension headers is not translated).
#[inline(always)]
pub fn quoted_proto(inner: *const u8) -> Option<u8> {
    let inner = inner as *const Ipv6Hdr;
    // SAFETY: the caller bounds-checked the 40 bytes.
    let (version, proto) = unsafe { (*(inner as *const u8) >> 4, (*inner).nexthdr) };
    (version == 6 && (proto == lb_common::IPPROTO_TCP || proto == lb_common::IPPROTO_UDP))
        .then_some(proto)
}
