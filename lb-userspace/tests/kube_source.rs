//! The API server source against a fake API server: a `tower_test` mock service behind a real
//! `kube::Client` (the pattern kube-rs documents for its users), answering list and watch
//! requests with JSON made from k8s-openapi objects. The fake keeps a resource version and an
//! event log like etcd does, so a watch resumed from a resource version replays what it
//! missed, and a compacted log answers with `410 Gone`.
use std::{
    collections::{BTreeMap, HashMap},
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
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
        Snapshot,
        kube::{SourceHealth, Watched},
    },
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tower::Layer as _;

const NODE: &str = "node-1";
/// Longest wait for anything the source should do; backoffs after errors are about 1-3 s.
const PATIENCE: Duration = Duration::from_secs(20);

type Snapshots = watch::Receiver<Option<Arc<Snapshot>>>;

// ---------------------------------------------------------------------------------------
// The fake API server.

/// A response body fed from a channel: a watch's events; dropping the sender ends the body
/// (the server closed the connection), sending an error breaks it.
struct ChannelBody(mpsc::UnboundedReceiver<Result<Bytes, io::Error>>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|chunk| chunk.map(Frame::data)))
    }
}

fn body(chunks: impl IntoIterator<Item = String>) -> ChannelBody {
    let (tx, rx) = mpsc::unbounded_channel();
    for chunk in chunks {
        let _ = tx.send(Ok(Bytes::from(chunk)));
    }
    ChannelBody(rx)
}

type Respond = tower_test::mock::SendResponse<Response<ChannelBody>>;
type Handle = tower_test::mock::Handle<Request<kube::client::Body>, Response<ChannelBody>>;
type Line = mpsc::UnboundedSender<Result<Bytes, io::Error>>;

/// One resource (services, endpointslices or nodes) of the fake server.
#[derive(Default)]
struct Resource {
    /// By `namespace/name`.
    objects: BTreeMap<String, Value>,
    /// Event lines by the resource version they made.
    log: Vec<(u64, String)>,
    /// Watches from before this resource version get `410 Gone`.
    compacted: u64,
    watches: Vec<Line>,
    /// While set, requests get this error status.
    fail: Option<StatusCode>,
    /// While set, requests wait in `held`.
    hold: bool,
    held: Vec<(Request<kube::client::Body>, Respond)>,
}

/// A request as the fake saw it.
#[derive(Clone, Debug)]
struct Seen {
    kind: Watched,
    watch: bool,
    /// Refused while the server was unreachable.
    refused: bool,
    query: HashMap<String, String>,
}

#[derive(Default)]
struct State {
    /// The last resource version handed out; one counter for all kinds, as etcd's.
    version: u64,
    resources: HashMap<Watched, Resource>,
    unreachable: bool,
    seen: Vec<Seen>,
}

#[derive(Clone, Default)]
struct FakeApiServer(Arc<Mutex<State>>);

impl FakeApiServer {
    /// A client talking to a new fake server, with `health` observing it as in production.
    fn start(health: &SourceHealth) -> (Self, kube::Client) {
        let (service, handle) = tower_test::mock::pair();
        let server = Self::default();
        tokio::spawn(server.clone().serve(handle));
        let client = kube::Client::new(health.layer().layer(service), "default");
        (server, client)
    }

