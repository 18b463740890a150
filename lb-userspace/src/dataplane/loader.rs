//! Loads the embedded eBPF object with its maps pinned under the agent's bpffs directory
//! (adopting maps an earlier agent pinned, migrating those of another shape: see `migrate`)
//! and attaches the socket programs to a cgroup.
use std::{fs::File, path::Path};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupSock, CgroupSockAddr},
};
use lb_common::{limits, map_names};

use super::{
    bpffs::PinDir,
    links::{self, Attached},
    maps::BpfServiceMaps,
    migrate,
};

/// The compiled programs, built by `build.rs` from the `lb-ebpf` crate.
pub(super) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// The socket programs, by their attach point: each IPv4 hook and its `AF_INET6` twin (which
/// serves IPv6 services and IPv4 ones through IPv4-mapped addresses).
pub const SOCKET_PROGRAMS: [&str; 8] = [
    "connect4",
    "sendmsg4",
    "recvmsg4",
    "getpeername4",
    "connect6",
    "sendmsg6",
    "recvmsg6",
    "getpeername6",
];

/// Forgets a released socket (cgroup sock_release), attached beside the socket programs.
pub const RELEASE_PROGRAM: &str = "sock_release";

/// The bind-protection programs (cgroup post_bind4 and post_bind6), attached beside the
/// socket programs unless `--bind-protection=false`.
pub const BIND_PROGRAMS: [&str; 2] = ["post_bind4", "post_bind6"];

/// Map capacities; the defaults are the eBPF object's, a flag raises them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Frontends of every kind (and the counters and names that go with them).
    pub max_services: u32,
    pub max_backends: u32,
    pub max_affinity: u32,
    pub max_revnat: u32,
    /// Maglev tables: backend sets outside traffic reaches.
    pub max_maglev_tables: u32,
    /// Tracked XDP flows (and three reverse entries per flow).
    pub max_flows: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_services: limits::MAX_SERVICES,
            max_backends: limits::MAX_BACKENDS,
            max_affinity: limits::MAX_AFFINITY,
            max_revnat: limits::MAX_REVNAT,
            max_maglev_tables: limits::MAX_MAGLEV_TABLES,
            max_flows: limits::MAX_FLOWS,
        }
    }
}

