//! Named network namespaces (`ip netns`), removed on drop.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, Result};

use crate::command::{run_checked, setns_before_exec, setns_net};
use crate::names::unique_name;

/// `ip netns add` sets up the /run/netns mount the first time; serialise it
/// within the process so parallel tests do not race on that setup.
static IP_NETNS_LOCK: Mutex<()> = Mutex::new(());

/// A network namespace named `unique_name(prefix)`, pinned at /run/netns/NAME.
/// Dropping it kills every process left in it and deletes it.
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    /// Creates the namespace (`ip netns add`).
    pub fn new(prefix: &str) -> Result<Netns> {
        Netns::named(&unique_name(prefix))
    }

    /// Creates the namespace with exactly this name (the sandbox's fixed names); fails if
    /// one by that name exists.
    pub fn named(name: &str) -> Result<Netns> {
        let name = name.to_owned();
        {
            let _guard = IP_NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            run_checked(Command::new("ip").args(["netns", "add", &name]))?;
        }
        let path = Path::new("/run/netns").join(&name);
        Ok(Netns { name, path })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// /run/netns/NAME.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `args` inside the namespace with `nsenter --net` (which, unlike
    /// `ip netns exec`, keeps the host's /sys, cgroupfs and bpffs) and returns
    /// its stdout; the error names the command and quotes its stderr.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path.display()))
            .arg("--")
            .args(args);
        run_checked(&mut cmd).with_context(|| format!("in netns {}", self.name))
    }

    /// A [`Command`] for `program` that enters the namespace between fork and exec.
    /// If the namespace cannot be opened, spawning the command fails.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let fd = File::open(&self.path)
            .map(OwnedFd::from)
            .map_err(|e| e.raw_os_error().unwrap_or(libc::ENOENT));
        let mut cmd = Command::new(program);
        setns_before_exec(&mut cmd, fd);
        cmd
    }

    /// Moves the calling thread (only) into the namespace, e.g. for a test
    /// server thread. There is no way back: use a dedicated thread.
    pub fn enter_thread(&self) -> Result<()> {
        let file = File::open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        setns_net(&OwnedFd::from(file)).with_context(|| format!("setns into netns {}", self.name))
    }

    /// Pids of the processes whose network namespace this is (`ip netns pids`).
    pub fn pids(&self) -> Result<Vec<i32>> {
        let out = run_checked(Command::new("ip").args(["netns", "pids", &self.name]))?;
        Ok(out
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect())
    }

    fn kill_all(&self) {
        let me = std::process::id() as i32;
        match self.pids() {
            Ok(pids) => {
                for pid in pids.into_iter().filter(|&p| p > 0 && p != me) {
                    // SAFETY: plain syscall; a stale pid only yields ESRCH.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            Err(e) => eprintln!(
                "lb-testkit: listing processes in netns {}: {e:#}",
                self.name
            ),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.kill_all();
        let _guard = IP_NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = run_checked(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("lb-testkit: removing netns {}: {e:#}", self.name);
        }
    }
}
