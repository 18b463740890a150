//! The writes of a large sync, held back and issued map by map: one batch per map and phase
//! instead of one call per entry (a start, a re-list: 100,000 services are millions of
//! entries).
//!
//! The phases keep the order a sync writes in (see the [module](super) documentation), for
//! every set at once: removals of frontends no longer wanted (they free room); backends;
//! slots; Maglev tables; allowed source ranges; frontends; then old Maglev tables, slots and
//! source ranges, and unused backends last. A frontend is written after everything it names
//! and an entry removed after every frontend that named it changed, as when each set is
//! written on its own. A key removed and then written again in one sync (an id given back
//! and handed out again) first sends what is held back, so a removal never overtakes the
//! write after it.
//!
//! The reconciler takes every held-back write as done. When one fails (a full map), the ones
//! after it are not sent; the batches went in the safe order, so what the maps hold serves
//! as before, and [`super::Reconciler`] reads it back and writes the sync again one entry at
//! a time, each failure reported for its frontend.
use std::{collections::HashSet, hash::Hash};

use lb_common::{FrontendValue, MaglevTable, SlotKey, SlotValue};

use super::{BackendEntry, BatchError, MapContents, MapError, ServiceMaps, SyncReport};
use crate::{
    cidr::Cidr,
    model::{Backend, Family, Frontend},
};

/// Syncs looking at this many frontends and sets or more batch their writes; smaller ones
/// (one endpoint changed) write each entry as they go.
pub const BATCH_FROM: usize = 32;

/// From how many frontends and sets looked at a sync batches its writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct BatchFrom(pub(super) usize);

impl Default for BatchFrom {
    fn default() -> Self {
        Self(BATCH_FROM)
    }
}

impl BatchFrom {
    pub(super) const NEVER: Self = Self(usize::MAX);

    pub(super) fn batches(self, looked_at: usize) -> bool {
        looked_at >= self.0
    }
}

/// The writes held back, by phase.
#[derive(Debug, Default)]
struct Pending {
    remove_frontends: Vec<Frontend>,
    put_backends: Vec<(u32, BackendEntry)>,
    put_slots: Vec<(SlotKey, SlotValue)>,
    /// Tables are computed when sent (each is 64 KiB).
    put_maglev: Vec<(u32, Vec<Backend>, Vec<u32>)>,
    put_ranges: Vec<(u32, Cidr)>,
    put_frontends: Vec<(Frontend, FrontendValue)>,
    remove_maglev: Vec<u32>,
    remove_slots: Vec<SlotKey>,
    remove_ranges: Vec<(u32, Cidr)>,
    remove_backends: Vec<(u32, Family)>,
}

/// The keys `Pending` removes, by map (backends by id: one id space for both families).
#[derive(Debug, Default)]
struct Removed {
    frontends: HashSet<Frontend>,
    slots: HashSet<SlotKey>,
    backends: HashSet<u32>,
    maglev: HashSet<u32>,
    ranges: HashSet<(u32, Cidr)>,
}

impl Removed {
    fn clear(&mut self) {
        self.frontends.clear();
        self.slots.clear();
        self.backends.clear();
        self.maglev.clear();
        self.ranges.clear();
    }
}

/// A batched write that failed: the ones after it were not sent.
#[derive(Debug)]
pub(super) struct Failure {
    pub(super) error: MapError,
    /// Frontends the batches removed before it (they are gone from the maps).
    pub(super) frontends_removed: usize,
    /// Entries sent (written, removed or failed), the failed one included.
    pub(super) sent: usize,
}

/// [`ServiceMaps`] holding writes back (each taken as done) and sending them in batches.
pub(super) struct Batched<'m, M: ServiceMaps> {
    maps: &'m mut M,
    pending: Pending,
    removed: Removed,
    /// The first write that failed; nothing is sent after it.
    failed: Option<MapError>,
    frontends_removed: usize,
    sent: usize,
    /// Removals of frontends that failed (reported for the frontend, as without batches).
    removals_failed: Vec<(Frontend, MapError)>,
}

