//! Chaos restarts: an agent killed (`kill -9`), stopped (SIGTERM) or restarted with other map
//! limits at random points of its syncs, again and again, under continuous TCP and UDP traffic
//! to a ClusterIP (from a pod in its cgroup) and a NodePort (from outside, through XDP), with
//! endpoint churn in between. After every restart, once the agent is ready, its maps must equal
//! a fresh agent's on the same manifests (compared id-independently, `lb-agent list -o
//! description`), and no request may fail during the whole run. [`soak`] runs the same node for
//! minutes and samples the agent's memory, descriptors and map fill.

mod churn;
mod reference;
mod site;
pub mod soak;
mod traffic;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

pub use site::POD_PORT;
use site::{AgentSpec, NODE_IP, Site, WorkDir, describe};
use traffic::{Counts, Flow, Tally};

use crate::BpffsDir;

/// What to run.
#[derive(Clone, Debug)]
pub struct Config {
    /// `lb-agent` and `lb-probe`.
    pub agent: PathBuf,
    pub probe: PathBuf,
    /// Restarts after kill -9.
    pub kills: u32,
    /// Restarts after SIGTERM.
    pub sigterms: u32,
    /// Restarts (after SIGTERM) with other `--max-services` / `--max-backends`.
    pub limit_changes: u32,
    pub seed: u64,
    /// Print a line per restart.
    pub verbose: bool,
    /// Keep the agents' logs (in a directory under the temp dir, printed) also on success.
    pub keep_logs: bool,
}

/// How a restart stops the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Kill,
    Term,
    /// SIGTERM, then a start with the next limits of [`LIMITS`].
    Limits,
}

/// The limits restarts cycle through: smaller, bigger, then back to the defaults.
const LIMITS: [&[&str]; 4] = [
    &["--max-services", "256", "--max-backends", "1024"],
    &["--max-services", "96", "--max-backends", "256"],
    &["--max-services", "4096", "--max-backends", "8192"],
    &[],
];

/// What a run saw.
#[derive(Debug, Default)]
pub struct Report {
    pub restarts: u32,
    pub kills: u32,
    pub sigterms: u32,
    pub limit_changes: u32,
    /// Of the kills: those during the first full sync after a start.
    pub kills_during_start: u32,
    pub manifest_changes: u64,
    pub fresh_agents: u64,
    pub traffic: Vec<(&'static str, Counts)>,
    pub attempts: u64,
    pub failures: u64,
    /// Restarts after which the maps did not equal a fresh build, with what differed.
    pub mismatches: Vec<String>,
    /// SIGTERMs the agent did not exit cleanly from.
    pub unclean_exits: u32,
    pub elapsed: Duration,
    /// How long the first start took until ready (the range of the kills during a start).
    pub start_ms: u64,
    /// The agents' syncs that changed something (their `sync complete` lines): how many,
    /// median and longest time in microseconds.
    pub syncs: (usize, u64, u64),
}

impl Report {
    pub fn text(&self) -> String {
        let mut text = format!(
            "chaos: {} restarts ({} kill -9, {} of them during the first sync after a start; {} \
             SIGTERM; {} limit changes), {} manifest changes, {} fresh agents compared, {:.0}s \
             (a start takes {} ms; {} syncs logged, median {} us, longest {} us)\n\
             requests: {} attempted, {} failed; mismatches after restart: {}; unclean SIGTERM \
             exits: {}\n",
            self.restarts,
            self.kills,
            self.kills_during_start,
            self.sigterms,
            self.limit_changes,
            self.manifest_changes,
            self.fresh_agents,
            self.elapsed.as_secs_f64(),
            self.start_ms,
            self.syncs.0,
            self.syncs.1,
            self.syncs.2,
            self.attempts,
            self.failures,
            self.mismatches.len(),
            self.unclean_exits,
        );
        for (label, counts) in &self.traffic {
            text.push_str(&format!(
                "  {label:<14} {:>8} attempted {:>5} failed\n",
                counts.attempts, counts.failures
            ));
            for failure in &counts.first_failures {
                text.push_str(&format!("    {failure}\n"));
            }
        }
        for mismatch in &self.mismatches {
            text.push_str(&format!("  mismatch: {mismatch}\n"));
        }
        text
    }

