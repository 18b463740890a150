//! Addresses as the maps hold them, one type per family, and what the rest of this crate needs
//! to know about them ([`MapAddr`]). Every map whose key or value holds an address is defined
//! once, generic over `A: MapAddr`, with an alias per family (`Frontend4Key` is
//! `FrontendKey<Addr4>`, `Frontend6Key` is `FrontendKey<Addr6>`); maps without an address
//! (slots, Maglev tables, counters) serve both families, and service and backend ids are one
//! id space over both.
//!
//! Both types are in network byte order in memory, exactly as the kernel hands them over:
//! `bpf_sock_addr.user_ip4` / `user_ip6`, `bpf_sock.src_ip4` / `src_ip6`, and the packet
//! headers. An IPv4 address is `u32::from_ne_bytes(octets)`, an IPv6 address four such words.
use core::{
    fmt::Debug,
    hash::Hash,
    net::{Ipv4Addr, Ipv6Addr},
};

/// An IPv4 address, network byte order.
pub type Addr4 = u32;
/// An IPv6 address, network byte order: the layout of `struct in6_addr` as `__u32[4]`.
pub type Addr6 = [u32; 4];

/// `MapAddr::FAMILY` values.
pub mod families {
    pub const V4: u8 = 4;
    pub const V6: u8 = 6;
}

/// What the maps and the programs need to know about an address family.
pub trait MapAddr:
    Copy + Default + PartialEq + Eq + Hash + PartialOrd + Ord + Debug + 'static
{
    /// The standard library's address type of the family.
    type Ip: Copy;
    /// A session-affinity client of the family: a netns cookie or a client address
    /// (`affinity_clients::*` tells which). IPv4: `u64`, the address in the low 32 bits;
    /// IPv6: the address, or the cookie in the first two words.
    type Client: Copy + Default + PartialEq + Eq + Hash + Debug;
    /// `families::V4` or `families::V6`.
    const FAMILY: u8;
    /// Address length in bits (LPM prefix lengths).
    const BITS: u32;
    /// The unspecified address: a NodePort frontend's key address.
    const ZERO: Self;

    fn from_ip(ip: Self::Ip) -> Self;
    fn to_ip(self) -> Self::Ip;
    fn is_zero(&self) -> bool {
        *self == Self::ZERO
    }
    /// Mixes the address into a flow hash (see `flow::flow_hash`).
    fn hash_into(self, h: u32) -> u32;
    /// An outside client, by its address.
    fn client_of_addr(self) -> Self::Client;
    /// A pod or host process, by its network namespace cookie.
    fn client_of_cookie(cookie: u64) -> Self::Client;
}

impl MapAddr for Addr4 {
    type Ip = Ipv4Addr;
    type Client = u64;
    const FAMILY: u8 = families::V4;
    const BITS: u32 = 32;
    const ZERO: Self = 0;

    #[inline(always)]
    fn from_ip(ip: Ipv4Addr) -> Self {
        u32::from_ne_bytes(ip.octets())
    }
    #[inline(always)]
    fn to_ip(self) -> Ipv4Addr {
        Ipv4Addr::from(self.to_ne_bytes())
    }
    #[inline(always)]
    fn hash_into(self, h: u32) -> u32 {
        crate::flow::mix(h, self)
    }
    #[inline(always)]
    fn client_of_addr(self) -> u64 {
        self as u64
    }
    #[inline(always)]
    fn client_of_cookie(cookie: u64) -> u64 {
        cookie
    }
}

impl MapAddr for Addr6 {
    type Ip = Ipv6Addr;
    type Client = [u32; 4];
    const FAMILY: u8 = families::V6;
    const BITS: u32 = 128;
    const ZERO: Self = [0; 4];

    #[inline(always)]
    fn from_ip(ip: Ipv6Addr) -> Self {
        let o = ip.octets();
        let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
        [word(0), word(4), word(8), word(12)]
    }
    #[inline(always)]
    fn to_ip(self) -> Ipv6Addr {
        let mut o = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let b = self[i].to_ne_bytes();
            o[4 * i] = b[0];
            o[4 * i + 1] = b[1];
            o[4 * i + 2] = b[2];
            o[4 * i + 3] = b[3];
            i += 1;
        }
        Ipv6Addr::from(o)
    }
    #[inline(always)]
    fn hash_into(self, h: u32) -> u32 {
        let h = crate::flow::mix(h, self[0]);
        let h = crate::flow::mix(h, self[1]);
        let h = crate::flow::mix(h, self[2]);
        crate::flow::mix(h, self[3])
    }
    #[inline(always)]
    fn client_of_addr(self) -> [u32; 4] {
        self
    }
    #[inline(always)]
    fn client_of_cookie(cookie: u64) -> [u32; 4] {
        [cookie as u32, (cookie >> 32) as u32, 0, 0]
    }
}

/// The third word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`), network byte order.
const MAPPED_PREFIX_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// `::ffff:a.b.c.d`, as an `AF_INET6` socket names an IPv4 peer.
#[inline(always)]
pub const fn v4_mapped(addr: Addr4) -> Addr6 {
    [0, 0, MAPPED_PREFIX_WORD, addr]
}

/// The IPv4 address of an IPv4-mapped IPv6 address, `None` for any other.
#[inline(always)]
pub const fn v4_of_mapped(addr: &Addr6) -> Option<Addr4> {
    if addr[0] == 0 && addr[1] == 0 && addr[2] == MAPPED_PREFIX_WORD {
        Some(addr[3])
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_in_network_order() {
        let v4: Ipv4Addr = "10.96.0.10".parse().unwrap();
        assert_eq!(Addr4::from_ip(v4).to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(Addr4::from_ip(v4), crate::addr_to_map(u32::from(v4)));
        assert_eq!(Addr4::from_ip(v4).to_ip(), v4);
        let v6: Ipv6Addr = "fd00:10:96::a".parse().unwrap();
        let map = Addr6::from_ip(v6);
        assert_eq!(map[0].to_ne_bytes(), [0xfd, 0, 0, 0x10]);
        assert_eq!(map[3].to_ne_bytes(), [0, 0, 0, 0x0a]);
        assert_eq!(map.to_ip(), v6);
    }

    #[test]
    fn mapped_addresses_are_recognised_and_built() {
        let v4 = Addr4::from_ip("10.96.0.10".parse().unwrap());
        let mapped: Ipv6Addr = "::ffff:10.96.0.10".parse().unwrap();
        assert_eq!(v4_mapped(v4), Addr6::from_ip(mapped));
        assert_eq!(v4_of_mapped(&Addr6::from_ip(mapped)), Some(v4));
        for other in ["::1", "fd00::a", "::10.96.0.10", "::ffff:0:0:a"] {
            let other = Addr6::from_ip(other.parse().unwrap());
            assert_eq!(v4_of_mapped(&other), None, "{other:?}");
        }
    }

    #[test]
    fn cookie_and_address_clients_differ_in_layout_not_in_meaning() {
        assert_eq!(Addr4::client_of_cookie(7), 7);
        assert_eq!(Addr6::client_of_cookie(1 << 40), [0, 1 << 8, 0, 0]);
    }
}
