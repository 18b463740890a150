//! Continuous traffic for the chaos run and the soak: one thread per flow, each running
//! `lb-probe` for a second at a time until told to stop, adding up attempts and failures. A
//! reply from anything but a known pod counts as a failure too.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::{Cgroup, Netns, command_in};

/// One kind of traffic: where `lb-probe` runs and what it sends.
pub struct Flow<'a> {
    /// `ClusterIP TCP`, `NodePort UDP`, ...
    pub label: &'static str,
    pub netns: &'a Netns,
    /// The agent's cgroup, for the socket programs; `None` from outside the node.
    pub cgroup: Option<&'a Cgroup>,
    /// `tcp 10.96.0.10:80`, `udp 192.168.77.1:30081`, ...
    pub args: Vec<String>,
}

/// Counts of one flow.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    pub attempts: u64,
    pub failures: u64,
    /// The first failures, with the time since the traffic started.
    pub first_failures: Vec<String>,
}

/// Counts per flow label, shared with the traffic threads.
#[derive(Default)]
pub struct Tally {
    counts: Mutex<BTreeMap<&'static str, Counts>>,
    stop: AtomicBool,
}

const KEPT_FAILURES: usize = 10;

impl Tally {
    pub fn counts(&self) -> BTreeMap<&'static str, Counts> {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn failures(&self) -> u64 {
        self.counts().values().map(|c| c.failures).sum()
    }

    pub fn attempts(&self) -> u64 {
        self.counts().values().map(|c| c.attempts).sum()
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    fn add(&self, label: &'static str, attempts: u64, failures: u64, what: Option<String>) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let entry = counts.entry(label).or_default();
        entry.attempts += attempts;
        entry.failures += failures;
        if let Some(what) = what
            && entry.first_failures.len() < KEPT_FAILURES
        {
            entry.first_failures.push(what);
        }
    }

    /// Runs `flow` until [`Tally::stop`]: `lb-probe ARGS --duration-ms 1000` again and again,
    /// each reply checked against `pods`.
    pub fn run(&self, probe: &Path, flow: &Flow<'_>, pods: &[String], started: Instant) {
        while !self.stop.load(Ordering::Relaxed) {
            let mut cmd = match command_in(Some(flow.netns), flow.cgroup, probe) {
                Ok(cmd) => cmd,
                Err(e) => {
                    self.add(
                        flow.label,
                        1,
                        1,
                        Some(format!("cannot run lb-probe: {e:#}")),
                    );
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            };
            cmd.args(&flow.args).args([
                "--duration-ms",
                "1000",
                "--interval-ms",
                "10",
                "--timeout-ms",
                "2000",
            ]);
            let at = started.elapsed().as_secs_f64();
            let outcome = cmd
                .output()
                .map_err(anyhow::Error::from)
                .and_then(|out| Ok(serde_json::from_slice::<serde_json::Value>(&out.stdout)?));
            match outcome {
                Ok(result) => {
                    let attempts = result["attempts"].as_u64().unwrap_or(0);
                    let errors: u64 = result["errors"]
                        .as_object()
                        .map(|e| e.values().filter_map(|v| v.as_u64()).sum())
                        .unwrap_or(0);
                    let strangers: u64 = result["replies"]
                        .as_object()
                        .map(|r| {
                            r.iter()
                                .filter(|(name, _)| !pods.contains(name))
                                .filter_map(|(_, v)| v.as_u64())
                                .sum()
                        })
                        .unwrap_or(0);
                    let failures = errors + strangers;
                    let what = (failures > 0).then(|| {
                        format!(
                            "at {at:.1}s: {} errors {} replies {} ({})",
                            flow.label,
                            result["errors"],
                            result["replies"],
                            result["first_error"].as_str().unwrap_or("-")
                        )
                    });
                    self.add(flow.label, attempts, failures, what);
                }
                Err(e) => self.add(
                    flow.label,
                    1,
                    1,
                    Some(format!("at {at:.1}s: {}: lb-probe: {e:#}", flow.label)),
                ),
            }
        }
    }
}
