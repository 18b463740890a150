//! A test cluster: a node namespace with pods on a bridge, each pod running `lb-probe serve`
//! (answering with its name), a client pod whose processes run in a test cgroup, a manifest
//! directory, and the real `lb-agent` binary programming the real kernel. Everything is
//! removed on drop, also when the test fails.
#![allow(dead_code)] // each test file uses a different part of the harness

pub mod dual_stack;
pub mod fake_api;
pub mod hints;
pub mod site;

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{Arc, LazyLock, Mutex},
    time::{Duration, Instant},
};

use lb_testkit::{AgentReady, Cgroup, Node, Pod, ReadyWait, spawn_in, unique_name};
use serde::Deserialize;

pub const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");
/// lb-testkit's binary (not this package's, so no `CARGO_BIN_EXE_lb-probe`): built by
/// `cargo build -p lb-testkit --bins`, or `cargo xtask test`.
pub static PROBE: LazyLock<PathBuf> = LazyLock::new(|| lb_testkit::bin_path("lb-probe"));
/// The port every backend pod answers on, TCP and UDP.
pub const POD_PORT: u16 = 8080;
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(20);

/// What `lb-probe tcp|udp` printed.
#[derive(Debug, Default, Deserialize)]
pub struct ProbeResult {
    pub attempts: u64,
    #[serde(default)]
    pub replies: BTreeMap<String, u64>,
    #[serde(default)]
    pub errors: BTreeMap<String, u64>,
    #[serde(default)]
    pub peers: BTreeMap<String, u64>,
    /// UDP: each reply's source as recvfrom showed it (connected sockets too).
    #[serde(default)]
    pub sources: BTreeMap<String, u64>,
    /// The sockets' own addresses (getsockname), without ports.
    #[serde(default)]
    pub locals: BTreeMap<String, u64>,
    #[serde(default)]
    pub first_error: Option<String>,
}

impl ProbeResult {
    pub fn failures(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// A running agent; stopped with SIGTERM on drop.
pub struct Agent {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    /// Where it serves metrics and `/healthz` (in the network namespace it runs in); `None`:
    /// that server is off.
    pub metrics_addr: Option<SocketAddr>,
    pub healthz_addr: Option<SocketAddr>,
}

impl Agent {
    /// Spawns a prepared `lb-agent run` command (e.g. inside a node's network namespace),
    /// serving metrics and `/healthz` on the given addresses, with its stderr captured as the
    /// log.
    pub fn spawn(
        mut cmd: std::process::Command,
        metrics_addr: Option<SocketAddr>,
        healthz_addr: Option<SocketAddr>,
    ) -> Agent {
        let flag =
            |addr: Option<SocketAddr>| addr.map_or_else(|| "off".to_owned(), |a| a.to_string());
        let mut child = cmd
            .arg("--metrics-addr")
            .arg(flag(metrics_addr))
            .arg("--healthz-addr")
            .arg(flag(healthz_addr))
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting lb-agent");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Agent {
            child,
            log,
            metrics_addr,
            healthz_addr,
        }
    }

    /// Waits until the agent is ready (`/healthz` answers 200 and its programs are linked,
    /// see [`lb_testkit::AgentReady`]), or fails with its log.
    pub fn wait_ready(&mut self, ready: &ReadyWait, timeout: Duration) {
        if let Err(error) = ready.wait(&mut self.child, timeout) {
            panic!("{error:#}; the agent's log:\n{}", self.log());
        }
    }

    /// Like [`Agent::wait_ready`], but a start that fails is the caller's to judge: `Err`
    /// holds why and the agent's log.
    pub fn try_wait_ready(&mut self, ready: &ReadyWait, timeout: Duration) -> Result<(), String> {
        ready
            .wait(&mut self.child, timeout)
            .map(|_| ())
            .map_err(|error| format!("{error:#}; the agent's log:\n{}", self.log()))
    }

    /// Waits (bounded) for the agent to exit on its own; `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the agent") {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The agent's log so far, for assertion messages.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits until a log line contains `needle`, or fails after `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log.lock().unwrap().iter().any(|l| l.contains(needle)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("agent never logged {needle:?}; its log:\n{}", self.log());
    }

