//! Map definitions. The static's name is the map's name and must equal the constant in
//! `lb_common::map_names`; sizes are the defaults of `lb_common::limits`, which the agent may
//! raise at load time. Every map is pinned by name under the agent's bpffs directory so the
//! data path survives agent restarts.
use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuHashMap},
};
use lb_common::{
    Affinity4Key, Affinity4Value, Backend4, RevNat4Key, RevNat4Value, Service4Key, Service4Value,
    ServiceStats, Slot4Key, Slot4Value, limits,
};

#[map]
pub static LB4_SERVICES: HashMap<Service4Key, Service4Value> =
    HashMap::pinned(limits::MAX_SERVICES, 0);

#[map]
pub static LB4_SLOTS: HashMap<Slot4Key, Slot4Value> = HashMap::pinned(limits::MAX_SLOTS, 0);

#[map]
pub static LB4_BACKENDS: HashMap<u32, Backend4> = HashMap::pinned(limits::MAX_BACKENDS, 0);

#[map]
pub static LB4_AFFINITY: LruHashMap<Affinity4Key, Affinity4Value> =
    LruHashMap::pinned(limits::MAX_AFFINITY, 0);

#[map]
pub static LB4_REVNAT: LruHashMap<RevNat4Key, RevNat4Value> =
    LruHashMap::pinned(limits::MAX_REVNAT, 0);

#[map]
pub static LB4_SVC_STATS: PerCpuHashMap<u32, ServiceStats> =
    PerCpuHashMap::pinned(limits::MAX_SERVICES, 0);

// ---- north-south (XDP) ----
// External traffic (NodePort, externalIPs, LoadBalancer IPs): see `xdp.rs` and `tc.rs`.

use aya_ebpf::bindings::BPF_F_NO_PREALLOC;
use lb_common::{
    Ct4Key, Ct4Value, External4Key, External4Value, Maglev4Table, NsAffinity4Key, NsBackend4,
    Rev4Value, ns_limits,
};

#[map]
pub static LB4_NS_FRONT: HashMap<External4Key, External4Value> =
    HashMap::pinned(ns_limits::MAX_FRONTENDS, 0);

#[map]
pub static LB4_NS_BACKEND: HashMap<u32, NsBackend4> = HashMap::pinned(ns_limits::MAX_BACKENDS, 0);

/// 64 KiB per table: allocated on insert, not up front. An update replaces a table whole, so
/// a packet reads either the old or the new one.
#[map]
pub static LB4_NS_MAGLEV: HashMap<u32, Maglev4Table> =
    HashMap::pinned(ns_limits::MAX_TABLES, BPF_F_NO_PREALLOC);

#[map]
pub static LB4_NS_CT: LruHashMap<Ct4Key, Ct4Value> = LruHashMap::pinned(ns_limits::MAX_FLOWS, 0);

#[map]
pub static LB4_NS_REV: LruHashMap<Ct4Key, Rev4Value> =
    LruHashMap::pinned(ns_limits::MAX_REVERSE, 0);

#[map]
pub static LB4_NS_NODEIP: HashMap<u32, u32> = HashMap::pinned(ns_limits::MAX_NODE_ADDRS, 0);

#[map]
pub static LB4_NS_IFADDR: HashMap<u32, u32> = HashMap::pinned(ns_limits::MAX_IFACES, 0);

#[map]
pub static LB4_NS_AFFIN: LruHashMap<NsAffinity4Key, Affinity4Value> =
    LruHashMap::pinned(ns_limits::MAX_AFFINITY, 0);

/// Written by the agent for `lb-agent list`; no program reads it.
#[map]
pub static LB4_SVC_NAMES: HashMap<lb_common::NameKey, lb_common::ServiceName> =
    HashMap::pinned(2 * limits::MAX_SERVICES, 0);
