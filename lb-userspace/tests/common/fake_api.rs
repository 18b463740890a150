//! A fake Kubernetes API server over real HTTP on 127.0.0.1, for the API server source and
//! for the agent binary (`lb-agent run --kubeconfig`). It answers list and watch requests
//! for services, endpointslices and nodes with JSON from a test-controlled state, keeps a
//! resource version and an event log like etcd does (a watch resumed from a resource version
//! replays what it missed; a compacted log answers `410 Gone`), and injects faults: error
//! statuses (with `Retry-After`), connections refused or reset, garbage list bodies, raw
//! lines in watch streams, watches cut mid-event, lists that trickle, watches answered
//! `410 Gone` N times, and requests accepted and never answered.
#![allow(dead_code)] // each test file uses a different part of the fake

use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Response, StatusCode, Uri};
use http_body::Frame;
use hyper_util::rt::TokioIo;
use lb_agent::source::kube::{ApiTimeout, SourceHealth, Watched};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

/// A response body fed from a channel: a watch's events; dropping the sender ends the body
/// (the server closed the watch cleanly), sending an error breaks the connection.
pub struct ChannelBody(mpsc::UnboundedReceiver<Result<Bytes, io::Error>>);

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

/// Where an answer goes: the connection's task, which sends it or (on `Err`) closes the
/// connection without an answer.
type Respond = oneshot::Sender<Result<Response<ChannelBody>, io::Error>>;
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
    /// While set, requests get this error status (and `Retry-After` seconds).
    fail: Option<(StatusCode, Option<u32>)>,
    /// While set, lists are answered `200 OK` with this body.
    list_body: Option<String>,
    /// While set, list bodies come a few bytes at a time, this far apart.
    trickle: Option<Duration>,
    /// This many watch requests to come are answered with a `410 Gone` event.
    gone: usize,
    /// While set, requests wait in `held`.
    hold: bool,
    held: Vec<(Uri, Respond)>,
}

/// A request as the fake saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub kind: Watched,
    pub watch: bool,
    /// Refused while the server was unreachable.
    pub refused: bool,
    pub query: HashMap<String, String>,
    /// When it came.
    pub at: std::time::Instant,
}

#[derive(Default)]
struct State {
    /// The last resource version handed out; one counter for all kinds, as etcd's.
    version: u64,
    resources: HashMap<Watched, Resource>,
    unreachable: bool,
    /// While set, requests are accepted and never answered.
    silent: bool,
    /// The answers never given; kept so their connections stay open (and silent).
    silenced: Vec<Respond>,
    seen: Vec<Seen>,
}

struct Shared {
    state: Mutex<State>,
    address: SocketAddr,
    kubeconfig: PathBuf,
}

