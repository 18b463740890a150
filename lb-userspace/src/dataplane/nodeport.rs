//! The XDP ingress (`nodeport_xdp`) and tc egress (`nodeport_tc`) programs on the NodePort
//! interfaces, and the maps of the node's addresses they answer on and SNAT from. Their
//! frontends, backends and Maglev tables are the one service table (`maps.rs`).
//!
//! XDP is attached in native (driver) mode where the driver supports it and in generic (skb)
//! mode otherwise; the log says which. The tc program goes on the egress side through tcx
//! (kernel 6.6+) or a clsact qdisc. Both links are pinned under `<bpffs>/links/iface-<name>/`
//! (where the kernel makes them bpf links: XDP 5.9+, tcx 6.6+), so north-south traffic keeps
//! flowing while no agent runs; a new agent swaps its programs in atomically.
use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CStr,
    net::Ipv4Addr,
    os::fd::AsFd as _,
    path::Path,
};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{HashMap, MapData},
    programs::{SchedClassifier, TcAttachType, Xdp, XdpMode, links::FdLink, tc},
};
use lb_common::map_names;

use super::{
    links::{self, Attached},
    maps::{error, take_map},
};
use crate::reconcile::MapError;

pub const XDP_PROGRAM: &str = "nodeport_xdp";
pub const TC_PROGRAM: &str = "nodeport_tc";

/// How the XDP program runs on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttach {
    /// In the driver, before any skb exists.
    Native,
    /// In the stack's generic hook, for drivers without XDP support.
    Generic,
}

impl std::fmt::Display for XdpAttach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            XdpAttach::Native => "native",
            XdpAttach::Generic => "generic",
        })
    }
}

/// Loads both programs into the kernel (the verifier runs here), without attaching them.
pub fn load_programs(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let xdp = xdp_mut(ebpf)?;
    if xdp.fd().is_err() {
        xdp.load()
            .with_context(|| format!("loading {XDP_PROGRAM} (the verifier's log follows)"))?;
    }
    let tc = tc_mut(ebpf)?;
    if tc.fd().is_err() {
        tc.load()
            .with_context(|| format!("loading {TC_PROGRAM} (the verifier's log follows)"))?;
    }
    Ok(())
}

/// Attaches XDP (native, else generic) and tc egress to `iface` through links pinned in
/// `link_dir`, or swaps the programs into the links a previous agent pinned there. Returns the
/// XDP mode when a new link was made (`None`: an existing link was reused).
pub fn attach(
    ebpf: &mut Ebpf,
    iface: &str,
    link_dir: &Path,
) -> anyhow::Result<(Option<XdpAttach>, Attached, Attached)> {
    load_programs(ebpf)?;
    let mut mode = None;
    let xdp = xdp_mut(ebpf)?;
    let (xdp_id, xdp_fd) = (xdp.info()?.id(), xdp.fd()?.try_clone()?);
    let xdp_link = links::pinned(&link_dir.join("xdp"), xdp_fd.as_fd(), xdp_id, || {
        let id = match xdp.attach(iface, XdpMode::Driver) {
            Ok(id) => {
                mode = Some(XdpAttach::Native);
                id
            }
            Err(native) => {
                tracing::debug!(%iface, error = %native, "native XDP not available");
                mode = Some(XdpAttach::Generic);
                xdp.attach(iface, XdpMode::Skb).with_context(|| {
                    format!("attaching XDP to {iface} (native mode failed too: {native})")
                })?
            }
        };
        Ok(FdLink::try_from(xdp.take_link(id)?).ok())
    })?;
    let tc = tc_mut(ebpf)?;
    let (tc_id, tc_fd) = (tc.info()?.id(), tc.fd()?.try_clone()?);
    let tc_link = links::pinned(&link_dir.join("tc"), tc_fd.as_fd(), tc_id, || {
        // tcx (6.6+) needs no qdisc; older kernels need clsact, which may already be there.
        if let Err(e) = tc::qdisc_add_clsact(iface) {
            tracing::debug!(%iface, error = %e, "clsact qdisc not added (exists, or tcx is used)");
        }
        let id = tc
            .attach(iface, TcAttachType::Egress)
            .with_context(|| format!("attaching {TC_PROGRAM} to {iface} egress"))?;
        Ok(FdLink::try_from(tc.take_link(id)?).ok())
    })?;
    Ok((mode, xdp_link, tc_link))
}

pub fn xdp_program(ebpf: &Ebpf) -> anyhow::Result<&Xdp> {
    ebpf.program(XDP_PROGRAM)
        .ok_or_else(|| anyhow!("program {XDP_PROGRAM} missing from the eBPF object"))?
        .try_into()
        .map_err(Into::into)
}

