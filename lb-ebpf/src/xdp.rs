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
//!    the reply's tuple (`LB4_FLOWREV_V2`, `LB6_FLOWREV_V1`);
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
//! inlined into the program; IPv6 is a function of its own (a BPF-to-BPF call), so its
//! larger keys do not add to IPv4's stack. IPv6 extension headers not walked (`ipv6.rs`)
//! pass untouched, counted as `extension_header_not_understood`.
//!
//! Every path ends in one reason (`lb_common::reasons`), counted per CPU (`verdict.rs`); the
//! reason gives the verdict.
use aya_ebpf::{
    bindings::xdp_md, helpers::generated::bpf_ktime_get_ns, macros::xdp, programs::XdpContext,
};
use lb_common::{
    Backend, CtKey, CtValue, FrontendKey, FrontendValue, MAGLEV_SIZE, MapAddr, RevValue,
    backend_flags, ct_flags, flow_hash, frontend_flags, frontend_kinds, reasons, scopes,
    snat_ports,
};

use crate::{
    conntrack,
    family::{V4, V6},
    frag, icmp,
    ip::{Ip, L3, Refused},
    lookup::{self, AffinityClient},
    maps::LB4_MAGLEV_V2,
    nat,
    parse::{self, Packet},
    snat,
    verdict::xdp_verdict,
};

#[xdp]
pub fn nodeport_xdp(ctx: XdpContext) -> u32 {
    xdp_verdict(ingress(&ctx))
}

/// Why the packet is dropped or passed (`lb_common::reasons`).
#[inline(always)]
fn ingress(ctx: &XdpContext) -> u32 {
    match parse::eth_proto(ctx.data(), ctx.data_end()) {
        Some(V4::ETH_P_WIRE) => family_ingress::<V4>(ctx),
        Some(V6::ETH_P_WIRE) if crate::ip::V6_ENABLED => ingress_v6(ctx.ctx),
        _ => reasons::XDP_NOT_PARSED,
    }
}

/// IPv6, as a function of its own (see the module's doc).
#[inline(never)]
fn ingress_v6(ctx: *mut xdp_md) -> u32 {
    family_ingress::<V6>(&XdpContext::new(ctx))
}

#[inline(always)]
fn family_ingress<F: Ip>(ctx: &XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    let l3 = match F::parse_l3(start, end, end - start) {
        Ok(l3) => l3,
        Err(Refused::NotParsed) => return reasons::XDP_NOT_PARSED,
        Err(Refused::ExtensionHeader) => return reasons::XDP_EXTENSION_HEADER_NOT_UNDERSTOOD,
    };
    if l3.proto == F::ICMP_PROTO {
        // Maybe an ICMP error about a translated flow.
        return icmp_ingress::<F>(start, end, &l3);
    }
    let Some(mut pkt) = parse::l4::<F>(start, end, &l3) else {
        return reasons::XDP_NOT_PARSED;
    };
    // A later fragment takes its first fragment's ports and decision (`frag.rs`).
    if pkt.frag == parse::FRAG_LATER && !frag::fill_ports::<F>(&mut pkt) {
        return reasons::XDP_FRAGMENT_NOT_TRACKED;
    }
    let reason = translate::<F>(ctx, &pkt);
    let translated = reason == reasons::XDP_FORWARDED || reason == reasons::XDP_REPLY_TRANSLATED;
    frag::finish::<F>(&pkt, reason, translated, reasons::XDP_FRAGMENT_TRANSLATED)
}

/// ICMP, rare: a function of its own, so its stack does not add to the TCP/UDP path's.
#[inline(never)]
fn icmp_ingress<F: Ip>(start: usize, end: usize, l3: &L3<F::Addr>) -> u32 {
    icmp::ingress::<F>(start, end, l3)
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
    let _ = F::flow_replies().remove(&pkt.tuple().reversed());
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
    if F::SPLIT_FRAMES {
        new_flow_call::<F>(ctx, pkt, frontend, now)
    } else {
        new_flow::<F>(ctx, pkt, frontend, now)
    }
}

/// `new_flow` as a function of its own (`Ip::SPLIT_FRAMES`).
#[inline(never)]
fn new_flow_call<F: Ip>(
    ctx: &XdpContext,
    pkt: &Packet<F::Addr>,
    frontend: &FrontendValue,
    now: u64,
) -> u32 {
    new_flow::<F>(ctx, pkt, frontend, now)
}

