//! `cargo xtask setup [--check]`: makes sure this machine has what building and testing need,
//! installing only what is missing, one `setup: <what> ... <state>` line per step.
//!
//! 1. Debian packages: LLVM 22 for bpf-linker, and the tools the tests, the sandbox and the
//!    benchmarks call (ip, nsenter, bpftool, iptables, nft). On Debian 12, LLVM 22 comes from
//!    Debian's security archive (`bookworm-security`, in a default install's apt sources);
//!    setup adds that source when apt has no candidate for it.
//! 2. The nightly toolchain with `rust-src` (the eBPF crate builds `core` for the BPF target).
//! 3. bpf-linker, built with `cargo install` against LLVM 22.
//!
//! Idempotent: a second run only checks. `--check` installs nothing and fails if something
//! is missing.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::{cmd, host};

#[derive(clap::Args)]
pub struct Args {
    /// Only report what is present and what is missing; install nothing (exits 1 when
    /// something is missing).
    #[arg(long)]
    pub check: bool,
}

/// The Debian packages, with what each is for.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("llvm-22-dev", "LLVM 22, which bpf-linker links"),
    (
        "libpolly-22-dev",
        "Polly, which LLVM 22's llvm-config lists",
    ),
    ("libzstd-dev", "zstd, which LLVM links"),
    ("zlib1g-dev", "zlib, which LLVM links"),
    ("iproute2", "ip, for the tests' network namespaces"),
    ("util-linux", "nsenter"),
    ("bpftool", "inspecting loaded BPF programs and maps"),
    ("iptables", "the benchmarks' iptables baseline"),
    ("nftables", "the benchmarks' nftables baseline"),
];

/// The packages that come from the LLVM 22 apt source.
const LLVM_PACKAGES: &[&str] = &["llvm-22-dev", "libpolly-22-dev"];
const LLVM_MAJOR: u32 = 22;
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";

/// Debian 12 ships LLVM 22 in its security archive. This is the entry a default Debian 12
/// install has (and this project's machines use); setup writes it only when apt has no
/// candidate for llvm-22-dev.
const SECURITY_SOURCE_FILE: &str = "/etc/apt/sources.list.d/lb-debian-security.sources";
const SECURITY_SOURCE: &str = "\
# Added by `cargo xtask setup`: Debian 12 ships LLVM 22 (llvm-22-dev) in bookworm-security.
Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

const NIGHTLY: &str = "nightly";
/// The release known to build with stable 1.95 and to have the `llvm-22` feature.
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run(args: &Args) -> Result<()> {
    let mut setup = Setup {
        check: args.check,
        missing: Vec::new(),
    };
    setup.apt()?;
    setup.nightly()?;
    setup.rust_src()?;
    setup.bpf_linker()?;
    if !setup.missing.is_empty() {
        bail!(
            "missing: {}; `cargo xtask setup` (as root) installs them",
            setup.missing.join(", ")
        );
    }
    println!("setup: everything is in place");
    Ok(())
}

struct Setup {
    /// Report only.
    check: bool,
    /// What `--check` found missing.
    missing: Vec<String>,
}

impl Setup {
    /// Prints the step's line: `ok` when present, else `missing` (with `--check`, which also
    /// records it) or `installing`.
    fn step(&mut self, what: &str, present: bool, detail: Option<&str>) {
        let state = match (present, self.check) {
            (true, _) => "ok",
            (false, true) => {
                self.missing
                    .push(what.split(' ').next().unwrap_or(what).to_owned());
                "missing"
            }
            (false, false) => "installing",
        };
        match detail {
            Some(detail) => println!("setup: {what} ... {state} ({detail})"),
            None => println!("setup: {what} ... {state}"),
        }
    }

    fn apt(&mut self) -> Result<()> {
        let mut missing = Vec::new();
        for &(package, why) in APT_PACKAGES {
            let present = deb_installed(package)?;
            if !present {
                missing.push(package);
            }
            self.step(&format!("{package} ({why})"), present, None);
        }
        let llvm_missing = LLVM_PACKAGES.iter().any(|p| missing.contains(p));
        if self.check || missing.is_empty() {
            return self.llvm_source(llvm_missing);
        }
        require_root("installing Debian packages")?;
        cmd::run(apt_get().arg("update"))?;
        if llvm_missing {
            self.llvm_source(true)?;
        }
        cmd::run(apt_get().args(["install", "-y"]).args(&missing))?;
        for package in missing {
            if !deb_installed(package)? {
                bail!("apt-get install finished but {package} is not installed");
            }
        }
        Ok(())
    }

