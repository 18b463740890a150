//! `cargo xtask chaos [--iterations N] [--seed S]` and `cargo xtask soak --minutes N`, as root:
//! build `lb-agent` and `lb-probe`, then run lb-testkit's chaos restarts or soak (in
//! namespaces and a cgroup they make and remove).

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Result, bail};

use crate::{host, run};

#[derive(clap::Args)]
pub struct ChaosArgs {
    /// Restarts after kill -9 (SIGTERM restarts: a tenth as many, limit changes a twentieth,
    /// at least one each).
    #[arg(long, default_value_t = 200)]
    pub iterations: u32,
    /// Seed of the random choices (default: the time); printed, to run the same again.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep the agents' logs (a directory under the temp dir, printed) also when all passed.
    #[arg(long)]
    pub keep_logs: bool,
}

#[derive(clap::Args)]
pub struct SoakArgs {
    #[arg(long, default_value_t = 15)]
    pub minutes: u32,
    #[arg(long)]
    pub seed: Option<u64>,
}

fn seed(given: Option<u64>) -> u64 {
    given.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_secs())
    })
}

fn require_root(what: &str) -> Result<()> {
    if !host::is_root() {
        bail!(
            "`cargo xtask {what}` must run as root: it creates namespaces and loads BPF programs"
        );
    }
    Ok(())
}

pub fn chaos(args: &ChaosArgs) -> Result<()> {
    require_root("chaos")?;
    let bins = run::build()?;
    let config = lb_testkit::chaos::Config {
        agent: bins.agent,
        probe: bins.probe,
        kills: args.iterations,
        sigterms: (args.iterations / 10).max(1),
        limit_changes: (args.iterations / 20).max(1),
        seed: seed(args.seed),
        verbose: true,
        keep_logs: args.keep_logs,
    };
    println!("chaos: seed {}", config.seed);
    let report = lb_testkit::chaos::run(&config)?;
    print!("{}", report.text());
    if !report.passed() {
        bail!("the chaos run failed (seed {})", config.seed);
    }
    Ok(())
}

pub fn soak(args: &SoakArgs) -> Result<()> {
    require_root("soak")?;
    let bins = run::build()?;
    let seed = seed(args.seed);
    let csv = run::target_dir().join(format!("soak/soak-{seed}.csv"));
    println!("soak: {} minutes, seed {seed}", args.minutes);
    let samples = lb_testkit::chaos::soak::run(&lb_testkit::chaos::soak::Config {
        agent: bins.agent,
        probe: bins.probe,
        minutes: args.minutes,
        seed,
        csv,
    })?;
    if samples.last().is_some_and(|s| s.failures > 0) {
        bail!("requests failed during the soak");
    }
    Ok(())
}
