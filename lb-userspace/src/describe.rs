//! What the pinned maps program, without ids: each frontend with its name, kind, flags,
//! affinity, backends (address, state, flags), source ranges, whether it has a Maglev table and
//! a counters entry, and which frontends share a backend set (numbered by first appearance, not
//! by service id); plus everything the maps hold that no frontend reaches (leaks). Two pin
//! directories that serve the same traffic have equal descriptions, whatever ids their agents
//! picked and whatever order they wrote in. `lb-agent list -o description` prints it, `list`
//! warns about its leaks, and the chaos run compares a restarted agent's maps with a fresh one's.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use anyhow::Context as _;
use aya::maps::{Map, MapData, PerCpuHashMap};
use lb_common::{ServiceStats, SlotKey, frontend_flags, map_names};
use serde::Serialize;

use crate::{
    dataplane::{BpfServiceMaps, inspect, names::NamesMap},
    model::{Frontend, FrontendKind, Scope},
    reconcile::{MapContents, ServiceMaps as _},
};

/// The id-independent description of a pin directory's maps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Description {
    /// By frontend (`IP:port/PROTO`, `[IPv6]:port/PROTO`, `<node>:port/PROTO` and
    /// `[<node>]:port/PROTO` for the IPv4 and IPv6 NodePorts, with ` (in-node clients)` for
    /// the entry of a `Local` policy's in-node clients).
    pub frontends: BTreeMap<String, FrontendDescription>,
    /// Entries of the node-address maps (what XDP and the socket programs take for the node).
    pub node_address_entries: BTreeMap<String, u64>,
    /// What the maps hold that no programmed frontend reaches, or what a frontend names that
    /// is missing; empty when the maps are consistent.
    pub leaks: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FrontendDescription {
    /// `namespace/name:port`, from the names map.
    pub service: Option<String>,
    pub kind: String,
    /// `frontend_flags::*`.
    pub flags: u8,
    pub affinity_timeout_secs: Option<u32>,
    /// The backend set, numbered by first appearance over the frontends in order: frontends
    /// with equal numbers share one service id.
    pub backend_set: usize,
    /// `IP:port`, as `lb-agent list` prints it (` (local)`, ` (terminating)`), sorted.
    pub backends: Vec<String>,
    pub maglev_table: bool,
    pub counters: bool,
    /// Allowed source ranges of its service id.
    pub source_ranges: Vec<String>,
}

/// Reads the maps pinned under `bpffs` (the agent's `--bpffs`) into a [`Description`].
pub fn describe(bpffs: &Path) -> anyhow::Result<Description> {
    let maps_dir = bpffs.join("maps");
    let contents = BpfServiceMaps::open_pinned(&maps_dir)?.dump()?;
    let names = NamesMap::open_pinned(&maps_dir)
        .with_context(|| format!("opening the names map under {}", maps_dir.display()))?
        .all();
    let counters = counter_ids(&maps_dir)?;
    let node_address_entries = inspect::pinned_maps(&maps_dir)
        .into_iter()
        .filter(|m| {
            [
                map_names::NODE_ADDRS_V4,
                map_names::IFACE_ADDRS_V4,
                map_names::NODE_ADDRS_V6,
                map_names::IFACE_ADDRS_V6,
            ]
            .contains(&m.name.as_str())
        })
        .map(|m| (m.name, m.entries))
        .collect();
    let mut description = of_contents(&contents, &names, &counters);
    description.node_address_entries = node_address_entries;
    Ok(description)
}

/// The service ids that have a counters entry.
fn counter_ids(maps_dir: &Path) -> anyhow::Result<BTreeSet<u32>> {
    let path = maps_dir.join(map_names::SERVICE_STATS_V4);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    let map: PerCpuHashMap<MapData, u32, ServiceStats> =
        PerCpuHashMap::try_from(Map::PerCpuHashMap(data))?;
    map.keys()
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading {}", path.display()))
}

