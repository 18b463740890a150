//! North-south ingress: XDP on the node's interfaces (`lb-agent run --nodeport-iface`).
//!
//! Frontends, backends and affinity are the one service table the socket programs read too
//! (`lookup.rs`). For a packet to an external frontend (a NodePort on one of the node's
//! addresses, an externalIP or a LoadBalancer IP, at its port and protocol; ClusterIPs are
//! served at the socket only and pass here untouched):
//! 1. a tracked flow keeps its backend (`LB4_CT_V2`, `LB6_CT_V1`) while it lives and its backend exists,
//!    also while that backend is terminating (its connections drain);
//! 2. otherwise a backend is chosen by Maglev over the flow's hash (the client address alone
//!    with session affinity), so every node picks the same one;
//! 3. the destination becomes the backend (DNAT); the reverse translation is recorded under
//!    the reply's tuple as a hint (`LB4_RHINT_V1`, `LB6_RHINT_V1`, `hint.rs`: a slot write),
//!    which tc egress turns into the flow's reverse entry (`LB4_FLOWREV_V2`, `LB6_FLOWREV_V1`)
//!    at its first reply; so a new flow to a local backend makes one LRU insert, its
//!    conntrack entry;
//! 4. for a remote backend of an `externalTrafficPolicy: Cluster` service the flow also gets
//!    an SNAT port of the node (`lb_common::snat_ports`, `snat.rs`), and an entry telling tc
//!    egress to give the forwarded packet the node's address and that port as source;
//! 5. the packet goes on to the node's stack (XDP_PASS), which routes it to the pod: over
//!    the bridge to a local pod, or to the node that owns a remote pod. Passing keeps the
//!    forwarding decisions (routes, neighbours, bridge, veth) with the kernel; a redirect
//!    would be a later optimisation.
//!
//! A packet to a node address at an SNAT port is a remote backend's reply: it gets its
//! client as destination here; like every reply, it gets the frontend as source at tc
//! egress (`tc.rs`) once the stack has routed it.
//!
//! A LoadBalancer IP with `loadBalancerSourceRanges` drops every packet whose source is not
//! in its ranges (`LB4_SRCRANGE`, `LB6_SRCRANGE`), counted as refused; NodePorts and externalIPs are never
//! filtered (kube-proxy's rule).
//!
//! No backend: `externalTrafficPolicy: Local` drops (as kube-proxy does, so the external load
//! balancer's health check moves traffic away); `Cluster` passes the packet untranslated and
//! the stack refuses it (TCP RST / ICMP port unreachable, no socket listens on a NodePort).
//! Anything not parsed (see `parse.rs`) passes untouched. Fragments of TCP/UDP: the first
//! one goes down this path like a whole packet, the later ones with its ports (`frag.rs`).
//!
//! Both families go down this one path, generic over `F: ip::Ip` (IPv4: `LB4_*` maps,
//! IPv6: `LB6_*`; an IPv6 NodePort's frontend key has address `::`, the node's IPv6
//! addresses are in `LB6_NODEADDR`, the SNAT source per interface in `LB6_IFADDR`). IPv4 is
//! inlined into the program. IPv6's 16-byte addresses and 40-byte keys do not fit one
//! 512-byte stack with the SNAT port search below them, so IPv6 runs in stages, each a program
//! of its own entered by tail call (`LB6_XDPSTAGES`, filled by the agent at load) with a
//! fresh stack: `nodeport_xdp6` (parse, lookups, tracked flows, replies), `nodeport_xdp6_icmp`
//! (ICMPv6 errors), `nodeport_xdp6_flow` (a new flow: the backend, its entries),
//! `nodeport_xdp6_snat` (a new flow to a remote backend: its SNAT port). A stage parses the
//! packet again and takes what the previous one decided from a per-CPU value
//! (`LB6_PENDING_V1`); the last stage counts the packet's one reason. A stage not loaded (the
//! tail call fails) leaves the packet untouched, counted as `not_parsed`. IPv6 extension
//! headers not walked (`ipv6.rs`) pass untouched, counted as
//! `extension_header_not_understood`.
//!
//! Every path ends in one reason (`lb_common::reasons`), counted per CPU (`verdict.rs`); the
//! reason gives the verdict.
use aya_ebpf::{helpers::generated::bpf_ktime_get_ns, macros::xdp, programs::XdpContext};
use lb_common::{
    Backend, CtKey, CtValue, FrontendKey, FrontendValue, MAGLEV_SIZE, MapAddr, RevValue,
    backend_flags, ct_flags, flow_hash, frontend_flags, frontend_kinds, reasons, scopes,
    snat_ports,
};

