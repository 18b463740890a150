//! One agent per pin directory: an exclusive `flock` on the bpffs directory itself, taken
//! before any map is touched and held for the agent's life (the kernel drops it when the
//! process ends, however it ends). Two agents on one pin directory would hand out the same
//! service and backend ids and cross-wire services; a second one is told which process holds
//! the lock (from `/proc/locks`) and either waits for it (`--lock-wait`, a DaemonSet rollout)
//! or stops.
use std::{
    fs::File,
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use rustix::fs::{FlockOperation, flock};

/// How often a waiting agent tries the lock again.
const POLL: Duration = Duration::from_millis(100);
/// How often a waiting agent says who it waits for.
const REPORT_EVERY: Duration = Duration::from_secs(5);

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "{path} is locked by {holder}: another lb-agent (or `lb-agent cleanup`) uses this pin \
         directory; stop it first, or give --lock-wait to wait for it to exit"
    )]
    Held { path: PathBuf, holder: Holder },
    #[error(
        "{path} is still locked by {holder} after waiting {waited:?} (--lock-wait); that \
         process must exit first"
    )]
    TimedOut {
        path: PathBuf,
        holder: Holder,
        waited: Duration,
    },
    #[error("locking {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The process holding a lock, as far as this process can see it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Holder {
    /// `None`: not found in `/proc/locks`, or in a pid namespace this one cannot see.
    pub pid: Option<u32>,
    /// `/proc/PID/comm`.
    pub comm: Option<String>,
    /// `/proc/PID/cmdline`, arguments joined by spaces.
    pub cmdline: Option<String>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some(pid) = self.pid else {
            return f.write_str("a process this pid namespace cannot see");
        };
        write!(f, "pid {pid}")?;
        match (&self.comm, &self.cmdline) {
            (_, Some(cmdline)) if !cmdline.is_empty() => write!(f, " ({cmdline})"),
            (Some(comm), _) => write!(f, " ({comm})"),
            _ => Ok(()),
        }
    }
}

/// An exclusive lock on a directory, held until dropped.
#[derive(Debug)]
pub struct DirLock {
    // Holding the open descriptor is holding the lock.
    _dir: File,
    path: PathBuf,
}

impl DirLock {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the lock on `path` (a directory) or says who holds it.
    pub fn try_acquire(path: &Path) -> Result<Self, LockError> {
        let dir = open_dir(path)?;
        match flock(&dir, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Self {
                _dir: dir,
                path: path.to_owned(),
            }),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(LockError::Held {
                path: path.to_owned(),
                holder: holder_of(&dir),
            }),
            Err(errno) => Err(LockError::Io {
                path: path.to_owned(),
                source: errno.into(),
            }),
        }
    }

    /// Takes the lock on `path`, waiting up to `wait` for its holder to let go; `waiting` is
    /// called with the holder when the wait starts and every few seconds after.
    pub fn acquire(
        path: &Path,
        wait: Duration,
        mut waiting: impl FnMut(&Holder),
    ) -> Result<Self, LockError> {
        let started = Instant::now();
        let mut last_report: Option<(Instant, Holder)> = None;
        loop {
            match Self::try_acquire(path) {
                Err(LockError::Held { path, holder }) => {
                    if started.elapsed() >= wait {
                        if wait.is_zero() {
                            return Err(LockError::Held { path, holder });
                        }
                        return Err(LockError::TimedOut {
                            path,
                            holder,
                            waited: wait,
                        });
                    }
                    let due = last_report.as_ref().is_none_or(|(at, previous)| {
                        at.elapsed() >= REPORT_EVERY || *previous != holder
                    });
                    if due {
                        waiting(&holder);
                        last_report = Some((Instant::now(), holder));
                    }
                    std::thread::sleep(POLL.min(wait.saturating_sub(started.elapsed())));
                }
                other => return other,
            }
        }
    }

    /// Whether the locked directory is still the one `path` names (it may have been removed,
    /// or a bpffs mounted over it, while this process waited).
    pub fn still_names(&self, path: &Path) -> bool {
        let (Ok(held), Ok(now)) = (self._dir.metadata(), std::fs::metadata(path)) else {
            return false;
        };
        (held.dev(), held.ino()) == (now.dev(), now.ino())
    }
}

