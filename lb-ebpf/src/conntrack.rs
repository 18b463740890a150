//! Connection tracking of external flows: lifetimes after the kernel's nf_conntrack defaults
//! (`lb_common::ct_timeouts`), and state kept from the packets of both directions.
use lb_common::{Ct4Key, Ct4Value, IPPROTO_TCP, NANOS_PER_SEC, ct_flags, ct_timeouts};

use crate::{
    maps::LB4_CT_V2,
    parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// `last_seen_ns` is rewritten at most this often, so a busy flow does not write its entry
/// on every packet.
const REFRESH_NS: u64 = NANOS_PER_SEC;

#[inline(always)]
fn lifetime_ns(proto: u8, flags: u8) -> u64 {
    let secs = if proto == IPPROTO_TCP {
        if flags & ct_flags::CLOSING != 0 {
            ct_timeouts::TCP_CLOSING
        } else if flags & ct_flags::SEEN_REPLY != 0 {
            ct_timeouts::TCP_ESTABLISHED
        } else {
            ct_timeouts::TCP_SYN
        }
    } else if flags & ct_flags::SEEN_REPLY != 0 {
        ct_timeouts::UDP_REPLIED
    } else {
        ct_timeouts::UDP
    };
    secs * NANOS_PER_SEC
}

/// Whether a tracked flow still holds for a packet with `tcp_flags`: not idle beyond its
/// lifetime, and not a closed TCP connection whose client port is reused by a new SYN.
#[inline(always)]
pub fn alive(ct: &Ct4Value, proto: u8, tcp_flags: u8, now: u64) -> bool {
    if now.wrapping_sub(ct.last_seen_ns) > lifetime_ns(proto, ct.flags) {
        return false;
    }
    let new_syn = tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    !(proto == IPPROTO_TCP && new_syn && ct.flags & ct_flags::CLOSING != 0)
}

/// The flags a flow has after a packet with `tcp_flags` (in either direction).
#[inline(always)]
pub fn next_flags(flags: u8, tcp_flags: u8, reply: bool) -> u8 {
    let mut next = flags;
    if reply {
        next |= ct_flags::SEEN_REPLY;
    }
    if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        next |= ct_flags::CLOSING;
    }
    next
}

/// Records a packet of the flow behind `entry` (a pointer into the map).
#[inline(always)]
pub fn touch(entry: *mut Ct4Value, tcp_flags: u8, reply: bool, now: u64) {
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

/// Records a reply packet of the flow whose client tuple is `key`.
#[inline(always)]
pub fn touch_reply(key: &Ct4Key, tcp_flags: u8, now: u64) {
    if let Some(entry) = LB4_CT_V2.get_ptr_mut(key) {
        touch(entry, tcp_flags, true, now);
    }
}
