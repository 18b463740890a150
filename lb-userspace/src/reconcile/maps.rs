//! The service maps as the reconciler sees them: the [`ServiceMaps`] trait (the BPF maps or
//! the in-memory ones of the tests), what they hold in the model's terms (frontends and
//! backends of either family), what that means, and the conversions between each family's
//! map keys and values and the model's frontends and backends.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::{
    Addr4, Addr6, Backend as MapBackend, FrontendKey, FrontendValue, MaglevTable, MapAddr, SlotKey,
    SlotValue, SourceRangeKey, frontend_flags, map_names,
};

use crate::{
    cidr::Cidr,
    model::{Backend, Family, Frontend, FrontendKind, Protocol, Scope},
};

/// Writes and reads of the service maps. Frontends, backends and source ranges go to the
/// maps of their family (`LB4_*`, `LB6_*`); slots and Maglev tables serve both, and service
/// and backend ids are one space over both families.
pub trait ServiceMaps {
    fn put_frontend(&mut self, frontend: Frontend, value: FrontendValue) -> Result<(), MapError>;
    fn remove_frontend(&mut self, frontend: &Frontend) -> Result<(), MapError>;
    fn put_slot(&mut self, key: SlotKey, value: SlotValue) -> Result<(), MapError>;
    fn remove_slot(&mut self, key: &SlotKey) -> Result<(), MapError>;
    fn put_backend(&mut self, id: u32, backend: BackendEntry) -> Result<(), MapError>;
    /// Removes backend `id` from the backends map of `family`.
    fn remove_backend(&mut self, id: u32, family: Family) -> Result<(), MapError>;
    fn put_maglev(&mut self, service_id: u32, table: &MaglevTable) -> Result<(), MapError>;
    fn remove_maglev(&mut self, service_id: u32) -> Result<(), MapError>;
    /// An allowed source range of a LoadBalancer frontend's service id (in the trie of the
    /// range's family).
    fn put_source_range(&mut self, service_id: u32, range: Cidr) -> Result<(), MapError>;
    fn remove_source_range(&mut self, service_id: u32, range: Cidr) -> Result<(), MapError>;
    /// Everything the maps hold now (for adopting maps a previous agent left pinned).
    fn dump(&self) -> Result<MapContents, MapError>;

    /// The Maglev table of these backends (`ids` theirs, in slot order) for `service_id`.
    fn put_maglev_of(
        &mut self,
        service_id: u32,
        picks: &[Backend],
        ids: &[u32],
    ) -> Result<(), MapError> {
        self.put_maglev(service_id, &super::maglev::table_for(picks, ids))
    }

    // Many entries of one map at once (a large sync, see [`super::batch`]): written in order,
    // stopping at the first that fails, which the error names; every entry before it is
    // written. One entry at a time unless the maps have something better (the BPF maps' batch
    // operations).

    fn put_frontends(&mut self, entries: &[(Frontend, FrontendValue)]) -> Result<(), BatchError> {
        each(entries, |(frontend, value)| {
            self.put_frontend(*frontend, *value)
        })
    }
    fn remove_frontends(&mut self, frontends: &[Frontend]) -> Result<(), BatchError> {
        each(frontends, |frontend| self.remove_frontend(frontend))
    }
    fn put_slots(&mut self, entries: &[(SlotKey, SlotValue)]) -> Result<(), BatchError> {
        each(entries, |(key, value)| self.put_slot(*key, *value))
    }
    fn remove_slots(&mut self, keys: &[SlotKey]) -> Result<(), BatchError> {
        each(keys, |key| self.remove_slot(key))
    }
    fn put_backends(&mut self, entries: &[(u32, BackendEntry)]) -> Result<(), BatchError> {
        each(entries, |(id, entry)| self.put_backend(*id, *entry))
    }
    fn remove_backends(&mut self, ids: &[(u32, Family)]) -> Result<(), BatchError> {
        each(ids, |(id, family)| self.remove_backend(*id, *family))
    }
}

/// The entry of a batch that failed (its index in the batch), and why; the ones before it
/// are written, the ones after it not tried.
#[derive(Debug, thiserror::Error)]
#[error("entry {index} of {count}: {error}")]
pub struct BatchError {
    pub index: usize,
    pub count: usize,
    pub error: MapError,
}

/// `write` on each of `entries` in order, up to the first failure.
fn each<T>(
    entries: &[T],
    mut write: impl FnMut(&T) -> Result<(), MapError>,
) -> Result<(), BatchError> {
    for (index, entry) in entries.iter().enumerate() {
        write(entry).map_err(|error| BatchError {
            index,
            count: entries.len(),
            error,
        })?;
    }
    Ok(())
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

/// A backends map value in the model's terms: the backend (either family), its
/// `backend_states::*` and `backend_flags::*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendEntry {
    pub backend: Backend,
    pub state: u8,
    pub flags: u8,
}

