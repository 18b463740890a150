//! Per-packet state of the flows XDP translates (NodePort, externalIPs, LoadBalancer IPs):
//! connection tracking keyed by the client's tuple, reverse entries keyed by the reply's
//! tuple, SNAT ports, lifetimes, and the flow hash Maglev is indexed with. The backend and
//! service ids they name are those of the one service table.

use crate::addr::{Addr4, Addr6, MapAddr};

/// `CtValue::flags` and `RevValue::flags`. The TCP state bits (everything but `SNAT`,
/// `SNAT_OUT`) are written by [`ct_state::next_flags`] only and read by
/// [`ct_state::lifetime_secs`].
pub mod ct_flags {
    /// A packet from the backend (the reply direction) was seen: TCP past SYN_SENT, UDP a
    /// stream. ICMP errors about the flow do not set it.
    pub const SEEN_REPLY: u8 = 1 << 0;
    /// An RST was seen in either direction: the kernel's CLOSE. (The bit was `CLOSING`, "FIN
    /// or RST", before the FINs were tracked per direction: an entry left by an older agent
    /// with it stays on the close lifetime, as it was.)
    pub const RST: u8 = 1 << 1;
    /// The flow's source was translated to the node's address (`nat_addr`, `nat_port`). On a
    /// reverse entry: the entry of the remote backend's reply to the node's address, whose
    /// destination XDP restores to the client.
    pub const SNAT: u8 = 1 << 2;
    /// On a reverse entry: the entry of the client's packet on its way to the remote backend,
    /// whose source tc egress sets to the node's address and SNAT port.
    pub const SNAT_OUT: u8 = 1 << 3;
    /// A FIN was seen from the client (the original direction).
    pub const FIN_CLIENT: u8 = 1 << 4;
    /// A FIN was seen from the backend (the reply direction).
    pub const FIN_BACKEND: u8 = 1 << 5;
    /// A plain ACK went by after the latest first FIN of a direction: the kernel's FIN_WAIT
    /// becomes CLOSE_WAIT, LAST_ACK becomes TIME_WAIT.
    pub const FIN_ACKED: u8 = 1 << 6;
    /// The backend's first reply was a SYN-ACK and the client has not ACKed since: the
    /// kernel's SYN_RECV (a reply that is not a SYN-ACK, as of a flow picked up mid-stream,
    /// is established at once, like the kernel's loose pickup).
    pub const SYN_RECV: u8 = 1 << 7;
}

/// TCP header flag bits (byte 13 of the header), as `next_flags` takes them.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// Connection-tracking lifetimes in seconds: the kernel's nf_conntrack defaults
/// (`tcp_timeouts[]` in net/netfilter/nf_conntrack_proto_tcp.c, the
/// `net.netfilter.nf_conntrack_tcp_timeout_*` and `nf_conntrack_udp_timeout*` sysctls). An
/// idle flow is forgotten (and its next packet chooses a backend afresh) after this long.
/// Not followed: the kernel's `unacknowledged` (300 s) and `max_retrans` (300 s) caps, which
/// need sequence numbers this tracker does not keep.
pub mod ct_timeouts {
    /// TCP before any reply (kernel: syn_sent, 2 min).
    pub const TCP_SYN_SENT: u64 = 120;
    /// TCP after the backend's SYN-ACK, before the client's ACK (kernel: syn_recv, 60 s).
    pub const TCP_SYN_RECV: u64 = 60;
    /// TCP established (kernel: established, 5 days).
    pub const TCP_ESTABLISHED: u64 = 432_000;
    /// TCP after one direction's FIN (kernel: fin_wait, 2 min).
    pub const TCP_FIN_WAIT: u64 = 120;
    /// TCP half-closed: one direction's FIN, then an ACK (kernel: close_wait, 60 s). The
    /// other direction may keep sending: each of its packets restarts this lifetime.
    pub const TCP_CLOSE_WAIT: u64 = 60;
    /// TCP after both directions' FINs, before the last ACK (kernel: last_ack, 30 s).
    pub const TCP_LAST_ACK: u64 = 30;
    /// TCP after both FINs and the last ACK (kernel: time_wait, 2 min).
    pub const TCP_TIME_WAIT: u64 = 120;
    /// TCP after an RST (kernel: close, 10 s).
    pub const TCP_CLOSE: u64 = 10;
    /// UDP without reply (kernel: udp_timeout 30 s).
    pub const UDP: u64 = 30;
    /// UDP with replies (kernel: udp_timeout_stream 120 s).
    pub const UDP_REPLIED: u64 = 120;
}

