//! The desired state kept up to date by difference. Sources hand out objects behind `Arc`s
//! that stay the same while an object does not change. An update walks the new snapshot and
//! the previous one side by side (both sorted by key), comparing pointers; only services whose
//! Service or EndpointSlices changed are recomputed, with every frontend kind they have. One
//! change beside 50,000 services costs a walk of pointer comparisons, not a rebuild.
//!
//! Two services claiming the same frontend are resolved as a fresh build resolves them,
//! whatever order they arrived in: a ClusterIP always wins over an externalIP or
//! LoadBalancer IP (so no Service can take over another's ClusterIP, CVE-2020-8554), then the
//! first by namespace/name. The losing claim is reported.
use std::{
    collections::{BTreeMap, BTreeSet},
    iter::Peekable,
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::{
    DesiredService, DesiredState, Diagnostic, Frontend, FrontendKind, HealthCheck, NodeView,
    ObjectKey, ObjectRef, Objects, ProxyIdentity, Scope, SetKey, Severity,
    endpoints::{SERVICE_NAME_LABEL, SliceIndex},
    is_ours, node_view,
    service::{Contribution, contribution},
};

/// What an update changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Frontends whose desired entry may have been added, changed or removed.
    pub frontends: BTreeSet<Frontend>,
    /// Backend sets that may have been added, changed or removed.
    pub sets: BTreeSet<SetKey>,
    /// Whether the health-check node ports may have changed.
    pub health_checks: bool,
    /// EndpointSlices that are new or changed (for network programming latency).
    pub slices: Vec<ObjectKey>,
}

/// Who claims a frontend, in the order claims win: ClusterIPs first, then by namespace/name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Claimant {
    /// 0 for a ClusterIP, 1 for every other kind.
    rank: u8,
    service: ObjectKey,
}

