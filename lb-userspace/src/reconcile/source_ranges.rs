//! The allowed sources of LoadBalancer IPs with `loadBalancerSourceRanges`, kept by service
//! id: every LoadBalancer frontend of a backend set belongs to one Service, so they share
//! one list. New entries are written before the frontends that need them switch on the
//! check, stale ones removed after (see [`super::Reconciler::sync_changes`]).
use std::collections::{BTreeMap, BTreeSet};

use super::{MapError, ServiceMaps, SyncReport, tables::FamilyCount};
use crate::{
    cidr::Cidr,
    model::{DesiredService, Family, Frontend, Scope},
};

/// What the reconciler wrote, by service id.
#[derive(Debug, Default)]
pub(super) struct ProgrammedRanges {
    by_id: BTreeMap<u32, BTreeSet<Cidr>>,
    /// Entries of each family's trie.
    count: FamilyCount,
}

impl ProgrammedRanges {
    /// What the maps hold (pinned by an earlier agent).
    pub(super) fn adopt(entries: &BTreeSet<(u32, Cidr)>) -> Self {
        let mut by_id: BTreeMap<u32, BTreeSet<Cidr>> = BTreeMap::new();
        let mut count = FamilyCount::default();
        for (id, range) in entries {
            if by_id.entry(*id).or_default().insert(*range) {
                count.add(range.family());
            }
        }
        Self { by_id, count }
    }

    /// How many entries the trie of `family` holds.
    pub(super) fn len(&self, family: Family) -> usize {
        self.count.get(family)
    }

    /// Every entry, by service id (for the tests' recount).
    #[cfg(test)]
    pub(super) fn iter(&self) -> impl Iterator<Item = (u32, Cidr)> + '_ {
        let by_id = self.by_id.iter();
        by_id.flat_map(|(id, ranges)| ranges.iter().map(|range| (*id, *range)))
    }

    /// Writes the entries of `wanted` set `service_id` lacks; the failures are returned.
    pub(super) fn add(
        &mut self,
        service_id: u32,
        wanted: &BTreeSet<Cidr>,
        maps: &mut impl ServiceMaps,
        report: &mut SyncReport,
    ) -> Vec<MapError> {
        let mut failed = Vec::new();
        let programmed = self.by_id.entry(service_id).or_default();
        let missing: Vec<Cidr> = wanted.difference(programmed).copied().collect();
        for range in missing {
            report.map_writes += 1;
            match maps.put_source_range(service_id, range) {
                Ok(()) => {
                    if programmed.insert(range) {
                        self.count.add(range.family());
                    }
                }
                Err(error) => failed.push(error),
            }
        }
        if programmed.is_empty() {
            self.by_id.remove(&service_id);
        }
        failed
    }

    /// Removes the entries of `service_id` not in `wanted`.
    pub(super) fn trim(
        &mut self,
        service_id: u32,
        wanted: &BTreeSet<Cidr>,
        maps: &mut impl ServiceMaps,
        report: &mut SyncReport,
    ) {
        let Some(programmed) = self.by_id.get_mut(&service_id) else {
            return;
        };
        let stale: Vec<Cidr> = programmed.difference(wanted).copied().collect();
        for range in stale {
            report.map_writes += 1;
            // Gone already is as good as removed; anything else keeps it recorded.
            if maps.remove_source_range(service_id, range).is_ok() && programmed.remove(&range) {
                self.count.sub(range.family());
            }
        }
        if programmed.is_empty() {
            self.by_id.remove(&service_id);
        }
    }

    /// Removes the entries of every service id not in `live`.
    pub(super) fn keep_only(
        &mut self,
        live: &BTreeSet<u32>,
        maps: &mut impl ServiceMaps,
        report: &mut SyncReport,
    ) {
        let gone: Vec<u32> = self
            .by_id
            .keys()
            .filter(|id| !live.contains(id))
            .copied()
            .collect();
        for id in gone {
            self.trim(id, &BTreeSet::new(), maps, report);
        }
    }
}

/// The allowed sources of the LoadBalancer frontends among `users` (one Service's).
pub(super) fn wanted(users: &[(Frontend, &DesiredService)]) -> BTreeSet<Cidr> {
    users
        .iter()
        .filter(|(frontend, _)| frontend.scope == Scope::External)
        .filter_map(|(_, service)| service.source_ranges.as_ref())
        .flat_map(|ranges| ranges.allowed.iter().copied())
        .collect()
}
