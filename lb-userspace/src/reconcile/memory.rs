//! Service maps held in memory, with the same capacity limits as the BPF maps: the reconciler's
//! model tests run against them, and a full map fails the same way.
use lb_common::{Backend4, Service4Key, Service4Value, Slot4Key, Slot4Value};

use super::{MapContents, MapError, ServiceMaps};

#[derive(Clone, Debug)]
pub struct MemoryMaps {
    pub contents: MapContents,
    pub max_services: usize,
    pub max_slots: usize,
    pub max_backends: usize,
}

impl Default for MemoryMaps {
    fn default() -> Self {
        Self {
            contents: MapContents::default(),
            max_services: lb_common::limits::MAX_SERVICES as usize,
            max_slots: lb_common::limits::MAX_SLOTS as usize,
            max_backends: lb_common::limits::MAX_BACKENDS as usize,
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

impl ServiceMaps for MemoryMaps {
    fn put_service(&mut self, key: Service4Key, value: Service4Value) -> Result<(), MapError> {
        let map = &mut self.contents.services;
        if !map.contains_key(&key) && map.len() >= self.max_services {
            return Err(full(lb_common::map_names::SERVICES_V4));
        }
        map.insert(key, value);
        Ok(())
    }

    fn remove_service(&mut self, key: &Service4Key) -> Result<(), MapError> {
        self.contents
            .services
            .remove(key)
            .map(drop)
            .ok_or_else(|| missing(lb_common::map_names::SERVICES_V4))
    }

    fn put_slot(&mut self, key: Slot4Key, value: Slot4Value) -> Result<(), MapError> {
        let map = &mut self.contents.slots;
        if !map.contains_key(&key) && map.len() >= self.max_slots {
            return Err(full(lb_common::map_names::SLOTS_V4));
        }
        map.insert(key, value);
        Ok(())
    }

    fn remove_slot(&mut self, key: &Slot4Key) -> Result<(), MapError> {
        self.contents
            .slots
            .remove(key)
            .map(drop)
            .ok_or_else(|| missing(lb_common::map_names::SLOTS_V4))
    }

    fn put_backend(&mut self, id: u32, backend: Backend4) -> Result<(), MapError> {
        let map = &mut self.contents.backends;
        if !map.contains_key(&id) && map.len() >= self.max_backends {
            return Err(full(lb_common::map_names::BACKENDS_V4));
        }
        map.insert(id, backend);
        Ok(())
    }

    fn remove_backend(&mut self, id: u32) -> Result<(), MapError> {
        self.contents
            .backends
            .remove(&id)
            .map(drop)
            .ok_or_else(|| missing(lb_common::map_names::BACKENDS_V4))
    }

    fn dump(&self) -> Result<MapContents, MapError> {
        Ok(self.contents.clone())
    }
}
