//! The outside of a cluster: a client namespace outside it, joined to a node's uplink
//! interface, for north-south traffic (NodePorts, externalIPs).
//!
//! Two ways to join them:
//!
//! ```text
//!   direct (OutsideClient::direct):   node netns  ext0 192.168.77.1/24 ── eth0 192.168.77.100/24  client netns
//!
//!   a LAN (Lan, OutsideClient::on_lan):
//!     client netns  lan0 ─┐
//!                          ├─ lan netns: bridge lanbr
//!     node netns    lan0 ─┘   (any number of members, each by a veth pair)
//! ```
//!
//! Nothing is made in the root namespace: each veth pair is created in the node's (or the
//! LAN's) namespace with its peer put straight into the other. Interface names are checked
//! against [`MAX_NAME_LEN`]; the LAN's own ends get unique names. Dropping the client deletes
//! its veth pair (the node's end, or the LAN's, goes with it) and its namespace; dropping the
//! LAN deletes every veth pair plugged into it (each member's LAN interface goes with it), then
//! its namespace and bridge. The pairs are deleted first because a namespace's interfaces are
//! only destroyed some time after the namespace is deleted.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

use crate::address::{add_address, ipv6_without_dad, subnet};
use crate::names::{MAX_NAME_LEN, unique_name};
use crate::netns::Netns;

/// The LAN's bridge, in the LAN's namespace.
pub const LAN_BRIDGE: &str = "lanbr";

/// What a node needs to route between its uplink and its pods, with the XDP program's
/// translated packets: forwarding, no redirects (replies leave by the interface the flow came
/// in on, where tc egress translates them back), no reverse-path filter on translated packets.
pub const ROUTER_SYSCTLS: [&str; 4] = [
    "net.ipv4.ip_forward=1",
    "net.ipv4.conf.all.send_redirects=0",
    "net.ipv4.conf.all.rp_filter=0",
    "net.ipv4.conf.default.rp_filter=0",
];

/// What a dual-stack node needs besides [`ROUTER_SYSCTLS`]: IPv6 forwarding (IPv6 has no
/// reverse-path filter and no redirects to turn off here: `all.forwarding` stops them).
pub const ROUTER_SYSCTLS_V6: [&str; 1] = ["net.ipv6.conf.all.forwarding=1"];

/// Applies [`ROUTER_SYSCTLS`] in `netns` (a node's).
pub fn make_router(netns: &Netns) -> Result<()> {
    apply(netns, &ROUTER_SYSCTLS)
}

/// Applies [`ROUTER_SYSCTLS`] and [`ROUTER_SYSCTLS_V6`] in `netns` (a dual-stack node's).
pub fn make_dual_stack_router(netns: &Netns) -> Result<()> {
    apply(netns, &ROUTER_SYSCTLS)?;
    apply(netns, &ROUTER_SYSCTLS_V6)
}

fn apply(netns: &Netns, settings: &[&str]) -> Result<()> {
    for setting in settings {
        netns
            .run(&["sysctl", "-qw", setting])
            .with_context(|| format!("making {} a router", netns.name()))?;
    }
    Ok(())
}

fn check_iface(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        bail!("interface name {name:?} is empty or longer than {MAX_NAME_LEN} bytes");
    }
    Ok(())
}

/// Gives `iface` in `netns` the address `ip/prefix_len` and brings it up.
fn address(netns: &Netns, iface: &str, ip: IpAddr, prefix_len: u8) -> Result<()> {
    add_address(netns, iface, ip, prefix_len)?;
    netns.run(&["ip", "link", "set", iface, "up"])?;
    Ok(())
}

/// A veth pair straight from a node to an outside client: the names and addresses of both
/// ends, on one subnet.
#[derive(Clone, Copy, Debug)]
pub struct Uplink<'a> {
    /// The node's end, e.g. `ext0`: its uplink, where the agent serves NodePorts.
    pub node_iface: &'a str,
    pub node_ip: Ipv4Addr,
    /// The client's end, e.g. `eth0`.
    pub client_iface: &'a str,
    pub client_ip: Ipv4Addr,
    pub prefix_len: u8,
}

impl Uplink<'_> {
    /// The subnet both ends are on (`192.168.77.0/24`).
    pub fn subnet(&self) -> String {
        subnet(self.node_ip, self.prefix_len)
    }
}

