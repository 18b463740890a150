//! One Service → its frontends of every kind and the backend sets they lead to, following
//! kube-proxy: ClusterIPs use the endpoints of `internalTrafficPolicy`; NodePorts (types
//! NodePort and LoadBalancer), `spec.externalIPs` and LoadBalancer ingress IPs (type
//! LoadBalancer) use those of `externalTrafficPolicy` (applied to NodePort and LoadBalancer
//! services only); in-node clients of an external frontend whose policy is `Local` get every
//! endpoint, as kube-proxy sends pod and host traffic for external destinations to the
//! cluster chain. Every problem is reported against the Service by name.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};

use crate::cidr::Cidr;

use super::{
    DEFAULT_AFFINITY_TIMEOUT_SECS, Diagnostic, MAX_AFFINITY_TIMEOUT_SECS, ObjectKey, ObjectRef,
    Severity,
    desired::{
        Backend, BackendSet, DesiredService, Endpoints, Frontend, FrontendKind, HealthCheck,
        Protocol, Scope, ServicePortName, SetKey, SourceRanges,
    },
    endpoints::{self, NodeView, PortEndpoints, SliceIndex},
};

/// What one Service contributes to the desired state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Contribution {
    pub frontends: BTreeMap<Frontend, DesiredService>,
    pub sets: BTreeMap<SetKey, BackendSet>,
    pub health_check: Option<(u16, HealthCheck)>,
    pub diagnostics: Vec<Diagnostic>,
}

/// The addresses of a Service, each with its kind.
struct Addresses {
    cluster_ips: Vec<Ipv4Addr>,
    external: Vec<(Ipv4Addr, FrontendKind)>,
    node_ports: bool,
}

/// Computes what the Service `key` contributes (nothing for ExternalName and headless
/// services; problems in `diagnostics`).
pub fn contribution(
    key: &ObjectKey,
    service: &Service,
    slices: &SliceIndex<'_>,
    node: &NodeView,
) -> Contribution {
    let mut out = Contribution::default();
    let mut report = Reporter::new(key);
    let Some(spec) = &service.spec else {
        report.warn("has no spec; skipped".into());
        out.diagnostics = report.done();
        return out;
    };
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    if kind == "ExternalName" || is_headless(spec) {
        return out;
    }
    let Some(addresses) = addresses(service, spec, kind, &mut report) else {
        out.diagnostics = report.done();
        return out;
    };
    let (affinity, affinity_problem) = affinity_timeout(service);
    if let Some(message) = affinity_problem {
        report.warn(message);
    }
    let ranges = source_ranges(spec, &addresses, node, &mut report);
    let all_ready = spec.publish_not_ready_addresses.unwrap_or(false);
    let internal = policy(spec.internal_traffic_policy.as_deref());
    // kube-proxy applies externalTrafficPolicy only to NodePort and LoadBalancer services.
    let external = if addresses.node_ports {
        policy(spec.external_traffic_policy.as_deref())
    } else {
        Endpoints::All
    };
    let mut endpoint_diagnostics = Vec::new();
    let mut local_ready = 0usize;
    let mut port_names = BTreeSet::new();
    for port in spec.ports.iter().flatten() {
        let (protocol, number) = match port_of(port) {
            Ok(found) => found,
            Err((severity, message)) => {
                report.push(severity, message);
                continue;
            }
        };
        // A backend set is named by the port's name: two ports of one name would share one.
        if !port_names.insert(port.name.clone().unwrap_or_default()) {
            report.warn(format!(
                "port {}: another port of this Service has the same name (the API server \
                 rejects that); skipped",
                label(port)
            ));
            continue;
        }
        let name = ServicePortName {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            port: port.name.clone().unwrap_or_default(),
        };
        let collected = endpoints::collect(
            key,
            &name.port,
            protocol,
            all_ready,
            slices,
            &mut endpoint_diagnostics,
        );
        local_ready = local_ready.max(
            collected
                .values()
                .filter(|ep| ep.ready && is_local(ep, node))
                .count(),
        );
        let frontend_of = |kind: FrontendKind, endpoints: Endpoints| DesiredService {
            name: name.clone(),
            kind,
            endpoints,
            affinity_timeout_secs: affinity,
            local_only: kind.is_external() && endpoints == Endpoints::Local,
            two_scopes: kind.is_external() && endpoints == Endpoints::Local,
            source_ranges: ranges
                .clone()
                .filter(|_| kind == FrontendKind::LoadBalancer),
        };
        let mut wanted: Vec<(Frontend, DesiredService)> = addresses
            .cluster_ips
            .iter()
            .map(|ip| {
                (
                    Frontend::new(*ip, number, protocol),
                    frontend_of(FrontendKind::ClusterIP, internal),
                )
            })
            .collect();
        if addresses.node_ports {
            match port.node_port.map(u16::try_from) {
                Some(Ok(node_port)) if node_port != 0 => wanted.push((
                    Frontend::node_port(node_port, protocol),
                    frontend_of(FrontendKind::NodePort, external),
                )),
                Some(_) => report.warn(format!(
                    "port {}: nodePort {} is not a valid port (1-65535); no NodePort for it",
                    label(port),
                    port.node_port.unwrap_or_default()
                )),
                // allocateLoadBalancerNodePorts: false, or not allocated yet.
                None => {}
            }
        }
        for (ip, kind) in &addresses.external {
            wanted.push((
                Frontend::new(*ip, number, protocol),
                frontend_of(*kind, external),
            ));
        }
        let mut needed = BTreeSet::new();
        for (frontend, desired) in wanted {
            if out.frontends.contains_key(&frontend) {
                continue; // an externalIP equal to the service's own ClusterIP, say
            }
            needed.insert(desired.endpoints);
            if desired.two_scopes {
                // In-node clients of a Local external frontend: every endpoint.
                needed.insert(Endpoints::All);
                out.frontends.insert(
                    frontend.in_scope(Scope::Internal),
                    DesiredService {
                        endpoints: Endpoints::All,
                        local_only: false,
                        two_scopes: false,
                        source_ranges: None,
                        ..desired.clone()
                    },
                );
            }
            out.frontends.insert(frontend, desired);
        }
        let categorized = endpoints::categorize(&collected, node);
        for endpoints in needed {
            let picks = match endpoints {
                Endpoints::All => &categorized.cluster,
                Endpoints::Local => &categorized.local,
            };
            out.sets.insert(
                SetKey {
                    name: name.clone(),
                    endpoints,
                },
                backend_set(&collected, picks, endpoints, node),
            );
        }
    }
    if addresses.node_ports
        && external == Endpoints::Local
        && let Some(port) = spec
            .health_check_node_port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
    {
        out.health_check = Some((
            port,
            HealthCheck {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                local_endpoints: local_ready,
            },
        ));
    }
    endpoint_diagnostics.sort();
    endpoint_diagnostics.dedup();
    out.diagnostics = report.done();
    out.diagnostics.extend(endpoint_diagnostics);
    out
}