    pub fn passed(&self) -> bool {
        self.failures == 0 && self.mismatches.is_empty() && self.unclean_exits == 0
    }
}

/// The traffic of both runs: ClusterIP TCP and UDP from the client pod (in the cgroup),
/// ClusterIP TCP with affinity, NodePort TCP and UDP from outside.
fn flows(site: &Site) -> Vec<Flow<'_>> {
    let inside = |label, args: &[String]| Flow {
        label,
        netns: &site.client.netns,
        cgroup: Some(&site.cgroup),
        args: args.to_vec(),
    };
    let outside = |label, args: &[String]| Flow {
        label,
        netns: site.net.outside.netns(),
        cgroup: None,
        args: args.to_vec(),
    };
    let target = |proto: &str, to: String| vec![proto.to_owned(), to];
    vec![
        inside(
            "ClusterIP TCP",
            &target("tcp", format!("{}:80", churn::WEB_IP)),
        ),
        inside(
            "ClusterIP UDP",
            &target("udp", format!("{}:53", churn::WEB_IP)),
        ),
        inside(
            "affinity TCP",
            &target("tcp", format!("{}:80", churn::STICKY_IP)),
        ),
        outside(
            "NodePort TCP",
            &target("tcp", format!("{NODE_IP}:{}", churn::WEB_TCP_NODE_PORT)),
        ),
        outside(
            "NodePort UDP",
            &target("udp", format!("{NODE_IP}:{}", churn::WEB_UDP_NODE_PORT)),
        ),
    ]
}

/// Runs the chaos restarts of `config`; the report says what failed (an error: the run
/// itself could not go on).
pub fn run(config: &Config) -> Result<Report> {
    let started = Instant::now();
    let mut rng = fastrand::Rng::with_seed(config.seed);
    let mut report = Report::default();
    let mut work = WorkDir::new()?;
    let site = Site::new(4, &config.probe)?;
    let pods: Vec<(String, String)> = site
        .pods
        .iter()
        .map(|p| (p.ip.to_string(), p.name.clone()))
        .collect();
    let manifests = work.manifests();
    let mut churn = churn::Churn::new(&manifests, pods, &mut rng)?;
    let mut reference = reference::Reference::new(&config.agent, &work.path)?;
    let bpffs = BpffsDir::new();
    let log = work.path.join("agent.log");
    let mut limits: &[&str] = &[];
    let spec = |limits: &[&str]| AgentSpec {
        agent: &config.agent,
        netns: site.net.node.netns(),
        cgroup: &site.cgroup,
        bpffs: &bpffs,
        manifests: &manifests,
        log: &log,
        extra: limits.iter().map(|s| s.to_string()).collect(),
    };
    let first_start = Instant::now();
    let mut agent = spec(limits).start().context("the first start")?;
    // Kills "during the first sync" strike within this long after a start.
    let start_ms = (first_start.elapsed().as_millis() as u64).max(50);
    report.start_ms = start_ms;
    let tally = Tally::default();
    let names = site.pod_names();
    let mut schedule: Vec<Stop> = std::iter::repeat_n(Stop::Kill, config.kills as usize)
        .chain(std::iter::repeat_n(Stop::Term, config.sigterms as usize))
        .chain(std::iter::repeat_n(
            Stop::Limits,
            config.limit_changes as usize,
        ))
        .collect();
    rng.shuffle(&mut schedule);
    // Warm the traffic up before the first restart, and let the traffic threads borrow the
    // site for the whole run.
    let flows = flows(&site);
    let outcome = std::thread::scope(|scope| -> Result<()> {
        for flow in &flows {
            let (tally, names, probe) = (&tally, &names, &config.probe);
            scope.spawn(move || tally.run(probe, flow, names, started));
        }
        let result = (|| -> Result<()> {
            std::thread::sleep(Duration::from_secs(2));
            for (n, stop) in schedule.iter().enumerate() {
                churn.step(&mut rng)?;
                // Somewhere in the sync of that change (the agent coalesces for 50 ms and
                // writes in a few more), or a while after.
                let delay = if rng.bool() { 100 } else { 300 };
                std::thread::sleep(Duration::from_millis(rng.u64(0..delay)));
                if !agent.is_running() {
                    bail!("the agent exited on its own before restart {}", n + 1);
                }
                match stop {
                    Stop::Kill => {
                        agent.kill();
                        report.kills += 1;
                    }
                    Stop::Term | Stop::Limits => {
                        if !agent.terminate() {
                            report.unclean_exits += 1;
                        }
                        if *stop == Stop::Term {
                            report.sigterms += 1;
                        } else {
                            limits = LIMITS[report.limit_changes as usize % LIMITS.len()];
                            report.limit_changes += 1;
                        }
                    }
                }
                if rng.bool() {
                    churn.step(&mut rng)?;
                }
                // One kill in three also strikes during the first full sync of the next start.
                if *stop == Stop::Kill && rng.u8(0..3) == 0 {
                    let mut early = spec(limits).spawn()?;
                    std::thread::sleep(Duration::from_millis(rng.u64(0..start_ms)));
                    early.kill();
                    report.kills_during_start += 1;
                }
                agent = spec(limits)
                    .start()
                    .with_context(|| format!("restart {} ({stop:?})", n + 1))?;
                report.restarts += 1;
                if let Some(mismatch) = compare(config, &bpffs, &manifests, &mut reference)? {
                    report.mismatches.push(format!(
                        "restart {} ({stop:?}, {limits:?}): {mismatch}",
                        n + 1
                    ));
                }
                if config.verbose {
                    eprintln!(
                        "chaos: restart {}/{} ({stop:?}) done, {:.0}s, {} requests, {} failed",
                        n + 1,
                        schedule.len(),
                        started.elapsed().as_secs_f64(),
                        tally.attempts(),
                        tally.failures()
                    );
                }
            }
            // The traffic after the last restart counts too.
            std::thread::sleep(Duration::from_secs(2));
            Ok(())
        })();
        tally.stop();
        result
    });
    agent.terminate();
    report.manifest_changes = churn.steps;
    report.fresh_agents = reference.starts;
    report.traffic = tally.counts().into_iter().collect();
    report.attempts = tally.attempts();
    report.failures = tally.failures();
    report.elapsed = started.elapsed();
    report.syncs = sync_times(&log);
    if let Err(e) = outcome {
        work.keep = true;
        bail!(
            "{e:#} (logs kept in {}); so far: {}",
            work.path.display(),
            report.text()
        );
    }
    if !report.passed() || config.keep_logs {
        work.keep = true;
        eprintln!("chaos: logs kept in {}", work.path.display());
    }
    Ok(report)
}