/// The TCP state machine of connection tracking, after nf_conntrack's (`tcp_conntracks[][][]`)
/// as far as lifetimes go: state bits in `Ct4Value::flags` instead of a state number, FINs
/// kept per direction. Pure functions, used by the eBPF programs and tested in userspace.
pub mod ct_state {
    use super::{ct_flags as f, ct_timeouts as t, tcp_flags as tcp};

    const FINS: u8 = f::FIN_CLIENT | f::FIN_BACKEND;

    /// The flags a flow has after a packet with TCP flags `tcp_flags` (0 for UDP), sent by the
    /// backend (`from_backend`, the reply direction) or by the client. Only a backend's packet
    /// marks the flow replied.
    #[inline(always)]
    pub const fn next_flags(flags: u8, tcp_flags: u8, from_backend: bool) -> u8 {
        let kind = tcp_flags & (tcp::SYN | tcp::ACK | tcp::RST);
        let mut next = flags;
        if from_backend {
            if flags & f::SEEN_REPLY == 0 && kind == tcp::SYN | tcp::ACK {
                next |= f::SYN_RECV;
            }
            next |= f::SEEN_REPLY;
        } else if kind == tcp::ACK {
            next &= !f::SYN_RECV;
        }
        if tcp_flags & tcp::RST != 0 {
            next |= f::RST;
        }
        let fin = if from_backend {
            f::FIN_BACKEND
        } else {
            f::FIN_CLIENT
        };
        if tcp_flags & tcp::FIN != 0 && kind & (tcp::SYN | tcp::RST) == 0 {
            // A retransmitted FIN changes nothing; a direction's first FIN waits for its ACK.
            if next & fin == 0 {
                next = (next | fin) & !f::FIN_ACKED;
            }
        } else if kind == tcp::ACK && next & FINS != 0 {
            next |= f::FIN_ACKED;
        }
        next
    }

    /// Whether a TCP flow is over (an RST, or FINs both ways): a new SYN from the client's
    /// port starts a new flow (the kernel reopens from TIME_WAIT and CLOSE).
    #[inline(always)]
    pub const fn closed(flags: u8) -> bool {
        flags & f::RST != 0 || flags & FINS == FINS
    }

    /// How long an idle flow with `flags` lives, in seconds.
    #[inline(always)]
    pub const fn lifetime_secs(proto: u8, flags: u8) -> u64 {
        if proto != crate::IPPROTO_TCP {
            return if flags & f::SEEN_REPLY != 0 {
                t::UDP_REPLIED
            } else {
                t::UDP
            };
        }
        let acked = flags & f::FIN_ACKED != 0;
        if flags & f::RST != 0 {
            t::TCP_CLOSE
        } else if flags & FINS == FINS {
            if acked {
                t::TCP_TIME_WAIT
            } else {
                t::TCP_LAST_ACK
            }
        } else if flags & FINS != 0 {
            if acked {
                t::TCP_CLOSE_WAIT
            } else {
                t::TCP_FIN_WAIT
            }
        } else if flags & f::SEEN_REPLY == 0 {
            t::TCP_SYN_SENT
        } else if flags & f::SYN_RECV != 0 {
            t::TCP_SYN_RECV
        } else {
            t::TCP_ESTABLISHED
        }
    }
}

/// Source ports the node uses for SNAT of external flows to remote backends: above the
/// kernel's default ephemeral range (32768-60999), so they do not collide with the node's own
/// connections.
///
/// Each (backend address and port, node address, protocol) has the whole range: a new flow
/// tries `TRIES` ports from one its hash gives (the full tuple, also with session affinity),
/// then the rest of the range in order ([`probe`]). A port whose flow is over (expired,
/// closed, or forgotten by the conntrack map) is taken over. After a search of the whole
/// range found nothing, only the `TRIES` hashed ports are tried for `EXHAUSTED_SECS`, so a
/// flood of new flows at a full range costs 8 probes a packet, not 4,536.
pub mod snat_ports {
    pub const FIRST: u16 = 61_000;
    pub const COUNT: u16 = 4_536;
    /// Ports tried from the flow's hash before the rest of the range is searched.
    pub const TRIES: u32 = 8;
    /// How long, after a whole-range search found no port, new flows of that backend and node
    /// address try only their `TRIES` hashed ports (then are dropped as port exhaustion).
    pub const EXHAUSTED_SECS: u64 = 1;

