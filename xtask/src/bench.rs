//! `cargo xtask bench [--quick]`: lb-agent against kube-proxy's iptables and nftables layouts,
//! side by side, on this machine, inside namespaces it makes and removes (see
//! docs/benchmarks.md for the method and a full run's numbers).
//!
//! Arms: **D** the client talks to a backend pod IP directly; **E** ours, through the ClusterIP
//! (socket LB; the client runs in the agent's cgroup); **I** kube-proxy's iptables layout
//! loaded with `iptables-restore` in the client's namespace, the measured service last in
//! `KUBE-SERVICES` (worst case), **I-rand** the same rules, a service at a random position;
//! **N** kube-proxy's nftables layout. Every arm measured round by round, interleaved (the arm
//! order rotates each round), medians with min and max.
//!
//! Benchmarks, at each N (background services × 10 endpoints, plus the measured ones):
//! 1 connection cost (TCP_CRR rate, p50, p99; TCP_RR), 2 UDP request/reply, 3 hook cost
//! (run_time_ns/run_cnt of each socket program), 4 programming time (all from nothing, one
//! endpoint change; agent vs full and partial iptables-restore vs nft; the agent's bpf()
//! syscalls), 5 network programming latency, 6 churn under load, 7 the XDP program with
//! BPF_PROG_TEST_RUN, 8 agent memory and CPU and map memory.

mod bpf;
mod chart;
mod cluster;
mod kube;
mod report;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, host};
use cluster::{BACKENDS, Cluster, field};
use kube::{POD_PORT, SERVICE_PORT, Svc};
use report::Results;

#[derive(clap::Args)]
pub struct Args {
    /// Small N and short runs (a minute or two): checks every benchmark runs and yields numbers.
    #[arg(long)]
    pub quick: bool,
    /// Numbers of background services, comma-separated (default 1,1000,10000,50000; quick 1,1000).
    #[arg(long, value_delimiter = ',')]
    pub services: Vec<usize>,
    /// Rounds per measurement (default 5; quick 3).
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Length of one measurement run in ms (default 2000; quick 200).
    #[arg(long)]
    pub duration_ms: Option<u64>,
    /// The N at which benchmarks 5 and 6 run (default 10000; quick: the largest N).
    #[arg(long)]
    pub latency_n: Option<usize>,
    /// Changes in benchmark 5 (default 100; quick 10).
    #[arg(long)]
    pub changes: Option<usize>,
    /// Where the table, JSON and chart go (default bench/results in the workspace).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Use the binaries already built instead of `cargo build --release`.
    #[arg(long)]
    pub no_build: bool,
    /// The iptables of arm I: `iptables` (the system's default), `iptables-nft` or
    /// `iptables-legacy` (iptables-nft-restore takes minutes at 10,000 services).
    #[arg(long, default_value = "iptables")]
    pub iptables: String,
    /// Leave arm N (nftables) out above this many services: `nft -f` (nftables 1.0.6) takes
    /// time quadratic in the number of chains (about a minute at 10,000 services here).
    #[arg(long, default_value_t = 10_000)]
    pub nft_max: usize,
    /// Leave arm I (iptables) out above this many services (at 50,000 × 10 endpoints
    /// `iptables-legacy-restore` failed at COMMIT after ~5 minutes here).
    #[arg(long, default_value_t = usize::MAX)]
    pub iptables_max: usize,
    /// Run only benchmark 7 (XDP).
    #[arg(long)]
    pub xdp_only: bool,
}

static IPTABLES: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The iptables binary of arm I (`iptables`, `iptables-nft` or `iptables-legacy`).
pub fn ipt() -> &'static str {
    IPTABLES.get().map_or("iptables", String::as_str)
}

fn ipt_restore() -> String {
    format!("{}-restore", ipt())
}

struct Plan {
    ns: Vec<usize>,
    rounds: usize,
    dur_ms: u64,
    latency_n: usize,
    changes: usize,
    change_interval_ms: u64,
    /// One-change measurements per round in benchmark 4.
    toggles: usize,
    churn_ms: u64,
    quick: bool,
    nft_max: usize,
    iptables_max: usize,
}

