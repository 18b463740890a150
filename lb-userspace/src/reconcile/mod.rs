//! The diff between the desired state and what the maps hold, and the order of writes: one
//! reconciler for every frontend kind, with one id space.
//!
//! A backend set (one Service port under one traffic policy) has one service id, its slots
//! and, when outside traffic reaches it, its Maglev table; every frontend of the set names it.
//! Backends have one id per address and port, shared by every set that uses them. A change
//! is written so that no connection and no packet ever sees a half-written set: backends
//! first, then the slots of the idle generation and the Maglev table (replaced whole), then
//! every frontend entry of the set in one map update each, then the old slots, frontends no
//! longer wanted, sets no frontend names, and backends no set keeps. A large sync (a start, a
//! re-list) writes in the same order for all its sets at once, one batch per map and phase
//! (see [`batch`]).
//!
//! Ids are recovered from the pinned maps at start ([`Reconciler::adopt`]), so a restarted
//! agent keeps every set on its service id and every backend on its id: tracked flows and
//! affinity entries keep naming what they named. An id is never handed out while it is in use,
//! and a freed one only after every other (see [`ids`] and [`Reconciler::reserve_ids`]); when
//! no id is free, the one set or backend that needs it is refused and the rest keep serving.
//!
//! Nothing here knows Kubernetes; the maps are behind the [`ServiceMaps`] trait so the same
//! code drives the BPF maps and the in-memory maps of the model tests.
mod backends;
mod batch;
pub mod ids;
pub mod maglev;
mod maps;
pub mod memory;
mod source_ranges;
mod tables;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{FrontendValue, SlotKey, SlotValue, frontend_flags};

pub use backends::RemovedBackend;
use backends::{BackendTable, Opinion};
pub use batch::BATCH_FROM;
use batch::{BatchFrom, Batched};
use ids::IdSpace;
pub use maps::{
    BackendEntry, BatchError, FamilyAddr, FrontendView, MapContents, MapError, ServiceMaps,
    backend_of, backend_value, family_map_names, frontend_key, frontend_of, source_range_key,
    source_range_of,
};
use source_ranges::ProgrammedRanges;
use tables::{FamilyMap, SetTable};

use crate::model::{
    Backend, BackendSet, DesiredService, DesiredState, Family, Frontend, FrontendKind, Protocol,
    Scope, SetKey,
};

/// What the reconciler wrote for one backend set.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ProgrammedSet {
    service_id: u32,
    generation: u8,
    /// Backend ids in slot order (the backends new connections may pick).
    slots: Vec<u32>,
    /// Every backend the set keeps in the maps (the slots and the draining ones), with what
    /// the set says of it.
    members: BTreeMap<Backend, Opinion>,
    /// Whether its Maglev table is written (outside traffic reaches the set).
    maglev: bool,
}

/// A set recovered from pinned maps, not yet matched to a desired set.
#[derive(Clone, Debug, PartialEq, Eq)]
struct AdoptedSet {
    generation: u8,
    slots: Vec<u32>,
    /// The backends its slots name, with what their values say.
    members: BTreeMap<Backend, Opinion>,
    maglev: bool,
    /// The frontends naming it.
    frontends: Vec<Frontend>,
}

/// What one sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    /// Map entries written or removed (each one bpf() syscall on the real maps, or one
    /// element of a batch in a large sync).
    pub map_writes: usize,
    /// Frontends that could not be programmed, with the reason; what was programmed before for
    /// them stays in place.
    pub failed: Vec<(Frontend, String)>,
    /// Backend sets given a service id, and the ids of sets removed (for the counters).
    pub sets_added: Vec<(SetKey, u32)>,
    pub sets_removed: Vec<(SetKey, u32)>,
    /// Backends no set keeps any more, removed from the backends map (their sockets may be
    /// terminated).
    pub backends_removed: Vec<RemovedBackend>,
    /// Sets with more ready backends than one set may have (`MAX_BACKENDS_PER_SERVICE`), with
    /// how many they have: only the first that many are used.
    pub truncated: Vec<(SetKey, usize)>,
}

impl SyncReport {
    /// Adds what a second attempt at this sync's failed frontends did; its failures are the
    /// ones left.
    pub fn absorb_retry(&mut self, retry: SyncReport) {
        self.added += retry.added;
        self.updated += retry.updated;
        self.removed += retry.removed;
        self.map_writes += retry.map_writes;
        self.failed = retry.failed;
        self.sets_added.extend(retry.sets_added);
        self.sets_removed.extend(retry.sets_removed);
        self.backends_removed.extend(retry.backends_removed);
        self.truncated.extend(retry.truncated);
    }
}

