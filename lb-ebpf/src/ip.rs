//! What differs between IPv4 and IPv6 for the north-south programs, as one trait over the
//! family ([`Ip`], implemented by `family::V4` and `family::V6`): the EtherType, the network
//! header (parsed by `ipv4.rs` / `ipv6.rs` into one [`L3`]), where the addresses lie, the
//! checksums (IPv4's header checksum, ICMPv6's pseudo-header), ICMP's protocol and error
//! type numbers, the UDP checksum 0 rule. Everything else (TCP/UDP parsing, conntrack, NAT,
//! SNAT, fragments, ICMP translation) is written once, generic over `F: Ip`.
use aya_ebpf::programs::TcContext;
use lb_common::MapAddr;

use crate::{csum, family::Family, hint, ipv4, ipv6, snat::Search, stages::Pending};

/// The network header of a frame, understood (see `ipv4.rs`, `ipv6.rs`).
pub struct L3<A> {
    /// The IP header's first byte.
    pub ip: *mut u8,
    pub saddr: A,
    pub daddr: A,
    /// The upper-layer protocol (IPv6: after the extension headers walked).
    pub proto: u8,
    /// Where the upper-layer header starts, from the start of the frame.
    pub l4_off: usize,
    /// Bytes of the datagram (of this fragment) from `l4_off` on, as the IP header says.
    pub l4_len: usize,
    /// `parse::FRAG_NONE`, `FRAG_FIRST` or `FRAG_LATER`.
    pub frag: u8,
    /// The fragment identification as the map keys it: IPv4's 16-bit field widened, IPv6's
    /// Fragment header's 32-bit field (network byte order as read).
    pub id: u32,
}

/// Why a frame's network header was not taken: it passes untouched under one of two reasons.
pub enum Refused {
    /// Not this family's header as handled (truncated, inconsistent, options, ...).
    NotParsed,
    /// IPv6: an extension header not walked (see `ipv6.rs`).
    ExtensionHeader,
}

/// The per-family part of the north-south programs.
pub trait Ip: Family {
    /// The EtherType as it lies in memory (network byte order read natively).
    const ETH_P_WIRE: u16;
    /// Offsets of the source and destination addresses in the IP header.
    const SADDR_OFF: usize;
    const DADDR_OFF: usize;
    /// The offset of the IP header checksum in the header; IPv6 has none.
    const HDR_CHECK_OFF: Option<usize>;
    /// ICMP's protocol number (1, or 58 for ICMPv6).
    const ICMP_PROTO: u8;
    /// Whether the ICMP checksum covers a pseudo-header (ICMPv6 does, ICMP does not).
    const ICMP_PSEUDO_HDR: bool;
    /// The length of a quoted IP header an ICMP error's translation handles (no options, no
    /// extension headers).
    const QUOTED_HLEN: usize;
    /// Whether a UDP checksum 0 means "none" (IPv4) or is invalid (IPv6, RFC 8200 8.1: the
    /// packet is passed untouched, and the stack drops it).
    const UDP_CSUM_OPTIONAL: bool;
    /// Whether the XDP path runs in stages, programs entered by tail call (`stages.rs`):
    /// IPv6's 16-byte addresses and 40-byte keys need more stack than one program holds;
    /// IPv4 keeps everything in one.
    const STAGED: bool;

    /// Parses the network header at `start + ETH_HLEN` (the EtherType was checked).
    fn parse_l3(start: usize, end: usize, frame_len: usize) -> Result<L3<Self::Addr>, Refused>;

    /// Whether ICMP type `kind` is an error translated for its flow: destination
    /// unreachable (with IPv4's fragmentation needed), IPv6's packet too big, time exceeded.
    fn is_icmp_error(kind: u8) -> bool;

    /// The quoted packet's upper-layer protocol if its IP header at `inner` (bounds-checked
    /// for `QUOTED_HLEN` bytes) is one the translation handles: no options or extension
    /// headers, not a later fragment, TCP or UDP.
    fn quoted_proto(inner: *const u8) -> Option<u8>;

    /// `check` after an address it covers changed from `from` to `to`.
    fn csum_addr(check: u16, from: Self::Addr, to: Self::Addr) -> u16;

    /// tc: folds an address change into the L4 checksum at `off` with the kernel's helper
    /// (`flags`: `BPF_F_PSEUDO_HDR` and the like, without the size).
    fn tc_l4_csum_addr(
        ctx: &TcContext,
        off: usize,
        from: Self::Addr,
        to: Self::Addr,
        flags: u64,
    ) -> bool;

    /// tc: folds an address change into the IP header checksum with the kernel's helper
    /// (IPv6 has none: nothing to do).
    fn tc_hdr_csum_addr(ctx: &TcContext, from: Self::Addr, to: Self::Addr) -> bool;

    /// This CPU's SNAT port search state (`snat.rs`), a per-CPU scratch map value.
    fn snat_search() -> Option<*mut Search<Self::Addr>>;

    /// This CPU's decisions of a new flow's earlier XDP stages (`STAGED`).
    fn pending() -> Option<*mut Pending<Self::Addr>>;

    /// This CPU's scratch for a new flow's reverse entry (`hint.rs`).
    fn hint_scratch() -> Option<*mut hint::Scratch<Self::Addr>>;
}

/// Reads the address at `ptr` (bounds-checked by the parser).
#[inline(always)]
pub fn read_addr<A: MapAddr>(ptr: *const u8) -> A {
    // SAFETY: the caller passes a bounds-checked pointer into the packet; unaligned reads are
    // what packet headers need.
    unsafe { core::ptr::read_unaligned(ptr as *const A) }
}

