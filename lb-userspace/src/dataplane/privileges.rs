//! What the agent needs from the kernel, checked up front so a missing capability is named
//! with what it is for, instead of surfacing as an EPERM from deep inside a bpf() call or as
//! sockets of removed backends silently left alone.
//!
//! The list is the outcome of running the real agent with one capability taken away at a time
//! (tests/least_privilege.rs, docs/reliability.md "Least privilege"); manifests/deploy's
//! DaemonSet grants exactly these.
use anyhow::{Context as _, bail};

/// One capability the agent cannot do without, and what breaks without it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Needed {
    /// The capability's number (linux/capability.h).
    pub number: u32,
    pub name: &'static str,
    pub used_for: &'static str,
}

/// CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_SYS_PTRACE. CAP_BPF and CAP_PERFMON are not listed:
/// the kernel grants what they grant (bpf(2), the verifier's trust in pointer arithmetic and
/// bounded speculation, network program types) to CAP_SYS_ADMIN too, which the agent needs
/// anyway for setns(2).
pub const NEEDED: &[Needed] = &[
    Needed {
        number: 12,
        name: "CAP_NET_ADMIN",
        used_for: "destroying sockets of removed backends (netlink SOCK_DESTROY; the program \
                   loads and attaches take CAP_SYS_ADMIN as well)",
    },
    Needed {
        number: 21,
        name: "CAP_SYS_ADMIN",
        used_for: "bpf(2): creating the maps, loading and attaching the programs \
                   (CAP_BPF+CAP_PERFMON would do for that alone), entering pods' network \
                   namespaces (setns) to destroy sockets of removed backends, and mounting \
                   bpffs where none is mounted",
    },
    Needed {
        number: 19,
        name: "CAP_SYS_PTRACE",
        used_for: "opening /proc/PID/ns/net of processes that run under another uid or with \
                   capabilities the agent lacks (every pod), to destroy their sockets of \
                   removed backends",
    },
];

/// The capabilities of `needed` missing from the effective set `effective` (a CapEff mask).
pub fn missing(effective: u64, needed: &[Needed]) -> Vec<Needed> {
    needed
        .iter()
        .filter(|cap| effective & (1u64 << cap.number) == 0)
        .copied()
        .collect()
}

/// The message naming each capability of `missing` and what the agent needs it for.
pub fn describe_missing(missing: &[Needed]) -> String {
    let names: Vec<&str> = missing.iter().map(|cap| cap.name).collect();
    let reasons: Vec<String> = missing
        .iter()
        .map(|cap| format!("{} for {}", cap.name, cap.used_for))
        .collect();
    format!(
        "lb-agent lacks the capabilities {}: it needs {}. Grant them (the DaemonSet's \
         securityContext.capabilities.add in manifests/deploy/daemonset.yaml) or run it as root",
        names.join(", "),
        reasons.join("; ")
    )
}

/// This process's effective capabilities (CapEff of /proc/self/status).
pub fn effective() -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .context("no CapEff line in /proc/self/status")
}

/// Fails naming every capability of [`NEEDED`] this process lacks and what it is for.
pub fn check() -> anyhow::Result<()> {
    let missing = missing(effective()?, NEEDED);
    if !missing.is_empty() {
        bail!("{}", describe_missing(&missing));
    }
    Ok(())
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it so large maps load. Lifting
/// the hard limit needs CAP_SYS_RESOURCE, which the DaemonSet does not grant: later kernels
/// charge maps to the memory cgroup instead and ignore the limit.
pub fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass and nothing else.
    let result = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    if result != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "could not lift RLIMIT_MEMLOCK (only matters before kernel 5.11)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u64 = u64::MAX;

    fn without(names: &[&str]) -> u64 {
        NEEDED
            .iter()
            .filter(|cap| names.contains(&cap.name))
            .fold(ALL, |mask, cap| mask & !(1u64 << cap.number))
    }

    #[test]
    fn nothing_is_missing_with_every_capability() {
        assert!(missing(ALL, NEEDED).is_empty());
    }

    #[test]
    fn the_message_names_each_missing_capability_and_what_it_is_for() {
        let gone = missing(without(&["CAP_SYS_PTRACE", "CAP_NET_ADMIN"]), NEEDED);
        let names: Vec<&str> = gone.iter().map(|cap| cap.name).collect();
        assert_eq!(names, ["CAP_NET_ADMIN", "CAP_SYS_PTRACE"]);
        let message = describe_missing(&gone);
        assert!(
            message.contains("lacks the capabilities CAP_NET_ADMIN, CAP_SYS_PTRACE"),
            "{message}"
        );
        assert!(message.contains("CAP_SYS_PTRACE for opening /proc/PID/ns/net"));
        assert!(message.contains("CAP_NET_ADMIN for destroying sockets"));
        assert!(!message.contains("CAP_SYS_ADMIN for"), "{message}");
    }

    #[test]
    fn the_numbers_are_the_kernels() {
        // linux/capability.h
        let numbers: Vec<(&str, u32)> = NEEDED.iter().map(|c| (c.name, c.number)).collect();
        assert_eq!(
            numbers,
            [
                ("CAP_NET_ADMIN", 12),
                ("CAP_SYS_ADMIN", 21),
                ("CAP_SYS_PTRACE", 19)
            ]
        );
    }
}
