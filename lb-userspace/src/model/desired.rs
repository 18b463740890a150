//! The desired state: what the data path should do, with no Kubernetes types left in it.
//! One shape for every frontend kind: a frontend names a backend set; sets are shared by the
//! frontends of a Service port that use the same endpoints.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use serde::Serialize;

use super::{Family, objects::ObjectRef};
use crate::cidr::Cidr;

/// Transport protocols the data path handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl Protocol {
    /// The IANA number the kernel uses.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::IPPROTO_TCP,
            Protocol::Udp => lb_common::IPPROTO_UDP,
        }
    }

    pub fn from_number(number: u8) -> Option<Self> {
        match number {
            lb_common::IPPROTO_TCP => Some(Protocol::Tcp),
            lb_common::IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// What kind of address a frontend is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum FrontendKind {
    ClusterIP,
    NodePort,
    #[serde(rename = "ExternalIP")]
    ExternalIp,
    LoadBalancer,
}

impl FrontendKind {
    /// The kernel's `frontend_kinds::*`.
    pub fn number(self) -> u8 {
        use lb_common::frontend_kinds::*;
        match self {
            FrontendKind::ClusterIP => CLUSTER_IP,
            FrontendKind::NodePort => NODE_PORT,
            FrontendKind::ExternalIp => EXTERNAL_IP,
            FrontendKind::LoadBalancer => LOAD_BALANCER,
        }
    }

    pub fn from_number(number: u8) -> Option<Self> {
        use lb_common::frontend_kinds::*;
        Some(match number {
            CLUSTER_IP => FrontendKind::ClusterIP,
            NODE_PORT => FrontendKind::NodePort,
            EXTERNAL_IP => FrontendKind::ExternalIp,
            LOAD_BALANCER => FrontendKind::LoadBalancer,
            _ => return None,
        })
    }

    /// Whether traffic from outside the node reaches it (XDP): every kind but ClusterIP.
    pub fn is_external(self) -> bool {
        self != FrontendKind::ClusterIP
    }
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FrontendKind::ClusterIP => "ClusterIP",
            FrontendKind::NodePort => "NodePort",
            FrontendKind::ExternalIp => "ExternalIP",
            FrontendKind::LoadBalancer => "LoadBalancer",
        })
    }
}

/// Which clients a frontend entry serves (Cilium's two scopes): the external scope is the
/// frontend itself; the internal one is the entry in-node clients use when an external
/// frontend's own backend set is this node's endpoints only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Scope {
    #[default]
    External,
    Internal,
}

impl Scope {
    pub fn number(self) -> u8 {
        match self {
            Scope::External => lb_common::scopes::EXTERNAL,
            Scope::Internal => lb_common::scopes::INTERNAL,
        }
    }

    pub fn from_number(number: u8) -> Option<Self> {
        match number {
            lb_common::scopes::EXTERNAL => Some(Scope::External),
            lb_common::scopes::INTERNAL => Some(Scope::Internal),
            _ => None,
        }
    }
}

/// An address a client connects to: a ClusterIP, a NodePort (address 0.0.0.0 or `::`: every
/// NodePort address of the node of that family), an externalIP or a LoadBalancer IP, with
/// port, protocol and scope. IPv4 and IPv6 alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Frontend {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub scope: Scope,
}

impl Frontend {
    /// A frontend of the external scope (the frontend itself).
    pub fn new(ip: IpAddr, port: u16, protocol: Protocol) -> Self {
        Self {
            ip,
            port,
            protocol,
            scope: Scope::External,
        }
    }

    /// A NodePort: every NodePort address of the node of `family`.
    pub fn node_port(family: Family, port: u16, protocol: Protocol) -> Self {
        Self::new(family.unspecified(), port, protocol)
    }

    pub fn family(&self) -> Family {
        Family::of(self.ip)
    }

    pub fn is_node_port(&self) -> bool {
        self.ip.is_unspecified()
    }

    /// The same address in the other scope.
    pub fn in_scope(self, scope: Scope) -> Self {
        Self { scope, ..self }
    }