/// After a restart: the agent's maps against a fresh build from the same manifests, retried
/// for a few seconds (the agent may still be writing a change it saw just after its start).
/// `None` when equal, else what differs.
fn compare(
    config: &Config,
    bpffs: &BpffsDir,
    manifests: &std::path::Path,
    reference: &mut reference::Reference,
) -> Result<Option<String>> {
    let wanted = reference.describe(manifests)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let seen = describe(&config.agent, bpffs.path())?;
        if seen == wanted {
            return Ok(None);
        }
        if Instant::now() > deadline {
            return Ok(Some(differences(&seen, &wanted)));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What differs between two descriptions, by frontend and field.
fn differences(seen: &serde_json::Value, wanted: &serde_json::Value) -> String {
    let mut out = Vec::new();
    for section in ["frontends", "node_address_entries"] {
        let (a, b) = (&seen[section], &wanted[section]);
        let keys: std::collections::BTreeSet<&String> = a
            .as_object()
            .into_iter()
            .chain(b.as_object())
            .flat_map(|o| o.keys())
            .collect();
        for key in keys {
            if a[key] != b[key] {
                out.push(format!("{section}.{key}: {} (fresh: {})", a[key], b[key]));
            }
        }
    }
    if seen["leaks"] != wanted["leaks"] {
        out.push(format!(
            "leaks: {} (fresh: {})",
            seen["leaks"], wanted["leaks"]
        ));
    }
    out.join("; ")
}

/// The `sync_us` of every `sync complete` line in the agent's log: count, median, longest.
fn sync_times(log: &std::path::Path) -> (usize, u64, u64) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut times: Vec<u64> = text
        .lines()
        .filter(|l| l.contains("sync complete"))
        .filter_map(|l| {
            let rest = &l[l.find("sync_us=")? + "sync_us=".len()..];
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect();
    times.sort_unstable();
    let median = times.get(times.len() / 2).copied().unwrap_or(0);
    (times.len(), median, times.last().copied().unwrap_or(0))
}