    /// Sends SIGTERM and waits (bounded) for a clean exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill with a pid we own and a valid signal number.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the agent") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "agent did not exit within 10s of SIGTERM; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the agent gets no chance to clean up anything.
    pub fn kill(&mut self) {
        self.child.kill().expect("killing the agent");
        self.child.wait().expect("waiting for the agent");
    }

    /// The address logged for `field` (`metrics_addr` or `healthz_addr`).
    pub fn logged_address(&self, field: &str) -> String {
        let needle = format!("{field}=");
        self.wait_for_log(&needle, Duration::from_secs(5));
        let log = self.log();
        let line = log.lines().find(|l| l.contains(&needle)).unwrap();
        let start = line.find(&format!("{field}=")).expect("address in the log") + field.len() + 1;
        line[start..].split_whitespace().next().unwrap().to_owned()
    }

    /// The TCP addresses the agent process listens on (its sockets, matched in the
    /// `/proc/PID/net/tcp` of its network namespace).
    pub fn listening(&self) -> Vec<std::net::SocketAddr> {
        let pid = self.child.id();
        let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("reading the agent's descriptors")
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .filter_map(|target| {
                let target = target.to_string_lossy().into_owned();
                Some(
                    target
                        .strip_prefix("socket:[")?
                        .strip_suffix(']')?
                        .to_owned(),
                )
            })
            .collect();
        let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap();
        let mut found: Vec<std::net::SocketAddr> = table
            .lines()
            .skip(1)
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                // local_address, st (0A: listen), ..., inode
                if fields.get(3) != Some(&"0A")
                    || !inodes.iter().any(|i| Some(&i.as_str()) == fields.get(9))
                {
                    return None;
                }
                let (ip, port) = fields[1].split_once(':')?;
                // The address as the kernel holds it (network order), printed as a native u32.
                let ip = Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.to_ne_bytes());
                Some((ip, u16::from_str_radix(port, 16).ok()?).into())
            })
            .collect();
        found.sort();
        found
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .try_wait()
            .expect("waiting for the agent")
            .is_none()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.is_running() {
            self.terminate();
        }
    }
}

/// The test cluster. Fields drop in declaration order: agent first, then processes, then
/// namespaces and the cgroup, then directories.
pub struct Cluster {
    pub agent: Option<Agent>,
    servers: Vec<Child>,
    pub pods: Vec<Pod>,
    pub client: Pod,
    pub cgroup: Cgroup,
    pub node: Node,
    pub manifests: TempDir,
    pub bpffs: BpffsDir,
}

impl Cluster {
    /// A node with `backends` pods answering with their names on `POD_PORT` (TCP and UDP),
    /// and a client pod.
    pub fn new(backends: &[&str]) -> Cluster {
        lb_testkit::require_root().expect("the kernel tests need root");
        Cluster::on(Node::new().expect("creating the node namespace"), backends)
    }

    /// A cluster on `node` (see [`Cluster::new`], and `Cluster::dual_stack`).
    fn on(mut node: Node, backends: &[&str]) -> Cluster {
        let client = node.add_pod("cli").expect("creating the client pod");
        let cgroup = Cgroup::new("lbt").expect("creating the test cgroup");
        let mut cluster = Cluster {
            agent: None,
            servers: Vec::new(),
            pods: Vec::new(),
            client,
            cgroup,
            node,
            manifests: TempDir::new("lbt-manifests"),
            bpffs: BpffsDir::new(),
        };
        for name in backends {
            cluster.add_backend(name);
        }
        cluster
    }