    /// `IP:port`, `[IPv6]:port`, and for a NodePort `<node>:port` (IPv4) or `[<node>]:port`
    /// (IPv6): one text for logs, `list` and `describe`.
    pub fn address_text(&self) -> String {
        match (self.is_node_port(), self.family()) {
            (true, Family::V4) => format!("<node>:{}", self.port),
            (true, Family::V6) => format!("[<node>]:{}", self.port),
            (false, _) => SocketAddr::new(self.ip, self.port).to_string(),
        }
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address_text(), self.protocol)?;
        if self.scope == Scope::Internal {
            f.write_str(" (in-node clients)")?;
        }
        Ok(())
    }
}

/// Which endpoints of a Service port a backend set holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Endpoints {
    /// Every endpoint (topology hints applied): traffic policy `Cluster`.
    All,
    /// This node's endpoints: `internalTrafficPolicy: Local` for ClusterIPs,
    /// `externalTrafficPolicy: Local` for external frontends.
    Local,
}

impl fmt::Display for Endpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Endpoints::All => "all",
            Endpoints::Local => "local",
        })
    }
}

/// A backend set: the endpoints of one family of one Service port under one traffic policy.
/// Every frontend of the port and family that uses these endpoints shares it (one service id
/// in the maps); the IPv4 and IPv6 frontends of a dual-stack port have a set each.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct SetKey {
    pub name: ServicePortName,
    pub family: Family,
    pub endpoints: Endpoints,
}

impl fmt::Display for SetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({} {} endpoints)",
            self.name, self.family, self.endpoints
        )
    }
}

/// The backends of one set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BackendSet {
    /// The backends a new connection may go to; empty means refuse (or drop).
    pub backends: BTreeSet<Backend>,
    /// Of `backends`, those serving but terminating: used because no endpoint is ready
    /// (kube-proxy's fallback).
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub terminating: BTreeSet<Backend>,
    /// Terminating endpoints not in `backends`: kept in the maps so the flows that use them
    /// drain, never picked by a new connection.
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub draining: BTreeSet<Backend>,
    /// Of `backends` and `draining`, those on this node.
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub local: BTreeSet<Backend>,
}

impl BackendSet {
    /// Every backend the set keeps in the maps: the ones picked and the draining ones.
    pub fn members(&self) -> impl Iterator<Item = &Backend> {
        self.backends.iter().chain(&self.draining)
    }

    /// Whether `backend` is terminating (picked through the fallback, or draining).
    pub fn is_terminating(&self, backend: &Backend) -> bool {
        self.terminating.contains(backend) || self.draining.contains(backend)
    }
}

/// A backend endpoint: pod address (either family) and target port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Backend {
    pub ip: IpAddr,
    pub port: u16,
}

/// By address, then port, in `IpAddr`'s order (IPv4 first, then by octets), compared as
/// integers: the tables of a million backends compare them most of their time.
impl Ord for Backend {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let address = match (self.ip, other.ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => u32::from(a).cmp(&u32::from(b)),
            (IpAddr::V6(a), IpAddr::V6(b)) => u128::from(a).cmp(&u128::from(b)),
            (IpAddr::V4(_), IpAddr::V6(_)) => std::cmp::Ordering::Less,
            (IpAddr::V6(_), IpAddr::V4(_)) => std::cmp::Ordering::Greater,
        };
        address.then(self.port.cmp(&other.port))
    }
}

impl PartialOrd for Backend {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Backend {
    pub fn family(&self) -> Family {
        Family::of(self.ip)
    }
}

/// `IP:port`, `[IPv6]:port`.
impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        SocketAddr::new(self.ip, self.port).fmt(f)
    }
}

/// `namespace/name:port-name`, kube-proxy's ServicePortName. Every frontend, backend set and
/// table naming a port holds a copy: the strings are shared (one allocation per Service and
/// port, a copy is three reference counts).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct ServicePortName {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// Empty for an unnamed port.
    pub port: Arc<str>,
}

