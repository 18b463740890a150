//! An agent's `--bpffs` directory for a test: a fresh path the agent mounts bpffs on.

use std::path::{Path, PathBuf};

use crate::names::unique_name;

/// A fresh path under `/run/lb-test` for an agent's `--bpffs`. On drop, whatever is still
/// mounted there (an agent killed before its teardown left its pins) is unmounted, which
/// releases the pinned links and maps, and the directory is removed.
#[derive(Debug)]
pub struct BpffsDir(PathBuf);

impl BpffsDir {
    pub fn new() -> BpffsDir {
        BpffsDir(Path::new("/run/lb-test").join(unique_name("bpf")))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn is_mounted(&self) -> bool {
        std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(&*self.0.to_string_lossy()))
    }
}

impl Default for BpffsDir {
    fn default() -> Self {
        BpffsDir::new()
    }
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        while self.is_mounted() {
            let Ok(path) = std::ffi::CString::new(self.0.to_string_lossy().as_bytes()) else {
                break;
            };
            // SAFETY: a NUL-terminated path that lives across the call.
            if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
                break;
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
