//! Which endpoints of a service port a connection may use, following kube-proxy's
//! `CategorizeEndpoints`: merge every EndpointSlice of the service, deduplicate, keep the ready
//! ones (falling back to serving-and-terminating ones when none is ready), and apply topology
//! hints and traffic policies.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use super::{
    Diagnostic, Family, Severity,
    desired::{Backend, Protocol},
    objects::{ObjectKey, ObjectRef},
    slice::Slice,
};

/// The label joining an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One endpoint of one service port, merged over all slices.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
    pub zone_hints: BTreeSet<String>,
    pub node_hints: BTreeSet<String>,
}

/// Where this proxy runs: decides what is local and which hints apply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeView {
    pub node_name: String,
    /// `topology.kubernetes.io/zone` of this node, when known.
    pub zone: Option<String>,
    /// kube-proxy's node IP of each family: the Node's first InternalIP of the family, else
    /// its first ExternalIP of it (`loadBalancerSourceRanges` that hold it let the node in).
    /// At most one per family, IPv4 first.
    pub node_ips: Vec<IpAddr>,
    /// The Node's `spec.podCIDRs` of both families (this node's pods' addresses).
    pub pod_cidrs: Vec<crate::cidr::Cidr>,
}

impl NodeView {
    /// kube-proxy's node IP of `family`.
    pub fn node_ip(&self, family: Family) -> Option<IpAddr> {
        self.node_ips
            .iter()
            .copied()
            .find(|ip| Family::of(*ip) == family)
    }
}

/// The endpoints of one service port, by backend address.
pub type PortEndpoints = BTreeMap<Backend, Endpoint>;

/// The EndpointSlices of each service (namespace and `kubernetes.io/service-name` label), so
/// each service looks at its own slices only.
pub struct SliceIndex<'a> {
    by_service: BTreeMap<ObjectKey, Vec<(&'a ObjectKey, &'a Arc<Slice>)>>,
}

impl<'a> SliceIndex<'a> {
    /// An index holding only the slices of one service.
    pub fn of_service(service: &ObjectKey, slices: Vec<(&'a ObjectKey, &'a Arc<Slice>)>) -> Self {
        Self {
            by_service: BTreeMap::from([(service.clone(), slices)]),
        }
    }

    /// The slices of `service`, in key order.
    pub fn of(&self, service: &ObjectKey) -> &[(&'a ObjectKey, &'a Arc<Slice>)] {
        self.by_service
            .get(service)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }
}

/// Collects the endpoints of family `family` of the port named `port_name` (protocol
/// `protocol`) of the service `service`, from every slice of that `addressType` labelled with
/// its name, as kube-proxy's proxier of that family does. `all_ready` treats every endpoint as
/// ready (`publishNotReadyAddresses`).
pub fn collect(
    service: &ObjectKey,
    family: Family,
    port_name: &str,
    protocol: Protocol,
    all_ready: bool,
    slices: &SliceIndex<'_>,
    diagnostics: &mut Vec<Diagnostic>,
) -> PortEndpoints {
    let mut merged = PortEndpoints::new();
    for &(key, slice) in slices.of(service) {
        if &*slice.address_type != family.kubernetes_name() {
            // The other family's slices are its own proxier's; FQDN slices are ignored, as
            // kube-proxy does.
            continue;
        }
        let Some(port) = matching_port(key, slice, port_name, protocol, diagnostics) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            // kube-proxy uses the first address of an endpoint; the others are the same pod.
            let Some(address) = endpoint.address.as_deref() else {
                continue;
            };
            // 0.0.0.0 or :: as a backend would reach the client's own host (the API server
            // refuses it too; found by the `model` fuzz target); an IPv4-mapped IPv6 address
            // is an IPv4 one in disguise.
            let Some(ip) = address.parse::<IpAddr>().ok().filter(|ip| {
                Family::of(*ip) == family && !ip.is_unspecified() && !is_ipv4_mapped(ip)
            }) else {
                diagnostics.push(Diagnostic {
                    severity: Severity::Warning,
                    object: ObjectRef {
                        kind: "EndpointSlice",
                        key: key.clone(),
                    },
                    message: format!(
                        "endpoint address {address:?} is not a usable {family} address; skipped"
                    ),
                });
                continue;
            };
            let ready = all_ready || endpoint.ready.unwrap_or(true);
            let found = Endpoint {
                ready,
                serving: all_ready || endpoint.serving.unwrap_or(ready),
                terminating: endpoint.terminating.unwrap_or(false),
                node_name: endpoint.node_name.as_deref().map(str::to_owned),
                zone_hints: endpoint.zone_hints.iter().map(|z| z.to_string()).collect(),
                node_hints: endpoint.node_hints.iter().map(|n| n.to_string()).collect(),
            };
            let entry = merged
                .entry(Backend { ip, port })
                .or_insert_with(|| found.clone());
            // The same address in two slices (e.g. during a slice split): the better state wins.
            if found.ready && !entry.ready {
                *entry = found;
            }
        }
    }
    merged
}

