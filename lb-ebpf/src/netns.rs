//! Which network namespace is the node's: bind protection applies to the node's own sockets,
//! and source ranges stand in the node's answer for an unbound node socket.
use aya_ebpf::{Global, helpers::generated::bpf_get_netns_cookie};

/// The network namespace cookie of the node (the agent's own), set at load; 0: the initial
/// namespace's (a kernel without `SO_NETNS_COOKIE`).
#[unsafe(no_mangle)]
static NODE_NETNS_COOKIE: Global<u64> = Global::new(0);

/// Whether a socket whose namespace has cookie `cookie` is one of the node's.
#[inline(always)]
pub fn is_node(cookie: u64) -> bool {
    let node = NODE_NETNS_COOKIE.load();
    let node = if node == 0 {
        // SAFETY: the helper takes NULL for the initial network namespace.
        unsafe { bpf_get_netns_cookie(core::ptr::null_mut()) }
    } else {
        node
    };
    cookie == node
}
