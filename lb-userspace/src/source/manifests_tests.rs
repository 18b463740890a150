//! `read_dir` on the fixture directories under `tests/fixtures/manifests/`: files as
//! `kubectl get -o yaml|json` prints them and as people write them for `kubectl apply -f`.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use super::read_dir;
use crate::model::{
    self, Backend, DesiredState, Family, Frontend, ObjectKey, ObjectRef, Protocol, ProxyIdentity,
};
use crate::source::Known as Snapshot;

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
            ip: ip.parse().unwrap(),
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
                Frontend::node_port(Family::V4, 30080, Protocol::Tcp),
                backends(&[("10.244.1.3", 8080), ("10.244.2.5", 8080)]),
                Some(10_800)
            ),
            (
                Frontend::node_port(Family::V4, 31053, Protocol::Udp),
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

    // A file that does not parse: named, and nothing from it is used (not even the documents
    // before the error: a half-written file is not a smaller file).
    let broken = problems_with(&snapshot, "10-broken.yaml");
    assert_eq!(broken.len(), 1, "{problems:#?}");
    assert!(
        broken[0].contains("document 2 does not parse"),
        "{broken:?}"
    );
    assert!(
        broken[0].contains("nothing from it is served"),
        "{broken:?}"
    );
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
        vec!["default/fine", "default/good", "default/nested"]
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
    assert_eq!(state.frontends.len(), 3);
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
        .find(|e| e.address.as_deref() == Some("192.168.50.12"))
        .expect("not-ready address mirrored");
    assert_eq!(not_ready.ready, Some(false));
    let on_node = mirrored
        .endpoints
        .iter()
        .find(|e| e.address.as_deref() == Some("192.168.50.10"))
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
fn a_dual_stack_selectorless_service_gets_a_mirrored_slice_per_family() {
    let snapshot = read_dir(&fixture("mirror-dual-stack"));
    assert_eq!(snapshot.problems, Vec::<String>::new());
    assert_eq!(
        keys(&snapshot.objects.endpoint_slices),
        vec![
            "default/external-db-mirror-0",
            "default/external-db-mirror-0-ipv6"
        ]
    );
    let v6 =
        &snapshot.objects.endpoint_slices[&ObjectKey::new("default", "external-db-mirror-0-ipv6")];
    assert_eq!(&*v6.address_type, "IPv6");
    assert_eq!(v6.endpoints.len(), 2);
    let state = build(&snapshot, "kind-worker");
    assert_eq!(
        view(&state),
        vec![
            (
                frontend("10.96.70.1", 5432, Protocol::Tcp),
                backends(&[("192.168.50.10", 5432)]),
                None
            ),
            (
                frontend("fd00:10:96::70:1", 5432, Protocol::Tcp),
                backends(&[("fd00:50::10", 5432)]),
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

// ---------------------------------------------------------------------------------------------
// The directory rules, on directories made for each test.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicUsize, Ordering},
};

use super::ManifestCache;

/// A directory of its own under the temp dir, removed on drop (also when the test fails).
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "lb-manifests-{test}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn write(&self, file: &str, text: &str) -> PathBuf {
        let path = self.0.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A Service manifest named `name` with ClusterIP 10.96.90.`last`.
fn service_yaml(name: &str, last: u8) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  clusterIP: 10.96.90.{last}\n  ports:\n  - port: 80\n"
    )
}

/// A cache and the state its deltas add up to, as the agent sees it.
struct Reader {
    cache: ManifestCache,
    known: Snapshot,
}

impl Reader {
    fn of(cache: ManifestCache) -> Self {
        Self {
            cache,
            known: Snapshot::default(),
        }
    }

    /// The next delta, or `None` when nothing changed.
    fn delta(&mut self, dir: &TempDir) -> Option<crate::source::Delta> {
        let delta = self.cache.read(&dir.0)?;
        self.known.apply(&delta);
        Some(delta)
    }
}

/// The whole state after the next delta, which must change something.
fn read(reader: &mut Reader, dir: &TempDir) -> Snapshot {
    reader.delta(dir).expect("a change");
    reader.known.clone()
}

fn cache() -> Reader {
    Reader::of(ManifestCache::new(super::DEFAULT_MAX_FILE_BYTES))
}

/// A cache whose reads of the file or listings of the directory named `needle` fail with
/// EIO while `failing` is set.
fn faulty_cache(needle: &'static str, failing: Arc<Mutex<bool>>) -> Reader {
    Reader::of(
        ManifestCache::new(super::DEFAULT_MAX_FILE_BYTES).with_fault(move |path| {
            (*failing.lock().unwrap() && path.ends_with(needle))
                .then(|| std::io::Error::from_raw_os_error(libc::EIO))
        }),
    )
}

#[test]
fn a_directory_symlink_loop_is_not_followed_and_each_file_is_read_once() {
    let dir = TempDir::new("dirloop");
    dir.write("a.yaml", &service_yaml("a", 1));
    dir.write("sub/b.yaml", &service_yaml("b", 2));
    std::os::unix::fs::symlink(".", dir.0.join("loop")).unwrap();
    std::os::unix::fs::symlink("..", dir.0.join("sub/up")).unwrap();
    // A symlink to a directory with a manifest's extension is not followed either.
    std::os::unix::fs::symlink("sub", dir.0.join("sub-link.yaml")).unwrap();
    // Symlinks to files are followed; two names for one file read it once.
    let outside = TempDir::new("dirloop-outside");
    let c = outside.write("c.yaml", &service_yaml("c", 3));
    std::os::unix::fs::symlink(&c, dir.0.join("c.yaml")).unwrap();
    std::os::unix::fs::symlink("a.yaml", dir.0.join("z-alias.yaml")).unwrap();

    let opened = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&opened);
    let mut cache = Reader::of(
        ManifestCache::new(super::DEFAULT_MAX_FILE_BYTES).with_fault(move |path| {
            if path.extension().is_some_and(|e| e == "yaml") {
                counter.fetch_add(1, Ordering::Relaxed);
            }
            None
        }),
    );
    let started = std::time::Instant::now();
    let snapshot = read(&mut cache, &dir);
    let took = started.elapsed();
    assert_eq!(snapshot.problems, Vec::<String>::new());
    assert_eq!(
        keys(&snapshot.objects.services),
        vec!["default/a", "default/b", "default/c"]
    );
    // a.yaml, sub/b.yaml and c.yaml: three files, three reads, in well under a second.
    assert_eq!(opened.load(Ordering::Relaxed), 3);
    assert!(took < std::time::Duration::from_secs(1), "took {took:?}");
    assert!(
        cache.delta(&dir).is_none(),
        "nothing changed: no new snapshot"
    );
    assert_eq!(
        opened.load(Ordering::Relaxed),
        3,
        "unchanged files are not read again"
    );
}

#[test]
fn looping_and_dangling_file_symlinks_are_reported_by_name() {
    let dir = TempDir::new("fileloop");
    dir.write("good.yaml", &service_yaml("good", 1));
    std::os::unix::fs::symlink("y.yaml", dir.0.join("x.yaml")).unwrap();
    std::os::unix::fs::symlink("x.yaml", dir.0.join("y.yaml")).unwrap();
    std::os::unix::fs::symlink("nowhere.yaml", dir.0.join("dangling.yaml")).unwrap();
    let snapshot = read(&mut cache(), &dir);
    assert_eq!(keys(&snapshot.objects.services), vec!["default/good"]);
    for name in ["x.yaml", "y.yaml", "dangling.yaml"] {
        let path = dir.0.join(name).display().to_string();
        let problems = problems_with(&snapshot, &path);
        assert_eq!(problems.len(), 1, "{name}: {:#?}", snapshot.problems);
        assert!(problems[0].contains("cannot read"), "{problems:?}");
    }
    assert!(problems_with(&snapshot, "x.yaml")[0].contains("symbolic links"));
    assert_eq!(snapshot.problems.len(), 3, "{:#?}", snapshot.problems);
}

#[test]
fn a_failed_listing_keeps_the_objects_of_the_files_it_did_not_see() {
    let dir = TempDir::new("listing");
    dir.write("a.yaml", &service_yaml("a", 1));
    dir.write("sub/b.yaml", &service_yaml("b", 2));
    dir.write("sub/deeper/c.yaml", &service_yaml("c", 3));
    let failing = Arc::new(Mutex::new(false));
    let mut cache = faulty_cache("sub", Arc::clone(&failing));
    let first = read(&mut cache, &dir);
    assert_eq!(
        keys(&first.objects.services),
        vec!["default/a", "default/b", "default/c"]
    );

    *failing.lock().unwrap() = true;
    dir.write("a.yaml", &service_yaml("a", 11));
    let failed = read(&mut cache, &dir);
    assert_eq!(
        keys(&failed.objects.services),
        vec!["default/a", "default/b", "default/c"],
        "{:#?}",
        failed.problems
    );
    let problems = problems_with(&failed, "cannot list the directory");
    assert_eq!(problems.len(), 1, "{:#?}", failed.problems);
    assert!(problems[0].contains(&dir.0.join("sub").display().to_string()));
    // The file that was seen did change.
    let a = &failed.objects.services[&ObjectKey::new("default", "a")];
    assert_eq!(
        a.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some("10.96.90.11")
    );

    // Once the listing works again, files really gone go.
    *failing.lock().unwrap() = false;
    std::fs::remove_file(dir.0.join("sub/b.yaml")).unwrap();
    let healed = read(&mut cache, &dir);
    assert_eq!(healed.problems, Vec::<String>::new());
    assert_eq!(
        keys(&healed.objects.services),
        vec!["default/a", "default/c"]
    );
    // A whole directory removed takes its files' objects with it.
    std::fs::remove_dir_all(dir.0.join("sub")).unwrap();
    let removed = read(&mut cache, &dir);
    assert_eq!(keys(&removed.objects.services), vec!["default/a"]);
}

#[test]
fn a_file_that_cannot_be_read_keeps_its_last_good_objects() {
    let dir = TempDir::new("eio");
    dir.write("a.yaml", &service_yaml("a", 1));
    dir.write("b.yaml", &service_yaml("b", 2));
    let failing = Arc::new(Mutex::new(false));
    let mut cache = faulty_cache("b.yaml", Arc::clone(&failing));
    read(&mut cache, &dir);
    *failing.lock().unwrap() = true;
    dir.write("b.yaml", &service_yaml("b", 22));
    let snapshot = read(&mut cache, &dir);
    assert_eq!(
        keys(&snapshot.objects.services),
        vec!["default/a", "default/b"]
    );
    let b = &snapshot.objects.services[&ObjectKey::new("default", "b")];
    assert_eq!(
        b.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some("10.96.90.2")
    );
    assert_eq!(snapshot.problems.len(), 1, "{:#?}", snapshot.problems);
    assert!(snapshot.problems[0].contains("b.yaml: cannot read"));
    assert!(snapshot.problems[0].contains("last good version is kept"));
    // The same problem again is no new snapshot; the read is retried, and once it works the
    // new version is served.
    assert!(cache.delta(&dir).is_none());
    *failing.lock().unwrap() = false;
    let healed = read(&mut cache, &dir);
    assert_eq!(healed.problems, Vec::<String>::new());
    let b = &healed.objects.services[&ObjectKey::new("default", "b")];
    assert_eq!(
        b.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some("10.96.90.22")
    );
}

#[test]
fn a_half_written_file_keeps_its_last_good_objects_until_it_parses_again() {
    let dir = TempDir::new("halfwritten");
    let two = format!("{}---\n{}", service_yaml("a", 1), service_yaml("b", 2));
    dir.write("app.yaml", &two);
    let mut cache = cache();
    read(&mut cache, &dir);

    // Cut in the middle of the second document's flow sequence.
    let half = format!(
        "{}---\n{}",
        service_yaml("a", 11),
        "apiVersion: v1\nkind: Service\nspec:\n  ports: [ {port: 80"
    );
    dir.write("app.yaml", &half);
    let snapshot = read(&mut cache, &dir);
    assert_eq!(
        keys(&snapshot.objects.services),
        vec!["default/a", "default/b"]
    );
    let a = &snapshot.objects.services[&ObjectKey::new("default", "a")];
    assert_eq!(
        a.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some("10.96.90.1"),
        "the whole last good version, not the documents before the error"
    );
    assert_eq!(snapshot.problems.len(), 1, "{:#?}", snapshot.problems);
    let problem = &snapshot.problems[0];
    assert!(
        problem.contains(&dir.0.join("app.yaml").display().to_string()),
        "{problem}"
    );
    assert!(problem.contains("document 2 does not parse"), "{problem}");
    assert!(problem.contains("last good version is kept"), "{problem}");

    dir.write("app.yaml", &service_yaml("c", 3));
    let fixed = read(&mut cache, &dir);
    assert_eq!(fixed.problems, Vec::<String>::new());
    assert_eq!(keys(&fixed.objects.services), vec!["default/c"]);

    // A file that never parsed gives nothing, and says so.
    dir.write("new.yaml", "kind: Service\nmetadata: {name: [");
    let never = read(&mut cache, &dir);
    assert_eq!(keys(&never.objects.services), vec!["default/c"]);
    assert_eq!(never.problems.len(), 1, "{:#?}", never.problems);
    assert!(never.problems[0].contains("new.yaml"));
    assert!(never.problems[0].contains("nothing from it is served"));
    // Removed, it is forgotten, problem and all.
    std::fs::remove_file(dir.0.join("new.yaml")).unwrap();
    let removed = read(&mut cache, &dir);
    assert_eq!(removed.problems, Vec::<String>::new());
}

#[test]
fn a_file_over_the_size_limit_is_reported_and_keeps_its_last_good_objects() {
    let dir = TempDir::new("oversize");
    dir.write("a.yaml", &service_yaml("a", 1));
    let limit = 400;
    let mut cache = Reader::of(ManifestCache::new(limit));
    read(&mut cache, &dir);
    let big = format!("{}# {}\n", service_yaml("a", 11), "x".repeat(500));
    dir.write("a.yaml", &big);
    dir.write("b.yaml", &big.replace("name: a", "name: b"));
    let snapshot = read(&mut cache, &dir);
    assert_eq!(keys(&snapshot.objects.services), vec!["default/a"]);
    let a = &snapshot.objects.services[&ObjectKey::new("default", "a")];
    assert_eq!(
        a.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some("10.96.90.1")
    );
    assert_eq!(snapshot.problems.len(), 2, "{:#?}", snapshot.problems);
    for (problem, kept) in snapshot
        .problems
        .iter()
        .zip(["last good version is kept", "nothing from it is served"])
    {
        assert!(problem.contains("over the limit of 400"), "{problem}");
        assert!(problem.contains("--manifest-max-bytes"), "{problem}");
        assert!(problem.contains(kept), "{problem}");
    }
    assert!(snapshot.problems[0].contains("a.yaml"));
    assert!(snapshot.problems[1].contains("b.yaml"));
}

/// The keys of a delta's changed services, with whether each is applied (not deleted).
fn changed_services(delta: &crate::source::Delta) -> Vec<(String, bool)> {
    delta
        .objects
        .services
        .iter()
        .map(|(key, object)| (key.to_string(), object.is_some()))
        .collect()
}

#[test]
fn a_rewritten_file_yields_only_the_objects_that_changed_in_it() {
    let dir = TempDir::new("perfile");
    let many: Vec<String> = (1..=50)
        .map(|i| service_yaml(&format!("s{i}"), i))
        .collect();
    dir.write("big.yaml", &many.join("---\n"));
    dir.write("other.yaml", &service_yaml("other", 200));
    let mut reader = cache();
    let first = reader.delta(&dir).expect("a first delta");
    assert_eq!(first.objects.services.len(), 51);
    let before = Arc::clone(&reader.known.objects.services[&ObjectKey::new("default", "s1")]);

    // One service of fifty changed, the file rewritten whole: one changed object.
    let mut edited = many.clone();
    edited[6] = service_yaml("s7", 107);
    dir.write("big.yaml", &edited.join("---\n"));
    let delta = reader.delta(&dir).expect("a change");
    assert_eq!(changed_services(&delta), [("default/s7".to_owned(), true)]);
    assert!(delta.objects.endpoint_slices.is_empty() && delta.objects.nodes.is_empty());
    assert!(
        delta.problems.is_none() && delta.origins.is_empty(),
        "{delta:#?}"
    );
    // The unchanged objects keep their `Arc`s: the model does not look at them.
    assert!(Arc::ptr_eq(
        &before,
        &reader.known.objects.services[&ObjectKey::new("default", "s1")]
    ));

    // The same content written again: the file is read, and nothing changed.
    dir.write("big.yaml", &edited.join("---\n"));
    assert!(
        reader.delta(&dir).is_none(),
        "an unchanged rewrite is no change"
    );

    // A service removed from the file is deleted, and only it.
    dir.write("big.yaml", &edited[1..].join("---\n"));
    let delta = reader.delta(&dir).expect("a change");
    assert_eq!(changed_services(&delta), [("default/s1".to_owned(), false)]);
    let gone = ObjectRef {
        kind: "Service",
        key: ObjectKey::new("default", "s1"),
    };
    assert_eq!(delta.origins.get(&gone), Some(&None));

    // A whole file removed deletes its objects, and no other.
    std::fs::remove_file(dir.0.join("other.yaml")).unwrap();
    let delta = reader.delta(&dir).expect("a change");
    assert_eq!(
        changed_services(&delta),
        [("default/other".to_owned(), false)]
    );
    assert_eq!(reader.known.objects.services.len(), 49);
}

#[test]
fn an_object_defined_twice_is_served_from_the_later_file_until_it_goes() {
    let dir = TempDir::new("twice");
    dir.write("b.yaml", &service_yaml("web", 2));
    let mut reader = cache();
    reader.delta(&dir).expect("a first delta");

    // An earlier file defining it too changes nothing served; it is reported.
    dir.write("a.yaml", &service_yaml("web", 1));
    let delta = reader.delta(&dir).expect("a new problem");
    assert!(delta.objects.is_empty(), "{delta:#?}");
    let problems = delta.problems.expect("the problems changed");
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(problems[0].contains("b.yaml: Service default/web is also defined in"));
    assert!(problems[0].contains("a.yaml; the later file wins"));
    let web = &reader.known.objects.services[&ObjectKey::new("default", "web")];
    assert_eq!(
        web.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some("10.96.90.2")
    );

    // The later file gone, the earlier one's definition is served, from that file.
    std::fs::remove_file(dir.0.join("b.yaml")).unwrap();
    let delta = reader.delta(&dir).expect("a change");
    assert_eq!(changed_services(&delta), [("default/web".to_owned(), true)]);
    assert_eq!(delta.problems, Some(vec![]));
    let web_ref = ObjectRef {
        kind: "Service",
        key: ObjectKey::new("default", "web"),
    };
    assert_eq!(reader.known.origins[&web_ref], dir.0.join("a.yaml"));
    let web = &reader.known.objects.services[&ObjectKey::new("default", "web")];
    assert_eq!(
        web.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some("10.96.90.1")
    );
}

#[test]
fn a_changed_endpoints_object_changes_only_its_mirrored_slices() {
    let dir = TempDir::new("mirrordelta");
    let endpoints = |name: &str, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Endpoints\nmetadata:\n  name: {name}\nsubsets:\n- addresses:\n  - ip: {ip}\n  ports:\n  - port: 80\n"
        )
    };
    dir.write("a.yaml", &service_yaml("a", 1));
    dir.write("b.yaml", &service_yaml("b", 2));
    dir.write("a-ep.yaml", &endpoints("a", "192.168.1.1"));
    dir.write("b-ep.yaml", &endpoints("b", "192.168.1.2"));
    let mut reader = cache();
    let first = reader.delta(&dir).expect("a first delta");
    let slices: Vec<String> = first
        .objects
        .endpoint_slices
        .keys()
        .map(ToString::to_string)
        .collect();
    assert_eq!(slices, ["default/a-mirror-0", "default/b-mirror-0"]);

    dir.write("a-ep.yaml", &endpoints("a", "192.168.1.9"));
    let delta = reader.delta(&dir).expect("a change");
    let slices: Vec<String> = delta
        .objects
        .endpoint_slices
        .keys()
        .map(ToString::to_string)
        .collect();
    assert_eq!(slices, ["default/a-mirror-0"]);
    assert!(delta.objects.services.is_empty());

    // The Service gains a selector: its Endpoints are no longer mirrored.
    let with_selector = format!("{}  selector:\n    app: a\n", service_yaml("a", 1));
    dir.write("a.yaml", &with_selector);
    let delta = reader.delta(&dir).expect("a change");
    assert_eq!(delta.objects.endpoint_slices.len(), 1);
    assert!(delta.objects.endpoint_slices[&ObjectKey::new("default", "a-mirror-0")].is_none());
    assert_eq!(reader.known.objects.endpoint_slices.len(), 1);
}
