//! The north-south maps kept equal to [`ExternalState`], by difference, in an order that never
//! shows a packet a half-written service: new backends first, then the Maglev table (replaced
//! whole in one map update), then the frontend entry, then backends no table names any more.
//! Removal goes the other way: frontend, table, backends.
use std::collections::{BTreeMap, BTreeSet};

use lb_common::{
    External4Key, External4Value, MAGLEV_SIZE, Maglev4Table, NsBackend4, ns_backend_flags, ns_flags,
};

use super::{MapError, maglev};
use crate::model::{
    Backend,
    external::{DesiredExternal, ExternalFrontend, ExternalState},
};

/// Writes of the north-south service maps (the conntrack maps belong to the data path).
pub trait ExternalMaps {
    fn put_frontend(&mut self, key: External4Key, value: External4Value) -> Result<(), MapError>;
    fn remove_frontend(&mut self, key: &External4Key) -> Result<(), MapError>;
    fn put_backend(&mut self, id: u32, backend: NsBackend4) -> Result<(), MapError>;
    fn remove_backend(&mut self, id: u32) -> Result<(), MapError>;
    fn put_table(&mut self, service_id: u32, table: &Maglev4Table) -> Result<(), MapError>;
    fn remove_table(&mut self, service_id: u32) -> Result<(), MapError>;
    /// What the maps hold: frontends, and backend ids (to adopt maps of an earlier agent).
    fn dump(&self) -> Result<(BTreeMap<External4Key, External4Value>, BTreeSet<u32>), MapError>;
}

/// What was written for one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Programmed {
    value: External4Value,
    /// Backend ids by (backend, local).
    ids: BTreeMap<(Backend, bool), u32>,
}

/// What one sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExternalReport {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    pub map_writes: usize,
    pub failed: Vec<(ExternalFrontend, String)>,
}

#[derive(Debug, Default)]
pub struct ExternalReconciler {
    programmed: BTreeMap<External4Key, Programmed>,
    /// Backend ids an earlier agent left: removed once the first sync rewrote everything.
    leftover_backends: BTreeSet<u32>,
    next_service_id: u32,
    next_backend_id: u32,
}

impl ExternalReconciler {
    /// Takes over maps an earlier agent pinned: its frontends keep serving (with their
    /// tables) until the first sync rewrites them under fresh backend ids.
    pub fn adopt(maps: &impl ExternalMaps) -> Result<Self, MapError> {
        let (frontends, backends) = maps.dump()?;
        let mut reconciler = ExternalReconciler {
            next_service_id: 1,
            next_backend_id: backends.iter().max().map_or(1, |max| max + 1),
            ..Default::default()
        };
        for (key, value) in frontends {
            reconciler.next_service_id = reconciler.next_service_id.max(value.service_id + 1);
            reconciler.programmed.insert(
                key,
                Programmed {
                    value,
                    ids: BTreeMap::new(),
                },
            );
        }
        reconciler.leftover_backends = backends;
        Ok(reconciler)
    }

    pub fn len(&self) -> usize {
        self.programmed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.programmed.is_empty()
    }

