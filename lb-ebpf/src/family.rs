//! The address family as a type: kernel logic is written once, generic over `F: Family`,
//! and reaches the maps of its family through it (`F::frontends()` is `LB4_FRONT_V2` for
//! [`V4`], `LB6_FRONT_V1` for [`V6`]). Both instances are compiled; the verifier sees each as
//! ordinary code.
use aya_ebpf::maps::{Array, HashMap, LpmTrie, LruHashMap};
use lb_common::{
    Addr4, Addr6, AffinityKey, AffinityValue, Backend, CtKey, CtValue, FragKey, FragPorts,
    FrontendKey, FrontendValue, MapAddr, ReplyHint, RevValue, SockValue, SourceRangeKey,
};

use crate::maps::*;

/// The maps of one address family.
pub trait Family: 'static {
    type Addr: MapAddr;

    fn frontends() -> &'static HashMap<FrontendKey<Self::Addr>, FrontendValue>;
    fn backends() -> &'static HashMap<u32, Backend<Self::Addr>>;
    fn affinity() -> &'static LruHashMap<AffinityKey<Self::Addr>, AffinityValue>;
    fn source_ranges() -> &'static LpmTrie<SourceRangeKey<Self::Addr>, u8>;
    /// This node's NodePort addresses (and loopback).
    fn node_addrs() -> &'static HashMap<Self::Addr, u32>;
    /// SNAT source address per ingress interface.
    fn iface_addrs() -> &'static HashMap<u32, Self::Addr>;
    /// Per socket cookie, the services of this family it reached.
    fn sockets() -> &'static LruHashMap<u64, SockValue<Self::Addr>>;
    fn flows() -> &'static LruHashMap<CtKey<Self::Addr>, CtValue<Self::Addr>>;
    fn flow_replies() -> &'static LruHashMap<CtKey<Self::Addr>, RevValue<Self::Addr>>;
    /// New flows' reverse entries until their first reply (`hint.rs`).
    fn reply_hints() -> &'static Array<ReplyHint<Self::Addr>>;
    fn snat_exhausted() -> &'static LruHashMap<CtKey<Self::Addr>, u64>;
    fn frags() -> &'static LruHashMap<FragKey<Self::Addr>, FragPorts>;
}

/// IPv4.
pub enum V4 {}
/// IPv6.
pub enum V6 {}

macro_rules! family_maps {
    ($family:ty, $addr:ty, $front:ident, $back:ident, $affin:ident, $ranges:ident, $node:ident,
     $ifaddr:ident, $socks:ident, $ct:ident, $rev:ident, $hints:ident, $snatfull:ident,
     $frags:ident) => {
        impl Family for $family {
            type Addr = $addr;

            #[inline(always)]
            fn frontends() -> &'static HashMap<FrontendKey<$addr>, FrontendValue> {
                &$front
            }
            #[inline(always)]
            fn backends() -> &'static HashMap<u32, Backend<$addr>> {
                &$back
            }
            #[inline(always)]
            fn affinity() -> &'static LruHashMap<AffinityKey<$addr>, AffinityValue> {
                &$affin
            }
            #[inline(always)]
            fn source_ranges() -> &'static LpmTrie<SourceRangeKey<$addr>, u8> {
                &$ranges
            }
            #[inline(always)]
            fn node_addrs() -> &'static HashMap<$addr, u32> {
                &$node
            }
            #[inline(always)]
            fn iface_addrs() -> &'static HashMap<u32, $addr> {
                &$ifaddr
            }
            #[inline(always)]
            fn sockets() -> &'static LruHashMap<u64, SockValue<$addr>> {
                &$socks
            }
            #[inline(always)]
            fn flows() -> &'static LruHashMap<CtKey<$addr>, CtValue<$addr>> {
                &$ct
            }
            #[inline(always)]
            fn flow_replies() -> &'static LruHashMap<CtKey<$addr>, RevValue<$addr>> {
                &$rev
            }
            #[inline(always)]
            fn reply_hints() -> &'static Array<ReplyHint<$addr>> {
                &$hints
            }
            #[inline(always)]
            fn snat_exhausted() -> &'static LruHashMap<CtKey<$addr>, u64> {
                &$snatfull
            }
            #[inline(always)]
            fn frags() -> &'static LruHashMap<FragKey<$addr>, FragPorts> {
                &$frags
            }
        }
    };
}

family_maps!(
    V4,
    Addr4,
    LB4_FRONT_V2,
    LB4_BACKEND_V2,
    LB4_AFFIN_V2,
    LB4_SRCRANGE,
    LB4_NODEADDR,
    LB4_IFADDR,
    LB4_REVNAT_V2,
    LB4_CT_V2,
    LB4_FLOWREV_V2,
    LB4_RHINT_V1,
    LB4_SNATFULL_V1,
    LB4_FRAGS_V2
);
family_maps!(
    V6,
    Addr6,
    LB6_FRONT_V1,
    LB6_BACKEND_V1,
    LB6_AFFIN_V1,
    LB6_SRCRANGE,
    LB6_NODEADDR,
    LB6_IFADDR,
    LB6_REVNAT_V1,
    LB6_CT_V1,
    LB6_FLOWREV_V1,
    LB6_RHINT_V1,
    LB6_SNATFULL_V1,
    LB6_FRAGS_V1
);
