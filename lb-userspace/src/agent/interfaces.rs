//! The node's addresses and its interfaces for outside traffic: the addresses NodePorts
//! answer on, of both families (every local address, as kube-proxy's iptables mode, narrowed
//! per family by `--nodeport-addresses`, and 127.0.0.1 and ::1 unless
//! `--localhost-nodeports=false`), for the socket programs and XDP alike; the SNAT address of
//! each family of each `--nodeport-iface`; and the XDP and tc programs attached to those
//! interfaces once the service table holds the first full state. The frontends themselves
//! are programmed with every other kind, by the one sync pass.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context as _, bail};

pub use crate::cidr::Cidr;
use crate::{
    dataplane::{
        Dataplane,
        nodeport::{self, NodeAddrMaps},
    },
    model::Family,
};

/// One entry of kube-proxy's `--nodeport-addresses`: a CIDR of either family, or `primary`
/// (the node's primary IP of each family: its Node's first InternalIP of the family, else
/// ExternalIP).
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
    /// kube-proxy's `--nodeport-addresses`, per family as kube-proxy's proxier of each family
    /// reads it: NodePorts answer only on the node's addresses of a family inside one of the
    /// CIDRs of that family (or its primary IP of that family); a family that no CIDR (nor
    /// `primary`) names answers on all its addresses.
    pub addresses: Vec<NodePortAddress>,
    /// kube-proxy's `--iptables-localhost-nodeports`: in-node clients reach NodePorts at
    /// 127.0.0.1 (and ::1) too.
    pub localhost: bool,
    /// How the tc egress program is attached.
    pub tc_attach: nodeport::TcAttach,
}

/// The node's NodePort addresses and interfaces, and what the agent wrote for them.
pub struct NodeInterfaces {
    config: NodeportConfig,
    maps: NodeAddrMaps,
    attached: bool,
    node_addrs: BTreeSet<IpAddr>,
    /// The node's primary IP of each family, once its Node is known (for
    /// `--nodeport-addresses primary`).
    primary: Vec<IpAddr>,
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
            primary: Vec::new(),
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

