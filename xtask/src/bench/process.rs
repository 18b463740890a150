//! The agent's process as the kernel accounts it: CPU time (all threads, to the nanosecond)
//! and memory (`/proc/PID/status`).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::sleep;

/// CPU time (ms) of a process, all its threads, also those that exited: utime + stime as
/// `/proc/PID/stat` counts them, but from the process's CPU clock (`clock_getcpuclockid`),
/// to the nanosecond; `/proc/PID/stat` gives clock ticks (10 ms), too coarse for one change.
/// NaN when the clock cannot be read (the process is gone).
pub fn cpu_ms(pid: u32) -> f64 {
    let mut clock: libc::clockid_t = 0;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: both pointers are to live locals of the right types.
    let ok = unsafe {
        libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) == 0
            && libc::clock_gettime(clock, &mut ts) == 0
    };
    if !ok {
        return f64::NAN;
    }
    ts.tv_sec as f64 * 1000.0 + ts.tv_nsec as f64 / 1e6
}

/// Waits (at most `timeout`) until the process uses less than 5 % of a core over 200 ms: the
/// agent is done with what it was given.
pub fn wait_idle(pid: u32, timeout: Duration) -> Result<()> {
    const WINDOW: Duration = Duration::from_millis(200);
    let deadline = Instant::now() + timeout;
    loop {
        let cpu0 = cpu_ms(pid);
        sleep(WINDOW)?;
        let used = cpu_ms(pid) - cpu0;
        if used.is_nan() {
            bail!("process {pid} is gone");
        }
        if used < WINDOW.as_secs_f64() * 1000.0 * 0.05 || Instant::now() > deadline {
            return Ok(());
        }
    }
}

/// A `/proc/PID/status` field in kB (`VmRSS`, `VmHWM`, ...), 0 when absent.
pub fn status_kb(pid: u32, key: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| {
            v.trim_start_matches(':')
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}
