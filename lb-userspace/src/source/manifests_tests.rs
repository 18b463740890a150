//! `read_dir` on the fixture directories under `tests/fixtures/manifests/`: files as
//! `kubectl get -o yaml|json` prints them and as people write them for `kubectl apply -f`.
use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use super::read_dir;
use crate::model::{
    self, Backend, DesiredState, Frontend, ObjectKey, ObjectRef, Protocol, ProxyIdentity,
};
use crate::source::Snapshot;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/manifests")
        .join(name)
}

fn keys<V>(map: &std::collections::BTreeMap<ObjectKey, V>) -> Vec<String> {
    map.keys().map(ToString::to_string).collect()
}

fn build(snapshot: &Snapshot, node: &str) -> DesiredState {
    let identity = ProxyIdentity {
        node_name: node.into(),
        service_proxy_name: None,
    };
    let (state, diagnostics) = model::build(&snapshot.objects, &identity);
    assert_eq!(diagnostics, vec![]);
    state
}

fn frontend(ip: &str, port: u16, protocol: Protocol) -> Frontend {
    Frontend::new(ip.parse().unwrap(), port, protocol)
}

fn backends(list: &[(&str, u16)]) -> BTreeSet<Backend> {
    list.iter()
        .map(|(ip, port)| Backend {
            ip: ip.parse::<Ipv4Addr>().unwrap(),
            port: *port,
        })
        .collect()
}

/// Frontend → (backends, affinity) of a desired state.
type View = Vec<(Frontend, BTreeSet<Backend>, Option<u32>)>;

fn view(state: &DesiredState) -> View {
    state
        .frontends
        .iter()
        .map(|(f, s)| (*f, state.backends_of(f), s.affinity_timeout_secs))
        .collect()
}

/// The problems that mention `needle`.
fn problems_with<'a>(snapshot: &'a Snapshot, needle: &str) -> Vec<&'a String> {
    snapshot
        .problems
        .iter()
        .filter(|p| p.contains(needle))
        .collect()
}

#[test]
fn kubectl_get_list_output_is_read() {
    // `kubectl get svc,endpointslices -o yaml --show-managed-fields`, plus the Node.
    let snapshot = read_dir(&fixture("kubectl-list"));
    assert_eq!(snapshot.problems, Vec::<String>::new());
    assert_eq!(
        keys(&snapshot.objects.services),
        vec!["default/kubernetes", "default/web"]
    );
    assert_eq!(
        keys(&snapshot.objects.endpoint_slices),
        vec!["default/kubernetes", "default/web-8kx2p"]
    );
    assert_eq!(
        snapshot.objects.nodes.keys().collect::<Vec<_>>(),
        vec!["kind-worker"]
    );
    assert_eq!(
        snapshot.origins[&ObjectRef {
            kind: "Service",
            key: ObjectKey::new("default", "web"),
        }],
        fixture("kubectl-list").join("cluster.yaml")
    );
    // `default/web` is of type NodePort: its NodePorts (address 0) share the ClusterIP's
    // backends.
    assert_eq!(
        view(&build(&snapshot, "kind-worker")),
        vec![
            (
                Frontend::node_port(30080, Protocol::Tcp),
                backends(&[("10.244.1.3", 8080), ("10.244.2.5", 8080)]),
                Some(10_800)
            ),
            (
                Frontend::node_port(31053, Protocol::Udp),
                backends(&[("10.244.1.3", 5353), ("10.244.2.5", 5353)]),
                Some(10_800)
            ),
            (
                frontend("10.96.0.1", 443, Protocol::Tcp),
                backends(&[("172.18.0.2", 6443)]),
                None
            ),
            (
                frontend("10.96.112.34", 53, Protocol::Udp),
                backends(&[("10.244.1.3", 5353), ("10.244.2.5", 5353)]),
                Some(10_800)
            ),
            (
                frontend("10.96.112.34", 80, Protocol::Tcp),
                backends(&[("10.244.1.3", 8080), ("10.244.2.5", 8080)]),
                Some(10_800)
            ),
        ]
    );
}

#[test]
fn multi_document_files_with_other_kinds_are_read() {
    let snapshot = read_dir(&fixture("multi-doc"));
    // The Deployment and the ConfigMap are skipped without a word; so are empty documents.
    assert_eq!(snapshot.problems, Vec::<String>::new());
    assert_eq!(
        keys(&snapshot.objects.services),
        vec!["default/cache", "shop/echo"]
    );
    assert_eq!(
        keys(&snapshot.objects.endpoint_slices),
        vec!["default/cache-manual", "shop/echo-1"]
    );
    assert_eq!(
        view(&build(&snapshot, "kind-worker")),
        vec![
            (
                frontend("10.96.50.1", 80, Protocol::Tcp),
                backends(&[("10.244.1.10", 8080), ("10.244.2.10", 8080)]),
                None
            ),
            (
                frontend("10.96.50.1", 81, Protocol::Udp),
                backends(&[("10.244.1.10", 8081), ("10.244.2.10", 8081)]),
                None
            ),
            (
                frontend("10.96.50.2", 6379, Protocol::Tcp),
                backends(&[("192.168.7.7", 6379)]),
                None
            ),
        ]
    );
}

