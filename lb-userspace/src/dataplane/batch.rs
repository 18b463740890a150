//! Many entries of one BPF hash map in one bpf(2) call: `BPF_MAP_UPDATE_BATCH` and
//! `BPF_MAP_DELETE_BATCH` (Linux 5.6; aya 0.14 has neither). On a kernel without them, one
//! entry at a time as before, found out on the first try and remembered.
//!
//! The kernel goes through a batch in order and stops at the first entry that fails (a full
//! map: `E2BIG`; a key not there: `ENOENT`), saying how many it did: those are written, the
//! rest not tried, as when writing one by one.
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd};

use aya::{
    Pod,
    maps::{HashMap, IterableMap as _, MapData},
};

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// The kernel's "not supported" (not in libc): a map type without batch operations.
const ENOTSUPP: i32 = 524;
/// Entries per call at most (the count is 32 bits; this also bounds the time of one call).
const CHUNK: usize = 1 << 16;

/// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Debug, Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    /// In: entries given; out: entries done.
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Whether the kernel has batch operations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BatchOps {
    /// Not tried yet.
    #[default]
    Unknown,
    Available,
    /// One entry at a time (an older kernel, or asked for).
    Missing,
}

/// The entry of a batch that failed (by index), and why.
#[derive(Debug)]
pub struct Failed {
    pub index: usize,
    pub cause: String,
}

/// What one batch call did.
enum Call {
    Done,
    /// No batch operations: nothing was done.
    Unsupported,
    /// Entries before `done` are done; the one at `done` failed.
    Failed {
        done: usize,
        cause: String,
    },
}

impl BatchOps {
    /// Writes `values[i]` under `keys[i]`, in order, up to the first failure.
    pub fn update<K: Pod, V: Pod>(
        &mut self,
        map: &mut HashMap<MapData, K, V>,
        keys: &[K],
        values: &[V],
    ) -> Result<(), Failed> {
        assert_eq!(keys.len(), values.len(), "a value for each key");
        let done = self.batches(map, keys, Some(values))?;
        for (index, (key, value)) in keys.iter().zip(values).enumerate().skip(done) {
            map.insert(key, value, 0).map_err(|error| Failed {
                index,
                cause: with_sources(&error),
            })?;
        }
        Ok(())
    }

    /// Removes `keys`, in order, up to the first failure (one not there fails).
    pub fn delete<K: Pod, V: Pod>(
        &mut self,
        map: &mut HashMap<MapData, K, V>,
        keys: &[K],
    ) -> Result<(), Failed> {
        let done = self.batches::<K, V>(map, keys, None)?;
        for (index, key) in keys.iter().enumerate().skip(done) {
            map.remove(key).map_err(|error| Failed {
                index,
                cause: with_sources(&error),
            })?;
        }
        Ok(())
    }

    /// Sends `keys` (and `values`: an update, else a delete) in batches while the kernel has
    /// them; how many entries are done (the rest go one by one).
    fn batches<K: Pod, V: Pod>(
        &mut self,
        map: &HashMap<MapData, K, V>,
        keys: &[K],
        values: Option<&[V]>,
    ) -> Result<usize, Failed> {
        let fd = map.map().fd().as_fd();
        let mut done = 0;
        while done < keys.len() && *self != BatchOps::Missing {
            let end = (done + CHUNK).min(keys.len());
            match call(fd, &keys[done..end], values.map(|v| &v[done..end])) {
                Call::Done => {
                    *self = BatchOps::Available;
                    done = end;
                }
                Call::Unsupported => {
                    tracing::info!("the kernel has no batch map operations: one entry at a time");
                    *self = BatchOps::Missing;
                }
                Call::Failed { done: more, cause } => {
                    *self = BatchOps::Available;
                    return Err(Failed {
                        index: done + more,
                        cause,
                    });
                }
            }
        }
        Ok(done)
    }
}

/// One `BPF_MAP_UPDATE_BATCH` (with `values`) or `BPF_MAP_DELETE_BATCH` call.
fn call<K: Pod, V: Pod>(fd: BorrowedFd<'_>, keys: &[K], values: Option<&[V]>) -> Call {
    let (command, name) = match values {
        Some(_) => (BPF_MAP_UPDATE_BATCH, "BPF_MAP_UPDATE_BATCH"),
        None => (BPF_MAP_DELETE_BATCH, "BPF_MAP_DELETE_BATCH"),
    };
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.map_or(0, |v| v.as_ptr() as u64),
        count: keys.len() as u32,
        map_fd: fd.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: `attr` is the batch member of bpf_attr, `size_of` of it; `keys` and `values`
    // hold `count` keys and values of the map's own types (its key and value sizes), alive
    // and unchanged through the call; the kernel reads them and writes only `attr.count`.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>() as u32,
        )
    };
    if result == 0 {
        return Call::Done;
    }
    let error = std::io::Error::last_os_error();
    match error.raw_os_error() {
        // An unknown command (before 5.6), or a map type without batches.
        Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP) => Call::Unsupported,
        _ => Call::Failed {
            done: (attr.count as usize).min(keys.len().saturating_sub(1)),
            cause: format!("`{name}` failed: {error}"),
        },
    }
}

/// An error and its causes (aya's syscall errors name the call, their source the errno).
pub(crate) fn with_sources(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}