use crate::{
    conntrack,
    family::{V4, V6},
    frag, hint, icmp,
    ip::{Ip, Refused},
    lookup::{self, AffinityClient},
    maps::LB4_MAGLEV_V2,
    nat,
    parse::{self, Packet},
    snat,
    stages::{self, Pending},
    verdict::xdp_verdict,
};

#[xdp]
pub fn nodeport_xdp(ctx: XdpContext) -> u32 {
    xdp_verdict(ingress(&ctx))
}

/// IPv6, first stage: parse, lookups, tracked flows, remote backends' replies.
#[xdp]
pub fn nodeport_xdp6(ctx: XdpContext) -> u32 {
    xdp_verdict(family_ingress::<V6>(&ctx))
}

/// IPv6: an ICMPv6 error.
#[xdp]
pub fn nodeport_xdp6_icmp(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    let reason = match V6::parse_l3(start, end, frame_len(start, end)) {
        Ok(l3) => icmp::ingress::<V6>(start, end, &l3),
        Err(_) => reasons::XDP_NOT_PARSED,
    };
    xdp_verdict(reason)
}

/// IPv6: a new flow, its frontend decided by `nodeport_xdp6`.
#[xdp]
pub fn nodeport_xdp6_flow(ctx: XdpContext) -> u32 {
    xdp_verdict(resume::<V6>(&ctx, stages::FLOW))
}

/// IPv6: a new flow to a remote backend, its SNAT port, the backend chosen by
/// `nodeport_xdp6_flow`.
#[xdp]
pub fn nodeport_xdp6_snat(ctx: XdpContext) -> u32 {
    xdp_verdict(resume::<V6>(&ctx, stages::SNAT))
}

/// IPv6: a new flow's remaining entries, and the packet translated.
#[xdp]
pub fn nodeport_xdp6_made(ctx: XdpContext) -> u32 {
    xdp_verdict(resume::<V6>(&ctx, stages::MADE))
}

/// Why the packet is dropped or passed (`lb_common::reasons`).
#[inline(always)]
fn ingress(ctx: &XdpContext) -> u32 {
    match parse::eth_proto(ctx.data(), ctx.data_end()) {
        Some(V4::ETH_P_WIRE) => family_ingress::<V4>(ctx),
        Some(V6::ETH_P_WIRE) => {
            stages::enter(ctx, stages::INGRESS);
            reasons::XDP_NOT_PARSED // the stage is not loaded
        }
        _ => reasons::XDP_NOT_PARSED,
    }
}

/// The frame's length, `end - start`, hidden from LLVM: it would otherwise prove a bounds
/// check redundant from a length check against it, and drop the check the verifier needs.
#[inline(always)]
fn frame_len(start: usize, end: usize) -> usize {
    let len = end - start;
    // SAFETY: reads a local.
    unsafe { core::ptr::read_volatile(&len) }
}

/// The TCP or UDP packet of the frame (a later fragment with its first fragment's ports),
/// or the reason it is not one.
#[inline(always)]
fn parse_packet<F: Ip>(ctx: &XdpContext) -> Result<Packet<F::Addr>, u32> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let l3 = match F::parse_l3(start, end, frame_len(start, end)) {
        Ok(l3) => l3,
        Err(Refused::NotParsed) => return Err(reasons::XDP_NOT_PARSED),
        Err(Refused::ExtensionHeader) => {
            return Err(reasons::XDP_EXTENSION_HEADER_NOT_UNDERSTOOD);
        }
    };
    if l3.proto == F::ICMP_PROTO {
        // Maybe an ICMP error about a translated flow.
        if F::STAGED {
            stages::enter(ctx, stages::ICMP);
            return Err(reasons::XDP_NOT_PARSED); // the stage is not loaded
        }
        return Err(icmp::ingress::<F>(start, end, &l3));
    }
    let Some(mut pkt) = parse::l4::<F>(start, end, &l3) else {
        return Err(reasons::XDP_NOT_PARSED);
    };
    // A later fragment takes its first fragment's ports and decision (`frag.rs`).
    if pkt.frag == parse::FRAG_LATER && !frag::fill_ports::<F>(&mut pkt) {
        return Err(reasons::XDP_FRAGMENT_NOT_TRACKED);
    }
    Ok(pkt)
}

