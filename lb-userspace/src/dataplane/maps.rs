//! The service maps in the kernel, behind the reconciler's [`ServiceMaps`] trait.
use std::path::Path;

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData},
};
use lb_common::{Backend4, Service4Key, Service4Value, Slot4Key, Slot4Value, map_names};

use crate::reconcile::{MapContents, MapError, ServiceMaps};

pub struct BpfServiceMaps {
    services: HashMap<MapData, Service4Key, Service4Value>,
    slots: HashMap<MapData, Slot4Key, Slot4Value>,
    backends: HashMap<MapData, u32, Backend4>,
}

impl BpfServiceMaps {
    /// Takes the maps out of a loaded object.
    pub fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        let mut take = |name| take_map(ebpf, name);
        Ok(Self {
            services: HashMap::try_from(take(map_names::SERVICES_V4)?)?,
            slots: HashMap::try_from(take(map_names::SLOTS_V4)?)?,
            backends: HashMap::try_from(take(map_names::BACKENDS_V4)?)?,
        })
    }

    /// Opens the maps pinned under `dir` (for `lb-agent list`, without a running agent).
    pub fn open_pinned(dir: &Path) -> anyhow::Result<Self> {
        let open = |name| open_pinned_hash(dir, name);
        Ok(Self {
            services: HashMap::try_from(open(map_names::SERVICES_V4)?)?,
            slots: HashMap::try_from(open(map_names::SLOTS_V4)?)?,
            backends: HashMap::try_from(open(map_names::BACKENDS_V4)?)?,
        })
    }
}

/// Takes map `name` out of a loaded object.
pub(crate) fn take_map(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
}

/// Opens the hash map pinned as `dir/name`.
pub(crate) fn open_pinned_hash(dir: &Path, name: &str) -> anyhow::Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    Ok(Map::HashMap(data))
}

/// A failed aya map operation as the reconcilers report it.
pub(crate) fn error(
    map: &'static str,
    operation: &'static str,
    cause: aya::maps::MapError,
) -> MapError {
    MapError {
        map,
        operation,
        cause: cause.to_string(),
    }
}

impl ServiceMaps for BpfServiceMaps {
    fn put_service(&mut self, key: Service4Key, value: Service4Value) -> Result<(), MapError> {
        self.services
            .insert(key, value, 0)
            .map_err(|e| error(map_names::SERVICES_V4, "insert", e))
    }

    fn remove_service(&mut self, key: &Service4Key) -> Result<(), MapError> {
        self.services
            .remove(key)
            .map_err(|e| error(map_names::SERVICES_V4, "delete", e))
    }

    fn put_slot(&mut self, key: Slot4Key, value: Slot4Value) -> Result<(), MapError> {
        self.slots
            .insert(key, value, 0)
            .map_err(|e| error(map_names::SLOTS_V4, "insert", e))
    }

    fn remove_slot(&mut self, key: &Slot4Key) -> Result<(), MapError> {
        self.slots
            .remove(key)
            .map_err(|e| error(map_names::SLOTS_V4, "delete", e))
    }

    fn put_backend(&mut self, id: u32, backend: Backend4) -> Result<(), MapError> {
        self.backends
            .insert(id, backend, 0)
            .map_err(|e| error(map_names::BACKENDS_V4, "insert", e))
    }

    fn remove_backend(&mut self, id: u32) -> Result<(), MapError> {
        self.backends
            .remove(&id)
            .map_err(|e| error(map_names::BACKENDS_V4, "delete", e))
    }

    fn dump(&self) -> Result<MapContents, MapError> {
        let services = self
            .services
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|e| error(map_names::SERVICES_V4, "read", e))?;
        let slots = self
            .slots
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|e| error(map_names::SLOTS_V4, "read", e))?;
        let backends = self
            .backends
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|e| error(map_names::BACKENDS_V4, "read", e))?;
        Ok(MapContents {
            services,
            slots,
            backends,
        })
    }
}
