//! Fragments of translated flows, Cilium's way (`ipv4_handle_fragmentation`,
//! `IPV4_FRAG_DATAGRAMS_MAP`), for both families: IPv4's fragments and IPv6's Fragment
//! header (`ipv6.rs`) alike. The first fragment (offset 0, MF or M set) carries the TCP/UDP
//! header and is translated like a whole packet; when it is, its ports are recorded under
//! (source, destination, identification, protocol) as the program saw them (`LB4_FRAGS_V2`,
//! `LB6_FRAGS_V1`; IPv6's identification is 32 bits, its protocol the Fragment header's next
//! header). A later
//! fragment (offset > 0) takes its ports from there and goes down the same path, so it finds
//! the flow its first fragment made and gets the same addresses; only its IP header is
//! rewritten (the L4 checksum, over the whole datagram, lives in the first fragment, whose
//! incremental update covers the address and port changes).
//!
//! A later fragment without an entry (the first fragment lost, not come yet, or not
//! translated because the datagram is not ours) passes untouched, where Cilium drops it
//! (`DROP_FRAG_NOT_FOUND`): on the node's interfaces most fragments are the node's own
//! traffic, which must reach the stack in whatever order it arrives. A service's datagram
//! whose first fragment comes late is lost either way (its fragments no longer share a
//! destination); the stack drops the untranslated pieces when reassembly times out.
//!
//! Entries are not removed at the last fragment (fragments may come reordered or twice); the
//! LRU map forgets them. Recording only translated first fragments keeps the map to flows of
//! ours.
use lb_common::{FragKey, FragPorts, MapAddr};

use crate::{
    family::Family,
    parse::{FRAG_FIRST, FRAG_LATER, Packet},
};

#[inline(always)]
fn key<A: MapAddr>(pkt: &Packet<A>) -> FragKey<A> {
    FragKey::new(pkt.saddr, pkt.daddr, pkt.id, pkt.proto)
}

/// A later fragment's ports, from its translated first fragment: false when there is none.
#[inline(always)]
pub fn fill_ports<F: Family>(pkt: &mut Packet<F::Addr>) -> bool {
    // SAFETY: copied out at once.
    match unsafe { F::frags().get(&key(pkt)) } {
        Some(ports) => {
            pkt.sport = ports.sport;
            pkt.dport = ports.dport;
            true
        }
        None => false,
    }
}

/// The reason of `pkt` after its path gave `reason`, `translated` saying whether it was
/// translated: a translated first fragment records its ports for the later ones, a translated
/// later fragment counts as `later_translated`.
#[inline(always)]
pub fn finish<F: Family>(
    pkt: &Packet<F::Addr>,
    reason: u32,
    translated: bool,
    later_translated: u32,
) -> u32 {
    if !translated {
        return reason;
    }
    if pkt.frag == FRAG_FIRST {
        let ports = FragPorts {
            sport: pkt.sport,
            dport: pkt.dport,
        };
        // A full LRU map evicts its oldest datagram; should the insert fail all the same, the
        // later fragments pass untouched and the datagram is lost, as without this map.
        let _ = F::frags().insert(&key(pkt), &ports, 0);
        return reason;
    }
    if pkt.frag == FRAG_LATER {
        return later_translated;
    }
    reason
}