    async fn serve(self, mut handle: Handle) {
        while let Some((request, respond)) = handle.next_request().await {
            self.answer(request, respond);
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn answer(&self, request: Request<kube::client::Body>, respond: Respond) {
        let mut state = self.state();
        let Some(kind) = Watched::of_path(request.uri().path()) else {
            respond.send_response(status_response(StatusCode::NOT_FOUND, "no such resource"));
            return;
        };
        let query = parse_query(request.uri().query().unwrap_or_default());
        let watch = query.get("watch").is_some_and(|w| w == "true");
        let refused = state.unreachable;
        state.seen.push(Seen {
            kind,
            watch,
            refused,
            query: query.clone(),
        });
        if refused {
            respond.send_error(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "connection refused",
            ));
            return;
        }
        let version = state.version;
        let resource = state.resources.entry(kind).or_default();
        if let Some(code) = resource.fail {
            respond.send_response(status_response(code, "injected failure"));
        } else if resource.hold {
            resource.held.push((request, respond));
        } else if watch {
            let since = query
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            respond.send_response(Response::new(resource.watch(since)));
        } else {
            respond.send_response(Response::new(body([resource.list(kind, version)])));
        }
    }

    /// Creates or replaces an object, as `kubectl apply` would.
    fn apply(&self, kind: Watched, object: &impl serde::Serialize) {
        let mut state = self.state();
        state.version += 1;
        let version = state.version;
        let mut object = serde_json::to_value(object).expect("fixtures serialize");
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        let key = key_of(&object);
        let resource = state.resources.entry(kind).or_default();
        let event = if resource.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        resource.record(version, event, &object);
        resource.objects.insert(key, object);
    }

    fn delete(&self, kind: Watched, key: &str) {
        let mut state = self.state();
        state.version += 1;
        let version = state.version;
        let resource = state.resources.entry(kind).or_default();
        let mut object = resource.objects.remove(key).expect("deleting what exists");
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        resource.record(version, "DELETED", &object);
    }

    /// Sends a BOOKMARK at the current resource version to `kind`'s open watches; returns it.
    fn bookmark(&self, kind: Watched) -> u64 {
        let mut state = self.state();
        let version = state.version;
        let line = event_line(
            "BOOKMARK",
            &json!({
                "apiVersion": api_version(kind),
                "kind": kind.kind(),
                "metadata": {"resourceVersion": version.to_string()},
            }),
        );
        state.resources.entry(kind).or_default().broadcast(&line);
        version
    }

    /// Forgets history: watches from before now get `410 Gone`.
    fn compact(&self) {
        let mut state = self.state();
        let version = state.version;
        for resource in state.resources.values_mut() {
            resource.compacted = version;
            resource.log.retain(|(v, _)| *v > version);
        }
    }

    /// Closes `kind`'s open watches cleanly, as the server does at a watch's timeout.
    fn end_watches(&self, kind: Watched) {
        self.state()
            .resources
            .entry(kind)
            .or_default()
            .watches
            .clear();
    }

    /// While unreachable, open connections break and new ones are refused.
    fn set_unreachable(&self, unreachable: bool) {
        let mut state = self.state();
        state.unreachable = unreachable;
        if unreachable {
            for resource in state.resources.values_mut() {
                for watch in resource.watches.drain(..) {
                    let _ = watch.send(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "connection reset by peer",
                    )));
                }
            }
        }
    }

    /// Answers `kind`'s requests with an error status while `code` is set.
    fn fail(&self, kind: Watched, code: Option<StatusCode>) {
        self.state().resources.entry(kind).or_default().fail = code;
    }

    /// Holds `kind`'s requests unanswered until [`Self::release`].
    fn hold(&self, kind: Watched) {
        self.state().resources.entry(kind).or_default().hold = true;
    }

    fn release(&self, kind: Watched) {
        let held = {
            let mut state = self.state();
            let resource = state.resources.entry(kind).or_default();
            resource.hold = false;
            std::mem::take(&mut resource.held)
        };
        for (request, respond) in held {
            self.answer(request, respond);
        }
    }

    fn seen(&self, kind: Watched, watch: bool) -> Vec<Seen> {
        let state = self.state();
        let seen = state.seen.iter();
        seen.filter(|s| s.kind == kind && s.watch == watch && !s.refused)
            .cloned()
            .collect()
    }

    fn refused(&self, kind: Watched) -> usize {
        let state = self.state();
        state
            .seen
            .iter()
            .filter(|s| s.kind == kind && s.refused)
            .count()
    }
}

impl Resource {
    fn record(&mut self, version: u64, event: &str, object: &Value) {
        let line = event_line(event, object);
        self.log.push((version, line.clone()));
        self.broadcast(&line);
    }

    fn broadcast(&mut self, line: &str) {
        self.watches
            .retain(|watch| watch.send(Ok(Bytes::from(line.to_owned()))).is_ok());
    }

    fn list(&self, kind: Watched, version: u64) -> String {
        let list = json!({
            "apiVersion": api_version(kind),
            "kind": format!("{}List", kind.kind()),
            "metadata": {"resourceVersion": version.to_string()},
            "items": self.objects.values().collect::<Vec<_>>(),
        });
        list.to_string()
    }

    /// A watch from `since`: what happened after it, then live events; or `410 Gone`.
    fn watch(&mut self, since: u64) -> ChannelBody {
        if since < self.compacted {
            let gone = json!({
                "apiVersion": "v1",
                "kind": "Status",
                "metadata": {},
                "status": "Failure",
                "message": format!("too old resource version: {since} ({})", self.compacted),
                "reason": "Expired",
                "code": 410,
            });
            return body([event_line("ERROR", &gone)]);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        for (_, line) in self.log.iter().filter(|(v, _)| *v > since) {
            let _ = tx.send(Ok(Bytes::from(line.clone())));
        }
        self.watches.push(tx);
        ChannelBody(rx)
    }
}

fn event_line(event: &str, object: &Value) -> String {
    format!("{}\n", json!({"type": event, "object": object}))
}

fn api_version(kind: Watched) -> &'static str {
    match kind {
        Watched::EndpointSlices => "discovery.k8s.io/v1",
        Watched::Services | Watched::Nodes => "v1",
    }
}

