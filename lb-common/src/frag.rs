//! IPv4 fragments of translated flows (Cilium's `ipv4_frag_id` → `ipv4_frag_l4ports`): only
//! the first fragment of a datagram carries the TCP/UDP header, so when XDP or tc translates
//! a first fragment it records the datagram's ports under the fragment's IP identity; the
//! later fragments look them up and get the same translation (addresses only, they have no
//! L4 header).

/// A datagram's identity as its fragments carry it, with the addresses as the program saw
/// them (before it translated them). Network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Frag4Key {
    pub saddr: u32,
    pub daddr: u32,
    /// The IP header's identification field.
    pub id: u16,
    pub proto: u8,
    pub pad: u8,
}

impl Frag4Key {
    #[inline(always)]
    pub const fn new(saddr: u32, daddr: u32, id: u16, proto: u8) -> Self {
        Self {
            saddr,
            daddr,
            id,
            proto,
            pad: 0,
        }
    }
}

/// The ports of a fragmented datagram, from its first fragment. Network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frag4Ports {
    pub sport: u16,
    pub dport: u16,
}

const _: () = {
    assert!(core::mem::size_of::<Frag4Key>() == 12);
    assert!(core::mem::size_of::<Frag4Ports>() == 4);
};
