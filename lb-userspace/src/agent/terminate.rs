//! Sockets of removed backends: a connected UDP socket (and, with `--terminate-tcp`, a TCP
//! connection) that a socket program sent to a backend which is now gone is destroyed, so
//! the application sees an error and reconnects to a live backend, instead of sending into
//! the void forever (kube-proxy clears the UDP conntrack entries of removed endpoints for the
//! same reason; Cilium destroys such sockets).
//!
//! How: the sockets maps (`LB4_REVNAT_V2`, `LB6_REVNAT_V1`) name, per socket cookie, the
//! backends each socket reached through a service. For every network namespace with a process
//! in the attached cgroup, a thread enters it and asks the kernel for its IPv4 and IPv6
//! sockets (netlink `SOCK_DIAG_BY_FAMILY`); a socket connected to a removed backend whose
//! cookie a map ties to it gets `SOCK_DESTROY` (kernels with `CONFIG_INET_DIAG_DESTROY`). An
//! `AF_INET6` socket that reached an IPv4 backend names it as `::ffff:a.b.c.d`. Sockets that reach a
//! pod directly, not through a service, are left alone: their cookie is not in the map.
//! (Cilium also has a BPF socket-iterator path with the `bpf_sock_destroy` kfunc; aya-ebpf
//! 0.2 cannot build iterator programs or call kfuncs, so this agent uses netlink only.)
use std::{
    collections::BTreeSet,
    fs::File,
    io,
    net::IpAddr,
    os::{fd::AsRawFd as _, linux::fs::MetadataExt as _},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context as _;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    message::SockDiagDestroy,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

use crate::{
    model::Backend,
    reconcile::{FamilyAddr, RemovedBackend},
};

/// What one run destroyed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Terminated {
    pub namespaces: usize,
    pub udp: usize,
    pub tcp: usize,
    /// Why sockets could not be destroyed (the first error per namespace).
    pub errors: Vec<String>,
}

/// Destroys the sockets of removed backends, off the agent's loop.
#[derive(Clone, Debug)]
pub struct SocketTerminator {
    cgroup: PathBuf,
    /// The pinned maps' directory (the sockets maps of both families are in it).
    maps_dir: PathBuf,
    tcp: bool,
    /// Whether a namespace it could not open was reported: every run meets it again (each
    /// run enters every namespace), and once is enough.
    refusal_reported: Arc<AtomicBool>,
    /// The errors already logged, for the same reason (a missing capability fails every run).
    logged: Arc<Mutex<BTreeSet<String>>>,
}

impl SocketTerminator {
    pub fn new(cgroup: &Path, maps_dir: PathBuf, tcp: bool) -> Self {
        tracing::info!(
            tcp,
            "sockets of removed backends are destroyed through netlink SOCK_DESTROY (UDP{})",
            if tcp {
                " and TCP"
            } else {
                "; TCP with --terminate-tcp"
            }
        );
        Self {
            cgroup: cgroup.to_owned(),
            maps_dir,
            tcp,
            refusal_reported: Arc::default(),
            logged: Arc::default(),
        }
    }

