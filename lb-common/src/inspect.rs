//! For operators: the names of the programmed frontends (`lb-agent list` without a running
//! agent) and per-service counters (read at `/metrics` scrape time).

use crate::{
    addr::{Addr4, Addr6},
    service::FrontendKey,
};

/// Key of the names map of family `A`: a frontend as programmed. The programs never read
/// this map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NameKey<A> {
    pub frontend: FrontendKey<A>,
}

pub type NameKey4 = NameKey<Addr4>;
pub type NameKey6 = NameKey<Addr6>;

/// Value of the names map: `namespace/name:port` (UTF-8, cut at 124 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceName {
    pub len: u8,
    pub pad: [u8; 3],
    pub text: [u8; 124],
}

impl ServiceName {
    pub fn new(text: &str) -> Self {
        let mut end = text.len().min(124);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0u8; 124];
        bytes[..end].copy_from_slice(&text.as_bytes()[..end]);
        Self {
            len: end as u8,
            pad: [0; 3],
            text: bytes,
        }
    }

    pub fn as_str(&self) -> &str {
        let len = (self.len as usize).min(self.text.len());
        core::str::from_utf8(&self.text[..len]).unwrap_or("?")
    }
}

/// Value of the per-CPU service statistics map (key: service id, `u32`). The agent creates
/// the entry with the service and removes it with the service; the programs only count.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceStats {
    /// Connections, unconnected UDP datagrams and new XDP flows sent to a backend.
    pub forwarded: u64,
    /// Connections refused, and XDP packets dropped or left to the stack, because the
    /// service had no backend, or (a LoadBalancer IP) the client is outside its
    /// `loadBalancerSourceRanges`.
    pub refused: u64,
}

const _: () = {
    assert!(core::mem::size_of::<NameKey4>() == 8);
    assert!(core::mem::size_of::<NameKey6>() == 20);
    assert!(core::mem::size_of::<ServiceName>() == 128);
    assert!(core::mem::size_of::<ServiceStats>() == 16);
};