/// A LAN: a bridge in a namespace of its own, which nodes and outside clients join.
#[derive(Debug)]
pub struct Lan {
    netns: Netns,
    /// The LAN's ends of the veth pairs plugged in.
    ports: Mutex<Vec<String>>,
}

impl Lan {
    /// The namespace `lan<pid>-<n>` with the bridge [`LAN_BRIDGE`] up.
    pub fn new() -> Result<Lan> {
        let netns = Netns::new("lan")?;
        netns
            .run(&["ip", "link", "add", LAN_BRIDGE, "type", "bridge"])
            .and_then(|_| netns.run(&["ip", "link", "set", LAN_BRIDGE, "up"]))
            .context("creating the LAN bridge")?;
        Ok(Lan {
            netns,
            ports: Mutex::new(Vec::new()),
        })
    }

    /// The LAN's namespace (holds the bridge and the LAN's ends of the veth pairs).
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// Joins `member` (a node's namespace, or a client's) to the LAN: a veth pair with a unique
    /// name on the bridge and `iface` in `member`, which gets `ip/prefix_len` and is brought up.
    /// For both families use [`Lan::plug_dual_stack`].
    pub fn plug(
        &self,
        member: &Netns,
        iface: &str,
        ip: impl Into<IpAddr>,
        prefix_len: u8,
    ) -> Result<()> {
        let ip = ip.into();
        check_iface(iface)?;
        let outer = unique_name("lan");
        (|| -> Result<()> {
            self.netns.run(&[
                "ip",
                "link",
                "add",
                &outer,
                "type",
                "veth",
                "peer",
                "name",
                iface,
                "netns",
                member.name(),
            ])?;
            self.ports
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(outer.clone());
            self.netns
                .run(&["ip", "link", "set", &outer, "master", LAN_BRIDGE, "up"])?;
            address(member, iface, ip, prefix_len)
        })()
        .with_context(|| format!("joining {} to the LAN as {iface} {ip}", member.name()))
    }

    /// Joins `member` to the LAN with an IPv4 and an IPv6 address on `iface`; IPv6 without
    /// duplicate address detection (see [`ipv6_without_dad`]), so both work at once.
    pub fn plug_dual_stack(
        &self,
        member: &Netns,
        iface: &str,
        (ip, prefix_len): (Ipv4Addr, u8),
        (ip6, prefix_len6): (Ipv6Addr, u8),
    ) -> Result<()> {
        ipv6_without_dad(member)?;
        self.plug(member, iface, ip, prefix_len)?;
        add_address(member, iface, ip6.into(), prefix_len6)
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let ports = std::mem::take(self.ports.get_mut().unwrap_or_else(|e| e.into_inner()));
        for port in ports {
            delete_link(&self.netns, &port);
        }
    }
}

/// Deletes the veth pair `iface` in `netns` is an end of; complains only if it is still there.
fn delete_link(netns: &Netns, iface: &str) {
    if let Err(error) = netns.run(&["ip", "link", "del", iface]) {
        let gone = netns.run(&["ip", "link", "show", iface]).is_err();
        if !gone {
            eprintln!(
                "lb-testkit: deleting {iface} in {}: {error:#}",
                netns.name()
            );
        }
    }
}

/// A client outside the cluster: its namespace (with `lo` up), its interface and address
/// (and, dual-stack, its IPv6 address). Dropping it removes the namespace and its link to the
/// node or LAN.
#[derive(Debug)]
pub struct OutsideClient {
    netns: Netns,
    iface: String,
    ip: Ipv4Addr,
    prefix_len: u8,
    ip6: Option<(Ipv6Addr, u8)>,
}

