//! The reconciler against in-memory maps: exact map contents after each kind of change, the
//! order of writes (checked at every single write: no connect and no packet may ever see a
//! half-written backend set), failures that leave the previous state serving, adoption of
//! maps left by an earlier agent, and a model-based randomized test from Kubernetes objects
//! to map contents, over every frontend kind.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use lb_common::{
    Frontend4Key, Frontend6Key, FrontendValue, MaglevTable, SlotKey, SlotValue, backend_flags,
    backend_states, frontend_flags, frontend_kinds, scopes,
};
use proptest::prelude::*;

use crate::{cidr::Cidr, model::Family};

use super::{
    BackendEntry, MapContents, MapError, Reconciler, ServiceMaps, SyncReport, backend_of,
    frontend_key, frontend_of, memory::MemoryMaps,
};
use k8s_openapi::api::{
    core::v1::Service,
    discovery::v1::{Endpoint, EndpointSlice},
};

use crate::model::{
    self, Backend, BackendSet, DesiredService, DesiredState, Endpoints, Frontend, FrontendKind,
    ObjectKey, Objects, Protocol, Scope, ServicePortName, SetKey,
    tests::{
        EndpointExt as _, ep, exact, expected_view, identity, node, objects, service, slice,
        slice6, view_without_ids, with_families, with_ingress, with_node_ports,
    },
};

// ---------------------------------------------------------------------------------------------
// Maps that check every write

/// One successful map operation.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    PutFrontend(Frontend, FrontendValue),
    RemoveFrontend(Frontend),
    PutSlot(SlotKey, u32),
    RemoveSlot(SlotKey),
    PutBackend(u32),
    RemoveBackend(u32),
    PutMaglev(u32),
    RemoveMaglev(u32),
    PutSourceRange(u32, Cidr),
    RemoveSourceRange(u32, Cidr),
}

/// [`MemoryMaps`] that record every operation and, after each write, assert that every
/// frontend entry's live generation is whole (see [`live_generations_complete`]).
#[derive(Debug, Default)]
struct CheckedMaps {
    maps: MemoryMaps,
    ops: Vec<Op>,
    /// Every write issued, failed ones included (what `SyncReport::map_writes` counts).
    attempts: usize,
}

impl CheckedMaps {
    fn with_limits(max_services: usize, max_slots: usize, max_backends: usize) -> Self {
        Self {
            maps: MemoryMaps {
                max_services,
                max_slots,
                max_backends,
                ..MemoryMaps::default()
            },
            ops: Vec::new(),
            attempts: 0,
        }
    }

    fn contents(&self) -> &MapContents {
        &self.maps.contents
    }

    fn record(&mut self, result: Result<(), MapError>, op: Op) -> Result<(), MapError> {
        self.attempts += 1;
        if result.is_ok() {
            self.ops.push(op);
        }
        if let Err(problem) = live_generations_complete(&self.maps) {
            panic!(
                "after {:?}: {problem}\nlast operations: {:#?}",
                self.ops.last(),
                &self.ops[self.ops.len().saturating_sub(16)..]
            );
        }
        result
    }

    /// The ids of the backends, by address.
    fn backend_ids(&self) -> BTreeMap<Backend, u32> {
        self.contents()
            .backends
            .iter()
            .map(|(id, b)| (b.backend, *id))
            .collect()
    }

    fn frontend(&self, frontend: Frontend) -> FrontendValue {
        *self
            .contents()
            .frontends
            .get(&frontend)
            .unwrap_or_else(|| panic!("{frontend} is not in the maps"))
    }
}

impl ServiceMaps for CheckedMaps {
    fn put_frontend(&mut self, key: Frontend, value: FrontendValue) -> Result<(), MapError> {
        let result = self.maps.put_frontend(key, value);
        self.record(result, Op::PutFrontend(key, value))
    }

    fn remove_frontend(&mut self, key: &Frontend) -> Result<(), MapError> {
        let result = self.maps.remove_frontend(key);
        self.record(result, Op::RemoveFrontend(*key))
    }

    fn put_slot(&mut self, key: SlotKey, value: SlotValue) -> Result<(), MapError> {
        let result = self.maps.put_slot(key, value);
        self.record(result, Op::PutSlot(key, value.backend_id))
    }

    fn remove_slot(&mut self, key: &SlotKey) -> Result<(), MapError> {
        let result = self.maps.remove_slot(key);
        self.record(result, Op::RemoveSlot(*key))
    }

    fn put_backend(&mut self, id: u32, backend: BackendEntry) -> Result<(), MapError> {
        let result = self.maps.put_backend(id, backend);
        self.record(result, Op::PutBackend(id))
    }

    fn remove_backend(&mut self, id: u32, family: Family) -> Result<(), MapError> {
        let result = self.maps.remove_backend(id, family);
        self.record(result, Op::RemoveBackend(id))
    }

    fn put_maglev(&mut self, service_id: u32, table: &MaglevTable) -> Result<(), MapError> {
        let result = self.maps.put_maglev(service_id, table);
        self.record(result, Op::PutMaglev(service_id))
    }

    fn remove_maglev(&mut self, service_id: u32) -> Result<(), MapError> {
        let result = self.maps.remove_maglev(service_id);
        self.record(result, Op::RemoveMaglev(service_id))
    }

    fn put_source_range(&mut self, service_id: u32, range: Cidr) -> Result<(), MapError> {
        let result = self.maps.put_source_range(service_id, range);
        self.record(result, Op::PutSourceRange(service_id, range))
    }

    fn remove_source_range(&mut self, service_id: u32, range: Cidr) -> Result<(), MapError> {
        let result = self.maps.remove_source_range(service_id, range);
        self.record(result, Op::RemoveSourceRange(service_id, range))
    }

    fn dump(&self) -> Result<MapContents, MapError> {
        self.maps.dump()
    }
}

/// What the data path relies on at every instant: a frontend entry's live generation is
/// whole (slots `0..count` exist and name existing backends of the frontend's family, in the
/// backends map the kernel looks in for it); a Maglev table present for a
/// service id some entry names with backends names only existing backends; and a frontend
/// outside traffic reaches (XDP picks through the table) has its table while it has backends.
fn live_generations_complete(maps: &MemoryMaps) -> Result<(), String> {
    let contents = &maps.contents;
    for (key, value) in &contents.frontends {
        if value.flags & frontend_flags::SOURCE_RANGES != 0
            && !contents
                .source_ranges
                .iter()
                .any(|(id, _)| *id == value.service_id)
        {
            return Err(format!(
                "{key:?} {value:?}: checks source ranges, but its service id has none"
            ));
        }
        for index in 0..value.count {
            let slot = SlotKey {
                service_id: value.service_id,
                index,
                generation: value.generation,
                pad: 0,
            };
            let Some(target) = contents.slots.get(&slot) else {
                return Err(format!("{key:?} {value:?}: slot {slot:?} is missing"));
            };
            if contents
                .backends
                .get(&target.backend_id)
                .is_none_or(|b| b.backend.family() != key.family())
            {
                return Err(format!(
                    "{key:?} {value:?}: slot {slot:?} names missing backend {}",
                    target.backend_id
                ));
            }
        }
        if value.count == 0 {
            continue;
        }
        match maps.tables.get(&value.service_id) {
            Some(table) => {
                if let Some(id) = table.backend_ids.iter().find(|id| {
                    contents
                        .backends
                        .get(id)
                        .is_none_or(|b| b.backend.family() != key.family())
                }) {
                    return Err(format!(
                        "{key:?} {value:?}: the Maglev table names missing backend {id}"
                    ));
                }
            }
            None if key.scope == Scope::External && value.kind != frontend_kinds::CLUSTER_IP => {
                return Err(format!(
                    "{key:?} {value:?}: reached from outside, with backends, without a Maglev \
                     table"
                ));
            }
            None => {}
        }
    }
    if contents.maglev != maps.tables.keys().copied().collect() {
        return Err("the Maglev ids differ from the tables".into());
    }
    Ok(())
}

