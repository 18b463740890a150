//! The API server as the source of objects, the way kube-proxy reads it.
//!
//! Three kube-rs watchers run side by side:
//!
//! * Services and EndpointSlices with kube-proxy's label selector
//!   (`!service.kubernetes.io/headless` and `!service.kubernetes.io/service-proxy-name`, or
//!   `service.kubernetes.io/service-proxy-name=NAME` with `--service-proxy-name NAME`), so
//!   objects that are not ours never reach this process;
//! * this node's Node only (`metadata.name=NODE`), for its topology labels.
//!
//! Every watcher event becomes a [`Delta`] at once (an `Apply` applies its object, a
//! `Delete` deletes it), published on the same channel the manifest source uses. No store of
//! the objects is kept here: each kind remembers only the resource version of every object
//! it has published ([`Published`]), so that a re-list (after `410 Gone`, or a watch that
//! could not resume) is diffed against what is known: only objects that are new, changed
//! (another resource version) or gone are in its delta. The first delta waits until all three
//! kinds have listed. Events that are ready together (a page of a list, a burst of updates)
//! make one delta; the agent merges the deltas waiting when it syncs.
//!
//! Resilience is the watcher's: it re-lists on `410 Gone`, resumes a watch that ended from
//! the last resource version (bookmarks keep that fresh), and retries failures with
//! [`WatchStreamExt::default_backoff`]. Errors never end the streams and never publish: while
//! the API server is unreachable the last state stays programmed (fail static) and
//! [`SourceHealth`] says the state is stale. A re-list is published only when it is
//! complete, so the agent never sees half a list.
//!
//! kube-rs sets no read timeout, so a server that accepts a connection and never answers
//! (or trickles a list forever) would hang a watcher without an error. The client's
//! [`HealthLayer`] bounds both with [`ApiTimeout`]: every answer must begin within it and a
//! list must be complete within it; past that the request fails, the kind is stale, and the
//! watcher retries with its backoff.
use std::{
    fmt,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use futures::{FutureExt as _, StreamExt as _, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config, Resource,
    client::ClientBuilder,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::watch;

use super::{Delta, DeltaSender};
use crate::model::{
    HEADLESS_LABEL, NodeInfo, ObjectChanges, ObjectKey, ProxyIdentity, SERVICE_PROXY_NAME_LABEL,
    ServiceInfo, Slice,
};

mod published;
mod timeout;

use published::{Key, Published};
pub use timeout::{ApiTimeout, DeadlineBody, HealthLayer, HealthService, TimedOut};

/// At most this many ready events are folded into one delta.
const MAX_BATCH: usize = 1024;

/// The kinds this source watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Watched {
    Services,
    EndpointSlices,
    Nodes,
}

impl Watched {
    pub const ALL: [Watched; 3] = [Self::Services, Self::EndpointSlices, Self::Nodes];

    /// The kind as Kubernetes spells it.
    pub fn kind(self) -> &'static str {
        match self {
            Self::Services => "Service",
            Self::EndpointSlices => "EndpointSlice",
            Self::Nodes => "Node",
        }
    }

    /// The resource as it appears in request paths.
    pub fn resource(self) -> &'static str {
        match self {
            Self::Services => "services",
            Self::EndpointSlices => "endpointslices",
            Self::Nodes => "nodes",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }

    /// The kind a list or watch request is for, from its path (`/api/v1/services`).
    pub fn of_path(path: &str) -> Option<Self> {
        let resource = path.trim_end_matches('/').rsplit('/').next()?;
        Self::ALL
            .into_iter()
            .find(|kind| kind.resource() == resource)
    }
}

impl fmt::Display for Watched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind())
    }
}

/// Whether what the API server source published is current.
///
/// A kind is failing from a watcher error until the API server next answers a request for
/// it or delivers an event for it; the source is stale while any kind is failing. Stale
/// means the published snapshot is the last known state, not that it is wrong. Cheap to
/// clone; all clones share one state.
#[derive(Clone, Debug)]
pub struct SourceHealth {
    inner: Arc<HealthInner>,
}