/// Keeps the maps equal to the desired state, by difference.
#[derive(Debug, Default)]
pub struct Reconciler {
    frontends: FamilyMap<Frontend, (FrontendValue, SetKey)>,
    sets: SetTable,
    /// The frontends naming each programmed set.
    users: BTreeMap<SetKey, BTreeSet<Frontend>>,
    /// Every backend a set keeps (with the sets keeping it) or the maps hold (with its id).
    backends: BackendTable,
    /// What the values an earlier agent wrote say: one more keeper of each backend until the
    /// first sync is done, as which sets keep it (and what they say) is only known then.
    pinned: BTreeMap<Backend, Opinion>,
    /// Backends a set stopped keeping since the last cleanup (only these can be unused), with
    /// whether a set serving UDP frontends kept them (their UDP sockets are looked for when
    /// they go).
    maybe_unused: BTreeMap<Backend, bool>,
    /// Sets pinned by an earlier agent, by service id, until a desired set takes them.
    adopted: BTreeMap<u32, AdoptedSet>,
    /// Frontends pinned by an earlier agent that no sync has looked at yet.
    adopted_frontends: FamilyMap<Frontend, FrontendValue>,
    /// Allowed sources of LoadBalancer IPs with `loadBalancerSourceRanges`.
    source_ranges: ProgrammedRanges,
    service_ids: IdSpace,
    backend_ids: IdSpace,
    batch_from: BatchFrom,
}

impl Reconciler {
    /// Adopts what the maps already hold (pinned by an earlier agent) without changing
    /// anything that serves traffic. The first [`Reconciler::sync`] matches each desired set
    /// to the service id its frontends name, and each backend to its id by address, so
    /// nothing is renumbered; it then removes what is left over.
    pub fn adopt(maps: &mut impl ServiceMaps) -> Result<Self, MapError> {
        Self::adopt_with_ids(maps, IdSpace::default(), IdSpace::default())
    }

    /// [`Reconciler::adopt`] with these id spaces (smaller ones, in tests).
    pub fn adopt_with_ids(
        maps: &mut impl ServiceMaps,
        service_ids: IdSpace,
        backend_ids: IdSpace,
    ) -> Result<Self, MapError> {
        Self::adopt_counted(maps, service_ids, backend_ids).map(|(reconciler, _)| reconciler)
    }

    /// [`Reconciler::adopt_with_ids`], and how many leftovers it removed.
    fn adopt_counted(
        maps: &mut impl ServiceMaps,
        service_ids: IdSpace,
        backend_ids: IdSpace,
    ) -> Result<(Self, usize), MapError> {
        let contents = maps.dump()?;
        let mut removed = 0;
        let mut reconciler = Reconciler {
            service_ids,
            backend_ids,
            ..Default::default()
        };
        for (id, value) in &contents.backends {
            // An earlier agent's: which protocols led to it is not in the maps.
            reconciler.maybe_unused.insert(value.backend, true);
            reconciler.backends.write(&value.backend, *id, value);
            reconciler
                .pinned
                .insert(value.backend, Opinion::pinned(value));
            reconciler.backend_ids.mark_used(*id);
            reconciler.backend_ids.skip_through(*id);
        }
        let pinned = reconciler.pinned.clone();
        reconciler.keep(&pinned);
        for (key, value) in &contents.frontends {
            reconciler.service_ids.mark_used(value.service_id);
            reconciler.service_ids.skip_through(value.service_id);
            reconciler
                .adopted
                .entry(value.service_id)
                .or_insert_with(|| AdoptedSet {
                    generation: value.generation,
                    slots: contents.live_backends(value).map(|(id, _)| id).collect(),
                    members: contents
                        .live_backends(value)
                        .map(|(_, b)| (b.backend, Opinion::pinned(b)))
                        .collect(),
                    maglev: contents.maglev.contains(&value.service_id),
                    frontends: Vec::new(),
                })
                .frontends
                .push(*key);
        }
        // Ids that only leftovers name: not in use, handed out last.
        let leftovers = contents.slots.keys().map(|slot| slot.service_id);
        let leftovers = leftovers
            .chain(contents.maglev.iter().copied())
            .chain(contents.source_ranges.iter().map(|(id, _)| *id));
        for id in leftovers {
            reconciler.service_ids.skip_through(id);
        }
        reconciler.adopted_frontends = contents.frontends.iter().map(|(k, v)| (*k, *v)).collect();
        reconciler.source_ranges = ProgrammedRanges::adopt(&contents.source_ranges);
        // Leftovers of an interrupted update: slots of idle generations, tables of sets no
        // frontend names. Nothing serving traffic reads them.
        for slot in contents.slots.keys() {
            let live = reconciler.adopted.get(&slot.service_id).is_some_and(|set| {
                set.generation == slot.generation && (slot.index as usize) < set.slots.len()
            });
            if !live {
                removed += 1;
                maps.remove_slot(slot)?;
            }
        }
        for id in &contents.maglev {
            if !reconciler.adopted.contains_key(id) {
                removed += 1;
                maps.remove_maglev(*id)?;
            }
        }
        Ok((reconciler, removed))
    }