    pub fn sync(
        &mut self,
        desired: &ExternalState,
        maps: &mut impl ExternalMaps,
    ) -> ExternalReport {
        let mut report = ExternalReport::default();
        let wanted: BTreeMap<External4Key, (&ExternalFrontend, &DesiredExternal)> = desired
            .frontends
            .iter()
            .map(|(f, d)| (external_key(f), (f, d)))
            .collect();
        let gone: Vec<External4Key> = self
            .programmed
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            let programmed = self.programmed.remove(&key).expect("listed above");
            let result = (|| {
                report.map_writes += 2;
                maps.remove_frontend(&key)?;
                maps.remove_table(programmed.value.service_id)?;
                for id in programmed.ids.values() {
                    report.map_writes += 1;
                    maps.remove_backend(*id)?;
                }
                Ok::<(), MapError>(())
            })();
            match result {
                Ok(()) => report.removed += 1,
                Err(e) => report.failed.push((frontend_of(&key), e.to_string())),
            }
        }
        for (key, (frontend, service)) in wanted {
            match self.write(key, service, maps, &mut report.map_writes) {
                Ok(Change::Added) => report.added += 1,
                Ok(Change::Updated) => report.updated += 1,
                Ok(Change::None) => {}
                Err(e) => report
                    .failed
                    .push((*frontend, format!("{}: {e}", service.name))),
            }
        }
        if report.failed.is_empty() {
            for id in std::mem::take(&mut self.leftover_backends) {
                report.map_writes += 1;
                let _ = maps.remove_backend(id);
            }
        }
        report
    }

    fn write(
        &mut self,
        key: External4Key,
        service: &DesiredExternal,
        maps: &mut impl ExternalMaps,
        writes: &mut usize,
    ) -> Result<Change, MapError> {
        let current = self.programmed.get(&key).cloned();
        let service_id = current
            .as_ref()
            .map_or(self.next_service_id, |c| c.value.service_id);
        let wanted_backends: BTreeSet<(Backend, bool)> =
            service.backends.iter().map(|(b, l)| (*b, *l)).collect();
        let value = frontend_value(service_id, &key, service);
        if let Some(current) = &current {
            let current_backends: BTreeSet<(Backend, bool)> = current.ids.keys().copied().collect();
            // Adopted entries (no ids known) are rewritten unless they have no backends.
            if current_backends == wanted_backends
                && (!current.ids.is_empty() || wanted_backends.is_empty())
            {
                if current.value == value {
                    return Ok(Change::None);
                }
                *writes += 1;
                maps.put_frontend(key, value)?;
                self.programmed.get_mut(&key).expect("present").value = value;
                return Ok(Change::Updated);
            }
        }
        // New or changed backend set: backends, table, frontend, then clean up.
        let old_ids = current.as_ref().map(|c| c.ids.clone()).unwrap_or_default();
        let mut ids = BTreeMap::new();
        let mut created = Vec::new();
        let mut result = Ok(());
        for (backend, local) in &wanted_backends {
            let id = match old_ids.get(&(*backend, *local)) {
                Some(id) => *id,
                None => {
                    let id = self.next_backend_id;
                    self.next_backend_id += 1;
                    *writes += 1;
                    if let Err(e) = maps.put_backend(id, backend_value(backend, *local)) {
                        result = Err(e);
                        break;
                    }
                    created.push(id);
                    id
                }
            };
            ids.insert((*backend, *local), id);
        }
        let result = result
            .and_then(|()| {
                if ids.is_empty() {
                    return Ok(());
                }
                *writes += 1;
                maps.put_table(service_id, &maglev_table(&ids))
            })
            .and_then(|()| {
                *writes += 1;
                maps.put_frontend(key, value)
            });
        if let Err(e) = result {
            for id in created {
                let _ = maps.remove_backend(id);
            }
            return Err(e);
        }
        if current.is_none() {
            self.next_service_id += 1;
        }
        if ids.is_empty() {
            // No backend: the frontend says count 0; the table is not needed any more.
            let _ = maps.remove_table(service_id);
        }
        for (backend, id) in &old_ids {
            if !ids.contains_key(backend) {
                *writes += 1;
                maps.remove_backend(*id)?;
            }
        }
        self.programmed.insert(key, Programmed { value, ids });
        Ok(if current.is_some() {
            Change::Updated
        } else {
            Change::Added
        })
    }
}

enum Change {
    Added,
    Updated,
    None,
}

/// The Maglev table over `ids` (backends sorted by address, so every node agrees).
pub fn maglev_table(ids: &BTreeMap<(Backend, bool), u32>) -> Box<Maglev4Table> {
    let names: Vec<String> = ids.keys().map(|(b, _)| b.to_string()).collect();
    let by_index: Vec<u32> = ids.values().copied().collect();
    let entries = maglev::table(&names, MAGLEV_SIZE);
    let mut table = Box::<Maglev4Table>::default();
    for (slot, entry) in table.backend_ids.iter_mut().zip(entries) {
        *slot = by_index[entry as usize];
    }
    table
}