#[inline(always)]
fn family_ingress<F: Ip>(ctx: &XdpContext) -> u32 {
    let pkt = match parse_packet::<F>(ctx) {
        Ok(pkt) => pkt,
        Err(reason) => return reason,
    };
    let reason = translate::<F>(ctx, &pkt);
    finish::<F>(&pkt, reason)
}

/// The reason of a TCP/UDP packet whose path gave `reason`, its fragment recorded.
#[inline(always)]
fn finish<F: Ip>(pkt: &Packet<F::Addr>, reason: u32) -> u32 {
    let translated = reason == reasons::XDP_FORWARDED || reason == reasons::XDP_REPLY_TRANSLATED;
    frag::finish::<F>(pkt, reason, translated, reasons::XDP_FRAGMENT_TRANSLATED)
}

/// A later stage of a new flow (`STAGED`): the packet parsed again, the decisions of
/// the earlier stages from `LB6_PENDING_V1`.
#[inline(always)]
fn resume<F: Ip>(ctx: &XdpContext, stage: u32) -> u32 {
    let pkt = match parse_packet::<F>(ctx) {
        Ok(pkt) => pkt,
        Err(reason) => return reason,
    };
    let Some(pending) = F::pending() else {
        return reasons::XDP_NOT_PARSED;
    };
    // SAFETY: this CPU's value, written by the previous stage for this packet.
    let pending = unsafe { &*pending };
    let reason = match stage {
        stages::FLOW => new_flow::<F>(ctx, &pkt, &pending.frontend, pending.now),
        stages::SNAT => snat_stage::<F>(ctx, &pkt, pending),
        _ => made_stage::<F>(&pkt, pending),
    };
    finish::<F>(&pkt, reason)
}
/// The path of a TCP/UDP packet (a later fragment with its first fragment's ports).
#[inline(always)]
fn translate<F: Ip>(ctx: &XdpContext, pkt: &Packet<F::Addr>) -> u32 {
    let key = FrontendKey {
        addr: pkt.daddr,
        port: pkt.dport,
        proto: pkt.proto,
        scope: scopes::EXTERNAL,
    };
    let frontend = match lookup::frontend::<F>(&key) {
        // ClusterIPs are served at the socket; from outside they are not ours.
        Some(found) if found.kind == frontend_kinds::CLUSTER_IP => {
            forget_reused_tuple::<F>(pkt);
            return reasons::XDP_CLUSTER_IP;
        }
        Some(found) => found,
        None => {
            // SAFETY: only tested for presence.
            if unsafe { F::node_addrs().get(&pkt.daddr) }.is_none() {
                forget_reused_tuple::<F>(pkt);
                return reasons::XDP_NOT_A_SERVICE;
            }
            let nodeport = FrontendKey {
                addr: F::Addr::ZERO,
                ..key
            };
            match lookup::frontend::<F>(&nodeport) {
                Some(found) if found.kind == frontend_kinds::NODE_PORT => found,
                _ => return snat_reply::<F>(pkt),
            }
        }
    };
    // Every packet, not only a flow's first: a narrowed range cuts the flows it leaves out.
    if frontend.flags & frontend_flags::SOURCE_RANGES != 0
        && !lookup::source_allowed::<F>(frontend.service_id, pkt.saddr)
    {
        lookup::count(frontend.service_id, false);
        return reasons::XDP_DROPPED_SOURCE_RANGE;
    }
    forward::<F>(ctx, pkt, &frontend)
}

