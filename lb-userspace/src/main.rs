//! The `lb-agent` command line.
use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use lb_agent::{
    agent::{self, RunConfig},
    dataplane::{Limits, nodeport::TcAttach},
    list,
    model::ProxyIdentity,
};

/// mimalloc, not glibc's malloc: after a large sync frees a million objects, glibc's malloc
/// sorts the freed chunks a few thousand at a time on later calls, and each change for
/// seconds after cost 10-20 ms instead of 0.3 ms (measured at 100,000 services).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// An eBPF replacement for kube-proxy: Service load balancing at the socket.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// More output: -v debug, -vv trace.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the programs, attach them and keep the maps equal to the source.
    Run(Box<RunArgs>),
    /// Print the programmed services from the pinned maps.
    #[command(alias = "services")]
    List {
        /// bpffs directory the agent pins under.
        #[arg(long, default_value = "/sys/fs/bpf/lb")]
        bpffs: PathBuf,
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// What is attached where, how full the maps are, the agent's source and last sync.
    Status {
        /// bpffs directory the agent pins under.
        #[arg(long, default_value = "/sys/fs/bpf/lb")]
        bpffs: PathBuf,
        /// Where the running agent serves /healthz.
        #[arg(long, default_value = "127.0.0.1:10256")]
        healthz_addr: std::net::SocketAddr,
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Detach every program and remove every pin the agent made (run on a node after the
    /// agent is stopped, to remove it for good). Refuses while an agent runs on the directory.
    Cleanup {
        /// bpffs directory the agent pins under.
        #[arg(long, default_value = "/sys/fs/bpf/lb")]
        bpffs: PathBuf,
        /// How long to wait for a running agent to exit (it holds the directory's lock).
        #[arg(long, default_value = "0s", value_parser = parse_duration, value_name = "DURATION")]
        lock_wait: Duration,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
    Yaml,
    /// `list` only: the maps without ids (frontends, backend sets, leaks), for comparing two
    /// pin directories.
    Description,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Directory of Kubernetes YAML (Services, EndpointSlices, Endpoints, Nodes) to serve
    /// instead of the API server's objects.
    #[arg(long)]
    manifests: Option<PathBuf>,
    /// Manifest files larger than this many bytes are reported and not read (their last good
    /// version is kept).
    #[arg(long, default_value_t = lb_agent::source::manifests::DEFAULT_MAX_FILE_BYTES, requires = "manifests")]
    manifest_max_bytes: u64,
    /// kubeconfig for the API server. Without it: the in-cluster service account, then
    /// KUBECONFIG or ~/.kube/config.
    #[arg(long, conflicts_with = "manifests")]
    kubeconfig: Option<PathBuf>,
    /// Milliseconds the API server may take to begin answering a request, or to deliver a
    /// whole list; past that the request fails, the source is stale, and it is retried with
    /// backoff.
    #[arg(long, default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(1..))]
    api_timeout_ms: u64,
    /// cgroup v2 directory whose processes get Service load balancing (a node's root cgroup
    /// in production, e.g. /sys/fs/cgroup).
    #[arg(long)]
    cgroup: PathBuf,
    /// bpffs directory for pinned maps; bpffs is mounted there when it is not one.
    #[arg(long, default_value = "/sys/fs/bpf/lb")]
    bpffs: PathBuf,
    /// This node's name, as in Node objects and endpoints' nodeName.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Serve only services labelled service.kubernetes.io/service-proxy-name=NAME.
    #[arg(long)]
    service_proxy_name: Option<String>,
    /// Least time between two syncs, in milliseconds; changes in between are coalesced.
    #[arg(long, default_value_t = 50)]
    min_sync_interval_ms: u64,
    /// Capacity of the frontends map (every ClusterIP, NodePort, externalIP and LoadBalancer
    /// IP port, per protocol, with a second entry for `Local` external policies).
    #[arg(long, default_value_t = Limits::default().max_services)]
    max_services: u32,
    /// Capacity of the backends map (backends over all services).
    #[arg(long, default_value_t = Limits::default().max_backends)]
    max_backends: u32,
    /// Capacity of the session-affinity map.
    #[arg(long, default_value_t = Limits::default().max_affinity)]
    max_affinity: u32,
    /// Capacity of the reverse-translation map (open UDP/TCP sockets to services).
    #[arg(long, default_value_t = Limits::default().max_revnat)]
    max_revnat: u32,
    /// Capacity of the Maglev map: backend sets that outside traffic reaches (64 KiB each,
    /// allocated on use).
    #[arg(long, default_value_t = Limits::default().max_maglev_tables)]
    max_maglev_tables: u32,
    /// Capacity of the conntrack map of outside flows (XDP; LRU, the reverse map gets three
    /// entries per flow).
    #[arg(long, default_value_t = Limits::default().max_flows)]
    max_flows: u32,
    /// Where to serve Prometheus metrics and /proxyMode (kube-proxy's port); `off` for none.
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_addr: String,
    /// Where to serve /healthz and /livez (kube-proxy's port); `off` for none.
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_addr: String,
    /// Log every translation and refusal the socket programs make (aya-log, target lb_ebpf).
    /// For debugging: it costs a ring-buffer write per connection.
    #[arg(long)]
    bpf_log: bool,
    /// On SIGTERM, detach the programs and remove the pins (by default they stay, so traffic
    /// keeps flowing through an agent restart or upgrade).
    #[arg(long)]
    cleanup_on_exit: bool,
    /// Serve NodePorts, externalIPs and LoadBalancer IPs to traffic arriving on IFACE (XDP
    /// ingress, tc egress for replies); repeatable. Without it, no north-south data path.
    #[arg(long = "nodeport-iface", value_name = "IFACE")]
    nodeport_ifaces: Vec<String>,
    /// Answer NodePorts only on the node's addresses inside CIDR, or on its primary IP with
    /// `primary` (its Node's first InternalIP, else ExternalIP, of each family), as
    /// kube-proxy's --nodeport-addresses, per family: a family no CIDR (nor `primary`) names
    /// answers on all its addresses; repeatable, comma-separated. Default: every address of
    /// the node (from outside, as it arrives on a --nodeport-iface; from pods and the node
    /// itself, at the socket).
    #[arg(
        long = "nodeport-addresses",
        value_name = "CIDR|primary",
        value_delimiter = ','
    )]
    nodeport_addresses: Vec<lb_agent::agent::interfaces::NodePortAddress>,
    /// Pods and host processes reach NodePorts at 127.0.0.1 and ::1 too (kube-proxy's
    /// --iptables-localhost-nodeports); `--localhost-nodeports=false` turns it off.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    localhost_nodeports: bool,
    /// A process of the node binding a port served to outside traffic (a NodePort on any
    /// address, an externalIP or LoadBalancer IP at its port, same protocol) gets EADDRINUSE
    /// (Cilium's bind protection); `--bind-protection=false` turns it off.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    bind_protection: bool,
    /// The cluster's NodePort range (kube-apiserver's --service-node-port-range), reserved
    /// with the SNAT ports against ephemeral use (see --reserve-ports). A NodePort outside it
    /// is served all the same.
    #[arg(long, default_value = "30000-32767", value_name = "A-B")]
    nodeport_range: lb_agent::agent::reserved_ports::PortRange,
    /// At start, add --nodeport-range and the SNAT ports (61000-65535) to
    /// net.ipv4.ip_local_reserved_ports of the agent's network namespace, keeping the entries
    /// there, so the kernel hands none of them out as ephemeral ports;
    /// `--reserve-ports=false` leaves the sysctl alone.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    reserve_ports: bool,
    /// The ip_local_reserved_ports sysctl file --reserve-ports writes. A container's /proc/sys
    /// is read-only unless it is privileged: the DaemonSet mounts the node's /proc/sys/net
    /// elsewhere and names the file there.
    #[arg(
        long,
        default_value = lb_agent::agent::reserved_ports::SYSCTL,
        value_name = "PATH"
    )]
    reserved_ports_sysctl: PathBuf,
    /// Start even when capabilities the agent needs are missing, so the kernel's own refusal
    /// shows where it comes (the capability trials of tests/least_privilege.rs).
    #[arg(long, hide = true)]
    skip_capability_check: bool,
    /// Also destroy TCP connections a socket program sent to a backend that is now gone
    /// (Cilium's socket termination for TCP); connected UDP sockets of a removed backend are
    /// always destroyed, as kube-proxy clears their conntrack entries.
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set, value_name = "BOOL")]
    terminate_tcp: bool,
    /// When another agent holds the --bpffs directory (one agent per node: a second one would
    /// cross-wire services), wait this long for it to exit, then take over; e.g. `60s` in a
    /// DaemonSet, where the old pod may still be terminating. `0s`: fail at once, naming it.
    #[arg(long, default_value = "0s", value_parser = parse_duration, value_name = "DURATION")]
    lock_wait: Duration,
    /// How the tc egress program is attached: `tcx` (a bpf link, pinned; kernel 6.6+),
    /// `netlink` (a clsact filter at a fixed priority and handle, replaced in place by the next
    /// agent), or `auto` (tcx where the kernel has it).
    #[arg(long, value_enum, default_value_t = TcAttach::Auto, value_name = "MODE")]
    tc_attach: TcAttach,
}

