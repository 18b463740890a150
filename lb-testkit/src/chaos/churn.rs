//! The Services of the chaos run and their endpoint churn: each step writes new
//! EndpointSlices (each pod absent, ready, or terminating but serving, at least one ready for
//! the Services that get traffic) and now and then adds or removes a Service that gets none.
//! Every endpoint ever listed is a live pod server, so every request has an answer.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use super::site::POD_PORT;
use crate::objects::{ManifestList, ServiceManifest, SliceManifest};

pub const WEB_IP: &str = "10.96.0.10";
pub const STICKY_IP: &str = "10.96.0.11";
const EXTRA_IP: &str = "10.96.0.12";
pub const WEB_TCP_NODE_PORT: u16 = 30080;
pub const WEB_UDP_NODE_PORT: u16 = 30081;
const EXTRA_NODE_PORT: u16 = 30090;
/// Services without traffic whose endpoints all change at every step (in one file), so that a
/// sync writes for a while and kills land in the middle of it.
const BULK_SERVICES: u8 = 30;

/// An endpoint's state in a slice.
#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Absent,
    Ready,
    Terminating,
}

/// What the manifest directory holds, and the pods (address, name) endpoints come from.
pub struct Churn {
    dir: PathBuf,
    pods: Vec<(String, String)>,
    extra: bool,
    /// Manifest changes written so far.
    pub steps: u64,
}

impl Churn {
    /// Writes the Services and a first set of slices to `dir`.
    pub fn new(dir: &Path, pods: Vec<(String, String)>, rng: &mut fastrand::Rng) -> Result<Churn> {
        let mut churn = Churn {
            dir: dir.to_owned(),
            pods,
            extra: true,
            steps: 0,
        };
        churn.write("web.yaml", &web().to_yaml())?;
        churn.write("sticky.yaml", &sticky().to_yaml())?;
        churn.step(rng)?;
        Ok(churn)
    }

    /// One change: new slices for the served Services, and one time in five the extra
    /// Service added or removed.
    pub fn step(&mut self, rng: &mut fastrand::Rng) -> Result<()> {
        self.steps += 1;
        let web = self.slice("web", rng, true);
        self.write("web-slice.yaml", &web.to_yaml())?;
        let sticky = self.slice("sticky", rng, true);
        self.write("sticky-slice.yaml", &sticky.to_yaml())?;
        let mut bulk = ManifestList::new();
        for n in 0..BULK_SERVICES {
            let name = format!("bulk-{n}");
            bulk.push(
                ServiceManifest::cluster_ip("default", &name, format!("10.96.1.{n}"))
                    .port("http", "TCP", 80, POD_PORT),
            );
            bulk.push(self.slice(&name, rng, false));
        }
        self.write("bulk.yaml", &bulk.to_yaml())?;
        if rng.u8(0..5) == 0 {
            self.extra = !self.extra;
        }
        if self.extra {
            self.write("extra.yaml", &extra().to_yaml())?;
            let slice = self.slice("extra", rng, false);
            self.write("extra-slice.yaml", &slice.to_yaml())?;
        } else {
            for file in ["extra.yaml", "extra-slice.yaml"] {
                match std::fs::remove_file(self.dir.join(file)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(e).context(format!("removing {file}"));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    fn slice(&self, service: &str, rng: &mut fastrand::Rng, one_ready: bool) -> SliceManifest {
        let mut states: Vec<State> = self
            .pods
            .iter()
            .map(|_| match rng.u8(0..4) {
                0 => State::Absent,
                1 => State::Terminating,
                _ => State::Ready,
            })
            .collect();
        if one_ready && !states.contains(&State::Ready) {
            let pick = rng.usize(0..states.len());
            states[pick] = State::Ready;
        }
        let mut slice = SliceManifest::new("default", &format!("{service}-1"), service)
            .port("http", "TCP", POD_PORT)
            .port("dns", "UDP", POD_PORT);
        for ((ip, name), state) in self.pods.iter().zip(states) {
            slice = match state {
                State::Absent => continue,
                State::Ready => slice
                    .endpoint(ip)
                    .on_node(super::site::NODE_NAME)
                    .ready(true),
                State::Terminating => slice
                    .endpoint(ip)
                    .on_node(super::site::NODE_NAME)
                    .conditions(false, true, true),
            }
            .target_pod("default", name);
        }
        slice
    }

    /// Writes a manifest atomically (a rename, as `kubectl get > tmp && mv` would).
    fn write(&self, file: &str, yaml: &str) -> Result<()> {
        let tmp = self.dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, self.dir.join(file)).with_context(|| format!("renaming {file}"))
    }
}

/// `web`: ClusterIP and NodePort, http (TCP 80) and dns (UDP 53).
fn web() -> ServiceManifest {
    ServiceManifest::cluster_ip("default", "web", WEB_IP)
        .service_type("NodePort")
        .port("http", "TCP", 80, POD_PORT)
        .node_port(WEB_TCP_NODE_PORT)
        .port("dns", "UDP", 53, POD_PORT)
        .node_port(WEB_UDP_NODE_PORT)
}

/// `sticky`: a ClusterIP with ClientIP affinity.
fn sticky() -> ServiceManifest {
    ServiceManifest::cluster_ip("default", "sticky", STICKY_IP)
        .port("http", "TCP", 80, POD_PORT)
        .client_ip_affinity(Some(60))
}

/// `extra`: a LoadBalancer with a `Local` policy and source ranges, added and removed (no
/// traffic goes to it; its entries must come and go without leaks).
fn extra() -> ServiceManifest {
    ServiceManifest::cluster_ip("default", "extra", EXTRA_IP)
        .service_type("LoadBalancer")
        .port("http", "TCP", 80, POD_PORT)
        .node_port(EXTRA_NODE_PORT)
        .external_traffic_policy("Local")
        .health_check_node_port(32000)
        .load_balancer_source_ranges(["192.168.77.0/25", "10.0.0.0/8"])
        .load_balancer_ingress("198.51.100.20")
}

/// The manifest directory's contents (file names and bytes, sorted): equal keys, equal
/// source for the agent.
pub fn snapshot(dir: &Path) -> Result<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    let mut text = String::new();
    for file in files {
        text.push_str(&format!(
            "--- {}\n",
            file.file_name().unwrap_or_default().to_string_lossy()
        ));
        text.push_str(&std::fs::read_to_string(&file)?);
    }
    Ok(text)
}
