//! Object events from fuzz bytes: Services, EndpointSlices and Nodes whose fields are drawn
//! mostly from small sets of meaningful values (so that objects meet: a slice names a service
//! that exists, two services claim one address) and now and then arbitrary text or numbers.
use std::{collections::BTreeMap, sync::Arc};

use arbitrary::{Arbitrary as _, Result, Unstructured};
use k8s_openapi::{
    api::{
        core::v1::{
            ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, Node, NodeAddress, NodeSpec,
            NodeStatus, Service, ServicePort, ServiceSpec, ServiceStatus, SessionAffinityConfig,
            Taint,
        },
        discovery::v1::{
            Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForNode,
            ForZone,
        },
    },
    apimachinery::pkg::{
        apis::meta::v1::{ObjectMeta, Time},
        util::intstr::IntOrString,
    },
};

use super::shared;
use crate::model::{
    HEADLESS_LABEL, NodeInfo, ObjectKey, Objects, SERVICE_PROXY_NAME_LABEL, ServiceInfo, Slice,
    TO_BE_DELETED_TAINT, ZONE_LABEL, endpoints::SERVICE_NAME_LABEL,
};

/// The node the model runs as.
pub const THIS_NODE: &str = "node-a";

const NAMESPACES: &[&str] = &["default", "other"];
const NAMES: &[&str] = &["web", "dns", "db"];
const NODES: &[&str] = &[THIS_NODE, "node-b"];
const ZONES: &[&str] = &["zone-a", "zone-b"];
const IPS: &[&str] = &[
    "10.96.0.1",
    "10.96.0.2",
    "10.244.1.5",
    "10.244.2.7",
    "192.168.1.10",
    "0.0.0.0",
    "255.255.255.255",
    "None",
    "",
    "fd00::1",
    "10.96.0.300",
];
const CIDRS: &[&str] = &[
    "10.244.1.0/24",
    "0.0.0.0/0",
    "192.168.1.10/32",
    "fd00::/64",
    " 10.0.0.0/8 ",
    "bad",
];
const PROTOCOLS: &[&str] = &["TCP", "UDP", "SCTP", "tcp"];
const PORT_NAMES: &[&str] = &["", "http", "dns"];
const TYPES: &[&str] = &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"];
const POLICIES: &[&str] = &["Cluster", "Local"];
const ADDRESS_TYPES: &[&str] = &["IPv4", "IPv6", "FQDN"];
const PORTS: &[i32] = &[80, 53, 8080, 30080, 30081, 0, 65535, 65536, -1];

/// One change to the objects.
#[derive(Debug)]
pub enum Event {
    Service(ObjectKey, Option<Arc<Service>>),
    Slice(ObjectKey, Option<Arc<EndpointSlice>>),
    Node(String, Option<Arc<Node>>),
}

impl Event {
    pub fn generate(u: &mut Unstructured<'_>) -> Result<Self> {
        let delete = u.ratio(1, 5)?;
        Ok(match u.int_in_range(0..=4)? {
            0 | 1 => {
                let key = key(u)?;
                let service = if delete {
                    None
                } else {
                    Some(shared(service(u, &key)?))
                };
                Event::Service(key, service)
            }
            2 | 3 => {
                let key = ObjectKey::new(
                    pick(u, NAMESPACES)?,
                    format!("{}-{}", pick(u, NAMES)?, u.int_in_range(0..=2)?),
                );
                let slice = if delete {
                    None
                } else {
                    Some(shared(slice(u, &key)?))
                };
                Event::Slice(key, slice)
            }
            _ => {
                let name = pick(u, NODES)?;
                let node = if delete {
                    None
                } else {
                    Some(shared(node(u, &name)?))
                };
                Event::Node(name, node)
            }
        })
    }

    pub fn apply(self, objects: &mut Objects) {
        match self {
            Event::Service(key, Some(s)) => drop(
                objects
                    .services
                    .insert(key, Arc::new(ServiceInfo::from(&*s))),
            ),
            Event::Service(key, None) => drop(objects.services.remove(&key)),
            Event::Slice(key, Some(s)) => drop(
                objects
                    .endpoint_slices
                    .insert(key, Arc::new(Slice::from(&*s))),
            ),
            Event::Slice(key, None) => drop(objects.endpoint_slices.remove(&key)),
            Event::Node(name, Some(n)) => {
                drop(objects.nodes.insert(name, Arc::new(NodeInfo::from(&*n))))
            }
            Event::Node(name, None) => drop(objects.nodes.remove(&name)),
        }
    }
}