    /// The offset into the range a flow with `hash` tries first.
    #[inline(always)]
    pub const fn first(hash: u32) -> u16 {
        ((hash >> 7) % COUNT as u32) as u16
    }

    /// The port (host byte order) of the `attempt`th probe from offset `first` (< `COUNT`):
    /// attempts 0..`COUNT` visit every port of the range once.
    #[inline(always)]
    pub const fn probe(first: u16, attempt: u32) -> u16 {
        let mut offset = first as u32 + attempt % COUNT as u32;
        if offset >= COUNT as u32 {
            offset -= COUNT as u32;
        }
        FIRST + offset as u16
    }

    /// Whether `port` (host byte order) is an SNAT port.
    #[inline(always)]
    pub const fn contains(port: u16) -> bool {
        port >= FIRST && (port as u32) < FIRST as u32 + COUNT as u32
    }
}

/// A flow's tuple as seen on the wire (addresses and ports in network byte order). In
/// `LB4_CT_V2` it is the client's packet (client → frontend); in `LB4_FLOWREV_V2` the reply
/// (backend → client, or backend → node address and SNAT port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey<A> {
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

pub type Ct4Key = CtKey<Addr4>;
pub type Ct6Key = CtKey<Addr6>;

impl<A: Copy> CtKey<A> {
    #[inline(always)]
    pub const fn new(saddr: A, daddr: A, sport: u16, dport: u16, proto: u8) -> Self {
        Self {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            pad: [0; 3],
        }
    }

    /// The tuple of a packet going the other way.
    #[inline(always)]
    pub const fn reversed(&self) -> Self {
        Self::new(self.daddr, self.saddr, self.dport, self.sport, self.proto)
    }
}

/// Value of the connection-tracking map of family `A`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue<A> {
    /// `bpf_ktime_get_ns` of the last packet (refreshed at most once a second).
    pub last_seen_ns: u64,
    pub backend_addr: A,
    pub backend_port: u16,
    /// SNAT source port (with `ct_flags::SNAT`).
    pub nat_port: u16,
    /// SNAT source address (with `ct_flags::SNAT`).
    pub nat_addr: A,
    /// The backend id it was chosen as; the flow keeps it while the backend exists (also
    /// while it is terminating), and chooses again once it is gone.
    pub backend_id: u32,
    pub service_id: u32,
    /// `ct_flags::*`.
    pub flags: u8,
    pub pad: [u8; 3],
}

/// Value of the flow reverse-translation map. tc egress sets a packet's source to
/// (`frontend_addr`, `frontend_port`): a reply leaves from the frontend the client used, and
/// (with `ct_flags::SNAT_OUT`) a packet to a remote backend leaves from the node's address and
/// SNAT port. XDP sets the destination of a remote backend's reply (`ct_flags::SNAT`) back to
/// (`client_addr`, `client_port`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevValue<A> {
    pub client_addr: A,
    pub frontend_addr: A,
    pub client_port: u16,
    pub frontend_port: u16,
    /// `ct_flags::SNAT` when the reply comes back to the node's address and must also have
    /// its destination restored.
    pub flags: u8,
    pub proto: u8,
    pub pad: u16,
}

pub type Ct4Value = CtValue<Addr4>;
pub type Ct6Value = CtValue<Addr6>;
pub type Rev4Value = RevValue<Addr4>;
pub type Rev6Value = RevValue<Addr6>;

impl<A: Copy> RevValue<A> {
    /// The conntrack key of the client's direction of the flow this entry belongs to.
    #[inline(always)]
    pub const fn client_key(&self) -> CtKey<A> {
        CtKey::new(
            self.client_addr,
            self.frontend_addr,
            self.client_port,
            self.frontend_port,
            self.proto,
        )
    }
}

