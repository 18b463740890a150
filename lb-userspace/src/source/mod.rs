//! Where objects come from: the manifest directory and the API server. Each source publishes
//! [`Delta`]s, the objects applied and deleted since its last one, never whole snapshots: a
//! change costs what it changes, however many objects the source holds. The model never
//! knows which source it was.
pub mod kube;
pub mod manifests;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use tokio::sync::mpsc;

use crate::model::{ObjectChanges, ObjectRef, Objects};

/// What changed in a source since its previous delta.
#[derive(Clone, Debug)]
pub struct Delta {
    /// Objects applied and deleted.
    pub objects: ObjectChanges,
    /// The file each changed object now comes from (`None`: it no longer comes from any),
    /// for messages; the manifest source only.
    pub origins: BTreeMap<ObjectRef, Option<Arc<Path>>>,
    /// The source's own problems (a file that does not parse, a malformed object), whole,
    /// when they changed.
    pub problems: Option<Vec<String>>,
    /// When the first change in this delta was noticed.
    pub changed_at: Instant,
}

impl Delta {
    /// A delta with nothing in it, noticed at `changed_at`.
    pub fn empty(changed_at: Instant) -> Self {
        Self {
            objects: ObjectChanges::default(),
            origins: BTreeMap::new(),
            problems: None,
            changed_at,
        }
    }

    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty() && self.origins.is_empty() && self.problems.is_none()
    }

    /// Folds a later delta into this one: what `later` says of an object replaces what this
    /// one said (a burst of changes becomes one sync).
    pub fn merge(&mut self, later: Delta) {
        self.objects.merge(later.objects);
        self.origins.extend(later.origins);
        if later.problems.is_some() {
            self.problems = later.problems;
        }
        self.changed_at = self.changed_at.min(later.changed_at);
    }
}

/// Where a source publishes its deltas. Unbounded, but never long: the agent takes every
/// delta waiting at each sync and merges them into one ([`recv_coalesced`]).
pub type DeltaSender = mpsc::UnboundedSender<Delta>;
pub type DeltaReceiver = mpsc::UnboundedReceiver<Delta>;

/// The next delta and every other one already waiting, merged; `None` once the source is gone.
pub async fn recv_coalesced(deltas: &mut DeltaReceiver) -> Option<Delta> {
    let mut delta = deltas.recv().await?;
    while let Ok(later) = deltas.try_recv() {
        delta.merge(later);
    }
    Some(delta)
}

/// A source's whole state, kept by applying its deltas: what tests, the fuzzer and
/// one-shot readers look at.
#[derive(Clone, Debug, Default)]
pub struct Known {
    pub objects: Objects,
    /// The file each object came from (manifest source).
    pub origins: BTreeMap<ObjectRef, PathBuf>,
    /// The source's problems as of the last delta that changed them.
    pub problems: Vec<String>,
}

impl Known {
    /// Brings the state up to `delta`.
    pub fn apply(&mut self, delta: &Delta) {
        delta.objects.apply_to(&mut self.objects);
        for (object, origin) in &delta.origins {
            match origin {
                Some(file) => self.origins.insert(object.clone(), file.to_path_buf()),
                None => self.origins.remove(object),
            };
        }
        if let Some(problems) = &delta.problems {
            self.problems = problems.clone();
        }
    }

    /// The state a single delta gives, applied to nothing.
    pub fn of(delta: &Delta) -> Self {
        let mut known = Self::default();
        known.apply(delta);
        known
    }
}
