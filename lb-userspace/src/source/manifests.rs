//! A directory of ordinary Kubernetes YAML (or JSON) as the source of objects: files as
//! `kubectl apply -f` takes them or `kubectl get -o yaml` prints them, one or many documents
//! per file, `kind: List` included. The directory is watched (inotify, with a slow poll as a
//! backstop) and every change produces a fresh snapshot.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{Endpoints, Node, Service},
    discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use notify::Watcher as _;
use serde::Deserialize as _;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, watch};

use super::Snapshot;
use crate::model::{ObjectKey, ObjectRef, Objects, endpoints::SERVICE_NAME_LABEL};

/// Files with these extensions are read; others (READMEs, editor backups) are ignored.
const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];
/// Changes arriving this close together are read as one.
const DEBOUNCE: Duration = Duration::from_millis(10);
/// A re-read even without inotify events (network filesystems, missed events).
const POLL: Duration = Duration::from_secs(2);
/// The mirroring controller's opt-out label on v1 Endpoints.
const SKIP_MIRROR_LABEL: &str = "endpointslice.kubernetes.io/skip-mirror";

/// Reads every manifest under `dir` into one snapshot; problems are collected, never fatal.
pub fn read_dir(dir: &Path) -> Snapshot {
    ManifestCache::default()
        .read(dir)
        .unwrap_or_else(|| unreachable!("a first read always yields a snapshot"))
}

/// What identifies a file's version without reading it: size, modification time, inode (an
/// editor's or `kubectl get > f`'s atomic replace makes a new inode).
type FileStamp = (u64, i128, u64);

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).ok()?;
    Some((
        meta.len(),
        i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        meta.ino(),
    ))
}

/// The parsed contents of every file, kept between reads: a file whose stamp did not change
/// is not read again and keeps its objects' `Arc`s, so the model recomputes only the services
/// whose files changed.
#[derive(Default)]
pub struct ManifestCache {
    files: BTreeMap<PathBuf, (FileStamp, Arc<Reader>)>,
    mirrors: BTreeMap<ObjectKey, Mirrored>,
    listed: bool,
}

/// The slices mirrored from one v1 Endpoints object.
struct Mirrored {
    endpoints: Arc<Endpoints>,
    slices: Vec<(ObjectKey, Arc<EndpointSlice>)>,
}

impl ManifestCache {
    /// A snapshot of `dir`, or `None` when no file changed since the last call.
    pub fn read(&mut self, dir: &Path) -> Option<Snapshot> {
        let mut problems = Vec::new();
        let files = manifest_files(dir).unwrap_or_else(|error| {
            problems.push(format!(
                "{}: cannot list the directory: {error}",
                dir.display()
            ));
            Vec::new()
        });
        let mut changed = !self.listed || files.len() != self.files.len();
        let mut next = BTreeMap::new();
        for file in files {
            let Some(stamp) = stamp(&file) else { continue };
            let parsed = match self.files.remove(&file) {
                Some((old, parsed)) if old == stamp => parsed,
                _ => {
                    changed = true;
                    let mut reader = Reader::default();
                    reader.read_file(&file);
                    Arc::new(reader)
                }
            };
            next.insert(file, (stamp, parsed));
        }
        changed |= !self.files.is_empty();
        self.files = next;
        self.listed = true;
        changed.then(|| self.merge(problems))
    }

    /// All files' objects in one snapshot; later files win over earlier ones.
    fn merge(&mut self, mut problems: Vec<String>) -> Snapshot {
        let mut objects = Objects::default();
        let mut endpoints = BTreeMap::new();
        let mut origins = BTreeMap::new();
        for (file, (_, parsed)) in &self.files {
            problems.extend(parsed.problems.iter().cloned());
            let mut merge = Merge {
                file,
                origins: &mut origins,
                problems: &mut problems,
            };
            merge.kind(
                "Service",
                &mut objects.services,
                &parsed.objects.services,
                Clone::clone,
            );
            merge.kind(
                "EndpointSlice",
                &mut objects.endpoint_slices,
                &parsed.objects.endpoint_slices,
                Clone::clone,
            );
            merge.kind("Endpoints", &mut endpoints, &parsed.endpoints, Clone::clone);
            merge.kind("Node", &mut objects.nodes, &parsed.objects.nodes, |name| {
                ObjectKey::new("default", name.clone())
            });
        }
        self.mirror_endpoints(&endpoints, &mut objects);
        Snapshot {
            objects,
            origins,
            problems,
            changed_at: Instant::now(),
        }
    }

