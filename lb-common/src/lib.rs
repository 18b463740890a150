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
    pub const SERVICE_STATS_V4: &str = "LB4_SVC_STATS";
    pub const SERVICE_NAMES_V4: &str = "LB4_SVC_NAMES";
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
    /// `backend_flags::*`: for operators (`lb-agent list`); the programs do not look.
    pub flags: u8,
}

/// `Backend4::flags`.
pub mod backend_flags {
    /// Serving but terminating: used only because the service has no ready endpoint
    /// (kube-proxy's fallback for graceful termination).
    pub const TERMINATING: u8 = 1 << 0;
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

/// What kind of frontend a [`NameKey`] names.
pub mod frontend_kinds {
    /// A ClusterIP, in the services map.
    pub const CLUSTER_IP: u8 = 1;
    /// A NodePort (address 0: every NodePort address of the node), in the external map.
    pub const NODE_PORT: u8 = 2;
    /// An externalIP or LoadBalancer ingress IP, in the external map.
    pub const EXTERNAL_IP: u8 = 3;
}

/// Key of the names map: a frontend as programmed and its kind. The programs never read
/// this map; it lets `lb-agent list` name what it shows without a running agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NameKey {
    pub frontend: Service4Key,
    /// `frontend_kinds::*`.
    pub kind: u8,
    pub pad: [u8; 3],
}

/// Value of the names map: `namespace/name:port` (UTF-8, cut at 124 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceName {
    pub len: u8,
    pub pad: [u8; 3],
    pub text: [u8; 124],
}

impl ServiceName {
    pub fn new(text: &str) -> Self {
        let mut end = text.len().min(124);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0u8; 124];
        bytes[..end].copy_from_slice(&text.as_bytes()[..end]);
        Self {
            len: end as u8,
            pad: [0; 3],
            text: bytes,
        }
    }

    pub fn as_str(&self) -> &str {
        let len = (self.len as usize).min(self.text.len());
        core::str::from_utf8(&self.text[..len]).unwrap_or("?")
    }
}

/// Value of the per-CPU service statistics map (key: service id, `u32`). The agent creates
/// the entry with the service and removes it with the service; the programs only count.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceStats {
    /// Connections (and unconnected UDP datagrams) sent to a backend.
    pub forwarded: u64,
    /// Connections refused because the service had no backend.
    pub refused: u64,
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
    assert!(core::mem::size_of::<ServiceStats>() == 16);
    assert!(core::mem::size_of::<NameKey>() == 12);
    assert!(core::mem::size_of::<ServiceName>() == 128);
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
    unsafe impl aya::Pod for ServiceStats {}
    unsafe impl aya::Pod for NameKey {}
    unsafe impl aya::Pod for ServiceName {}
}

// ---- north-south (XDP) ----
//
// Traffic from outside the cluster (NodePort, externalIPs, LoadBalancer ingress IPs) is
// translated per packet by the XDP program on the node's interfaces (`lb-ebpf/src/xdp.rs`)
// and its replies by the tc egress program (`lb-ebpf/src/tc.rs`). These maps are separate from
// the socket load balancer's: external frontends have their own service ids, backend ids (a
// backend carries its locality) and Maglev tables.

/// Maglev lookup table size (a prime): every external service has one table of this many
/// backend ids; a flow picks entry `flow_hash % MAGLEV_SIZE`.
pub const MAGLEV_SIZE: u32 = 16_381;

/// Map names of the north-south data path (at most 15 bytes each).
pub mod ns_map_names {
    /// External frontends: `External4Key` → `External4Value`.
    pub const FRONTENDS: &str = "LB4_NS_FRONT";
    /// Backends of external services: id → `NsBackend4`.
    pub const BACKENDS: &str = "LB4_NS_BACKEND";
    /// Maglev tables: external service id → `Maglev4Table`.
    pub const MAGLEV: &str = "LB4_NS_MAGLEV";
    /// Connection tracking, keyed by the client's tuple: `Ct4Key` → `Ct4Value` (LRU).
    pub const CT: &str = "LB4_NS_CT";
    /// Reverse translation, keyed by the reply's tuple: `Ct4Key` → `Rev4Value` (LRU).
    pub const REV: &str = "LB4_NS_REV";
    /// This node's addresses NodePorts answer on: address → 1.
    pub const NODE_ADDRS: &str = "LB4_NS_NODEIP";
    /// Source address for SNAT per ingress interface: ifindex → address.
    pub const IFACE_ADDRS: &str = "LB4_NS_IFADDR";
    /// Session affinity of external clients: `NsAffinity4Key` → `Affinity4Value` (LRU).
    pub const AFFINITY: &str = "LB4_NS_AFFIN";
}