impl Plan {
    fn from(args: &Args) -> Plan {
        let q = args.quick;
        let ns = if !args.services.is_empty() {
            args.services.clone()
        } else if q {
            vec![1, 1000]
        } else {
            vec![1, 1000, 10_000, 50_000]
        };
        let latency_n = args.latency_n.unwrap_or(if q {
            *ns.iter().max().unwrap_or(&1)
        } else {
            10_000
        });
        Plan {
            rounds: args.rounds.unwrap_or(if q { 3 } else { 5 }).max(1),
            dur_ms: args.duration_ms.unwrap_or(if q { 200 } else { 2000 }),
            latency_n,
            changes: args.changes.unwrap_or(if q { 10 } else { 100 }),
            change_interval_ms: if q { 120 } else { 250 },
            toggles: if q { 2 } else { 4 },
            churn_ms: if q { 600 } else { 3000 },
            quick: q,
            nft_max: args.nft_max,
            iptables_max: args.iptables_max,
            ns,
        }
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C and SIGTERM set a flag that the loops check, so everything unwinds through the
/// Drop guards (namespaces, cgroup, agent, bpffs, sysctl) instead of dying in place.
fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_interrupted()?;
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
    Ok(())
}

const TITLES: [(&str, &str); 8] = [
    ("1", "1. Connection cost (TCP_CRR and TCP_RR), ratio to D"),
    (
        "2",
        "2. UDP request/reply through the ClusterIP, ratio to D",
    ),
    (
        "3",
        "3. Hook cost: run_time_ns / run_cnt of each socket program during benchmark 1",
    ),
    ("4", "4. Programming time, ratio to the agent (E)"),
    (
        "5",
        "5. Network programming latency (change written → first/last connection)",
    ),
    (
        "6",
        "6. Churn under load (CRR while the measured service's endpoints change)",
    ),
    ("7", "7. XDP program, BPF_PROG_TEST_RUN ns per packet"),
    ("8", "8. Memory and CPU"),
];

pub fn run(args: &Args) -> Result<()> {
    if !host::is_root() {
        bail!("`cargo xtask bench` must run as root: it creates namespaces and loads BPF programs");
    }
    lb_testkit::require_root()?;
    install_signal_handlers();
    if !["iptables", "iptables-nft", "iptables-legacy"].contains(&args.iptables.as_str()) {
        bail!("--iptables takes iptables, iptables-nft or iptables-legacy");
    }
    let _ = IPTABLES.set(args.iptables.clone());
    let mut plan = Plan::from(args);
    if args.xdp_only {
        plan.ns.clear();
    }
    let started = Instant::now();
    ensure_tools()?;
    let (agent_bin, bench_bin, profile) = build(args.no_build)?;
    let machine = Machine::probe(&profile);
    println!("bench: {}", machine.describe());

    let out = args
        .out
        .clone()
        .unwrap_or_else(|| host::workspace_root().join("bench/results"));
    let mut res = Results::default();
    declare_units(&mut res);
    {
        let _stats = bpf::StatsGuard::enable()?;
        let mut cluster = Cluster::new(&bench_bin, &agent_bin)?;
        for &n in &plan.ns {
            check_interrupted()?;
            println!("\nbench: N = {n} ({:.0?} so far)", started.elapsed());
            at_n(&mut cluster, n, &plan, &mut res).with_context(|| format!("at N = {n}"))?;
            // What is measured so far, in case a long run is cut short.
            write_outputs(&res, &plan, &machine, &out, false)?;
        }
        check_interrupted()?;
        println!("\nbench: XDP");
        if let Err(e) = xdp(&mut cluster, &plan, &mut res) {
            println!("bench: XDP not measured: {e:#}");
        }
    }

    let rows = write_outputs(&res, &plan, &machine, &out, true)?;
    println!("bench: took {:.0?}", started.elapsed());

    // Every benchmark ran and produced numbers (what --quick asserts in CI).
    let expected: &[&str] = if args.xdp_only {
        &["7"]
    } else {
        &["1", "2", "3", "4", "5", "6", "8"]
    };
    let missing: Vec<&str> = expected
        .iter()
        .copied()
        .filter(|b| {
            !rows
                .iter()
                .any(|r| r.benchmark == *b && r.median.is_finite())
        })
        .collect();
    if !missing.is_empty() {
        bail!("benchmarks without numbers: {missing:?}");
    }
    if !rows.iter().any(|r| r.benchmark == "7") {
        println!("bench: benchmark 7 (XDP) produced no numbers (see above)");
    }
    Ok(())
}

/// The markdown table (printed at the end), the JSON rows and the chart, under `out`.
fn write_outputs(
    res: &Results,
    plan: &Plan,
    machine: &Machine,
    out: &Path,
    last: bool,
) -> Result<Vec<report::Row>> {
    let rows = res.rows(&machine.kernel, &machine.iptables_backend);
    let mut md = format!(
        "## `cargo xtask bench{}` on {}\n\n{}\n",
        if plan.quick { " --quick" } else { "" },
        machine.describe(),
        method_notes(plan)
    );
    md.push_str(&headline(res, plan));
    md.push_str(&report::markdown(&rows, &TITLES));
    if last {
        println!("{md}");
    }
    std::fs::create_dir_all(out)?;
    let stem = if plan.quick { "quick" } else { "full" };
    std::fs::write(out.join(format!("{stem}.md")), &md)?;
    std::fs::write(
        out.join(format!("{stem}.json")),
        serde_json::to_string_pretty(&rows)? + "\n",
    )?;
    let png = out.join(format!("{stem}.png"));
    let title = format!("lb-agent vs kube-proxy, Linux {}", machine.kernel);
    match chart::draw(res, &plan.ns, &png, &title) {
        Ok(()) if last => println!("bench: wrote {}", png.display()),
        Ok(()) => {}
        Err(e) => println!("bench: no chart: {e:#}"),
    }
    if last {
        println!("bench: wrote {}/{stem}.md and {stem}.json", out.display());
    }
    Ok(rows)
}

fn declare_units(res: &mut Results) {
    for m in ["CRR rate", "RR rate"] {
        res.unit("1", m, "conn/s or req/s", Some("D"));
    }
    for m in ["CRR p50", "CRR p99", "RR p50", "RR p99"] {
        res.unit("1", m, "µs", Some("D"));
    }
    res.unit("1", "CRR errors", "count", None);
    for m in ["UDP connected rate", "UDP unconnected rate"] {
        res.unit("2", m, "req/s", Some("D"));
    }
    for m in ["UDP connected p50", "UDP unconnected p50"] {
        res.unit("2", m, "µs", Some("D"));
    }
    for m in [
        "all services from nothing",
        "one endpoint change",
        "remove all services",
    ] {
        res.unit("4", m, "ms", Some("E"));
    }
    for m in [
        "agent sync_us, from nothing",
        "agent sync_us, one change",
        "agent map_writes, from nothing",
        "agent map_writes, one change",
        "agent bpf() syscalls, from nothing",
        "agent bpf() syscalls, one change",
    ] {
        res.unit(
            "4",
            m,
            if m.contains("sync_us") { "ms" } else { "count" },
            None,
        );
    }
    for m in [
        "first connection on new backend",
        "last connection on removed backend",
    ] {
        res.unit("5", m, "ms", Some("E"));
    }
    res.unit("8", "agent CPU for a full sync", "ms CPU", None);
    for m in [
        "agent VmHWM",
        "agent VmRSS",
        "agent VmRSS growth over idle",
        "map memory (memlock, all maps)",
    ] {
        res.unit("8", m, "MiB", None);
    }
    res.unit("8", "map memory per service", "bytes", None);
    res.unit("8", "map memory per endpoint", "bytes", None);
}

// ------------------------------------------------------------------ setup

fn ensure_tools() -> Result<()> {
    let mut missing = Vec::new();
    for (tool, package) in [
        ("iptables-restore", "iptables"),
        ("nft", "nftables"),
        ("strace", "strace"),
        ("bpftool", "bpftool"),
        ("taskset", "util-linux"),
    ] {
        if host::find_on_path(tool).is_none() && !Path::new("/usr/sbin").join(tool).is_file() {
            missing.push(package);
        }
    }
    if !missing.is_empty() {
        println!("bench: installing {missing:?}");
        cmd::run(Command::new("apt-get").args(["update", "-q"]))?;
        cmd::run(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    Ok(())
}

fn build(no_build: bool) -> Result<(PathBuf, PathBuf, String)> {
    let root = host::workspace_root();
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |d| root.join(d));
    let dir = target.join("release");
    if !no_build {
        println!("bench: building lb-agent and lb-bench (release)");
        let mut build = host::workspace_cargo();
        build.args([
            "build",
            "--release",
            "-p",
            "lb-userspace",
            "--bin",
            "lb-agent",
            "-p",
            "lb-testkit",
            "--bin",
            "lb-bench",
        ]);
        cmd::run(&mut build)?;
    }
    let agent = dir.join("lb-agent");
    let bench = dir.join("lb-bench");
    for b in [&agent, &bench] {
        if !b.is_file() {
            bail!("{} is missing (build it, or drop --no-build)", b.display());
        }
    }
    Ok((agent, bench, "release".into()))
}

struct Machine {
    kernel: String,
    cpu: String,
    cpus: usize,
    mem_gib: f64,
    iptables: String,
    iptables_backend: String,
    nft: String,
    load: String,
    profile: String,
}

impl Machine {
    fn probe(profile: &str) -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
            })
            .unwrap_or_default();
        let cpus = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count();
        let mem_kb: f64 = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        let iptables = cmd::output(Command::new(ipt()).arg("-V"))
            .unwrap_or_default()
            .trim()
            .to_string();
        let iptables_backend = if iptables.contains("nf_tables") {
            "nf_tables"
        } else {
            "legacy"
        }
        .to_string();
        let nft = cmd::output(Command::new("nft").arg("--version"))
            .unwrap_or_default()
            .trim()
            .to_string();
        Machine {
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            cpu,
            cpus,
            mem_gib: mem_kb / 1024.0 / 1024.0,
            iptables,
            iptables_backend,
            nft,
            load: read("/proc/loadavg")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            profile: profile.into(),
        }
    }

    fn describe(&self) -> String {
        format!(
            "Linux {}, {} × {}, {:.0} GiB, {}, {}, load average at start {}, agent built {}",
            self.kernel,
            self.cpus,
            self.cpu,
            self.mem_gib,
            self.iptables,
            self.nft,
            self.load,
            self.profile
        )
    }
}

