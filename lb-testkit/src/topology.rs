//! A tiny "cluster node": a namespace with a bridge, and pods attached to it by veth pairs.
//!
//! ```text
//!   node netns:  br0 10.244.0.1/24 ── vethA ─┐   ┌─ vethB ── (br0)
//!   pod netns A:              eth0 10.244.0.10   eth0 10.244.0.11 :pod netns B
//! ```
//!
//! There are no default routes: ClusterIPs are never routed, the socket load
//! balancer rewrites them at connect time.

use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};

use crate::names::unique_name;
use crate::netns::Netns;

/// The bridge in the node namespace.
pub const BRIDGE: &str = "br0";
/// The bridge's address; pods are 10.244.0.N/24 with N from [`FIRST_POD_HOST`].
pub const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
pub const POD_PREFIX_LEN: u8 = 24;
pub const FIRST_POD_HOST: u8 = 10;

/// The node namespace with its bridge. Pods are returned to the caller; they
/// and the node each clean up on drop, in any order (declaring pods after the
/// node, as usual, drops pods first).
#[derive(Debug)]
pub struct Node {
    netns: Netns,
    next_host: u8,
}

/// A pod: its namespace, with `eth0` at `ip` on the node's bridge and `lo` up.
#[derive(Debug)]
pub struct Pod {
    pub netns: Netns,
    pub ip: Ipv4Addr,
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
        let bridge_cidr = format!("{BRIDGE_IP}/{POD_PREFIX_LEN}");
        for args in [
            &["ip", "link", "set", "lo", "up"][..],
            &["ip", "link", "add", BRIDGE, "type", "bridge"],
            &["ip", "addr", "add", &bridge_cidr, "dev", BRIDGE],
            &["ip", "link", "set", BRIDGE, "up"],
        ] {
            netns.run(args).context("setting up the node namespace")?;
        }
        Ok(Node {
            netns,
            next_host: FIRST_POD_HOST,
        })
    }

    /// The node namespace (holds `br0` and the host ends of the veths).
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    pub fn bridge_ip(&self) -> Ipv4Addr {
        BRIDGE_IP
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
        let ip = Ipv4Addr::new(10, 244, 0, self.next_host);
        let host_veth = unique_name("veth");
        self.plug(&netns, &host_veth, ip)
            .with_context(|| format!("adding pod {name} ({ip})"))?;
        self.next_host += 1;
        Ok(Pod {
            netns,
            ip,
            name: name.to_string(),
            host_veth,
        })
    }

    /// Creates the veth pair with its pod end directly in the pod as `eth0`.
    /// On failure the pod namespace's drop removes the half-made pair.
    fn plug(&self, pod: &Netns, host_veth: &str, ip: Ipv4Addr) -> Result<()> {
        let pod_cidr = format!("{ip}/{POD_PREFIX_LEN}");
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
        pod.run(&["ip", "link", "set", "eth0", "up"])?;
        pod.run(&["ip", "link", "set", "lo", "up"])?;
        Ok(())
    }
}
