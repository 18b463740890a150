//! The agent's BPF service maps of both families (`LB4_*` and `LB6_*`, the shared slots and
//! Maglev tables) against the in-memory maps the reconciler's model tests run on: a
//! dual-stack state written to the kernel's maps reads back exactly as the in-memory maps
//! hold it, through the loaded object and through the pins (`lb-agent list`), and a
//! restarted reconciler adopts it without a write. Needs root (it loads the object), attaches
//! nothing.
mod common;

use std::{path::PathBuf, time::Duration};

use common::BpffsDir;
use lb_agent::{
    cidr::Cidr,
    dataplane::{BpfServiceMaps, Dataplane, Limits, bpffs::PinDir},
    model::{self, Backend, Family, ProxyIdentity},
    reconcile::{
        BackendEntry, BatchError, MapContents, MapError, Reconciler, ServiceMaps,
        memory::MemoryMaps,
    },
    source::manifests,
};
use lb_common::{FrontendValue, MaglevTable, SlotKey, SlotValue};

fn dual_stack_state() -> model::DesiredState {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/manifests/dual-stack");
    let snapshot = manifests::read_dir(&dir);
    assert!(snapshot.problems.is_empty(), "{:#?}", snapshot.problems);
    let identity = ProxyIdentity {
        node_name: "node-a".into(),
        service_proxy_name: None,
    };
    let (desired, diagnostics) = model::build(&snapshot.objects, &identity);
    assert!(diagnostics.is_empty(), "{diagnostics:#?}");
    desired
}

#[test]
fn both_families_maps_read_back_what_the_reconciler_wrote_and_adopt_without_a_write() {
    lb_testkit::require_root().expect("loads the eBPF object: run as root");
    let desired = dual_stack_state();
    let families = |f: Family| desired.frontends.keys().filter(|k| k.family() == f).count();
    // ClusterIP, NodePort (both scopes), LB IP (both scopes) per family, and dns6.
    assert_eq!((families(Family::V4), families(Family::V6)), (5, 6));

    let bpffs = BpffsDir::new();
    let pins = PinDir::prepare(bpffs.path()).expect("preparing bpffs");
    let mut dataplane = Dataplane::load(pins, Limits::default()).expect("loading the object");
    let mut maps = dataplane.service_maps().expect("service maps");
    let mut reconciler = Reconciler::adopt(&mut maps).expect("adopting empty maps");
    let report = reconciler.sync(&desired, &mut maps);
    assert!(report.failed.is_empty(), "{report:?}");

    let mut memory = MemoryMaps::default();
    let report = Reconciler::default().sync(&desired, &mut memory);
    assert!(report.failed.is_empty(), "{report:?}");
    let in_kernel = maps.dump().expect("reading the maps");
    assert_eq!(in_kernel, memory.contents);
    // Both families' entries are there: IPv6 backends, terminating state, IPv6 ranges.
    assert!(
        in_kernel
            .backends
            .values()
            .any(|b| b.backend.family() == Family::V6
                && b.state == lb_common::backend_states::TERMINATING),
        "{in_kernel:#?}"
    );
    assert!(
        in_kernel
            .source_ranges
            .iter()
            .any(|(_, range)| range.to_string() == "2001:db8:1::/48"),
        "{in_kernel:#?}"
    );

    // The names of both families, and the pins as `lb-agent list` opens them.
    let mut names = dataplane.names().expect("names map");
    let wanted = desired
        .frontends
        .iter()
        .map(|(frontend, service)| (*frontend, service.name.to_string()))
        .collect();
    names.sync_all(&wanted).expect("writing the names");
    assert_eq!(names.all(), wanted);
    let pinned = BpfServiceMaps::open_pinned(&bpffs.path().join("maps")).expect("the pins");
    assert_eq!(pinned.dump().expect("reading the pins"), memory.contents);
    let rows = lb_agent::list::rows(bpffs.path()).expect("list");
    assert!(
        rows.iter()
            .any(|r| r.frontend == "[fd00:10:96::80:1]:80" && r.backends.len() == 2),
        "{}",
        lb_agent::list::table(&rows)
    );
    // Every live slot names a backend of its frontend's family. (The draining IPv6 backend
    // is kept for its flows outside the slots; `describe` lists such a backend as named by
    // no live slot, for either family.)
    let description = lb_agent::describe::describe(bpffs.path()).expect("describe");
    assert!(
        description
            .leaks
            .iter()
            .all(|leak| leak == "backend [fd00:10:244:1::11]:8080 is named by no live slot"),
        "{description:#?}"
    );
    assert_eq!(
        description.frontends["[<node>]:30080/TCP"].backends,
        ["[fd00:10:244::10]:8080 (local)"],
        "{description:#?}"
    );

    // A restarted reconciler adopts both families' entries and writes nothing.
    let mut restarted = Reconciler::adopt(&mut maps).expect("adopting");
    let again = restarted.sync(&desired, &mut maps);
    assert!(again.failed.is_empty(), "{again:?}");
    assert_eq!(again.map_writes, 0, "{again:?}");
    // And everything goes with the services, in both families.
    let gone = restarted.sync(&model::DesiredState::default(), &mut maps);
    assert!(gone.failed.is_empty(), "{gone:?}");
    assert_eq!(maps.dump().unwrap(), Default::default());
}

