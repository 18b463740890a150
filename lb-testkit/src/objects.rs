//! Service and EndpointSlice manifests for the tests, the sandbox and the benchmarks, as
//! `kubectl get -o yaml` (or `-o json`) prints them: the builders fill in the API's own
//! objects (k8s-openapi's `Service` and `EndpointSlice`) and serialize those, so the field
//! names, nesting and types are the API's, and only what a builder call set is written.
//!
//! ```
//! use lb_testkit::objects::{ServiceManifest, SliceManifest};
//!
//! let service = ServiceManifest::cluster_ip("default", "web", "10.96.0.10")
//!     .service_type("NodePort")
//!     .port("http", "TCP", 80, 8080)
//!     .node_port(30080)
//!     .external_traffic_policy("Local");
//! let slice = SliceManifest::new("default", "web-1", "web")
//!     .port("http", "TCP", 8080)
//!     .endpoint("10.244.0.10")
//!     .on_node("node-a")
//!     .conditions(true, true, false);
//! assert!(service.to_yaml().contains("nodePort: 30080"));
//! assert!(slice.to_yaml().contains("nodeName: node-a"));
//! ```
//!
//! The builders take what they are given: an address is any text (a test may write an invalid
//! one on purpose) and ports are the API's `int32` (a nodePort out of range too).

use std::collections::BTreeMap;
use std::fmt::Display;

