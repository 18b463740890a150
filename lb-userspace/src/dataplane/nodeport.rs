//! The XDP ingress (`nodeport_xdp`) and tc egress (`nodeport_tc`) programs on the NodePort
//! interfaces, and the maps of the node's addresses they answer on and SNAT from. Their
//! frontends, backends and Maglev tables are the one service table (`maps.rs`).
//!
//! XDP is attached in native (driver) mode where the driver supports it and in generic (skb)
//! mode otherwise; the log says which. The tc program goes on the egress side through tcx
//! (kernel 6.6+) or a clsact qdisc. Both links are pinned under `<bpffs>/links/iface-<name>/`
//! (where the kernel makes them bpf links: XDP 5.9+, tcx 6.6+), so north-south traffic keeps
//! flowing while no agent runs; a new agent swaps its programs in atomically. IPv6 runs in XDP
//! as stages of their own (`XDP6_STAGES`), loaded with the others and entered by tail call
//! through the pinned program array `LB6_XDPSTAGES`, which each agent refills at load.
use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CStr,
    hash::Hash,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsFd as _,
    path::Path,
};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{HashMap, MapData, ProgramArray},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::FdLink,
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
    util::KernelVersion,
};
use lb_common::{Addr4, Addr6, map_names};

use super::{
    links::{self, Attached},
    maps::{error, take_map},
};
use crate::{
    model::Family,
    reconcile::{FamilyAddr, MapError},
};

pub const XDP_PROGRAM: &str = "nodeport_xdp";
pub const TC_PROGRAM: &str = "nodeport_tc";
/// IPv6's XDP stages (`lb-ebpf/src/stages.rs`), by their index in `LB6_XDPSTAGES`: programs
/// `nodeport_xdp` enters by tail call, each with a stack of its own. Loaded with the others,
/// never attached.
pub const XDP6_STAGES: [&str; 5] = [
    "nodeport_xdp6",
    "nodeport_xdp6_icmp",
    "nodeport_xdp6_flow",
    "nodeport_xdp6_snat",
    "nodeport_xdp6_made",
];

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
    load_xdp6_stages(ebpf)
}

/// Loads IPv6's XDP stages and puts each at its index of `LB6_XDPSTAGES` (a pinned map: a
/// new agent's stages replace the old ones there, packet by packet).
fn load_xdp6_stages(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let mut fds = Vec::with_capacity(XDP6_STAGES.len());
    for name in XDP6_STAGES {
        let stage: &mut Xdp = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
            .try_into()?;
        if stage.fd().is_err() {
            stage
                .load()
                .with_context(|| format!("loading {name} (the verifier's log follows)"))?;
        }
        fds.push(stage.fd()?.try_clone()?);
    }
    let map = ebpf.map_mut(map_names::XDP_STAGES_V6).ok_or_else(|| {
        anyhow!(
            "map {} missing from the eBPF object",
            map_names::XDP_STAGES_V6
        )
    })?;
    let mut stages = ProgramArray::try_from(map)?;
    for (index, fd) in fds.iter().enumerate() {
        stages.set(index as u32, fd, 0).with_context(|| {
            format!(
                "putting {} into {}",
                XDP6_STAGES[index],
                map_names::XDP_STAGES_V6
            )
        })?;
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
    tc_attach: TcAttach,
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
    let tc_link = attach_tc(tc_mut(ebpf)?, iface, link_dir, tc_attach)?;
    Ok((mode, xdp_link, tc_link))
}

/// How the tc egress program is attached (`--tc-attach`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TcAttach {
    /// tcx where the kernel has it (6.6+), else netlink.
    #[default]
    Auto,
    /// A tcx bpf link, pinned under the interface's link directory.
    Tcx,
    /// A cls_bpf filter on the clsact qdisc at a fixed priority (19522) and handle (1).
    Netlink,
}

impl TcAttach {
    fn uses_tcx(self) -> bool {
        match self {
            TcAttach::Auto => {
                KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
            }
            TcAttach::Tcx => true,
            TcAttach::Netlink => false,
        }
    }
}

/// Where the netlink filter of `nodeport_tc` sits on an interface's egress (`tc filter show dev
/// IFACE egress` shows it as `pref 19522 bpf ... handle 0x1 nodeport_tc`). A fixed place, so
/// the next agent replaces the program in that filter instead of adding a filter beside it
/// (a netlink filter cannot be pinned), and `cleanup` finds it. 0x4c42 is "LB".
pub const TC_FILTER_PRIORITY: u16 = 0x4c42;
pub const TC_FILTER_HANDLE: TcHandle = TcHandle::new(0, 1);

