//! The one service table in the kernel (frontends of every kind, slots, backends, Maglev
//! tables), behind the reconciler's [`ServiceMaps`] trait. Frontends, backends and source
//! ranges have one map per family ([`FamilyMaps`], one definition for both); slots and
//! Maglev tables serve both families. Many frontends, slots or backends at once go in batches
//! (see [`super::batch`]).
use std::path::Path;

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, Pod,
    maps::{HashMap, LpmTrie, Map, MapData},
};
use lb_common::{
    Addr4, Addr6, Backend as MapBackend, FrontendKey, FrontendValue, MaglevTable, SlotKey,
    SlotValue, SourceRangeKey, map_names,
};

use super::batch::{self, BatchOps};
use crate::{
    cidr::Cidr,
    model::{Family, Frontend},
    reconcile::{
        BackendEntry, BatchError, FamilyAddr, MapContents, MapError, ServiceMaps, backend_of,
        backend_value, frontend_key, frontend_of, source_range_key, source_range_of,
    },
};

/// The maps of one family: frontends, backends, allowed source ranges.
pub struct FamilyMaps<A: FamilyAddr>
where
    FrontendKey<A>: Pod,
    MapBackend<A>: Pod,
    SourceRangeKey<A>: Pod,
{
    frontends: HashMap<MapData, FrontendKey<A>, FrontendValue>,
    backends: HashMap<MapData, u32, MapBackend<A>>,
    source_ranges: LpmTrie<MapData, SourceRangeKey<A>, u8>,
}