#[test]
fn json_files_are_read() {
    // `kubectl get svc web -o json` and `kubectl get endpointslices -o json` (a List).
    let snapshot = read_dir(&fixture("json"));
    assert_eq!(snapshot.problems, Vec::<String>::new());
    assert_eq!(keys(&snapshot.objects.services), vec!["default/web"]);
    assert_eq!(
        keys(&snapshot.objects.endpoint_slices),
        vec!["default/web-8kx2p"]
    );
    assert_eq!(
        view(&build(&snapshot, "kind-worker")),
        vec![(
            frontend("10.96.112.34", 80, Protocol::Tcp),
            backends(&[("10.244.1.3", 8080)]),
            None
        )]
    );
}

#[test]
fn problems_name_the_file_and_object_and_the_rest_is_read() {
    let dir = fixture("problems");
    let snapshot = read_dir(&dir);
    let problems = &snapshot.problems;

    // A file that does not parse: named; the documents before the error are kept.
    let broken = problems_with(&snapshot, "10-broken.yaml");
    assert_eq!(broken.len(), 1, "{problems:#?}");
    assert!(broken[0].contains("does not parse"), "{broken:?}");
    assert!(broken[0].contains(&dir.join("10-broken.yaml").display().to_string()));

    // A malformed object: file and object named, the other objects of the file read.
    let bad_port = problems_with(&snapshot, "Service bad-port");
    assert_eq!(bad_port.len(), 1, "{problems:#?}");
    assert!(bad_port[0].contains("30-bad-port.yaml"), "{bad_port:?}");
    assert!(bad_port[0].contains("abc"), "{bad_port:?}");

    let no_name = problems_with(&snapshot, "no metadata.name");
    assert_eq!(no_name.len(), 1, "{problems:#?}");
    assert!(no_name[0].contains("30-bad-port.yaml"));
    let no_kind = problems_with(&snapshot, "no-kind");
    assert_eq!(no_kind.len(), 1, "{problems:#?}");
    assert!(no_kind[0].contains("no apiVersion or kind"));
    assert_eq!(problems.len(), 4, "{problems:#?}");

    // Hidden files and directories, backups and other extensions are not read; nested
    // directories are.
    assert_eq!(
        keys(&snapshot.objects.services),
        vec![
            "default/before-error",
            "default/fine",
            "default/good",
            "default/nested"
        ]
    );
    assert_eq!(
        keys(&snapshot.objects.endpoint_slices),
        vec!["default/fine-1"]
    );
    let state = build(&snapshot, "kind-worker");
    assert!(
        state
            .frontends
            .contains_key(&frontend("10.96.60.21", 80, Protocol::Tcp))
    );
    assert_eq!(
        state.backends_of(&frontend("10.96.60.21", 80, Protocol::Tcp)),
        backends(&[("10.244.6.1", 8080)])
    );
    assert_eq!(state.frontends.len(), 4);
}

#[test]
fn endpoints_of_selectorless_services_are_mirrored() {
    let snapshot = read_dir(&fixture("mirror"));
    assert_eq!(snapshot.problems, Vec::<String>::new());
    // One slice per subset for external-db; none for web (it has a selector) or skipped
    // (labelled skip-mirror).
    assert_eq!(
        keys(&snapshot.objects.endpoint_slices),
        vec![
            "default/external-db-mirror-0",
            "default/external-db-mirror-1"
        ]
    );
    let mirrored =
        &snapshot.objects.endpoint_slices[&ObjectKey::new("default", "external-db-mirror-0")];
    let not_ready = mirrored
        .endpoints
        .iter()
        .find(|e| e.addresses == ["192.168.50.12"])
        .expect("not-ready address mirrored");
    assert_eq!(not_ready.conditions.as_ref().unwrap().ready, Some(false));
    let on_node = mirrored
        .endpoints
        .iter()
        .find(|e| e.addresses == ["192.168.50.10"])
        .unwrap();
    assert_eq!(on_node.node_name.as_deref(), Some("kind-worker"));

    let state = build(&snapshot, "kind-worker");
    assert_eq!(
        view(&state),
        vec![
            (
                frontend("10.96.70.1", 5432, Protocol::Tcp),
                backends(&[
                    ("192.168.50.10", 5432),
                    ("192.168.50.11", 5432),
                    ("192.168.60.10", 6432)
                ]),
                None
            ),
            (
                frontend("10.96.70.2", 80, Protocol::Tcp),
                BTreeSet::new(),
                None
            ),
            (
                frontend("10.96.70.3", 80, Protocol::Tcp),
                BTreeSet::new(),
                None
            ),
        ]
    );
}

#[test]
fn the_same_object_in_two_files_is_reported_and_the_later_file_wins() {
    let dir = fixture("duplicate");
    let snapshot = read_dir(&dir);
    assert_eq!(snapshot.problems.len(), 1, "{:#?}", snapshot.problems);
    let problem = &snapshot.problems[0];
    assert!(
        problem.contains("a.yaml") && problem.contains("b.yaml"),
        "{problem}"
    );
    assert!(problem.contains("Service default/web"), "{problem}");
    assert_eq!(
        keys(&snapshot.objects.services),
        vec!["default/web", "other/web"]
    );
    let web = &snapshot.objects.services[&ObjectKey::new("default", "web")];
    assert_eq!(
        web.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some("10.96.80.2")
    );
    assert_eq!(
        snapshot.origins[&ObjectRef {
            kind: "Service",
            key: ObjectKey::new("default", "web"),
        }],
        dir.join("b.yaml")
    );
}

#[test]
fn a_missing_directory_is_a_problem_not_a_panic() {
    let snapshot = read_dir(&fixture("does-not-exist"));
    assert_eq!(snapshot.problems.len(), 1);
    assert!(snapshot.problems[0].contains("does-not-exist"));
    assert!(snapshot.objects.services.is_empty());
}
