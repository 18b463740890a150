//! An agent's `--bpffs` directory for a test: a fresh path the agent mounts bpffs on.

use std::path::{Path, PathBuf};

use crate::names::unique_name;

/// A fresh path under `/run/lb-test` for an agent's `--bpffs`. On drop, whatever is still
/// mounted there or below it (an agent killed before its teardown left its pins; an agent
/// given a subdirectory mounts bpffs there itself) is unmounted, deepest first, which
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
        self.mounts().contains(&self.0)
    }

    /// Mount points at this path or below it, deepest first.
    fn mounts(&self) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .map(PathBuf::from)
            .filter(|m| m.starts_with(&self.0))
            .collect();
        found.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        found
    }
}

impl Default for BpffsDir {
    fn default() -> Self {
        BpffsDir::new()
    }
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        // Bounded: each round unmounts at least one mount or stops.
        for _ in 0..16 {
            let mounts = self.mounts();
            let Some(deepest) = mounts.first() else {
                break;
            };
            let Ok(path) = std::ffi::CString::new(deepest.to_string_lossy().as_bytes()) else {
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