#[derive(Debug)]
struct HealthInner {
    /// When the API server last answered, in milliseconds since the Unix epoch; 0 = never.
    last_success_ms: AtomicU64,
    /// One bit per [`Watched`] kind whose latest attempt failed.
    failing: AtomicU8,
    /// Whether any kind is failing, for those that wait for transitions.
    stale: watch::Sender<bool>,
}

impl Default for SourceHealth {
    fn default() -> Self {
        Self::new()
    }
}

impl SourceHealth {
    pub fn new() -> Self {
        Self {
            inner: Arc::new(HealthInner {
                last_success_ms: AtomicU64::new(0),
                failing: AtomicU8::new(0),
                stale: watch::Sender::new(false),
            }),
        }
    }

    /// True while some watcher's latest attempt failed.
    pub fn is_stale(&self) -> bool {
        self.inner.failing.load(Ordering::Acquire) != 0
    }

    /// When the API server last answered a request or delivered an event; `None` before it
    /// ever did. An idle watch does not refresh this: use [`Self::is_stale`] for health.
    pub fn last_success(&self) -> Option<SystemTime> {
        match self.inner.last_success_ms.load(Ordering::Acquire) {
            0 => None,
            ms => Some(SystemTime::UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }

    /// The stale flag as a channel: `changed()` wakes on transitions.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.inner.stale.subscribe()
    }

    /// A tower layer for the API client that counts a watch's successful answer as contact
    /// (without it a watch that reconnects with nothing new to say would leave the source
    /// stale) and bounds every request by `timeout`. A list counts as contact only through
    /// the objects the watcher got out of it: an answer `200 OK` with a body that does not
    /// parse is no contact.
    pub fn layer(&self, timeout: ApiTimeout) -> HealthLayer {
        HealthLayer {
            health: self.clone(),
            timeout,
        }
    }

    /// Logs each transition until every `SourceHealth` clone is gone.
    pub async fn log_transitions(mut changes: watch::Receiver<bool>) {
        let mut logged = *changes.borrow_and_update();
        while changes.changed().await.is_ok() {
            let stale = *changes.borrow_and_update();
            if stale == logged {
                continue;
            }
            if stale {
                tracing::warn!("API server unreachable; serving the last known state");
            } else {
                tracing::info!("reconnected to the API server");
            }
            logged = stale;
        }
    }

    fn record_success(&self, kind: Watched) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(1, |d| d.as_millis().max(1) as u64);
        self.inner.last_success_ms.fetch_max(now, Ordering::AcqRel);
        if self.inner.failing.fetch_and(!kind.bit(), Ordering::AcqRel) & kind.bit() != 0 {
            self.publish_stale();
        }
    }

    fn record_failure(&self, kind: Watched) {
        if self.inner.failing.fetch_or(kind.bit(), Ordering::AcqRel) & kind.bit() == 0 {
            self.publish_stale();
        }
    }

    /// Brings the channel in line with the bits; reading them under the channel's lock keeps
    /// concurrent updates from publishing out of order.
    fn publish_stale(&self) {
        self.inner.stale.send_if_modified(|stale| {
            let now = self.is_stale();
            std::mem::replace(stale, now) != now
        });
    }
}

/// The API client: `kubeconfig` when given, else the in-cluster service account, else
/// `KUBECONFIG` or `~/.kube/config`. Its answers feed `health`.
///
/// In a cluster, `KUBERNETES_SERVICE_HOST` must name the API server itself (as kubeadm's
/// kube-proxy kubeconfig does), not the `kubernetes` ClusterIP: that address is served by this
/// agent and does not work before it has synced once.
pub async fn client(
    kubeconfig: Option<&Path>,
    health: &SourceHealth,
    timeout: ApiTimeout,
) -> anyhow::Result<Client> {
    let config = config(kubeconfig).await?;
    tracing::info!(server = %config.cluster_url, ?timeout, "reading objects from the API server");
    let builder = ClientBuilder::try_from(config).context("building the API client")?;
    Ok(builder.with_layer(&health.layer(timeout)).build())
}

