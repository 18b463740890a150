//! The reconciler's record of what it programmed, counting the entries of each map as they
//! come and go: `lb_map_entries` is read after every sync, and a recount walks every entry
//! (~70 ms at 100,000 services), so a lone change would cost what the whole table holds.
use std::collections::{BTreeMap, btree_map};

use super::{ProgrammedSet, backends::Opinion};
use crate::model::{Backend, Family, Frontend, SetKey};

/// Keys kept in one map per address family.
pub(super) trait OfFamily {
    fn family(&self) -> Family;
}

impl OfFamily for Frontend {
    fn family(&self) -> Family {
        Frontend::family(self)
    }
}

impl OfFamily for Backend {
    fn family(&self) -> Family {
        Backend::family(self)
    }
}

/// Entries counted by family: IPv4, IPv6.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct FamilyCount([usize; 2]);

impl FamilyCount {
    pub(super) fn get(&self, family: Family) -> usize {
        self.0[family as usize]
    }

    pub(super) fn add(&mut self, family: Family) {
        self.0[family as usize] += 1;
    }

    pub(super) fn sub(&mut self, family: Family) {
        self.0[family as usize] -= 1;
    }
}

/// A map by key, with how many keys of each family it holds.
#[derive(Debug)]
pub(super) struct FamilyMap<K, V> {
    entries: BTreeMap<K, V>,
    count: FamilyCount,
}

impl<K, V> Default for FamilyMap<K, V> {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
            count: FamilyCount::default(),
        }
    }
}

impl<K: Ord + OfFamily, V> FamilyMap<K, V> {
    pub(super) fn insert(&mut self, key: K, value: V) -> Option<V> {
        let family = key.family();
        let before = self.entries.insert(key, value);
        if before.is_none() {
            self.count.add(family);
        }
        before
    }

    pub(super) fn remove(&mut self, key: &K) -> Option<V> {
        let before = self.entries.remove(key);
        if before.is_some() {
            self.count.sub(key.family());
        }
        before
    }

    pub(super) fn get(&self, key: &K) -> Option<&V> {
        self.entries.get(key)
    }

    /// The value only: a key keeps its family.
    pub(super) fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.entries.get_mut(key)
    }

    pub(super) fn keys(&self) -> btree_map::Keys<'_, K, V> {
        self.entries.keys()
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many keys of `family` it holds.
    pub(super) fn count(&self, family: Family) -> usize {
        self.count.get(family)
    }
}

impl<K: Ord, V> std::ops::Index<&K> for FamilyMap<K, V> {
    type Output = V;

    fn index(&self, key: &K) -> &V {
        &self.entries[key]
    }
}

impl<K: Ord + OfFamily, V> FromIterator<(K, V)> for FamilyMap<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(entries: I) -> Self {
        let mut map = Self::default();
        for (key, value) in entries {
            map.insert(key, value);
        }
        map
    }
}

impl<K, V> IntoIterator for FamilyMap<K, V> {
    type Item = (K, V);
    type IntoIter = btree_map::IntoIter<K, V>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

/// The programmed backend sets, with how many slots (of their live generations) and Maglev
/// tables they hold.
#[derive(Debug, Default)]
pub(super) struct SetTable {
    sets: BTreeMap<SetKey, ProgrammedSet>,
    slots: usize,
    tables: usize,
}

impl SetTable {
    pub(super) fn insert(&mut self, key: SetKey, set: ProgrammedSet) -> Option<ProgrammedSet> {
        self.count_in(&set);
        let before = self.sets.insert(key, set);
        if let Some(before) = &before {
            self.count_out(before);
        }
        before
    }

    pub(super) fn remove(&mut self, key: &SetKey) -> Option<ProgrammedSet> {
        let before = self.sets.remove(key);
        if let Some(before) = &before {
            self.count_out(before);
        }
        before
    }

    pub(super) fn get(&self, key: &SetKey) -> Option<&ProgrammedSet> {
        self.sets.get(key)
    }

    /// Records which backends the set keeps (its slots and table stay as they are).
    pub(super) fn set_members(&mut self, key: &SetKey, members: BTreeMap<Backend, Opinion>) {
        if let Some(set) = self.sets.get_mut(key) {
            set.members = members;
        }
    }

    /// Records that the set's Maglev table is removed; its service id, if it had one.
    pub(super) fn drop_table(&mut self, key: &SetKey) -> Option<u32> {
        let set = self.sets.get_mut(key).filter(|set| set.maglev)?;
        set.maglev = false;
        self.tables -= 1;
        Some(set.service_id)
    }

    pub(super) fn iter(&self) -> btree_map::Iter<'_, SetKey, ProgrammedSet> {
        self.sets.iter()
    }

    pub(super) fn keys(&self) -> btree_map::Keys<'_, SetKey, ProgrammedSet> {
        self.sets.keys()
    }

    pub(super) fn values(&self) -> btree_map::Values<'_, SetKey, ProgrammedSet> {
        self.sets.values()
    }

    /// Slots of the live generations, summed over the sets.
    pub(super) fn slots(&self) -> usize {
        self.slots
    }

    /// Sets with a Maglev table.
    pub(super) fn tables(&self) -> usize {
        self.tables
    }

    fn count_in(&mut self, set: &ProgrammedSet) {
        self.slots += set.slots.len();
        self.tables += usize::from(set.maglev);
    }

    fn count_out(&mut self, set: &ProgrammedSet) {
        self.slots -= set.slots.len();
        self.tables -= usize::from(set.maglev);
    }
}
