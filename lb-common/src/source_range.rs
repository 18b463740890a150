//! `loadBalancerSourceRanges`: which client addresses may reach a LoadBalancer IP.
//!
//! A LoadBalancer frontend whose Service lists ranges carries
//! `frontend_flags::SOURCE_RANGES`; the allowed sources of its service id are entries of an
//! LPM trie keyed by (service id, client address). XDP looks the packet's source up; the
//! socket programs look up the address a socket is bound to, or, for a socket whose source
//! the kernel has not picked yet, take the answer the agent computed for the node itself
//! (`frontend_flags::RANGES_ALLOW_NODE`) or for this node's pods
//! (`frontend_flags::RANGES_ALLOW_PODS`), told apart by the node's network namespace cookie
//! (set in the programs at load).

use crate::addr::{Addr4, Addr6};

/// Bits of the key that are always matched: the service id.
pub const SERVICE_ID_BITS: u32 = 32;

/// Data of the LPM trie key (after its prefix length): `SERVICE_ID_BITS + cidr prefix` bits
/// are matched, the service id first, so the ranges of one service never match another's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeKey<A> {
    /// Big-endian (the trie matches bytes from the first one on).
    pub service_id_be: u32,
    /// Client address, network byte order.
    pub addr: A,
}

pub type SourceRange4Key = SourceRangeKey<Addr4>;
pub type SourceRange6Key = SourceRangeKey<Addr6>;

impl<A: Copy> SourceRangeKey<A> {
    #[inline(always)]
    pub const fn new(service_id: u32, addr: A) -> Self {
        Self {
            service_id_be: service_id.to_be(),
            addr,
        }
    }

    pub const fn service_id(&self) -> u32 {
        u32::from_be(self.service_id_be)
    }
}

const _: () = {
    assert!(core::mem::size_of::<SourceRange4Key>() == 8);
    assert!(core::mem::size_of::<SourceRange6Key>() == 20);
};
