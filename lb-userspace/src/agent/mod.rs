//! `lb-agent run`: source → desired state → diff → maps, until SIGTERM. This module is the
//! loop (load, adopt, start the source, coalesce changes, attach once the maps hold the first
//! state, shut down); [`sync`] is the one pass that programs every frontend kind, and
//! [`interfaces`] the node's NodePort interfaces.
pub mod drops;
pub mod interfaces;
pub mod reserved_ports;
pub mod sync;
pub mod terminate;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    api::{self, AgentState, service_health::ServiceHealthServers},
    dataplane::{Dataplane, Limits, bpffs::PinDir, privileges, reasons::ReasonCounters},
    model::ProxyIdentity,
    reconcile::Reconciler,
    source::{self, DeltaSender, kube, manifests},
};
use interfaces::{NodeInterfaces, NodeportConfig};
use sync::SyncPass;

/// Everything `run` needs.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Serve this manifest directory; `None` reads the API server.
    pub manifests: Option<PathBuf>,
    /// Manifest files larger than this are reported and not read.
    pub manifest_max_bytes: u64,
    /// The API server's kubeconfig; `None` is in-cluster, then `KUBECONFIG`.
    pub kubeconfig: Option<PathBuf>,
    /// How long the API server may take to begin an answer, or to deliver a whole list.
    pub api_timeout: kube::ApiTimeout,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub identity: ProxyIdentity,
    pub limits: Limits,
    /// Least time between two syncs; changes arriving meanwhile are coalesced. A change on
    /// an idle agent (none synced for this long) is synced at once.
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
    /// Outside traffic (NodePort, externalIPs, LB IPs) in XDP on these interfaces.
    pub nodeport: NodeportConfig,
    /// Binding a served NodePort, externalIP or LoadBalancer IP port fails (post_bind4, post_bind6).
    pub bind_protection: bool,
    /// The cluster's NodePort range (the apiserver's `--service-node-port-range`).
    pub nodeport_range: reserved_ports::PortRange,
    /// Add the NodePort range and the SNAT ports to `ip_local_reserved_ports` at start.
    pub reserve_ports: bool,
    /// The `ip_local_reserved_ports` file to write ([`reserved_ports::SYSCTL`] by default).
    pub reserved_ports_sysctl: PathBuf,
    /// Refuse to start, naming them, when capabilities of [`privileges::NEEDED`] are missing.
    pub check_capabilities: bool,
    /// Destroy TCP connections of removed backends too (connected UDP sockets always).
    pub terminate_tcp: bool,
    /// How long to wait for another agent holding the pin directory's lock to exit.
    pub lock_wait: Duration,
}

pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    if config.check_capabilities {
        privileges::check()?;
    }
    privileges::raise_memlock_limit();
    // One agent per pin directory, before anything of the node is touched (the ports to
    // reserve and serve on too: an old agent still running holds them).
    let (pins, _lock) = tokio::task::block_in_place(|| {
        PinDir::prepare_locked(&config.bpffs, config.lock_wait, |holder| {
            tracing::warn!(
                bpffs = %config.bpffs.display(),
                %holder,
                wait = ?config.lock_wait,
                "another agent holds the pin directory; waiting for it to exit"
            )
        })
    })?;
    tracing::info!(bpffs = %pins.root().display(), "pin directory locked");
    if config.reserve_ports {
        reserved_ports::reserve(
            &config.reserved_ports_sysctl,
            &[config.nodeport_range, reserved_ports::SNAT_RANGE],
        );
    }
    let state = AgentState::new(source_description(&config));
    api::serve(state.clone(), config.metrics_addr, config.healthz_addr).await?;
    let mut dataplane = Dataplane::load_with_log(pins.clone(), config.limits, config.kernel_log)?;
    if config.kernel_log {
        dataplane.start_kernel_log()?;
    }
    let mut maps = dataplane.service_maps()?;
    let mut reconciler = Reconciler::adopt(&mut maps).context("adopting the pinned maps")?;
    let (service_ids, backend_ids) = dataplane.flow_id_high_water()?;
    reconciler.reserve_ids(service_ids, backend_ids);
    if !reconciler.is_empty() {
        tracing::info!(
            frontends = reconciler.len(),
            "adopted maps pinned by an earlier agent"
        );
    }
    // Subscribed before the first read, so no change falls between the two.
    let mut address_changes = interfaces::address_changes()?;
    let mut interfaces = NodeInterfaces::start(&mut dataplane, config.nodeport.clone())?;
    state.health.lock().expect("health lock").socket_termination =
        terminate::SocketTerminator::describe(config.terminate_tcp).to_owned();
    let terminator =
        terminate::SocketTerminator::new(&config.cgroup, pins.maps(), config.terminate_tcp);
    let mut pass = SyncPass::new(
        &config.identity,
        reconciler,
        maps,
        dataplane.names()?,
        dataplane.service_stats()?,
        interfaces
            .serves_outside_traffic()
            .then(|| ServiceHealthServers::new(state.clone())),
    );
    record_capacities(&state, &dataplane.capacities());
    *state.counters.lock().expect("counters lock") = Some(pass.counter_reader());
    match ReasonCounters::open_pinned(&pins.maps()) {
        Ok(counters) => {
            *state.reasons.lock().expect("reasons lock") = Some(reason_reader(counters))
        }
        Err(error) => tracing::warn!(
            error = %format!("{error:#}"),
            "lb_datapath_packets_total will not be served"
        ),
    }

    let drops = tokio::spawn(drops::warn_on_drops(pins.maps()));
    let (deltas_tx, mut deltas) = mpsc::unbounded_channel();
    let mut source = start_source(&config, deltas_tx, state.clone()).await?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut attached = false;
    let mut next_sync = tokio::time::Instant::now();

    let outcome = loop {
        tokio::select! {
            delta = source::recv_coalesced(&mut deltas) => {
                let Some(mut delta) = delta else {
                    break Ok(());
                };
                state.health.lock().expect("health lock").change_arrived(SystemTime::now());
                // Coalesce: within the minimum interval of the last sync, wait it out and take
                // every change that came meanwhile; an idle agent syncs at once.
                if tokio::time::Instant::now() < next_sync {
                    tokio::time::sleep_until(next_sync).await;
                    while let Ok(later) = deltas.try_recv() {
                        delta.merge(later);
                    }
                }
                terminator.spawn(pass.run(&delta, &state));
                drop(delta);
                state.follow_node_of(pass.objects(), &config.identity);
                interfaces.set_primary(pass.node_ips());
                interfaces.attach_once(&mut dataplane)?;
                if !attached {
                    // Attach only once the maps hold the first full state, so no connect sees
                    // a half-programmed data path.
                    let programs =
                        dataplane.attach_cgroup(&config.cgroup, config.bind_protection)?;
                    for (program, outcome) in programs {
                        tracing::info!(program, ?outcome, "program in place");
                    }
                    attached = true;
                    tracing::info!(cgroup = %config.cgroup.display(), "socket programs attached");
                }
                next_sync = tokio::time::Instant::now() + config.min_sync_interval;
            }
            Some(()) = address_changes.recv() => interfaces.follow_addresses(),
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
    drops.abort();
    drop(interfaces);
    state.counters.lock().expect("counters lock").take();
    state.reasons.lock().expect("reasons lock").take();
    drop(pass);
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
    deltas: DeltaSender,
    state: Arc<AgentState>,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    if let Some(dir) = &config.manifests {
        if !dir.is_dir() {
            bail!("--manifests {} is not a directory", dir.display());
        }
        return Ok(tokio::spawn(manifests::watch(
            dir.clone(),
            config.manifest_max_bytes,
            deltas,
        )));
    }
    let health = kube::SourceHealth::new();
    let client = kube::client(config.kubeconfig.as_deref(), &health, config.api_timeout).await?;
    tokio::spawn(kube::SourceHealth::log_transitions(health.subscribe()));
    tokio::spawn(api::health::follow_staleness(health.subscribe(), state));
    let source = kube::watch(client, config.identity.clone(), deltas, health);
    Ok(tokio::spawn(source))
}

/// Reads why XDP and tc dropped or passed packets, for a `/metrics` scrape.
fn reason_reader(counters: ReasonCounters) -> api::ReasonReader {
    Box::new(move || {
        counters
            .read()
            .into_iter()
            .map(|count| {
                let labels = api::metrics::DatapathLabels {
                    program: count.program.into(),
                    reason: count.reason.into(),
                };
                (labels, count.packets)
            })
            .collect()
    })
}

/// The capacity of each map as the kernel reports it (a `--max-*` flag shows once it took
/// effect).
fn record_capacities(state: &AgentState, capacities: &std::collections::BTreeMap<String, u32>) {
    for (map, capacity) in capacities {
        state
            .metrics
            .map_capacity
            .get_or_create(&api::metrics::MapLabels { map: map.clone() })
            .set(i64::from(*capacity));
    }
}
