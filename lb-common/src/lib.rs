//! Map keys, values, names and limits shared by the eBPF programs (`lb-ebpf`) and the agent
//! (`lb-userspace`). One definition for both sides: every type is `#[repr(C)]`, has explicit
//! padding fields (always zero, so hash lookups never miss on an undefined byte) and a
//! compile-time size check.
//!
//! Byte order: addresses and ports are stored in network byte order, exactly as the kernel
//! hands them to the programs (`bpf_sock_addr.user_ip4`, `user_port`), so the data path never
//! converts. The agent converts with the helpers at the bottom of this file.
//!
//! The service lookup follows Cilium's layout: a service (frontend) entry holds the number of
//! backend slots and a generation; slots `(service id, generation, index)` name backend ids;
//! backends are a map of their own. An update writes the slots of the other generation first,
//! then switches the service entry in one map update, then deletes the old slots, so a connect
//! in flight never sees a half-written backend set.
#![no_std]

/// IANA protocol numbers as the kernel reports them in `bpf_sock_addr.protocol`.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// `errno` values the socket programs return through `bpf_set_retval`.
pub const ECONNREFUSED: i32 = 111;

/// Map names (the kernel keeps at most 15 bytes of a map name). Change a name when the layout
/// of its key or value changes, so an upgrade can build the new map beside the old one.
pub mod map_names {
    pub const SERVICES_V4: &str = "LB4_SERVICES";
    pub const SLOTS_V4: &str = "LB4_SLOTS";
    pub const BACKENDS_V4: &str = "LB4_BACKENDS";
    pub const AFFINITY_V4: &str = "LB4_AFFINITY";
    pub const REVNAT_V4: &str = "LB4_REVNAT";
}

/// Default capacities. The agent can raise each of them at load time (`--max-services` ...);
/// the eBPF object carries these as its defaults.
pub mod limits {
    /// Frontends: one per (address, port, protocol) of every service.
    pub const MAX_SERVICES: u32 = 65_536;
    /// Backend slots over all services; two generations live side by side during an update.
    pub const MAX_SLOTS: u32 = 2 * MAX_BACKENDS;
    /// Backends over all services.
    pub const MAX_BACKENDS: u32 = 262_144;
    /// Session-affinity entries (LRU: the least recently used client is forgotten first).
    pub const MAX_AFFINITY: u32 = 131_072;
    /// Reverse translations for UDP replies and getpeername (LRU, keyed by socket).
    pub const MAX_REVNAT: u32 = 262_144;
    /// Most backends one service may have; bounds the slot index. Kubernetes' own
    /// scalability threshold is 250 endpoints per service.
    pub const MAX_BACKENDS_PER_SERVICE: u32 = 16_384;
}

/// Service flags (`Service4Value::flags`).
pub mod service_flags {
    /// The service keeps a client on one backend (`sessionAffinity: ClientIP`).
    pub const AFFINITY: u8 = 1 << 0;
}

/// Key of the services map: one frontend, i.e. a ClusterIP, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Service4Key {
    /// IPv4 address, network byte order.
    pub addr: u32,
    /// Port, network byte order.
    pub port: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    pub pad: u8,
}

/// Value of the services map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Service4Value {
    /// Never reused while the agent's maps live: affinity entries are keyed by it.
    pub service_id: u32,
    /// Number of backend slots of the current generation; 0 means refuse the connection.
    pub count: u16,
    /// Which generation of slots is live (0 or 1).
    pub generation: u8,
    /// `service_flags::*`.
    pub flags: u8,
    /// Session affinity timeout in seconds (used when `flags` has `AFFINITY`).
    pub affinity_timeout_secs: u32,
    pub pad: u32,
}

/// Key of the slots map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot4Key {
    pub service_id: u32,
    /// 0-based index, below `Service4Value::count`.
    pub index: u16,
    pub generation: u8,
    pub pad: u8,
}

/// Value of the slots map: a backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Slot4Value {
    pub backend_id: u32,
}

/// Value of the backends map (key: backend id, `u32`). Ids belong to one service: the same pod
/// behind two services has two ids, so removing it from one service never touches the other.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend4 {
    /// IPv4 address, network byte order.
    pub addr: u32,
    /// Port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

/// Key of the session-affinity map: one client (its network namespace, i.e. its pod) and one
/// service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Affinity4Key {
    /// `bpf_get_netns_cookie` of the client socket.
    pub client_cookie: u64,
    pub service_id: u32,
    pub pad: u32,
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

/// Key of the reverse-translation map: a socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNat4Key {
    /// `bpf_get_socket_cookie` of the client socket.
    pub socket_cookie: u64,
    /// Backend address and port, network byte order.
    pub backend_addr: u32,
    pub backend_port: u16,
    pub pad: u16,
}

/// Value of the reverse-translation map: the service address the client asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNat4Value {
    pub service_addr: u32,
    pub service_port: u16,
    pub pad: u16,
}

const _: () = {
    assert!(core::mem::size_of::<Service4Key>() == 8);
    assert!(core::mem::size_of::<Service4Value>() == 16);
    assert!(core::mem::size_of::<Slot4Key>() == 8);
    assert!(core::mem::size_of::<Slot4Value>() == 4);
    assert!(core::mem::size_of::<Backend4>() == 8);
    assert!(core::mem::size_of::<Affinity4Key>() == 16);
    assert!(core::mem::size_of::<Affinity4Value>() == 16);
    assert!(core::mem::size_of::<RevNat4Key>() == 16);
    assert!(core::mem::size_of::<RevNat4Value>() == 8);
    assert!(limits::MAX_BACKENDS_PER_SERVICE <= u16::MAX as u32);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY (all): #[repr(C)], only integer fields, no implicit padding (size asserts above).
    unsafe impl aya::Pod for Service4Key {}
    unsafe impl aya::Pod for Service4Value {}
    unsafe impl aya::Pod for Slot4Key {}
    unsafe impl aya::Pod for Slot4Value {}
    unsafe impl aya::Pod for Backend4 {}
    unsafe impl aya::Pod for Affinity4Key {}
    unsafe impl aya::Pod for Affinity4Value {}
    unsafe impl aya::Pod for RevNat4Key {}
    unsafe impl aya::Pod for RevNat4Value {}
}

/// An IPv4 address in host order (`u32::from(Ipv4Addr)`) to the map's network order.
pub const fn addr_to_map(host_order: u32) -> u32 {
    host_order.to_be()
}

/// A map address (network order) back to host order (`Ipv4Addr::from(u32)`).
pub const fn addr_from_map(map: u32) -> u32 {
    u32::from_be(map)
}

/// A port in host order to the map's network order.
pub const fn port_to_map(port: u16) -> u16 {
    port.to_be()
}

/// A map port (network order) back to host order.
pub const fn port_from_map(map: u16) -> u16 {
    u16::from_be(map)
}
