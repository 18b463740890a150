//! `cargo xtask test [--dry-run] [-- <cargo test args>]`: runs setup, builds every target of
//! the workspace and runs its tests. Needs root: the tests load BPF programs and create
//! network namespaces.
//!
//! Building every target first matters: lb-userspace's tests run lb-testkit's `lb-probe`,
//! which `cargo test -p lb-userspace` alone would not build.

use std::process::Command;

use anyhow::{Result, bail};

use crate::{cmd, host, setup};

#[derive(clap::Args)]
pub struct Args {
    /// Print the commands instead of running them (setup only checks).
    #[arg(long)]
    pub dry_run: bool,
    /// Passed on to `cargo test`, after `--`: e.g. `-- -p lb-userspace -- --nocapture`.
    #[arg(last = true)]
    pub cargo_test_args: Vec<String>,
}

/// Built for the BPF target by lb-userspace's build script; built for the host it does not
/// link (no_std, no_main), so the host builds leave it out.
const EBPF_CRATE: &str = "lb-ebpf";

pub fn run(args: &Args) -> Result<()> {
    if args.dry_run {
        println!("test: dry run: setup only checks, and the commands are printed, not run");
        if let Err(e) = setup::run(&setup::Args { check: true }) {
            println!("test: setup would install what is missing ({e:#})");
        }
        if !host::is_root() {
            println!("test: not root: a real run would stop here");
        }
    } else {
        if !host::is_root() {
            bail!(
                "`cargo xtask test` must run as root: the tests load BPF programs and create \
                 network namespaces (try `sudo -E env \"PATH=$PATH\" cargo xtask test`)"
            );
        }
        setup::run(&setup::Args { check: false })?;
    }

    let mut build = cargo();
    build
        .arg("build")
        .args(["--workspace", "--exclude", EBPF_CRATE, "--all-targets"]);
    let mut test = cargo();
    test.arg("test");
    if !selects_packages(&args.cargo_test_args) {
        test.args(["--workspace", "--exclude", EBPF_CRATE]);
    }
    test.args(&args.cargo_test_args);

    for command in [&mut build, &mut test] {
        if args.dry_run {
            println!("+ {}", cmd::display(command));
        } else {
            cmd::run(command)?;
        }
    }
    Ok(())
}

fn cargo() -> Command {
    host::workspace_cargo()
}

/// Whether the arguments before a `--` pick packages themselves (`-p`, `--package`), which
/// `--workspace` would override.
fn selects_packages(args: &[String]) -> bool {
    args.iter()
        .take_while(|a| *a != "--")
        .any(|a| a.starts_with("-p") || a == "--package" || a.starts_with("--package="))
}

#[cfg(test)]
mod tests {
    use super::selects_packages;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn package_selection_before_the_test_binary_args() {
        assert!(selects_packages(&args(&["-p", "lb-userspace"])));
        assert!(selects_packages(&args(&["-plb-testkit"])));
        assert!(selects_packages(&args(&["--package=lb-common"])));
        assert!(!selects_packages(&args(&["--release", "--", "-p"])));
        assert!(!selects_packages(&args(&["--profile", "release"])));
        assert!(!selects_packages(&[]));
    }
}
