//! The diff between the desired state and what the maps hold, and the order of writes.
//!
//! For each frontend the reconciler keeps what it programmed (service id, generation, backend
//! ids). A change of backends is written so that a connect in flight never sees a half-written
//! set: backends first, then the slots of the other generation, then the service entry that
//! switches to them in one map update, then the old slots and removed backends.
//! Nothing here knows Kubernetes; the maps are behind the [`ServiceMaps`] trait so the
//! same code drives the BPF maps and the in-memory maps of the model tests.
pub mod external;
pub mod maglev;
pub mod memory;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{
    Backend4, Service4Key, Service4Value, Slot4Key, Slot4Value, backend_flags, service_flags,
};

use crate::model::{Backend, DesiredService, DesiredState, Frontend, Protocol};

/// Writes and reads of the service maps. Errors are strings naming the map and the cause.
pub trait ServiceMaps {
    fn put_service(&mut self, key: Service4Key, value: Service4Value) -> Result<(), MapError>;
    fn remove_service(&mut self, key: &Service4Key) -> Result<(), MapError>;
    fn put_slot(&mut self, key: Slot4Key, value: Slot4Value) -> Result<(), MapError>;
    fn remove_slot(&mut self, key: &Slot4Key) -> Result<(), MapError>;
    fn put_backend(&mut self, id: u32, backend: Backend4) -> Result<(), MapError>;
    fn remove_backend(&mut self, id: u32) -> Result<(), MapError>;
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

/// The raw contents of the service maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub services: BTreeMap<Service4Key, Service4Value>,
    pub slots: BTreeMap<Slot4Key, Slot4Value>,
    pub backends: BTreeMap<u32, Backend4>,
}

impl MapContents {
    /// What the maps mean, without ids: frontend → (backends, affinity). Two map contents that
    /// serve the same traffic have equal views.
    pub fn view(&self) -> BTreeMap<Frontend, (BTreeSet<Backend>, Option<u32>)> {
        self.services
            .iter()
            .filter_map(|(key, value)| {
                let backends = self.live_backends(value).map(backend_of).collect();
                let affinity = (value.flags & service_flags::AFFINITY != 0)
                    .then_some(value.affinity_timeout_secs);
                Some((frontend_of(key)?, (backends, affinity)))
            })
            .collect()
    }

    /// The backends flagged terminating, by frontend (for `lb-agent list`).
    pub fn terminating(&self) -> BTreeMap<Frontend, BTreeSet<Backend>> {
        self.services
            .iter()
            .filter_map(|(key, value)| {
                let flagged: BTreeSet<Backend> = self
                    .live_backends(value)
                    .filter(|b| b.flags & backend_flags::TERMINATING != 0)
                    .map(backend_of)
                    .collect();
                (!flagged.is_empty()).then_some((frontend_of(key)?, flagged))
            })
            .collect()
    }

    /// The backends the live generation of a service entry names.
    fn live_backends<'a>(&'a self, value: &'a Service4Value) -> impl Iterator<Item = &'a Backend4> {
        (0..value.count).filter_map(move |index| {
            let slot = Slot4Key {
                service_id: value.service_id,
                index,
                generation: value.generation,
                pad: 0,
            };
            self.backends.get(&self.slots.get(&slot)?.backend_id)
        })
    }
}

/// What the reconciler wrote for one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Programmed {
    value: Service4Value,
    /// Backend ids in slot order.
    slots: Vec<u32>,
    /// Backend id of each backend.
    ids: BTreeMap<Backend, u32>,
    /// The backends flagged terminating (kube-proxy's serving-terminating fallback).
    terminating: BTreeSet<Backend>,
}

/// What one sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    /// Map operations issued (each is one bpf() syscall on the real maps).
    pub map_writes: usize,
    /// Frontends that could not be programmed, with the reason; what was programmed before for
    /// them stays in place.
    pub failed: Vec<(Frontend, String)>,
}

/// Keeps the maps equal to the desired state, by difference.
#[derive(Debug, Default)]
pub struct Reconciler {
    programmed: BTreeMap<Service4Key, Programmed>,
    next_service_id: u32,
    next_backend_id: u32,
}

