//! Reverse translation for the socket programs: a connected socket's `getpeername` and its
//! UDP replies (`recvmsg`) show the service address it asked for, not the backend.

/// Key of the reverse-translation map: a socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNat4Key {
    /// `bpf_get_socket_cookie` of the client socket.
    pub socket_cookie: u64,
    /// Backend address and port, network byte order.
    pub backend_addr: u32,
    pub backend_port: u16,
    pub pad: u16,
}

/// Value of the reverse-translation map: the service address the client asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNat4Value {
    pub service_addr: u32,
    pub service_port: u16,
    pub pad: u16,
}

const _: () = {
    assert!(core::mem::size_of::<RevNat4Key>() == 16);
    assert!(core::mem::size_of::<RevNat4Value>() == 8);
};