fn method_notes(plan: &Plan) -> String {
    format!(
        "Rounds: {} (arms interleaved, order rotated each round); run length {} ms; medians with \
         min and max over rounds. N = background services × 10 endpoints, plus the measured ones \
         (10 endpoints, the real backend pods). Client pinned to CPU {}, servers to CPU {}. \
         Conntrack is in use in every arm's client namespace (an `--ctstate INVALID` rule, \
         TIME_WAIT timeout 10 s), none in the servers'. BPF run-time stats are on for all arms.\n",
        plan.rounds,
        plan.dur_ms,
        cluster::CLIENT_CPU,
        cluster::SERVER_CPU
    )
}

// ------------------------------------------------------------------ the services

/// The measured services: `last` (TCP+UDP, last in KUBE-SERVICES), `rand` (TCP, at a random
/// position), `npl` (TCP, one endpoint, moved from pod to pod in benchmark 5).
struct Measured {
    last_tcp: Svc,
    last_udp: Svc,
    rand: Svc,
    npl: Svc,
}

const LAST_VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
const RAND_VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 2);
const NPL_VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 3);

impl Measured {
    fn new(backends: &[Ipv4Addr]) -> Measured {
        let svc = |name: &str, port_name: &str, protocol, vip, endpoints: Vec<Ipv4Addr>| Svc {
            name: name.into(),
            port_name: port_name.into(),
            protocol,
            vip,
            port: SERVICE_PORT,
            target_port: POD_PORT,
            endpoints,
        };
        Measured {
            last_tcp: svc("measure-last", "http", "TCP", LAST_VIP, backends.to_vec()),
            last_udp: svc("measure-last", "udp", "UDP", LAST_VIP, backends.to_vec()),
            rand: svc("measure-rand", "http", "TCP", RAND_VIP, backends.to_vec()),
            npl: svc("measure-npl", "http", "TCP", NPL_VIP, vec![backends[0]]),
        }
    }

    fn manifest(&self) -> String {
        kube::manifest(
            &[
                vec![&self.last_tcp, &self.last_udp],
                vec![&self.rand],
                vec![&self.npl],
            ],
            "bench-node",
        )
    }

    /// The iptables/nft order: background with `rand` at a random place, the others last.
    fn all(&self, background: &[Svc], seed: usize) -> Vec<Svc> {
        let mut all = background.to_vec();
        let at = if all.is_empty() {
            0
        } else {
            (seed.wrapping_mul(2_654_435_761) >> 7) % all.len()
        };
        all.insert(at, self.rand.clone());
        all.push(self.npl.clone());
        all.push(self.last_tcp.clone());
        all.push(self.last_udp.clone());
        all
    }
}

/// kube-proxy's state in one namespace: what it last wrote, to derive partial syncs.
struct KubeProxyState {
    services: Vec<Svc>,
}

impl KubeProxyState {
    fn replace(&mut self, changed: &Svc) -> Vec<Ipv4Addr> {
        let slot = self
            .services
            .iter_mut()
            .find(|s| s.name == changed.name && s.port_name == changed.port_name)
            .expect("a known service");
        std::mem::replace(slot, changed.clone()).endpoints
    }
}

fn tmpfile(cluster: &Cluster, name: &str, text: &str) -> Result<PathBuf> {
    let path = cluster.work.0.join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

const RESTORE_ARGS: [&str; 4] = ["-w", "5", "--noflush", "--counters"];

fn iptables_flush(netns: &lb_testkit::Netns) -> Result<()> {
    netns.run(&[ipt(), "-w", "-t", "nat", "-F"])?;
    netns.run(&[ipt(), "-w", "-t", "nat", "-X"])?;
    Ok(())
}

fn nft_flush(netns: &lb_testkit::Netns) {
    let _ = netns.run(&["nft", "delete", "table", "ip", "kube-proxy"]);
}

fn iptables_restore(cluster: &Cluster, netns: &lb_testkit::Netns, text: &str) -> Result<Duration> {
    let path = tmpfile(cluster, "restore.txt", text)?;
    Cluster::timed_in(netns, &ipt_restore(), &RESTORE_ARGS, &path)
}

fn nft_load(cluster: &Cluster, netns: &lb_testkit::Netns, text: &str) -> Result<Duration> {
    let path = tmpfile(cluster, "nft.txt", text)?;
    Cluster::timed_in(netns, "nft", &["-f", "-"], &path)
}

fn agent_limits(total_services: usize) -> Vec<String> {
    let backends = (total_services * 10 + 1024)
        .next_power_of_two()
        .max(262_144);
    let services = (total_services + 1024).next_power_of_two().max(65_536);
    vec![
        "--max-backends".into(),
        backends.to_string(),
        "--max-services".into(),
        services.to_string(),
        "--min-sync-interval-ms".into(),
        "0".into(),
    ]
}

// ------------------------------------------------------------------ one N

fn at_n(cluster: &mut Cluster, n: usize, plan: &Plan, res: &mut Results) -> Result<()> {
    let background: Vec<Svc> = (0..n).map(|i| kube::background(i, 10)).collect();
    let mut measured = Measured::new(&cluster.backend_ips());
    let bg_groups: Vec<Vec<&Svc>> = background.iter().map(|s| vec![s]).collect();
    let bg_manifest = kube::manifest(&bg_groups, "bench-node");
    drop(bg_groups);

    // A fresh agent with only the measured services.
    cluster.agent = None;
    let _ = std::fs::remove_file(cluster.manifests.0.join("services.json"));
    cluster.write_manifest("measured.json", &measured.manifest())?;
    cluster.start_agent(&agent_limits(n + 4))?;

    programming(
        cluster,
        n,
        plan,
        res,
        &background,
        &mut measured,
        &bg_manifest,
    )?;

    // Load the final state into the I and N client namespaces.
    let all = measured.all(&background, n);
    let t = Instant::now();
    let ipt_on = n <= plan.iptables_max;
    let cli_i = &cluster.client('I').netns;
    iptables_flush(cli_i)?;
    if ipt_on {
        iptables_restore(
            cluster,
            &cluster.client('I').netns,
            &kube::iptables_full(&all),
        )?;
        for jump in kube::IPTABLES_JUMPS {
            let mut args = vec![ipt(), "-w"];
            args.extend_from_slice(jump);
            cluster.client('I').netns.run(&args)?;
        }
    } else {
        println!("bench:   arm I left out at N = {n} (above --iptables-max)");
    }
    let nft_on = n <= plan.nft_max;
    if nft_on {
        nft_flush(&cluster.client('N').netns);
        nft_load(cluster, &cluster.client('N').netns, &kube::nft_full(&all))?;
    } else {
        println!(
            "bench:   arm N left out at N = {n} (above --nft-max {})",
            plan.nft_max
        );
    }
    println!(
        "bench:   kube-proxy rules loaded in the I and N clients ({:.1?})",
        t.elapsed()
    );
    let mut kp_i = KubeProxyState {
        services: all.clone(),
    };
    let mut kp_n = KubeProxyState { services: all };

    let mut arms = vec!["D", "E"];
    if ipt_on {
        arms.extend(["I", "I-rand"]);
    }
    if nft_on {
        arms.push("N");
    }
    connection_cost(cluster, n, plan, res, &arms)?;
    if n == plan.latency_n {
        programming_latency(cluster, n, plan, res, &mut measured, &mut kp_i, &mut kp_n)?;
        churn(cluster, n, plan, res, &mut measured, &mut kp_i, &mut kp_n)?;
    }
    Ok(())
}

/// CPU time (utime + stime, ms) of a process.
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // After the comm: state is index 0, utime 11, stime 12.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 * 1000.0 / hz
}