async fn config(kubeconfig: Option<&Path>) -> anyhow::Result<Config> {
    if let Some(path) = kubeconfig {
        let file = Kubeconfig::read_from(path)
            .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
        return Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
            .await
            .with_context(|| format!("using the kubeconfig {}", path.display()));
    }
    match Config::incluster() {
        Ok(config) => Ok(config),
        Err(in_cluster) => {
            tracing::debug!(error = %in_cluster, "no in-cluster configuration; trying KUBECONFIG");
            Config::infer().await.context(
                "no API server: not in a cluster, no KUBECONFIG or ~/.kube/config \
                 (use --kubeconfig, or --manifests to serve a directory)",
            )
        }
    }
}

/// kube-proxy's label selector for Services and EndpointSlices.
pub fn label_selector(service_proxy_name: Option<&str>) -> String {
    match service_proxy_name {
        Some(name) => format!("!{HEADLESS_LABEL},{SERVICE_PROXY_NAME_LABEL}={name}"),
        None => format!("!{HEADLESS_LABEL},!{SERVICE_PROXY_NAME_LABEL}"),
    }
}

/// The field selector for this node's Node.
pub fn node_field_selector(node_name: &str) -> String {
    format!("metadata.name={node_name}")
}

/// Watches the API server and publishes a delta once every kind has listed (everything
/// listed), then one for every change, until the receiver is gone. A delta's `changed_at` is
/// when the first event it includes arrived.
pub async fn watch(
    client: Client,
    identity: ProxyIdentity,
    deltas: DeltaSender,
    health: SourceHealth,
) -> anyhow::Result<()> {
    let labels = label_selector(identity.service_proxy_name.as_deref());
    let by_labels = watcher::Config::default().any_semantic().labels(&labels);
    let this_node = watcher::Config::default()
        .any_semantic()
        .fields(&node_field_selector(&identity.node_name));
    let services = watch_kind(
        Api::<Service>::all(client.clone()),
        by_labels.clone(),
        Watched::Services,
        |changes, key, object| {
            let service = object.map(|service| Arc::new(ServiceInfo::from(&*service)));
            changes
                .services
                .insert(ObjectKey::new(key.0, key.1), service);
        },
    );
    let slices = watch_kind(
        Api::<EndpointSlice>::all(client.clone()),
        by_labels,
        Watched::EndpointSlices,
        |changes, key, object| {
            let slice = object.map(|slice| Arc::new(Slice::from(&*slice)));
            changes
                .endpoint_slices
                .insert(ObjectKey::new(key.0, key.1), slice);
        },
    );
    let nodes = watch_kind(
        Api::<Node>::all(client),
        this_node,
        Watched::Nodes,
        |changes, key, object| {
            let node = object.map(|node| Arc::new(NodeInfo::from(&*node)));
            changes.nodes.insert(key.1, node);
        },
    );
    let mut updates = futures::stream::select_all([services, slices, nodes]);
    let mut listed = 0u8;
    let mut pending: Option<Delta> = None;
    loop {
        let first = tokio::select! {
            update = updates.next() => update,
            () = deltas.closed() => return Ok(()),
        };
        let Some(first) = first else {
            anyhow::bail!("the API server watches ended");
        };
        let delta = pending.get_or_insert_with(|| Delta::empty(Instant::now()));
        let mut changed = handle(first, &health, &mut listed, delta);
        // Fold in whatever else is ready: one delta for a burst.
        for _ in 1..MAX_BATCH {
            match updates.next().now_or_never() {
                Some(Some(update)) => changed |= handle(update, &health, &mut listed, delta),
                _ => break,
            }
        }
        let all_listed = Watched::ALL.iter().all(|kind| listed & kind.bit() != 0);
        if changed && all_listed {
            let delta = pending.take().expect("a pending delta");
            tracing::debug!(objects = delta.objects.len(), "publishing a delta");
            if deltas.send(delta).is_err() {
                return Ok(());
            }
        }
    }
}