pub fn tc_program(ebpf: &Ebpf) -> anyhow::Result<&SchedClassifier> {
    ebpf.program(TC_PROGRAM)
        .ok_or_else(|| anyhow!("program {TC_PROGRAM} missing from the eBPF object"))?
        .try_into()
        .map_err(Into::into)
}

fn xdp_mut(ebpf: &mut Ebpf) -> anyhow::Result<&mut Xdp> {
    ebpf.program_mut(XDP_PROGRAM)
        .ok_or_else(|| anyhow!("program {XDP_PROGRAM} missing from the eBPF object"))?
        .try_into()
        .map_err(Into::into)
}

fn tc_mut(ebpf: &mut Ebpf) -> anyhow::Result<&mut SchedClassifier> {
    ebpf.program_mut(TC_PROGRAM)
        .ok_or_else(|| anyhow!("program {TC_PROGRAM} missing from the eBPF object"))?
        .try_into()
        .map_err(Into::into)
}

/// The node's addresses: where NodePorts answer, and the SNAT source per interface.
pub struct NodeAddrMaps {
    node_addrs: HashMap<MapData, u32, u32>,
    iface_addrs: HashMap<MapData, u32, u32>,
}

impl NodeAddrMaps {
    /// Takes the maps out of a loaded object (before its programs are loaded, as for the
    /// service maps: the programs keep referring to them).
    pub fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        let mut take = |name| take_map(ebpf, name);
        Ok(Self {
            node_addrs: HashMap::try_from(take(map_names::NODE_ADDRS_V4)?)?,
            iface_addrs: HashMap::try_from(take(map_names::IFACE_ADDRS_V4)?)?,
        })
    }

    /// Makes `LB4_NODEADDR` hold exactly `wanted` (the addresses NodePorts answer on).
    pub fn set_node_addrs(&mut self, wanted: &BTreeSet<Ipv4Addr>) -> Result<(), MapError> {
        let wanted: BTreeSet<u32> = wanted
            .iter()
            .map(|ip| lb_common::addr_to_map(u32::from(*ip)))
            .collect();
        sync_u32_map(
            &mut self.node_addrs,
            map_names::NODE_ADDRS_V4,
            &wanted.iter().map(|a| (*a, 1)).collect(),
        )
    }

    /// Makes `LB4_IFADDR` hold exactly `wanted`: the SNAT source address per ifindex.
    pub fn set_iface_addrs(&mut self, wanted: &BTreeMap<u32, Ipv4Addr>) -> Result<(), MapError> {
        let wanted = wanted
            .iter()
            .map(|(index, ip)| (*index, lb_common::addr_to_map(u32::from(*ip))))
            .collect();
        sync_u32_map(&mut self.iface_addrs, map_names::IFACE_ADDRS_V4, &wanted)
    }
}

fn sync_u32_map(
    map: &mut HashMap<MapData, u32, u32>,
    name: &'static str,
    wanted: &BTreeMap<u32, u32>,
) -> Result<(), MapError> {
    let current: BTreeMap<u32, u32> = map
        .iter()
        .collect::<Result<_, _>>()
        .map_err(|e| error(name, "read", e))?;
    for (key, value) in wanted {
        if current.get(key) != Some(value) {
            map.insert(key, value, 0)
                .map_err(|e| error(name, "insert", e))?;
        }
    }
    for key in current.keys().filter(|k| !wanted.contains_key(k)) {
        map.remove(key).map_err(|e| error(name, "delete", e))?;
    }
    Ok(())
}

/// An interface's index and IPv4 addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Interface {
    pub index: u32,
    pub addrs: Vec<Ipv4Addr>,
}

/// The IPv4 addresses of every interface of this network namespace, by name.
pub fn interfaces() -> anyhow::Result<BTreeMap<String, Interface>> {
    let mut found: BTreeMap<String, Interface> = BTreeMap::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a list we free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getifaddrs");
    }
    let mut cursor = list;
    while !cursor.is_null() {
        // SAFETY: a node of the list getifaddrs returned; freed only after the loop.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(entry.ifa_name) }
            .to_string_lossy()
            .into_owned();
        let iface = found.entry(name.clone()).or_default();
        if iface.index == 0 {
            // SAFETY: a NUL-terminated name.
            iface.index = unsafe { libc::if_nametoindex(entry.ifa_name) };
        }
        if entry.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr whose family says its real type.
        if unsafe { (*entry.ifa_addr).sa_family } as i32 == libc::AF_INET {
            // SAFETY: AF_INET means a sockaddr_in.
            let sin = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in) };
            iface
                .addrs
                .push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
        }
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(found)
}
