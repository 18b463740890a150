//! Fragments of translated flows (both families) (Cilium's `ipv4_frag_id` → `ipv4_frag_l4ports`): only
//! the first fragment of a datagram carries the TCP/UDP header, so when XDP or tc translates
//! a first fragment it records the datagram's ports under the fragment's IP identity; the
//! later fragments look them up and get the same translation (addresses only, they have no
//! L4 header).

use crate::addr::{Addr4, Addr6};

/// A datagram's identity as its fragments carry it, with the addresses as the program saw
/// them (before it translated them). Network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey<A> {
    pub saddr: A,
    pub daddr: A,
    /// The identification: IPv4's header field (16 bits, network byte order, widened), IPv6's
    /// Fragment header field (32 bits, network byte order).
    pub id: u32,
    /// The upper-layer protocol (IPv6: the Fragment header's next header).
    pub proto: u8,
    pub pad: [u8; 3],
}

pub type Frag4Key = FragKey<Addr4>;
pub type Frag6Key = FragKey<Addr6>;

impl<A> FragKey<A> {
    #[inline(always)]
    pub const fn new(saddr: A, daddr: A, id: u32, proto: u8) -> Self {
        Self {
            saddr,
            daddr,
            id,
            proto,
            pad: [0; 3],
        }
    }
}

/// The ports of a fragmented datagram, from its first fragment. Network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragPorts {
    pub sport: u16,
    pub dport: u16,
}

const _: () = {
    assert!(core::mem::size_of::<Frag4Key>() == 16);
    assert!(core::mem::size_of::<Frag6Key>() == 40);
    assert!(core::mem::size_of::<FragPorts>() == 4);
};
