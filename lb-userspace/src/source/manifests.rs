//! A directory of ordinary Kubernetes YAML (or JSON) as the source of objects: files as
//! `kubectl apply -f` takes them or `kubectl get -o yaml` prints them, one or many documents
//! per file, `kind: List` included. The directory is watched (inotify, with a slow poll as a
//! backstop) and every change produces a fresh snapshot.
//!
//! What a snapshot holds of each file ([`ManifestCache`]): the objects of its last version
//! that could be used. A version that cannot be read, is over the size limit or does not
//! parse (a half-written file) is reported by name and the last good one is kept (a file with
//! no good version yet gives nothing); a file is dropped only when it is really gone: a
//! listing of its directory that completed did not hold it, or opening it said ENOENT. So a
//! failed listing never removes the services of files it did not see. Within a file that
//! parses, a malformed object is reported and skipped, and the file's other objects are used.
//! How the directory is walked (symlinks, loops) is in [`walk`].
mod parse;
mod walk;

pub use parse::{FileObjects, parse_file};

use std::{
    collections::BTreeMap,
    io::Read as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::Endpoints,
    discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use notify::Watcher as _;
use tokio::sync::{mpsc, watch};

use super::Snapshot;
use crate::model::{Family, ObjectKey, ObjectRef, Objects, endpoints::SERVICE_NAME_LABEL};

/// Files larger than this are not read (`--manifest-max-bytes`).
pub const DEFAULT_MAX_FILE_BYTES: u64 = 64 << 20;
/// Changes arriving this close together are read as one.
const DEBOUNCE: Duration = Duration::from_millis(10);
/// A re-read even without inotify events (network filesystems, missed events).
const POLL: Duration = Duration::from_secs(2);
/// The mirroring controller's opt-out label on v1 Endpoints.
const SKIP_MIRROR_LABEL: &str = "endpointslice.kubernetes.io/skip-mirror";

/// Reads every manifest under `dir` into one snapshot; problems are collected, never fatal.
pub fn read_dir(dir: &Path) -> Snapshot {
    ManifestCache::new(DEFAULT_MAX_FILE_BYTES)
        .read(dir)
        .unwrap_or_else(|| unreachable!("a first read always yields a snapshot"))
}

/// What identifies a file's version without reading it: size, modification time, inode (an
/// editor's or `kubectl get > f`'s atomic replace makes a new inode).
type FileStamp = (u64, i128, u64);

fn stamp(meta: &std::fs::Metadata) -> FileStamp {
    use std::os::unix::fs::MetadataExt as _;
    (
        meta.len(),
        i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        meta.ino(),
    )
}

/// What is known of one file.
#[derive(Default)]
struct FileEntry {
    /// The version last read, when it need not be read again (`None`: read it next time).
    stamp: Option<FileStamp>,
    /// The objects of the last version that could be used; `None` until one could.
    good: Option<Arc<FileObjects>>,
    /// Why the version last looked at could not be used.
    failure: Option<String>,
}

/// Which listings and reads fail on purpose, with what error (tests inject failures that
/// root cannot be made to meet on a real filesystem: a listing that fails, an I/O error).
pub type Fault = dyn Fn(&Path) -> Option<std::io::Error> + Send + Sync;

fn no_fault(_: &Path) -> Option<std::io::Error> {
    None
}

/// What a failed version means for the file's objects, for its problem line.
fn kept(entry: &FileEntry) -> &'static str {
    if entry.good.is_some() {
        "its last good version is kept"
    } else {
        "nothing from it is served (no version of it could be used yet)"
    }
}

/// Why a file's current version gives no objects.
enum Unread {
    /// Opening it said ENOENT: the file is gone.
    Gone,
    /// Anything else; `retry` when the same version should be read again (an I/O error),
    /// not when the content is the trouble (too large, does not parse).
    Failed { why: String, retry: bool },
}

/// The parsed contents of every file, kept between reads: a file whose stamp did not change
/// is not read again and keeps its objects' `Arc`s, so the model recomputes only the services
/// whose files changed.
pub struct ManifestCache {
    max_file_bytes: u64,
    files: BTreeMap<PathBuf, FileEntry>,
    mirrors: BTreeMap<ObjectKey, Mirrored>,
    /// The source-level problems of the last snapshot (walk and file failures).
    published_failures: Option<Vec<String>>,
    fault: Box<Fault>,
}

/// The slices mirrored from one v1 Endpoints object.
struct Mirrored {
    endpoints: Arc<Endpoints>,
    slices: Vec<(ObjectKey, Arc<EndpointSlice>)>,
}

impl ManifestCache {
    /// A cache that reads files of at most `max_file_bytes`.
    pub fn new(max_file_bytes: u64) -> Self {
        Self {
            max_file_bytes,
            files: BTreeMap::new(),
            mirrors: BTreeMap::new(),
            published_failures: None,
            fault: Box::new(no_fault),
        }
    }

    /// The same cache, with listings and reads failing where `fault` says (tests).
    pub fn with_fault(
        mut self,
        fault: impl Fn(&Path) -> Option<std::io::Error> + Send + Sync + 'static,
    ) -> Self {
        self.fault = Box::new(fault);
        self
    }