impl Drop for Shared {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

/// The fake API server; clones share it. It serves until the runtime it started on ends.
#[derive(Clone)]
pub struct FakeApiServer(Arc<Shared>);

impl FakeApiServer {
    /// Starts a server on a free port of 127.0.0.1, with a kubeconfig pointing at it.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the fake API server");
        let address = listener.local_addr().expect("a bound address");
        let kubeconfig = std::env::temp_dir().join(lb_testkit::unique_name("lbt-kubeconfig"));
        std::fs::write(&kubeconfig, kubeconfig_for(address)).expect("writing the kubeconfig");
        let server = Self(Arc::new(Shared {
            state: Mutex::default(),
            address,
            kubeconfig,
        }));
        // The accept loop holds only a weak reference: dropping the last clone stops it.
        let weak = Arc::downgrade(&server.0);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if weak.strong_count() == 0 {
                    break;
                }
                tokio::spawn(serve_connection(weak.clone(), stream));
            }
        });
        server
    }

    pub fn address(&self) -> SocketAddr {
        self.0.address
    }

    /// A kubeconfig file (plain http, no credentials) for this server; removed with it.
    pub fn kubeconfig(&self) -> &std::path::Path {
        &self.0.kubeconfig
    }

    /// The agent's own API client (`--kubeconfig` with this server's file), observed by
    /// `health` as in production.
    pub async fn client(&self, health: &SourceHealth, timeout: ApiTimeout) -> kube::Client {
        lb_agent::source::kube::client(Some(self.kubeconfig()), health, timeout)
            .await
            .expect("a client for the fake API server")
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn answer(&self, uri: Uri, respond: Respond) {
        let mut state = self.state();
        let Some(kind) = Watched::of_path(uri.path()) else {
            let _ = respond.send(Ok(status_response(
                StatusCode::NOT_FOUND,
                None,
                "no such resource",
            )));
            return;
        };
        let query = parse_query(uri.query().unwrap_or_default());
        let watch = query.get("watch").is_some_and(|w| w == "true");
        let refused = state.unreachable;
        state.seen.push(Seen {
            kind,
            watch,
            refused,
            query: query.clone(),
            at: std::time::Instant::now(),
        });
        if refused {
            let _ = respond.send(Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "connection refused",
            )));
            return;
        }
        if state.silent {
            state.silenced.push(respond);
            return;
        }
        let version = state.version;
        let resource = state.resources.entry(kind).or_default();
        let response = if let Some((code, retry_after)) = resource.fail {
            status_response(code, retry_after, "injected failure")
        } else if resource.hold {
            resource.held.push((uri, respond));
            return;
        } else if watch && resource.gone > 0 {
            resource.gone -= 1;
            Response::new(body([gone_line(0, resource.compacted)]))
        } else if watch {
            let since = query
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            Response::new(resource.watch(since))
        } else {
            let list = resource
                .list_body
                .clone()
                .unwrap_or_else(|| resource.list(kind, version));
            match resource.trickle {
                Some(gap) => Response::new(trickle(list, gap)),
                None => Response::new(body([list])),
            }
        };
        let _ = respond.send(Ok(response));
    }

    /// Creates or replaces an object given as JSON (or YAML turned into JSON), as `kubectl
    /// apply` would; returns its resource version.
    pub fn apply_value(&self, kind: Watched, mut object: Value) -> u64 {
        let mut state = self.state();
        state.version += 1;
        let version = state.version;
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
        version
    }

    /// [`Self::apply_value`] for a k8s-openapi object.
    pub fn apply(&self, kind: Watched, object: &impl serde::Serialize) -> u64 {
        self.apply_value(
            kind,
            serde_json::to_value(object).expect("fixtures serialize"),
        )
    }

    /// [`Self::apply_value`] for a YAML manifest.
    pub fn apply_yaml(&self, kind: Watched, yaml: &str) -> u64 {
        let object: Value = serde_yaml::from_str(yaml).expect("a YAML manifest");
        self.apply_value(kind, object)
    }

    /// Applies an object, but the open watches of `kind` get only the first half of its
    /// event line and then end (cleanly, or `reset`): the connection closes halfway through
    /// an event. The log
    /// has the whole event, so a watch resumed from before it gets it.
    pub fn apply_cut_mid_event(&self, kind: Watched, object: &impl serde::Serialize, reset: bool) {
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
        let line = event_line(event, &object);
        resource.log.push((version, line.clone()));
        let half = Bytes::from(line[..line.len() / 2].to_owned());
        for watch in resource.watches.drain(..) {
            let _ = watch.send(Ok(half.clone()));
            if reset {
                let _ = watch.send(Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "connection reset by peer",
                )));
            }
        }
        resource.objects.insert(key, object);
    }

    pub fn delete(&self, kind: Watched, key: &str) {
        let mut state = self.state();
        state.version += 1;
        let version = state.version;
        let resource = state.resources.entry(kind).or_default();
        let mut object = resource.objects.remove(key).expect("deleting what exists");
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        resource.record(version, "DELETED", &object);
    }

    /// The objects of `kind` the server holds, by `namespace/name`.
    pub fn keys(&self, kind: Watched) -> Vec<String> {
        let mut state = self.state();
        let resource = state.resources.entry(kind).or_default();
        resource.objects.keys().cloned().collect()
    }

    /// Sends a BOOKMARK at the current resource version to `kind`'s open watches; returns it.
    pub fn bookmark(&self, kind: Watched) -> u64 {
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

    /// Sends `line` as it is (not JSON, the wrong kind, truncated...) to `kind`'s open
    /// watches.
    pub fn inject(&self, kind: Watched, line: &str) {
        self.state()
            .resources
            .entry(kind)
            .or_default()
            .broadcast(line);
    }

    /// Moves the resource version on, as changes to resources nobody here watches do.
    pub fn change_elsewhere(&self) {
        self.state().version += 1;
    }

    /// How many watches of `kind` are open (their client still reading).
    pub fn open_watches(&self, kind: Watched) -> usize {
        let mut state = self.state();
        let watches = &mut state.resources.entry(kind).or_default().watches;
        watches.retain(|watch| !watch.is_closed());
        watches.len()
    }

    /// Forgets history: watches from before now get `410 Gone`.
    pub fn compact(&self) {
        let mut state = self.state();
        let version = state.version;
        for resource in state.resources.values_mut() {
            resource.compacted = version;
            resource.log.retain(|(v, _)| *v > version);
        }
    }

    /// Closes `kind`'s open watches cleanly, as the server does at a watch's timeout.
    pub fn end_watches(&self, kind: Watched) {
        self.state()
            .resources
            .entry(kind)
            .or_default()
            .watches
            .clear();
    }

    /// Breaks `kind`'s open watches (connection reset).
    pub fn break_watches(&self, kind: Watched) {
        let mut state = self.state();
        for watch in state.resources.entry(kind).or_default().watches.drain(..) {
            let _ = watch.send(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "connection reset by peer",
            )));
        }
    }

    /// While unreachable, open connections break and new requests are refused (their
    /// connection closes without an answer).
    pub fn set_unreachable(&self, unreachable: bool) {
        self.state().unreachable = unreachable;
        if unreachable {
            for kind in Watched::ALL {
                self.break_watches(kind);
            }
        }
    }

    /// While silent, requests are accepted and never answered; those already made stay
    /// unanswered afterwards too, as on a server that hung.
    pub fn set_silent(&self, silent: bool) {
        self.state().silent = silent;
    }

    /// Answers `kind`'s requests with an error status while `code` is set.
    pub fn fail(&self, kind: Watched, code: Option<StatusCode>) {
        self.fail_retry_after(kind, code, None);
    }

    /// [`Self::fail`] with a `Retry-After` header (seconds), as 429 and 503 come.
    pub fn fail_retry_after(&self, kind: Watched, code: Option<StatusCode>, after: Option<u32>) {
        self.state().resources.entry(kind).or_default().fail = code.map(|code| (code, after));
    }

    /// Answers `kind`'s lists `200 OK` with this body while it is set.
    pub fn list_body(&self, kind: Watched, body: Option<&str>) {
        self.state().resources.entry(kind).or_default().list_body = body.map(str::to_owned);
    }

    /// Sends `kind`'s list bodies a few bytes every `gap` while it is set.
    pub fn trickle_lists(&self, kind: Watched, gap: Option<Duration>) {
        self.state().resources.entry(kind).or_default().trickle = gap;
    }

    /// Answers `kind`'s next `count` watch requests with `410 Gone`.
    pub fn gone_watches(&self, kind: Watched, count: usize) {
        self.state().resources.entry(kind).or_default().gone = count;
    }

    /// Holds `kind`'s requests unanswered until [`Self::release`].
    pub fn hold(&self, kind: Watched) {
        self.state().resources.entry(kind).or_default().hold = true;
    }

    pub fn release(&self, kind: Watched) {
        let held = {
            let mut state = self.state();
            let resource = state.resources.entry(kind).or_default();
            resource.hold = false;
            std::mem::take(&mut resource.held)
        };
        for (uri, respond) in held {
            self.answer(uri, respond);
        }
    }

    /// The requests for `kind` (watches or lists) that were not refused.
    pub fn seen(&self, kind: Watched, watch: bool) -> Vec<Seen> {
        let state = self.state();
        let seen = state.seen.iter();
        seen.filter(|s| s.kind == kind && s.watch == watch && !s.refused)
            .cloned()
            .collect()
    }

    pub fn refused(&self, kind: Watched) -> usize {
        let state = self.state();
        state
            .seen
            .iter()
            .filter(|s| s.kind == kind && s.refused)
            .count()
    }
}