fn assert_exact(maps: &CheckedMaps, desired: &DesiredState) {
    if let Err(problem) = exact(&maps.maps, desired) {
        panic!(
            "{problem}\ncontents: {:#?}\ndesired: {desired:#?}",
            maps.contents()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Desired states written by hand

fn frontend(ip: &str, port: u16, protocol: Protocol) -> Frontend {
    Frontend::new(ip.parse().unwrap(), port, protocol)
}

fn backend(last: u8, port: u16) -> Backend {
    Backend {
        ip: [10, 244, 0, last].into(),
        port,
    }
}

fn port_name(name: &str) -> ServicePortName {
    ServicePortName {
        namespace: "default".into(),
        name: name.into(),
        port: "http".into(),
    }
}

/// One frontend's entry and its backend set.
type Entry = (DesiredService, BackendSet);

/// A ClusterIP of service `name` (port `http`) with these backends.
fn desired_service(name: &str, backends: &[Backend], affinity: Option<u32>) -> Entry {
    (
        DesiredService {
            name: port_name(name),
            family: Family::V4,
            kind: FrontendKind::ClusterIP,
            endpoints: Endpoints::All,
            affinity_timeout_secs: affinity,
            local_only: false,
            two_scopes: false,
            source_ranges: None,
        },
        BackendSet {
            backends: backends.iter().copied().collect(),
            ..BackendSet::default()
        },
    )
}

/// Adds (or replaces) `frontend` in `state`, with its set (replaced too).
fn insert(state: &mut DesiredState, frontend: Frontend, (service, set): Entry) {
    state.sets.insert(service.set(), set);
    state.frontends.insert(frontend, service);
}

/// A desired state of these frontends; frontends of one set must agree on it.
fn state(entries: Vec<(Frontend, Entry)>) -> DesiredState {
    let mut state = DesiredState::default();
    for (frontend, (service, set)) in entries {
        if let Some(other) = state.sets.get(&service.set()) {
            assert_eq!(other, &set, "two frontends of {} disagree", service.set());
        }
        insert(&mut state, frontend, (service, set));
    }
    state
}

/// The entry and set of a frontend of `state`.
fn entry_of(state: &DesiredState, frontend: Frontend) -> Entry {
    (
        state.frontends[&frontend].clone(),
        state.set_of(&frontend).unwrap().clone(),
    )
}

fn web() -> Frontend {
    frontend("10.96.0.10", 80, Protocol::Tcp)
}

fn dns() -> Frontend {
    frontend("10.96.0.10", 53, Protocol::Udp)
}

fn api() -> Frontend {
    frontend("10.96.0.20", 443, Protocol::Tcp)
}

fn sync(reconciler: &mut Reconciler, desired: &DesiredState, maps: &mut CheckedMaps) -> SyncReport {
    let report = counted_sync(reconciler, desired, maps);
    assert!(report.failed.is_empty(), "{report:?}");
    assert_exact(maps, desired);
    assert_eq!(
        reconciler.programmed_entries(),
        held_entries(maps.contents()),
        "lb_map_entries differs from what the maps hold"
    );
    report
}

/// Every entry the reconciler's record holds, counted one by one (what its running counts
/// must equal).
fn recounted_entries(reconciler: &Reconciler) -> [(&'static str, usize); 8] {
    let frontends = |family| {
        let programmed = reconciler.frontends.keys();
        programmed
            .chain(reconciler.adopted_frontends.keys())
            .filter(|f| f.family() == family)
            .count()
    };
    let backends = |family| {
        let programmed = reconciler.backends.written();
        programmed.filter(|b| b.family() == family).count()
    };
    let sets = reconciler.sets.values();
    let ranges = |family| {
        let programmed = reconciler.source_ranges.iter();
        programmed.filter(|(_, r)| r.family() == family).count()
    };
    entries_by_map([
        frontends(Family::V4),
        frontends(Family::V6),
        sets.clone().map(|s| s.slots.len()).sum(),
        backends(Family::V4),
        backends(Family::V6),
        sets.filter(|s| s.maglev).count(),
        ranges(Family::V4),
        ranges(Family::V6),
    ])
}

/// The entries the maps hold, counted like [`Reconciler::programmed_entries`].
fn held_entries(contents: &MapContents) -> [(&'static str, usize); 8] {
    let frontends = |family| {
        let keys = contents.frontends.keys();
        keys.filter(|f: &&Frontend| f.family() == family).count()
    };
    let backends = |family| {
        let values = contents.backends.values();
        values.filter(|b| b.backend.family() == family).count()
    };
    let ranges = |family| {
        let entries = contents.source_ranges.iter();
        entries.filter(|(_, r)| r.family() == family).count()
    };
    entries_by_map([
        frontends(Family::V4),
        frontends(Family::V6),
        contents.slots.len(),
        backends(Family::V4),
        backends(Family::V6),
        contents.maglev.len(),
        ranges(Family::V4),
        ranges(Family::V6),
    ])
}

fn entries_by_map(counts: [usize; 8]) -> [(&'static str, usize); 8] {
    use lb_common::map_names;
    let names = [
        map_names::FRONTENDS_V4,
        map_names::FRONTENDS_V6,
        map_names::SLOTS_V4,
        map_names::BACKENDS_V4,
        map_names::BACKENDS_V6,
        map_names::MAGLEV_V4,
        map_names::SOURCE_RANGES_V4,
        map_names::SOURCE_RANGES_V6,
    ];
    std::array::from_fn(|i| (names[i], counts[i]))
}

/// The running entry counts equal a recount, whatever the sync did (failures included).
fn assert_counts_kept(reconciler: &Reconciler) {
    assert_eq!(
        reconciler.programmed_entries(),
        recounted_entries(reconciler),
        "the running entry counts drifted from a recount"
    );
}

/// A sync whose report counts every map write issued, failed ones and clean-ups included.
fn counted_sync(
    reconciler: &mut Reconciler,
    desired: &DesiredState,
    maps: &mut CheckedMaps,
) -> SyncReport {
    let before = maps.attempts;
    let report = reconciler.sync(desired, maps);
    assert_eq!(
        report.map_writes,
        maps.attempts - before,
        "map_writes miscounted: {report:?}"
    );
    assert_counts_kept(reconciler);
    report
}

/// Like [`counted_sync`], through [`Reconciler::sync_changes`] with what the model said
/// changed.
fn counted_sync_changes(
    reconciler: &mut Reconciler,
    desired: &DesiredState,
    changes: &model::Changes,
    maps: &mut CheckedMaps,
) -> SyncReport {
    let before = maps.attempts;
    let report = reconciler.sync_changes(desired, &changes.frontends, &changes.sets, maps);
    assert_eq!(
        report.map_writes,
        maps.attempts - before,
        "map_writes miscounted: {report:?}"
    );
    assert_counts_kept(reconciler);
    report
}

#[test]
fn add_programs_exactly_the_desired_state() {
    let desired = state(vec![
        (
            web(),
            desired_service("web", &[backend(1, 8080), backend(2, 8080)], None),
        ),
        (
            dns(),
            desired_service("dns", &[backend(1, 53)], Some(10_800)),
        ),
        // No endpoints: programmed with count 0, so connections are refused.
        (api(), desired_service("api", &[], None)),
    ]);
    let mut maps = CheckedMaps::default();
    let mut reconciler = Reconciler::default();
    let report = sync(&mut reconciler, &desired, &mut maps);
    assert_eq!(
        (report.added, report.updated, report.removed),
        (3, 0, 0),
        "{report:?}"
    );
    // 3 backends (one id per address and port: 10.244.0.1 has two ports), 3 slots, 3
    // frontends; no Maglev table, as no outside traffic reaches a ClusterIP.
    assert_eq!(report.map_writes, 9);
    assert_eq!(maps.ops.len(), 9);
    assert_eq!(maps.contents().backends.len(), 3);
    assert_eq!(maps.frontend(api()).count, 0);
    let dns_value = maps.frontend(dns());
    assert_eq!(dns_value.flags, frontend_flags::AFFINITY);
    assert_eq!(dns_value.affinity_timeout_secs, 10_800);
    assert_eq!(view_without_ids(maps.contents()), expected_view(&desired));
    assert_eq!(maps.frontend(web()).kind, frontend_kinds::CLUSTER_IP);
    assert!(maps.maps.tables.is_empty());
    assert_eq!(reconciler.len(), 3);
    // Keys and values are in network byte order, as the kernel hands them to the programs.
    let key: Frontend4Key = frontend_key(&web()).unwrap();
    assert_eq!(key.addr.to_ne_bytes(), [10, 96, 0, 10]);
    assert_eq!(key.port.to_ne_bytes(), 80u16.to_be_bytes());
    assert_eq!(key.proto, lb_common::IPPROTO_TCP);
    assert_eq!(key.scope, scopes::EXTERNAL);
    assert_eq!(frontend_of(&key), Some(web()));
    // A NodePort's key has address 0.
    let key: Frontend4Key =
        frontend_key(&Frontend::node_port(Family::V4, 30080, Protocol::Tcp)).unwrap();
    assert_eq!((key.addr, key.port), (0, 30080u16.to_be()));
    assert_eq!(
        frontend_of(&key),
        Some(Frontend::node_port(Family::V4, 30080, Protocol::Tcp))
    );
    // IPv6: the 16 address bytes in network order, `::` for a NodePort; an address of the
    // other family has no key in a family's map.
    let v6 = frontend("fd00:10:96::a", 80, Protocol::Tcp);
    let key: Frontend6Key = frontend_key(&v6).unwrap();
    let bytes: Vec<u8> = key.addr.iter().flat_map(|w| w.to_ne_bytes()).collect();
    assert_eq!(
        bytes,
        "fd00:10:96::a"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets()
    );
    assert_eq!(key.port.to_ne_bytes(), 80u16.to_be_bytes());
    assert_eq!(frontend_of(&key), Some(v6));
    assert_eq!(frontend_key::<lb_common::Addr4>(&v6), None);
    assert_eq!(frontend_key::<lb_common::Addr6>(&web()), None);
    let key: Frontend6Key =
        frontend_key(&Frontend::node_port(Family::V6, 30080, Protocol::Udp)).unwrap();
    assert_eq!(key.addr, [0; 4]);
    // Backends likewise.
    let entry = BackendEntry {
        backend: Backend {
            ip: "fd00:10:244::5".parse().unwrap(),
            port: 8080,
        },
        state: backend_states::TERMINATING,
        flags: backend_flags::LOCAL,
    };
    let value: lb_common::Backend6 = super::backend_value(&entry).unwrap();
    assert_eq!(backend_of(&value), entry);
    assert_eq!(super::backend_value::<lb_common::Addr4>(&entry), None);
}

#[test]
fn update_writes_the_idle_generation_then_switches_then_cleans_up() {
    let (a, b, c) = (backend(1, 8080), backend(2, 8080), backend(3, 8080));
    let mut maps = CheckedMaps::default();
    let mut reconciler = Reconciler::default();
    sync(
        &mut reconciler,
        &state(vec![(web(), desired_service("web", &[a, b], None))]),
        &mut maps,
    );
    let before = maps.frontend(web());
    let id_of = |contents: &MapContents, wanted: Backend| {
        contents
            .backends
            .iter()
            .find(|(_, b)| b.backend == wanted)
            .map(|(id, _)| *id)
            .unwrap()
    };
    let (id_a, id_b) = (id_of(maps.contents(), a), id_of(maps.contents(), b));
    maps.ops.clear();

    let report = sync(
        &mut reconciler,
        &state(vec![(web(), desired_service("web", &[b, c], None))]),
        &mut maps,
    );
    assert_eq!((report.added, report.updated, report.removed), (0, 1, 0));
    let after = maps.frontend(web());
    assert_eq!(after.generation, 1 - before.generation);
    assert_eq!(after.service_id, before.service_id);
    let id_c = id_of(maps.contents(), c);
    // The kept backend keeps its id (its affinity entries stay valid); only c is new.
    assert_eq!(id_of(maps.contents(), b), id_b);
    let slot = |generation, index| SlotKey {
        service_id: before.service_id,
        index,
        generation,
        pad: 0,
    };
    let (old, new) = (before.generation, after.generation);
    assert_eq!(
        maps.ops,
        vec![
            Op::PutBackend(id_c),
            Op::PutSlot(slot(new, 0), id_b),
            Op::PutSlot(slot(new, 1), id_c),
            Op::PutFrontend(web(), after),
            Op::RemoveSlot(slot(old, 0)),
            Op::RemoveSlot(slot(old, 1)),
            Op::RemoveBackend(id_a),
        ]
    );
    assert_eq!(report.map_writes, maps.ops.len());

    // And back to the first generation, shrinking to one backend.
    maps.ops.clear();
    sync(
        &mut reconciler,
        &state(vec![(web(), desired_service("web", &[c], None))]),
        &mut maps,
    );
    let last = maps.frontend(web());
    assert_eq!(last.generation, old);
    assert_eq!(
        maps.ops,
        vec![
            Op::PutSlot(slot(old, 0), id_c),
            Op::PutFrontend(web(), last),
            Op::RemoveSlot(slot(new, 0)),
            Op::RemoveSlot(slot(new, 1)),
            Op::RemoveBackend(id_b),
        ]
    );
}

#[test]
fn removed_backends_are_deleted_only_after_the_switch() {
    let backends: Vec<Backend> = (1..=6).map(|i| backend(i, 8080)).collect();
    let sets: [&[Backend]; 5] = [
        &backends[0..4],
        &backends[2..6],
        &backends[5..6],
        &[],
        &backends[0..3],
    ];
    let mut maps = CheckedMaps::default();
    let mut reconciler = Reconciler::default();
    for set in sets {
        maps.ops.clear();
        sync(
            &mut reconciler,
            &state(vec![(web(), desired_service("web", set, None))]),
            &mut maps,
        );
        let switch = maps
            .ops
            .iter()
            .position(|op| matches!(op, Op::PutFrontend(..)))
            .expect("every change switches the service entry");
        for (index, op) in maps.ops.iter().enumerate() {
            match op {
                Op::RemoveBackend(_) | Op::RemoveSlot(_) => assert!(index > switch, "{op:?}"),
                Op::PutBackend(_) | Op::PutSlot(..) => assert!(index < switch, "{op:?}"),
                _ => {}
            }
        }
    }
}

#[test]
fn remove_deletes_the_entry_first_then_everything_it_used() {
    let desired = state(vec![
        (
            web(),
            desired_service("web", &[backend(1, 8080), backend(2, 8080)], None),
        ),
        (api(), desired_service("api", &[backend(3, 6443)], None)),
    ]);
    let mut maps = CheckedMaps::default();
    let mut reconciler = Reconciler::default();
    sync(&mut reconciler, &desired, &mut maps);
    maps.ops.clear();
    let only_api = state(vec![(
        api(),
        desired_service("api", &[backend(3, 6443)], None),
    )]);
    let report = sync(&mut reconciler, &only_api, &mut maps);
    assert_eq!((report.added, report.updated, report.removed), (0, 0, 1));
    assert_eq!(maps.ops[0], Op::RemoveFrontend(web()));
    assert_eq!(maps.ops.len(), 5, "{:?}", maps.ops);
    let report = sync(&mut reconciler, &DesiredState::default(), &mut maps);
    assert_eq!(report.removed, 1);
    assert_eq!(maps.contents(), &MapContents::default());
    assert!(reconciler.is_empty());
}

#[test]
fn unchanged_desired_state_makes_no_writes() {
    let desired = state(vec![
        (
            web(),
            desired_service("web", &[backend(1, 8080), backend(2, 8080)], Some(60)),
        ),
        (api(), desired_service("api", &[], None)),
    ]);
    let mut maps = CheckedMaps::default();
    let mut reconciler = Reconciler::default();
    sync(&mut reconciler, &desired, &mut maps);
    maps.ops.clear();
    let before = maps.contents().clone();
    let report = sync(&mut reconciler, &desired.clone(), &mut maps);
    assert_eq!(report, SyncReport::default());
    assert!(maps.ops.is_empty());
    assert_eq!(maps.contents(), &before);
}

#[test]
fn affinity_only_change_is_one_service_write() {
    let backends = [backend(1, 8080), backend(2, 8080)];
    let mut maps = CheckedMaps::default();
    let mut reconciler = Reconciler::default();
    sync(
        &mut reconciler,
        &state(vec![(web(), desired_service("web", &backends, None))]),
        &mut maps,
    );
    let slots = maps.contents().slots.clone();
    let first = maps.frontend(web());
    for affinity in [Some(10_800), Some(125), None, Some(1)] {
        maps.ops.clear();
        let report = sync(
            &mut reconciler,
            &state(vec![(web(), desired_service("web", &backends, affinity))]),
            &mut maps,
        );
        assert_eq!(report.map_writes, 1, "{affinity:?}");
        assert_eq!(report.updated, 1);
        let value = maps.frontend(web());
        assert_eq!(maps.ops, vec![Op::PutFrontend(web(), value)]);
        // Same id and generation: affinity entries and slots stay valid.
        assert_eq!(
            (value.service_id, value.generation, value.count),
            (first.service_id, first.generation, first.count)
        );
        assert_eq!(maps.contents().slots, slots);
    }
}

#[test]
fn full_backend_map_fails_that_service_only_and_keeps_what_it_had() {
    full_backend_map_fails_that_service_only(usize::MAX);
}

#[test]
fn full_backend_map_in_a_batched_sync_fails_that_service_only() {
    full_backend_map_fails_that_service_only(0);
}

/// With syncs batched from `batch_from` frontends and sets on.
fn full_backend_map_fails_that_service_only(batch_from: usize) {
    // Room for 5 backends: web has 2, dns 2. Growing web to 4 needs 2 more while the old
    // generation still lives; it cannot fit. A new service with one backend can.
    let mut maps = CheckedMaps::with_limits(16, 64, 5);
    let mut reconciler = Reconciler::default();
    reconciler.batch_writes_from(batch_from);
    let web_before = desired_service("web", &[backend(1, 8080), backend(2, 8080)], None);
    let dns_service = desired_service("dns", &[backend(1, 53), backend(2, 53)], None);
    let before = state(vec![
        (web(), web_before.clone()),
        (dns(), dns_service.clone()),
    ]);
    sync(&mut reconciler, &before, &mut maps);

    let web_grown = desired_service(
        "web",
        &[
            backend(1, 8080),
            backend(2, 8080),
            backend(3, 8080),
            backend(4, 8080),
        ],
        Some(30),
    );
    let api_service = desired_service("api", &[backend(9, 6443)], None);
    let wanted = state(vec![
        (web(), web_grown.clone()),
        (dns(), dns_service.clone()),
        (api(), api_service.clone()),
    ]);
    let report = counted_sync(&mut reconciler, &wanted, &mut maps);
    assert_eq!(
        report.failed.iter().map(|(f, _)| *f).collect::<Vec<_>>(),
        vec![web()],
        "{report:?}"
    );
    assert!(report.failed[0].1.contains("full"), "{report:?}");
    assert!(report.failed[0].1.contains("default/web"), "{report:?}");
    assert_eq!(report.added, 1);
    // web serves exactly what it served before; nothing of the failed attempt is left.
    let partial = state(vec![
        (web(), web_before),
        (dns(), dns_service.clone()),
        (api(), api_service.clone()),
    ]);
    assert_exact(&maps, &partial);

    // Once there is room, the next sync programs it.
    maps.maps.max_backends = 64;
    let report = counted_sync(&mut reconciler, &wanted, &mut maps);
    assert!(report.failed.is_empty(), "{report:?}");
    assert_eq!(report.updated, 1);
    assert_exact(&maps, &wanted);
}

#[test]
fn service_that_does_not_fit_at_all_leaves_nothing_behind() {
    service_that_does_not_fit_leaves_nothing(usize::MAX);
}

#[test]
fn service_that_does_not_fit_in_a_batched_sync_leaves_nothing_behind() {
    service_that_does_not_fit_leaves_nothing(0);
}

fn service_that_does_not_fit_leaves_nothing(batch_from: usize) {
    let batched = |mut reconciler: Reconciler| {
        reconciler.batch_writes_from(batch_from);
        reconciler
    };
    let mut maps = CheckedMaps::with_limits(16, 64, 3);
    let mut reconciler = batched(Reconciler::default());
    let small = state(vec![(
        web(),
        desired_service("web", &[backend(1, 80)], None),
    )]);
    sync(&mut reconciler, &small, &mut maps);
    let big = desired_service(
        "api",
        &[backend(1, 443), backend(2, 443), backend(3, 443)],
        None,
    );
    let mut wanted = small.clone();
    insert(&mut wanted, api(), big);
    let report = counted_sync(&mut reconciler, &wanted, &mut maps);
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert_eq!(report.failed[0].0, api());
    assert_exact(&maps, &small);
    assert_eq!(reconciler.len(), 1);

    // A full services map and a full slots map fail the same way.
    let mut maps = CheckedMaps::with_limits(1, 64, 64);
    let mut reconciler = batched(Reconciler::default());
    let report = counted_sync(&mut reconciler, &wanted, &mut maps);
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert_eq!(maps.contents().frontends.len(), 1);
    let programmed = report.failed[0].0;
    let survivor = if programmed == web() { api() } else { web() };
    let expected = state(vec![(survivor, entry_of(&wanted, survivor))]);
    assert_exact(&maps, &expected);

    // Slots: both generations must fit during an update.
    let mut maps = CheckedMaps::with_limits(16, 3, 64);
    let mut reconciler = batched(Reconciler::default());
    let two = state(vec![(
        web(),
        desired_service("web", &[backend(1, 80), backend(2, 80)], None),
    )]);
    sync(&mut reconciler, &two, &mut maps);
    let other_two = state(vec![(
        web(),
        desired_service("web", &[backend(3, 80), backend(4, 80)], None),
    )]);
    let report = counted_sync(&mut reconciler, &other_two, &mut maps);
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert_exact(&maps, &two);
    // The reconciler still knows what is programmed: the same desired state is a no-op.
    let report = counted_sync(&mut reconciler, &two, &mut maps);
    assert_eq!(report, SyncReport::default());
}

#[test]
fn adopt_cleans_leftovers_and_the_same_desired_state_needs_no_writes() {
    let desired = state(vec![
        (
            web(),
            desired_service("web", &[backend(1, 8080), backend(2, 8080)], Some(300)),
        ),
        (dns(), desired_service("dns", &[backend(1, 53)], None)),
        (api(), desired_service("api", &[], None)),
    ]);
    let mut maps = CheckedMaps::default();
    let mut earlier = Reconciler::default();
    sync(&mut earlier, &desired, &mut maps);
    // Move web to generation 1, so adoption sees both generations in use.
    let moved = state(vec![
        (
            web(),
            desired_service("web", &[backend(2, 8080), backend(3, 8080)], Some(300)),
        ),
        (dns(), desired_service("dns", &[backend(1, 53)], None)),
        (api(), desired_service("api", &[], None)),
    ]);
    sync(&mut earlier, &moved, &mut maps);
    let clean = maps.contents().clone();

    // The earlier agent died in the middle of an update of web: new backends and the idle
    // generation's slots written, the switch not yet made. Plus an orphan backend with the
    // highest id, and the slots and Maglev table of a service that no longer exists.
    let web_value = clean.frontends[&web()];
    let top = *clean.backends.keys().max().unwrap();
    let leftovers = &mut maps.maps.contents;
    for (offset, last) in [(1, 7u8), (2, 8)] {
        leftovers.backends.insert(
            top + offset,
            BackendEntry {
                backend: backend(last, 8080),
                state: backend_states::ACTIVE,
                flags: 0,
            },
        );
    }
    for index in 0..2u16 {
        leftovers.slots.insert(
            SlotKey {
                service_id: web_value.service_id,
                index,
                generation: 1 - web_value.generation,
                pad: 0,
            },
            SlotValue {
                backend_id: top + 1 + index as u32,
            },
        );
    }
    leftovers.slots.insert(
        SlotKey {
            service_id: 999,
            index: 0,
            generation: 0,
            pad: 0,
        },
        SlotValue {
            backend_id: top + 2,
        },
    );
    leftovers.backends.insert(
        top + 3,
        BackendEntry {
            backend: Backend {
                ip: std::net::Ipv4Addr::UNSPECIFIED.into(),
                port: 0,
            },
            state: 0,
            flags: 0,
        },
    );
    maps.maps.put_maglev(999, &MaglevTable::default()).unwrap();
    let view = maps.contents().view();

    maps.ops.clear();
    let mut adopted = Reconciler::adopt(&mut maps).expect("adopt");
    // Adoption removes the slots and tables no frontend names; the backends wait for the
    // first sync, which knows which ones the sets keep (a draining backend is in no slot).
    assert_eq!(maps.contents().slots, clean.slots);
    assert!(maps.maps.tables.is_empty() && maps.contents().maglev.is_empty());
    assert_eq!(
        maps.contents().view(),
        view,
        "adoption changed what is served"
    );
    assert!(
        maps.ops
            .iter()
            .all(|op| matches!(op, Op::RemoveSlot(_) | Op::RemoveMaglev(_))),
        "{:?}",
        maps.ops
    );
    assert_eq!(maps.ops.len(), 4, "{:?}", maps.ops);
    assert_eq!(adopted.len(), 3);

    maps.ops.clear();
    let report = counted_sync(&mut adopted, &moved, &mut maps);
    assert_eq!(
        (report.added, report.updated, report.removed),
        (0, 0, 0),
        "{report:?}"
    );
    assert!(report.failed.is_empty(), "{report:?}");
    // Only the leftover backends go: every set keeps its id, every backend its id.
    let removed: BTreeSet<u32> = maps
        .ops
        .iter()
        .map(|op| match op {
            Op::RemoveBackend(id) => *id,
            other => panic!("the first sync after adoption wrote {other:?}"),
        })
        .collect();
    assert_eq!(removed, BTreeSet::from([top + 1, top + 2, top + 3]));
    assert_eq!(maps.contents(), &clean);
    assert_exact(&maps, &moved);
    maps.ops.clear();
    let report = counted_sync(&mut adopted, &moved, &mut maps);
    assert_eq!(report, SyncReport::default());
    assert!(maps.ops.is_empty());

    // New ids never reuse live ones: a new service and a changed one leave the others' entries
    // untouched.
    let mut next = moved.clone();
    insert(
        &mut next,
        frontend("10.96.0.30", 80, Protocol::Tcp),
        desired_service("new", &[backend(20, 80), backend(21, 80)], None),
    );
    insert(
        &mut next,
        dns(),
        desired_service("dns", &[backend(1, 53), backend(4, 53)], None),
    );
    let before = maps.contents().clone();
    sync(&mut adopted, &next, &mut maps);
    for op in &maps.ops {
        if let Op::PutBackend(id) | Op::PutSlot(_, id) = op
            && let Some(existing) = before.backends.get(id)
        {
            assert_eq!(
                maps.contents().backends.get(id),
                Some(existing),
                "backend {id} overwritten"
            );
        }
    }
    let new_ids: BTreeSet<u32> = maps
        .contents()
        .frontends
        .values()
        .map(|v| v.service_id)
        .collect();
    assert_eq!(new_ids.len(), 4);
}

#[test]
fn reserved_ids_are_never_handed_out_again() {
    // Affinity entries may still name service 10 and backend 20 after those were removed.
    let mut maps = MemoryMaps::default();
    let mut reconciler = Reconciler::adopt(&mut maps).unwrap();
    reconciler.reserve_ids(10, 20);
    let desired = state(vec![(
        web(),
        desired_service("web", &[backend(1, 80)], None),
    )]);
    let report = reconciler.sync(&desired, &mut maps);
    assert!(report.failed.is_empty(), "{report:?}");
    let service = maps.contents.frontends.values().next().unwrap();
    assert!(service.service_id > 10, "{service:?}");
    assert!(
        maps.contents.backends.keys().all(|id| *id > 20),
        "{:?}",
        maps.contents
    );
}

/// What the agent's pass does after a sync that refused frontends: tries them once more.
fn retry_failed(
    reconciler: &mut Reconciler,
    desired: &DesiredState,
    mut report: SyncReport,
    maps: &mut CheckedMaps,
) -> SyncReport {
    let again: BTreeSet<Frontend> = report.failed.iter().map(|(f, _)| *f).collect();
    let before = maps.attempts;
    let retry = reconciler.sync_changes(desired, &again, &BTreeSet::new(), maps);
    assert_eq!(retry.map_writes, maps.attempts - before, "{retry:?}");
    report.absorb_retry(retry);
    report
}

/// The service ids the frontends of `maps` name, by set name.
fn service_ids_by_name(maps: &CheckedMaps, desired: &DesiredState) -> BTreeMap<String, u32> {
    desired
        .frontends
        .iter()
        .filter_map(|(frontend, service)| {
            let value = maps.contents().frontends.get(frontend)?;
            Some((service.name.to_string(), value.service_id))
        })
        .collect()
}

#[test]
fn when_every_service_id_is_in_use_only_the_service_needing_one_is_refused() {
    let mut maps = CheckedMaps::default();
    let mut reconciler = Reconciler::adopt_with_ids(
        &mut maps,
        super::ids::IdSpace::new(1, 2),
        super::ids::IdSpace::default(),
    )
    .unwrap();
    let two = state(vec![
        (web(), desired_service("web", &[backend(1, 80)], None)),
        (dns(), desired_service("dns", &[backend(2, 53)], None)),
    ]);
    sync(&mut reconciler, &two, &mut maps);
    let mut three = two.clone();
    insert(
        &mut three,
        api(),
        desired_service("api", &[backend(3, 443)], None),
    );

    let report = counted_sync(&mut reconciler, &three, &mut maps);
    assert_eq!(
        report.failed.iter().map(|(f, _)| *f).collect::<Vec<_>>(),
        vec![api()],
        "{report:?}"
    );
    let error = &report.failed[0].1;
    assert!(
        error.contains("default/api") && error.contains("every service id is in use (2 of 2)"),
        "{error}"
    );
    // The others serve as before; nothing of api is in the maps.
    assert_exact(&maps, &two);
    let before = service_ids_by_name(&maps, &two);

    // dns goes: its id is free once the sync removed its set, and api gets it when tried
    // again (the agent's pass does that at once when a sync freed something).
    let mut without_dns = three.clone();
    without_dns.frontends.remove(&dns());
    let report = counted_sync(&mut reconciler, &without_dns, &mut maps);
    assert_eq!(report.failed.len(), 1, "{report:?}");
    let report = retry_failed(&mut reconciler, &without_dns, report, &mut maps);
    assert!(report.failed.is_empty(), "{report:?}");
    assert_exact(&maps, &without_dns);
    let after = service_ids_by_name(&maps, &without_dns);
    assert_eq!(after["default/web:http"], before["default/web:http"]);
    assert_eq!(after["default/api:http"], before["default/dns:http"]);
}

#[test]
fn when_every_backend_id_is_in_use_only_the_set_needing_one_is_refused() {
    let mut maps = CheckedMaps::default();
    let mut reconciler = Reconciler::adopt_with_ids(
        &mut maps,
        super::ids::IdSpace::default(),
        super::ids::IdSpace::new(1, 3),
    )
    .unwrap();
    let full = state(vec![
        (
            web(),
            desired_service("web", &[backend(1, 80), backend(2, 80)], None),
        ),
        (dns(), desired_service("dns", &[backend(3, 53)], None)),
    ]);
    sync(&mut reconciler, &full, &mut maps);

    // api needs a fourth backend id; a backend shared with web needs none.
    let mut more = full.clone();
    insert(
        &mut more,
        api(),
        desired_service("api", &[backend(9, 443)], None),
    );
    let shared = frontend("10.96.0.30", 80, Protocol::Tcp);
    insert(
        &mut more,
        shared,
        desired_service("mirror", &[backend(1, 80)], None),
    );
    let report = counted_sync(&mut reconciler, &more, &mut maps);
    assert_eq!(
        report.failed.iter().map(|(f, _)| *f).collect::<Vec<_>>(),
        vec![api()],
        "{report:?}"
    );
    assert!(
        report.failed[0]
            .1
            .contains("every backend id is in use (3 of 3)"),
        "{report:?}"
    );
    let mut served = more.clone();
    served.frontends.remove(&api());
    assert_exact(&maps, &served);

    // dns goes with its backend: api fits, tried again.
    more.frontends.remove(&dns());
    let report = counted_sync(&mut reconciler, &more, &mut maps);
    let report = retry_failed(&mut reconciler, &more, report, &mut maps);
    assert!(report.failed.is_empty(), "{report:?}");
    assert_exact(&maps, &more);
}

#[test]
fn a_set_with_more_backends_than_the_slot_index_holds_uses_the_first_and_says_so() {
    let limit = lb_common::limits::MAX_BACKENDS_PER_SERVICE as usize;
    let many: Vec<Backend> = (0..limit + 2)
        .map(|i| Backend {
            ip: std::net::Ipv4Addr::from(0x0af4_0000 + i as u32).into(),
            port: 80,
        })
        .collect();
    let mut maps = MemoryMaps::default();
    let mut reconciler = Reconciler::default();
    let desired = state(vec![(web(), desired_service("web", &many, None))]);
    let report = reconciler.sync(&desired, &mut maps);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.truncated.len(), 1);
    assert_eq!(report.truncated[0].0.name.to_string(), "default/web:http");
    assert_eq!(report.truncated[0].1, limit + 2);
    let value = maps.contents.frontends.values().next().unwrap();
    assert_eq!(usize::from(value.count), limit);
    assert_eq!(maps.contents.slots.len(), limit);
}

#[test]
fn churn_through_a_small_id_space_many_times_never_gives_a_live_id_twice() {
    // 4 service ids and 8 backend ids: up to 3 services of up to 2 backends live at once, one
    // more while a sync replaces one (the old set goes after the new one is written); 200
    // rounds go round both spaces many times.
    let mut maps = CheckedMaps::default();
    let mut reconciler = Reconciler::adopt_with_ids(
        &mut maps,
        super::ids::IdSpace::new(1, 4),
        super::ids::IdSpace::new(1, 8),
    )
    .unwrap();
    let frontends = [web(), dns(), api()];
    let mut live: Vec<Entry> = Vec::new();
    let mut seen_service_ids = BTreeSet::new();
    for round in 0..200u32 {
        let name = format!("svc-{round}");
        let first = (round % 200) as u8 + 1;
        let backends = [backend(first, 80), backend(first.wrapping_add(50), 80)];
        live.push(desired_service(
            &name,
            &backends[..1 + (round % 2) as usize],
            None,
        ));
        if live.len() > 3 {
            live.remove(0);
        }
        let desired = state(
            frontends
                .iter()
                .copied()
                .zip(live.iter().cloned())
                .collect(),
        );
        let report = counted_sync(&mut reconciler, &desired, &mut maps);
        assert!(report.failed.is_empty(), "round {round}: {report:?}");
        assert_exact(&maps, &desired);
        let contents = maps.contents();
        let ids: Vec<u32> = contents.frontends.values().map(|v| v.service_id).collect();
        let distinct: BTreeSet<u32> = ids.iter().copied().collect();
        assert_eq!(distinct.len(), ids.len(), "round {round}: {ids:?}");
        assert!(ids.iter().all(|id| (1..=4).contains(id)), "{ids:?}");
        assert!(contents.backends.keys().all(|id| (1..=8).contains(id)));
        seen_service_ids.extend(ids);
    }
    assert_eq!(
        seen_service_ids,
        (1..=4).collect(),
        "every id was used in turn"
    );
}

#[test]
fn adopt_of_empty_maps_then_sync() {
    let mut maps = CheckedMaps::default();
    let mut reconciler = Reconciler::adopt(&mut maps).expect("adopt");
    assert!(reconciler.is_empty());
    assert!(maps.ops.is_empty());
    let desired = state(vec![(
        web(),
        desired_service("web", &[backend(1, 80)], None),
    )]);
    sync(&mut reconciler, &desired, &mut maps);
}

// ---------------------------------------------------------------------------------------------
// NodePorts, externalIPs and load-balancer IPs: one table, shared sets, Maglev, draining

fn np() -> Frontend {
    Frontend::node_port(Family::V4, 30080, Protocol::Tcp)
}

/// The NodePort 30080/TCP of `default/web` with `backends` (last octet, whether local). With
/// eTP Local (`local_only`) they are this node's endpoints, and in-node clients reach the
/// same backends through the internal scope's cluster-wide set.
fn node_port_state(backends: &[(u8, bool)], local_only: bool) -> DesiredState {
    let set = BackendSet {
        backends: backends
            .iter()
            .map(|(last, _)| backend(*last, 8080))
            .collect(),
        local: backends
            .iter()
            .filter(|(_, local)| *local)
            .map(|(last, _)| backend(*last, 8080))
            .collect(),
        ..BackendSet::default()
    };
    let service = DesiredService {
        name: port_name("web"),
        family: Family::V4,
        kind: FrontendKind::NodePort,
        endpoints: if local_only {
            Endpoints::Local
        } else {
            Endpoints::All
        },
        affinity_timeout_secs: None,
        local_only,
        two_scopes: local_only,
        source_ranges: None,
    };
    let mut entries = vec![(np(), (service.clone(), set.clone()))];
    if local_only {
        let internal = DesiredService {
            endpoints: Endpoints::All,
            local_only: false,
            two_scopes: false,
            ..service
        };
        entries.push((np().in_scope(Scope::Internal), (internal, set)));
    }
    state(entries)
}

fn slot(service_id: u32, generation: u8, index: u16) -> SlotKey {
    SlotKey {
        service_id,
        index,
        generation,
        pad: 0,
    }
}

#[test]
fn node_port_writes_backends_then_slots_and_table_then_frontend_and_old_ones_last() {
    let mut maps = CheckedMaps::default();
    let mut reconciler = Reconciler::adopt(&mut maps).unwrap();
    let first = node_port_state(&[(10, true), (20, false)], false);
    let report = sync(&mut reconciler, &first, &mut maps);
    assert_eq!((report.added, report.failed.len()), (1, 0));
    let value = maps.frontend(np());
    assert_eq!(
        maps.ops,
        vec![
            Op::PutBackend(1),
            Op::PutBackend(2),
            Op::PutSlot(slot(1, 0, 0), 1),
            Op::PutSlot(slot(1, 0, 1), 2),
            Op::PutMaglev(1),
            Op::PutFrontend(np(), value),
        ]
    );
    assert_eq!(value.kind, frontend_kinds::NODE_PORT);
    assert_eq!(value.flags, 0);
    assert_eq!(maps.contents().backends[&1].flags, backend_flags::LOCAL);
    assert_eq!(maps.contents().backends[&2].flags, 0);
    assert_eq!(report.sets_added.len(), 1);

    maps.ops.clear();
    let report = sync(&mut reconciler, &first, &mut maps);
    assert_eq!(
        report,
        SyncReport::default(),
        "nothing changed, nothing written"
    );
    assert!(maps.ops.is_empty());

    let report = sync(
        &mut reconciler,
        &node_port_state(&[(10, true), (11, true)], false),
        &mut maps,
    );
    assert_eq!(report.updated, 1);
    let after = maps.frontend(np());
    assert_eq!((after.service_id, after.generation), (1, 1));
    assert_eq!(
        maps.ops,
        vec![
            Op::PutBackend(3),
            Op::PutSlot(slot(1, 1, 0), 1),
            Op::PutSlot(slot(1, 1, 1), 3),
            Op::PutMaglev(1),
            Op::PutFrontend(np(), after),
            Op::RemoveSlot(slot(1, 0, 0)),
            Op::RemoveSlot(slot(1, 0, 1)),
            Op::RemoveBackend(2),
        ]
    );

    // eTP Local: the NodePort moves to the set of this node's endpoints (a new service id);
    // in-node clients keep the cluster-wide set under the old id, which no outside traffic
    // reaches any more (no table).
    maps.ops.clear();
    let local = node_port_state(&[(10, true)], true);
    sync(&mut reconciler, &local, &mut maps);
    let external = maps.frontend(np());
    let internal = maps.frontend(np().in_scope(Scope::Internal));
    assert_eq!(
        external.flags,
        frontend_flags::LOCAL_ONLY | frontend_flags::TWO_SCOPES
    );
    assert_eq!(
        (internal.flags, internal.kind),
        (0, frontend_kinds::NODE_PORT)
    );
    assert_eq!(internal.service_id, 1);
    assert_eq!(external.service_id, 2);
    assert_eq!(
        maps.maps.tables.keys().copied().collect::<Vec<_>>(),
        vec![2]
    );
    // The old table went only after the NodePort had moved.
    let moved = maps
        .ops
        .iter()
        .position(|op| matches!(op, Op::PutFrontend(key, v) if *key == np() && v.service_id == 2))
        .expect("the NodePort moves");
    let dropped = maps
        .ops
        .iter()
        .position(|op| *op == Op::RemoveMaglev(1))
        .expect("the old table goes");
    assert!(moved < dropped, "{:?}", maps.ops);

    maps.ops.clear();
    let report = sync(&mut reconciler, &DesiredState::default(), &mut maps);
    assert_eq!(report.removed, 2);
    assert_eq!(maps.contents(), &MapContents::default());
    assert!(maps.maps.tables.is_empty());
    assert!(
        matches!(maps.ops[0], Op::RemoveFrontend(_)),
        "{:?}",
        maps.ops
    );
}

#[test]
fn a_frontend_without_backends_has_no_table() {
    let mut maps = CheckedMaps::default();
    let mut reconciler = Reconciler::adopt(&mut maps).unwrap();
    sync(&mut reconciler, &node_port_state(&[], true), &mut maps);
    assert_eq!(maps.frontend(np()).count, 0);
    assert!(maps.maps.tables.is_empty());
    sync(
        &mut reconciler,
        &node_port_state(&[(10, true)], true),
        &mut maps,
    );
    assert_eq!(maps.frontend(np()).count, 1);
    // Only the external scope's set is reached from outside.
    assert_eq!(
        maps.maps.tables.keys().copied().collect::<Vec<_>>(),
        vec![maps.frontend(np()).service_id]
    );
    sync(&mut reconciler, &node_port_state(&[], true), &mut maps);
    assert!(maps.maps.tables.is_empty() && maps.contents().backends.is_empty());
}

fn build(objects: &Objects) -> DesiredState {
    let (desired, _) = model::build(objects, &identity());
    desired
}

/// `default/web` (10.96.0.10, port `http` 80/TCP) of type LoadBalancer: nodePort 30080,
/// externalIP 198.51.100.10, load-balancer IP 203.0.113.7, under `policy`.
fn load_balancer(policy: &str) -> Service {
    let mut svc = with_ingress(
        with_node_ports(
            service("default", "web", "10.96.0.10", &[("http", 80, "TCP")]),
            "LoadBalancer",
            &[30080],
            policy,
        ),
        &[("203.0.113.7", None)],
    );
    svc.spec.as_mut().unwrap().external_ips = Some(vec!["198.51.100.10".into()]);
    svc
}

fn web_slice(endpoints: Vec<Endpoint>) -> EndpointSlice {
    slice(
        "default",
        "web-1",
        "web",
        &[("http", 8080, "TCP")],
        endpoints,
    )
}

fn outside() -> [Frontend; 3] {
    [
        np(),
        frontend("198.51.100.10", 80, Protocol::Tcp),
        frontend("203.0.113.7", 80, Protocol::Tcp),
    ]
}

#[test]
fn node_port_and_cluster_ip_share_one_service_id_unless_the_policy_is_local() {
    let endpoints = || {
        vec![
            ep("10.244.0.1").on_node(crate::model::tests::NODE),
            ep("10.244.0.2").on_node("node-b"),
        ]
    };
    let cluster = objects(vec![load_balancer("Cluster")], vec![web_slice(endpoints())]);
    let mut maps = CheckedMaps::default();
    let mut reconciler = Reconciler::adopt(&mut maps).unwrap();
    sync(&mut reconciler, &build(&cluster), &mut maps);
    let id = maps.frontend(web()).service_id;
    for frontend in outside() {
        assert_eq!(maps.frontend(frontend).service_id, id, "{frontend}");
        assert_eq!(reconciler.service_id(&frontend), Some(id), "{frontend}");
    }
    // One set: one id, one generation of slots, one table, two backends.
    assert_eq!(reconciler.set_ids().count(), 1);
    assert_eq!(maps.contents().slots.len(), 2);
    assert_eq!(maps.maps.tables.len(), 1);
    assert_eq!(maps.contents().backends.len(), 2);

    // The same service under eTP Local, by difference as the agent does it.
    let local = objects(vec![load_balancer("Local")], vec![web_slice(endpoints())]);
    let mut model = model::Model::new(identity());
    model.update(&cluster);
    let mut incremental_maps = CheckedMaps::default();
    let mut incremental = Reconciler::adopt(&mut incremental_maps).unwrap();
    sync(&mut incremental, model.desired(), &mut incremental_maps);
    let changes = model.update(&local);
    let report = counted_sync_changes(
        &mut incremental,
        model.desired(),
        &changes,
        &mut incremental_maps,
    );
    assert!(report.failed.is_empty(), "{report:?}");
    assert_exact(&incremental_maps, &build(&local));
    sync(&mut reconciler, &build(&local), &mut maps);
    for maps in [&maps, &incremental_maps] {
        let cluster_ip = maps.frontend(web()).service_id;
        assert_eq!(cluster_ip, id, "the ClusterIP keeps its set and its id");
        let local_id = maps.frontend(np()).service_id;
        assert_ne!(local_id, cluster_ip);
        for frontend in outside() {
            assert_eq!(maps.frontend(frontend).service_id, local_id, "{frontend}");
            assert_eq!(
                maps.frontend(frontend.in_scope(Scope::Internal)).service_id,
                cluster_ip,
                "{frontend}"
            );
        }
        // Only the local set is reached from outside.
        assert_eq!(
            maps.maps.tables.keys().copied().collect::<Vec<_>>(),
            vec![local_id]
        );
        // 10.244.0.1 is in both sets, under one id.
        assert_eq!(maps.contents().backends.len(), 2);
    }
}

#[test]
fn terminating_endpoints_drain_in_the_backend_map_and_go_with_the_slice() {
    let ready = ep("10.244.0.1").on_node("node-b");
    let draining =
        ep("10.244.0.2")
            .on_node("node-b")
            .conditions(Some(false), Some(true), Some(true));
    let mut maps = CheckedMaps::default();
    let mut reconciler = Reconciler::adopt(&mut maps).unwrap();
    let before = build(&objects(
        vec![load_balancer("Cluster")],
        vec![web_slice(vec![ready.clone(), draining])],
    ));
    assert_eq!(
        before.set_of(&np()).unwrap().draining,
        [backend(2, 8080)].into()
    );
    sync(&mut reconciler, &before, &mut maps);
    let ids = maps.backend_ids();
    let (kept, drained) = (ids[&backend(1, 8080)], ids[&backend(2, 8080)]);
    let contents = maps.contents();
    assert_eq!(
        contents.backends[&drained].state,
        backend_states::TERMINATING
    );
    assert_eq!(contents.backends[&kept].state, backend_states::ACTIVE);
    // Not in the slots, not in the Maglev table: no new connection picks it.
    let value = maps.frontend(np());
    assert_eq!(value.count, 1);
    assert!(contents.slots.values().all(|s| s.backend_id == kept));
    let table = &maps.maps.tables[&value.service_id];
    assert!(table.backend_ids.iter().all(|id| *id == kept));

    // The endpoint leaves the slice: its backend goes; the other keeps its id.
    maps.ops.clear();
    let after = build(&objects(
        vec![load_balancer("Cluster")],
        vec![web_slice(vec![ready])],
    ));
    sync(&mut reconciler, &after, &mut maps);
    assert_eq!(maps.ops, vec![Op::RemoveBackend(drained)]);
    assert_eq!(
        maps.backend_ids(),
        BTreeMap::from([(backend(1, 8080), kept)])
    );
}

#[test]
fn a_restarted_agent_keeps_every_service_id_and_backend_id() {
    // Every kind of frontend, both policies, a draining endpoint, affinity.
    let mut local = with_node_ports(
        service("default", "api", "10.96.0.20", &[("http", 443, "TCP")]),
        "NodePort",
        &[30443],
        "Local",
    );
    local.spec.as_mut().unwrap().health_check_node_port = Some(32000);
    local.spec.as_mut().unwrap().session_affinity = Some("ClientIP".into());
    let node = crate::model::tests::NODE;
    let objects_now = objects(
        vec![
            load_balancer("Cluster"),
            local,
            service(
                "kube-system",
                "kube-dns",
                "10.96.0.53",
                &[("dns", 53, "UDP")],
            ),
        ],
        vec![
            web_slice(vec![
                ep("10.244.0.1").on_node(node),
                ep("10.244.0.2").on_node("node-b"),
                ep("10.244.0.3")
                    .on_node("node-b")
                    .conditions(Some(false), Some(true), Some(true)),
            ]),
            slice(
                "default",
                "api-1",
                "api",
                &[("http", 8443, "TCP")],
                vec![
                    ep("10.244.0.1").on_node(node),
                    ep("10.244.0.4").on_node("node-b"),
                ],
            ),
            slice(
                "kube-system",
                "kube-dns-1",
                "kube-dns",
                &[("dns", 53, "UDP")],
                vec![ep("10.244.0.5"), ep("10.244.0.6")],
            ),
        ],
    );
    let desired = build(&objects_now);
    let mut maps = CheckedMaps::default();
    let mut earlier = Reconciler::adopt(&mut maps).unwrap();
    sync(&mut earlier, &desired, &mut maps);
    let frontends_before = maps.contents().frontends.clone();
    let backends_before = maps.backend_ids();
    let sets_before: BTreeMap<SetKey, u32> =
        earlier.set_ids().map(|(k, id)| (k.clone(), id)).collect();
    assert!(
        frontends_before.keys().any(|f| f.is_node_port()),
        "{frontends_before:?}"
    );

    maps.ops.clear();
    let mut restarted = Reconciler::adopt(&mut maps).unwrap();
    assert!(maps.ops.is_empty(), "adopt wrote {:?}", maps.ops);
    let report = counted_sync(&mut restarted, &desired, &mut maps);
    assert!(report.failed.is_empty(), "{report:?}");
    assert_eq!(report.map_writes, 0, "{report:?}");
    assert!(maps.ops.is_empty(), "{:?}", maps.ops);
    assert_eq!((report.added, report.updated, report.removed), (0, 0, 0));
    assert_exact(&maps, &desired);
    assert_eq!(maps.contents().frontends, frontends_before);
    assert_eq!(maps.backend_ids(), backends_before);
    let sets_after: BTreeMap<SetKey, u32> =
        restarted.set_ids().map(|(k, id)| (k.clone(), id)).collect();
    assert_eq!(sets_after, sets_before);
    for frontend in desired.frontends.keys() {
        assert_eq!(
            restarted.service_id(frontend),
            earlier.service_id(frontend),
            "{frontend}"
        );
    }
    // The new agent reports every set it now programs (for its counters).
    assert_eq!(
        report
            .sets_added
            .iter()
            .cloned()
            .collect::<BTreeMap<_, _>>(),
        sets_before
    );

    // A scale-up after the restart: new backends get new ids, every other id stays.
    let mut scaled = objects_now.clone();
    let grown = web_slice(vec![
        ep("10.244.0.1").on_node(node),
        ep("10.244.0.2").on_node("node-b"),
        ep("10.244.0.3")
            .on_node("node-b")
            .conditions(Some(false), Some(true), Some(true)),
        ep("10.244.0.7").on_node("node-b"),
    ]);
    scaled
        .endpoint_slices
        .insert(ObjectKey::of(&grown.metadata), Arc::new(grown.into()));
    sync(&mut restarted, &build(&scaled), &mut maps);
    let ids = maps.backend_ids();
    for (backend, id) in &backends_before {
        assert_eq!(ids.get(backend), Some(id), "{backend}");
    }
    assert!(ids[&backend(7, 8080)] > *backends_before.values().max().unwrap());
    for (key, value) in &frontends_before {
        assert_eq!(maps.contents().frontends[key].service_id, value.service_id);
    }
}

#[test]
fn a_frontend_moving_to_another_set_while_its_old_set_changes_never_sees_it_half_written() {
    // In one change the service turns eTP Local (the outside frontends move to the local set)
    // and its endpoints change (the cluster-wide set they leave gets new slots). Every write
    // is checked: the frontends leaving must never name removed slots or a removed table.
    let node = crate::model::tests::NODE;
    let before = objects(
        vec![load_balancer("Cluster")],
        vec![web_slice(vec![
            ep("10.244.0.1").on_node(node),
            ep("10.244.0.2").on_node("node-b"),
        ])],
    );
    let after = objects(
        vec![load_balancer("Local")],
        vec![web_slice(vec![
            ep("10.244.0.1").on_node(node),
            ep("10.244.0.3").on_node("node-b"),
        ])],
    );
    // By difference.
    let mut model = model::Model::new(identity());
    model.update(&before);
    let mut maps = CheckedMaps::default();
    let mut reconciler = Reconciler::adopt(&mut maps).unwrap();
    sync(&mut reconciler, model.desired(), &mut maps);
    let changes = model.update(&after);
    let report = counted_sync_changes(&mut reconciler, model.desired(), &changes, &mut maps);
    assert!(report.failed.is_empty(), "{report:?}");
    assert_exact(&maps, &build(&after));
    // And back.
    let changes = model.update(&before);
    counted_sync_changes(&mut reconciler, model.desired(), &changes, &mut maps);
    assert_exact(&maps, &build(&before));

    // By a full sync.
    let mut maps = CheckedMaps::default();
    let mut reconciler = Reconciler::adopt(&mut maps).unwrap();
    sync(&mut reconciler, &build(&before), &mut maps);
    sync(&mut reconciler, &build(&after), &mut maps);

    // Across a restart: the change happened while no agent ran; the new one adopts the
    // maps the old one left and moves the frontends it adopted.
    let mut maps = CheckedMaps::default();
    let mut earlier = Reconciler::adopt(&mut maps).unwrap();
    sync(&mut earlier, &build(&before), &mut maps);
    let cluster_ip = maps.frontend(web()).service_id;
    let mut restarted = Reconciler::adopt(&mut maps).unwrap();
    sync(&mut restarted, &build(&after), &mut maps);
    assert_eq!(maps.frontend(web()).service_id, cluster_ip);
}

#[test]
fn sets_disagreeing_about_a_shared_backend_give_it_one_value_in_any_order() {
    // One pod behind two services whose slices disagree (one was updated first): `a` has it
    // ready on this node, `b` terminating (draining beside a ready endpoint) on another.
    let node = crate::model::tests::NODE;
    let a = (
        service("default", "a", "10.96.0.1", &[("http", 80, "TCP")]),
        slice(
            "default",
            "a-1",
            "a",
            &[("http", 8080, "TCP")],
            vec![ep("10.244.0.5").on_node(node)],
        ),
    );
    let b = (
        service("default", "b", "10.96.0.2", &[("http", 80, "TCP")]),
        slice(
            "default",
            "b-1",
            "b",
            &[("http", 8080, "TCP")],
            vec![
                ep("10.244.0.5")
                    .on_node("node-b")
                    .conditions(Some(false), Some(true), Some(true)),
                ep("10.244.0.6").on_node("node-b"),
            ],
        ),
    );
    let only = |(svc, sl): &(Service, EndpointSlice)| objects(vec![svc.clone()], vec![sl.clone()]);
    let both = objects(
        vec![a.0.clone(), b.0.clone()],
        vec![a.1.clone(), b.1.clone()],
    );
    let shared = backend(5, 8080);
    let mut values = Vec::new();
    for first in [only(&a), only(&b)] {
        let mut maps = CheckedMaps::default();
        let mut reconciler = Reconciler::adopt(&mut maps).unwrap();
        sync(&mut reconciler, &build(&first), &mut maps);
        // `sync` checks the merged value: terminating (b says so), not local (b says so).
        sync(&mut reconciler, &build(&both), &mut maps);
        let value = maps.contents().backends[&maps.backend_ids()[&shared]];
        assert_eq!((value.state, value.flags), (backend_states::TERMINATING, 0));
        values.push(value);
        maps.ops.clear();
        let report = counted_sync(&mut reconciler, &build(&both), &mut maps);
        assert_eq!(report, SyncReport::default(), "a resync writes nothing");
        // Nor does a restart: the adopted value stands until every set has said its word.
        let mut reconciler = Reconciler::adopt(&mut maps).unwrap();
        let report = counted_sync(&mut reconciler, &build(&both), &mut maps);
        assert_eq!(report.map_writes, 0, "{:?}", maps.ops);
        assert_exact(&maps, &build(&both));
        // When b goes, a alone keeps it: active and local again, same id.
        let id = maps.backend_ids()[&shared];
        sync(&mut reconciler, &build(&only(&a)), &mut maps);
        assert_eq!(maps.backend_ids()[&shared], id);
        let value = maps.contents().backends[&id];
        assert_eq!(
            (value.state, value.flags),
            (backend_states::ACTIVE, backend_flags::LOCAL)
        );
    }
    assert_eq!(values[0], values[1]);
}

#[test]
fn a_backend_behind_two_services_has_one_id() {
    let desired = state(vec![
        (web(), desired_service("web", &[backend(1, 8080)], None)),
        (
            api(),
            desired_service("api", &[backend(1, 8080), backend(2, 8080)], None),
        ),
    ]);
    let mut maps = CheckedMaps::default();
    let mut reconciler = Reconciler::default();
    sync(&mut reconciler, &desired, &mut maps);
    assert_eq!(maps.contents().backends.len(), 2);
    let id = maps.backend_ids()[&backend(1, 8080)];
    let naming: Vec<u32> = maps
        .contents()
        .slots
        .values()
        .map(|s| s.backend_id)
        .filter(|b| *b == id)
        .collect();
    assert_eq!(naming.len(), 2, "{:?}", maps.contents().slots);
    // web goes: the backend stays for api, under its id.
    sync(
        &mut reconciler,
        &state(vec![(
            api(),
            desired_service("api", &[backend(1, 8080), backend(2, 8080)], None),
        )]),
        &mut maps,
    );
    assert_eq!(maps.backend_ids()[&backend(1, 8080)], id);
}

// ---------------------------------------------------------------------------------------------
// Model-based: random object events → model::build → sync, compared with a fresh start

// Small pools, so that slices often match their service's ports and frontends collide: two
// services on one NodePort or externalIP, an externalIP on another service's ClusterIP.
const SERVICES: usize = 3;
const SLICES: usize = 4;
const PORT_NAMES: [&str; 2] = ["", "http"];
const SERVICE_PORTS: [i32; 3] = [53, 80, 443];
const TARGET_PORTS: [i32; 3] = [53, 8080, 8443];
const CLUSTER_IPS: [&str; 3] = ["10.96.0.10", "10.96.0.11", "10.96.0.12"];
/// The IPv6 ClusterIP of a dual-stack or IPv6 service with the same index.
const CLUSTER_IPS_V6: [&str; 3] = ["fd00:10:96::a", "fd00:10:96::b", "fd00:10:96::c"];
const NODE_PORTS: [i32; 3] = [30000, 30001, 30002];
const HEALTH_CHECK_PORTS: [i32; 2] = [32000, 32001];
/// externalIPs and load-balancer IPs of both families; `10.96.0.10` and `fd00:10:96::a` are
/// ClusterIPs of the pool.
const EXTERNAL_IPS: [&str; 6] = [
    "198.51.100.10",
    "198.51.100.11",
    "203.0.113.7",
    "10.96.0.10",
    "2001:db8::10",
    "fd00:10:96::a",
];
const NODES: [&str; 3] = [crate::model::tests::NODE, "node-b", "node-c"];
const ZONES: [&str; 2] = ["zone-a", "zone-b"];

#[derive(Clone, Debug)]
enum Kind {
    ClusterIp,
    NodePort,
    LoadBalancer,
    Headless,
    ExternalName,
}

/// A service's `ipFamilies`.
#[derive(Clone, Copy, Debug)]
enum Families {
    V4,
    V6,
    /// IPv4 then IPv6.
    Dual,
    /// IPv6 then IPv4.
    DualV6First,
}

#[derive(Clone, Debug)]
struct PortSpec {
    name: usize,
    number: usize,
    udp: bool,
    /// The nodePort (NodePort and LoadBalancer services); `None`: not allocated.
    node_port: Option<usize>,
}

/// What outside traffic reaches a service at.
#[derive(Clone, Debug)]
struct ExternalSpec {
    /// `externalTrafficPolicy: Local`.
    local: bool,
    external_ips: Vec<usize>,
    /// Load-balancer ingress IPs, with `ipMode: Proxy` or not.
    ingress: Vec<(usize, bool)>,
    health_check_port: Option<usize>,
}

#[derive(Clone, Debug)]
struct EndpointSpec {
    ip: u8,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
    node: Option<usize>,
    zones: Option<Vec<usize>>,
    nodes: Option<Vec<usize>>,
}

#[derive(Clone, Debug)]
enum Event {
    PutService {
        which: usize,
        kind: Kind,
        families: Families,
        ip: usize,
        ports: Vec<PortSpec>,
        affinity: Option<i32>,
        local: bool,
        publish_not_ready: bool,
        external: ExternalSpec,
    },
    DeleteService(usize),
    PutSlice {
        which: usize,
        service: usize,
        /// An IPv6 slice (`addressType: IPv6`, endpoints `fd00:10:244::N`).
        v6: bool,
        other_namespace: bool,
        ports: Vec<PortSpec>,
        endpoints: Vec<EndpointSpec>,
    },
    DeleteSlice(usize),
    PutNode(Option<usize>),
    DeleteNode,
    /// The agent restarts and adopts the maps it left.
    Restart,
}

fn port_spec(numbers: usize) -> impl Strategy<Value = PortSpec> {
    (
        0..PORT_NAMES.len(),
        0..numbers,
        any::<bool>(),
        prop_oneof![4 => (0..NODE_PORTS.len()).prop_map(Some), 1 => Just(None)],
    )
        .prop_map(|(name, number, udp, node_port)| PortSpec {
            name,
            number,
            udp,
            node_port,
        })
}

fn external_spec() -> impl Strategy<Value = ExternalSpec> {
    (
        prop::bool::weighted(0.4),
        prop::collection::vec(0..EXTERNAL_IPS.len(), 0..=2),
        prop::collection::vec((0..EXTERNAL_IPS.len(), prop::bool::weighted(0.2)), 0..=2),
        prop::option::of(0..HEALTH_CHECK_PORTS.len()),
    )
        .prop_map(
            |(local, external_ips, ingress, health_check_port)| ExternalSpec {
                local,
                external_ips,
                ingress,
                health_check_port,
            },
        )
}

fn endpoint_spec() -> impl Strategy<Value = EndpointSpec> {
    let condition = prop_oneof![2 => Just(None), 2 => Just(Some(true)), 1 => Just(Some(false))];
    let hints = |n: usize| {
        prop_oneof![
            3 => Just(None),
            2 => prop::collection::vec(0..n, 1..=2).prop_map(Some),
        ]
    };
    (
        1u8..=8,
        condition.clone(),
        condition.clone(),
        condition,
        prop::option::of(0..NODES.len()),
        hints(ZONES.len()),
        hints(NODES.len()),
    )
        .prop_map(
            |(ip, ready, serving, terminating, node, zones, nodes)| EndpointSpec {
                ip,
                ready,
                serving,
                terminating,
                node,
                zones,
                nodes,
            },
        )
}

fn event() -> impl Strategy<Value = Event> {
    let kind = prop_oneof![
        4 => Just(Kind::ClusterIp),
        2 => Just(Kind::NodePort),
        2 => Just(Kind::LoadBalancer),
        1 => Just(Kind::Headless),
        1 => Just(Kind::ExternalName),
    ];
    let affinity = prop_oneof![
        3 => Just(None),
        1 => Just(Some(10_800)),
        1 => prop_oneof![Just(0), Just(60), Just(125), Just(90_000)].prop_map(Some),
    ];
    let families = prop_oneof![
        3 => Just(Families::V4),
        1 => Just(Families::V6),
        2 => Just(Families::Dual),
        1 => Just(Families::DualV6First),
    ];
    prop_oneof![
        3 => (
            (0..SERVICES, families),
            kind,
            0..CLUSTER_IPS.len(),
            prop::collection::vec(port_spec(SERVICE_PORTS.len()), 1..=3),
            affinity,
            prop::bool::weighted(0.2),
            prop::bool::weighted(0.1),
            external_spec(),
        )
            .prop_map(
                |((which, families), kind, ip, ports, affinity, local, publish_not_ready, external)| {
                    Event::PutService {
                        which,
                        kind,
                        families,
                        ip,
                        ports,
                        affinity,
                        local,
                        publish_not_ready,
                        external,
                    }
                }
            ),
        1 => (0..SERVICES).prop_map(Event::DeleteService),
        6 => (
            (0..SLICES, prop::bool::weighted(0.4)),
            0..SERVICES,
            prop::bool::weighted(0.1),
            prop::collection::vec(port_spec(TARGET_PORTS.len()), 1..=4),
            prop::collection::vec(endpoint_spec(), 0..=6),
        )
            .prop_map(|((which, v6), service, other_namespace, ports, endpoints)| {
                Event::PutSlice {
                    which,
                    service,
                    v6,
                    other_namespace,
                    ports,
                    endpoints,
                }
            }),
        2 => (0..SLICES).prop_map(Event::DeleteSlice),
        1 => prop::option::of(0..ZONES.len()).prop_map(Event::PutNode),
        1 => Just(Event::DeleteNode),
        1 => Just(Event::Restart),
    ]
}

fn protocol(udp: bool) -> &'static str {
    if udp { "UDP" } else { "TCP" }
}

fn apply(objects: &mut Objects, event: &Event) {
    let service_name = |which: usize| format!("svc-{which}");
    match event {
        Event::PutService {
            which,
            kind,
            families,
            ip,
            ports,
            affinity,
            local,
            publish_not_ready,
            external,
        } => {
            let numbers: Vec<(&str, i32, &str)> = ports
                .iter()
                .map(|p| (PORT_NAMES[p.name], SERVICE_PORTS[p.number], protocol(p.udp)))
                .collect();
            let mut svc = service("default", &service_name(*which), CLUSTER_IPS[*ip], &numbers);
            let (v4, v6) = (CLUSTER_IPS[*ip], CLUSTER_IPS_V6[*ip]);
            svc = match families {
                Families::V4 => svc,
                Families::V6 => with_families(svc, "SingleStack", &[v6], &["IPv6"]),
                Families::Dual => {
                    with_families(svc, "RequireDualStack", &[v4, v6], &["IPv4", "IPv6"])
                }
                Families::DualV6First => {
                    with_families(svc, "PreferDualStack", &[v6, v4], &["IPv6", "IPv4"])
                }
            };
            if matches!(kind, Kind::NodePort | Kind::LoadBalancer) {
                let kind = if matches!(kind, Kind::NodePort) {
                    "NodePort"
                } else {
                    "LoadBalancer"
                };
                let policy = if external.local { "Local" } else { "Cluster" };
                svc = with_node_ports(svc, kind, &[], policy);
                let spec = svc.spec.as_mut().unwrap();
                for (port, wanted) in spec.ports.iter_mut().flatten().zip(ports) {
                    port.node_port = wanted.node_port.map(|n| NODE_PORTS[n]);
                }
                if external.local {
                    spec.health_check_node_port =
                        external.health_check_port.map(|p| HEALTH_CHECK_PORTS[p]);
                }
            }
            // Every kind may list externalIPs and carry a load-balancer status; only
            // LoadBalancer services use the latter.
            let ingress: Vec<(&str, Option<&str>)> = external
                .ingress
                .iter()
                .map(|(ip, proxy)| (EXTERNAL_IPS[*ip], proxy.then_some("Proxy")))
                .collect();
            svc = with_ingress(svc, &ingress);
            let spec = svc.spec.as_mut().unwrap();
            if !external.external_ips.is_empty() {
                spec.external_ips = Some(
                    external
                        .external_ips
                        .iter()
                        .map(|ip| EXTERNAL_IPS[*ip].to_owned())
                        .collect(),
                );
            }
            match kind {
                Kind::ClusterIp | Kind::NodePort | Kind::LoadBalancer => {}
                Kind::Headless => {
                    spec.cluster_ip = Some("None".into());
                    spec.cluster_ips = Some(vec!["None".into()]);
                }
                Kind::ExternalName => {
                    spec.type_ = Some("ExternalName".into());
                    spec.external_name = Some("example.com".into());
                    spec.cluster_ip = None;
                    spec.cluster_ips = None;
                }
            }
            if let Some(secs) = affinity {
                spec.session_affinity = Some("ClientIP".into());
                spec.session_affinity_config =
                    Some(k8s_openapi::api::core::v1::SessionAffinityConfig {
                        client_ip: Some(k8s_openapi::api::core::v1::ClientIPConfig {
                            timeout_seconds: Some(*secs),
                        }),
                    });
            }
            if *local {
                spec.internal_traffic_policy = Some("Local".into());
            }
            spec.publish_not_ready_addresses = Some(*publish_not_ready);
            objects
                .services
                .insert(ObjectKey::of(&svc.metadata), Arc::new(svc.into()));
        }
        Event::DeleteService(which) => {
            objects
                .services
                .remove(&ObjectKey::new("default", service_name(*which)));
        }
        Event::PutSlice {
            which,
            service,
            v6,
            other_namespace,
            ports,
            endpoints,
        } => {
            let ports: Vec<(&str, i32, &str)> = ports
                .iter()
                .map(|p| (PORT_NAMES[p.name], TARGET_PORTS[p.number], protocol(p.udp)))
                .collect();
            let endpoints = endpoints
                .iter()
                .map(|e| {
                    let address = if *v6 {
                        format!("fd00:10:244::{}", e.ip)
                    } else {
                        format!("10.244.0.{}", e.ip)
                    };
                    let mut endpoint = ep(&address).conditions(e.ready, e.serving, e.terminating);
                    endpoint.node_name = e.node.map(|n| NODES[n].to_owned());
                    if let Some(zones) = &e.zones {
                        let names: Vec<&str> = zones.iter().map(|z| ZONES[*z]).collect();
                        endpoint = endpoint.zones(&names);
                    }
                    if let Some(nodes) = &e.nodes {
                        let names: Vec<&str> = nodes.iter().map(|n| NODES[*n]).collect();
                        endpoint = endpoint.nodes(&names);
                    }
                    endpoint
                })
                .collect();
            // Slice names are fixed per `which` (in namespace default), so a slice can move
            // from one service to another, as a hand-made slice can.
            let namespace = if *other_namespace { "other" } else { "default" };
            objects
                .endpoint_slices
                .retain(|key, _| key.name != format!("slice-{which}"));
            let make = if *v6 { slice6 } else { slice };
            let new = make(
                namespace,
                &format!("slice-{which}"),
                &service_name(*service),
                &ports,
                endpoints,
            );
            objects
                .endpoint_slices
                .insert(ObjectKey::of(&new.metadata), Arc::new(new.into()));
        }
        Event::DeleteSlice(which) => {
            objects
                .endpoint_slices
                .retain(|key, _| key.name != format!("slice-{which}"));
        }
        Event::PutNode(zone) => {
            let this = crate::model::tests::NODE;
            objects.nodes.insert(
                this.into(),
                Arc::new(node(this, zone.map(|z| ZONES[z])).into()),
            );
        }
        Event::DeleteNode => {
            objects.nodes.remove(crate::model::tests::NODE);
        }
        Event::Restart => {}
    }
}

/// With syncs batched from `batch_from` frontends and sets on.
fn run_events(events: &[Event], batch_from: usize) -> Result<(), TestCaseError> {
    let identity = identity();
    let mut objects = Objects::default();
    let mut maps = CheckedMaps::default();
    let adopt = |maps: &mut CheckedMaps| {
        let mut reconciler = Reconciler::adopt(maps).expect("adopt");
        reconciler.batch_writes_from(batch_from);
        reconciler
    };
    let mut reconciler = adopt(&mut maps);
    // The agent's path: a model kept by difference, syncing only what it reports changed.
    let mut model = model::Model::new(identity.clone());
    let mut incremental_maps = CheckedMaps::default();
    let mut incremental = adopt(&mut incremental_maps);
    let mut first = true;
    for (step, event) in events.iter().enumerate() {
        apply(&mut objects, event);
        let changes = model.update(&objects);
        let restart = matches!(event, Event::Restart);
        if first || restart {
            incremental = adopt(&mut incremental_maps);
            let report = counted_sync(&mut incremental, model.desired(), &mut incremental_maps);
            prop_assert!(report.failed.is_empty(), "step {step}: {report:?}");
            if restart {
                // Nothing changed but the agent: every id is kept, nothing is written.
                prop_assert_eq!(report.map_writes, 0, "step {}: {:?}", step, report);
            }
            first = false;
        } else {
            let report = counted_sync_changes(
                &mut incremental,
                model.desired(),
                &changes,
                &mut incremental_maps,
            );
            prop_assert!(report.failed.is_empty(), "step {step}: {report:?}");
        }
        if restart {
            maps.ops.clear();
            reconciler = adopt(&mut maps);
            prop_assert!(
                maps.ops.is_empty(),
                "step {step}: adopt wrote {:?}",
                maps.ops
            );
        }
        let (desired, diagnostics) = model::build(&objects, &identity);
        let report = counted_sync(&mut reconciler, &desired, &mut maps);
        prop_assert!(report.failed.is_empty(), "step {step}: {report:?}");
        if restart {
            prop_assert_eq!(report.map_writes, 0, "step {}: {:?}", step, report);
        }

        let mut fresh = CheckedMaps::default();
        let fresh_report = Reconciler::default().sync(&desired, &mut fresh);
        prop_assert!(fresh_report.failed.is_empty());
        let view = view_without_ids(maps.contents());
        prop_assert_eq!(&view, &view_without_ids(fresh.contents()), "step {}", step);
        prop_assert_eq!(&view, &expected_view(&desired), "step {}", step);
        prop_assert_eq!(
            model.desired(),
            &desired,
            "step {}: the incremental model",
            step
        );
        prop_assert_eq!(
            model.diagnostics(),
            diagnostics,
            "step {}: the incremental model's diagnostics",
            step
        );
        prop_assert_eq!(
            &view_without_ids(incremental_maps.contents()),
            &view,
            "step {}: maps synced by difference",
            step
        );
        for (what, checked) in [("incremental", &incremental_maps), ("full", &maps)] {
            if let Err(problem) = exact(&checked.maps, &desired) {
                return Err(TestCaseError::fail(format!(
                    "step {step}: {what}: {problem}\ncontents: {:#?}\ndesired: {desired:#?}",
                    checked.contents()
                )));
            }
        }
        // Syncing again writes nothing.
        maps.ops.clear();
        let again = reconciler.sync(&desired, &mut maps);
        prop_assert_eq!(again, SyncReport::default(), "step {}", step);
        prop_assert!(maps.ops.is_empty());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_object_events_keep_the_maps_equal_to_a_fresh_build(
        events in prop::collection::vec(event(), 1..=30)
    ) {
        run_events(&events, super::BATCH_FROM)?;
    }

    #[test]
    fn random_object_events_with_every_sync_batched_keep_the_maps_equal_to_a_fresh_build(
        events in prop::collection::vec(event(), 1..=30)
    ) {
        run_events(&events, 0)?;
    }
}

#[test]
fn source_ranges_follow_the_service_and_survive_a_restart() {
    let with_ranges = |ranges: &[&str]| {
        let mut svc = load_balancer("Cluster");
        svc.spec.as_mut().unwrap().load_balancer_source_ranges =
            Some(ranges.iter().map(|r| (*r).to_owned()).collect());
        build(&objects(
            vec![svc],
            vec![web_slice(vec![ep("10.244.0.1"), ep("10.244.0.2")])],
        ))
    };
    let lb = frontend("203.0.113.7", 80, Protocol::Tcp);
    let mut maps = CheckedMaps::default();
    let mut reconciler = Reconciler::adopt(&mut maps).unwrap();
    // `sync` checks the exact contents, source ranges included, and (at every write) that no
    // frontend checks ranges its service id does not have yet.
    sync(&mut reconciler, &with_ranges(&["192.0.2.0/24"]), &mut maps);
    let id = maps.frontend(lb).service_id;
    assert_eq!(
        maps.contents().source_ranges,
        [(id, "192.0.2.0/24".parse().unwrap())].into()
    );
    assert_ne!(maps.frontend(lb).flags & frontend_flags::SOURCE_RANGES, 0);
    // The NodePort shares the id and is not filtered.
    let np = Frontend::node_port(Family::V4, 30080, Protocol::Tcp);
    assert_eq!(maps.frontend(np).service_id, id);
    assert_eq!(maps.frontend(np).flags & frontend_flags::SOURCE_RANGES, 0);

    // Changed ranges: the new one is written before the old one goes.
    maps.ops.clear();
    sync(&mut reconciler, &with_ranges(&["198.18.0.0/16"]), &mut maps);
    let put = maps
        .ops
        .iter()
        .position(|op| matches!(op, Op::PutSourceRange(..)))
        .expect("new range written");
    let removed = maps
        .ops
        .iter()
        .position(|op| matches!(op, Op::RemoveSourceRange(..)))
        .expect("old range removed");
    assert!(put < removed, "{:?}", maps.ops);

    // A restarted agent adopts them and writes nothing for an unchanged state.
    maps.ops.clear();
    let mut restarted = Reconciler::adopt(&mut maps).unwrap();
    sync(&mut restarted, &with_ranges(&["198.18.0.0/16"]), &mut maps);
    assert!(
        !maps
            .ops
            .iter()
            .any(|op| matches!(op, Op::PutSourceRange(..) | Op::RemoveSourceRange(..))),
        "{:?}",
        maps.ops
    );

    // Ranges dropped from the Service: the check goes first, then the entries.
    sync(&mut restarted, &with_ranges(&[]), &mut maps);
    assert!(maps.contents().source_ranges.is_empty());
    assert_eq!(maps.frontend(lb).flags & frontend_flags::SOURCE_RANGES, 0);

    // The Service gone: nothing left.
    sync(&mut restarted, &with_ranges(&["192.0.2.0/24"]), &mut maps);
    sync(&mut restarted, &DesiredState::default(), &mut maps);
    assert!(maps.contents().source_ranges.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Dual-stack: each family's frontends, backends and ranges in its own maps, one id space

/// `default/web` dual-stack (10.96.0.10 and fd00:10:96::a) of type LoadBalancer: nodePort
/// 30080, load-balancer IPs 203.0.113.7 and 2001:db8:7::7, under `policy`, with these
/// `loadBalancerSourceRanges`.
fn dual_stack_load_balancer(policy: &str, ranges: &[&str]) -> Service {
    let mut svc = with_ingress(
        with_node_ports(
            with_families(
                service("default", "web", "10.96.0.10", &[("http", 80, "TCP")]),
                "RequireDualStack",
                &["10.96.0.10", "fd00:10:96::a"],
                &["IPv4", "IPv6"],
            ),
            "LoadBalancer",
            &[30080],
            policy,
        ),
        &[("203.0.113.7", None), ("2001:db8:7::7", None)],
    );
    if !ranges.is_empty() {
        svc.spec.as_mut().unwrap().load_balancer_source_ranges =
            Some(ranges.iter().map(|r| (*r).to_owned()).collect());
    }
    svc
}

fn web_slice6(endpoints: Vec<Endpoint>) -> EndpointSlice {
    slice6(
        "default",
        "web-v6",
        "web",
        &[("http", 8080, "TCP")],
        endpoints,
    )
}

fn v6_backend(last: u8, port: u16) -> Backend {
    Backend {
        ip: format!("fd00:10:244::{last}").parse().unwrap(),
        port,
    }
}

#[test]
fn dual_stack_sets_get_their_own_service_ids_and_backends_their_familys_map() {
    let desired = build(&objects(
        vec![dual_stack_load_balancer("Cluster", &[])],
        vec![
            web_slice(vec![ep("10.244.0.1"), ep("10.244.0.2")]),
            web_slice6(vec![ep("fd00:10:244::1"), ep("fd00:10:244::2")]),
        ],
    ));
    let mut maps = CheckedMaps::default();
    let mut reconciler = Reconciler::adopt(&mut maps).unwrap();
    // `sync` checks the exact contents; every write checks that a live slot names a backend
    // of its frontend's family.
    sync(&mut reconciler, &desired, &mut maps);
    let v4 = [
        frontend("10.96.0.10", 80, Protocol::Tcp),
        Frontend::node_port(Family::V4, 30080, Protocol::Tcp),
        frontend("203.0.113.7", 80, Protocol::Tcp),
    ];
    let v6 = [
        frontend("fd00:10:96::a", 80, Protocol::Tcp),
        Frontend::node_port(Family::V6, 30080, Protocol::Tcp),
        frontend("2001:db8:7::7", 80, Protocol::Tcp),
    ];
    let id_of = |f: &Frontend| maps.frontend(*f).service_id;
    assert!(v4.iter().all(|f| id_of(f) == id_of(&v4[0])), "{v4:?}");
    assert!(v6.iter().all(|f| id_of(f) == id_of(&v6[0])), "{v6:?}");
    assert_ne!(id_of(&v4[0]), id_of(&v6[0]));
    // One backend id space over both families.
    let ids = maps.backend_ids();
    assert_eq!(ids.len(), 4);
    assert_eq!(ids.values().collect::<BTreeSet<_>>().len(), 4);
    assert!(ids.contains_key(&v6_backend(1, 8080)) && ids.contains_key(&backend(1, 8080)));
    // Both sets are reached from outside: a Maglev table each.
    assert_eq!(
        maps.maps.tables.keys().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([id_of(&v4[0]), id_of(&v6[0])])
    );

    // The IPv6 endpoints change: only the IPv6 set is rewritten, in the usual order (backend,
    // slots of the idle generation, table, frontends, old slots, old backend).
    maps.ops.clear();
    let changed = build(&objects(
        vec![dual_stack_load_balancer("Cluster", &[])],
        vec![
            web_slice(vec![ep("10.244.0.1"), ep("10.244.0.2")]),
            web_slice6(vec![ep("fd00:10:244::1"), ep("fd00:10:244::3")]),
        ],
    ));
    sync(&mut reconciler, &changed, &mut maps);
    let touched: BTreeSet<Frontend> = maps
        .ops
        .iter()
        .filter_map(|op| match op {
            Op::PutFrontend(f, _) | Op::RemoveFrontend(f) => Some(*f),
            _ => None,
        })
        .collect();
    assert_eq!(touched, BTreeSet::from(v6), "{:?}", maps.ops);
    let new_id = maps.backend_ids()[&v6_backend(3, 8080)];
    let first_frontend = maps
        .ops
        .iter()
        .position(|op| matches!(op, Op::PutFrontend(..)))
        .unwrap();
    assert_eq!(maps.ops[0], Op::PutBackend(new_id));
    assert!(
        maps.ops[1..first_frontend]
            .iter()
            .all(|op| matches!(op, Op::PutSlot(..) | Op::PutMaglev(_))),
        "{:?}",
        maps.ops
    );
    assert!(
        maps.ops[first_frontend..].iter().all(|op| matches!(
            op,
            Op::PutFrontend(..) | Op::RemoveSlot(_) | Op::RemoveBackend(_)
        )),
        "{:?}",
        maps.ops
    );
    assert_eq!(
        maps.ops.last(),
        Some(&Op::RemoveBackend(ids[&v6_backend(2, 8080)]))
    );

    // A restarted agent adopts both families' maps: same ids, nothing written.
    let frontends_before = maps.contents().frontends.clone();
    maps.ops.clear();
    let mut restarted = Reconciler::adopt(&mut maps).unwrap();
    let report = counted_sync(&mut restarted, &changed, &mut maps);
    assert!(report.failed.is_empty(), "{report:?}");
    assert_eq!(report.map_writes, 0, "{:?}", maps.ops);
    assert_eq!(maps.contents().frontends, frontends_before);
    assert_exact(&maps, &changed);

    // Gone: both families' maps are empty again.
    sync(&mut restarted, &DesiredState::default(), &mut maps);
    assert_eq!(maps.contents(), &MapContents::default());
}

#[test]
fn ipv6_source_ranges_are_written_under_the_ipv6_sets_id_before_its_frontends_check_them() {
    let desired = build(&objects(
        vec![dual_stack_load_balancer(
            "Cluster",
            &["192.0.2.0/24", "2001:db8:1::/48"],
        )],
        vec![
            web_slice(vec![ep("10.244.0.1")]),
            web_slice6(vec![ep("fd00:10:244::1")]),
        ],
    ));
    let mut maps = CheckedMaps::default();
    let mut reconciler = Reconciler::adopt(&mut maps).unwrap();
    sync(&mut reconciler, &desired, &mut maps);
    let v4 = maps
        .frontend(frontend("203.0.113.7", 80, Protocol::Tcp))
        .service_id;
    let v6_lb = frontend("2001:db8:7::7", 80, Protocol::Tcp);
    let v6 = maps.frontend(v6_lb).service_id;
    assert_eq!(
        maps.contents().source_ranges,
        BTreeSet::from([
            (v4, "192.0.2.0/24".parse().unwrap()),
            (v6, "2001:db8:1::/48".parse().unwrap()),
        ])
    );
    let range_written = maps
        .ops
        .iter()
        .position(|op| matches!(op, Op::PutSourceRange(id, _) if *id == v6))
        .unwrap();
    let lb_written = maps
        .ops
        .iter()
        .position(|op| matches!(op, Op::PutFrontend(f, _) if *f == v6_lb))
        .unwrap();
    assert!(range_written < lb_written, "{:?}", maps.ops);
    // The IPv6 ranges go; the IPv4 ones stay.
    let fewer = build(&objects(
        vec![dual_stack_load_balancer("Cluster", &["192.0.2.0/24"])],
        vec![
            web_slice(vec![ep("10.244.0.1")]),
            web_slice6(vec![ep("fd00:10:244::1")]),
        ],
    ));
    sync(&mut reconciler, &fewer, &mut maps);
    assert_eq!(
        maps.contents().source_ranges,
        BTreeSet::from([(v4, "192.0.2.0/24".parse().unwrap())])
    );
    assert_eq!(
        maps.frontend(v6_lb).flags & frontend_flags::SOURCE_RANGES,
        0
    );
}

#[test]
fn each_familys_frontends_map_has_its_own_capacity() {
    // Room for two frontends per family: a dual-stack NodePort service (ClusterIP and
    // NodePort in each family) fits exactly.
    let mut maps = CheckedMaps::with_limits(2, 64, 64);
    let mut reconciler = Reconciler::adopt(&mut maps).unwrap();
    let node_port = |external_ips: &[&str]| {
        let mut svc = with_node_ports(
            with_families(
                service("default", "web", "10.96.0.10", &[("http", 80, "TCP")]),
                "RequireDualStack",
                &["10.96.0.10", "fd00:10:96::a"],
                &["IPv4", "IPv6"],
            ),
            "NodePort",
            &[30080],
            "Cluster",
        );
        svc.spec.as_mut().unwrap().external_ips =
            Some(external_ips.iter().map(|ip| (*ip).to_owned()).collect());
        build(&objects(
            vec![svc],
            vec![
                web_slice(vec![ep("10.244.0.1")]),
                web_slice6(vec![ep("fd00:10:244::1")]),
            ],
        ))
    };
    sync(&mut reconciler, &node_port(&[]), &mut maps);
    assert_eq!(maps.contents().frontends.len(), 4);
    // One more IPv6 frontend: the IPv6 map is full, the IPv4 ones keep serving.
    let more = node_port(&["2001:db8::10"]);
    let report = counted_sync(&mut reconciler, &more, &mut maps);
    assert_eq!(
        report.failed.iter().map(|(f, _)| *f).collect::<Vec<_>>(),
        vec![frontend("2001:db8::10", 80, Protocol::Tcp)],
        "{report:?}"
    );
    assert!(
        report.failed[0]
            .1
            .contains(lb_common::map_names::FRONTENDS_V6),
        "{report:?}"
    );
    assert_eq!(maps.contents().frontends.len(), 4);
}

// ---------------------------------------------------------------------------------------------
// Batched syncs

/// `n` ClusterIP services of two backends each (`svc-0`...), the first `node_ports` also with
/// a NodePort; `shift` moves every service to other backends.
fn many(n: u8, node_ports: u8, shift: u8) -> DesiredState {
    let mut entries = Vec::new();
    for i in 0..n {
        let name = format!("svc-{i}");
        let first = i.wrapping_mul(2).wrapping_add(shift);
        let backends = [backend(first, 80), backend(first.wrapping_add(1), 80)];
        let cluster_ip = frontend(&format!("10.96.1.{i}"), 80, Protocol::Tcp);
        entries.push((cluster_ip, desired_service(&name, &backends, None)));
        if i < node_ports {
            let (mut service, set) = desired_service(&name, &backends, None);
            service.kind = FrontendKind::NodePort;
            let port = frontend("0.0.0.0", 30_000 + u16::from(i), Protocol::Tcp);
            entries.push((port, (service, set)));
        }
    }
    state(entries)
}

/// The position of the first and last operation `which` picks (`None` for none).
fn span(ops: &[Op], which: impl Fn(&Op) -> bool) -> Option<(usize, usize)> {
    let first = ops.iter().position(&which)?;
    let last = ops.iter().rposition(&which)?;
    Some((first, last))
}

#[test]
fn a_batched_sync_writes_each_map_once_in_the_safe_order_and_ends_as_one_written_entry_by_entry() {
    // (Every single write is checked by CheckedMaps: no frontend ever names a half-written set.)
    let mut maps = CheckedMaps::default();
    let mut reconciler = Reconciler::default();
    reconciler.batch_writes_from(0);
    let mut one_by_one = CheckedMaps::default();
    let mut unbatched = Reconciler::default();
    unbatched.batch_writes_from(usize::MAX);
    for (step, desired) in [many(12, 2, 0), many(12, 2, 100), many(6, 1, 100)]
        .iter()
        .enumerate()
    {
        maps.ops.clear();
        let report = sync(&mut reconciler, desired, &mut maps);
        let sequential = sync(&mut unbatched, desired, &mut one_by_one);
        assert_eq!(report, sequential, "step {step}: the same report");
        assert_eq!(
            maps.contents(),
            one_by_one.contents(),
            "step {step}: the same ids"
        );
        let ops = &maps.ops;
        let phase = |which: fn(&Op) -> bool| span(ops, which);
        let phases = [
            phase(|op| matches!(op, Op::RemoveFrontend(_))),
            phase(|op| matches!(op, Op::PutBackend(_))),
            phase(|op| matches!(op, Op::PutSlot(..))),
            phase(|op| matches!(op, Op::PutMaglev(_))),
            phase(|op| matches!(op, Op::PutFrontend(..))),
            phase(|op| matches!(op, Op::RemoveMaglev(_))),
            phase(|op| matches!(op, Op::RemoveSlot(_))),
            phase(|op| matches!(op, Op::RemoveBackend(_))),
        ];
        let present: Vec<(usize, usize)> = phases.iter().flatten().copied().collect();
        assert!(
            present.windows(2).all(|w| w[0].1 < w[1].0),
            "step {step}: phases overlap: {phases:?}"
        );
        match step {
            0 => assert_eq!(present.len(), 4, "{phases:?}"),
            // Every set switches: new backends, slots and tables, then every frontend, then
            // the old ones go.
            1 => assert_eq!(present.len(), 6, "{phases:?}"),
            // 6 services go, and a NodePort (its table).
            _ => assert_eq!(present.len(), 4, "{phases:?}"),
        }
    }
}

#[test]
fn a_backend_id_given_back_and_handed_out_again_in_one_sync_is_written_after_its_removal() {
    given_back_and_handed_out_again(usize::MAX);
    given_back_and_handed_out_again(0);
}

fn given_back_and_handed_out_again(batch_from: usize) {
    // Three backend ids: web takes two. api gets the third for its first backend, finds none
    // for its second and gives the third back; zzz, written next, gets it.
    let mut maps = CheckedMaps::default();
    let mut reconciler = Reconciler::adopt_with_ids(
        &mut maps,
        super::ids::IdSpace::default(),
        super::ids::IdSpace::new(1, 3),
    )
    .unwrap();
    reconciler.batch_writes_from(batch_from);
    let web_only = state(vec![(
        web(),
        desired_service("web", &[backend(1, 80), backend(2, 80)], None),
    )]);
    sync(&mut reconciler, &web_only, &mut maps);
    let mut more = web_only.clone();
    insert(
        &mut more,
        api(),
        desired_service("api", &[backend(8, 443), backend(9, 443)], None),
    );
    let zzz = frontend("10.96.0.99", 80, Protocol::Tcp);
    insert(
        &mut more,
        zzz,
        desired_service("zzz", &[backend(7, 80)], None),
    );
    let report = counted_sync(&mut reconciler, &more, &mut maps);
    assert_eq!(
        report.failed.iter().map(|(f, _)| *f).collect::<Vec<_>>(),
        vec![api()],
        "{report:?}"
    );
    let mut served = more.clone();
    served.frontends.remove(&api());
    assert_exact(&maps, &served);
    assert_eq!(maps.backend_ids()[&backend(7, 80)], 3);
}

#[test]
fn a_large_change_batches_and_a_small_one_writes_entry_by_entry() {
    // What BATCH_FROM means: counted through the maps' batch calls.
    #[derive(Default)]
    struct Counting {
        maps: MemoryMaps,
        batches: usize,
        singles: usize,
    }
    impl ServiceMaps for Counting {
        fn put_frontend(&mut self, f: Frontend, v: FrontendValue) -> Result<(), MapError> {
            self.singles += 1;
            self.maps.put_frontend(f, v)
        }
        fn remove_frontend(&mut self, f: &Frontend) -> Result<(), MapError> {
            self.singles += 1;
            self.maps.remove_frontend(f)
        }
        fn put_slot(&mut self, k: SlotKey, v: SlotValue) -> Result<(), MapError> {
            self.singles += 1;
            self.maps.put_slot(k, v)
        }
        fn remove_slot(&mut self, k: &SlotKey) -> Result<(), MapError> {
            self.singles += 1;
            self.maps.remove_slot(k)
        }
        fn put_backend(&mut self, id: u32, b: BackendEntry) -> Result<(), MapError> {
            self.singles += 1;
            self.maps.put_backend(id, b)
        }
        fn remove_backend(&mut self, id: u32, family: Family) -> Result<(), MapError> {
            self.singles += 1;
            self.maps.remove_backend(id, family)
        }
        fn put_maglev(&mut self, id: u32, table: &MaglevTable) -> Result<(), MapError> {
            self.maps.put_maglev(id, table)
        }
        fn remove_maglev(&mut self, id: u32) -> Result<(), MapError> {
            self.maps.remove_maglev(id)
        }
        fn put_source_range(&mut self, id: u32, range: Cidr) -> Result<(), MapError> {
            self.maps.put_source_range(id, range)
        }
        fn remove_source_range(&mut self, id: u32, range: Cidr) -> Result<(), MapError> {
            self.maps.remove_source_range(id, range)
        }
        fn dump(&self) -> Result<MapContents, MapError> {
            self.maps.dump()
        }
        fn put_slots(&mut self, entries: &[(SlotKey, SlotValue)]) -> Result<(), super::BatchError> {
            self.batches += 1;
            for (k, v) in entries {
                self.maps.put_slot(*k, *v).unwrap();
            }
            Ok(())
        }
    }
    let n = u8::try_from(super::BATCH_FROM).unwrap();
    let mut maps = Counting::default();
    let mut reconciler = Reconciler::default();
    let desired = many(n, 0, 0);
    let report = reconciler.sync(&desired, &mut maps);
    assert!(report.failed.is_empty(), "{report:?}");
    assert_eq!(maps.batches, 1, "one batch of slots");
    assert_eq!(
        maps.singles,
        2 * usize::from(n) + usize::from(n),
        "backends and frontends"
    );
    // One backend of one service changes: two slots, one frontend, one backend each alone.
    let mut changed = desired.clone();
    let set = changed.sets.values_mut().next().unwrap();
    set.backends.pop_last();
    set.backends.insert(backend(250, 80));
    let (before_batches, before_singles) = (maps.batches, maps.singles);
    let frontends: BTreeSet<Frontend> = [*changed.frontends.keys().next().unwrap()].into();
    let report = reconciler.sync_changes(&changed, &frontends, &BTreeSet::new(), &mut maps);
    assert!(report.failed.is_empty(), "{report:?}");
    assert_eq!(maps.batches, before_batches, "no batch");
    assert_eq!(
        maps.singles - before_singles,
        report.map_writes,
        "{report:?}"
    );
}

proptest! {
    /// One set's members changing from `from` to `to` counts its keepers as releasing `from`
    /// and keeping `to` does, whatever else keeps the same backends.
    #[test]
    fn rekeep_counts_as_release_then_keep(
        other in proptest::collection::btree_map(0u8..12, (any::<bool>(), any::<bool>(), any::<bool>()), 0..8),
        from in proptest::collection::btree_map(0u8..12, (any::<bool>(), any::<bool>(), any::<bool>()), 0..8),
        to in proptest::collection::btree_map(0u8..12, (any::<bool>(), any::<bool>(), any::<bool>()), 0..8),
    ) {
        type Members = BTreeMap<Backend, super::backends::Opinion>;
        let members = |m: &BTreeMap<u8, (bool, bool, bool)>| -> Members {
            m.iter()
                .map(|(b, (terminating, local, udp))| {
                    (
                        backend(*b, 8080),
                        super::backends::Opinion {
                            terminating: *terminating,
                            local: *local,
                            udp: *udp,
                        },
                    )
                })
                .collect()
        };
        let (other, from, to) = (members(&other), members(&from), members(&to));
        let mut walked = Reconciler::default();
        walked.keep(&other);
        walked.keep(&from);
        let mut counted = Reconciler::default();
        counted.keep(&other);
        counted.keep(&from);
        walked.rekeep(&from, &to);
        counted.release(&from);
        counted.keep(&to);
        prop_assert_eq!(walked.backends.keepers(), counted.backends.keepers());
        // A backend no set keeps any more is among those the sync's cleanup looks at.
        for backend in from.keys().filter(|b| !walked.backends.is_kept(b)) {
            prop_assert!(walked.maybe_unused.contains_key(backend), "{backend}");
        }
    }
}

/// A removed backend says whether a set serving UDP frontends kept it (its connected UDP
/// sockets are destroyed; a TCP-only backend's are not looked for without `--terminate-tcp`),
/// also when its UDP set let it go in an earlier sync than its TCP one (a DNS pod's
/// `53/UDP` and `53/TCP`).
#[test]
fn removed_backends_say_whether_a_udp_set_kept_them() {
    let mut reconciler = Reconciler::default();
    let mut maps = CheckedMaps::default();
    let (pod, tcp_only) = (backend(1, 53), backend(2, 8080));
    let dns_tcp = frontend("10.96.0.10", 53, Protocol::Tcp);
    let all = state(vec![
        (dns(), desired_service("dns", &[pod], None)),
        (dns_tcp, desired_service("dns-tcp", &[pod], None)),
        (web(), desired_service("web", &[tcp_only], None)),
    ]);
    sync(&mut reconciler, &all, &mut maps);
    // The UDP set lets the pod go first: the TCP one still keeps it.
    let tcp_left = state(vec![
        (dns_tcp, desired_service("dns-tcp", &[pod], None)),
        (web(), desired_service("web", &[tcp_only], None)),
    ]);
    let report = sync(&mut reconciler, &tcp_left, &mut maps);
    assert!(report.backends_removed.is_empty(), "{report:?}");
    let report = sync(&mut reconciler, &DesiredState::default(), &mut maps);
    let mut removed = report.backends_removed.clone();
    removed.sort_by_key(|r| r.backend);
    assert_eq!(
        removed,
        [
            super::RemovedBackend {
                backend: pod,
                udp: true
            },
            super::RemovedBackend {
                backend: tcp_only,
                udp: false
            },
        ]
    );
}
