//! A Service as the model keeps it: the fields kube-proxy's rules read, converted once when a
//! source takes the object in. A k8s-openapi `Service` as the API server returns it is a few
//! kilobytes (metadata, managed fields, selector, annotations, every optional field of every
//! port); this keeps the labels that decide whether it is ours, its type, addresses, ports,
//! policies, affinity, source ranges and load-balancer ingress. Values stay as written (the
//! model reports the unusable ones, naming the Service); fields the rules only compare with
//! one value are kept as that comparison.
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};

use super::{HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL};

/// What the model reads of one Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    /// It carries the `service.kubernetes.io/headless` label.
    pub headless_label: bool,
    /// Its `service.kubernetes.io/service-proxy-name` label.
    pub proxy_name: Option<Box<str>>,
    /// `None` for an object without a spec (a manifest may lack one).
    pub spec: Option<SpecInfo>,
}

/// What the model reads of a Service's spec and status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecInfo {
    /// `type` as written; `None` means ClusterIP.
    pub type_: Option<Box<str>>,
    /// It has a `selector` (the manifest source mirrors v1 Endpoints only without one).
    pub has_selector: bool,
    pub cluster_ip: Option<Box<str>>,
    pub cluster_ips: Box<[Box<str>]>,
    pub ip_families: Box<[Box<str>]>,
    /// `ipFamilyPolicy: RequireDualStack`.
    pub require_dual_stack: bool,
    pub external_ips: Box<[Box<str>]>,
    pub ports: Box<[PortInfo]>,
    pub publish_not_ready_addresses: bool,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local`.
    pub external_local: bool,
    pub health_check_node_port: Option<i32>,
    pub load_balancer_source_ranges: Box<[Box<str>]>,
    /// `sessionAffinity: ClientIP`.
    pub client_ip_affinity: bool,
    /// `sessionAffinityConfig.clientIP.timeoutSeconds`.
    pub affinity_timeout_seconds: Option<i32>,
    /// `status.loadBalancer.ingress`.
    pub ingress: Box<[IngressInfo]>,
}

/// One port of a Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortInfo {
    pub name: Option<Box<str>>,
    /// `None` means TCP.
    pub protocol: Option<Box<str>>,
    pub port: i32,
    pub node_port: Option<i32>,
}

/// One `status.loadBalancer.ingress` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngressInfo {
    pub ip: Option<Box<str>>,
    /// `ipMode: Proxy`: the load balancer proxies to the nodes itself.
    pub proxied: bool,
}

impl From<&Service> for ServiceInfo {
    fn from(service: &Service) -> Self {
        let labels = service.metadata.labels.as_ref();
        let label = |name: &str| labels.and_then(|l| l.get(name));
        Self {
            headless_label: label(HEADLESS_LABEL).is_some(),
            proxy_name: label(SERVICE_PROXY_NAME_LABEL).map(|v| text(v)),
            spec: service.spec.as_ref().map(|spec| spec_info(service, spec)),
        }
    }
}

impl From<Service> for ServiceInfo {
    fn from(service: Service) -> Self {
        Self::from(&service)
    }
}

fn spec_info(service: &Service, spec: &ServiceSpec) -> SpecInfo {
    let ingress = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    SpecInfo {
        type_: spec.type_.as_deref().map(text),
        has_selector: spec.selector.is_some(),
        cluster_ip: spec.cluster_ip.as_deref().map(text),
        cluster_ips: texts(spec.cluster_ips.as_ref()),
        ip_families: texts(spec.ip_families.as_ref()),
        require_dual_stack: spec.ip_family_policy.as_deref() == Some("RequireDualStack"),
        external_ips: texts(spec.external_ips.as_ref()),
        ports: spec.ports.iter().flatten().map(port_info).collect(),
        publish_not_ready_addresses: spec.publish_not_ready_addresses.unwrap_or(false),
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        health_check_node_port: spec.health_check_node_port,
        load_balancer_source_ranges: texts(spec.load_balancer_source_ranges.as_ref()),
        client_ip_affinity: spec.session_affinity.as_deref() == Some("ClientIP"),
        affinity_timeout_seconds: spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds),
        ingress: ingress
            .into_iter()
            .flatten()
            .map(|entry| IngressInfo {
                ip: entry.ip.as_deref().map(text),
                proxied: entry.ip_mode.as_deref() == Some("Proxy"),
            })
            .collect(),
    }
}

fn port_info(port: &ServicePort) -> PortInfo {
    PortInfo {
        name: port.name.as_deref().map(text),
        protocol: port.protocol.as_deref().map(text),
        port: port.port,
        node_port: port.node_port,
    }
}

fn text(value: &str) -> Box<str> {
    Box::from(value)
}

fn texts(values: Option<&Vec<String>>) -> Box<[Box<str>]> {
    values.into_iter().flatten().map(|v| text(v)).collect()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{
            ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, ServiceStatus,
            SessionAffinityConfig,
        },
        apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
    };

    use super::*;

    /// A dual-stack LoadBalancer Service with every field the rules read, as the API server
    /// returns it.
    fn load_balancer() -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("shop".into()),
                resource_version: Some("4711".into()),
                labels: Some([(SERVICE_PROXY_NAME_LABEL.into(), "edge".into())].into()),
                annotations: Some([("team".into(), "blue".into())].into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("LoadBalancer".into()),
                selector: Some([("app".into(), "web".into())].into()),
                cluster_ip: Some("10.96.0.10".into()),
                cluster_ips: Some(vec!["10.96.0.10".into(), "fd00::10".into()]),
                ip_families: Some(vec!["IPv4".into(), "IPv6".into()]),
                ip_family_policy: Some("RequireDualStack".into()),
                external_ips: Some(vec!["192.0.2.7".into()]),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    protocol: Some("TCP".into()),
                    port: 80,
                    target_port: Some(IntOrString::String("http".into())),
                    node_port: Some(30080),
                    ..Default::default()
                }]),
                publish_not_ready_addresses: Some(true),
                internal_traffic_policy: Some("Cluster".into()),
                external_traffic_policy: Some("Local".into()),
                health_check_node_port: Some(32000),
                load_balancer_source_ranges: Some(vec!["198.51.100.0/24".into()]),
                session_affinity: Some("ClientIP".into()),
                session_affinity_config: Some(SessionAffinityConfig {
                    client_ip: Some(ClientIPConfig {
                        timeout_seconds: Some(60),
                    }),
                }),
                ..Default::default()
            }),
            status: Some(ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(vec![
                        LoadBalancerIngress {
                            ip: Some("203.0.113.5".into()),
                            ..Default::default()
                        },
                        LoadBalancerIngress {
                            ip: Some("203.0.113.6".into()),
                            ip_mode: Some("Proxy".into()),
                            ..Default::default()
                        },
                    ]),
                }),
                ..Default::default()
            }),
        }
    }

    fn texts(values: &[&str]) -> Box<[Box<str>]> {
        values.iter().map(|v| Box::from(*v)).collect()
    }

    #[test]
    fn a_service_keeps_every_field_the_rules_read() {
        let info = ServiceInfo::from(load_balancer());
        let expected = ServiceInfo {
            headless_label: false,
            proxy_name: Some("edge".into()),
            spec: Some(SpecInfo {
                type_: Some("LoadBalancer".into()),
                has_selector: true,
                cluster_ip: Some("10.96.0.10".into()),
                cluster_ips: texts(&["10.96.0.10", "fd00::10"]),
                ip_families: texts(&["IPv4", "IPv6"]),
                require_dual_stack: true,
                external_ips: texts(&["192.0.2.7"]),
                ports: Box::new([PortInfo {
                    name: Some("http".into()),
                    protocol: Some("TCP".into()),
                    port: 80,
                    node_port: Some(30080),
                }]),
                publish_not_ready_addresses: true,
                internal_local: false,
                external_local: true,
                health_check_node_port: Some(32000),
                load_balancer_source_ranges: texts(&["198.51.100.0/24"]),
                client_ip_affinity: true,
                affinity_timeout_seconds: Some(60),
                ingress: Box::new([
                    IngressInfo {
                        ip: Some("203.0.113.5".into()),
                        proxied: false,
                    },
                    IngressInfo {
                        ip: Some("203.0.113.6".into()),
                        proxied: true,
                    },
                ]),
            }),
        };
        assert_eq!(info, expected);
    }

    #[test]
    fn fields_no_rule_reads_leave_it_equal() {
        // The manifest source publishes a Service only when what the model reads changed.
        let mut other = load_balancer();
        other.metadata.resource_version = Some("4712".into());
        other.metadata.annotations = None;
        let spec = other.spec.as_mut().unwrap();
        spec.selector = Some([("app".into(), "web-v2".into())].into());
        spec.ports.as_mut().unwrap()[0].target_port = Some(IntOrString::Int(8080));
        assert_eq!(ServiceInfo::from(other), ServiceInfo::from(load_balancer()));

        let mut headless = load_balancer();
        headless
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(HEADLESS_LABEL.into(), String::new());
        let headless = ServiceInfo::from(headless);
        assert!(headless.headless_label, "an empty label value still counts");
        assert_ne!(headless, ServiceInfo::from(load_balancer()));
    }

    #[test]
    fn absent_fields_are_empty_and_policies_default_to_cluster() {
        let info = ServiceInfo::from(Service {
            spec: Some(ServiceSpec {
                internal_traffic_policy: Some("local".into()),
                ..Default::default()
            }),
            ..Default::default()
        });
        let spec = info.spec.expect("spec");
        assert!(spec.cluster_ips.is_empty() && spec.ports.is_empty() && spec.ingress.is_empty());
        assert!(!spec.has_selector);
        assert!(
            !spec.internal_local,
            "the API server spells it Local; anything else is Cluster, as in kube-proxy"
        );
        assert_eq!(ServiceInfo::from(Service::default()).spec, None);
    }
}
