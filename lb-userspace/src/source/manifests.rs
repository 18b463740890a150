//! A directory of ordinary Kubernetes YAML (or JSON) as the source of objects: files as
//! `kubectl apply -f` takes them or `kubectl get -o yaml` prints them, one or many documents
//! per file, `kind: List` included. The directory is watched (inotify, with a slow poll as a
//! backstop) and every change produces a [`Delta`] of what it changed: a file whose stamp did
//! not change is not read, and a file that did is compared object by object with what it
//! held, so one edited Service in a file of 100,000 is one changed object ([`served`]).
//!
//! What is served of each file ([`ManifestCache`]): the objects of its last version that
//! could be used. A version that cannot be read, is over the size limit or does not
//! parse (a half-written file) is reported by name and the last good one is kept (a file with
//! no good version yet gives nothing); a file is dropped only when it is really gone: a
//! listing of its directory that completed did not hold it, or opening it said ENOENT. So a
//! failed listing never removes the services of files it did not see. Within a file that
//! parses, a malformed object is reported and skipped, and the file's other objects are used.
//! How the directory is walked (symlinks, loops) is in [`walk`].
mod parse;
mod served;
mod walk;
mod watch;

pub use parse::{FileObjects, parse_file};
pub use watch::watch;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Read as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use k8s_openapi::api::{
    core::v1::Endpoints,
    discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{Delta, Known};
use crate::model::{
    Changed, Family, NodeInfo, ObjectChanges, ObjectKey, ObjectRef, ServiceInfo, Slice,
    endpoints::SERVICE_NAME_LABEL,
};
use served::{Definitions, KindChanges, namespaced};

/// Files larger than this are not read (`--manifest-max-bytes`).
pub const DEFAULT_MAX_FILE_BYTES: u64 = 64 << 20;
/// The mirroring controller's opt-out label on v1 Endpoints.
const SKIP_MIRROR_LABEL: &str = "endpointslice.kubernetes.io/skip-mirror";

/// Reads every manifest under `dir`; problems are collected, never fatal.
pub fn read_dir(dir: &Path) -> Known {
    let delta = ManifestCache::new(DEFAULT_MAX_FILE_BYTES)
        .read(dir)
        .unwrap_or_else(|| unreachable!("a first read always yields a delta"));
    Known::of(&delta)
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
struct FileEntry {
    /// Its path, shared by every object it defines.
    name: Arc<Path>,
    /// The version last read, when it need not be read again (`None`: read it next time).
    stamp: Option<FileStamp>,
    /// What the last version that could be used defines; `None` until one could.
    good: Option<Defined>,
    /// Why the version last looked at could not be used.
    failure: Option<String>,
}

impl FileEntry {
    fn new(path: &Path) -> Self {
        Self {
            name: Arc::from(path),
            stamp: None,
            good: None,
            failure: None,
        }
    }
}

/// The objects one file's version defines (their definitions are in the cache's
/// [`Definitions`]), and its problems with single objects.
#[derive(Default)]
struct Defined {
    services: BTreeSet<ObjectKey>,
    endpoint_slices: BTreeSet<ObjectKey>,
    endpoints: BTreeSet<ObjectKey>,
    nodes: BTreeSet<String>,
    problems: Vec<String>,
}

/// What one read changed, kind by kind.
#[derive(Default)]
struct ReadChanges {
    services: KindChanges<ObjectKey, ServiceInfo>,
    endpoint_slices: KindChanges<ObjectKey, Slice>,
    endpoints: KindChanges<ObjectKey, Endpoints>,
    nodes: KindChanges<String, NodeInfo>,
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

/// What every file defines, kept between reads: a file whose stamp did not change is not
/// read again, and a file that did yields only the objects whose definition changed.
pub struct ManifestCache {
    max_file_bytes: u64,
    files: BTreeMap<PathBuf, FileEntry>,
    services: Definitions<ObjectKey, ServiceInfo>,
    endpoint_slices: Definitions<ObjectKey, Slice>,
    endpoints: Definitions<ObjectKey, Endpoints>,
    nodes: Definitions<String, NodeInfo>,
    /// The slices mirrored from each v1 Endpoints object (they win over a file's slice of
    /// the same name).
    mirrors: BTreeMap<ObjectKey, BTreeMap<ObjectKey, Arc<Slice>>>,
    /// The owner of each mirrored slice.
    mirrored: BTreeMap<ObjectKey, ObjectKey>,
    /// The problems last published; `None` before the first read.
    published_problems: Option<Vec<String>>,
    /// The directories the last read listed (the watcher watches each).
    directories: Vec<PathBuf>,
    fault: Box<Fault>,
}

/// How a Node is named in messages.
fn node_reference(name: &str) -> ObjectRef {
    ObjectRef {
        kind: "Node",
        key: ObjectKey::new("default", name),
    }
}

impl ManifestCache {
    /// A cache that reads files of at most `max_file_bytes`.
    pub fn new(max_file_bytes: u64) -> Self {
        Self {
            max_file_bytes,
            files: BTreeMap::new(),
            services: Definitions::new(),
            endpoint_slices: Definitions::new(),
            endpoints: Definitions::new(),
            nodes: Definitions::new(),
            mirrors: BTreeMap::new(),
            mirrored: BTreeMap::new(),
            published_problems: None,
            directories: Vec::new(),
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

    /// The directories the last read listed.
    pub fn directories(&self) -> &[PathBuf] {
        &self.directories
    }

    /// What changed in `dir` since the last call, or `None` when neither its objects nor its
    /// problems did (the first call always gives a delta, if an empty one).
    pub fn read(&mut self, dir: &Path) -> Option<Delta> {
        let noticed = Instant::now();
        let walk = walk::walk(dir, &*self.fault);
        if !self.directories.iter().eq(walk.listed.keys()) {
            self.directories = walk.listed.keys().cloned().collect();
        }
        let mut failures = walk.problems.clone();
        let mut changes = ReadChanges::default();
        let mut previous = std::mem::take(&mut self.files);
        for (path, meta) in &walk.files {
            let mut entry = previous
                .remove(path)
                .unwrap_or_else(|| FileEntry::new(path));
            let now = stamp(meta);
            if entry.stamp != Some(now) {
                match self.read_file(path, meta) {
                    Ok(objects) => {
                        entry.good = Some(self.replace_file(&entry, Some(objects), &mut changes));
                        entry.failure = None;
                        entry.stamp = Some(now);
                    }
                    Err(Unread::Gone) => {
                        self.replace_file(&entry, None, &mut changes);
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
            let mut entry = previous
                .remove(path)
                .unwrap_or_else(|| FileEntry::new(path));
            if error.kind() == std::io::ErrorKind::NotFound {
                // A dangling symlink: what it named is gone, and so are its objects.
                failures.push(format!(
                    "{}: cannot read: {error} (a dangling symlink?); skipped",
                    path.display()
                ));
                self.replace_file(&entry, None, &mut changes);
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
                self.replace_file(&entry, None, &mut changes);
            } else {
                failures.extend(entry.failure.clone());
                self.files.insert(path, entry);
            }
        }
        let first = self.published_problems.is_none();
        let problems = self.problems(failures);
        let mut delta = self.delta(changes, noticed);
        if self.published_problems.as_ref() != Some(&problems) {
            delta.problems = Some(problems.clone());
            self.published_problems = Some(problems);
        }
        (first || !delta.is_empty()).then_some(delta)
    }

    /// Replaces what `entry`'s file defines with `objects` (`None`: it defines nothing any
    /// more), recording what that changes; returns what it now defines.
    fn replace_file(
        &mut self,
        entry: &FileEntry,
        objects: Option<FileObjects>,
        changes: &mut ReadChanges,
    ) -> Defined {
        let before = entry.good.as_ref();
        let empty = BTreeSet::new();
        let was = |pick: fn(&Defined) -> &BTreeSet<ObjectKey>| before.map_or(&empty, pick);
        let objects = objects.unwrap_or_default();
        let file = &entry.name;
        Defined {
            services: self.services.replace_file(
                file,
                was(|d| &d.services),
                objects.objects.services,
                namespaced("Service"),
                &mut changes.services,
            ),
            endpoint_slices: self.endpoint_slices.replace_file(
                file,
                was(|d| &d.endpoint_slices),
                objects.objects.endpoint_slices,
                namespaced("EndpointSlice"),
                &mut changes.endpoint_slices,
            ),
            endpoints: self.endpoints.replace_file(
                file,
                was(|d| &d.endpoints),
                objects.endpoints,
                namespaced("Endpoints"),
                &mut changes.endpoints,
            ),
            nodes: self.nodes.replace_file(
                file,
                before.map_or(&BTreeSet::new(), |d| &d.nodes),
                objects.objects.nodes,
                |name: &String| node_reference(name),
                &mut changes.nodes,
            ),
            problems: objects.problems,
        }
    }

    /// Every problem of the source: the walk's and the files' failures, the files' problems
    /// with single objects, objects defined twice.
    fn problems(&self, mut failures: Vec<String>) -> Vec<String> {
        for entry in self.files.values() {
            failures.extend(entry.good.iter().flat_map(|d| d.problems.iter().cloned()));
        }
        failures.extend(self.services.duplicates(namespaced("Service")));
        failures.extend(self.endpoint_slices.duplicates(namespaced("EndpointSlice")));
        failures.extend(self.endpoints.duplicates(namespaced("Endpoints")));
        failures.extend(self.nodes.duplicates(|name: &String| node_reference(name)));
        failures
    }

    /// The delta of one read: the changed objects, with the slices mirrored from v1
    /// Endpoints brought up to the changed Endpoints and Services.
    fn delta(&mut self, changes: ReadChanges, noticed: Instant) -> Delta {
        let mut slices = Changed::new();
        let owners: BTreeSet<ObjectKey> = changes
            .endpoints
            .objects
            .keys()
            .chain(changes.services.objects.keys())
            .cloned()
            .collect();
        for owner in owners {
            self.mirror(&owner, &mut slices);
        }
        for (key, slice) in changes.endpoint_slices.objects {
            if !self.mirrored.contains_key(&key) {
                slices.insert(key, slice);
            }
        }
        let mut delta = Delta::empty(noticed);
        delta.objects = ObjectChanges {
            services: changes.services.objects,
            endpoint_slices: slices,
            nodes: changes.nodes.objects,
        };
        delta.origins.extend(changes.services.origins);
        delta.origins.extend(changes.endpoint_slices.origins);
        delta.origins.extend(changes.endpoints.origins);
        delta.origins.extend(changes.nodes.origins);
        delta
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
        // Sized from `stat` (a 200 MB manifest is not grown by doubling); one byte over the
        // limit tells a file that grew since.
        let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0) + 1);
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

    /// Mirrors the v1 Endpoints `owner` into slices as Kubernetes' mirroring controller
    /// does (only for a selector-less Service, unless it opts out), recording the slices that
    /// changed; a slice equal to the one mirrored before keeps its `Arc`. A mirrored slice
    /// that goes gives way to a file's slice of the same name, if there is one.
    fn mirror(&mut self, owner: &ObjectKey, slices: &mut Changed<ObjectKey, Slice>) {
        let selectorless = self
            .services
            .served(owner)
            .is_none_or(|(_, s)| s.spec.as_ref().is_none_or(|spec| !spec.has_selector));
        let wanted = self
            .endpoints
            .served(owner)
            .map(|(_, e)| e)
            .filter(|endpoints| {
                endpoints
                    .metadata
                    .labels
                    .as_ref()
                    .is_none_or(|l| l.get(SKIP_MIRROR_LABEL).is_none_or(|v| v != "true"))
            })
            .filter(|_| selectorless)
            .map(|endpoints| mirror(owner, endpoints))
            .unwrap_or_default();
        let mut before = self.mirrors.remove(owner).unwrap_or_default();
        let mut now = BTreeMap::new();
        for (key, slice) in wanted {
            let slice = Slice::from(&slice);
            match before.remove(&key) {
                Some(old) if *old == slice => {
                    now.insert(key, old);
                }
                _ => {
                    let slice = Arc::new(slice);
                    slices.insert(key.clone(), Some(Arc::clone(&slice)));
                    self.mirrored.insert(key.clone(), owner.clone());
                    now.insert(key, slice);
                }
            }
        }
        for key in before.into_keys() {
            self.mirrored.remove(&key);
            let from_file = self
                .endpoint_slices
                .served(&key)
                .map(|(_, s)| Arc::clone(s));
            slices.insert(key, from_file);
        }
        if !now.is_empty() {
            self.mirrors.insert(owner.clone(), now);
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

#[cfg(test)]
#[path = "manifests_tests.rs"]
mod tests;