impl Reconciler {
    /// Adopts what the maps already hold (pinned by an earlier agent) without changing
    /// anything that serves traffic; leftovers of an interrupted update (slots of the idle
    /// generation, backends no slot names) are removed.
    pub fn adopt(maps: &mut impl ServiceMaps) -> Result<Self, MapError> {
        let contents = maps.dump()?;
        let mut reconciler = Reconciler {
            next_service_id: 1,
            next_backend_id: 1,
            ..Default::default()
        };
        let mut live_slots = BTreeSet::new();
        for (key, value) in &contents.services {
            let slots: Vec<u32> = (0..value.count)
                .filter_map(|index| {
                    let slot = Slot4Key {
                        service_id: value.service_id,
                        index,
                        generation: value.generation,
                        pad: 0,
                    };
                    live_slots.insert(slot);
                    contents.slots.get(&slot).map(|s| s.backend_id)
                })
                .collect();
            let ids = slots
                .iter()
                .filter_map(|id| contents.backends.get(id).map(|b| (backend_of(b), *id)))
                .collect();
            let terminating = slots
                .iter()
                .filter_map(|id| contents.backends.get(id))
                .filter(|b| b.flags & backend_flags::TERMINATING != 0)
                .map(backend_of)
                .collect();
            reconciler.next_service_id = reconciler.next_service_id.max(value.service_id + 1);
            reconciler.programmed.insert(
                *key,
                Programmed {
                    value: *value,
                    slots,
                    ids,
                    terminating,
                },
            );
        }
        let live_backends: BTreeSet<u32> = reconciler
            .programmed
            .values()
            .flat_map(|p| p.slots.iter().copied())
            .collect();
        for slot in contents.slots.keys().filter(|s| !live_slots.contains(s)) {
            maps.remove_slot(slot)?;
        }
        for id in contents.backends.keys() {
            reconciler.next_backend_id = reconciler.next_backend_id.max(id + 1);
            if !live_backends.contains(id) {
                maps.remove_backend(*id)?;
            }
        }
        Ok(reconciler)
    }

    /// Keeps ids up to these from being handed out again: session-affinity entries outlive
    /// the services and backends they name, and must never come to name another one.
    pub fn reserve_ids(&mut self, highest_service_id: u32, highest_backend_id: u32) {
        self.next_service_id = self
            .next_service_id
            .max(highest_service_id.saturating_add(1));
        self.next_backend_id = self
            .next_backend_id
            .max(highest_backend_id.saturating_add(1));
    }

