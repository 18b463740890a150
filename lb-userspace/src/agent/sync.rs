//! One sync pass, the same for every frontend kind: delta → model (desired state, by
//! difference) → reconciler (map writes) → what operators see (the names map for
//! `lb-agent list`, per-service counters and their labels, health-check node ports, metrics,
//! one log line per changed service and per problem).
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use crate::{
    api::{self, AgentState, metrics::ServiceLabels, service_health::ServiceHealthServers},
    dataplane::{BpfServiceMaps, names::NamesMap, stats::ServiceStatsMap},
    model::{Diagnostic, Frontend, Model, ObjectKey, ObjectRef, ProxyIdentity, SetKey, Severity},
    reconcile::{Reconciler, RemovedBackend, SyncReport},
    source::Delta,
};

/// A sync touching more frontends than this (a start, a re-list) leaves much freed memory.
const LARGE_SYNC: usize = 1000;

/// Labels of the per-service counters, by service id (shared with the `/metrics` reader).
pub type LabelsById = Arc<Mutex<BTreeMap<u32, ServiceLabels>>>;

/// What the sync pass keeps between syncs.
pub struct SyncPass {
    /// The desired state, kept by difference.
    model: Model,
    reconciler: Reconciler,
    maps: BpfServiceMaps,
    names: NamesMap,
    stats: Arc<Mutex<ServiceStatsMap>>,
    labels: LabelsById,
    /// Health-check node ports; `None` without north-south interfaces.
    health: Option<ServiceHealthServers>,
    /// Whether a full sync ran (the first one compares every frontend, after adopting maps
    /// an earlier agent left; later ones only what the model reports changed).
    synced: bool,
    /// Problems already logged (a bad file is not re-reported on every sync).
    reported: BTreeSet<String>,
    /// Frontends the last pass could not program (a full map, no free id): tried again.
    refused: BTreeSet<Frontend>,
    /// The file each object comes from (manifest source), for messages.
    origins: BTreeMap<ObjectRef, Arc<Path>>,
    /// The source's own problems, as of the last delta that changed them.
    source_problems: Vec<String>,
}

impl SyncPass {
    pub fn new(
        identity: &ProxyIdentity,
        reconciler: Reconciler,
        maps: BpfServiceMaps,
        names: NamesMap,
        stats: ServiceStatsMap,
        health_checks: Option<ServiceHealthServers>,
    ) -> Self {
        Self {
            model: Model::new(identity.clone()),
            reconciler,
            maps,
            names,
            stats: Arc::new(Mutex::new(stats)),
            labels: Arc::default(),
            health: health_checks,
            synced: false,
            reported: BTreeSet::new(),
            refused: BTreeSet::new(),
            origins: BTreeMap::new(),
            source_problems: Vec::new(),
        }
    }

    /// Reads the per-CPU counters of every labelled service, for a `/metrics` scrape.
    pub fn counter_reader(&self) -> api::CounterReader {
        let stats = self.stats.clone();
        let labels = self.labels.clone();
        Box::new(move || {
            let counts = stats.lock().expect("stats lock").read();
            let labels = labels.lock().expect("labels lock");
            counts
                .into_iter()
                .filter_map(|(id, c)| Some((labels.get(&id)?.clone(), c.forwarded, c.refused)))
                .collect()
        })
    }

    /// The objects as of the last pass.
    pub fn objects(&self) -> &crate::model::Objects {
        self.model.objects()
    }

    /// kube-proxy's node IP of each family, as the last Node seen says.
    pub fn node_ips(&self) -> Vec<std::net::IpAddr> {
        self.model
            .node()
            .map(|node| node.node_ips.clone())
            .unwrap_or_default()
    }