/// A new flow's reply entry before its first reply (`LB4_RHINT_V1`, `LB6_RHINT_V1`): XDP
/// writes it into the slot [`reply_hint_slot`] gives for the reply's tuple instead of
/// inserting into the reverse map, so a flow's first packet makes one LRU insert (its
/// conntrack entry). tc egress, at the flow's first reply, finds the reverse map without the
/// tuple, takes the hint (the whole tuple must match), inserts the reverse entry itself and
/// clears the hint. A slot still holding a hint not taken is not lost when another flow
/// needs it: XDP inserts that hint's reverse entry first (or, when it cannot, inserts its own
/// flow's entry directly, as before hints).
///
/// `state` ([`hint_state`]) guards the slot: it is changed only by atomic compare-and-swap,
/// a writer holds `BUSY` while it writes, and every change bumps a generation, so a reader
/// that sees the same `state` before and after copying the slot copied one flow's hint, never
/// a torn mix of two.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplyHint<A> {
    /// [`hint_state`] bits and generation.
    pub state: u64,
    /// The reply's tuple (backend → client), as `LB4_FLOWREV_V2` would key it.
    pub key: CtKey<A>,
    /// The reverse entry, as `LB4_FLOWREV_V2` would hold it.
    pub rev: RevValue<A>,
}

pub type ReplyHint4 = ReplyHint<Addr4>;
pub type ReplyHint6 = ReplyHint<Addr6>;

/// `ReplyHint::state`: two bits, and a generation above them that every change bumps (so a
/// state read twice unchanged means the slot did not change between).
pub mod hint_state {
    /// A writer holds the slot: its key and entry are being written.
    pub const BUSY: u64 = 1 << 0;
    /// The slot holds a hint no reply has taken yet.
    pub const PENDING: u64 = 1 << 1;
    /// One generation.
    pub const GENERATION: u64 = 1 << 2;
}

/// The slot of the reply hint map for a reply's tuple `key`.
#[inline(always)]
pub fn reply_hint_slot<A: MapAddr>(key: &CtKey<A>) -> u32 {
    flow_hash(key.saddr, key.daddr, key.sport, key.dport, key.proto)
        & (crate::limits::MAX_REPLY_HINTS - 1)
}

