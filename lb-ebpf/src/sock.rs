//! cgroup socket-address hooks: translation at connect/send time, reverse translation of
//! the addresses a socket reports (recvmsg source, getpeername).
use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use lb_common::{
    ECONNREFUSED, EPERM, Frontend4Key, IPPROTO_TCP, IPPROTO_UDP, RevNat4Key, RevNat4Value, scopes,
};

use crate::{
    lookup::{InNodeClient, Verdict, select},
    maps::LB4_REVNAT,
};

/// Return value that lets the syscall go on.
const PROCEED: i32 = 1;
/// Return value that fails the syscall (with the errno set by `bpf_set_retval`).
const REJECT: i32 = 0;

/// TCP `connect()` and connected UDP.
#[cgroup_sock_addr(connect4)]
pub fn connect4(mut ctx: SockAddrContext) -> i32 {
    translate(&mut ctx, false)
}

/// Unconnected UDP (`sendto`/`sendmsg` with an address), translated per datagram.
#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(mut ctx: SockAddrContext) -> i32 {
    translate(&mut ctx, true)
}

/// UDP replies: the source the application sees is the service it sent to.
#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(mut ctx: SockAddrContext) -> i32 {
    reverse(&mut ctx);
    PROCEED
}

/// A connected socket reports the service address it asked for, not the backend.
#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(mut ctx: SockAddrContext) -> i32 {
    reverse(&mut ctx);
    PROCEED
}

/// The context the kernel passed; the programs read it and write the address fields.
#[inline(always)]
fn sock_addr(ctx: &mut SockAddrContext) -> &mut bpf_sock_addr {
    // SAFETY: the kernel hands every sock_addr program a valid context for this call.
    unsafe { &mut *ctx.sock_addr }
}

/// The source address the kernel will use, where it is known at this hook: the one a
/// datagram names (`IP_PKTINFO`, sendmsg only), else the one the socket is bound to; 0 when
/// neither (the kernel picks it after routing).
#[inline(always)]
fn known_source(sa: &bpf_sock_addr, datagram: bool) -> u32 {
    if datagram && sa.msg_src_ip4 != 0 {
        return sa.msg_src_ip4;
    }
    // SAFETY: the kernel always sets `sk` for sock_addr programs (a PTR_TO_SOCKET the
    // verifier lets us read fields of).
    unsafe { (*sa.__bindgen_anon_1.sk).src_ip4 }
}

#[inline(always)]
fn translate(ctx: &mut SockAddrContext, datagram: bool) -> i32 {
    let raw = ctx.as_ptr();
    let sa = sock_addr(ctx);
    let proto = sa.protocol as u8;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return PROCEED;
    }
    let key = Frontend4Key {
        addr: sa.user_ip4,
        port: sa.user_port as u16,
        proto,
        scope: scopes::EXTERNAL,
    };
    let client = InNodeClient {
        // SAFETY: the context pointer is valid for this call, as the helper requires.
        netns_cookie: unsafe { bpf_get_netns_cookie(raw) },
        source: known_source(sa, datagram),
    };
    match select(&key, &client) {
        Verdict::NotAService => PROCEED,
        Verdict::Filtered => {
            debug!(
                ctx,
                "refused {:i}:{}: not in loadBalancerSourceRanges",
                u32::from_be(key.addr),
                u16::from_be(key.port)
            );
            // SAFETY: a helper taking a plain integer; makes the syscall fail with it.
            unsafe { bpf_set_retval(-EPERM) };
            REJECT
        }
        Verdict::NoBackend => {
            // Costs a global load and a branch unless the agent runs with --bpf-log.
            debug!(
                ctx,
                "refused {:i}:{}: no backend",
                u32::from_be(key.addr),
                u16::from_be(key.port)
            );
            // SAFETY: a helper taking a plain integer; makes the syscall fail with it.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            REJECT
        }
        Verdict::Backend(backend) => {
            // SAFETY: the context pointer is valid for this call, as the helper requires.
            let socket_cookie = unsafe { bpf_get_socket_cookie(raw) };
            let rev_key = RevNat4Key {
                socket_cookie,
                backend_addr: backend.addr,
                backend_port: backend.port,
                pad: 0,
            };
            let rev = RevNat4Value {
                service_addr: key.addr,
                service_port: key.port,
                pad: 0,
            };
            // LRU map: when full the oldest socket's entry goes; only its reported peer suffers.
            let _ = LB4_REVNAT.insert(rev_key, rev, 0);
            sa.user_ip4 = backend.addr;
            sa.user_port = backend.port as u32;
            debug!(
                ctx,
                "{:i}:{} -> {:i}:{}",
                u32::from_be(key.addr),
                u16::from_be(key.port),
                u32::from_be(backend.addr),
                u16::from_be(backend.port)
            );
            PROCEED
        }
    }
}

#[inline(always)]
fn reverse(ctx: &mut SockAddrContext) {
    let raw = ctx.as_ptr();
    let sa = sock_addr(ctx);
    // SAFETY: the context pointer is valid for this call, as the helper requires.
    let socket_cookie = unsafe { bpf_get_socket_cookie(raw) };
    let key = RevNat4Key {
        socket_cookie,
        backend_addr: sa.user_ip4,
        backend_port: sa.user_port as u16,
        pad: 0,
    };
    // SAFETY: copied out at once.
    if let Some(rev) = unsafe { LB4_REVNAT.get(key) }.copied() {
        sa.user_ip4 = rev.service_addr;
        sa.user_port = rev.service_port as u32;
    }
}
