//! Map names (the kernel keeps at most 15 bytes of a name). A name carries its layout's
//! version: a change of a key or value layout takes a new version, so an upgrade builds the
//! new map beside the old one. A pinned map whose shape (type, key size, value size,
//! capacity) differs from what this build wants is migrated by the agent at load, never
//! silently reused.
//!
//! Maps without an address in their key or value serve both families and keep the names
//! they had before IPv6 (`LB4_SLOTS_V2`, `LB4_MAGLEV_V2`, `LB4_STATS_V2`, `LB4_REASONS_V1`:
//! the `LB4_` prefix is historical, kept so an upgrade adopts them). Every other map has one
//! name per family, `LB4_*` and `LB6_*`, both of one generic layout.

/// Frontends of every kind: `Frontend4Key` → `FrontendValue`.
pub const FRONTENDS_V4: &str = "LB4_FRONT_V2";
/// Backend slots: `SlotKey` → `SlotValue`.
pub const SLOTS_V4: &str = "LB4_SLOTS_V2";
/// Backends of every service: backend id → `Backend4`.
pub const BACKENDS_V4: &str = "LB4_BACKEND_V2";
/// Maglev tables, one per backend set that outside traffic reaches: service id →
/// `MaglevTable`.
pub const MAGLEV_V4: &str = "LB4_MAGLEV_V2";
/// Session affinity of every client kind: `Affinity4Key` → `AffinityValue` (LRU).
pub const AFFINITY_V4: &str = "LB4_AFFIN_V2";
/// Per socket (cookie), the services it reached and their backends: `u64` → `Sock4Value`
/// (LRU; deleted when the socket is released).
pub const REVNAT_V4: &str = "LB4_REVNAT_V2";
/// Per-CPU counters per service id: `ServiceStats`.
pub const SERVICE_STATS_V4: &str = "LB4_STATS_V2";
/// Names of the programmed frontends, for `lb-agent list`: `NameKey` → `ServiceName`.
pub const SERVICE_NAMES_V4: &str = "LB4_NAMES_V2";
/// Connection tracking of XDP flows, keyed by the client's tuple: `Ct4Key` → `Ct4Value`
/// (LRU).
pub const FLOWS_V4: &str = "LB4_CT_V2";
/// Reverse translation of XDP flows, keyed by the reply's tuple: `Ct4Key` → `Rev4Value`
/// (LRU).
pub const FLOW_REPLIES_V4: &str = "LB4_FLOWREV_V2";
/// Reverse translations of new XDP flows not yet replied to, for tc egress to insert into
/// `FLOW_REPLIES_V4` at the first reply: array of `limits::MAX_REPLY_HINTS` `ReplyHint4`,
/// indexed by `reply_hint_slot` of the reply's tuple.
pub const REPLY_HINTS_V4: &str = "LB4_RHINT_V1";
/// SNAT port exhaustion, per (backend address, node address, backend port, 0, protocol) as a
/// `Ct4Key`: when a search of the whole SNAT range last found no port (`u64`,
/// `bpf_ktime_get_ns`; LRU, a hint only).
pub const SNAT_EXHAUSTED_V4: &str = "LB4_SNATFULL_V1";
/// This node's addresses NodePorts answer on: address → 1.
pub const NODE_ADDRS_V4: &str = "LB4_NODEADDR";
/// Source address for SNAT per ingress interface: ifindex → address.
pub const IFACE_ADDRS_V4: &str = "LB4_IFADDR";
/// Allowed client ranges of LoadBalancer IPs with `loadBalancerSourceRanges` (LPM trie):
/// `SourceRange4Key` → 1.
pub const SOURCE_RANGES_V4: &str = "LB4_SRCRANGE";
/// The ports of fragmented datagrams XDP or tc translated, for their later fragments:
/// `Frag4Key` → `FragPorts` (LRU).
pub const FRAGS_V4: &str = "LB4_FRAGS_V2";
/// Why XDP and tc dropped or passed each packet: per-CPU counters (`u64`) indexed by
/// `lb_common::reasons` (per-CPU array of `reasons::COUNT` entries). The reason numbers are
/// its layout.
pub const REASONS_V4: &str = "LB4_REASONS_V1";

// ---- IPv6: the same layouts over `Addr6` ----

/// Frontends of every kind: `Frontend6Key` → `FrontendValue`.
pub const FRONTENDS_V6: &str = "LB6_FRONT_V1";
/// Backends: backend id → `Backend6` (ids shared with `BACKENDS_V4`'s space).
pub const BACKENDS_V6: &str = "LB6_BACKEND_V1";
/// Session affinity: `Affinity6Key` → `AffinityValue` (LRU).
pub const AFFINITY_V6: &str = "LB6_AFFIN_V1";
/// Per socket (cookie), the IPv6 services it reached: `u64` → `Sock6Value` (LRU).
pub const REVNAT_V6: &str = "LB6_REVNAT_V1";
/// Names of the programmed IPv6 frontends: `NameKey6` → `ServiceName`.
pub const SERVICE_NAMES_V6: &str = "LB6_NAMES_V1";
/// Connection tracking: `Ct6Key` → `Ct6Value` (LRU).
pub const FLOWS_V6: &str = "LB6_CT_V1";
/// Reverse translation: `Ct6Key` → `Rev6Value` (LRU).
pub const FLOW_REPLIES_V6: &str = "LB6_FLOWREV_V1";
/// Reply hints: array of `ReplyHint6`.
pub const REPLY_HINTS_V6: &str = "LB6_RHINT_V1";
/// SNAT port exhaustion: `Ct6Key` → `u64` (LRU).
pub const SNAT_EXHAUSTED_V6: &str = "LB6_SNATFULL_V1";
/// This node's IPv6 NodePort addresses (and `::1`): `Addr6` → 1.
pub const NODE_ADDRS_V6: &str = "LB6_NODEADDR";
/// IPv6 source address for SNAT per ingress interface: ifindex → `Addr6`.
pub const IFACE_ADDRS_V6: &str = "LB6_IFADDR";
/// Allowed IPv6 client ranges (LPM trie): `SourceRange6Key` → 1.
pub const SOURCE_RANGES_V6: &str = "LB6_SRCRANGE";
/// Ports of fragmented IPv6 datagrams: `Frag6Key` → `FragPorts` (LRU).
pub const FRAGS_V6: &str = "LB6_FRAGS_V1";
/// IPv6's XDP stages, entered by tail call (program array, `lb-ebpf/src/stages.rs`).
pub const XDP_STAGES_V6: &str = "LB6_XDPSTAGES";
/// What a new IPv6 flow's earlier XDP stages decided, for the next stage (per-CPU array of
/// one `Pending`, a kernel-only layout: a change takes a new name).
pub const XDP_PENDING_V6: &str = "LB6_PENDING_V1";