/// The map key of an external frontend (address 0 for a NodePort).
pub fn external_key(frontend: &ExternalFrontend) -> External4Key {
    External4Key {
        addr: lb_common::addr_to_map(frontend.ip.map_or(0, u32::from)),
        port: lb_common::port_to_map(frontend.port),
        proto: frontend.protocol.number(),
        pad: 0,
    }
}

fn frontend_of(key: &External4Key) -> ExternalFrontend {
    ExternalFrontend {
        ip: (key.addr != 0).then(|| lb_common::addr_from_map(key.addr).into()),
        port: lb_common::port_from_map(key.port),
        protocol: crate::model::Protocol::from_number(key.proto)
            .unwrap_or(crate::model::Protocol::Tcp),
    }
}

fn frontend_value(
    service_id: u32,
    key: &External4Key,
    service: &DesiredExternal,
) -> External4Value {
    let mut flags = 0;
    if service.local_only {
        flags |= ns_flags::LOCAL_ONLY;
    }
    if key.addr == 0 {
        flags |= ns_flags::NODEPORT;
    }
    let timeout = match service.affinity_timeout_secs {
        Some(secs) => {
            flags |= ns_flags::AFFINITY;
            secs
        }
        None => 0,
    };
    External4Value {
        service_id,
        count: service.backends.len().min(u16::MAX as usize) as u16,
        flags,
        pad: 0,
        affinity_timeout_secs: timeout,
        pad2: 0,
    }
}