    /// How it works, for the log and `lb-agent status`.
    pub fn describe(tcp: bool) -> &'static str {
        if tcp {
            "destroyed through netlink SOCK_DESTROY, UDP and TCP"
        } else {
            "destroyed through netlink SOCK_DESTROY, UDP (TCP with --terminate-tcp)"
        }
    }

    /// Starts a run for the sockets of `removed` in a thread of its own; returns at once.
    /// Without `--terminate-tcp` only backends that served UDP frontends are looked for: no
    /// other can have a connected UDP socket through a service (as kube-proxy clears conntrack
    /// entries only for UDP services), so an endpoint change of a TCP service costs no run.
    pub fn spawn(&self, removed: Vec<RemovedBackend>) {
        let removed: BTreeSet<Backend> = removed
            .into_iter()
            .filter(|r| self.tcp || r.udp)
            .map(|r| r.backend)
            .collect();
        if removed.is_empty() {
            return;
        }
        let this = self.clone();
        std::thread::spawn(move || {
            let done = this.run(&removed);
            if done.udp + done.tcp > 0 {
                tracing::info!(
                    udp = done.udp,
                    tcp = done.tcp,
                    namespaces = done.namespaces,
                    "destroyed the sockets of removed backends"
                );
            }
            let mut logged = this.logged.lock().expect("terminator log lock");
            for error in done.errors {
                if logged.insert(error.clone()) {
                    tracing::warn!(%error, "could not destroy a socket of a removed backend (said once)");
                }
            }
        });
    }

    /// One run: the sockets of `removed` in every namespace of the cgroup's processes. Its
    /// cost follows the sockets connected to removed backends, not the sockets maps' size: each
    /// namespace's sockets come from one sock_diag dump, and only those connected to a removed
    /// backend are looked up by cookie (walking a map visits all its buckets, a millisecond
    /// for an empty 131,072-entry map, on every change that removes a backend).
    pub fn run(&self, removed: &BTreeSet<Backend>) -> Terminated {
        let mut done = Terminated::default();
        if removed.is_empty() {
            return done;
        }
        let (found, refused) = namespaces(&self.cgroup);
        if refused.is_some() && !self.refusal_reported.swap(true, Ordering::Relaxed) {
            done.errors.extend(refused);
        }
        let maps = match SocketMaps::open(&self.maps_dir) {
            Ok(maps) => maps,
            Err(error) => {
                done.errors.push(format!("{error:#}"));
                return done;
            }
        };
        for netns in found {
            done.namespaces += 1;
            // A thread of its own enters the namespace (setns changes the calling thread).
            let result = std::thread::scope(|scope| {
                let entered = scope.spawn(|| -> anyhow::Result<(usize, usize)> {
                    enter(&netns)?;
                    let (mut udp, mut tcp) = (0, 0);
                    for family in [AF_INET, AF_INET6] {
                        udp += destroy_in_namespace(family, IPPROTO_UDP, removed, &maps)?;
                        if self.tcp {
                            tcp += destroy_in_namespace(family, IPPROTO_TCP, removed, &maps)?;
                        }
                    }
                    Ok((udp, tcp))
                });
                entered.join()
            });
            match result {
                Ok(Ok((udp, tcp))) => {
                    done.udp += udp;
                    done.tcp += tcp;
                }
                Ok(Err(error)) => done.errors.push(format!("{error:#}")),
                Err(_) => done.errors.push("a namespace thread panicked".into()),
            }
        }
        done
    }
}

type SocketsMap<A> = aya::maps::HashMap<aya::maps::MapData, u64, lb_common::SockValue<A>>;

/// The pinned sockets maps of both families (the IPv6 one is skipped when not pinned, as under
/// an older object): which backends a socket reached through a service, by cookie.
struct SocketMaps {
    v4: SocketsMap<lb_common::Addr4>,
    v6: Option<SocketsMap<lb_common::Addr6>>,
}

impl SocketMaps {
    fn open(maps_dir: &Path) -> anyhow::Result<Self> {
        let v6 = maps_dir.join(lb_common::map_names::REVNAT_V6);
        Ok(Self {
            v4: open_sockets_map(&maps_dir.join(lb_common::map_names::REVNAT_V4))?,
            v6: v6.exists().then(|| open_sockets_map(&v6)).transpose()?,
        })
    }

    /// Whether the socket `cookie` reached `backend` through a service.
    fn reached(&self, cookie: u64, backend: &Backend) -> bool {
        let v4 = self.v4.get(&cookie, 0).ok();
        let v6 = self.v6.as_ref().and_then(|map| map.get(&cookie, 0).ok());
        v4.is_some_and(|value| names(&value, backend)) || v6.is_some_and(|v| names(&v, backend))
    }
}

