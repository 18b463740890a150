//! Map definitions. The static's name is the map's name and must equal the constant in
//! `lb_common::map_names`; sizes are the defaults of `lb_common::limits`, which the agent sets
//! at load time. Every map is pinned by name under the agent's bpffs directory so the data
//! path survives agent restarts.
//!
//! One service table for every frontend kind: the socket programs and XDP read the same
//! frontends, slots, backends and affinity entries. A map whose key or value holds an
//! address exists once per family (`LB4_*`, `LB6_*`, one generic layout in lb-common; the
//! programs reach them through `family::Family`); slots, Maglev tables and counters serve
//! both families.
use crate::{
    hint::Scratch,
    snat::Search,
    stages::{self, Pending},
};
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, ProgramArray},
};
use lb_common::{
    Addr4, Addr6, Affinity4Key, Affinity6Key, AffinityValue, Backend4, Backend6, Ct4Key, Ct4Value,
    Ct6Key, Ct6Value, Frag4Key, Frag6Key, FragPorts, Frontend4Key, Frontend6Key, FrontendValue,
    MaglevTable, NameKey4, NameKey6, ReplyHint4, ReplyHint6, Rev4Value, Rev6Value, ServiceName,
    ServiceStats, SlotKey, SlotValue, Sock4Value, Sock6Value, SourceRange4Key, SourceRange6Key,
    limits, reasons,
};

// ---- the service table (every attach point) ----

#[map]
pub static LB4_FRONT_V2: HashMap<Frontend4Key, FrontendValue> =
    HashMap::pinned(limits::MAX_SERVICES, 0);

#[map]
pub static LB4_SLOTS_V2: HashMap<SlotKey, SlotValue> = HashMap::pinned(limits::MAX_SLOTS, 0);

#[map]
pub static LB4_BACKEND_V2: HashMap<u32, Backend4> = HashMap::pinned(limits::MAX_BACKENDS, 0);

/// 64 KiB per table: allocated on insert, not up front. An update replaces a table whole, so
/// a packet reads either the old or the new one.
#[map]
pub static LB4_MAGLEV_V2: HashMap<u32, MaglevTable> =
    HashMap::pinned(limits::MAX_MAGLEV_TABLES, BPF_F_NO_PREALLOC);

#[map]
pub static LB4_AFFIN_V2: LruHashMap<Affinity4Key, AffinityValue> =
    LruHashMap::pinned(limits::MAX_AFFINITY, 0);

#[map]
pub static LB4_STATS_V2: PerCpuHashMap<u32, ServiceStats> =
    PerCpuHashMap::pinned(limits::MAX_SERVICES, 0);

/// `loadBalancerSourceRanges`: allowed clients per service id (see
/// `lb_common::source_range`). Allocated on insert, as every LPM trie.
#[map]
pub static LB4_SRCRANGE: LpmTrie<SourceRange4Key, u8> =
    LpmTrie::pinned(limits::MAX_SOURCE_RANGES, 0);

/// Written by the agent for `lb-agent list`; no program reads it.
#[map]
pub static LB4_NAMES_V2: HashMap<NameKey4, ServiceName> = HashMap::pinned(limits::MAX_SERVICES, 0);

// ---- the socket programs ----

/// Per socket cookie: the services the socket reached and their backends; deleted when the
/// socket is released (`sock_release`), LRU as a backstop.
#[map]
pub static LB4_REVNAT_V2: LruHashMap<u64, Sock4Value> = LruHashMap::pinned(limits::MAX_REVNAT, 0);

// ---- XDP and tc flows ----

#[map]
pub static LB4_CT_V2: LruHashMap<Ct4Key, Ct4Value> = LruHashMap::pinned(limits::MAX_FLOWS, 0);

#[map]
pub static LB4_FLOWREV_V2: LruHashMap<Ct4Key, Rev4Value> =
    LruHashMap::pinned(limits::MAX_FLOW_REPLIES, 0);

/// A new flow's reverse entry until its first reply (`hint.rs`): a slot write, not an LRU
/// insert, on the flow's first packet. Fixed size (`reply_hint_slot` masks with it).
#[map]
pub static LB4_RHINT_V1: Array<ReplyHint4> = Array::pinned(limits::MAX_REPLY_HINTS, 0);

/// Per CPU, a new flow's reverse entry on its way to its hint (`hint.rs`): scratch, not
/// pinned.
#[map]
pub static LB4_HINTSCRATCH: PerCpuArray<Scratch<Addr4>> = PerCpuArray::with_max_entries(1, 0);

