//! The bodies of the fuzz targets in `fuzz/` (cargo-fuzz, nightly), here so that a stable test
//! (`tests/fuzz_corpus.rs`) replays the kept corpus through exactly the same code:
//! - [`manifest`]: any bytes as one manifest file, YAML and JSON;
//! - [`model`]: any bytes as a sequence of object events (apply/delete of Services,
//!   EndpointSlices and Nodes with arbitrary field values) through the model and the
//!   reconciler, checking after each event what the data path relies on.
//!
//! Both panic on a broken invariant; that is what the fuzzer looks for.
mod objects;

use std::{collections::BTreeSet, path::Path, sync::Arc};

use arbitrary::{Arbitrary as _, Unstructured};

use crate::{
    model::{self, Model, Objects, ProxyIdentity},
    reconcile::{Reconciler, memory::MemoryMaps},
    source::manifests::parse_file,
};

/// The most events one input is read as (more would only slow every run down).
const MAX_EVENTS: usize = 48;

/// One manifest file: parsed as YAML and as JSON; whatever it holds, every object kept has a
/// name and the counts add up.
pub fn manifest(bytes: &[u8]) {
    for name in ["fuzz.yaml", "fuzz.json"] {
        let parsed = parse_file(Path::new(name), bytes);
        if let Some(why) = &parsed.unusable {
            assert!(why.starts_with(name), "a problem names its file: {why}");
        }
        for problem in &parsed.problems {
            assert!(
                problem.starts_with(name),
                "a problem names its file: {problem}"
            );
        }
        let objects = &parsed.objects;
        assert!(
            objects
                .services
                .keys()
                .chain(objects.endpoint_slices.keys())
                .chain(parsed.endpoints.keys())
                .all(|key| !key.name.is_empty()),
            "an object without a name was kept"
        );
        assert!(objects.nodes.keys().all(|name| !name.is_empty()));
        // What is read is what the model is built from: that must not panic either.
        let identity = ProxyIdentity {
            node_name: objects.nodes.keys().next().cloned().unwrap_or_default(),
            service_proxy_name: None,
        };
        let _ = model::build(objects, &identity);
    }
}

/// Object events through the model (by difference) and the reconciler (into maps in memory).
pub fn model(bytes: &[u8]) {
    let mut input = Unstructured::new(bytes);
    let identity = ProxyIdentity {
        node_name: objects::THIS_NODE.into(),
        service_proxy_name: bool::arbitrary(&mut input)
            .unwrap_or_default()
            .then(|| "ours".to_owned()),
    };
    let mut objects = Objects::default();
    let mut model = Model::new(identity.clone());
    let mut maps = MemoryMaps::default();
    let mut reconciler = Reconciler::adopt(&mut maps).expect("empty maps in memory adopt");
    let mut synced = false;
    for _ in 0..MAX_EVENTS {
        if input.is_empty() {
            break;
        }
        let Ok(event) = objects::Event::generate(&mut input) else {
            break;
        };
        event.apply(&mut objects);
        let changes = model.update(&objects);
        let desired = model.desired();
        let report = if synced {
            reconciler.sync_changes(desired, &changes.frontends, &changes.sets, &mut maps)
        } else {
            synced = true;
            reconciler.sync(desired, &mut maps)
        };
        check_desired(desired);
        let failed: BTreeSet<_> = report.failed.iter().map(|(f, _)| *f).collect();
        check_maps(&maps, desired, &failed);
    }
    // By difference or from scratch, the same desired state.
    let (fresh, _) = model::build(&objects, &identity);
    assert_eq!(
        model.desired(),
        &fresh,
        "the incremental model differs from a fresh build"
    );
}

/// Every frontend names a set that exists, has a port, and is a NodePort exactly when its
/// address is 0.0.0.0 or `::`; every backend has an address and a port, of the frontend's
/// family.
fn check_desired(desired: &model::DesiredState) {
    for (frontend, service) in &desired.frontends {
        assert_ne!(frontend.port, 0, "{frontend}: port 0");
        assert_eq!(
            frontend.is_node_port(),
            service.kind == model::FrontendKind::NodePort,
            "{frontend}: address and kind {} disagree",
            service.kind
        );
        let set = desired
            .sets
            .get(&service.set())
            .unwrap_or_else(|| panic!("{frontend} names a set that does not exist"));
        assert_eq!(
            service.family,
            frontend.family(),
            "{frontend}: its entry is of the other family"
        );
        for backend in set.members() {
            assert_ne!(
                backend.port, 0,
                "{frontend}: backend {backend:?} has port 0"
            );
            assert_eq!(
                backend.family(),
                frontend.family(),
                "{frontend}: backend {backend} of the other family"
            );
            assert!(
                !backend.ip.is_unspecified(),
                "{frontend}: backend {backend:?} has no address"
            );
        }
    }
    for port in desired.health_checks.keys() {
        assert_ne!(*port, 0, "health check on port 0");
    }
}

/// The maps hold one entry per desired frontend (those that failed aside), each with a
/// service id and a whole live generation naming existing backends: the desired ones.
fn check_maps(
    maps: &MemoryMaps,
    desired: &model::DesiredState,
    failed: &BTreeSet<model::Frontend>,
) {
    let contents = &maps.contents;
    let programmed: BTreeSet<_> = contents.frontends.keys().copied().collect();
    let wanted: BTreeSet<_> = desired
        .frontends
        .keys()
        .filter(|f| !failed.contains(f))
        .copied()
        .collect();
    assert!(
        wanted.is_subset(&programmed),
        "desired frontends missing from the maps: {:?}",
        wanted.difference(&programmed).collect::<Vec<_>>()
    );
    for (frontend, value) in &contents.frontends {
        let frontend = *frontend;
        assert_ne!(value.service_id, 0, "{frontend}: service id 0");
        assert!(
            desired.frontends.contains_key(&frontend) || failed.contains(&frontend),
            "{frontend}: programmed but not desired"
        );
        let live: Vec<_> = contents.live_backends(value).collect();
        assert_eq!(
            live.len(),
            usize::from(value.count),
            "{frontend}: the live generation has a missing slot or backend"
        );
        if failed.contains(&frontend) {
            continue;
        }
        let backends: BTreeSet<_> = live.into_iter().map(|(_, b)| b.backend).collect();
        assert_eq!(
            backends,
            desired.backends_of(&frontend),
            "{frontend}: the maps pick other backends than desired"
        );
    }
}

/// Keeps the `Arc` type in one place for the generator.
fn shared<T>(value: T) -> Arc<T> {
    Arc::new(value)
}