impl Claimant {
    fn of(service: &ObjectKey, desired: &DesiredService) -> Self {
        Self {
            rank: u8::from(desired.kind != FrontendKind::ClusterIP),
            service: service.clone(),
        }
    }
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
    computed: BTreeMap<ObjectKey, Contribution>,
    /// Every service claiming each frontend; the first claimant is the one served.
    claims: BTreeMap<Frontend, BTreeMap<Claimant, DesiredService>>,
    /// Every service claiming each health-check port; the first by name is served.
    health_claims: BTreeMap<u16, BTreeMap<ObjectKey, HealthCheck>>,
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
            health_claims: BTreeMap::new(),
            desired: DesiredState::default(),
        }
    }

    /// The desired state as of the last update.
    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    /// This node as of the last update.
    pub fn node(&self) -> Option<&NodeView> {
        self.node.as_ref()
    }

    /// Brings the desired state up to `objects`, recomputing only services whose Service or
    /// EndpointSlices changed (all of them when this node's zone, address or pod CIDRs changed).
    pub fn update(&mut self, objects: &Objects) -> Changes {
        let mut changes = Changes::default();
        let mut dirty = BTreeSet::new();
        let node = node_view(objects, &self.identity);
        if self.node.as_ref() != Some(&node) {
            // Topology hints may now select other endpoints for every service, and source
            // ranges may now let the node or its pods in.
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
            self.recompute(&key, objects, &node, &mut changes);
        }
        // Who serves an address's external scope decides who serves its internal one: a claim
        // on the external scope changing may change the internal winner.
        let counterparts: Vec<Frontend> = changes
            .frontends
            .iter()
            .filter(|f| f.scope == Scope::External)
            .map(|f| f.in_scope(Scope::Internal))
            .filter(|f| self.claims.contains_key(f) || self.desired.frontends.contains_key(f))
            .collect();
        changes.frontends.extend(counterparts);
        for frontend in &changes.frontends {
            match self.winner(frontend) {
                Some(winner) => {
                    if self.desired.frontends.get(frontend) != Some(winner) {
                        self.desired.frontends.insert(*frontend, winner.clone());
                    }
                }
                None => {
                    self.desired.frontends.remove(frontend);
                }
            }
        }
        if changes.health_checks {
            self.desired.health_checks = self
                .health_claims
                .iter()
                .filter_map(|(port, c)| Some((*port, c.values().next()?.clone())))
                .collect();
        }
        changes
    }

    /// The claim served at `frontend`: the first claimant; for an internal-scope entry, the
    /// claim of the service that won the external scope and gave it two scopes (the entry of
    /// a service whose external frontend lost is not served: nothing would use it but the
    /// loser).
    fn winner(&self, frontend: &Frontend) -> Option<&DesiredService> {
        let claimants = self.claims.get(frontend)?;
        if frontend.scope == Scope::External {
            return claimants.values().next();
        }
        let (owner, _) = self
            .claims
            .get(&frontend.in_scope(Scope::External))?
            .iter()
            .next()
            .filter(|(_, external)| external.two_scopes)?;
        claimants
            .iter()
            .find(|(claimant, _)| claimant.service == owner.service)
            .map(|(_, desired)| desired)
    }

    /// Recomputes what service `key` contributes (nothing, if it is gone or not ours).
    fn recompute(
        &mut self,
        key: &ObjectKey,
        objects: &Objects,
        node: &NodeView,
        changes: &mut Changes,
    ) {
        if let Some(old) = self.computed.remove(key) {
            self.withdraw(key, &old, changes);
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
        let computed = contribution(key, service, &index, node);
        for (frontend, desired) in &computed.frontends {
            self.claims
                .entry(*frontend)
                .or_default()
                .insert(Claimant::of(key, desired), desired.clone());
            changes.frontends.insert(*frontend);
        }
        for (set_key, set) in &computed.sets {
            if self.desired.sets.get(set_key) != Some(set) {
                self.desired.sets.insert(set_key.clone(), set.clone());
            }
            changes.sets.insert(set_key.clone());
        }
        if let Some((port, check)) = &computed.health_check {
            self.health_claims
                .entry(*port)
                .or_default()
                .insert(key.clone(), check.clone());
            changes.health_checks = true;
        }
        self.computed.insert(key.clone(), computed);
    }

    /// Takes back every claim and set of what `key` contributed before.
    fn withdraw(&mut self, key: &ObjectKey, old: &Contribution, changes: &mut Changes) {
        for (frontend, desired) in &old.frontends {
            if let Some(claimants) = self.claims.get_mut(frontend) {
                claimants.remove(&Claimant::of(key, desired));
                if claimants.is_empty() {
                    self.claims.remove(frontend);
                }
            }
            changes.frontends.insert(*frontend);
        }
        for set_key in old.sets.keys() {
            self.desired.sets.remove(set_key);
            changes.sets.insert(set_key.clone());
        }
        if let Some((port, _)) = &old.health_check {
            if let Some(claimants) = self.health_claims.get_mut(port) {
                claimants.remove(key);
                if claimants.is_empty() {
                    self.health_claims.remove(port);
                }
            }
            changes.health_checks = true;
        }
    }

    /// Every current problem: each service's own, then frontends claimed twice.
    pub fn diagnostics(&self) -> Vec<Diagnostic> {
        let mut all: Vec<Diagnostic> = self
            .computed
            .values()
            .flat_map(|c| c.diagnostics.iter().cloned())
            .collect();
        // An internal-scope entry follows its external scope: its loser is reported there.
        for (frontend, claimants) in self
            .claims
            .iter()
            .filter(|(f, c)| c.len() > 1 && f.scope == Scope::External)
        {
            let mut found = claimants.iter();
            let Some((_, winner)) = found.next() else {
                continue;
            };
            for (loser, lost) in found {
                let message = if winner.kind == FrontendKind::ClusterIP
                    && lost.kind != FrontendKind::ClusterIP
                {
                    format!(
                        "{} {frontend} is the ClusterIP of {}; not served (a ClusterIP always \
                         wins over externalIPs and LoadBalancer IPs)",
                        lost.kind, winner.name
                    )
                } else {
                    format!(
                        "{} {frontend} is already served by {}; this port is skipped",
                        lost.kind, winner.name
                    )
                };
                all.push(Diagnostic {
                    severity: Severity::Warning,
                    object: ObjectRef {
                        kind: "Service",
                        key: loser.service.clone(),
                    },
                    message,
                });
            }
        }
        for claimants in self.health_claims.values().filter(|c| c.len() > 1) {
            let mut keys = claimants.keys();
            let Some(winner) = keys.next() else { continue };
            for loser in keys {
                all.push(Diagnostic {
                    severity: Severity::Warning,
                    object: ObjectRef {
                        kind: "Service",
                        key: loser.clone(),
                    },
                    message: format!(
                        "healthCheckNodePort is already served for {winner}; not served here"
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
