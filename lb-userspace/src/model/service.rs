//! One Service → its frontends of every kind and family and the backend sets they lead to,
//! following kube-proxy: ClusterIPs use the endpoints of `internalTrafficPolicy`; NodePorts
//! (types NodePort and LoadBalancer), `spec.externalIPs` and LoadBalancer ingress IPs (type
//! LoadBalancer) use those of `externalTrafficPolicy` (applied to NodePort and LoadBalancer
//! services only); in-node clients of an external frontend whose policy is `Local` get every
//! endpoint, as kube-proxy sends pod and host traffic for external destinations to the
//! cluster chain. A dual-stack Service is served once per family it has a ClusterIP of, as by
//! kube-proxy's one proxier per family: that family's NodePorts, externalIPs, LoadBalancer
//! IPs and source ranges, and the endpoints of that family's EndpointSlices. Every problem is
//! reported against the Service by name.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use crate::cidr::Cidr;

use super::{
    DEFAULT_AFFINITY_TIMEOUT_SECS, Diagnostic, Family, MAX_AFFINITY_TIMEOUT_SECS, ObjectKey,
    ObjectRef, Severity,
    desired::{
        Backend, BackendSet, DesiredService, Endpoints, Frontend, FrontendKind, HealthCheck,
        Protocol, Scope, ServicePortName, SetKey, SourceRanges,
    },
    endpoints::{self, NodeView, PortEndpoints, SliceIndex},
    service_info::{PortInfo, ServiceInfo, SpecInfo},
};

/// What one Service contributes to the desired state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Contribution {
    pub frontends: BTreeMap<Frontend, DesiredService>,
    pub sets: BTreeMap<SetKey, BackendSet>,
    pub health_check: Option<(u16, HealthCheck)>,
    pub diagnostics: Vec<Diagnostic>,
}

/// The addresses of one family of a Service.
struct FamilyAddresses {
    family: Family,
    cluster_ip: IpAddr,
    /// The externalIPs and LoadBalancer ingress IPs of this family, each with its kind.
    external: Vec<(IpAddr, FrontendKind)>,
}

/// The addresses of a Service: one entry per family it has a ClusterIP of (IPv4 first).
struct Addresses {
    families: Vec<FamilyAddresses>,
    node_ports: bool,
}

