//! The soak: the chaos node for minutes, with mixed traffic, endpoint churn every two seconds
//! and a restart every five minutes (kill -9 and SIGTERM in turn). Each minute it samples the
//! agent's resident memory (`VmRSS`), its open descriptors (`/proc/PID/fd`) and the entries of
//! every pinned map, prints a row, and at the end writes the samples as CSV and reports the
//! growth since the first minute (the warm-up).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use super::site::{AgentSpec, Site, WorkDir};
use super::traffic::Tally;
use super::{churn, flows};
use crate::BpffsDir;

#[derive(Clone, Debug)]
pub struct Config {
    pub agent: PathBuf,
    pub probe: PathBuf,
    pub minutes: u32,
    pub seed: u64,
    /// Where the CSV goes.
    pub csv: PathBuf,
}

/// One minute's sample.
#[derive(Clone, Debug)]
pub struct Sample {
    pub minute: u32,
    pub restarts: u32,
    pub attempts: u64,
    pub failures: u64,
    pub rss_kib: u64,
    pub fds: u64,
    /// Entries by pinned map name.
    pub maps: BTreeMap<String, u64>,
}

/// The maps the printed table shows (the CSV has all).
const SHOWN: [(&str, &str); 8] = [
    ("LB4_FRONT_V2", "front"),
    ("LB4_SLOTS_V2", "slots"),
    ("LB4_BACKEND_V2", "backend"),
    ("LB4_MAGLEV_V2", "maglev"),
    ("LB4_AFFIN_V2", "affin"),
    ("LB4_REVNAT_V2", "revnat"),
    ("LB4_CT_V2", "ct"),
    ("LB4_FLOWREV_V2", "flowrev"),
];

const RESTART_EVERY_MINUTES: u32 = 5;