/// A new TCP connection that is not for a frontend (a client reaching a pod directly) may
/// reuse the tuple of an earlier NodePort flow to the same backend: its replies must not be
/// taken for that flow's, so the old reverse entry goes. Only SYNs pay this lookup.
#[inline(always)]
fn forget_reused_tuple<F: Ip>(pkt: &Packet<F::Addr>) {
    if pkt.proto != lb_common::IPPROTO_TCP
        || pkt.tcp_flags & (crate::parse::TCP_SYN | crate::parse::TCP_ACK) != crate::parse::TCP_SYN
    {
        return;
    }
    // Absent is the common case; nothing to do then.
    let replies = pkt.tuple().reversed();
    hint::forget::<F>(&replies, None);
    let _ = F::flow_replies().remove(&replies);
}

#[inline(always)]
fn forward<F: Ip>(ctx: &XdpContext, pkt: &Packet<F::Addr>, frontend: &FrontendValue) -> u32 {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let ct_key = pkt.tuple();
    if let Some(entry) = F::flows().get_ptr_mut(&ct_key) {
        // SAFETY: a pointer from the lookup above; copied out at once.
        let ct = unsafe { *entry };
        if ct.service_id == frontend.service_id
            && conntrack::alive(&ct, pkt.proto, pkt.tcp_flags, now)
            && backend_is::<F>(ct.backend_id, ct.backend_addr, ct.backend_port)
        {
            conntrack::touch(entry, pkt.tcp_flags, false, now);
            nat::xdp_forward::<F>(pkt, &ct);
            return reasons::XDP_FORWARDED;
        }
        // The flow is over (or its backend gone): a new one replaces it, its port goes back.
        snat::release::<F>(&ct_key, &ct);
    }
    if F::STAGED {
        return to_stage::<F>(ctx, stages::FLOW, |p| {
            p.frontend = *frontend;
            p.now = now;
        });
    }
    new_flow::<F>(ctx, pkt, frontend, now)
}

/// Writes what the next stage needs into this CPU's `Pending` value and enters it; the
/// reason if the stage could not be entered.
#[inline(always)]
fn to_stage<F: Ip>(ctx: &XdpContext, stage: u32, fill: impl FnOnce(&mut Pending<F::Addr>)) -> u32 {
    if let Some(pending) = F::pending() {
        // SAFETY: this CPU's value; XDP does not nest on a CPU.
        fill(unsafe { &mut *pending });
        stages::enter(ctx, stage);
    }
    reasons::XDP_NOT_PARSED // the stage is not loaded
}

/// A packet that starts a flow: a backend chosen, its replies' reverse translation recorded;
/// then (`snat_claim`) an SNAT port for a remote backend, and (`flow_made`) the flow's other
/// entries and the packet translated. With `STAGED` each of these is a stage of its own.
#[inline(always)]
fn new_flow<F: Ip>(
    ctx: &XdpContext,
    pkt: &Packet<F::Addr>,
    frontend: &FrontendValue,
    now: u64,
) -> u32 {
    let local_only = frontend.flags & frontend_flags::LOCAL_ONLY != 0;
    let no_backend = if local_only {
        reasons::XDP_DROPPED_NO_LOCAL_ENDPOINT
    } else {
        reasons::XDP_NO_BACKEND
    };
    let hash = if frontend.flags & frontend_flags::AFFINITY != 0 {
        flow_hash(pkt.saddr, F::Addr::ZERO, 0, 0, 0)
    } else {
        flow_hash(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto)
    };
    let chosen = if frontend.count == 0 {
        None
    } else {
        select::<F>(frontend, pkt.saddr, hash, now)
    };
    lookup::count(frontend.service_id, chosen.is_some());
    let Some((backend_id, backend)) = chosen else {
        return no_backend;
    };
    // The replies' reverse translation, as a hint (`hint.rs`). Refused only by a full
    // reverse map that could not evict (hardly ever): the replies would go untranslated, so
    // the flow is refused instead.
    if hint::record::<F>(pkt, &backend).is_err() {
        return reasons::XDP_DROPPED_FLOW_TABLE_FULL;
    }
    let remote = !local_only && backend.flags & backend_flags::LOCAL == 0;
    // Affinity pins the backend, not the port: the port search starts from the whole tuple's
    // hash.
    let snat_hash = if frontend.flags & frontend_flags::AFFINITY != 0 {
        flow_hash(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto)
    } else {
        hash
    };
    if F::STAGED {
        let stage = if remote { stages::SNAT } else { stages::MADE };
        return to_stage::<F>(ctx, stage, |p| {
            p.hash = snat_hash;
            p.backend_id = backend_id;
            p.backend = backend;
            p.snat = false;
        });
    }
    let nat = if remote {
        match snat_claim::<F>(ctx, pkt, &backend, snat_hash, now) {
            Ok(nat) => Some(nat),
            Err(reason) => return reason,
        }
    } else {
        None
    };
    flow_made::<F>(pkt, frontend.service_id, backend_id, &backend, nat, now)
}

