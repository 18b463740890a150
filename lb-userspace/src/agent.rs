//! `lb-agent run`: source → desired state → diff → maps, until SIGTERM.
use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use crate::{
    dataplane::{Dataplane, Limits, bpffs::PinDir, privileges},
    model::{self, Diagnostic, ProxyIdentity, Severity},
    reconcile::Reconciler,
    source::{Snapshot, manifests},
};

/// Everything `run` needs.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub manifests: PathBuf,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub identity: ProxyIdentity,
    pub limits: Limits,
    /// Least time between two syncs; changes arriving meanwhile are coalesced.
    pub min_sync_interval: Duration,
    /// On SIGTERM, detach the programs and remove the pins. Off by default: a DaemonSet
    /// rollout stops the old agent while traffic must keep flowing.
    pub cleanup_on_exit: bool,
}

pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    privileges::check()?;
    privileges::raise_memlock_limit();
    let pins = PinDir::prepare(&config.bpffs)?;
    let mut dataplane = Dataplane::load(pins.clone(), config.limits)?;
    let mut maps = dataplane.service_maps()?;
    let mut reconciler = Reconciler::adopt(&mut maps).context("adopting the pinned maps")?;
    if !reconciler.is_empty() {
        tracing::info!(
            services = reconciler.len(),
            "adopted maps pinned by an earlier agent"
        );
    }

    let (snapshots_tx, mut snapshots) = watch::channel::<Option<Arc<Snapshot>>>(None);
    let source = tokio::spawn(manifests::watch(config.manifests.clone(), snapshots_tx));
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut attached = false;
    let mut reported = BTreeSet::new();

    loop {
        tokio::select! {
            changed = snapshots.changed() => {
                if changed.is_err() {
                    break;
                }
                let Some(snapshot) = snapshots.borrow_and_update().clone() else {
                    continue;
                };
                sync(&snapshot, &config, &mut reconciler, &mut maps, &mut reported);
                if !attached {
                    // Attach only once the maps hold the first full state, so no connect sees
                    // a half-programmed data path.
                    for (program, outcome) in dataplane.attach_cgroup(&config.cgroup)? {
                        tracing::info!(program, ?outcome, "program in place");
                    }
                    attached = true;
                    tracing::info!(cgroup = %config.cgroup.display(), "socket programs attached");
                }
                tokio::time::sleep(config.min_sync_interval).await;
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    source.abort();
    drop(maps);
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
    match source.await {
        Err(e) if !e.is_cancelled() => tracing::warn!(error = %e, "source task failed"),
        Ok(Err(e)) => tracing::warn!(error = %e, "source failed"),
        _ => {}
    }
    Ok(())
}

/// One pass: snapshot → desired state → map writes, logging what changed.
fn sync(
    snapshot: &Snapshot,
    config: &RunConfig,
    reconciler: &mut Reconciler,
    maps: &mut crate::dataplane::BpfServiceMaps,
    reported: &mut BTreeSet<String>,
) {
    let started = Instant::now();
    let (desired, diagnostics) = model::build(&snapshot.objects, &config.identity);
    report_new_problems(snapshot, &diagnostics, reported);
    let report = reconciler.sync(&desired, maps);
    for (frontend, error) in &report.failed {
        tracing::error!(%frontend, %error, "could not program this service; what was programmed before stays");
    }
    if report.added + report.updated + report.removed > 0 || !report.failed.is_empty() {
        tracing::info!(
            services = desired.services.len(),
            added = report.added,
            updated = report.updated,
            removed = report.removed,
            map_writes = report.map_writes,
            sync_us = started.elapsed().as_micros() as u64,
            latency_us = snapshot.changed_at.elapsed().as_micros() as u64,
            "sync complete"
        );
    } else {
        tracing::debug!(
            services = desired.services.len(),
            "sync complete, nothing changed"
        );
    }
}

/// Logs each problem once while it lasts (a bad file is not re-reported on every sync).
fn report_new_problems(
    snapshot: &Snapshot,
    diagnostics: &[Diagnostic],
    reported: &mut BTreeSet<String>,
) {
    let mut current = BTreeSet::new();
    for problem in &snapshot.problems {
        if !reported.contains(problem) {
            tracing::warn!("{problem}");
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
                Severity::Warning => tracing::warn!("{line}"),
                Severity::Info => tracing::info!("{line}"),
            }
        }
        current.insert(line);
    }
    *reported = current;
}
