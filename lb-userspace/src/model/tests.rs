//! One test per kube-proxy rule the model follows (see `kube-proxy-behaviour.md`), on real
//! k8s-openapi objects built the way the API server returns them, plus sequences of changes
//! that must end in exactly the state a fresh build computes.
//!
//! The builders are `pub(crate)` so the reconciler's model-based tests can use them too.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use k8s_openapi::{
    api::{
        core::v1::{
            ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, Node, NodeSpec,
            ObjectReference, Service, ServicePort, ServiceSpec, ServiceStatus,
            SessionAffinityConfig,
        },
        discovery::v1::{
            Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForNode,
            ForZone,
        },
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use super::Family;
use super::{
    Backend, BackendSet, DesiredService, DesiredState, Diagnostic, Endpoints, Frontend,
    FrontendKind, HealthCheck, Model, ObjectKey, ObjectRef, Objects, Protocol, ProxyIdentity,
    Scope, ServicePortName, SetKey, Severity, SourceRanges, build, endpoints::SERVICE_NAME_LABEL,
};
use crate::reconcile::{MapContents, Reconciler, memory::MemoryMaps};

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
            .insert(ObjectKey::of(&s.metadata), Arc::new(s.into()));
    }
    for s in slices {
        objects
            .endpoint_slices
            .insert(ObjectKey::of(&s.metadata), Arc::new(s.into()));
    }
    objects
}

pub(crate) fn spec(service: &mut Service) -> &mut ServiceSpec {
    service.spec.as_mut().expect("built with a spec")
}

/// Makes `service` of type `kind` (NodePort or LoadBalancer), giving its ports `node_ports`
/// in order, with `externalTrafficPolicy` `policy`.
pub(crate) fn with_node_ports(
    mut service: Service,
    kind: &str,
    node_ports: &[i32],
    policy: &str,
) -> Service {
    let spec = spec(&mut service);
    spec.type_ = Some(kind.into());
    spec.external_traffic_policy = Some(policy.into());
    for (port, node_port) in spec.ports.iter_mut().flatten().zip(node_ports) {
        port.node_port = Some(*node_port);
    }
    service
}

/// Gives `service` these load-balancer ingress IPs, `(ip, ipMode)`.
pub(crate) fn with_ingress(mut service: Service, ingress: &[(&str, Option<&str>)]) -> Service {
    service.status = Some(ServiceStatus {
        load_balancer: Some(LoadBalancerStatus {
            ingress: Some(
                ingress
                    .iter()
                    .map(|(ip, mode)| LoadBalancerIngress {
                        ip: Some((*ip).into()),
                        ip_mode: mode.map(Into::into),
                        ..Default::default()
                    })
                    .collect(),
            ),
        }),
        ..Default::default()
    });
    service
}

fn fe(ip: &str, port: u16, protocol: Protocol) -> Frontend {
    Frontend::new(ip.parse().unwrap(), port, protocol)
}

fn node_port(port: u16, protocol: Protocol) -> Frontend {
    Frontend::node_port(Family::V4, port, protocol)
}

fn tcp(ip: &str, port: u16) -> Frontend {
    fe(ip, port, Protocol::Tcp)
}