    /// One pass; returns the backends it removed from the maps (their sockets may be
    /// terminated).
    pub fn run(&mut self, delta: &Delta, state: &AgentState) -> Vec<RemovedBackend> {
        let started = Instant::now();
        let mut changes = self.model.apply(&delta.objects);
        for (object, origin) in &delta.origins {
            match origin {
                Some(file) => self.origins.insert(object.clone(), Arc::clone(file)),
                None => self.origins.remove(object),
            };
        }
        if let Some(problems) = &delta.problems {
            self.source_problems.clone_from(problems);
        }
        changes.frontends.extend(std::mem::take(&mut self.refused));
        let desired = self.model.desired();
        let mut report = if self.synced {
            self.reconciler
                .sync_changes(desired, &changes.frontends, &changes.sets, &mut self.maps)
        } else {
            self.reconciler.sync(desired, &mut self.maps)
        };
        // What the pass removed (sets, backends: their ids and map room) may be what a refused
        // frontend lacked; they were written before the removals, so once more.
        if !report.failed.is_empty()
            && (!report.sets_removed.is_empty() || !report.backends_removed.is_empty())
        {
            let again: BTreeSet<Frontend> = report.failed.iter().map(|(f, _)| *f).collect();
            let retry =
                self.reconciler
                    .sync_changes(desired, &again, &BTreeSet::new(), &mut self.maps);
            report.absorb_retry(retry);
        }
        self.refused = report.failed.iter().map(|(f, _)| *f).collect();
        let took = started.elapsed();
        report_new_problems(
            &self.source_problems,
            &self.origins,
            &self.model.diagnostics(),
            &mut self.reported,
            state,
        );
        for (set, backends) in &report.truncated {
            tracing::warn!(
                service = %set.name,
                backends,
                used = lb_common::limits::MAX_BACKENDS_PER_SERVICE,
                "more backends than one service may have; the rest get no connections"
            );
        }
        for (frontend, error) in &report.failed {
            tracing::error!(%frontend, %error, "could not program this service; what was programmed before stays");
        }
        let changed = report.added + report.updated + report.removed;
        self.record_sync(state, &report, took);
        self.record_programming_latency(delta, &changes.slices, state);
        if let Err(error) = self.record_names(&changes.frontends) {
            tracing::warn!(error = %format!("{error:#}"), "could not update the names map (lb-agent list)");
        }
        if self.synced {
            self.log_programmed(&changes.frontends);
        }
        self.track_sets(&report, state);
        if let Some(health) = &mut self.health
            && (changes.health_checks || !self.synced)
        {
            health.update(&self.model.desired().health_checks);
        }
        self.synced = true;
        if changed > LARGE_SYNC {
            release_free_memory();
        }
        let frontends = self.model.desired().frontends.len();
        if changed > 0 || !report.failed.is_empty() {
            tracing::info!(
                frontends,
                added = report.added,
                updated = report.updated,
                removed = report.removed,
                map_writes = report.map_writes,
                sync_us = took.as_micros() as u64,
                latency_us = delta.changed_at.elapsed().as_micros() as u64,
                "sync complete"
            );
        } else {
            tracing::debug!(frontends, "sync complete, nothing changed");
        }
        report.backends_removed
    }

    /// One line per changed frontend still programmed, naming its service (not on the first
    /// sync, which would print every service of the cluster; removals are logged by
    /// [`SyncPass::record_names`], which has their names).
    fn log_programmed(&self, frontends: &BTreeSet<Frontend>) {
        let desired = self.model.desired();
        for frontend in frontends {
            if let Some(service) = desired.frontends.get(frontend) {
                tracing::info!(
                    service = %service.name,
                    kind = %service.kind,
                    %frontend,
                    backends = desired.backends_of(frontend).len(),
                    "service programmed"
                );
            }
        }
    }

    /// Names the touched frontends in the names map (all of them, and only them, on the
    /// first sync), for `lb-agent list`; a removed frontend's line in the log names the
    /// service it had there.
    fn record_names(&mut self, touched: &BTreeSet<Frontend>) -> anyhow::Result<()> {
        let desired = &self.model.desired().frontends;
        if !self.synced {
            let wanted = desired
                .iter()
                .filter(|(f, _)| self.reconciler.service_id(f).is_some())
                .map(|(frontend, service)| (*frontend, service.name.to_string()))
                .collect();
            return self.names.sync_all(&wanted);
        }
        for frontend in touched {
            match desired
                .get(frontend)
                .filter(|_| self.reconciler.service_id(frontend).is_some())
            {
                Some(service) => self.names.put(frontend, &service.name.to_string())?,
                None => {
                    if let Some(was) = self.names.take_name(frontend) {
                        tracing::info!(service = %was, %frontend, "service removed");
                    }
                }
            }
        }
        Ok(())
    }