    /// Adds a pod answering with `name`.
    pub fn add_backend(&mut self, name: &str) -> Ipv4Addr {
        let pod = self.node.add_pod(name).expect("creating a backend pod");
        let port = POD_PORT.to_string();
        let mut args = vec!["serve", "--name", name, "--tcp", &port, "--udp", &port];
        if self.node.is_dual_stack() {
            // One socket per family: each client is seen in its own family.
            args.extend(["--bind", "0.0.0.0", "--bind", "::"]);
        }
        let mut server =
            spawn_in(Some(&pod.netns), None, &*PROBE, &args).expect("starting a backend server");
        let stdout = server.stdout.take().expect("piped stdout");
        let mut first = String::new();
        BufReader::new(stdout)
            .read_line(&mut first)
            .expect("reading the server's ready line");
        assert_eq!(first.trim(), "ready", "backend {name} did not start");
        let ip = pod.ip;
        self.servers.push(server);
        self.pods.push(pod);
        ip
    }

    pub fn pod_ip(&self, name: &str) -> Ipv4Addr {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
            .ip
    }

    /// Starts the agent and waits until it is ready: `/healthz` answers 200 and its programs
    /// are linked.
    pub fn start_agent(&mut self) -> &mut Agent {
        self.start_agent_with(&[])
    }

    pub fn start_agent_with(&mut self, extra: &[&str]) -> &mut Agent {
        // Tests run side by side: any free loopback port (the agent logs which).
        self.start_agent_serving("127.0.0.1:0", "127.0.0.1:0", extra)
    }

    /// Starts the agent with these `--metrics-addr` and `--healthz-addr` (`off` or IP:PORT).
    pub fn start_agent_serving(
        &mut self,
        metrics: &str,
        healthz: &str,
        extra: &[&str],
    ) -> &mut Agent {
        let args = self.run_args(extra);
        // The agent runs in this network namespace, beside the other tests' agents: `:0`
        // stands for a free loopback port of its own.
        let address = |spec: &str| match spec {
            "off" => None,
            "127.0.0.1:0" => Some(SocketAddr::from((
                Ipv4Addr::LOCALHOST,
                lb_testkit::free_loopback_port(),
            ))),
            other => Some(other.parse().expect("an IP:PORT or off")),
        };
        let (metrics, healthz) = (address(metrics), address(healthz));
        let ready = healthz.map(|healthz| {
            AgentReady {
                agent: Path::new(AGENT),
                bpffs: self.bpffs.path(),
                healthz,
                netns: None,
                links: lb_testkit::agent_links_for(extra),
            }
            .before_start()
            .expect("reading the links pinned before the agent starts")
        });
        let mut command = std::process::Command::new(AGENT);
        command.args(&args);
        let mut agent = Agent::spawn(command, metrics, healthz);
        match &ready {
            Some(ready) => agent.wait_ready(ready, AGENT_START_TIMEOUT),
            // Without /healthz the log is all there is to wait on.
            None => agent.wait_for_log("socket programs attached", AGENT_START_TIMEOUT),
        }
        self.agent = Some(agent);
        self.agent.as_mut().unwrap()
    }

    /// Starts another `lb-agent run` on this cluster (same pin directory, cgroup and
    /// manifests) with `extra` flags, on free loopback ports, without waiting for anything.
    pub fn spawn_another_agent(&self, extra: &[&str]) -> Agent {
        let mut command = std::process::Command::new(AGENT);
        command.args(self.run_args(extra));
        let port = || SocketAddr::from((Ipv4Addr::LOCALHOST, lb_testkit::free_loopback_port()));
        Agent::spawn(command, Some(port()), Some(port()))
    }