    /// The service id of every programmed frontend.
    pub fn service_ids(&self) -> impl Iterator<Item = (Frontend, u32)> + '_ {
        self.programmed
            .iter()
            .filter_map(|(key, p)| Some((frontend_of(key)?, p.value.service_id)))
    }

    /// Number of frontends programmed.
    pub fn len(&self) -> usize {
        self.programmed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.programmed.is_empty()
    }

    /// Makes the maps serve `desired`, writing only what differs.
    pub fn sync(&mut self, desired: &DesiredState, maps: &mut impl ServiceMaps) -> SyncReport {
        let mut frontends: BTreeSet<Frontend> = desired.services.keys().copied().collect();
        frontends.extend(self.programmed.keys().filter_map(frontend_of));
        self.sync_frontends(desired, &frontends, maps)
    }

    /// Like [`Reconciler::sync`], looking only at `frontends` (the ones the model says
    /// changed): the cost of a change does not grow with the number of services.
    pub fn sync_frontends(
        &mut self,
        desired: &DesiredState,
        frontends: &BTreeSet<Frontend>,
        maps: &mut impl ServiceMaps,
    ) -> SyncReport {
        let mut report = SyncReport::default();
        // Removals first, so a frontend that moves frees map room before others take it.
        for frontend in frontends
            .iter()
            .filter(|f| !desired.services.contains_key(f))
        {
            let key = service_key(frontend);
            let Some(programmed) = self.programmed.remove(&key) else {
                continue;
            };
            match remove_service(&key, &programmed, maps, &mut report.map_writes) {
                Ok(()) => report.removed += 1,
                Err(error) => report.failed.push((*frontend, error.to_string())),
            }
        }
        for frontend in frontends {
            let Some(service) = desired.services.get(frontend) else {
                continue;
            };
            let key = service_key(frontend);
            let result = match self.programmed.get(&key) {
                None => self
                    .add(key, service, maps, &mut report.map_writes)
                    .map(|()| report.added += 1),
                Some(_) => self
                    .update(key, service, maps, &mut report.map_writes)
                    .map(|changed| {
                        if changed {
                            report.updated += 1;
                        }
                    }),
            };
            if let Err(error) = result {
                report
                    .failed
                    .push((*frontend, format!("{}: {error}", service.name)));
            }
        }
        report
    }

    /// The service id programmed for `frontend`.
    pub fn service_id(&self, frontend: &Frontend) -> Option<u32> {
        self.programmed
            .get(&service_key(frontend))
            .map(|p| p.value.service_id)
    }

    fn add(
        &mut self,
        key: Service4Key,
        service: &DesiredService,
        maps: &mut impl ServiceMaps,
        writes: &mut usize,
    ) -> Result<(), MapError> {
        let service_id = self.next_service_id;
        let mut programmed = Programmed {
            value: service_value(service_id, 0, service),
            slots: Vec::new(),
            ids: BTreeMap::new(),
            terminating: service.terminating.clone(),
        };
        let backends = limited(service);
        let result = self
            .write_generation(&mut programmed, &backends, 0, maps, writes)
            .and_then(|()| {
                *writes += 1;
                maps.put_service(key, programmed.value)
            });
        match result {
            Ok(()) => {
                self.next_service_id += 1;
                self.programmed.insert(key, programmed);
                Ok(())
            }
            Err(error) => {
                // Undo the partial write; the frontend stays unprogrammed.
                let _ = remove_generation(&programmed, 0, backends.len(), maps, writes);
                for id in programmed.ids.values() {
                    *writes += 1;
                    let _ = maps.remove_backend(*id);
                }
                Err(error)
            }
        }
    }

    /// Returns whether anything was written.
    fn update(
        &mut self,
        key: Service4Key,
        service: &DesiredService,
        maps: &mut impl ServiceMaps,
        writes: &mut usize,
    ) -> Result<bool, MapError> {
        let current = self
            .programmed
            .get(&key)
            .expect("checked by caller")
            .clone();
        let backends = limited(service);
        let current_backends: BTreeSet<Backend> = current.ids.keys().copied().collect();
        let wanted_value =
            service_value(current.value.service_id, current.value.generation, service);
        if current_backends == backends.iter().copied().collect()
            && current.slots.len() == backends.len()
        {
            let mut changed = false;
            if current.terminating != service.terminating {
                // Same backends, another state: flags are for operators, rewritten in place.
                restate(&current, &service.terminating, maps, writes)?;
                self.programmed.get_mut(&key).expect("present").terminating =
                    service.terminating.clone();
                changed = true;
            }
            if wanted_value != current.value {
                *writes += 1;
                maps.put_service(key, wanted_value)?;
                self.programmed.get_mut(&key).expect("present").value = wanted_value;
                changed = true;
            }
            return Ok(changed);
        }
        // New backend set: write the idle generation, switch, then clean up.
        let generation = 1 - current.value.generation;
        restate(&current, &service.terminating, maps, writes)?;
        let mut next = Programmed {
            value: service_value(current.value.service_id, generation, service),
            slots: Vec::new(),
            ids: current
                .ids
                .iter()
                .filter(|(backend, _)| backends.contains(backend))
                .map(|(b, id)| (*b, *id))
                .collect(),
            terminating: service.terminating.clone(),
        };
        let written = self.write_generation(&mut next, &backends, generation, maps, writes);
        let switched = written.and_then(|()| {
            *writes += 1;
            maps.put_service(key, next.value)
        });
        if let Err(error) = switched {
            let _ = remove_generation(&next, generation, backends.len(), maps, writes);
            for (backend, id) in &next.ids {
                if !current.ids.contains_key(backend) {
                    *writes += 1;
                    let _ = maps.remove_backend(*id);
                }
            }
            return Err(error);
        }
        self.programmed.insert(key, next.clone());
        remove_generation(
            &current,
            current.value.generation,
            current.slots.len(),
            maps,
            writes,
        )?;
        for (backend, id) in &current.ids {
            if !next.ids.contains_key(backend) {
                *writes += 1;
                maps.remove_backend(*id)?;
            }
        }
        Ok(true)
    }

    /// Writes the backends not yet in `programmed.ids`, then the slots of `generation`.
    fn write_generation(
        &mut self,
        programmed: &mut Programmed,
        backends: &[Backend],
        generation: u8,
        maps: &mut impl ServiceMaps,
        writes: &mut usize,
    ) -> Result<(), MapError> {
        programmed.slots.clear();
        for backend in backends {
            let id = match programmed.ids.get(backend) {
                Some(id) => *id,
                None => {
                    let id = self.next_backend_id;
                    *writes += 1;
                    let terminating = programmed.terminating.contains(backend);
                    maps.put_backend(id, backend_value(backend, terminating))?;
                    self.next_backend_id += 1;
                    programmed.ids.insert(*backend, id);
                    id
                }
            };
            programmed.slots.push(id);
        }
        for (index, id) in programmed.slots.iter().enumerate() {
            let slot = Slot4Key {
                service_id: programmed.value.service_id,
                index: index as u16,
                generation,
                pad: 0,
            };
            *writes += 1;
            maps.put_slot(slot, Slot4Value { backend_id: *id })?;
        }
        Ok(())
    }
}

