//! Service maps held in memory, with the same capacity limits as the BPF maps (each family's
//! frontends, backends and source ranges apart, as each family has its own map): the
//! reconciler's model tests run against them, and a full map fails the same way.
use std::collections::BTreeMap;

use lb_common::{FrontendValue, MaglevTable, SlotKey, SlotValue, map_names};

use super::{BackendEntry, MapContents, MapError, ServiceMaps, family_map_names};
use crate::{
    cidr::Cidr,
    model::{Family, Frontend},
};

#[derive(Clone, Debug)]
pub struct MemoryMaps {
    pub contents: MapContents,
    /// The Maglev tables themselves (`contents.maglev` has their ids).
    pub tables: BTreeMap<u32, Box<MaglevTable>>,
    pub max_services: usize,
    pub max_slots: usize,
    pub max_backends: usize,
    pub max_tables: usize,
    pub max_source_ranges: usize,
}

impl Default for MemoryMaps {
    fn default() -> Self {
        Self {
            contents: MapContents::default(),
            tables: BTreeMap::new(),
            max_services: lb_common::limits::MAX_SERVICES as usize,
            max_slots: lb_common::limits::MAX_SLOTS as usize,
            max_backends: lb_common::limits::MAX_BACKENDS as usize,
            max_tables: lb_common::limits::MAX_MAGLEV_TABLES as usize,
            max_source_ranges: lb_common::limits::MAX_SOURCE_RANGES as usize,
        }
    }
}

fn full(map: &'static str) -> MapError {
    MapError {
        map,
        operation: "insert",
        cause: "map is full (E2BIG)".into(),
    }
}

fn missing(map: &'static str) -> MapError {
    MapError {
        map,
        operation: "delete",
        cause: "no such entry (ENOENT)".into(),
    }
}

/// Inserts into a map of at most `max` entries, failing like a full BPF hash map.
fn put<K: Ord, V>(
    map: &mut BTreeMap<K, V>,
    max: usize,
    name: &'static str,
    key: K,
    value: V,
) -> Result<(), MapError> {
    put_counted(map, max, name, key, value, |_, _| true)
}

/// Inserts into the entries of `map` that `counted` says share one BPF map of at most `max`
/// entries (one family's, when `map` holds both).
fn put_counted<K: Ord, V>(
    map: &mut BTreeMap<K, V>,
    max: usize,
    name: &'static str,
    key: K,
    value: V,
    counted: impl Fn(&K, &V) -> bool,
) -> Result<(), MapError> {
    // Counted only when the whole map is that full: cheap while far from the limit.
    if !map.contains_key(&key)
        && map.len() >= max
        && map.iter().filter(|(k, v)| counted(k, v)).count() >= max
    {
        return Err(full(name));
    }
    map.insert(key, value);
    Ok(())
}

fn remove<K: Ord, V>(
    map: &mut BTreeMap<K, V>,
    name: &'static str,
    key: &K,
) -> Result<(), MapError> {
    map.remove(key).map(drop).ok_or_else(|| missing(name))
}

impl ServiceMaps for MemoryMaps {
    fn put_frontend(&mut self, frontend: Frontend, value: FrontendValue) -> Result<(), MapError> {
        let max = self.max_services;
        let family = frontend.family();
        put_counted(
            &mut self.contents.frontends,
            max,
            family_map_names(family).0,
            frontend,
            value,
            |f, _| f.family() == family,
        )
    }

    fn remove_frontend(&mut self, frontend: &Frontend) -> Result<(), MapError> {
        let name = family_map_names(frontend.family()).0;
        remove(&mut self.contents.frontends, name, frontend)
    }

    fn put_slot(&mut self, key: SlotKey, value: SlotValue) -> Result<(), MapError> {
        let max = self.max_slots;
        put(
            &mut self.contents.slots,
            max,
            map_names::SLOTS_V4,
            key,
            value,
        )
    }

    fn remove_slot(&mut self, key: &SlotKey) -> Result<(), MapError> {
        remove(&mut self.contents.slots, map_names::SLOTS_V4, key)
    }

    fn put_backend(&mut self, id: u32, backend: BackendEntry) -> Result<(), MapError> {
        let max = self.max_backends;
        let family = backend.backend.family();
        let name = family_map_names(family).1;
        // One id space over both families: an id is in one family's map at a time.
        if self
            .contents
            .backends
            .get(&id)
            .is_some_and(|other| other.backend.family() != family)
        {
            return Err(MapError {
                map: name,
                operation: "insert",
                cause: format!("backend id {id} is in the other family's map"),
            });
        }
        put_counted(
            &mut self.contents.backends,
            max,
            name,
            id,
            backend,
            |_, b| b.backend.family() == family,
        )
    }

    fn remove_backend(&mut self, id: u32, family: Family) -> Result<(), MapError> {
        let name = family_map_names(family).1;
        if self
            .contents
            .backends
            .get(&id)
            .is_some_and(|b| b.backend.family() != family)
        {
            return Err(missing(name));
        }
        remove(&mut self.contents.backends, name, &id)
    }

    fn put_maglev(&mut self, service_id: u32, table: &MaglevTable) -> Result<(), MapError> {
        let max = self.max_tables;
        put(
            &mut self.tables,
            max,
            map_names::MAGLEV_V4,
            service_id,
            Box::new(*table),
        )?;
        self.contents.maglev.insert(service_id);
        Ok(())
    }

    fn remove_maglev(&mut self, service_id: u32) -> Result<(), MapError> {
        self.contents.maglev.remove(&service_id);
        remove(&mut self.tables, map_names::MAGLEV_V4, &service_id)
    }

    fn put_source_range(&mut self, service_id: u32, range: Cidr) -> Result<(), MapError> {
        let key = (service_id, range.network());
        let family = range.family();
        let ranges = &self.contents.source_ranges;
        if !ranges.contains(&key)
            && ranges.len() >= self.max_source_ranges
            && ranges.iter().filter(|(_, r)| r.family() == family).count() >= self.max_source_ranges
        {
            return Err(full(family_map_names(family).2));
        }
        self.contents.source_ranges.insert(key);
        Ok(())
    }

    fn remove_source_range(&mut self, service_id: u32, range: Cidr) -> Result<(), MapError> {
        if self
            .contents
            .source_ranges
            .remove(&(service_id, range.network()))
        {
            Ok(())
        } else {
            Err(missing(family_map_names(range.family()).2))
        }
    }

    fn dump(&self) -> Result<MapContents, MapError> {
        Ok(self.contents.clone())
    }
}