/// The contents of the service maps of both families, in the model's terms.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub frontends: BTreeMap<Frontend, FrontendValue>,
    pub slots: BTreeMap<SlotKey, SlotValue>,
    pub backends: BTreeMap<u32, BackendEntry>,
    /// Service ids that have a Maglev table.
    pub maglev: BTreeSet<u32>,
    /// Allowed source ranges, by service id (host bits cleared).
    pub source_ranges: BTreeSet<(u32, Cidr)>,
    /// Frontend entries of a protocol or scope this agent never writes (left alone).
    pub unknown_frontends: usize,
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
            .map(|(key, value)| {
                let view = FrontendView {
                    kind: FrontendKind::from_number(value.kind),
                    service_id: value.service_id,
                    backends: self.live_backends(value).map(|(_, b)| b.backend).collect(),
                    affinity_timeout_secs: (value.flags & frontend_flags::AFFINITY != 0)
                        .then_some(value.affinity_timeout_secs),
                    flags: value.flags,
                };
                (*key, view)
            })
            .collect()
    }

    /// The backends the live generation of a frontend entry names, with their ids.
    pub fn live_backends<'a>(
        &'a self,
        value: &'a FrontendValue,
    ) -> impl Iterator<Item = (u32, &'a BackendEntry)> {
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

/// A map address type as the model sees it: which family it is, and the conversions to and
/// from the standard library's addresses.
pub trait FamilyAddr: MapAddr {
    const MODEL_FAMILY: Family;
    /// The map address of `ip`, `None` for an address of the other family.
    fn of_ip(ip: IpAddr) -> Option<Self>;
    fn ip(self) -> IpAddr;
    /// The map names of the family's frontends, backends and source ranges (for errors).
    const FRONTENDS: &'static str;
    const BACKENDS: &'static str;
    const SOURCE_RANGES: &'static str;
}

impl FamilyAddr for Addr4 {
    const MODEL_FAMILY: Family = Family::V4;
    const FRONTENDS: &'static str = map_names::FRONTENDS_V4;
    const BACKENDS: &'static str = map_names::BACKENDS_V4;
    const SOURCE_RANGES: &'static str = map_names::SOURCE_RANGES_V4;

    fn of_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(ip) => Some(Self::from_ip(ip)),
            IpAddr::V6(_) => None,
        }
    }

    fn ip(self) -> IpAddr {
        IpAddr::V4(self.to_ip())
    }
}

impl FamilyAddr for Addr6 {
    const MODEL_FAMILY: Family = Family::V6;
    const FRONTENDS: &'static str = map_names::FRONTENDS_V6;
    const BACKENDS: &'static str = map_names::BACKENDS_V6;
    const SOURCE_RANGES: &'static str = map_names::SOURCE_RANGES_V6;

    fn of_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V6(ip) => Some(Self::from_ip(ip)),
            IpAddr::V4(_) => None,
        }
    }

    fn ip(self) -> IpAddr {
        IpAddr::V6(self.to_ip())
    }
}

/// The map names of `family`'s frontends, backends and source ranges.
pub fn family_map_names(family: Family) -> (&'static str, &'static str, &'static str) {
    match family {
        Family::V4 => (Addr4::FRONTENDS, Addr4::BACKENDS, Addr4::SOURCE_RANGES),
        Family::V6 => (Addr6::FRONTENDS, Addr6::BACKENDS, Addr6::SOURCE_RANGES),
    }
}

/// The map key of a frontend of family `A` (`None` for a frontend of the other family).
pub fn frontend_key<A: FamilyAddr>(frontend: &Frontend) -> Option<FrontendKey<A>> {
    Some(FrontendKey {
        addr: A::of_ip(frontend.ip)?,
        port: lb_common::port_to_map(frontend.port),
        proto: frontend.protocol.number(),
        scope: frontend.scope.number(),
    })
}

/// The frontend of a map key, if its protocol and scope are ones we write.
pub fn frontend_of<A: FamilyAddr>(key: &FrontendKey<A>) -> Option<Frontend> {
    Some(Frontend {
        ip: key.addr.ip(),
        port: lb_common::port_from_map(key.port),
        protocol: Protocol::from_number(key.proto)?,
        scope: Scope::from_number(key.scope)?,
    })
}

/// The backend entry a map value holds.
pub fn backend_of<A: FamilyAddr>(value: &MapBackend<A>) -> BackendEntry {
    BackendEntry {
        backend: Backend {
            ip: value.addr.ip(),
            port: lb_common::port_from_map(value.port),
        },
        state: value.state,
        flags: value.flags,
    }
}

/// The map value of a backend entry of family `A` (`None` for one of the other family).
pub fn backend_value<A: FamilyAddr>(entry: &BackendEntry) -> Option<MapBackend<A>> {
    Some(MapBackend {
        addr: A::of_ip(entry.backend.ip)?,
        port: lb_common::port_to_map(entry.backend.port),
        state: entry.state,
        flags: entry.flags,
    })
}

/// The LPM trie key of an allowed source range of family `A` (`None` for a range of the
/// other family).
pub fn source_range_key<A: FamilyAddr>(
    service_id: u32,
    range: Cidr,
) -> Option<aya::maps::lpm_trie::Key<SourceRangeKey<A>>>
where
    SourceRangeKey<A>: aya::Pod,
{
    let network = range.network();
    Some(aya::maps::lpm_trie::Key::new(
        lb_common::source_range::SERVICE_ID_BITS + network.prefix as u32,
        SourceRangeKey::new(service_id, A::of_ip(network.addr)?),
    ))
}

/// The service id and range of an LPM trie key the agent wrote.
pub fn source_range_of<A: FamilyAddr>(
    key: &aya::maps::lpm_trie::Key<SourceRangeKey<A>>,
) -> (u32, Cidr)
where
    SourceRangeKey<A>: aya::Pod,
{
    let data = key.data();
    let prefix = key
        .prefix_len()
        .saturating_sub(lb_common::source_range::SERVICE_ID_BITS)
        .min(A::BITS) as u8;
    (data.service_id(), Cidr::new(data.addr.ip(), prefix))
}
