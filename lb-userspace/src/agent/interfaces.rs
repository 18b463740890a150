//! The node's addresses and its interfaces for outside traffic: the addresses NodePorts
//! answer on (every local address, as kube-proxy's iptables mode, narrowed by
//! `--nodeport-addresses`, and 127.0.0.1 unless `--localhost-nodeports=false`), for the socket
//! programs and XDP alike; the SNAT address of each `--nodeport-iface`; and the XDP and tc
//! programs attached to those interfaces once the service table holds the first full state.
//! The frontends themselves are programmed with every other kind, by the one sync pass.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use anyhow::{Context as _, bail};

pub use crate::cidr::Cidr;
use crate::dataplane::{
    Dataplane,
    nodeport::{self, NodeAddrMaps},
};

/// One entry of kube-proxy's `--nodeport-addresses`: a CIDR, or `primary` (the node's
/// primary IP: its Node's first InternalIP, else ExternalIP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodePortAddress {
    Cidr(Cidr),
    Primary,
}

impl std::str::FromStr for NodePortAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text == "primary" {
            return Ok(Self::Primary);
        }
        text.parse()
            .map(Self::Cidr)
            .map_err(|e| format!("{e}; expected a CIDR or `primary`"))
    }
}

/// Where north-south traffic is served.
#[derive(Clone, Debug, Default)]
pub struct NodeportConfig {
    /// Interfaces that get the XDP and tc programs; empty: no north-south data path.
    pub interfaces: Vec<String>,
    /// kube-proxy's `--nodeport-addresses`: NodePorts answer only on the node's addresses
    /// inside one of these (or its primary IP); empty: on all of them.
    pub addresses: Vec<NodePortAddress>,
    /// kube-proxy's `--iptables-localhost-nodeports`: in-node clients reach NodePorts at
    /// 127.0.0.1 too.
    pub localhost: bool,
    /// How the tc egress program is attached.
    pub tc_attach: nodeport::TcAttach,
}

/// The node's NodePort addresses and interfaces, and what the agent wrote for them.
pub struct NodeInterfaces {
    config: NodeportConfig,
    maps: NodeAddrMaps,
    attached: bool,
    node_addrs: BTreeSet<Ipv4Addr>,
    /// The node's primary IP, once its Node is known (for `--nodeport-addresses primary`).
    primary: Option<Ipv4Addr>,
}

impl NodeInterfaces {
    /// Takes the address maps and writes the node's addresses as they are now; later changes
    /// arrive through [`address_changes`] and [`NodeInterfaces::follow_addresses`].
    pub fn start(dataplane: &mut Dataplane, config: NodeportConfig) -> anyhow::Result<Self> {
        let mut interfaces = Self {
            maps: NodeAddrMaps::take(dataplane.ebpf_mut())?,
            // Nothing to attach without interfaces.
            attached: config.interfaces.is_empty(),
            config,
            node_addrs: BTreeSet::new(),
            primary: None,
        };
        interfaces.follow_addresses();
        Ok(interfaces)
    }

    /// Whether outside traffic is served (XDP and tc on some interface).
    pub fn serves_outside_traffic(&self) -> bool {
        !self.config.interfaces.is_empty()
    }

    /// Attaches the programs to the interfaces, once (after the first sync).
    pub fn attach_once(&mut self, dataplane: &mut Dataplane) -> anyhow::Result<()> {
        if !self.attached {
            self.attach(dataplane)?;
            self.attached = true;
        }
        Ok(())
    }

    fn attach(&mut self, dataplane: &mut Dataplane) -> anyhow::Result<()> {
        let links_root = dataplane.pins().links();
        let mut kept = Vec::new();
        for iface in &self.config.interfaces {
            let dir = crate::dataplane::links::dir_for_interface(&links_root, iface);
            let (mode, xdp, tc) =
                nodeport::attach(dataplane.ebpf_mut(), iface, &dir, self.config.tc_attach)
                    .with_context(|| format!("attaching the north-south programs to {iface}"))?;
            let mode = mode.map_or("unchanged".to_owned(), |m| m.to_string());
            tracing::info!(
                iface = %iface,
                xdp_mode = %mode,
                ?xdp,
                ?tc,
                "north-south programs attached (XDP {mode} mode ingress, tc egress)"
            );
            kept.push(dir);
        }
        for stale in crate::dataplane::links::remove_other_interfaces(&links_root, &kept)? {
            tracing::info!(links = %stale.display(), "detached north-south programs of an interface no longer served");
        }
        Ok(())
    }

