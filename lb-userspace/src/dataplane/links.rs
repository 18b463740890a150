//! Program links pinned under `<bpffs>/links/cgroup-<inode>/<program>`. A pinned link keeps its
//! program attached while no agent runs (crash, kill -9, upgrade); a starting agent swaps its
//! freshly loaded program into each pinned link with `BPF_LINK_UPDATE`, which replaces the
//! program atomically: there is no moment without one.
//!
//! aya 0.14 can pin cgroup links but has no link update for them (only for XDP and tc), so the
//! two syscalls it lacks (`BPF_OBJ_GET`, `BPF_LINK_UPDATE`) are made here directly.
use std::{
    ffi::CString,
    fs::File,
    os::{
        fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::programs::{
    CgroupAttachMode, CgroupSock, CgroupSockAddr,
    links::{FdLink, PinnedLink},
};

/// What happened to one program's link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// No link was pinned: a new one was created and pinned.
    Created { program_id: u32 },
    /// A pinned link existed: its program was replaced in place.
    Replaced {
        old_program_id: u32,
        program_id: u32,
    },
    /// Attached without a bpf link (an older kernel): not pinned.
    Unpinned { program_id: u32 },
    /// A netlink tc filter at the agent's fixed priority and handle was made (no bpf link:
    /// it stays after the agent, and `cleanup` removes it).
    Filter { program_id: u32 },
    /// The netlink tc filter a previous agent left at that place runs this program now.
    ReplacedFilter { program_id: u32 },
}

/// The directory holding the links of the programs attached to `cgroup`.
pub fn dir_for(links_root: &Path, cgroup: &Path) -> anyhow::Result<PathBuf> {
    let inode = std::fs::metadata(cgroup)
        .with_context(|| format!("reading cgroup {}", cgroup.display()))?
        .ino();
    Ok(links_root.join(format!("{CGROUP_PREFIX}{inode}")))
}

/// The directory holding the links of the programs attached to network interface `iface`.
pub fn dir_for_interface(links_root: &Path, iface: &str) -> PathBuf {
    links_root.join(format!("{IFACE_PREFIX}{iface}"))
}

const CGROUP_PREFIX: &str = "cgroup-";
const IFACE_PREFIX: &str = "iface-";

/// Attaches `program` (already loaded) to `cgroup` through the link pinned at `dir/name`,
/// creating and pinning the link when there is none.
pub fn attach_or_replace(
    program: &mut CgroupSockAddr,
    name: &str,
    cgroup: &File,
    dir: &Path,
) -> anyhow::Result<Attached> {
    let program_id = program.info()?.id();
    let program_fd = program.fd()?.try_clone()?;
    pinned(&dir.join(name), program_fd.as_fd(), program_id, || {
        // With bpf links (kernel 5.7+) several programs coexist on one cgroup anyway.
        let id = program.attach(cgroup, CgroupAttachMode::Single)?;
        Ok(Some(program.take_link(id)?.try_into()?))
    })
}

/// Like [`attach_or_replace`], for a cgroup sock program (sock_release, post_bind4/6).
pub fn attach_sock_or_replace(
    program: &mut CgroupSock,
    name: &str,
    cgroup: &File,
    dir: &Path,
) -> anyhow::Result<Attached> {
    let program_id = program.info()?.id();
    let program_fd = program.fd()?.try_clone()?;
    pinned(&dir.join(name), program_fd.as_fd(), program_id, || {
        let id = program.attach(cgroup, CgroupAttachMode::Single)?;
        Ok(Some(program.take_link(id)?.try_into()?))
    })
}

/// Removes the link pinned at `dir/name`, detaching its program (one a run with a feature
/// on left behind); whether there was one.
pub fn remove(dir: &Path, name: &str) -> anyhow::Result<bool> {
    let pin = dir.join(name);
    match std::fs::remove_file(&pin) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing link {}", pin.display())),
    }
}

/// Makes the link pinned at `pin` run `program`: swaps it in atomically when the pin exists,
/// else attaches with `attach` and pins the new link. `attach` may return `None` for an
/// attachment that is not a bpf link (netlink XDP or tc on older kernels): that one works but
/// is not pinned, so it ends with the agent.
pub fn pinned(
    pin: &Path,
    program: BorrowedFd<'_>,
    program_id: u32,
    attach: impl FnOnce() -> anyhow::Result<Option<FdLink>>,
) -> anyhow::Result<Attached> {
    if let Some(dir) = pin.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if pin.exists() {
        let old_program_id = program_id_of(pin)?;
        let link = obj_get(pin)?;
        link_update(link.as_fd(), program)
            .with_context(|| format!("replacing the program of link {}", pin.display()))?;
        return Ok(Attached::Replaced {
            old_program_id,
            program_id,
        });
    }
    match attach()? {
        Some(link) => {
            link.pin(pin)
                .with_context(|| format!("pinning link {}", pin.display()))?;
            Ok(Attached::Created { program_id })
        }
        None => Ok(Attached::Unpinned { program_id }),
    }
}