/// Default capacities of the north-south maps.
pub mod ns_limits {
    /// External frontends (NodePort wildcard, externalIP and LB IP entries).
    pub const MAX_FRONTENDS: u32 = 16_384;
    /// Backends over all external services.
    pub const MAX_BACKENDS: u32 = 131_072;
    /// Maglev tables (one per external frontend, 64 KiB each, allocated on use).
    pub const MAX_TABLES: u32 = 4_096;
    /// Tracked flows (LRU: the least recently used flow is forgotten first).
    pub const MAX_FLOWS: u32 = 131_072;
    /// Reverse entries: one per flow to a local backend, three per SNAT flow (the reply to
    /// the node, the forwarded packet, the reply to the client), so the reverse map does not
    /// evict the entries of flows the conntrack map still holds.
    pub const MAX_REVERSE: u32 = 3 * MAX_FLOWS;
    pub const MAX_NODE_ADDRS: u32 = 256;
    pub const MAX_IFACES: u32 = 64;
    pub const MAX_AFFINITY: u32 = 65_536;
}

/// `External4Value::flags`.
pub mod ns_flags {
    /// `externalTrafficPolicy: Local`: only local backends, client address kept, and a
    /// service without local backend drops the packet.
    pub const LOCAL_ONLY: u8 = 1 << 0;
    /// `sessionAffinity: ClientIP`.
    pub const AFFINITY: u8 = 1 << 1;
    /// The frontend is a NodePort (informational: the key's address is 0).
    pub const NODEPORT: u8 = 1 << 2;
}

/// `NsBackend4::flags`.
pub mod ns_backend_flags {
    /// The backend runs on this node: reached without SNAT.
    pub const LOCAL: u8 = 1 << 0;
}

/// `Ct4Value::flags` and `Rev4Value::flags`.
pub mod ct_flags {
    /// A reply was seen (TCP: the connection is established; UDP: a stream).
    pub const SEEN_REPLY: u8 = 1 << 0;
    /// A FIN or RST was seen in either direction.
    pub const CLOSING: u8 = 1 << 1;
    /// The flow's source was translated to the node's address (`nat_addr`, `nat_port`). On a
    /// reverse entry: the entry of the remote backend's reply to the node's address, whose
    /// destination XDP restores to the client.
    pub const SNAT: u8 = 1 << 2;
    /// On a reverse entry: the entry of the client's packet on its way to the remote backend,
    /// whose source tc egress sets to the node's address and SNAT port.
    pub const SNAT_OUT: u8 = 1 << 3;
}

/// Connection-tracking lifetimes in seconds, after the kernel's nf_conntrack defaults: an idle
/// flow is forgotten (and its next packet chooses a backend afresh) after this long.
pub mod ct_timeouts {
    /// TCP before any reply (kernel: syn_sent 120 s, syn_recv 60 s).
    pub const TCP_SYN: u64 = 60;
    /// TCP after a reply (kernel: established, 5 days).
    pub const TCP_ESTABLISHED: u64 = 432_000;
    /// TCP after a FIN or RST (kernel: close 10 s).
    pub const TCP_CLOSING: u64 = 10;
    /// UDP without reply (kernel: udp_timeout 30 s).
    pub const UDP: u64 = 30;
    /// UDP with replies (kernel: udp_timeout_stream 120 s).
    pub const UDP_REPLIED: u64 = 120;
}

/// Source ports the node uses for SNAT of external flows to remote backends: above the
/// kernel's default ephemeral range (32768-60999), so they do not collide with the node's own
/// connections.
pub mod snat_ports {
    pub const FIRST: u16 = 61_000;
    pub const COUNT: u16 = 4_536;
    /// Ports tried per new flow before it is dropped (port exhaustion).
    pub const TRIES: u32 = 8;
}

/// Key of the external-frontends map. Same layout as `Service4Key`; `addr` 0 is a NodePort,
/// answering on every address in `LB4_NS_NODEIP`.
pub type External4Key = Service4Key;

/// Value of the external-frontends map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct External4Value {
    /// Key of the Maglev table, never reused while the maps live.
    pub service_id: u32,
    /// Number of backends; 0 means none (eTP Local: drop; Cluster: left to the stack, which
    /// refuses it).
    pub count: u16,
    /// `ns_flags::*`.
    pub flags: u8,
    pub pad: u8,
    pub affinity_timeout_secs: u32,
    pub pad2: u32,
}