    /// The node's primary IPs (one per family) as its Node says (after each sync); rewrites
    /// the addresses when they changed and `--nodeport-addresses` names `primary`.
    pub fn set_primary(&mut self, primary: Vec<IpAddr>) {
        if primary == self.primary {
            return;
        }
        self.primary = primary;
        if self.config.addresses.contains(&NodePortAddress::Primary) {
            tracing::info!(
                primary = ?self.primary,
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

    /// NodePort addresses (`LB4_NODEADDR`, `LB6_NODEADDR`) and SNAT addresses per interface
    /// and family (`LB4_IFADDR`, `LB6_IFADDR`) from the interfaces as they are now.
    fn refresh_addresses(&mut self) -> anyhow::Result<()> {
        let interfaces = nodeport::interfaces()?;
        let (node_addrs, snat) = addresses_of(
            &interfaces,
            &self.config.addresses,
            &self.primary,
            self.config.localhost,
        );
        let mut snat_by_index = BTreeMap::new();
        for name in &self.config.interfaces {
            let Some(iface) = interfaces.get(name) else {
                bail!("interface {name} does not exist");
            };
            for family in Family::ALL {
                if let Some(ip) = snat.get(&(name.clone(), family)) {
                    snat_by_index.insert((iface.index, family), *ip);
                }
            }
        }
        if node_addrs != self.node_addrs {
            tracing::info!(addresses = ?node_addrs, "NodePorts answer on these addresses");
            self.node_addrs = node_addrs.clone();
        }
        self.maps.set_node_addrs(&node_addrs)?;
        self.maps.set_iface_addrs(&snat_by_index)?;
        Ok(())
    }
}

/// Whether `--nodeport-addresses` lets NodePorts answer on `ip`, as kube-proxy's
/// `NodePortAddresses` of `ip`'s family decides: the entries of that family (the CIDRs of
/// the family, `primary` as the node's primary IP of the family) must hold it; with no entry
/// for the family, every address of it does.
fn nodeport_address_allowed(entries: &[NodePortAddress], primary: &[IpAddr], ip: IpAddr) -> bool {
    let family = Family::of(ip);
    let mut named = false;
    for entry in entries {
        match entry {
            NodePortAddress::Cidr(cidr) if cidr.family() == family => {
                named = true;
                if cidr.contains(ip) {
                    return true;
                }
            }
            NodePortAddress::Cidr(_) => {}
            NodePortAddress::Primary => {
                named = true;
                if primary.contains(&ip) {
                    return true;
                }
            }
        }
    }
    !named
}

/// An IPv6 link-local address (`fe80::/10`): one per link, every veth a pod brings has one,
/// and a client needs the link's zone to reach it; no NodePort address (kube-proxy's iptables
/// mode would match it as `LOCAL`).
fn is_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(ip) if ip.is_unicast_link_local())
}

/// An address SNAT may use as its source: not loopback, and for IPv6 not link-local (a reply
/// to it would not leave the link).
fn snat_capable(ip: &IpAddr) -> bool {
    !ip.is_loopback() && !ip.is_multicast() && !is_link_local(ip)
}

/// The addresses NodePorts answer on (both families) and, per interface and family, the SNAT
/// source: the interface's first allowed address of the family that SNAT may use, else its
/// first one SNAT may use.
fn addresses_of(
    interfaces: &BTreeMap<String, nodeport::Interface>,
    entries: &[NodePortAddress],
    primary: &[IpAddr],
    localhost: bool,
) -> (BTreeSet<IpAddr>, BTreeMap<(String, Family), IpAddr>) {
    let allowed = |ip: &IpAddr| nodeport_address_allowed(entries, primary, *ip);
    let mut node_addrs: BTreeSet<IpAddr> = interfaces
        .values()
        .flat_map(|iface| iface.addrs.iter().copied())
        .filter(|ip| !ip.is_loopback() && !is_link_local(ip) && allowed(ip))
        .collect();
    if localhost {
        node_addrs.insert(Ipv4Addr::LOCALHOST.into());
        node_addrs.insert(Ipv6Addr::LOCALHOST.into());
    }
    let mut snat = BTreeMap::new();
    for (name, iface) in interfaces {
        for family in Family::ALL {
            let mut usable = iface
                .addrs
                .iter()
                .filter(|ip| Family::of(**ip) == family && snat_capable(ip));
            let first = usable.clone().next();
            if let Some(ip) = usable.find(|ip| allowed(ip)).or(first) {
                snat.insert((name.clone(), family), *ip);
            }
        }
    }
    (node_addrs, snat)
}

/// `RTMGRP_IPV4_IFADDR`: rtnetlink's multicast group of IPv4 address changes.
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
/// `RTMGRP_IPV6_IFADDR`: the same for IPv6.
const RTMGRP_IPV6_IFADDR: u32 = 0x100;

/// A wakeup whenever an IPv4 or IPv6 address is added to or removed from an interface of this
/// network namespace (rtnetlink's `RTMGRP_IPV4_IFADDR` and `RTMGRP_IPV6_IFADDR`). The
/// messages are not parsed: the receiver re-reads every address, so a burst of changes costs
/// one read.
pub fn address_changes() -> anyhow::Result<tokio::sync::mpsc::Receiver<()>> {
    use netlink_sys::{AsyncSocket as _, AsyncSocketExt as _, SocketAddr, TokioSocket};
    let mut socket = TokioSocket::new(netlink_sys::protocols::NETLINK_ROUTE)
        .context("opening a netlink socket")?;
    socket
        .socket_mut()
        .bind(&SocketAddr::new(0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
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
        assert_eq!(
            "fd00:60::/64".parse::<NodePortAddress>(),
            Ok(NodePortAddress::Cidr("fd00:60::/64".parse().unwrap()))
        );
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// eth0 with an IPv4, a link-local and two global IPv6 addresses; eth1 with one of each
    /// family; lo.
    fn node() -> BTreeMap<String, nodeport::Interface> {
        let iface = |index, addrs: &[&str]| nodeport::Interface {
            index,
            addrs: addrs.iter().map(|a| ip(a)).collect(),
        };
        BTreeMap::from([
            ("lo".to_owned(), iface(1, &["127.0.0.1", "::1"])),
            (
                "eth0".to_owned(),
                iface(
                    2,
                    &["192.168.60.2", "fe80::1", "fd00:60::2", "2001:db8:60::2"],
                ),
            ),
            ("eth1".to_owned(), iface(3, &["10.0.0.2", "fd00:70::2"])),
        ])
    }

    #[test]
    fn nodeports_answer_on_every_address_of_both_families_but_link_local_and_localhost() {
        let (addrs, snat) = addresses_of(&node(), &[], &[], true);
        let expected: BTreeSet<IpAddr> = [
            "127.0.0.1",
            "::1",
            "192.168.60.2",
            "fd00:60::2",
            "2001:db8:60::2",
            "10.0.0.2",
            "fd00:70::2",
        ]
        .into_iter()
        .map(ip)
        .collect();
        // Not the link-local one: per link, and every pod's veth brings one.
        assert_eq!(addrs, expected);
        // The SNAT source of each family: the first global address (never link-local).
        assert_eq!(snat[&("eth0".to_owned(), Family::V6)], ip("fd00:60::2"));
        assert_eq!(snat[&("eth0".to_owned(), Family::V4)], ip("192.168.60.2"));
        assert_eq!(snat[&("eth1".to_owned(), Family::V6)], ip("fd00:70::2"));
        let (addrs, _) = addresses_of(&node(), &[], &[], false);
        assert!(!addrs.contains(&ip("::1")) && !addrs.contains(&ip("127.0.0.1")));
    }

    #[test]
    fn nodeport_addresses_narrow_each_family_by_its_own_entries() {
        let entries: Vec<NodePortAddress> = vec!["192.168.60.0/24".parse().unwrap()];
        // IPv4 narrowed; IPv6 has no entry of its own: every IPv6 address (kube-proxy's
        // per-family NodePortAddresses).
        let (addrs, _) = addresses_of(&node(), &entries, &[], false);
        assert!(addrs.contains(&ip("192.168.60.2")) && !addrs.contains(&ip("10.0.0.2")));
        assert!(addrs.contains(&ip("fd00:70::2")) && addrs.contains(&ip("fd00:60::2")));
        // An IPv6 CIDR narrows IPv6, and the SNAT source prefers an allowed address.
        let entries: Vec<NodePortAddress> = vec![
            "192.168.60.0/24".parse().unwrap(),
            "2001:db8:60::/48".parse().unwrap(),
        ];
        let (addrs, snat) = addresses_of(&node(), &entries, &[], false);
        let v6: BTreeSet<IpAddr> = addrs.iter().copied().filter(IpAddr::is_ipv6).collect();
        assert_eq!(v6, BTreeSet::from([ip("2001:db8:60::2")]));
        assert_eq!(snat[&("eth0".to_owned(), Family::V6)], ip("2001:db8:60::2"));
        // `primary`: the node's primary IP of each family it has one of.
        let primary = [ip("192.168.60.2"), ip("fd00:70::2")];
        let (addrs, _) = addresses_of(&node(), &[NodePortAddress::Primary], &primary, false);
        assert_eq!(addrs, BTreeSet::from(primary));
        let (addrs, _) = addresses_of(&node(), &[NodePortAddress::Primary], &primary[..1], false);
        assert_eq!(addrs, BTreeSet::from([primary[0]]));
    }
}