fn key_of(object: &Value) -> String {
    let meta = &object["metadata"];
    let name = meta["name"].as_str().unwrap_or_default();
    match meta["namespace"].as_str() {
        Some(namespace) => format!("{namespace}/{name}"),
        None => name.to_owned(),
    }
}

fn status_response(code: StatusCode, message: &str) -> Response<ChannelBody> {
    let status = json!({
        "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
        "message": message, "code": code.as_u16(),
    });
    let mut response = Response::new(body([status.to_string()]));
    *response.status_mut() = code;
    response
}

fn parse_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(key), decode(value))
        })
        .collect()
}

/// `application/x-www-form-urlencoded` decoding, enough for selectors.
fn decode(text: &str) -> String {
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(byte) = bytes.next() {
        match byte {
            b'+' => out.push(b' '),
            b'%' => {
                let hex: String = bytes.by_ref().take(2).map(char::from).collect();
                out.push(u8::from_str_radix(&hex, 16).unwrap_or(b'?'));
            }
            other => out.push(other),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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
    _source: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Harness {
    fn new(hold: Option<Watched>, service_proxy_name: Option<&str>) -> Self {
        init_logs();
        let health = SourceHealth::new();
        let (server, client) = FakeApiServer::start(&health);
        server.apply(Watched::Services, &service("web", "10.96.0.10", 80));
        server.apply(Watched::EndpointSlices, &slice("web", "10.0.0.1"));
        server.apply(Watched::Nodes, &node("zone-a"));
        if let Some(kind) = hold {
            server.hold(kind);
        }
        let (tx, snapshots) = watch::channel(None);
        let source = tokio::spawn(lb_agent::source::kube::watch(
            client,
            identity(service_proxy_name),
            tx,
            health.clone(),
        ));
        Self {
            server,
            health,
            snapshots,
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
    Some(service.spec.as_ref()?.ports.as_ref()?.first()?.port)
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
    let mut h = Harness::new(Some(Watched::Nodes), None);
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
    let mut h = Harness::new(None, Some("lb"));
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
    let mut h = Harness::new(None, None);
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
        .map(|s| s.name.name.clone())
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
        let labels = s
            .objects
            .nodes
            .get(NODE)
            .and_then(|n| n.metadata.labels.clone());
        labels.is_some_and(|l| l["topology.kubernetes.io/zone"] == "zone-b")
    })
    .await;
    assert!(!h.health.is_stale());
}

/// A watch the server ends is resumed from the last resource version (here a bookmark's),
/// without an error and without losing what happened in between.
#[tokio::test]
async fn resumes_a_dropped_watch_from_the_last_bookmark() {
    let mut h = Harness::new(None, None);
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
    let mut h = Harness::new(None, None);
    h.server
        .apply(Watched::Services, &service("old", "10.96.0.20", 80));
    h.snapshot("web and old are there", |s| s.objects.services.len() == 2)
        .await;
    h.wait_for_watches(Watched::Services, 1).await;
    let health = h.health.subscribe();

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
    assert_eq!(service_names(&snapshot), ["new", "web"]);
    assert_eq!(port_of(&snapshot, &web()), Some(8080));
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
    h.snapshot("new is removed", |s| s.objects.services.len() == 1)
        .await;
}

/// While the API server is unreachable nothing is published: the last snapshot stays and
/// health says stale. Once it answers again health recovers, even with nothing new to say
/// (a watch resumed from its resource version sends no event), and changes flow again.
#[tokio::test]
async fn keeps_the_last_snapshot_while_the_api_server_is_unreachable() {
    let mut h = Harness::new(None, None);
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
    let (server, client) = FakeApiServer::start(&health);
    server.apply(Watched::Services, &service("web", "10.96.0.10", 80));
    server.apply(Watched::Nodes, &node("zone-a"));
    server.fail(Watched::Nodes, Some(StatusCode::FORBIDDEN));
    let (tx, snapshots) = watch::channel(None);
    let source = lb_agent::source::kube::watch(client, identity(None), tx, health.clone());
    let mut h = Harness {
        server,
        health,
        snapshots,
        _source: tokio::spawn(source),
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
    let h = Harness::new(None, None);
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