fn open_sockets_map<A: FamilyAddr>(map: &Path) -> anyhow::Result<SocketsMap<A>>
where
    lb_common::SockValue<A>: aya::Pod,
{
    let data = aya::maps::MapData::from_pin(map)
        .with_context(|| format!("opening the sockets map {}", map.display()))?;
    Ok(aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(
        data,
    ))?)
}

/// Whether a sockets map value names `backend` among the services its socket reached.
fn names<A: FamilyAddr>(value: &lb_common::SockValue<A>, backend: &Backend) -> bool {
    let services = value.services.iter();
    services.filter(|s| !s.service_addr.is_zero()).any(|s| {
        let reached = Backend {
            ip: s.backend_addr.ip(),
            port: lb_common::port_from_map(s.backend_port),
        };
        reached == *backend
    })
}

/// The backend a socket is connected to, as the model names it: an IPv4-mapped peer of an
/// `AF_INET6` socket is the IPv4 backend.
fn peer_backend(peer: IpAddr, port: u16) -> Backend {
    let ip = match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, IpAddr::V4),
        IpAddr::V4(_) => peer,
    };
    Backend { ip, port }
}

/// One open namespace file per network namespace of the processes in `cgroup` and below, and
/// why some could not be opened (the first refusal only: one cause, e.g. no CAP_SYS_PTRACE,
/// refuses them all).
fn namespaces(cgroup: &Path) -> (Vec<File>, Option<String>) {
    let mut seen = BTreeSet::new();
    let mut found = Vec::new();
    let mut refused = None;
    let mut dirs = vec![cgroup.to_owned()];
    while let Some(dir) = dirs.pop() {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines() {
                let path = format!("/proc/{pid}/ns/net");
                // Reaching another process's namespace is a ptrace-read check: another uid, or
                // capabilities this process lacks, need CAP_SYS_PTRACE.
                let is_new = std::fs::metadata(&path)
                    .map(|meta| seen.insert((meta.st_dev(), meta.st_ino())));
                let outcome = match is_new {
                    Ok(false) => continue, // a namespace already found
                    Ok(true) => File::open(&path),
                    Err(error) => Err(error),
                };
                match outcome {
                    Ok(file) => found.push(file),
                    Err(error) if error.kind() == io::ErrorKind::PermissionDenied => {
                        refused.get_or_insert_with(|| {
                            format!(
                                "reaching {path}: {error} (needs CAP_SYS_PTRACE); sockets in \
                                 that network namespace are left alone"
                            )
                        });
                    }
                    Err(_) => {} // exited meanwhile
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            dirs.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    (found, refused)
}

/// Moves this thread into the network namespace `netns`.
fn enter(netns: &File) -> anyhow::Result<()> {
    // SAFETY: setns on a namespace file we hold open; it changes this thread only.
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error()).context("entering a network namespace");
    }
    Ok(())
}

/// Destroys this namespace's `protocol` sockets of address family `family` (`AF_INET`,
/// `AF_INET6`) connected to a removed backend that they reached through a service (the
/// sockets maps say so by cookie); returns how many.
fn destroy_in_namespace(
    family: u8,
    protocol: u8,
    removed: &BTreeSet<Backend>,
    maps: &SocketMaps,
) -> anyhow::Result<usize> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).context("opening a sock_diag socket")?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut doomed = Vec::new();
    let request = SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::all(),
        socket_id: if family == AF_INET6 {
            SocketId::new_v6()
        } else {
            SocketId::new_v4()
        },
    });
    send(&socket, request.into(), NLM_F_REQUEST | NLM_F_DUMP)?;
    receive(&socket, |message: NetlinkMessage<SockDiagMessage>| {
        if let NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) =
            message.payload
        {
            let id = &response.header.socket_id;
            let backend = peer_backend(id.destination_address, id.destination_port);
            if removed.contains(&backend) && maps.reached(cookie_of(&id.cookie), &backend) {
                doomed.push(id.clone());
            }
        }
    })?;
    let mut destroyed = 0;
    for socket_id in doomed {
        let request = SockDiagDestroy::new(SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id,
        }));
        send(
            &socket,
            NetlinkPayload::from(request),
            NLM_F_REQUEST | NLM_F_ACK,
        )?;
        let mut outcome = Ok(());
        receive(&socket, |message: NetlinkMessage<SockDiagDestroy>| {
            if let NetlinkPayload::Error(error) = message.payload
                && let Some(code) = error.code
            {
                outcome = Err(io::Error::from_raw_os_error(-code.get()));
            }
        })?;
        match outcome {
            Ok(()) => destroyed += 1,
            // Closed meanwhile: nothing left to destroy.
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(error) if error.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                anyhow::bail!(
                    "the kernel cannot destroy sockets (SOCK_DESTROY needs \
                     CONFIG_INET_DIAG_DESTROY)"
                )
            }
            Err(error) => return Err(error).context("SOCK_DESTROY"),
        }
    }
    Ok(destroyed)
}

