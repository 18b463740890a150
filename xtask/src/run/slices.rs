//! The Services of the example manifests, and the EndpointSlices that Kubernetes' EndpointSlice
//! controller would write for them if the sandbox pods were the `hostnames` Deployment's pods.

use std::collections::BTreeMap;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use lb_testkit::objects::{SERVICE_NAME_LABEL, SliceManifest};
use serde::Deserialize;

/// What `kubectl apply` does without a namespace.
const DEFAULT_NAMESPACE: &str = "default";

/// A sandbox pod as the controller sees it.
#[derive(Clone, Debug)]
pub struct PodInfo {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub ip: Ipv4Addr,
    /// The ports its server listens on (TCP and UDP).
    pub ports: Vec<u16>,
}

/// What the sandbox reads off a Service.
pub trait ServiceInfo {
    fn name(&self) -> &str;
    fn namespace(&self) -> &str;
    /// `sessionAffinity: ClientIP`.
    fn client_ip_affinity(&self) -> bool;
    /// `ClusterIP:port` of the first port, when the Service has a ClusterIP.
    fn first_frontend(&self) -> Option<String>;
    /// The first TCP port's `nodePort`, for a NodePort or LoadBalancer Service that has one.
    fn first_tcp_node_port(&self) -> Option<u16>;
}

impl ServiceInfo for Service {
    fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or_default()
    }

    fn namespace(&self) -> &str {
        self.metadata
            .namespace
            .as_deref()
            .unwrap_or(DEFAULT_NAMESPACE)
    }

    fn client_ip_affinity(&self) -> bool {
        self.spec
            .as_ref()
            .and_then(|spec| spec.session_affinity.as_deref())
            == Some("ClientIP")
    }

    fn first_frontend(&self) -> Option<String> {
        let spec = self.spec.as_ref()?;
        let ip: Ipv4Addr = spec.cluster_ip.as_deref()?.parse().ok()?;
        let port = spec.ports.as_ref()?.first()?.port;
        Some(format!("{ip}:{port}"))
    }

    fn first_tcp_node_port(&self) -> Option<u16> {
        let spec = self.spec.as_ref()?;
        if !matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer")) {
            return None;
        }
        spec.ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
            .find_map(|p| p.node_port.and_then(|n| u16::try_from(n).ok()))
    }
}

/// The `*.yaml` and `*.yml` files directly in `dir`, sorted.
pub fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
        if yaml && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Every `v1` Service in the YAML text (many documents per file, `kind: List` too).
pub fn services_in(text: &str) -> Result<Vec<Service>> {
    let mut services = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(document)?;
        collect_services(value, &mut services)?;
    }
    Ok(services)
}

