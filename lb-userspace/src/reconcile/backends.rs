//! Backends shared by every set: one id per address and port, and one value merging what
//! each set keeping it says (terminating, local), whatever order the sets are written in.
use std::collections::BTreeMap;

use lb_common::{backend_flags, backend_states};

use super::{
    BackendEntry, MapError, Reconciler, ServiceMaps, SyncReport, family_map_names,
    tables::FamilyCount,
};
use crate::model::{Backend, BackendSet, Family};

/// What one set says of a backend it keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Opinion {
    pub(super) terminating: bool,
    pub(super) local: bool,
    /// The set serves UDP frontends: connected UDP sockets may have reached the backend
    /// through it (destroyed when the backend goes, as kube-proxy clears the UDP conntrack
    /// entries of removed endpoints).
    pub(super) udp: bool,
}

impl Opinion {
    /// What `set`, serving UDP frontends or not, says of `backend`.
    pub(super) fn of(backend: &Backend, set: &BackendSet, udp: bool) -> Self {
        Self {
            terminating: set.is_terminating(backend),
            local: set.local.contains(backend),
            udp,
        }
    }

    /// What the value an earlier agent wrote says (the protocol of its sets is not in the
    /// maps: taken for UDP, so that no socket is spared).
    pub(super) fn pinned(value: &BackendEntry) -> Self {
        Self {
            terminating: value.state != backend_states::ACTIVE,
            local: value.flags & backend_flags::LOCAL != 0,
            udp: true,
        }
    }
}

/// How many programmed sets keep a backend, and what they say of it. One backend id serves
/// every set, so its value merges what they say (see [`Reconciler::backend_value`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Keepers {
    /// (u32: one of these per backend, and no backend is in 4 billion sets.)
    pub(super) sets: u32,
    /// Sets saying it is terminating.
    pub(super) terminating: u32,
    /// Sets saying it is on another node.
    pub(super) remote: u32,
    /// A set serving UDP frontends kept it since it was last unkept (it stays said while
    /// other sets keep it: UDP sockets that reached it earlier are still connected to it).
    pub(super) udp_seen: bool,
}

/// A backend the sync removed from the maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemovedBackend {
    pub backend: Backend,
    /// A set serving UDP frontends kept it: connected UDP sockets may name it.
    pub udp: bool,
}

/// What the reconciler knows of one backend: the sets keeping it, and what it wrote for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct BackendRecord {
    pub(super) keepers: Keepers,
    /// Its id and the value last written under it, once it is in the maps.
    pub(super) written: Option<Written>,
}

/// A backend's id and the state and flags last written in its map value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Written {
    pub(super) id: u32,
    pub(super) state: u8,
    pub(super) flags: u8,
}

impl Written {
    fn of(id: u32, value: &BackendEntry) -> Self {
        Self {
            id,
            state: value.state,
            flags: value.flags,
        }
    }

    fn says(&self, value: &BackendEntry) -> bool {
        self.state == value.state && self.flags == value.flags
    }
}

/// Every backend a set keeps or the maps hold, one record each (a write looks a backend up
/// once for its keepers and its id), with the backends map's entries counted by family.
#[derive(Debug, Default)]
pub(super) struct BackendTable {
    records: BTreeMap<Backend, BackendRecord>,
    written: FamilyCount,
}

impl BackendTable {
    /// The id of `backend` in the maps.
    pub(super) fn id(&self, backend: &Backend) -> Option<u32> {
        Some(self.records.get(backend)?.written?.id)
    }

    /// Whether a set keeps `backend`.
    pub(super) fn is_kept(&self, backend: &Backend) -> bool {
        self.records
            .get(backend)
            .is_some_and(|record| record.keepers.sets > 0)
    }

