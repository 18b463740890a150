//! The one service table: frontends of every kind, their backend slots, the backends, and
//! the Maglev tables XDP picks backends with.
//!
//! A *service id* names one backend set of one Service port: the ClusterIP, the NodePort,
//! the externalIPs and the LoadBalancer IPs of a port share it while they use the same
//! endpoints. `externalTrafficPolicy: Local` gives the external frontends a second set (this
//! node's endpoints) under a second id; the in-node clients of those frontends use the
//! cluster-wide set through the frontend's internal-scope entry (Cilium's two scopes).
//!
//! An update writes the slots of the other generation first, then switches every frontend
//! entry of the set in one map update each, then deletes the old slots, so a connection in
//! flight never sees a half-written backend set.

use crate::addr::{Addr4, Addr6};

/// Maglev lookup table size (a prime): a backend set reached from outside has one table of
/// this many backend ids; a flow picks entry `flow_hash % MAGLEV_SIZE`.
pub const MAGLEV_SIZE: u32 = 16_381;

/// `Frontend4Key::scope`.
pub mod scopes {
    /// The frontend's entry; for external kinds the backend set external clients get.
    pub const EXTERNAL: u8 = 0;
    /// The entry in-node clients (the socket programs) use when the frontend has
    /// `frontend_flags::TWO_SCOPES`: the set of `internalTrafficPolicy`.
    pub const INTERNAL: u8 = 1;
}

/// `FrontendValue::kind`.
pub mod frontend_kinds {
    /// A ClusterIP: served at the socket only.
    pub const CLUSTER_IP: u8 = 1;
    /// A NodePort: key address 0, answering on every address in `LB4_NODEADDR` (XDP).
    pub const NODE_PORT: u8 = 2;
    /// A `spec.externalIPs` address.
    pub const EXTERNAL_IP: u8 = 3;
    /// A `status.loadBalancer.ingress[].ip` address.
    pub const LOAD_BALANCER: u8 = 4;
}

/// `FrontendValue::flags`.
pub mod frontend_flags {
    /// `sessionAffinity: ClientIP`.
    pub const AFFINITY: u8 = 1 << 0;
    /// `externalTrafficPolicy: Local` on an external frontend: only this node's endpoints,
    /// the client address kept (no SNAT), and a packet is dropped when there is none.
    pub const LOCAL_ONLY: u8 = 1 << 1;
    /// In-node clients use the `scopes::INTERNAL` entry of this frontend instead.
    pub const TWO_SCOPES: u8 = 1 << 2;
    /// A LoadBalancer IP with `loadBalancerSourceRanges`: a client must be in the ranges of
    /// its service id (`LB4_SRCRANGE`).
    pub const SOURCE_RANGES: u8 = 1 << 3;
    /// With `SOURCE_RANGES`: the ranges hold the node's own address (kube-proxy's
    /// "allowFromNode"), so a node process whose source is not known yet may connect.
    pub const RANGES_ALLOW_NODE: u8 = 1 << 4;
    /// With `SOURCE_RANGES`: the ranges hold this node's whole pod CIDR, so a pod whose
    /// source is not known yet may connect.
    pub const RANGES_ALLOW_PODS: u8 = 1 << 5;
}

/// Key of the frontends map of family `A` (`LB4_FRONT_V2`, `LB6_FRONT_V1`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey<A> {
    /// Address, network byte order; the unspecified address (0, `::`) for a NodePort.
    pub addr: A,
    /// Port, network byte order.
    pub port: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// `scopes::*`.
    pub scope: u8,
}

pub type Frontend4Key = FrontendKey<Addr4>;
pub type Frontend6Key = FrontendKey<Addr6>;

/// Value of the frontends map (both families).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FrontendValue {
    /// The backend set; never reused while affinity or conntrack entries may name it.
    pub service_id: u32,
    /// Number of backend slots of the current generation; 0 means no backend (the socket
    /// programs refuse, XDP drops or leaves the packet to the stack).
    pub count: u16,
    /// Which generation of slots is live (0 or 1).
    pub generation: u8,
    /// `frontend_flags::*`.
    pub flags: u8,
    /// Session affinity timeout in seconds (with `frontend_flags::AFFINITY`).
    pub affinity_timeout_secs: u32,
    /// `frontend_kinds::*`.
    pub kind: u8,
    pub pad: [u8; 3],
}

/// Key of the slots map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub service_id: u32,
    /// 0-based index, below `FrontendValue::count`.
    pub index: u16,
    pub generation: u8,
    pub pad: u8,
}

/// Value of the slots map: a backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SlotValue {
    pub backend_id: u32,
}

/// `Backend4::state`.
pub mod backend_states {
    /// Ready: new connections may pick it, affinity sticks to it.
    pub const ACTIVE: u8 = 0;
    /// Terminating: kept for the flows that use it; new connections pick it only through
    /// kube-proxy's serving-terminating fallback (a set with no ready endpoint), and
    /// affinity does not stick to it.
    pub const TERMINATING: u8 = 1;
}

/// `Backend4::flags`.
pub mod backend_flags {
    /// The backend runs on this node: outside traffic reaches it without SNAT.
    pub const LOCAL: u8 = 1 << 0;
}

/// Value of the backends map of family `A` (key: backend id, `u32`; `LB4_BACKEND_V2`,
/// `LB6_BACKEND_V1`). One id per pod address and port, shared by every service that uses it;
/// backend ids are one space over both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend<A> {
    /// Address, network byte order.
    pub addr: A,
    /// Port, network byte order.
    pub port: u16,
    /// `backend_states::*`.
    pub state: u8,
    /// `backend_flags::*`.
    pub flags: u8,
}

pub type Backend4 = Backend<Addr4>;
pub type Backend6 = Backend<Addr6>;

/// A Maglev table: `backend_ids[i]` names the backend of entry `i`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    pub backend_ids: [u32; MAGLEV_SIZE as usize],
    pub pad: u32,
}

impl Default for MaglevTable {
    fn default() -> Self {
        Self {
            backend_ids: [0; MAGLEV_SIZE as usize],
            pad: 0,
        }
    }
}

const _: () = {
    assert!(core::mem::size_of::<Frontend4Key>() == 8);
    assert!(core::mem::size_of::<Frontend6Key>() == 20);
    assert!(core::mem::size_of::<FrontendValue>() == 16);
    assert!(core::mem::size_of::<SlotKey>() == 8);
    assert!(core::mem::size_of::<SlotValue>() == 4);
    assert!(core::mem::size_of::<Backend4>() == 8);
    assert!(core::mem::size_of::<Backend6>() == 20);
    assert!(core::mem::size_of::<MaglevTable>() == 4 * MAGLEV_SIZE as usize + 4);
};
