//! Per-packet state of the flows XDP translates (NodePort, externalIPs, LoadBalancer IPs):
//! connection tracking keyed by the client's tuple, reverse entries keyed by the reply's
//! tuple, SNAT ports, lifetimes, and the flow hash Maglev is indexed with. The backend and
//! service ids they name are those of the one service table.

/// `Ct4Value::flags` and `Rev4Value::flags`.
pub mod ct_flags {
    /// A reply was seen (TCP: the connection is established; UDP: a stream).
    pub const SEEN_REPLY: u8 = 1 << 0;
    /// A FIN or RST was seen in either direction.
    pub const CLOSING: u8 = 1 << 1;
    /// The flow's source was translated to the node's address (`nat_addr`, `nat_port`). On a
    /// reverse entry: the entry of the remote backend's reply to the node's address, whose
    /// destination XDP restores to the client.
    pub const SNAT: u8 = 1 << 2;
    /// On a reverse entry: the entry of the client's packet on its way to the remote backend,
    /// whose source tc egress sets to the node's address and SNAT port.
    pub const SNAT_OUT: u8 = 1 << 3;
}

/// Connection-tracking lifetimes in seconds, after the kernel's nf_conntrack defaults: an idle
/// flow is forgotten (and its next packet chooses a backend afresh) after this long.
pub mod ct_timeouts {
    /// TCP before any reply (kernel: syn_sent 120 s, syn_recv 60 s).
    pub const TCP_SYN: u64 = 60;
    /// TCP after a reply (kernel: established, 5 days).
    pub const TCP_ESTABLISHED: u64 = 432_000;
    /// TCP after a FIN or RST (kernel: close 10 s).
    pub const TCP_CLOSING: u64 = 10;
    /// UDP without reply (kernel: udp_timeout 30 s).
    pub const UDP: u64 = 30;
    /// UDP with replies (kernel: udp_timeout_stream 120 s).
    pub const UDP_REPLIED: u64 = 120;
}

/// Source ports the node uses for SNAT of external flows to remote backends: above the
/// kernel's default ephemeral range (32768-60999), so they do not collide with the node's own
/// connections.
pub mod snat_ports {
    pub const FIRST: u16 = 61_000;
    pub const COUNT: u16 = 4_536;
    /// Ports tried per new flow before it is dropped (port exhaustion).
    pub const TRIES: u32 = 8;
}

/// A flow's tuple as seen on the wire (addresses and ports in network byte order). In
/// `LB4_CT_V2` it is the client's packet (client → frontend); in `LB4_FLOWREV_V2` the reply
/// (backend → client, or backend → node address and SNAT port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ct4Key {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

impl Ct4Key {
    pub const fn new(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> Self {
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
    pub const fn reversed(&self) -> Self {
        Self::new(self.daddr, self.saddr, self.dport, self.sport, self.proto)
    }
}

/// Value of the connection-tracking map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ct4Value {
    /// `bpf_ktime_get_ns` of the last packet (refreshed at most once a second).
    pub last_seen_ns: u64,
    pub backend_addr: u32,
    pub backend_port: u16,
    /// SNAT source port (with `ct_flags::SNAT`).
    pub nat_port: u16,
    /// SNAT source address (with `ct_flags::SNAT`).
    pub nat_addr: u32,
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
pub struct Rev4Value {
    pub client_addr: u32,
    pub frontend_addr: u32,
    pub client_port: u16,
    pub frontend_port: u16,
    /// `ct_flags::SNAT` when the reply comes back to the node's address and must also have
    /// its destination restored.
    pub flags: u8,
    pub proto: u8,
    pub pad: u16,
}

impl Rev4Value {
    /// The conntrack key of the client's direction of the flow this entry belongs to.
    pub const fn client_key(&self) -> Ct4Key {
        Ct4Key::new(
            self.client_addr,
            self.frontend_addr,
            self.client_port,
            self.frontend_port,
            self.proto,
        )
    }
}

/// The flow hash that indexes Maglev tables, the same on every node and in the agent's
/// tests. Inputs as on the wire (network byte order). With session affinity only the client
/// address is hashed (`sport`, `daddr`, `dport` passed as 0).
pub const fn flow_hash(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h: u32 = 0x9e37_79b9;
    h = mix(h, saddr);
    h = mix(h, daddr);
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

const fn mix(h: u32, k: u32) -> u32 {
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
    assert!((snat_ports::FIRST as u32 + snat_ports::COUNT as u32) <= 65_536);
};