fn is_ipv4_mapped(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some())
}

/// The port number of the slice's port matching the service port by name and protocol.
fn matching_port(
    key: &ObjectKey,
    slice: &Slice,
    port_name: &str,
    protocol: Protocol,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<u16> {
    let port = slice.ports.iter().find(|port| {
        &*port.name == port_name
            && port.protocol.as_deref().unwrap_or("TCP") == protocol.to_string()
    })?;
    match port.port.map(u16::try_from) {
        Some(Ok(number)) if number != 0 => Some(number),
        other => {
            diagnostics.push(Diagnostic {
                severity: Severity::Warning,
                object: ObjectRef {
                    kind: "EndpointSlice",
                    key: key.clone(),
                },
                message: format!(
                    "port {port_name:?} has no valid number ({:?}); its endpoints are skipped",
                    other.map(|_| port.port.unwrap_or_default())
                ),
            });
            None
        }
    }
}

/// The endpoints kube-proxy would use for traffic of one policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Categorized {
    /// For `Cluster` traffic policy: any node, topology hints applied.
    pub cluster: BTreeSet<Backend>,
    /// For `Local` traffic policy: this node only.
    pub local: BTreeSet<Backend>,
}

/// kube-proxy's `CategorizeEndpoints`: ready endpoints (topology-filtered for the cluster
/// set); when none is ready, serving-and-terminating ones, separately for each set.
pub fn categorize(endpoints: &PortEndpoints, node: &NodeView) -> Categorized {
    let topology = usable_topology(endpoints, node);
    let cluster = with_fallback(endpoints, |_, ep| match &topology {
        Topology::None => true,
        Topology::Node => ep.node_hints.contains(&node.node_name),
        Topology::Zone(zone) => ep.zone_hints.contains(zone),
    });
    let local = with_fallback(endpoints, |_, ep| {
        ep.node_name.as_deref() == Some(node.node_name.as_str())
    });
    Categorized { cluster, local }
}

fn with_fallback(
    endpoints: &PortEndpoints,
    wanted: impl Fn(&Backend, &Endpoint) -> bool,
) -> BTreeSet<Backend> {
    let ready: BTreeSet<Backend> = endpoints
        .iter()
        .filter(|(b, ep)| ep.ready && wanted(b, ep))
        .map(|(b, _)| *b)
        .collect();
    if !ready.is_empty() {
        return ready;
    }
    endpoints
        .iter()
        .filter(|(b, ep)| ep.serving && ep.terminating && wanted(b, ep))
        .map(|(b, _)| *b)
        .collect()
}

enum Topology {
    None,
    Node,
    Zone(String),
}

/// Node hints when every ready endpoint has one and one names this node; else zone hints when
/// every ready endpoint has one and one names this node's zone; else none.
fn usable_topology(endpoints: &PortEndpoints, node: &NodeView) -> Topology {
    let ready: Vec<&Endpoint> = endpoints.values().filter(|ep| ep.ready).collect();
    if ready.is_empty() {
        return Topology::None;
    }
    if ready.iter().all(|ep| !ep.node_hints.is_empty())
        && ready
            .iter()
            .any(|ep| ep.node_hints.contains(&node.node_name))
    {
        return Topology::Node;
    }
    if let Some(zone) = &node.zone
        && ready.iter().all(|ep| !ep.zone_hints.is_empty())
        && ready.iter().any(|ep| ep.zone_hints.contains(zone))
    {
        return Topology::Zone(zone.clone());
    }
    Topology::None
}