use k8s_openapi::api::core::v1::{
    ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, ObjectReference, Service, ServicePort,
    ServiceSpec, ServiceStatus, SessionAffinityConfig,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

/// The label naming a slice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label naming who manages a slice, and the value the EndpointSlice controller sets.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGED_BY_CONTROLLER: &str = "endpointslice-controller.k8s.io";

fn to_yaml<T: Serialize>(object: &T) -> String {
    serde_yaml::to_string(object).expect("a Kubernetes object serializes to YAML")
}

fn to_json<T: Serialize>(object: &T) -> String {
    serde_json::to_string(object).expect("a Kubernetes object serializes to JSON")
}

fn labels(map: &mut Option<BTreeMap<String, String>>, key: &str, value: &str) {
    map.get_or_insert_with(BTreeMap::new)
        .insert(key.to_owned(), value.to_owned());
}

/// A `v1` Service.
#[derive(Clone, Debug)]
pub struct ServiceManifest(Service);

impl ServiceManifest {
    /// A Service of type ClusterIP with this `clusterIP` (and `clusterIPs: [ip]`), no ports yet.
    pub fn cluster_ip(namespace: &str, name: &str, ip: impl Display) -> ServiceManifest {
        let ip = ip.to_string();
        ServiceManifest(Service {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("ClusterIP".to_owned()),
                cluster_ip: Some(ip.clone()),
                cluster_ips: Some(vec![ip]),
                ..ServiceSpec::default()
            }),
            status: None,
        })
    }

    fn spec(&mut self) -> &mut ServiceSpec {
        self.0.spec.get_or_insert_with(ServiceSpec::default)
    }

    /// `spec.clusterIPs` (the primary family's first, as the API orders them) and
    /// `spec.clusterIP` (the first), replacing what was there.
    pub fn cluster_ips<I: Display>(mut self, ips: impl IntoIterator<Item = I>) -> Self {
        let ips: Vec<String> = ips.into_iter().map(|ip| ip.to_string()).collect();
        let spec = self.spec();
        spec.cluster_ip = ips.first().cloned();
        spec.cluster_ips = Some(ips);
        self
    }

    /// `spec.ipFamilies` (`IPv4`, `IPv6`), in the order of `clusterIPs`.
    pub fn ip_families(mut self, families: &[&str]) -> Self {
        self.spec().ip_families = Some(families.iter().map(|f| f.to_string()).collect());
        self
    }

    /// `spec.ipFamilyPolicy`: SingleStack, PreferDualStack or RequireDualStack.
    pub fn ip_family_policy(mut self, policy: &str) -> Self {
        self.spec().ip_family_policy = Some(policy.to_owned());
        self
    }

    /// `spec.type`: ClusterIP, NodePort, LoadBalancer or ExternalName.
    pub fn service_type(mut self, service_type: &str) -> Self {
        self.spec().type_ = Some(service_type.to_owned());
        self
    }

    /// Adds a label to `metadata.labels`.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        labels(&mut self.0.metadata.labels, key, value);
        self
    }

    /// Adds `key: value` to `spec.selector`.
    pub fn selector(mut self, key: &str, value: &str) -> Self {
        labels(&mut self.spec().selector, key, value);
        self
    }

    /// Adds a port: `name` (`""`: an unnamed port, no `name` field), `protocol` (TCP, UDP,
    /// SCTP), `port` and a numeric `targetPort`.
    pub fn port(
        mut self,
        name: &str,
        protocol: &str,
        port: impl Into<i32>,
        target_port: impl Into<i32>,
    ) -> Self {
        self.spec()
            .ports
            .get_or_insert_with(Vec::new)
            .push(ServicePort {
                name: (!name.is_empty()).then(|| name.to_owned()),
                protocol: Some(protocol.to_owned()),
                port: port.into(),
                target_port: Some(IntOrString::Int(target_port.into())),
                ..ServicePort::default()
            });
        self
    }

    fn last_port(&mut self) -> &mut ServicePort {
        self.spec()
            .ports
            .as_mut()
            .and_then(|ports| ports.last_mut())
            .expect("ServiceManifest: add a port first")
    }

    /// The `nodePort` of the port added last. Panics before any port.
    pub fn node_port(mut self, node_port: impl Into<i32>) -> Self {
        self.last_port().node_port = Some(node_port.into());
        self
    }

    /// The `appProtocol` of the port added last. Panics before any port.
    pub fn app_protocol(mut self, app_protocol: &str) -> Self {
        self.last_port().app_protocol = Some(app_protocol.to_owned());
        self
    }

    /// Adds these addresses to `spec.externalIPs`.
    pub fn external_ips<I: Display>(mut self, ips: impl IntoIterator<Item = I>) -> Self {
        self.spec()
            .external_ips
            .get_or_insert_with(Vec::new)
            .extend(ips.into_iter().map(|ip| ip.to_string()));
        self
    }

    /// `sessionAffinity: ClientIP`, and with a timeout its `sessionAffinityConfig`.
    pub fn client_ip_affinity(mut self, timeout_seconds: Option<i32>) -> Self {
        let spec = self.spec();
        spec.session_affinity = Some("ClientIP".to_owned());
        spec.session_affinity_config = timeout_seconds.map(|timeout| SessionAffinityConfig {
            client_ip: Some(ClientIPConfig {
                timeout_seconds: Some(timeout),
            }),
        });
        self
    }

    /// `spec.externalTrafficPolicy`: Cluster or Local.
    pub fn external_traffic_policy(mut self, policy: &str) -> Self {
        self.spec().external_traffic_policy = Some(policy.to_owned());
        self
    }

    /// `spec.internalTrafficPolicy`: Cluster or Local.
    pub fn internal_traffic_policy(mut self, policy: &str) -> Self {
        self.spec().internal_traffic_policy = Some(policy.to_owned());
        self
    }

    /// `spec.healthCheckNodePort` (of an externalTrafficPolicy Local Service).
    pub fn health_check_node_port(mut self, port: impl Into<i32>) -> Self {
        self.spec().health_check_node_port = Some(port.into());
        self
    }

    /// `spec.publishNotReadyAddresses`.
    pub fn publish_not_ready_addresses(mut self, publish: bool) -> Self {
        self.spec().publish_not_ready_addresses = Some(publish);
        self
    }

    /// `spec.loadBalancerSourceRanges`.
    pub fn load_balancer_source_ranges<I: Display>(
        mut self,
        ranges: impl IntoIterator<Item = I>,
    ) -> Self {
        self.spec().load_balancer_source_ranges =
            Some(ranges.into_iter().map(|r| r.to_string()).collect());
        self
    }

    /// Adds an address to `status.loadBalancer.ingress`, as a load balancer controller does.
    pub fn load_balancer_ingress(mut self, ip: impl Display) -> Self {
        self.0
            .status
            .get_or_insert_with(ServiceStatus::default)
            .load_balancer
            .get_or_insert_with(LoadBalancerStatus::default)
            .ingress
            .get_or_insert_with(Vec::new)
            .push(LoadBalancerIngress {
                ip: Some(ip.to_string()),
                ..LoadBalancerIngress::default()
            });
        self
    }

    pub fn object(&self) -> &Service {
        &self.0
    }

    pub fn build(self) -> Service {
        self.0
    }

    /// The manifest as `kubectl get -o yaml` prints it.
    pub fn to_yaml(&self) -> String {
        to_yaml(&self.0)
    }

    /// The manifest as JSON (`kubectl get -o json`, on one line).
    pub fn to_json(&self) -> String {
        to_json(&self.0)
    }
}

