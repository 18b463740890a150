//! What the API server source has published of one kind: the resource version of every
//! object, so that a re-list is diffed against it and only what changed is sent.
use std::{collections::BTreeMap, sync::Arc};

use kube::{Resource, ResourceExt as _, runtime::watcher};

/// An object's namespace (empty for cluster-scoped ones) and name.
pub type Key = (String, String);

fn key_of<K: Resource>(object: &K) -> Key {
    (
        object.meta().namespace.clone().unwrap_or_default(),
        object.name_any(),
    )
}

/// What one kind has published: the resource version of every object, to diff a re-list
/// against, and the list in progress.
pub struct Published<K> {
    versions: BTreeMap<Key, String>,
    /// The objects of a list in progress, published when it is done.
    relist: Option<BTreeMap<Key, K>>,
}

impl<K: Resource + Clone> Published<K> {
    pub fn new() -> Self {
        Self {
            versions: BTreeMap::new(),
            relist: None,
        }
    }

    /// The objects `event` applies (`Some`) and deletes (`None`).
    pub fn changes(&mut self, event: watcher::Event<K>) -> Vec<(Key, Option<Arc<K>>)> {
        match event {
            watcher::Event::Apply(object) => {
                let key = key_of(&object);
                self.versions.insert(key.clone(), version_of(&object));
                vec![(key, Some(Arc::new(object)))]
            }
            watcher::Event::Delete(object) => {
                let key = key_of(&object);
                self.versions.remove(&key);
                vec![(key, None)]
            }
            watcher::Event::Init => {
                self.relist = Some(BTreeMap::new());
                Vec::new()
            }
            watcher::Event::InitApply(object) => {
                self.relist
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key_of(&object), object);
                Vec::new()
            }
            watcher::Event::InitDone => self.relisted(),
        }
    }

    /// A complete list against what was published: the objects new or at another resource
    /// version, and the ones gone.
    fn relisted(&mut self) -> Vec<(Key, Option<Arc<K>>)> {
        let listed = self.relist.take().unwrap_or_default();
        let mut before = std::mem::take(&mut self.versions);
        let mut changes = Vec::new();
        for (key, object) in listed {
            let version = version_of(&object);
            let same = before
                .remove(&key)
                .is_some_and(|was| !was.is_empty() && was == version);
            self.versions.insert(key.clone(), version);
            if !same {
                changes.push((key, Some(Arc::new(object))));
            }
        }
        changes.extend(before.into_keys().map(|key| (key, None)));
        changes
    }
}

fn version_of<K: Resource>(object: &K) -> String {
    object.meta().resource_version.clone().unwrap_or_default()
}