impl<A: FamilyAddr> FamilyMaps<A>
where
    FrontendKey<A>: Pod,
    MapBackend<A>: Pod,
    SourceRangeKey<A>: Pod,
{
    fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        Ok(Self {
            frontends: HashMap::try_from(take_map(ebpf, A::FRONTENDS)?)?,
            backends: HashMap::try_from(take_map(ebpf, A::BACKENDS)?)?,
            source_ranges: LpmTrie::try_from(take_map(ebpf, A::SOURCE_RANGES)?)?,
        })
    }

    fn open_pinned(dir: &Path) -> anyhow::Result<Self> {
        let ranges_path = dir.join(A::SOURCE_RANGES);
        let ranges = MapData::from_pin(&ranges_path)
            .with_context(|| format!("opening pinned map {}", ranges_path.display()))?;
        Ok(Self {
            frontends: HashMap::try_from(open_pinned_hash(dir, A::FRONTENDS)?)?,
            backends: HashMap::try_from(open_pinned_hash(dir, A::BACKENDS)?)?,
            source_ranges: LpmTrie::try_from(Map::LpmTrie(ranges))?,
        })
    }

    fn key(frontend: &Frontend) -> Result<FrontendKey<A>, MapError> {
        frontend_key(frontend).ok_or_else(|| wrong_family(A::FRONTENDS))
    }

    fn put_frontend(&mut self, frontend: &Frontend, value: FrontendValue) -> Result<(), MapError> {
        self.frontends
            .insert(Self::key(frontend)?, value, 0)
            .map_err(|e| error(A::FRONTENDS, "insert", e))
    }

    fn remove_frontend(&mut self, frontend: &Frontend) -> Result<(), MapError> {
        self.frontends
            .remove(&Self::key(frontend)?)
            .map_err(|e| error(A::FRONTENDS, "delete", e))
    }

    fn put_backend(&mut self, id: u32, entry: &BackendEntry) -> Result<(), MapError> {
        let value = backend_value(entry).ok_or_else(|| wrong_family(A::BACKENDS))?;
        self.backends
            .insert(id, value, 0)
            .map_err(|e| error(A::BACKENDS, "insert", e))
    }

    fn remove_backend(&mut self, id: u32) -> Result<(), MapError> {
        self.backends
            .remove(&id)
            .map_err(|e| error(A::BACKENDS, "delete", e))
    }

    fn put_frontends(
        &mut self,
        ops: &mut BatchOps,
        run: &[(Frontend, FrontendValue)],
    ) -> Result<(), (usize, MapError)> {
        let keys = run
            .iter()
            .map(|(frontend, _)| Self::key(frontend))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| (0, e))?;
        let values: Vec<FrontendValue> = run.iter().map(|(_, value)| *value).collect();
        ops.update(&mut self.frontends, &keys, &values)
            .map_err(|f| failed(A::FRONTENDS, "insert", f))
    }

    fn remove_frontends(
        &mut self,
        ops: &mut BatchOps,
        run: &[Frontend],
    ) -> Result<(), (usize, MapError)> {
        let keys = run
            .iter()
            .map(Self::key)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| (0, e))?;
        ops.delete(&mut self.frontends, &keys)
            .map_err(|f| failed(A::FRONTENDS, "delete", f))
    }

    fn put_backends(
        &mut self,
        ops: &mut BatchOps,
        run: &[(u32, BackendEntry)],
    ) -> Result<(), (usize, MapError)> {
        let ids: Vec<u32> = run.iter().map(|(id, _)| *id).collect();
        let values = run
            .iter()
            .map(|(_, entry)| backend_value(entry).ok_or_else(|| wrong_family(A::BACKENDS)))
            .collect::<Result<Vec<MapBackend<A>>, _>>()
            .map_err(|e| (0, e))?;
        ops.update(&mut self.backends, &ids, &values)
            .map_err(|f| failed(A::BACKENDS, "insert", f))
    }

    fn remove_backends(
        &mut self,
        ops: &mut BatchOps,
        ids: &[u32],
    ) -> Result<(), (usize, MapError)> {
        ops.delete(&mut self.backends, ids)
            .map_err(|f| failed(A::BACKENDS, "delete", f))
    }

    fn put_source_range(&mut self, service_id: u32, range: Cidr) -> Result<(), MapError> {
        let key =
            source_range_key(service_id, range).ok_or_else(|| wrong_family(A::SOURCE_RANGES))?;
        self.source_ranges
            .insert(&key, 1, 0)
            .map_err(|e| error(A::SOURCE_RANGES, "insert", e))
    }

    fn remove_source_range(&mut self, service_id: u32, range: Cidr) -> Result<(), MapError> {
        let key =
            source_range_key(service_id, range).ok_or_else(|| wrong_family(A::SOURCE_RANGES))?;
        match self.source_ranges.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(error(A::SOURCE_RANGES, "delete", e)),
        }
    }

    /// Adds what this family's maps hold to `contents`. A frontend entry of a protocol or
    /// scope this agent never writes is left out (and so left alone).
    fn dump_into(&self, contents: &mut MapContents) -> Result<(), MapError> {
        for entry in self.frontends.iter() {
            let (key, value) = entry.map_err(|e| error(A::FRONTENDS, "read", e))?;
            match frontend_of(&key) {
                Some(frontend) => {
                    contents.frontends.insert(frontend, value);
                }
                None => contents.unknown_frontends += 1,
            }
        }
        for entry in self.backends.iter() {
            let (id, value) = entry.map_err(|e| error(A::BACKENDS, "read", e))?;
            contents.backends.insert(id, backend_of(&value));
        }
        for key in self.source_ranges.keys() {
            let key = key.map_err(|e| error(A::SOURCE_RANGES, "read", e))?;
            contents.source_ranges.insert(source_range_of(&key));
        }
        Ok(())
    }
}

/// A frontend, backend or range given to the maps of the other family (a bug, never a
/// Kubernetes object's fault).
fn wrong_family(map: &'static str) -> MapError {
    MapError {
        map,
        operation: "insert",
        cause: "an address of the other family".into(),
    }
}

pub struct BpfServiceMaps {
    v4: FamilyMaps<Addr4>,
    /// Always there in a loaded object; `None` for pins an IPv4-only agent left (`lb-agent
    /// list` before the first start of this version).
    v6: Option<FamilyMaps<Addr6>>,
    slots: HashMap<MapData, SlotKey, SlotValue>,
    maglev: HashMap<MapData, u32, MaglevTable>,
    /// Whether the kernel has batch operations (the maps above are all hash maps).
    batch_ops: BatchOps,
}

