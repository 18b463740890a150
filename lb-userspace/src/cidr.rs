//! CIDRs of either family: `--nodeport-addresses`, `loadBalancerSourceRanges`, a node's pod
//! CIDRs.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use crate::model::Family;

/// An IPv4 or IPv6 CIDR. The address may carry host bits as written (`10.0.0.7/24`);
/// [`Cidr::network`] clears them. A CIDR of one family never contains an address of the
/// other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// `prefix` is capped at the family's address length.
    pub fn new(addr: IpAddr, prefix: u8) -> Self {
        Self {
            addr,
            prefix: prefix.min(Family::of(addr).bits()),
        }
    }

    /// One address.
    pub fn host(addr: IpAddr) -> Self {
        Self::new(addr, Family::of(addr).bits())
    }

    pub fn family(&self) -> Family {
        Family::of(self.addr)
    }

    /// The address as a 128-bit number (an IPv4 address in the low 32 bits) and the mask of
    /// the prefix in the same width.
    fn bits_and_mask(addr: IpAddr, prefix: u8) -> (u128, u128) {
        let width = Family::of(addr).bits() as u32;
        let bits = match addr {
            IpAddr::V4(ip) => u128::from(u32::from(ip)),
            IpAddr::V6(ip) => u128::from(ip),
        };
        let all = if width == 128 {
            u128::MAX
        } else {
            (1u128 << width) - 1
        };
        let host_bits = width - u32::from(prefix);
        let mask = if host_bits >= 128 {
            0
        } else {
            all & !((1u128 << host_bits) - 1)
        };
        (bits, mask)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        if Family::of(ip) != self.family() {
            return false;
        }
        let (mine, mask) = Self::bits_and_mask(self.addr, self.prefix);
        let (theirs, _) = Self::bits_and_mask(ip, self.prefix);
        mine & mask == theirs & mask
    }

    /// Whether every address of `other` is in this one.
    pub fn covers(&self, other: &Cidr) -> bool {
        self.prefix <= other.prefix && self.contains(other.addr)
    }

    /// The same CIDR with the host bits cleared.
    pub fn network(&self) -> Self {
        let (bits, mask) = Self::bits_and_mask(self.addr, self.prefix);
        let network = bits & mask;
        let addr = match self.addr {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(network as u32)),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(network)),
        };
        Self::new(addr, self.prefix)
    }

    /// `0.0.0.0/0` or `::/0`: every address of its family.
    pub fn is_everything(&self) -> bool {
        self.prefix == 0
    }

    /// Parses `address/prefix` only (no bare address), as Kubernetes validates CIDR fields.
    pub fn parse_strict(text: &str) -> Result<Self, String> {
        if !text.contains('/') {
            return Err(format!("{text:?} is not a CIDR (address/prefix length)"));
        }
        text.parse()
    }
}

/// `a.b.c.d/n` or `x:y::z/n`, or a bare address (one host).
impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not an IPv4 or IPv6 CIDR"))?;
        let bits = Family::of(addr).bits();
        let prefix: u8 = match prefix {
            None => bits,
            Some(prefix) => prefix
                .parse()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(|| format!("{text:?} has no valid prefix length (0-{bits})"))?,
        };
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

    #[test]
    fn ipv6_cidrs_match_their_family_only() {
        let pods = Cidr::parse_strict("fd00:10:244::7/64").unwrap();
        assert_eq!(pods.network().to_string(), "fd00:10:244::/64");
        assert!(pods.contains("fd00:10:244::1:5".parse().unwrap()));
        assert!(!pods.contains("fd00:10:245::1".parse().unwrap()));
        assert!(!pods.contains("10.244.0.1".parse().unwrap()));
        let host: Cidr = "2001:db8::1".parse().unwrap();
        assert_eq!(host.to_string(), "2001:db8::1/128");
        assert!(!host.contains("2001:db8::2".parse().unwrap()));
        let all: Cidr = "::/0".parse().unwrap();
        assert!(all.is_everything() && all.contains("2001:db8::9".parse().unwrap()));
        assert!(!all.contains("192.0.2.1".parse().unwrap()));
        let v4_all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(!v4_all.contains("2001:db8::9".parse().unwrap()));
        assert!("fd00::/129".parse::<Cidr>().is_err());
        assert!(Cidr::parse_strict("fd00:10::/32").unwrap().covers(&pods));
        assert!(!Cidr::parse_strict("fd00::/48").unwrap().covers(&pods));
        assert!(!Cidr::parse_strict("10.0.0.0/8").unwrap().covers(&pods));
    }
}
