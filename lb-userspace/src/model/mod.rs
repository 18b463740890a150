//! The desired state as a pure function of Kubernetes objects. Every kube-proxy rule about
//! which services and which endpoints lives here (and in `endpoints`), and is unit-tested
//! here; nothing here knows where objects came from or what a BPF map is.
pub mod desired;
pub mod endpoints;
pub mod external;
pub mod incremental;
pub mod objects;
#[cfg(test)]
pub(crate) mod tests;

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::core::v1::{Service, ServicePort};

pub use desired::{
    Backend, DesiredService, DesiredState, Diagnostic, Frontend, Protocol, ServicePortName,
    Severity,
};
pub use endpoints::NodeView;
pub use incremental::{Changes, Model};
pub use objects::{ObjectKey, ObjectRef, Objects};

/// A service carrying this label belongs to the proxy of that name.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// A service carrying this label is headless, whatever its spec says.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The node label naming its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
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
    let zone = objects
        .nodes
        .get(&identity.node_name)
        .and_then(|node| node.metadata.labels.as_ref())
        .and_then(|labels| labels.get(ZONE_LABEL))
        .cloned();
    NodeView {
        node_name: identity.node_name.clone(),
        zone,
    }
}

/// kube-proxy's watch selector: `!service.kubernetes.io/service-proxy-name` (or `=NAME` when
/// the proxy has a name), `!service.kubernetes.io/headless`.
pub fn is_ours(service: &Service, identity: &ProxyIdentity) -> bool {
    let labels = service.metadata.labels.as_ref();
    let label = |name: &str| labels.and_then(|l| l.get(name));
    if label(HEADLESS_LABEL).is_some() {
        return false;
    }
    match (
        &identity.service_proxy_name,
        label(SERVICE_PROXY_NAME_LABEL),
    ) {
        (None, None) => true,
        (Some(ours), Some(theirs)) => ours == theirs,
        _ => false,
    }
}

fn add_service(
    key: &ObjectKey,
    service: &Service,
    slices: &endpoints::SliceIndex<'_>,
    node: &NodeView,
    state: &mut DesiredState,
    diagnostics: &mut Vec<Diagnostic>,
) {
    let mut warn = warner(key, diagnostics);
    let Some(spec) = &service.spec else {
        warn(Severity::Warning, "has no spec; skipped".into());
        return;
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return;
    }
    let cluster_ips = cluster_ips(spec);
    if cluster_ips.iter().any(|ip| ip.eq_ignore_ascii_case("None")) {
        return; // headless
    }
    if cluster_ips.is_empty() {
        // The API server always allocates one; a hand-written manifest may lack it.
        warn(
            Severity::Warning,
            "has no clusterIP (the API server allocates one; a manifest must give it); skipped"
                .into(),
        );
        return;
    }
    let mut ipv4 = Vec::new();
    for text in &cluster_ips {
        match text.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => ipv4.push(ip),
            Ok(IpAddr::V6(ip)) => warn(
                Severity::Info,
                format!("ClusterIP {ip} is IPv6, which this data path does not serve yet"),
            ),
            Err(_) => warn(
                Severity::Warning,
                format!("ClusterIP {text:?} is not an IP address; skipped"),
            ),
        }
    }
    if ipv4.is_empty() {
        return;
    }
    let (affinity, affinity_problem) = affinity_timeout(service);
    if let Some(message) = affinity_problem {
        warn(Severity::Warning, message);
    }
    let all_ready = spec.publish_not_ready_addresses.unwrap_or(false);
    let local_only = spec.internal_traffic_policy.as_deref() == Some("Local");
    let external_ips = in_cluster_external_ips(service);
    let mut endpoint_diagnostics = Vec::new();
    for port in spec.ports.iter().flatten() {
        let (protocol, number) = match port_of(port) {
            Ok(found) => found,
            Err((severity, message)) => {
                warn(severity, message);
                continue;
            }
        };
        let port_name = port.name.clone().unwrap_or_default();
        let endpoints = endpoints::collect(
            key,
            &port_name,
            protocol,
            all_ready,
            slices,
            &mut endpoint_diagnostics,
        );
        let categorized = endpoints::categorize(&endpoints, node);
        // Pods reaching an externalIP or LoadBalancer IP are served at the socket too, by the
        // cluster-wide set (kube-proxy sends in-cluster traffic to them through KUBE-SVC).
        let in_cluster_external: Vec<(Ipv4Addr, BTreeSet<Backend>)> = external_ips
            .iter()
            .map(|ip| (*ip, categorized.cluster.clone()))
            .collect();
        let backends = if local_only {
            categorized.local
        } else {
            categorized.cluster
        };
        let name = ServicePortName {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            port: port_name,
        };
        let frontends = ipv4
            .iter()
            .map(|ip| (*ip, backends.clone()))
            .chain(in_cluster_external);
        for (ip, backends) in frontends {
            let frontend = Frontend {
                ip,
                port: number,
                protocol,
            };
            if let Some(taken) = state.services.get(&frontend) {
                warn(
                    Severity::Warning,
                    format!(
                        "{frontend} is already served by {}; this port is skipped",
                        taken.name
                    ),
                );
                continue;
            }
            state.services.insert(
                frontend,
                DesiredService {
                    name: name.clone(),
                    // The fallback picks serving-and-terminating endpoints only when none is
                    // ready: those are the backends that are not ready.
                    terminating: backends
                        .iter()
                        .filter(|b| endpoints.get(b).is_some_and(|ep| !ep.ready))
                        .copied()
                        .collect(),
                    backends,
                    affinity_timeout_secs: affinity,
                },
            );
        }
    }
    endpoint_diagnostics.sort();
    endpoint_diagnostics.dedup();
    drop(warn);
    diagnostics.extend(endpoint_diagnostics);
}

