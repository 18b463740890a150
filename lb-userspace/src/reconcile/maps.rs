//! The service maps as the reconciler sees them: the [`ServiceMaps`] trait (the BPF maps or
//! the in-memory ones of the tests), what they hold, what that means, and the conversions
//! between map keys and the model's frontends and backends.
use std::collections::{BTreeMap, BTreeSet};

use lb_common::{
    Backend4, Frontend4Key, FrontendValue, MaglevTable, SlotKey, SlotValue, frontend_flags,
};

use crate::{
    cidr::Cidr,
    model::{Backend, Frontend, FrontendKind, Protocol, Scope},
};

/// Writes and reads of the service maps.
pub trait ServiceMaps {
    fn put_frontend(&mut self, key: Frontend4Key, value: FrontendValue) -> Result<(), MapError>;
    fn remove_frontend(&mut self, key: &Frontend4Key) -> Result<(), MapError>;
    fn put_slot(&mut self, key: SlotKey, value: SlotValue) -> Result<(), MapError>;
    fn remove_slot(&mut self, key: &SlotKey) -> Result<(), MapError>;
    fn put_backend(&mut self, id: u32, backend: Backend4) -> Result<(), MapError>;
    fn remove_backend(&mut self, id: u32) -> Result<(), MapError>;
    fn put_maglev(&mut self, service_id: u32, table: &MaglevTable) -> Result<(), MapError>;
    fn remove_maglev(&mut self, service_id: u32) -> Result<(), MapError>;
    /// An allowed source range of a LoadBalancer frontend's service id.
    fn put_source_range(&mut self, service_id: u32, range: Cidr) -> Result<(), MapError>;
    fn remove_source_range(&mut self, service_id: u32, range: Cidr) -> Result<(), MapError>;
    /// Everything the maps hold now (for adopting maps a previous agent left pinned).
    fn dump(&self) -> Result<MapContents, MapError>;
}

/// A failed map operation.
#[derive(Debug, thiserror::Error)]
#[error("{operation} in map {map}: {cause}")]
pub struct MapError {
    pub map: &'static str,
    pub operation: &'static str,
    pub cause: String,
}

impl MapError {
    /// No id left for a new set (`what` = "service") or backend: every id of `space` is in use.
    pub fn ids_exhausted(map: &'static str, what: &str, space: &super::IdSpace) -> Self {
        Self {
            map,
            operation: "allocating an id",
            cause: format!(
                "every {what} id is in use ({} of {}); this one is refused until others go",
                space.in_use(),
                space.size()
            ),
        }
    }
}

/// The raw contents of the service maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub frontends: BTreeMap<Frontend4Key, FrontendValue>,
    pub slots: BTreeMap<SlotKey, SlotValue>,
    pub backends: BTreeMap<u32, Backend4>,
    /// Service ids that have a Maglev table.
    pub maglev: BTreeSet<u32>,
    /// Allowed source ranges, by service id (host bits cleared).
    pub source_ranges: BTreeSet<(u32, Cidr)>,
}

/// What a programmed frontend means, without ids (see [`MapContents::view`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendView {
    pub kind: Option<FrontendKind>,
    pub service_id: u32,
    /// The backends new connections may pick.
    pub backends: BTreeSet<Backend>,
    pub affinity_timeout_secs: Option<u32>,
    pub flags: u8,
}

impl MapContents {
    /// What the maps mean: frontend → its kind, backends and affinity. Two map contents that
    /// serve the same traffic have equal views up to service ids.
    pub fn view(&self) -> BTreeMap<Frontend, FrontendView> {
        self.frontends
            .iter()
            .filter_map(|(key, value)| {
                let view = FrontendView {
                    kind: FrontendKind::from_number(value.kind),
                    service_id: value.service_id,
                    backends: self
                        .live_backends(value)
                        .map(|(_, b)| backend_of(b))
                        .collect(),
                    affinity_timeout_secs: (value.flags & frontend_flags::AFFINITY != 0)
                        .then_some(value.affinity_timeout_secs),
                    flags: value.flags,
                };
                Some((frontend_of(key)?, view))
            })
            .collect()
    }

    /// The backends the live generation of a frontend entry names, with their ids.
    pub fn live_backends<'a>(
        &'a self,
        value: &'a FrontendValue,
    ) -> impl Iterator<Item = (u32, &'a Backend4)> {
        (0..value.count).filter_map(move |index| {
            let slot = SlotKey {
                service_id: value.service_id,
                index,
                generation: value.generation,
                pad: 0,
            };
            let id = self.slots.get(&slot)?.backend_id;
            Some((id, self.backends.get(&id)?))
        })
    }
}

/// The IPv4 address of a model address. Interim, until the IPv6 maps exist: the reconciler
/// refuses IPv6 frontends before it computes a key.
pub(super) fn ipv4_of(ip: std::net::IpAddr) -> std::net::Ipv4Addr {
    match ip {
        std::net::IpAddr::V4(ip) => ip,
        std::net::IpAddr::V6(ip) => ip.to_ipv4_mapped().unwrap_or(std::net::Ipv4Addr::BROADCAST),
    }
}

/// The map key of a frontend.
pub fn frontend_key(frontend: &Frontend) -> Frontend4Key {
    Frontend4Key {
        addr: lb_common::addr_to_map(u32::from(ipv4_of(frontend.ip))),
        port: lb_common::port_to_map(frontend.port),
        proto: frontend.protocol.number(),
        scope: frontend.scope.number(),
    }
}

/// The frontend of a map key, if its protocol and scope are ones we write.
pub fn frontend_of(key: &Frontend4Key) -> Option<Frontend> {
    Some(Frontend {
        ip: std::net::Ipv4Addr::from(lb_common::addr_from_map(key.addr)).into(),
        port: lb_common::port_from_map(key.port),
        protocol: Protocol::from_number(key.proto)?,
        scope: Scope::from_number(key.scope)?,
    })
}

/// The backend a map value names.
pub fn backend_of(value: &Backend4) -> Backend {
    Backend {
        ip: std::net::Ipv4Addr::from(lb_common::addr_from_map(value.addr)).into(),
        port: lb_common::port_from_map(value.port),
    }
}

/// The LPM trie key of an allowed source range.
pub fn source_range_key(
    service_id: u32,
    range: Cidr,
) -> aya::maps::lpm_trie::Key<lb_common::SourceRange4Key> {
    let network = range.network();
    aya::maps::lpm_trie::Key::new(
        lb_common::source_range::SERVICE_ID_BITS + network.prefix as u32,
        lb_common::SourceRange4Key::new(
            service_id,
            lb_common::addr_to_map(u32::from(ipv4_of(network.addr))),
        ),
    )
}

/// The service id and range of an LPM trie key the agent wrote.
pub fn source_range_of(key: &aya::maps::lpm_trie::Key<lb_common::SourceRange4Key>) -> (u32, Cidr) {
    let data = key.data();
    let prefix = key
        .prefix_len()
        .saturating_sub(lb_common::source_range::SERVICE_ID_BITS)
        .min(32) as u8;
    (
        data.service_id(),
        Cidr::new(
            std::net::Ipv4Addr::from(lb_common::addr_from_map(data.addr)).into(),
            prefix,
        ),
    )
}
