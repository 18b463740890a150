//! The desired state kept up to date by difference. Sources publish the objects applied and
//! deleted ([`ObjectChanges`]); only the services whose Service or EndpointSlices changed are
//! recomputed, with every frontend kind they have, and every other step (claims, winners,
//! diagnostics) touches only what they touched. One change beside 100,000 services costs
//! that one service, not a walk of the rest.
//!
//! Two services claiming the same frontend are resolved as a fresh build resolves them,
//! whatever order they arrived in: a ClusterIP always wins over an externalIP or
//! LoadBalancer IP (so no Service can take over another's ClusterIP, CVE-2020-8554), then the
//! first by namespace/name. The losing claim is reported.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use super::{
    DesiredService, DesiredState, Diagnostic, Frontend, FrontendKind, HealthCheck, NodeView,
    ObjectChanges, ObjectKey, ObjectRef, Objects, ProxyIdentity, Scope, SetKey, Severity, Slice,
    endpoints::SliceIndex,
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
    fn of(service: &ObjectKey, kind: FrontendKind) -> Self {
        Self {
            rank: u8::from(kind != FrontendKind::ClusterIP),
            service: service.clone(),
        }
    }
}

/// Every service claiming one frontend, in the order claims win. A sorted vector: nearly
/// every frontend has one claimant, and a map's node would hold room for eleven.
type Claimants = Vec<(Claimant, DesiredService)>;

/// What a service contributes, as kept between updates: what withdrawing it takes (its
/// desired entries themselves are in the claims and the desired state, not copied here).
struct Kept {
    /// Its frontends, with the kind it claims each as.
    frontends: Box<[(Frontend, FrontendKind)]>,
    sets: Box<[SetKey]>,
    health_port: Option<u16>,
    diagnostics: Box<[Diagnostic]>,
}

/// The desired state and what it was computed from.
pub struct Model {
    identity: ProxyIdentity,
    node: Option<NodeView>,
    /// The objects as of the last update.
    objects: Objects,
    /// The slices of each service (namespace and `kubernetes.io/service-name`).
    members: BTreeMap<ObjectKey, Vec<ObjectKey>>,
    /// What each of our services contributes.
    computed: BTreeMap<ObjectKey, Kept>,
    /// Every service claiming each frontend; the first claimant is the one served.
    claims: BTreeMap<Frontend, Claimants>,
    /// The external-scope frontends claimed more than once (their losers are reported).
    contested: BTreeSet<Frontend>,
    /// The services whose contribution carries diagnostics.
    with_problems: BTreeSet<ObjectKey>,
    /// Every service claiming each health-check port; the first by name is served.
    health_claims: BTreeMap<u16, BTreeMap<ObjectKey, HealthCheck>>,
    desired: DesiredState,
    /// The backends of every set of `desired`, counted as sets come and go.
    backends_total: usize,
}

impl Model {
    pub fn new(identity: ProxyIdentity) -> Self {
        Self {
            identity,
            node: None,
            objects: Objects::default(),
            members: BTreeMap::new(),
            computed: BTreeMap::new(),
            claims: BTreeMap::new(),
            contested: BTreeSet::new(),
            with_problems: BTreeSet::new(),
            health_claims: BTreeMap::new(),
            desired: DesiredState::default(),
            backends_total: 0,
        }
    }

    /// The desired state as of the last update.
    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    /// The backends of all backend sets (a backend in two sets counts twice).
    pub fn backends_total(&self) -> usize {
        self.backends_total
    }

    /// This node as of the last update.
    pub fn node(&self) -> Option<&NodeView> {
        self.node.as_ref()
    }

    /// The objects as of the last update.
    pub fn objects(&self) -> &Objects {
        &self.objects
    }

    /// Brings the desired state up to the whole state `objects`: the difference from the
    /// last one, applied (tests, the fuzzer, [`super::build`]; sources publish changes).
    pub fn update(&mut self, objects: &Objects) -> Changes {
        let delta = ObjectChanges::between(&self.objects, objects);
        self.apply(&delta)
    }