/// By namespace, name and port, as strings; copies of one name (most comparisons that end a
/// lookup) are equal without reading the strings.
impl Ord for ServicePortName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let field = |a: &Arc<str>, b: &Arc<str>| {
            if Arc::ptr_eq(a, b) {
                std::cmp::Ordering::Equal
            } else {
                a.cmp(b)
            }
        };
        field(&self.namespace, &other.namespace)
            .then_with(|| field(&self.name, &other.name))
            .then_with(|| field(&self.port, &other.port))
    }
}

impl PartialOrd for ServicePortName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() {
            write!(f, "{}/{}", self.namespace, self.name)
        } else {
            write!(f, "{}/{}:{}", self.namespace, self.name, self.port)
        }
    }
}

/// One programmed frontend and where it leads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DesiredService {
    pub name: ServicePortName,
    /// The family of the frontend and of every backend of its set.
    pub family: Family,
    pub kind: FrontendKind,
    /// The backend set: `(name, endpoints)` in [`DesiredState::sets`].
    pub endpoints: Endpoints,
    /// `Some(seconds)` for `sessionAffinity: ClientIP`.
    pub affinity_timeout_secs: Option<u32>,
    /// `externalTrafficPolicy: Local` on an external frontend: the client address is kept
    /// and a packet is dropped when this node has no endpoint.
    pub local_only: bool,
    /// In-node clients use this frontend's internal-scope entry.
    pub two_scopes: bool,
    /// A LoadBalancer IP's `loadBalancerSourceRanges` of its family (external scope only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_ranges: Option<SourceRanges>,
}

/// The clients a LoadBalancer IP with `loadBalancerSourceRanges` lets in, as kube-proxy's
/// firewall chain of the IP's family does: the ranges of that family, and when one of them
/// holds the node's IP of that family, the service's LoadBalancer IPs of that family too (a
/// VIP the node holds locally loops back with itself as source).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct SourceRanges {
    /// Allowed sources, host bits cleared, all of the frontend's family.
    pub allowed: BTreeSet<Cidr>,
    /// A range holds the node's IP: a node process whose source is not known at connect
    /// time is let in.
    pub allow_node: bool,
    /// The ranges hold every pod CIDR of this node of the family: a pod whose source is not known at
    /// connect time is let in.
    pub allow_pods: bool,
}

impl DesiredService {
    /// The key of this frontend's backend set.
    pub fn set(&self) -> SetKey {
        SetKey {
            name: self.name.clone(),
            family: self.family,
            endpoints: self.endpoints,
        }
    }
}

/// A `healthCheckNodePort` of an `externalTrafficPolicy: Local` service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// Ready endpoints of the service on this node (kube-proxy's `localEndpoints`).
    pub local_endpoints: usize,
}

/// The whole desired state of the data path: every frontend of every kind, the backend
/// sets they lead to, and the health-check node ports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DesiredState {
    pub frontends: BTreeMap<Frontend, DesiredService>,
    pub sets: BTreeMap<SetKey, BackendSet>,
    /// By health-check port.
    pub health_checks: BTreeMap<u16, HealthCheck>,
}

impl DesiredState {
    /// The backend set of a frontend.
    pub fn set_of(&self, frontend: &Frontend) -> Option<&BackendSet> {
        let service = self.frontends.get(frontend)?;
        self.sets.get(&service.set())
    }

    /// The backends a new connection to `frontend` may go to (empty for an unknown one).
    pub fn backends_of(&self, frontend: &Frontend) -> BTreeSet<Backend> {
        self.set_of(frontend)
            .map(|set| set.backends.clone())
            .unwrap_or_default()
    }
}

/// How bad a diagnostic is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Something we deliberately do not handle (SCTP), or leave out as kube-proxy does (an
    /// externalIP of a family the Service has no ClusterIP of).
    Info,
    /// The object, or part of it, makes no sense and was skipped.
    Warning,
}

/// A problem with one object; the rest of the state is computed regardless.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Diagnostic {
    pub severity: Severity,
    pub object: ObjectRef,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.message)
    }
}
