//! The desired state as a pure function of Kubernetes objects: one model for every frontend
//! kind (ClusterIP, NodePort, externalIPs, LoadBalancer IPs). Every kube-proxy rule about
//! which services, which addresses and which endpoints lives here (`service` for one Service,
//! `endpoints` for its EndpointSlices), and is unit-tested here; nothing here knows where
//! objects came from or what a BPF map is.
pub mod desired;
pub mod endpoints;
pub mod family;
pub mod incremental;
pub mod node_info;
pub mod objects;
pub mod service;
pub mod service_info;
pub mod slice;
#[cfg(test)]
pub(crate) mod tests;

pub use desired::{
    Backend, BackendSet, DesiredService, DesiredState, Diagnostic, Endpoints, Frontend,
    FrontendKind, HealthCheck, Protocol, Scope, ServicePortName, SetKey, Severity, SourceRanges,
};
pub use endpoints::NodeView;
pub use family::Family;
pub use incremental::{Changes, Model};
pub use node_info::NodeInfo;
pub use objects::{Changed, ObjectChanges, ObjectKey, ObjectRef, Objects};
pub use service_info::ServiceInfo;
pub use slice::Slice;

/// A service carrying this label belongs to the proxy of that name.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// A service carrying this label is headless, whatever its spec says.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The node label naming its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The taint the cluster autoscaler puts on a node it is about to delete (kube-proxy's
/// `ToBeDeletedTaint`).
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";
/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT_SECS: u32 = 10_800;
/// The API server's limit for `timeoutSeconds`.
pub const MAX_AFFINITY_TIMEOUT_SECS: u32 = 86_400;

/// What this proxy is: which node it runs on and which services it owns.
#[derive(Clone, Debug, Default)]
pub struct ProxyIdentity {
    pub node_name: String,
    /// `--service-proxy-name`: when set, only services labelled with it are ours; when unset,
    /// only services without the label are.
    pub service_proxy_name: Option<String>,
}

/// Computes the desired state from a snapshot of objects. Problems with single objects end up
/// in the returned diagnostics; they never stop the rest from being computed. The agent keeps
/// a [`Model`] instead, which gives the same result by difference.
pub fn build(objects: &Objects, identity: &ProxyIdentity) -> (DesiredState, Vec<Diagnostic>) {
    let mut model = Model::new(identity.clone());
    model.update(objects);
    (model.desired().clone(), model.diagnostics())
}

fn node_view(objects: &Objects, identity: &ProxyIdentity) -> NodeView {
    let node = objects.nodes.get(&identity.node_name);
    let first_of = |kind: &str, family: Family| {
        node.into_iter()
            .flat_map(|node| node.addresses.iter())
            .filter(|a| &*a.type_ == kind)
            .filter_map(|a| a.address.parse::<std::net::IpAddr>().ok())
            .find(|ip| Family::of(*ip) == family)
    };
    let pod_cidrs = match node {
        Some(node) if !node.pod_cidrs.is_empty() => node.pod_cidrs.iter().collect(),
        Some(node) => node.pod_cidr.iter().collect(),
        None => Vec::new(),
    };
    NodeView {
        node_name: identity.node_name.clone(),
        zone: node
            .and_then(|node| node.zone.as_deref())
            .map(str::to_owned),
        node_ips: Family::ALL
            .into_iter()
            .filter_map(|family| {
                first_of("InternalIP", family).or_else(|| first_of("ExternalIP", family))
            })
            .collect(),
        pod_cidrs: pod_cidrs
            .into_iter()
            .filter_map(|text| crate::cidr::Cidr::parse_strict(text).ok())
            .map(|cidr| cidr.network())
            .collect(),
    }
}

/// This node's Node, when the source holds one.
pub fn this_node<'a>(objects: &'a Objects, identity: &ProxyIdentity) -> Option<&'a NodeInfo> {
    objects.nodes.get(&identity.node_name).map(AsRef::as_ref)
}

/// Why load balancers should send this node no traffic, or `None` when it is eligible:
/// kube-proxy's `SyncNode` (pkg/proxy/healthcheck, since 1.28) calls a node ineligible when
/// its Node has a `deletionTimestamp` or carries the [`TO_BE_DELETED_TAINT`] taint (any
/// effect, any value).
pub fn node_ineligible_because(node: &NodeInfo) -> Option<&'static str> {
    if node.deleting {
        return Some("the Node is being deleted (deletionTimestamp)");
    }
    if node.to_be_deleted {
        return Some("the Node is tainted ToBeDeletedByClusterAutoscaler");
    }
    None
}

/// kube-proxy's watch selector: `!service.kubernetes.io/service-proxy-name` (or `=NAME` when
/// the proxy has a name), `!service.kubernetes.io/headless`.
pub fn is_ours(service: &ServiceInfo, identity: &ProxyIdentity) -> bool {
    if service.headless_label {
        return false;
    }
    match (&identity.service_proxy_name, service.proxy_name.as_deref()) {
        (None, None) => true,
        (Some(ours), Some(theirs)) => ours == theirs,
        _ => false,
    }
}