/// Value of the north-south backends map (key: backend id, `u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NsBackend4 {
    /// Network byte order.
    pub addr: u32,
    /// Network byte order.
    pub port: u16,
    /// `ns_backend_flags::*`.
    pub flags: u8,
    pub pad: u8,
}

/// A Maglev table: `backend_ids[i]` names the backend of entry `i`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Maglev4Table {
    pub backend_ids: [u32; MAGLEV_SIZE as usize],
    pub pad: u32,
}

impl Default for Maglev4Table {
    fn default() -> Self {
        Self {
            backend_ids: [0; MAGLEV_SIZE as usize],
            pad: 0,
        }
    }
}

/// A flow's tuple as seen on the wire (addresses and ports in network byte order). In
/// `LB4_NS_CT` it is the client's packet (client → frontend); in `LB4_NS_REV` the reply
/// (backend → client, or backend → node address and SNAT port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ct4Key {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

/// Value of the connection-tracking map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ct4Value {
    /// `bpf_ktime_get_ns` of the last packet (refreshed at most once a second).
    pub last_seen_ns: u64,
    pub backend_addr: u32,
    pub backend_port: u16,
    /// SNAT source port (with `ct_flags::SNAT`).
    pub nat_port: u16,
    /// SNAT source address (with `ct_flags::SNAT`).
    pub nat_addr: u32,
    /// The backend id it was chosen as; a flow whose backend is gone chooses again.
    pub backend_id: u32,
    pub service_id: u32,
    /// `ct_flags::*`.
    pub flags: u8,
    pub pad: [u8; 3],
}

/// Value of the reverse-translation map. tc egress sets a packet's source to
/// (`frontend_addr`, `frontend_port`): a reply leaves from the frontend the client used, and
/// (with `ct_flags::SNAT_OUT`) a packet to a remote backend leaves from the node's address and
/// SNAT port. XDP sets the destination of a remote backend's reply (`ct_flags::SNAT`) back to
/// (`client_addr`, `client_port`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Rev4Value {
    pub client_addr: u32,
    pub frontend_addr: u32,
    pub client_port: u16,
    pub frontend_port: u16,
    /// `ct_flags::SNAT` when the reply comes back to the node's address and must also have
    /// its destination restored.
    pub flags: u8,
    pub proto: u8,
    pub pad: u16,
}

/// Key of the north-south session-affinity map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NsAffinity4Key {
    pub client_addr: u32,
    pub service_id: u32,
}

/// The flow hash that indexes Maglev tables, the same on every node and in the agent's
/// tests. Inputs as on the wire (network byte order). With session affinity only the client
/// address is hashed (`sport`, `daddr`, `dport` passed as 0).
pub const fn flow_hash(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h: u32 = 0x9e37_79b9;
    h = mix(h, saddr);
    h = mix(h, daddr);
    h = mix(h, ((sport as u32) << 16) | dport as u32);
    h = mix(h, proto as u32);
    // murmur3 finaliser
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

const fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

const _: () = {
    assert!(core::mem::size_of::<External4Value>() == 16);
    assert!(core::mem::size_of::<NsBackend4>() == 8);
    assert!(core::mem::size_of::<Maglev4Table>() == 4 * MAGLEV_SIZE as usize + 4);
    assert!(core::mem::size_of::<Ct4Key>() == 16);
    assert!(core::mem::size_of::<Ct4Value>() == 32);
    assert!(core::mem::size_of::<Rev4Value>() == 16);
    assert!(core::mem::size_of::<NsAffinity4Key>() == 8);
    assert!((snat_ports::FIRST as u32 + snat_ports::COUNT as u32) <= 65_536);
};

#[cfg(feature = "user")]
mod ns_pod {
    use super::*;
    // SAFETY (all): #[repr(C)], only integer fields, no implicit padding (size asserts above).
    unsafe impl aya::Pod for External4Value {}
    unsafe impl aya::Pod for NsBackend4 {}
    unsafe impl aya::Pod for Maglev4Table {}
    unsafe impl aya::Pod for Ct4Key {}
    unsafe impl aya::Pod for Ct4Value {}
    unsafe impl aya::Pod for Rev4Value {}
    unsafe impl aya::Pod for NsAffinity4Key {}
}

// ---- end of north-south (XDP) ----

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
