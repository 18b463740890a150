//! IPv4 CIDRs: `--nodeport-addresses`, `loadBalancerSourceRanges`, a node's pod CIDRs.
use std::{fmt, net::Ipv4Addr, str::FromStr};

/// An IPv4 CIDR. The address may carry host bits as written (`10.0.0.7/24`);
/// [`Cidr::network`] clears them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Self {
        Self {
            addr,
            prefix: prefix.min(32),
        }
    }

    /// One address.
    pub fn host(addr: Ipv4Addr) -> Self {
        Self::new(addr, 32)
    }

    fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix as u32)
        }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }

    /// Whether every address of `other` is in this one.
    pub fn covers(&self, other: &Cidr) -> bool {
        self.prefix <= other.prefix && self.contains(other.addr)
    }

    /// The same CIDR with the host bits cleared.
    pub fn network(&self) -> Self {
        Self::new(
            Ipv4Addr::from(u32::from(self.addr) & self.mask()),
            self.prefix,
        )
    }

    /// `0.0.0.0/0`: every address.
    pub fn is_everything(&self) -> bool {
        self.prefix == 0
    }

    /// Parses `a.b.c.d/n` only (no bare address), as Kubernetes validates CIDR fields.
    pub fn parse_strict(text: &str) -> Result<Self, String> {
        if !text.contains('/') {
            return Err(format!("{text:?} is not a CIDR (address/prefix length)"));
        }
        text.parse()
    }
}

/// `a.b.c.d/n`, or a bare address (`/32`).
impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = text.split_once('/').unwrap_or((text, "32"));
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not an IPv4 CIDR"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("{text:?} has no valid prefix length (0-32)"))?;
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_match_like_kube_proxys_nodeport_addresses() {
        let lan: Cidr = "192.168.60.0/24".parse().unwrap();
        assert!(lan.contains("192.168.60.1".parse().unwrap()));
        assert!(!lan.contains("192.168.61.1".parse().unwrap()));
        let host: Cidr = "10.0.0.7".parse().unwrap();
        assert_eq!(host.to_string(), "10.0.0.7/32");
        assert!(host.contains("10.0.0.7".parse().unwrap()));
        assert!(!host.contains("10.0.0.8".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.7".parse().unwrap()));
        assert!(all.is_everything());
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("primary".parse::<Cidr>().is_err());
    }

    #[test]
    fn strict_parsing_wants_a_prefix_and_networks_drop_host_bits() {
        assert!(Cidr::parse_strict("10.0.0.7").is_err());
        let written = Cidr::parse_strict("10.1.2.3/16").unwrap();
        assert_eq!(written.network().to_string(), "10.1.0.0/16");
        let pods: Cidr = "10.1.5.0/24".parse().unwrap();
        assert!(written.covers(&pods));
        assert!(!pods.covers(&written));
        assert!(!"10.2.0.0/16".parse::<Cidr>().unwrap().covers(&pods));
    }
}
