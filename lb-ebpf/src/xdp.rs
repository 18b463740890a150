//! North-south ingress: XDP on the node's interfaces (`lb-agent run --nodeport-iface`).
//!
//! Frontends, backends and affinity are the one service table the socket programs read too
//! (`lookup.rs`). For a packet to an external frontend (a NodePort on one of the node's
//! addresses, an externalIP or a LoadBalancer IP, at its port and protocol; ClusterIPs are
//! served at the socket only and pass here untouched):
//! 1. a tracked flow keeps its backend (`LB4_CT_V2`) while it lives and its backend exists,
//!    also while that backend is terminating (its connections drain);
//! 2. otherwise a backend is chosen by Maglev over the flow's hash (the client address alone
//!    with session affinity), so every node picks the same one;
//! 3. the destination becomes the backend (DNAT); the reverse translation is recorded under
//!    the reply's tuple (`LB4_FLOWREV_V2`);
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
//! in its ranges (`LB4_SRCRANGE`), counted as refused; NodePorts and externalIPs are never
//! filtered (kube-proxy's rule).
//!
//! No backend: `externalTrafficPolicy: Local` drops (as kube-proxy does, so the external load
//! balancer's health check moves traffic away); `Cluster` passes the packet untranslated and
//! the stack refuses it (TCP RST / ICMP port unreachable, no socket listens on a NodePort).
//! Anything not parsed (see `parse.rs`) passes untouched. Fragments of TCP/UDP: the first
//! one goes down this path like a whole packet, the later ones with its ports (`frag.rs`).
//!
//! Every path ends in one reason (`lb_common::reasons`), counted per CPU (`verdict.rs`); the
//! reason gives the verdict.
use aya_ebpf::{helpers::generated::bpf_ktime_get_ns, macros::xdp, programs::XdpContext};
use lb_common::{
    Backend4, Ct4Key, Ct4Value, Frontend4Key, FrontendValue, MAGLEV_SIZE, Rev4Value, backend_flags,
    ct_flags, flow_hash, frontend_flags, frontend_kinds, reasons, scopes, snat_ports,
};

use crate::{
    conntrack,
    family::V4,
    frag, icmp,
    lookup::{self, AffinityClient},
    maps::{LB4_CT_V2, LB4_FLOWREV_V2, LB4_IFADDR, LB4_MAGLEV_V2, LB4_NODEADDR},
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
    let Some(mut pkt) = parse::parse(ctx.data(), ctx.data_end(), ctx.data_end() - ctx.data())
    else {
        // Not TCP/UDP we understand: maybe an ICMP error about a translated flow.
        return icmp::ingress(ctx);
    };
    // A later fragment takes its first fragment's ports and decision (`frag.rs`).
    if pkt.frag == parse::FRAG_LATER && !frag::fill_ports(&mut pkt) {
        return reasons::XDP_FRAGMENT_NOT_TRACKED;
    }
    let reason = translate(ctx, &pkt);
    let translated = reason == reasons::XDP_FORWARDED || reason == reasons::XDP_REPLY_TRANSLATED;
    frag::finish(&pkt, reason, translated, reasons::XDP_FRAGMENT_TRANSLATED)
}

/// The path of a TCP/UDP packet (a later fragment with its first fragment's ports).
#[inline(always)]
fn translate(ctx: &XdpContext, pkt: &Packet) -> u32 {
    let key = Frontend4Key {
        addr: pkt.daddr,
        port: pkt.dport,
        proto: pkt.proto,
        scope: scopes::EXTERNAL,
    };
    let frontend = match lookup::frontend::<V4>(&key) {
        // ClusterIPs are served at the socket; from outside they are not ours.
        Some(found) if found.kind == frontend_kinds::CLUSTER_IP => {
            forget_reused_tuple(pkt);
            return reasons::XDP_CLUSTER_IP;
        }
        Some(found) => found,
        None => {
            // SAFETY: only tested for presence.
            if unsafe { LB4_NODEADDR.get(&pkt.daddr) }.is_none() {
                forget_reused_tuple(pkt);
                return reasons::XDP_NOT_A_SERVICE;
            }
            let nodeport = Frontend4Key { addr: 0, ..key };
            match lookup::frontend::<V4>(&nodeport) {
                Some(found) if found.kind == frontend_kinds::NODE_PORT => found,
                _ => return snat_reply(pkt),
            }
        }
    };
    // Every packet, not only a flow's first: a narrowed range cuts the flows it leaves out.
    if frontend.flags & frontend_flags::SOURCE_RANGES != 0
        && !lookup::source_allowed::<V4>(frontend.service_id, pkt.saddr)
    {
        lookup::count(frontend.service_id, false);
        return reasons::XDP_DROPPED_SOURCE_RANGE;
    }
    forward(ctx, pkt, &frontend)
}

