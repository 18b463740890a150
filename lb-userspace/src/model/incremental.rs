//! The desired state kept up to date by difference. Sources hand out objects behind `Arc`s
//! that stay the same while an object does not change. An update walks the new snapshot and
//! the previous one side by side (both sorted by key), comparing pointers; only services whose
//! Service or EndpointSlices changed are recomputed. One change beside 50,000 services costs a
//! walk of pointer comparisons, not a rebuild.
//!
//! Two services claiming the same frontend are resolved as a fresh build resolves them: the
//! first by namespace/name wins, whatever order they arrived in.
use std::{
    collections::{BTreeMap, BTreeSet},
    iter::Peekable,
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::{
    DesiredService, DesiredState, Diagnostic, Frontend, NodeView, ObjectKey, ObjectRef, Objects,
    ProxyIdentity, Severity, add_service,
    endpoints::{SERVICE_NAME_LABEL, SliceIndex},
    is_ours, node_view,
};

/// What one service contributed.
struct Computed {
    frontends: BTreeMap<Frontend, DesiredService>,
    diagnostics: Vec<Diagnostic>,
}

/// What an update changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Frontends whose desired entry may have been added, changed or removed.
    pub frontends: BTreeSet<Frontend>,
    /// EndpointSlices that are new or changed (for network programming latency).
    pub slices: Vec<ObjectKey>,
}

/// The desired state and what it was computed from.
pub struct Model {
    identity: ProxyIdentity,
    node: Option<NodeView>,
    /// The objects of the previous update, to compare the next one with.
    seen_services: BTreeMap<ObjectKey, Arc<Service>>,
    seen_slices: BTreeMap<ObjectKey, Arc<EndpointSlice>>,
    /// The slices of each service (namespace and `kubernetes.io/service-name`).
    members: BTreeMap<ObjectKey, BTreeSet<ObjectKey>>,
    /// What each of our services contributes.
    computed: BTreeMap<ObjectKey, Computed>,
    /// Every service claiming each frontend; the first key is the one served.
    claims: BTreeMap<Frontend, BTreeMap<ObjectKey, DesiredService>>,
    desired: DesiredState,
}

impl Model {
    pub fn new(identity: ProxyIdentity) -> Self {
        Self {
            identity,
            node: None,
            seen_services: BTreeMap::new(),
            seen_slices: BTreeMap::new(),
            members: BTreeMap::new(),
            computed: BTreeMap::new(),
            claims: BTreeMap::new(),
            desired: DesiredState::default(),
        }
    }

    /// The desired state as of the last update.
    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    /// Brings the desired state up to `objects`, recomputing only services whose Service or
    /// EndpointSlices changed (all of them when this node's zone changed).
    pub fn update(&mut self, objects: &Objects) -> Changes {
        let mut changes = Changes::default();
        let mut dirty = BTreeSet::new();
        let node = node_view(objects, &self.identity);
        if self.node.as_ref().is_none_or(|old| old.zone != node.zone) {
            // Topology hints may now select other endpoints for every service.
            dirty.extend(self.computed.keys().cloned());
            dirty.extend(objects.services.keys().cloned());
        }
        self.node = Some(node.clone());

        for (key, _, now) in differences(&self.seen_services, &objects.services) {
            match now {
                Some(service) => self.seen_services.insert(key.clone(), service),
                None => self.seen_services.remove(&key),
            };
            dirty.insert(key);
        }
        for (key, before, now) in differences(&self.seen_slices, &objects.endpoint_slices) {
            if let Some(owner) = before.and_then(|slice| owner_of(&key, &slice)) {
                if let Some(members) = self.members.get_mut(&owner) {
                    members.remove(&key);
                    if members.is_empty() {
                        self.members.remove(&owner);
                    }
                }
                dirty.insert(owner);
            }
            match now {
                Some(slice) => {
                    if let Some(owner) = owner_of(&key, &slice) {
                        self.members
                            .entry(owner.clone())
                            .or_default()
                            .insert(key.clone());
                        dirty.insert(owner);
                    }
                    changes.slices.push(key.clone());
                    self.seen_slices.insert(key, slice);
                }
                None => {
                    self.seen_slices.remove(&key);
                }
            }
        }

        for key in dirty {
            self.recompute(&key, objects, &node, &mut changes.frontends);
        }
        for frontend in &changes.frontends {
            match self.claims.get(frontend).and_then(|c| c.values().next()) {
                Some(winner) => {
                    if self.desired.services.get(frontend) != Some(winner) {
                        self.desired.services.insert(*frontend, winner.clone());
                    }
                }
                None => {
                    self.desired.services.remove(frontend);
                }
            }
        }
        changes
    }