impl Limits {
    /// The capacity of every map this sets, by map name: a limit holds for each family's map.
    pub fn capacities(&self) -> [(&'static str, u32); 17] {
        [
            (map_names::FRONTENDS_V4, self.max_services),
            (map_names::SLOTS_V4, self.max_backends.saturating_mul(2)),
            (map_names::BACKENDS_V4, self.max_backends),
            (map_names::MAGLEV_V4, self.max_maglev_tables),
            (map_names::AFFINITY_V4, self.max_affinity),
            (map_names::REVNAT_V4, self.max_revnat),
            (map_names::SERVICE_STATS_V4, self.max_services),
            (map_names::SERVICE_NAMES_V4, self.max_services),
            (map_names::FLOWS_V4, self.max_flows),
            (map_names::FLOW_REPLIES_V4, self.max_flows.saturating_mul(3)),
            (map_names::FRONTENDS_V6, self.max_services),
            (map_names::BACKENDS_V6, self.max_backends),
            (map_names::AFFINITY_V6, self.max_affinity),
            (map_names::REVNAT_V6, self.max_revnat),
            (map_names::SERVICE_NAMES_V6, self.max_services),
            (map_names::FLOWS_V6, self.max_flows),
            (map_names::FLOW_REPLIES_V6, self.max_flows.saturating_mul(3)),
        ]
    }
}

/// The cookie of the network namespace this process runs in (`SO_NETNS_COOKIE`, Linux 5.14).
fn own_netns_cookie() -> anyhow::Result<u64> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    // SAFETY: plain arguments; the descriptor returned is checked below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        anyhow::bail!(
            "a socket to ask for the cookie: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: the kernel just returned this new descriptor to us.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the socket is open, and cookie and len outlive the call with len its size.
    let result = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if result != 0 {
        anyhow::bail!("SO_NETNS_COOKIE: {}", std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The loaded programs and their maps. Programs stay attached through their pinned links and
/// maps stay pinned after it is dropped, until [`PinDir::remove_all`].
pub struct Dataplane {
    ebpf: Ebpf,
    pins: PinDir,
    /// Every map of the object, named when loaded (maps taken out later still count).
    object_maps: Vec<String>,
}

impl Dataplane {
    /// Loads the object; maps already pinned under `pins` are reused with their contents, or
    /// migrated where their shape is not the one asked for (see `migrate`).
    pub fn load(pins: PinDir, limits: Limits) -> anyhow::Result<Self> {
        Self::load_with_log(pins, limits, false)
    }

    /// Like [`Dataplane::load`]; `kernel_log` turns on the programs' aya-log debug output
    /// (otherwise each log statement costs a global load and a branch).
    pub fn load_with_log(pins: PinDir, limits: Limits, kernel_log: bool) -> anyhow::Result<Self> {
        let log_level: u8 = if kernel_log {
            4 /* Debug */
        } else {
            0 /* off */
        };
        let map_dir = pins.maps();
        std::fs::create_dir_all(&map_dir)
            .with_context(|| format!("creating {}", map_dir.display()))?;
        let max_entries = limits.capacities();
        // Bind protection and source ranges tell the node's sockets from pods' by it.
        let node_netns = own_netns_cookie().unwrap_or_else(|error| {
            tracing::warn!(
                %error,
                "cannot read this network namespace's cookie: the programs take the initial \
                 namespace for the node's"
            );
            0
        });
        let mut loader = EbpfLoader::new();
        loader
            .override_global("AYA_LOG_LEVEL", &log_level, false)
            .override_global("NODE_NETNS_COOKIE", &node_netns, true)
            .default_map_pin_directory(&map_dir);
        for (name, entries) in &max_entries {
            loader.map_max_entries(name, *entries);
        }
        let migration = migrate::prepare(EBPF_OBJECT, &map_dir, &max_entries)?;
        let ebpf = migration
            .complete(loader.load(EBPF_OBJECT))
            .with_context(|| {
                format!(
                    "loading the eBPF object with maps pinned under {} (a map pinned by an \
                     incompatible version can be removed with `lb-agent cleanup`)",
                    map_dir.display()
                )
            })?;
        let object_maps = ebpf.maps().map(|(name, _)| name.to_owned()).collect();
        Ok(Self {
            ebpf,
            pins,
            object_maps,
        })
    }

    pub fn pins(&self) -> &PinDir {
        &self.pins
    }

    /// The loaded object, for the north-south programs and maps (`dataplane::nodeport`).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Loads the socket programs and attaches them to the cgroup v2 directory `cgroup` through
    /// pinned links: a link an earlier agent pinned gets the new program swapped in atomically.
    /// The sock_release program always; with `bind_protection` the bind-protection programs
    /// too, without it their links an earlier agent pinned are removed. Links pinned for
    /// another cgroup are removed, as are pinned maps this version does not use (an earlier
    /// layout), once the new programs are in place.
    pub fn attach_cgroup(
        &mut self,
        cgroup: &Path,
        bind_protection: bool,
    ) -> anyhow::Result<Vec<(&'static str, Attached)>> {
        let cgroup_dir = File::open(cgroup).with_context(|| {
            format!(
                "opening cgroup {} (is it a cgroup v2 directory?)",
                cgroup.display()
            )
        })?;
        let link_dir = links::dir_for(&self.pins.links(), cgroup)?;
        let mut attached = Vec::new();
        for name in SOCKET_PROGRAMS {
            let program: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
                .try_into()
                .with_context(|| format!("program {name} is not a cgroup sock_addr program"))?;
            program
                .load()
                .with_context(|| format!("loading {name} (the verifier's log follows)"))?;
            let outcome = links::attach_or_replace(program, name, &cgroup_dir, &link_dir)
                .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
            attached.push((name, outcome));
        }
        let mut sock_programs = vec![RELEASE_PROGRAM];
        if bind_protection {
            sock_programs.extend(BIND_PROGRAMS);
        }
        for name in sock_programs {
            let program: &mut CgroupSock = self
                .ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
                .try_into()
                .with_context(|| format!("program {name} is not a cgroup sock program"))?;
            program
                .load()
                .with_context(|| format!("loading {name} (the verifier's log follows)"))?;
            let outcome = links::attach_sock_or_replace(program, name, &cgroup_dir, &link_dir)
                .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
            attached.push((name, outcome));
        }
        if !bind_protection {
            for name in BIND_PROGRAMS {
                if links::remove(&link_dir, name)? {
                    tracing::info!(
                        program = name,
                        "bind protection off: detached the program of an earlier run"
                    );
                }
            }
        }
        for stale in links::remove_others(&self.pins.links(), &link_dir)? {
            tracing::info!(links = %stale.display(), "detached programs of a cgroup no longer served");
        }
        let current: Vec<&str> = self.object_maps.iter().map(String::as_str).collect();
        for (map, added) in migrate::top_up(&self.pins.maps(), &current) {
            if added > 0 {
                tracing::info!(%map, added, "carried what the old programs cached meanwhile");
            }
        }
        for stale in self.pins.remove_maps_except(&current)? {
            tracing::info!(map = %stale, "removed a map pinned by an earlier version");
        }
        Ok(attached)
    }

    /// The capacity of each of the object's maps, as the kernel reports it (a flag that could
    /// not take effect does not show here).
    pub fn capacities(&self) -> std::collections::BTreeMap<String, u32> {
        let names: Vec<&str> = self.object_maps.iter().map(String::as_str).collect();
        migrate::capacities(&self.pins.maps(), &names)
    }

    /// The highest service id and backend id that session-affinity and conntrack entries
    /// name: those ids must not be handed out again while the entries live.
    pub fn flow_id_high_water(&self) -> anyhow::Result<(u32, u32)> {
        let map = |name: &str| {
            self.ebpf
                .map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
        };
        let affinity: aya::maps::HashMap<_, lb_common::Affinity4Key, lb_common::AffinityValue> =
            aya::maps::HashMap::try_from(map(map_names::AFFINITY_V4)?)?;
        let flows: aya::maps::HashMap<_, lb_common::Ct4Key, lb_common::Ct4Value> =
            aya::maps::HashMap::try_from(map(map_names::FLOWS_V4)?)?;
        let from_affinity = affinity
            .iter()
            .filter_map(Result::ok)
            .map(|(key, value)| (key.service_id, value.backend_id));
        let from_flows = flows
            .iter()
            .filter_map(Result::ok)
            .map(|(_, value)| (value.service_id, value.backend_id));
        Ok(from_affinity
            .chain(from_flows)
            .fold((0, 0), |(service, backend), (s, b)| {
                (service.max(s), backend.max(b))
            }))
    }

    /// Forwards the programs' aya-log records to the agent's log (target `lb_ebpf`), until the
    /// runtime stops.
    pub fn start_kernel_log(&mut self) -> anyhow::Result<()> {
        let logger = aya_log::EbpfLogger::init(&mut self.ebpf)
            .context("starting the kernel-side log (aya-log)")?;
        // SAFETY: the logger owns its ring buffer's descriptor and keeps it open, unchanged,
        // for as long as the AsyncFd owns the logger.
        let mut readable = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        }
        .map_err(|e| anyhow!("watching the kernel-side log: {e}"))?;
        tokio::spawn(async move {
            loop {
                let Ok(mut guard) = readable.readable_mut().await else {
                    return;
                };
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        });
        Ok(())
    }

    /// The names of the programmed frontends (for `lb-agent list`).
    pub fn names(&mut self) -> anyhow::Result<super::names::NamesMap> {
        super::names::NamesMap::take(&mut self.ebpf)
    }

    /// The per-service counters.
    pub fn service_stats(&mut self) -> anyhow::Result<super::stats::ServiceStatsMap> {
        super::stats::ServiceStatsMap::take(&mut self.ebpf)
    }

    /// The service maps, for the reconciler.
    pub fn service_maps(&mut self) -> anyhow::Result<BpfServiceMaps> {
        BpfServiceMaps::take(&mut self.ebpf)
    }
}
