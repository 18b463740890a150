//! `cargo xtask fuzz [--packets N] [--seed S] [--keep-going] [--release]`: differential packet
//! fuzzing of the north-south programs. Runs the ignored test `fuzz_run` of
//! `lb-userspace/tests/packet_fuzz.rs` (the real XDP and tc programs under
//! `BPF_PROG_TEST_RUN` against a reference model written from docs/nodeport.md). On a
//! mismatch it prints the seed, packet index, packet hex, the map entries involved, expected
//! vs got, and writes the episode as a fixture under `lb-userspace/tests/fixtures/packet_fuzz/`
//! (replayed by `fuzz_fixtures_replay_without_mismatch`). Needs root; attaches nothing.

use anyhow::{Result, bail};

use crate::{cmd, host};

#[derive(clap::Args)]
pub struct Args {
    /// Frames to run through the programs.
    #[arg(long, default_value_t = 10_000_000)]
    pub packets: u64,
    /// The generator's seed (random and printed when not given).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Go on after a mismatch (each is reported and written as a fixture) instead of stopping.
    #[arg(long)]
    pub keep_going: bool,
    /// Build the test in the release profile (a build of every dependency; the frames run
    /// faster). The default dev profile shares the build of `cargo xtask test`.
    #[arg(long)]
    pub release: bool,
}

pub fn run(args: &Args) -> Result<()> {
    if !host::is_root() {
        bail!(
            "`cargo xtask fuzz` must run as root: it loads BPF programs (try `sudo -E env \"PATH=$PATH\" cargo xtask fuzz`)"
        );
    }
    let mut test = host::workspace_cargo();
    test.arg("test");
    if args.release {
        test.arg("--release");
    }
    test.args(["-p", "lb-userspace", "--test", "packet_fuzz", "fuzz_run"])
        .args(["--", "--ignored", "--nocapture", "--exact", "fuzz_run"])
        .env("LB_FUZZ_PACKETS", args.packets.to_string());
    if let Some(seed) = args.seed {
        test.env("LB_FUZZ_SEED", seed.to_string());
    }
    if args.keep_going {
        test.env("LB_FUZZ_KEEP_GOING", "1");
    }
    cmd::run(&mut test)
}
