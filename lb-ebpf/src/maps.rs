//! Map definitions. The static's name is the map's name and must equal the constant in
//! `lb_common::map_names`; sizes are the defaults of `lb_common::limits`, which the agent sets
//! at load time. Every map is pinned by name under the agent's bpffs directory so the data
//! path survives agent restarts.
//!
//! One service table for every frontend kind: the socket programs and XDP read the same
//! frontends, slots, backends and affinity entries.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap},
};
use lb_common::{
    Affinity4Key, Affinity4Value, Backend4, Ct4Key, Ct4Value, Frag4Key, Frag4Ports, Frontend4Key,
    Frontend4Value, Maglev4Table, NameKey, Rev4Value, ServiceName, ServiceStats, Slot4Key,
    Slot4Value, Sock4Value, SourceRange4Key, limits, reasons,
};

// ---- the service table (every attach point) ----

#[map]
pub static LB4_FRONT_V2: HashMap<Frontend4Key, Frontend4Value> =
    HashMap::pinned(limits::MAX_SERVICES, 0);

#[map]
pub static LB4_SLOTS_V2: HashMap<Slot4Key, Slot4Value> = HashMap::pinned(limits::MAX_SLOTS, 0);

#[map]
pub static LB4_BACKEND_V2: HashMap<u32, Backend4> = HashMap::pinned(limits::MAX_BACKENDS, 0);

/// 64 KiB per table: allocated on insert, not up front. An update replaces a table whole, so
/// a packet reads either the old or the new one.
#[map]
pub static LB4_MAGLEV_V2: HashMap<u32, Maglev4Table> =
    HashMap::pinned(limits::MAX_MAGLEV_TABLES, BPF_F_NO_PREALLOC);

#[map]
pub static LB4_AFFIN_V2: LruHashMap<Affinity4Key, Affinity4Value> =
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
pub static LB4_NAMES_V2: HashMap<NameKey, ServiceName> = HashMap::pinned(limits::MAX_SERVICES, 0);

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

/// When the SNAT range of a (backend, node address) pair was last found full (see `snat.rs`).
#[map]
pub static LB4_SNATFULL_V1: LruHashMap<Ct4Key, u64> =
    LruHashMap::pinned(limits::MAX_SNAT_EXHAUSTED, 0);

/// The ports of fragmented datagrams whose first fragment XDP or tc translated, keyed by the
/// fragments' identity as the program saw it (`frag.rs`).
#[map]
pub static LB4_FRAGS_V1: LruHashMap<Frag4Key, Frag4Ports> =
    LruHashMap::pinned(limits::MAX_FRAGS, 0);

#[map]
pub static LB4_NODEADDR: HashMap<u32, u32> = HashMap::pinned(limits::MAX_NODE_ADDRS, 0);

#[map]
pub static LB4_IFADDR: HashMap<u32, u32> = HashMap::pinned(limits::MAX_IFACES, 0);

/// Why XDP and tc dropped or passed each packet, by `lb_common::reasons` number (see
/// `verdict.rs`).
#[map]
pub static LB4_REASONS_V1: PerCpuArray<u64> = PerCpuArray::pinned(reasons::COUNT, 0);
