//! Session affinity (`sessionAffinity: ClientIP`) for every client: a pod or host process at
//! the socket (its network namespace cookie) and an outside client in XDP (its address).

/// `Affinity4Key::client_kind`: what `client` holds, so a cookie never equals an address.
pub mod affinity_clients {
    /// `bpf_get_netns_cookie` of the client socket (the socket programs).
    pub const NETNS_COOKIE: u8 = 1;
    /// The client's address, network byte order (XDP): IPv4 in the low 32 bits.
    pub const ADDRESS: u8 = 2;
}

use crate::addr::{Addr4, Addr6, MapAddr};

/// Key of the session-affinity map of family `A`: one client and one service id
/// (`MapAddr::Client` holds a cookie or an address of the family).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey<A: MapAddr> {
    pub client: A::Client,
    pub service_id: u32,
    /// `affinity_clients::*`.
    pub client_kind: u8,
    pub pad: [u8; 3],
}

pub type Affinity4Key = AffinityKey<Addr4>;
pub type Affinity6Key = AffinityKey<Addr6>;

/// Value of the session-affinity map (both families).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    /// `bpf_ktime_get_ns` at the last connection that used this entry.
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub pad: u32,
}

const _: () = {
    assert!(core::mem::size_of::<Affinity4Key>() == 16);
    assert!(core::mem::size_of::<Affinity6Key>() == 24);
    assert!(core::mem::size_of::<AffinityValue>() == 16);
};
