//! The bpffs directory where maps are pinned. The agent mounts bpffs itself where the path is
//! not on one (a fresh node, a container without /sys/fs/bpf mounted).
use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The agent's directory on bpffs.
#[derive(Debug, Clone)]
pub struct PinDir {
    root: PathBuf,
    /// Whether this agent mounted bpffs at `root` (and so unmounts it on teardown).
    mounted_here: bool,
}

impl PinDir {
    /// Makes sure `root` is a directory on bpffs: uses it if it is, creates it if its parent
    /// is on bpffs, and otherwise mounts a bpffs instance at `root`.
    pub fn prepare(root: &Path) -> anyhow::Result<Self> {
        if is_bpffs(root) {
            return Ok(Self {
                root: root.to_owned(),
                mounted_here: false,
            });
        }
        if let Some(parent) = root.parent()
            && is_bpffs(parent)
        {
            std::fs::create_dir_all(root)
                .with_context(|| format!("creating {} on bpffs", root.display()))?;
            return Ok(Self {
                root: root.to_owned(),
                mounted_here: false,
            });
        }
        std::fs::create_dir_all(root).with_context(|| {
            format!(
                "creating {} to mount bpffs on (is the parent writable? on a node, mount bpffs \
                 at /sys/fs/bpf: `mount -t bpf bpf /sys/fs/bpf`)",
                root.display()
            )
        })?;
        mount_bpffs(root)?;
        tracing::info!(path = %root.display(), "mounted bpffs");
        Ok(Self {
            root: root.to_owned(),
            mounted_here: true,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where maps are pinned.
    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    /// Removes everything pinned under the directory (maps stay alive while a program or
    /// process still holds them), and unmounts bpffs if this agent mounted it.
    pub fn remove_all(&self) -> anyhow::Result<()> {
        let maps = self.maps();
        if maps.exists() {
            std::fs::remove_dir_all(&maps)
                .with_context(|| format!("removing pins under {}", maps.display()))?;
        }
        if self.mounted_here {
            unmount(&self.root)?;
            let _ = std::fs::remove_dir(&self.root);
        }
        Ok(())
    }
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
