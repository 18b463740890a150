//! cgroup socket hooks: translation at connect/send time, reverse translation of the
//! addresses a socket reports (recvmsg source, getpeername), and forgetting a socket when it
//! is released. What a socket reached is kept per socket in its family's sockets map
//! (`LB4_REVNAT_V2`, `LB6_REVNAT_V1`, see `lb_common::sock`): a connected socket has one
//! service, an unconnected UDP socket up to `SOCK_SERVICES`, each on one backend for as long as
//! that backend exists.
//!
//! Written once for the three ways a socket names its peer ([`Peer`]): an `AF_INET` socket an
//! IPv4 address ([`Inet4`], the `*4` hooks), an `AF_INET6` socket an IPv6 address ([`Inet6`])
//! or an IPv4 address mapped into IPv6 (`::ffff:a.b.c.d`, [`Mapped4`]; the `*6` hooks tell the
//! two apart). A mapped address is an IPv4 service's: looked up in the IPv4 maps, remembered
//! in the IPv4 sockets map, written back as the mapped backend, and reported (getpeername,
//! recvmsg) as the mapped service. The kernel runs the IPv4 path for such a socket after
//! connect6 and, for an unconnected datagram to a mapped address, runs sendmsg4 itself
//! (`udpv6_sendmsg` hands it to `udp_sendmsg`), so sendmsg6 only sees IPv6 destinations.
use core::net::IpAddr;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{bpf_sock, bpf_sock_addr},
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use aya_log_ebpf::debug;
use lb_common::{
    Addr4, Addr6, Backend, ECONNREFUSED, EPERM, FrontendKey, IPPROTO_TCP, IPPROTO_UDP, MapAddr,
    SOCK_SERVICES, SockService, SockValue, scopes, v4_of_mapped,
};

use crate::{
    ctx_word,
    family::{Family, V4, V6},
    lookup::{InNodeClient, Verdict, select},
};

/// Return value that lets the syscall go on.
const PROCEED: i32 = 1;
/// Return value that fails the syscall (with the errno set by `bpf_set_retval`).
const REJECT: i32 = 0;
/// `AF_INET6`, as `bpf_sock.family` holds it.
const AF_INET6: u32 = 10;

/// TCP `connect()` and connected UDP.
#[cgroup_sock_addr(connect4)]
pub fn connect4(mut ctx: SockAddrContext) -> i32 {
    translate::<Inet4, false>(&mut ctx)
}

/// `connect4` for `AF_INET6` sockets, IPv4-mapped destinations included.
#[cgroup_sock_addr(connect6)]
pub fn connect6(mut ctx: SockAddrContext) -> i32 {
    if names_mapped(&mut ctx) {
        translate::<Mapped4, false>(&mut ctx)
    } else {
        translate::<Inet6, false>(&mut ctx)
    }
}

/// Unconnected UDP (`sendto`/`sendmsg` with an address): every datagram of one socket to one
/// service goes to the backend its first one went to, while that backend exists. Also runs
/// for an `AF_INET6` socket's datagrams to an IPv4-mapped address (see the module's note).
#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(mut ctx: SockAddrContext) -> i32 {
    translate::<Inet4, true>(&mut ctx)
}

/// `sendmsg4` for `AF_INET6` sockets.
#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(mut ctx: SockAddrContext) -> i32 {
    if names_mapped(&mut ctx) {
        translate::<Mapped4, true>(&mut ctx)
    } else {
        translate::<Inet6, true>(&mut ctx)
    }
}

/// UDP replies: the source the application sees is the service it sent to.
#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(mut ctx: SockAddrContext) -> i32 {
    reverse::<Inet4>(&mut ctx);
    PROCEED
}

/// `recvmsg4` for `AF_INET6` sockets: a reply from an IPv4 backend comes as its mapped
/// address, and shows the mapped service.
#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(mut ctx: SockAddrContext) -> i32 {
    if names_mapped(&mut ctx) {
        reverse::<Mapped4>(&mut ctx);
    } else {
        reverse::<Inet6>(&mut ctx);
    }
    PROCEED
}

/// A connected socket reports the service address it asked for, not the backend.
#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(mut ctx: SockAddrContext) -> i32 {
    reverse::<Inet4>(&mut ctx);
    PROCEED
}

/// `getpeername4` for `AF_INET6` sockets, in the form (mapped or not) the application used.
#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(mut ctx: SockAddrContext) -> i32 {
    if names_mapped(&mut ctx) {
        reverse::<Mapped4>(&mut ctx);
    } else {
        reverse::<Inet6>(&mut ctx);
    }
    PROCEED
}

/// A released socket's entries go with it, so the maps hold live sockets only. An `AF_INET6`
/// socket may have one in each family's map (IPv6 services, and IPv4 ones through mapped
/// addresses); an `AF_INET` socket only in the IPv4 one.
#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the context pointer is valid for this call, as the helper requires.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // Absent for every socket that never reached a service; nothing to do then.
    let _ = V4::sockets().remove(&cookie);
    // SAFETY: the kernel hands every cgroup sock program a valid context for this call.
    let family = unsafe { (*ctx.sock).family };
    if family == AF_INET6 {
        let _ = V6::sockets().remove(&cookie);
    }
    PROCEED
}