/// Computes what the Service `key` contributes (nothing for ExternalName and headless
/// services; problems in `diagnostics`).
pub fn contribution(
    key: &ObjectKey,
    service: &ServiceInfo,
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
    let Some(addresses) = addresses(spec, kind, &mut report) else {
        out.diagnostics = report.done();
        return out;
    };
    let (affinity, affinity_problem) = affinity_timeout(spec);
    if let Some(message) = affinity_problem {
        report.warn(message);
    }
    let ranges = source_ranges(spec, &addresses, node, &mut report);
    let all_ready = spec.publish_not_ready_addresses;
    let internal = policy(spec.internal_local);
    // kube-proxy applies externalTrafficPolicy only to NodePort and LoadBalancer services.
    let external = if addresses.node_ports {
        policy(spec.external_local)
    } else {
        Endpoints::All
    };
    let mut endpoint_diagnostics = Vec::new();
    let mut local_ready = 0usize;
    let mut port_names = BTreeSet::new();
    let namespace: Arc<str> = Arc::from(key.namespace.as_str());
    let service_name: Arc<str> = Arc::from(key.name.as_str());
    for port in &spec.ports {
        let (protocol, number) = match port_of(port) {
            Ok(found) => found,
            Err((severity, message)) => {
                report.push(severity, message);
                continue;
            }
        };
        // A backend set is named by the port's name: two ports of one name would share one.
        if !port_names.insert(port.name.as_deref().unwrap_or_default()) {
            report.warn(format!(
                "port {}: another port of this Service has the same name (the API server \
                 rejects that); skipped",
                label(port)
            ));
            continue;
        }
        let name = ServicePortName {
            namespace: Arc::clone(&namespace),
            name: Arc::clone(&service_name),
            port: Arc::from(port.name.as_deref().unwrap_or_default()),
        };
        let node_port = if addresses.node_ports {
            match port.node_port.map(u16::try_from) {
                Some(Ok(node_port)) if node_port != 0 => Some(node_port),
                Some(_) => {
                    report.warn(format!(
                        "port {}: nodePort {} is not a valid port (1-65535); no NodePort for it",
                        label(port),
                        port.node_port.unwrap_or_default()
                    ));
                    None
                }
                // allocateLoadBalancerNodePorts: false, or not allocated yet.
                None => None,
            }
        } else {
            None
        };
        for addresses in &addresses.families {
            let family = addresses.family;
            let collected = endpoints::collect(
                key,
                family,
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
                family,
                kind,
                endpoints,
                affinity_timeout_secs: affinity,
                local_only: kind.is_external() && endpoints == Endpoints::Local,
                two_scopes: kind.is_external() && endpoints == Endpoints::Local,
                source_ranges: ranges
                    .get(&family)
                    .cloned()
                    .filter(|_| kind == FrontendKind::LoadBalancer),
            };
            let mut wanted = vec![(
                Frontend::new(addresses.cluster_ip, number, protocol),
                frontend_of(FrontendKind::ClusterIP, internal),
            )];
            if let Some(node_port) = node_port {
                wanted.push((
                    Frontend::node_port(family, node_port, protocol),
                    frontend_of(FrontendKind::NodePort, external),
                ));
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
                        family,
                        endpoints,
                    },
                    backend_set(&collected, picks, endpoints, node),
                );
            }
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

/// kube-proxy's firewall for LoadBalancer IPs (its service info and `proxier.go`), per
/// family as each family's proxier builds it: the entries of `loadBalancerSourceRanges` of
/// the family, whitespace trimmed; none of the family, or one of them `0.0.0.0/0` (`::/0`),
/// means no firewall for that family's LoadBalancer IPs (reported when the other family has
/// ranges: kube-proxy leaves them open too). When a range holds the node's IP of the family,
/// the family's LoadBalancer IPs themselves are allowed sources too. NodePorts and
/// externalIPs are never filtered. Entries that are not CIDRs are reported and ignored.
fn source_ranges(
    spec: &SpecInfo,
    addresses: &Addresses,
    node: &NodeView,
    report: &mut Reporter,
) -> BTreeMap<Family, SourceRanges> {
    let mut found = BTreeMap::new();
    let mut ranges = BTreeSet::new();
    for text in &spec.load_balancer_source_ranges {
        let text = text.trim();
        match Cidr::parse_strict(text) {
            Ok(cidr) => {
                ranges.insert(cidr.network());
            }
            Err(_) => report.warn(format!(
                "loadBalancerSourceRanges entry {text:?} is not a CIDR; ignored"
            )),
        }
    }
    for addresses in &addresses.families {
        let family = addresses.family;
        let lb_ips: Vec<IpAddr> = addresses
            .external
            .iter()
            .filter(|(_, kind)| *kind == FrontendKind::LoadBalancer)
            .map(|(ip, _)| *ip)
            .collect();
        let of_family: BTreeSet<Cidr> = ranges
            .iter()
            .filter(|range| range.family() == family)
            .copied()
            .collect();
        if lb_ips.is_empty() || of_family.iter().any(Cidr::is_everything) {
            continue;
        }
        if of_family.is_empty() {
            if !ranges.is_empty() {
                let open: Vec<String> = lb_ips.iter().map(ToString::to_string).collect();
                report.warn(format!(
                    "loadBalancerSourceRanges holds no {family} range: the {family} \
                     load-balancer IPs ({}) are open to every source (as with kube-proxy, \
                     which filters each family by its own ranges)",
                    open.join(", ")
                ));
            }
            continue;
        }
        let allow_node = node
            .node_ip(family)
            .is_some_and(|ip| of_family.iter().any(|range| range.contains(ip)));
        let pods: Vec<&Cidr> = node
            .pod_cidrs
            .iter()
            .filter(|pods| pods.family() == family)
            .collect();
        let allow_pods = !pods.is_empty()
            && pods
                .iter()
                .all(|pods| of_family.iter().any(|range| range.covers(pods)));
        let mut allowed = of_family;
        if allow_node {
            allowed.extend(lb_ips.into_iter().map(Cidr::host));
        }
        found.insert(
            family,
            SourceRanges {
                allowed,
                allow_node,
                allow_pods,
            },
        );
    }
    found
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

/// `Local` (as the API server spells it) or anything else, which is `Cluster`.
fn policy(local: bool) -> Endpoints {
    if local {
        Endpoints::Local
    } else {
        Endpoints::All
    }
}

/// A Service is headless when its clusterIP (or any of clusterIPs) is `None`.
fn is_headless(spec: &SpecInfo) -> bool {
    spec.cluster_ip
        .iter()
        .chain(spec.cluster_ips.iter())
        .any(|ip| ip.eq_ignore_ascii_case("None"))
}

/// The Service's addresses by family; `None` when it has no usable ClusterIP (skipped
/// whole). A family is served only when the Service has a ClusterIP of it (kube-proxy's
/// proxier of a family skips a Service without one): an externalIP or LoadBalancer IP of
/// another family is reported and left out.
fn addresses(spec: &SpecInfo, kind: &str, report: &mut Reporter) -> Option<Addresses> {
    let cluster_ip_texts = cluster_ips(spec);
    if cluster_ip_texts.is_empty() {
        // The API server always allocates one; a manifest may lack it.
        report.warn(
            "has no clusterIP (the API server allocates one; a manifest must give it); skipped"
                .into(),
        );
        return None;
    }
    let cluster_ips = cluster_ips_by_family(spec, &cluster_ip_texts, report);
    if cluster_ips.is_empty() {
        return None;
    }
    let served = |ip: IpAddr| cluster_ips.iter().any(|(f, _)| *f == Family::of(ip));
    let mut external = Vec::new();
    let mut add = |ip: IpAddr, kind: FrontendKind, what: &str, report: &mut Reporter| {
        if served(ip) {
            external.push((ip, kind));
        } else {
            let family = Family::of(ip);
            report.info(format!(
                "{what} {ip} is {family} and the Service has no {family} ClusterIP; not \
                 served (kube-proxy serves a family only for a Service with a ClusterIP of it)"
            ));
        }
    };
    for text in &spec.external_ips {
        if let Some(ip) = service_address(text, "externalIP", report) {
            add(ip, FrontendKind::ExternalIp, "externalIP", report);
        }
    }
    if kind == "LoadBalancer" {
        for entry in &spec.ingress {
            // ipMode Proxy: the load balancer proxies to the nodes itself; its address must
            // not be short-circuited (kube-proxy leaves it alone too).
            if entry.proxied {
                continue;
            }
            if let Some(text) = &entry.ip
                && let Some(ip) = service_address(text, "load-balancer IP", report)
            {
                add(ip, FrontendKind::LoadBalancer, "load-balancer IP", report);
            }
        }
    }
    external.sort();
    external.dedup_by_key(|(ip, _)| *ip);
    let families = cluster_ips
        .into_iter()
        .map(|(family, cluster_ip)| FamilyAddresses {
            family,
            cluster_ip,
            external: external
                .iter()
                .filter(|(ip, _)| Family::of(*ip) == family)
                .copied()
                .collect(),
        })
        .collect();
    Some(Addresses {
        families,
        node_ports: kind == "NodePort" || kind == "LoadBalancer",
    })
}

/// Each family's ClusterIP as kube-proxy's `GetClusterIPByFamily` picks it: `clusterIPs[i]`
/// for the family `ipFamilies[i]`. An object without `ipFamilies` (a hand-written manifest,
/// an object from before dual-stack) has the first address of each family. `ipFamilyPolicy`
/// does not change what is served (kube-proxy serves what `clusterIPs` holds); a
/// `RequireDualStack` Service with one family's ClusterIP is served in that family and
/// reported. IPv4 first.
fn cluster_ips_by_family(
    spec: &SpecInfo,
    texts: &[&str],
    report: &mut Reporter,
) -> Vec<(Family, IpAddr)> {
    let declared = &spec.ip_families;
    let mut found: Vec<(Family, IpAddr)> = Vec::new();
    let has = |found: &[(Family, IpAddr)], family| found.iter().any(|(f, _)| *f == family);
    if declared.is_empty() {
        for text in texts {
            let Some(ip) = service_address(text, "ClusterIP", report) else {
                continue;
            };
            let family = Family::of(ip);
            if has(&found, family) {
                report.warn(format!(
                    "ClusterIP {ip} is a second {family} ClusterIP (a Service has at most \
                     one per family); skipped"
                ));
            } else {
                found.push((family, ip));
            }
        }
    } else {
        for (index, name) in declared.iter().enumerate() {
            let Some(family) = Family::from_kubernetes(name) else {
                report.warn(format!(
                    "ipFamilies entry {name:?} is not IPv4 or IPv6; ignored"
                ));
                continue;
            };
            if has(&found, family) {
                report.warn(format!(
                    "ipFamilies lists {family} twice; the second ignored"
                ));
                continue;
            }
            let Some(text) = texts.get(index) else {
                report.warn(format!(
                    "ipFamilies lists {family} but clusterIPs has no address for it; {family} \
                     is not served"
                ));
                continue;
            };
            let Some(ip) = service_address(text, "ClusterIP", report) else {
                continue;
            };
            if Family::of(ip) != family {
                report.warn(format!(
                    "ClusterIP {ip} is not {family}, as ipFamilies says it is; skipped"
                ));
                continue;
            }
            found.push((family, ip));
        }
        for text in texts.iter().skip(declared.len()) {
            report.warn(format!(
                "ClusterIP {text} has no ipFamilies entry (kube-proxy picks ClusterIPs by \
                 ipFamilies); skipped"
            ));
        }
    }
    if spec.require_dual_stack
        && let [(family, _)] = found.as_slice()
    {
        report.warn(format!(
            "ipFamilyPolicy is RequireDualStack but the Service has only an {family} \
             ClusterIP; served in {family} only"
        ));
    }
    found.sort();
    found
}

/// A ClusterIP, externalIP or load-balancer IP of either family.
fn service_address(text: &str, what: &str, report: &mut Reporter) -> Option<IpAddr> {
    match text.parse::<IpAddr>() {
        // In the maps 0.0.0.0 (::) is every NodePort address: as a service's own address it
        // would turn its port into a NodePort (found by the `model` fuzz target).
        Ok(ip) if ip.is_unspecified() => {
            report.warn(format!(
                "{what} {ip} is not a usable address ({ip} stands for the NodePorts); skipped"
            ));
            None
        }
        // The socket programs take an IPv4-mapped address for the IPv4 one (the API server
        // refuses such addresses too).
        Ok(IpAddr::V6(ip)) if ip.to_ipv4_mapped().is_some() => {
            report.warn(format!(
                "{what} {ip} is an IPv4-mapped IPv6 address, not a service address; skipped"
            ));
            None
        }
        Ok(ip) => Some(ip),
        Err(_) => {
            report.warn(format!("{what} {text:?} is not an IP address; skipped"));
            None
        }
    }
}

/// `spec.clusterIPs`, or `spec.clusterIP` for objects written before dual-stack.
fn cluster_ips(spec: &SpecInfo) -> Vec<&str> {
    match (&spec.cluster_ips, spec.cluster_ip.as_deref()) {
        (ips, _) if !ips.is_empty() => ips.iter().map(AsRef::as_ref).collect(),
        (_, Some(ip)) if !ip.is_empty() => vec![ip],
        _ => Vec::new(),
    }
}

fn label(port: &PortInfo) -> &str {
    port.name
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or("(unnamed)")
}

/// The protocol and port number of a service port, or why it is skipped.
fn port_of(port: &PortInfo) -> Result<(Protocol, u16), (Severity, String)> {
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
fn affinity_timeout(spec: &SpecInfo) -> (Option<u32>, Option<String>) {
    if !spec.client_ip_affinity {
        return (None, None);
    }
    match spec.affinity_timeout_seconds {
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