impl OutsideClient {
    /// Makes `netns` (fresh: from [`Netns::new`], or [`Netns::named`] for fixed names) the
    /// client at the far end of `uplink`, a veth pair created in `node`'s namespace. Only the
    /// routes of the subnet come with the addresses.
    pub fn direct(netns: Netns, node: &Netns, uplink: &Uplink<'_>) -> Result<OutsideClient> {
        check_iface(uplink.node_iface)?;
        check_iface(uplink.client_iface)?;
        (|| -> Result<()> {
            node.run(&[
                "ip",
                "link",
                "add",
                uplink.node_iface,
                "type",
                "veth",
                "peer",
                "name",
                uplink.client_iface,
                "netns",
                netns.name(),
            ])?;
            address(
                node,
                uplink.node_iface,
                uplink.node_ip.into(),
                uplink.prefix_len,
            )?;
            netns.run(&["ip", "link", "set", "lo", "up"])?;
            address(
                &netns,
                uplink.client_iface,
                uplink.client_ip.into(),
                uplink.prefix_len,
            )
        })()
        .with_context(|| {
            format!(
                "joining {} ({} {}) to {}'s {} {}",
                netns.name(),
                uplink.client_iface,
                uplink.client_ip,
                node.name(),
                uplink.node_iface,
                uplink.node_ip
            )
        })?;
        Ok(OutsideClient {
            netns,
            iface: uplink.client_iface.to_owned(),
            ip: uplink.client_ip,
            prefix_len: uplink.prefix_len,
            ip6: None,
        })
    }

    /// Makes `netns` (fresh) a client on `lan`, as `iface` with `ip/prefix_len`.
    pub fn on_lan(
        netns: Netns,
        lan: &Lan,
        iface: &str,
        ip: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<OutsideClient> {
        lan.plug(&netns, iface, ip, prefix_len)?;
        netns
            .run(&["ip", "link", "set", "lo", "up"])
            .with_context(|| format!("in the outside client {}", netns.name()))?;
        Ok(OutsideClient {
            netns,
            iface: iface.to_owned(),
            ip,
            prefix_len,
            ip6: None,
        })
    }

    /// Makes `netns` (fresh) a dual-stack client on `lan`, as `iface` with an IPv4 and an IPv6
    /// address (IPv6 without duplicate address detection: usable at once).
    pub fn on_lan_dual_stack(
        netns: Netns,
        lan: &Lan,
        iface: &str,
        v4: (Ipv4Addr, u8),
        v6: (Ipv6Addr, u8),
    ) -> Result<OutsideClient> {
        lan.plug_dual_stack(&netns, iface, v4, v6)?;
        netns
            .run(&["ip", "link", "set", "lo", "up"])
            .with_context(|| format!("in the outside client {}", netns.name()))?;
        Ok(OutsideClient {
            netns,
            iface: iface.to_owned(),
            ip: v4.0,
            prefix_len: v4.1,
            ip6: Some(v6),
        })
    }

    /// Adds the IPv6 address `ip6/prefix_len` (`nodad`: usable at once) to the client's
    /// interface, e.g. after [`OutsideClient::direct`]; the node's end gets its own with
    /// [`crate::add_address`].
    pub fn add_ip6(&mut self, ip6: Ipv6Addr, prefix_len: u8) -> Result<()> {
        self.netns
            .run(&[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{}.accept_dad=0", self.iface),
            ])
            .and_then(|_| add_address(&self.netns, &self.iface, ip6.into(), prefix_len))
            .with_context(|| format!("in the outside client {}", self.netns.name()))?;
        self.ip6 = Some((ip6, prefix_len));
        Ok(())
    }

    /// Routes `destination` (`ADDR/LEN`, either family) via `gateway` (a node's address on the
    /// subnet, of the same family).
    pub fn route(&self, destination: &str, gateway: impl Into<IpAddr>) -> Result<()> {
        self.netns
            .run(&[
                "ip",
                "route",
                "add",
                destination,
                "via",
                &gateway.into().to_string(),
            ])
            .map(drop)
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// Its interface (toward the node or the LAN).
    pub fn iface(&self) -> &str {
        &self.iface
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Its IPv6 address, when it is dual-stack.
    pub fn ip6(&self) -> Option<Ipv6Addr> {
        self.ip6.map(|(ip, _)| ip)
    }

    /// The subnet it is on (`192.168.77.0/24`).
    pub fn subnet(&self) -> String {
        subnet(self.ip, self.prefix_len)
    }
}

impl Drop for OutsideClient {
    fn drop(&mut self) {
        delete_link(&self.netns, &self.iface);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked() {
        assert!(check_iface("ext0").is_ok());
        assert!(check_iface("").is_err());
        assert!(check_iface("a-very-long-name").is_err());
    }
}