/// `STAGED`: the SNAT port of a new flow to a remote backend, in its own stage.
#[inline(always)]
fn snat_stage<F: Ip>(ctx: &XdpContext, pkt: &Packet<F::Addr>, p: &Pending<F::Addr>) -> u32 {
    match snat_claim::<F>(ctx, pkt, &p.backend, p.hash, p.now) {
        Ok((nat_addr, nat_port)) => to_stage::<F>(ctx, stages::MADE, |p| {
            p.nat_addr = nat_addr;
            p.nat_port = nat_port;
            p.snat = true;
        }),
        Err(reason) => reason,
    }
}

/// `STAGED`: the rest of a new flow, in its own stage.
#[inline(always)]
fn made_stage<F: Ip>(pkt: &Packet<F::Addr>, p: &Pending<F::Addr>) -> u32 {
    let nat = p.snat.then_some((p.nat_addr, p.nat_port));
    flow_made::<F>(
        pkt,
        p.frontend.service_id,
        p.backend_id,
        &p.backend,
        nat,
        p.now,
    )
}

/// A new flow's remaining entries (for an SNAT flow the one telling tc egress its source,
/// keyed by the packet's tuple after DNAT), its conntrack entry, and the packet translated.
#[inline(always)]
fn flow_made<F: Ip>(
    pkt: &Packet<F::Addr>,
    service_id: u32,
    backend_id: u32,
    backend: &Backend<F::Addr>,
    nat: Option<(F::Addr, u16)>,
    now: u64,
) -> u32 {
    let mut ct = CtValue {
        last_seen_ns: now,
        backend_addr: backend.addr,
        backend_port: backend.port,
        nat_port: 0,
        nat_addr: F::Addr::ZERO,
        backend_id,
        service_id,
        flags: conntrack::next_flags(0, pkt.tcp_flags, false),
        pad: [0; 3],
    };
    if let Some((nat_addr, nat_port)) = nat {
        ct.flags |= ct_flags::SNAT;
        ct.nat_addr = nat_addr;
        ct.nat_port = nat_port;
    }
    if let Some((nat_addr, nat_port)) = nat {
        let out = RevValue {
            client_addr: pkt.saddr,
            frontend_addr: nat_addr,
            client_port: pkt.sport,
            frontend_port: nat_port,
            flags: ct_flags::SNAT_OUT,
            proto: pkt.proto,
            pad: 0,
        };
        let out_key = CtKey::new(pkt.saddr, backend.addr, pkt.sport, backend.port, pkt.proto);
        if F::flow_replies().insert(&out_key, &out, 0).is_err() {
            snat::release::<F>(&pkt.tuple(), &ct);
            return reasons::XDP_DROPPED_FLOW_TABLE_FULL;
        }
    }
    if F::flows().insert(&pkt.tuple(), &ct, 0).is_err() {
        snat::release::<F>(&pkt.tuple(), &ct);
        return reasons::XDP_DROPPED_FLOW_TABLE_FULL;
    }
    nat::xdp_forward::<F>(pkt, &ct);
    reasons::XDP_FORWARDED
}

