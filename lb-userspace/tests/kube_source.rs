//! The API server source against a fake API server (tests/common/fake_api.rs: real HTTP on
//! 127.0.0.1) through the agent's own client, answering list and watch requests with JSON
//! made from k8s-openapi objects. The fake keeps a resource version and an event log like
//! etcd does, so a watch resumed from a resource version replays what it missed, and a
//! compacted log answers with `410 Gone`.
mod common;
use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use common::fake_api::FakeApiServer;
use http::StatusCode;
use k8s_openapi::{
    api::{
        core::v1::{Node, NodeSpec, Service, ServicePort, ServiceSpec, Taint},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use lb_agent::{
    api::{self, AgentState},
    model::{self, ObjectKey, ProxyIdentity},
    source::{
        Delta, Known as Snapshot,
        kube::{ApiTimeout, SourceHealth, Watched},
    },
};
use serde_json::Value;
use tokio::sync::watch;

const NODE: &str = "node-1";
/// Longest wait for anything the source should do; backoffs after errors are about 1-3 s.
const PATIENCE: Duration = Duration::from_secs(20);

type Snapshots = watch::Receiver<Option<Arc<Snapshot>>>;
/// Every delta the source published, in order.
type Deltas = Arc<std::sync::Mutex<Vec<Delta>>>;

/// The source on `client`; its deltas are added up as the agent's model does and the whole
/// state is published after each one (the tests look at whole states), and every delta is
/// kept.
fn spawn_source(
    client: kube::Client,
    identity: ProxyIdentity,
    health: SourceHealth,
) -> (
    Snapshots,
    Deltas,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let source = tokio::spawn(lb_agent::source::kube::watch(client, identity, tx, health));
    let (publish, snapshots) = watch::channel(None);
    let deltas = Deltas::default();
    let log = Arc::clone(&deltas);
    tokio::spawn(async move {
        let mut known = Snapshot::default();
        while let Some(delta) = rx.recv().await {
            known.apply(&delta);
            log.lock().unwrap().push(delta);
            if publish.send(Some(Arc::new(known.clone()))).is_err() {
                return;
            }
        }
    });
    (snapshots, deltas, source)
}

// ---------------------------------------------------------------------------------------
// Objects.

fn service(name: &str, ip: &str, port: i32) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(ip.into()),
            cluster_ips: Some(vec![ip.into()]),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn slice(service: &str, backend: &str) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{service}-abcde")),
            namespace: Some("default".into()),
            labels: Some(
                [("kubernetes.io/service-name".to_owned(), service.to_owned())]
                    .into_iter()
                    .collect(),
            ),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: vec![Endpoint {
            addresses: vec![backend.into()],
            conditions: Some(EndpointConditions {
                ready: Some(true),
                serving: Some(true),
                terminating: Some(false),
            }),
            node_name: Some(NODE.into()),
            ..Default::default()
        }],
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    }
}

fn node(zone: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(NODE.into()),
            labels: Some(
                [("topology.kubernetes.io/zone".to_owned(), zone.to_owned())]
                    .into_iter()
                    .collect(),
            ),
            ..Default::default()
        },
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------
// Running the source.

fn identity(service_proxy_name: Option<&str>) -> ProxyIdentity {
    ProxyIdentity {
        node_name: NODE.into(),
        service_proxy_name: service_proxy_name.map(str::to_owned),
    }
}

