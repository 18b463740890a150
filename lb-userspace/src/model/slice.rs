//! An EndpointSlice as the model keeps it: the fields kube-proxy's rules read, converted once
//! when a source takes the object in. A k8s-openapi `Endpoint` is about 340 bytes before
//! any of its strings (its `targetRef` alone is seven optional strings), and a slice of ten
//! endpoints with everything the API server adds is kilobytes; this keeps per endpoint the
//! first address, its conditions, node and hints.
use std::{collections::BTreeSet, sync::Arc};

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::endpoints::SERVICE_NAME_LABEL;

/// The EndpointSlice annotation kube-proxy measures network programming latency from.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// What the model reads of one EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slice {
    /// Its `kubernetes.io/service-name` label: the service it belongs to.
    pub service: Option<Box<str>>,
    /// `addressType` as written (`IPv4`, `IPv6`, `FQDN`).
    pub address_type: Box<str>,
    pub ports: Box<[SlicePort]>,
    pub endpoints: Box<[SliceEndpoint]>,
    /// Its `endpoints.kubernetes.io/last-change-trigger-time` annotation.
    pub trigger_time: Option<Box<str>>,
}

/// One port of a slice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    /// Empty for an unnamed port.
    pub name: Box<str>,
    /// `None` means TCP.
    pub protocol: Option<Box<str>>,
    pub port: Option<i32>,
}

/// One endpoint of a slice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// Its first address (kube-proxy uses only that one; the others are the same pod), as
    /// written: an unusable one is reported by the model, not here.
    pub address: Option<Box<str>>,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    /// Shared by every endpoint of the slice on the same node.
    pub node_name: Option<Arc<str>>,
    /// `hints.forZones`, sorted, without repeats (a boxed slice: no allocation when empty,
    /// as nearly always).
    pub zone_hints: Box<[Box<str>]>,
    /// `hints.forNodes`, likewise.
    pub node_hints: Box<[Box<str>]>,
}

impl From<&EndpointSlice> for Slice {
    fn from(slice: &EndpointSlice) -> Self {
        let label = |name: &str| {
            slice
                .metadata
                .labels
                .as_ref()
                .and_then(|labels| labels.get(name))
                .map(|value| Box::from(value.as_str()))
        };
        let annotation = slice
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
            .map(|value| Box::from(value.as_str()));
        let mut nodes: Vec<Arc<str>> = Vec::new();
        let mut node = |name: &String| -> Arc<str> {
            match nodes.iter().find(|known| ***known == **name) {
                Some(known) => Arc::clone(known),
                None => {
                    let new: Arc<str> = Arc::from(name.as_str());
                    nodes.push(Arc::clone(&new));
                    new
                }
            }
        };
        Self {
            service: label(SERVICE_NAME_LABEL),
            address_type: Box::from(slice.address_type.as_str()),
            ports: slice
                .ports
                .iter()
                .flatten()
                .map(|port| SlicePort {
                    name: Box::from(port.name.as_deref().unwrap_or_default()),
                    protocol: port.protocol.as_deref().map(Box::from),
                    port: port.port,
                })
                .collect(),
            endpoints: slice
                .endpoints
                .iter()
                .map(|endpoint| {
                    let conditions = endpoint.conditions.as_ref();
                    let hints = endpoint.hints.as_ref();
                    SliceEndpoint {
                        address: endpoint.addresses.first().map(|a| Box::from(a.as_str())),
                        ready: conditions.and_then(|c| c.ready),
                        serving: conditions.and_then(|c| c.serving),
                        terminating: conditions.and_then(|c| c.terminating),
                        node_name: endpoint.node_name.as_ref().map(&mut node),
                        zone_hints: names(hints.and_then(|h| h.for_zones.as_ref()), |z| &z.name),
                        node_hints: names(hints.and_then(|h| h.for_nodes.as_ref()), |n| &n.name),
                    }
                })
                .collect(),
            trigger_time: annotation,
        }
    }
}

impl From<EndpointSlice> for Slice {
    fn from(slice: EndpointSlice) -> Self {
        Self::from(&slice)
    }
}

fn names<T>(hints: Option<&Vec<T>>, name: impl Fn(&T) -> &String) -> Box<[Box<str>]> {
    let names: BTreeSet<&str> = hints
        .into_iter()
        .flatten()
        .map(|h| name(h).as_str())
        .collect();
    names.into_iter().map(Box::from).collect()
}