/// `LB_SYNC_BENCH_SERVICES` ClusterIP services (100,000 unless set) of 10 endpoints each, the
/// first `LB_SYNC_BENCH_NODEPORTS` (none unless set) also with a NodePort (a Maglev table).
fn many_services() -> model::DesiredState {
    let count = |name, default| {
        std::env::var(name)
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(default)
    };
    many_services_of(
        count("LB_SYNC_BENCH_SERVICES", 100_000),
        count("LB_SYNC_BENCH_NODEPORTS", 0),
    )
}

/// `services` ClusterIP services of 10 endpoints each (every set its own), the first
/// `node_ports` also with a NodePort.
fn many_services_of(services: u32, node_ports: u32) -> model::DesiredState {
    use lb_agent::model::{
        BackendSet, DesiredService, Endpoints, Frontend, FrontendKind, Protocol, ServicePortName,
    };
    let mut desired = model::DesiredState::default();
    for n in 0..services {
        let service = |kind| DesiredService {
            name: ServicePortName {
                namespace: "bench".into(),
                name: format!("svc-{n}").into(),
                port: "http".into(),
            },
            family: Family::V4,
            kind,
            endpoints: Endpoints::All,
            affinity_timeout_secs: None,
            local_only: false,
            two_scopes: false,
            source_ranges: None,
        };
        let backends = (0..10u32)
            .map(|e| Backend {
                ip: std::net::Ipv4Addr::from(0x0a80_0000 + n * 10 + e).into(),
                port: 8080,
            })
            .collect();
        let cluster_ip = std::net::Ipv4Addr::from(0x0a60_0000 + n);
        let set = service(FrontendKind::ClusterIP).set();
        desired.sets.insert(
            set,
            BackendSet {
                backends,
                ..BackendSet::default()
            },
        );
        desired.frontends.insert(
            Frontend::new(cluster_ip.into(), 80, Protocol::Tcp),
            service(FrontendKind::ClusterIP),
        );
        if n < node_ports {
            let node_port = Frontend::new(
                std::net::Ipv4Addr::UNSPECIFIED.into(),
                (30_000 + n) as u16,
                Protocol::Tcp,
            );
            desired
                .frontends
                .insert(node_port, service(FrontendKind::NodePort));
        }
    }
    desired
}

/// How long a full sync of many services takes into the kernel's maps: from nothing, again
/// (nothing changed), and back to nothing; one entry at a time (as before batches), in
/// batches, and batched on a kernel without batch operations. A measurement, not a check of
/// its numbers: `cargo test -p lb-userspace --test service_maps -- --ignored --nocapture`
/// (optimized: `--config 'profile.dev.package.lb-userspace.opt-level=3'`).
#[test]
#[ignore = "a benchmark: a minute or more"]
fn full_sync_of_many_services_timed() {
    lb_testkit::require_root().expect("loads the eBPF object: run as root");
    let desired = many_services();
    let backends: usize = desired.sets.values().map(|s| s.backends.len()).sum();
    let services = desired.sets.len();
    let modes = [
        ("one entry at a time", usize::MAX, true),
        ("batched", 0, true),
        ("batched, without batch operations", 0, false),
    ];
    for (mode, batch_from, batch_ops) in modes {
        let limits = Limits {
            max_services: (desired.frontends.len() as u32 + 1024)
                .next_power_of_two()
                .max(65_536),
            max_backends: (backends as u32 + 1024).next_power_of_two().max(262_144),
            ..Limits::default()
        };
        let (_bpffs, mut dataplane) = loaded(limits);
        let mut maps = dataplane.service_maps().expect("service maps");
        if !batch_ops {
            maps.without_batches();
        }
        let mut maps = Timed {
            maps,
            took: Duration::ZERO,
            calls: 0,
        };
        let mut reconciler = Reconciler::adopt(&mut maps).expect("adopting empty maps");
        reconciler.batch_writes_from(batch_from);
        let mut timed = |what: &str, desired: &model::DesiredState| {
            maps.took = Duration::ZERO;
            maps.calls = 0;
            let started = (std::time::Instant::now(), thread_cpu_time());
            let report = reconciler.sync(desired, &mut maps);
            let took = (started.0.elapsed(), thread_cpu_time() - started.1);
            assert!(
                report.failed.is_empty(),
                "{what}: {:?}",
                &report.failed[..1]
            );
            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
            eprintln!(
                "{mode}: sync {what}: {services} services, {backends} backends: {:.0} ms ({:.0} \
                 ms CPU), of which map writes {:.0} ms CPU ({} entries, {} calls of the maps)",
                ms(took.0),
                ms(took.1),
                ms(maps.took),
                report.map_writes,
                maps.calls,
            );
            maps.maps.dump().expect("reading the maps")
        };
        let contents = timed("from nothing", &desired);
        assert_eq!(contents.frontends.len(), desired.frontends.len());
        assert_eq!(contents.backends.len(), backends);
        timed("again, nothing changed", &desired);
        let empty = timed("to nothing", &model::DesiredState::default());
        assert_eq!(empty, Default::default());
    }
}

