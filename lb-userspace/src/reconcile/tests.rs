//! The reconciler against in-memory maps: exact map contents after each kind of change, the
//! order of writes (checked at every single write: no connect may ever see a half-written
//! backend set), failures that leave the previous state serving, adoption of maps left by an
//! earlier agent, and a model-based randomized test from Kubernetes objects to map contents.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use lb_common::{Backend4, Service4Key, Service4Value, Slot4Key, Slot4Value, service_flags};
use proptest::prelude::*;

use super::{
    MapContents, MapError, Reconciler, ServiceMaps, SyncReport, frontend_of, memory::MemoryMaps,
    service_key,
};
use crate::model::{
    self, Backend, DesiredService, DesiredState, Frontend, ObjectKey, Objects, Protocol,
    ServicePortName,
    tests::{EndpointExt as _, ep, identity, node, service, slice},
};

// ---------------------------------------------------------------------------------------------
// Maps that check every write

/// One successful map operation.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    PutService(Service4Key, Service4Value),
    RemoveService(Service4Key),
    PutSlot(Slot4Key, u32),
    RemoveSlot(Slot4Key),
    PutBackend(u32),
    RemoveBackend(u32),
}

/// [`MemoryMaps`] that record every operation and, after each write, assert that every service
/// entry's live generation is complete: slots `0..count` exist and name existing backends.
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
        if let Err(problem) = live_generations_complete(&self.maps.contents) {
            panic!(
                "after {:?}: {problem}\nlast operations: {:#?}",
                self.ops.last(),
                &self.ops[self.ops.len().saturating_sub(12)..]
            );
        }
        result
    }
}

impl ServiceMaps for CheckedMaps {
    fn put_service(&mut self, key: Service4Key, value: Service4Value) -> Result<(), MapError> {
        let result = self.maps.put_service(key, value);
        self.record(result, Op::PutService(key, value))
    }

    fn remove_service(&mut self, key: &Service4Key) -> Result<(), MapError> {
        let result = self.maps.remove_service(key);
        self.record(result, Op::RemoveService(*key))
    }

    fn put_slot(&mut self, key: Slot4Key, value: Slot4Value) -> Result<(), MapError> {
        let result = self.maps.put_slot(key, value);
        self.record(result, Op::PutSlot(key, value.backend_id))
    }

    fn remove_slot(&mut self, key: &Slot4Key) -> Result<(), MapError> {
        let result = self.maps.remove_slot(key);
        self.record(result, Op::RemoveSlot(*key))
    }

    fn put_backend(&mut self, id: u32, backend: Backend4) -> Result<(), MapError> {
        let result = self.maps.put_backend(id, backend);
        self.record(result, Op::PutBackend(id))
    }

    fn remove_backend(&mut self, id: u32) -> Result<(), MapError> {
        let result = self.maps.remove_backend(id);
        self.record(result, Op::RemoveBackend(id))
    }

    fn dump(&self) -> Result<MapContents, MapError> {
        self.maps.dump()
    }
}

/// What the data path relies on at every instant: a service entry's live generation is whole.
fn live_generations_complete(contents: &MapContents) -> Result<(), String> {
    for (key, value) in &contents.services {
        for index in 0..value.count {
            let slot = Slot4Key {
                service_id: value.service_id,
                index,
                generation: value.generation,
                pad: 0,
            };
            let Some(target) = contents.slots.get(&slot) else {
                return Err(format!("{key:?} {value:?}: slot {slot:?} is missing"));
            };
            if !contents.backends.contains_key(&target.backend_id) {
                return Err(format!(
                    "{key:?} {value:?}: slot {slot:?} names missing backend {}",
                    target.backend_id
                ));
            }
        }
    }
    Ok(())
}

/// The maps hold exactly `desired` (up to the naming of ids): one entry per frontend with the
/// right count and flags, exactly the slots of each live generation, each backend id named by
/// exactly one slot, and nothing else.
fn assert_exact(contents: &MapContents, desired: &DesiredState) {
    if let Err(problem) = exact(contents, desired) {
        panic!("{problem}\ncontents: {contents:#?}\ndesired: {desired:#?}");
    }
}