/// How a hook's context holds the peer address of family `Self::F` the application named,
/// and the source addresses that go with it.
trait Peer {
    type F: Family;

    /// The peer address (`user_ip4` / `user_ip6`), network byte order.
    fn peer(sa: &bpf_sock_addr) -> Addr<Self>;
    fn set_peer(sa: &mut bpf_sock_addr, addr: Addr<Self>);
    /// The source a datagram names (`IP_PKTINFO` / `IPV6_PKTINFO`); sendmsg hooks only (the
    /// verifier refuses the field to the others); 0 for none.
    fn datagram_source(sa: &bpf_sock_addr) -> Addr<Self>;
    /// The address the socket is bound to; 0 for none.
    fn bound_source(sk: &bpf_sock) -> Addr<Self>;
    /// For the debug log.
    fn shown(addr: Addr<Self>) -> IpAddr;
}

type Addr<P> = <<P as Peer>::F as Family>::Addr;

/// An `AF_INET` socket and an IPv4 address.
enum Inet4 {}
/// An `AF_INET6` socket and an IPv6 address.
enum Inet6 {}
/// An `AF_INET6` socket and an IPv4-mapped address (`::ffff:a.b.c.d`): the IPv4 family, in
/// the last word of the IPv6 fields (the others hold the mapped prefix and stay).
enum Mapped4 {}

impl Peer for Inet4 {
    type F = V4;

    #[inline(always)]
    fn peer(sa: &bpf_sock_addr) -> Addr4 {
        ctx_word::get(&sa.user_ip4)
    }
    #[inline(always)]
    fn set_peer(sa: &mut bpf_sock_addr, addr: Addr4) {
        ctx_word::set(&mut sa.user_ip4, addr);
    }
    #[inline(always)]
    fn datagram_source(sa: &bpf_sock_addr) -> Addr4 {
        ctx_word::get(&sa.msg_src_ip4)
    }
    #[inline(always)]
    fn bound_source(sk: &bpf_sock) -> Addr4 {
        ctx_word::get(&sk.src_ip4)
    }
    #[inline(always)]
    fn shown(addr: Addr4) -> IpAddr {
        IpAddr::V4(addr.to_ip())
    }
}

impl Peer for Inet6 {
    type F = V6;

    #[inline(always)]
    fn peer(sa: &bpf_sock_addr) -> Addr6 {
        ctx_word::get6(&sa.user_ip6)
    }
    #[inline(always)]
    fn set_peer(sa: &mut bpf_sock_addr, addr: Addr6) {
        ctx_word::set6(&mut sa.user_ip6, addr);
    }
    #[inline(always)]
    fn datagram_source(sa: &bpf_sock_addr) -> Addr6 {
        ctx_word::get6(&sa.msg_src_ip6)
    }
    #[inline(always)]
    fn bound_source(sk: &bpf_sock) -> Addr6 {
        ctx_word::get6(&sk.src_ip6)
    }
    #[inline(always)]
    fn shown(addr: Addr6) -> IpAddr {
        IpAddr::V6(addr.to_ip())
    }
}

impl Peer for Mapped4 {
    type F = V4;

    #[inline(always)]
    fn peer(sa: &bpf_sock_addr) -> Addr4 {
        ctx_word::get(&sa.user_ip6[3])
    }
    #[inline(always)]
    fn set_peer(sa: &mut bpf_sock_addr, addr: Addr4) {
        ctx_word::set(&mut sa.user_ip6[3], addr);
    }
    #[inline(always)]
    fn datagram_source(sa: &bpf_sock_addr) -> Addr4 {
        v4_of_mapped(&ctx_word::get6(&sa.msg_src_ip6)).unwrap_or(0)
    }
    /// The IPv4 part of a mapped address the socket is bound to; 0 for `::` (and for an
    /// IPv6 address, which cannot reach an IPv4 peer anyway).
    #[inline(always)]
    fn bound_source(sk: &bpf_sock) -> Addr4 {
        v4_of_mapped(&ctx_word::get6(&sk.src_ip6)).unwrap_or(0)
    }
    #[inline(always)]
    fn shown(addr: Addr4) -> IpAddr {
        IpAddr::V4(addr.to_ip())
    }
}

/// The context the kernel passed; the programs read it and write the address fields.
#[inline(always)]
fn sock_addr(ctx: &mut SockAddrContext) -> &mut bpf_sock_addr {
    // SAFETY: the kernel hands every sock_addr program a valid context for this call.
    unsafe { &mut *ctx.sock_addr }
}

/// Whether an `AF_INET6` socket's peer address is IPv4-mapped.
#[inline(always)]
fn names_mapped(ctx: &mut SockAddrContext) -> bool {
    v4_of_mapped(&Inet6::peer(sock_addr(ctx))).is_some()
}

