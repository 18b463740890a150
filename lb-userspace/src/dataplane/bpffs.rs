//! The bpffs directory where maps are pinned. The agent mounts bpffs itself where the path is
//! not on one (a fresh node, a container without /sys/fs/bpf mounted).
use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};

use super::lock::{DirLock, Holder};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// How long mounting bpffs waits for another agent mounting it at the same path.
const MOUNT_LOCK_WAIT: Duration = Duration::from_secs(10);

/// The agent's directory on bpffs: `maps/` holds the pinned maps, `links/` the pinned program
/// links.
#[derive(Debug, Clone)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    /// [`PinDir::prepare`], then the exclusive lock on the directory (see [`super::lock`]),
    /// waiting up to `wait` for another agent holding it (`waiting` hears who that is). When
    /// the directory was removed meanwhile (`lb-agent cleanup`), it is prepared again.
    pub fn prepare_locked(
        root: &Path,
        wait: Duration,
        mut waiting: impl FnMut(&Holder),
    ) -> anyhow::Result<(Self, DirLock)> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            let dir = Self::prepare(root)?;
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let lock = DirLock::acquire(root, left, &mut waiting)?;
            if lock.still_names(root) && is_bpffs(root) {
                return Ok((dir, lock));
            }
            if left.is_zero() {
                bail!(
                    "{} changed while it was being locked (removed or remounted); try again",
                    root.display()
                );
            }
            tracing::info!(path = %root.display(), "pin directory changed while waiting; again");
        }
    }

    /// Makes sure `root` is a directory on bpffs: uses it if it is, creates it if its parent
    /// is on bpffs, and otherwise mounts a bpffs instance at `root`.
    pub fn prepare(root: &Path) -> anyhow::Result<Self> {
        let dir = Self::at(root);
        if is_bpffs(root) {
            return Ok(dir);
        }
        if let Some(parent) = root.parent()
            && is_bpffs(parent)
        {
            std::fs::create_dir_all(root)
                .with_context(|| format!("creating {} on bpffs", root.display()))?;
            return Ok(dir);
        }
        std::fs::create_dir_all(root).with_context(|| {
            format!(
                "creating {} to mount bpffs on (is the parent writable? on a node, mount bpffs \
                 at /sys/fs/bpf: `mount -t bpf bpf /sys/fs/bpf`)",
                root.display()
            )
        })?;
        // Two agents starting at once must not both mount (each would lock its own instance):
        // the check and the mount are one step under a lock on the parent directory.
        let parent = root.parent().unwrap_or(Path::new("/"));
        let _mounting = DirLock::acquire(parent, MOUNT_LOCK_WAIT, |_| {})
            .with_context(|| format!("waiting to mount bpffs at {}", root.display()))?;
        if is_bpffs(root) {
            return Ok(dir);
        }
        mount_bpffs(root)?;
        tracing::info!(path = %root.display(), "mounted bpffs");
        Ok(dir)
    }

    /// The directory at `root`, as it is (for reading pins, or removing them).
    pub fn at(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where maps are pinned.
    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    /// Where program links are pinned.
    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    /// Removes pinned maps whose names are not in `current` (maps of an earlier version with
    /// another layout, and the `<name>-old` pins a migration moved aside, once the programs no
    /// longer use them).
    pub fn remove_maps_except(&self, current: &[&str]) -> anyhow::Result<Vec<String>> {
        let mut removed = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.maps()) else {
            return Ok(removed);
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !current.contains(&name.as_str()) {
                std::fs::remove_file(entry.path()).with_context(|| {
                    format!("removing stale map pin {}", entry.path().display())
                })?;
                removed.push(name);
            }
        }
        Ok(removed)
    }

    /// Removes everything pinned here: netlink tc filters and links first (detaching the
    /// programs), then maps; and
    /// unmounts bpffs if the directory is a bpffs mount of its own (one the agent made).
    pub fn remove_all(&self) -> anyhow::Result<()> {
        // Netlink tc filters are not pinned: found by the interfaces that have links here.
        for iface in super::links::interfaces(&self.links()) {
            super::links::remove_tc_filters_of(&iface);
        }
        for dir in [self.links(), self.maps()] {
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("removing pins under {}", dir.display()))?;
            }
        }
        if is_mount_point(&self.root) && is_bpffs(&self.root) {
            unmount(&self.root)?;
        }
        let _ = std::fs::remove_dir(&self.root);
        Ok(())
    }
}

/// Whether `path` is itself a mount point.
fn is_mount_point(path: &Path) -> bool {
    let wanted = path.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|line| line.split_whitespace().nth(4) == Some(&*wanted))
}

/// Whether `path` is on a bpffs mount.
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: an all-zero statfs is a valid out-parameter.
    let mut stats: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out-pointer.
    let result = unsafe { libc::statfs(c_path.as_ptr(), &mut stats) };
    result == 0 && stats.f_type as i64 == BPF_FS_MAGIC
}

fn mount_bpffs(path: &Path) -> anyhow::Result<()> {
    let target = CString::new(path.as_os_str().as_bytes())?;
    let fstype = c"bpf";
    // SAFETY: NUL-terminated strings and no data argument.
    let result = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if result != 0 {
        bail!(
            "mounting bpffs at {}: {} (needs CAP_SYS_ADMIN)",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn unmount(path: &Path) -> anyhow::Result<()> {
    let target = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: a NUL-terminated path.
    let result = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    if result != 0 {
        bail!(
            "unmounting bpffs at {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