/// One watcher event, reduced to what the loop needs: whose it is, what it did, and the
/// objects it changed.
struct Update {
    kind: Watched,
    result: Result<(Change, ObjectChanges), watcher::Error>,
}

#[derive(Debug)]
enum Change {
    Applied(String),
    Deleted(String),
    /// A (re-)list started; what was published stays until it is done.
    Relisting,
    /// An object of a list in progress.
    Listed,
    /// A list is complete; its changes against what was published are in the update.
    Relisted,
}

impl Change {
    fn of<K: Resource>(event: &watcher::Event<K>) -> Self {
        match event {
            watcher::Event::Apply(object) => Self::Applied(display_name(object)),
            watcher::Event::Delete(object) => Self::Deleted(display_name(object)),
            watcher::Event::Init => Self::Relisting,
            watcher::Event::InitApply(_) => Self::Listed,
            watcher::Event::InitDone => Self::Relisted,
        }
    }
}

/// `namespace/name`, or `name` for cluster-scoped objects.
fn display_name<K: Resource>(object: &K) -> String {
    let name = object.meta().name.as_deref().unwrap_or("(no name)");
    match object.meta().namespace.as_deref() {
        Some(namespace) => format!("{namespace}/{name}"),
        None => name.to_owned(),
    }
}

/// A watcher with backoff for one kind, as a stream of [`Update`]s whose changes `record`
/// files under that kind.
fn watch_kind<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: Watched,
    record: fn(&mut ObjectChanges, Key, Option<Arc<K>>),
) -> BoxStream<'static, Update>
where
    K: Resource<DynamicType = ()> + Clone + fmt::Debug + serde::de::DeserializeOwned,
    K: Send + Sync + 'static,
{
    let mut published = Published::new();
    watcher(api, config)
        .default_backoff()
        // Managed fields are most of an object's bytes and nothing the model reads.
        .modify(|object: &mut K| object.meta_mut().managed_fields = None)
        .map(move |result| Update {
            kind,
            result: result.map(|event| {
                let change = Change::of(&event);
                let mut changes = ObjectChanges::default();
                for (key, object) in published.changes(event) {
                    record(&mut changes, key, object);
                }
                (change, changes)
            }),
        })
        .boxed()
}

/// Logs an update, records it in `health` and `listed`, and folds its changes into `delta`;
/// true when it changed what is published.
fn handle(update: Update, health: &SourceHealth, listed: &mut u8, delta: &mut Delta) -> bool {
    let kind = update.kind;
    let (change, changes) = match update.result {
        Ok(found) => found,
        Err(error) => {
            record_error(kind, &error, health);
            return false;
        }
    };
    // The watcher announces a (re-)list before it asks for it: that is no answer yet, and
    // counting it would make a kind whose list keeps failing look healthy at every retry.
    if !matches!(change, Change::Relisting) {
        health.record_success(kind);
    }
    let first_list = *listed & kind.bit() == 0;
    match change {
        Change::Applied(name) => tracing::debug!(%kind, object = %name, "applied"),
        Change::Deleted(name) => tracing::debug!(%kind, object = %name, "deleted"),
        Change::Relisting => {
            tracing::debug!(%kind, "listing");
            return false;
        }
        Change::Listed => return false,
        Change::Relisted => {
            tracing::debug!(%kind, changed = changes.len(), "listed");
            *listed |= kind.bit();
        }
    }
    delta.objects.merge(changes);
    // A first list publishes even when it found nothing: the agent programs that too.
    first_list || !delta.objects.is_empty()
}

