//! `lb-agent run`: source → desired state → diff → maps, until SIGTERM.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};
use lb_common::{NameKey, frontend_kinds};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use crate::{
    api::{self, AgentState, metrics::ServiceLabels},
    dataplane::{
        Dataplane, Limits, bpffs::PinDir, names::NamesMap, privileges, stats::ServiceStatsMap,
    },
    model::{DesiredState, Diagnostic, Frontend, Model, ObjectKey, ProxyIdentity, Severity},
    reconcile::{Reconciler, SyncReport, service_key},
    source::{Snapshot, kube, manifests},
};

/// A sync touching more frontends than this (a start, a re-list) leaves much freed memory.
const LARGE_SYNC: usize = 1000;
/// The EndpointSlice annotation kube-proxy measures network programming latency from.
const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// Everything `run` needs.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Serve this manifest directory; `None` reads the API server.
    pub manifests: Option<PathBuf>,
    /// The API server's kubeconfig; `None` is in-cluster, then `KUBECONFIG`.
    pub kubeconfig: Option<PathBuf>,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub identity: ProxyIdentity,
    pub limits: Limits,
    /// Least time between two syncs; changes arriving meanwhile are coalesced.
    pub min_sync_interval: Duration,
    /// On SIGTERM, detach the programs and remove the pins. Off by default: a DaemonSet
    /// rollout stops the old agent while traffic must keep flowing.
    pub cleanup_on_exit: bool,
    /// Prometheus metrics and `/proxyMode`; `None` serves none.
    pub metrics_addr: Option<SocketAddr>,
    /// `/healthz` and `/livez`; `None` serves none.
    pub healthz_addr: Option<SocketAddr>,
    /// The programs' own debug output (every translation and refusal) in the agent's log.
    pub kernel_log: bool,
    /// North-south traffic (NodePort, externalIPs, LB IPs) in XDP on these interfaces.
    pub nodeport: crate::nodeport::NodeportConfig,
}

pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    privileges::check()?;
    privileges::raise_memlock_limit();
    let state = AgentState::new(source_description(&config));
    api::serve(state.clone(), config.metrics_addr, config.healthz_addr).await?;
    let pins = PinDir::prepare(&config.bpffs)?;
    let mut dataplane = Dataplane::load_with_log(pins.clone(), config.limits, config.kernel_log)?;
    if config.kernel_log {
        dataplane.start_kernel_log()?;
    }
    let mut maps = dataplane.service_maps()?;
    let stats = Arc::new(std::sync::Mutex::new(dataplane.service_stats()?));
    let mut names = dataplane.names()?;
    let mut nodeport = crate::nodeport::Nodeport::start(&mut dataplane, config.nodeport.clone())?;
    let mut reconciler = Reconciler::adopt(&mut maps).context("adopting the pinned maps")?;
    let (service_ids, backend_ids) = dataplane.affinity_high_water()?;
    reconciler.reserve_ids(service_ids, backend_ids);
    if !reconciler.is_empty() {
        tracing::info!(
            services = reconciler.len(),
            "adopted maps pinned by an earlier agent"
        );
    }
    record_capacities(&state, &dataplane.capacities());

    let (snapshots_tx, mut snapshots) = watch::channel::<Option<Arc<Snapshot>>>(None);
    let mut source = start_source(&config, snapshots_tx, state.clone()).await?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut loop_state = LoopState::new(&config.identity);
    *state.counters.lock().expect("counters lock") =
        Some(counter_reader(stats.clone(), loop_state.labels.clone()));
    let mut next_sync = tokio::time::Instant::now();

    let outcome = loop {
        tokio::select! {
            changed = snapshots.changed() => {
                if changed.is_err() {
                    break Ok(());
                }
                state.health.lock().expect("health lock").pending_since.get_or_insert(SystemTime::now());
                // Coalesce: wait out the minimum interval, then take the latest snapshot.
                tokio::time::sleep_until(next_sync).await;
                let Some(snapshot) = snapshots.borrow_and_update().clone() else {
                    continue;
                };
                let ids = sync(&snapshot, &mut reconciler, &mut maps, &state, &mut loop_state);
                if let Err(error) = record_names(&mut names, &ids.touched, &loop_state) {
                    tracing::warn!(error = %format!("{error:#}"), "could not update the names map (lb-agent list)");
                }
                if let Some(nodeport) = &mut nodeport {
                    nodeport.sync(&snapshot.objects, &config.identity, &mut dataplane)?;
                }
                let mut counters = stats.lock().expect("stats lock");
                if ids.touched.is_none() {
                    // The first sync: drop the counters of services an earlier agent left.
                    let live = reconciler.service_ids().map(|(_, id)| id).collect();
                    if let Err(error) = counters.retain(&live) {
                        tracing::warn!(%error, "could not clean the per-service counters map");
                    }
                }
                if let Err(error) = counters.track(&ids.added, &ids.removed) {
                    tracing::warn!(%error, "could not update the per-service counters map");
                }
                drop(counters);
                if !loop_state.attached {
                    // Attach only once the maps hold the first full state, so no connect sees
                    // a half-programmed data path.
                    for (program, outcome) in dataplane.attach_cgroup(&config.cgroup)? {
                        tracing::info!(program, ?outcome, "program in place");
                    }
                    loop_state.attached = true;
                    tracing::info!(cgroup = %config.cgroup.display(), "socket programs attached");
                }
                next_sync = tokio::time::Instant::now() + config.min_sync_interval;
            }
            finished = &mut source => {
                break match finished {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(error)) => Err(error.context("the source failed")),
                    Err(error) => Err(anyhow::anyhow!("the source task failed: {error}")),
                };
            }
            _ = terminate.recv() => break Ok(()),
            _ = interrupt.recv() => break Ok(()),
        }
    };
    source.abort();
    drop(nodeport);
    drop(maps);
    state.counters.lock().expect("counters lock").take();
    drop(stats);
    drop(names);
    drop(dataplane);
    if config.cleanup_on_exit {
        tracing::info!("shutting down: detaching programs and removing pins");
        pins.remove_all()?;
    } else {
        tracing::info!(
            bpffs = %pins.root().display(),
            "shutting down; programs stay attached and maps pinned, serving the last state"
        );
    }
    outcome
}