/// A packet that starts a flow: a backend chosen, the flow's entries made (and an SNAT port
/// for a remote backend), the packet translated.
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
    // The reply's source becomes the frontend again (tc egress), keyed by the reply's tuple.
    // Keys and values are built where they are used and not kept: IPv6's are 40 bytes each,
    // and the SNAT port search's stack adds to this one.
    let reply = RevValue {
        client_addr: pkt.saddr,
        frontend_addr: pkt.daddr,
        client_port: pkt.sport,
        frontend_port: pkt.dport,
        flags: 0,
        proto: pkt.proto,
        pad: 0,
    };
    // A full LRU map evicts the oldest flow; failing here would leave replies untranslated,
    // so the flow is refused instead.
    if F::flow_replies()
        .insert(&reply_key::<F>(pkt, &backend), &reply, 0)
        .is_err()
    {
        return reasons::XDP_DROPPED_FLOW_TABLE_FULL;
    }
    let mut ct = CtValue {
        last_seen_ns: now,
        backend_addr: backend.addr,
        backend_port: backend.port,
        nat_port: 0,
        nat_addr: F::Addr::ZERO,
        backend_id,
        service_id: frontend.service_id,
        flags: conntrack::next_flags(0, pkt.tcp_flags, false),
        pad: [0; 3],
    };
    if !local_only && backend.flags & backend_flags::LOCAL == 0 {
        // Affinity pins the backend, not the port: the port search starts from the whole
        // tuple's hash.
        let snat_hash = if frontend.flags & frontend_flags::AFFINITY != 0 {
            flow_hash(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto)
        } else {
            hash
        };
        let snat = if F::SPLIT_FRAMES {
            let mut out = SnatOut {
                hash: snat_hash,
                now,
                result: Err(reasons::XDP_DROPPED_NO_SNAT_PORT),
            };
            snat_flow_call::<F>(ctx, pkt, &backend, &mut out);
            out.result
        } else {
            snat_flow::<F>(ctx, pkt, &backend, snat_hash, now)
        };
        match snat {
            Ok((nat_addr, nat_port)) => {
                ct.flags |= ct_flags::SNAT;
                ct.nat_addr = nat_addr;
                ct.nat_port = nat_port;
            }
            Err(reason) => return reason,
        }
    }
    if F::flows().insert(&pkt.tuple(), &ct, 0).is_err() {
        snat::release::<F>(&pkt.tuple(), &ct);
        return reasons::XDP_DROPPED_FLOW_TABLE_FULL;
    }
    nat::xdp_forward::<F>(pkt, &ct);
    reasons::XDP_FORWARDED
}

/// The tuple of the replies of `pkt`'s new flow to `backend`.
#[inline(always)]
fn reply_key<F: Ip>(pkt: &Packet<F::Addr>, backend: &Backend<F::Addr>) -> CtKey<F::Addr> {
    CtKey::new(backend.addr, pkt.saddr, backend.port, pkt.sport, pkt.proto)
}

/// `snat_flow` as a function of its own (`Ip::SPLIT_FRAMES`); a BPF-to-BPF call takes five
/// arguments, the result pointer among them, so the hash and the time come in `out`.
#[inline(never)]
fn snat_flow_call<F: Ip>(
    ctx: &XdpContext,
    pkt: &Packet<F::Addr>,
    backend: &Backend<F::Addr>,
    out: &mut SnatOut<F::Addr>,
) {
    out.result = snat_flow::<F>(ctx, pkt, backend, out.hash, out.now);
}

/// What `snat_flow_call` takes and gives.
struct SnatOut<A> {
    hash: u32,
    now: u64,
    result: Result<(A, u16), u32>,
}

/// A new flow to a remote backend: the reply must come back through this node, so the packet
/// leaves with the node's address of the interface it came in on, on a port of its own
/// (claimed from `hash`), set at tc egress by an entry keyed by its tuple after DNAT. Gives
/// that address and port, or the reason the flow is refused (its reply entry then removed).
#[inline(always)]
fn snat_flow<F: Ip>(
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
        let _ = F::flow_replies().remove(&reply_key::<F>(pkt, backend));
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
        let _ = F::flow_replies().remove(&reply_key::<F>(pkt, backend));
        return Err(reasons::XDP_DROPPED_NO_SNAT_PORT); // every port is a live flow's
    };
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
        let ct = CtValue {
            backend_addr: backend.addr,
            backend_port: backend.port,
            nat_addr,
            nat_port,
            flags: ct_flags::SNAT,
            ..Default::default()
        };
        snat::release::<F>(&pkt.tuple(), &ct);
        return Err(reasons::XDP_DROPPED_FLOW_TABLE_FULL);
    }
    Ok((nat_addr, nat_port))
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
