//! Session affinity (`sessionAffinity: ClientIP`) for every client: a pod or host process at
//! the socket (its network namespace cookie) and an outside client in XDP (its address).

/// `Affinity4Key::client_kind`: what `client` holds, so a cookie never equals an address.
pub mod affinity_clients {
    /// `bpf_get_netns_cookie` of the client socket (the socket programs).
    pub const NETNS_COOKIE: u8 = 1;
    /// The client's IPv4 address, network byte order, in the low 32 bits (XDP).
    pub const ADDRESS: u8 = 2;
}

/// Key of the session-affinity map: one client and one service id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Affinity4Key {
    pub client: u64,
    pub service_id: u32,
    /// `affinity_clients::*`.
    pub client_kind: u8,
    pub pad: [u8; 3],
}

/// Value of the session-affinity map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Affinity4Value {
    /// `bpf_ktime_get_ns` at the last connection that used this entry.
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub pad: u32,
}

const _: () = {
    assert!(core::mem::size_of::<Affinity4Key>() == 16);
    assert!(core::mem::size_of::<Affinity4Value>() == 16);
};