impl BpfServiceMaps {
    /// Takes the maps out of a loaded object.
    pub fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        Ok(Self {
            v4: FamilyMaps::take(ebpf)?,
            v6: Some(FamilyMaps::take(ebpf)?),
            slots: HashMap::try_from(take_map(ebpf, map_names::SLOTS_V4)?)?,
            maglev: HashMap::try_from(take_map(ebpf, map_names::MAGLEV_V4)?)?,
            batch_ops: BatchOps::default(),
        })
    }

    /// Opens the maps pinned under `dir` (for `lb-agent list`, without a running agent). Pins
    /// without the IPv6 maps (an IPv4-only agent's) read as holding no IPv6 entry.
    pub fn open_pinned(dir: &Path) -> anyhow::Result<Self> {
        let open = |name| open_pinned_hash(dir, name);
        let v6_pinned = dir.join(map_names::FRONTENDS_V6).exists();
        Ok(Self {
            v4: FamilyMaps::open_pinned(dir)?,
            v6: v6_pinned
                .then(|| FamilyMaps::open_pinned(dir))
                .transpose()?,
            slots: HashMap::try_from(open(map_names::SLOTS_V4)?)?,
            maglev: HashMap::try_from(open(map_names::MAGLEV_V4)?)?,
            batch_ops: BatchOps::default(),
        })
    }
}

impl BpfServiceMaps {
    fn v6(&mut self) -> Result<&mut FamilyMaps<Addr6>, MapError> {
        v6_of(&mut self.v6)
    }

    /// Whether batches are used (`Unknown` until the first batch).
    pub fn batch_ops(&self) -> BatchOps {
        self.batch_ops
    }

    /// Writes one entry at a time from now on, as on a kernel without batch operations.
    pub fn without_batches(&mut self) {
        self.batch_ops = BatchOps::Missing;
    }
}

fn v6_of(v6: &mut Option<FamilyMaps<Addr6>>) -> Result<&mut FamilyMaps<Addr6>, MapError> {
    v6.as_mut().ok_or(MapError {
        map: map_names::FRONTENDS_V6,
        operation: "open",
        cause: "no IPv6 maps are pinned (an IPv4-only agent's pins)".into(),
    })
}

/// A failed entry of a batch as the reconciler reports it.
fn failed(map: &'static str, operation: &'static str, f: batch::Failed) -> (usize, MapError) {
    let error = MapError {
        map,
        operation,
        cause: f.cause,
    };
    (f.index, error)
}

/// `write` on each run of `entries` of one family, in order, up to the first failure.
fn by_family<T>(
    entries: &[T],
    family: impl Fn(&T) -> Family,
    mut write: impl FnMut(Family, &[T]) -> Result<(), (usize, MapError)>,
) -> Result<(), BatchError> {
    let mut offset = 0;
    for run in entries.chunk_by(|a, b| family(a) == family(b)) {
        write(family(&run[0]), run).map_err(|(index, error)| BatchError {
            index: offset + index,
            count: entries.len(),
            error,
        })?;
        offset += run.len();
    }
    Ok(())
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
        cause: batch::with_sources(&cause),
    }
}

impl ServiceMaps for BpfServiceMaps {
    fn put_frontend(&mut self, frontend: Frontend, value: FrontendValue) -> Result<(), MapError> {
        match frontend.family() {
            Family::V4 => self.v4.put_frontend(&frontend, value),
            Family::V6 => self.v6()?.put_frontend(&frontend, value),
        }
    }