/// Runs the soak and returns its samples (also printed, and written to `config.csv`).
pub fn run(config: &Config) -> Result<Vec<Sample>> {
    let started = Instant::now();
    let mut rng = fastrand::Rng::with_seed(config.seed);
    let work = WorkDir::new()?;
    let site = Site::new(4, &config.probe)?;
    let pods = site
        .pods
        .iter()
        .map(|p| (p.ip.to_string(), p.name.clone()))
        .collect();
    let manifests = work.manifests();
    let mut churn = churn::Churn::new(&manifests, pods, &mut rng)?;
    let bpffs = BpffsDir::new();
    let spec = AgentSpec {
        agent: &config.agent,
        netns: site.net.node.netns(),
        cgroup: &site.cgroup,
        bpffs: &bpffs,
        manifests: &manifests,
        log: &work.path.join("agent.log"),
        extra: Vec::new(),
    };
    let mut agent = spec.start()?;
    let tally = Tally::default();
    let names = site.pod_names();
    let mut samples = Vec::new();
    println!("{}", header());
    let flows = flows(&site);
    let outcome = std::thread::scope(|scope| -> Result<()> {
        for flow in &flows {
            let (tally, names, probe) = (&tally, &names, &config.probe);
            scope.spawn(move || tally.run(probe, flow, names, started));
        }
        let result = (|| -> Result<()> {
            let mut restarts = 0;
            for minute in 1..=config.minutes {
                let until = started + Duration::from_secs(60 * u64::from(minute));
                while Instant::now() < until {
                    std::thread::sleep(Duration::from_secs(2).min(until - Instant::now()));
                    churn.step(&mut rng)?;
                }
                let sample = Sample {
                    minute,
                    restarts,
                    attempts: tally.attempts(),
                    failures: tally.failures(),
                    rss_kib: rss_kib(agent.pid())?,
                    fds: std::fs::read_dir(format!("/proc/{}/fd", agent.pid()))?.count() as u64,
                    maps: map_entries(&config.agent, bpffs.path())?,
                };
                println!("{}", row(&sample));
                samples.push(sample);
                if minute % RESTART_EVERY_MINUTES == 0 && minute < config.minutes {
                    if restarts % 2 == 0 {
                        agent.kill();
                    } else {
                        agent.terminate();
                    }
                    agent = spec.start().context("restarting the agent")?;
                    restarts += 1;
                }
            }
            Ok(())
        })();
        tally.stop();
        result
    });
    agent.terminate();
    outcome?;
    write_csv(&config.csv, &samples)?;
    println!("{}", growth(&samples));
    for (label, counts) in tally.counts() {
        println!(
            "  {label:<14} {:>8} attempted {:>5} failed",
            counts.attempts, counts.failures
        );
        for failure in counts.first_failures {
            println!("    {failure}");
        }
    }
    println!("soak: samples written to {}", config.csv.display());
    Ok(samples)
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

/// Entries of every pinned map, from `lb-agent status -o json`.
fn map_entries(agent: &Path, bpffs: &Path) -> Result<BTreeMap<String, u64>> {
    let mut cmd = std::process::Command::new(agent);
    // The agent's /healthz is in its node's namespace: only the maps are wanted here.
    cmd.args([
        "status",
        "-o",
        "json",
        "--healthz-addr",
        "127.0.0.1:1",
        "--bpffs",
    ])
    .arg(bpffs)
    .env("RUST_BACKTRACE", "0");
    let json: serde_json::Value = serde_json::from_str(&crate::run_checked(&mut cmd)?)?;
    Ok(json["maps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| Some((m["name"].as_str()?.to_owned(), m["entries"].as_u64()?)))
        .collect())
}

fn header() -> String {
    let mut line = format!(
        "{:>6} {:>8} {:>9} {:>8} {:>8} {:>4}",
        "minute", "restarts", "requests", "failed", "rss_kib", "fds"
    );
    for (_, short) in SHOWN {
        line.push_str(&format!(" {short:>8}"));
    }
    line
}

fn row(sample: &Sample) -> String {
    let mut line = format!(
        "{:>6} {:>8} {:>9} {:>8} {:>8} {:>4}",
        sample.minute,
        sample.restarts,
        sample.attempts,
        sample.failures,
        sample.rss_kib,
        sample.fds
    );
    for (name, _) in SHOWN {
        line.push_str(&format!(
            " {:>8}",
            sample.maps.get(name).copied().unwrap_or(0)
        ));
    }
    line
}

/// The last sample against the first (after the warm-up minute): RSS, descriptors and each
/// map's entries.
pub fn growth(samples: &[Sample]) -> String {
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return "soak: no samples".into();
    };
    let delta = |a: u64, b: u64| b as i64 - a as i64;
    let mut text = format!(
        "soak: growth from minute {} to minute {}: rss {:+} KiB ({} -> {}), fds {:+} ({} -> {}), \
         max rss {} KiB",
        first.minute,
        last.minute,
        delta(first.rss_kib, last.rss_kib),
        first.rss_kib,
        last.rss_kib,
        delta(first.fds, last.fds),
        first.fds,
        last.fds,
        samples.iter().map(|s| s.rss_kib).max().unwrap_or(0),
    );
    text.push_str("\n  map entries:");
    for (name, end) in &last.maps {
        let start = first.maps.get(name).copied().unwrap_or(0);
        let max = samples
            .iter()
            .filter_map(|s| s.maps.get(name))
            .max()
            .unwrap_or(&0);
        text.push_str(&format!(" {name} {start}->{end} (max {max});"));
    }
    text
}

fn write_csv(path: &Path, samples: &[Sample]) -> Result<()> {
    let names: Vec<&String> = samples
        .iter()
        .flat_map(|s| s.maps.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut text = String::from("minute,restarts,requests,failed,rss_kib,fds");
    for name in &names {
        text.push_str(&format!(",{name}"));
    }
    text.push('\n');
    for s in samples {
        text.push_str(&format!(
            "{},{},{},{},{},{}",
            s.minute, s.restarts, s.attempts, s.failures, s.rss_kib, s.fds
        ));
        for name in &names {
            text.push_str(&format!(",{}", s.maps.get(*name).copied().unwrap_or(0)));
        }
        text.push('\n');
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