/// Who holds the lock on `path`, without taking it (for `lb-agent status`); `None` when no one
/// does, or `path` is no directory.
pub fn holder(path: &Path) -> Option<Holder> {
    let dir = open_dir(path).ok()?;
    let holder = holder_of(&dir);
    holder.pid.is_some().then_some(holder)
}

fn open_dir(path: &Path) -> Result<File, LockError> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| LockError::Io {
            path: path.to_owned(),
            source,
        })
}

/// The process holding a `flock` on `file`'s inode, read from `/proc/locks`.
fn holder_of(file: &File) -> Holder {
    let Ok(meta) = file.metadata() else {
        return Holder::default();
    };
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    let Some(pid) = lock_holder(&locks, meta.dev(), meta.ino()) else {
        return Holder::default();
    };
    let read = |what: &str| std::fs::read(format!("/proc/{pid}/{what}")).ok();
    Holder {
        pid: Some(pid),
        comm: read("comm").map(|c| String::from_utf8_lossy(&c).trim().to_owned()),
        cmdline: read("cmdline").map(|c| {
            String::from_utf8_lossy(&c)
                .split('\0')
                .filter(|arg| !arg.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        }),
    }
}

/// The pid holding a granted `FLOCK` on (`dev`, `ino`) in `/proc/locks` text. Lines look like
/// `1: FLOCK  ADVISORY  WRITE 1234 00:27:11269301 0 EOF` (device numbers in hex); waiters
/// (`1: -> FLOCK ...`) are skipped, and a pid of another pid namespace shows as 0 or -1.
pub fn lock_holder(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let wanted = format!(
        "{:02x}:{:02x}:{ino}",
        rustix::fs::major(dev),
        rustix::fs::minor(dev)
    );
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) != Some(&"FLOCK") || fields.get(5) != Some(&wanted.as_str()) {
            return None;
        }
        fields.get(4)?.parse::<u32>().ok().filter(|pid| *pid > 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCKS: &str = "\
1: FLOCK  ADVISORY  WRITE 21886 00:27:11269301 0 EOF
1: -> FLOCK  ADVISORY  WRITE 21999 00:27:11269301 0 EOF
2: POSIX  ADVISORY  WRITE 20557 00:27:42 0 EOF
3: FLOCK  ADVISORY  WRITE -1 00:28:7 0 EOF
4: FLOCK  ADVISORY  READ 18250 fe:00:10133507 0 EOF
";

    #[test]
    fn finds_the_holder_by_device_and_inode() {
        let dev = rustix::fs::makedev(0, 0x27);
        assert_eq!(lock_holder(LOCKS, dev, 11_269_301), Some(21_886));
        assert_eq!(
            lock_holder(LOCKS, rustix::fs::makedev(0xfe, 0), 10_133_507),
            Some(18_250)
        );
        // A POSIX lock is not a flock; a pid of another namespace is not a pid.
        assert_eq!(lock_holder(LOCKS, dev, 42), None);
        assert_eq!(lock_holder(LOCKS, rustix::fs::makedev(0, 0x28), 7), None);
        assert_eq!(lock_holder(LOCKS, dev, 1), None);
    }

    #[test]
    fn a_second_lock_names_this_process_and_waits_for_the_first() {
        let dir = std::env::temp_dir().join(format!("lb-lock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = DirLock::try_acquire(&dir).expect("the first lock");
        let Err(LockError::Held { holder, .. }) = DirLock::try_acquire(&dir) else {
            panic!("a second lock on the same directory was granted");
        };
        assert_eq!(holder.pid, Some(std::process::id()));
        assert_eq!(
            super::holder(&dir),
            Some(holder.clone()),
            "status reads it too"
        );
        assert!(
            holder
                .to_string()
                .starts_with(&format!("pid {}", std::process::id()))
        );
        let mut reported = 0;
        let Err(LockError::TimedOut { waited, .. }) =
            DirLock::acquire(&dir, Duration::from_millis(300), |_| reported += 1)
        else {
            panic!("waiting for a held lock did not time out");
        };
        assert_eq!(waited, Duration::from_millis(300));
        assert_eq!(reported, 1, "the holder is named when the wait starts");
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(first);
        });
        let second = DirLock::acquire(&dir, Duration::from_secs(5), |_| {})
            .expect("the lock once its holder let go");
        assert!(second.still_names(&dir));
        release.join().unwrap();
        drop(second);
        assert_eq!(super::holder(&dir), None);
        std::fs::remove_dir(&dir).unwrap();
    }
}