fn backend_value(backend: &Backend, local: bool) -> NsBackend4 {
    NsBackend4 {
        addr: lb_common::addr_to_map(u32::from(backend.ip)),
        port: lb_common::port_to_map(backend.port),
        flags: if local { ns_backend_flags::LOCAL } else { 0 },
        pad: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ServicePortName};

    /// The maps in memory, with every write logged.
    #[derive(Default)]
    struct Memory {
        frontends: BTreeMap<External4Key, External4Value>,
        backends: BTreeMap<u32, NsBackend4>,
        tables: BTreeMap<u32, Box<Maglev4Table>>,
        log: Vec<String>,
    }

    impl ExternalMaps for Memory {
        fn put_frontend(
            &mut self,
            key: External4Key,
            value: External4Value,
        ) -> Result<(), MapError> {
            // A frontend must only name a table and backends that exist.
            if value.count > 0 {
                let table = self
                    .tables
                    .get(&value.service_id)
                    .expect("table before frontend");
                assert!(
                    table
                        .backend_ids
                        .iter()
                        .all(|id| self.backends.contains_key(id))
                );
            }
            self.log.push(format!("frontend {}", value.count));
            self.frontends.insert(key, value);
            Ok(())
        }
        fn remove_frontend(&mut self, key: &External4Key) -> Result<(), MapError> {
            self.log.push("remove frontend".into());
            self.frontends.remove(key);
            Ok(())
        }
        fn put_backend(&mut self, id: u32, backend: NsBackend4) -> Result<(), MapError> {
            self.log.push(format!("backend {id}"));
            self.backends.insert(id, backend);
            Ok(())
        }
        fn remove_backend(&mut self, id: u32) -> Result<(), MapError> {
            // No live table may name a removed backend.
            for (service_id, table) in &self.tables {
                if self
                    .frontends
                    .values()
                    .any(|f| f.service_id == *service_id && f.count > 0)
                {
                    assert!(
                        !table.backend_ids.contains(&id),
                        "backend {id} removed while in use"
                    );
                }
            }
            self.log.push(format!("remove backend {id}"));
            self.backends.remove(&id);
            Ok(())
        }
        fn put_table(&mut self, service_id: u32, table: &Maglev4Table) -> Result<(), MapError> {
            self.log.push(format!("table {service_id}"));
            self.tables.insert(service_id, Box::new(*table));
            Ok(())
        }
        fn remove_table(&mut self, service_id: u32) -> Result<(), MapError> {
            self.tables.remove(&service_id);
            Ok(())
        }
        fn dump(
            &self,
        ) -> Result<(BTreeMap<External4Key, External4Value>, BTreeSet<u32>), MapError> {
            Ok((
                self.frontends.clone(),
                self.backends.keys().copied().collect(),
            ))
        }
    }

    fn state(backends: &[(&str, bool)], local_only: bool) -> ExternalState {
        let mut state = ExternalState::default();
        state.frontends.insert(
            ExternalFrontend {
                ip: None,
                port: 30080,
                protocol: Protocol::Tcp,
            },
            DesiredExternal {
                name: ServicePortName {
                    namespace: "default".into(),
                    name: "web".into(),
                    port: "http".into(),
                },
                backends: backends
                    .iter()
                    .map(|(ip, local)| {
                        (
                            Backend {
                                ip: ip.parse().unwrap(),
                                port: 8080,
                            },
                            *local,
                        )
                    })
                    .collect(),
                local_only,
                affinity_timeout_secs: None,
            },
        );
        state
    }

    #[test]
    fn writes_backends_then_table_then_frontend_and_removes_old_backends_last() {
        let mut maps = Memory::default();
        let mut reconciler = ExternalReconciler::adopt(&maps).unwrap();
        let report = reconciler.sync(
            &state(&[("10.244.0.10", true), ("10.244.1.10", false)], false),
            &mut maps,
        );
        assert_eq!((report.added, report.failed.len()), (1, 0));
        assert_eq!(
            maps.log,
            ["backend 1", "backend 2", "table 1", "frontend 2"]
        );
        let value = maps.frontends.values().next().unwrap();
        assert_eq!(value.flags, ns_flags::NODEPORT);
        assert_eq!(maps.backends[&1].flags, ns_backend_flags::LOCAL);
        assert_eq!(maps.backends[&2].flags, 0);

        maps.log.clear();
        let report = reconciler.sync(
            &state(&[("10.244.0.10", true), ("10.244.1.10", false)], false),
            &mut maps,
        );
        assert_eq!(
            report,
            ExternalReport::default(),
            "nothing changed, nothing written"
        );

        let report = reconciler.sync(
            &state(&[("10.244.0.10", true), ("10.244.0.11", true)], false),
            &mut maps,
        );
        assert_eq!(report.updated, 1);
        assert_eq!(
            maps.log,
            ["backend 3", "table 1", "frontend 2", "remove backend 2"]
        );

        maps.log.clear();
        reconciler.sync(&state(&[("10.244.0.10", true)], true), &mut maps);
        assert_eq!(
            maps.frontends.values().next().unwrap().flags,
            ns_flags::NODEPORT | ns_flags::LOCAL_ONLY
        );

        maps.log.clear();
        let report = reconciler.sync(&ExternalState::default(), &mut maps);
        assert_eq!(report.removed, 1);
        assert!(maps.frontends.is_empty() && maps.backends.is_empty() && maps.tables.is_empty());
        assert_eq!(maps.log[0], "remove frontend");
    }

    #[test]
    fn a_new_agent_adopts_pinned_maps_and_rewrites_them_under_fresh_ids() {
        let mut maps = Memory::default();
        let mut first = ExternalReconciler::adopt(&maps).unwrap();
        first.sync(&state(&[("10.244.0.10", true)], false), &mut maps);
        let before = maps.frontends.clone();

        let mut second = ExternalReconciler::adopt(&maps).unwrap();
        assert_eq!(second.len(), 1);
        maps.log.clear();
        second.sync(&state(&[("10.244.0.10", true)], false), &mut maps);
        assert_eq!(maps.frontends, before, "the frontend keeps its service id");
        assert_eq!(
            maps.log,
            ["backend 2", "table 1", "frontend 1", "remove backend 1"]
        );
        assert_eq!(maps.backends.keys().copied().collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn a_frontend_without_backends_has_no_table() {
        let mut maps = Memory::default();
        let mut reconciler = ExternalReconciler::adopt(&maps).unwrap();
        reconciler.sync(&state(&[], true), &mut maps);
        assert_eq!(maps.frontends.values().next().unwrap().count, 0);
        assert!(maps.tables.is_empty());
        reconciler.sync(&state(&[("10.244.0.10", true)], true), &mut maps);
        assert_eq!(maps.frontends.values().next().unwrap().count, 1);
        assert_eq!(maps.tables.len(), 1);
        reconciler.sync(&state(&[], true), &mut maps);
        assert!(maps.tables.is_empty() && maps.backends.is_empty());
    }
}
