//! The one service table in the kernel (frontends of every kind, slots, backends, Maglev
//! tables), behind the reconciler's [`ServiceMaps`] trait.
use std::path::Path;

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{HashMap, LpmTrie, Map, MapData},
};
use lb_common::{
    Backend4, Frontend4Key, FrontendValue, MaglevTable, SlotKey, SlotValue, SourceRange4Key,
    map_names,
};

use crate::{
    cidr::Cidr,
    reconcile::{MapContents, MapError, ServiceMaps, source_range_key, source_range_of},
};

pub struct BpfServiceMaps {
    frontends: HashMap<MapData, Frontend4Key, FrontendValue>,
    slots: HashMap<MapData, SlotKey, SlotValue>,
    backends: HashMap<MapData, u32, Backend4>,
    maglev: HashMap<MapData, u32, MaglevTable>,
    source_ranges: LpmTrie<MapData, SourceRange4Key, u8>,
}

impl BpfServiceMaps {
    /// Takes the maps out of a loaded object.
    pub fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        let mut take = |name| take_map(ebpf, name);
        Ok(Self {
            frontends: HashMap::try_from(take(map_names::FRONTENDS_V4)?)?,
            slots: HashMap::try_from(take(map_names::SLOTS_V4)?)?,
            backends: HashMap::try_from(take(map_names::BACKENDS_V4)?)?,
            maglev: HashMap::try_from(take(map_names::MAGLEV_V4)?)?,
            source_ranges: LpmTrie::try_from(take(map_names::SOURCE_RANGES_V4)?)?,
        })
    }

    /// Opens the maps pinned under `dir` (for `lb-agent list`, without a running agent).
    pub fn open_pinned(dir: &Path) -> anyhow::Result<Self> {
        let open = |name| open_pinned_hash(dir, name);
        let ranges_path = dir.join(map_names::SOURCE_RANGES_V4);
        let ranges = MapData::from_pin(&ranges_path)
            .with_context(|| format!("opening pinned map {}", ranges_path.display()))?;
        Ok(Self {
            frontends: HashMap::try_from(open(map_names::FRONTENDS_V4)?)?,
            slots: HashMap::try_from(open(map_names::SLOTS_V4)?)?,
            backends: HashMap::try_from(open(map_names::BACKENDS_V4)?)?,
            maglev: HashMap::try_from(open(map_names::MAGLEV_V4)?)?,
            source_ranges: LpmTrie::try_from(Map::LpmTrie(ranges))?,
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
    fn put_frontend(&mut self, key: Frontend4Key, value: FrontendValue) -> Result<(), MapError> {
        self.frontends
            .insert(key, value, 0)
            .map_err(|e| error(map_names::FRONTENDS_V4, "insert", e))
    }

    fn remove_frontend(&mut self, key: &Frontend4Key) -> Result<(), MapError> {
        self.frontends
            .remove(key)
            .map_err(|e| error(map_names::FRONTENDS_V4, "delete", e))
    }

    fn put_slot(&mut self, key: SlotKey, value: SlotValue) -> Result<(), MapError> {
        self.slots
            .insert(key, value, 0)
            .map_err(|e| error(map_names::SLOTS_V4, "insert", e))
    }

    fn remove_slot(&mut self, key: &SlotKey) -> Result<(), MapError> {
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

    fn put_maglev(&mut self, service_id: u32, table: &MaglevTable) -> Result<(), MapError> {
        self.maglev
            .insert(service_id, table, 0)
            .map_err(|e| error(map_names::MAGLEV_V4, "insert", e))
    }

    fn remove_maglev(&mut self, service_id: u32) -> Result<(), MapError> {
        match self.maglev.remove(&service_id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(error(map_names::MAGLEV_V4, "delete", e)),
        }
    }

    fn put_source_range(&mut self, service_id: u32, range: Cidr) -> Result<(), MapError> {
        self.source_ranges
            .insert(&source_range_key(service_id, range), 1, 0)
            .map_err(|e| error(map_names::SOURCE_RANGES_V4, "insert", e))
    }

    fn remove_source_range(&mut self, service_id: u32, range: Cidr) -> Result<(), MapError> {
        match self
            .source_ranges
            .remove(&source_range_key(service_id, range))
        {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(error(map_names::SOURCE_RANGES_V4, "delete", e)),
        }
    }

    fn dump(&self) -> Result<MapContents, MapError> {
        let frontends = self
            .frontends
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|e| error(map_names::FRONTENDS_V4, "read", e))?;
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
        let maglev = self
            .maglev
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| error(map_names::MAGLEV_V4, "read", e))?;
        let source_ranges = self
            .source_ranges
            .keys()
            .map(|key| key.map(|key| source_range_of(&key)))
            .collect::<Result<_, _>>()
            .map_err(|e| error(map_names::SOURCE_RANGES_V4, "read", e))?;
        Ok(MapContents {
            frontends,
            slots,
            backends,
            maglev,
            source_ranges,
        })
    }
}