/// One of `values`, or (one time in sixteen) arbitrary text.
fn pick(u: &mut Unstructured<'_>, values: &[&str]) -> Result<String> {
    if u.ratio(1, 16)? {
        return String::arbitrary(u);
    }
    Ok((*u.choose(values)?).to_owned())
}

fn maybe<T>(
    u: &mut Unstructured<'_>,
    make: impl FnOnce(&mut Unstructured<'_>) -> Result<T>,
) -> Result<Option<T>> {
    if bool::arbitrary(u)? {
        Ok(Some(make(u)?))
    } else {
        Ok(None)
    }
}

/// Up to `max` values.
fn some<T>(
    u: &mut Unstructured<'_>,
    max: usize,
    mut make: impl FnMut(&mut Unstructured<'_>) -> Result<T>,
) -> Result<Vec<T>> {
    let count = u.int_in_range(0..=max)?;
    (0..count).map(|_| make(u)).collect()
}

fn port(u: &mut Unstructured<'_>) -> Result<i32> {
    if u.ratio(1, 8)? {
        return i32::arbitrary(u);
    }
    Ok(*u.choose(PORTS)?)
}

fn key(u: &mut Unstructured<'_>) -> Result<ObjectKey> {
    Ok(ObjectKey::new(pick(u, NAMESPACES)?, pick(u, NAMES)?))
}

fn meta(key: &ObjectKey) -> ObjectMeta {
    ObjectMeta {
        name: Some(key.name.clone()),
        namespace: Some(key.namespace.clone()),
        ..Default::default()
    }
}

fn service(u: &mut Unstructured<'_>, key: &ObjectKey) -> Result<Service> {
    let mut labels = BTreeMap::new();
    if u.ratio(1, 8)? {
        labels.insert(HEADLESS_LABEL.to_owned(), String::new());
    }
    if u.ratio(1, 6)? {
        labels.insert(
            SERVICE_PROXY_NAME_LABEL.to_owned(),
            pick(u, &["ours", "theirs"])?,
        );
    }
    let ports = some(u, 3, |u| {
        Ok(ServicePort {
            name: maybe(u, |u| pick(u, PORT_NAMES))?,
            port: port(u)?,
            protocol: maybe(u, |u| pick(u, PROTOCOLS))?,
            node_port: maybe(u, port)?,
            target_port: maybe(u, |u| {
                Ok(if bool::arbitrary(u)? {
                    IntOrString::Int(port(u)?)
                } else {
                    IntOrString::String(pick(u, PORT_NAMES)?)
                })
            })?,
            app_protocol: None,
        })
    })?;
    let spec = ServiceSpec {
        type_: maybe(u, |u| pick(u, TYPES))?,
        cluster_ip: maybe(u, |u| pick(u, IPS))?,
        cluster_ips: maybe(u, |u| some(u, 2, |u| pick(u, IPS)))?,
        external_ips: maybe(u, |u| some(u, 2, |u| pick(u, IPS)))?,
        ports: maybe(u, |_| Ok(ports))?,
        selector: maybe(u, |u| {
            Ok([("app".to_owned(), pick(u, NAMES)?)].into_iter().collect())
        })?,
        external_traffic_policy: maybe(u, |u| pick(u, POLICIES))?,
        internal_traffic_policy: maybe(u, |u| pick(u, POLICIES))?,
        health_check_node_port: maybe(u, port)?,
        session_affinity: maybe(u, |u| pick(u, &["ClientIP", "None"]))?,
        session_affinity_config: maybe(u, |u| {
            Ok(SessionAffinityConfig {
                client_ip: Some(ClientIPConfig {
                    timeout_seconds: maybe(u, |u| {
                        Ok(*u.choose(&[0, 1, 60, 10_800, 86_400, 86_401, -5, i32::MAX])?)
                    })?,
                }),
            })
        })?,
        load_balancer_source_ranges: maybe(u, |u| some(u, 3, |u| pick(u, CIDRS)))?,
        load_balancer_class: maybe(u, |u| pick(u, &["", "other"]))?,
        allocate_load_balancer_node_ports: Option::<bool>::arbitrary(u)?,
        publish_not_ready_addresses: Option::<bool>::arbitrary(u)?,
        traffic_distribution: maybe(u, |u| pick(u, &["PreferClose", "PreferSameZone"]))?,
        ip_families: maybe(u, |u| some(u, 2, |u| pick(u, &["IPv4", "IPv6"])))?,
        ..Default::default()
    };
    let status = maybe(u, |u| {
        Ok(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(some(u, 2, |u| {
                    Ok(LoadBalancerIngress {
                        ip: maybe(u, |u| pick(u, IPS))?,
                        ip_mode: maybe(u, |u| pick(u, &["VIP", "Proxy"]))?,
                        ..Default::default()
                    })
                })?),
            }),
            ..Default::default()
        })
    })?;
    let mut metadata = meta(key);
    metadata.labels = (!labels.is_empty()).then_some(labels);
    Ok(Service {
        metadata,
        spec: maybe(u, |_| Ok(spec))?,
        status,
    })
}

