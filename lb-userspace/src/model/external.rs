//! North-south desired state: which addresses outside traffic reaches a service at (NodePorts
//! on this node's addresses, `spec.externalIPs`, `status.loadBalancer.ingress[].ip`), which
//! backends it may use under `externalTrafficPolicy`, and the health-check node ports of
//! `Local` services. Computed beside [`super::build`] from the same objects; like it, a pure
//! function.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use k8s_openapi::api::core::v1::Service;
use serde::Serialize;

use super::{
    Backend, Diagnostic, ObjectKey, Objects, Protocol, ProxyIdentity, ServicePortName, Severity,
    affinity_timeout, endpoints, is_ours, node_view, port_of, warner,
};

/// Where outside traffic arrives: a NodePort (on every node address) or an external address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ExternalFrontend {
    /// `None` for a NodePort: every address of the node's NodePort interfaces.
    pub ip: Option<Ipv4Addr>,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for ExternalFrontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            Some(ip) => write!(f, "{ip}:{}/{}", self.port, self.protocol),
            None => write!(f, "<node>:{}/{}", self.port, self.protocol),
        }
    }
}

/// One external frontend and where it leads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DesiredExternal {
    pub name: ServicePortName,
    /// Backends and whether each runs on this node.
    pub backends: BTreeMap<Backend, bool>,
    /// `externalTrafficPolicy: Local`: only local backends (all of `backends`), client
    /// address kept, dropped when there are none.
    pub local_only: bool,
    /// `Some(seconds)` for `sessionAffinity: ClientIP`.
    pub affinity_timeout_secs: Option<u32>,
}

/// A `healthCheckNodePort` of an `externalTrafficPolicy: Local` service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// Ready endpoints of the service on this node (kube-proxy's `localEndpoints`).
    pub local_endpoints: usize,
}

/// The whole north-south desired state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ExternalState {
    pub frontends: BTreeMap<ExternalFrontend, DesiredExternal>,
    /// By health-check port.
    pub health_checks: BTreeMap<u16, HealthCheck>,
}

/// Computes the north-south state from a snapshot of objects.
pub fn build(objects: &Objects, identity: &ProxyIdentity) -> (ExternalState, Vec<Diagnostic>) {
    let mut state = ExternalState::default();
    let mut diagnostics = Vec::new();
    let node = node_view(objects, identity);
    let slices = endpoints::SliceIndex::new(&objects.endpoint_slices);
    for (key, service) in &objects.services {
        if is_ours(service, identity) {
            add_service(key, service, &slices, &node, &mut state, &mut diagnostics);
        }
    }
    (state, diagnostics)
}