fn remove_service(
    key: &Service4Key,
    programmed: &Programmed,
    maps: &mut impl ServiceMaps,
    writes: &mut usize,
) -> Result<(), MapError> {
    *writes += 1;
    maps.remove_service(key)?;
    remove_generation(
        programmed,
        programmed.value.generation,
        programmed.slots.len(),
        maps,
        writes,
    )?;
    for id in programmed.ids.values() {
        *writes += 1;
        maps.remove_backend(*id)?;
    }
    Ok(())
}

fn remove_generation(
    programmed: &Programmed,
    generation: u8,
    count: usize,
    maps: &mut impl ServiceMaps,
    writes: &mut usize,
) -> Result<(), MapError> {
    for index in 0..count {
        *writes += 1;
        maps.remove_slot(&Slot4Key {
            service_id: programmed.value.service_id,
            index: index as u16,
            generation,
            pad: 0,
        })?;
    }
    Ok(())
}

/// The backends of a service in slot order, at most `MAX_BACKENDS_PER_SERVICE`.
fn limited(service: &DesiredService) -> Vec<Backend> {
    service
        .backends
        .iter()
        .take(lb_common::limits::MAX_BACKENDS_PER_SERVICE as usize)
        .copied()
        .collect()
}

fn service_value(service_id: u32, generation: u8, service: &DesiredService) -> Service4Value {
    let count = service
        .backends
        .len()
        .min(lb_common::limits::MAX_BACKENDS_PER_SERVICE as usize) as u16;
    let (flags, timeout) = match service.affinity_timeout_secs {
        Some(secs) => (service_flags::AFFINITY, secs),
        None => (0, 0),
    };
    Service4Value {
        service_id,
        count,
        generation,
        flags,
        affinity_timeout_secs: timeout,
        pad: 0,
    }
}

/// The map key of a frontend.
pub fn service_key(frontend: &Frontend) -> Service4Key {
    Service4Key {
        addr: lb_common::addr_to_map(u32::from(frontend.ip)),
        port: lb_common::port_to_map(frontend.port),
        proto: frontend.protocol.number(),
        pad: 0,
    }
}

/// The frontend of a map key, if its protocol is one we write.
pub fn frontend_of(key: &Service4Key) -> Option<Frontend> {
    Some(Frontend {
        ip: lb_common::addr_from_map(key.addr).into(),
        port: lb_common::port_from_map(key.port),
        protocol: Protocol::from_number(key.proto)?,
    })
}

fn backend_value(backend: &Backend, terminating: bool) -> Backend4 {
    Backend4 {
        addr: lb_common::addr_to_map(u32::from(backend.ip)),
        port: lb_common::port_to_map(backend.port),
        proto: 0,
        flags: if terminating {
            backend_flags::TERMINATING
        } else {
            0
        },
    }
}

/// Rewrites the flags of the programmed backends whose terminating state differs in `wanted`.
fn restate(
    current: &Programmed,
    wanted: &BTreeSet<Backend>,
    maps: &mut impl ServiceMaps,
    writes: &mut usize,
) -> Result<(), MapError> {
    for (backend, id) in &current.ids {
        let now = wanted.contains(backend);
        if current.terminating.contains(backend) != now {
            *writes += 1;
            maps.put_backend(*id, backend_value(backend, now))?;
        }
    }
    Ok(())
}

/// The backend a map value names.
pub fn backend_of(value: &Backend4) -> Backend {
    Backend {
        ip: lb_common::addr_from_map(value.addr).into(),
        port: lb_common::port_from_map(value.port),
    }
}