/// The program a pinned link runs.
pub fn program_id_of(pin: &Path) -> anyhow::Result<u32> {
    let link: FdLink = PinnedLink::from_pin(pin)
        .with_context(|| format!("opening pinned link {}", pin.display()))?
        .into();
    Ok(link.info()?.program_id())
}

/// One pinned link, for `lb-agent status`.
#[derive(Debug, serde::Serialize)]
pub struct PinnedLinkStatus {
    pub pin: PathBuf,
    pub program: String,
    pub program_id: Option<u32>,
}

/// Every link pinned under `links_root`.
pub fn list(links_root: &Path) -> Vec<PinnedLinkStatus> {
    let mut found = Vec::new();
    for dir in read_dir_sorted(links_root) {
        for pin in read_dir_sorted(&dir) {
            found.push(PinnedLinkStatus {
                program: pin
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                program_id: program_id_of(&pin).ok(),
                pin,
            });
        }
    }
    found
}

/// Removes the cgroup link directories under `links_root` other than `keep` (a cgroup this
/// agent no longer serves): unpinning a link detaches its program.
pub fn remove_others(links_root: &Path, keep: &Path) -> anyhow::Result<Vec<PathBuf>> {
    remove_stale(links_root, CGROUP_PREFIX, &[keep.to_owned()])
}

/// Removes the interface link directories under `links_root` other than `keep` (interfaces
/// no longer given with `--nodeport-iface`), and the netlink tc filters on those interfaces.
pub fn remove_other_interfaces(
    links_root: &Path,
    keep: &[PathBuf],
) -> anyhow::Result<Vec<PathBuf>> {
    for iface in interfaces(links_root) {
        if !keep.contains(&dir_for_interface(links_root, &iface)) {
            remove_tc_filters_of(&iface);
        }
    }
    remove_stale(links_root, IFACE_PREFIX, keep)
}

/// The interfaces with a link directory under `links_root` (those the agent attached to).
pub fn interfaces(links_root: &Path) -> Vec<String> {
    read_dir_sorted(links_root)
        .iter()
        .filter_map(|dir| {
            let name = dir.file_name()?.to_string_lossy().into_owned();
            Some(name.strip_prefix(IFACE_PREFIX)?.to_owned())
        })
        .collect()
}

/// Removes the netlink tc filters of the agent on `iface` (a tcx link goes with its pin); a
/// failure (the interface is gone, say) is only logged.
pub fn remove_tc_filters_of(iface: &str) {
    match super::nodeport::remove_tc_filters(iface) {
        Ok(true) => tracing::info!(%iface, "removed the tc egress filter"),
        Ok(false) => {}
        Err(error) => {
            tracing::warn!(%iface, error = %format!("{error:#}"), "tc filters not removed")
        }
    }
}

fn remove_stale(links_root: &Path, prefix: &str, keep: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for dir in read_dir_sorted(links_root) {
        let ours = dir
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(prefix));
        if ours && !keep.contains(&dir) {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("removing stale links {}", dir.display()))?;
            removed.push(dir);
        }
    }
    Ok(removed)
}

fn read_dir_sorted(dir: &Path) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    entries.sort();
    entries
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `bpf(BPF_OBJ_GET)`: opens a pinned object.
fn obj_get(path: &Path) -> anyhow::Result<OwnedFd> {
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        pad: u32,
    }
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    let attr = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        pad: 0,
    };
    // SAFETY: the attribute struct and the path outlive the call; the kernel reads
    // size_of::<ObjGetAttr>() bytes.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGetAttr,
            std::mem::size_of::<ObjGetAttr>() as u32,
        )
    };
    if fd < 0 {
        bail!(
            "opening pinned {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: the kernel just returned this new descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `bpf(BPF_LINK_UPDATE)`: atomically makes `link` run `program`.
fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> anyhow::Result<()> {
    #[repr(C)]
    struct LinkUpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: the attribute struct outlives the call and both descriptors are open.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &attr as *const LinkUpdateAttr,
            std::mem::size_of::<LinkUpdateAttr>() as u32,
        )
    };
    if result < 0 {
        bail!("BPF_LINK_UPDATE: {}", std::io::Error::last_os_error());
    }
    Ok(())
}