fn status_kb(pid: u32, key: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| {
            v.trim_start_matches(':')
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// Writes `file` (atomically) and waits for the agent's next "sync complete": (wall ms from
/// the rename to the log line, sync_us, map_writes).
fn agent_apply(cluster: &mut Cluster, file: &str, text: Option<&str>) -> Result<(f64, f64, f64)> {
    let from = cluster.agent()?.lines();
    let target = cluster.manifests.0.join(file);
    let t0 = match text {
        Some(text) => {
            let tmp = cluster.work.0.join(format!(".{file}.tmp"));
            std::fs::write(&tmp, text)?;
            let t0 = Instant::now();
            std::fs::rename(&tmp, &target)?;
            t0
        }
        None => {
            let t0 = Instant::now();
            std::fs::remove_file(&target)?;
            t0
        }
    };
    let (_, line) = cluster.agent()?.wait_line(
        from,
        "sync complete",
        "map_writes",
        Duration::from_secs(900),
    )?;
    let wall = t0.elapsed().as_secs_f64() * 1000.0;
    let sync_us = field(&line, "sync_us").unwrap_or(0) as f64;
    let writes = field(&line, "map_writes").unwrap_or(0) as f64;
    Ok((wall, sync_us / 1000.0, writes))
}

/// Benchmarks 4 and 8.
#[allow(clippy::too_many_arguments)]
fn programming(
    cluster: &mut Cluster,
    n: usize,
    plan: &Plan,
    res: &mut Results,
    background: &[Svc],
    measured: &mut Measured,
    bg_manifest: &str,
) -> Result<()> {
    let all = measured.all(background, n);
    let ipt_on = n <= plan.iptables_max;
    let full_ipt = if ipt_on {
        kube::iptables_full(&all)
    } else {
        String::new()
    };
    let nft_on = n <= plan.nft_max;
    let full_nft = if nft_on {
        kube::nft_full(&all)
    } else {
        String::new()
    };
    let mut kp = KubeProxyState { services: all };
    let prog = lb_testkit::Netns::new("lbprg")?;
    let backends = cluster.backend_ips();
    let pid = cluster.agent()?.pid();
    let rss_before = status_kb(pid, "VmRSS");
    let mut toggle = 0usize;
    // Large N: fewer from-nothing rounds (an iptables-restore of 50,000 services takes long).
    let full_rounds = if n >= 50_000 {
        plan.rounds.min(3)
    } else {
        plan.rounds
    };
    for round in 0..full_rounds {
        check_interrupted()?;
        // All N from nothing: agent, iptables (full restore into an empty nat table), nft.
        if round > 0 {
            let (ms, _, _) = agent_apply(cluster, "services.json", None)?;
            res.add("4", "remove all services", n, "E", ms);
            iptables_flush(&prog)?;
            nft_flush(&prog);
        }
        let cpu0 = cpu_ms(pid);
        let (ms, sync_ms, writes) = agent_apply(cluster, "services.json", Some(bg_manifest))?;
        let cpu = cpu_ms(pid) - cpu0;
        res.add("4", "all services from nothing", n, "E", ms);
        res.add("4", "agent sync_us, from nothing", n, "E", sync_ms);
        res.add("4", "agent map_writes, from nothing", n, "E", writes);
        res.add("8", "agent CPU for a full sync", n, "E", cpu);
        let ipt = if ipt_on {
            let ipt = iptables_restore(cluster, &prog, &full_ipt)?;
            res.add(
                "4",
                "all services from nothing",
                n,
                "I",
                ipt.as_secs_f64() * 1000.0,
            );
            ipt
        } else {
            Duration::ZERO
        };
        let nft = if nft_on {
            let nft = nft_load(cluster, &prog, &full_nft)?;
            res.add(
                "4",
                "all services from nothing",
                n,
                "N",
                nft.as_secs_f64() * 1000.0,
            );
            nft
        } else {
            Duration::ZERO
        };
        println!(
            "bench:   round {round}: from nothing: agent {ms:.1} ms (sync {sync_ms:.1} ms, {writes} writes), iptables-restore {ipt:.1?}, nft {}",
            if nft_on {
                format!("{nft:.1?}")
            } else {
                "left out".to_string()
            }
        );
        // One endpoint change beside N: measure-rand loses or regains its last endpoint.
        for _ in 0..plan.toggles {
            check_interrupted()?;
            toggle += 1;
            measured.rand.endpoints = if toggle % 2 == 1 {
                backends[..BACKENDS - 1].to_vec()
            } else {
                backends.to_vec()
            };
            let (ms, sync_ms, writes) =
                agent_apply(cluster, "measured.json", Some(&measured.manifest()))?;
            res.add("4", "one endpoint change", n, "E", ms);
            res.add("4", "agent sync_us, one change", n, "E", sync_ms);
            res.add("4", "agent map_writes, one change", n, "E", writes);
            let old = kp.replace(&measured.rand);
            if ipt_on {
                let partial = kube::iptables_partial(&kp.services, &measured.rand, &old);
                let ipt = iptables_restore(cluster, &prog, &partial)?;
                res.add(
                    "4",
                    "one endpoint change",
                    n,
                    "I",
                    ipt.as_secs_f64() * 1000.0,
                );
            }
            if !nft_on {
                continue;
            }
            let nft = nft_load(cluster, &prog, &kube::nft_partial(&measured.rand, &old))?;
            res.add(
                "4",
                "one endpoint change",
                n,
                "N",
                nft.as_secs_f64() * 1000.0,
            );
        }
        // Even toggles: measure-rand is back at its 10 endpoints.
    }
    // Memory (benchmark 8), after the full state is in.
    let hwm = status_kb(pid, "VmHWM");
    let rss = status_kb(pid, "VmRSS");
    res.add("8", "agent VmHWM", n, "E", hwm / 1024.0);
    res.add("8", "agent VmRSS", n, "E", rss / 1024.0);
    res.add(
        "8",
        "agent VmRSS growth over idle",
        n,
        "E",
        (rss - rss_before) / 1024.0,
    );
    let maps = bpf::pinned_maps(&cluster.bpffs.0);
    let total: u64 = maps.values().map(|(m, _)| m).sum();
    let services = (n + 4) as f64;
    res.add(
        "8",
        "map memory (memlock, all maps)",
        n,
        "E",
        total as f64 / 1048576.0,
    );
    res.add(
        "8",
        "map memory per service",
        n,
        "E",
        total as f64 / services,
    );
    res.add(
        "8",
        "map memory per endpoint",
        n,
        "E",
        total as f64 / (services * 10.0),
    );
    for (name, (mem, max)) in &maps {
        res.unit("8", &format!("map {name} (max_entries {max})"), "MiB", None);
        res.add(
            "8",
            &format!("map {name} (max_entries {max})"),
            n,
            "E",
            *mem as f64 / 1048576.0,
        );
    }

    // bpf() syscalls of one full sync and one change (strace attached; not timed).
    let (counts_full, counts_change) = {
        agent_apply(cluster, "services.json", None)?;
        let full = strace_bpf(cluster, |c| {
            agent_apply(c, "services.json", Some(bg_manifest)).map(|_| ())
        })?;
        toggle += 1;
        measured.rand.endpoints = backends[..BACKENDS - 1].to_vec();
        let manifest = measured.manifest();
        let change = strace_bpf(cluster, |c| {
            agent_apply(c, "measured.json", Some(&manifest)).map(|_| ())
        })?;
        measured.rand.endpoints = backends.to_vec();
        agent_apply(cluster, "measured.json", Some(&measured.manifest()))?;
        (full, change)
    };
    let _ = toggle;
    res.add(
        "4",
        "agent bpf() syscalls, from nothing",
        n,
        "E",
        counts_full.values().sum::<u64>() as f64,
    );
    res.add(
        "4",
        "agent bpf() syscalls, one change",
        n,
        "E",
        counts_change.values().sum::<u64>() as f64,
    );
    println!("bench:   bpf() syscalls: full sync {counts_full:?}; one change {counts_change:?}");
    Ok(())
}

/// Attaches strace to every thread of the agent, runs `f`, detaches: bpf() calls by command.
fn strace_bpf(
    cluster: &mut Cluster,
    f: impl FnOnce(&mut Cluster) -> Result<()>,
) -> Result<BTreeMap<String, u64>> {
    let pid = cluster.agent()?.pid();
    let out = cluster.work.0.join("strace.txt");
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-qq", "-e", "trace=bpf", "-o"]).arg(&out);
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        cmd.arg("-p").arg(task.file_name());
    }
    let mut strace = cluster::Proc(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting strace")?,
    );
    // Until strace is attached: the agent's TracerPid is set.
    let deadline = Instant::now() + Duration::from_secs(5);
    while status_kb(pid, "TracerPid") == 0.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    let result = f(cluster);
    // SAFETY: our own child; SIGINT makes strace detach and flush.
    unsafe { libc::kill(strace.0.id() as i32, libc::SIGINT) };
    let _ = strace.0.wait();
    result?;
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        if let Some(at) = line.find("bpf(") {
            let cmd: String = line[at + 4..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            *counts.entry(cmd).or_insert(0) += 1;
        }
    }
    Ok(counts)
}

// ------------------------------------------------------------------ benchmarks 1, 2, 3

fn arm_target(cluster: &Cluster, arm: &str) -> (char, Vec<String>) {
    let vip = |ip: Ipv4Addr| vec![format!("{ip}:{SERVICE_PORT}")];
    match arm {
        "D" => (
            'D',
            cluster
                .backend_ips()
                .iter()
                .map(|ip| format!("{ip}:{POD_PORT}"))
                .collect(),
        ),
        "E" => ('E', vip(LAST_VIP)),
        "I" => ('I', vip(LAST_VIP)),
        "I-rand" => ('I', vip(RAND_VIP)),
        _ => ('N', vip(LAST_VIP)),
    }
}

fn client_args(mode: &str, targets: &[String], dur_ms: u64, extra: &[&str]) -> Vec<String> {
    let mut args = vec![mode.to_string()];
    for t in targets {
        args.push("--target".into());
        args.push(t.clone());
    }
    args.push("--duration-ms".into());
    args.push(dur_ms.to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn connection_cost(
    cluster: &mut Cluster,
    n: usize,
    plan: &Plan,
    res: &mut Results,
    arms: &[&str],
) -> Result<()> {
    let progs = bpf::cgroup_programs(cluster.cgroup.path()).unwrap_or_default();
    // Warm-up: one short run per arm (ARP, caches).
    for arm in arms {
        let (c, t) = arm_target(cluster, arm);
        cluster.client_json(c, &client_args("crr", &t, 100, &[]))?;
    }
    for round in 0..plan.rounds {
        for k in 0..arms.len() {
            check_interrupted()?;
            let arm = arms[(k + round) % arms.len()];
            let (c, targets) = arm_target(cluster, arm);
            let before: Vec<(u64, u64)> = if arm == "E" {
                progs
                    .iter()
                    .map(|p| bpf::prog_stats(p.0).unwrap_or((0, 0)))
                    .collect()
            } else {
                Vec::new()
            };
            let crr = cluster.client_json(c, &client_args("crr", &targets, plan.dur_ms, &[]))?;
            if arm == "E" {
                for (p, (t0, c0)) in progs.iter().zip(before) {
                    let (t1, c1) = bpf::prog_stats(p.0).unwrap_or((0, 0));
                    if c1 > c0 {
                        res.unit("3", &format!("{} ({})", p.2, p.1), "ns/run", None);
                        res.add(
                            "3",
                            &format!("{} ({})", p.2, p.1),
                            n,
                            "E",
                            (t1 - t0) as f64 / (c1 - c0) as f64,
                        );
                    }
                }
            }
            let f = |k: &str| crr[k].as_f64().unwrap_or(f64::NAN);
            res.add("1", "CRR rate", n, arm, f("rate"));
            res.add("1", "CRR p50", n, arm, f("p50_us"));
            res.add("1", "CRR p99", n, arm, f("p99_us"));
            res.add("1", "CRR errors", n, arm, f("errors"));
            let rr = cluster.client_json(c, &client_args("rr", &targets[..1], plan.dur_ms, &[]))?;
            let f = |k: &str| rr[k].as_f64().unwrap_or(f64::NAN);
            res.add("1", "RR rate", n, arm, f("rate"));
            res.add("1", "RR p50", n, arm, f("p50_us"));
            res.add("1", "RR p99", n, arm, f("p99_us"));
            if arm == "I-rand" {
                continue; // UDP: the measured UDP port is the last one
            }
            // UDP to the same port number on the backends (D) or the ClusterIP.
            let udp_before: Vec<(u64, u64)> = if arm == "E" {
                progs
                    .iter()
                    .map(|p| bpf::prog_stats(p.0).unwrap_or((0, 0)))
                    .collect()
            } else {
                Vec::new()
            };
            let udp_dur = (plan.dur_ms / 2).max(100);
            for (mode, extra) in [("connected", vec!["--connected"]), ("unconnected", vec![])] {
                let u =
                    cluster.client_json(c, &client_args("udp", &targets[..1], udp_dur, &extra))?;
                res.add(
                    "2",
                    &format!("UDP {mode} rate"),
                    n,
                    arm,
                    u["rate"].as_f64().unwrap_or(f64::NAN),
                );
                res.add(
                    "2",
                    &format!("UDP {mode} p50"),
                    n,
                    arm,
                    u["p50_us"].as_f64().unwrap_or(f64::NAN),
                );
            }
            // The UDP hooks (sendmsg4, recvmsg4, ...) over this round's UDP runs of arm E.
            for (p, (t0, c0)) in progs.iter().zip(udp_before) {
                let (t1, c1) = bpf::prog_stats(p.0).unwrap_or((0, 0));
                if c1 > c0 && p.1 != "cgroup_inet4_connect" {
                    let metric = format!("{} ({}), during UDP", p.2, p.1);
                    res.unit("3", &metric, "ns/run", None);
                    res.add("3", &metric, n, "E", (t1 - t0) as f64 / (c1 - c0) as f64);
                }
            }
        }
        let crr = |arm| res.median_of("1", "CRR rate", n, arm).unwrap_or(f64::NAN);
        println!(
            "bench:   round {round}: CRR/s D {:.0} E {:.0} I {:.0} I-rand {:.0} N {:.0}",
            crr("D"),
            crr("E"),
            crr("I"),
            crr("I-rand"),
            crr("N")
        );
    }
    // Hook cost next to the latency difference E − D (benchmark 3).
    if let (Some(e), Some(d)) = (
        res.median_of("1", "CRR p50", n, "E"),
        res.median_of("1", "CRR p50", n, "D"),
    ) {
        res.unit("3", "CRR p50 latency E − D", "ns", None);
        res.add("3", "CRR p50 latency E − D", n, "E", (e - d) * 1000.0);
    }
    Ok(())
}

// ------------------------------------------------------------------ benchmarks 5 and 6

fn epoch_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Applies a change of one measured service as the arm's proxy would.
fn apply_change(
    cluster: &mut Cluster,
    arm: char,
    measured: &Measured,
    changed: &Svc,
    kp_i: &mut KubeProxyState,
    kp_n: &mut KubeProxyState,
) -> Result<()> {
    match arm {
        'E' => cluster.write_manifest("measured.json", &measured.manifest()),
        'I' => {
            let old = kp_i.replace(changed);
            let text = kube::iptables_partial(&kp_i.services, changed, &old);
            iptables_restore(cluster, &cluster.client('I').netns, &text).map(|_| ())
        }
        _ => {
            let old = kp_n.replace(changed);
            nft_load(
                cluster,
                &cluster.client('N').netns,
                &kube::nft_partial(changed, &old),
            )
            .map(|_| ())
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn programming_latency(
    cluster: &mut Cluster,
    n: usize,
    plan: &Plan,
    res: &mut Results,
    measured: &mut Measured,
    kp_i: &mut KubeProxyState,
    kp_n: &mut KubeProxyState,
) -> Result<()> {
    println!(
        "bench:   network programming latency, {} changes per arm",
        plan.changes
    );
    let backends = cluster.backend_ips();
    let interval = Duration::from_millis(plan.change_interval_ms);
    let arms: &[char] = if n <= plan.nft_max {
        &['E', 'I', 'N']
    } else {
        &['E', 'I']
    };
    for &arm in arms {
        check_interrupted()?;
        // Runs until its stdin closes (after the last change), at most 15 minutes.
        let args = client_args(
            "watch",
            &[format!("{NPL_VIP}:{SERVICE_PORT}")],
            900_000,
            &["--timeout-ms", "200", "--until-stdin-closes"],
        );
        let mut watcher = cluster::Proc(
            cluster
                .client_cmd(arm, &args)?
                .stdin(Stdio::piped())
                .spawn()?,
        );
        let stdin = watcher.0.stdin.take();
        sleep(Duration::from_millis(300))?;
        // (t0, old id, new id)
        let mut changes = Vec::new();
        let mut current = backends
            .iter()
            .position(|ip| *ip == measured.npl.endpoints[0])
            .unwrap_or(0);
        for _ in 0..plan.changes {
            check_interrupted()?;
            let next = (current + 1) % BACKENDS;
            measured.npl.endpoints = vec![backends[next]];
            let t0 = epoch_ns();
            let npl = measured.npl.clone();
            apply_change(cluster, arm, measured, &npl, kp_i, kp_n)?;
            changes.push((t0, current as i64, next as i64));
            current = next;
            sleep(interval)?;
        }
        sleep(Duration::from_millis(300))?;
        drop(stdin);
        let out = watcher.wait_output()?;
        let json: serde_json::Value = serde_json::from_slice(&out).context("watch output")?;
        let segments: Vec<(i64, u64, u64)> = json["segments"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| Some((s[0].as_i64()?, s[1].as_u64()?, s[2].as_u64()?)))
            .collect();
        let label = arm_label(arm);
        for (k, &(t0, old, new)) in changes.iter().enumerate() {
            let t_next = changes.get(k + 1).map_or(u64::MAX, |c| c.0);
            let first_new = segments
                .iter()
                .filter(|s| s.0 == new && s.2 >= t0 && s.1 < t_next)
                .map(|s| s.1.max(t0))
                .min();
            let last_old = segments
                .iter()
                .filter(|s| s.0 == old && s.2 >= t0 && s.1 < t_next)
                .map(|s| s.2)
                .max();
            if let Some(t) = first_new {
                res.add(
                    "5",
                    "first connection on new backend",
                    n,
                    label,
                    (t - t0) as f64 / 1e6,
                );
            }
            res.add(
                "5",
                "last connection on removed backend",
                n,
                label,
                last_old.map_or(0.0, |t| t.saturating_sub(t0) as f64 / 1e6),
            );
        }
        let firsts = res.samples_of("5", "first connection on new backend", n, label);
        let lasts = res.samples_of("5", "last connection on removed backend", n, label);
        let (p50, p99) = (percentile(&firsts, 0.5), percentile(&firsts, 0.99));
        res.unit("5", "first connection on new backend, p50", "ms", None);
        res.unit("5", "first connection on new backend, p99", "ms", None);
        res.add("5", "first connection on new backend, p50", n, label, p50);
        res.add("5", "first connection on new backend, p99", n, label, p99);
        res.unit("5", "last connection on removed backend, p99", "ms", None);
        res.add(
            "5",
            "last connection on removed backend, p99",
            n,
            label,
            percentile(&lasts, 0.99),
        );
        res.unit("5", "changes seen", "count", None);
        res.add("5", "changes seen", n, label, firsts.len() as f64);
        println!(
            "bench:   {label}: first connection on the new backend p50 {p50:.2} ms p99 {p99:.2} ms ({} of {} changes seen)",
            firsts.len(),
            changes.len()
        );
    }
    Ok(())
}

fn arm_label(arm: char) -> &'static str {
    match arm {
        'D' => "D",
        'E' => "E",
        'I' => "I",
        _ => "N",
    }
}

fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[allow(clippy::too_many_arguments)]
fn churn(
    cluster: &mut Cluster,
    n: usize,
    plan: &Plan,
    res: &mut Results,
    measured: &mut Measured,
    kp_i: &mut KubeProxyState,
    kp_n: &mut KubeProxyState,
) -> Result<()> {
    println!("bench:   churn under load");
    let backends = cluster.backend_ips();
    for rate in [0u64, 10, 100] {
        for m in [
            "failed connections",
            "CRR p99",
            "CRR rate",
            "changes applied",
        ] {
            let unit = match m {
                "CRR p99" => "µs",
                "CRR rate" => "conn/s",
                _ => "count",
            };
            res.unit("6", &format!("{m}, {rate} changes/s"), unit, None);
        }
    }
    let mut toggle = 0usize;
    let arms: &[char] = if n <= plan.nft_max {
        &['E', 'I', 'N']
    } else {
        &['E', 'I']
    };
    for round in 0..plan.rounds {
        for k in 0..arms.len() {
            let arm = arms[(k + round) % arms.len()];
            for rate in [0u64, 10, 100] {
                check_interrupted()?;
                let (c, targets) = arm_target(cluster, arm_label(arm));
                let args = client_args("crr", &targets, plan.churn_ms, &[]);
                let client = cluster::Proc(cluster.client_cmd(c, &args)?.spawn()?);
                let start = Instant::now();
                let mut applied = 0u64;
                if let Some(micros) = 1_000_000u64.checked_div(rate) {
                    let period = Duration::from_micros(micros);
                    let mut next = start;
                    while start.elapsed() < Duration::from_millis(plan.churn_ms) {
                        check_interrupted()?;
                        toggle += 1;
                        measured.last_tcp.endpoints = if toggle % 2 == 1 {
                            backends[..BACKENDS - 1].to_vec()
                        } else {
                            backends.to_vec()
                        };
                        measured.last_udp.endpoints = measured.last_tcp.endpoints.clone();
                        let changed = measured.last_tcp.clone();
                        apply_change(cluster, arm, measured, &changed, kp_i, kp_n)?;
                        applied += 1;
                        next += period;
                        let now = Instant::now();
                        if next > now {
                            std::thread::sleep(next - now);
                        }
                    }
                }
                let out = client.wait_output()?;
                let json: serde_json::Value = serde_json::from_slice(&out).context("crr output")?;
                let label = arm_label(arm);
                res.add(
                    "6",
                    &format!("failed connections, {rate} changes/s"),
                    n,
                    label,
                    json["errors"].as_f64().unwrap_or(f64::NAN),
                );
                res.add(
                    "6",
                    &format!("CRR p99, {rate} changes/s"),
                    n,
                    label,
                    json["p99_us"].as_f64().unwrap_or(f64::NAN),
                );
                res.add(
                    "6",
                    &format!("CRR rate, {rate} changes/s"),
                    n,
                    label,
                    json["rate"].as_f64().unwrap_or(f64::NAN),
                );
                res.add(
                    "6",
                    &format!("changes applied, {rate} changes/s"),
                    n,
                    label,
                    applied as f64,
                );
            }
        }
    }
    // Back to 10 endpoints everywhere.
    measured.last_tcp.endpoints = backends.to_vec();
    measured.last_udp.endpoints = backends.to_vec();
    for &arm in arms {
        let changed = measured.last_tcp.clone();
        apply_change(cluster, arm, measured, &changed, kp_i, kp_n)?;
    }
    Ok(())
}

// ------------------------------------------------------------------ benchmark 7

const NODEPORT_E: u16 = 30080;
const NODEPORT_I: u16 = 30081;
const NODE_EXT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);

/// Benchmark 7: the agent restarted with `--nodeport-iface ext0` (a veth from the node to an
/// "outside" namespace) and a NodePort service; BPF_PROG_TEST_RUN of its XDP program against
/// an XDP_PASS-only program; NodePort CRR from outside through XDP (E) and through
/// kube-proxy's NodePort rules in the node namespace (I).
fn xdp(cluster: &mut Cluster, plan: &Plan, res: &mut Results) -> Result<()> {
    let outside = lb_testkit::Netns::new("lbout")?;
    let node = cluster.node.netns();
    node.run(&[
        "ip",
        "link",
        "add",
        "ext0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        outside.name(),
    ])?;
    node.run(&[
        "ip",
        "addr",
        "add",
        &format!("{NODE_EXT_IP}/24"),
        "dev",
        "ext0",
    ])?;
    node.run(&["ip", "link", "set", "ext0", "up"])?;
    node.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    outside.run(&[
        "ip",
        "addr",
        "add",
        &format!("{OUTSIDE_IP}/24"),
        "dev",
        "eth0",
    ])?;
    outside.run(&["ip", "link", "set", "eth0", "up"])?;
    outside.run(&["ip", "link", "set", "lo", "up"])?;
    for sysctl in [
        "net.ipv4.ip_local_port_range=1024 65535",
        "net.ipv4.tcp_tw_reuse=1",
    ] {
        outside.run(&["sysctl", "-qw", sysctl])?;
    }
    // Replies of local backends go to the client's address (no SNAT for local backends).
    for pod in &cluster.pods {
        let _ = pod
            .netns
            .run(&["ip", "route", "add", "192.168.77.0/24", "via", "10.244.0.1"]);
    }
    let backends = cluster.backend_ips();
    let np = Svc {
        name: "measure-np".into(),
        port_name: "http".into(),
        protocol: "TCP",
        vip: Ipv4Addr::new(10, 100, 0, 9),
        port: SERVICE_PORT,
        target_port: POD_PORT,
        endpoints: backends.clone(),
    };
    let mut svc = kube::service_json(&[&np]);
    svc["spec"]["type"] = "NodePort".into();
    svc["spec"]["ports"][0]["nodePort"] = NODEPORT_E.into();
    let slice = kube::slice_json(&[&np], "bench-node");
    let manifest = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [svc, slice]});
    cluster.agent = None;
    let _ = std::fs::remove_file(cluster.manifests.0.join("services.json"));
    cluster.write_manifest("nodeport.json", &manifest.to_string())?;
    let mut extra = agent_limits(16);
    extra.extend(["--nodeport-iface".to_string(), "ext0".to_string()]);
    cluster.start_agent(&extra)?;
    cluster
        .agent()?
        .wait_line(0, "north-south", "attached", Duration::from_secs(30))?;
    sleep(Duration::from_millis(300))?;

    // The XDP program on ext0.
    let link = cluster
        .node
        .netns()
        .run(&["ip", "-j", "-d", "link", "show", "ext0"])?;
    let json: serde_json::Value = serde_json::from_str(link.trim())?;
    let id = json[0]["xdp"]["prog"]["id"]
        .as_u64()
        .or_else(|| {
            json[0]["xdp"]["attached"]
                .as_array()?
                .iter()
                .find_map(|a| a["prog"]["id"].as_u64())
        })
        .context("no XDP program on ext0")?;
    let prog = bpf::prog_fd_by_id(id)?;
    let pass = bpf::load_xdp_pass()?;
    let calls: u32 = if plan.quick { 2000 } else { 20000 };
    let (src, dst) = (OUTSIDE_IP.octets(), NODE_EXT_IP.octets());
    for m in [
        "hit, new flow",
        "tracked flow",
        "miss",
        "XDP_PASS only",
        "miss, repeat 1M",
        "XDP_PASS only, repeat 1M",
    ] {
        res.unit("7", m, "ns/packet", Some("XDP_PASS"));
    }
    for round in 0..plan.rounds {
        check_interrupted()?;
        let mean = |f: &mut dyn FnMut(u32) -> Result<u32>| -> Result<f64> {
            let mut total = 0u64;
            for i in 0..calls {
                total += u64::from(f(i)?);
            }
            Ok(total as f64 / f64::from(calls))
        };
        let base = ((round * 20_000) % 40_000 + 1024) as u16;
        let hit = mean(&mut |i| {
            let sport = base + (i % 20000) as u16;
            let p = bpf::packet(
                [src[0], src[1], (i >> 8) as u8 | 128, i as u8],
                dst,
                sport,
                NODEPORT_E,
                true,
            );
            Ok(bpf::test_run(&prog, &p, 1)?.1)
        })?;
        let tracked_pkt = bpf::packet(src, dst, 55555, NODEPORT_E, true);
        bpf::test_run(&prog, &tracked_pkt, 1)?;
        let tracked = mean(&mut |_| Ok(bpf::test_run(&prog, &tracked_pkt, 1)?.1))?;
        let miss_pkt = bpf::packet(src, dst, 55555, 9999, true);
        let miss = mean(&mut |_| Ok(bpf::test_run(&prog, &miss_pkt, 1)?.1))?;
        let pass_ns = mean(&mut |_| Ok(bpf::test_run(&pass, &miss_pkt, 1)?.1))?;
        let miss_1m = bpf::test_run(&prog, &miss_pkt, 1_000_000)?.1;
        let pass_1m = bpf::test_run(&pass, &miss_pkt, 1_000_000)?.1;
        for (m, v) in [
            ("hit, new flow", hit),
            ("tracked flow", tracked),
            ("miss", miss),
            ("XDP_PASS only", pass_ns),
            ("miss, repeat 1M", f64::from(miss_1m)),
            ("XDP_PASS only, repeat 1M", f64::from(pass_1m)),
        ] {
            res.add(
                "7",
                m,
                1,
                if m.starts_with("XDP_PASS") {
                    "XDP_PASS"
                } else {
                    "E"
                },
                v,
            );
        }
        // Over the XDP_PASS program, the same way measured.
        res.unit("7", "hit over XDP_PASS", "ns/packet", None);
        res.add("7", "hit over XDP_PASS", 1, "E", hit - pass_ns);
        res.unit("7", "tracked over XDP_PASS", "ns/packet", None);
        res.add("7", "tracked over XDP_PASS", 1, "E", tracked - pass_ns);
        res.unit("7", "miss over XDP_PASS", "ns/packet", None);
        res.add("7", "miss over XDP_PASS", 1, "E", miss - pass_ns);
    }
    // Check that a hit is translated (the destination in the output differs).
    let p = bpf::packet(src, dst, 44444, NODEPORT_E, true);
    let (retval, rewritten) = bpf::test_run_out(&prog, &p)?;
    println!("bench:   XDP hit: return value {retval}, destination rewritten: {rewritten}");

    // NodePort CRR from outside: E through XDP (port NODEPORT_E); I through kube-proxy's
    // NodePort rules in the node namespace (port NODEPORT_I; the XDP program passes it).
    let mut np_i = np.clone();
    np_i.name = "measure-npi".into();
    let rules = kube::iptables_nodeport(&np_i, NODEPORT_I);
    iptables_restore(cluster, cluster.node.netns(), &rules)?;
    for jump in kube::IPTABLES_JUMPS {
        let mut args = vec![ipt(), "-w"];
        args.extend_from_slice(jump);
        cluster.node.netns().run(&args)?;
    }
    // conntrack is now in use in the node namespace for both arms alike.
    res.unit("7", "NodePort CRR rate", "conn/s", Some("I"));
    res.unit("7", "NodePort CRR p50", "µs", Some("I"));
    res.unit("7", "NodePort CRR errors", "count", None);
    for round in 0..plan.rounds {
        for k in 0..2 {
            check_interrupted()?;
            let (arm, port) = [("E", NODEPORT_E), ("I", NODEPORT_I)][(k + round) % 2];
            let mut cmd = lb_testkit::command_in(Some(&outside), None, "taskset")?;
            cmd.args(["-c", &cluster::CLIENT_CPU.to_string()])
                .arg(&cluster.bench_bin)
                .args(client_args(
                    "crr",
                    &[format!("{NODE_EXT_IP}:{port}")],
                    plan.dur_ms,
                    &[],
                ))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let out = cluster::Proc(cmd.spawn()?).wait_output()?;
            let json: serde_json::Value = serde_json::from_slice(&out)?;
            res.add(
                "7",
                "NodePort CRR rate",
                1,
                arm,
                json["rate"].as_f64().unwrap_or(f64::NAN),
            );
            res.add(
                "7",
                "NodePort CRR p50",
                1,
                arm,
                json["p50_us"].as_f64().unwrap_or(f64::NAN),
            );
            res.add(
                "7",
                "NodePort CRR errors",
                1,
                arm,
                json["errors"].as_f64().unwrap_or(f64::NAN),
            );
        }
    }
    cluster.agent = None;
    let _ = std::fs::remove_file(cluster.manifests.0.join("nodeport.json"));
    drop(outside);
    Ok(())
}

fn headline(res: &Results, plan: &Plan) -> String {
    let mut out = String::from(
        "\n### Headline\n\n| N | CRR/s E÷D | I÷D | I-rand÷D | N÷D | CRR p99 E÷D | I÷D | one change: agent, file → maps (ms) | agent, map writes only (ms) | iptables partial restore (ms) | nft (ms) | iptables ÷ agent (file) | iptables ÷ agent (maps) |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for &n in &plan.ns {
        let m =
            |b: &str, metric: &str, arm: &str| res.median_of(b, metric, n, arm).unwrap_or(f64::NAN);
        let r = |metric: &str, arm: &str| m("1", metric, arm) / m("1", metric, "D");
        let agent = m("4", "one endpoint change", "E");
        let sync = m("4", "agent sync_us, one change", "E");
        let ipt = m("4", "one endpoint change", "I");
        out.push_str(&format!(
            "| {n} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} | {:.0}× | {:.0}× |\n",
            r("CRR rate", "E"),
            r("CRR rate", "I"),
            r("CRR rate", "I-rand"),
            r("CRR rate", "N"),
            r("CRR p99", "E"),
            r("CRR p99", "I"),
            report::num(agent),
            report::num(sync),
            report::num(ipt),
            report::num(m("4", "one endpoint change", "N")),
            ipt / agent,
            ipt / sync
        ));
    }
    out
}
