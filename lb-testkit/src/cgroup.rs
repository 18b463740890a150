//! Throwaway cgroup v2 directories, emptied and removed on drop.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::names::unique_name;

/// How long drop waits for killed processes to leave the cgroup.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the cgroup v2 hierarchy is mounted, from /proc/self/mountinfo:
/// /sys/fs/cgroup/unified (hybrid systems) first, then /sys/fs/cgroup, then
/// any other cgroup2 mount.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mounts = cgroup2_mounts(&info);
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .map(PathBuf::from)
        .find(|p| mounts.contains(p))
        .or_else(|| mounts.into_iter().next())
        .context("no cgroup2 file system is mounted")
}

/// Mount points of the cgroup2 file systems listed in a mountinfo text.
fn cgroup2_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            (right.split(' ').next()? == "cgroup2").then(|| PathBuf::from(unescape(mount_point)))
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) if b[i] == b'\\' => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A child cgroup of the cgroup2 root named `unique_name(prefix)`. Dropping it
/// kills the processes in it and removes it. The root cgroup itself is never
/// written to.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    pub fn new(prefix: &str) -> Result<Cgroup> {
        Cgroup::named(&unique_name(prefix))
    }

    /// A child cgroup of the cgroup2 root with exactly this name (the sandbox's fixed
    /// name); fails if it exists.
    pub fn named(name: &str) -> Result<Cgroup> {
        let root = cgroup2_mount()?;
        let path = root.join(name);
        if path.parent() != Some(root.as_path()) || path == root {
            bail!("refusing to use {} as a test cgroup", path.display());
        }
        fs::create_dir(&path)
            .with_context(|| format!("cannot create cgroup {}", path.display()))?;
        Ok(Cgroup { path })
    }

    /// The cgroup's directory, e.g. for attaching BPF programs to it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Pids of the processes in the cgroup (its `cgroup.procs`).
    pub fn procs(&self) -> Result<Vec<i32>> {
        read_procs(&self.path)
    }

    /// Moves an already running process into the cgroup.
    pub fn add_pid(&self, pid: u32) -> Result<()> {
        let procs = self.path.join("cgroup.procs");
        fs::write(&procs, pid.to_string())
            .with_context(|| format!("moving pid {pid} to {}", procs.display()))
    }

    /// Kills every process in the cgroup and waits (bounded) until it is empty.
    /// Never kills the calling process: if it was moved in here, this fails.
    fn kill_all(&self) -> Result<()> {
        if self.procs()?.contains(&(std::process::id() as i32)) {
            bail!("this process is in {}; not killing it", self.path.display());
        }
        let kill_file = self.path.join("cgroup.kill");
        if kill_file.exists() {
            fs::write(&kill_file, "1")
                .with_context(|| format!("writing {}", kill_file.display()))?;
        } else {
            for pid in self.procs()? {
                // SAFETY: plain syscall; a stale pid only yields ESRCH.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while !self.procs()?.is_empty() {
            if Instant::now() >= deadline {
                bail!(
                    "processes still in {} after {DRAIN_TIMEOUT:?}",
                    self.path.display()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

fn read_procs(dir: &Path) -> Result<Vec<i32>> {
    let file = dir.join("cgroup.procs");
    let text = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Removes `dir` and any child cgroups below it, deepest first.
fn remove_tree(dir: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        match fs::remove_dir(dir) {
            Err(e) if e.kind() == ErrorKind::ResourceBusy && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = self.kill_all() {
            eprintln!("lb-testkit: emptying cgroup: {e:#}");
        }
        if let Err(e) = remove_tree(&self.path) {
            eprintln!("lb-testkit: removing cgroup {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_mounts() {
        let info = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                    32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                    42 31 0:39 / /mnt/my\\040cg rw shared:5 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mounts(info),
            [
                PathBuf::from("/sys/fs/cgroup/unified"),
                PathBuf::from("/mnt/my cg")
            ]
        );
    }
}
