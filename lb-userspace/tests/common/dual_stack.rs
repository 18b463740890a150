//! The dual-stack test cluster and its manifests: a [`Cluster`] whose node, pods and client
//! have IPv6 addresses too (fd00:10:244::N/64 beside 10.244.0.N/24, see
//! `lb_testkit::Node::dual_stack`), backends serving both families on `POD_PORT`, and Services
//! and EndpointSlices as the API server writes them for either family: `clusterIPs` with
//! `ipFamilies` in the same order and an `ipFamilyPolicy`, one slice per family with its
//! `addressType`.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use lb_testkit::Node;
use lb_testkit::objects::{ServiceManifest, SliceManifest};

use super::{Agent, Cluster, ProbeResult};

/// The agent's `--node-name`: every pod of a [`Cluster`] runs on it.
pub const NODE: &str = "node-a";

impl Cluster {
    /// A dual-stack node with `backends` pods answering with their names on `POD_PORT` over
    /// both families (TCP and UDP), and a dual-stack client pod.
    pub fn dual_stack(backends: &[&str]) -> Cluster {
        lb_testkit::require_root().expect("the kernel tests need root");
        Cluster::on(
            Node::dual_stack().expect("creating the dual-stack node namespace"),
            backends,
        )
    }

    /// The IPv6 address of pod `name` (of a dual-stack cluster).
    pub fn pod_ip6(&self, name: &str) -> Ipv6Addr {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
            .ip6
            .unwrap_or_else(|| panic!("pod {name} has no IPv6 address: not a dual-stack cluster"))
    }

    /// Pod `name`'s address of `family` (`IPv4` or `IPv6`).
    pub fn pod_ip_of(&self, name: &str, family: &str) -> IpAddr {
        match family {
            "IPv6" => self.pod_ip6(name).into(),
            _ => self.pod_ip(name).into(),
        }
    }

    /// The client pod's IPv6 address (of a dual-stack cluster).
    pub fn client_ip6(&self) -> Ipv6Addr {
        self.client.ip6.expect("a dual-stack cluster's client")
    }

    /// Repeats `lb-probe ARGS` (in the client pod, in the test cgroup) until `done` holds for
    /// the answer, or fails after `timeout` with the last answer and the agent's log.
    pub fn probe_until(
        &self,
        args: &[&str],
        timeout: Duration,
        done: impl Fn(&ProbeResult) -> bool,
    ) -> ProbeResult {
        let started = Instant::now();
        loop {
            let result = self.probe(args);
            if done(&result) {
                return result;
            }
            assert!(
                started.elapsed() < timeout,
                "not reached within {timeout:?}: {args:?} -> {result:?}; agent log:\n{}",
                self.agent.as_ref().map(Agent::log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The family the API names for `ip`: `IPv4` or `IPv6`.
pub fn family_of(ip: IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(_) => "IPv4",
        IpAddr::V6(_) => "IPv6",
    }
}

/// A ClusterIP Service `namespace/name` selecting `app: name` with these `clusterIPs` (the
/// primary family's first), `ipFamilies` in their order and `ipFamilyPolicy: policy`
/// (SingleStack, PreferDualStack, RequireDualStack), without ports: as the API server stores
/// a Service once it has allocated its addresses.
pub fn service(namespace: &str, name: &str, ips: &[IpAddr], policy: &str) -> ServiceManifest {
    let families: Vec<&str> = ips.iter().map(|ip| family_of(*ip)).collect();
    ServiceManifest::cluster_ip(namespace, name, ips[0])
        .cluster_ips(ips)
        .ip_families(&families)
        .ip_family_policy(policy)
        .selector("app", name)
}

/// The EndpointSlice `<service>-<family>` of `service` with these ready endpoints (all of one
/// family, `addressType` theirs) on their nodes, without ports: the EndpointSlice controller
/// writes one per family.
pub fn slice(namespace: &str, service: &str, endpoints: &[(IpAddr, &str)]) -> SliceManifest {
    let family = endpoints.first().map_or("IPv4", |(ip, _)| family_of(*ip));
    assert!(
        endpoints.iter().all(|(ip, _)| family_of(*ip) == family),
        "one family per slice: {endpoints:?}"
    );
    let name = format!("{service}-{}", family.to_ascii_lowercase());
    endpoints.iter().fold(
        SliceManifest::new(namespace, &name, service).address_type(family),
        |slice, (ip, node)| slice.endpoint(ip).on_node(node).ready(true),
    )
}

/// `ip:port`, or `[ip]:port` for IPv6, as a socket address prints (and lb-probe takes and
/// reports it).
pub fn at(ip: impl Into<IpAddr>, port: u16) -> String {
    SocketAddr::new(ip.into(), port).to_string()
}

/// The address of a `--whoami` answer (`IP:PORT` as the server saw the client).
pub fn whoami_ip(answer: &str) -> Option<IpAddr> {
    answer.parse::<SocketAddr>().ok().map(|a| a.ip())
}

/// Every reply (a `--whoami` answer) is from `ip`, and nothing failed.
pub fn all_from(result: &ProbeResult, ip: impl Into<IpAddr>) -> bool {
    let ip = ip.into();
    !result.replies.is_empty()
        && result.failures() == 0
        && result
            .replies
            .keys()
            .all(|seen| whoami_ip(seen) == Some(ip))
}