    /// Reports where llvm-22-dev comes from; when installing and apt has no candidate, adds
    /// Debian's security archive as a source.
    fn llvm_source(&mut self, llvm_missing: bool) -> Result<()> {
        let what = "apt source of llvm-22";
        if let Some(candidate) = apt_candidate("llvm-22-dev")? {
            self.step(what, true, Some(&candidate));
            return Ok(());
        }
        if !llvm_missing {
            self.step(
                what,
                true,
                Some("installed; not in the current package lists"),
            );
            return Ok(());
        }
        if self.check {
            println!(
                "setup: {what} ... unknown (no candidate in the current package lists; \
                 setup runs apt-get update, then adds {SECURITY_SOURCE_FILE} if still none)"
            );
            return Ok(());
        }
        let codename = os_codename()?;
        if codename != "bookworm" {
            bail!(
                "apt has no candidate for llvm-22-dev, and this is not Debian 12 (bookworm) \
                 but `{codename}`: add an apt source that ships LLVM 22"
            );
        }
        if Path::new(SECURITY_SOURCE_FILE).exists() {
            bail!("apt has no candidate for llvm-22-dev even with {SECURITY_SOURCE_FILE}");
        }
        self.step(
            what,
            false,
            Some(&format!(
                "adding Debian's bookworm-security in {SECURITY_SOURCE_FILE}"
            )),
        );
        fs::write(SECURITY_SOURCE_FILE, SECURITY_SOURCE)
            .with_context(|| format!("writing {SECURITY_SOURCE_FILE}"))?;
        cmd::run(apt_get().arg("update"))?;
        match apt_candidate("llvm-22-dev")? {
            Some(candidate) => println!("setup: {what} ... ok ({candidate})"),
            None => bail!("apt has no candidate for llvm-22-dev even with {SECURITY_SOURCE_FILE}"),
        }
        Ok(())
    }

    fn nightly(&mut self) -> Result<()> {
        let list = cmd::output(Command::new("rustup").args(["toolchain", "list"]))
            .context("rustup is needed to manage the toolchains (see https://rustup.rs)")?;
        let present = list
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .any(is_plain_nightly);
        self.step(
            "nightly toolchain (builds the eBPF programs)",
            present,
            None,
        );
        if present || self.check {
            return Ok(());
        }
        cmd::run(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))
        .context("installing the nightly toolchain")
    }

    fn rust_src(&mut self) -> Result<()> {
        // Fails when there is no nightly yet (only possible with --check): that is "missing".
        let present = cmd::output(Command::new("rustup").args([
            "component",
            "list",
            "--toolchain",
            NIGHTLY,
            "--installed",
        ]))
        .is_ok_and(|list| list.lines().any(|l| l.starts_with("rust-src")));
        self.step(
            "rust-src for nightly (core for the BPF target)",
            present,
            None,
        );
        if present || self.check {
            return Ok(());
        }
        cmd::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            NIGHTLY,
        ]))
        .context("adding rust-src to the nightly toolchain")
    }

    fn bpf_linker(&mut self) -> Result<()> {
        let what = format!("bpf-linker (links the eBPF programs; built against LLVM {LLVM_MAJOR})");
        let found = bpf_linker_path();
        let verdict = found.as_deref().map(inspect_bpf_linker);
        match &verdict {
            Some(Ok(detail)) => self.step(&what, true, Some(detail)),
            Some(Err(problem)) => self.step(&what, false, Some(problem)),
            None => self.step(&what, false, None),
        }
        if matches!(verdict, Some(Ok(_))) || self.check {
            return Ok(());
        }
        let llvm_config = Path::new(LLVM_BIN).join("llvm-config");
        if !llvm_config.is_file() {
            bail!(
                "{} is missing: bpf-linker builds against LLVM {LLVM_MAJOR} (llvm-22-dev)",
                llvm_config.display()
            );
        }
        let mut install = Command::new(host::cargo());
        install
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22"])
            // llvm-sys finds LLVM through the llvm-config on PATH.
            .env("PATH", host::path_with(Path::new(LLVM_BIN)));
        if found.is_some() {
            install.arg("--force");
        }
        cmd::run(&mut install).context("building bpf-linker")?;
        let installed =
            bpf_linker_path().context("cargo install finished but found no bpf-linker")?;
        match inspect_bpf_linker(&installed) {
            Ok(detail) => println!("setup: {what} ... ok ({detail})"),
            Err(problem) => bail!("bpf-linker was installed but {problem}"),
        }
        Ok(())
    }
}

fn require_root(what: &str) -> Result<()> {
    if !host::is_root() {
        bail!("{what} needs root: run `cargo xtask setup` as root (or see `--check`)");
    }
    Ok(())
}

/// `apt-get`, non-interactive, waiting for a dpkg lock held by another apt.
fn apt_get() -> Command {
    let mut apt = Command::new("apt-get");
    apt.env("DEBIAN_FRONTEND", "noninteractive")
        .args(["-q", "-o", "DPkg::Lock::Timeout=300"]);
    apt
}

fn deb_installed(package: &str) -> Result<bool> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .context("running dpkg-query (setup needs a Debian system)")?;
    // An unknown package makes dpkg-query fail: not installed.
    Ok(out.status.success()
        && String::from_utf8_lossy(&out.stdout).trim() == "install ok installed")
}

/// apt's candidate for `package` and where it comes from, e.g.
/// `1:22.1.8-1~deb12u1 from http://deb.debian.org/debian-security bookworm-security/main`.
fn apt_candidate(package: &str) -> Result<Option<String>> {
    let policy = cmd::output(Command::new("apt-cache").args(["policy", package]))?;
    Ok(parse_candidate(&policy))
}