fn slice(u: &mut Unstructured<'_>, key: &ObjectKey) -> Result<EndpointSlice> {
    let mut metadata = meta(key);
    if !u.ratio(1, 10)? {
        metadata.labels = Some(
            [(SERVICE_NAME_LABEL.to_owned(), pick(u, NAMES)?)]
                .into_iter()
                .collect(),
        );
    }
    let endpoints = some(u, 4, |u| {
        Ok(Endpoint {
            addresses: some(u, 2, |u| pick(u, IPS))?,
            conditions: maybe(u, |u| {
                Ok(EndpointConditions {
                    ready: Option::<bool>::arbitrary(u)?,
                    serving: Option::<bool>::arbitrary(u)?,
                    terminating: Option::<bool>::arbitrary(u)?,
                })
            })?,
            node_name: maybe(u, |u| pick(u, NODES))?,
            zone: maybe(u, |u| pick(u, ZONES))?,
            hints: maybe(u, |u| {
                Ok(EndpointHints {
                    for_zones: maybe(u, |u| {
                        some(u, 2, |u| {
                            Ok(ForZone {
                                name: pick(u, ZONES)?,
                            })
                        })
                    })?,
                    for_nodes: maybe(u, |u| {
                        some(u, 2, |u| {
                            Ok(ForNode {
                                name: pick(u, NODES)?,
                            })
                        })
                    })?,
                })
            })?,
            ..Default::default()
        })
    })?;
    let ports = maybe(u, |u| {
        some(u, 3, |u| {
            Ok(EndpointPort {
                name: maybe(u, |u| pick(u, PORT_NAMES))?,
                port: maybe(u, port)?,
                protocol: maybe(u, |u| pick(u, PROTOCOLS))?,
                app_protocol: None,
            })
        })
    })?;
    Ok(EndpointSlice {
        metadata,
        address_type: pick(u, ADDRESS_TYPES)?,
        endpoints,
        ports,
    })
}

fn node(u: &mut Unstructured<'_>, name: &str) -> Result<Node> {
    let mut metadata = ObjectMeta {
        name: Some(name.to_owned()),
        ..Default::default()
    };
    if u.ratio(1, 2)? {
        metadata.labels = Some(
            [(ZONE_LABEL.to_owned(), pick(u, ZONES)?)]
                .into_iter()
                .collect(),
        );
    }
    if u.ratio(1, 8)? {
        metadata.deletion_timestamp = Some(Time(Default::default()));
    }
    let spec = NodeSpec {
        pod_cidr: maybe(u, |u| pick(u, CIDRS))?,
        pod_cidrs: maybe(u, |u| some(u, 2, |u| pick(u, CIDRS)))?,
        taints: maybe(u, |u| {
            Ok(vec![Taint {
                key: pick(u, &[TO_BE_DELETED_TAINT, "other"])?,
                effect: "NoSchedule".into(),
                ..Default::default()
            }])
        })?,
        ..Default::default()
    };
    let status = NodeStatus {
        addresses: Some(some(u, 3, |u| {
            Ok(NodeAddress {
                type_: pick(u, &["InternalIP", "ExternalIP", "Hostname"])?,
                address: pick(u, IPS)?,
            })
        })?),
        ..Default::default()
    };
    Ok(Node {
        metadata,
        spec: Some(spec),
        status: Some(status),
    })
}