/// A duration as `60s`, `2m`, `1m30s` or `500ms`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let span: jiff::SignedDuration = text
        .parse()
        .map_err(|e| format!("{text:?} is not a duration like 60s or 2m: {e}"))?;
    Duration::try_from(span).map_err(|_| format!("{text:?}: a duration may not be negative"))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    if matches!(&cli.command, Command::Run(args) if args.bpf_log) {
        filter = filter.add_directive("lb_ebpf=debug".parse()?);
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Run(args) => run(*args),
        Command::List { bpffs, output } => {
            if let Format::Description = output {
                let description = lb_agent::describe::describe(&bpffs)?;
                println!("{}", serde_json::to_string_pretty(&description)?);
                return Ok(());
            }
            let rows = list::rows(&bpffs)?;
            match output {
                Format::Table => {
                    println!("{}", list::table(&rows));
                    for leak in lb_agent::describe::describe(&bpffs)?.leaks {
                        eprintln!("warning: the maps hold what no frontend reaches: {leak}");
                    }
                }
                Format::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
                Format::Yaml => print!("{}", serde_yaml::to_string(&rows)?),
                Format::Description => unreachable!("printed above"),
            }
            Ok(())
        }
        Command::Status {
            bpffs,
            healthz_addr,
            output,
        } => {
            let status = lb_agent::status::collect(&bpffs, healthz_addr);
            match output {
                Format::Table => print!("{}", lb_agent::status::text(&status)),
                Format::Json => println!("{}", serde_json::to_string_pretty(&status)?),
                Format::Yaml => print!("{}", serde_yaml::to_string(&status)?),
                Format::Description => anyhow::bail!("`-o description` is for `list` only"),
            }
            Ok(())
        }
        Command::Cleanup { bpffs, lock_wait } => {
            // Not beside a live agent: it would recreate what is removed, or lose its maps.
            let _lock = if bpffs.is_dir() {
                Some(
                    lb_agent::dataplane::lock::DirLock::acquire(&bpffs, lock_wait, |holder| {
                        tracing::warn!(%holder, "an agent holds the pin directory; waiting")
                    })
                    .context("cleanup refused")?,
                )
            } else {
                None
            };
            lb_agent::dataplane::bpffs::PinDir::at(&bpffs).remove_all()?;
            eprintln!(
                "removed every link and map pinned under {}",
                bpffs.display()
            );
            Ok(())
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let node_name = match args.node_name {
        Some(name) => name,
        None => hostname().context("no --node-name, NODE_NAME or hostname")?,
    };
    let config = RunConfig {
        manifests: args.manifests,
        manifest_max_bytes: args.manifest_max_bytes,
        kubeconfig: args.kubeconfig,
        api_timeout: lb_agent::source::kube::ApiTimeout(Duration::from_millis(args.api_timeout_ms)),
        cgroup: args.cgroup,
        bpffs: args.bpffs,
        identity: ProxyIdentity {
            node_name,
            service_proxy_name: args.service_proxy_name,
        },
        limits: Limits {
            max_services: args.max_services,
            max_backends: args.max_backends,
            max_affinity: args.max_affinity,
            max_revnat: args.max_revnat,
            max_maglev_tables: args.max_maglev_tables,
            max_flows: args.max_flows,
        },
        min_sync_interval: Duration::from_millis(args.min_sync_interval_ms),
        cleanup_on_exit: args.cleanup_on_exit,
        kernel_log: args.bpf_log,
        metrics_addr: listen_address("--metrics-addr", &args.metrics_addr)?,
        healthz_addr: listen_address("--healthz-addr", &args.healthz_addr)?,
        nodeport: lb_agent::agent::interfaces::NodeportConfig {
            interfaces: args.nodeport_ifaces,
            addresses: args.nodeport_addresses,
            localhost: args.localhost_nodeports,
            tc_attach: args.tc_attach,
        },
        bind_protection: args.bind_protection,
        nodeport_range: args.nodeport_range,
        reserve_ports: args.reserve_ports,
        reserved_ports_sysctl: args.reserved_ports_sysctl,
        check_capabilities: !args.skip_capability_check,
        terminate_tcp: args.terminate_tcp,
        lock_wait: args.lock_wait,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(agent::run(config));
    // The data path is in the kernel: nothing left in the runtime (an HTTP connection, a
    // watch) may hold up the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    outcome
}

/// `off` or an `IP:PORT` to listen on.
fn listen_address(flag: &str, value: &str) -> anyhow::Result<Option<std::net::SocketAddr>> {
    if value == "off" {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .with_context(|| format!("{flag} {value:?} is not IP:PORT or off"))
}

fn hostname() -> anyhow::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/hostname")?
        .trim()
        .to_owned())
}