impl From<ServiceManifest> for Service {
    fn from(manifest: ServiceManifest) -> Service {
        manifest.0
    }
}

/// A `discovery.k8s.io/v1` EndpointSlice of IPv4 addresses (or, with
/// [`SliceManifest::address_type`], IPv6 ones).
#[derive(Clone, Debug)]
pub struct SliceManifest {
    slice: EndpointSlice,
    service: String,
}

impl SliceManifest {
    /// An empty slice `name` (`endpoints: []`, no ports) of `service`: labelled with
    /// `kubernetes.io/service-name`.
    pub fn new(namespace: &str, name: &str, service: &str) -> SliceManifest {
        SliceManifest {
            slice: EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    namespace: Some(namespace.to_owned()),
                    labels: Some([(SERVICE_NAME_LABEL.to_owned(), service.to_owned())].into()),
                    ..ObjectMeta::default()
                },
                address_type: "IPv4".to_owned(),
                endpoints: Vec::new(),
                ports: None,
            },
            service: service.to_owned(),
        }
    }

    /// Adds a label to `metadata.labels`.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        labels(&mut self.slice.metadata.labels, key, value);
        self
    }

    /// `addressType`: IPv4 (the default here), IPv6 or FQDN. The controller writes one slice
    /// per family of a dual-stack Service.
    pub fn address_type(mut self, address_type: &str) -> Self {
        self.slice.address_type = address_type.to_owned();
        self
    }

    /// The label the EndpointSlice controller sets on the slices it manages.
    pub fn managed_by_controller(self) -> Self {
        self.label(MANAGED_BY_LABEL, MANAGED_BY_CONTROLLER)
    }

    /// The owner reference the controller sets: the Service (with this `uid`: the API
    /// requires the field, `""` when there is no API server to give one).
    pub fn owned_by_service(mut self, uid: &str) -> Self {
        self.slice
            .metadata
            .owner_references
            .get_or_insert_with(Vec::new)
            .push(OwnerReference {
                api_version: "v1".to_owned(),
                kind: "Service".to_owned(),
                name: self.service.clone(),
                uid: uid.to_owned(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            });
        self
    }

    /// Adds a port: its `name` (the Service port's; `""` for its unnamed one, as the controller
    /// writes it), `protocol` and the `port` the endpoints serve it on.
    pub fn port(mut self, name: &str, protocol: &str, port: impl Into<i32>) -> Self {
        self.slice
            .ports
            .get_or_insert_with(Vec::new)
            .push(EndpointPort {
                name: Some(name.to_owned()),
                protocol: Some(protocol.to_owned()),
                port: Some(port.into()),
                app_protocol: None,
            });
        self
    }

    /// The `appProtocol` of the port added last. Panics before any port.
    pub fn app_protocol(mut self, app_protocol: &str) -> Self {
        let port = self
            .slice
            .ports
            .as_mut()
            .and_then(|ports| ports.last_mut())
            .expect("SliceManifest: add a port first");
        port.app_protocol = Some(app_protocol.to_owned());
        self
    }

    /// Adds an endpoint with this one address and, until set, no node and no conditions (which
    /// the API reads as ready).
    pub fn endpoint(mut self, address: impl Display) -> Self {
        self.slice.endpoints.push(Endpoint {
            addresses: vec![address.to_string()],
            ..Endpoint::default()
        });
        self
    }

    fn last_endpoint(&mut self) -> &mut Endpoint {
        self.slice
            .endpoints
            .last_mut()
            .expect("SliceManifest: add an endpoint first")
    }

    /// The `nodeName` of the endpoint added last. Panics before any endpoint.
    pub fn on_node(mut self, node: &str) -> Self {
        self.last_endpoint().node_name = Some(node.to_owned());
        self
    }

    /// `conditions: {ready}` (only) of the endpoint added last. Panics before any endpoint.
    pub fn ready(mut self, ready: bool) -> Self {
        self.last_endpoint().conditions = Some(EndpointConditions {
            ready: Some(ready),
            ..EndpointConditions::default()
        });
        self
    }

    /// `conditions: {ready, serving, terminating}` of the endpoint added last, as the
    /// controller writes them. Panics before any endpoint.
    pub fn conditions(mut self, ready: bool, serving: bool, terminating: bool) -> Self {
        self.last_endpoint().conditions = Some(EndpointConditions {
            ready: Some(ready),
            serving: Some(serving),
            terminating: Some(terminating),
        });
        self
    }

    /// The `targetRef` of the endpoint added last: this Pod. Panics before any endpoint.
    pub fn target_pod(mut self, namespace: &str, name: &str) -> Self {
        self.last_endpoint().target_ref = Some(ObjectReference {
            kind: Some("Pod".to_owned()),
            namespace: Some(namespace.to_owned()),
            name: Some(name.to_owned()),
            ..ObjectReference::default()
        });
        self
    }

    /// `metadata.name`.
    pub fn name(&self) -> &str {
        self.slice.metadata.name.as_deref().unwrap_or_default()
    }

    pub fn object(&self) -> &EndpointSlice {
        &self.slice
    }

    pub fn build(self) -> EndpointSlice {
        self.slice
    }

    /// The manifest as `kubectl get -o yaml` prints it.
    pub fn to_yaml(&self) -> String {
        to_yaml(&self.slice)
    }

    /// The manifest as JSON (`kubectl get -o json`, on one line).
    pub fn to_json(&self) -> String {
        to_json(&self.slice)
    }
}