    /// A snapshot of `dir`, or `None` when neither its objects nor its problems changed
    /// since the last call.
    pub fn read(&mut self, dir: &Path) -> Option<Snapshot> {
        let walk = walk::walk(dir, &*self.fault);
        let mut failures = walk.problems.clone();
        let mut changed = false;
        let mut previous = std::mem::take(&mut self.files);
        for (path, meta) in &walk.files {
            let mut entry = previous.remove(path).unwrap_or_default();
            let now = stamp(meta);
            if entry.stamp != Some(now) {
                match self.read_file(path, meta) {
                    Ok(objects) => {
                        entry.good = Some(Arc::new(objects));
                        entry.failure = None;
                        entry.stamp = Some(now);
                        changed = true;
                    }
                    Err(Unread::Gone) => {
                        changed |= entry.good.is_some();
                        continue;
                    }
                    Err(Unread::Failed { why, retry }) => {
                        entry.failure = Some(format!("{why}; {}", kept(&entry)));
                        entry.stamp = (!retry).then_some(now);
                    }
                }
            }
            failures.extend(entry.failure.clone());
            self.files.insert(path.clone(), entry);
        }
        for (path, error) in &walk.unreadable {
            let mut entry = previous.remove(path).unwrap_or_default();
            if error.kind() == std::io::ErrorKind::NotFound {
                // A dangling symlink: what it named is gone, and so are its objects.
                failures.push(format!(
                    "{}: cannot read: {error} (a dangling symlink?); skipped",
                    path.display()
                ));
                changed |= entry.good.is_some();
                continue;
            }
            entry.stamp = None;
            entry.failure = Some(format!(
                "{}: cannot read: {error}; {}",
                path.display(),
                kept(&entry)
            ));
            failures.extend(entry.failure.clone());
            self.files.insert(path.clone(), entry);
        }
        // Files this walk did not see: gone, or under a directory it could not list.
        for (path, entry) in previous {
            if walk.is_gone(&path) {
                changed |= entry.good.is_some();
            } else {
                failures.extend(entry.failure.clone());
                self.files.insert(path, entry);
            }
        }
        changed |= self.published_failures.as_ref() != Some(&failures);
        self.published_failures = Some(failures.clone());
        changed.then(|| self.merge(failures))
    }

    /// The objects of the current version of `path`.
    fn read_file(&self, path: &Path, meta: &std::fs::Metadata) -> Result<FileObjects, Unread> {
        let too_large = |size: u64| Unread::Failed {
            why: format!(
                "{}: is {size} bytes, over the limit of {} (--manifest-max-bytes)",
                path.display(),
                self.max_file_bytes
            ),
            retry: false,
        };
        if meta.len() > self.max_file_bytes {
            return Err(too_large(meta.len()));
        }
        let io_failure = |error: std::io::Error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                Unread::Gone
            } else {
                Unread::Failed {
                    why: format!("{}: cannot read: {error}", path.display()),
                    retry: true,
                }
            }
        };
        if let Some(error) = (self.fault)(path) {
            return Err(io_failure(error));
        }
        let file = std::fs::File::open(path).map_err(io_failure)?;
        let mut bytes = Vec::new();
        // One byte over the limit tells a file that grew since `stat`.
        file.take(self.max_file_bytes.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(io_failure)?;
        let size = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        if size > self.max_file_bytes {
            return Err(too_large(size));
        }
        let objects = parse_file(path, &bytes);
        match objects.unusable {
            Some(why) => Err(Unread::Failed { why, retry: false }),
            None => Ok(objects),
        }
    }

    /// All files' objects in one snapshot; later files win over earlier ones.
    fn merge(&mut self, mut problems: Vec<String>) -> Snapshot {
        let mut objects = Objects::default();
        let mut endpoints = BTreeMap::new();
        let mut origins = BTreeMap::new();
        for (file, entry) in &self.files {
            let Some(parsed) = &entry.good else { continue };
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

/// What Kubernetes' EndpointSlice mirroring controller makes of a v1 Endpoints object of a
/// selector-less service: per subset, one slice per address family it has addresses of
/// (`NAME-mirror-N` for IPv4, `NAME-mirror-N-ipv6` for IPv6), as the controller keeps
/// address types apart.
fn mirror(key: &ObjectKey, endpoints: &Endpoints) -> Vec<(ObjectKey, EndpointSlice)> {
    let mut slices = Vec::new();
    for (index, subset) in endpoints.subsets.iter().flatten().enumerate() {
        let ports: Vec<EndpointPort> = subset
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
        let members: Vec<Endpoint> = subset
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
            .collect();
        for family in Family::ALL {
            let of_family: Vec<Endpoint> = members
                .iter()
                .filter(|e| {
                    e.addresses[0]
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| Family::of(ip) == family)
                })
                .cloned()
                .collect();
            // An IPv4 slice for every subset (as before dual-stack); an IPv6 one only with
            // IPv6 addresses.
            if family == Family::V6 && of_family.is_empty() {
                continue;
            }
            let name = match family {
                Family::V4 => format!("{}-mirror-{index}", key.name),
                Family::V6 => format!("{}-mirror-{index}-ipv6", key.name),
            };
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
                address_type: family.kubernetes_name().into(),
                endpoints: of_family,
                ports: Some(ports.clone()),
            };
            slices.push((ObjectKey::new(key.namespace.clone(), name), slice));
        }
    }
    slices
}

/// Watches `dir` and publishes a snapshot whenever what it holds changes, until the receiver
/// is gone. A snapshot's `changed_at` is when the change was noticed.
pub async fn watch(
    dir: PathBuf,
    max_file_bytes: u64,
    snapshots: watch::Sender<Option<Arc<Snapshot>>>,
) -> anyhow::Result<()> {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    // Any event (or error) just means "read again". Symlinked directories are not walked, so
    // not watched either.
    let mut watcher = notify::RecommendedWatcher::new(
        move |event: notify::Result<notify::Event>| {
            let _ = events_tx.send(event.is_ok());
        },
        notify::Config::default().with_follow_symlinks(false),
    )?;
    if let Err(error) = watcher.watch(&dir, notify::RecursiveMode::Recursive) {
        tracing::warn!(dir = %dir.display(), %error, "cannot watch the manifest directory; polling every {POLL:?}");
    }
    let mut cache = ManifestCache::new(max_file_bytes);
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