    /// The node's primary IP as its Node says (after each sync); rewrites the addresses when
    /// it changed and `--nodeport-addresses` names `primary`.
    pub fn set_primary(&mut self, primary: Option<Ipv4Addr>) {
        if primary == self.primary {
            return;
        }
        self.primary = primary;
        if self.config.addresses.contains(&NodePortAddress::Primary) {
            tracing::info!(
                ?primary,
                "the node's primary IP (--nodeport-addresses primary)"
            );
            self.follow_addresses();
        }
    }

    /// Writes the addresses as they are now (at start, and after each netlink notification);
    /// a failure is logged and leaves the previous addresses in place.
    pub fn follow_addresses(&mut self) {
        if let Err(error) = self.refresh_addresses() {
            tracing::warn!(error = %format!("{error:#}"), "could not update the node's addresses");
        }
    }

    /// NodePort addresses (`LB4_NODEADDR`) and SNAT addresses per interface (`LB4_IFADDR`)
    /// from the interfaces as they are now.
    fn refresh_addresses(&mut self) -> anyhow::Result<()> {
        let interfaces = nodeport::interfaces()?;
        let allowed = |ip: &Ipv4Addr| {
            self.config.addresses.is_empty()
                || self.config.addresses.iter().any(|entry| match entry {
                    NodePortAddress::Cidr(cidr) => cidr.contains((*ip).into()),
                    NodePortAddress::Primary => self.primary == Some(*ip),
                })
        };
        let mut node_addrs: BTreeSet<Ipv4Addr> = interfaces
            .values()
            .flat_map(|iface| iface.addrs.iter().copied())
            .filter(|ip| !ip.is_loopback() && allowed(ip))
            .collect();
        if self.config.localhost {
            node_addrs.insert(Ipv4Addr::LOCALHOST);
        }
        let mut snat = BTreeMap::new();
        for name in &self.config.interfaces {
            let Some(iface) = interfaces.get(name) else {
                bail!("interface {name} does not exist");
            };
            let own = iface.addrs.iter().find(|ip| allowed(ip));
            if let Some(first) = own.or(iface.addrs.first()) {
                snat.insert(iface.index, *first);
            }
        }
        if node_addrs != self.node_addrs {
            tracing::info!(addresses = ?node_addrs, "NodePorts answer on these addresses");
            self.node_addrs = node_addrs.clone();
        }
        self.maps.set_node_addrs(&node_addrs)?;
        self.maps.set_iface_addrs(&snat)?;
        Ok(())
    }
}

/// `RTMGRP_IPV4_IFADDR`: rtnetlink's multicast group of IPv4 address changes.
const RTMGRP_IPV4_IFADDR: u32 = 0x10;

/// A wakeup whenever an IPv4 address is added to or removed from an interface of this network
/// namespace (rtnetlink's `RTMGRP_IPV4_IFADDR`). The messages are not parsed: the receiver
/// re-reads every address, so a burst of changes costs one read.
pub fn address_changes() -> anyhow::Result<tokio::sync::mpsc::Receiver<()>> {
    use netlink_sys::{AsyncSocket as _, AsyncSocketExt as _, SocketAddr, TokioSocket};
    let mut socket = TokioSocket::new(netlink_sys::protocols::NETLINK_ROUTE)
        .context("opening a netlink socket")?;
    socket
        .socket_mut()
        .bind(&SocketAddr::new(0, RTMGRP_IPV4_IFADDR))
        .context("subscribing to the node's address changes (netlink)")?;
    let (wakeups, receiver) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            if let Err(error) = socket.recv_from_full().await {
                tracing::warn!(%error, "no longer following the node's address changes");
                return;
            }
            // A full channel already holds a wakeup; a closed one has no reader left.
            if let Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) = wakeups.try_send(()) {
                return;
            }
        }
    });
    Ok(receiver)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodeport_addresses_take_cidrs_and_the_primary_keyword() {
        assert_eq!(
            "primary".parse::<NodePortAddress>(),
            Ok(NodePortAddress::Primary)
        );
        assert_eq!(
            "192.168.60.0/24".parse::<NodePortAddress>(),
            Ok(NodePortAddress::Cidr("192.168.60.0/24".parse().unwrap()))
        );
        let error = "primry".parse::<NodePortAddress>().unwrap_err();
        assert!(error.contains("`primary`"), "{error}");
    }
}
