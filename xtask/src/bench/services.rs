//! The services every benchmark measures, and loading kube-proxy's rules for them (arms I
//! and N) the way kube-proxy does; the agent's limits for N services.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use super::cluster::Cluster;
use super::kube::{self, POD_PORT, SERVICE_PORT, Svc};
use super::{ipt, ipt_restore};

/// The measured services: `last` (TCP+UDP, last in KUBE-SERVICES), `rand` (TCP, at a random
/// position), `npl` (TCP, one endpoint, moved from pod to pod in benchmark 5), and `v6`
/// (TCP+UDP, a single-stack IPv6 Service over the same pods' IPv6 addresses: the IPv6 arms of
/// benchmarks 1 and 2; kube-proxy's arms do not carry it).
pub struct Measured {
    pub last_tcp: Svc,
    pub last_udp: Svc,
    pub rand: Svc,
    pub npl: Svc,
    pub v6_tcp: Svc,
    pub v6_udp: Svc,
}

pub const LAST_VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
pub const RAND_VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 2);
pub const NPL_VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 3);
pub const V6_VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x100, 0, 0, 0, 0, 1);

impl Measured {
    /// Over the pods' IPv4 addresses `backends` and their IPv6 addresses `backends6`.
    pub fn new(backends: &[IpAddr], backends6: &[IpAddr]) -> Measured {
        let svc =
            |name: &str, port_name: &str, protocol, vip: IpAddr, endpoints: Vec<IpAddr>| Svc {
                name: name.into(),
                port_name: port_name.into(),
                protocol,
                vip,
                port: SERVICE_PORT,
                target_port: POD_PORT,
                endpoints,
            };
        Measured {
            last_tcp: svc(
                "measure-last",
                "http",
                "TCP",
                LAST_VIP.into(),
                backends.to_vec(),
            ),
            last_udp: svc(
                "measure-last",
                "udp",
                "UDP",
                LAST_VIP.into(),
                backends.to_vec(),
            ),
            rand: svc(
                "measure-rand",
                "http",
                "TCP",
                RAND_VIP.into(),
                backends.to_vec(),
            ),
            npl: svc(
                "measure-npl",
                "http",
                "TCP",
                NPL_VIP.into(),
                vec![backends[0]],
            ),
            v6_tcp: svc(
                "measure-v6",
                "http",
                "TCP",
                V6_VIP.into(),
                backends6.to_vec(),
            ),
            v6_udp: svc(
                "measure-v6",
                "udp",
                "UDP",
                V6_VIP.into(),
                backends6.to_vec(),
            ),
        }
    }

    pub fn manifest(&self) -> String {
        kube::manifest(
            &[
                vec![&self.last_tcp, &self.last_udp],
                vec![&self.rand],
                vec![&self.npl],
                vec![&self.v6_tcp, &self.v6_udp],
            ],
            "bench-node",
        )
    }

    /// The iptables/nft order: background with `rand` at a random place, the others last.
    pub fn all(&self, background: &[Svc], seed: usize) -> Vec<Svc> {
        let mut all = background.to_vec();
        let at = if all.is_empty() {
            0
        } else {
            (seed.wrapping_mul(2_654_435_761) >> 7) % all.len()
        };
        all.insert(at, self.rand.clone());
        all.push(self.npl.clone());
        all.push(self.last_tcp.clone());
        all.push(self.last_udp.clone());
        all
    }
}

/// kube-proxy's state in one namespace: what it last wrote, to derive partial syncs.
pub struct KubeProxyState {
    pub services: Vec<Svc>,
}

impl KubeProxyState {
    pub fn replace(&mut self, changed: &Svc) -> Vec<IpAddr> {
        let slot = self
            .services
            .iter_mut()
            .find(|s| s.name == changed.name && s.port_name == changed.port_name)
            .expect("a known service");
        std::mem::replace(slot, changed.clone()).endpoints
    }
}

pub fn tmpfile(cluster: &Cluster, name: &str, text: &str) -> Result<PathBuf> {
    let path = cluster.work.0.join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

const RESTORE_ARGS: [&str; 4] = ["-w", "5", "--noflush", "--counters"];

pub fn iptables_flush(netns: &lb_testkit::Netns) -> Result<()> {
    netns.run(&[ipt(), "-w", "-t", "nat", "-F"])?;
    netns.run(&[ipt(), "-w", "-t", "nat", "-X"])?;
    Ok(())
}

pub fn nft_flush(netns: &lb_testkit::Netns) {
    let _ = netns.run(&["nft", "delete", "table", "ip", "kube-proxy"]);
}

pub fn iptables_restore(
    cluster: &Cluster,
    netns: &lb_testkit::Netns,
    text: &str,
) -> Result<Duration> {
    let path = tmpfile(cluster, "restore.txt", text)?;
    Cluster::timed_in(netns, &ipt_restore(), &RESTORE_ARGS, &path)
}

pub fn nft_load(cluster: &Cluster, netns: &lb_testkit::Netns, text: &str) -> Result<Duration> {
    let path = tmpfile(cluster, "nft.txt", text)?;
    Cluster::timed_in(netns, "nft", &["-f", "-"], &path)
}

/// The agent's arguments for `total_services` services of 10 endpoints: map capacities with
/// room (powers of two, at least the defaults of earlier runs), the manifest size, no
/// minimum interval between syncs (every change is measured on its own).
pub fn agent_limits(total_services: usize) -> Vec<String> {
    let backends = (total_services * 10 + 1024)
        .next_power_of_two()
        .max(262_144);
    let services = (total_services + 1024).next_power_of_two().max(65_536);
    // The background manifest is one file of ~1.5 KB per service (150 MB at 100,000), above
    // the agent's default limit of a manifest file's size (64 MiB).
    let manifest_bytes = (total_services as u64 * 4096).max(64 << 20);
    vec![
        "--max-backends".into(),
        backends.to_string(),
        "--max-services".into(),
        services.to_string(),
        "--manifest-max-bytes".into(),
        manifest_bytes.to_string(),
        "--min-sync-interval-ms".into(),
        "0".into(),
    ]
}