/// kube-proxy's firewall for LoadBalancer IPs (its service info and `proxier.go`): the IPv4
/// entries of `loadBalancerSourceRanges`, whitespace trimmed; none, or one of them
/// `0.0.0.0/0`, means no firewall. When a range holds the node's IP, the LoadBalancer IPs
/// themselves are allowed sources too. NodePorts and externalIPs are never filtered.
/// Entries that are not CIDRs are reported and ignored.
fn source_ranges(
    spec: &ServiceSpec,
    addresses: &Addresses,
    node: &NodeView,
    report: &mut Reporter,
) -> Option<SourceRanges> {
    let texts = spec.load_balancer_source_ranges.as_ref()?;
    let lb_ips: Vec<Ipv4Addr> = addresses
        .external
        .iter()
        .filter(|(_, kind)| *kind == FrontendKind::LoadBalancer)
        .map(|(ip, _)| *ip)
        .collect();
    let mut ranges = BTreeSet::new();
    for text in texts {
        let text = text.trim();
        match Cidr::parse_strict(text) {
            Ok(cidr) => {
                ranges.insert(cidr.network());
            }
            Err(_) if is_ipv6_cidr(text) => report.info(format!(
                "loadBalancerSourceRanges entry {text} is IPv6, which this data path does not \
                 serve yet"
            )),
            Err(_) => report.warn(format!(
                "loadBalancerSourceRanges entry {text:?} is not a CIDR; ignored"
            )),
        }
    }
    if lb_ips.is_empty() || ranges.is_empty() || ranges.iter().any(Cidr::is_everything) {
        return None;
    }
    let allow_node = node
        .node_ip
        .is_some_and(|ip| ranges.iter().any(|range| range.contains(ip)));
    let allow_pods = !node.pod_cidrs.is_empty()
        && node
            .pod_cidrs
            .iter()
            .all(|pods| ranges.iter().any(|range| range.covers(pods)));
    let mut allowed = ranges;
    if allow_node {
        allowed.extend(lb_ips.into_iter().map(Cidr::host));
    }
    Some(SourceRanges {
        allowed,
        allow_node,
        allow_pods,
    })
}

fn is_ipv6_cidr(text: &str) -> bool {
    text.split_once('/').is_some_and(|(addr, prefix)| {
        addr.parse::<std::net::Ipv6Addr>().is_ok() && prefix.parse::<u8>().is_ok_and(|p| p <= 128)
    })
}

/// The backend set of `picks` (what new connections may use), with the terminating
/// endpoints kept for the flows that use them and the locality of each.
fn backend_set(
    collected: &PortEndpoints,
    picks: &BTreeSet<Backend>,
    endpoints: Endpoints,
    node: &NodeView,
) -> BackendSet {
    let in_set = |ep: &endpoints::Endpoint| endpoints == Endpoints::All || is_local(ep, node);
    let terminating = picks
        .iter()
        .filter(|b| collected.get(b).is_some_and(|ep| !ep.ready))
        .copied()
        .collect();
    let draining: BTreeSet<Backend> = collected
        .iter()
        .filter(|(b, ep)| ep.terminating && !picks.contains(b) && in_set(ep))
        .map(|(b, _)| *b)
        .collect();
    let local = picks
        .iter()
        .chain(&draining)
        .filter(|b| collected.get(b).is_some_and(|ep| is_local(ep, node)))
        .copied()
        .collect();
    BackendSet {
        backends: picks.clone(),
        terminating,
        draining,
        local,
    }
}

