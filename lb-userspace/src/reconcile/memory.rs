//! Service maps held in memory, with the same capacity limits as the BPF maps: the reconciler's
//! model tests run against them, and a full map fails the same way.
use std::collections::BTreeMap;

use lb_common::{
    Backend4, Frontend4Key, FrontendValue, MaglevTable, SlotKey, SlotValue, map_names,
};

use super::{MapContents, MapError, ServiceMaps};
use crate::cidr::Cidr;

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
    if !map.contains_key(&key) && map.len() >= max {
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
    fn put_frontend(&mut self, key: Frontend4Key, value: FrontendValue) -> Result<(), MapError> {
        let max = self.max_services;
        put(
            &mut self.contents.frontends,
            max,
            map_names::FRONTENDS_V4,
            key,
            value,
        )
    }

    fn remove_frontend(&mut self, key: &Frontend4Key) -> Result<(), MapError> {
        remove(&mut self.contents.frontends, map_names::FRONTENDS_V4, key)
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

    fn put_backend(&mut self, id: u32, backend: Backend4) -> Result<(), MapError> {
        let max = self.max_backends;
        put(
            &mut self.contents.backends,
            max,
            map_names::BACKENDS_V4,
            id,
            backend,
        )
    }

    fn remove_backend(&mut self, id: u32) -> Result<(), MapError> {
        remove(&mut self.contents.backends, map_names::BACKENDS_V4, &id)
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
        if !self.contents.source_ranges.contains(&key)
            && self.contents.source_ranges.len() >= self.max_source_ranges
        {
            return Err(full(map_names::SOURCE_RANGES_V4));
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
            Err(missing(map_names::SOURCE_RANGES_V4))
        }
    }

    fn dump(&self) -> Result<MapContents, MapError> {
        Ok(self.contents.clone())
    }
}