    /// The backends in the maps (sorted).
    #[cfg(test)]
    pub(super) fn written(&self) -> impl Iterator<Item = &Backend> + '_ {
        let records = self.records.iter();
        records.filter_map(|(backend, record)| record.written.map(|_| backend))
    }

    /// Entries of the backends map of `family`.
    pub(super) fn count(&self, family: Family) -> usize {
        self.written.get(family)
    }

    /// The keepers of every kept backend.
    #[cfg(test)]
    pub(super) fn keepers(&self) -> BTreeMap<Backend, Keepers> {
        let records = self.records.iter();
        let kept = records.filter(|(_, record)| record.keepers.sets > 0);
        kept.map(|(backend, record)| (*backend, record.keepers))
            .collect()
    }

    fn record(&mut self, backend: &Backend) -> &mut BackendRecord {
        self.records.entry(*backend).or_default()
    }

    /// Records that `backend` is written as `value` under `id` (by this agent, or by an
    /// earlier one whose maps are adopted).
    pub(super) fn write(&mut self, backend: &Backend, id: u32, value: &BackendEntry) {
        let record = self.record(backend);
        let new = record.written.is_none();
        record.written = Some(Written::of(id, value));
        if new {
            self.written.add(backend.family());
        }
    }

    /// Counts `backend` as kept by one more set, saying `opinion`.
    fn keep(&mut self, backend: &Backend, opinion: Opinion) {
        let keepers = &mut self.record(backend).keepers;
        keepers.sets += 1;
        keepers.terminating += u32::from(opinion.terminating);
        keepers.remote += u32::from(!opinion.local);
        keepers.udp_seen |= opinion.udp;
    }

    /// Counts `backend` as kept by one set fewer (that said `opinion`). When that was the last
    /// one: whether a set serving UDP frontends kept it since it was last unkept.
    fn release(&mut self, backend: &Backend, opinion: Opinion) -> Option<bool> {
        let record = self.records.get_mut(backend)?;
        let keepers = &mut record.keepers;
        if keepers.sets == 0 {
            return None;
        }
        keepers.sets -= 1;
        keepers.terminating = keepers
            .terminating
            .saturating_sub(u32::from(opinion.terminating));
        keepers.remote = keepers.remote.saturating_sub(u32::from(!opinion.local));
        if keepers.sets > 0 {
            return None;
        }
        let udp_seen = keepers.udp_seen;
        record.keepers = Keepers::default();
        self.forget_if_unused(backend);
        Some(udp_seen)
    }

    /// Records that `backend` is out of the maps; its id, if it was in them.
    fn unwrite(&mut self, backend: &Backend) -> Option<u32> {
        let record = self.records.get_mut(backend)?;
        let id = record.written.take()?.id;
        self.written.sub(backend.family());
        self.forget_if_unused(backend);
        Some(id)
    }

    /// Drops the record of `backend` when no set keeps it and the maps do not hold it.
    fn forget_if_unused(&mut self, backend: &Backend) {
        if self
            .records
            .get(backend)
            .is_some_and(|record| record.keepers.sets == 0 && record.written.is_none())
        {
            self.records.remove(backend);
        }
    }
}

impl Reconciler {
    /// Counts `members` as kept by one more set, with what it says of each.
    pub(super) fn keep(&mut self, members: &BTreeMap<Backend, Opinion>) {
        for (backend, opinion) in members {
            self.keep_one(backend, *opinion);
        }
    }

    /// Counts `members` as kept by one set fewer.
    pub(super) fn release(&mut self, members: &BTreeMap<Backend, Opinion>) {
        for (backend, opinion) in members {
            self.release_one(backend, *opinion);
        }
    }

    /// One set's members change from `from` to `to`: the same as releasing `from` and keeping
    /// `to`, touching only the backends whose opinion differs (one merge walk; a set written
    /// for the first time, or again unchanged, costs no lookup of a backend it keeps as before).
    pub(super) fn rekeep(
        &mut self,
        from: &BTreeMap<Backend, Opinion>,
        to: &BTreeMap<Backend, Opinion>,
    ) {
        let (mut old, mut new) = (from.iter().peekable(), to.iter().peekable());
        loop {
            match (old.peek(), new.peek()) {
                (None, None) => return,
                (Some(&(backend, opinion)), None) => {
                    self.release_one(backend, *opinion);
                    old.next();
                }
                (None, Some(&(backend, opinion))) => {
                    self.keep_one(backend, *opinion);
                    new.next();
                }
                (Some(&(a, was)), Some(&(b, now))) => match a.cmp(b) {
                    std::cmp::Ordering::Less => {
                        self.release_one(a, *was);
                        old.next();
                    }
                    std::cmp::Ordering::Greater => {
                        self.keep_one(b, *now);
                        new.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if was != now {
                            self.release_one(a, *was);
                            self.keep_one(b, *now);
                        }
                        old.next();
                        new.next();
                    }
                },
            }
        }
    }

    fn keep_one(&mut self, backend: &Backend, opinion: Opinion) {
        self.backends.keep(backend, opinion);
    }

    fn release_one(&mut self, backend: &Backend, opinion: Opinion) {
        if let Some(udp_seen) = self.backends.release(backend, opinion) {
            *self.maybe_unused.entry(*backend).or_default() |= udp_seen;
        }
    }