fn exact(contents: &MapContents, desired: &DesiredState) -> Result<(), String> {
    let keys: BTreeSet<Service4Key> = desired.services.keys().map(service_key).collect();
    let present: BTreeSet<Service4Key> = contents.services.keys().copied().collect();
    if keys != present {
        return Err("service entries differ from the desired frontends".into());
    }
    let mut expected_slots = BTreeSet::new();
    let mut named = BTreeMap::<u32, usize>::new();
    let mut service_ids = BTreeSet::new();
    for (frontend, service) in &desired.services {
        let value = contents.services[&service_key(frontend)];
        if !service_ids.insert(value.service_id) {
            return Err(format!("service id {} used twice", value.service_id));
        }
        let (flags, timeout) = match service.affinity_timeout_secs {
            Some(secs) => (service_flags::AFFINITY, secs),
            None => (0, 0),
        };
        if value.count as usize != service.backends.len()
            || value.flags != flags
            || value.affinity_timeout_secs != timeout
            || value.generation > 1
            || value.pad != 0
        {
            return Err(format!("{frontend}: wrong service value {value:?}"));
        }
        let mut backends = BTreeSet::new();
        for index in 0..value.count {
            let slot = Slot4Key {
                service_id: value.service_id,
                index,
                generation: value.generation,
                pad: 0,
            };
            expected_slots.insert(slot);
            let id = contents
                .slots
                .get(&slot)
                .ok_or(format!("{frontend}: slot {slot:?} missing"))?
                .backend_id;
            *named.entry(id).or_default() += 1;
            let backend = contents
                .backends
                .get(&id)
                .ok_or(format!("{frontend}: backend {id} missing"))?;
            let named = super::backend_of(backend);
            let flags = if service.terminating.contains(&named) {
                lb_common::backend_flags::TERMINATING
            } else {
                0
            };
            if backend.flags != flags {
                return Err(format!(
                    "{frontend}: backend {named} has flags {}",
                    backend.flags
                ));
            }
            backends.insert(named);
        }
        if backends != service.backends {
            return Err(format!("{frontend}: backends {backends:?}"));
        }
    }
    let slots: BTreeSet<Slot4Key> = contents.slots.keys().copied().collect();
    if slots != expected_slots {
        return Err("slots other than the live generations are left".into());
    }
    if let Some((id, _)) = named.iter().find(|(_, uses)| **uses > 1) {
        return Err(format!("backend id {id} is named by more than one slot"));
    }
    let ids: BTreeSet<u32> = contents.backends.keys().copied().collect();
    if ids != named.keys().copied().collect() {
        return Err("backends no slot names are left".into());
    }
    Ok(())
}

