//! Connection tracking of external flows: TCP states and lifetimes after the kernel's
//! nf_conntrack (`lb_common::ct_state`, `lb_common::ct_timeouts`), kept from the packets of
//! both directions: the client's (XDP) and the backend's (tc egress, and XDP for the replies
//! of remote backends). ICMP errors about a flow are related to it, not part of it: like the
//! kernel's RELATED packets they neither mark it replied nor refresh it. One tracker for both
//! families (each its own map, `Family::flows`).
use lb_common::{CtKey, CtValue, IPPROTO_TCP, NANOS_PER_SEC, ct_state, tcp_flags};

use crate::{
    family::Family,
    parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

// The parser's flag bits are the ones the state machine takes.
const _: () = assert!(
    TCP_FIN == tcp_flags::FIN
        && TCP_SYN == tcp_flags::SYN
        && TCP_RST == tcp_flags::RST
        && TCP_ACK == tcp_flags::ACK
);

/// `last_seen_ns` is rewritten at most this often, so a busy flow does not write its entry
/// on every packet.
const REFRESH_NS: u64 = NANOS_PER_SEC;

/// Whether a tracked flow still holds for a packet with `tcp_flags`: not idle beyond its
/// lifetime, and not a closed TCP connection (RST, or FINs both ways) whose client port is
/// reused by a new SYN.
#[inline(always)]
pub fn alive<A>(ct: &CtValue<A>, proto: u8, tcp_flags: u8, now: u64) -> bool {
    let lifetime_ns = ct_state::lifetime_secs(proto, ct.flags) * NANOS_PER_SEC;
    if now.wrapping_sub(ct.last_seen_ns) > lifetime_ns {
        return false;
    }
    let new_syn = tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    !(proto == IPPROTO_TCP && new_syn && ct_state::closed(ct.flags))
}

/// The flags a flow has after a packet with `tcp_flags` from the backend (`reply`) or from
/// the client.
#[inline(always)]
pub fn next_flags(flags: u8, tcp_flags: u8, reply: bool) -> u8 {
    ct_state::next_flags(flags, tcp_flags, reply)
}

/// Whether a TCP flow with `flags` is over (RST, or FINs both ways).
#[inline(always)]
pub fn closed(flags: u8) -> bool {
    ct_state::closed(flags)
}

/// Records a packet of the flow behind `entry` (a pointer into the map), from the backend
/// (`reply`) or from the client.
#[inline(always)]
pub fn touch<A>(entry: *mut CtValue<A>, tcp_flags: u8, reply: bool, now: u64) {
    // SAFETY: a pointer returned by a lookup in this program run; entries are plain integers,
    // so a racing update only loses a refresh.
    unsafe {
        let flags = (*entry).flags;
        let next = next_flags(flags, tcp_flags, reply);
        if next != flags || now.wrapping_sub((*entry).last_seen_ns) > REFRESH_NS {
            (*entry).flags = next;
            (*entry).last_seen_ns = now;
        }
    }
}

/// Records a packet from the backend (the reply direction) of the flow whose client tuple is
/// `key`.
#[inline(always)]
pub fn touch_reply<F: Family>(key: &CtKey<F::Addr>, tcp_flags: u8, now: u64) {
    if let Some(entry) = F::flows().get_ptr_mut(key) {
        touch(entry, tcp_flags, true, now);
    }
}