/// The flow hash that indexes Maglev tables, the same on every node and in the agent's
/// tests. Inputs as on the wire (network byte order). With session affinity only the client
/// address is hashed (`sport`, `daddr`, `dport` and `proto` passed as 0: the XDP program calls
/// `flow_hash(client, 0, 0, 0, 0)`, so one client's TCP and UDP flows of a backend set hash alike).
/// An IPv6 address mixes in its four words in order.
#[inline(always)]
pub fn flow_hash<A: MapAddr>(saddr: A, daddr: A, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h: u32 = 0x9e37_79b9;
    h = saddr.hash_into(h);
    h = daddr.hash_into(h);
    h = mix(h, ((sport as u32) << 16) | dport as u32);
    h = mix(h, proto as u32);
    // murmur3 finaliser
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[inline(always)]
pub(crate) const fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

const _: () = {
    assert!(core::mem::size_of::<Ct4Key>() == 16);
    assert!(core::mem::size_of::<Ct4Value>() == 32);
    assert!(core::mem::size_of::<Rev4Value>() == 16);
    assert!(core::mem::size_of::<Ct6Key>() == 40);
    assert!(core::mem::size_of::<Ct6Value>() == 56);
    assert!(core::mem::size_of::<Rev6Value>() == 40);
    assert!(core::mem::size_of::<ReplyHint4>() == 40);
    assert!(core::mem::size_of::<ReplyHint6>() == 88);
    assert!(crate::limits::MAX_REPLY_HINTS.is_power_of_two());
    assert!((snat_ports::FIRST as u32 + snat_ports::COUNT as u32) <= 65_536);
};

#[cfg(test)]
mod tests {
    use super::{ct_flags, ct_state, ct_timeouts as t, snat_ports, tcp_flags::*};
    use crate::{IPPROTO_TCP, IPPROTO_UDP};

    #[test]
    fn snat_probes_visit_every_port_of_the_range_once_from_any_start() {
        for first in [0, 1, snat_ports::COUNT / 2, snat_ports::COUNT - 1] {
            let mut seen = std::collections::BTreeSet::new();
            for attempt in 0..snat_ports::COUNT as u32 {
                let port = snat_ports::probe(first, attempt);
                assert!(snat_ports::contains(port), "{port}");
                assert!(seen.insert(port), "{port} twice from {first}");
            }
            assert_eq!(seen.len(), snat_ports::COUNT as usize);
            assert_eq!(snat_ports::probe(first, 0), snat_ports::FIRST + first);
            // The hashed tries are consecutive: the first ones the search makes.
            assert_eq!(
                snat_ports::probe(first, 1),
                snat_ports::FIRST + (first + 1) % snat_ports::COUNT
            );
        }
        for hash in [0, 1 << 7, u32::MAX, 0x9e37_79b9] {
            assert!(snat_ports::first(hash) < snat_ports::COUNT);
        }
        assert!(!snat_ports::contains(snat_ports::FIRST - 1));
        assert!(snat_ports::contains(u16::MAX), "the range ends at 65535");
    }

    const CLIENT: bool = false;
    const BACKEND: bool = true;

    /// Runs `packets` (direction, TCP flags, lifetime after it) from a new flow's flags (the
    /// first packet creates the entry, as XDP does); returns the final flags.
    fn walk(proto: u8, packets: &[(bool, u8, u64)]) -> u8 {
        let mut flags = 0;
        for (i, &(from_backend, tcp, lifetime)) in packets.iter().enumerate() {
            flags = ct_state::next_flags(flags, tcp, from_backend);
            assert_eq!(
                ct_state::lifetime_secs(proto, flags),
                lifetime,
                "packet {i} ({}, flags {tcp:#04x}) -> ct flags {flags:#010b}",
                if from_backend { "backend" } else { "client" }
            );
        }
        flags
    }

    #[test]
    fn a_handshake_goes_syn_sent_syn_recv_established() {
        let flags = walk(
            IPPROTO_TCP,
            &[
                (CLIENT, SYN, t::TCP_SYN_SENT),
                (CLIENT, SYN, t::TCP_SYN_SENT),
                (BACKEND, SYN | ACK, t::TCP_SYN_RECV),
                (BACKEND, SYN | ACK, t::TCP_SYN_RECV),
                (CLIENT, ACK, t::TCP_ESTABLISHED),
                (BACKEND, SYN | ACK, t::TCP_ESTABLISHED),
                (CLIENT, ACK, t::TCP_ESTABLISHED),
            ],
        );
        assert!(!ct_state::closed(flags));
    }

    #[test]
    fn a_flow_picked_up_mid_stream_is_established_at_the_backends_reply() {
        walk(
            IPPROTO_TCP,
            &[
                (CLIENT, ACK, t::TCP_SYN_SENT),
                (BACKEND, ACK, t::TCP_ESTABLISHED),
            ],
        );
    }

    #[test]
    fn only_the_backend_marks_a_flow_replied() {
        for tcp in [0, SYN, SYN | ACK, ACK, FIN | ACK, RST, RST | ACK] {
            let flags = ct_state::next_flags(0, tcp, CLIENT);
            assert_eq!(flags & ct_flags::SEEN_REPLY, 0, "client {tcp:#04x}");
            let flags = ct_state::next_flags(0, tcp, BACKEND);
            assert_ne!(flags & ct_flags::SEEN_REPLY, 0, "backend {tcp:#04x}");
        }
    }

    #[test]
    fn a_half_close_lives_on_fin_wait_then_close_wait_while_the_backend_sends() {
        let handshake = [
            (CLIENT, SYN, t::TCP_SYN_SENT),
            (BACKEND, SYN | ACK, t::TCP_SYN_RECV),
            (CLIENT, ACK, t::TCP_ESTABLISHED),
        ];
        for (closer, other) in [(CLIENT, BACKEND), (BACKEND, CLIENT)] {
            let mut packets = handshake.to_vec();
            packets.extend([
                (closer, FIN | ACK, t::TCP_FIN_WAIT),
                (closer, FIN | ACK, t::TCP_FIN_WAIT), // retransmitted
                (other, ACK, t::TCP_CLOSE_WAIT),
                (other, ACK, t::TCP_CLOSE_WAIT), // data of the open direction
                (closer, ACK, t::TCP_CLOSE_WAIT),
                (closer, FIN | ACK, t::TCP_CLOSE_WAIT), // retransmitted once more
            ]);
            let half = walk(IPPROTO_TCP, &packets);
            assert!(!ct_state::closed(half), "half-closed is not closed");
            packets.extend([
                (other, FIN | ACK, t::TCP_LAST_ACK),
                (other, FIN | ACK, t::TCP_LAST_ACK),
                (closer, ACK, t::TCP_TIME_WAIT),
                (other, ACK, t::TCP_TIME_WAIT),
                (closer, FIN | ACK, t::TCP_TIME_WAIT),
            ]);
            let both = walk(IPPROTO_TCP, &packets);
            assert!(ct_state::closed(both), "both FINs: closed");
        }
    }

    #[test]
    fn fins_crossing_go_to_last_ack_then_time_wait() {
        walk(
            IPPROTO_TCP,
            &[
                (CLIENT, SYN, t::TCP_SYN_SENT),
                (BACKEND, SYN | ACK, t::TCP_SYN_RECV),
                (CLIENT, ACK, t::TCP_ESTABLISHED),
                (CLIENT, FIN | ACK, t::TCP_FIN_WAIT),
                (BACKEND, FIN | ACK, t::TCP_LAST_ACK),
                (CLIENT, ACK, t::TCP_TIME_WAIT),
            ],
        );
    }

    #[test]
    fn an_rst_either_way_closes_at_once_and_for_good() {
        for side in [CLIENT, BACKEND] {
            let flags = walk(
                IPPROTO_TCP,
                &[
                    (CLIENT, SYN, t::TCP_SYN_SENT),
                    (BACKEND, SYN | ACK, t::TCP_SYN_RECV),
                    (CLIENT, ACK, t::TCP_ESTABLISHED),
                    (side, RST | ACK, t::TCP_CLOSE),
                    (CLIENT, ACK, t::TCP_CLOSE),
                    (BACKEND, ACK, t::TCP_CLOSE),
                    (CLIENT, FIN | ACK, t::TCP_CLOSE),
                ],
            );
            assert!(ct_state::closed(flags));
        }
        // A refused connection: the SYN answered by an RST.
        let refused = walk(
            IPPROTO_TCP,
            &[
                (CLIENT, SYN, t::TCP_SYN_SENT),
                (BACKEND, RST | ACK, t::TCP_CLOSE),
            ],
        );
        assert!(ct_state::closed(refused));
    }

    #[test]
    fn an_older_agents_closing_bit_keeps_the_close_lifetime() {
        let closing = 1 << 1; // `CLOSING` (FIN or RST) of the agents before FINs per direction
        assert_eq!(
            ct_state::lifetime_secs(IPPROTO_TCP, ct_flags::SEEN_REPLY | closing),
            t::TCP_CLOSE
        );
        assert!(ct_state::closed(closing));
    }

    #[test]
    fn the_snat_bits_are_left_alone() {
        let snat = ct_flags::SNAT | ct_flags::SNAT_OUT;
        for (tcp, side) in [
            (SYN, CLIENT),
            (SYN | ACK, BACKEND),
            (FIN | ACK, CLIENT),
            (RST, BACKEND),
        ] {
            assert_eq!(ct_state::next_flags(snat, tcp, side) & snat, snat);
        }
        // And the state bits are not the SNAT bits.
        let state = ct_flags::SEEN_REPLY
            | ct_flags::RST
            | ct_flags::FIN_CLIENT
            | ct_flags::FIN_BACKEND
            | ct_flags::FIN_ACKED
            | ct_flags::SYN_RECV;
        assert_eq!(state & snat, 0);
        assert_eq!(state | snat, u8::MAX);
    }

    #[test]
    fn udp_lives_30_s_and_120_s_once_the_backend_replied() {
        walk(
            IPPROTO_UDP,
            &[
                (CLIENT, 0, t::UDP),
                (CLIENT, 0, t::UDP),
                (BACKEND, 0, t::UDP_REPLIED),
                (CLIENT, 0, t::UDP_REPLIED),
            ],
        );
    }

    /// The kernel's values (`tcp_timeouts[]`, nf_conntrack_proto_tcp.c), spelled as it does.
    #[test]
    fn the_timeouts_are_the_kernels_defaults() {
        const MINS: u64 = 60;
        const DAYS: u64 = 24 * 60 * MINS;
        assert_eq!(t::TCP_SYN_SENT, 2 * MINS);
        assert_eq!(t::TCP_SYN_RECV, 60);
        assert_eq!(t::TCP_ESTABLISHED, 5 * DAYS);
        assert_eq!(t::TCP_FIN_WAIT, 2 * MINS);
        assert_eq!(t::TCP_CLOSE_WAIT, 60);
        assert_eq!(t::TCP_LAST_ACK, 30);
        assert_eq!(t::TCP_TIME_WAIT, 2 * MINS);
        assert_eq!(t::TCP_CLOSE, 10);
    }
}