/// Serves one connection: every request goes to the server's state, which answers at once,
/// later (held, watches) or never (silent).
async fn serve_connection(server: std::sync::Weak<Shared>, stream: tokio::net::TcpStream) {
    let service = hyper::service::service_fn(move |request: http::Request<_>| {
        let server = server.upgrade().map(FakeApiServer);
        async move {
            let Some(server) = server else {
                return Err(io::Error::other("the fake API server is gone"));
            };
            let (respond, answer) = oneshot::channel();
            server.answer(request.uri().clone(), respond);
            drop(server);
            match answer.await {
                Ok(answer) => answer,
                Err(_) => Err(io::Error::other("the fake API server is gone")),
            }
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
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
            return body([gone_line(since, self.compacted)]);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        for (_, line) in self.log.iter().filter(|(v, _)| *v > since) {
            let _ = tx.send(Ok(Bytes::from(line.clone())));
        }
        self.watches.push(tx);
        ChannelBody(rx)
    }
}

/// A body sending `text` 16 bytes every `gap`.
fn trickle(text: String, gap: Duration) -> ChannelBody {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        for chunk in text.as_bytes().chunks(16) {
            tokio::time::sleep(gap).await;
            if tx.send(Ok(Bytes::copy_from_slice(chunk))).is_err() {
                return;
            }
        }
    });
    ChannelBody(rx)
}

fn gone_line(since: u64, compacted: u64) -> String {
    let gone = json!({
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "message": format!("too old resource version: {since} ({compacted})"),
        "reason": "Expired",
        "code": 410,
    });
    event_line("ERROR", &gone)
}

pub fn event_line(event: &str, object: &Value) -> String {
    format!("{}\n", json!({"type": event, "object": object}))
}

pub fn api_version(kind: Watched) -> &'static str {
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

fn status_response(
    code: StatusCode,
    retry_after: Option<u32>,
    message: &str,
) -> Response<ChannelBody> {
    let status = json!({
        "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
        "message": message, "code": code.as_u16(),
    });
    let mut response = Response::new(body([status.to_string()]));
    *response.status_mut() = code;
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert(http::header::RETRY_AFTER, seconds.into());
    }
    response
}

fn kubeconfig_for(address: SocketAddr) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster: {{server: \"http://{address}\"}}
users:
- name: fake
  user: {{}}
contexts:
- name: fake
  context: {{cluster: fake, user: fake}}
current-context: fake
"
    )
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
