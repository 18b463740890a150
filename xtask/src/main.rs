//! Project tasks, run as `cargo xtask <command>` (the alias is in `.cargo/config.toml`).
//!
//! One module per command; `cmd` and `host` are the helpers they share.

mod bench;
mod chaos;
mod cmd;
mod fuzz;
mod fuzz_inputs;
mod host;
mod run;
mod setup;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", about = "Tasks of the eBPF service load balancer", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check for, and install when missing, what building and testing need: Debian packages
    /// (LLVM 22, iproute2, bpftool, ...), the nightly toolchain with rust-src, and bpf-linker.
    Setup(setup::Args),
    /// Run setup, build the workspace and run its tests (as root: the tests load BPF programs
    /// and create network namespaces).
    Test(test::Args),
    /// Run setup, build the agent and start a local sandbox: a node with three `hostnames`
    /// pods and a client pod in network namespaces, the example manifests, the agent; then
    /// send traffic and show how to try it by hand. `--down` removes it. As root.
    Run(run::Args),
    /// Benchmarks against kube-proxy's iptables and nftables layouts, side by side, in
    /// namespaces it makes and removes: connection cost, UDP, hook cost, programming time and
    /// latency, churn, XDP, memory. `--quick` for CI. As root.
    Bench(bench::Args),
    /// Kill -9, SIGTERM and limit-changing restarts of the agent at random points of its
    /// syncs, under traffic and endpoint churn; after each, its maps must equal a fresh
    /// agent's, and no request may fail. As root.
    Chaos(chaos::ChaosArgs),
    /// The chaos node for `--minutes`, with traffic, churn and restarts: the agent's memory,
    /// descriptors and map entries sampled each minute (table and CSV). As root.
    Soak(chaos::SoakArgs),
    /// Differential packet fuzzing: random and mutated frames through the real XDP and tc
    /// programs (BPF_PROG_TEST_RUN) against a model of docs/nodeport.md; every verdict, byte
    /// and touched map entry compared. `--packets N` (default 10,000,000), `--seed S`. As root.
    Fuzz(fuzz::Args),
    /// Fuzz the agent's input side (cargo-fuzz, nightly): manifest files through the parser,
    /// or object events through the model and the reconciler. Installs cargo-fuzz if missing.
    FuzzInputs(fuzz_inputs::Args),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Setup(args) => setup::run(&args),
        Command::Test(args) => test::run(&args),
        Command::Run(args) => run::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Chaos(args) => chaos::chaos(&args),
        Command::Soak(args) => chaos::soak(&args),
        Command::Fuzz(args) => fuzz::run(&args),
        Command::FuzzInputs(args) => fuzz_inputs::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The chain of contexts, without the backtrace that RUST_BACKTRACE would add.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
