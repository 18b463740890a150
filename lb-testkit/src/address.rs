//! Addresses on the test interfaces, for either family: one `ip addr add` for both, IPv6 made
//! usable at once (no duplicate address detection), and the subnet of an address.
//!
//! A namespace is made ready for IPv6 with [`ipv6_without_dad`] before its interfaces are
//! created (so their link-local addresses skip DAD too); every IPv6 address is then added with
//! `nodad`. Without this an address stays *tentative* for about a second and a connect from
//! or to it fails with `EADDRNOTAVAIL` or goes unanswered.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result};

use crate::netns::Netns;

/// What makes IPv6 addresses in a namespace usable as soon as they are added: no duplicate
/// address detection, on every interface made from now on (`default`) and on those there are
/// (`all`).
pub const IPV6_SYSCTLS: [&str; 4] = [
    "net.ipv6.conf.all.disable_ipv6=0",
    "net.ipv6.conf.default.disable_ipv6=0",
    "net.ipv6.conf.all.accept_dad=0",
    "net.ipv6.conf.default.accept_dad=0",
];

/// Applies [`IPV6_SYSCTLS`] in `netns`; call it before the namespace gets its interfaces.
pub fn ipv6_without_dad(netns: &Netns) -> Result<()> {
    for setting in IPV6_SYSCTLS {
        netns
            .run(&["sysctl", "-qw", setting])
            .with_context(|| format!("IPv6 without DAD in {}", netns.name()))?;
    }
    Ok(())
}

/// Adds `ip/prefix_len` to `iface` in `netns` (an IPv6 address with `nodad`: usable at once).
pub fn add_address(netns: &Netns, iface: &str, ip: IpAddr, prefix_len: u8) -> Result<()> {
    let cidr = format!("{ip}/{prefix_len}");
    let mut args = vec!["ip", "addr", "add", &cidr, "dev", iface];
    if ip.is_ipv6() {
        args.push("nodad");
    }
    netns
        .run(&args)
        .map(drop)
        .with_context(|| format!("adding {cidr} to {iface}"))
}

/// The subnet of `ip/prefix_len` in CIDR notation (`192.168.77.0/24`, `fd00:172::/64`).
pub fn subnet(ip: impl Into<IpAddr>, prefix_len: u8) -> String {
    match ip.into() {
        IpAddr::V4(ip) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix_len.min(32)))
                .unwrap_or(0);
            format!("{}/{prefix_len}", Ipv4Addr::from(u32::from(ip) & mask))
        }
        IpAddr::V6(ip) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix_len.min(128)))
                .unwrap_or(0);
            format!("{}/{prefix_len}", Ipv6Addr::from(u128::from(ip) & mask))
        }
    }
}

/// The IPv6 address of host `host` in the /64 `prefix` (its first four groups), written so that
/// it reads like the IPv4 host part: host 10 is `…::10` (hex 0x10), as pod 10.244.0.10 is
/// fd00:10:244::10.
pub fn host_in(prefix: [u16; 4], host: u8) -> Ipv6Addr {
    let readable = u16::from_str_radix(&host.to_string(), 16).expect("a decimal is hex digits");
    let [a, b, c, d] = prefix;
    Ipv6Addr::new(a, b, c, d, 0, 0, 0, readable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_of_both_families() {
        assert_eq!(
            subnet(Ipv4Addr::new(192, 168, 77, 100), 24),
            "192.168.77.0/24"
        );
        assert_eq!(subnet(Ipv4Addr::new(10, 1, 2, 3), 0), "0.0.0.0/0");
        assert_eq!(subnet(Ipv4Addr::new(10, 1, 2, 3), 32), "10.1.2.3/32");
        let v6: Ipv6Addr = "fd00:172::100".parse().unwrap();
        assert_eq!(subnet(v6, 64), "fd00:172::/64");
        assert_eq!(subnet(v6, 0), "::/0");
        assert_eq!(subnet(v6, 128), "fd00:172::100/128");
    }

    #[test]
    fn hosts_read_like_their_ipv4_host_part() {
        let pods = [0xfd00, 0x10, 0x244, 0];
        assert_eq!(host_in(pods, 10).to_string(), "fd00:10:244::10");
        assert_eq!(host_in(pods, 1).to_string(), "fd00:10:244::1");
        assert_eq!(host_in(pods, 254).to_string(), "fd00:10:244::254");
        assert_eq!(
            host_in([0xfd00, 0x10, 0x244, 1], 10).to_string(),
            "fd00:10:244:1::10"
        );
    }
}