fn record_error(kind: Watched, error: &watcher::Error, health: &SourceHealth) {
    if is_expired(error) {
        // The watcher re-lists; that is routine, not an outage.
        tracing::info!(%kind, %error, "resource version expired; re-listing");
        return;
    }
    health.record_failure(kind);
    tracing::warn!(%kind, %error, "watch failed; retrying with backoff, the last state stays");
}

/// `410 Gone`: the resource version or list continuation is too old to resume from.
fn is_expired(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::WatchError(status) => status.code == 410,
        watcher::Error::InitialListFailed(kube::Error::Api(status)) => status.code == 410,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_follow_kube_proxy() {
        assert_eq!(
            label_selector(None),
            "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name"
        );
        assert_eq!(
            label_selector(Some("lb")),
            "!service.kubernetes.io/headless,service.kubernetes.io/service-proxy-name=lb"
        );
        assert_eq!(node_field_selector("node-1"), "metadata.name=node-1");
    }

    #[test]
    fn request_paths_name_their_kind() {
        assert_eq!(
            Watched::of_path("/api/v1/services"),
            Some(Watched::Services)
        );
        assert_eq!(
            Watched::of_path("/apis/discovery.k8s.io/v1/endpointslices"),
            Some(Watched::EndpointSlices)
        );
        assert_eq!(Watched::of_path("/api/v1/nodes"), Some(Watched::Nodes));
        assert_eq!(Watched::of_path("/api/v1/pods"), None);
        assert_eq!(Watched::of_path(""), None);
    }

    #[test]
    fn stale_while_any_kind_fails() {
        let health = SourceHealth::new();
        let changes = health.subscribe();
        assert!(!health.is_stale());
        assert_eq!(health.last_success(), None);
        health.record_failure(Watched::Services);
        health.record_failure(Watched::Nodes);
        assert!(health.is_stale() && *changes.borrow());
        health.record_success(Watched::Services);
        assert!(health.is_stale(), "nodes still fail");
        health.record_success(Watched::Nodes);
        assert!(!health.is_stale() && !*changes.borrow());
        assert!(health.last_success().is_some());
    }

    #[tokio::test]
    async fn client_from_an_explicit_kubeconfig() {
        let path = std::env::temp_dir().join(format!("lb-agent-kubeconfig-{}", std::process::id()));
        let kubeconfig = r#"
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {server: "https://127.0.0.1:6443", insecure-skip-tls-verify: true}
users:
- name: test
  user: {token: secret}
contexts:
- name: test
  context: {cluster: test, user: test, namespace: lb}
current-context: test
"#;
        std::fs::write(&path, kubeconfig).expect("writing a temporary file");
        let built = client(Some(&path), &SourceHealth::new(), ApiTimeout::DEFAULT).await;
        let _ = std::fs::remove_file(&path);
        // Building the client also proves TLS has a crypto provider.
        assert_eq!(built.expect("a client").default_namespace(), "lb");

        let missing = Path::new("/nonexistent/kubeconfig");
        let error = client(Some(missing), &SourceHealth::new(), ApiTimeout::DEFAULT).await;
        let Err(error) = error else {
            panic!("a client from a missing kubeconfig")
        };
        let message = format!("{error:#}");
        assert!(message.contains("/nonexistent/kubeconfig"), "{message}");
    }

    #[test]
    fn gone_is_routine() {
        let status = |code| kube::core::Status {
            code,
            ..Default::default()
        };
        assert!(is_expired(&watcher::Error::WatchError(Box::new(status(
            410
        )))));
        assert!(is_expired(&watcher::Error::InitialListFailed(
            kube::Error::Api(Box::new(status(410)))
        )));
        assert!(!is_expired(&watcher::Error::WatchError(Box::new(status(
            500
        )))));
        assert!(!is_expired(&watcher::Error::NoResourceVersion));
    }
}
