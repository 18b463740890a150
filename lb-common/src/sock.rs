//! What the socket programs remember per socket (keyed by its cookie, deleted when the socket
//! is released): the services it reached and the backend each went to. A connected socket's
//! `getpeername` and its UDP replies (`recvmsg`) show the service address it asked for, not the
//! backend; an unconnected UDP socket keeps sending a service's datagrams to one backend while
//! that backend exists (as one 5-tuple stays on one backend through kube-proxy's conntrack).

/// How many services one socket remembers: a connected socket has one; an unconnected UDP
/// socket may send to several (a resolver to its name servers). A further one replaces the
/// oldest.
pub const SOCK_SERVICES: usize = 4;

use crate::addr::{Addr4, Addr6};

/// One service a socket reached, and where it went.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockService<A> {
    /// The service address and port the socket asked for, network byte order; address 0:
    /// an unused entry.
    pub service_addr: A,
    pub service_port: u16,
    /// The backend, network byte order.
    pub backend_port: u16,
    pub backend_addr: A,
    /// Its id in the backends map (while it exists there, the socket stays on it).
    pub backend_id: u32,
}

/// Value of the sockets map of family `A` (key: `bpf_get_socket_cookie`, `u64`;
/// `LB4_REVNAT_V2`, `LB6_REVNAT_V1`). An `AF_INET6` socket that reaches an IPv4 service
/// through an IPv4-mapped address has its entry in the IPv4 map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockValue<A> {
    pub services: [SockService<A>; SOCK_SERVICES],
    /// The entry the next service takes when every entry is used (round robin).
    pub next: u32,
    pub pad: u32,
}

pub type Sock4Value = SockValue<Addr4>;
pub type Sock6Value = SockValue<Addr6>;

const _: () = {
    assert!(core::mem::size_of::<SockService<Addr4>>() == 16);
    assert!(core::mem::size_of::<SockService<Addr6>>() == 40);
    assert!(core::mem::size_of::<Sock6Value>() == 40 * SOCK_SERVICES + 8);
    assert!(core::mem::size_of::<Sock4Value>() == 16 * SOCK_SERVICES + 8);
};