pub(crate) fn backends(list: &[(&str, u16)]) -> BTreeSet<Backend> {
    list.iter()
        .map(|(ip, port)| Backend {
            ip: ip.parse().unwrap(),
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

/// The desired entry of `frontend`, failing the test when it is not programmed.
fn desired_of(state: &DesiredState, frontend: Frontend) -> &DesiredService {
    state
        .frontends
        .get(&frontend)
        .unwrap_or_else(|| panic!("{frontend} not programmed; state: {state:#?}"))
}

/// The backend set of `frontend`, failing the test when it is not programmed or names a set
/// the state lacks.
fn set_of(state: &DesiredState, frontend: Frontend) -> &BackendSet {
    let key = desired_of(state, frontend).set();
    state
        .sets
        .get(&key)
        .unwrap_or_else(|| panic!("{frontend} names the missing set {key}; state: {state:#?}"))
}

/// The backends of `frontend`, failing the test when it is not programmed.
fn backends_of(state: &DesiredState, frontend: Frontend) -> BTreeSet<Backend> {
    set_of(state, frontend).backends.clone()
}

fn set_key(namespace: &str, name: &str, port: &str, endpoints: Endpoints) -> SetKey {
    SetKey {
        name: port_name(namespace, name, port),
        family: Family::V4,
        endpoints,
    }
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
        frontends: [(
            tcp("10.96.0.10", 80),
            DesiredService {
                name: port_name("default", "web", "http"),
                family: Family::V4,
                kind: FrontendKind::ClusterIP,
                endpoints: Endpoints::All,
                affinity_timeout_secs: None,
                local_only: false,
                two_scopes: false,
                source_ranges: None,
            },
        )]
        .into(),
        sets: [(
            set_key("default", "web", "http", Endpoints::All),
            BackendSet {
                backends: backends(&[("10.244.1.5", 8080), ("10.244.2.7", 8080)]),
                ..BackendSet::default()
            },
        )]
        .into(),
        health_checks: BTreeMap::new(),
    };
    assert_eq!(state, expected);
    assert_eq!(diagnostics, vec![]);
}

#[test]
fn pods_reach_external_ips_and_load_balancer_ips_at_the_socket_with_every_endpoint() {
    let mut svc = with_ingress(
        with_node_ports(web(), "LoadBalancer", &[30080], "Local"),
        &[("203.0.113.7", None), ("203.0.113.8", Some("Proxy"))],
    );
    spec(&mut svc).external_ips = Some(vec!["198.51.100.10".into()]);
    let local = ep("10.244.1.5").on_node(NODE);
    let remote = ep("10.244.2.7").on_node("node-b");
    let objects = objects(vec![svc], vec![web_slice(vec![local, remote])]);
    let (state, diagnostics) = build_default(&objects);
    let all = backends(&[("10.244.1.5", 8080), ("10.244.2.7", 8080)]);
    let only_local = backends(&[("10.244.1.5", 8080)]);
    for external in [
        tcp("198.51.100.10", 80),
        tcp("203.0.113.7", 80),
        node_port(30080, Protocol::Tcp),
    ] {
        // eTP Local is for traffic from outside: the external scope has this node's
        // endpoints, and says in-node clients use the other scope.
        let entry = desired_of(&state, external);
        assert!(
            entry.local_only && entry.two_scopes,
            "{external}: {entry:?}"
        );
        assert_eq!(entry.endpoints, Endpoints::Local, "{external}");
        assert_eq!(backends_of(&state, external), only_local, "{external}");
        // Pods and host processes get every endpoint, as through KUBE-SVC.
        let internal = external.in_scope(Scope::Internal);
        let entry = desired_of(&state, internal);
        assert!(
            !entry.local_only && !entry.two_scopes,
            "{internal}: {entry:?}"
        );
        assert_eq!(entry.endpoints, Endpoints::All, "{internal}");
        assert_eq!(entry.kind, desired_of(&state, external).kind, "{internal}");
        assert_eq!(backends_of(&state, internal), all, "{internal}");
    }
    assert_eq!(
        desired_of(&state, tcp("198.51.100.10", 80)).kind,
        FrontendKind::ExternalIp
    );
    assert_eq!(
        desired_of(&state, tcp("203.0.113.7", 80)).kind,
        FrontendKind::LoadBalancer
    );
    // The ClusterIP follows internalTrafficPolicy (Cluster) and has one scope.
    assert_eq!(backends_of(&state, tcp("10.96.0.10", 80)), all);
    assert!(!desired_of(&state, tcp("10.96.0.10", 80)).two_scopes);
    // ipMode Proxy: in-cluster traffic must go out to the load balancer, in either scope.
    for scope in [Scope::External, Scope::Internal] {
        let proxied = tcp("203.0.113.8", 80).in_scope(scope);
        assert!(!state.frontends.contains_key(&proxied), "{state:?}");
    }
    // ClusterIP, NodePort, externalIP, load-balancer IP; the last three in two scopes.
    assert_eq!(state.frontends.len(), 7, "{state:#?}");
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
        state.frontends[&tcp("10.96.0.10", 80)].name.to_string(),
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
    assert_eq!(state.frontends.len(), 2);
    assert_eq!(
        state.frontends[&tcp("10.96.0.20", 9090)].name,
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
    assert_eq!(state.frontends.len(), 2);
    assert_eq!(
        backends_of(&state, fe("10.96.0.10", 53, Protocol::Udp)),
        backends(&[("10.244.0.3", 53), ("10.244.0.4", 53)])
    );
    assert_eq!(
        backends_of(&state, fe("10.96.0.10", 53, Protocol::Tcp)),
        backends(&[("10.244.0.3", 5353), ("10.244.0.4", 5353)])
    );
    assert_eq!(
        state.frontends[&fe("10.96.0.10", 53, Protocol::Udp)].name,
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
        state.frontends.keys().copied().collect::<Vec<_>>(),
        vec![tcp("10.96.0.10", 80)]
    );
    assert_eq!(diagnostics.len(), 1);
    assert_eq!(diagnostics[0].severity, Severity::Info);
    assert!(diagnostics[0].message.contains("SCTP"), "{diagnostics:?}");
}

#[test]
fn a_port_name_used_twice_is_reported_and_the_later_port_skipped() {
    // The API server rejects this; a hand-written manifest may have it. Both ports would name
    // one backend set, so the second would lead the first to its own endpoints.
    let svc = service(
        "default",
        "web",
        "10.96.0.10",
        &[("http", 80, "TCP"), ("http", 53, "UDP")],
    );
    let sl = slice(
        "default",
        "web-1",
        "web",
        &[("http", 8080, "TCP"), ("http", 5353, "UDP")],
        vec![ep("10.244.1.1")],
    );
    let (state, diagnostics) = build_default(&objects(vec![svc], vec![sl]));
    assert_eq!(
        backends_of(&state, tcp("10.96.0.10", 80)),
        backends(&[("10.244.1.1", 8080)])
    );
    assert_eq!(
        state.frontends.keys().copied().collect::<Vec<_>>(),
        vec![tcp("10.96.0.10", 80)]
    );
    assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
    assert_eq!(diagnostics[0].severity, Severity::Warning);
    assert_eq!(diagnostics[0].object, service_ref("default", "web"));
    assert!(
        diagnostics[0].message.contains("http"),
        "{}",
        diagnostics[0]
    );
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
    let set = set_of(&state, tcp("10.96.0.10", 80));
    assert_eq!(set.terminating, backends(&[("10.244.1.1", 8080)]));
    // Picked through the fallback: nothing is left draining beside it but the terminating
    // endpoint that no longer serves (its flows drain).
    assert_eq!(set.draining, backends(&[("10.244.1.2", 8080)]));
    let (state, _) = build_default(&with_ready);
    let set = set_of(&state, tcp("10.96.0.10", 80));
    assert!(set.terminating.is_empty());
    // Not picked any more, but kept for the flows that use them.
    assert_eq!(
        set.draining,
        backends(&[("10.244.1.1", 8080), ("10.244.1.2", 8080)])
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
        assert_eq!(state.frontends.len(), 1);
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
fn fqdn_slices_and_ipv6_slices_of_an_ipv4_service_are_ignored() {
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
            .frontends
            .values()
            .map(|s| s.name.name.to_string())
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

// ---- Dual-stack: one proxier per family ----

/// `service` with these ClusterIPs (`clusterIP` is the first), `ipFamilies` and
/// `ipFamilyPolicy`, as the API server writes a dual-stack Service.
pub(crate) fn with_families(
    mut service: Service,
    policy: &str,
    cluster_ips: &[&str],
    families: &[&str],
) -> Service {
    let spec = spec(&mut service);
    spec.cluster_ip = cluster_ips.first().map(|ip| (*ip).to_owned());
    spec.cluster_ips = Some(cluster_ips.iter().map(|ip| (*ip).to_owned()).collect());
    spec.ip_families = Some(families.iter().map(|f| (*f).to_owned()).collect());
    spec.ip_family_policy = Some(policy.into());
    service
}

/// An IPv6 EndpointSlice, as the controller writes one per family of a dual-stack Service.
pub(crate) fn slice6(
    namespace: &str,
    name: &str,
    service: &str,
    ports: &[(&str, i32, &str)],
    endpoints: Vec<Endpoint>,
) -> EndpointSlice {
    let mut slice = slice(namespace, name, service, ports, endpoints);
    slice.address_type = "IPv6".into();
    slice
}

/// `default/web` dual-stack (10.96.0.10 and fd00:10:96::a) under `policy`, IPv4 first.
fn web_dual(policy: &str) -> Service {
    with_families(
        web(),
        policy,
        &["10.96.0.10", "fd00:10:96::a"],
        &["IPv4", "IPv6"],
    )
}

fn web_slice6(endpoints: Vec<Endpoint>) -> EndpointSlice {
    slice6(
        "default",
        "web-v6xyz",
        "web",
        &[("http", 8080, "TCP")],
        endpoints,
    )
}

fn node_port6(port: u16, protocol: Protocol) -> Frontend {
    Frontend::node_port(Family::V6, port, protocol)
}

#[test]
fn require_dual_stack_serves_both_families_each_with_its_own_endpoints() {
    let svc = with_node_ports(
        web_dual("RequireDualStack"),
        "NodePort",
        &[30080],
        "Cluster",
    );
    let objects = objects(
        vec![svc],
        vec![
            web_slice(vec![ep("10.244.1.5"), ep("10.244.2.7")]),
            web_slice6(vec![ep("fd00:10:244:1::5")]),
        ],
    );
    let (state, diagnostics) = build_default(&objects);
    assert_eq!(diagnostics, vec![]);
    assert_eq!(
        state.frontends.keys().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([
            tcp("10.96.0.10", 80),
            tcp("fd00:10:96::a", 80),
            node_port(30080, Protocol::Tcp),
            node_port6(30080, Protocol::Tcp),
        ])
    );
    let v4 = backends(&[("10.244.1.5", 8080), ("10.244.2.7", 8080)]);
    let v6 = backends(&[("fd00:10:244:1::5", 8080)]);
    // A frontend of each family gets only that family's endpoints.
    assert_eq!(backends_of(&state, tcp("10.96.0.10", 80)), v4);
    assert_eq!(backends_of(&state, node_port(30080, Protocol::Tcp)), v4);
    assert_eq!(backends_of(&state, tcp("fd00:10:96::a", 80)), v6);
    assert_eq!(backends_of(&state, node_port6(30080, Protocol::Tcp)), v6);
    // One set per family; each family's ClusterIP and NodePort share theirs.
    let v6_service = desired_of(&state, tcp("fd00:10:96::a", 80));
    assert_eq!(v6_service.family, Family::V6);
    assert_eq!(
        v6_service.set(),
        SetKey {
            name: port_name("default", "web", "http"),
            family: Family::V6,
            endpoints: Endpoints::All,
        }
    );
    assert_eq!(
        desired_of(&state, node_port6(30080, Protocol::Tcp)).set(),
        v6_service.set()
    );
    assert_eq!(state.sets.len(), 2, "{:#?}", state.sets);
    assert_eq!(
        tcp("fd00:10:96::a", 80).to_string(),
        "[fd00:10:96::a]:80/TCP"
    );
    assert_eq!(
        node_port6(30080, Protocol::Tcp).to_string(),
        "[<node>]:30080/TCP"
    );

    // IPv6 as the primary family: the same frontends and sets.
    let v6_first = with_node_ports(
        with_families(
            web(),
            "RequireDualStack",
            &["fd00:10:96::a", "10.96.0.10"],
            &["IPv6", "IPv4"],
        ),
        "NodePort",
        &[30080],
        "Cluster",
    );
    let (first, diagnostics) = build_default(&plus(
        &objects,
        &super::tests::objects(vec![v6_first], vec![]),
    ));
    assert_eq!(diagnostics, vec![]);
    assert_eq!(first, state);
}

#[test]
fn prefer_dual_stack_on_a_single_stack_cluster_serves_its_one_family() {
    // PreferDualStack where the cluster has only IPv4: one ClusterIP, no complaint; an IPv6
    // slice (none would exist, but a stale one might) is not used.
    let svc = with_families(web(), "PreferDualStack", &["10.96.0.10"], &["IPv4"]);
    let (state, diagnostics) = build_default(&objects(
        vec![svc],
        vec![
            web_slice(vec![ep("10.244.1.1")]),
            web_slice6(vec![ep("fd00:10:244::1")]),
        ],
    ));
    assert_eq!(diagnostics, vec![]);
    assert_eq!(
        state.frontends.keys().copied().collect::<Vec<_>>(),
        vec![tcp("10.96.0.10", 80)]
    );
    assert_eq!(
        backends_of(&state, tcp("10.96.0.10", 80)),
        backends(&[("10.244.1.1", 8080)])
    );
}

#[test]
fn ipv6_single_stack_serves_ipv6_addresses_only() {
    let mut svc = with_ingress(
        with_node_ports(
            with_families(web(), "SingleStack", &["fd00:10:96::a"], &["IPv6"]),
            "LoadBalancer",
            &[30080],
            "Cluster",
        ),
        &[("2001:db8:7::7", None), ("203.0.113.7", None)],
    );
    spec(&mut svc).external_ips = Some(vec!["2001:db8:5::5".into(), "198.51.100.10".into()]);
    let (state, diagnostics) = build_default(&objects(
        vec![svc],
        vec![
            web_slice6(vec![ep("fd00:10:244::1"), ep("fd00:10:244::2")]),
            web_slice(vec![ep("10.244.1.1")]),
        ],
    ));
    assert_eq!(
        state.frontends.keys().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([
            tcp("fd00:10:96::a", 80),
            node_port6(30080, Protocol::Tcp),
            tcp("2001:db8:5::5", 80),
            tcp("2001:db8:7::7", 80),
        ])
    );
    for frontend in state.frontends.keys() {
        assert_eq!(
            backends_of(&state, *frontend),
            backends(&[("fd00:10:244::1", 8080), ("fd00:10:244::2", 8080)]),
            "{frontend}"
        );
    }
    assert_eq!(
        desired_of(&state, tcp("2001:db8:7::7", 80)).kind,
        FrontendKind::LoadBalancer
    );
    // The IPv4 externalIP and load-balancer IP have no ClusterIP of their family: left out,
    // as kube-proxy's IPv4 proxier skips the Service, and said so.
    let mut noted: Vec<(Severity, String)> = diagnostics
        .iter()
        .map(|d| (d.severity, d.message.clone()))
        .collect();
    noted.sort();
    assert_eq!(noted.len(), 2, "{diagnostics:#?}");
    for ((severity, message), ip) in noted.iter().zip(["198.51.100.10", "203.0.113.7"]) {
        assert_eq!(*severity, Severity::Info);
        assert!(
            message.contains(ip) && message.contains("no IPv4 ClusterIP"),
            "{message}"
        );
    }
}

#[test]
fn mixed_external_ips_join_their_familys_frontends() {
    let mut svc = web_dual("PreferDualStack");
    spec(&mut svc).external_ips = Some(vec![
        "2001:db8:5::5".into(),
        "198.51.100.10".into(),
        "fd00:10:96::a".into(), // the service's own IPv6 ClusterIP
    ]);
    let (state, diagnostics) = build_default(&objects(
        vec![svc],
        vec![
            web_slice(vec![ep("10.244.1.1")]),
            web_slice6(vec![ep("fd00:10:244::1")]),
        ],
    ));
    assert_eq!(diagnostics, vec![]);
    assert_eq!(
        backends_of(&state, tcp("198.51.100.10", 80)),
        backends(&[("10.244.1.1", 8080)])
    );
    assert_eq!(
        backends_of(&state, tcp("2001:db8:5::5", 80)),
        backends(&[("fd00:10:244::1", 8080)])
    );
    assert_eq!(
        desired_of(&state, tcp("2001:db8:5::5", 80)).kind,
        FrontendKind::ExternalIp
    );
    // The ClusterIP stays a ClusterIP.
    assert_eq!(
        desired_of(&state, tcp("fd00:10:96::a", 80)).kind,
        FrontendKind::ClusterIP
    );
    assert_eq!(state.frontends.len(), 4, "{:#?}", state.frontends);
}

#[test]
fn a_family_without_endpoints_is_served_with_none_while_the_other_has_its_own() {
    // Only the IPv4 slice exists (the IPv6 one not written yet, or no IPv6 pod ready): the
    // IPv6 frontends refuse, as kube-proxy's IPv6 proxier rejects a Service without
    // endpoints; IPv4 is unaffected.
    let (state, diagnostics) = build_default(&objects(
        vec![web_dual("RequireDualStack")],
        vec![web_slice(vec![ep("10.244.1.1")])],
    ));
    assert_eq!(diagnostics, vec![]);
    assert_eq!(
        backends_of(&state, tcp("10.96.0.10", 80)),
        backends(&[("10.244.1.1", 8080)])
    );
    assert_eq!(
        backends_of(&state, tcp("fd00:10:96::a", 80)),
        BTreeSet::new()
    );
}

#[test]
fn require_dual_stack_with_one_cluster_ip_serves_that_family_and_warns() {
    let svc = with_families(
        web(),
        "RequireDualStack",
        &["10.96.0.10"],
        &["IPv4", "IPv6"],
    );
    let (state, diagnostics) = build_default(&objects(
        vec![svc],
        vec![
            web_slice(vec![ep("10.244.1.1")]),
            web_slice6(vec![ep("fd00:10:244::1")]),
        ],
    ));
    assert_eq!(
        state.frontends.keys().copied().collect::<Vec<_>>(),
        vec![tcp("10.96.0.10", 80)]
    );
    assert_eq!(diagnostics.len(), 2, "{diagnostics:#?}");
    assert!(
        diagnostics
            .iter()
            .all(|d| d.severity == Severity::Warning && d.object == service_ref("default", "web"))
    );
    assert!(
        diagnostics[0].message.contains("IPv6") && diagnostics[0].message.contains("no address"),
        "{diagnostics:#?}"
    );
    assert!(
        diagnostics[1].message.contains("RequireDualStack"),
        "{diagnostics:#?}"
    );
}

#[test]
fn cluster_ips_are_picked_by_ip_families_and_checked_against_them() {
    // ipFamilies names the family of each clusterIPs entry: one that does not match is
    // refused, whatever its position (kube-proxy would program it as the wrong family).
    let swapped = with_families(
        web(),
        "RequireDualStack",
        &["fd00:10:96::a", "10.96.0.10"],
        &["IPv4", "IPv6"],
    );
    let (state, diagnostics) = build_default(&objects(vec![swapped], vec![]));
    assert_eq!(state, DesiredState::default());
    assert_eq!(diagnostics.len(), 2, "{diagnostics:#?}");
    assert!(
        diagnostics
            .iter()
            .all(|d| d.severity == Severity::Warning && d.message.contains("as ipFamilies says")),
        "{diagnostics:#?}"
    );
    // A hand-written manifest without ipFamilies: each family's first address.
    let mut manifest = web();
    spec(&mut manifest).ip_families = None;
    spec(&mut manifest).ip_family_policy = None;
    spec(&mut manifest).cluster_ips = Some(vec![
        "fd00:10:96::a".into(),
        "10.96.0.10".into(),
        "fd00:10:96::b".into(),
    ]);
    let (state, diagnostics) = build_default(&objects(vec![manifest], vec![]));
    assert_eq!(
        state.frontends.keys().copied().collect::<Vec<_>>(),
        vec![tcp("10.96.0.10", 80), tcp("fd00:10:96::a", 80)]
    );
    assert_eq!(diagnostics.len(), 1, "{diagnostics:#?}");
    assert!(diagnostics[0].message.contains("fd00:10:96::b"));
    // `::` is every IPv6 NodePort address, never a service's own.
    let zero = with_families(web(), "SingleStack", &["::"], &["IPv6"]);
    let (state, diagnostics) = build_default(&objects(vec![zero], vec![]));
    assert_eq!(state, DesiredState::default());
    assert!(
        diagnostics[0]
            .message
            .contains(":: is not a usable address"),
        "{diagnostics:#?}"
    );
    // An IPv4-mapped address is an IPv4 one in disguise: no IPv6 service address.
    let mapped = with_families(web(), "SingleStack", &["::ffff:10.96.0.10"], &["IPv6"]);
    let (state, diagnostics) = build_default(&objects(vec![mapped], vec![]));
    assert_eq!(state, DesiredState::default());
    assert!(
        diagnostics[0].message.contains("IPv4-mapped"),
        "{diagnostics:#?}"
    );
}

#[test]
fn ipv6_slices_are_merged_deduplicated_and_checked_for_their_family() {
    let second = slice6(
        "default",
        "web-v6second",
        "web",
        &[("http", 8080, "TCP")],
        vec![
            ep("fd00:10:244::1"),
            ep("fd00:10:244::2"),
            ep("10.244.1.9"),
            ep("::ffff:10.244.1.8"),
        ],
    );
    let (state, diagnostics) = build_default(&objects(
        vec![web_dual("RequireDualStack")],
        vec![web_slice6(vec![ep("fd00:10:244::1")]), second],
    ));
    assert_eq!(
        backends_of(&state, tcp("fd00:10:96::a", 80)),
        backends(&[("fd00:10:244::1", 8080), ("fd00:10:244::2", 8080)])
    );
    // An IPv4 address (plain or IPv4-mapped) in an IPv6 slice is no IPv6 endpoint.
    assert_eq!(diagnostics.len(), 2, "{diagnostics:#?}");
    for address in ["10.244.1.9", "::ffff:10.244.1.8"] {
        assert!(
            diagnostics.iter().any(|d| d.object.kind == "EndpointSlice"
                && d.message.contains(address)
                && d.message.contains("IPv6")),
            "{address}: {diagnostics:#?}"
        );
    }
}

#[test]
fn local_policy_picks_this_nodes_endpoints_in_each_family() {
    let svc = with_node_ports(web_dual("RequireDualStack"), "NodePort", &[30080], "Local");
    let (state, _) = build_default(&objects(
        vec![svc],
        vec![
            web_slice(vec![ep("10.244.0.5").on_node(NODE), ep("10.244.1.5")]),
            web_slice6(vec![
                ep("fd00:10:244::5").on_node(NODE),
                ep("fd00:10:244:1::5"),
            ]),
        ],
    ));
    assert_eq!(
        backends_of(&state, node_port6(30080, Protocol::Tcp)),
        backends(&[("fd00:10:244::5", 8080)])
    );
    assert_eq!(
        backends_of(&state, node_port(30080, Protocol::Tcp)),
        backends(&[("10.244.0.5", 8080)])
    );
    // In-node clients of the IPv6 NodePort: every IPv6 endpoint.
    assert_eq!(
        backends_of(
            &state,
            node_port6(30080, Protocol::Tcp).in_scope(Scope::Internal)
        ),
        backends(&[("fd00:10:244::5", 8080), ("fd00:10:244:1::5", 8080)])
    );
    assert_eq!(state.sets.len(), 4, "{:#?}", state.sets);
}

#[test]
fn cluster_ip_without_cluster_ips_is_used() {
    // Objects written before dual-stack have only spec.clusterIP.
    let mut svc = web();
    spec(&mut svc).cluster_ips = None;
    let (state, _) = build_default(&objects(vec![svc], vec![]));
    assert!(state.frontends.contains_key(&tcp("10.96.0.10", 80)));
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
        state.frontends.keys().copied().collect::<Vec<_>>(),
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
        state.frontends.keys().copied().collect::<Vec<_>>(),
        vec![tcp("10.96.0.11", 80)]
    );
    assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
    assert_eq!(diagnostics[0].severity, Severity::Warning);
    assert_eq!(diagnostics[0].object, service_ref("default", "web"));
    assert!(diagnostics[0].message.contains("10.96.0.300"));
}

#[test]
fn the_unspecified_address_is_no_service_address() {
    // 0.0.0.0 is every NodePort address in the maps: as a ClusterIP or externalIP it would
    // make the port a NodePort (found by the `model` fuzz target).
    let zero = service("default", "zero", "0.0.0.0", &[("http", 30081, "TCP")]);
    let mut external = service("default", "ext", "10.96.0.12", &[("http", 30082, "TCP")]);
    spec(&mut external).external_ips = Some(vec!["0.0.0.0".into()]);
    let (state, diagnostics) = build_default(&objects(vec![zero, external], vec![]));
    assert_eq!(
        state.frontends.keys().copied().collect::<Vec<_>>(),
        vec![tcp("10.96.0.12", 30082)]
    );
    assert_eq!(diagnostics.len(), 2, "{diagnostics:?}");
    for diagnostic in &diagnostics {
        assert_eq!(diagnostic.severity, Severity::Warning);
        assert!(
            diagnostic
                .message
                .contains("0.0.0.0 is not a usable address"),
            "{diagnostic:?}"
        );
    }
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
        desired_of(&state, tcp("10.96.0.10", 80)).affinity_timeout_secs,
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
        .insert(NODE.into(), Arc::new(node(NODE, zone).into()));
    objects.nodes.insert(
        "node-b".into(),
        Arc::new(node("node-b", Some("zone-b")).into()),
    );
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
// NodePorts, externalIPs and load-balancer IPs

const NORTH_SOUTH_PORTS: &[(&str, i32, &str)] = &[("http", 80, "TCP"), ("dns", 53, "UDP")];

/// A NodePort service `default/web` (nodePorts 30080/TCP and 30053/UDP, eTP Cluster) with
/// `edit` applied.
fn node_port_web(edit: impl FnOnce(&mut ServiceSpec)) -> Service {
    let mut svc = with_node_ports(
        service("default", "web", "10.96.0.10", NORTH_SOUTH_PORTS),
        "NodePort",
        &[30080, 30053],
        "Cluster",
    );
    edit(spec(&mut svc));
    svc
}

/// One endpoint on this node, one on another.
fn node_port_endpoints() -> Vec<Endpoint> {
    vec![
        ep("10.244.0.10").on_node(NODE),
        ep("10.244.1.10").on_node("node-b"),
    ]
}

fn node_port_slice(endpoints: Vec<Endpoint>) -> EndpointSlice {
    slice(
        "default",
        "web-1",
        "web",
        &[("http", 8080, "TCP"), ("dns", 5353, "UDP")],
        endpoints,
    )
}

/// The frontends outside traffic reaches (external kinds, external scope).
fn external_frontends(state: &DesiredState) -> BTreeSet<Frontend> {
    state
        .frontends
        .iter()
        .filter(|(f, s)| s.kind.is_external() && f.scope == Scope::External)
        .map(|(f, _)| *f)
        .collect()
}

#[test]
fn node_ports_of_a_cluster_policy_service_use_every_endpoint_with_its_locality() {
    let (state, diagnostics) = build_default(&objects(
        vec![node_port_web(|_| {})],
        vec![node_port_slice(node_port_endpoints())],
    ));
    assert!(diagnostics.is_empty(), "{diagnostics:?}");
    assert_eq!(
        external_frontends(&state),
        BTreeSet::from([
            node_port(30080, Protocol::Tcp),
            node_port(30053, Protocol::Udp)
        ])
    );
    // The two NodePorts and the two ClusterIPs, each in one scope.
    assert_eq!(state.frontends.len(), 4, "{state:#?}");
    assert!(node_port(30080, Protocol::Tcp).is_node_port());
    let http = desired_of(&state, node_port(30080, Protocol::Tcp));
    assert_eq!(http.kind, FrontendKind::NodePort);
    assert_eq!(http.name, port_name("default", "web", "http"));
    assert!(!http.local_only && !http.two_scopes, "{http:?}");
    let set = set_of(&state, node_port(30080, Protocol::Tcp));
    assert_eq!(
        set.backends,
        backends(&[("10.244.0.10", 8080), ("10.244.1.10", 8080)])
    );
    assert_eq!(set.local, backends(&[("10.244.0.10", 8080)]));
    assert_eq!(
        backends_of(&state, node_port(30053, Protocol::Udp)),
        backends(&[("10.244.0.10", 5353), ("10.244.1.10", 5353)])
    );
    assert!(state.health_checks.is_empty());
}

#[test]
fn local_policy_uses_local_endpoints_and_serves_a_health_check() {
    let svc = node_port_web(|spec| {
        spec.external_traffic_policy = Some("Local".into());
        spec.health_check_node_port = Some(32100);
    });
    let http = node_port(30080, Protocol::Tcp);
    let (state, _) = build_default(&objects(
        vec![svc.clone()],
        vec![node_port_slice(node_port_endpoints())],
    ));
    let entry = desired_of(&state, http);
    assert!(entry.local_only && entry.two_scopes, "{entry:?}");
    assert_eq!(
        entry.set(),
        set_key("default", "web", "http", Endpoints::Local)
    );
    let set = set_of(&state, http);
    assert_eq!(set.backends, backends(&[("10.244.0.10", 8080)]));
    assert_eq!(set.local, set.backends);
    // In-node clients of the NodePort (none reach address 0, but the entry follows the
    // frontend) and of the ClusterIP get every endpoint.
    assert_eq!(
        desired_of(&state, http.in_scope(Scope::Internal)).set(),
        set_key("default", "web", "http", Endpoints::All)
    );
    assert_eq!(
        backends_of(&state, http.in_scope(Scope::Internal)),
        backends(&[("10.244.0.10", 8080), ("10.244.1.10", 8080)])
    );
    assert_eq!(
        backends_of(&state, tcp("10.96.0.10", 80)),
        backends(&[("10.244.0.10", 8080), ("10.244.1.10", 8080)])
    );
    assert_eq!(
        state.health_checks,
        BTreeMap::from([(
            32100,
            HealthCheck {
                namespace: "default".into(),
                name: "web".into(),
                local_endpoints: 1
            }
        )])
    );

    // Only a terminating local endpoint left: still served, but health says 0.
    let terminating = vec![
        ep("10.244.0.10")
            .on_node(NODE)
            .conditions(Some(false), Some(true), Some(true)),
        ep("10.244.1.10").on_node("node-b"),
    ];
    let (state, _) = build_default(&objects(
        vec![svc.clone()],
        vec![node_port_slice(terminating)],
    ));
    let set = set_of(&state, http);
    assert_eq!(set.backends, backends(&[("10.244.0.10", 8080)]));
    assert_eq!(set.terminating, set.backends);
    assert_eq!(state.health_checks[&32100].local_endpoints, 0);
    // The cluster-wide set has a ready endpoint: the terminating one only drains there.
    let internal = set_of(&state, http.in_scope(Scope::Internal));
    assert_eq!(internal.backends, backends(&[("10.244.1.10", 8080)]));
    assert_eq!(internal.draining, backends(&[("10.244.0.10", 8080)]));

    // No local endpoint: no backend (the data path drops), health 0.
    let (state, _) = build_default(&objects(
        vec![svc],
        vec![node_port_slice(vec![ep("10.244.1.10").on_node("node-b")])],
    ));
    assert!(backends_of(&state, http).is_empty());
    assert_eq!(state.health_checks[&32100].local_endpoints, 0);
}

#[test]
fn external_ips_and_load_balancer_ips_answer_at_the_service_port() {
    let svc = with_ingress(
        node_port_web(|spec| {
            spec.type_ = Some("LoadBalancer".into());
            spec.external_ips = Some(vec!["198.51.100.10".into(), "2001:db8::1".into()]);
        }),
        &[("198.51.100.20", None), ("198.51.100.30", Some("Proxy"))],
    );
    let (state, diagnostics) = build_default(&objects(
        vec![svc],
        vec![node_port_slice(node_port_endpoints())],
    ));
    assert_eq!(
        external_frontends(&state),
        BTreeSet::from([
            node_port(30080, Protocol::Tcp),
            node_port(30053, Protocol::Udp),
            tcp("198.51.100.10", 80),
            fe("198.51.100.10", 53, Protocol::Udp),
            tcp("198.51.100.20", 80),
            fe("198.51.100.20", 53, Protocol::Udp),
        ]),
        "ipMode Proxy is left to the load balancer"
    );
    assert_eq!(
        desired_of(&state, tcp("198.51.100.10", 80)).kind,
        FrontendKind::ExternalIp
    );
    assert_eq!(
        desired_of(&state, tcp("198.51.100.20", 80)).kind,
        FrontendKind::LoadBalancer
    );
    assert_eq!(
        diagnostics.len(),
        1,
        "the IPv6 externalIP is reported: {diagnostics:?}"
    );
    assert_eq!(diagnostics[0].severity, Severity::Info);
    assert_eq!(diagnostics[0].object, service_ref("default", "web"));
    assert!(
        diagnostics[0].message.contains("2001:db8::1"),
        "{diagnostics:?}"
    );
}

#[test]
fn cluster_ip_services_have_external_ips_only_and_no_traffic_policy() {
    let mut plain = service("default", "web", "10.96.0.10", NORTH_SOUTH_PORTS);
    let (state, _) = build_default(&objects(
        vec![plain.clone()],
        vec![node_port_slice(node_port_endpoints())],
    ));
    assert!(external_frontends(&state).is_empty(), "{state:#?}");
    let spec = spec(&mut plain);
    spec.external_ips = Some(vec!["198.51.100.10".into()]);
    spec.external_traffic_policy = Some("Local".into());
    let with_ips = with_ingress(plain, &[("198.51.100.20", None)]);
    let (state, _) = build_default(&objects(
        vec![with_ips],
        vec![node_port_slice(node_port_endpoints())],
    ));
    // Load-balancer IPs belong to type LoadBalancer only.
    assert_eq!(
        external_frontends(&state),
        BTreeSet::from([
            tcp("198.51.100.10", 80),
            fe("198.51.100.10", 53, Protocol::Udp)
        ])
    );
    let http = desired_of(&state, tcp("198.51.100.10", 80));
    assert!(
        !http.local_only && !http.two_scopes,
        "eTP applies to NodePort and LoadBalancer services only"
    );
    assert_eq!(backends_of(&state, tcp("198.51.100.10", 80)).len(), 2);
    assert_eq!(http.set(), desired_of(&state, tcp("10.96.0.10", 80)).set());
    assert!(
        state.frontends.keys().all(|f| f.scope == Scope::External),
        "{state:#?}"
    );
    assert!(state.health_checks.is_empty());
}

#[test]
fn load_balancers_without_node_ports_and_headless_services_get_none() {
    let no_node_ports = node_port_web(|spec| {
        spec.type_ = Some("LoadBalancer".into());
        spec.allocate_load_balancer_node_ports = Some(false);
        for port in spec.ports.iter_mut().flatten() {
            port.node_port = None;
        }
    });
    let (state, diagnostics) = build_default(&objects(vec![no_node_ports], vec![]));
    assert!(external_frontends(&state).is_empty(), "{state:#?}");
    // The ClusterIPs remain.
    assert_eq!(
        state.frontends.keys().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([tcp("10.96.0.10", 80), fe("10.96.0.10", 53, Protocol::Udp)])
    );
    assert_eq!(diagnostics, vec![]);
    let headless = node_port_web(|spec| {
        spec.cluster_ip = Some("None".into());
        spec.cluster_ips = Some(vec!["None".into()]);
        spec.external_ips = Some(vec!["198.51.100.10".into()]);
    });
    let (state, diagnostics) = build_default(&objects(vec![headless], vec![]));
    assert_eq!(state, DesiredState::default());
    assert_eq!(diagnostics, vec![]);
}

#[test]
fn node_port_and_load_balancer_ips_share_the_cluster_ip_set_under_cluster_policy() {
    let svc = |policy: &str| {
        let mut svc = with_ingress(
            node_port_web(|spec| {
                spec.type_ = Some("LoadBalancer".into());
                spec.external_traffic_policy = Some(policy.into());
                spec.external_ips = Some(vec!["198.51.100.10".into()]);
            }),
            &[("198.51.100.20", None)],
        );
        spec(&mut svc).internal_traffic_policy = Some("Cluster".into());
        svc
    };
    let cluster_ip = tcp("10.96.0.10", 80);
    let outside = [
        node_port(30080, Protocol::Tcp),
        tcp("198.51.100.10", 80),
        tcp("198.51.100.20", 80),
    ];
    let all = set_key("default", "web", "http", Endpoints::All);
    let local = set_key("default", "web", "http", Endpoints::Local);

    let (state, _) = build_default(&objects(
        vec![svc("Cluster")],
        vec![node_port_slice(node_port_endpoints())],
    ));
    assert_eq!(desired_of(&state, cluster_ip).set(), all);
    for frontend in outside {
        assert_eq!(desired_of(&state, frontend).set(), all, "{frontend}");
    }
    // One set per port: http and dns.
    assert_eq!(state.sets.len(), 2, "{:#?}", state.sets);

    let (state, _) = build_default(&objects(
        vec![svc("Local")],
        vec![node_port_slice(node_port_endpoints())],
    ));
    assert_eq!(desired_of(&state, cluster_ip).set(), all);
    for frontend in outside {
        assert_eq!(desired_of(&state, frontend).set(), local, "{frontend}");
        assert_eq!(
            desired_of(&state, frontend.in_scope(Scope::Internal)).set(),
            all,
            "{frontend}"
        );
    }
    assert_eq!(
        set_of(&state, outside[0]).backends,
        backends(&[("10.244.0.10", 8080)])
    );
    // Two sets per port.
    assert_eq!(state.sets.len(), 4, "{:#?}", state.sets);
}

#[test]
fn invalid_node_ports_and_external_addresses_are_reported_by_service() {
    let svc = with_ingress(
        node_port_web(|spec| {
            spec.type_ = Some("LoadBalancer".into());
            spec.external_ips = Some(vec![
                "2001:db8::1".into(),
                "198.51.100.300".into(),
                "198.51.100.10".into(),
            ]);
            // 30080 for port 80 stays; the dns port's nodePort is out of range.
            spec.ports.as_mut().unwrap()[1].node_port = Some(70_000);
        }),
        &[("2001:db8::2", None), ("not-an-ip", None)],
    );
    let (state, diagnostics) = build_default(&objects(
        vec![svc],
        vec![node_port_slice(node_port_endpoints())],
    ));
    // What is valid is served.
    assert_eq!(
        external_frontends(&state),
        BTreeSet::from([
            node_port(30080, Protocol::Tcp),
            tcp("198.51.100.10", 80),
            fe("198.51.100.10", 53, Protocol::Udp),
        ])
    );
    let mut found: Vec<(Severity, &str)> = Vec::new();
    for diagnostic in &diagnostics {
        assert_eq!(
            diagnostic.object,
            service_ref("default", "web"),
            "{diagnostic}"
        );
        assert!(
            diagnostic.to_string().starts_with("Service default/web: "),
            "{diagnostic}"
        );
        let what = [
            "70000",
            "2001:db8::1",
            "198.51.100.300",
            "2001:db8::2",
            "not-an-ip",
        ]
        .into_iter()
        .find(|needle| diagnostic.message.contains(needle))
        .unwrap_or_else(|| panic!("unexpected: {diagnostic}"));
        found.push((diagnostic.severity, what));
    }
    found.sort();
    assert_eq!(
        found,
        vec![
            // IPv6 is not served yet; the rest makes no sense.
            (Severity::Info, "2001:db8::1"),
            (Severity::Info, "2001:db8::2"),
            (Severity::Warning, "198.51.100.300"),
            (Severity::Warning, "70000"),
            (Severity::Warning, "not-an-ip"),
        ],
        "{diagnostics:#?}"
    );
    let node_port_problem = diagnostics
        .iter()
        .find(|d| d.message.contains("70000"))
        .unwrap();
    assert!(
        node_port_problem.message.contains("nodePort") && node_port_problem.message.contains("dns"),
        "{node_port_problem}"
    );
}

#[test]
fn terminating_endpoints_not_picked_are_kept_draining() {
    let objects_with = |endpoints| objects(vec![web()], vec![web_slice(endpoints)]);
    let (state, _) = build_default(&objects_with(vec![
        ep("10.244.1.1"),
        ep("10.244.1.2").conditions(Some(false), Some(true), Some(true)),
    ]));
    let set = set_of(&state, tcp("10.96.0.10", 80));
    assert_eq!(set.backends, backends(&[("10.244.1.1", 8080)]));
    assert!(set.terminating.is_empty());
    assert_eq!(set.draining, backends(&[("10.244.1.2", 8080)]));
    assert_eq!(
        set.members().copied().collect::<BTreeSet<_>>(),
        backends(&[("10.244.1.1", 8080), ("10.244.1.2", 8080)])
    );
    assert!(set.is_terminating(&backends(&[("10.244.1.2", 8080)]).pop_first().unwrap()));
    // Once it leaves the slice, nothing keeps it.
    let (state, _) = build_default(&objects_with(vec![ep("10.244.1.1")]));
    let set = set_of(&state, tcp("10.96.0.10", 80));
    assert_eq!(set.backends, backends(&[("10.244.1.1", 8080)]));
    assert!(set.draining.is_empty());

    // Under eTP Local, the local set keeps only this node's draining endpoints; the
    // cluster-wide one keeps them all.
    let svc = node_port_web(|spec| spec.external_traffic_policy = Some("Local".into()));
    let (state, _) = build_default(&objects(
        vec![svc],
        vec![node_port_slice(vec![
            ep("10.244.0.10").on_node(NODE),
            ep("10.244.0.11")
                .on_node(NODE)
                .conditions(Some(false), Some(true), Some(true)),
            ep("10.244.1.11")
                .on_node("node-b")
                .conditions(Some(false), Some(true), Some(true)),
        ])],
    ));
    let local = set_of(&state, node_port(30080, Protocol::Tcp));
    assert_eq!(local.backends, backends(&[("10.244.0.10", 8080)]));
    assert_eq!(local.draining, backends(&[("10.244.0.11", 8080)]));
    assert_eq!(
        local.local,
        backends(&[("10.244.0.10", 8080), ("10.244.0.11", 8080)])
    );
    let all = set_of(&state, tcp("10.96.0.10", 80));
    assert_eq!(all.backends, backends(&[("10.244.0.10", 8080)]));
    assert_eq!(
        all.draining,
        backends(&[("10.244.0.11", 8080), ("10.244.1.11", 8080)])
    );
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
        state.frontends.keys().copied().collect::<Vec<_>>(),
        vec![tcp("10.96.0.10", 80), fe("10.96.0.10", 80, Protocol::Udp)]
    );
    let winner = &state.frontends[&tcp("10.96.0.10", 80)].name;
    let loser = if &*winner.name == "alpha" {
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

/// The state and diagnostics of a model fed `first`, then `then` (which keeps `first`'s
/// objects as they are, so only the new ones are computed).
fn in_order(first: &Objects, then: &Objects) -> (DesiredState, Vec<Diagnostic>) {
    let mut model = Model::new(identity());
    model.update(first);
    model.update(then);
    (model.desired().clone(), model.diagnostics())
}

/// `base` with `more`'s objects added (the `Arc`s of both kept).
fn plus(base: &Objects, more: &Objects) -> Objects {
    let mut all = base.clone();
    all.services
        .extend(more.services.iter().map(|(k, v)| (k.clone(), v.clone())));
    all.endpoint_slices.extend(
        more.endpoint_slices
            .iter()
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    all
}

#[test]
fn an_external_ip_on_another_services_cluster_ip_never_takes_it_over() {
    // CVE-2020-8554: a Service in a namespace sorting before kube-system lists kube-dns's
    // ClusterIP among its externalIPs, as a plain ClusterIP service and as a LoadBalancer
    // with eTP Local (whose externalIPs also get an entry for in-node clients).
    let dns_ports: &[(&str, i32, &str)] = &[("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")];
    let kube_dns = objects(
        vec![service("kube-system", "kube-dns", "10.96.0.10", dns_ports)],
        vec![slice(
            "kube-system",
            "kube-dns-x7k2p",
            "kube-dns",
            dns_ports,
            vec![ep("10.244.0.3"), ep("10.244.0.4")],
        )],
    );
    let dns_backends = backends(&[("10.244.0.3", 53), ("10.244.0.4", 53)]);
    for kind in ["ClusterIP", "LoadBalancer"] {
        let mut evil = service("aaa", "evil", "10.96.200.1", dns_ports);
        if kind == "LoadBalancer" {
            evil = with_node_ports(evil, kind, &[30053, 30054], "Local");
        }
        spec(&mut evil).external_ips = Some(vec!["10.96.0.10".into()]);
        let attacker = objects(
            vec![evil],
            vec![slice(
                "aaa",
                "evil-1",
                "evil",
                &[("dns", 5353, "UDP"), ("dns-tcp", 5353, "TCP")],
                vec![ep("10.244.9.9").on_node(NODE)],
            )],
        );
        let check = |order: &str, (state, diagnostics): (DesiredState, Vec<Diagnostic>)| {
            for (protocol, port) in [(Protocol::Udp, "dns"), (Protocol::Tcp, "dns-tcp")] {
                let frontend = fe("10.96.0.10", 53, protocol);
                let entry = desired_of(&state, frontend);
                assert_eq!(entry.kind, FrontendKind::ClusterIP, "{kind}, {order}");
                assert_eq!(
                    entry.name,
                    port_name("kube-system", "kube-dns", port),
                    "{kind}, {order}"
                );
                assert!(!entry.two_scopes, "{kind}, {order}");
                assert_eq!(
                    backends_of(&state, frontend),
                    dns_backends,
                    "{kind}, {order}"
                );
                // Nor is anything of the attacker served for in-node clients there.
                assert!(
                    !state
                        .frontends
                        .contains_key(&frontend.in_scope(Scope::Internal)),
                    "{kind}, {order}: {state:#?}"
                );
                // The attacker's own ClusterIP is served as usual.
                assert_eq!(
                    desired_of(&state, fe("10.96.200.1", 53, protocol)).name,
                    port_name("aaa", "evil", port)
                );
            }
            let warnings: Vec<&Diagnostic> = diagnostics
                .iter()
                .filter(|d| d.object == service_ref("aaa", "evil"))
                .collect();
            assert_eq!(warnings.len(), 2, "{kind}, {order}: {diagnostics:#?}");
            for (warning, protocol) in warnings.iter().zip(["TCP", "UDP"]) {
                assert_eq!(warning.severity, Severity::Warning);
                assert!(
                    warning
                        .message
                        .contains(&format!("10.96.0.10:53/{protocol}"))
                        && warning.message.contains("kube-system/kube-dns"),
                    "{kind}, {order}: {warning}"
                );
            }
            assert!(
                diagnostics
                    .iter()
                    .all(|d| d.object == service_ref("aaa", "evil")),
                "{kind}, {order}: {diagnostics:#?}"
            );
            state
        };
        let both = plus(&kube_dns, &attacker);
        let fresh = check("fresh build", build_default(&both));
        let dns_first = check("kube-dns first", in_order(&kube_dns, &both));
        let attacker_first = check("attacker first", in_order(&attacker, &both));
        assert_eq!(dns_first, fresh, "{kind}");
        assert_eq!(attacker_first, fresh, "{kind}");
        // And when kube-dns goes, the address is the attacker's (it is only an address).
        let mut without_dns = both.clone();
        without_dns.services.clear();
        without_dns.services.extend(attacker.services.clone());
        let mut model = Model::new(identity());
        model.update(&both);
        model.update(&without_dns);
        let (alone, _) = build_default(&without_dns);
        assert_eq!(model.desired(), &alone, "{kind}");
        assert_eq!(
            desired_of(&alone, fe("10.96.0.10", 53, Protocol::Udp)).name,
            port_name("aaa", "evil", "dns")
        );
    }
}

#[test]
fn two_services_on_one_external_ip_the_first_by_name_wins() {
    let with_ip = |name: &str, cluster_ip: &str| {
        let mut svc = service("default", name, cluster_ip, &[("http", 80, "TCP")]);
        spec(&mut svc).external_ips = Some(vec!["198.51.100.10".into()]);
        svc
    };
    let alpha = objects(vec![with_ip("alpha", "10.96.0.11")], vec![]);
    let beta = objects(vec![with_ip("beta", "10.96.0.12")], vec![]);
    let both = plus(&alpha, &beta);
    for (order, (state, diagnostics)) in [
        ("fresh", build_default(&both)),
        ("alpha first", in_order(&alpha, &both)),
        ("beta first", in_order(&beta, &both)),
    ] {
        assert_eq!(
            desired_of(&state, tcp("198.51.100.10", 80)).name,
            port_name("default", "alpha", "http"),
            "{order}"
        );
        assert_eq!(diagnostics.len(), 1, "{order}: {diagnostics:?}");
        assert_eq!(diagnostics[0].object, service_ref("default", "beta"));
        assert!(
            diagnostics[0].message.contains("198.51.100.10:80/TCP")
                && diagnostics[0].message.contains("default/alpha"),
            "{}",
            diagnostics[0]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Sequences of changes: every step ends in exactly the state a fresh build computes, and the
// maps a reconciler keeps in step hold exactly what a fresh reconciler writes.

/// Runs `steps` in order against one incremental model, one reconciler and one set of maps;
/// at every step compares with `expected` (a fresh build of independently constructed
/// objects) and with a fresh reconciler on empty maps.
fn converges(steps: &[(Objects, Objects)]) {
    let mut model = Model::new(identity());
    let mut reconciler = Reconciler::default();
    let mut maps = MemoryMaps::default();
    for (index, (incremental, fresh)) in steps.iter().enumerate() {
        model.update(incremental);
        let (desired, _) = build_default(incremental);
        let (expected, _) = build_default(fresh);
        assert_eq!(desired, expected, "step {index}");
        assert_eq!(
            model.desired(),
            &expected,
            "step {index}: the incremental model"
        );
        let report = reconciler.sync(&desired, &mut maps);
        assert!(report.failed.is_empty(), "step {index}: {report:?}");
        let mut fresh_maps = MemoryMaps::default();
        Reconciler::default().sync(&desired, &mut fresh_maps);
        assert_eq!(
            view_without_ids(&maps.contents),
            view_without_ids(&fresh_maps.contents),
            "step {index}"
        );
        assert_eq!(
            view_without_ids(&maps.contents),
            expected_view(&desired),
            "step {index}"
        );
        // Nothing left over: exactly the live slots, the backends the sets keep and the
        // Maglev tables of the sets outside traffic reaches.
        if let Err(problem) = exact(&maps, &desired) {
            panic!(
                "step {index}: {problem}\nmaps: {:#?}\ndesired: {desired:#?}",
                maps.contents
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What maps mean, up to ids (shared with the reconciler's tests)

/// What one frontend entry means, without the ids a reconciler happened to hand out: kind,
/// which set it names (numbered by the first frontend, in frontend order, naming it), the
/// backends new connections may pick, affinity and flags.
pub(crate) type Meaning = (
    Option<FrontendKind>,
    usize,
    BTreeSet<Backend>,
    Option<u32>,
    u8,
);

/// Numbers `ids` by first appearance: equal ids get equal numbers, different ones different.
fn canonical<T: Ord + Clone>(ids: impl Iterator<Item = T>) -> Vec<usize> {
    let mut seen = BTreeMap::new();
    ids.map(|id| {
        let next = seen.len();
        *seen.entry(id).or_insert(next)
    })
    .collect()
}

/// The maps' [`MapContents::view`] up to service ids: which frontends share a service id is
/// kept, the numbers are not.
pub(crate) fn view_without_ids(contents: &MapContents) -> BTreeMap<Frontend, Meaning> {
    let view = contents.view();
    let sets = canonical(view.values().map(|v| v.service_id));
    view.into_iter()
        .zip(sets)
        .map(|((frontend, v), set)| {
            (
                frontend,
                (v.kind, set, v.backends, v.affinity_timeout_secs, v.flags),
            )
        })
        .collect()
}

/// The flags a frontend entry of `service` carries.
pub(crate) fn frontend_flags_of(service: &DesiredService) -> u8 {
    use lb_common::frontend_flags::*;
    let mut flags = 0;
    if service.affinity_timeout_secs.is_some() {
        flags |= AFFINITY;
    }
    if service.local_only {
        flags |= LOCAL_ONLY;
    }
    if service.two_scopes {
        flags |= TWO_SCOPES;
    }
    if let Some(ranges) = &service.source_ranges {
        flags |= SOURCE_RANGES;
        if ranges.allow_node {
            flags |= RANGES_ALLOW_NODE;
        }
        if ranges.allow_pods {
            flags |= RANGES_ALLOW_PODS;
        }
    }
    flags
}

/// What the maps should mean for `desired`, in the terms of [`view_without_ids`].
pub(crate) fn expected_view(desired: &DesiredState) -> BTreeMap<Frontend, Meaning> {
    let sets = canonical(desired.frontends.values().map(DesiredService::set));
    desired
        .frontends
        .iter()
        .zip(sets)
        .map(|((frontend, service), set)| {
            (
                *frontend,
                (
                    Some(service.kind),
                    set,
                    desired.backends_of(frontend),
                    service.affinity_timeout_secs,
                    frontend_flags_of(service),
                ),
            )
        })
        .collect()
}

/// The maps hold exactly `desired` (up to the naming of ids): one entry per frontend with the
/// right kind, count and flags; one service id per backend set, shared by all its frontends
/// and by no other set; exactly the slots of each set's live generation, naming its backends;
/// one backend id per address and port, exactly the members of the programmed sets, each with
/// its state and locality; a Maglev table, naming the set's backends, exactly for the sets
/// with backends that outside traffic reaches; nothing else.
pub(crate) fn exact(maps: &MemoryMaps, desired: &DesiredState) -> Result<(), String> {
    use lb_common::{FrontendValue, SlotKey, backend_flags, backend_states};

    use crate::reconcile::maglev;
    let contents = &maps.contents;
    let wanted: BTreeSet<Frontend> = desired.frontends.keys().copied().collect();
    let present: BTreeSet<Frontend> = contents.frontends.keys().copied().collect();
    if wanted != present {
        return Err(format!(
            "frontend entries differ from the desired frontends: missing {:?}, extra {:?}",
            wanted.difference(&present).collect::<Vec<_>>(),
            present.difference(&wanted).collect::<Vec<_>>()
        ));
    }
    // Each programmed set: its entry (every frontend of the set must agree on it) and
    // whether outside traffic reaches it.
    let mut programmed: BTreeMap<SetKey, (FrontendValue, bool)> = BTreeMap::new();
    let mut owners: BTreeMap<u32, SetKey> = BTreeMap::new();
    for (frontend, service) in &desired.frontends {
        let value = contents.frontends[frontend];
        let key = service.set();
        let Some(set) = desired.sets.get(&key) else {
            return Err(format!(
                "{frontend} names the set {key}, which is not desired"
            ));
        };
        let timeout = service.affinity_timeout_secs.unwrap_or(0);
        if value.kind != service.kind.number()
            || value.flags != frontend_flags_of(service)
            || value.affinity_timeout_secs != timeout
            || value.count as usize != set.backends.len()
            || value.generation > 1
            || value.pad != [0; 3]
        {
            return Err(format!("{frontend}: wrong frontend value {value:?}"));
        }
        if let Some(other) = owners.insert(value.service_id, key.clone())
            && other != key
        {
            return Err(format!(
                "service id {} names both {other} and {key}",
                value.service_id
            ));
        }
        let outside = service.kind.is_external() && frontend.scope == Scope::External;
        let entry = programmed.entry(key).or_insert((value, false));
        if (entry.0.service_id, entry.0.generation, entry.0.count)
            != (value.service_id, value.generation, value.count)
        {
            return Err(format!(
                "{frontend}: {value:?} disagrees with another frontend of its set: {:?}",
                entry.0
            ));
        }
        entry.1 |= outside;
    }
    // Exactly the allowed sources of the frontends with source ranges, under their ids.
    let wanted_ranges: BTreeSet<(u32, crate::cidr::Cidr)> = desired
        .frontends
        .iter()
        .filter_map(|(frontend, service)| Some((frontend, service.source_ranges.as_ref()?)))
        .flat_map(|(frontend, ranges)| {
            let id = contents.frontends[frontend].service_id;
            ranges.allowed.iter().map(move |range| (id, *range))
        })
        .collect();
    if wanted_ranges != contents.source_ranges {
        return Err(format!(
            "source ranges: want {wanted_ranges:?}, the maps hold {:?}",
            contents.source_ranges
        ));
    }
    let mut ids = BTreeMap::new();
    for (id, value) in &contents.backends {
        if let Some(other) = ids.insert(value.backend, *id) {
            return Err(format!(
                "backend {} has two ids, {other} and {id}",
                value.backend
            ));
        }
    }
    let mut slots = BTreeSet::new();
    let mut members = BTreeSet::new();
    let mut tables = BTreeSet::new();
    for (key, (value, outside)) in &programmed {
        let set = &desired.sets[key];
        let mut picks = Vec::new();
        let mut picked_ids = Vec::new();
        for index in 0..value.count {
            let slot = SlotKey {
                service_id: value.service_id,
                index,
                generation: value.generation,
                pad: 0,
            };
            slots.insert(slot);
            let id = contents
                .slots
                .get(&slot)
                .ok_or(format!("{key}: slot {slot:?} missing"))?
                .backend_id;
            let backend = contents
                .backends
                .get(&id)
                .ok_or(format!("{key}: slot {slot:?} names missing backend {id}"))?;
            if backend.backend.family() != key.family {
                return Err(format!(
                    "{key}: slot {slot:?} names {}, of the other family",
                    backend.backend
                ));
            }
            picks.push(backend.backend);
            picked_ids.push(id);
        }
        if picks.iter().copied().collect::<BTreeSet<_>>() != set.backends
            || picks.len() != set.backends.len()
        {
            return Err(format!("{key}: slots name {picks:?}"));
        }
        members.extend(set.members().copied());
        if *outside && value.count > 0 {
            tables.insert(value.service_id);
            let Some(table) = maps.tables.get(&value.service_id) else {
                return Err(format!("{key}: no Maglev table"));
            };
            // The table of the backends sorted, as every node builds it.
            let mut sorted: Vec<(Backend, u32)> = picks.into_iter().zip(picked_ids).collect();
            sorted.sort();
            let (picks, picked_ids): (Vec<Backend>, Vec<u32>) = sorted.into_iter().unzip();
            if **table != *maglev::table_for(&picks, &picked_ids) {
                return Err(format!("{key}: wrong Maglev table"));
            }
        }
    }
    if contents.slots.keys().copied().collect::<BTreeSet<_>>() != slots {
        return Err("slots other than the live generations are left".into());
    }
    if ids.keys().copied().collect::<BTreeSet<_>>() != members {
        return Err(format!(
            "backends {:?} are in the maps, the sets keep {members:?}",
            ids.keys().collect::<Vec<_>>()
        ));
    }
    if maps.tables.keys().copied().collect::<BTreeSet<_>>() != tables || contents.maglev != tables {
        return Err(format!(
            "Maglev tables {:?} (ids {:?}), wanted {tables:?}",
            maps.tables.keys().collect::<Vec<_>>(),
            contents.maglev
        ));
    }
    // A backend's state and locality: terminating when any set keeping it says so (affinity
    // must not stick to it there); local only when every set keeping it says so (a backend
    // wrongly taken for local would get outside traffic without SNAT).
    for backend in &members {
        let keeping: Vec<&BackendSet> = programmed
            .keys()
            .map(|key| &desired.sets[key])
            .filter(|set| set.members().any(|b| b == backend))
            .collect();
        let state = if keeping.iter().any(|set| set.is_terminating(backend)) {
            backend_states::TERMINATING
        } else {
            backend_states::ACTIVE
        };
        let flags = if keeping.iter().all(|set| set.local.contains(backend)) {
            backend_flags::LOCAL
        } else {
            0
        };
        let value = contents.backends[&ids[backend]];
        if (value.state, value.flags) != (state, flags) {
            return Err(format!(
                "backend {backend}: state {} flags {}, wanted state {state} flags {flags}",
                value.state, value.flags
            ));
        }
    }
    Ok(())
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
        .insert(ObjectKey::new("default", "web"), Arc::new(web().into()));
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
    let mut updated = external();
    {
        let spec = spec(&mut updated);
        spec.type_ = Some("ClusterIP".into());
        spec.external_name = None;
        spec.cluster_ip = Some("10.96.0.10".into());
        spec.cluster_ips = Some(vec!["10.96.0.10".into()]);
    }
    current
        .services
        .insert(key.clone(), Arc::new(updated.into()));
    steps.push((current.clone(), objects(vec![web()], slices.clone())));
    let (state, _) = build_default(&current);
    assert_eq!(
        backends_of(&state, tcp("10.96.0.10", 80)),
        backends(&[("10.244.1.1", 8080)])
    );

    current.services.insert(key, Arc::new(external().into()));
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
        .insert(ObjectKey::new("default", "web"), Arc::new(moved().into()));
    let (state, _) = build_default(&current);
    assert_eq!(
        state.frontends.keys().copied().collect::<Vec<_>>(),
        vec![tcp("10.96.7.7", 80)]
    );
    converges(&[
        (first, objects(vec![web()], slices.clone())),
        (current, objects(vec![moved()], slices)),
    ]);
}

/// A Service going from IPv4 to dual-stack and to IPv6 only, its IPv6 slice arriving after
/// it and the node's IPv6 address changing: the incremental model and the maps it drives
/// end where a fresh build does at every step.
#[test]
fn a_service_becoming_dual_stack_then_ipv6_only_converges() {
    let v4_slice = web_slice(vec![ep("10.244.1.1"), ep("10.244.1.2")]);
    let v6_slice = || web_slice6(vec![ep("fd00:10:244::1")]);
    let dual = || {
        with_node_ports(
            web_dual("RequireDualStack"),
            "NodePort",
            &[30080],
            "Cluster",
        )
    };
    let v6_only = || {
        with_node_ports(
            with_families(web(), "SingleStack", &["fd00:10:96::a"], &["IPv6"]),
            "NodePort",
            &[30080],
            "Local",
        )
    };
    let v4_node_port = || with_node_ports(web(), "NodePort", &[30080], "Cluster");
    let mut current = objects(vec![v4_node_port()], vec![v4_slice.clone()]);
    let mut steps = vec![(
        current.clone(),
        objects(vec![v4_node_port()], vec![v4_slice.clone()]),
    )];
    // Dual-stack, before its IPv6 slice exists: the IPv6 frontends refuse.
    current
        .services
        .insert(ObjectKey::new("default", "web"), Arc::new(dual().into()));
    steps.push((
        current.clone(),
        objects(vec![dual()], vec![v4_slice.clone()]),
    ));
    let (state, _) = build_default(&current);
    assert_eq!(
        backends_of(&state, tcp("fd00:10:96::a", 80)),
        BTreeSet::new()
    );
    // The IPv6 slice arrives.
    let slice = v6_slice();
    current
        .endpoint_slices
        .insert(ObjectKey::of(&slice.metadata), Arc::new(slice.into()));
    steps.push((
        current.clone(),
        objects(vec![dual()], vec![v4_slice.clone(), v6_slice()]),
    ));
    // This node gets an IPv6 endpoint and an IPv6 address (every service is recomputed).
    let local = web_slice6(vec![
        ep("fd00:10:244::1"),
        ep("fd00:10:244::9").on_node(NODE),
    ]);
    current.endpoint_slices.insert(
        ObjectKey::of(&local.metadata),
        Arc::new(local.clone().into()),
    );
    let mut this_node = node(NODE, None);
    this_node.status = Some(k8s_openapi::api::core::v1::NodeStatus {
        addresses: Some(vec![k8s_openapi::api::core::v1::NodeAddress {
            type_: "InternalIP".into(),
            address: "fd00:60::2".into(),
        }]),
        ..Default::default()
    });
    current
        .nodes
        .insert(NODE.into(), Arc::new(this_node.clone().into()));
    let mut fresh = objects(vec![dual()], vec![v4_slice.clone(), local.clone()]);
    fresh
        .nodes
        .insert(NODE.into(), Arc::new(this_node.clone().into()));
    steps.push((current.clone(), fresh));
    // IPv6 only, Local policy: the IPv4 frontends and set go.
    current
        .services
        .insert(ObjectKey::new("default", "web"), Arc::new(v6_only().into()));
    let mut fresh = objects(vec![v6_only()], vec![v4_slice.clone(), local]);
    fresh.nodes.insert(NODE.into(), Arc::new(this_node.into()));
    steps.push((current.clone(), fresh));
    let (state, _) = build_default(&current);
    assert!(
        state.frontends.keys().all(|f| f.family() == Family::V6),
        "{state:#?}"
    );
    assert_eq!(
        backends_of(&state, node_port6(30080, Protocol::Tcp)),
        backends(&[("fd00:10:244::9", 8080)])
    );
    converges(&steps);
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
    current
        .services
        .insert(key.clone(), Arc::new(two_ports().into()));
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
    current
        .services
        .insert(key.clone(), Arc::new(https_only().into()));
    steps.push((current.clone(), objects(vec![https_only()], slices_two())));
    let (state, _) = build_default(&current);
    assert_eq!(
        state.frontends.keys().copied().collect::<Vec<_>>(),
        vec![tcp("10.96.0.10", 443)]
    );
    // Service deleted: nothing left.
    current.services.remove(&key);
    steps.push((current.clone(), objects(vec![], slices_two())));
    converges(&steps);
}

// ---- loadBalancerSourceRanges ----

/// A LoadBalancer service `web` at 203.0.113.7 (and an externalIP) with these source
/// ranges, on a node with InternalIP 192.168.60.2 and pod CIDR 10.244.0.0/24.
fn ranged(ranges: &[&str]) -> (DesiredState, Vec<Diagnostic>) {
    let mut svc = with_ingress(
        with_node_ports(web(), "LoadBalancer", &[30080], "Cluster"),
        &[("203.0.113.7", None)],
    );
    spec(&mut svc).external_ips = Some(vec!["198.51.100.10".into()]);
    spec(&mut svc).load_balancer_source_ranges =
        Some(ranges.iter().map(|r| (*r).to_owned()).collect());
    let mut objects = objects(vec![svc], vec![web_slice(vec![ep("10.244.1.5")])]);
    let mut this_node = node(NODE, None);
    this_node.status = Some(k8s_openapi::api::core::v1::NodeStatus {
        addresses: Some(vec![
            k8s_openapi::api::core::v1::NodeAddress {
                type_: "Hostname".into(),
                address: NODE.into(),
            },
            k8s_openapi::api::core::v1::NodeAddress {
                type_: "InternalIP".into(),
                address: "192.168.60.2".into(),
            },
        ]),
        ..Default::default()
    });
    objects
        .nodes
        .insert(NODE.into(), Arc::new(this_node.into()));
    build_default(&objects)
}

fn cidrs(list: &[&str]) -> BTreeSet<crate::cidr::Cidr> {
    list.iter().map(|c| c.parse().unwrap()).collect()
}

#[test]
fn source_ranges_filter_load_balancer_ips_only() {
    let (state, diagnostics) = ranged(&["192.0.2.0/24", " 198.18.0.9/32 "]);
    assert_eq!(diagnostics, vec![]);
    let lb = desired_of(&state, tcp("203.0.113.7", 80));
    assert_eq!(
        lb.source_ranges,
        Some(SourceRanges {
            allowed: cidrs(&["192.0.2.0/24", "198.18.0.9/32"]),
            allow_node: false,
            allow_pods: false,
        })
    );
    // "nodeports are not subject to loadBalancerSourceRanges", nor are externalIPs or the
    // ClusterIP.
    for other in [
        tcp("198.51.100.10", 80),
        node_port(30080, Protocol::Tcp),
        tcp("10.96.0.10", 80),
    ] {
        assert_eq!(desired_of(&state, other).source_ranges, None, "{other}");
    }
}

#[test]
fn a_range_holding_the_node_ip_lets_the_node_and_the_load_balancer_ips_in() {
    let (state, _) = ranged(&["192.168.60.0/24"]);
    let ranges = desired_of(&state, tcp("203.0.113.7", 80))
        .source_ranges
        .clone()
        .unwrap();
    assert!(ranges.allow_node && !ranges.allow_pods, "{ranges:?}");
    // A VIP the node holds locally loops back with itself as the source.
    assert_eq!(
        ranges.allowed,
        cidrs(&["192.168.60.0/24", "203.0.113.7/32"])
    );
    // The pods' CIDR whole, and host bits cleared as the API server's parser does.
    let (state, _) = ranged(&["10.244.0.77/16"]);
    let ranges = desired_of(&state, tcp("203.0.113.7", 80))
        .source_ranges
        .clone()
        .unwrap();
    assert!(!ranges.allow_node && ranges.allow_pods, "{ranges:?}");
    assert_eq!(ranges.allowed, cidrs(&["10.244.0.0/16"]));
    // A range that holds only some of the pods does not let a pod of unknown source in.
    let (state, _) = ranged(&["10.244.0.0/25"]);
    let ranges = desired_of(&state, tcp("203.0.113.7", 80))
        .source_ranges
        .clone()
        .unwrap();
    assert!(!ranges.allow_pods, "{ranges:?}");
}

#[test]
fn everything_or_nothing_usable_means_no_firewall_and_bad_entries_are_named() {
    // 0.0.0.0/0 allows every source: kube-proxy drops the firewall.
    let (state, _) = ranged(&["192.0.2.0/24", "0.0.0.0/0"]);
    assert_eq!(
        desired_of(&state, tcp("203.0.113.7", 80)).source_ranges,
        None
    );
    // IPv6 ranges do not apply to an IPv4 address; alone they leave it open (kube-proxy's
    // IPv4 proxier sees no range), and that is said.
    let (state, diagnostics) = ranged(&["2001:db8::/64"]);
    assert_eq!(
        desired_of(&state, tcp("203.0.113.7", 80)).source_ranges,
        None
    );
    assert!(
        diagnostics.iter().any(|d| d.severity == Severity::Warning
            && d.message.contains("no IPv4 range")
            && d.message.contains("203.0.113.7")),
        "{diagnostics:?}"
    );
    // Not a CIDR: reported by name, ignored, the rest applied.
    let (state, diagnostics) = ranged(&["192.0.2.0/24", "192.0.2.300/24", "10.0.0.1"]);
    assert_eq!(
        desired_of(&state, tcp("203.0.113.7", 80))
            .source_ranges
            .as_ref()
            .map(|r| r.allowed.clone()),
        Some(cidrs(&["192.0.2.0/24"]))
    );
    let warned: Vec<&str> = diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Warning)
        .map(|d| d.message.as_str())
        .collect();
    assert_eq!(warned.len(), 2, "{diagnostics:?}");
    assert!(warned[0].contains("\"192.0.2.300/24\"") || warned[1].contains("\"192.0.2.300/24\""));
    assert!(
        diagnostics
            .iter()
            .all(|d| d.object == service_ref("default", "web"))
    );
}

/// A dual-stack LoadBalancer `web` (203.0.113.7 and 2001:db8:7::7) with these source ranges,
/// on a node with InternalIPs 192.168.60.2 and fd00:60::2 and pod CIDRs 10.244.0.0/24 and
/// fd00:10:244::/64.
fn ranged_dual(ranges: &[&str]) -> (DesiredState, Vec<Diagnostic>) {
    let mut svc = with_ingress(
        with_node_ports(
            web_dual("RequireDualStack"),
            "LoadBalancer",
            &[30080],
            "Cluster",
        ),
        &[("203.0.113.7", None), ("2001:db8:7::7", None)],
    );
    spec(&mut svc).load_balancer_source_ranges =
        Some(ranges.iter().map(|r| (*r).to_owned()).collect());
    let mut objects = objects(
        vec![svc],
        vec![
            web_slice(vec![ep("10.244.1.5")]),
            web_slice6(vec![ep("fd00:10:244:1::5")]),
        ],
    );
    let mut this_node = node(NODE, None);
    this_node.spec.as_mut().unwrap().pod_cidrs =
        Some(vec!["10.244.0.0/24".into(), "fd00:10:244::/64".into()]);
    let address = |type_: &str, address: &str| k8s_openapi::api::core::v1::NodeAddress {
        type_: type_.into(),
        address: address.into(),
    };
    this_node.status = Some(k8s_openapi::api::core::v1::NodeStatus {
        addresses: Some(vec![
            address("Hostname", NODE),
            address("InternalIP", "192.168.60.2"),
            address("InternalIP", "fd00:60::2"),
        ]),
        ..Default::default()
    });
    objects
        .nodes
        .insert(NODE.into(), Arc::new(this_node.into()));
    build_default(&objects)
}

#[test]
fn source_ranges_apply_to_the_load_balancer_ips_of_their_family() {
    let (state, diagnostics) = ranged_dual(&["192.0.2.0/24", "2001:db8:1::/48"]);
    assert_eq!(diagnostics, vec![]);
    let ranges_of =
        |state: &DesiredState, ip: &str| desired_of(state, tcp(ip, 80)).source_ranges.clone();
    assert_eq!(
        ranges_of(&state, "203.0.113.7"),
        Some(SourceRanges {
            allowed: cidrs(&["192.0.2.0/24"]),
            allow_node: false,
            allow_pods: false,
        })
    );
    assert_eq!(
        ranges_of(&state, "2001:db8:7::7"),
        Some(SourceRanges {
            allowed: cidrs(&["2001:db8:1::/48"]),
            allow_node: false,
            allow_pods: false,
        })
    );
    // The node's and the pods' IPv6 addresses decide for the IPv6 IP only.
    let (state, _) = ranged_dual(&["192.0.2.0/24", "fd00:60::/64", "fd00:10::/32"]);
    assert_eq!(
        ranges_of(&state, "2001:db8:7::7"),
        Some(SourceRanges {
            allowed: cidrs(&["fd00:60::/64", "fd00:10::/32", "2001:db8:7::7/128"]),
            allow_node: true,
            allow_pods: true,
        })
    );
    assert_eq!(
        ranges_of(&state, "203.0.113.7").map(|r| (r.allow_node, r.allow_pods)),
        Some((false, false))
    );
    // Ranges of one family only: the other family's IPs are open, as with kube-proxy, and
    // that is said; `::/0` opens the IPv6 IPs alone.
    let (state, diagnostics) = ranged_dual(&["192.0.2.0/24"]);
    assert_eq!(ranges_of(&state, "2001:db8:7::7"), None);
    assert!(ranges_of(&state, "203.0.113.7").is_some());
    assert_eq!(diagnostics.len(), 1, "{diagnostics:#?}");
    assert!(
        diagnostics[0].severity == Severity::Warning
            && diagnostics[0].message.contains("no IPv6 range")
            && diagnostics[0].message.contains("2001:db8:7::7"),
        "{diagnostics:#?}"
    );
    let (state, diagnostics) = ranged_dual(&["192.0.2.0/24", "::/0"]);
    assert_eq!(diagnostics, vec![]);
    assert_eq!(ranges_of(&state, "2001:db8:7::7"), None);
    assert!(ranges_of(&state, "203.0.113.7").is_some());
    // NodePorts of either family are never filtered.
    for node_port in [
        node_port(30080, Protocol::Tcp),
        node_port6(30080, Protocol::Tcp),
    ] {
        assert_eq!(desired_of(&state, node_port).source_ranges, None);
    }
}

/// kube-proxy's node eligibility: a deletionTimestamp or the autoscaler's taint (whatever
/// its effect) make a node ineligible; other taints do not. `this_node` finds only this
/// node's Node.
#[test]
fn node_eligibility_follows_deletion_timestamp_and_the_autoscaler_taint() {
    use k8s_openapi::{api::core::v1::Taint, apimachinery::pkg::apis::meta::v1::Time};
    let taint = |key: &str, effect: &str| Taint {
        key: key.into(),
        effect: effect.into(),
        value: Some("1700000000".into()),
        time_added: None,
    };
    let with_taints = |taints: Vec<Taint>| {
        let mut n = node(NODE, None);
        n.spec.as_mut().unwrap().taints = Some(taints);
        n
    };

    let ineligible_because = |node: &Node| super::node_ineligible_because(&node.into());
    assert_eq!(ineligible_because(&node(NODE, None)), None);
    let other = with_taints(vec![taint(
        "node.kubernetes.io/unschedulable",
        "NoSchedule",
    )]);
    assert_eq!(ineligible_because(&other), None);
    for effect in ["NoSchedule", "PreferNoSchedule", "NoExecute"] {
        let tainted = with_taints(vec![
            taint("node.kubernetes.io/unschedulable", "NoSchedule"),
            taint(super::TO_BE_DELETED_TAINT, effect),
        ]);
        assert!(
            ineligible_because(&tainted).is_some_and(|why| why.contains("tainted")),
            "{effect}"
        );
    }
    let mut deleting = node(NODE, None);
    deleting.metadata.deletion_timestamp = Some(Time("2025-01-01T00:00:00Z".parse().unwrap()));
    assert!(ineligible_because(&deleting).is_some_and(|why| why.contains("deleted")));
    let mut no_spec = node(NODE, None);
    no_spec.spec = None;
    assert_eq!(ineligible_because(&no_spec), None);

    let mut all = Objects::default();
    all.nodes
        .insert("node-b".into(), Arc::new(deleting.clone().into()));
    assert!(
        super::this_node(&all, &identity()).is_none(),
        "another node's Node"
    );
    all.nodes
        .insert(NODE.into(), Arc::new(node(NODE, None).into()));
    assert_eq!(
        super::this_node(&all, &identity()),
        Some(&node(NODE, None).into())
    );
}

/// A delta recomputes only the services it names: one slice changed beside many services
/// reports that service's frontends and sets alone, and the result is a fresh build's.
#[test]
fn a_delta_recomputes_only_the_services_it_changes() {
    use super::ObjectChanges;
    let services: Vec<Service> = (0..200)
        .map(|i| {
            service(
                "default",
                &format!("s{i}"),
                &format!("10.96.{}.{}", i / 250, i % 250 + 1),
                &[("http", 80, "TCP")],
            )
        })
        .collect();
    let slices: Vec<EndpointSlice> = (0..200)
        .map(|i| {
            slice(
                "default",
                &format!("s{i}-abc"),
                &format!("s{i}"),
                &[("http", 8080, "TCP")],
                vec![ep(&format!("10.0.{}.{}", i / 250, i % 250 + 1))],
            )
        })
        .collect();
    let all = objects(services, slices);
    let mut model = Model::new(identity());
    let first = model.apply(&ObjectChanges::of(&all));
    assert_eq!(first.frontends.len(), 200);

    let mut changed = all.clone();
    let key = ObjectKey::new("default", "s7-abc");
    changed.endpoint_slices.insert(
        key.clone(),
        Arc::new(
            slice(
                "default",
                "s7-abc",
                "s7",
                &[("http", 8080, "TCP")],
                vec![ep("10.0.0.8"), ep("10.0.9.9")],
            )
            .into(),
        ),
    );
    let mut delta = ObjectChanges::default();
    delta
        .endpoint_slices
        .insert(key.clone(), changed.endpoint_slices.get(&key).cloned());
    let changes = model.apply(&delta);
    assert_eq!(
        changes.frontends.into_iter().collect::<Vec<_>>(),
        [tcp("10.96.0.8", 80)]
    );
    assert_eq!(changes.sets.len(), 1);
    assert_eq!(changes.slices, std::slice::from_ref(&key));
    let (fresh, _) = build_default(&changed);
    assert_eq!(model.desired(), &fresh);
    assert_eq!(model.backends_total(), 201);

    // Deleting the slice leaves the service without backends; deleting the service, without
    // frontends.
    let mut gone = ObjectChanges::default();
    gone.endpoint_slices.insert(key, None);
    gone.services.insert(ObjectKey::new("default", "s7"), None);
    let changes = model.apply(&gone);
    assert_eq!(changes.frontends.len(), 1);
    assert!(
        !model
            .desired()
            .frontends
            .contains_key(&tcp("10.96.0.8", 80))
    );
    assert_eq!(model.desired().frontends.len(), 199);
    assert_eq!(model.backends_total(), 199);
}

proptest::proptest! {
    /// Backends sort as `(IpAddr, port)` does (slot order, and so what a restarted agent
    /// finds already written, does not depend on how the comparison is made).
    #[test]
    fn backends_sort_by_address_then_port(
        a in proptest::prelude::any::<(std::net::IpAddr, u16)>(),
        b in proptest::prelude::any::<(std::net::IpAddr, u16)>(),
        same_address in proptest::prelude::any::<bool>(),
    ) {
        let b = if same_address { (a.0, b.1) } else { b };
        let (x, y) = (Backend { ip: a.0, port: a.1 }, Backend { ip: b.0, port: b.1 });
        proptest::prop_assert_eq!(x.cmp(&y), a.cmp(&b));
        proptest::prop_assert_eq!(x.partial_cmp(&y), Some(a.cmp(&b)));
    }

    /// Port names sort as their (namespace, name, port) strings do, whether two of them share
    /// their strings or hold copies.
    #[test]
    fn port_names_sort_by_their_strings(
        a in ("[ab]{0,2}", "[ab]{0,2}", "[ab]{0,2}"),
        b in ("[ab]{0,2}", "[ab]{0,2}", "[ab]{0,2}"),
        share in proptest::prelude::any::<bool>(),
    ) {
        let name = |(namespace, name, port): &(String, String, String)| super::ServicePortName {
            namespace: namespace.as_str().into(),
            name: name.as_str().into(),
            port: port.as_str().into(),
        };
        let x = name(&a);
        let y = if share && a == b { x.clone() } else { name(&b) };
        proptest::prop_assert_eq!(x.cmp(&y), a.cmp(&b));
        proptest::prop_assert_eq!(x == y, a == b);
    }
}