impl From<SliceManifest> for EndpointSlice {
    fn from(manifest: SliceManifest) -> EndpointSlice {
        manifest.slice
    }
}

/// An item of a [`ManifestList`].
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum ListItem {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
}

impl From<ServiceManifest> for ListItem {
    fn from(manifest: ServiceManifest) -> ListItem {
        ListItem::Service(Box::new(manifest.0))
    }
}

impl From<SliceManifest> for ListItem {
    fn from(manifest: SliceManifest) -> ListItem {
        ListItem::EndpointSlice(Box::new(manifest.slice))
    }
}

/// Many objects in one manifest: a `v1` `kind: List`, as `kubectl get` prints several.
#[derive(Clone, Debug, Default)]
pub struct ManifestList {
    items: Vec<ListItem>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct List<'a> {
    api_version: &'static str,
    items: &'a [ListItem],
    kind: &'static str,
}

impl ManifestList {
    pub fn new() -> ManifestList {
        ManifestList::default()
    }

    pub fn with_capacity(items: usize) -> ManifestList {
        ManifestList {
            items: Vec::with_capacity(items),
        }
    }

    pub fn push(&mut self, item: impl Into<ListItem>) {
        self.items.push(item.into());
    }

    /// Adds an item, builder style.
    pub fn item(mut self, item: impl Into<ListItem>) -> Self {
        self.push(item);
        self
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    fn list(&self) -> List<'_> {
        List {
            api_version: "v1",
            items: &self.items,
            kind: "List",
        }
    }

    pub fn to_yaml(&self) -> String {
        to_yaml(&self.list())
    }

    pub fn to_json(&self) -> String {
        to_json(&self.list())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(yaml: &str) -> Service {
        serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("not a Service ({e}):\n{yaml}"))
    }