    fn remove_frontend(&mut self, frontend: &Frontend) -> Result<(), MapError> {
        match frontend.family() {
            Family::V4 => self.v4.remove_frontend(frontend),
            Family::V6 => self.v6()?.remove_frontend(frontend),
        }
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

    fn put_backend(&mut self, id: u32, backend: BackendEntry) -> Result<(), MapError> {
        match backend.backend.family() {
            Family::V4 => self.v4.put_backend(id, &backend),
            Family::V6 => self.v6()?.put_backend(id, &backend),
        }
    }

    fn remove_backend(&mut self, id: u32, family: Family) -> Result<(), MapError> {
        match family {
            Family::V4 => self.v4.remove_backend(id),
            Family::V6 => self.v6()?.remove_backend(id),
        }
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
        match range.family() {
            Family::V4 => self.v4.put_source_range(service_id, range),
            Family::V6 => self.v6()?.put_source_range(service_id, range),
        }
    }

    fn remove_source_range(&mut self, service_id: u32, range: Cidr) -> Result<(), MapError> {
        match range.family() {
            Family::V4 => self.v4.remove_source_range(service_id, range),
            Family::V6 => self.v6()?.remove_source_range(service_id, range),
        }
    }

    fn put_frontends(&mut self, entries: &[(Frontend, FrontendValue)]) -> Result<(), BatchError> {
        let Self {
            v4, v6, batch_ops, ..
        } = self;
        by_family(
            entries,
            |(frontend, _)| frontend.family(),
            |family, run| match family {
                Family::V4 => v4.put_frontends(batch_ops, run),
                Family::V6 => v6_of(v6).map_err(|e| (0, e))?.put_frontends(batch_ops, run),
            },
        )
    }

    fn remove_frontends(&mut self, frontends: &[Frontend]) -> Result<(), BatchError> {
        let Self {
            v4, v6, batch_ops, ..
        } = self;
        by_family(frontends, Frontend::family, |family, run| match family {
            Family::V4 => v4.remove_frontends(batch_ops, run),
            Family::V6 => v6_of(v6)
                .map_err(|e| (0, e))?
                .remove_frontends(batch_ops, run),
        })
    }

    fn put_slots(&mut self, entries: &[(SlotKey, SlotValue)]) -> Result<(), BatchError> {
        let keys: Vec<SlotKey> = entries.iter().map(|(key, _)| *key).collect();
        let values: Vec<SlotValue> = entries.iter().map(|(_, value)| *value).collect();
        self.batch_ops
            .update(&mut self.slots, &keys, &values)
            .map_err(|f| in_slots("insert", f, entries.len()))
    }

    fn remove_slots(&mut self, keys: &[SlotKey]) -> Result<(), BatchError> {
        self.batch_ops
            .delete(&mut self.slots, keys)
            .map_err(|f| in_slots("delete", f, keys.len()))
    }

    fn put_backends(&mut self, entries: &[(u32, BackendEntry)]) -> Result<(), BatchError> {
        let Self {
            v4, v6, batch_ops, ..
        } = self;
        by_family(
            entries,
            |(_, entry)| entry.backend.family(),
            |family, run| match family {
                Family::V4 => v4.put_backends(batch_ops, run),
                Family::V6 => v6_of(v6).map_err(|e| (0, e))?.put_backends(batch_ops, run),
            },
        )
    }

    fn remove_backends(&mut self, ids: &[(u32, Family)]) -> Result<(), BatchError> {
        let Self {
            v4, v6, batch_ops, ..
        } = self;
        by_family(
            ids,
            |(_, family)| *family,
            |family, run| {
                let ids: Vec<u32> = run.iter().map(|(id, _)| *id).collect();
                match family {
                    Family::V4 => v4.remove_backends(batch_ops, &ids),
                    Family::V6 => v6_of(v6)
                        .map_err(|e| (0, e))?
                        .remove_backends(batch_ops, &ids),
                }
            },
        )
    }

    fn dump(&self) -> Result<MapContents, MapError> {
        let mut contents = MapContents {
            slots: self
                .slots
                .iter()
                .collect::<Result<_, _>>()
                .map_err(|e| error(map_names::SLOTS_V4, "read", e))?,
            maglev: self
                .maglev
                .keys()
                .collect::<Result<_, _>>()
                .map_err(|e| error(map_names::MAGLEV_V4, "read", e))?,
            ..MapContents::default()
        };
        self.v4.dump_into(&mut contents)?;
        if let Some(v6) = &self.v6 {
            v6.dump_into(&mut contents)?;
        }
        Ok(contents)
    }
}

/// A failed entry of a batch of slots as the reconciler reports it.
fn in_slots(operation: &'static str, f: batch::Failed, count: usize) -> BatchError {
    let (index, error) = failed(map_names::SLOTS_V4, operation, f);
    BatchError {
        index,
        count,
        error,
    }
}