/// Attaches `nodeport_tc` to `iface` egress: through the tcx link pinned at `link_dir/tc`
/// (swapping the program in when a previous agent pinned one), or as the netlink filter at
/// [`TC_FILTER_PRIORITY`], replaced in place when there is one. Each way then removes what the
/// other way left there, so the program runs once per packet.
fn attach_tc(
    tc: &mut SchedClassifier,
    iface: &str,
    link_dir: &Path,
    how: TcAttach,
) -> anyhow::Result<Attached> {
    if how.uses_tcx() {
        let (tc_id, tc_fd) = (tc.info()?.id(), tc.fd()?.try_clone()?);
        let attached = links::pinned(&link_dir.join("tc"), tc_fd.as_fd(), tc_id, || {
            let id = tc
                .attach_with_options(
                    iface,
                    TcAttachType::Egress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .with_context(|| format!("attaching {TC_PROGRAM} to {iface} egress (tcx)"))?;
            Ok(FdLink::try_from(tc.take_link(id)?).ok())
        })?;
        // After the attach: tcx runs before the filters, so there is no gap and no packet
        // sees both (the program's verdict ends the packet's way through tc).
        if remove_tc_filters(iface)? {
            tracing::info!(%iface, "removed netlink tc filters of {TC_PROGRAM}: tcx is used");
        }
        return Ok(attached);
    }
    if let Err(e) = tc::qdisc_add_clsact(iface) {
        tracing::debug!(%iface, error = %e, "clsact qdisc not added (it exists)");
    }
    let program_id = tc.info()?.id();
    let ours = SchedClassifierLink::attached(
        iface,
        TcAttachType::Egress,
        TC_FILTER_PRIORITY,
        TC_FILTER_HANDLE,
        None,
    )
    .with_context(|| format!("no interface {iface}"))?;
    // The filter a previous agent left at our place: its program is swapped atomically.
    let (id, replaced) = match tc.attach_to_link(ours) {
        Ok(id) => (id, true),
        Err(replace) => {
            tracing::debug!(%iface, error = %replace, "no tc filter of ours to replace");
            // Filters of this program elsewhere were added by agents before the fixed place
            // (one more at each restart); they go before ours is made.
            if remove_tc_filters(iface)? {
                tracing::warn!(%iface, "removed tc filters of {TC_PROGRAM} left by earlier agents");
            }
            let options = NlOptions {
                priority: TC_FILTER_PRIORITY,
                handle: TC_FILTER_HANDLE,
                classid: None,
            };
            let id = tc
                .attach_with_options(
                    iface,
                    TcAttachType::Egress,
                    TcAttachOptions::Netlink(options),
                )
                .with_context(|| {
                    format!("attaching {TC_PROGRAM} to {iface} egress (netlink filter)")
                })?;
            (id, false)
        }
    };
    // The filter stays when this process ends (the next agent replaces its program, cleanup
    // removes it): dropping the link would not detach it, forgetting it says so.
    std::mem::forget(tc.take_link(id)?);
    // A tcx link of an earlier run goes once the filter is in place (no gap).
    if links::remove(link_dir, "tc")? {
        tracing::info!(%iface, "removed the tcx link of {TC_PROGRAM}: netlink is used");
    }
    Ok(if replaced {
        Attached::ReplacedFilter { program_id }
    } else {
        Attached::Filter { program_id }
    })
}

/// Removes every netlink filter of `nodeport_tc` on `iface` egress (aya finds them by the
/// program name the filter carries); whether there was one.
pub fn remove_tc_filters(iface: &str) -> anyhow::Result<bool> {
    match tc::qdisc_detach_program(iface, TcAttachType::Egress, TC_PROGRAM) {
        Ok(()) => Ok(true),
        Err(tc::TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(anyhow::Error::new(e))
            .with_context(|| format!("removing the tc filters of {TC_PROGRAM} from {iface}")),
    }
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

/// One family's address maps: the addresses NodePorts answer on (`LB4_NODEADDR`,
/// `LB6_NODEADDR`: address → 1) and the SNAT source per ingress interface (`LB4_IFADDR`,
/// `LB6_IFADDR`: ifindex → address).
struct FamilyAddrMaps<A: FamilyAddr + aya::Pod> {
    node_addrs: HashMap<MapData, A, u32>,
    node_addrs_name: &'static str,
    iface_addrs: HashMap<MapData, u32, A>,
    iface_addrs_name: &'static str,
}

impl<A: FamilyAddr + aya::Pod> FamilyAddrMaps<A> {
    fn take(
        ebpf: &mut Ebpf,
        node_addrs_name: &'static str,
        iface_addrs_name: &'static str,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            node_addrs: HashMap::try_from(take_map(ebpf, node_addrs_name)?)?,
            node_addrs_name,
            iface_addrs: HashMap::try_from(take_map(ebpf, iface_addrs_name)?)?,
            iface_addrs_name,
        })
    }

    /// Writes the addresses of this family among `wanted`.
    fn set_node_addrs(&mut self, wanted: &BTreeSet<IpAddr>) -> Result<(), MapError> {
        let wanted = wanted
            .iter()
            .filter_map(|ip| A::of_ip(*ip))
            .map(|addr| (addr, 1))
            .collect();
        sync_map(&mut self.node_addrs, self.node_addrs_name, &wanted)
    }

    /// Writes the SNAT addresses of this family among `wanted`.
    fn set_iface_addrs(
        &mut self,
        wanted: &BTreeMap<(u32, Family), IpAddr>,
    ) -> Result<(), MapError> {
        let wanted = wanted
            .iter()
            .filter(|((_, family), _)| *family == A::MODEL_FAMILY)
            .filter_map(|((index, _), ip)| Some((*index, A::of_ip(*ip)?)))
            .collect();
        sync_map(&mut self.iface_addrs, self.iface_addrs_name, &wanted)
    }
}

/// The node's addresses of both families: where NodePorts answer, and the SNAT source per
/// interface.
pub struct NodeAddrMaps {
    v4: FamilyAddrMaps<Addr4>,
    v6: FamilyAddrMaps<Addr6>,
}

impl NodeAddrMaps {
    /// Takes the maps out of a loaded object (before its programs are loaded, as for the
    /// service maps: the programs keep referring to them).
    pub fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        Ok(Self {
            v4: FamilyAddrMaps::take(ebpf, map_names::NODE_ADDRS_V4, map_names::IFACE_ADDRS_V4)?,
            v6: FamilyAddrMaps::take(ebpf, map_names::NODE_ADDRS_V6, map_names::IFACE_ADDRS_V6)?,
        })
    }

    /// Makes `LB4_NODEADDR` and `LB6_NODEADDR` hold exactly `wanted`, each its family's (the
    /// addresses NodePorts answer on).
    pub fn set_node_addrs(&mut self, wanted: &BTreeSet<IpAddr>) -> Result<(), MapError> {
        self.v4.set_node_addrs(wanted)?;
        self.v6.set_node_addrs(wanted)
    }

    /// Makes `LB4_IFADDR` and `LB6_IFADDR` hold exactly `wanted`: the SNAT source address
    /// of each family per ifindex (an address must be of the family it is filed under).
    pub fn set_iface_addrs(
        &mut self,
        wanted: &BTreeMap<(u32, Family), IpAddr>,
    ) -> Result<(), MapError> {
        self.v4.set_iface_addrs(wanted)?;
        self.v6.set_iface_addrs(wanted)
    }
}

fn sync_map<K, V>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    wanted: &BTreeMap<K, V>,
) -> Result<(), MapError>
where
    K: aya::Pod + Ord + Hash,
    V: aya::Pod + PartialEq,
{
    let current: BTreeMap<K, V> = map
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

/// An interface's index and addresses of both families, in the order the kernel lists them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Interface {
    pub index: u32,
    pub addrs: Vec<IpAddr>,
}

/// The IPv4 and IPv6 addresses of every interface of this network namespace, by name.
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
        match unsafe { (*entry.ifa_addr).sa_family } as i32 {
            libc::AF_INET => {
                // SAFETY: AF_INET means a sockaddr_in.
                let sin = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in) };
                iface
                    .addrs
                    .push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into());
            }
            libc::AF_INET6 => {
                // SAFETY: AF_INET6 means a sockaddr_in6.
                let sin6 = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in6) };
                iface
                    .addrs
                    .push(Ipv6Addr::from(sin6.sin6_addr.s6_addr).into());
            }
            _ => {}
        }
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(found)
}
