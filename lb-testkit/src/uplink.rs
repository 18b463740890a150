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

use std::net::Ipv4Addr;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

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

/// Applies [`ROUTER_SYSCTLS`] in `netns` (a node's).
pub fn make_router(netns: &Netns) -> Result<()> {
    for setting in ROUTER_SYSCTLS {
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

/// The subnet of `ip/prefix_len` in CIDR notation (`192.168.77.0/24`).
pub fn subnet(ip: Ipv4Addr, prefix_len: u8) -> String {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(prefix_len.min(32)))
        .unwrap_or(0);
    format!("{}/{prefix_len}", Ipv4Addr::from(u32::from(ip) & mask))
}

/// Gives `iface` in `netns` the address `ip/prefix_len` and brings it up.
fn address(netns: &Netns, iface: &str, ip: Ipv4Addr, prefix_len: u8) -> Result<()> {
    netns.run(&[
        "ip",
        "addr",
        "add",
        &format!("{ip}/{prefix_len}"),
        "dev",
        iface,
    ])?;
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
    pub fn plug(&self, member: &Netns, iface: &str, ip: Ipv4Addr, prefix_len: u8) -> Result<()> {
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

/// A client outside the cluster: its namespace (with `lo` up), its interface and address.
/// Dropping it removes the namespace and its link to the node or LAN.
#[derive(Debug)]
pub struct OutsideClient {
    netns: Netns,
    iface: String,
    ip: Ipv4Addr,
    prefix_len: u8,
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
            address(node, uplink.node_iface, uplink.node_ip, uplink.prefix_len)?;
            netns.run(&["ip", "link", "set", "lo", "up"])?;
            address(
                &netns,
                uplink.client_iface,
                uplink.client_ip,
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
        })
    }

    /// Routes `destination` (`ADDR/LEN`) via `gateway` (a node's address on the subnet).
    pub fn route(&self, destination: &str, gateway: Ipv4Addr) -> Result<()> {
        self.netns
            .run(&[
                "ip",
                "route",
                "add",
                destination,
                "via",
                &gateway.to_string(),
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
    fn subnets() {
        assert_eq!(
            subnet(Ipv4Addr::new(192, 168, 77, 100), 24),
            "192.168.77.0/24"
        );
        assert_eq!(subnet(Ipv4Addr::new(10, 1, 2, 3), 0), "0.0.0.0/0");
        assert_eq!(subnet(Ipv4Addr::new(10, 1, 2, 3), 32), "10.1.2.3/32");
    }

    #[test]
    fn interface_names_are_checked() {
        assert!(check_iface("ext0").is_ok());
        assert!(check_iface("").is_err());
        assert!(check_iface("a-very-long-name").is_err());
    }
}
