//! Map definitions. The static's name is the map's name and must equal the constant in
//! `lb_common::map_names`; sizes are the defaults of `lb_common::limits`, which the agent may
//! raise at load time. Every map is pinned by name under the agent's bpffs directory so the
//! data path survives agent restarts.
use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap},
};
use lb_common::{
    Affinity4Key, Affinity4Value, Backend4, RevNat4Key, RevNat4Value, Service4Key, Service4Value,
    Slot4Key, Slot4Value, limits,
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
