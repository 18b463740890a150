//! A tiny "cluster node": a namespace with a bridge, and pods attached to it by veth pairs.
//!
//! ```text
//!   node netns:  br0 10.244.0.1/24 ── vethA ─┐   ┌─ vethB ── (br0)
//!   pod netns A:              eth0 10.244.0.10   eth0 10.244.0.11 :pod netns B
//! ```
//!
//! There are no default routes: ClusterIPs are never routed, the socket load
//! balancer rewrites them at connect time.
//!
//! A dual-stack node ([`Node::dual_stack`]) gives the bridge and every pod an IPv6 address
//! too, the same host part in fd00:10:244::/64 (written to read like the IPv4 one: pod
//! 10.244.0.10 is fd00:10:244::10), with duplicate address detection off so the addresses work
//! at once. Only the on-link /64 is routed, as for IPv4.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result, bail};

use crate::address::{add_address, host_in, ipv6_without_dad, subnet};
use crate::names::unique_name;
use crate::netns::Netns;

/// The bridge in the node namespace.
pub const BRIDGE: &str = "br0";
/// The bridge's address; pods are 10.244.0.N/24 with N from [`FIRST_POD_HOST`].
pub const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
pub const POD_PREFIX_LEN: u8 = 24;
pub const FIRST_POD_HOST: u8 = 10;
/// The first four groups of a dual-stack node's pod /64: fd00:10:244::/64 (fd00:10:244:S::/64
/// for pod subnet S, see [`Node::dual_stack_in_subnet`]).
pub const POD_PREFIX6: [u16; 4] = [0xfd00, 0x10, 0x244, 0];
/// The bridge's IPv6 address in a dual-stack node (host 1 of [`POD_PREFIX6`]).
pub const BRIDGE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 1);
pub const POD_PREFIX_LEN6: u8 = 64;

/// The node namespace with its bridge. Pods are returned to the caller; they
/// and the node each clean up on drop, in any order (declaring pods after the
/// node, as usual, drops pods first).
#[derive(Debug)]
pub struct Node {
    netns: Netns,
    next_host: u8,
    /// Pods are 10.244.S.N (and fd00:10:244:S::N): S is 0 but for a second node.
    subnet: u8,
    /// Pods (and the bridge) get IPv6 addresses too.
    dual_stack: bool,
}

/// A pod: its namespace, with `eth0` at `ip` (and on a dual-stack node `ip6`) on the node's
/// bridge and `lo` up.
#[derive(Debug)]
pub struct Pod {
    pub netns: Netns,
    pub ip: Ipv4Addr,
    /// Its IPv6 address, on a dual-stack node.
    pub ip6: Option<Ipv6Addr>,
    pub name: String,
    /// The node-side end of the veth pair (in the node namespace, on the bridge).
    pub host_veth: String,
}

impl Node {
    pub fn new() -> Result<Node> {
        Node::with_netns(Netns::new("node")?)
    }

    /// Makes `netns` (fresh, e.g. from [`Netns::named`]) the node namespace.
    pub fn with_netns(netns: Netns) -> Result<Node> {
        Node::build(netns, 0, false)
    }

    /// A dual-stack node: the bridge has [`BRIDGE_IP6`] too, and every pod an IPv6 address.
    pub fn dual_stack() -> Result<Node> {
        Node::dual_stack_with_netns(Netns::new("node")?)
    }

    /// Like [`Node::with_netns`], dual-stack.
    pub fn dual_stack_with_netns(netns: Netns) -> Result<Node> {
        Node::build(netns, 0, true)
    }

    /// A node whose pods are in subnet `subnet`: bridge 10.244.S.1/24, pods 10.244.S.N (a
    /// second node beside one of subnet 0; the caller routes between them).
    pub fn in_subnet(netns: Netns, subnet: u8) -> Result<Node> {
        Node::build(netns, subnet, false)
    }

    /// A dual-stack node whose pods are in subnet `subnet`: bridge 10.244.S.1/24 and
    /// fd00:10:244:S::1/64, pods 10.244.S.N and fd00:10:244:S::N (a second node beside one of
    /// subnet 0; the caller routes between them).
    pub fn dual_stack_in_subnet(netns: Netns, subnet: u8) -> Result<Node> {
        Node::build(netns, subnet, true)
    }