fn source_description(config: &RunConfig) -> String {
    match (&config.manifests, &config.kubeconfig) {
        (Some(dir), _) => format!("manifests:{}", dir.display()),
        (None, Some(file)) => format!("kubernetes:{}", file.display()),
        (None, None) => "kubernetes".into(),
    }
}

/// Starts the manifest source when there is a directory, else the API server's.
async fn start_source(
    config: &RunConfig,
    snapshots: watch::Sender<Option<Arc<Snapshot>>>,
    state: Arc<AgentState>,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    if let Some(dir) = &config.manifests {
        if !dir.is_dir() {
            bail!("--manifests {} is not a directory", dir.display());
        }
        return Ok(tokio::spawn(manifests::watch(dir.clone(), snapshots)));
    }
    let health = kube::SourceHealth::new();
    let client = kube::client(config.kubeconfig.as_deref(), &health).await?;
    tokio::spawn(kube::SourceHealth::log_transitions(health.subscribe()));
    tokio::spawn(track_staleness(health.subscribe(), state));
    let source = kube::watch(client, config.identity.clone(), snapshots, health);
    Ok(tokio::spawn(source))
}

/// Mirrors the source's staleness into `/healthz` and `lb_source_stale`.
async fn track_staleness(mut stale: watch::Receiver<bool>, state: Arc<AgentState>) {
    loop {
        let now_stale = *stale.borrow_and_update();
        state.health.lock().expect("health lock").stale = now_stale;
        state.metrics.source_stale.set(i64::from(now_stale));
        if stale.changed().await.is_err() {
            return;
        }
    }
}

/// What the loop remembers between syncs.
struct LoopState {
    attached: bool,
    /// The desired state, kept by difference.
    model: Model,
    /// Whether a full sync ran (the first one compares every frontend, after adopting maps
    /// an earlier agent left; later ones only the frontends the model reports changed).
    synced: bool,
    /// Problems already logged (a bad file is not re-reported on every sync).
    reported: BTreeSet<String>,
    /// Service id of each programmed frontend, and the metric labels of each id.
    ids: BTreeMap<Frontend, u32>,
    labels: Arc<std::sync::Mutex<BTreeMap<u32, ServiceLabels>>>,
}

impl LoopState {
    fn new(identity: &ProxyIdentity) -> Self {
        Self {
            attached: false,
            model: Model::new(identity.clone()),
            synced: false,
            reported: BTreeSet::new(),
            ids: BTreeMap::new(),
            labels: Arc::default(),
        }
    }
}

/// Service ids that came and went in one sync (for the per-service counters), and the
/// frontends it looked at (`None`: all of them, on the first sync).
#[derive(Default)]
struct IdChanges {
    added: Vec<u32>,
    removed: Vec<u32>,
    touched: Option<Vec<Frontend>>,
}

