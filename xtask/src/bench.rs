//! `cargo xtask bench [--quick]`: lb-agent against kube-proxy's iptables and nftables layouts,
//! side by side, on this machine, inside namespaces it makes and removes (see
//! docs/benchmarks.md for the method and a full run's numbers).
//!
//! Arms: **D** the client talks to a backend pod IP directly; **E** ours, through the ClusterIP
//! (socket LB; the client runs in the agent's cgroup); **D6** and **E6** the same over IPv6 (the
//! pods' IPv6 addresses, an IPv6 ClusterIP; benchmarks 1 and 2, rows of their own against D6);
//! **I** kube-proxy's iptables layout
//! loaded with `iptables-restore` in the client's namespace, the measured service last in
//! `KUBE-SERVICES` (worst case), **I-rand** the same rules, a service at a random position;
//! **N** kube-proxy's nftables layout. Every arm measured round by round, interleaved (the arm
//! order rotates each round), medians with min and max.
//!
//! Benchmarks, at each N (background services × 10 endpoints, plus the measured ones):
//! 1 connection cost (TCP_CRR rate, p50, p99; TCP_RR), 2 UDP request/reply, 3 hook cost
//! (run_time_ns/run_cnt of each socket program), 4 programming time (all from nothing, one
//! endpoint change; agent vs full and partial iptables-restore vs nft; the agent's bpf()
//! syscalls), 5 network programming latency, 6 churn under load (5 and 6: the agent at every
//! N, kube-proxy's arms at `--latency-n`), 7 the XDP program with BPF_PROG_TEST_RUN, 8 agent
//! memory and CPU and map memory. Above them, the goals of issue 13 (`goals`), each read from
//! those rows. `--agent-only` leaves kube-proxy's arms out, for the agent's figures at large N.
//!
//! This module holds the arguments, the plan and the run over every N; each benchmark is a
//! module of its own: `connection` (1, 2, 3), `programming` (4, 8), `latency` (5), `churn`
//! (6), `xdp` (7). They share `cluster` (the namespaces, the agent), `services` (the measured
//! services, kube-proxy's rules for them), `arms` (each arm's targets and changes), `kube`
//! (manifests and rule sets), `bpf` (program and map stats, BPF_PROG_TEST_RUN), `process`
//! (the agent's CPU time and memory), `report`, `goals`, `chart` and `machine`.

mod arms;
mod bpf;
mod chart;
mod churn;
mod cluster;
mod connection;
mod goals;
mod kube;
mod latency;
mod machine;
mod process;
mod programming;
mod report;
mod services;
mod xdp;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, host};
use cluster::Cluster;
use kube::Svc;
use machine::Machine;
use report::Results;
use services::{
    KubeProxyState, Measured, agent_limits, iptables_flush, iptables_restore, nft_flush, nft_load,
};

#[derive(clap::Args)]
pub struct Args {
    /// Small N and short runs (a minute or two): checks every benchmark runs and yields numbers.
    #[arg(long)]
    pub quick: bool,
    /// Numbers of background services, comma-separated (default 1,1000,10000,50000,100000;
    /// quick 1,1000).
    #[arg(long, value_delimiter = ',')]
    pub services: Vec<usize>,
    /// Only the agent's arms (D, E, D6, E6, and XDP): kube-proxy's arms (I, I-rand, N) left out
    /// at every N. Writes `agent.md`/`agent.json` (not `full.*`) unless `--quick`.
    #[arg(long)]
    pub agent_only: bool,
    /// Rounds per measurement (default 5; quick 3).
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Length of one measurement run in ms (default 2000; quick 200).
    #[arg(long)]
    pub duration_ms: Option<u64>,
    /// The N at which kube-proxy's arms of benchmarks 5 and 6 run (default 10000; quick: the
    /// largest N); the agent's arm runs at every N.
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
    #[arg(long, default_value_t = 10_000)]
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
    /// kube-proxy's arms left out at every N (`--agent-only`).
    agent_only: bool,
    /// The command line, for the report's title.
    command: String,
}