/// A new flow to a remote backend: the reply must come back through this node, so the packet
/// leaves with the node's address of the interface it came in on, on a port of its own
/// (claimed from `hash`). Gives that address and port, or the reason the flow is refused (its
/// reply entry then forgotten).
#[inline(always)]
fn snat_claim<F: Ip>(
    ctx: &XdpContext,
    pkt: &Packet<F::Addr>,
    backend: &Backend<F::Addr>,
    hash: u32,
    now: u64,
) -> Result<(F::Addr, u16), u32> {
    let ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: copied out at once.
    let Some(nat_addr) = (unsafe { F::iface_addrs().get(&ifindex) }).copied() else {
        // No address to translate to on this interface: drop rather than mistranslate.
        forget_reply::<F>(pkt, backend);
        return Err(reasons::XDP_DROPPED_NO_SNAT_ADDRESS);
    };
    let claim = RevValue {
        client_addr: pkt.saddr,
        frontend_addr: pkt.daddr,
        client_port: pkt.sport,
        frontend_port: pkt.dport,
        flags: ct_flags::SNAT,
        proto: pkt.proto,
        pad: 0,
    };
    let Some(nat_port) = snat::claim::<F>(backend.addr, backend.port, nat_addr, claim, hash, now)
    else {
        forget_reply::<F>(pkt, backend);
        return Err(reasons::XDP_DROPPED_NO_SNAT_PORT); // every port is a live flow's
    };
    Ok((nat_addr, nat_port))
}

/// Forgets the reverse entry `hint::record` made for the replies of `pkt`'s new flow to
/// `backend` (a hint, or the reverse map's entry).
#[inline(always)]
fn forget_reply<F: Ip>(pkt: &Packet<F::Addr>, backend: &Backend<F::Addr>) {
    let key = CtKey::new(backend.addr, pkt.saddr, backend.port, pkt.sport, pkt.proto);
    hint::forget::<F>(&key, None);
    let _ = F::flow_replies().remove(&key);
}

/// Whether backend `id` still exists with this address (it was not removed or replaced). A
/// terminating backend still exists: its flows drain.
#[inline(always)]
fn backend_is<F: Ip>(id: u32, addr: F::Addr, port: u16) -> bool {
    match lookup::backend::<F>(id) {
        Some(b) => b.addr == addr && b.port == port,
        None => false,
    }
}

/// Maglev: entry `hash % MAGLEV_SIZE` of the service's table; with session affinity the
/// client's last backend while the affinity lasts.
#[inline(always)]
fn select<F: Ip>(
    frontend: &FrontendValue,
    client: F::Addr,
    hash: u32,
    now: u64,
) -> Option<(u32, Backend<F::Addr>)> {
    let affinity = (frontend.flags & frontend_flags::AFFINITY != 0)
        .then(|| AffinityClient::<F>::address(client, frontend.service_id));
    if let Some(client) = &affinity
        && let Some(found) = client.remembered(frontend, now)
    {
        return Some(found);
    }
    let table = LB4_MAGLEV_V2.get_ptr(&frontend.service_id)?;
    // The volatile read keeps LLVM from folding the bound check below into the modulo, so the
    // verifier sees it.
    let index = hash % MAGLEV_SIZE;
    // SAFETY: reads a local.
    let index = unsafe { core::ptr::read_volatile(&index) };
    if index >= MAGLEV_SIZE {
        return None;
    }
    // SAFETY: `index` < MAGLEV_SIZE, the table's length; the map value lives for this run.
    let backend_id = unsafe { *(table as *const u32).add(index as usize) };
    let backend = lookup::backend::<F>(backend_id)?;
    if let Some(client) = &affinity {
        client.remember(backend_id, now);
    }
    Some((backend_id, backend))
}

/// A packet to a node address that no frontend claims: a remote backend's reply to an SNAT
/// flow, or not ours.
#[inline(always)]
fn snat_reply<F: Ip>(pkt: &Packet<F::Addr>) -> u32 {
    if !snat_ports::contains(u16::from_be(pkt.dport)) {
        return reasons::XDP_NOT_A_SERVICE;
    }
    // SAFETY: copied out at once.
    let Some(rev) = (unsafe { F::flow_replies().get(&pkt.tuple()) }).copied() else {
        return reasons::XDP_NOT_A_SERVICE;
    };
    if rev.flags & ct_flags::SNAT == 0 {
        return reasons::XDP_NOT_A_SERVICE;
    }
    nat::xdp_reply::<F>(pkt, &rev);
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    conntrack::touch_reply::<F>(&rev.client_key(), pkt.tcp_flags, now);
    reasons::XDP_REPLY_TRANSLATED
}
