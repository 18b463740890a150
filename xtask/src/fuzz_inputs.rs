//! `cargo xtask fuzz-inputs --target manifest|model --seconds N [--update-corpus]`: fuzzes the
//! agent's input side with cargo-fuzz (libFuzzer, nightly): `manifest` feeds random bytes to
//! the manifest file parser, `model` random object events to the model and the reconciler.
//! The targets are in `fuzz/`, their bodies in `lb_agent::fuzzing`; the kept corpus in
//! `fuzz/corpus/<target>/` is replayed by a stable test (`lb-userspace/tests/fuzz_corpus.rs`).
//!
//! New inputs go to a work corpus under the fuzz target dir, not into the repository;
//! `--update-corpus` merges them into `fuzz/corpus/<target>/` and minimizes it (`cargo fuzz
//! cmin`). A crash leaves its input in `fuzz/artifacts/<target>/`: keep it in the corpus as a
//! regression case once fixed.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result};

use crate::{cmd, host};

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Target {
    /// Random bytes (YAML, JSON) as one manifest file.
    Manifest,
    /// Random apply/delete events of Services, EndpointSlices and Nodes.
    Model,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Manifest => "manifest",
            Target::Model => "model",
        }
    }
}

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, value_enum)]
    pub target: Target,
    /// How long to fuzz (libFuzzer's -max_total_time).
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Afterwards, merge the new inputs into the kept corpus and minimize it.
    #[arg(long)]
    pub update_corpus: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let root = host::workspace_root();
    let fuzz_dir = root.join("fuzz");
    let target = args.target.name();
    let kept = fuzz_dir.join("corpus").join(target);
    let target_dir = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || fuzz_dir.join("target"),
        |dir| Path::new(&dir).join("fuzz"),
    );
    let work = target_dir.join("corpus").join(target);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    ensure_cargo_fuzz()?;
    println!(
        "fuzz-inputs: fuzzing `{target}` for {} s with libFuzzer (nightly, address sanitizer), \
         starting from {} (kept) and {} (this machine's finds)",
        args.seconds,
        kept.display(),
        work.display()
    );
    let mut fuzz = cargo_fuzz(&fuzz_dir, &target_dir, "run");
    fuzz.arg(target).arg(&work).arg(&kept).args([
        "--".to_owned(),
        format!("-max_total_time={}", args.seconds),
        "-print_final_stats=1".to_owned(),
    ]);
    cmd::run(&mut fuzz)?;
    if args.update_corpus {
        println!(
            "fuzz-inputs: merging the new inputs into {} and minimizing it",
            kept.display()
        );
        for entry in std::fs::read_dir(&work)? {
            let path = entry?.path();
            if let Some(name) = path.file_name() {
                std::fs::copy(&path, kept.join(name))?;
            }
        }
        let mut cmin = cargo_fuzz(&fuzz_dir, &target_dir, "cmin");
        cmin.arg(target).arg(&kept);
        cmd::run(&mut cmin)?;
    }
    Ok(())
}

/// `cargo fuzz <command>` with the nightly toolchain, in `fuzz/`, without the eBPF build
/// (the targets never load programs; lb-userspace's build script leaves an empty object).
fn cargo_fuzz(fuzz_dir: &Path, target_dir: &Path, command: &str) -> Command {
    let mut fuzz = Command::new("rustup");
    fuzz.current_dir(fuzz_dir)
        .args(["run", "nightly", "cargo", "fuzz", command])
        .arg("--target-dir")
        .arg(target_dir)
        .env("AYA_BUILD_SKIP", "1");
    // The stable cargo that runs xtask must not be the one cargo-fuzz calls.
    for variable in ["CARGO", "RUSTC", "RUSTUP_TOOLCHAIN"] {
        fuzz.env_remove(variable);
    }
    fuzz
}

fn ensure_cargo_fuzz() -> Result<()> {
    let present = Command::new("rustup")
        .args(["run", "nightly", "cargo", "fuzz", "--version"])
        .env_remove("CARGO")
        .output()
        .is_ok_and(|out| out.status.success());
    if present {
        return Ok(());
    }
    println!("fuzz-inputs: cargo-fuzz is missing: installing it");
    cmd::run(Command::new(host::cargo()).args(["install", "cargo-fuzz", "--locked"]))
        .context("installing cargo-fuzz")
}