/// The description of map contents (the service table, names and counter ids).
pub fn of_contents(
    contents: &MapContents,
    names: &BTreeMap<Frontend, String>,
    counters: &BTreeSet<u32>,
) -> Description {
    let mut leaks = Vec::new();
    let mut frontends = BTreeMap::new();
    let mut live_slots = BTreeSet::new();
    let mut named_backends = BTreeSet::new();
    let mut service_ids = BTreeSet::new();
    count_leak(
        &mut leaks,
        contents.unknown_frontends,
        "frontend entries of a protocol or scope this agent never writes",
    );
    let mut keyed: Vec<(String, &Frontend, &lb_common::FrontendValue)> = Vec::new();
    for (key, value) in &contents.frontends {
        let mut text = key.to_string();
        if key.scope == Scope::Internal && !text.ends_with(')') {
            text.push_str(" (in-node clients)");
        }
        keyed.push((text, key, value));
    }
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    let mut set_numbers: BTreeMap<u32, usize> = BTreeMap::new();
    for (text, key, value) in keyed {
        service_ids.insert(value.service_id);
        let next = set_numbers.len();
        let backend_set = *set_numbers.entry(value.service_id).or_insert(next);
        let mut backends = Vec::new();
        for index in 0..value.count {
            let slot = SlotKey {
                service_id: value.service_id,
                index,
                generation: value.generation,
                pad: 0,
            };
            live_slots.insert(slot);
            let Some(id) = contents.slots.get(&slot).map(|s| s.backend_id) else {
                leaks.push(format!("{text}: live slot {index} is missing"));
                continue;
            };
            let Some(backend) = contents.backends.get(&id) else {
                leaks.push(format!("{text}: live slot {index} names a missing backend"));
                continue;
            };
            named_backends.insert(id);
            if backend.backend.family() != key.family() {
                leaks.push(format!(
                    "{text}: live slot {index} names a backend of the other family"
                ));
            }
            backends.push(crate::list::backend_text(backend));
        }
        backends.sort();
        let source_ranges = contents
            .source_ranges
            .iter()
            .filter(|(id, _)| *id == value.service_id)
            .map(|(_, range)| range.to_string())
            .collect();
        frontends.insert(
            text,
            FrontendDescription {
                service: names.get(key).cloned(),
                kind: FrontendKind::from_number(value.kind)
                    .map_or_else(|| format!("kind {}", value.kind), |k| k.to_string()),
                flags: value.flags,
                affinity_timeout_secs: (value.flags & frontend_flags::AFFINITY != 0)
                    .then_some(value.affinity_timeout_secs),
                backend_set,
                backends,
                maglev_table: contents.maglev.contains(&value.service_id),
                counters: counters.contains(&value.service_id),
                source_ranges,
            },
        );
    }
    let stray_slots = contents
        .slots
        .keys()
        .filter(|k| !live_slots.contains(k))
        .count();
    count_leak(
        &mut leaks,
        stray_slots,
        "slots outside every frontend's live generation",
    );
    let mut addresses: BTreeMap<String, usize> = BTreeMap::new();
    for (id, backend) in &contents.backends {
        let address = backend.backend.to_string();
        *addresses.entry(address.clone()).or_default() += 1;
        if !named_backends.contains(id) {
            leaks.push(format!("backend {address} is named by no live slot"));
        }
    }
    for (address, ids) in addresses.into_iter().filter(|(_, ids)| *ids > 1) {
        leaks.push(format!("backend {address} has {ids} ids"));
    }
    let unused =
        |ids: &mut dyn Iterator<Item = &u32>| ids.filter(|id| !service_ids.contains(id)).count();
    count_leak(
        &mut leaks,
        unused(&mut contents.maglev.iter()),
        "Maglev tables of service ids no frontend uses",
    );
    count_leak(
        &mut leaks,
        unused(&mut contents.source_ranges.iter().map(|(id, _)| id)),
        "source ranges of service ids no frontend uses",
    );
    count_leak(
        &mut leaks,
        unused(&mut counters.iter()),
        "counter entries of service ids no frontend uses",
    );
    count_leak(
        &mut leaks,
        names
            .keys()
            .filter(|k| !contents.frontends.contains_key(k))
            .count(),
        "names of frontends that are not programmed",
    );
    leaks.sort();
    Description {
        frontends,
        node_address_entries: BTreeMap::new(),
        leaks,
    }
}

fn count_leak(leaks: &mut Vec<String>, count: usize, what: &str) {
    if count > 0 {
        leaks.push(format!("{count} {what}"));
    }
}