fn collect_services(value: serde_yaml::Value, services: &mut Vec<Service>) -> Result<()> {
    let field = |name: &str| value.get(name).and_then(serde_yaml::Value::as_str);
    match (field("apiVersion"), field("kind")) {
        (Some("v1"), Some("Service")) => {
            let service: Service = serde_yaml::from_value(value)?;
            services.push(service);
        }
        (_, Some("List")) => {
            if let Some(items) = value.get("items").and_then(serde_yaml::Value::as_sequence) {
                for item in items.clone() {
                    collect_services(item, services)?;
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// The controller's slice for `service`, with every pod it selects as a ready endpoint on
/// `node_name`, and notes on what would make it not work in the sandbox. `None` for Services
/// the controller leaves alone (no selector, ExternalName).
pub fn endpoint_slice(
    service: &Service,
    pods: &[PodInfo],
    node_name: &str,
) -> Option<(SliceManifest, Vec<String>)> {
    let spec = service.spec.as_ref()?;
    let selector = spec.selector.as_ref().filter(|s| !s.is_empty())?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let name = service.name();
    let namespace = service.namespace();
    let mut notes = Vec::new();
    let selected: Vec<&PodInfo> = pods
        .iter()
        .filter(|pod| {
            pod.namespace == namespace
                && selector
                    .iter()
                    .all(|(k, v)| pod.labels.get(k).is_some_and(|l| l == v))
        })
        .collect();
    if selected.is_empty() {
        notes.push(format!(
            "Service {namespace}/{name} selects none of the sandbox pods: its slice has no endpoints"
        ));
    }
    // The controller's names are `<service>-<5 random characters>`; a fixed suffix keeps the
    // sandbox's files easy to find and edit. It copies the Service's labels and adds its own,
    // and the Service owns the slice (its uid when the manifest has one: no API server gave it
    // one here).
    let mut slice = SliceManifest::new(namespace, &format!("{name}-sandbox"), name);
    for (key, value) in service.metadata.labels.iter().flatten() {
        slice = slice.label(key, value);
    }
    slice = slice
        .label(SERVICE_NAME_LABEL, name)
        .managed_by_controller()
        .owned_by_service(service.metadata.uid.as_deref().unwrap_or_default());
    for port in spec.ports.iter().flatten() {
        // The service port's name; `""` for its one unnamed port, as the controller writes it.
        let port_name = port.name.clone().unwrap_or_default();
        let target = match &port.target_port {
            None => u16::try_from(port.port).ok(),
            Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
            Some(IntOrString::String(s)) => s.parse().ok(),
        };
        let Some(target) = target else {
            notes.push(format!(
                "Service {namespace}/{name} port {port_name:?}: targetPort {:?} is not a number \
                 (the sandbox pods have no named ports); left out of the slice",
                port.target_port
            ));
            continue;
        };
        if !selected.is_empty() && !selected.iter().all(|p| p.ports.contains(&target)) {
            notes.push(format!(
                "Service {namespace}/{name} port {port_name:?}: no sandbox pod listens on \
                 {target}, connections will fail"
            ));
        }
        slice = slice.port(
            &port_name,
            port.protocol.as_deref().unwrap_or("TCP"),
            target,
        );
        if let Some(app_protocol) = &port.app_protocol {
            slice = slice.app_protocol(app_protocol);
        }
    }
    for pod in selected {
        slice = slice
            .endpoint(pod.ip)
            .conditions(true, true, false)
            .on_node(node_name)
            .target_pod(&pod.namespace, &pod.name);
    }
    Some((slice, notes))
}

/// The slice as a manifest file, with a comment saying where it comes from.
pub fn slice_file(slice: &SliceManifest) -> String {
    format!(
        "# Written by `cargo xtask run`: the EndpointSlice that Kubernetes' EndpointSlice\n\
         # controller would write for the sandbox pods. The agent watches this directory:\n\
         # delete an endpoint (or set ready: false) and watch `lb-agent list` change.\n\
         {}",
        slice.to_yaml()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: hostnames
spec:
  replicas: 3
---
apiVersion: v1
kind: Service
metadata:
  name: hostnames
  labels:
    app: hostnames
spec:
  clusterIP: 10.96.0.100
  selector:
    app: hostnames
  ports:
    - name: default
      protocol: TCP
      port: 80
      targetPort: 9376
---
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: Service
    metadata:
      name: unnamed
      namespace: other
    spec:
      selector:
        app: hostnames
      ports:
        - port: 53
          protocol: UDP
  - apiVersion: v1
    kind: Service
    metadata:
      name: no-selector
    spec:
      ports:
        - port: 80
";

    fn pods() -> Vec<PodInfo> {
        (1..=3)
            .map(|i| PodInfo {
                name: format!("hostnames-{i}"),
                namespace: "default".into(),
                labels: [("app".to_owned(), "hostnames".to_owned())].into(),
                ip: Ipv4Addr::new(10, 244, 0, 9 + i),
                ports: vec![9376],
            })
            .collect()
    }

    #[test]
    fn finds_services_in_documents_and_lists() {
        let services = services_in(EXAMPLE).unwrap();
        let names: Vec<_> = services.iter().map(|s| s.name()).collect();
        assert_eq!(names, ["hostnames", "unnamed", "no-selector"]);
        assert_eq!(
            services[0].first_frontend().as_deref(),
            Some("10.96.0.100:80")
        );
        assert_eq!(services[1].namespace(), "other");
        assert_eq!(services[1].first_frontend(), None);
    }

    #[test]
    fn node_port_of_nodeport_services_only() {
        let yaml = "\
apiVersion: v1
kind: Service
metadata:
  name: np
spec:
  type: NodePort
  clusterIP: 10.96.0.101
  ports:
    - {name: dns, protocol: UDP, port: 53, nodePort: 30053}
    - {name: web, port: 80, targetPort: 9376, nodePort: 30080}
---
apiVersion: v1
kind: Service
metadata:
  name: cip
spec:
  clusterIP: 10.96.0.100
  ports:
    - {port: 80, nodePort: 30081}
";
        let services = services_in(yaml).unwrap();
        assert_eq!(services[0].first_tcp_node_port(), Some(30080));
        assert_eq!(services[1].first_tcp_node_port(), None);
    }

    #[test]
    fn slice_like_the_controller_writes() {
        let services = services_in(EXAMPLE).unwrap();
        let (slice, notes) = endpoint_slice(&services[0], &pods(), "lbs-node").unwrap();
        assert!(notes.is_empty(), "{notes:?}");
        let yaml: serde_yaml::Value = serde_yaml::from_str(&slice_file(&slice)).unwrap();
        let expected: serde_yaml::Value = serde_yaml::from_str(
            "
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: hostnames-sandbox
  namespace: default
  labels:
    app: hostnames
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
    kubernetes.io/service-name: hostnames
  ownerReferences:
  - apiVersion: v1
    kind: Service
    name: hostnames
    controller: true
    blockOwnerDeletion: true
    uid: ''
addressType: IPv4
endpoints:
- addresses: [10.244.0.10]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: lbs-node
  targetRef: {kind: Pod, namespace: default, name: hostnames-1}
- addresses: [10.244.0.11]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: lbs-node
  targetRef: {kind: Pod, namespace: default, name: hostnames-2}
- addresses: [10.244.0.12]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: lbs-node
  targetRef: {kind: Pod, namespace: default, name: hostnames-3}
ports:
- name: default
  protocol: TCP
  port: 9376
",
        )
        .unwrap();
        assert_eq!(yaml, expected);
    }

    #[test]
    fn unnamed_port_other_namespace_and_no_selector() {
        let services = services_in(EXAMPLE).unwrap();
        let (slice, notes) = endpoint_slice(&services[1], &pods(), "n").unwrap();
        let slice = slice.build();
        assert!(slice.endpoints.is_empty());
        let ports = slice.ports.unwrap();
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].name.as_deref(), Some(""));
        assert_eq!(ports[0].protocol.as_deref(), Some("UDP"));
        // No targetPort: the port itself, which no sandbox pod serves (but none is selected).
        assert_eq!(ports[0].port, Some(53));
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(endpoint_slice(&services[2], &pods(), "n").is_none());
    }

    #[test]
    fn named_or_unserved_target_ports_are_noted() {
        let mut service = services_in(EXAMPLE).unwrap().remove(0);
        fn target_port(service: &mut Service) -> &mut Option<IntOrString> {
            &mut service.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].target_port
        }
        *target_port(&mut service) = Some(IntOrString::String("http".into()));
        let (slice, notes) = endpoint_slice(&service, &pods(), "n").unwrap();
        assert!(slice.build().ports.is_none());
        assert_eq!(notes.len(), 1);
        *target_port(&mut service) = Some(IntOrString::Int(8080));
        let (slice, notes) = endpoint_slice(&service, &pods(), "n").unwrap();
        assert_eq!(slice.build().ports.unwrap()[0].port, Some(8080));
        assert!(notes[0].contains("no sandbox pod listens"), "{notes:?}");
    }
}