/// When the SNAT range of a (backend, node address) pair was last found full (see `snat.rs`).
#[map]
pub static LB4_SNATFULL_V1: LruHashMap<Ct4Key, u64> =
    LruHashMap::pinned(limits::MAX_SNAT_EXHAUSTED, 0);

/// The ports of fragmented datagrams whose first fragment XDP or tc translated, keyed by the
/// fragments' identity as the program saw it (`frag.rs`).
#[map]
pub static LB4_FRAGS_V2: LruHashMap<Frag4Key, FragPorts> = LruHashMap::pinned(limits::MAX_FRAGS, 0);

/// Per CPU, the state of a new SNAT flow's port search (`snat.rs`): scratch, not pinned.
#[map]
pub static LB4_SNATSEARCH: PerCpuArray<Search<Addr4>> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static LB4_NODEADDR: HashMap<u32, u32> = HashMap::pinned(limits::MAX_NODE_ADDRS, 0);

#[map]
pub static LB4_IFADDR: HashMap<u32, u32> = HashMap::pinned(limits::MAX_IFACES, 0);

/// Why XDP and tc dropped or passed each packet, by `lb_common::reasons` number (see
/// `verdict.rs`).
#[map]
pub static LB4_REASONS_V1: PerCpuArray<u64> = PerCpuArray::pinned(reasons::COUNT, 0);

// ---- IPv6: the per-family maps above, over `Addr6` ----

#[map]
pub static LB6_FRONT_V1: HashMap<Frontend6Key, FrontendValue> =
    HashMap::pinned(limits::MAX_SERVICES, 0);

#[map]
pub static LB6_BACKEND_V1: HashMap<u32, Backend6> = HashMap::pinned(limits::MAX_BACKENDS, 0);

#[map]
pub static LB6_AFFIN_V1: LruHashMap<Affinity6Key, AffinityValue> =
    LruHashMap::pinned(limits::MAX_AFFINITY, 0);

#[map]
pub static LB6_SRCRANGE: LpmTrie<SourceRange6Key, u8> =
    LpmTrie::pinned(limits::MAX_SOURCE_RANGES, 0);

#[map]
pub static LB6_NAMES_V1: HashMap<NameKey6, ServiceName> = HashMap::pinned(limits::MAX_SERVICES, 0);

#[map]
pub static LB6_REVNAT_V1: LruHashMap<u64, Sock6Value> = LruHashMap::pinned(limits::MAX_REVNAT, 0);

#[map]
pub static LB6_CT_V1: LruHashMap<Ct6Key, Ct6Value> = LruHashMap::pinned(limits::MAX_FLOWS, 0);

#[map]
pub static LB6_FLOWREV_V1: LruHashMap<Ct6Key, Rev6Value> =
    LruHashMap::pinned(limits::MAX_FLOW_REPLIES, 0);

#[map]
pub static LB6_RHINT_V1: Array<ReplyHint6> = Array::pinned(limits::MAX_REPLY_HINTS, 0);

#[map]
pub static LB6_HINTSCRATCH: PerCpuArray<Scratch<Addr6>> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static LB6_SNATFULL_V1: LruHashMap<Ct6Key, u64> =
    LruHashMap::pinned(limits::MAX_SNAT_EXHAUSTED, 0);

#[map]
pub static LB6_FRAGS_V1: LruHashMap<Frag6Key, FragPorts> = LruHashMap::pinned(limits::MAX_FRAGS, 0);

#[map]
pub static LB6_SNATSEARCH: PerCpuArray<Search<Addr6>> = PerCpuArray::with_max_entries(1, 0);

/// IPv6's XDP stages by `stages::*` index (`xdp.rs`), put there by the agent at load.
#[map]
pub static LB6_XDPSTAGES: ProgramArray = ProgramArray::pinned(stages::COUNT, 0);

/// Per CPU, what a new IPv6 flow's earlier XDP stages decided (`stages.rs`). Pinned like the
/// stage array: while an upgrade swaps programs, an old object's stage may enter a new
/// object's next one, and both must read one value.
#[map]
pub static LB6_PENDING_V1: PerCpuArray<Pending<Addr6>> = PerCpuArray::pinned(1, 0);

#[map]
pub static LB6_NODEADDR: HashMap<Addr6, u32> = HashMap::pinned(limits::MAX_NODE_ADDRS, 0);

#[map]
pub static LB6_IFADDR: HashMap<u32, Addr6> = HashMap::pinned(limits::MAX_IFACES, 0);
