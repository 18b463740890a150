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