    /// Brings the desired state up to `delta`, recomputing only the services whose Service
    /// or EndpointSlices it changes (all of them when this node's zone, address or pod
    /// CIDRs changed): the work is proportional to the change, not to the objects held.
    pub fn apply(&mut self, delta: &ObjectChanges) -> Changes {
        let mut changes = Changes::default();
        let mut dirty = BTreeSet::new();
        for (name, now) in &delta.nodes {
            match now {
                Some(node) => self.objects.nodes.insert(name.clone(), Arc::clone(node)),
                None => self.objects.nodes.remove(name),
            };
        }
        if self.node.is_none() || delta.nodes.contains_key(&self.identity.node_name) {
            let node = node_view(&self.objects, &self.identity);
            if self.node.as_ref() != Some(&node) {
                // Topology hints may now select other endpoints for every service, and
                // source ranges may now let the node or its pods in.
                dirty.extend(self.computed.keys().cloned());
                dirty.extend(self.objects.services.keys().cloned());
                dirty.extend(delta.services.keys().cloned());
            }
            self.node = Some(node);
        }

        for (key, now) in &delta.services {
            match now {
                Some(service) => self
                    .objects
                    .services
                    .insert(key.clone(), Arc::clone(service)),
                None => self.objects.services.remove(key),
            };
            dirty.insert(key.clone());
        }
        for (key, now) in &delta.endpoint_slices {
            let before = match now {
                Some(slice) => self
                    .objects
                    .endpoint_slices
                    .insert(key.clone(), Arc::clone(slice)),
                None => self.objects.endpoint_slices.remove(key),
            };
            if let Some(owner) = before.and_then(|slice| owner_of(key, &slice)) {
                if let Some(members) = self.members.get_mut(&owner) {
                    members.retain(|member| member != key);
                    if members.is_empty() {
                        self.members.remove(&owner);
                    }
                }
                dirty.insert(owner);
            }
            if let Some(slice) = now {
                if let Some(owner) = owner_of(key, slice) {
                    let members = self.members.entry(owner.clone()).or_default();
                    if let Err(at) = members.binary_search(key) {
                        members.insert(at, key.clone());
                    }
                    dirty.insert(owner);
                }
                changes.slices.push(key.clone());
            }
        }

        let node = self.node.clone().unwrap_or_default();
        for key in dirty {
            self.recompute(&key, &node, &mut changes);
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
            match self.claims.get(frontend) {
                Some(claimants) if claimants.len() > 1 && frontend.scope == Scope::External => {
                    self.contested.insert(*frontend);
                }
                _ => {
                    self.contested.remove(frontend);
                }
            }
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
            return claimants.first().map(|(_, desired)| desired);
        }
        let (owner, _) = self
            .claims
            .get(&frontend.in_scope(Scope::External))?
            .first()
            .filter(|(_, external)| external.two_scopes)?;
        claimants
            .iter()
            .find(|(claimant, _)| claimant.service == owner.service)
            .map(|(_, desired)| desired)
    }

    /// Recomputes what service `key` contributes (nothing, if it is gone or not ours).
    fn recompute(&mut self, key: &ObjectKey, node: &NodeView, changes: &mut Changes) {
        if let Some(old) = self.computed.remove(key) {
            self.withdraw(key, &old, changes);
        }
        self.with_problems.remove(key);
        let objects = &self.objects;
        let Some(service) = objects
            .services
            .get(key)
            .filter(|s| is_ours(s, &self.identity))
        else {
            return;
        };
        let own_slices: Vec<(&ObjectKey, &Arc<Slice>)> = self
            .members
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|slice_key| objects.endpoint_slices.get_key_value(slice_key))
            .collect();
        let index = SliceIndex::of_service(key, own_slices);
        let Contribution {
            frontends,
            sets,
            health_check,
            diagnostics,
        } = contribution(key, service, &index, node);
        let mut kept_frontends = Vec::with_capacity(frontends.len());
        for (frontend, desired) in frontends {
            kept_frontends.push((frontend, desired.kind));
            let claimant = Claimant::of(key, desired.kind);
            let claimants = self.claims.entry(frontend).or_default();
            match claimants.binary_search_by(|(c, _)| c.cmp(&claimant)) {
                Ok(at) => claimants[at].1 = desired,
                Err(at) => claimants.insert(at, (claimant, desired)),
            }
            changes.frontends.insert(frontend);
        }
        let mut kept_sets = Vec::with_capacity(sets.len());
        for (set_key, set) in sets {
            self.backends_total += set.backends.len();
            if let Some(old) = self.desired.sets.insert(set_key.clone(), set) {
                self.backends_total -= old.backends.len();
            }
            changes.sets.insert(set_key.clone());
            kept_sets.push(set_key);
        }
        let health_port = health_check.map(|(port, check)| {
            self.health_claims
                .entry(port)
                .or_default()
                .insert(key.clone(), check);
            changes.health_checks = true;
            port
        });
        if !diagnostics.is_empty() {
            self.with_problems.insert(key.clone());
        }
        let kept = Kept {
            frontends: kept_frontends.into_boxed_slice(),
            sets: kept_sets.into_boxed_slice(),
            health_port,
            diagnostics: diagnostics.into_boxed_slice(),
        };
        self.computed.insert(key.clone(), kept);
    }

    /// Takes back every claim and set of what `key` contributed before.
    fn withdraw(&mut self, key: &ObjectKey, old: &Kept, changes: &mut Changes) {
        for (frontend, kind) in &old.frontends {
            if let Some(claimants) = self.claims.get_mut(frontend) {
                let claimant = Claimant::of(key, *kind);
                claimants.retain(|(c, _)| *c != claimant);
                if claimants.is_empty() {
                    self.claims.remove(frontend);
                }
            }
            changes.frontends.insert(*frontend);
        }
        for set_key in &old.sets {
            if let Some(gone) = self.desired.sets.remove(set_key) {
                self.backends_total -= gone.backends.len();
            }
            changes.sets.insert(set_key.clone());
        }
        if let Some(port) = &old.health_port {
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
            .with_problems
            .iter()
            .filter_map(|key| self.computed.get(key))
            .flat_map(|c| c.diagnostics.iter().cloned())
            .collect();
        // An internal-scope entry follows its external scope: its loser is reported there.
        for (frontend, claimants) in self
            .contested
            .iter()
            .filter_map(|f| Some((f, self.claims.get(f)?)))
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
fn owner_of(key: &ObjectKey, slice: &Slice) -> Option<ObjectKey> {
    let name = slice.service.as_deref()?;
    Some(ObjectKey::new(key.namespace.clone(), name))
}