/// What the maps should mean for `desired`, in the terms of [`MapContents::view`].
fn view_of(desired: &DesiredState) -> BTreeMap<Frontend, (BTreeSet<Backend>, Option<u32>)> {
    desired
        .services
        .iter()
        .map(|(f, s)| (*f, (s.backends.clone(), s.affinity_timeout_secs)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Desired states written by hand

fn frontend(ip: &str, port: u16, protocol: Protocol) -> Frontend {
    Frontend {
        ip: ip.parse().unwrap(),
        port,
        protocol,
    }
}

fn backend(last: u8, port: u16) -> Backend {
    Backend {
        ip: [10, 244, 0, last].into(),
        port,
    }
}

fn desired_service(name: &str, backends: &[Backend], affinity: Option<u32>) -> DesiredService {
    DesiredService {
        name: ServicePortName {
            namespace: "default".into(),
            name: name.into(),
            port: "http".into(),
        },
        backends: backends.iter().copied().collect(),
        affinity_timeout_secs: affinity,
        terminating: BTreeSet::new(),
    }
}

fn state(services: Vec<(Frontend, DesiredService)>) -> DesiredState {
    DesiredState {
        services: services.into_iter().collect(),
    }
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
    assert_exact(maps.contents(), desired);
    report
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
    // 3 backends (the pod behind two services has an id for each), 3 slots, 3 services.
    assert_eq!(report.map_writes, 9);
    assert_eq!(maps.ops.len(), 9);
    assert_eq!(maps.contents().backends.len(), 3);
    assert_eq!(maps.contents().services[&service_key(&api())].count, 0);
    let dns_value = maps.contents().services[&service_key(&dns())];
    assert_eq!(dns_value.flags, service_flags::AFFINITY);
    assert_eq!(dns_value.affinity_timeout_secs, 10_800);
    assert_eq!(maps.contents().view(), view_of(&desired));
    assert_eq!(reconciler.len(), 3);
    // Keys and values are in network byte order, as the kernel hands them to the programs.
    let key = service_key(&web());
    assert_eq!(key.addr.to_ne_bytes(), [10, 96, 0, 10]);
    assert_eq!(key.port.to_ne_bytes(), 80u16.to_be_bytes());
    assert_eq!(key.proto, lb_common::IPPROTO_TCP);
    assert_eq!(frontend_of(&key), Some(web()));
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
    let before = maps.contents().services[&service_key(&web())];
    let id_of = |contents: &MapContents, wanted: Backend| {
        contents
            .backends
            .iter()
            .find(|(_, b)| super::backend_of(b) == wanted)
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
    let after = maps.contents().services[&service_key(&web())];
    assert_eq!(after.generation, 1 - before.generation);
    assert_eq!(after.service_id, before.service_id);
    let id_c = id_of(maps.contents(), c);
    // The kept backend keeps its id (its affinity entries stay valid); only c is new.
    assert_eq!(id_of(maps.contents(), b), id_b);
    let slot = |generation, index| Slot4Key {
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
            Op::PutService(service_key(&web()), after),
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
    let last = maps.contents().services[&service_key(&web())];
    assert_eq!(last.generation, old);
    assert_eq!(
        maps.ops,
        vec![
            Op::PutSlot(slot(old, 0), id_c),
            Op::PutService(service_key(&web()), last),
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
            .position(|op| matches!(op, Op::PutService(..)))
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
    assert_eq!(maps.ops[0], Op::RemoveService(service_key(&web())));
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
    let first = maps.contents().services[&service_key(&web())];
    for affinity in [Some(10_800), Some(125), None, Some(1)] {
        maps.ops.clear();
        let report = sync(
            &mut reconciler,
            &state(vec![(web(), desired_service("web", &backends, affinity))]),
            &mut maps,
        );
        assert_eq!(report.map_writes, 1, "{affinity:?}");
        assert_eq!(report.updated, 1);
        let value = maps.contents().services[&service_key(&web())];
        assert_eq!(maps.ops, vec![Op::PutService(service_key(&web()), value)]);
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
    // Room for 5 backends: web has 2, dns 2. Growing web to 4 needs 2 more while the old
    // generation still lives; it cannot fit. A new service with one backend can.
    let mut maps = CheckedMaps::with_limits(16, 64, 5);
    let mut reconciler = Reconciler::default();
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
    assert_exact(maps.contents(), &partial);

    // Once there is room, the next sync programs it.
    maps.maps.max_backends = 64;
    let report = counted_sync(&mut reconciler, &wanted, &mut maps);
    assert!(report.failed.is_empty(), "{report:?}");
    assert_eq!(report.updated, 1);
    assert_exact(maps.contents(), &wanted);
}

#[test]
fn service_that_does_not_fit_at_all_leaves_nothing_behind() {
    let mut maps = CheckedMaps::with_limits(16, 64, 3);
    let mut reconciler = Reconciler::default();
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
    wanted.services.insert(api(), big);
    let report = counted_sync(&mut reconciler, &wanted, &mut maps);
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert_eq!(report.failed[0].0, api());
    assert_exact(maps.contents(), &small);
    assert_eq!(reconciler.len(), 1);

    // A full services map and a full slots map fail the same way.
    let mut maps = CheckedMaps::with_limits(1, 64, 64);
    let mut reconciler = Reconciler::default();
    let report = counted_sync(&mut reconciler, &wanted, &mut maps);
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert_eq!(maps.contents().services.len(), 1);
    let programmed = report.failed[0].0;
    let survivor = if programmed == web() { api() } else { web() };
    let expected = state(vec![(survivor, wanted.services[&survivor].clone())]);
    assert_exact(maps.contents(), &expected);

    // Slots: both generations must fit during an update.
    let mut maps = CheckedMaps::with_limits(16, 3, 64);
    let mut reconciler = Reconciler::default();
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
    assert_exact(maps.contents(), &two);
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
    // highest id and slots of a service that no longer exists.
    let web_value = clean.services[&service_key(&web())];
    let top = *clean.backends.keys().max().unwrap();
    let leftovers = &mut maps.maps.contents;
    for (offset, last) in [(1, 7u8), (2, 8)] {
        leftovers.backends.insert(
            top + offset,
            Backend4 {
                addr: lb_common::addr_to_map(u32::from_be_bytes([10, 244, 0, last])),
                port: lb_common::port_to_map(8080),
                proto: 0,
                flags: 0,
            },
        );
    }
    for index in 0..2u16 {
        leftovers.slots.insert(
            Slot4Key {
                service_id: web_value.service_id,
                index,
                generation: 1 - web_value.generation,
                pad: 0,
            },
            Slot4Value {
                backend_id: top + 1 + index as u32,
            },
        );
    }
    leftovers.slots.insert(
        Slot4Key {
            service_id: 999,
            index: 0,
            generation: 0,
            pad: 0,
        },
        Slot4Value {
            backend_id: top + 2,
        },
    );
    leftovers.backends.insert(top + 3, Backend4::default());
    let view = maps.contents().view();

    maps.ops.clear();
    let mut adopted = Reconciler::adopt(&mut maps).expect("adopt");
    assert_eq!(maps.contents(), &clean);
    assert_eq!(
        maps.contents().view(),
        view,
        "adoption changed what is served"
    );
    assert!(
        maps.ops
            .iter()
            .all(|op| matches!(op, Op::RemoveSlot(_) | Op::RemoveBackend(_))),
        "{:?}",
        maps.ops
    );
    assert_eq!(adopted.len(), 3);

    maps.ops.clear();
    let report = counted_sync(&mut adopted, &moved, &mut maps);
    assert_eq!(report, SyncReport::default());
    assert!(maps.ops.is_empty());

    // New ids never reuse live ones: a new service and a changed one leave the others' entries
    // untouched.
    let mut next = moved.clone();
    next.services.insert(
        frontend("10.96.0.30", 80, Protocol::Tcp),
        desired_service("new", &[backend(20, 80), backend(21, 80)], None),
    );
    next.services.insert(
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
        .services
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
    let service = maps.contents.services.values().next().unwrap();
    assert!(service.service_id > 10, "{service:?}");
    assert!(
        maps.contents.backends.keys().all(|id| *id > 20),
        "{:?}",
        maps.contents
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
// Model-based: random object events → model::build → sync, compared with a fresh start

// Small pools, so that slices often match their service's ports and frontends collide.
const SERVICES: usize = 3;
const SLICES: usize = 4;
const PORT_NAMES: [&str; 2] = ["", "http"];
const SERVICE_PORTS: [i32; 3] = [53, 80, 443];
const TARGET_PORTS: [i32; 3] = [53, 8080, 8443];
const CLUSTER_IPS: [&str; 3] = ["10.96.0.10", "10.96.0.11", "10.96.0.12"];
const NODES: [&str; 3] = [crate::model::tests::NODE, "node-b", "node-c"];
const ZONES: [&str; 2] = ["zone-a", "zone-b"];

#[derive(Clone, Debug)]
enum Kind {
    ClusterIp,
    Headless,
    ExternalName,
}

#[derive(Clone, Debug)]
struct PortSpec {
    name: usize,
    number: usize,
    udp: bool,
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
        ip: usize,
        ports: Vec<PortSpec>,
        affinity: Option<i32>,
        local: bool,
        publish_not_ready: bool,
    },
    DeleteService(usize),
    PutSlice {
        which: usize,
        service: usize,
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

fn port_spec() -> impl Strategy<Value = PortSpec> {
    (0..PORT_NAMES.len(), 0..SERVICE_PORTS.len(), any::<bool>())
        .prop_map(|(name, number, udp)| PortSpec { name, number, udp })
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
        8 => Just(Kind::ClusterIp),
        1 => Just(Kind::Headless),
        1 => Just(Kind::ExternalName),
    ];
    let affinity = prop_oneof![
        3 => Just(None),
        1 => Just(Some(10_800)),
        1 => prop_oneof![Just(0), Just(60), Just(125), Just(90_000)].prop_map(Some),
    ];
    prop_oneof![
        3 => (
            0..SERVICES,
            kind,
            0..CLUSTER_IPS.len(),
            prop::collection::vec(port_spec(), 1..=3),
            affinity,
            prop::bool::weighted(0.2),
            prop::bool::weighted(0.1),
        )
            .prop_map(|(which, kind, ip, ports, affinity, local, publish_not_ready)| {
                Event::PutService {
                    which,
                    kind,
                    ip,
                    ports,
                    affinity,
                    local,
                    publish_not_ready,
                }
            }),
        1 => (0..SERVICES).prop_map(Event::DeleteService),
        6 => (
            0..SLICES,
            0..SERVICES,
            prop::bool::weighted(0.1),
            prop::collection::vec(
                (0..PORT_NAMES.len(), 0..TARGET_PORTS.len(), any::<bool>())
                    .prop_map(|(name, number, udp)| PortSpec { name, number, udp }),
                1..=4,
            ),
            prop::collection::vec(endpoint_spec(), 0..=6),
        )
            .prop_map(|(which, service, other_namespace, ports, endpoints)| {
                Event::PutSlice {
                    which,
                    service,
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
            ip,
            ports,
            affinity,
            local,
            publish_not_ready,
        } => {
            let ports: Vec<(&str, i32, &str)> = ports
                .iter()
                .map(|p| (PORT_NAMES[p.name], SERVICE_PORTS[p.number], protocol(p.udp)))
                .collect();
            let mut svc = service("default", &service_name(*which), CLUSTER_IPS[*ip], &ports);
            let spec = svc.spec.as_mut().unwrap();
            match kind {
                Kind::ClusterIp => {}
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
                .insert(ObjectKey::of(&svc.metadata), Arc::new(svc));
        }
        Event::DeleteService(which) => {
            objects
                .services
                .remove(&ObjectKey::new("default", service_name(*which)));
        }
        Event::PutSlice {
            which,
            service,
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
                    let mut endpoint = ep(&format!("10.244.0.{}", e.ip)).conditions(
                        e.ready,
                        e.serving,
                        e.terminating,
                    );
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
            let new = slice(
                namespace,
                &format!("slice-{which}"),
                &service_name(*service),
                &ports,
                endpoints,
            );
            objects
                .endpoint_slices
                .insert(ObjectKey::of(&new.metadata), Arc::new(new));
        }
        Event::DeleteSlice(which) => {
            objects
                .endpoint_slices
                .retain(|key, _| key.name != format!("slice-{which}"));
        }
        Event::PutNode(zone) => {
            let this = crate::model::tests::NODE;
            objects
                .nodes
                .insert(this.into(), Arc::new(node(this, zone.map(|z| ZONES[z]))));
        }
        Event::DeleteNode => {
            objects.nodes.remove(crate::model::tests::NODE);
        }
        Event::Restart => {}
    }
}

fn run_events(events: &[Event]) -> Result<(), TestCaseError> {
    let identity = identity();
    let mut objects = Objects::default();
    let mut maps = CheckedMaps::default();
    let mut reconciler = Reconciler::adopt(&mut maps).expect("adopt empty maps");
    // The agent's path: a model kept by difference, syncing only the frontends it reports.
    let mut model = model::Model::new(identity.clone());
    let mut incremental_maps = CheckedMaps::default();
    let mut incremental = Reconciler::adopt(&mut incremental_maps).expect("adopt empty maps");
    let mut first = true;
    for (step, event) in events.iter().enumerate() {
        apply(&mut objects, event);
        let changes = model.update(&objects);
        if first || matches!(event, Event::Restart) {
            incremental = Reconciler::adopt(&mut incremental_maps).expect("adopt");
            incremental.sync(model.desired(), &mut incremental_maps);
            first = false;
        } else {
            incremental.sync_frontends(model.desired(), &changes.frontends, &mut incremental_maps);
        }
        if let Event::Restart = event {
            maps.ops.clear();
            reconciler = Reconciler::adopt(&mut maps).expect("adopt");
            prop_assert!(
                maps.ops.is_empty(),
                "step {step}: adopt wrote {:?}",
                maps.ops
            );
        }
        let (desired, _) = model::build(&objects, &identity);
        let report = counted_sync(&mut reconciler, &desired, &mut maps);
        prop_assert!(report.failed.is_empty(), "step {step}: {report:?}");

        let mut fresh = CheckedMaps::default();
        let fresh_report = Reconciler::default().sync(&desired, &mut fresh);
        prop_assert!(fresh_report.failed.is_empty());
        let view = maps.contents().view();
        prop_assert_eq!(&view, &fresh.contents().view(), "step {}", step);
        prop_assert_eq!(&view, &view_of(&desired), "step {}", step);
        prop_assert_eq!(
            model.desired(),
            &desired,
            "step {}: the incremental model",
            step
        );
        prop_assert_eq!(
            &incremental_maps.contents().view(),
            &view,
            "step {}: maps synced by difference",
            step
        );
        if let Err(problem) = exact(incremental_maps.contents(), &desired) {
            return Err(TestCaseError::fail(format!(
                "step {step}: incremental: {problem}"
            )));
        }
        if let Err(problem) = exact(maps.contents(), &desired) {
            return Err(TestCaseError::fail(format!("step {step}: {problem}")));
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
        run_events(&events)?;
    }
}