/// The source address the kernel will use, where it is known at this hook: the one a
/// datagram names (sendmsg only), else the one the socket is bound to; 0 when neither (the
/// kernel picks it after routing).
#[inline(always)]
fn known_source<P: Peer, const DATAGRAM: bool>(sa: &bpf_sock_addr) -> Addr<P> {
    if DATAGRAM {
        let named = P::datagram_source(sa);
        if !named.is_zero() {
            return named;
        }
    }
    // SAFETY: the kernel always sets `sk` for sock_addr programs (a PTR_TO_SOCKET the
    // verifier lets us read fields of).
    P::bound_source(unsafe { &*sa.__bindgen_anon_1.sk })
}

/// The backend this socket's earlier datagrams to `key` went to.
#[inline(always)]
fn remembered<F: Family>(socket_cookie: u64, key: &FrontendKey<F::Addr>) -> Option<u32> {
    // SAFETY: read in place; a racing update of the same socket only loses stickiness.
    let sock = unsafe { F::sockets().get(&socket_cookie) }?;
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
fn remember<F: Family>(
    socket_cookie: u64,
    key: &FrontendKey<F::Addr>,
    id: u32,
    backend: &Backend<F::Addr>,
    datagram: bool,
) {
    let entry = SockService {
        service_addr: key.addr,
        service_port: key.port,
        backend_port: backend.port,
        backend_addr: backend.addr,
        backend_id: id,
    };
    if datagram && let Some(sock) = F::sockets().get_ptr_mut(&socket_cookie) {
        // SAFETY: a pointer from the lookup above, valid for this run; the value is plain
        // integers, so a racing update of the same socket only loses one entry.
        let sock = unsafe { &mut *sock };
        let mut slot = SOCK_SERVICES;
        for (index, used) in sock.services.iter().enumerate() {
            if used.service_addr == key.addr && used.service_port == key.port {
                slot = index;
                break;
            }
            if used.service_addr.is_zero() && slot == SOCK_SERVICES {
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
    let mut sock = SockValue::<F::Addr>::default();
    sock.services[0] = entry;
    sock.next = 1;
    // LRU map: when full the least recently used socket's entry goes; only its reported
    // peer and stickiness suffer.
    let _ = F::sockets().insert(&socket_cookie, &sock, 0);
}

/// Sends a connect (`DATAGRAM` false) or a datagram (true) to a service's backend, or fails
/// it (no backend, or a client the source ranges leave out); other addresses pass.
#[inline(always)]
fn translate<P: Peer, const DATAGRAM: bool>(ctx: &mut SockAddrContext) -> i32 {
    let raw = ctx.as_ptr();
    let sa = sock_addr(ctx);
    let proto = sa.protocol as u8;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return PROCEED;
    }
    let key = FrontendKey {
        addr: P::peer(sa),
        port: sa.user_port as u16,
        proto,
        scope: scopes::EXTERNAL,
    };
    let client = InNodeClient {
        // SAFETY: the context pointer is valid for this call, as the helper requires.
        netns_cookie: unsafe { bpf_get_netns_cookie(raw) },
        source: known_source::<P, DATAGRAM>(sa),
    };
    // Asked only for a service's frontend: other connects and sends pay nothing for it.
    // SAFETY: the context pointer is valid for this call, as the helper requires.
    let socket_cookie = || unsafe { bpf_get_socket_cookie(raw) };
    let preferred = || {
        if DATAGRAM {
            remembered::<P::F>(socket_cookie(), &key)
        } else {
            None
        }
    };
    match select::<P::F>(&key, &client, preferred) {
        Verdict::NotAService => PROCEED,
        Verdict::Filtered => {
            debug!(
                ctx,
                "refused {:i}:{}: not in loadBalancerSourceRanges",
                P::shown(key.addr),
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
                P::shown(key.addr),
                u16::from_be(key.port)
            );
            // SAFETY: a helper taking a plain integer; makes the syscall fail with it.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            REJECT
        }
        Verdict::Backend { id, backend, kept } => {
            if !kept {
                remember::<P::F>(socket_cookie(), &key, id, &backend, DATAGRAM);
            }
            let sa = sock_addr(ctx);
            P::set_peer(sa, backend.addr);
            sa.user_port = backend.port as u32;
            debug!(
                ctx,
                "{:i}:{} -> {:i}:{}",
                P::shown(key.addr),
                u16::from_be(key.port),
                P::shown(backend.addr),
                u16::from_be(backend.port)
            );
            PROCEED
        }
    }
}

/// Shows the service in place of the backend a socket reached it through.
#[inline(always)]
fn reverse<P: Peer>(ctx: &mut SockAddrContext) {
    let raw = ctx.as_ptr();
    // SAFETY: the context pointer is valid for this call, as the helper requires.
    let socket_cookie = unsafe { bpf_get_socket_cookie(raw) };
    // SAFETY: read in place; the entry is plain integers.
    let Some(sock) = (unsafe { P::F::sockets().get(&socket_cookie) }) else {
        return;
    };
    let sa = sock_addr(ctx);
    let (addr, port) = (P::peer(sa), sa.user_port as u16);
    for entry in sock.services.iter() {
        if !entry.service_addr.is_zero() && entry.backend_addr == addr && entry.backend_port == port
        {
            P::set_peer(sa, entry.service_addr);
            sa.user_port = entry.service_port as u32;
            return;
        }
    }
}