/// Reports problems with the Service `key` into `diagnostics`.
pub(crate) fn warner<'a>(
    key: &ObjectKey,
    diagnostics: &'a mut Vec<Diagnostic>,
) -> impl FnMut(Severity, String) + 'a {
    let object = ObjectRef {
        kind: "Service",
        key: key.clone(),
    };
    move |severity, message| {
        diagnostics.push(Diagnostic {
            severity,
            object: object.clone(),
            message,
        })
    }
}

/// `spec.externalIPs` and the load balancer's ingress IPs, except those with `ipMode: Proxy`
/// (traffic to them must go out to the load balancer). IPv4 only; the north-south model
/// reports the others.
fn in_cluster_external_ips(service: &Service) -> Vec<Ipv4Addr> {
    let spec_ips = service
        .spec
        .as_ref()
        .and_then(|spec| spec.external_ips.as_ref())
        .into_iter()
        .flatten();
    let ingress_ips = service
        .status
        .as_ref()
        .and_then(|status| status.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter(|ingress| ingress.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|ingress| ingress.ip.as_ref());
    let mut ips: Vec<Ipv4Addr> = spec_ips
        .chain(ingress_ips)
        .filter_map(|text| text.parse().ok())
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// `spec.clusterIPs`, or `spec.clusterIP` for objects written before dual-stack.
fn cluster_ips(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> Vec<String> {
    match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.clone(),
        (_, Some(ip)) if !ip.is_empty() => vec![ip.clone()],
        _ => Vec::new(),
    }
}

/// The protocol and port number of a service port, or why it is skipped.
fn port_of(port: &ServicePort) -> Result<(Protocol, u16), (Severity, String)> {
    let label = port
        .name
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or("(unnamed)");
    let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        other => {
            return Err((
                Severity::Info,
                format!("port {label}: protocol {other} is not served by this data path"),
            ));
        }
    };
    match u16::try_from(port.port) {
        Ok(number) if number != 0 => Ok((protocol, number)),
        _ => Err((
            Severity::Warning,
            format!(
                "port {label}: {} is not a valid port (1-65535); skipped",
                port.port
            ),
        )),
    }
}

/// `Some(timeout)` for `sessionAffinity: ClientIP`; an out-of-range timeout falls back to the
/// default and is reported.
fn affinity_timeout(service: &Service) -> (Option<u32>, Option<String>) {
    let Some(spec) = &service.spec else {
        return (None, None);
    };
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return (None, None);
    }
    let configured = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    match configured {
        None => (Some(DEFAULT_AFFINITY_TIMEOUT_SECS), None),
        Some(secs) if secs > 0 && secs as u32 <= MAX_AFFINITY_TIMEOUT_SECS => {
            (Some(secs as u32), None)
        }
        Some(secs) => (
            Some(DEFAULT_AFFINITY_TIMEOUT_SECS),
            Some(format!(
                "sessionAffinityConfig.clientIP.timeoutSeconds {secs} is outside \
                 1-{MAX_AFFINITY_TIMEOUT_SECS}; using the default {DEFAULT_AFFINITY_TIMEOUT_SECS}"
            )),
        ),
    }
}