/// One pass: snapshot → desired state → map writes, logging and recording what changed.
fn sync(
    snapshot: &Snapshot,
    reconciler: &mut Reconciler,
    maps: &mut crate::dataplane::BpfServiceMaps,
    state: &AgentState,
    loop_state: &mut LoopState,
) -> IdChanges {
    let started = Instant::now();
    let changes = loop_state.model.update(&snapshot.objects);
    let desired = loop_state.model.desired();
    let report = if loop_state.synced {
        reconciler.sync_frontends(desired, &changes.frontends, maps)
    } else {
        reconciler.sync(desired, maps)
    };
    let took = started.elapsed();
    report_new_problems(
        snapshot,
        &loop_state.model.diagnostics(),
        &mut loop_state.reported,
        state,
    );
    for (frontend, error) in &report.failed {
        tracing::error!(%frontend, %error, "could not program this service; what was programmed before stays");
    }
    record_sync(state, desired, &report, took);
    record_programming_latency(snapshot, &changes.slices, state);
    let touched: Vec<Frontend> = if loop_state.synced {
        changes.frontends.iter().copied().collect()
    } else {
        reconciler
            .service_ids()
            .map(|(frontend, _)| frontend)
            .collect()
    };
    if loop_state.synced {
        log_changed_services(&changes.frontends, loop_state);
    }
    let mut ids = track_ids(&touched, reconciler, state, loop_state);
    ids.touched = loop_state.synced.then_some(touched);
    loop_state.synced = true;
    let desired = loop_state.model.desired();
    if report.added + report.updated + report.removed > LARGE_SYNC {
        release_free_memory();
    }
    if report.added + report.updated + report.removed > 0 || !report.failed.is_empty() {
        tracing::info!(
            services = desired.services.len(),
            added = report.added,
            updated = report.updated,
            removed = report.removed,
            map_writes = report.map_writes,
            sync_us = took.as_micros() as u64,
            latency_us = snapshot.changed_at.elapsed().as_micros() as u64,
            "sync complete"
        );
    } else {
        tracing::debug!(
            services = desired.services.len(),
            "sync complete, nothing changed"
        );
    }
    ids
}

/// One line per changed frontend, naming its service (not on the first sync, which would print
/// every service of the cluster).
fn log_changed_services(frontends: &BTreeSet<Frontend>, loop_state: &LoopState) {
    for frontend in frontends {
        match loop_state.model.desired().services.get(frontend) {
            Some(service) => tracing::info!(
                service = %service.name,
                %frontend,
                backends = service.backends.len(),
                "service programmed"
            ),
            None => {
                let was = loop_state
                    .ids
                    .get(frontend)
                    .and_then(|id| {
                        loop_state
                            .labels
                            .lock()
                            .expect("labels lock")
                            .get(id)
                            .cloned()
                    })
                    .map(|l| format!("{}/{}:{}", l.namespace, l.name, l.port))
                    .unwrap_or_default();
                tracing::info!(service = %was, %frontend, "service removed");
            }
        }
    }
}

/// Names the touched frontends in the names map (all of them, and only them, on the first
/// sync), for `lb-agent list`.
fn record_names(
    names: &mut NamesMap,
    touched: &Option<Vec<Frontend>>,
    loop_state: &LoopState,
) -> anyhow::Result<()> {
    let desired = &loop_state.model.desired().services;
    let key = |frontend: &Frontend| NameKey {
        frontend: service_key(frontend),
        kind: frontend_kinds::CLUSTER_IP,
        pad: [0; 3],
    };
    match touched {
        None => {
            let wanted = desired
                .iter()
                .map(|(frontend, service)| (key(frontend), service.name.to_string()))
                .collect();
            names.sync_kind(frontend_kinds::CLUSTER_IP, None, &wanted)
        }
        Some(touched) => {
            for frontend in touched {
                match desired.get(frontend) {
                    Some(service) => names.put(key(frontend), &service.name.to_string())?,
                    None => names.remove(&key(frontend)),
                }
            }
            Ok(())
        }
    }
}

