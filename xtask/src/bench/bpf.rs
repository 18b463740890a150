//! The kernel's side: BPF run-time statistics of the socket programs (`kernel.bpf_stats_enabled`),
//! map memory from the pinned maps, and `BPF_PROG_TEST_RUN` of XDP programs.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::cmd;

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// `kernel.bpf_stats_enabled=1` while alive; the previous value is put back on drop.
pub struct StatsGuard(Option<String>);

impl StatsGuard {
    pub fn enable() -> Result<StatsGuard> {
        let old = std::fs::read_to_string(STATS_SYSCTL).context("reading bpf_stats_enabled")?;
        std::fs::write(STATS_SYSCTL, "1").context("enabling bpf_stats_enabled")?;
        Ok(StatsGuard(Some(old.trim().to_string())))
    }
}

impl Drop for StatsGuard {
    fn drop(&mut self) {
        if let Some(old) = self.0.take() {
            let _ = std::fs::write(STATS_SYSCTL, old);
        }
    }
}

/// The programs attached to `cgroup`: (id, attach type, name).
pub fn cgroup_programs(cgroup: &Path) -> Result<Vec<(u64, String, String)>> {
    let out = cmd::output(
        Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(cgroup)
            .arg("-j"),
    )?;
    let json: serde_json::Value = serde_json::from_str(out.trim()).context("bpftool json")?;
    let mut progs = Vec::new();
    for p in json.as_array().into_iter().flatten() {
        let id = p["id"].as_u64().unwrap_or(0);
        let attach = p["attach_type"].as_str().unwrap_or("?").to_string();
        let name = p["name"].as_str().unwrap_or("?").to_string();
        progs.push((id, attach, name));
    }
    Ok(progs)
}

/// (run_time_ns, run_cnt) of a program.
pub fn prog_stats(id: u64) -> Result<(u64, u64)> {
    let out =
        cmd::output(Command::new("bpftool").args(["prog", "show", "id", &id.to_string(), "-j"]))?;
    let json: serde_json::Value = serde_json::from_str(out.trim())?;
    Ok((
        json["run_time_ns"].as_u64().unwrap_or(0),
        json["run_cnt"].as_u64().unwrap_or(0),
    ))
}

/// Every map pinned below `dir`: name → (bytes_memlock, max_entries).
pub fn pinned_maps(dir: &Path) -> BTreeMap<String, (u64, u64)> {
    let mut maps = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let Ok(out) = cmd::output(
                Command::new("bpftool")
                    .args(["map", "show", "pinned"])
                    .arg(&path)
                    .arg("-j"),
            ) else {
                continue; // a pinned link or program
            };
            if let Ok(json) = serde_json::from_str::<serde_json::Value>(out.trim()) {
                let name = json["name"].as_str().unwrap_or("?").to_string();
                let mem = json["bytes_memlock"].as_u64().unwrap_or(0);
                let max = json["max_entries"].as_u64().unwrap_or(0);
                maps.insert(name, (mem, max));
            }
        }
    }
    maps
}

// ------------------------------------------------------------------ BPF_PROG_TEST_RUN

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct LoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    _rest: [u64; 12],
}

#[repr(C)]
#[derive(Default)]
struct GetFdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
    _rest: [u32; 13],
}

const BPF_PROG_LOAD: i64 = 5;
const BPF_PROG_TEST_RUN: i64 = 10;
const BPF_PROG_GET_FD_BY_ID: i64 = 13;
const BPF_PROG_TYPE_XDP: u32 = 6;

fn bpf<T>(cmd: i64, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: attr is a valid, initialised bpf_attr prefix of the given size.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as u32,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// An owned file descriptor closed on drop.
pub struct Fd(pub i32);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: our own descriptor.
        unsafe { libc::close(self.0) };
    }
}

/// An XDP program that only returns XDP_PASS (`r0 = 2; exit`), the baseline.
pub fn load_xdp_pass() -> Result<Fd> {
    // mov64 r0, 2 ; exit
    let insns: [u64; 2] = [0x0000_0002_0000_00b7, 0x0000_0000_0000_0095];
    let license = b"GPL\0";
    let mut attr = LoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: 2,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..LoadAttr::default()
    };
    let fd = bpf(BPF_PROG_LOAD, &mut attr).context("loading the XDP_PASS program")?;
    Ok(Fd(fd as i32))
}

pub fn prog_fd_by_id(id: u64) -> Result<Fd> {
    let mut attr = GetFdAttr {
        id: id as u32,
        ..GetFdAttr::default()
    };
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr).context("BPF_PROG_GET_FD_BY_ID")?;
    Ok(Fd(fd as i32))
}

/// Runs the program `repeat` times on `packet`: (return value, ns per run).
pub fn test_run(prog: &Fd, packet: &[u8], repeat: u32) -> Result<(u32, u32)> {
    let mut out = vec![0u8; packet.len() + 256];
    let mut attr = TestRunAttr {
        prog_fd: prog.0 as u32,
        data_size_in: packet.len() as u32,
        data_size_out: out.len() as u32,
        data_in: packet.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ..TestRunAttr::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN")?;
    if attr.duration == 0 && repeat > 0 {
        bail!("BPF_PROG_TEST_RUN reported no duration");
    }
    Ok((attr.retval, attr.duration))
}

/// One run: (return value, whether the output's IPv4 destination differs from the input's).
pub fn test_run_out(prog: &Fd, packet: &[u8]) -> Result<(u32, bool)> {
    let mut out = vec![0u8; packet.len() + 256];
    let mut attr = TestRunAttr {
        prog_fd: prog.0 as u32,
        data_size_in: packet.len() as u32,
        data_size_out: out.len() as u32,
        data_in: packet.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: 1,
        ..TestRunAttr::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN")?;
    Ok((attr.retval, out.get(30..34) != packet.get(30..34)))
}

/// An Ethernet + IPv4 + TCP SYN (or UDP) packet, checksums filled in.
pub fn packet(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, tcp: bool) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]); // dst mac
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 2]); // src mac
    p.extend_from_slice(&[0x08, 0x00]);
    let l4_len = if tcp { 20 } else { 8 + 4 };
    let total = 20 + l4_len;
    let mut ip = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        1,
        0x40,
        0,
        64,
        if tcp { 6 } else { 17 },
        0,
        0,
    ];
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let c = checksum(&ip, 0);
    ip[10] = (c >> 8) as u8;
    ip[11] = c as u8;
    p.extend_from_slice(&ip);
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    if tcp {
        l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        l4.extend_from_slice(&[0, l4_len as u8, 0, 0, b'p', b'i', b'n', b'g']);
    }
    let mut pseudo: u32 = 0;
    for w in [&src[..], &dst[..]] {
        pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]))
            + u32::from(u16::from_be_bytes([w[2], w[3]]));
    }
    pseudo += if tcp { 6 } else { 17 } + l4_len as u32;
    let c = checksum(&l4, pseudo);
    let at = if tcp { 16 } else { 6 };
    l4[at] = (c >> 8) as u8;
    l4[at + 1] = c as u8;
    p.extend_from_slice(&l4);
    p
}

fn checksum(data: &[u8], init: u32) -> u16 {
    let mut sum = init;
    for chunk in data.chunks(2) {
        let w = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