    /// Follows the service ids of backend sets: counters and their labels come and go with
    /// the sets.
    fn track_sets(&mut self, report: &SyncReport, state: &AgentState) {
        let mut labels = self.labels.lock().expect("labels lock");
        let mut removed = Vec::new();
        for (_, id) in &report.sets_removed {
            if let Some(old) = labels.remove(id) {
                state.metrics.forwarded.remove(&old);
                state.metrics.refused.remove(&old);
            }
            removed.push(*id);
        }
        let mut added = Vec::new();
        let first = labels.is_empty();
        let sets: Vec<(SetKey, u32)> = if first {
            self.reconciler
                .set_ids()
                .map(|(key, id)| (key.clone(), id))
                .collect()
        } else {
            report.sets_added.clone()
        };
        for (key, id) in sets {
            labels.insert(
                id,
                ServiceLabels {
                    namespace: key.name.namespace.to_string(),
                    name: key.name.name.to_string(),
                    port: key.name.port.to_string(),
                    endpoints: key.endpoints.to_string(),
                    family: key.family.to_string(),
                },
            );
            added.push(id);
        }
        drop(labels);
        let mut counters = self.stats.lock().expect("stats lock");
        if !self.synced {
            // The first sync: drop the counters of services an earlier agent left.
            let live = self.reconciler.set_ids().map(|(_, id)| id).collect();
            if let Err(error) = counters.retain(&live) {
                tracing::warn!(%error, "could not clean the per-service counters map");
            }
        }
        if let Err(error) = counters.track(&added, &removed) {
            tracing::warn!(%error, "could not update the per-service counters map");
        }
    }

    fn record_sync(&self, state: &AgentState, report: &SyncReport, took: Duration) {
        let metrics = &state.metrics;
        metrics.sync_duration.observe(took.as_secs_f64());
        let now = SystemTime::now();
        let unix = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        metrics.last_sync_timestamp.set(unix.as_secs_f64());
        metrics
            .services
            .set(self.model.desired().frontends.len() as i64);
        metrics.backends.set(self.model.backends_total() as i64);
        if !report.failed.is_empty() {
            metrics
                .errors
                .get_or_create(&api::metrics::ErrorLabels {
                    kind: "map_write".into(),
                })
                .inc_by(report.failed.len() as u64);
        }
        for (map, entries) in self.reconciler.programmed_entries() {
            metrics
                .map_entries
                .get_or_create(&api::metrics::MapLabels { map: map.into() })
                .set(entries as i64);
        }
        state.health.lock().expect("health lock").synced(now);
    }

    /// kube-proxy's network programming latency: from each changed EndpointSlice's
    /// `last-change-trigger-time` annotation to now, when the maps serve it; slices without
    /// the annotation (hand-written ones) count from when the change was noticed.
    fn record_programming_latency(&self, delta: &Delta, changed: &[ObjectKey], state: &AgentState) {
        let now = jiff::Timestamp::now();
        for key in changed {
            let trigger = self
                .model
                .objects()
                .endpoint_slices
                .get(key)
                .and_then(|slice| slice.trigger_time.as_deref())
                .and_then(|t| t.parse::<jiff::Timestamp>().ok());
            let latency = trigger
                .and_then(|at| now.duration_since(at).try_into().ok())
                .unwrap_or_else(|| delta.changed_at.elapsed());
            state
                .metrics
                .network_programming
                .observe(latency.as_secs_f64());
        }
    }
}

/// Logs each problem once while it lasts, and counts it in `lb_errors_total`: objects that
/// make no sense as `invalid_object`, what this data path does not serve (IPv6, SCTP) as
/// `unsupported`, unreadable files as `source`.
fn report_new_problems(
    source_problems: &[String],
    origins: &BTreeMap<ObjectRef, Arc<Path>>,
    diagnostics: &[Diagnostic],
    reported: &mut BTreeSet<String>,
    state: &AgentState,
) {
    let mut current = BTreeSet::new();
    let count = |kind: &str| {
        state
            .metrics
            .errors
            .get_or_create(&api::metrics::ErrorLabels { kind: kind.into() })
            .inc();
    };
    for problem in source_problems {
        if !reported.contains(problem) {
            tracing::warn!("{problem}");
            count("source");
        }
        current.insert(problem.clone());
    }
    for diagnostic in diagnostics {
        let origin = origins
            .get(&diagnostic.object)
            .map(|file| format!("{}: ", file.display()))
            .unwrap_or_default();
        let line = format!("{origin}{diagnostic}");
        if !reported.contains(&line) {
            match diagnostic.severity {
                Severity::Warning => {
                    tracing::warn!("{line}");
                    count("invalid_object");
                }
                Severity::Info => {
                    tracing::info!("{line}");
                    count("unsupported");
                }
            }
        }
        current.insert(line);
    }
    *reported = current;
}

/// Gives the memory freed after a large sync (parsed objects, intermediate states) back to
/// the system now rather than when the allocator gets round to it: the agent (`main.rs`)
/// allocates with mimalloc.
fn release_free_memory() {
    // SAFETY: mi_collect only walks mimalloc's own heaps and frees their unused pages.
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
}
