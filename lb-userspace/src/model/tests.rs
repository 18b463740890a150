//! One test per kube-proxy rule the model follows (see `kube-proxy-behaviour.md`), on real
//! k8s-openapi objects built the way the API server returns them, plus sequences of changes
//! that must end in exactly the state a fresh build computes.
//!
//! The builders are `pub(crate)` so the reconciler's model-based tests can use them too.
use std::{collections::BTreeSet, net::Ipv4Addr, sync::Arc};

use k8s_openapi::{
    api::{
        core::v1::{
            ClientIPConfig, LoadBalancerStatus, Node, NodeSpec, ObjectReference, Service,
            ServicePort, ServiceSpec, ServiceStatus, SessionAffinityConfig,
        },
        discovery::v1::{
            Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForNode,
            ForZone,
        },
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use super::{
    Backend, DesiredService, DesiredState, Diagnostic, Frontend, ObjectKey, ObjectRef, Objects,
    Protocol, ProxyIdentity, ServicePortName, Severity, build, endpoints::SERVICE_NAME_LABEL,
};
use crate::reconcile::{Reconciler, memory::MemoryMaps};

/// The node this proxy runs on in these tests.
pub(crate) const NODE: &str = "node-a";

pub(crate) fn identity() -> ProxyIdentity {
    ProxyIdentity {
        node_name: NODE.into(),
        service_proxy_name: None,
    }
}

pub(crate) fn meta(namespace: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        resource_version: Some("4711".into()),
        uid: Some(format!("0b6a3f3e-{namespace}-{name}")),
        ..Default::default()
    }
}

/// A ClusterIP service as the API server returns it (defaults filled in). `ports` are
/// `(name, port, protocol)`; a named port targets the container port of the same name.
pub(crate) fn service(
    namespace: &str,
    name: &str,
    cluster_ip: &str,
    ports: &[(&str, i32, &str)],
) -> Service {
    Service {
        metadata: meta(namespace, name),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: Some(cluster_ip.into()),
            cluster_ips: Some(vec![cluster_ip.into()]),
            ip_families: Some(vec!["IPv4".into()]),
            ip_family_policy: Some("SingleStack".into()),
            internal_traffic_policy: Some("Cluster".into()),
            session_affinity: Some("None".into()),
            selector: Some([("app".to_owned(), name.to_owned())].into()),
            ports: Some(ports.iter().map(|p| service_port(*p)).collect()),
            ..Default::default()
        }),
        status: Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus::default()),
            ..Default::default()
        }),
    }
}

fn service_port((name, port, protocol): (&str, i32, &str)) -> ServicePort {
    ServicePort {
        name: (!name.is_empty()).then(|| name.to_owned()),
        port,
        protocol: Some(protocol.into()),
        target_port: Some(if name.is_empty() {
            IntOrString::Int(port)
        } else {
            IntOrString::String(name.into())
        }),
        ..Default::default()
    }
}

/// An IPv4 EndpointSlice of `service` as the endpointslice controller writes it. `ports` are
/// `(name, port, protocol)`.
pub(crate) fn slice(
    namespace: &str,
    name: &str,
    service: &str,
    ports: &[(&str, i32, &str)],
    endpoints: Vec<Endpoint>,
) -> EndpointSlice {
    let mut metadata = meta(namespace, name);
    metadata.generate_name = Some(format!("{service}-"));
    metadata.labels = Some(
        [
            (SERVICE_NAME_LABEL.to_owned(), service.to_owned()),
            (
                "endpointslice.kubernetes.io/managed-by".to_owned(),
                "endpointslice-controller.k8s.io".to_owned(),
            ),
        ]
        .into(),
    );
    EndpointSlice {
        metadata,
        address_type: "IPv4".into(),
        endpoints,
        ports: Some(
            ports
                .iter()
                .map(|(name, port, protocol)| EndpointPort {
                    name: Some((*name).to_owned()),
                    port: Some(*port),
                    protocol: Some((*protocol).to_owned()),
                    app_protocol: None,
                })
                .collect(),
        ),
    }
}