/// Service maps timing every write (the CPU time of this thread: user and kernel, whatever
/// else the machine runs).
struct Timed<M> {
    maps: M,
    took: Duration,
    calls: usize,
}

impl<M> Timed<M> {
    fn time<T>(&mut self, write: impl FnOnce(&mut M) -> T) -> T {
        let started = thread_cpu_time();
        let result = write(&mut self.maps);
        self.took += thread_cpu_time() - started;
        self.calls += 1;
        result
    }
}

/// The CPU time this thread has used.
fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write; CLOCK_THREAD_CPUTIME_ID always exists on Linux.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    assert_eq!(result, 0, "clock_gettime");
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

impl<M: ServiceMaps> ServiceMaps for Timed<M> {
    fn put_frontend(&mut self, f: model::Frontend, v: FrontendValue) -> Result<(), MapError> {
        self.time(|m| m.put_frontend(f, v))
    }
    fn remove_frontend(&mut self, f: &model::Frontend) -> Result<(), MapError> {
        self.time(|m| m.remove_frontend(f))
    }
    fn put_slot(&mut self, k: SlotKey, v: SlotValue) -> Result<(), MapError> {
        self.time(|m| m.put_slot(k, v))
    }
    fn remove_slot(&mut self, k: &SlotKey) -> Result<(), MapError> {
        self.time(|m| m.remove_slot(k))
    }
    fn put_backend(&mut self, id: u32, b: BackendEntry) -> Result<(), MapError> {
        self.time(|m| m.put_backend(id, b))
    }
    fn remove_backend(&mut self, id: u32, family: Family) -> Result<(), MapError> {
        self.time(|m| m.remove_backend(id, family))
    }
    fn put_maglev(&mut self, id: u32, table: &MaglevTable) -> Result<(), MapError> {
        self.time(|m| m.put_maglev(id, table))
    }
    fn put_maglev_of(&mut self, id: u32, picks: &[Backend], ids: &[u32]) -> Result<(), MapError> {
        self.time(|m| m.put_maglev_of(id, picks, ids))
    }
    fn remove_maglev(&mut self, id: u32) -> Result<(), MapError> {
        self.time(|m| m.remove_maglev(id))
    }
    fn put_source_range(&mut self, id: u32, range: Cidr) -> Result<(), MapError> {
        self.time(|m| m.put_source_range(id, range))
    }
    fn remove_source_range(&mut self, id: u32, range: Cidr) -> Result<(), MapError> {
        self.time(|m| m.remove_source_range(id, range))
    }
    fn dump(&self) -> Result<MapContents, MapError> {
        self.maps.dump()
    }
    fn put_frontends(&mut self, e: &[(model::Frontend, FrontendValue)]) -> Result<(), BatchError> {
        self.time(|m| m.put_frontends(e))
    }
    fn remove_frontends(&mut self, f: &[model::Frontend]) -> Result<(), BatchError> {
        self.time(|m| m.remove_frontends(f))
    }
    fn put_slots(&mut self, e: &[(SlotKey, SlotValue)]) -> Result<(), BatchError> {
        self.time(|m| m.put_slots(e))
    }
    fn remove_slots(&mut self, k: &[SlotKey]) -> Result<(), BatchError> {
        self.time(|m| m.remove_slots(k))
    }
    fn put_backends(&mut self, e: &[(u32, BackendEntry)]) -> Result<(), BatchError> {
        self.time(|m| m.put_backends(e))
    }
    fn remove_backends(&mut self, ids: &[(u32, Family)]) -> Result<(), BatchError> {
        self.time(|m| m.remove_backends(ids))
    }
}

fn loaded(limits: Limits) -> (BpffsDir, Dataplane) {
    let bpffs = BpffsDir::new();
    let pins = PinDir::prepare(bpffs.path()).expect("preparing bpffs");
    let dataplane = Dataplane::load(pins, limits).expect("loading the object");
    (bpffs, dataplane)
}

