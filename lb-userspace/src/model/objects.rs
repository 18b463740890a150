//! The Kubernetes objects the model is computed from, and changes to them. Both sources (the
//! API server and the manifest directory) publish the same [`ObjectChanges`], so one code
//! path turns objects into state.
use std::{collections::BTreeMap, fmt, sync::Arc};

use super::{NodeInfo, ServiceInfo, Slice};

/// Namespace and name of an object.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of an object from its metadata; namespace `default` when none is given, as
    /// `kubectl apply` does.
    pub fn of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        Self::new(
            meta.namespace.as_deref().unwrap_or("default"),
            meta.name.as_deref().unwrap_or_default(),
        )
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A kind of object and its key, for messages: `Service default/web`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub kind: &'static str,
    pub key: ObjectKey,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.key)
    }
}

/// Everything the model needs, keyed by namespace/name: a whole state, as the model keeps
/// it and as tests and the fuzzer build it.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    /// Services as the model keeps them ([`ServiceInfo`]).
    pub services: BTreeMap<ObjectKey, Arc<ServiceInfo>>,
    /// EndpointSlices as the model keeps them ([`Slice`]).
    pub endpoint_slices: BTreeMap<ObjectKey, Arc<Slice>>,
    /// Nodes by name ([`NodeInfo`]); the model only looks at this node's.
    pub nodes: BTreeMap<String, Arc<NodeInfo>>,
}

/// Each changed object of one kind: `Some` applied (created or changed), `None` deleted.
pub type Changed<K, V> = BTreeMap<K, Option<Arc<V>>>;

/// Objects applied and deleted: what a source publishes and what the model is brought up
/// to date by, in time proportional to what changed.
#[derive(Clone, Debug, Default)]
pub struct ObjectChanges {
    pub services: Changed<ObjectKey, ServiceInfo>,
    pub endpoint_slices: Changed<ObjectKey, Slice>,
    /// Nodes by name.
    pub nodes: Changed<String, NodeInfo>,
}

impl ObjectChanges {
    /// Everything in `objects`, as applied to nothing.
    pub fn of(objects: &Objects) -> Self {
        Self::between(&Objects::default(), objects)
    }

    /// What turns `before` into `now`: the entries that are new, gone, or another `Arc`. A
    /// merge walk of both (sorted by the same keys), comparing pointers; for callers that
    /// hold whole states (tests, the fuzzer, `model::build`), not for sources.
    pub fn between(before: &Objects, now: &Objects) -> Self {
        Self {
            services: differences(&before.services, &now.services),
            endpoint_slices: differences(&before.endpoint_slices, &now.endpoint_slices),
            nodes: differences(&before.nodes, &now.nodes),
        }
    }

    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.endpoint_slices.is_empty() && self.nodes.is_empty()
    }

    /// Objects changed, over all kinds.
    pub fn len(&self) -> usize {
        self.services.len() + self.endpoint_slices.len() + self.nodes.len()
    }

    /// Folds later changes into these: what `later` says of an object replaces what these
    /// said.
    pub fn merge(&mut self, later: ObjectChanges) {
        self.services.extend(later.services);
        self.endpoint_slices.extend(later.endpoint_slices);
        self.nodes.extend(later.nodes);
    }

    /// Brings `objects` up to these changes.
    pub fn apply_to(&self, objects: &mut Objects) {
        apply(&mut objects.services, &self.services);
        apply(&mut objects.endpoint_slices, &self.endpoint_slices);
        apply(&mut objects.nodes, &self.nodes);
    }
}

fn apply<K: Ord + Clone, V>(into: &mut BTreeMap<K, Arc<V>>, changed: &Changed<K, V>) {
    for (key, now) in changed {
        match now {
            Some(object) => into.insert(key.clone(), Arc::clone(object)),
            None => into.remove(key),
        };
    }
}

fn differences<K: Ord + Clone, V>(
    before: &BTreeMap<K, Arc<V>>,
    now: &BTreeMap<K, Arc<V>>,
) -> Changed<K, V> {
    let mut found = BTreeMap::new();
    let mut old = before.iter().peekable();
    let mut new = now.iter().peekable();
    loop {
        match (old.peek(), new.peek()) {
            (None, None) => return found,
            (Some(&(key, _)), None) => {
                found.insert(key.clone(), None);
                old.next();
            }
            (None, Some(&(key, value))) => {
                found.insert(key.clone(), Some(Arc::clone(value)));
                new.next();
            }
            (Some(&(old_key, old_value)), Some(&(new_key, new_value))) => {
                match old_key.cmp(new_key) {
                    std::cmp::Ordering::Less => {
                        found.insert(old_key.clone(), None);
                        old.next();
                    }
                    std::cmp::Ordering::Greater => {
                        found.insert(new_key.clone(), Some(Arc::clone(new_value)));
                        new.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if !Arc::ptr_eq(old_value, new_value) {
                            found.insert(new_key.clone(), Some(Arc::clone(new_value)));
                        }
                        old.next();
                        new.next();
                    }
                }
            }
        }
    }
}
