//! IPv6's XDP stages (see `xdp.rs`): programs of their own, entered by tail call through
//! `LB6_XDPSTAGES` (the agent puts each stage at its index when it loads the programs), each
//! with a fresh 512-byte stack. What a stage decided for the next one is in this CPU's
//! `Pending` value (`LB6_PENDING_V1`): XDP runs one packet at a time on a CPU, to its end.
use aya_ebpf::programs::XdpContext;
use lb_common::{Backend, FrontendValue};

use crate::maps::LB6_XDPSTAGES;

/// `nodeport_xdp6`: parse, lookups, tracked flows, remote backends' replies.
pub const INGRESS: u32 = 0;
/// `nodeport_xdp6_icmp`: an ICMPv6 error.
pub const ICMP: u32 = 1;
/// `nodeport_xdp6_flow`: a new flow.
pub const FLOW: u32 = 2;
/// `nodeport_xdp6_snat`: a new flow to a remote backend, its SNAT port.
pub const SNAT: u32 = 3;
/// `nodeport_xdp6_made`: a new flow's remaining entries, the packet translated.
pub const MADE: u32 = 4;
/// Entries of `LB6_XDPSTAGES`.
pub const COUNT: u32 = 5;

/// What a new flow's earlier stages decided.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Pending<A> {
    pub now: u64,
    pub frontend: FrontendValue,
    /// The SNAT port search's hash.
    pub hash: u32,
    pub backend_id: u32,
    pub backend: Backend<A>,
    /// An SNAT flow's node address and port (with `snat`).
    pub nat_addr: A,
    pub nat_port: u16,
    pub snat: bool,
}

/// Enters `stage`; returns only if it is not loaded.
#[inline(always)]
pub fn enter(ctx: &XdpContext, stage: u32) {
    // SAFETY: a tail call replaces this program with the stage, which takes the same context;
    // on failure execution goes on here.
    unsafe { LB6_XDPSTAGES.tail_call(ctx, stage) };
}