#[test]
fn batches_write_in_order_and_say_which_entry_failed_with_or_without_batch_operations() {
    use lb_agent::dataplane::batch::BatchOps;
    lb_testkit::require_root().expect("loads the eBPF object: run as root");
    for batches in [true, false] {
        let limits = Limits {
            max_backends: 8,
            ..Limits::default()
        };
        let (_bpffs, mut dataplane) = loaded(limits);
        let mut maps = dataplane.service_maps().expect("service maps");
        if !batches {
            maps.without_batches();
        }
        let entry = |n: u8| BackendEntry {
            backend: Backend {
                ip: [10, 244, 9, n].into(),
                port: 80,
            },
            state: lb_common::backend_states::ACTIVE,
            flags: 0,
        };
        let entries: Vec<(u32, BackendEntry)> =
            (1..=10).map(|n| (u32::from(n), entry(n))).collect();
        // Room for 8: the ninth fails, the eight before it are written, the tenth not tried.
        let failed = maps.put_backends(&entries).expect_err("a full map");
        assert_eq!((failed.index, failed.count), (8, 10), "{failed}");
        assert!(
            failed.error.to_string().contains("os error 7"),
            "E2BIG: {failed}"
        );
        let written: Vec<u32> = maps.dump().unwrap().backends.into_keys().collect();
        assert_eq!(written, (1..=8).collect::<Vec<_>>());
        let expected = if batches {
            BatchOps::Available
        } else {
            BatchOps::Missing
        };
        assert_eq!(maps.batch_ops(), expected);
        // Removals: the third is not there; the two before it go, the rest stay.
        let family = Family::V4;
        let ids = [(1, family), (2, family), (9, family), (3, family)];
        let failed = maps.remove_backends(&ids).expect_err("id 9 is not there");
        assert_eq!(failed.index, 2, "{failed}");
        let left: Vec<u32> = maps.dump().unwrap().backends.into_keys().collect();
        assert_eq!(left, (3..=8).collect::<Vec<_>>());
        // Overwriting entries of a full map works, in one batch.
        let again: Vec<(u32, BackendEntry)> =
            (3..=8).map(|n| (u32::from(n), entry(n + 100))).collect();
        maps.put_backends(&again).expect("overwriting");
        let contents = maps.dump().unwrap();
        assert_eq!(contents.backends[&8].backend.ip.to_string(), "10.244.9.108");
    }
}

#[test]
fn a_full_frontends_map_in_a_batched_sync_refuses_the_frontends_that_do_not_fit_only() {
    lb_testkit::require_root().expect("loads the eBPF object: run as root");
    let desired = many_services_of(6, 0);
    // What a sync one entry at a time leaves in maps of the same size.
    let mut memory = MemoryMaps {
        max_services: 4,
        ..MemoryMaps::default()
    };
    let mut unbatched = Reconciler::default();
    unbatched.batch_writes_from(usize::MAX);
    let expected = unbatched.sync(&desired, &mut memory);
    let backends_of = |contents: &lb_agent::reconcile::MapContents| {
        contents
            .view()
            .into_iter()
            .map(|(frontend, view)| (frontend, view.backends))
            .collect::<Vec<_>>()
    };
    for batches in [true, false] {
        let limits = Limits {
            max_services: 4,
            ..Limits::default()
        };
        let (_bpffs, mut dataplane) = loaded(limits);
        let mut maps = dataplane.service_maps().expect("service maps");
        if !batches {
            maps.without_batches();
        }
        let mut reconciler = Reconciler::adopt(&mut maps).expect("adopting empty maps");
        reconciler.batch_writes_from(0);
        let report = reconciler.sync(&desired, &mut maps);
        let refused: Vec<_> = report.failed.iter().map(|(f, _)| *f).collect();
        let refused_one_by_one: Vec<_> = expected.failed.iter().map(|(f, _)| *f).collect();
        assert_eq!(refused, refused_one_by_one, "{report:?}");
        assert_eq!(refused.len(), 2, "{report:?}");
        assert!(
            report.failed.iter().all(|(_, e)| e.contains("os error 7")),
            "{report:?}"
        );
        let contents = maps.dump().unwrap();
        assert_eq!(backends_of(&contents), backends_of(&memory.contents));
        // Nothing of the refused ones is left behind.
        assert_eq!(contents.backends.len(), 40, "{contents:#?}");
        assert_eq!(contents.slots.len(), 40, "{contents:#?}");
        // The reconciler knows what is programmed: the same sync again only retries the two.
        let again = reconciler.sync(&desired, &mut maps);
        assert_eq!(again.failed.len(), 2, "{again:?}");
        assert_eq!(maps.dump().unwrap(), contents);
    }
}