/// Writes `addr` at `ptr` (bounds-checked by the parser).
#[inline(always)]
pub fn write_addr<A: MapAddr>(ptr: *mut u8, addr: A) {
    // SAFETY: as in `read_addr`.
    unsafe { core::ptr::write_unaligned(ptr as *mut A, addr) }
}

impl Ip for crate::family::V4 {
    const ETH_P_WIRE: u16 = 0x0800u16.to_be();
    const SADDR_OFF: usize = 12;
    const DADDR_OFF: usize = 16;
    const HDR_CHECK_OFF: Option<usize> = Some(10);
    const ICMP_PROTO: u8 = lb_common::IPPROTO_ICMP;
    const ICMP_PSEUDO_HDR: bool = false;
    const QUOTED_HLEN: usize = ipv4::HLEN;
    const UDP_CSUM_OPTIONAL: bool = true;
    const STAGED: bool = false;

    #[inline(always)]
    fn parse_l3(start: usize, end: usize, frame_len: usize) -> Result<L3<u32>, Refused> {
        ipv4::parse(start, end, frame_len).ok_or(Refused::NotParsed)
    }

    #[inline(always)]
    fn is_icmp_error(kind: u8) -> bool {
        kind == ipv4::ICMP_DEST_UNREACH || kind == ipv4::ICMP_TIME_EXCEEDED
    }

    #[inline(always)]
    fn quoted_proto(inner: *const u8) -> Option<u8> {
        ipv4::quoted_proto(inner)
    }

    #[inline(always)]
    fn csum_addr(check: u16, from: u32, to: u32) -> u16 {
        csum::replace4(check, from, to)
    }

    #[inline(always)]
    fn tc_l4_csum_addr(ctx: &TcContext, off: usize, from: u32, to: u32, flags: u64) -> bool {
        ctx.l4_csum_replace(off, from as u64, to as u64, flags | 4)
            .is_ok()
    }

    #[inline(always)]
    fn snat_search() -> Option<*mut Search<u32>> {
        crate::maps::LB4_SNATSEARCH.get_ptr_mut(0)
    }

    #[inline(always)]
    fn pending() -> Option<*mut Pending<u32>> {
        None // one stage
    }

    #[inline(always)]
    fn hint_scratch() -> Option<*mut hint::Scratch<u32>> {
        crate::maps::LB4_HINTSCRATCH.get_ptr_mut(0)
    }

    #[inline(always)]
    fn tc_hdr_csum_addr(ctx: &TcContext, from: u32, to: u32) -> bool {
        let off = crate::parse::ETH_HLEN + 10;
        ctx.l3_csum_replace(off, from as u64, to as u64, 4).is_ok()
    }
}

impl Ip for crate::family::V6 {
    const ETH_P_WIRE: u16 = 0x86ddu16.to_be();
    const SADDR_OFF: usize = 8;
    const DADDR_OFF: usize = 24;
    const HDR_CHECK_OFF: Option<usize> = None;
    const ICMP_PROTO: u8 = lb_common::IPPROTO_ICMPV6;
    const ICMP_PSEUDO_HDR: bool = true;
    const QUOTED_HLEN: usize = ipv6::HLEN;
    const UDP_CSUM_OPTIONAL: bool = false;
    const STAGED: bool = true;

    #[inline(always)]
    fn parse_l3(start: usize, end: usize, frame_len: usize) -> Result<L3<[u32; 4]>, Refused> {
        ipv6::parse(start, end, frame_len)
    }

    #[inline(always)]
    fn is_icmp_error(kind: u8) -> bool {
        matches!(
            kind,
            ipv6::ICMPV6_DEST_UNREACH | ipv6::ICMPV6_PKT_TOOBIG | ipv6::ICMPV6_TIME_EXCEEDED
        )
    }

    #[inline(always)]
    fn quoted_proto(inner: *const u8) -> Option<u8> {
        ipv6::quoted_proto(inner)
    }

    #[inline(always)]
    fn csum_addr(check: u16, from: [u32; 4], to: [u32; 4]) -> u16 {
        csum::replace16(check, &from, &to)
    }

    #[inline(always)]
    fn tc_l4_csum_addr(
        ctx: &TcContext,
        off: usize,
        from: [u32; 4],
        to: [u32; 4],
        flags: u64,
    ) -> bool {
        // Word by word: the helper takes at most 4 bytes; equal words change nothing.
        let mut i = 0;
        while i < 4 {
            if from[i] != to[i]
                && ctx
                    .l4_csum_replace(off, from[i] as u64, to[i] as u64, flags | 4)
                    .is_err()
            {
                return false;
            }
            i += 1;
        }
        true
    }

    #[inline(always)]
    fn snat_search() -> Option<*mut Search<[u32; 4]>> {
        crate::maps::LB6_SNATSEARCH.get_ptr_mut(0)
    }

    #[inline(always)]
    fn pending() -> Option<*mut Pending<[u32; 4]>> {
        crate::maps::LB6_PENDING_V1.get_ptr_mut(0)
    }

    #[inline(always)]
    fn hint_scratch() -> Option<*mut hint::Scratch<[u32; 4]>> {
        crate::maps::LB6_HINTSCRATCH.get_ptr_mut(0)
    }

    #[inline(always)]
    fn tc_hdr_csum_addr(_ctx: &TcContext, _from: [u32; 4], _to: [u32; 4]) -> bool {
        true
    }
}