    /// Mirrors the v1 Endpoints of selector-less services into slices, as Kubernetes'
    /// mirroring controller does, reusing the slices of Endpoints that did not change.
    fn mirror_endpoints(
        &mut self,
        endpoints: &BTreeMap<ObjectKey, Arc<Endpoints>>,
        objects: &mut Objects,
    ) {
        let mut next = BTreeMap::new();
        for (key, endpoints) in endpoints {
            let selectorless = objects
                .services
                .get(key)
                .is_none_or(|s| s.spec.as_ref().is_none_or(|spec| spec.selector.is_none()));
            let skip = endpoints
                .metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.get(SKIP_MIRROR_LABEL).is_some_and(|v| v == "true"));
            if !selectorless || skip {
                continue;
            }
            let mirrored = match self.mirrors.remove(key) {
                Some(old) if Arc::ptr_eq(&old.endpoints, endpoints) => old,
                _ => Mirrored {
                    endpoints: Arc::clone(endpoints),
                    slices: mirror(key, endpoints)
                        .into_iter()
                        .map(|(k, s)| (k, Arc::new(s)))
                        .collect(),
                },
            };
            for (slice_key, slice) in &mirrored.slices {
                objects
                    .endpoint_slices
                    .insert(slice_key.clone(), Arc::clone(slice));
            }
            next.insert(key.clone(), mirrored);
        }
        self.mirrors = next;
    }
}

/// Merging one file's objects of one kind into the snapshot.
struct Merge<'a> {
    file: &'a Path,
    origins: &'a mut BTreeMap<ObjectRef, PathBuf>,
    problems: &'a mut Vec<String>,
}

impl Merge<'_> {
    fn kind<K: Ord + Clone, V: Clone>(
        &mut self,
        kind: &'static str,
        into: &mut BTreeMap<K, V>,
        from: &BTreeMap<K, V>,
        object_key: impl Fn(&K) -> ObjectKey,
    ) {
        for (key, value) in from {
            let reference = ObjectRef {
                kind,
                key: object_key(key),
            };
            if into.insert(key.clone(), value.clone()).is_some()
                && let Some(earlier) = self.origins.get(&reference)
                && earlier != self.file
            {
                self.problems.push(format!(
                    "{}: {reference} is also defined in {}; the later file wins",
                    self.file.display(),
                    earlier.display()
                ));
            }
            self.origins.insert(reference, self.file.to_owned());
        }
    }
}

fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current)? {
            let path = entry?.path();
            let hidden = path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if hidden {
                continue;
            }
            if path.is_dir() {
                pending.push(path);
            } else if path
                .extension()
                .is_some_and(|ext| EXTENSIONS.iter().any(|e| ext == *e))
            {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// One file's objects and problems.
#[derive(Default)]
struct Reader {
    objects: Objects,
    endpoints: BTreeMap<ObjectKey, Arc<Endpoints>>,
    origins: BTreeMap<ObjectRef, PathBuf>,
    problems: Vec<String>,
}

impl Reader {
    fn read_file(&mut self, file: &Path) {
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(error) => {
                self.problems
                    .push(format!("{}: cannot read: {error}", file.display()));
                return;
            }
        };
        if file.extension().is_some_and(|e| e == "json") {
            // JSON is YAML too, but serde_json reads it several times faster, and straight into
            // the typed objects: no tree of the whole file in between.
            for (index, document) in serde_json::Deserializer::from_str(&text)
                .into_iter::<&RawValue>()
                .enumerate()
            {
                match document {
                    Ok(raw) => self.add_document(file, Document::Raw(raw)),
                    Err(error) => return self.unparsable(file, index, &error),
                }
            }
            return;
        }
        for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            // Straight into the JSON tree the typed objects are read from: one tree, not two.
            match serde_json::Value::deserialize(document) {
                Ok(serde_json::Value::Null) => {}
                Ok(value) => self.add_document(file, Document::Tree(value)),
                // After a syntax error the YAML stream cannot be resynchronised.
                Err(error) => return self.unparsable(file, index, &error),
            }
        }
    }

    /// Document `index` of `file` does not parse: the rest of the file is skipped.
    fn unparsable(&mut self, file: &Path, index: usize, error: &dyn std::fmt::Display) {
        self.problems.push(format!(
            "{}: document {} does not parse: {error}; the rest of the file is skipped",
            file.display(),
            index + 1
        ));
    }

    fn add_document(&mut self, file: &Path, document: Document<'_>) {
        let header = match document.header() {
            Ok(header) => header,
            Err(error) => {
                self.problems.push(format!(
                    "{}: a document is malformed: {error}; skipped",
                    file.display()
                ));
                return;
            }
        };
        let name = header.name.as_deref().unwrap_or("(no name)").to_owned();
        match (header.api_version.as_deref(), header.kind.as_deref()) {
            (_, Some(list)) if list == "List" || list.ends_with("List") => {
                for item in document.items(header.items) {
                    self.add_document(file, item);
                }
            }
            (Some("v1"), Some("Service")) => {
                self.add(file, "Service", &name, document, |r, key, s: Service| {
                    r.objects.services.insert(key, Arc::new(s)).is_some()
                })
            }
            (Some("discovery.k8s.io/v1"), Some("EndpointSlice")) => self.add(
                file,
                "EndpointSlice",
                &name,
                document,
                |r, key, s: EndpointSlice| {
                    r.objects.endpoint_slices.insert(key, Arc::new(s)).is_some()
                },
            ),
            (Some("v1"), Some("Endpoints")) => self.add(
                file,
                "Endpoints",
                &name,
                document,
                |r, key, e: Endpoints| r.endpoints.insert(key, Arc::new(e)).is_some(),
            ),
            (Some("v1"), Some("Node")) => {
                self.add(file, "Node", &name, document, |r, key, n: Node| {
                    r.objects.nodes.insert(key.name, Arc::new(n)).is_some()
                })
            }
            (None, _) | (_, None) => self.problems.push(format!(
                "{}: object {name} has no apiVersion or kind; skipped",
                file.display()
            )),
            // Deployments, ConfigMaps and the like often share a file with a Service.
            _ => {}
        }
    }

    /// Deserializes one object and stores it with `insert`, which says whether it replaced one.
    fn add<T: serde::de::DeserializeOwned + HasMeta>(
        &mut self,
        file: &Path,
        kind: &'static str,
        name: &str,
        document: Document<'_>,
        insert: impl FnOnce(&mut Self, ObjectKey, T) -> bool,
    ) {
        let mut object: T = match document.parse() {
            Ok(object) => object,
            Err(error) => {
                self.problems.push(format!(
                    "{}: {kind} {name} is malformed: {error}; skipped",
                    file.display()
                ));
                return;
            }
        };
        trim(object.meta_mut());
        if object.meta().name.as_deref().unwrap_or_default().is_empty() {
            self.problems.push(format!(
                "{}: a {kind} has no metadata.name; skipped",
                file.display()
            ));
            return;
        }
        let key = ObjectKey::of(object.meta());
        let reference = ObjectRef {
            kind,
            key: key.clone(),
        };
        if insert(self, key, object)
            && let Some(earlier) = self.origins.get(&reference)
        {
            self.problems.push(format!(
                "{}: {reference} is also defined in {}; the later file wins",
                file.display(),
                earlier.display()
            ));
        }
        self.origins.insert(reference, file.to_owned());
    }
}

/// One manifest document: a JSON tree (from YAML), or the raw text of a JSON document, which
/// is read straight into its typed object.
enum Document<'a> {
    Tree(serde_json::Value),
    Raw(&'a RawValue),
}

/// The fields that say what a document is.
#[derive(serde::Deserialize)]
struct Header<'a> {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(skip)]
    name: Option<String>,
    #[serde(default)]
    metadata: Option<HeaderMeta>,
    /// The items of a `kind: List` (raw documents only).
    #[serde(borrow, default)]
    items: Option<Vec<&'a RawValue>>,
}

#[derive(serde::Deserialize)]
struct HeaderMeta {
    name: Option<String>,
}

impl<'a> Document<'a> {
    fn header(&self) -> Result<Header<'a>, serde_json::Error> {
        match self {
            Document::Tree(json) => {
                let text = |key: &str| json.get(key).and_then(|v| v.as_str()).map(str::to_owned);
                Ok(Header {
                    api_version: text("apiVersion"),
                    kind: text("kind"),
                    name: json
                        .get("metadata")
                        .and_then(|m| m.get("name"))
                        .and_then(|n| n.as_str())
                        .map(str::to_owned),
                    metadata: None,
                    items: None,
                })
            }
            Document::Raw(raw) => {
                let mut header: Header<'a> = serde_json::from_str(raw.get())?;
                header.name = header.metadata.take().and_then(|m| m.name);
                Ok(header)
            }
        }
    }

    /// The items of a List document.
    fn items(self, raw_items: Option<Vec<&'a RawValue>>) -> Vec<Document<'a>> {
        match self {
            Document::Tree(mut json) => match json.get_mut("items").map(serde_json::Value::take) {
                Some(serde_json::Value::Array(items)) => {
                    items.into_iter().map(Document::Tree).collect()
                }
                _ => Vec::new(),
            },
            Document::Raw(_) => raw_items
                .unwrap_or_default()
                .into_iter()
                .map(Document::Raw)
                .collect(),
        }
    }

    fn parse<T: serde::de::DeserializeOwned>(self) -> Result<T, serde_json::Error> {
        match self {
            Document::Tree(json) => serde_json::from_value(json),
            Document::Raw(raw) => serde_json::from_str(raw.get()),
        }
    }
}