fn parse_candidate(policy: &str) -> Option<String> {
    let version = policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .filter(|v| *v != "(none)")?;
    // In the version table, the candidate's line is followed by its origins
    // (`500 http://... suite/component arch Packages`).
    let origin = policy
        .lines()
        .skip_while(|l| {
            l.trim().trim_start_matches("***").split_whitespace().next() != Some(version)
        })
        .skip(1)
        .map_while(|l| {
            let mut words = l.split_whitespace();
            words.next()?.parse::<i32>().ok()?;
            Some(words.take(2).collect::<Vec<_>>().join(" "))
        })
        .find(|o| o.contains("://"));
    Some(match origin {
        Some(origin) => format!("{version} from {origin}"),
        None => version.to_owned(),
    })
}

fn os_codename() -> Result<String> {
    let release = fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    release
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .context("/etc/os-release has no VERSION_CODENAME")
}

/// `nightly` or `nightly-<host>`, not a dated `nightly-2025-01-01-<host>` (the eBPF build
/// asks rustup for plain `nightly`).
fn is_plain_nightly(toolchain: &str) -> bool {
    toolchain == NIGHTLY
        || toolchain
            .strip_prefix("nightly-")
            .is_some_and(|host| !host.starts_with(|c: char| c.is_ascii_digit()))
}

/// bpf-linker on PATH, else where `cargo install` puts it.
fn bpf_linker_path() -> Option<PathBuf> {
    host::find_on_path("bpf-linker").or_else(|| {
        host::cargo_bin_dir()
            .map(|dir| dir.join("bpf-linker"))
            .filter(|p| p.is_file())
    })
}

/// `Ok(what it is)` when it runs and is not linked to another LLVM than 22, else
/// `Err(why it needs reinstalling)`.
fn inspect_bpf_linker(path: &Path) -> std::result::Result<String, String> {
    let version = cmd::output(Command::new(path).arg("--version"))
        .map_err(|e| format!("{} does not run: {e:#}", path.display()))?;
    let version = version.trim();
    let mut detail = format!("{version} at {}", path.display());
    match linked_llvm_major(path) {
        Some(LLVM_MAJOR) => detail.push_str(&format!(", LLVM {LLVM_MAJOR}")),
        Some(other) => {
            return Err(format!(
                "{detail} is linked to LLVM {other}, not {LLVM_MAJOR}"
            ));
        }
        None => detail.push_str(", its LLVM is not visible to ldd (statically linked?)"),
    }
    if host::find_on_path("bpf-linker").is_none() {
        detail.push_str("; not on PATH, `cargo xtask test` adds its folder");
    }
    Ok(detail)
}

/// The major version of the libLLVM that `ldd` shows the binary linked to.
fn linked_llvm_major(path: &Path) -> Option<u32> {
    let out = Command::new("ldd").arg(path).output().ok()?;
    parse_llvm_major(&String::from_utf8_lossy(&out.stdout))
}

fn parse_llvm_major(ldd: &str) -> Option<u32> {
    ldd.split_whitespace().find_map(|word| {
        let name = word.rsplit('/').next()?;
        let rest = name
            .strip_prefix("libLLVM.so.")
            .or_else(|| name.strip_prefix("libLLVM-"))?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_and_origin_from_apt_cache_policy() {
        let policy = "llvm-22-dev:
  Installed: 1:22.1.8-1~deb12u1
  Candidate: 1:22.1.8-1~deb12u1
  Version table:
 *** 1:22.1.8-1~deb12u1 500
        500 http://deb.debian.org/debian-security bookworm-security/main amd64 Packages
        100 /var/lib/dpkg/status
";
        assert_eq!(
            parse_candidate(policy).as_deref(),
            Some(
                "1:22.1.8-1~deb12u1 from http://deb.debian.org/debian-security \
                 bookworm-security/main"
            )
        );
        let none = "llvm-22-dev:\n  Installed: (none)\n  Candidate: (none)\n  Version table:\n";
        assert_eq!(parse_candidate(none), None);
        assert_eq!(parse_candidate(""), None);
    }

    #[test]
    fn llvm_major_from_ldd() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)
\tlibLLVM.so.22.1 => /usr/lib/llvm-22/lib/libLLVM.so.22.1 (0x00007f4686200000)
\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f468f1a7000)";
        assert_eq!(parse_llvm_major(ldd), Some(22));
        assert_eq!(
            parse_llvm_major("libLLVM-21.so => /x/libLLVM-21.so"),
            Some(21)
        );
        assert_eq!(parse_llvm_major("\tnot a dynamic executable"), None);
    }

    #[test]
    fn only_plain_nightly_counts() {
        assert!(is_plain_nightly("nightly"));
        assert!(is_plain_nightly("nightly-x86_64-unknown-linux-gnu"));
        assert!(!is_plain_nightly(
            "nightly-2025-01-01-x86_64-unknown-linux-gnu"
        ));
        assert!(!is_plain_nightly("stable-x86_64-unknown-linux-gnu"));
    }
}