    /// The map value of `backend` kept by `keepers`: terminating when any set keeping it says
    /// so (affinity must not stick to it there), local only when every set keeping it says so
    /// (a remote backend taken for a local one would get outside traffic without SNAT).
    /// Deterministic whatever order the sets were written in.
    pub(super) fn backend_value(backend: &Backend, keepers: &Keepers) -> BackendEntry {
        BackendEntry {
            backend: *backend,
            state: if keepers.terminating > 0 {
                backend_states::TERMINATING
            } else {
                backend_states::ACTIVE
            },
            flags: if keepers.sets > 0 && keepers.remote == 0 {
                backend_flags::LOCAL
            } else {
                0
            },
        }
    }

    /// Writes `backends` whose value differs from the programmed one; new ones get ids (and
    /// are listed in `created`).
    pub(super) fn write_backends<'a>(
        &mut self,
        backends: impl IntoIterator<Item = &'a Backend>,
        created: &mut Vec<Backend>,
        maps: &mut impl ServiceMaps,
        report: &mut SyncReport,
    ) -> Result<(), MapError> {
        for backend in backends {
            let record = self.backends.record(backend);
            let value = Self::backend_value(backend, &record.keepers);
            match record.written {
                Some(written) => {
                    if !written.says(&value) {
                        report.map_writes += 1;
                        maps.put_backend(written.id, value)?;
                        record.written = Some(Written::of(written.id, &value));
                    }
                }
                None => {
                    let id = self.backend_ids.allocate().ok_or_else(|| {
                        MapError::ids_exhausted(
                            family_map_names(backend.family()).1,
                            "backend",
                            &self.backend_ids,
                        )
                    })?;
                    report.map_writes += 1;
                    if let Err(error) = maps.put_backend(id, value) {
                        self.backend_ids.release(id);
                        return Err(error);
                    }
                    created.push(*backend);
                    self.backends.write(backend, id, &value);
                }
            }
        }
        Ok(())
    }

    /// Rewrites the kept ones of `backends` whose value changed; a failure only leaves the
    /// old value (the next write of a set keeping it retries).
    pub(super) fn rewrite_backends<'a>(
        &mut self,
        backends: impl IntoIterator<Item = &'a Backend>,
        maps: &mut impl ServiceMaps,
        report: &mut SyncReport,
    ) {
        for backend in backends {
            let Some(record) = self.backends.records.get_mut(backend) else {
                continue;
            };
            let Some(written) = record.written.filter(|_| record.keepers.sets > 0) else {
                continue;
            };
            let value = Self::backend_value(backend, &record.keepers);
            if written.says(&value) {
                continue;
            }
            report.map_writes += 1;
            match maps.put_backend(written.id, value) {
                Ok(()) => record.written = Some(Written::of(written.id, &value)),
                Err(error) => tracing::warn!(%backend, %error, "could not rewrite a backend"),
            }
        }
    }

    /// Removes backends created for a set whose write failed.
    pub(super) fn undo_backends(
        &mut self,
        created: &[Backend],
        maps: &mut impl ServiceMaps,
        report: &mut SyncReport,
    ) {
        for backend in created {
            self.maybe_unused.remove(backend);
            if let Some(id) = self.backends.unwrite(backend) {
                report.map_writes += 1;
                let _ = maps.remove_backend(id, backend.family());
                self.backend_ids.release(id);
            }
        }
    }

    /// Removes the backends no set keeps.
    pub(super) fn remove_unused_backends(
        &mut self,
        maps: &mut impl ServiceMaps,
        report: &mut SyncReport,
    ) {
        if !self.adopted.is_empty() || !self.adopted_frontends.is_empty() {
            return; // adopted slots may still name them
        }
        for (backend, udp) in std::mem::take(&mut self.maybe_unused) {
            if self.backends.is_kept(&backend) {
                continue;
            }
            let Some(id) = self.backends.id(&backend) else {
                continue;
            };
            report.map_writes += 1;
            match maps.remove_backend(id, backend.family()) {
                Ok(()) => {
                    self.backends.unwrite(&backend);
                    self.backend_ids.release(id);
                    report
                        .backends_removed
                        .push(RemovedBackend { backend, udp });
                }
                Err(error) => {
                    tracing::warn!(%backend, id, %error, "could not remove a backend");
                    self.maybe_unused.insert(backend, udp);
                }
            }
        }
    }
}