    /// Recomputes what service `key` contributes (nothing, if it is gone or not ours).
    fn recompute(
        &mut self,
        key: &ObjectKey,
        objects: &Objects,
        node: &NodeView,
        changed: &mut BTreeSet<Frontend>,
    ) {
        if let Some(old) = self.computed.remove(key) {
            unclaim(&mut self.claims, key, &old, changed);
        }
        let Some(service) = objects
            .services
            .get(key)
            .filter(|s| is_ours(s, &self.identity))
        else {
            return;
        };
        let own_slices: Vec<(&ObjectKey, &Arc<EndpointSlice>)> = self
            .members
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|slice_key| objects.endpoint_slices.get_key_value(slice_key))
            .collect();
        let index = SliceIndex::of_service(key, own_slices);
        let mut frontends = DesiredState::default();
        let mut diagnostics = Vec::new();
        add_service(key, service, &index, node, &mut frontends, &mut diagnostics);
        for (frontend, desired) in &frontends.services {
            self.claims
                .entry(*frontend)
                .or_default()
                .insert(key.clone(), desired.clone());
            changed.insert(*frontend);
        }
        self.computed.insert(
            key.clone(),
            Computed {
                frontends: frontends.services,
                diagnostics,
            },
        );
    }

    /// Every current problem: each service's own, then frontends claimed twice.
    pub fn diagnostics(&self) -> Vec<Diagnostic> {
        let mut all: Vec<Diagnostic> = self
            .computed
            .values()
            .flat_map(|c| c.diagnostics.iter().cloned())
            .collect();
        for (frontend, claimants) in self.claims.iter().filter(|(_, c)| c.len() > 1) {
            let mut keys = claimants.keys();
            let Some(winner) = keys.next() else { continue };
            let served_by = &claimants[winner].name;
            for loser in keys {
                all.push(Diagnostic {
                    severity: Severity::Warning,
                    object: ObjectRef {
                        kind: "Service",
                        key: loser.clone(),
                    },
                    message: format!(
                        "{frontend} is already served by {served_by}; this port is skipped"
                    ),
                });
            }
        }
        all
    }
}

/// The service a slice belongs to: its namespace and `kubernetes.io/service-name` label.
fn owner_of(key: &ObjectKey, slice: &EndpointSlice) -> Option<ObjectKey> {
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some(ObjectKey::new(key.namespace.clone(), name.clone()))
}

fn unclaim(
    claims: &mut BTreeMap<Frontend, BTreeMap<ObjectKey, DesiredService>>,
    key: &ObjectKey,
    old: &Computed,
    changed: &mut BTreeSet<Frontend>,
) {
    for frontend in old.frontends.keys() {
        if let Some(claimants) = claims.get_mut(frontend) {
            claimants.remove(key);
            if claimants.is_empty() {
                claims.remove(frontend);
            }
        }
        changed.insert(*frontend);
    }
}

/// The entries that differ between two maps sorted by the same keys: (key, before, now),
/// where an entry differs when it is new, gone, or another `Arc`. A merge walk: no lookups,
/// no allocation for the entries that are the same.
type Difference<K, V> = (K, Option<Arc<V>>, Option<Arc<V>>);

fn differences<K: Ord + Clone, V>(
    before: &BTreeMap<K, Arc<V>>,
    now: &BTreeMap<K, Arc<V>>,
) -> Vec<Difference<K, V>> {
    let mut found = Vec::new();
    let mut old: Peekable<_> = before.iter().peekable();
    let mut new: Peekable<_> = now.iter().peekable();
    loop {
        match (old.peek(), new.peek()) {
            (None, None) => return found,
            (Some(&(key, value)), None) => {
                found.push((key.clone(), Some(Arc::clone(value)), None));
                old.next();
            }
            (None, Some(&(key, value))) => {
                found.push((key.clone(), None, Some(Arc::clone(value))));
                new.next();
            }
            (Some(&(old_key, old_value)), Some(&(new_key, new_value))) => {
                match old_key.cmp(new_key) {
                    std::cmp::Ordering::Less => {
                        found.push((old_key.clone(), Some(Arc::clone(old_value)), None));
                        old.next();
                    }
                    std::cmp::Ordering::Greater => {
                        found.push((new_key.clone(), None, Some(Arc::clone(new_value))));
                        new.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if !Arc::ptr_eq(old_value, new_value) {
                            found.push((
                                new_key.clone(),
                                Some(Arc::clone(old_value)),
                                Some(Arc::clone(new_value)),
                            ));
                        }
                        old.next();
                        new.next();
                    }
                }
            }
        }
    }
}