/// The socket cookie as `bpf_get_socket_cookie` gives it: inet_diag carries it as two
/// 32-bit halves in host order, the low one first.
fn cookie_of(bytes: &[u8; 8]) -> u64 {
    let low = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let high = u32::from_ne_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    (u64::from(high) << 32) | u64::from(low)
}

fn send<T>(socket: &Socket, payload: NetlinkPayload<T>, flags: u16) -> anyhow::Result<()>
where
    T: netlink_packet_core::NetlinkSerializable + std::fmt::Debug,
{
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut message = NetlinkMessage::new(header, payload);
    message.finalize();
    let mut buffer = vec![0; message.buffer_len()];
    message.serialize(&mut buffer);
    socket
        .send(&buffer, 0)
        .context("sending a sock_diag request")?;
    Ok(())
}

/// Reads answers until the end of a dump, an acknowledgement or an error, handing each
/// message to `each`.
fn receive<T>(socket: &Socket, mut each: impl FnMut(NetlinkMessage<T>)) -> anyhow::Result<()>
where
    T: netlink_packet_core::NetlinkDeserializable + std::fmt::Debug,
{
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let size = socket
            .recv(&mut &mut buffer[..], 0)
            .context("reading sock_diag answers")?;
        let mut offset = 0;
        while offset < size {
            let message = NetlinkMessage::<T>::deserialize(&buffer[offset..size])
                .map_err(|e| anyhow::anyhow!("a sock_diag answer that does not parse: {e}"))?;
            let length = message.header.length as usize;
            let last = matches!(
                message.payload,
                NetlinkPayload::Done(_) | NetlinkPayload::Error(_)
            );
            each(message);
            if last {
                return Ok(());
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_read_as_the_kernel_writes_them() {
        let cookie: u64 = 0x0000_0012_3456_789a;
        let low = (cookie as u32).to_ne_bytes();
        let high = ((cookie >> 32) as u32).to_ne_bytes();
        let bytes = [
            low[0], low[1], low[2], low[3], high[0], high[1], high[2], high[3],
        ];
        assert_eq!(cookie_of(&bytes), cookie);
    }

    #[test]
    fn an_ipv4_mapped_peer_is_the_ipv4_backend() {
        let mapped = peer_backend("::ffff:10.244.0.5".parse().unwrap(), 8080);
        assert_eq!(mapped.ip, "10.244.0.5".parse::<IpAddr>().unwrap());
        let v6 = peer_backend("fd00:10:244::5".parse().unwrap(), 8080);
        assert_eq!(v6.ip, "fd00:10:244::5".parse::<IpAddr>().unwrap());
        assert_eq!(
            peer_backend("10.244.0.5".parse().unwrap(), 80),
            Backend {
                ip: "10.244.0.5".parse().unwrap(),
                port: 80
            }
        );
    }
}