    /// Keeps ids up to these from being handed out again: session-affinity and conntrack
    /// entries outlive the sets and backends they name, and must never come to name another.
    /// They are handed out last: once every other id has been used since.
    pub fn reserve_ids(&mut self, highest_service_id: u32, highest_backend_id: u32) {
        self.service_ids.skip_through(highest_service_id);
        self.backend_ids.skip_through(highest_backend_id);
    }

    /// The service id of every programmed backend set.
    pub fn set_ids(&self) -> impl Iterator<Item = (&SetKey, u32)> + '_ {
        self.sets.iter().map(|(key, set)| (key, set.service_id))
    }

    /// The service id of a programmed frontend.
    pub fn service_id(&self, frontend: &Frontend) -> Option<u32> {
        self.frontends
            .get(frontend)
            .map(|(value, _)| value.service_id)
    }

    /// How many entries the reconciler keeps in each map (what it wrote and the kernel took),
    /// each family's maps apart; counted as entries come and go.
    pub fn programmed_entries(&self) -> [(&'static str, usize); 8] {
        use lb_common::map_names;
        let frontends =
            |family| self.frontends.count(family) + self.adopted_frontends.count(family);
        [
            (map_names::FRONTENDS_V4, frontends(Family::V4)),
            (map_names::FRONTENDS_V6, frontends(Family::V6)),
            (map_names::SLOTS_V4, self.sets.slots()),
            (map_names::BACKENDS_V4, self.backends.count(Family::V4)),
            (map_names::BACKENDS_V6, self.backends.count(Family::V6)),
            (map_names::MAGLEV_V4, self.sets.tables()),
            (
                map_names::SOURCE_RANGES_V4,
                self.source_ranges.len(Family::V4),
            ),
            (
                map_names::SOURCE_RANGES_V6,
                self.source_ranges.len(Family::V6),
            ),
        ]
    }

    /// Number of frontends programmed (or adopted and not yet looked at).
    pub fn len(&self) -> usize {
        self.frontends.len() + self.adopted_frontends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes the maps serve `desired`, looking at everything (the first sync after adopting
    /// maps, or a full resync).
    pub fn sync<M: ServiceMaps>(&mut self, desired: &DesiredState, maps: &mut M) -> SyncReport {
        let mut frontends: BTreeSet<Frontend> = desired.frontends.keys().copied().collect();
        frontends.extend(self.frontends.keys().copied());
        frontends.extend(self.adopted_frontends.keys().copied());
        let sets: BTreeSet<SetKey> = desired
            .sets
            .keys()
            .chain(self.sets.keys())
            .cloned()
            .collect();
        if !self.batch_from.batches(frontends.len() + sets.len()) {
            return self.write_all(desired, &frontends, &sets, maps);
        }
        let mut batched = Batched::new(maps);
        let mut report = self.write_all(desired, &frontends, &sets, &mut batched);
        match batched.finish(&mut report) {
            Ok(()) => report,
            Err(failure) => self.recover(desired, maps, report, failure),
        }
    }

    /// The writes of [`Reconciler::sync`].
    fn write_all(
        &mut self,
        desired: &DesiredState,
        frontends: &BTreeSet<Frontend>,
        sets: &BTreeSet<SetKey>,
        maps: &mut impl ServiceMaps,
    ) -> SyncReport {
        let mut report = self.write_changes(desired, frontends, sets, maps);
        // What the earlier agent left and nothing desired took.
        for (frontend, _) in std::mem::take(&mut self.adopted_frontends) {
            report.map_writes += 1;
            if let Err(error) = maps.remove_frontend(&frontend) {
                report.failed.push((frontend, error.to_string()));
            }
        }
        for (id, set) in std::mem::take(&mut self.adopted) {
            self.service_ids.release(id);
            remove_slots(id, set.generation, set.slots.len(), maps, &mut report);
            if set.maglev {
                report.map_writes += 1;
                let _ = maps.remove_maglev(id);
            }
        }
        // Source ranges of ids no set has any more (an earlier agent's).
        let live: BTreeSet<u32> = self.sets.values().map(|set| set.service_id).collect();
        self.source_ranges.keep_only(&live, maps, &mut report);
        // Every set has said what it keeps: the earlier agent's word no longer counts.
        let pinned = std::mem::take(&mut self.pinned);
        self.release(&pinned);
        let adopted: Vec<Backend> = pinned.into_keys().collect();
        self.rewrite_backends(&adopted, maps, &mut report);
        self.remove_unused_backends(maps, &mut report);
        report
    }

    /// Like [`Reconciler::sync`], looking only at the frontends and sets the model says
    /// changed: the cost of a change does not grow with the number of services.
    pub fn sync_changes<M: ServiceMaps>(
        &mut self,
        desired: &DesiredState,
        frontends: &BTreeSet<Frontend>,
        sets: &BTreeSet<SetKey>,
        maps: &mut M,
    ) -> SyncReport {
        if !self.batch_from.batches(frontends.len() + sets.len()) {
            return self.write_changes(desired, frontends, sets, maps);
        }
        let mut batched = Batched::new(maps);
        let mut report = self.write_changes(desired, frontends, sets, &mut batched);
        match batched.finish(&mut report) {
            Ok(()) => report,
            Err(failure) => self.recover(desired, maps, report, failure),
        }
    }

    /// Batches the writes of syncs looking at `looked_at` frontends and sets or more (by
    /// default [`BATCH_FROM`]; 0: every sync, `usize::MAX`: none).
    pub fn batch_writes_from(&mut self, looked_at: usize) {
        self.batch_from = BatchFrom(looked_at);
    }

    /// After a batched write failed (a full map, most likely): reads back what the maps hold,
    /// as a restarted agent would, and writes the sync again one entry at a time, so each
    /// failure is reported for its frontends and what was programmed for them stays. The ids
    /// keep where they were handed out up to (see [`Reconciler::reserve_ids`]).
    fn recover(
        &mut self,
        desired: &DesiredState,
        maps: &mut impl ServiceMaps,
        batched: SyncReport,
        failure: batch::Failure,
    ) -> SyncReport {
        tracing::warn!(
            error = %failure.error,
            "a batched map write failed; reading the maps back and writing one entry at a time"
        );
        let ids = (self.service_ids.emptied(), self.backend_ids.emptied());
        let (mut fresh, leftovers) = match Self::adopt_counted(maps, ids.0, ids.1) {
            Ok(adopted) => adopted,
            Err(error) => {
                tracing::error!(%error, "could not read the maps back");
                let mut report = batched;
                report
                    .failed
                    .extend(desired.frontends.iter().map(|(frontend, service)| {
                        let cause = format!("{}: {}; {error}", service.name, failure.error);
                        (*frontend, cause)
                    }));
                return report;
            }
        };
        fresh.batch_from = BatchFrom::NEVER;
        let mut report = fresh.sync(desired, maps);
        fresh.batch_from = self.batch_from;
        // What the batches did that the maps no longer show.
        report.map_writes += failure.sent + leftovers;
        report.removed += failure.frontends_removed;
        let live: BTreeSet<u32> = fresh.sets.values().map(|set| set.service_id).collect();
        let sets_removed = batched.sets_removed.into_iter();
        let sets_removed = sets_removed.filter(|(_, id)| !live.contains(id));
        report.sets_removed.extend(sets_removed);
        let mut gone: BTreeSet<Backend> =
            report.backends_removed.iter().map(|r| r.backend).collect();
        for removed in batched.backends_removed {
            if fresh.backends.id(&removed.backend).is_none() && gone.insert(removed.backend) {
                report.backends_removed.push(removed);
            }
        }
        *self = fresh;
        report
    }

    /// The writes of [`Reconciler::sync_changes`].
    fn write_changes(
        &mut self,
        desired: &DesiredState,
        frontends: &BTreeSet<Frontend>,
        sets: &BTreeSet<SetKey>,
        maps: &mut impl ServiceMaps,
    ) -> SyncReport {
        let mut report = SyncReport::default();
        // The sets to look at: those that changed and those of the frontends that changed.
        let mut affected: BTreeSet<SetKey> = sets.clone();
        // Removals first, so a frontend that moves frees map room before others take it.
        for frontend in frontends
            .iter()
            .filter(|f| !desired.frontends.contains_key(f))
        {
            let adopted = self.adopted_frontends.remove(frontend).is_some();
            let programmed = self.frontends.remove(frontend);
            if let Some((_, set)) = &programmed {
                self.unuse(set, frontend);
                affected.insert(set.clone());
            }
            if programmed.is_none() && !adopted {
                continue;
            }
            report.map_writes += 1;
            match maps.remove_frontend(frontend) {
                Ok(()) => report.removed += 1,
                Err(error) => report.failed.push((*frontend, error.to_string())),
            }
        }
        for frontend in frontends {
            if let Some(service) = desired.frontends.get(frontend) {
                affected.insert(service.set());
            }
            if let Some((_, set)) = self.frontends.get(frontend) {
                affected.insert(set.clone());
            }
        }
        // Which frontends each affected set will serve after this sync: those programmed
        // under it, less the changed ones leaving it, plus the changed ones joining it. One
        // pass over the changed frontends, so a full sync stays linear.
        let mut joined: BTreeMap<SetKey, BTreeSet<Frontend>> = affected
            .iter()
            .map(|set| {
                (
                    set.clone(),
                    self.users.get(set).cloned().unwrap_or_default(),
                )
            })
            .collect();
        for frontend in frontends {
            if let Some((_, set)) = self.frontends.get(frontend)
                && let Some(users) = joined.get_mut(set)
            {
                users.remove(frontend);
            }
            if let Some(service) = desired.frontends.get(frontend) {
                joined.entry(service.set()).or_default().insert(*frontend);
            }
        }
        let wanted_users: BTreeMap<SetKey, Vec<(Frontend, &DesiredService)>> = joined
            .into_iter()
            .map(|(set, users)| {
                let list = users
                    .iter()
                    .filter_map(|frontend| Some((*frontend, desired.frontends.get(frontend)?)))
                    .collect();
                (set, list)
            })
            .collect();
        let mut failed_sets = BTreeSet::new();
        for (set_key, users) in &wanted_users {
            let Some(set) = desired.sets.get(set_key).filter(|_| !users.is_empty()) else {
                continue;
            };
            let maglev = users
                .iter()
                .any(|(f, s)| s.kind.is_external() && f.scope == Scope::External);
            if let Err(error) = self.write_set(set_key, set, maglev, users, maps, &mut report) {
                failed_sets.insert(set_key.clone());
                for (frontend, service) in users {
                    report
                        .failed
                        .push((*frontend, format!("{}: {error}", service.name)));
                }
            }
        }
        // Allowed sources before the frontends that check them; stale ones after.
        let mut ranges_to_trim = Vec::new();
        for (set_key, users) in &wanted_users {
            let Some(set) = self
                .sets
                .get(set_key)
                .filter(|_| !failed_sets.contains(set_key))
            else {
                continue;
            };
            let wanted = source_ranges::wanted(users);
            for error in self
                .source_ranges
                .add(set.service_id, &wanted, maps, &mut report)
            {
                for (frontend, service) in users
                    .iter()
                    .filter(|(_, service)| service.source_ranges.is_some())
                {
                    report
                        .failed
                        .push((*frontend, format!("{}: {error}", service.name)));
                }
            }
            ranges_to_trim.push((set.service_id, wanted));
        }
        // Frontends of sets that were written: new ones, and changed flags or kinds.
        for frontend in frontends {
            let Some(service) = desired.frontends.get(frontend) else {
                continue;
            };
            let set_key = service.set();
            if failed_sets.contains(&set_key) {
                continue;
            }
            let Some(set) = self.sets.get(&set_key) else {
                continue;
            };
            let key = *frontend;
            let value = frontend_value(set, service);
            let adopted = self.adopted_frontends.remove(&key);
            let before = self.frontends.get(&key).map(|(v, _)| *v).or(adopted);
            if before == Some(value) {
                self.frontends.insert(key, (value, set_key.clone()));
                self.users.entry(set_key).or_default().insert(key);
                continue;
            }
            report.map_writes += 1;
            match maps.put_frontend(key, value) {
                Ok(()) => {
                    if before.is_some() {
                        report.updated += 1;
                    } else {
                        report.added += 1;
                    }
                    if let Some((_, old_set)) = self.frontends.insert(key, (value, set_key.clone()))
                        && old_set != set_key
                    {
                        self.unuse(&old_set, &key);
                    }
                    self.users.entry(set_key).or_default().insert(key);
                }
                Err(error) => report
                    .failed
                    .push((*frontend, format!("{}: {error}", service.name))),
            }
        }
        self.trim_tables(&affected, maps, &mut report);
        for (service_id, wanted) in &ranges_to_trim {
            self.source_ranges
                .trim(*service_id, wanted, maps, &mut report);
        }
        // Sets no frontend names any more (or no longer desired and unnamed).
        for set_key in &affected {
            let unused = self.users.get(set_key).is_none_or(BTreeSet::is_empty);
            if unused && let Some(set) = self.sets.remove(set_key) {
                self.users.remove(set_key);
                self.service_ids.release(set.service_id);
                remove_slots(
                    set.service_id,
                    set.generation,
                    set.slots.len(),
                    maps,
                    &mut report,
                );
                if set.maglev {
                    report.map_writes += 1;
                    let _ = maps.remove_maglev(set.service_id);
                }
                self.source_ranges
                    .trim(set.service_id, &BTreeSet::new(), maps, &mut report);
                self.release(&set.members);
                // What the other sets keeping them say may differ.
                let kept: Vec<Backend> = set.members.keys().copied().collect();
                self.rewrite_backends(&kept, maps, &mut report);
                report.sets_removed.push((set_key.clone(), set.service_id));
            }
        }
        self.remove_unused_backends(maps, &mut report);
        report
    }

    /// Forgets that frontend `key` names `set`.
    fn unuse(&mut self, set: &SetKey, key: &Frontend) {
        if let Some(users) = self.users.get_mut(set) {
            users.remove(key);
        }
    }

    /// Brings one set's backends, slots and Maglev table to `wanted`, switching every
    /// programmed frontend of the set to a new generation when the slots change.
    fn write_set(
        &mut self,
        set_key: &SetKey,
        wanted: &BackendSet,
        maglev: bool,
        users: &[(Frontend, &DesiredService)],
        maps: &mut impl ServiceMaps,
        report: &mut SyncReport,
    ) -> Result<(), MapError> {
        // The slot index has room for this many; the rest are left out, and said so.
        let limit = lb_common::limits::MAX_BACKENDS_PER_SERVICE as usize;
        if wanted.backends.len() > limit {
            report
                .truncated
                .push((set_key.clone(), wanted.backends.len()));
        }
        let picks: Vec<Backend> = wanted.backends.iter().take(limit).copied().collect();
        // Every frontend of a set is one Service port's, so of one protocol.
        let udp = users.iter().any(|(f, _)| f.protocol == Protocol::Udp);
        let members: BTreeMap<Backend, Opinion> = picks
            .iter()
            .chain(&wanted.draining)
            .map(|b| (*b, Opinion::of(b, wanted, udp)))
            .collect();
        let current = match self.sets.get(set_key) {
            Some(set) => Some(set.clone()),
            None => self.take_adopted(set_key, users, report),
        };
        // While the set switches it keeps the backends of both generations; what it says of
        // a backend is what it says from now on.
        let before = current
            .as_ref()
            .map(|set| set.members.clone())
            .unwrap_or_default();
        let mut during = before.clone();
        during.extend(members.iter().map(|(b, o)| (*b, *o)));
        self.rekeep(&before, &during);
        // Backends first: new ones get ids, changed values are rewritten in place.
        let mut created = Vec::new();
        let mut result = self.write_backends(during.keys(), &mut created, maps, report);
        if result.is_ok() {
            let written = |b: &Backend| self.backends.id(b).expect("a written backend");
            let ids: Vec<u32> = picks.iter().map(written).collect();
            // A frontend leaving the set in this sync still names it until its own write: the
            // table stays until then (see `trim_tables`).
            let maglev = maglev || self.reached_from_outside(set_key);
            result = match current {
                None => self.create_set(set_key, &picks, &ids, maglev, maps, report),
                Some(current) => {
                    self.update_set(set_key, current, &picks, &ids, maglev, users, maps, report)
                }
            };
        }
        if let Err(error) = result {
            // What was programmed keeps serving, and the set keeps what it kept.
            self.rekeep(&during, &before);
            self.undo_backends(&created, maps, report);
            self.rewrite_backends(during.keys(), maps, report);
            return Err(error);
        }
        self.rekeep(&during, &members);
        let gone: Vec<Backend> = before
            .keys()
            .filter(|b| !members.contains_key(*b))
            .copied()
            .collect();
        self.sets.set_members(set_key, members);
        // Backends only the old generation kept: what the other sets keeping them say may
        // differ (those no set keeps go at the end of the sync).
        self.rewrite_backends(&gone, maps, report);
        Ok(())
    }

    /// The set an earlier agent pinned under the service id these frontends name, if any. Every
    /// frontend naming that id becomes a programmed user of `set_key`, so that the set's next
    /// generation switches them all (one leaving the set moves in its own write later).
    fn take_adopted(
        &mut self,
        set_key: &SetKey,
        users: &[(Frontend, &DesiredService)],
        report: &mut SyncReport,
    ) -> Option<ProgrammedSet> {
        let id = users.iter().find_map(|(frontend, _)| {
            let value = self.adopted_frontends.get(frontend)?;
            self.adopted
                .contains_key(&value.service_id)
                .then_some(value.service_id)
        })?;
        let adopted = self.adopted.remove(&id)?;
        for key in &adopted.frontends {
            if let Some(value) = self.adopted_frontends.remove(key) {
                self.frontends.insert(*key, (value, set_key.clone()));
                self.users.entry(set_key.clone()).or_default().insert(*key);
            }
        }
        // From now on it is programmed: what the earlier agent wrote keeps serving until the
        // write that follows replaces it, and it keeps its backends until then.
        self.keep(&adopted.members);
        let set = ProgrammedSet {
            service_id: id,
            generation: adopted.generation,
            slots: adopted.slots,
            members: adopted.members,
            maglev: adopted.maglev,
        };
        self.sets.insert(set_key.clone(), set.clone());
        report.sets_added.push((set_key.clone(), id));
        Some(set)
    }

    /// Whether a frontend programmed to name `set_key` is reached from outside (XDP picks its
    /// backend through the set's Maglev table).
    fn reached_from_outside(&self, set_key: &SetKey) -> bool {
        self.users.get(set_key).into_iter().flatten().any(|key| {
            key.scope == Scope::External
                && self.frontends.get(key).is_some_and(|(value, _)| {
                    FrontendKind::from_number(value.kind).is_some_and(FrontendKind::is_external)
                })
        })
    }

    /// Removes the Maglev tables of `sets` that no programmed frontend reached from outside
    /// names any more.
    fn trim_tables(
        &mut self,
        sets: &BTreeSet<SetKey>,
        maps: &mut impl ServiceMaps,
        report: &mut SyncReport,
    ) {
        for set_key in sets {
            let has_table = self.sets.get(set_key).is_some_and(|set| set.maglev);
            if !has_table || self.reached_from_outside(set_key) {
                continue;
            }
            if let Some(service_id) = self.sets.drop_table(set_key) {
                report.map_writes += 1;
                let _ = maps.remove_maglev(service_id);
            }
        }
    }

    fn create_set(
        &mut self,
        set_key: &SetKey,
        picks: &[Backend],
        ids: &[u32],
        maglev: bool,
        maps: &mut impl ServiceMaps,
        report: &mut SyncReport,
    ) -> Result<(), MapError> {
        let service_id = self.service_ids.allocate().ok_or_else(|| {
            MapError::ids_exhausted(lb_common::map_names::SLOTS_V4, "service", &self.service_ids)
        })?;
        let written = write_slots(service_id, 0, ids, maps, report).and_then(|()| {
            if maglev && !ids.is_empty() {
                report.map_writes += 1;
                maps.put_maglev_of(service_id, picks, ids)?;
            }
            Ok(())
        });
        if let Err(error) = written {
            remove_slots(service_id, 0, ids.len(), maps, report);
            self.service_ids.release(service_id);
            return Err(error);
        }
        self.sets.insert(
            set_key.clone(),
            ProgrammedSet {
                service_id,
                generation: 0,
                slots: ids.to_vec(),
                members: BTreeMap::new(),
                maglev: maglev && !ids.is_empty(),
            },
        );
        report.sets_added.push((set_key.clone(), service_id));
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn update_set(
        &mut self,
        set_key: &SetKey,
        current: ProgrammedSet,
        picks: &[Backend],
        ids: &[u32],
        maglev: bool,
        users: &[(Frontend, &DesiredService)],
        maps: &mut impl ServiceMaps,
        report: &mut SyncReport,
    ) -> Result<(), MapError> {
        let want_table = maglev && !ids.is_empty();
        if current.slots == ids {
            // Same slots: at most the Maglev table comes or goes.
            let mut next = current.clone();
            if want_table && !current.maglev {
                report.map_writes += 1;
                maps.put_maglev_of(current.service_id, picks, ids)?;
            }
            next.maglev = want_table;
            self.sets.insert(set_key.clone(), next);
            if current.maglev && !want_table {
                report.map_writes += 1;
                let _ = maps.remove_maglev(current.service_id);
            }
            return Ok(());
        }
        // New slots: the idle generation, the table, then every frontend switches.
        let generation = 1 - current.generation;
        let written =
            write_slots(current.service_id, generation, ids, maps, report).and_then(|()| {
                if want_table {
                    report.map_writes += 1;
                    maps.put_maglev_of(current.service_id, picks, ids)?;
                }
                Ok(())
            });
        if let Err(error) = written {
            remove_slots(current.service_id, generation, ids.len(), maps, report);
            return Err(error);
        }
        let next = ProgrammedSet {
            service_id: current.service_id,
            generation,
            slots: ids.to_vec(),
            members: current.members.clone(),
            maglev: want_table,
        };
        // Every frontend naming the set moves to the new generation, those leaving the set in
        // this sync too (their own write follows; until then they serve the new generation),
        // so nothing names the old one; a frontend the switch fails for keeps the old one, so
        // the old slots stay.
        let mut switch_failed = None;
        let programmed: Vec<(Frontend, FrontendValue)> = self
            .users
            .get(set_key)
            .into_iter()
            .flatten()
            .filter_map(|key| Some((*key, self.frontends.get(key)?.0)))
            .collect();
        for (key, before) in programmed {
            let staying = users.iter().find(|(f, _)| *f == key);
            let value = match staying {
                Some((_, service)) => frontend_value(&next, service),
                None => FrontendValue {
                    count: next.slots.len() as u16,
                    generation: next.generation,
                    ..before
                },
            };
            report.map_writes += 1;
            match maps.put_frontend(key, value) {
                Ok(()) => {
                    if let Some(entry) = self.frontends.get_mut(&key) {
                        entry.0 = value;
                    }
                    if staying.is_some() {
                        report.updated += 1;
                    }
                }
                Err(error) => switch_failed = Some(error),
            }
        }
        self.sets.insert(set_key.clone(), next);
        if let Some(error) = switch_failed {
            return Err(error);
        }
        remove_slots(
            current.service_id,
            current.generation,
            current.slots.len(),
            maps,
            report,
        );
        if current.maglev && !want_table {
            report.map_writes += 1;
            let _ = maps.remove_maglev(current.service_id);
        }
        Ok(())
    }
}

fn write_slots(
    service_id: u32,
    generation: u8,
    ids: &[u32],
    maps: &mut impl ServiceMaps,
    report: &mut SyncReport,
) -> Result<(), MapError> {
    for (index, id) in ids.iter().enumerate() {
        let slot = SlotKey {
            service_id,
            index: index as u16,
            generation,
            pad: 0,
        };
        report.map_writes += 1;
        maps.put_slot(slot, SlotValue { backend_id: *id })?;
    }
    Ok(())
}

/// Removes slots `0..count` of a generation; ones already gone are fine.
fn remove_slots(
    service_id: u32,
    generation: u8,
    count: usize,
    maps: &mut impl ServiceMaps,
    report: &mut SyncReport,
) {
    for index in 0..count {
        report.map_writes += 1;
        let _ = maps.remove_slot(&SlotKey {
            service_id,
            index: index as u16,
            generation,
            pad: 0,
        });
    }
}

fn frontend_value(set: &ProgrammedSet, service: &DesiredService) -> FrontendValue {
    let mut flags = 0;
    let timeout = match service.affinity_timeout_secs {
        Some(secs) => {
            flags |= frontend_flags::AFFINITY;
            secs
        }
        None => 0,
    };
    if service.local_only {
        flags |= frontend_flags::LOCAL_ONLY;
    }
    if service.two_scopes {
        flags |= frontend_flags::TWO_SCOPES;
    }
    if let Some(ranges) = &service.source_ranges {
        flags |= frontend_flags::SOURCE_RANGES;
        if ranges.allow_node {
            flags |= frontend_flags::RANGES_ALLOW_NODE;
        }
        if ranges.allow_pods {
            flags |= frontend_flags::RANGES_ALLOW_PODS;
        }
    }
    FrontendValue {
        service_id: set.service_id,
        count: set.slots.len() as u16,
        generation: set.generation,
        flags,
        affinity_timeout_secs: timeout,
        kind: service.kind.number(),
        pad: [0; 3],
    }
}