trait HasMeta {
    fn meta(&self) -> &ObjectMeta;
    fn meta_mut(&mut self) -> &mut ObjectMeta;
}

macro_rules! has_meta {
    ($($t:ty),*) => {$(
        impl HasMeta for $t {
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    )*};
}

/// `kubectl get -o yaml` output carries managedFields and often a copy of the whole object in
/// the last-applied annotation; neither is read, and together they can triple what is kept.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

fn trim(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    if let Some(annotations) = &mut meta.annotations {
        annotations.remove(LAST_APPLIED);
    }
}
has_meta!(Service, EndpointSlice, Endpoints, Node);

/// What Kubernetes' EndpointSlice mirroring controller makes of a v1 Endpoints object of a
/// selector-less service: one IPv4 slice per subset.
fn mirror(key: &ObjectKey, endpoints: &Endpoints) -> Vec<(ObjectKey, EndpointSlice)> {
    let mut slices = Vec::new();
    for (index, subset) in endpoints.subsets.iter().flatten().enumerate() {
        let ports = subset
            .ports
            .iter()
            .flatten()
            .map(|p| EndpointPort {
                name: p.name.clone(),
                port: Some(p.port),
                protocol: p.protocol.clone(),
                app_protocol: p.app_protocol.clone(),
            })
            .collect();
        let with_state = |ready: bool| {
            move |address: &k8s_openapi::api::core::v1::EndpointAddress| Endpoint {
                addresses: vec![address.ip.clone()],
                conditions: Some(EndpointConditions {
                    ready: Some(ready),
                    serving: Some(ready),
                    terminating: Some(false),
                }),
                node_name: address.node_name.clone(),
                hostname: address.hostname.clone(),
                ..Default::default()
            }
        };
        let members = subset
            .addresses
            .iter()
            .flatten()
            .map(with_state(true))
            .chain(
                subset
                    .not_ready_addresses
                    .iter()
                    .flatten()
                    .map(with_state(false)),
            )
            .filter(|e| e.addresses[0].parse::<std::net::Ipv4Addr>().is_ok())
            .collect();
        let name = format!("{}-mirror-{index}", key.name);
        let slice = EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(key.namespace.clone()),
                labels: Some(
                    [(SERVICE_NAME_LABEL.to_owned(), key.name.clone())]
                        .into_iter()
                        .collect(),
                ),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: members,
            ports: Some(ports),
        };
        slices.push((ObjectKey::new(key.namespace.clone(), name), slice));
    }
    slices
}

/// Watches `dir` and publishes a snapshot whenever what it holds changes, until the receiver
/// is gone. A snapshot's `changed_at` is when the change was noticed.
pub async fn watch(
    dir: PathBuf,
    snapshots: watch::Sender<Option<Arc<Snapshot>>>,
) -> anyhow::Result<()> {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Any event (or error) just means "read again".
        let _ = events_tx.send(event.is_ok());
    })?;
    if let Err(error) = watcher.watch(&dir, notify::RecursiveMode::Recursive) {
        tracing::warn!(dir = %dir.display(), %error, "cannot watch the manifest directory; polling every {POLL:?}");
    }
    let mut cache = ManifestCache::default();
    let mut noticed_at = Instant::now();
    loop {
        if let Some(mut snapshot) = cache.read(&dir) {
            snapshot.changed_at = noticed_at;
            if snapshots.send(Some(Arc::new(snapshot))).is_err() {
                return Ok(());
            }
        }
        tokio::select! {
            _ = events.recv() => {
                noticed_at = Instant::now();
                tokio::time::sleep(DEBOUNCE).await;
                while events.try_recv().is_ok() {}
            }
            _ = tokio::time::sleep(POLL) => noticed_at = Instant::now(),
        }
    }
}

#[cfg(test)]
#[path = "manifests_tests.rs"]
mod tests;
