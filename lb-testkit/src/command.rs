//! Running commands, and spawning processes inside a network namespace and a cgroup.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::{Cgroup, Netns};

/// Runs `cmd` to completion and returns its stdout. Fails, naming the command
/// and quoting its stderr, when it cannot start or exits unsuccessfully.
pub fn run_checked(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Builds a [`Command`] for `program` that, between fork and exec, first moves
/// itself into `cgroup` and then enters `netns`. The program's sockets are thus
/// created in the namespace, and its connects go through the cgroup's BPF programs.
/// Arguments, stdio and environment are left to the caller.
pub fn command_in(
    netns: Option<&Netns>,
    cgroup: Option<&Cgroup>,
    program: impl AsRef<OsStr>,
) -> Result<Command> {
    let mut cmd = Command::new(program);
    if let Some(cgroup) = cgroup {
        let procs = cgroup.path().join("cgroup.procs");
        let file = OpenOptions::new()
            .write(true)
            .open(&procs)
            .with_context(|| format!("cannot open {}", procs.display()))?;
        join_cgroup_before_exec(&mut cmd, file.into());
    }
    if let Some(netns) = netns {
        let file = File::open(netns.path())
            .with_context(|| format!("cannot open {}", netns.path().display()))?;
        setns_before_exec(&mut cmd, Ok(file.into()));
    }
    Ok(cmd)
}

/// Spawns `program args...` in `netns` and `cgroup` (see [`command_in`]) with
/// stdin from /dev/null and stdout and stderr piped (read them, or use
/// [`Child::wait_with_output`]).
pub fn spawn_in<S: AsRef<OsStr>>(
    netns: Option<&Netns>,
    cgroup: Option<&Cgroup>,
    program: impl AsRef<OsStr>,
    args: &[S],
) -> Result<Child> {
    let mut cmd = command_in(netns, cgroup, program)?;
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().with_context(|| format!("cannot spawn {cmd:?}"))
}

/// Adds a pre-exec step writing the child's pid to `procs` (an open
/// `cgroup.procs`). Nothing after fork allocates.
pub(crate) fn join_cgroup_before_exec(cmd: &mut Command, procs: OwnedFd) {
    let hook = move || {
        let mut buf = [0u8; 20];
        // SAFETY: getpid has no preconditions.
        let digits = format_decimal(unsafe { libc::getpid() } as u64, &mut buf);
        // SAFETY: the fd is owned by this closure and `digits` is a valid buffer.
        let written =
            unsafe { libc::write(procs.as_raw_fd(), digits.as_ptr().cast(), digits.len()) };
        if written < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook only calls async-signal-safe functions and does not allocate.
    unsafe { cmd.pre_exec(hook) };
}

/// Adds a pre-exec step entering the network namespace `ns`. If opening the
/// namespace failed earlier (`Err(errno)`), spawning fails with that error.
pub(crate) fn setns_before_exec(cmd: &mut Command, ns: Result<OwnedFd, i32>) {
    let hook = move || match &ns {
        Ok(fd) => setns_net(fd),
        Err(errno) => Err(std::io::Error::from_raw_os_error(*errno)),
    };
    // SAFETY: setns is async-signal-safe and the error path does not allocate.
    unsafe { cmd.pre_exec(hook) };
}

/// Moves the calling thread into the network namespace behind `fd`.
pub(crate) fn setns_net(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: `fd` is a valid open descriptor.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Writes `n` in decimal at the end of `buf` and returns the digits.
fn format_decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut start = buf.len();
    loop {
        start -= 1;
        buf[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[start..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::format_decimal;

    #[test]
    fn decimal() {
        let mut buf = [0; 20];
        assert_eq!(format_decimal(0, &mut buf), b"0");
        assert_eq!(format_decimal(4194304, &mut buf), b"4194304");
        assert_eq!(
            format_decimal(u64::MAX, &mut buf),
            u64::MAX.to_string().as_bytes()
        );
    }
}