impl Plan {
    fn from(args: &Args) -> Plan {
        let q = args.quick;
        let mut ns = if !args.services.is_empty() {
            args.services.clone()
        } else if q {
            vec![1, 1000]
        } else {
            vec![1, 1000, 10_000, 50_000, 100_000]
        };
        // Smallest first: ratios across N (goals) take a smaller N measured before.
        ns.sort_unstable();
        ns.dedup();
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
            agent_only: args.agent_only,
            command: std::iter::once("cargo xtask bench".to_string())
                .chain(std::env::args().skip_while(|a| a != "bench").skip(1))
                .collect::<Vec<_>>()
                .join(" "),
            ns,
        }
    }

    /// Whether arm I (kube-proxy's iptables layout) is measured at `n`.
    fn ipt_on(&self, n: usize) -> bool {
        !self.agent_only && n <= self.iptables_max
    }

    /// Whether arm N (kube-proxy's nftables layout) is measured at `n`.
    fn nft_on(&self, n: usize) -> bool {
        !self.agent_only && n <= self.nft_max
    }

    /// The arms of benchmarks 5 and 6 at `n`: the agent's at every N, kube-proxy's (as far as
    /// their rules load) at `latency_n`.
    fn latency_arms(&self, n: usize) -> Vec<char> {
        let mut arms = vec!['E'];
        if n == self.latency_n && self.ipt_on(n) {
            arms.push('I');
        }
        if n == self.latency_n && self.nft_on(n) {
            arms.push('N');
        }
        arms
    }

    /// The stem of the output files.
    fn stem(&self) -> &'static str {
        if self.quick {
            "quick"
        } else if self.agent_only {
            "agent"
        } else {
            "full"
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
    (
        "1",
        "1. Connection cost (TCP_CRR and TCP_RR), ratio to D (the IPv6 rows to D6)",
    ),
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
        if let Err(e) = xdp::xdp(&mut cluster, &plan, &mut res) {
            println!("bench: XDP not measured: {e:#}");
        }
    }

    let rows = write_outputs(&res, &plan, &machine, &out, true)?;
    println!("bench: took {:.0?}", started.elapsed());

    // Every benchmark ran and produced numbers, and every goal of the run has its number
    // (what --quick asserts in CI; whether a goal is met is reported, not asserted).
    let expected: &[&str] = if args.xdp_only {
        &["7"]
    } else {
        &["1", "2", "3", "4", "5", "6", "7", "8"]
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
    let unmeasured: Vec<String> = rows
        .iter()
        .filter(|r| r.benchmark == goals::BENCHMARK && !r.median.is_finite())
        .map(|r| format!("{} (N = {})", r.metric, r.n))
        .collect();
    if !missing.is_empty() || !unmeasured.is_empty() {
        bail!("benchmarks without numbers: {missing:?}; goals without a number: {unmeasured:?}");
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
    let goals = goals::evaluate(res, plan, &machine.kernel, &machine.iptables_backend);
    let mut rows = res.rows(&machine.kernel, &machine.iptables_backend);
    let mut md = format!(
        "## `{}` on {}\n\n{}\n",
        plan.command,
        machine.describe(),
        report::method_notes(plan)
    );
    md.push_str(&goals::markdown(&goals));
    md.push_str(&report::headline(res, plan));
    md.push_str(&report::markdown(&rows, &TITLES));
    rows.extend(goals);
    if last {
        println!("{md}");
    }
    std::fs::create_dir_all(out)?;
    let stem = plan.stem();
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
    // Each family's rows against its own direct arm: D, and D6 for the IPv6 arms' rows.
    for direct in ["D", "D6"] {
        let metric = |m: &str| arms::metric_of(direct, m);
        for m in ["CRR rate", "RR rate"] {
            res.unit("1", &metric(m), "conn/s or req/s", Some(direct));
        }
        for m in ["CRR p50", "CRR p99", "RR p50", "RR p99"] {
            res.unit("1", &metric(m), "µs", Some(direct));
        }
        res.unit("1", &metric("CRR errors"), "count", None);
        for m in ["UDP connected rate", "UDP unconnected rate"] {
            res.unit("2", &metric(m), "req/s", Some(direct));
        }
        for m in ["UDP connected p50", "UDP unconnected p50"] {
            res.unit("2", &metric(m), "µs", Some(direct));
        }
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
        "agent latency_us, from nothing",
        "agent latency_us, one change",
        "agent map_writes, from nothing",
        "agent map_writes, one change",
        "agent bpf() syscalls, from nothing",
        "agent bpf() syscalls, one change",
    ] {
        res.unit("4", m, if m.contains("_us") { "ms" } else { "count" }, None);
    }
    for m in [
        "first connection on new backend",
        "last connection on removed backend",
    ] {
        res.unit("5", m, "ms", Some("E"));
    }
    res.unit("8", "agent CPU for a full sync", "ms CPU", None);
    res.unit("8", "agent CPU for one endpoint change", "ms CPU", None);
    res.unit("8", "agent CPU while idle", "% of one core", None);
    res.unit("8", "agent VmRSS growth per service", "KiB", None);
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

// ------------------------------------------------------------------ one N

fn at_n(cluster: &mut Cluster, n: usize, plan: &Plan, res: &mut Results) -> Result<()> {
    let background: Vec<Svc> = (0..n).map(|i| kube::background(i, 10)).collect();
    let mut measured = Measured::new(&cluster.backend_ips(), &cluster.backend_ips6());
    let bg_groups: Vec<Vec<&Svc>> = background.iter().map(|s| vec![s]).collect();
    let bg_manifest = kube::manifest(&bg_groups, "bench-node");
    drop(bg_groups);

    // A fresh agent with only the measured services.
    cluster.agent = None;
    let _ = std::fs::remove_file(cluster.manifests.0.join("services.json"));
    cluster.write_manifest("measured.json", &measured.manifest())?;
    cluster.start_agent(&agent_limits(n + 5))?;

    programming::programming(
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
    let ipt_on = plan.ipt_on(n);
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
        println!("bench:   arm I left out at N = {n} (--agent-only or above --iptables-max)");
    }
    let nft_on = plan.nft_on(n);
    if nft_on {
        nft_flush(&cluster.client('N').netns);
        nft_load(cluster, &cluster.client('N').netns, &kube::nft_full(&all))?;
    } else {
        println!("bench:   arm N left out at N = {n} (--agent-only or above --nft-max)");
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
    arms.extend(arms::IPV6_ARMS);
    if ipt_on {
        arms.extend(["I", "I-rand"]);
    }
    if nft_on {
        arms.push("N");
    }
    connection::connection_cost(cluster, n, plan, res, &arms)?;
    latency::programming_latency(cluster, n, plan, res, &mut measured, &mut kp_i, &mut kp_n)?;
    churn::churn(cluster, n, plan, res, &mut measured, &mut kp_i, &mut kp_n)?;
    Ok(())
}