    fn slice(yaml: &str) -> EndpointSlice {
        serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("not an EndpointSlice ({e}):\n{yaml}"))
    }

    fn yaml_value(text: &str) -> serde_yaml::Value {
        serde_yaml::from_str(text).unwrap()
    }

    #[test]
    fn a_cluster_ip_service_prints_as_kubectl_does() {
        let manifest = ServiceManifest::cluster_ip("default", "web", "10.96.0.10")
            .selector("app", "web")
            .port("http", "TCP", 80, 8080u16);
        let expected = yaml_value(
            "
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  clusterIP: 10.96.0.10
  clusterIPs:
  - 10.96.0.10
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: 8080
  selector:
    app: web
  type: ClusterIP
",
        );
        assert_eq!(yaml_value(&manifest.to_yaml()), expected);
        let json: serde_yaml::Value = serde_json::from_str(&manifest.to_json()).unwrap();
        assert_eq!(json, expected);
    }

    #[test]
    fn every_service_field_parses_back() {
        let manifest = ServiceManifest::cluster_ip("kube-system", "lb", "10.96.0.20")
            .service_type("LoadBalancer")
            .label("app", "lb")
            .port("http", "TCP", 80, 8080)
            .node_port(30080)
            .app_protocol("http")
            .port("", "UDP", 53, 5353)
            .node_port(70000)
            .external_ips(["198.51.100.10", "not-an-ip"])
            .external_ips(["2001:db8::10"])
            .client_ip_affinity(Some(1))
            .external_traffic_policy("Local")
            .internal_traffic_policy("Local")
            .health_check_node_port(32100)
            .publish_not_ready_addresses(true)
            .load_balancer_ingress("203.0.113.7");
        let back = service(&manifest.to_yaml());
        assert_eq!(&back, manifest.object());
        assert_eq!(back.metadata.namespace.as_deref(), Some("kube-system"));
        assert_eq!(back.metadata.labels.unwrap()["app"], "lb");
        let spec = back.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.20"));
        assert_eq!(spec.cluster_ips.unwrap(), ["10.96.0.20"]);
        let ports = spec.ports.unwrap();
        assert_eq!(ports.len(), 2);
        assert_eq!(ports[0].name.as_deref(), Some("http"));
        assert_eq!(ports[0].protocol.as_deref(), Some("TCP"));
        assert_eq!((ports[0].port, ports[0].node_port), (80, Some(30080)));
        assert_eq!(ports[0].target_port, Some(IntOrString::Int(8080)));
        assert_eq!(ports[0].app_protocol.as_deref(), Some("http"));
        assert_eq!(ports[1].name, None, "an unnamed port has no name field");
        assert_eq!(ports[1].protocol.as_deref(), Some("UDP"));
        assert_eq!((ports[1].port, ports[1].node_port), (53, Some(70000)));
        assert_eq!(
            spec.external_ips.unwrap(),
            ["198.51.100.10", "not-an-ip", "2001:db8::10"]
        );
        assert_eq!(spec.session_affinity.as_deref(), Some("ClientIP"));
        assert_eq!(
            spec.session_affinity_config
                .and_then(|c| c.client_ip)
                .and_then(|c| c.timeout_seconds),
            Some(1)
        );
        assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
        assert_eq!(spec.internal_traffic_policy.as_deref(), Some("Local"));
        assert_eq!(spec.health_check_node_port, Some(32100));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        let ingress = back.status.unwrap().load_balancer.unwrap().ingress.unwrap();
        assert_eq!(ingress[0].ip.as_deref(), Some("203.0.113.7"));
        // JSON too.
        let from_json: Service = serde_json::from_str(&manifest.to_json()).unwrap();
        assert_eq!(&from_json, manifest.object());
    }

    #[test]
    fn a_dual_stack_service_and_its_ipv6_slice_print_as_kubectl_does() {
        let manifest = ServiceManifest::cluster_ip("default", "web", "10.96.0.10")
            .cluster_ips(["fd00:10:96::10", "10.96.0.10"])
            .ip_families(&["IPv6", "IPv4"])
            .ip_family_policy("RequireDualStack")
            .port("http", "TCP", 80, 8080);
        let expected = yaml_value(
            "
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  clusterIP: fd00:10:96::10
  clusterIPs:
  - fd00:10:96::10
  - 10.96.0.10
  ipFamilies:
  - IPv6
  - IPv4
  ipFamilyPolicy: RequireDualStack
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: 8080
  type: ClusterIP
",
        );
        assert_eq!(yaml_value(&manifest.to_yaml()), expected);
        let slice = SliceManifest::new("default", "web-v6", "web")
            .address_type("IPv6")
            .port("http", "TCP", 8080)
            .endpoint("fd00:10:244::10");
        let back: EndpointSlice = serde_yaml::from_str(&slice.to_yaml()).unwrap();
        assert_eq!(back.address_type, "IPv6");
        assert_eq!(back.endpoints[0].addresses, ["fd00:10:244::10"]);
    }

    #[test]
    fn affinity_without_a_timeout_has_no_config() {
        let spec = service(
            &ServiceManifest::cluster_ip("default", "s", "10.96.0.1")
                .client_ip_affinity(None)
                .to_yaml(),
        )
        .spec
        .unwrap();
        assert_eq!(spec.session_affinity.as_deref(), Some("ClientIP"));
        assert!(spec.session_affinity_config.is_none());
    }

    #[test]
    fn a_slice_prints_as_kubectl_does() {
        let manifest = SliceManifest::new("default", "web-1", "web")
            .port("http", "TCP", 8080)
            .endpoint("10.244.0.10")
            .on_node("node-a")
            .ready(true)
            .endpoint("10.244.0.11")
            .on_node("node-b")
            .conditions(false, true, true);
        let expected = yaml_value(
            "
addressType: IPv4
apiVersion: discovery.k8s.io/v1
endpoints:
- addresses:
  - 10.244.0.10
  conditions:
    ready: true
  nodeName: node-a
- addresses:
  - 10.244.0.11
  conditions:
    ready: false
    serving: true
    terminating: true
  nodeName: node-b
kind: EndpointSlice
metadata:
  labels:
    kubernetes.io/service-name: web
  name: web-1
  namespace: default
ports:
- name: http
  port: 8080
  protocol: TCP
",
        );
        assert_eq!(yaml_value(&manifest.to_yaml()), expected);
        assert_eq!(manifest.name(), "web-1");
    }

    #[test]
    fn every_slice_field_parses_back() {
        let manifest = SliceManifest::new("other", "dns-sandbox", "dns")
            .label("app", "dns")
            .managed_by_controller()
            .owned_by_service("")
            .port("", "UDP", 53)
            .app_protocol("dns")
            .port("tcp", "TCP", 5353)
            .endpoint("10.244.0.12")
            .on_node("lbs-node")
            .conditions(true, true, false)
            .target_pod("other", "dns-1")
            .endpoint("10.244.0.13");
        let back = slice(&manifest.to_yaml());
        assert_eq!(&back, manifest.object());
        assert_eq!(back.address_type, "IPv4");
        let labels = back.metadata.labels.unwrap();
        assert_eq!(labels[SERVICE_NAME_LABEL], "dns");
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY_CONTROLLER);
        assert_eq!(labels["app"], "dns");
        let owner = &back.metadata.owner_references.unwrap()[0];
        assert_eq!(
            (owner.api_version.as_str(), owner.kind.as_str()),
            ("v1", "Service")
        );
        assert_eq!(owner.name, "dns");
        assert_eq!(
            (owner.controller, owner.block_owner_deletion),
            (Some(true), Some(true))
        );
        let ports = back.ports.unwrap();
        assert_eq!(
            ports[0].name.as_deref(),
            Some(""),
            "the controller's unnamed port"
        );
        assert_eq!(ports[0].protocol.as_deref(), Some("UDP"));
        assert_eq!(ports[0].port, Some(53));
        assert_eq!(ports[0].app_protocol.as_deref(), Some("dns"));
        assert_eq!(ports[1].port, Some(5353));
        let endpoint = &back.endpoints[0];
        assert_eq!(endpoint.addresses, ["10.244.0.12"]);
        assert_eq!(endpoint.node_name.as_deref(), Some("lbs-node"));
        let conditions = endpoint.conditions.as_ref().unwrap();
        assert_eq!(
            (conditions.ready, conditions.serving, conditions.terminating),
            (Some(true), Some(true), Some(false))
        );
        let pod = endpoint.target_ref.as_ref().unwrap();
        assert_eq!(pod.kind.as_deref(), Some("Pod"));
        assert_eq!(pod.namespace.as_deref(), Some("other"));
        assert_eq!(pod.name.as_deref(), Some("dns-1"));
        let bare = &back.endpoints[1];
        assert!(bare.conditions.is_none() && bare.node_name.is_none());
        let from_json: EndpointSlice = serde_json::from_str(&manifest.to_json()).unwrap();
        assert_eq!(&from_json, manifest.object());
    }

    #[test]
    fn an_empty_slice_has_an_empty_endpoint_list() {
        let text = SliceManifest::new("default", "e", "e").to_yaml();
        assert_eq!(yaml_value(&text)["endpoints"], yaml_value("[]"));
        assert!(slice(&text).endpoints.is_empty());
    }

    #[test]
    fn a_list_holds_services_and_slices() {
        let list = ManifestList::new()
            .item(
                ServiceManifest::cluster_ip("bench", "a", "10.100.0.1")
                    .port("http", "TCP", 80, 8080),
            )
            .item(
                SliceManifest::new("bench", "a-abcde", "a")
                    .port("http", "TCP", 8080)
                    .endpoint("10.244.0.10"),
            );
        assert_eq!(list.len(), 2);
        for text in [list.to_json(), list.to_yaml()] {
            let value: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
            assert_eq!(value["apiVersion"], yaml_value("v1"));
            assert_eq!(value["kind"], yaml_value("List"));
            let items = value["items"].as_sequence().unwrap();
            let service: Service = serde_yaml::from_value(items[0].clone()).unwrap();
            assert_eq!(service.metadata.name.as_deref(), Some("a"));
            let slice: EndpointSlice = serde_yaml::from_value(items[1].clone()).unwrap();
            assert_eq!(slice.endpoints[0].addresses, ["10.244.0.10"]);
        }
    }
}