fn add_service(
    key: &ObjectKey,
    service: &Service,
    slices: &endpoints::SliceIndex<'_>,
    node: &endpoints::NodeView,
    state: &mut ExternalState,
    diagnostics: &mut Vec<Diagnostic>,
) {
    let mut warn = warner(key, diagnostics);
    let Some(spec) = &service.spec else {
        return;
    };
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    if kind == "ExternalName" {
        return;
    }
    let headless = spec.cluster_ip.as_deref() == Some("None")
        || spec
            .cluster_ips
            .iter()
            .flatten()
            .any(|ip| ip.eq_ignore_ascii_case("None"));
    if headless {
        return;
    }
    let node_ports = kind == "NodePort" || kind == "LoadBalancer";
    let mut addresses: Vec<Ipv4Addr> = Vec::new();
    for text in spec.external_ips.iter().flatten() {
        match text.parse::<Ipv4Addr>() {
            Ok(ip) => addresses.push(ip),
            Err(_) => warn(
                Severity::Info,
                format!("externalIP {text:?} is not an IPv4 address; not served"),
            ),
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
            if let Some(text) = &entry.ip {
                match text.parse::<Ipv4Addr>() {
                    Ok(ip) => addresses.push(ip),
                    Err(_) => warn(
                        Severity::Info,
                        format!("load-balancer IP {text:?} is not IPv4; not served"),
                    ),
                }
            }
        }
    }
    addresses.sort();
    addresses.dedup();
    if !node_ports && addresses.is_empty() {
        return;
    }
    // kube-proxy applies externalTrafficPolicy only to NodePort and LoadBalancer services.
    let local_only = node_ports && spec.external_traffic_policy.as_deref() == Some("Local");
    let (affinity, _) = affinity_timeout(service);
    let all_ready = spec.publish_not_ready_addresses.unwrap_or(false);
    let mut endpoint_diagnostics = Vec::new();
    let mut local_ready = 0usize;
    for port in spec.ports.iter().flatten() {
        let Ok((protocol, number)) = port_of(port) else {
            continue; // reported by the ClusterIP model
        };
        let port_name = port.name.clone().unwrap_or_default();
        let collected = endpoints::collect(
            key,
            &port_name,
            protocol,
            all_ready,
            slices,
            &mut endpoint_diagnostics,
        );
        let is_local = |backend: &Backend| {
            collected
                .get(backend)
                .and_then(|ep| ep.node_name.as_deref())
                == Some(node.node_name.as_str())
        };
        local_ready = local_ready.max(
            collected
                .iter()
                .filter(|(b, ep)| ep.ready && is_local(b))
                .count(),
        );
        let categorized = endpoints::categorize(&collected, node);
        let chosen: BTreeSet<Backend> = if local_only {
            categorized.local
        } else {
            categorized.cluster
        };
        let backends: BTreeMap<Backend, bool> =
            chosen.into_iter().map(|b| (b, is_local(&b))).collect();
        let desired = DesiredExternal {
            name: ServicePortName {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                port: port_name,
            },
            backends,
            local_only,
            affinity_timeout_secs: affinity,
        };
        let mut frontends = Vec::new();
        if node_ports {
            match port.node_port.map(u16::try_from) {
                Some(Ok(node_port)) if node_port != 0 => frontends.push(ExternalFrontend {
                    ip: None,
                    port: node_port,
                    protocol,
                }),
                Some(_) => warn(
                    Severity::Warning,
                    format!("nodePort {:?} is not a valid port", port.node_port),
                ),
                // allocateLoadBalancerNodePorts: false, or not allocated yet.
                None => {}
            }
        }
        for ip in &addresses {
            frontends.push(ExternalFrontend {
                ip: Some(*ip),
                port: number,
                protocol,
            });
        }
        for frontend in frontends {
            if let Some(taken) = state.frontends.get(&frontend) {
                warn(
                    Severity::Warning,
                    format!(
                        "{frontend} is already served by {}; skipped here",
                        taken.name
                    ),
                );
                continue;
            }
            state.frontends.insert(frontend, desired.clone());
        }
    }
    if local_only
        && let Some(port) = spec
            .health_check_node_port
            .and_then(|p| u16::try_from(p).ok())
        && port != 0
    {
        state.health_checks.insert(
            port,
            HealthCheck {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                local_endpoints: local_ready,
            },
        );
    }
    endpoint_diagnostics.sort();
    endpoint_diagnostics.dedup();
    drop(warn);
    diagnostics.extend(endpoint_diagnostics);
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceStatus};

    use super::*;
    use crate::model::tests::{EndpointExt as _, ep, identity, objects, service, slice};

    const PORTS: &[(&str, i32, &str)] = &[("http", 80, "TCP"), ("dns", 53, "UDP")];

    /// A NodePort service `web` (nodePorts 30080/TCP and 30053/UDP) with `edit` applied.
    fn web(edit: impl FnOnce(&mut ServiceSpec)) -> Service {
        let mut svc = service("default", "web", "10.96.0.10", PORTS);
        let spec = svc.spec.as_mut().unwrap();
        spec.type_ = Some("NodePort".into());
        spec.external_traffic_policy = Some("Cluster".into());
        for port in spec.ports.iter_mut().flatten() {
            port.node_port = Some(if port.port == 80 { 30080 } else { 30053 });
        }
        edit(spec);
        svc
    }

    use k8s_openapi::api::core::v1::ServiceSpec;

    fn endpoints() -> Vec<k8s_openapi::api::discovery::v1::Endpoint> {
        vec![
            ep("10.244.0.10").on_node("node-a"),
            ep("10.244.1.10").on_node("node-b"),
        ]
    }

    fn web_slice(
        endpoints: Vec<k8s_openapi::api::discovery::v1::Endpoint>,
    ) -> k8s_openapi::api::discovery::v1::EndpointSlice {
        slice(
            "default",
            "web-1",
            "web",
            &[("http", 8080, "TCP"), ("dns", 5353, "UDP")],
            endpoints,
        )
    }

    fn fe(ip: Option<&str>, port: u16, protocol: Protocol) -> ExternalFrontend {
        ExternalFrontend {
            ip: ip.map(|ip| ip.parse().unwrap()),
            port,
            protocol,
        }
    }

    fn backend(ip: &str, port: u16) -> Backend {
        Backend {
            ip: ip.parse().unwrap(),
            port,
        }
    }

    #[test]
    fn node_ports_of_a_cluster_policy_service_use_every_endpoint_with_its_locality() {
        let (state, diagnostics) = build(
            &objects(vec![web(|_| {})], vec![web_slice(endpoints())]),
            &identity(),
        );
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
        assert_eq!(state.frontends.len(), 2);
        let http = &state.frontends[&fe(None, 30080, Protocol::Tcp)];
        assert!(!http.local_only);
        assert_eq!(
            http.backends,
            BTreeMap::from([
                (backend("10.244.0.10", 8080), true),
                (backend("10.244.1.10", 8080), false)
            ])
        );
        let dns = &state.frontends[&fe(None, 30053, Protocol::Udp)];
        assert_eq!(dns.backends.len(), 2);
        assert!(state.health_checks.is_empty());
    }

    #[test]
    fn local_policy_uses_local_endpoints_and_serves_a_health_check() {
        let svc = web(|spec| {
            spec.external_traffic_policy = Some("Local".into());
            spec.health_check_node_port = Some(32100);
        });
        let (state, _) = build(
            &objects(vec![svc.clone()], vec![web_slice(endpoints())]),
            &identity(),
        );
        let http = &state.frontends[&fe(None, 30080, Protocol::Tcp)];
        assert!(http.local_only);
        assert_eq!(
            http.backends,
            BTreeMap::from([(backend("10.244.0.10", 8080), true)])
        );
        assert_eq!(
            state.health_checks[&32100],
            HealthCheck {
                namespace: "default".into(),
                name: "web".into(),
                local_endpoints: 1
            }
        );

        // Only a terminating local endpoint left: still served, but health says 0.
        let terminating = vec![
            ep("10.244.0.10")
                .on_node("node-a")
                .conditions(Some(false), Some(true), Some(true)),
            ep("10.244.1.10").on_node("node-b"),
        ];
        let (state, _) = build(
            &objects(vec![svc.clone()], vec![web_slice(terminating)]),
            &identity(),
        );
        let http = &state.frontends[&fe(None, 30080, Protocol::Tcp)];
        assert_eq!(http.backends.len(), 1);
        assert_eq!(state.health_checks[&32100].local_endpoints, 0);

        // No local endpoint: no backend (the data path drops), health 0.
        let (state, _) = build(
            &objects(
                vec![svc],
                vec![web_slice(vec![ep("10.244.1.10").on_node("node-b")])],
            ),
            &identity(),
        );
        assert!(
            state.frontends[&fe(None, 30080, Protocol::Tcp)]
                .backends
                .is_empty()
        );
        assert_eq!(state.health_checks[&32100].local_endpoints, 0);
    }

    #[test]
    fn external_ips_and_load_balancer_ips_answer_at_the_service_port() {
        let mut svc = web(|spec| {
            spec.type_ = Some("LoadBalancer".into());
            spec.external_ips = Some(vec!["198.51.100.10".into(), "2001:db8::1".into()]);
        });
        svc.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![
                    LoadBalancerIngress {
                        ip: Some("198.51.100.20".into()),
                        ..Default::default()
                    },
                    LoadBalancerIngress {
                        ip: Some("198.51.100.30".into()),
                        ip_mode: Some("Proxy".into()),
                        ..Default::default()
                    },
                ]),
            }),
            ..Default::default()
        });
        let (state, diagnostics) = build(
            &objects(vec![svc], vec![web_slice(endpoints())]),
            &identity(),
        );
        let keys: BTreeSet<ExternalFrontend> = state.frontends.keys().copied().collect();
        assert_eq!(
            keys,
            BTreeSet::from([
                fe(None, 30080, Protocol::Tcp),
                fe(None, 30053, Protocol::Udp),
                fe(Some("198.51.100.10"), 80, Protocol::Tcp),
                fe(Some("198.51.100.10"), 53, Protocol::Udp),
                fe(Some("198.51.100.20"), 80, Protocol::Tcp),
                fe(Some("198.51.100.20"), 53, Protocol::Udp),
            ]),
            "ipMode Proxy is left to the load balancer"
        );
        assert_eq!(
            diagnostics.len(),
            1,
            "the IPv6 externalIP is reported: {diagnostics:?}"
        );
    }

    #[test]
    fn cluster_ip_services_have_external_ips_only_and_no_traffic_policy() {
        let mut plain = service("default", "web", "10.96.0.10", PORTS);
        let (state, _) = build(
            &objects(vec![plain.clone()], vec![web_slice(endpoints())]),
            &identity(),
        );
        assert!(state.frontends.is_empty());
        let spec = plain.spec.as_mut().unwrap();
        spec.external_ips = Some(vec!["198.51.100.10".into()]);
        spec.external_traffic_policy = Some("Local".into());
        let (state, _) = build(
            &objects(vec![plain], vec![web_slice(endpoints())]),
            &identity(),
        );
        assert_eq!(state.frontends.len(), 2);
        let http = &state.frontends[&fe(Some("198.51.100.10"), 80, Protocol::Tcp)];
        assert!(
            !http.local_only,
            "eTP applies to NodePort and LoadBalancer services only"
        );
        assert_eq!(http.backends.len(), 2);
    }

    #[test]
    fn load_balancers_without_node_ports_and_headless_services_get_none() {
        let no_node_ports = web(|spec| {
            spec.type_ = Some("LoadBalancer".into());
            spec.allocate_load_balancer_node_ports = Some(false);
            for port in spec.ports.iter_mut().flatten() {
                port.node_port = None;
            }
        });
        let (state, _) = build(&objects(vec![no_node_ports], vec![]), &identity());
        assert!(state.frontends.is_empty());
        let headless = web(|spec| {
            spec.cluster_ip = Some("None".into());
            spec.cluster_ips = Some(vec!["None".into()]);
        });
        let (state, _) = build(&objects(vec![headless], vec![]), &identity());
        assert!(state.frontends.is_empty());
    }
}
