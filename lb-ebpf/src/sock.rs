//! cgroup socket hooks: translation at connect/send time, reverse translation of the
//! addresses a socket reports (recvmsg source, getpeername), and forgetting a socket when it
//! is released. What a socket reached is kept per socket (`LB4_REVNAT_V2`, see
//! `lb_common::sock`): a connected socket has one service, an unconnected UDP socket up to
//! `SOCK_SERVICES`, each on one backend for as long as that backend exists.
use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use aya_log_ebpf::debug;
use lb_common::{
    Backend4, ECONNREFUSED, EPERM, Frontend4Key, IPPROTO_TCP, IPPROTO_UDP, SOCK_SERVICES,
    Sock4Value, SockService, scopes,
};

use crate::{
    family::V4,
    lookup::{InNodeClient, Verdict, select},
    maps::LB4_REVNAT_V2,
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

/// Unconnected UDP (`sendto`/`sendmsg` with an address): every datagram of one socket to one
/// service goes to the backend its first one went to, while that backend exists.
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

/// A released socket's entry goes with it, so the map holds live sockets only.
#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the context pointer is valid for this call, as the helper requires.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // Absent for every socket that never reached a service; nothing to do then.
    let _ = LB4_REVNAT_V2.remove(&cookie);
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

/// The backend this socket's earlier datagrams to `key` went to.
#[inline(always)]
fn remembered(socket_cookie: u64, key: &Frontend4Key) -> Option<u32> {
    // SAFETY: copied out at once; a racing update of the same socket only loses stickiness.
    let sock = unsafe { LB4_REVNAT_V2.get(&socket_cookie) }.copied()?;
    for entry in sock.services.iter() {
        if entry.service_addr == key.addr && entry.service_port == key.port {
            return Some(entry.backend_id);
        }
    }
    None
}

/// Records that the socket reached `key` through `backend`: a connected socket has this one
/// service from now on; a datagram's service takes its earlier entry, a free one, or the
/// oldest.
#[inline(always)]
fn remember(socket_cookie: u64, key: &Frontend4Key, id: u32, backend: &Backend4, datagram: bool) {
    let entry = SockService {
        service_addr: key.addr,
        service_port: key.port,
        backend_port: backend.port,
        backend_addr: backend.addr,
        backend_id: id,
    };
    if datagram && let Some(sock) = LB4_REVNAT_V2.get_ptr_mut(&socket_cookie) {
        // SAFETY: a pointer from the lookup above, valid for this run; the value is plain
        // integers, so a racing update of the same socket only loses one entry.
        let sock = unsafe { &mut *sock };
        let mut slot = SOCK_SERVICES;
        for (index, used) in sock.services.iter().enumerate() {
            if used.service_addr == key.addr && used.service_port == key.port {
                slot = index;
                break;
            }
            if used.service_addr == 0 && slot == SOCK_SERVICES {
                slot = index;
            }
        }
        if slot == SOCK_SERVICES {
            slot = sock.next as usize % SOCK_SERVICES;
            sock.next = sock.next.wrapping_add(1);
        }
        if let Some(target) = sock.services.get_mut(slot) {
            *target = entry;
        }
        return;
    }
    let mut sock = Sock4Value::default();
    sock.services[0] = entry;
    sock.next = 1;
    // LRU map: when full the least recently used socket's entry goes; only its reported
    // peer and stickiness suffer.
    let _ = LB4_REVNAT_V2.insert(&socket_cookie, &sock, 0);
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
    // Asked only for a service's frontend: other connects and sends pay nothing for it.
    // SAFETY: the context pointer is valid for this call, as the helper requires.
    let socket_cookie = || unsafe { bpf_get_socket_cookie(raw) };
    let preferred = || {
        if datagram {
            remembered(socket_cookie(), &key)
        } else {
            None
        }
    };
    match select::<V4>(&key, &client, preferred) {
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
        Verdict::Backend { id, backend, kept } => {
            if !kept {
                remember(socket_cookie(), &key, id, &backend, datagram);
            }
            let sa = sock_addr(ctx);
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
    // SAFETY: the context pointer is valid for this call, as the helper requires.
    let socket_cookie = unsafe { bpf_get_socket_cookie(raw) };
    // SAFETY: copied out at once.
    let Some(sock) = (unsafe { LB4_REVNAT_V2.get(&socket_cookie) }).copied() else {
        return;
    };
    let sa = sock_addr(ctx);
    for entry in sock.services.iter() {
        if entry.service_addr != 0
            && entry.backend_addr == sa.user_ip4
            && entry.backend_port == sa.user_port as u16
        {
            sa.user_ip4 = entry.service_addr;
            sa.user_port = entry.service_port as u32;
            return;
        }
    }
}