    fn build(netns: Netns, subnet: u8, dual_stack: bool) -> Result<Node> {
        if dual_stack {
            // Before the bridge exists, so that it is made without DAD.
            ipv6_without_dad(&netns)?;
        }
        let node = Node {
            netns,
            next_host: FIRST_POD_HOST,
            subnet,
            dual_stack,
        };
        let bridge_cidr = format!("{}/{POD_PREFIX_LEN}", node.bridge_ip());
        for args in [
            &["ip", "link", "set", "lo", "up"][..],
            &["ip", "link", "add", BRIDGE, "type", "bridge"],
            &["ip", "addr", "add", &bridge_cidr, "dev", BRIDGE],
            &["ip", "link", "set", BRIDGE, "up"],
        ] {
            node.netns
                .run(args)
                .context("setting up the node namespace")?;
        }
        if let Some(ip6) = node.bridge_ip6() {
            // Neighbour discovery is multicast: a snooping bridge without a querier could hold
            // it back, so the bridge floods it.
            node.netns
                .run(&[
                    "ip",
                    "link",
                    "set",
                    BRIDGE,
                    "type",
                    "bridge",
                    "mcast_snooping",
                    "0",
                ])
                .and_then(|_| add_address(&node.netns, BRIDGE, ip6.into(), POD_PREFIX_LEN6))
                .context("setting up the dual-stack node namespace")?;
        }
        Ok(node)
    }

    pub fn is_dual_stack(&self) -> bool {
        self.dual_stack
    }

    /// The node namespace (holds `br0` and the host ends of the veths).
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    pub fn bridge_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.subnet, 1)
    }

    /// The bridge's IPv6 address, on a dual-stack node.
    pub fn bridge_ip6(&self) -> Option<Ipv6Addr> {
        self.dual_stack.then(|| host_in(self.prefix6(), 1))
    }

    /// The pods' IPv4 subnet (`10.244.0.0/24`).
    pub fn pod_subnet(&self) -> String {
        subnet(self.bridge_ip(), POD_PREFIX_LEN)
    }

    /// The pods' IPv6 subnet (`fd00:10:244::/64`), on a dual-stack node.
    pub fn pod_subnet6(&self) -> Option<String> {
        self.bridge_ip6().map(|ip| subnet(ip, POD_PREFIX_LEN6))
    }

    fn prefix6(&self) -> [u16; 4] {
        let [a, b, c, _] = POD_PREFIX6;
        [a, b, c, u16::from(self.subnet)]
    }

    /// Creates a pod namespace joined to the bridge with the next free address.
    pub fn add_pod(&mut self, name: &str) -> Result<Pod> {
        self.add_pod_in(name, Netns::new(name)?)
    }

    /// Like [`Node::add_pod`], with the pod in `netns` (fresh, e.g. from [`Netns::named`]).
    pub fn add_pod_in(&mut self, name: &str, netns: Netns) -> Result<Pod> {
        if self.next_host == u8::MAX {
            bail!("no pod addresses left on node {}", self.netns.name());
        }
        let ip = Ipv4Addr::new(10, 244, self.subnet, self.next_host);
        let ip6 = self
            .dual_stack
            .then(|| host_in(self.prefix6(), self.next_host));
        let host_veth = unique_name("veth");
        self.plug(&netns, &host_veth, ip, ip6)
            .with_context(|| format!("adding pod {name} ({ip})"))?;
        self.next_host += 1;
        Ok(Pod {
            netns,
            ip,
            ip6,
            name: name.to_string(),
            host_veth,
        })
    }

    /// Creates the veth pair with its pod end directly in the pod as `eth0`.
    /// On failure the pod namespace's drop removes the half-made pair.
    fn plug(
        &self,
        pod: &Netns,
        host_veth: &str,
        ip: Ipv4Addr,
        ip6: Option<Ipv6Addr>,
    ) -> Result<()> {
        let pod_cidr = format!("{ip}/{POD_PREFIX_LEN}");
        if ip6.is_some() {
            // Before `eth0` exists, so that it is made without DAD.
            ipv6_without_dad(pod)?;
        }
        self.netns.run(&[
            "ip",
            "link",
            "add",
            host_veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            pod.name(),
        ])?;
        self.netns
            .run(&["ip", "link", "set", host_veth, "master", BRIDGE, "up"])?;
        pod.run(&["ip", "addr", "add", &pod_cidr, "dev", "eth0"])?;
        if let Some(ip6) = ip6 {
            add_address(pod, "eth0", ip6.into(), POD_PREFIX_LEN6)?;
        }
        pod.run(&["ip", "link", "set", "eth0", "up"])?;
        pod.run(&["ip", "link", "set", "lo", "up"])?;
        Ok(())
    }
}