#[cfg(test)]
mod tests {
    use lb_common::{FrontendValue, SlotValue};

    use super::*;
    use crate::{
        model::{Backend, Protocol},
        reconcile::BackendEntry,
    };

    fn contents(service_id: u32, backend_id: u32) -> MapContents {
        let mut contents = MapContents::default();
        let key = Frontend::new("10.96.0.1".parse().unwrap(), 80, Protocol::Tcp);
        contents.frontends.insert(
            key,
            FrontendValue {
                service_id,
                count: 1,
                kind: lb_common::frontend_kinds::CLUSTER_IP,
                ..FrontendValue::default()
            },
        );
        contents.slots.insert(
            SlotKey {
                service_id,
                index: 0,
                generation: 0,
                pad: 0,
            },
            SlotValue { backend_id },
        );
        contents.backends.insert(
            backend_id,
            BackendEntry {
                backend: Backend {
                    ip: "10.244.0.10".parse().unwrap(),
                    port: 8080,
                },
                state: 0,
                flags: 0,
            },
        );
        contents
    }

    #[test]
    fn equal_programming_with_other_ids_describes_equal() {
        let a = of_contents(&contents(1, 7), &BTreeMap::new(), &BTreeSet::from([1]));
        let b = of_contents(&contents(9, 3), &BTreeMap::new(), &BTreeSet::from([9]));
        assert_eq!(a, b);
        assert!(a.leaks.is_empty(), "{:?}", a.leaks);
        assert_eq!(
            a.frontends["10.96.0.1:80/TCP"].backends,
            ["10.244.0.10:8080"]
        );
    }

    #[test]
    fn entries_no_frontend_reaches_are_leaks() {
        let mut leaky = contents(1, 7);
        let orphan = leaky.backends[&7];
        leaky.backends.insert(8, orphan);
        leaky.slots.insert(
            SlotKey {
                service_id: 1,
                index: 0,
                generation: 1,
                pad: 0,
            },
            SlotValue { backend_id: 8 },
        );
        leaky.maglev.insert(5);
        let description = of_contents(&leaky, &BTreeMap::new(), &BTreeSet::from([1, 5]));
        assert_eq!(
            description.leaks,
            [
                "1 Maglev tables of service ids no frontend uses",
                "1 counter entries of service ids no frontend uses",
                "1 slots outside every frontend's live generation",
                "backend 10.244.0.10:8080 has 2 ids",
                "backend 10.244.0.10:8080 is named by no live slot",
            ]
        );
    }

    #[test]
    fn ipv6_frontends_are_described_with_brackets_and_a_backend_of_the_other_family_is_a_leak() {
        let mut both = contents(1, 7);
        let v6 = Frontend::new("fd00:10:96::1".parse().unwrap(), 80, Protocol::Tcp);
        let value = both.frontends.values().next().copied().unwrap();
        both.frontends.insert(
            v6,
            FrontendValue {
                service_id: 2,
                ..value
            },
        );
        both.slots.insert(
            SlotKey {
                service_id: 2,
                index: 0,
                generation: 0,
                pad: 0,
            },
            SlotValue { backend_id: 8 },
        );
        let mut backend = both.backends[&7];
        backend.backend.ip = "fd00:10:244::10".parse().unwrap();
        both.backends.insert(8, backend);
        let description = of_contents(&both, &BTreeMap::new(), &BTreeSet::from([1, 2]));
        assert!(description.leaks.is_empty(), "{:?}", description.leaks);
        assert_eq!(
            description.frontends["[fd00:10:96::1]:80/TCP"].backends,
            ["[fd00:10:244::10]:8080"]
        );
        // An IPv4 frontend's slot naming an IPv6 backend: the kernel would not find it.
        both.slots.insert(
            SlotKey {
                service_id: 1,
                index: 0,
                generation: 0,
                pad: 0,
            },
            SlotValue { backend_id: 8 },
        );
        both.backends.remove(&7);
        let description = of_contents(&both, &BTreeMap::new(), &BTreeSet::from([1, 2]));
        assert_eq!(
            description.leaks,
            ["10.96.0.1:80/TCP: live slot 0 names a backend of the other family"]
        );
    }
}