/// A ready endpoint on another node, as the controller writes it.
pub(crate) fn ep(ip: &str) -> Endpoint {
    Endpoint {
        addresses: vec![ip.into()],
        conditions: Some(EndpointConditions {
            ready: Some(true),
            serving: Some(true),
            terminating: Some(false),
        }),
        node_name: Some("node-b".into()),
        target_ref: Some(ObjectReference {
            kind: Some("Pod".into()),
            namespace: Some("default".into()),
            name: Some(format!("pod-{ip}")),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub(crate) trait EndpointExt {
    fn conditions(
        self,
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
    ) -> Self;
    fn on_node(self, node: &str) -> Self;
    fn zones(self, zones: &[&str]) -> Self;
    fn nodes(self, nodes: &[&str]) -> Self;
}

impl EndpointExt for Endpoint {
    fn conditions(
        mut self,
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
    ) -> Self {
        self.conditions = Some(EndpointConditions {
            ready,
            serving,
            terminating,
        });
        self
    }

    fn on_node(mut self, node: &str) -> Self {
        self.node_name = Some(node.into());
        self
    }

    fn zones(mut self, zones: &[&str]) -> Self {
        let hints = self.hints.get_or_insert_with(EndpointHints::default);
        hints.for_zones = Some(
            zones
                .iter()
                .map(|z| ForZone {
                    name: (*z).to_owned(),
                })
                .collect(),
        );
        self
    }

    fn nodes(mut self, nodes: &[&str]) -> Self {
        let hints = self.hints.get_or_insert_with(EndpointHints::default);
        hints.for_nodes = Some(
            nodes
                .iter()
                .map(|n| ForNode {
                    name: (*n).to_owned(),
                })
                .collect(),
        );
        self
    }
}

pub(crate) fn node(name: &str, zone: Option<&str>) -> Node {
    let mut metadata = ObjectMeta {
        name: Some(name.into()),
        ..Default::default()
    };
    let mut labels = std::collections::BTreeMap::from([
        ("kubernetes.io/hostname".to_owned(), name.to_owned()),
        ("kubernetes.io/os".to_owned(), "linux".to_owned()),
    ]);
    if let Some(zone) = zone {
        labels.insert(super::ZONE_LABEL.into(), zone.into());
    }
    metadata.labels = Some(labels);
    Node {
        metadata,
        spec: Some(NodeSpec {
            pod_cidr: Some("10.244.0.0/24".into()),
            ..Default::default()
        }),
        status: None,
    }
}

pub(crate) fn objects(services: Vec<Service>, slices: Vec<EndpointSlice>) -> Objects {
    let mut objects = Objects::default();
    for s in services {
        objects
            .services
            .insert(ObjectKey::of(&s.metadata), Arc::new(s));
    }
    for s in slices {
        objects
            .endpoint_slices
            .insert(ObjectKey::of(&s.metadata), Arc::new(s));
    }
    objects
}

fn spec(service: &mut Service) -> &mut ServiceSpec {
    service.spec.as_mut().expect("built with a spec")
}

fn fe(ip: &str, port: u16, protocol: Protocol) -> Frontend {
    Frontend {
        ip: ip.parse().unwrap(),
        port,
        protocol,
    }
}

fn tcp(ip: &str, port: u16) -> Frontend {
    fe(ip, port, Protocol::Tcp)
}

fn backends(list: &[(&str, u16)]) -> BTreeSet<Backend> {
    list.iter()
        .map(|(ip, port)| Backend {
            ip: ip.parse::<Ipv4Addr>().unwrap(),
            port: *port,
        })
        .collect()
}

fn port_name(namespace: &str, name: &str, port: &str) -> ServicePortName {
    ServicePortName {
        namespace: namespace.into(),
        name: name.into(),
        port: port.into(),
    }
}

/// The backends of `frontend`, failing the test when it is not programmed.
fn backends_of(state: &DesiredState, frontend: Frontend) -> BTreeSet<Backend> {
    state
        .services
        .get(&frontend)
        .unwrap_or_else(|| panic!("{frontend} not programmed; state: {state:#?}"))
        .backends
        .clone()
}

fn service_ref(namespace: &str, name: &str) -> ObjectRef {
    ObjectRef {
        kind: "Service",
        key: ObjectKey::new(namespace, name),
    }
}

fn build_default(objects: &Objects) -> (DesiredState, Vec<Diagnostic>) {
    build(objects, &identity())
}

/// The ClusterIP service `default/web` (10.96.0.10, port `http` 80/TCP).
fn web() -> Service {
    service("default", "web", "10.96.0.10", &[("http", 80, "TCP")])
}

fn web_slice(endpoints: Vec<Endpoint>) -> EndpointSlice {
    slice(
        "default",
        "web-abc12",
        "web",
        &[("http", 8080, "TCP")],
        endpoints,
    )
}

/// The backends of `default/web`'s port 80 for these endpoints.
fn web_backends(objects: &Objects) -> BTreeSet<Backend> {
    let (state, _) = build_default(objects);
    backends_of(&state, tcp("10.96.0.10", 80))
}

// ---------------------------------------------------------------------------------------------
// Which services, which ports

#[test]
fn cluster_ip_service_with_one_slice_programs_frontend_and_backends() {
    let objects = objects(
        vec![web()],
        vec![web_slice(vec![ep("10.244.1.5"), ep("10.244.2.7")])],
    );
    let (state, diagnostics) = build_default(&objects);
    let expected = DesiredState {
        services: [(
            tcp("10.96.0.10", 80),
            DesiredService {
                name: port_name("default", "web", "http"),
                backends: backends(&[("10.244.1.5", 8080), ("10.244.2.7", 8080)]),
                affinity_timeout_secs: None,
                terminating: BTreeSet::new(),
            },
        )]
        .into(),
    };
    assert_eq!(state, expected);
    assert_eq!(diagnostics, vec![]);
}

#[test]
fn pods_reach_external_ips_and_load_balancer_ips_at_the_socket_with_every_endpoint() {
    use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceStatus};
    let mut svc = web();
    spec(&mut svc).external_ips = Some(vec!["198.51.100.10".into()]);
    spec(&mut svc).external_traffic_policy = Some("Local".into());
    svc.status = Some(ServiceStatus {
        load_balancer: Some(LoadBalancerStatus {
            ingress: Some(vec![
                LoadBalancerIngress {
                    ip: Some("203.0.113.7".into()),
                    ..Default::default()
                },
                LoadBalancerIngress {
                    ip: Some("203.0.113.8".into()),
                    ip_mode: Some("Proxy".into()),
                    ..Default::default()
                },
            ]),
        }),
        ..Default::default()
    });
    let mut remote = ep("10.244.2.7");
    remote.node_name = Some("node-b".into());
    let objects = objects(vec![svc], vec![web_slice(vec![ep("10.244.1.5"), remote])]);
    let (state, diagnostics) = build_default(&objects);
    let all = backends(&[("10.244.1.5", 8080), ("10.244.2.7", 8080)]);
    // eTP Local is for traffic from outside; pods get every endpoint, as through KUBE-SVC.
    assert_eq!(backends_of(&state, tcp("198.51.100.10", 80)), all);
    assert_eq!(backends_of(&state, tcp("203.0.113.7", 80)), all);
    // ipMode Proxy: in-cluster traffic must go out to the load balancer.
    assert!(
        !state.services.contains_key(&tcp("203.0.113.8", 80)),
        "{state:?}"
    );
    assert_eq!(diagnostics, vec![]);
}

#[test]
fn unnamed_single_port_matches_the_unnamed_slice_port() {
    // A single-port service may leave the port unnamed; the slice's port then has name "".
    let svc = service("default", "web", "10.96.0.10", &[("", 80, "TCP")]);
    let sl = slice(
        "default",
        "web-1",
        "web",
        &[("", 8080, "TCP")],
        vec![ep("10.244.1.5")],
    );
    let (state, _) = build_default(&objects(vec![svc], vec![sl]));
    assert_eq!(
        backends_of(&state, tcp("10.96.0.10", 80)),
        backends(&[("10.244.1.5", 8080)])
    );
    assert_eq!(
        state.services[&tcp("10.96.0.10", 80)].name.to_string(),
        "default/web"
    );
}

#[test]
fn named_ports_match_by_name_and_protocol_and_resolve_per_pod() {
    let svc = service(
        "default",
        "app",
        "10.96.0.20",
        &[("http", 80, "TCP"), ("metrics", 9090, "TCP")],
    );
    // The named targetPort `http` is 8080 on the old pods and 8081 on the new ones: the
    // controller puts them in two slices with different port numbers.
    let old = slice(
        "default",
        "app-old",
        "app",
        &[("http", 8080, "TCP"), ("metrics", 9100, "TCP")],
        vec![ep("10.244.1.1"), ep("10.244.1.2")],
    );
    let new = slice(
        "default",
        "app-new",
        "app",
        &[("metrics", 9100, "TCP"), ("http", 8081, "TCP")],
        vec![ep("10.244.2.1")],
    );
    // Same name, other protocol: must not be taken for the TCP port `http`.
    let udp = slice(
        "default",
        "app-udp",
        "app",
        &[("http", 7777, "UDP")],
        vec![ep("10.244.3.1")],
    );
    // Other name, same number: not `http` either.
    let other_name = slice(
        "default",
        "app-other",
        "app",
        &[("web", 80, "TCP")],
        vec![ep("10.244.4.1")],
    );
    let (state, diagnostics) = build_default(&objects(vec![svc], vec![old, new, udp, other_name]));
    assert_eq!(
        backends_of(&state, tcp("10.96.0.20", 80)),
        backends(&[
            ("10.244.1.1", 8080),
            ("10.244.1.2", 8080),
            ("10.244.2.1", 8081)
        ])
    );
    assert_eq!(
        backends_of(&state, tcp("10.96.0.20", 9090)),
        backends(&[
            ("10.244.1.1", 9100),
            ("10.244.1.2", 9100),
            ("10.244.2.1", 9100)
        ])
    );
    assert_eq!(state.services.len(), 2);
    assert_eq!(
        state.services[&tcp("10.96.0.20", 9090)].name,
        port_name("default", "app", "metrics")
    );
    assert_eq!(diagnostics, vec![]);
}

#[test]
fn tcp_and_udp_on_the_same_port_are_separate_frontends() {
    let svc = service(
        "kube-system",
        "kube-dns",
        "10.96.0.10",
        &[("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")],
    );
    let sl = slice(
        "kube-system",
        "kube-dns-x7k2p",
        "kube-dns",
        &[("dns-tcp", 5353, "TCP"), ("dns", 53, "UDP")],
        vec![ep("10.244.0.3"), ep("10.244.0.4")],
    );
    let (state, _) = build_default(&objects(vec![svc], vec![sl]));
    assert_eq!(state.services.len(), 2);
    assert_eq!(
        backends_of(&state, fe("10.96.0.10", 53, Protocol::Udp)),
        backends(&[("10.244.0.3", 53), ("10.244.0.4", 53)])
    );
    assert_eq!(
        backends_of(&state, fe("10.96.0.10", 53, Protocol::Tcp)),
        backends(&[("10.244.0.3", 5353), ("10.244.0.4", 5353)])
    );
    assert_eq!(
        state.services[&fe("10.96.0.10", 53, Protocol::Udp)].name,
        port_name("kube-system", "kube-dns", "dns")
    );
}

#[test]
fn sctp_port_is_reported_and_other_ports_programmed() {
    let svc = service(
        "default",
        "web",
        "10.96.0.10",
        &[("sig", 3868, "SCTP"), ("http", 80, "TCP")],
    );
    let (state, diagnostics) = build_default(&objects(vec![svc], vec![]));
    assert_eq!(
        state.services.keys().copied().collect::<Vec<_>>(),
        vec![tcp("10.96.0.10", 80)]
    );
    assert_eq!(diagnostics.len(), 1);
    assert_eq!(diagnostics[0].severity, Severity::Info);
    assert!(diagnostics[0].message.contains("SCTP"), "{diagnostics:?}");
}

// ---------------------------------------------------------------------------------------------
// Which endpoints

#[test]
fn not_ready_endpoints_are_left_out_and_nil_ready_counts_as_ready() {
    let mut no_conditions = ep("10.244.1.4");
    no_conditions.conditions = None;
    let objects = objects(
        vec![web()],
        vec![web_slice(vec![
            ep("10.244.1.1"),
            ep("10.244.1.2").conditions(Some(false), Some(false), Some(false)),
            ep("10.244.1.3").conditions(None, None, None),
            no_conditions,
        ])],
    );
    assert_eq!(
        web_backends(&objects),
        backends(&[
            ("10.244.1.1", 8080),
            ("10.244.1.3", 8080),
            ("10.244.1.4", 8080)
        ])
    );
}

#[test]
fn without_ready_endpoints_serving_terminating_ones_are_used() {
    let terminating = || {
        vec![
            // Serving and terminating: the fallback.
            ep("10.244.1.1").conditions(Some(false), Some(true), Some(true)),
            // Terminating but no longer serving.
            ep("10.244.1.2").conditions(Some(false), Some(false), Some(true)),
            // Not ready, not terminating (starting up).
            ep("10.244.1.3").conditions(Some(false), Some(false), Some(false)),
        ]
    };
    let only_terminating = objects(vec![web()], vec![web_slice(terminating())]);
    assert_eq!(
        web_backends(&only_terminating),
        backends(&[("10.244.1.1", 8080)])
    );

    // As soon as one endpoint is ready, terminating ones get no new connections.
    let mut with_ready = terminating();
    with_ready.push(ep("10.244.1.9"));
    let with_ready = objects(vec![web()], vec![web_slice(with_ready)]);
    assert_eq!(web_backends(&with_ready), backends(&[("10.244.1.9", 8080)]));

    // The fallback backends are marked terminating (for `lb-agent list`); ready ones are not.
    let (state, _) = build_default(&only_terminating);
    assert_eq!(
        state.services[&tcp("10.96.0.10", 80)].terminating,
        backends(&[("10.244.1.1", 8080)])
    );
    let (state, _) = build_default(&with_ready);
    assert!(
        state.services[&tcp("10.96.0.10", 80)]
            .terminating
            .is_empty()
    );
}

#[test]
fn service_without_usable_endpoints_is_programmed_with_no_backends() {
    // No slice at all, and a slice whose endpoints are all unusable: both must refuse, so the
    // frontend is there with an empty backend set (never absent, which would bypass the LB).
    let none = objects(vec![web()], vec![]);
    let unusable = objects(
        vec![web()],
        vec![web_slice(vec![
            ep("10.244.1.1").conditions(Some(false), Some(false), Some(false)),
            ep("10.244.1.2").conditions(Some(false), Some(false), Some(true)),
        ])],
    );
    let empty_slice = objects(vec![web()], vec![web_slice(vec![])]);
    for objects in [none, unusable, empty_slice] {
        let (state, diagnostics) = build_default(&objects);
        assert_eq!(state.services.len(), 1);
        assert_eq!(backends_of(&state, tcp("10.96.0.10", 80)), BTreeSet::new());
        assert_eq!(diagnostics, vec![]);
    }
}

#[test]
fn publish_not_ready_addresses_uses_every_endpoint() {
    let mut svc = web();
    spec(&mut svc).publish_not_ready_addresses = Some(true);
    let objects = objects(
        vec![svc],
        vec![web_slice(vec![
            ep("10.244.1.1"),
            ep("10.244.1.2").conditions(Some(false), Some(false), Some(false)),
            ep("10.244.1.3").conditions(Some(false), Some(true), Some(true)),
        ])],
    );
    assert_eq!(
        web_backends(&objects),
        backends(&[
            ("10.244.1.1", 8080),
            ("10.244.1.2", 8080),
            ("10.244.1.3", 8080)
        ])
    );
}

#[test]
fn slices_are_merged_and_duplicate_addresses_deduplicated() {
    let first = slice(
        "default",
        "web-aaaaa",
        "web",
        &[("http", 8080, "TCP")],
        vec![
            ep("10.244.1.1"),
            ep("10.244.1.2"),
            // Not ready here, ready in the other slice (a pod moving between slices): ready
            // wins.
            ep("10.244.1.3").conditions(Some(false), Some(false), Some(false)),
        ],
    );
    let second = slice(
        "default",
        "web-bbbbb",
        "web",
        &[("http", 8080, "TCP")],
        vec![ep("10.244.1.2"), ep("10.244.1.3"), ep("10.244.1.4")],
    );
    // A hand-made slice (other managed-by) counts too.
    let mut manual = slice(
        "default",
        "web-manual",
        "web",
        &[("http", 8080, "TCP")],
        vec![ep("192.168.10.5")],
    );
    manual.metadata.labels.as_mut().unwrap().insert(
        "endpointslice.kubernetes.io/managed-by".into(),
        "staff".into(),
    );
    let objects = objects(vec![web()], vec![first, second, manual]);
    assert_eq!(
        web_backends(&objects),
        backends(&[
            ("10.244.1.1", 8080),
            ("10.244.1.2", 8080),
            ("10.244.1.3", 8080),
            ("10.244.1.4", 8080),
            ("192.168.10.5", 8080),
        ])
    );
}

#[test]
fn slices_of_other_services_or_namespaces_are_ignored() {
    let ours = web_slice(vec![ep("10.244.1.1")]);
    let other_service = slice(
        "default",
        "api-12345",
        "api",
        &[("http", 8080, "TCP")],
        vec![ep("10.244.9.1")],
    );
    // Same service name, other namespace.
    let other_namespace = slice(
        "staging",
        "web-12345",
        "web",
        &[("http", 8080, "TCP")],
        vec![ep("10.244.9.2")],
    );
    // No service-name label at all.
    let mut unlabelled = slice(
        "default",
        "web-nolabel",
        "web",
        &[("http", 8080, "TCP")],
        vec![ep("10.244.9.3")],
    );
    unlabelled.metadata.labels = None;
    let objects = objects(
        vec![web()],
        vec![ours, other_service, other_namespace, unlabelled],
    );
    assert_eq!(web_backends(&objects), backends(&[("10.244.1.1", 8080)]));
}

#[test]
fn fqdn_and_ipv6_slices_are_ignored() {
    let mut fqdn = slice(
        "default",
        "web-fqdn",
        "web",
        &[("http", 8080, "TCP")],
        vec![ep("backend.example.com")],
    );
    fqdn.address_type = "FQDN".into();
    let mut v6 = slice(
        "default",
        "web-v6",
        "web",
        &[("http", 8080, "TCP")],
        vec![ep("fd00:10:244::5")],
    );
    v6.address_type = "IPv6".into();
    let objects = objects(
        vec![web()],
        vec![fqdn, v6, web_slice(vec![ep("10.244.1.1")])],
    );
    let (state, diagnostics) = build_default(&objects);
    assert_eq!(
        backends_of(&state, tcp("10.96.0.10", 80)),
        backends(&[("10.244.1.1", 8080)])
    );
    assert_eq!(diagnostics, vec![]);
}

#[test]
fn non_ipv4_address_in_an_ipv4_slice_is_warned_and_skipped() {
    let objects = objects(
        vec![web()],
        vec![web_slice(vec![ep("10.244.1.1"), ep("not-an-ip")])],
    );
    let (state, diagnostics) = build_default(&objects);
    assert_eq!(
        backends_of(&state, tcp("10.96.0.10", 80)),
        backends(&[("10.244.1.1", 8080)])
    );
    assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
    assert_eq!(diagnostics[0].severity, Severity::Warning);
    assert_eq!(diagnostics[0].object.kind, "EndpointSlice");
    assert!(diagnostics[0].message.contains("not-an-ip"));
}

#[test]
fn headless_and_external_name_services_are_skipped() {
    let mut headless = service("default", "db", "None", &[("pg", 5432, "TCP")]);
    spec(&mut headless).cluster_ips = Some(vec!["None".into()]);
    let mut external = service("default", "ext", "10.96.0.50", &[("http", 80, "TCP")]);
    {
        let spec = spec(&mut external);
        spec.type_ = Some("ExternalName".into());
        spec.external_name = Some("example.com".into());
        spec.cluster_ip = None;
        spec.cluster_ips = None;
        spec.selector = None;
    }
    // An ExternalName service still carrying a ClusterIP (left over from a type change).
    let mut external_with_ip = service("default", "ext2", "10.96.0.51", &[("http", 80, "TCP")]);
    spec(&mut external_with_ip).type_ = Some("ExternalName".into());
    let db_slice = slice(
        "default",
        "db-1",
        "db",
        &[("pg", 5432, "TCP")],
        vec![ep("10.244.1.1")],
    );
    let (state, diagnostics) = build_default(&objects(
        vec![headless, external, external_with_ip],
        vec![db_slice],
    ));
    assert_eq!(state, DesiredState::default());
    assert_eq!(diagnostics, vec![]);
}

#[test]
fn headless_label_skips_the_service() {
    let mut svc = web();
    svc.metadata.labels = Some([(super::HEADLESS_LABEL.to_owned(), String::new())].into());
    let (state, diagnostics) =
        build_default(&objects(vec![svc], vec![web_slice(vec![ep("10.244.1.1")])]));
    assert_eq!(state, DesiredState::default());
    assert_eq!(diagnostics, vec![]);
}

#[test]
fn service_proxy_name_label_selects_the_proxy() {
    let labelled = |name: &str, ip: &str, proxy: &str| {
        let mut svc = service("default", name, ip, &[("http", 80, "TCP")]);
        svc.metadata.labels =
            Some([(super::SERVICE_PROXY_NAME_LABEL.to_owned(), proxy.to_owned())].into());
        svc
    };
    let objects = objects(
        vec![
            service("default", "plain", "10.96.0.1", &[("http", 80, "TCP")]),
            labelled("mine", "10.96.0.2", "lb-agent"),
            labelled("theirs", "10.96.0.3", "other-proxy"),
        ],
        vec![],
    );
    let programmed = |identity: &ProxyIdentity| -> Vec<String> {
        let (state, _) = build(&objects, identity);
        state
            .services
            .values()
            .map(|s| s.name.name.clone())
            .collect()
    };
    // Unnamed proxy: only unlabelled services.
    assert_eq!(programmed(&identity()), vec!["plain"]);
    // Named proxy: only services labelled with its name; unlabelled ones are kube-proxy's.
    let named = ProxyIdentity {
        service_proxy_name: Some("lb-agent".into()),
        ..identity()
    };
    assert_eq!(programmed(&named), vec!["mine"]);
}

#[test]
fn dual_stack_programs_ipv4_and_reports_the_ipv6_address() {
    let mut svc = web();
    {
        let spec = spec(&mut svc);
        spec.cluster_ips = Some(vec!["10.96.0.10".into(), "fd00:10:96::a".into()]);
        spec.ip_families = Some(vec!["IPv4".into(), "IPv6".into()]);
        spec.ip_family_policy = Some("PreferDualStack".into());
    }
    let (state, diagnostics) =
        build_default(&objects(vec![svc], vec![web_slice(vec![ep("10.244.1.1")])]));
    assert_eq!(
        state.services.keys().copied().collect::<Vec<_>>(),
        vec![tcp("10.96.0.10", 80)]
    );
    assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
    assert_eq!(diagnostics[0].severity, Severity::Info);
    assert_eq!(diagnostics[0].object, service_ref("default", "web"));
    assert!(diagnostics[0].message.contains("fd00:10:96::a"));

    // IPv6 first (primary family IPv6): the IPv4 entry is still programmed.
    let mut v6_first = web();
    spec(&mut v6_first).cluster_ip = Some("fd00:10:96::a".into());
    spec(&mut v6_first).cluster_ips = Some(vec!["fd00:10:96::a".into(), "10.96.0.10".into()]);
    let (state, _) = build_default(&objects(vec![v6_first], vec![]));
    assert_eq!(
        state.services.keys().copied().collect::<Vec<_>>(),
        vec![tcp("10.96.0.10", 80)]
    );
}

#[test]
fn cluster_ip_without_cluster_ips_is_used() {
    // Objects written before dual-stack have only spec.clusterIP.
    let mut svc = web();
    spec(&mut svc).cluster_ips = None;
    let (state, _) = build_default(&objects(vec![svc], vec![]));
    assert!(state.services.contains_key(&tcp("10.96.0.10", 80)));
}

#[test]
fn invalid_port_numbers_are_warned_and_other_ports_programmed() {
    let svc = service(
        "default",
        "web",
        "10.96.0.10",
        &[
            ("zero", 0, "TCP"),
            ("http", 80, "TCP"),
            ("huge", 70000, "TCP"),
        ],
    );
    let (state, diagnostics) = build_default(&objects(
        vec![svc],
        vec![slice(
            "default",
            "web-1",
            "web",
            &[
                ("http", 8080, "TCP"),
                ("zero", 1, "TCP"),
                ("huge", 2, "TCP"),
            ],
            vec![ep("10.244.1.1")],
        )],
    ));
    assert_eq!(
        state.services.keys().copied().collect::<Vec<_>>(),
        vec![tcp("10.96.0.10", 80)]
    );
    assert_eq!(diagnostics.len(), 2, "{diagnostics:?}");
    for (diagnostic, (name, number)) in diagnostics.iter().zip([("zero", "0"), ("huge", "70000")]) {
        assert_eq!(diagnostic.severity, Severity::Warning);
        assert_eq!(diagnostic.object, service_ref("default", "web"));
        assert!(
            diagnostic.message.contains(name) && diagnostic.message.contains(number),
            "{diagnostic}"
        );
        assert!(diagnostic.to_string().starts_with("Service default/web: "));
    }
}

#[test]
fn invalid_slice_port_number_skips_its_endpoints_with_a_warning() {
    let bad = slice(
        "default",
        "web-bad",
        "web",
        &[("http", 0, "TCP")],
        vec![ep("10.244.9.9")],
    );
    let (state, diagnostics) = build_default(&objects(
        vec![web()],
        vec![bad, web_slice(vec![ep("10.244.1.1")])],
    ));
    assert_eq!(
        backends_of(&state, tcp("10.96.0.10", 80)),
        backends(&[("10.244.1.1", 8080)])
    );
    assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
    assert_eq!(
        diagnostics[0].object,
        ObjectRef {
            kind: "EndpointSlice",
            key: ObjectKey::new("default", "web-bad")
        }
    );
}

#[test]
fn invalid_cluster_ip_is_warned() {
    let svc = service("default", "web", "10.96.0.300", &[("http", 80, "TCP")]);
    let (state, diagnostics) = build_default(&objects(
        vec![
            svc,
            service("default", "ok", "10.96.0.11", &[("http", 80, "TCP")]),
        ],
        vec![],
    ));
    assert_eq!(
        state.services.keys().copied().collect::<Vec<_>>(),
        vec![tcp("10.96.0.11", 80)]
    );
    assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
    assert_eq!(diagnostics[0].severity, Severity::Warning);
    assert_eq!(diagnostics[0].object, service_ref("default", "web"));
    assert!(diagnostics[0].message.contains("10.96.0.300"));
}

#[test]
fn service_without_a_cluster_ip_is_warned() {
    let mut svc = web();
    spec(&mut svc).cluster_ip = None;
    spec(&mut svc).cluster_ips = None;
    let (state, diagnostics) = build_default(&objects(vec![svc], vec![]));
    assert_eq!(state, DesiredState::default());
    assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
    assert_eq!(diagnostics[0].severity, Severity::Warning);
    assert_eq!(diagnostics[0].object, service_ref("default", "web"));
    assert!(
        diagnostics[0].message.contains("no clusterIP"),
        "{diagnostics:?}"
    );
}

#[test]
fn service_without_spec_is_warned() {
    let mut svc = web();
    svc.spec = None;
    let (state, diagnostics) = build_default(&objects(vec![svc], vec![]));
    assert_eq!(state, DesiredState::default());
    assert_eq!(diagnostics.len(), 1);
    assert_eq!(diagnostics[0].severity, Severity::Warning);
}

// ---------------------------------------------------------------------------------------------
// Session affinity

fn with_affinity(affinity: &str, timeout: Option<i32>) -> Service {
    let mut svc = web();
    spec(&mut svc).session_affinity = Some(affinity.into());
    spec(&mut svc).session_affinity_config = timeout.map(|secs| SessionAffinityConfig {
        client_ip: Some(ClientIPConfig {
            timeout_seconds: Some(secs),
        }),
    });
    svc
}

fn affinity_of(svc: Service) -> (Option<u32>, Vec<Diagnostic>) {
    let (state, diagnostics) = build_default(&objects(vec![svc], vec![]));
    (
        state.services[&tcp("10.96.0.10", 80)].affinity_timeout_secs,
        diagnostics,
    )
}

#[test]
fn session_affinity_client_ip_default_and_explicit_timeout() {
    assert_eq!(affinity_of(web()), (None, vec![]));
    // The API server fills in the default; an object written without it gets it too.
    assert_eq!(
        affinity_of(with_affinity("ClientIP", None)),
        (Some(super::DEFAULT_AFFINITY_TIMEOUT_SECS), vec![])
    );
    assert_eq!(super::DEFAULT_AFFINITY_TIMEOUT_SECS, 10_800);
    assert_eq!(
        affinity_of(with_affinity("ClientIP", Some(10_800))),
        (Some(10_800), vec![])
    );
    assert_eq!(
        affinity_of(with_affinity("ClientIP", Some(125))),
        (Some(125), vec![])
    );
    assert_eq!(
        affinity_of(with_affinity("ClientIP", Some(86_400))),
        (Some(86_400), vec![])
    );
    // A config left behind after switching back to None means no affinity.
    assert_eq!(
        affinity_of(with_affinity("None", Some(125))),
        (None, vec![])
    );
}

#[test]
fn out_of_range_affinity_timeout_warns_and_uses_the_default() {
    for secs in [0, -5, 86_401, i32::MAX] {
        let (affinity, diagnostics) = affinity_of(with_affinity("ClientIP", Some(secs)));
        assert_eq!(affinity, Some(10_800), "timeout {secs}");
        assert_eq!(diagnostics.len(), 1, "timeout {secs}: {diagnostics:?}");
        assert_eq!(diagnostics[0].severity, Severity::Warning);
        assert_eq!(diagnostics[0].object, service_ref("default", "web"));
        assert!(diagnostics[0].message.contains(&secs.to_string()));
    }
}

// ---------------------------------------------------------------------------------------------
// Traffic policy and topology

#[test]
fn internal_traffic_policy_local_uses_only_this_nodes_endpoints() {
    let mut svc = web();
    spec(&mut svc).internal_traffic_policy = Some("Local".into());
    let objects_with = |endpoints| objects(vec![svc.clone()], vec![web_slice(endpoints)]);

    let mixed = objects_with(vec![
        ep("10.244.1.1").on_node(NODE),
        ep("10.244.1.2").on_node(NODE),
        ep("10.244.2.1").on_node("node-b"),
        ep("10.244.1.3")
            .on_node(NODE)
            .conditions(Some(false), Some(false), Some(false)),
    ]);
    assert_eq!(
        web_backends(&mixed),
        backends(&[("10.244.1.1", 8080), ("10.244.1.2", 8080)])
    );

    // None local: refuse, even though remote endpoints are ready.
    let mut no_node = ep("10.244.3.1");
    no_node.node_name = None;
    let remote_only = objects_with(vec![ep("10.244.2.1").on_node("node-b"), no_node]);
    let (state, _) = build_default(&remote_only);
    assert_eq!(backends_of(&state, tcp("10.96.0.10", 80)), BTreeSet::new());

    // The serving-terminating fallback applies to the local set on its own: a local
    // terminating endpoint is used although a remote one is ready.
    let local_terminating = objects_with(vec![
        ep("10.244.2.1").on_node("node-b"),
        ep("10.244.1.1")
            .on_node(NODE)
            .conditions(Some(false), Some(true), Some(true)),
    ]);
    assert_eq!(
        web_backends(&local_terminating),
        backends(&[("10.244.1.1", 8080)])
    );
}

fn with_node_zone(mut objects: Objects, zone: Option<&str>) -> Objects {
    objects
        .nodes
        .insert(NODE.into(), Arc::new(node(NODE, zone)));
    objects
        .nodes
        .insert("node-b".into(), Arc::new(node("node-b", Some("zone-b"))));
    objects
}

#[test]
fn zone_hints_are_used_when_complete_and_this_zone_is_named() {
    let objects = with_node_zone(
        objects(
            vec![web()],
            vec![web_slice(vec![
                ep("10.244.1.1").zones(&["zone-a"]),
                ep("10.244.2.1").zones(&["zone-b"]),
                ep("10.244.3.1").zones(&["zone-a", "zone-c"]),
                // Not ready and without hints: does not disable topology.
                ep("10.244.4.1").conditions(Some(false), Some(false), Some(false)),
            ])],
        ),
        Some("zone-a"),
    );
    assert_eq!(
        web_backends(&objects),
        backends(&[("10.244.1.1", 8080), ("10.244.3.1", 8080)])
    );
}

#[test]
fn zone_hints_are_ignored_when_a_ready_endpoint_lacks_them() {
    let objects = with_node_zone(
        objects(
            vec![web()],
            vec![web_slice(vec![
                ep("10.244.1.1").zones(&["zone-a"]),
                ep("10.244.2.1").zones(&["zone-b"]),
                ep("10.244.3.1"),
            ])],
        ),
        Some("zone-a"),
    );
    assert_eq!(
        web_backends(&objects),
        backends(&[
            ("10.244.1.1", 8080),
            ("10.244.2.1", 8080),
            ("10.244.3.1", 8080)
        ])
    );
}

#[test]
fn zone_hints_are_ignored_when_the_node_has_no_zone() {
    let hinted = || {
        objects(
            vec![web()],
            vec![web_slice(vec![
                ep("10.244.1.1").zones(&["zone-a"]),
                ep("10.244.2.1").zones(&["zone-b"]),
            ])],
        )
    };
    let all = backends(&[("10.244.1.1", 8080), ("10.244.2.1", 8080)]);
    // Node object without the zone label.
    assert_eq!(web_backends(&with_node_zone(hinted(), None)), all);
    // No Node object at all.
    assert_eq!(web_backends(&hinted()), all);
    // The node's zone is named by no endpoint.
    assert_eq!(web_backends(&with_node_zone(hinted(), Some("zone-z"))), all);
}

#[test]
fn node_hints_are_preferred_when_complete_and_this_node_is_named() {
    let objects = with_node_zone(
        objects(
            vec![web()],
            vec![web_slice(vec![
                ep("10.244.1.1").zones(&["zone-a"]).nodes(&[NODE]),
                ep("10.244.1.2").zones(&["zone-a"]).nodes(&["node-c"]),
                ep("10.244.2.1").zones(&["zone-b"]).nodes(&["node-b"]),
            ])],
        ),
        Some("zone-a"),
    );
    assert_eq!(web_backends(&objects), backends(&[("10.244.1.1", 8080)]));
}

#[test]
fn node_hints_not_naming_this_node_fall_back_to_zone_hints() {
    let complete = with_node_zone(
        objects(
            vec![web()],
            vec![web_slice(vec![
                ep("10.244.1.2").zones(&["zone-a"]).nodes(&["node-c"]),
                ep("10.244.2.1").zones(&["zone-b"]).nodes(&["node-b"]),
            ])],
        ),
        Some("zone-a"),
    );
    assert_eq!(web_backends(&complete), backends(&[("10.244.1.2", 8080)]));

    // Incomplete node hints: zone hints apply.
    let incomplete = with_node_zone(
        objects(
            vec![web()],
            vec![web_slice(vec![
                ep("10.244.1.1").zones(&["zone-a"]).nodes(&[NODE]),
                ep("10.244.1.2").zones(&["zone-a"]),
                ep("10.244.2.1").zones(&["zone-b"]).nodes(&["node-b"]),
            ])],
        ),
        Some("zone-a"),
    );
    assert_eq!(
        web_backends(&incomplete),
        backends(&[("10.244.1.1", 8080), ("10.244.1.2", 8080)])
    );
}

#[test]
fn hints_do_not_apply_to_the_local_policy() {
    let mut svc = web();
    spec(&mut svc).internal_traffic_policy = Some("Local".into());
    let objects = with_node_zone(
        objects(
            vec![svc],
            vec![web_slice(vec![
                ep("10.244.1.1").on_node(NODE).zones(&["zone-b"]),
                ep("10.244.2.1").on_node("node-b").zones(&["zone-a"]),
            ])],
        ),
        Some("zone-a"),
    );
    assert_eq!(web_backends(&objects), backends(&[("10.244.1.1", 8080)]));
}

// ---------------------------------------------------------------------------------------------
// Conflicts

#[test]
fn two_services_on_one_frontend_one_wins_with_a_warning() {
    let first = service("default", "alpha", "10.96.0.10", &[("http", 80, "TCP")]);
    let second = service(
        "default",
        "beta",
        "10.96.0.10",
        &[("http", 80, "TCP"), ("dns", 80, "UDP")],
    );
    let (state, diagnostics) = build_default(&objects(vec![second, first], vec![]));
    // 80/TCP goes to one of them; 80/UDP is no conflict.
    assert_eq!(
        state.services.keys().copied().collect::<Vec<_>>(),
        vec![tcp("10.96.0.10", 80), fe("10.96.0.10", 80, Protocol::Udp)]
    );
    let winner = &state.services[&tcp("10.96.0.10", 80)].name;
    let loser = if winner.name == "alpha" {
        "beta"
    } else {
        "alpha"
    };
    assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
    assert_eq!(diagnostics[0].severity, Severity::Warning);
    assert_eq!(diagnostics[0].object, service_ref("default", loser));
    assert!(
        diagnostics[0].message.contains("10.96.0.10:80/TCP")
            && diagnostics[0].message.contains(&winner.to_string()),
        "{}",
        diagnostics[0]
    );
    // The same objects give the same winner every time (no dependence on arrival order).
    let (again, _) = build_default(&objects(
        vec![
            service("default", "alpha", "10.96.0.10", &[("http", 80, "TCP")]),
            service(
                "default",
                "beta",
                "10.96.0.10",
                &[("http", 80, "TCP"), ("dns", 80, "UDP")],
            ),
        ],
        vec![],
    ));
    assert_eq!(again, state);
}

// ---------------------------------------------------------------------------------------------
// Sequences of changes: every step ends in exactly the state a fresh build computes, and the
// maps a reconciler keeps in step hold exactly what a fresh reconciler writes.

/// Runs `steps` in order against one reconciler and one set of maps; at every step compares
/// with `expected` (a fresh build of independently constructed objects) and with a fresh
/// reconciler on empty maps.
fn converges(steps: &[(Objects, Objects)]) {
    let mut reconciler = Reconciler::default();
    let mut maps = MemoryMaps::default();
    for (index, (incremental, fresh)) in steps.iter().enumerate() {
        let (desired, _) = build_default(incremental);
        let (expected, _) = build_default(fresh);
        assert_eq!(desired, expected, "step {index}");
        let report = reconciler.sync(&desired, &mut maps);
        assert!(report.failed.is_empty(), "step {index}: {report:?}");
        let mut fresh_maps = MemoryMaps::default();
        Reconciler::default().sync(&desired, &mut fresh_maps);
        assert_eq!(
            maps.contents.view(),
            fresh_maps.contents.view(),
            "step {index}"
        );
        let wanted: std::collections::BTreeMap<_, _> = desired
            .services
            .iter()
            .map(|(f, s)| (*f, (s.backends.clone(), s.affinity_timeout_secs)))
            .collect();
        assert_eq!(maps.contents.view(), wanted, "step {index}");
        // Nothing left over: exactly the live slots and backends.
        let live_slots: usize = maps
            .contents
            .services
            .values()
            .map(|v| v.count as usize)
            .sum();
        assert_eq!(maps.contents.slots.len(), live_slots, "step {index}");
        assert_eq!(maps.contents.backends.len(), live_slots, "step {index}");
    }
}

#[test]
fn slices_before_their_service_then_the_service() {
    let slices = vec![web_slice(vec![ep("10.244.1.1"), ep("10.244.1.2")])];
    let mut objects_now = objects(vec![], slices.clone());
    let before = objects_now.clone();
    let (state, diagnostics) = build_default(&before);
    assert_eq!(state, DesiredState::default());
    assert_eq!(diagnostics, vec![]);
    objects_now
        .services
        .insert(ObjectKey::new("default", "web"), Arc::new(web()));
    let (state, _) = build_default(&objects_now);
    assert_eq!(
        backends_of(&state, tcp("10.96.0.10", 80)),
        backends(&[("10.244.1.1", 8080), ("10.244.1.2", 8080)])
    );
    converges(&[
        (before, objects(vec![], slices.clone())),
        (objects_now, objects(vec![web()], slices)),
    ]);
}

#[test]
fn service_type_external_name_to_cluster_ip_and_back() {
    let slices = vec![web_slice(vec![ep("10.244.1.1")])];
    let external = || {
        let mut svc = web();
        let spec = spec(&mut svc);
        spec.type_ = Some("ExternalName".into());
        spec.external_name = Some("web.example.com".into());
        spec.cluster_ip = None;
        spec.cluster_ips = None;
        svc
    };
    let key = ObjectKey::new("default", "web");
    let mut current = objects(vec![external()], slices.clone());
    let mut steps = vec![(current.clone(), objects(vec![external()], slices.clone()))];
    let (state, _) = build_default(&current);
    assert_eq!(state, DesiredState::default());

    // The API server allocates a ClusterIP when the type changes.
    let mut updated = Service::clone(&current.services[&key]);
    {
        let spec = spec(&mut updated);
        spec.type_ = Some("ClusterIP".into());
        spec.external_name = None;
        spec.cluster_ip = Some("10.96.0.10".into());
        spec.cluster_ips = Some(vec!["10.96.0.10".into()]);
    }
    current.services.insert(key.clone(), Arc::new(updated));
    steps.push((current.clone(), objects(vec![web()], slices.clone())));
    let (state, _) = build_default(&current);
    assert_eq!(
        backends_of(&state, tcp("10.96.0.10", 80)),
        backends(&[("10.244.1.1", 8080)])
    );

    current.services.insert(key, Arc::new(external()));
    steps.push((current.clone(), objects(vec![external()], slices.clone())));
    let (state, _) = build_default(&current);
    assert_eq!(state, DesiredState::default());
    converges(&steps);
}

#[test]
fn cluster_ip_change_moves_the_frontend() {
    let slices = vec![web_slice(vec![ep("10.244.1.1")])];
    let moved = || service("default", "web", "10.96.7.7", &[("http", 80, "TCP")]);
    let mut current = objects(vec![web()], slices.clone());
    let first = current.clone();
    current
        .services
        .insert(ObjectKey::new("default", "web"), Arc::new(moved()));
    let (state, _) = build_default(&current);
    assert_eq!(
        state.services.keys().copied().collect::<Vec<_>>(),
        vec![tcp("10.96.7.7", 80)]
    );
    converges(&[
        (first, objects(vec![web()], slices.clone())),
        (current, objects(vec![moved()], slices)),
    ]);
}

#[test]
fn ports_added_and_removed() {
    let key = ObjectKey::new("default", "web");
    let two_ports = || {
        service(
            "default",
            "web",
            "10.96.0.10",
            &[("http", 80, "TCP"), ("https", 443, "TCP")],
        )
    };
    let https_only = || service("default", "web", "10.96.0.10", &[("https", 443, "TCP")]);
    let slices_one = || vec![web_slice(vec![ep("10.244.1.1")])];
    let slices_two = || {
        vec![slice(
            "default",
            "web-abc12",
            "web",
            &[("http", 8080, "TCP"), ("https", 8443, "TCP")],
            vec![ep("10.244.1.1")],
        )]
    };

    let mut current = objects(vec![web()], slices_one());
    let mut steps = vec![(current.clone(), objects(vec![web()], slices_one()))];
    // Port added to the service before the controller updates the slice: no endpoints yet.
    current.services.insert(key.clone(), Arc::new(two_ports()));
    steps.push((current.clone(), objects(vec![two_ports()], slices_one())));
    let (state, _) = build_default(&current);
    assert_eq!(backends_of(&state, tcp("10.96.0.10", 443)), BTreeSet::new());
    // The slice catches up.
    current.endpoint_slices = objects(vec![], slices_two()).endpoint_slices;
    steps.push((current.clone(), objects(vec![two_ports()], slices_two())));
    let (state, _) = build_default(&current);
    assert_eq!(
        backends_of(&state, tcp("10.96.0.10", 443)),
        backends(&[("10.244.1.1", 8443)])
    );
    // Port 80 removed.
    current.services.insert(key.clone(), Arc::new(https_only()));
    steps.push((current.clone(), objects(vec![https_only()], slices_two())));
    let (state, _) = build_default(&current);
    assert_eq!(
        state.services.keys().copied().collect::<Vec<_>>(),
        vec![tcp("10.96.0.10", 443)]
    );
    // Service deleted: nothing left.
    current.services.remove(&key);
    steps.push((current.clone(), objects(vec![], slices_two())));
    converges(&steps);
}