/// A fake server holding one service with its slice and this node, and the source on it.
struct Harness {
    server: FakeApiServer,
    health: SourceHealth,
    snapshots: Snapshots,
    deltas: Deltas,
    _source: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Harness {
    async fn new(hold: Option<Watched>, service_proxy_name: Option<&str>) -> Self {
        Self::with_timeout(hold, service_proxy_name, ApiTimeout::DEFAULT).await
    }

    /// [`Self::new`] with a client whose requests time out after `timeout`.
    async fn with_timeout(
        hold: Option<Watched>,
        service_proxy_name: Option<&str>,
        timeout: ApiTimeout,
    ) -> Self {
        init_logs();
        let health = SourceHealth::new();
        let server = FakeApiServer::start().await;
        let client = server.client(&health, timeout).await;
        server.apply(Watched::Services, &service("web", "10.96.0.10", 80));
        server.apply(Watched::EndpointSlices, &slice("web", "10.0.0.1"));
        server.apply(Watched::Nodes, &node("zone-a"));
        if let Some(kind) = hold {
            server.hold(kind);
        }
        let (snapshots, deltas, source) =
            spawn_source(client, identity(service_proxy_name), health.clone());
        Self {
            server,
            health,
            snapshots,
            deltas,
            _source: source,
        }
    }

    /// Waits for a published snapshot that satisfies `test`.
    async fn snapshot(&mut self, what: &str, test: impl Fn(&Snapshot) -> bool) -> Arc<Snapshot> {
        let wait = async {
            loop {
                let current = self.snapshots.borrow_and_update().clone();
                if let Some(snapshot) = current.filter(|s| test(s)) {
                    return snapshot;
                }
                self.snapshots
                    .changed()
                    .await
                    .expect("the source is running");
            }
        };
        tokio::time::timeout(PATIENCE, wait)
            .await
            .unwrap_or_else(|_| panic!("no snapshot where {what}"))
    }

    async fn wait_for_health(&self, stale: bool) {
        let mut changes = self.health.subscribe();
        tokio::time::timeout(PATIENCE, changes.wait_for(|s| *s == stale))
            .await
            .unwrap_or_else(|_| panic!("health never became stale={stale}"))
            .expect("health is alive");
    }

    async fn wait_until(&self, what: &str, test: impl Fn() -> bool) {
        let wait = async {
            while !test() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(PATIENCE, wait)
            .await
            .unwrap_or_else(|_| panic!("never: {what}"));
    }

    /// Waits until `kind` has asked for `count` watches.
    async fn wait_for_watches(&self, kind: Watched, count: usize) {
        let wait = async {
            while self.server.seen(kind, true).len() < count {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(PATIENCE, wait)
            .await
            .unwrap_or_else(|_| panic!("{kind} never asked for watch {count}"));
    }
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

fn web() -> ObjectKey {
    ObjectKey::new("default", "web")
}

fn port_of(snapshot: &Snapshot, key: &ObjectKey) -> Option<i32> {
    let service = snapshot.objects.services.get(key)?;
    Some(service.spec.as_ref()?.ports.first()?.port)
}

fn service_names(snapshot: &Snapshot) -> Vec<String> {
    let keys = snapshot.objects.services.keys();
    keys.map(|k| k.name.clone()).collect()
}

// ---------------------------------------------------------------------------------------
// Tests.

/// Nothing is published until every kind has listed, and the first snapshot is complete;
/// requests carry kube-proxy's selectors.
#[tokio::test]
async fn publishes_once_all_three_kinds_have_listed() {
    let mut h = Harness::new(Some(Watched::Nodes), None).await;
    h.wait_for_watches(Watched::Services, 1).await;
    h.wait_for_watches(Watched::EndpointSlices, 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        h.snapshots.borrow().is_none(),
        "published before the nodes were listed"
    );

    h.server.release(Watched::Nodes);
    let first = h.snapshot("anything is published", |_| true).await;
    assert_eq!(service_names(&first), ["web"]);
    assert_eq!(first.objects.endpoint_slices.len(), 1);
    assert!(first.objects.nodes.contains_key(NODE));
    assert!(first.problems.is_empty() && first.origins.is_empty());
    assert!(!h.health.is_stale());
    assert!(h.health.last_success().is_some());

    let labels = "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name";
    for kind in [Watched::Services, Watched::EndpointSlices] {
        for watch in [false, true] {
            for seen in h.server.seen(kind, watch) {
                assert_eq!(
                    seen.query.get("labelSelector").map(String::as_str),
                    Some(labels)
                );
                assert_eq!(seen.query.get("fieldSelector"), None);
            }
        }
    }
    let nodes = h.server.seen(Watched::Nodes, false);
    assert!(!nodes.is_empty());
    for seen in nodes {
        let fields = seen.query.get("fieldSelector").map(String::as_str);
        assert_eq!(fields, Some("metadata.name=node-1"));
        assert_eq!(seen.query.get("labelSelector"), None);
    }
}

/// With `--service-proxy-name`, services and slices are selected by that name.
#[tokio::test]
async fn selects_by_service_proxy_name() {
    let mut h = Harness::new(None, Some("lb")).await;
    h.snapshot("anything is published", |_| true).await;
    let labels = "!service.kubernetes.io/headless,service.kubernetes.io/service-proxy-name=lb";
    for kind in [Watched::Services, Watched::EndpointSlices] {
        let seen = h.server.seen(kind, false);
        assert!(!seen.is_empty());
        for seen in seen {
            assert_eq!(
                seen.query.get("labelSelector").map(String::as_str),
                Some(labels)
            );
        }
    }
}

/// Watch events: an added object appears, an update replaces, a delete removes, a bookmark
/// publishes nothing; the model computes state from the published objects.
#[tokio::test]
async fn watch_events_add_replace_and_remove() {
    let mut h = Harness::new(None, None).await;
    h.snapshot("web is there", |s| s.objects.services.contains_key(&web()))
        .await;

    h.server
        .apply(Watched::Services, &service("api", "10.96.0.11", 443));
    h.server
        .apply(Watched::EndpointSlices, &slice("api", "10.0.0.2"));
    let api = ObjectKey::new("default", "api");
    let snapshot = h
        .snapshot("api and its slice are added", |s| {
            s.objects.services.contains_key(&api)
                && s.objects
                    .endpoint_slices
                    .contains_key(&ObjectKey::new("default", "api-abcde"))
        })
        .await;
    let (desired, _) = model::build(&snapshot.objects, &identity(None));
    let names: Vec<_> = desired
        .frontends
        .values()
        .map(|s| s.name.name.to_string())
        .collect();
    assert_eq!(names, ["web", "api"], "the model serves both");

    h.server
        .apply(Watched::Services, &service("api", "10.96.0.11", 8443));
    let snapshot = h
        .snapshot("api's port is replaced", |s| port_of(s, &api) == Some(8443))
        .await;
    assert_eq!(snapshot.objects.services.len(), 2);

    h.server.delete(Watched::Services, "default/web");
    let snapshot = h
        .snapshot("web is removed", |s| {
            !s.objects.services.contains_key(&web())
        })
        .await;
    assert_eq!(service_names(&snapshot), ["api"]);

    h.server.bookmark(Watched::Services);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !h.snapshots.has_changed().expect("the source is running"),
        "a bookmark published a snapshot"
    );

    h.server.apply(Watched::Nodes, &node("zone-b"));
    h.snapshot("the node's zone changes", |s| {
        let zone = s.objects.nodes.get(NODE).and_then(|n| n.zone.clone());
        zone.as_deref() == Some("zone-b")
    })
    .await;
    assert!(!h.health.is_stale());
}

/// A watch the server ends is resumed from the last resource version (here a bookmark's),
/// without an error and without losing what happened in between.
#[tokio::test]
async fn resumes_a_dropped_watch_from_the_last_bookmark() {
    let mut h = Harness::new(None, None).await;
    h.snapshot("web is there", |s| s.objects.services.contains_key(&web()))
        .await;
    h.wait_for_watches(Watched::Services, 1).await;
    // Other kinds move the resource version on; the bookmark carries it to the services.
    h.server.apply(Watched::Nodes, &node("zone-b"));
    let bookmark = h.server.bookmark(Watched::Services);
    tokio::time::sleep(Duration::from_millis(100)).await;

    h.server.end_watches(Watched::Services);
    h.wait_for_watches(Watched::Services, 2).await;
    let resumed = h.server.seen(Watched::Services, true)[1].clone();
    assert_eq!(
        resumed.query.get("resourceVersion"),
        Some(&bookmark.to_string()),
        "the watch resumes from the bookmark"
    );
    assert_eq!(
        h.server.seen(Watched::Services, false).len(),
        1,
        "no re-list"
    );

    h.server
        .apply(Watched::Services, &service("web", "10.96.0.10", 8080));
    h.snapshot("web's port is replaced", |s| {
        port_of(s, &web()) == Some(8080)
    })
    .await;
    assert!(!h.health.is_stale());
}

/// A watch that cannot resume (`410 Gone`: the history it needs is compacted) re-lists, and
/// the published state is then exactly the server's; expiry is routine, not staleness.
#[tokio::test]
async fn relists_after_410_gone_to_exactly_the_servers_state() {
    let mut h = Harness::new(None, None).await;
    h.server
        .apply(Watched::Services, &service("old", "10.96.0.20", 80));
    h.snapshot("web and old are there", |s| s.objects.services.len() == 2)
        .await;
    h.wait_for_watches(Watched::Services, 1).await;
    let health = h.health.subscribe();
    // An object the re-list finds unchanged is not in its delta.
    h.server
        .apply(Watched::Services, &service("same", "10.96.0.22", 80));
    h.snapshot("same is there", |s| s.objects.services.len() == 3)
        .await;
    let published = h.deltas.lock().unwrap().len();

    // The watch is cut off while the server changes and compacts its history.
    h.server.hold(Watched::Services);
    h.server.end_watches(Watched::Services);
    h.wait_for_watches(Watched::Services, 2).await;
    h.server.delete(Watched::Services, "default/old");
    h.server
        .apply(Watched::Services, &service("web", "10.96.0.10", 8080));
    h.server
        .apply(Watched::Services, &service("new", "10.96.0.21", 80));
    h.server.compact();
    h.server.release(Watched::Services);

    let snapshot = h
        .snapshot("the re-listed state is published", |s| {
            s.objects
                .services
                .contains_key(&ObjectKey::new("default", "new"))
        })
        .await;
    assert_eq!(service_names(&snapshot), ["new", "same", "web"]);
    assert_eq!(port_of(&snapshot, &web()), Some(8080));
    // Only what changed is in the re-list's delta: old deleted, web replaced, new added;
    // `same` and the other kinds are not touched.
    let relisted: Vec<(String, bool)> = h.deltas.lock().unwrap()[published..]
        .iter()
        .flat_map(|d| d.objects.services.iter())
        .map(|(key, object)| (key.to_string(), object.is_some()))
        .collect();
    assert_eq!(
        relisted,
        [
            ("default/new".to_owned(), true),
            ("default/old".to_owned(), false),
            ("default/web".to_owned(), true)
        ]
    );
    assert!(
        h.deltas.lock().unwrap()[published..]
            .iter()
            .all(|d| d.objects.endpoint_slices.is_empty() && d.objects.nodes.is_empty()),
        "the re-list of services touched other kinds"
    );
    assert_eq!(
        h.server.seen(Watched::Services, false).len(),
        2,
        "one re-list"
    );
    assert!(
        !health.has_changed().expect("health is alive"),
        "410 made the source stale"
    );

    // And the watch goes on from the re-list.
    h.server.delete(Watched::Services, "default/new");
    h.snapshot("new is removed", |s| s.objects.services.len() == 2)
        .await;
}

/// While the API server is unreachable nothing is published: the last snapshot stays and
/// health says stale. Once it answers again health recovers, even with nothing new to say
/// (a watch resumed from its resource version sends no event), and changes flow again.
#[tokio::test]
async fn keeps_the_last_snapshot_while_the_api_server_is_unreachable() {
    let mut h = Harness::new(None, None).await;
    let before = h
        .snapshot("web is there", |s| s.objects.services.contains_key(&web()))
        .await;
    for kind in Watched::ALL {
        h.wait_for_watches(kind, 1).await;
    }

    h.server.set_unreachable(true);
    h.wait_for_health(true).await;
    // Past the first backoff: reconnecting is refused too.
    h.wait_until("every kind was refused a reconnection", || {
        Watched::ALL.iter().all(|kind| h.server.refused(*kind) > 0)
    })
    .await;
    {
        let current = h.snapshots.borrow_and_update();
        let current = current.as_ref().expect("a snapshot stays published");
        assert!(Arc::ptr_eq(current, &before), "published during the outage");
        assert_eq!(service_names(current), ["web"]);
    }
    assert!(h.health.is_stale());

    h.server.set_unreachable(false);
    h.wait_for_health(false).await;
    assert!(
        !h.snapshots.has_changed().expect("the source is running"),
        "reconnecting with no changes published a snapshot"
    );
    assert_eq!(
        h.server.seen(Watched::Services, false).len(),
        1,
        "resumed without a re-list"
    );
    h.server
        .apply(Watched::Services, &service("web", "10.96.0.10", 8080));
    h.snapshot("a change after the outage arrives", |s| {
        port_of(s, &web()) == Some(8080)
    })
    .await;
}

/// A kind the server keeps refusing (here Nodes, 403 Forbidden) holds back the first
/// snapshot and keeps the source stale, whatever the other kinds do; once it lists, all is
/// published and health recovers.
#[tokio::test]
async fn a_failing_kind_holds_back_publishing_and_keeps_the_source_stale() {
    init_logs();
    let health = SourceHealth::new();
    let server = FakeApiServer::start().await;
    let client = server.client(&health, ApiTimeout::DEFAULT).await;
    server.apply(Watched::Services, &service("web", "10.96.0.10", 80));
    server.apply(Watched::Nodes, &node("zone-a"));
    server.fail(Watched::Nodes, Some(StatusCode::FORBIDDEN));
    let (snapshots, deltas, source) = spawn_source(client, identity(None), health.clone());
    let mut h = Harness {
        server,
        health,
        snapshots,
        deltas,
        _source: source,
    };

    h.wait_for_health(true).await;
    h.wait_for_watches(Watched::Services, 1).await;
    h.wait_for_watches(Watched::EndpointSlices, 1).await;
    h.server
        .apply(Watched::Services, &service("api", "10.96.0.11", 80));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(h.snapshots.borrow().is_none(), "published without the node");
    assert!(
        h.health.is_stale(),
        "other kinds' answers cleared the node's failure"
    );

    h.server.fail(Watched::Nodes, None);
    let first = h.snapshot("anything is published", |_| true).await;
    assert_eq!(service_names(&first), ["api", "web"]);
    assert!(first.objects.nodes.contains_key(NODE));
    h.wait_for_health(false).await;
}

// ---------------------------------------------------------------------------------------
// Health, as the agent serves it from this source.

/// What the agent's loop does for health with each snapshot, without the maps: a change
/// arrives, this node's eligibility is taken from the snapshot, the sync writes the maps.
async fn sync_like_the_agent(mut snapshots: Snapshots, state: Arc<AgentState>) {
    while snapshots.changed().await.is_ok() {
        state
            .health
            .lock()
            .unwrap()
            .change_arrived(SystemTime::now());
        let Some(snapshot) = snapshots.borrow_and_update().clone() else {
            continue;
        };
        state.follow_node_of(&snapshot.objects, &identity(None));
        state.health.lock().unwrap().synced(SystemTime::now());
    }
}

/// GET on the agent's health server: (status, body).
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, Value) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let status = answer.split_whitespace().nth(1).unwrap().parse().unwrap();
    let (_, body) = answer.split_once("\r\n\r\n").unwrap();
    (status, serde_json::from_str(body).unwrap())
}

/// Waits until `path` answers `status` with a body satisfying `test`; returns the body.
async fn wait_for_answer(
    addr: std::net::SocketAddr,
    path: &str,
    status: u16,
    test: impl Fn(&Value) -> bool,
) -> Value {
    let wait = async {
        loop {
            let (got, body) = get(addr, path).await;
            if got == status && test(&body) {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .unwrap_or_else(|_| panic!("{path} never answered {status} as expected"))
}

/// This node with the autoscaler's taint or a deletion timestamp, or neither.
fn node_marked(taint: bool, deleting: bool) -> Node {
    let mut node = node("zone-a");
    node.spec = Some(NodeSpec {
        taints: Some(
            taint
                .then(|| Taint {
                    key: model::TO_BE_DELETED_TAINT.into(),
                    value: Some("1700000000".into()),
                    effect: "NoSchedule".into(),
                    time_added: None,
                })
                .into_iter()
                .collect(),
        ),
        ..Default::default()
    });
    node.metadata.deletion_timestamp =
        deleting.then(|| Time("2025-01-01T00:00:00Z".parse().unwrap()));
    node
}

/// `/healthz` as kube-proxy's: it stays 200 while the API server is unreachable (the body
/// says `stale`), and turns 503 once this node's Node, through the watch, gets the
/// autoscaler's taint or a deletion timestamp; `/livez` stays 200 throughout.
#[tokio::test]
async fn healthz_stays_ok_while_stale_and_fails_for_a_node_marked_for_deletion() {
    let h = Harness::new(None, None).await;
    let state = AgentState::new("kubernetes".into());
    tokio::spawn(api::health::follow_staleness(
        h.health.subscribe(),
        state.clone(),
    ));
    tokio::spawn(sync_like_the_agent(h.snapshots.clone(), state.clone()));
    let loopback = "127.0.0.1:0".parse().ok();
    let addr = api::serve(state.clone(), None, loopback)
        .await
        .unwrap()
        .healthz
        .unwrap();
    let ok = wait_for_answer(addr, "/healthz", 200, |_| true).await;
    assert_eq!(ok["nodeEligible"], true, "{ok}");
    assert_eq!(ok["stale"], false, "{ok}");
    for kind in Watched::ALL {
        h.wait_for_watches(kind, 1).await;
    }

    h.server.set_unreachable(true);
    h.wait_for_health(true).await;
    h.wait_until("every kind was refused a reconnection", || {
        Watched::ALL.iter().all(|kind| h.server.refused(*kind) > 0)
    })
    .await;
    let stale = wait_for_answer(addr, "/healthz", 200, |b| b["stale"] == true).await;
    assert_eq!(stale["nodeEligible"], true, "{stale}");
    assert_eq!(get(addr, "/livez").await.0, 200);
    assert!(h.health.is_stale(), "still unreachable");

    h.server.set_unreachable(false);
    h.wait_for_health(false).await;
    h.server.apply(Watched::Nodes, &node_marked(true, false));
    let tainted = wait_for_answer(addr, "/healthz", 503, |_| true).await;
    assert_eq!(tainted["nodeEligible"], false, "{tainted}");
    assert_eq!(tainted["stale"], false, "{tainted}");
    let (livez, body) = get(addr, "/livez").await;
    assert_eq!(livez, 200, "{body}");

    h.server.apply(Watched::Nodes, &node_marked(false, false));
    wait_for_answer(addr, "/healthz", 200, |b| b["nodeEligible"] == true).await;

    h.server.apply(Watched::Nodes, &node_marked(false, true));
    let deleting = wait_for_answer(addr, "/healthz", 503, |_| true).await;
    assert_eq!(deleting["nodeEligible"], false, "{deleting}");
    assert_eq!(get(addr, "/livez").await.0, 200);
}

// ---------------------------------------------------------------------------------------
// Faults: whatever the API server does wrong, the published state keeps every object the
// server still has, health says stale, and once the server behaves the state is the
// server's again within the watcher's backoff.

/// The requests of these tests time out this fast (`--api-timeout-ms`).
const FAULT_TIMEOUT: ApiTimeout = ApiTimeout(Duration::from_secs(1));
/// Recovery must come within the watcher's longest backoff (30 s) plus a request timeout
/// plus a margin; in practice it is the backoff reached during the fault, a few seconds.
const RECOVERY_BOUND: Duration = Duration::from_secs(30 + 1 + 5);

impl Harness {
    /// A harness whose first snapshot (web, its slice, this node) is published and whose
    /// three watches are open.
    async fn synced() -> (Self, Arc<Snapshot>) {
        let mut h = Self::with_timeout(None, None, FAULT_TIMEOUT).await;
        let first = h
            .snapshot("web is there", |s| s.objects.services.contains_key(&web()))
            .await;
        for kind in Watched::ALL {
            h.wait_for_watches(kind, 1).await;
        }
        (h, first)
    }

    /// Asserts that nothing was published since `before`.
    fn assert_still(&mut self, before: &Arc<Snapshot>, during: &str) {
        let current = self.snapshots.borrow_and_update();
        let current = current.as_ref().expect("a snapshot stays published");
        assert!(Arc::ptr_eq(current, before), "published during {during}");
    }

    /// Waits until `count` more requests (watches or lists) of `kind` than `since` came;
    /// retries wait out a backoff of up to 30 s each.
    async fn wait_for_requests(&self, kind: Watched, watch: bool, since: usize, count: usize) {
        let wait = async {
            while self.server.seen(kind, watch).len() < since + count {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let bound = RECOVERY_BOUND * count as u32;
        tokio::time::timeout(bound, wait).await.unwrap_or_else(|_| {
            panic!("not {count} more requests for {kind} (watch: {watch}) in {bound:?}")
        });
    }

    /// Waits (bounded by RECOVERY_BOUND) for health to say `stale`; returns how long it took.
    async fn time_until_health(&self, stale: bool) -> Duration {
        let started = std::time::Instant::now();
        let mut changes = self.health.subscribe();
        tokio::time::timeout(RECOVERY_BOUND, changes.wait_for(|s| *s == stale))
            .await
            .unwrap_or_else(|_| panic!("health not stale={stale} within {RECOVERY_BOUND:?}"))
            .expect("health is alive");
        started.elapsed()
    }

    /// Every snapshot published from now on, for checks that none lost an object.
    fn record_published(&self) -> Arc<std::sync::Mutex<Vec<Arc<Snapshot>>>> {
        let published = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut snapshots = self.snapshots.clone();
        snapshots.borrow_and_update();
        let sink = published.clone();
        tokio::spawn(async move {
            while snapshots.changed().await.is_ok() {
                if let Some(snapshot) = snapshots.borrow_and_update().clone() {
                    sink.lock().unwrap().push(snapshot);
                }
            }
        });
        published
    }

    /// After a fault: health recovers within RECOVERY_BOUND and a change made on the server
    /// reaches the published state; returns the time to recover.
    async fn recovers(&mut self, fault: &str) -> Duration {
        let recovered = self.time_until_health(false).await;
        eprintln!(
            "{fault}: not stale {} ms after the server was back",
            recovered.as_millis()
        );
        let port = 7000 + self.server.seen(Watched::Services, false).len() as i32;
        self.server
            .apply(Watched::Services, &service("web", "10.96.0.10", port));
        self.snapshot(&format!("a change after {fault} arrives"), |s| {
            port_of(s, &web()) == Some(port)
        })
        .await;
        assert!(!self.health.is_stale(), "stale again after {fault}");
        recovered
    }
}

/// 500, 429 and 503 (these two with `Retry-After`) on every request: the state stays, the
/// source is stale while they last and recovers within the backoff once they stop.
#[tokio::test]
async fn error_statuses_keep_the_state_and_recover_within_the_backoff() {
    let (mut h, mut before) = Harness::synced().await;
    for (code, retry_after) in [
        (StatusCode::INTERNAL_SERVER_ERROR, None),
        (StatusCode::TOO_MANY_REQUESTS, Some(1)),
        (StatusCode::SERVICE_UNAVAILABLE, Some(1)),
    ] {
        for kind in Watched::ALL {
            h.server.fail_retry_after(kind, Some(code), retry_after);
        }
        let watches = h.server.seen(Watched::Services, true).len();
        for kind in Watched::ALL {
            h.server.break_watches(kind);
        }
        let stale_after = h.time_until_health(true).await;
        // Stale: the reconnection got the status.
        h.wait_for_requests(Watched::Services, true, watches, 1)
            .await;
        h.assert_still(&before, &format!("{code}"));
        eprintln!("{code}: stale after {} ms", stale_after.as_millis());

        for kind in Watched::ALL {
            h.server.fail(kind, None);
        }
        h.recovers(&format!("{code}")).await;
        before = h.snapshots.borrow_and_update().clone().unwrap();
        assert_eq!(service_names(&before), ["web"]);
    }
}

/// A 429 with `Retry-After` is retried inside the kube client (kube-rs 5's default retry
/// policy for 429, 503 and 504), no sooner than it asks; those retries hide the fault until
/// the request's timeout ends them, and only then is the source stale: the timeout bounds
/// how long a throttled API server goes unreported.
#[tokio::test]
async fn a_retry_after_is_waited_out_and_the_timeout_bounds_it() {
    const TIMEOUT: Duration = Duration::from_secs(4);
    let mut h = Harness::with_timeout(None, None, ApiTimeout(TIMEOUT)).await;
    h.snapshot("web is there", |s| s.objects.services.contains_key(&web()))
        .await;
    h.wait_for_watches(Watched::Services, 1).await;
    let watches = h.server.seen(Watched::Services, true).len();
    h.server.fail_retry_after(
        Watched::Services,
        Some(StatusCode::TOO_MANY_REQUESTS),
        Some(2),
    );
    h.server.break_watches(Watched::Services);
    let stale_after = h.time_until_health(true).await;
    let seen = h.server.seen(Watched::Services, true);
    let gap = seen[watches + 1].at - seen[watches].at;
    eprintln!(
        "429 Retry-After: 2: retried after {} ms, stale after {} ms (timeout {TIMEOUT:?})",
        gap.as_millis(),
        stale_after.as_millis()
    );
    assert!(
        gap >= Duration::from_millis(1950),
        "Retry-After ignored: {gap:?}"
    );
    assert!(
        stale_after >= TIMEOUT - Duration::from_millis(500),
        "{stale_after:?}"
    );
    assert!(
        stale_after < TIMEOUT + Duration::from_secs(3),
        "{stale_after:?}"
    );
    h.server.fail(Watched::Services, None);
    h.recovers("429 Retry-After: 2").await;
}

/// A re-list answered `200 OK` with a body that is not a list of the kind (not JSON, a list
/// of another kind, a truncated list) fails: the store keeps its objects, the source is
/// stale (it must not look healthy at each retry), and a good list brings the server's state.
#[tokio::test]
async fn garbage_lists_keep_the_state_and_the_source_stale() {
    let (mut h, mut before) = Harness::synced().await;
    let real_list = {
        let mut list = serde_json::json!({
            "apiVersion": "v1", "kind": "ServiceList",
            "metadata": {"resourceVersion": "999"},
            "items": [service("web", "10.96.0.10", 80)],
        })
        .to_string();
        list.truncate(list.len() / 2);
        list
    };
    let garbage = [
        ("not JSON", "<html>502 Bad Gateway</html>".to_owned()),
        (
            "another kind",
            serde_json::json!({
                "apiVersion": "v1", "kind": "PodList",
                "metadata": {"resourceVersion": "999"},
                "items": [{"apiVersion": "v1", "kind": "Pod",
                           "metadata": {"name": "web", "namespace": "default"}}],
            })
            .to_string(),
        ),
        ("a truncated list", real_list),
    ];
    for (what, body) in garbage {
        h.server.list_body(Watched::Services, Some(&body));
        let lists = h.server.seen(Watched::Services, false).len();
        // Force a re-list: the watch's history is gone.
        h.server.change_elsewhere();
        h.server.compact();
        h.server.end_watches(Watched::Services);
        h.time_until_health(true).await;
        let contact = h.health.last_success();
        h.wait_for_requests(Watched::Services, false, lists, 2)
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            h.health.is_stale(),
            "{what}: a retry made the source look healthy"
        );
        // Nor for a moment: a re-list's start or a `200 OK` that does not parse is no contact.
        assert_eq!(
            h.health.last_success(),
            contact,
            "{what}: a failed list counted"
        );
        h.assert_still(&before, what);

        h.server.list_body(Watched::Services, None);
        h.recovers(what).await;
        before = h.snapshots.borrow_and_update().clone().unwrap();
        assert_eq!(service_names(&before), ["web"], "{what}");
    }
}

/// Lines in a watch stream that are not an event of the kind (not JSON, an object of
/// another kind, a truncated object): nothing of them enters the state, and valid events go
/// on arriving. Not JSON and another kind are watch errors: the source is stale until the
/// server next says something valid. A truncated object is dropped by kube-rs without an
/// error (it takes any incomplete JSON for the tail of a cut stream), so it is no staleness.
#[tokio::test]
async fn garbage_in_a_watch_stream_changes_nothing() {
    let (mut h, mut before) = Harness::synced().await;
    let lines = [
        ("not JSON", true, "this is not JSON\n".to_owned()),
        (
            "another kind",
            true,
            common::fake_api::event_line(
                "ADDED",
                &serde_json::json!({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "intruder", "namespace": "default",
                                 "resourceVersion": "100000"}}),
            ),
        ),
        (
            "a truncated object",
            false,
            "{\"type\":\"ADDED\",\"object\":{\"apiVersion\":\"v1\",\"kind\":\"Service\",\
             \"metadata\":{\"name\":\"trunc\"\n"
                .to_owned(),
        ),
    ];
    for (i, (what, stale, line)) in lines.into_iter().enumerate() {
        h.server.inject(Watched::Services, &line);
        if stale {
            h.time_until_health(true).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(h.health.is_stale(), stale, "{what}");
        h.assert_still(&before, what);

        let name = format!("after-{i}");
        h.server
            .apply(Watched::Services, &service(&name, "10.96.0.30", 80));
        let snapshot = h
            .snapshot(&format!("{name} arrives after {what}"), |s| {
                s.objects
                    .services
                    .contains_key(&ObjectKey::new("default", &name))
            })
            .await;
        let names = service_names(&snapshot);
        assert!(names.contains(&"web".to_owned()), "{what}: {names:?}");
        assert!(
            !names.iter().any(|n| n == "intruder" || n == "trunc"),
            "{what}: {names:?}"
        );
        h.wait_for_health(false).await;
        before = snapshot;
    }
}

/// A watch whose connection ends (cleanly, or reset) halfway through an event line: the half
/// event is dropped, the watch resumes from the last resource version without a re-list, and
/// the whole event arrives then.
#[tokio::test]
async fn a_watch_cut_mid_event_resumes_and_gets_the_whole_event() {
    let (mut h, _) = Harness::synced().await;
    for (i, reset) in [false, true].into_iter().enumerate() {
        let watches = h.server.seen(Watched::Services, true).len();
        let name = format!("cut-{i}");
        h.server
            .apply_cut_mid_event(Watched::Services, &service(&name, "10.96.0.40", 80), reset);
        let snapshot = h
            .snapshot(&format!("{name} arrives whole (reset: {reset})"), |s| {
                s.objects
                    .services
                    .contains_key(&ObjectKey::new("default", &name))
            })
            .await;
        assert!(service_names(&snapshot).contains(&"web".to_owned()));
        assert_eq!(
            snapshot.objects.services[&ObjectKey::new("default", &name)]
                .spec
                .as_ref()
                .and_then(|s| s.cluster_ip.as_deref()),
            Some("10.96.0.40")
        );
        assert!(h.server.seen(Watched::Services, true).len() > watches);
    }
    assert_eq!(
        h.server.seen(Watched::Services, false).len(),
        1,
        "no re-list"
    );
    h.wait_for_health(false).await;
}

/// A re-list that trickles in more slowly than the request timeout fails at the timeout
/// (kube-rs sets no read timeout: without ours it would take as long as the server likes):
/// the state stays, the source is stale, and a prompt list recovers.
#[tokio::test]
async fn a_list_slower_than_the_timeout_fails_and_keeps_the_state() {
    let (mut h, before) = Harness::synced().await;
    // About 700 bytes, 16 every 100 ms: four times the timeout.
    h.server
        .trickle_lists(Watched::Services, Some(Duration::from_millis(100)));
    let lists = h.server.seen(Watched::Services, false).len();
    h.server.change_elsewhere();
    h.server.compact();
    h.server.end_watches(Watched::Services);
    let stale_after = h.time_until_health(true).await;
    eprintln!("trickling list: stale after {} ms", stale_after.as_millis());
    assert!(stale_after >= FAULT_TIMEOUT.0 / 2, "{stale_after:?}");
    h.wait_for_requests(Watched::Services, false, lists, 2)
        .await;
    h.assert_still(&before, "a trickling list");
    assert!(h.health.is_stale());

    h.server.trickle_lists(Watched::Services, None);
    h.recovers("a trickling list").await;
}

/// Every watch answered `410 Gone`, N times in a row: each is followed by one re-list, after
/// a growing backoff (no hot loop), no snapshot loses an object, the source is never stale
/// (expiry is routine), and the state ends up the server's.
#[tokio::test]
async fn repeated_410_gone_relists_each_time_with_backoff() {
    const TIMES: usize = 3;
    let (mut h, _) = Harness::synced().await;
    let published = h.record_published();
    let health = h.health.subscribe();
    let lists = h.server.seen(Watched::Services, false).len();
    let started = std::time::Instant::now();
    h.server.gone_watches(Watched::Services, TIMES);
    h.server.end_watches(Watched::Services);
    h.server
        .apply(Watched::Services, &service("during", "10.96.0.50", 80));
    h.wait_for_requests(Watched::Services, false, lists, TIMES)
        .await;
    let snapshot = h
        .snapshot("the last re-list is published", |s| {
            s.objects
                .services
                .contains_key(&ObjectKey::new("default", "during"))
        })
        .await;
    h.wait_for_watches(
        Watched::Services,
        h.server.seen(Watched::Services, true).len(),
    )
    .await;
    let took = started.elapsed();
    eprintln!(
        "{TIMES} x 410 Gone: {TIMES} re-lists in {} ms",
        took.as_millis()
    );
    assert_eq!(service_names(&snapshot), ["during", "web"]);
    // Backoff of at least 0.8 s, doubling: 0.8 + 1.6 s before the third re-list.
    assert!(
        took >= Duration::from_millis(2000),
        "re-listed without backoff: {took:?}"
    );
    assert!(took < RECOVERY_BOUND, "{took:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        h.server.seen(Watched::Services, false).len(),
        lists + TIMES,
        "one re-list per 410"
    );
    for published in published.lock().unwrap().iter() {
        let names = service_names(published);
        assert!(
            names.contains(&"web".to_owned()),
            "a re-list lost web: {names:?}"
        );
    }
    assert!(!health.has_changed().unwrap(), "410 made the source stale");
}

/// Watches that only ever bring bookmarks: nothing is published, the source is not stale,
/// and a watch resumed afterwards starts from the last bookmark (no re-list, nothing lost).
#[tokio::test]
async fn bookmarks_only_publish_nothing_and_keep_the_resource_version_fresh() {
    let (mut h, before) = Harness::synced().await;
    let mut last = 0;
    for _ in 0..10 {
        // Other kinds' changes move the resource version on; only bookmarks tell services.
        h.server.apply(Watched::Nodes, &node("zone-a"));
        for kind in [Watched::Services, Watched::EndpointSlices] {
            last = h.server.bookmark(kind);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before_nodes = before.objects.nodes.len();
    let current = h.snapshots.borrow_and_update().clone().unwrap();
    assert_eq!(service_names(&current), ["web"]);
    assert_eq!(current.objects.nodes.len(), before_nodes);
    assert!(!h.health.is_stale());

    h.server.end_watches(Watched::Services);
    h.wait_for_watches(Watched::Services, 2).await;
    let resumed = h.server.seen(Watched::Services, true)[1].clone();
    assert_eq!(
        resumed.query.get("resourceVersion"),
        Some(&last.to_string()),
        "resumed from the last bookmark"
    );
    assert_eq!(
        h.server.seen(Watched::Services, false).len(),
        1,
        "no re-list"
    );
    h.recovers("bookmarks only").await;
}

/// A server that accepts connections and never answers: without a timeout of our own a
/// watcher would wait forever, not stale. With it, the source is stale within the timeout
/// plus the first backoff, nothing is published, and it recovers once the server answers.
#[tokio::test]
async fn a_server_that_never_answers_is_stale_within_the_timeout() {
    let (mut h, before) = Harness::synced().await;
    h.server.set_silent(true);
    for kind in Watched::ALL {
        h.server.break_watches(kind);
    }
    let stale_after = h.time_until_health(true).await;
    eprintln!(
        "never answering: stale after {} ms",
        stale_after.as_millis()
    );
    assert!(
        stale_after < FAULT_TIMEOUT.0 + Duration::from_secs(3),
        "{stale_after:?}"
    );
    let watches = h.server.seen(Watched::Services, true).len();
    // A retry after the backoff goes unanswered too.
    h.wait_for_requests(Watched::Services, true, watches, 1)
        .await;
    h.assert_still(&before, "the silence");
    assert!(h.health.is_stale());

    h.server.set_silent(false);
    h.recovers("a server that never answered").await;
}

/// The same from the start: a first list never answered holds back the first snapshot and
/// makes the source stale; once answered, the whole state is published.
#[tokio::test]
async fn a_first_list_never_answered_is_stale_and_publishes_nothing() {
    init_logs();
    let health = SourceHealth::new();
    let server = FakeApiServer::start().await;
    server.apply(Watched::Services, &service("web", "10.96.0.10", 80));
    server.apply(Watched::EndpointSlices, &slice("web", "10.0.0.1"));
    server.apply(Watched::Nodes, &node("zone-a"));
    server.set_silent(true);
    let client = server.client(&health, FAULT_TIMEOUT).await;
    let (snapshots, deltas, source) = spawn_source(client, identity(None), health.clone());
    let mut h = Harness {
        server,
        health,
        snapshots,
        deltas,
        _source: source,
    };
    h.time_until_health(true).await;
    assert!(h.snapshots.borrow().is_none(), "published without a list");

    h.server.set_silent(false);
    let first = h.snapshot("anything is published", |_| true).await;
    assert_eq!(service_names(&first), ["web"]);
    h.time_until_health(false).await;
}
