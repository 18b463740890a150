//! Default capacities. The agent sets each of them at load time (`--max-services` ...); the
//! eBPF object carries these as its defaults.

/// Frontends: one per (address, port, protocol, scope) of every service, of every kind.
pub const MAX_SERVICES: u32 = 65_536;
/// Backends over all services (a pod behind several services is one backend).
pub const MAX_BACKENDS: u32 = 262_144;
/// Backend slots over all backend sets; two generations live side by side during an update.
pub const MAX_SLOTS: u32 = 2 * MAX_BACKENDS;
/// Maglev tables: one per backend set that outside traffic reaches (64 KiB each, allocated
/// on use). `--max-maglev-tables` sets it.
pub const MAX_MAGLEV_TABLES: u32 = 16_384;
/// Session-affinity entries (LRU: the least recently used client is forgotten first).
pub const MAX_AFFINITY: u32 = 131_072;
/// Open sockets that reached a service (LRU, keyed by socket; an entry goes with its
/// socket, so this bounds live sockets, not connections over time).
pub const MAX_REVNAT: u32 = 131_072;
/// Most backends one service may have; bounds the slot index. Kubernetes' own
/// scalability threshold is 250 endpoints per service.
pub const MAX_BACKENDS_PER_SERVICE: u32 = 16_384;
/// Tracked XDP flows (LRU: the least recently used flow is forgotten first).
pub const MAX_FLOWS: u32 = 131_072;
/// Reverse entries of XDP flows: one per flow to a local backend, three per SNAT flow (the
/// reply to the node, the forwarded packet, the reply to the client), so the reverse map does
/// not evict the entries of flows the conntrack map still holds.
pub const MAX_FLOW_REPLIES: u32 = 3 * MAX_FLOWS;
/// Reply hints of new XDP flows (`lb_common::ReplyHint`): a direct-mapped array, a power of
/// two, fixed in the object (not set at load). A hint lives from a flow's first packet to its
/// first reply; a slot wanted by another flow before then costs that flow the reverse map
/// insert hints save.
pub const MAX_REPLY_HINTS: u32 = 131_072;
/// Fragmented datagrams in flight whose first fragment XDP or tc translated (LRU: an entry
/// is needed only until the datagram's last fragment went by, so the oldest go first).
pub const MAX_FRAGS: u32 = 8_192;
/// Allowed source ranges over all LoadBalancer frontends (one entry per range per service
/// id, plus each LB IP of a service whose ranges hold the node).
pub const MAX_SOURCE_RANGES: u32 = 16_384;
/// (Backend, node address) pairs whose SNAT range was found full (LRU; a forgotten one costs
/// one more search of its range).
pub const MAX_SNAT_EXHAUSTED: u32 = 4_096;
pub const MAX_NODE_ADDRS: u32 = 256;
pub const MAX_IFACES: u32 = 64;

const _: () = assert!(MAX_BACKENDS_PER_SERVICE <= u16::MAX as u32);
