//! Map keys, values, names and limits shared by the eBPF programs (`lb-ebpf`) and the agent
//! (`lb-userspace`). One definition for both sides: every type is `#[repr(C)]`, has explicit
//! padding fields (always zero, so hash lookups never miss on an undefined byte) and a
//! compile-time size check.
//!
//! Byte order: addresses and ports are stored in network byte order, exactly as the kernel
//! hands them to the programs (`bpf_sock_addr.user_ip4`, `user_port`, packet headers), so the
//! data path never converts. The agent converts with the helpers at the bottom of this file.
//!
//! Both address families from one definition (see `addr`): a map whose key or value holds an
//! address is a generic type with an alias per family (`Frontend4Key`, `Frontend6Key`) and
//! one map per family (`LB4_*`, `LB6_*`); maps without addresses serve both, and service and
//! backend ids are one id space over both families.
//!
//! One service table serves every frontend kind (Cilium's layout, see `service`): a frontend
//! (address, port, protocol, scope) names a service id (one backend set of one Service port),
//! a backend count and a generation; slots `(service id, generation, index)` name backend ids;
//! backends are one map for every service. The socket programs pick a slot at random, XDP
//! through the service's Maglev table. The map families, one module each:
//! - [`service`]: frontends, slots, backends, Maglev tables;
//! - [`affinity`]: session affinity, for socket clients (netns cookie) and outside clients
//!   (address) alike;
//! - [`sock`]: per socket, the services it reached and their backends (reverse translation for
//!   recvmsg and getpeername, one backend per unconnected UDP socket);
//! - [`flow`]: per-packet connection tracking and reverse translation of XDP/tc flows;
//! - [`frag`]: the ports of fragmented datagrams, for their later fragments;
//! - [`source_range`]: the allowed sources of LoadBalancer IPs (`loadBalancerSourceRanges`);
//! - [`inspect`]: names and counters for operators;
//! - [`reasons`]: why the north-south programs dropped or passed a packet;
//! - [`map_names`] and [`limits`]: what each map is called and how big it is.
#![cfg_attr(not(test), no_std)]

pub mod addr;
pub mod affinity;
pub mod flow;
pub mod frag;
pub mod inspect;
pub mod limits;
pub mod map_names;
#[cfg(feature = "user")]
mod pod;
pub mod reasons;
pub mod service;
pub mod sock;
pub mod source_range;

pub use addr::{Addr4, Addr6, MapAddr, families, v4_mapped, v4_of_mapped};
pub use affinity::{Affinity4Key, Affinity6Key, AffinityKey, AffinityValue, affinity_clients};
pub use flow::{
    Ct4Key, Ct4Value, Ct6Key, Ct6Value, CtKey, CtValue, ReplyHint, ReplyHint4, ReplyHint6,
    Rev4Value, Rev6Value, RevValue, ct_flags, ct_state, ct_timeouts, flow_hash, hint_state,
    reply_hint_slot, snat_ports, tcp_flags,
};
pub use frag::{Frag4Key, Frag6Key, FragKey, FragPorts};
pub use inspect::{NameKey, NameKey4, NameKey6, ServiceName, ServiceStats};
pub use service::{
    Backend, Backend4, Backend6, Frontend4Key, Frontend6Key, FrontendKey, FrontendValue,
    MAGLEV_SIZE, MaglevTable, SlotKey, SlotValue, backend_flags, backend_states, frontend_flags,
    frontend_kinds, scopes,
};
pub use sock::{SOCK_SERVICES, Sock4Value, Sock6Value, SockService, SockValue};
pub use source_range::{SourceRange4Key, SourceRange6Key, SourceRangeKey};

/// IANA protocol numbers as the kernel reports them in `bpf_sock_addr.protocol`.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;

/// `errno` values the socket programs return through `bpf_set_retval`.
pub const ECONNREFUSED: i32 = 111;
/// A LoadBalancer IP refused by its `loadBalancerSourceRanges` (what a netfilter drop on
/// output reports).
pub const EPERM: i32 = 1;
pub const EADDRINUSE: i32 = 98;

/// Nanoseconds in a second (`bpf_ktime_get_ns` against timeouts given in seconds).
pub const NANOS_PER_SEC: u64 = 1_000_000_000;

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
