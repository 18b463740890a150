//! Raw `bpf()` element commands on a map by descriptor, with its key and value as bytes:
//! aya 0.14 has typed maps only, and walking or copying a map of a type this build does not
//! know (a pinned map of an earlier layout, `lb-agent status` over every pin) needs untyped
//! access.
use std::{ffi::c_long, os::fd::RawFd};

const BPF_MAP_LOOKUP_ELEM: c_long = 1;
const BPF_MAP_UPDATE_ELEM: c_long = 2;
const BPF_MAP_GET_NEXT_KEY: c_long = 4;
/// `BPF_MAP_UPDATE_ELEM` flags: create or replace, or only create.
pub const BPF_ANY: u64 = 0;
pub const BPF_NOEXIST: u64 = 1;

/// `union bpf_attr` for the element commands.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    /// `value`, or `next_key` for `BPF_MAP_GET_NEXT_KEY`.
    value: u64,
    flags: u64,
}

/// One element command; `key` 0 (no key) only for the first `BPF_MAP_GET_NEXT_KEY`.
fn elem(command: c_long, map: RawFd, key: u64, value: u64, flags: u64) -> std::io::Result<()> {
    let attr = ElemAttr {
        map_fd: map as u32,
        pad: 0,
        key,
        value,
        flags,
    };
    // SAFETY: the attribute struct and the buffers it points to outlive the call, and each
    // buffer is as long as the map's key or value (the callers size them from the map's info).
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            &attr as *const ElemAttr,
            std::mem::size_of::<ElemAttr>() as u32,
        )
    };
    if result < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The key after `key` (the first key with `None`) into `next`; ENOENT after the last.
pub fn get_next_key(map: RawFd, key: Option<&[u8]>, next: &mut [u8]) -> std::io::Result<()> {
    let key = key.map_or(0, |k| k.as_ptr() as u64);
    elem(BPF_MAP_GET_NEXT_KEY, map, key, next.as_mut_ptr() as u64, 0)
}

pub fn lookup(map: RawFd, key: &[u8], value: &mut [u8]) -> std::io::Result<()> {
    let key = key.as_ptr() as u64;
    elem(BPF_MAP_LOOKUP_ELEM, map, key, value.as_mut_ptr() as u64, 0)
}

pub fn update(map: RawFd, key: &[u8], value: &[u8], flags: u64) -> std::io::Result<()> {
    let key = key.as_ptr() as u64;
    elem(BPF_MAP_UPDATE_ELEM, map, key, value.as_ptr() as u64, flags)
}