fn is_local(endpoint: &endpoints::Endpoint, node: &NodeView) -> bool {
    endpoint.node_name.as_deref() == Some(node.node_name.as_str())
}

fn policy(text: Option<&str>) -> Endpoints {
    match text {
        Some("Local") => Endpoints::Local,
        _ => Endpoints::All,
    }
}

/// A Service is headless when its clusterIP (or any of clusterIPs) is `None`.
fn is_headless(spec: &ServiceSpec) -> bool {
    spec.cluster_ip
        .iter()
        .chain(spec.cluster_ips.iter().flatten())
        .any(|ip| ip.eq_ignore_ascii_case("None"))
}

/// The Service's IPv4 addresses; `None` when it has no usable ClusterIP (skipped whole).
fn addresses(
    service: &Service,
    spec: &ServiceSpec,
    kind: &str,
    report: &mut Reporter,
) -> Option<Addresses> {
    let cluster_ip_texts = cluster_ips(spec);
    if cluster_ip_texts.is_empty() {
        // The API server always allocates one; a hand-written manifest may lack it.
        report.warn(
            "has no clusterIP (the API server allocates one; a manifest must give it); skipped"
                .into(),
        );
        return None;
    }
    let mut cluster_ips = Vec::new();
    for text in &cluster_ip_texts {
        if let Some(ip) = ipv4_address(text, "ClusterIP", report) {
            cluster_ips.push(ip);
        }
    }
    if cluster_ips.is_empty() {
        return None;
    }
    let mut external = Vec::new();
    for text in spec.external_ips.iter().flatten() {
        if let Some(ip) = ipv4_address(text, "externalIP", report) {
            external.push((ip, FrontendKind::ExternalIp));
        }
    }
    if kind == "LoadBalancer" {
        let ingress = service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for entry in ingress.into_iter().flatten() {
            // ipMode Proxy: the load balancer proxies to the nodes itself; its address must
            // not be short-circuited (kube-proxy leaves it alone too).
            if entry.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            if let Some(text) = &entry.ip
                && let Some(ip) = ipv4_address(text, "load-balancer IP", report)
            {
                external.push((ip, FrontendKind::LoadBalancer));
            }
        }
    }
    external.sort();
    external.dedup_by_key(|(ip, _)| *ip);
    Some(Addresses {
        cluster_ips,
        external,
        node_ports: kind == "NodePort" || kind == "LoadBalancer",
    })
}

fn ipv4_address(text: &str, what: &str, report: &mut Reporter) -> Option<Ipv4Addr> {
    match text.parse::<IpAddr>() {
        // In the maps 0.0.0.0 is every NodePort address: as a service's own address it would
        // turn its port into a NodePort (found by the `model` fuzz target).
        Ok(IpAddr::V4(ip)) if ip.is_unspecified() => {
            report.warn(format!(
                "{what} {ip} is not a usable address (0.0.0.0 stands for the NodePorts); skipped"
            ));
            None
        }
        Ok(IpAddr::V4(ip)) => Some(ip),
        Ok(IpAddr::V6(ip)) => {
            report.info(format!(
                "{what} {ip} is IPv6, which this data path does not serve yet"
            ));
            None
        }
        Err(_) => {
            report.warn(format!("{what} {text:?} is not an IP address; skipped"));
            None
        }
    }
}

/// `spec.clusterIPs`, or `spec.clusterIP` for objects written before dual-stack.
fn cluster_ips(spec: &ServiceSpec) -> Vec<String> {
    match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.clone(),
        (_, Some(ip)) if !ip.is_empty() => vec![ip.clone()],
        _ => Vec::new(),
    }
}

fn label(port: &ServicePort) -> &str {
    port.name
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or("(unnamed)")
}

/// The protocol and port number of a service port, or why it is skipped.
fn port_of(port: &ServicePort) -> Result<(Protocol, u16), (Severity, String)> {
    let label = label(port);
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

/// Collects the problems of one Service, named by it.
struct Reporter {
    object: ObjectRef,
    found: Vec<Diagnostic>,
}

impl Reporter {
    fn new(key: &ObjectKey) -> Self {
        Self {
            object: ObjectRef {
                kind: "Service",
                key: key.clone(),
            },
            found: Vec::new(),
        }
    }

    fn push(&mut self, severity: Severity, message: String) {
        self.found.push(Diagnostic {
            severity,
            object: self.object.clone(),
            message,
        });
    }

    fn warn(&mut self, message: String) {
        self.push(Severity::Warning, message);
    }

    fn info(&mut self, message: String) {
        self.push(Severity::Info, message);
    }

    fn done(self) -> Vec<Diagnostic> {
        self.found
    }
}
