//! The chaos run's node: pods answering with their names, a client pod in the agent's cgroup
//! (ClusterIPs through the socket programs), an outside client on the node's uplink `ext0`
//! (NodePorts through XDP), and the agent process, started and stopped at will.
//!
//! ```text
//!   outside ns  eth0 192.168.77.100 ── ext0 192.168.77.1  node ns  br0 10.244.0.1 ── pods, client
//! ```

use std::fs::File;
use std::io::{BufRead as _, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::{
    AgentReady, BpffsDir, Cgroup, Netns, Node, OutsideClient, Pod, Uplink, command_in, make_router,
    spawn_in, unique_name,
};

/// The port every pod answers on, TCP and UDP.
pub const POD_PORT: u16 = 8080;
pub const NODE_IFACE: &str = "ext0";
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 100);
const UPLINK_PREFIX_LEN: u8 = 24;
/// Where the agent serves `/healthz`, in its node's namespace (alone there).
pub const HEALTHZ: &str = "127.0.0.1:10256";
pub const NODE_NAME: &str = "node-a";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A node namespace with its uplink to an outside client (the reference agent's node has the
/// same addresses, so that both agents see the same node).
pub struct Uplinked {
    pub outside: OutsideClient,
    pub node: Node,
}

impl Uplinked {
    pub fn new() -> Result<Uplinked> {
        let node = Node::new()?;
        let outside = OutsideClient::direct(
            Netns::new("out")?,
            node.netns(),
            &Uplink {
                node_iface: NODE_IFACE,
                node_ip: NODE_IP,
                client_iface: "eth0",
                client_ip: OUTSIDE_IP,
                prefix_len: UPLINK_PREFIX_LEN,
            },
        )?;
        make_router(node.netns())?;
        Ok(Uplinked { outside, node })
    }
}

/// Servers killed (and reaped) on drop.
#[derive(Default)]
struct Servers(Vec<Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The node with its pods and clients. Fields drop in order: servers, pods, client, node,
/// cgroup.
pub struct Site {
    servers: Servers,
    pub pods: Vec<Pod>,
    pub client: Pod,
    pub net: Uplinked,
    pub cgroup: Cgroup,
}

impl Site {
    /// A node with `pods` pods `pod-1..` serving their names on [`POD_PORT`], and the clients.
    pub fn new(pods: usize, probe: &Path) -> Result<Site> {
        crate::require_root()?;
        let mut net = Uplinked::new()?;
        let client = net.node.add_pod("cli")?;
        let mut site = Site {
            servers: Servers::default(),
            pods: Vec::new(),
            client,
            net,
            cgroup: Cgroup::new("chaos")?,
        };
        let outside = crate::subnet(OUTSIDE_IP, UPLINK_PREFIX_LEN);
        for n in 1..=pods {
            let name = format!("pod-{n}");
            let pod = site.net.node.add_pod(&name)?;
            pod.netns.run(&[
                "ip",
                "route",
                "add",
                &outside,
                "via",
                &crate::BRIDGE_IP.to_string(),
            ])?;
            site.servers.0.push(serve(&pod, probe)?);
            site.pods.push(pod);
        }
        Ok(site)
    }

    pub fn pod_names(&self) -> Vec<String> {
        self.pods.iter().map(|p| p.name.clone()).collect()
    }
}

fn serve(pod: &Pod, probe: &Path) -> Result<Child> {
    let port = POD_PORT.to_string();
    let args = ["serve", "--name", &pod.name, "--tcp", &port, "--udp", &port];
    let mut server = spawn_in(Some(&pod.netns), None, probe, &args)?;
    let mut first = String::new();
    BufReader::new(server.stdout.take().context("the server's stdout")?).read_line(&mut first)?;
    if first.trim() != "ready" {
        bail!("the server of {} did not start: {first:?}", pod.name);
    }
    Ok(server)
}

/// Where an agent runs and what it is given: its node's namespace, cgroup, pins, manifests.
pub struct AgentSpec<'a> {
    pub agent: &'a Path,
    pub netns: &'a Netns,
    pub cgroup: &'a Cgroup,
    pub bpffs: &'a BpffsDir,
    pub manifests: &'a Path,
    /// Appended to (the agent's stderr).
    pub log: &'a Path,
    /// More flags (`--max-services N`, `--cleanup-on-exit`).
    pub extra: Vec<String>,
}

/// A running `lb-agent run`.
pub struct AgentProcess {
    child: Child,
}

impl AgentSpec<'_> {
    fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "run",
            "--manifests",
            &self.manifests.display().to_string(),
            "--cgroup",
            &self.cgroup.path().display().to_string(),
            "--bpffs",
            &self.bpffs.path().display().to_string(),
            "--node-name",
            NODE_NAME,
            "--nodeport-iface",
            NODE_IFACE,
            "--healthz-addr",
            HEALTHZ,
            "--metrics-addr",
            "off",
        ]
        .map(str::to_owned)
        .into();
        args.extend(self.extra.iter().cloned());
        args
    }

    fn ready(&self) -> AgentReady<'_> {
        AgentReady {
            agent: self.agent,
            bpffs: self.bpffs.path(),
            healthz: HEALTHZ.parse().expect("a socket address"),
            netns: Some(self.netns),
            links: crate::agent_links(1),
        }
    }

    /// Starts the agent without waiting for it.
    pub fn spawn(&self) -> Result<AgentProcess> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut cmd = command_in(Some(self.netns), None, self.agent)?;
        cmd.args(self.args())
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        Ok(AgentProcess { child })
    }

    /// Starts the agent and waits until it is ready: its first full sync is done (`/healthz`
    /// answers 200) and every program is linked anew.
    pub fn start(&self) -> Result<AgentProcess> {
        let wait = self.ready().before_start()?;
        let mut agent = self.spawn()?;
        if let Err(e) = wait.wait(&mut agent.child, READY_TIMEOUT) {
            agent.kill();
            return Err(e.context(format!("the agent's log is {}", self.log.display())));
        }
        Ok(agent)
    }
}

impl AgentProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// kill -9: nothing is cleaned up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and waits (at most 20 s, then kill -9) for it to exit; false if it had to be
    /// killed or did not exit cleanly.
    pub fn terminate(&mut self) -> bool {
        // SAFETY: kill(2) on our own child's pid with a valid signal.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A scratch directory removed on drop (unless `keep` is set, to look at logs).
pub struct WorkDir {
    pub path: PathBuf,
    pub keep: bool,
}

impl WorkDir {
    pub fn new() -> Result<WorkDir> {
        let path = std::env::temp_dir().join(unique_name("chaos"));
        std::fs::create_dir_all(path.join("manifests"))?;
        Ok(WorkDir { path, keep: false })
    }

    pub fn manifests(&self) -> PathBuf {
        self.path.join("manifests")
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// `lb-agent list -o description` of the pins under `bpffs`.
pub fn describe(agent: &Path, bpffs: &Path) -> Result<serde_json::Value> {
    let mut cmd = std::process::Command::new(agent);
    cmd.args(["list", "-o", "description", "--bpffs"])
        .arg(bpffs)
        .env("RUST_BACKTRACE", "0");
    let out = crate::run_checked(&mut cmd)?;
    serde_json::from_str(&out).with_context(|| format!("`lb-agent list` printed no JSON: {out}"))
}
