//! The agent's BPF service maps of both families (`LB4_*` and `LB6_*`, the shared slots and
//! Maglev tables) against the in-memory maps the reconciler's model tests run on: a
//! dual-stack state written to the kernel's maps reads back exactly as the in-memory maps
//! hold it, through the loaded object and through the pins (`lb-agent list`), and a
//! restarted reconciler adopts it without a write. Needs root (it loads the object), attaches
//! nothing.
mod common;

use std::path::PathBuf;

use common::BpffsDir;
use lb_agent::{
    dataplane::{BpfServiceMaps, Dataplane, Limits, bpffs::PinDir},
    model::{self, Family, ProxyIdentity},
    reconcile::{Reconciler, ServiceMaps as _, memory::MemoryMaps},
    source::manifests,
};

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
    use lb_agent::model::{
        Backend, BackendSet, DesiredService, Endpoints, Frontend, FrontendKind, Protocol,
        ServicePortName,
    };
    let count = |name, default| {
        std::env::var(name)
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(default)
    };
    let services: u32 = count("LB_SYNC_BENCH_SERVICES", 100_000);
    let node_ports: u32 = count("LB_SYNC_BENCH_NODEPORTS", 0);
    let mut desired = model::DesiredState::default();
    for n in 0..services {
        let service = |kind| DesiredService {
            name: ServicePortName {
                namespace: "bench".into(),
                name: format!("svc-{n}"),
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
/// (nothing changed), and back to nothing. A measurement, not a check of its numbers:
/// `cargo test -p lb-userspace --release --test service_maps -- --ignored --nocapture`.
#[test]
#[ignore = "a benchmark: minutes in a debug build"]
fn full_sync_of_many_services_timed() {
    lb_testkit::require_root().expect("loads the eBPF object: run as root");
    let desired = many_services();
    let backends: usize = desired.sets.values().map(|s| s.backends.len()).sum();
    let services = desired.sets.len();
    let bpffs = BpffsDir::new();
    let pins = PinDir::prepare(bpffs.path()).expect("preparing bpffs");
    let limits = Limits {
        max_services: (desired.frontends.len() as u32 + 1024)
            .next_power_of_two()
            .max(65_536),
        max_backends: (backends as u32 + 1024).next_power_of_two().max(262_144),
        ..Limits::default()
    };
    let mut dataplane = Dataplane::load(pins, limits).expect("loading the object");
    let mut maps = dataplane.service_maps().expect("service maps");
    let mut reconciler = Reconciler::adopt(&mut maps).expect("adopting empty maps");
    let timed = |what: &str, run: &mut dyn FnMut() -> lb_agent::reconcile::SyncReport| {
        let started = std::time::Instant::now();
        let report = run();
        let took = started.elapsed();
        assert!(report.failed.is_empty(), "{what}: {:?}", &report.failed[..1]);
        eprintln!(
            "sync {what}: {services} services, {backends} backends: {:.0} ms, {} map writes",
            took.as_secs_f64() * 1000.0,
            report.map_writes
        );
    };
    timed("from nothing", &mut || reconciler.sync(&desired, &mut maps));
    let contents = maps.dump().expect("reading the maps");
    assert_eq!(contents.frontends.len(), desired.frontends.len());
    assert_eq!(contents.backends.len(), backends);
    timed("again, nothing changed", &mut || {
        reconciler.sync(&desired, &mut maps)
    });
    let empty = model::DesiredState::default();
    timed("to nothing", &mut || reconciler.sync(&empty, &mut maps));
    assert_eq!(maps.dump().unwrap(), Default::default());
}