/// A new TCP connection that is not for a frontend (a client reaching a pod directly) may
/// reuse the tuple of an earlier NodePort flow to the same backend: its replies must not be
/// taken for that flow's, so the old reverse entry goes. Only SYNs pay this lookup.
#[inline(always)]
fn forget_reused_tuple(pkt: &Packet) {
    if pkt.proto != lb_common::IPPROTO_TCP
        || pkt.tcp_flags & (crate::parse::TCP_SYN | crate::parse::TCP_ACK) != crate::parse::TCP_SYN
    {
        return;
    }
    // Absent is the common case; nothing to do then.
    let _ = LB4_FLOWREV_V2.remove(&pkt.tuple().reversed());
}

#[inline(always)]
fn forward(ctx: &XdpContext, pkt: &Packet, frontend: &FrontendValue) -> u32 {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let ct_key = pkt.tuple();
    if let Some(entry) = LB4_CT_V2.get_ptr_mut(&ct_key) {
        // SAFETY: a pointer from the lookup above; copied out at once.
        let ct = unsafe { *entry };
        if ct.service_id == frontend.service_id
            && conntrack::alive(&ct, pkt.proto, pkt.tcp_flags, now)
            && backend_is(ct.backend_id, ct.backend_addr, ct.backend_port)
        {
            conntrack::touch(entry, pkt.tcp_flags, false, now);
            nat::xdp_forward(pkt, &ct);
            return reasons::XDP_FORWARDED;
        }
        // The flow is over (or its backend gone): a new one replaces it, its port goes back.
        snat::release(&ct_key, &ct);
    }
    let local_only = frontend.flags & frontend_flags::LOCAL_ONLY != 0;
    let no_backend = if local_only {
        reasons::XDP_DROPPED_NO_LOCAL_ENDPOINT
    } else {
        reasons::XDP_NO_BACKEND
    };
    let hash = if frontend.flags & frontend_flags::AFFINITY != 0 {
        flow_hash(pkt.saddr, 0, 0, 0, 0)
    } else {
        flow_hash(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto)
    };
    let chosen = if frontend.count == 0 {
        None
    } else {
        select(frontend, pkt.saddr, hash, now)
    };
    lookup::count(frontend.service_id, chosen.is_some());
    let Some((backend_id, backend)) = chosen else {
        return no_backend;
    };
    let mut ct = Ct4Value {
        last_seen_ns: now,
        backend_addr: backend.addr,
        backend_port: backend.port,
        nat_port: 0,
        nat_addr: 0,
        backend_id,
        service_id: frontend.service_id,
        flags: conntrack::next_flags(0, pkt.tcp_flags, false),
        pad: [0; 3],
    };
    // The reply's source becomes the frontend again (tc egress), keyed by the reply's tuple.
    let reply_key = Ct4Key::new(backend.addr, pkt.saddr, backend.port, pkt.sport, pkt.proto);
    let mut rev = Rev4Value {
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
    if LB4_FLOWREV_V2.insert(&reply_key, &rev, 0).is_err() {
        return reasons::XDP_DROPPED_FLOW_TABLE_FULL;
    }
    if !local_only && backend.flags & backend_flags::LOCAL == 0 {
        // A remote backend: the reply must come back through this node, so the packet leaves
        // with the node's address of the interface it came in on, on a port of its own.
        let ifindex = ctx.ingress_ifindex() as u32;
        // SAFETY: copied out at once.
        let Some(nat_addr) = (unsafe { LB4_IFADDR.get(&ifindex) }).copied() else {
            // No address to translate to on this interface: drop rather than mistranslate.
            let _ = LB4_FLOWREV_V2.remove(&reply_key);
            return reasons::XDP_DROPPED_NO_SNAT_ADDRESS;
        };
        rev.flags = ct_flags::SNAT;
        // Affinity pins the backend, not the port: the port search starts from the whole
        // tuple's hash.
        let snat_hash = if frontend.flags & frontend_flags::AFFINITY != 0 {
            flow_hash(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto)
        } else {
            hash
        };
        let Some(nat_port) =
            snat::claim(backend.addr, backend.port, nat_addr, &rev, snat_hash, now)
        else {
            let _ = LB4_FLOWREV_V2.remove(&reply_key);
            return reasons::XDP_DROPPED_NO_SNAT_PORT; // every port is a live flow's
        };
        // tc egress sets the source of the forwarded packet, keyed by its tuple after DNAT.
        let out_key = Ct4Key::new(pkt.saddr, backend.addr, pkt.sport, backend.port, pkt.proto);
        let out = Rev4Value {
            client_addr: pkt.saddr,
            frontend_addr: nat_addr,
            client_port: pkt.sport,
            frontend_port: nat_port,
            flags: ct_flags::SNAT_OUT,
            proto: pkt.proto,
            pad: 0,
        };
        ct.flags |= ct_flags::SNAT;
        ct.nat_addr = nat_addr;
        ct.nat_port = nat_port;
        if LB4_FLOWREV_V2.insert(&out_key, &out, 0).is_err() {
            snat::release(&ct_key, &ct);
            return reasons::XDP_DROPPED_FLOW_TABLE_FULL;
        }
    }
    if LB4_CT_V2.insert(&ct_key, &ct, 0).is_err() {
        snat::release(&ct_key, &ct);
        return reasons::XDP_DROPPED_FLOW_TABLE_FULL;
    }
    nat::xdp_forward(pkt, &ct);
    reasons::XDP_FORWARDED
}

/// Whether backend `id` still exists with this address (it was not removed or replaced). A
/// terminating backend still exists: its flows drain.
#[inline(always)]
fn backend_is(id: u32, addr: u32, port: u16) -> bool {
    match lookup::backend::<V4>(id) {
        Some(b) => b.addr == addr && b.port == port,
        None => false,
    }
}

/// Maglev: entry `hash % MAGLEV_SIZE` of the service's table; with session affinity the
/// client's last backend while the affinity lasts.
#[inline(always)]
fn select(frontend: &FrontendValue, client: u32, hash: u32, now: u64) -> Option<(u32, Backend4)> {
    let affinity = (frontend.flags & frontend_flags::AFFINITY != 0)
        .then(|| AffinityClient::<V4>::address(client, frontend.service_id));
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
    let backend = lookup::backend::<V4>(backend_id)?;
    if let Some(client) = &affinity {
        client.remember(backend_id, now);
    }
    Some((backend_id, backend))
}

/// A packet to a node address that no frontend claims: a remote backend's reply to an SNAT
/// flow, or not ours.
#[inline(always)]
fn snat_reply(pkt: &Packet) -> u32 {
    if !snat_ports::contains(u16::from_be(pkt.dport)) {
        return reasons::XDP_NOT_A_SERVICE;
    }
    // SAFETY: copied out at once.
    let Some(rev) = (unsafe { LB4_FLOWREV_V2.get(&pkt.tuple()) }).copied() else {
        return reasons::XDP_NOT_A_SERVICE;
    };
    if rev.flags & ct_flags::SNAT == 0 {
        return reasons::XDP_NOT_A_SERVICE;
    }
    nat::xdp_reply(pkt, &rev);
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    conntrack::touch_reply(&rev.client_key(), pkt.tcp_flags, now);
    reasons::XDP_REPLY_TRANSLATED
}
