//! Where objects come from: the manifest directory (and, later, the API server). Each source
//! publishes whole snapshots of [`Objects`]; the model never knows which source it was.
pub mod kube;
pub mod manifests;

use std::{collections::BTreeMap, path::PathBuf, time::Instant};

use crate::model::{ObjectRef, Objects};

/// The objects a source holds at one moment.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub objects: Objects,
    /// The file each object came from (manifest source), for messages.
    pub origins: BTreeMap<ObjectRef, PathBuf>,
    /// Problems reading the source (a file that does not parse, a malformed object); the
    /// objects that did read are in `objects`.
    pub problems: Vec<String>,
    /// When the change that produced this snapshot was noticed.
    pub changed_at: Instant,
}
