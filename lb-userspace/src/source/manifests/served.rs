//! Which file's definition of each object is served, kept per object: when one file changes,
//! only the objects it defines (before or now) are looked at, and only those whose served
//! definition really changed go into the delta. An object defined in several files is served
//! from the last one by path (and reported).
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::Arc,
};

use crate::model::{Changed, ObjectKey, ObjectRef};

/// The files defining one object and their definitions, sorted by path: nearly every object
/// has one, and a map's node would hold room for eleven.
type ByFile<V> = Vec<(Arc<Path>, Arc<V>)>;

/// The definitions of one kind, by object, by file.
pub struct Definitions<K, V> {
    by_key: BTreeMap<K, ByFile<V>>,
    /// The objects defined in more than one file.
    contested: BTreeSet<K>,
}

/// What changed for the objects of one kind: the served definition (or its absence) of
/// every object whose definition changed, and the file it now comes from.
pub struct KindChanges<K, V> {
    pub objects: Changed<K, V>,
    pub origins: BTreeMap<ObjectRef, Option<Arc<Path>>>,
}

impl<K, V> Default for KindChanges<K, V> {
    fn default() -> Self {
        Self {
            objects: BTreeMap::new(),
            origins: BTreeMap::new(),
        }
    }
}

impl<K: Ord + Clone, V: PartialEq> Definitions<K, V> {
    pub fn new() -> Self {
        Self {
            by_key: BTreeMap::new(),
            contested: BTreeSet::new(),
        }
    }

    /// The served definition of `key` and its file.
    pub fn served(&self, key: &K) -> Option<(&Arc<Path>, &Arc<V>)> {
        self.by_key
            .get(key)?
            .last()
            .map(|(file, object)| (file, object))
    }

    /// `file`'s definition of `key`.
    fn of_file(&self, file: &Arc<Path>, key: &K) -> Option<&Arc<V>> {
        let files = self.by_key.get(key)?;
        let at = files.binary_search_by(|(f, _)| f.cmp(file)).ok()?;
        Some(&files[at].1)
    }

    /// Replaces what `file` defines of this kind: it defined `before` and now defines `now`.
    /// A definition equal in value to the one the file had keeps its old `Arc` (a file
    /// rewritten with one object changed changes one object). Returns the keys `file` now
    /// defines.
    pub fn replace_file(
        &mut self,
        file: &Arc<Path>,
        before: &BTreeSet<K>,
        now: BTreeMap<K, Arc<V>>,
        reference: impl Fn(&K) -> ObjectRef,
        changes: &mut KindChanges<K, V>,
    ) -> BTreeSet<K> {
        for key in before.iter().filter(|key| !now.contains_key(key)) {
            self.set(file, key, None, &reference, changes);
        }
        let mut defined = BTreeSet::new();
        for (key, object) in now {
            let same = self.of_file(file, &key).is_some_and(|old| **old == *object);
            if !same {
                self.set(file, &key, Some(object), &reference, changes);
            }
            defined.insert(key);
        }
        defined
    }

    /// Sets `file`'s definition of `key`, recording the change of the served one.
    fn set(
        &mut self,
        file: &Arc<Path>,
        key: &K,
        object: Option<Arc<V>>,
        reference: &impl Fn(&K) -> ObjectRef,
        changes: &mut KindChanges<K, V>,
    ) {
        let before = self
            .served(key)
            .map(|(f, o)| (Arc::clone(f), Arc::clone(o)));
        let files = self.by_key.entry(key.clone()).or_default();
        match (files.binary_search_by(|(f, _)| f.cmp(file)), object) {
            (Ok(at), Some(object)) => files[at].1 = object,
            (Err(at), Some(object)) => files.insert(at, (Arc::clone(file), object)),
            (Ok(at), None) => {
                files.remove(at);
            }
            (Err(_), None) => {}
        }
        if files.len() > 1 {
            self.contested.insert(key.clone());
        } else {
            self.contested.remove(key);
        }
        if files.is_empty() {
            self.by_key.remove(key);
        }
        let after = self.served(key);
        let same_object = match (&before, after) {
            (Some((_, a)), Some((_, b))) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if !same_object {
            changes
                .objects
                .insert(key.clone(), after.map(|(_, o)| Arc::clone(o)));
        }
        let same_file = before.as_ref().map(|(f, _)| f) == after.map(|(f, _)| f);
        if !same_file {
            changes
                .origins
                .insert(reference(key), after.map(|(f, _)| Arc::clone(f)));
        }
    }

    /// "`later`: `object` is also defined in `earlier`; the later file wins", for every
    /// object defined in more than one file, one line per later file.
    pub fn duplicates(&self, reference: impl Fn(&K) -> ObjectRef) -> Vec<String> {
        let mut lines = Vec::new();
        for key in &self.contested {
            let Some(files) = self.by_key.get(key) else {
                continue;
            };
            let names: Vec<&Arc<Path>> = files.iter().map(|(file, _)| file).collect();
            for pair in names.windows(2) {
                lines.push(format!(
                    "{}: {} is also defined in {}; the later file wins",
                    pair[1].display(),
                    reference(key),
                    pair[0].display()
                ));
            }
        }
        lines
    }
}

/// The reference of a namespaced object of `kind`.
pub fn namespaced(kind: &'static str) -> impl Fn(&ObjectKey) -> ObjectRef {
    move |key| ObjectRef {
        kind,
        key: key.clone(),
    }
}
