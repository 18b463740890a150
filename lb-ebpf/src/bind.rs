//! Bind protection (Cilium's `sock4_post_bind`/`sock6_post_bind`): a process of the node
//! binding a port the agent serves outside traffic on (a NodePort on any address, or an
//! externalIP or LoadBalancer IP at its port) gets `EADDRINUSE`, so it cannot silently take
//! that traffic over or have it taken from it. The lookup is live: once the service is gone,
//! the bind works again. Sockets of other network namespaces (pods) have ports of their own
//! and are left alone, as are ClusterIPs (no local address).
//!
//! Written once over the family (`served::<F>`). An `AF_INET6` socket bound to an
//! IPv4-mapped address is checked as that IPv4 address; one bound to `::` receives IPv4 too
//! (unless `IPV6_V6ONLY`, which the program cannot see), so it is refused at an IPv4 NodePort
//! as well as at an IPv6 one.
use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock,
    helpers::generated::{bpf_get_netns_cookie, bpf_set_retval},
    macros::cgroup_sock,
    programs::SockContext,
};
use lb_common::{
    EADDRINUSE, FrontendKey, IPPROTO_TCP, IPPROTO_UDP, MapAddr, frontend_kinds, scopes,
    v4_of_mapped,
};

use crate::{
    ctx_word,
    family::{Family, V4, V6},
    lookup::frontend,
    netns,
};

/// Return value that lets the syscall go on.
const PROCEED: i32 = 1;
/// Return value that fails the syscall (with the errno set by `bpf_set_retval`).
const REJECT: i32 = 0;

#[cgroup_sock(post_bind4)]
pub fn post_bind4(ctx: SockContext) -> i32 {
    refuse_served(&ctx, |sk, port, proto| {
        served::<V4>(ctx_word::get(&sk.src_ip4), port, proto)
    })
}

#[cgroup_sock(post_bind6)]
pub fn post_bind6(ctx: SockContext) -> i32 {
    refuse_served(&ctx, |sk, port, proto| {
        let addr = ctx_word::get6(&sk.src_ip6);
        match v4_of_mapped(&addr) {
            Some(v4) => served::<V4>(v4, port, proto),
            None => {
                served::<V6>(addr, port, proto) || (addr.is_zero() && served::<V4>(0, port, proto))
            }
        }
    })
}

/// Fails the bind of a node socket whose address `served(socket, port, protocol)` says the
/// agent serves (port in network byte order).
#[inline(always)]
fn refuse_served(ctx: &SockContext, served: impl FnOnce(&bpf_sock, u16, u8) -> bool) -> i32 {
    // SAFETY: the kernel hands every cgroup sock program a valid context for this call.
    let sk = unsafe { &*ctx.sock };
    let proto = sk.protocol as u8;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return PROCEED;
    }
    // SAFETY: the context pointer is valid for this call, as the helper requires.
    if !netns::is_node(unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }) {
        return PROCEED;
    }
    // bpf_sock holds the bound port in host order; the map, in network order.
    if !served(sk, (sk.src_port as u16).to_be(), proto) {
        return PROCEED;
    }
    // SAFETY: a helper taking a plain integer; makes bind() fail with it.
    unsafe { bpf_set_retval(-EADDRINUSE) };
    REJECT
}

/// Whether the agent serves outside traffic at `addr`:`port` (network byte order).
#[inline(always)]
fn served<F: Family>(addr: F::Addr, port: u16, proto: u8) -> bool {
    let key = FrontendKey {
        addr,
        port,
        proto,
        scope: scopes::EXTERNAL,
    };
    if let Some(found) = frontend::<F>(&key) {
        // The unspecified address finds the NodePort itself.
        return matches!(
            found.kind,
            frontend_kinds::NODE_PORT | frontend_kinds::EXTERNAL_IP | frontend_kinds::LOAD_BALANCER
        );
    }
    // A node address (the loopback address with localhost NodePorts) at a NodePort.
    // SAFETY: only tested for presence.
    if unsafe { F::node_addrs().get(&key.addr) }.is_none() {
        return false;
    }
    let node_port = FrontendKey {
        addr: F::Addr::ZERO,
        ..key
    };
    frontend::<F>(&node_port).is_some_and(|f| f.kind == frontend_kinds::NODE_PORT)
}