impl<'m, M: ServiceMaps> Batched<'m, M> {
    pub(super) fn new(maps: &'m mut M) -> Self {
        Self {
            maps,
            pending: Pending::default(),
            removed: Removed::default(),
            failed: None,
            frontends_removed: 0,
            sent: 0,
            removals_failed: Vec::new(),
        }
    }

    /// Sends what is held back. A frontend that could not be removed is reported failed (it
    /// was counted removed); the first failed write, if any, is returned.
    pub(super) fn finish(mut self, report: &mut SyncReport) -> Result<(), Failure> {
        self.flush();
        for (frontend, error) in self.removals_failed {
            report.removed = report.removed.saturating_sub(1);
            report.failed.push((frontend, error.to_string()));
        }
        match self.failed {
            None => Ok(()),
            Some(error) => Err(Failure {
                error,
                frontends_removed: self.frontends_removed,
                sent: self.sent,
            }),
        }
    }

    /// Sends every held-back write, phase by phase, unless one failed before.
    fn flush(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        self.removed.clear();
        if self.failed.is_none()
            && let Err(error) = self.send(&pending)
        {
            self.failed = Some(error);
        }
    }

    fn send(&mut self, p: &Pending) -> Result<(), MapError> {
        let maps = &mut *self.maps;
        let sent = &mut self.sent;
        // Frontends no longer wanted first: they free room.
        let mut rest = &p.remove_frontends[..];
        while let Err(failed) = maps.remove_frontends(rest) {
            *sent += failed.index + 1;
            self.frontends_removed += failed.index;
            self.removals_failed
                .push((rest[failed.index], failed.error));
            rest = &rest[failed.index + 1..];
        }
        *sent += rest.len();
        self.frontends_removed += rest.len();
        counted(
            sent,
            p.put_backends.len(),
            maps.put_backends(&p.put_backends),
        )?;
        counted(sent, p.put_slots.len(), maps.put_slots(&p.put_slots))?;
        for (service_id, picks, ids) in &p.put_maglev {
            *sent += 1;
            maps.put_maglev_of(*service_id, picks, ids)?;
        }
        for (service_id, range) in &p.put_ranges {
            *sent += 1;
            maps.put_source_range(*service_id, *range)?;
        }
        let frontends = maps.put_frontends(&p.put_frontends);
        counted(sent, p.put_frontends.len(), frontends)?;
        // What no frontend names any more. A removal failing leaves an entry nothing reads
        // (gone already, most likely): the next start's adoption removes it.
        let mut unremoved = Vec::new();
        for service_id in &p.remove_maglev {
            *sent += 1;
            if let Err(error) = maps.remove_maglev(*service_id) {
                unremoved.push(error);
            }
        }
        let slots = |keys: &[SlotKey]| maps.remove_slots(keys);
        remove_each(&p.remove_slots, slots, sent, &mut unremoved);
        for (service_id, range) in &p.remove_ranges {
            *sent += 1;
            if let Err(error) = maps.remove_source_range(*service_id, *range) {
                unremoved.push(error);
            }
        }
        let backends = |ids: &[(u32, Family)]| maps.remove_backends(ids);
        remove_each(&p.remove_backends, backends, sent, &mut unremoved);
        if let Some(first) = unremoved.first() {
            tracing::warn!(entries = unremoved.len(), %first, "could not remove map entries");
        }
        Ok(())
    }

    /// Holds a write back; one of a key removed earlier in the batch sends the batch first.
    fn put<K: Hash + Eq>(&mut self, key: &K, removed: fn(&Removed) -> &HashSet<K>) {
        if removed(&self.removed).contains(key) {
            self.flush();
        }
    }
}

