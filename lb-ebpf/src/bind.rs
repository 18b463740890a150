//! Bind protection (Cilium's `sock4_post_bind`): a process of the node binding a port the
//! agent serves outside traffic on (a NodePort on any address, or an externalIP or
//! LoadBalancer IP at its port) gets `EADDRINUSE`, so it cannot silently take that traffic
//! over or have it taken from it. The lookup is live: once the service is gone, the bind
//! works again. Sockets of other network namespaces (pods) have ports of their own and are
//! left alone, as are ClusterIPs (no local address).
use aya_ebpf::{
    EbpfContext as _,
    helpers::generated::{bpf_get_netns_cookie, bpf_set_retval},
    macros::cgroup_sock,
    programs::SockContext,
};
use lb_common::{EADDRINUSE, Frontend4Key, IPPROTO_TCP, IPPROTO_UDP, frontend_kinds, scopes};

use crate::{family::V4, lookup::frontend, maps::LB4_NODEADDR, netns};

/// Return value that lets the syscall go on.
const PROCEED: i32 = 1;
/// Return value that fails the syscall (with the errno set by `bpf_set_retval`).
const REJECT: i32 = 0;

#[cgroup_sock(post_bind4)]
pub fn post_bind4(ctx: SockContext) -> i32 {
    if !taken(&ctx) {
        return PROCEED;
    }
    // SAFETY: a helper taking a plain integer; makes bind() fail with it.
    unsafe { bpf_set_retval(-EADDRINUSE) };
    REJECT
}

/// Whether the address the socket was just bound to is one the agent serves.
#[inline(always)]
fn taken(ctx: &SockContext) -> bool {
    // SAFETY: the kernel hands every cgroup sock program a valid context for this call.
    let sk = unsafe { &*ctx.sock };
    let proto = sk.protocol as u8;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return false;
    }
    // SAFETY: the context pointer is valid for this call, as the helper requires.
    if !netns::is_node(unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }) {
        return false;
    }
    let key = Frontend4Key {
        addr: sk.src_ip4,
        // bpf_sock holds the bound port in host order; the map, in network order.
        port: (sk.src_port as u16).to_be(),
        proto,
        scope: scopes::EXTERNAL,
    };
    if let Some(found) = frontend::<V4>(&key) {
        // Address 0 (INADDR_ANY) finds the NodePort itself.
        return matches!(
            found.kind,
            frontend_kinds::NODE_PORT | frontend_kinds::EXTERNAL_IP | frontend_kinds::LOAD_BALANCER
        );
    }
    // A node address (127.0.0.1 with localhost NodePorts) at a NodePort.
    // SAFETY: only tested for presence.
    if unsafe { LB4_NODEADDR.get(&key.addr) }.is_none() {
        return false;
    }
    let node_port = Frontend4Key { addr: 0, ..key };
    frontend::<V4>(&node_port).is_some_and(|f| f.kind == frontend_kinds::NODE_PORT)
}