/// Follows the service id of each touched frontend, keeping the metric labels of each id.
fn track_ids(
    touched: &[Frontend],
    reconciler: &Reconciler,
    state: &AgentState,
    loop_state: &mut LoopState,
) -> IdChanges {
    let mut ids = IdChanges::default();
    for frontend in touched {
        let before = loop_state.ids.get(frontend).copied();
        let now = reconciler.service_id(frontend);
        if before != now
            && let Some(old) = before
        {
            loop_state.ids.remove(frontend);
            let removed = loop_state.labels.lock().expect("labels lock").remove(&old);
            if let Some(labels) = removed {
                state.metrics.forwarded.remove(&labels);
                state.metrics.refused.remove(&labels);
            }
            ids.removed.push(old);
        }
        let (Some(id), Some(service)) = (now, loop_state.model.desired().services.get(frontend))
        else {
            continue;
        };
        if before != now {
            ids.added.push(id);
        }
        loop_state.ids.insert(*frontend, id);
        loop_state.labels.lock().expect("labels lock").insert(
            id,
            ServiceLabels {
                namespace: service.name.namespace.clone(),
                name: service.name.name.clone(),
                port: service.name.port.clone(),
                frontend: frontend.to_string(),
            },
        );
    }
    ids
}

fn record_sync(state: &AgentState, desired: &DesiredState, report: &SyncReport, took: Duration) {
    let metrics = &state.metrics;
    metrics.sync_duration.observe(took.as_secs_f64());
    let now = SystemTime::now();
    let unix = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    metrics.last_sync_timestamp.set(unix.as_secs_f64());
    let backends: usize = desired.services.values().map(|s| s.backends.len()).sum();
    metrics.services.set(desired.services.len() as i64);
    metrics.backends.set(backends as i64);
    if !report.failed.is_empty() {
        metrics
            .errors
            .get_or_create(&api::metrics::ErrorLabels {
                kind: "map_write".into(),
            })
            .inc_by(report.failed.len() as u64);
    }
    for (map, entries) in [
        (lb_common::map_names::SERVICES_V4, desired.services.len()),
        (lb_common::map_names::BACKENDS_V4, backends),
    ] {
        metrics
            .map_entries
            .get_or_create(&api::metrics::MapLabels { map: map.into() })
            .set(entries as i64);
    }
    let mut health = state.health.lock().expect("health lock");
    health.last_updated = Some(now);
    health.pending_since = None;
}

/// The capacity of each map as the kernel reports it (a `--max-*` flag shows once it took
/// effect).
fn record_capacities(state: &AgentState, capacities: &BTreeMap<String, u32>) {
    for (map, capacity) in capacities {
        state
            .metrics
            .map_capacity
            .get_or_create(&api::metrics::MapLabels { map: map.clone() })
            .set(i64::from(*capacity));
    }
}

/// kube-proxy's network programming latency: from each changed EndpointSlice's
/// `last-change-trigger-time` annotation to now, when the maps serve it; slices without the
/// annotation (hand-written ones) count from when the change was noticed.
fn record_programming_latency(snapshot: &Snapshot, changed: &[ObjectKey], state: &AgentState) {
    let now = jiff::Timestamp::now();
    for key in changed {
        let trigger = snapshot
            .objects
            .endpoint_slices
            .get(key)
            .and_then(|slice| slice.metadata.annotations.as_ref())
            .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
            .and_then(|t| t.parse::<jiff::Timestamp>().ok());
        let latency = trigger
            .and_then(|at| now.duration_since(at).try_into().ok())
            .unwrap_or_else(|| snapshot.changed_at.elapsed());
        state
            .metrics
            .network_programming
            .observe(latency.as_secs_f64());
    }
}

/// Reads the per-CPU counters of every labelled service, for a `/metrics` scrape.
fn counter_reader(
    stats: Arc<std::sync::Mutex<ServiceStatsMap>>,
    labels: Arc<std::sync::Mutex<BTreeMap<u32, ServiceLabels>>>,
) -> api::CounterReader {
    Box::new(move || {
        let counts = stats.lock().expect("stats lock").read();
        let labels = labels.lock().expect("labels lock");
        counts
            .into_iter()
            .filter_map(|(id, c)| Some((labels.get(&id)?.clone(), c.forwarded, c.refused)))
            .collect()
    })
}

/// Logs each problem once while it lasts.
fn report_new_problems(
    snapshot: &Snapshot,
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
    for problem in &snapshot.problems {
        if !reported.contains(problem) {
            tracing::warn!("{problem}");
            count("source");
        }
        current.insert(problem.clone());
    }
    for diagnostic in diagnostics {
        let origin = snapshot
            .origins
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
                Severity::Info => tracing::info!("{line}"),
            }
        }
        current.insert(line);
    }
    *reported = current;
}

/// Gives the memory freed after a large sync (parsed objects, intermediate states) back to
/// the system: glibc keeps freed heap in its arenas otherwise, and the agent's RSS would stay
/// at its peak.
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