/// Counts the entries a batch of `len` sent (up to the failed one) into `sent`.
fn counted(sent: &mut usize, len: usize, result: Result<(), BatchError>) -> Result<(), MapError> {
    match result {
        Ok(()) => {
            *sent += len;
            Ok(())
        }
        Err(failed) => {
            *sent += failed.index + 1;
            Err(MapError {
                cause: format!(
                    "{} (entry {} of a batch of {})",
                    failed.error.cause,
                    failed.index + 1,
                    failed.count
                ),
                ..failed.error
            })
        }
    }
}

/// Removes `keys` with `remove`, going on after each failure.
fn remove_each<K>(
    keys: &[K],
    mut remove: impl FnMut(&[K]) -> Result<(), BatchError>,
    sent: &mut usize,
    failures: &mut Vec<MapError>,
) {
    let mut rest = keys;
    while let Err(failed) = remove(rest) {
        *sent += failed.index + 1;
        failures.push(failed.error);
        rest = &rest[failed.index + 1..];
    }
    *sent += rest.len();
}

impl<M: ServiceMaps> ServiceMaps for Batched<'_, M> {
    fn put_frontend(&mut self, frontend: Frontend, value: FrontendValue) -> Result<(), MapError> {
        self.put(&frontend, |r| &r.frontends);
        self.pending.put_frontends.push((frontend, value));
        Ok(())
    }

    fn remove_frontend(&mut self, frontend: &Frontend) -> Result<(), MapError> {
        self.removed.frontends.insert(*frontend);
        self.pending.remove_frontends.push(*frontend);
        Ok(())
    }

    fn put_slot(&mut self, key: SlotKey, value: SlotValue) -> Result<(), MapError> {
        self.put(&key, |r| &r.slots);
        self.pending.put_slots.push((key, value));
        Ok(())
    }

    fn remove_slot(&mut self, key: &SlotKey) -> Result<(), MapError> {
        self.removed.slots.insert(*key);
        self.pending.remove_slots.push(*key);
        Ok(())
    }

    fn put_backend(&mut self, id: u32, backend: BackendEntry) -> Result<(), MapError> {
        self.put(&id, |r| &r.backends);
        self.pending.put_backends.push((id, backend));
        Ok(())
    }

    fn remove_backend(&mut self, id: u32, family: Family) -> Result<(), MapError> {
        self.removed.backends.insert(id);
        self.pending.remove_backends.push((id, family));
        Ok(())
    }

    fn put_maglev(&mut self, service_id: u32, table: &MaglevTable) -> Result<(), MapError> {
        // A table made elsewhere: after what is held back, at once.
        self.flush();
        if self.failed.is_none()
            && let Err(error) = self.maps.put_maglev(service_id, table)
        {
            self.failed = Some(error);
        }
        Ok(())
    }

    fn put_maglev_of(
        &mut self,
        service_id: u32,
        picks: &[Backend],
        ids: &[u32],
    ) -> Result<(), MapError> {
        self.put(&service_id, |r| &r.maglev);
        self.pending
            .put_maglev
            .push((service_id, picks.to_vec(), ids.to_vec()));
        Ok(())
    }

    fn remove_maglev(&mut self, service_id: u32) -> Result<(), MapError> {
        self.removed.maglev.insert(service_id);
        self.pending.remove_maglev.push(service_id);
        Ok(())
    }

    fn put_source_range(&mut self, service_id: u32, range: Cidr) -> Result<(), MapError> {
        self.put(&(service_id, range.network()), |r| &r.ranges);
        self.pending.put_ranges.push((service_id, range));
        Ok(())
    }

    fn remove_source_range(&mut self, service_id: u32, range: Cidr) -> Result<(), MapError> {
        self.removed.ranges.insert((service_id, range.network()));
        self.pending.remove_ranges.push((service_id, range));
        Ok(())
    }

    fn dump(&self) -> Result<MapContents, MapError> {
        // Not while writes are held back: the reconciler reads the maps only to adopt them.
        debug_assert!(self.pending.put_frontends.is_empty() && self.pending.put_slots.is_empty());
        self.maps.dump()
    }
}
