//! Differential packet fuzzing of the north-south programs (the real XDP and tc programs
//! under `BPF_PROG_TEST_RUN`) against a reference model written from docs/nodeport.md: see
//! `fuzz/`. The short run is part of the test suite; `cargo xtask fuzz` runs the long one
//! (`fuzz_run`, ignored here) with `LB_FUZZ_PACKETS` and `LB_FUZZ_SEED`. Needs root,
//! attaches nothing.
mod common;
mod fuzz;

use fuzz::runner::{Report, Runner, fixture_dir, read_fixture};

/// The seed of the short run's fixed part.
const FIXED_SEED: u64 = 0x5eed_0014;

fn print(report: &Report, seed: u64) {
    eprintln!(
        "seed {seed}: {} packets in {} episodes, {:.1} s, {:.0} packets/s, {} refused by the kernel, {} mismatches",
        report.packets,
        report.episodes,
        report.elapsed.as_secs_f64(),
        report.packets_per_sec(),
        report.refused_by_kernel,
        report.mismatches.len()
    );
    eprintln!(
        "  episode setup {:.1} s, whole-map comparisons {:.1} s",
        report.setup.as_secs_f64(),
        report.compare.as_secs_f64()
    );
    eprintln!("  frames: {:?}", report.by_kind);
    eprintln!("  reasons: {:?}", report.by_reason);
    for m in report.mismatches.iter().take(10) {
        eprintln!("MISMATCH {}", m.report);
        if let Some(path) = &m.fixture {
            eprintln!("  fixture written: {}", path.display());
        }
    }
}

fn check(report: &Report) {
    assert!(
        report.mismatches.is_empty(),
        "{} mismatches between the programs and the model (see above)",
        report.mismatches.len()
    );
}

#[test]
fn short_fuzz_run_agrees_with_the_model() {
    let mut runner = Runner::new();
    let fixed = runner.run(FIXED_SEED, 60_000, true);
    print(&fixed, FIXED_SEED);
    check(&fixed);
    let seed = fastrand::u64(..);
    eprintln!("random seed {seed} (reproduce: cargo xtask fuzz --seed {seed} --packets 40000)");
    let random = runner.run(seed, 40_000, true);
    print(&random, seed);
    check(&random);
}

/// Every mismatch the fuzzer found is kept as a fixture (its seed and packet index) and
/// replayed here up to that packet.
#[test]
fn fuzz_fixtures_replay_without_mismatch() {
    let dir = fixture_dir();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!("no fixtures in {}", dir.display());
        return;
    };
    let mut runner = Runner::new();
    let mut replayed = 0;
    for entry in entries {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let (eseed, frames) = read_fixture(&text)
            .unwrap_or_else(|| panic!("{}: no episode_seed field", path.display()));
        if let Err(e) = runner.replay(eseed, &frames) {
            panic!("fixture {} mismatches again: {e}", path.display());
        }
        eprintln!("ok {} ({} frames)", path.display(), frames.len());
        replayed += 1;
    }
    eprintln!("{replayed} fixtures replayed");
}

/// The long run: `LB_FUZZ_PACKETS` (default 10,000,000) frames from `LB_FUZZ_SEED` (default
/// random, printed). Run by `cargo xtask fuzz`.
#[test]
#[ignore = "long: run by `cargo xtask fuzz`"]
fn fuzz_run() {
    let env = |name: &str| {
        std::env::var(name).ok().map(|v| {
            v.parse::<u64>()
                .unwrap_or_else(|e| panic!("{name}={v}: {e}"))
        })
    };
    let packets = env("LB_FUZZ_PACKETS").unwrap_or(10_000_000);
    let seed = env("LB_FUZZ_SEED").unwrap_or_else(|| fastrand::u64(..));
    let stop = std::env::var("LB_FUZZ_KEEP_GOING").is_err();
    eprintln!("fuzzing {packets} packets from seed {seed}");
    let mut runner = Runner::new();
    let report = runner.run(seed, packets, stop);
    print(&report, seed);
    check(&report);
}