    /// The arguments of `lb-agent run` for this cluster, then `extra`.
    pub fn run_args(&self, extra: &[&str]) -> Vec<String> {
        let mut args = vec!["run".to_owned()];
        // `--kubeconfig` in `extra` reads an API server instead of the manifest directory.
        if !extra.contains(&"--kubeconfig") {
            args.push("--manifests".into());
            args.push(self.manifests.path().display().to_string());
        }
        args.extend([
            "--cgroup".into(),
            self.cgroup.path().display().to_string(),
            "--bpffs".into(),
            self.bpffs.path().display().to_string(),
            "--node-name".into(),
            "node-a".into(),
        ]);
        // This agent runs in the test's own network namespace (the host's): its
        // ip_local_reserved_ports is not the test's to change.
        if !extra.iter().any(|a| a.starts_with("--reserve-ports")) {
            args.push("--reserve-ports=false".into());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Runs `lb-agent ARGS` to completion and returns how it ended: (success, stdout, stderr).
    pub fn agent_command_outcome(&self, args: &[&str]) -> (bool, String, String) {
        let output = std::process::Command::new(AGENT)
            .args(args)
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("running lb-agent");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// Runs `lb-agent ARGS` to completion (list, status, cleanup) and returns its stdout.
    pub fn agent_command(&self, args: &[&str]) -> String {
        let output = std::process::Command::new(AGENT)
            .args(args)
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("running lb-agent");
        assert!(
            output.status.success(),
            "lb-agent {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The program id behind each pinned link of the socket programs.
    pub fn attached_program_ids(&self) -> Vec<u32> {
        let links = self.bpffs.path().join("links");
        let mut ids = Vec::new();
        for dir in std::fs::read_dir(&links).expect("reading the links directory") {
            for pin in std::fs::read_dir(dir.unwrap().path()).unwrap() {
                ids.push(
                    lb_agent::dataplane::links::program_id_of(&pin.unwrap().path())
                        .expect("reading a pinned link"),
                );
            }
        }
        ids.sort();
        ids
    }

    pub fn agent(&mut self) -> &mut Agent {
        self.agent.as_mut().expect("agent started")
    }

    /// Writes a manifest file atomically (as editors and `kubectl get > file` via rename do).
    pub fn write_manifest(&self, file: &str, yaml: &str) {
        let tmp = self.manifests.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).expect("writing a manifest");
        std::fs::rename(&tmp, self.manifests.path().join(file)).expect("renaming a manifest");
    }

    pub fn remove_manifest(&self, file: &str) {
        std::fs::remove_file(self.manifests.path().join(file)).expect("removing a manifest");
    }

    /// Runs `lb-probe ARGS` in the client pod, inside the test cgroup.
    pub fn probe(&self, args: &[&str]) -> ProbeResult {
        let child = spawn_in(Some(&self.client.netns), Some(&self.cgroup), &*PROBE, args)
            .expect("starting lb-probe");
        let output = child.wait_with_output().expect("waiting for lb-probe");
        assert!(
            output.status.success(),
            "lb-probe {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "lb-probe printed no JSON ({e}): {}",
                String::from_utf8_lossy(&output.stdout)
            )
        })
    }

    /// Starts `lb-probe ARGS` in the background (steady traffic during changes).
    pub fn probe_in_background(&self, args: &[&str]) -> Child {
        spawn_in(Some(&self.client.netns), Some(&self.cgroup), &*PROBE, args)
            .expect("starting lb-probe")
    }

    /// Repeats single TCP probes until `done` holds for the answer, or fails after `timeout`.
    /// Returns how long it took.
    pub fn tcp_until(
        &self,
        target: &str,
        timeout: Duration,
        done: impl Fn(&ProbeResult) -> bool,
    ) -> Duration {
        let started = Instant::now();
        loop {
            let result = self.probe(&["tcp", target, "--count", "1", "--timeout-ms", "500"]);
            if done(&result) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < timeout,
                "condition not reached within {timeout:?}; last probe: {result:?}; agent log:\n{}",
                self.agent.as_ref().map(Agent::log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

pub fn finish_probe(child: Child) -> ProbeResult {
    let output = child.wait_with_output().expect("waiting for lb-probe");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "lb-probe printed no JSON ({e}): {} {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let path = std::env::temp_dir().join(unique_name(prefix));
        std::fs::create_dir_all(&path).expect("creating a temporary directory");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The agent's `--bpffs` directory (unmounted and removed on drop).
pub use lb_testkit::BpffsDir;

/// A plain HTTP/1.0 GET on loopback: (status code, body).
pub fn http_get(address: &str, path: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(address).expect("connecting to the agent");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}
