//! The benchmark's topology, made with lb-testkit and removed on drop (also on failure and
//! Ctrl-C, which `bench` turns into an orderly unwind):
//!
//! ```text
//!   node netns: br0 10.244.0.1 fd00:10:244::1 ── veths ── pods srv-0..srv-9 (lb-bench serve, CPU 1)
//!                                      └── clients cli-D, cli-E, cli-I, cli-N (lb-bench, CPU 0)
//!   cgroup lbb*: the agent's socket programs; only cli-E's client processes run in it
//!   cgroup lbbp*: its sibling without programs, for the other arms' clients
//! ```
//!
//! Every client namespace gets the same CRR hygiene (wide port range, `tcp_tw_reuse`) and the
//! same conntrack use: a filter `OUTPUT` rule matching `--ctstate INVALID` (kube-proxy's own
//! INVALID drop), so conntrack tracks every connection of every arm, NAT or not, and its
//! TIME_WAIT timeout is 10 s in each (the global table limit is not touched).
//!
//! The node is dual-stack (`Node::dual_stack`): every pod has an IPv6 address too, and the
//! servers answer on both families, for the IPv6 arms D6 and E6 (cli-D and cli-E's clients).

use std::collections::VecDeque;
use std::io::{BufRead as _, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use lb_testkit::{AgentReady, Cgroup, Netns, Node, Pod, command_in, unique_name};

use super::kube::POD_PORT;

/// How many real backend pods there are (the measured services' 10 endpoints).
pub const BACKENDS: usize = 10;
pub const CLIENT_CPU: usize = 0;
pub const SERVER_CPU: usize = 1;
/// The agent's `--healthz-addr`: it runs alone in the node's namespace, so kube-proxy's port.
const AGENT_HEALTHZ: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10256);

/// A child process killed (and reaped) on drop.
pub struct Proc(pub Child);

impl Proc {
    /// Waits (bounded: 10 minutes) for the process and returns its stdout; fails unless it
    /// exited 0.
    pub fn wait_output(mut self) -> Result<Vec<u8>> {
        let mut stdout = self.0.stdout.take().context("stdout not piped")?;
        let reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = std::io::Read::read_to_end(&mut stdout, &mut buf);
            buf
        });
        let deadline = Instant::now() + Duration::from_secs(600);
        let status = loop {
            if let Some(status) = self.0.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                bail!("a benchmark process did not finish");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let out = reader.join().unwrap_or_default();
        if !status.success() {
            bail!("a benchmark process failed ({status})");
        }
        Ok(out)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A directory removed on drop, with whatever is mounted in it unmounted first.
pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        unmount_all(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn unmount_all(dir: &Path) {
    for _ in 0..8 {
        let mounted = std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1).map(PathBuf::from))
            .filter(|m| m.starts_with(dir))
            .max_by_key(|m| m.as_os_str().len());
        let Some(m) = mounted else { return };
        let Ok(c) = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()) else {
            return;
        };
        // SAFETY: a NUL-terminated path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// The running agent: its log lines collected by a thread; SIGTERM then SIGKILL on drop.
pub struct Agent {
    pub child: Child,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn lines(&self) -> usize {
        self.log.lock().map_or(0, |l| l.len())
    }

    /// The first line after `from` containing `needle` (and `also`), waiting up to `timeout`.
    pub fn wait_line(
        &mut self,
        from: usize,
        needle: &str,
        also: &str,
        timeout: Duration,
    ) -> Result<(usize, String)> {
        let deadline = Instant::now() + timeout;
        // Each line is looked at once (a full sync logs a line per service).
        let mut scanned = from;
        loop {
            {
                let log = self.log.lock().map_err(|_| anyhow::anyhow!("log lock"))?;
                if let Some((i, l)) = log
                    .iter()
                    .enumerate()
                    .skip(scanned)
                    .find(|(_, l)| l.contains(needle) && l.contains(also))
                {
                    return Ok((i, l.clone()));
                }
                scanned = scanned.max(log.len());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("the agent exited ({status}); log:\n{}", self.tail(30));
            }
            if Instant::now() >= deadline {
                bail!(
                    "the agent did not log {needle:?} within {timeout:?}; log:\n{}",
                    self.tail(30)
                );
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    pub fn tail(&self, n: usize) -> String {
        let log = self.log.lock().map(|l| l.clone()).unwrap_or_default();
        log[log.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A field `key=value` of a tracing log line.
pub fn field(line: &str, key: &str) -> Option<u64> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    line[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Everything the benchmark runs in. Fields drop in declaration order: the agent first, then
/// processes, then namespaces and the cgroup, then directories.
pub struct Cluster {
    pub agent: Option<Agent>,
    servers: Vec<Proc>,
    pub pods: Vec<Pod>,
    /// Client pods by arm: D, E, I, N.
    pub clients: Vec<(char, Pod)>,
    pub cgroup: Cgroup,
    /// A sibling cgroup without programs for the other arms' clients, so that every client
    /// runs in a non-root cgroup with the same controllers and only E's has the programs.
    pub plain: Cgroup,
    pub node: Node,
    pub manifests: TempDir,
    pub bpffs: TempDir,
    pub work: TempDir,
    pub bench_bin: PathBuf,
    pub agent_bin: PathBuf,
}

impl Cluster {
    pub fn new(bench_bin: &Path, agent_bin: &Path) -> Result<Cluster> {
        let work = TempDir(Path::new("/run/lb-bench").join(unique_name("w")));
        std::fs::create_dir_all(work.0.join("manifests"))?;
        let manifests = TempDir(work.0.join("manifests"));
        let bpffs = TempDir(work.0.join("bpf"));
        let node = Node::dual_stack().context("creating the node namespace")?;
        let cgroup = Cgroup::new("lbb").context("creating the benchmark cgroup")?;
        let plain = Cgroup::new("lbbp").context("creating the plain client cgroup")?;
        let mut cluster = Cluster {
            agent: None,
            servers: Vec::new(),
            pods: Vec::new(),
            clients: Vec::new(),
            cgroup,
            plain,
            node,
            manifests,
            bpffs,
            work,
            bench_bin: bench_bin.to_path_buf(),
            agent_bin: agent_bin.to_path_buf(),
        };
        for i in 0..BACKENDS {
            let pod = cluster.node.add_pod(&format!("srv{i}"))?;
            pod.netns
                .run(&["sysctl", "-qw", "net.core.somaxconn=4096"])?;
            let mut cmd = command_in(Some(&pod.netns), None, "taskset")?;
            cmd.args(["-c", &SERVER_CPU.to_string()])
                .arg(bench_bin)
                .args([
                    "serve",
                    "--id",
                    &i.to_string(),
                    "--port",
                    &POD_PORT.to_string(),
                    "--bind",
                    "0.0.0.0",
                    "--bind",
                    "::",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            let mut child = Proc(cmd.spawn().context("starting lb-bench serve")?);
            let mut line = String::new();
            BufReader::new(child.0.stdout.take().context("stdout")?).read_line(&mut line)?;
            if line.trim() != "ready" {
                bail!("lb-bench serve {i} did not start");
            }
            cluster.servers.push(child);
            cluster.pods.push(pod);
        }
        for arm in ['D', 'E', 'I', 'N'] {
            let pod = cluster.node.add_pod(&format!("cli{arm}"))?;
            // (The IPv4 port range and TIME_WAIT reuse are IPv6's too.)
            for sysctl in [
                "net.ipv4.ip_local_port_range=1024 65535",
                "net.ipv4.tcp_tw_reuse=1",
            ] {
                pod.netns.run(&["sysctl", "-qw", sysctl])?;
            }
            // A route for the service CIDR (no default route): kube-proxy's NAT happens after
            // the routing decision, so its clients need one; every arm gets it alike.
            pod.netns.run(&[
                "ip",
                "route",
                "add",
                "10.96.0.0/12",
                "via",
                "10.244.0.1",
                "dev",
                "eth0",
            ])?;
            // The same conntrack use in every arm (see the module comment).
            pod.netns.run(&[
                super::ipt(),
                "-w",
                "-A",
                "OUTPUT",
                "-m",
                "conntrack",
                "--ctstate",
                "INVALID",
                "-j",
                "DROP",
            ])?;
            pod.netns.run(&[
                "sysctl",
                "-qw",
                "net.netfilter.nf_conntrack_tcp_timeout_time_wait=10",
            ])?;
            cluster.clients.push((arm, pod));
        }
        Ok(cluster)
    }

    pub fn backend_ips(&self) -> Vec<IpAddr> {
        self.pods.iter().map(|p| p.ip.into()).collect()
    }

    /// The backend pods' IPv6 addresses.
    pub fn backend_ips6(&self) -> Vec<IpAddr> {
        self.pods
            .iter()
            .filter_map(|p| p.ip6)
            .map(IpAddr::from)
            .collect()
    }

    pub fn client(&self, arm: char) -> &Pod {
        &self.clients.iter().find(|(a, _)| *a == arm).expect("arm").1
    }

    /// `lb-agent status -o json` on this cluster's pins (the maps and their entries).
    pub fn agent_status_json(&self) -> Result<serde_json::Value> {
        let mut cmd = command_in(Some(self.node.netns()), None, &self.agent_bin)?;
        cmd.args(["status", "-o", "json", "--healthz-addr"])
            .arg(AGENT_HEALTHZ.to_string())
            .arg("--bpffs")
            .arg(&self.bpffs.0)
            .env("RUST_BACKTRACE", "0");
        let out = cmd.output().context("running `lb-agent status -o json`")?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "`lb-agent status -o json` printed no JSON: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Starts the agent on the (empty or filled) manifest directory and waits until it is
    /// ready: `/healthz` answers 200 and every program is linked (the socket programs, and XDP
    /// and tc on each `--nodeport-iface` of `extra`).
    pub fn start_agent(&mut self, extra: &[String]) -> Result<()> {
        self.agent = None;
        let ifaces = extra.iter().filter(|a| *a == "--nodeport-iface").count();
        let ready = AgentReady {
            agent: &self.agent_bin,
            bpffs: &self.bpffs.0,
            healthz: AGENT_HEALTHZ.into(),
            netns: Some(self.node.netns()),
            links: lb_testkit::agent_links(ifaces),
        }
        .before_start()
        .context("running `lb-agent status` before starting the agent")?;
        let mut cmd = command_in(Some(self.node.netns()), None, &self.agent_bin)?;
        cmd.arg("run")
            .arg("--manifests")
            .arg(&self.manifests.0)
            .arg("--cgroup")
            .arg(self.cgroup.path())
            .arg("--bpffs")
            .arg(&self.bpffs.0)
            .args(["--node-name", "bench-node"])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .arg("--healthz-addr")
            .arg(AGENT_HEALTHZ.to_string())
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("starting lb-agent")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().context("stderr")?;
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut l) = sink.lock() {
                    l.push(line);
                }
            }
        });
        let mut agent = Agent { child, log };
        if let Err(error) = ready.wait(&mut agent.child, Duration::from_secs(600)) {
            bail!("{error:#}; log:\n{}", agent.tail(30));
        }
        self.agent = Some(agent);
        Ok(())
    }

    pub fn agent(&mut self) -> Result<&mut Agent> {
        self.agent.as_mut().context("the agent is not running")
    }

    /// Writes a manifest file atomically (write + rename), as `kubectl get > f` via mv does.
    pub fn write_manifest(&self, name: &str, text: &str) -> Result<()> {
        let tmp = self.work.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.manifests.0.join(name))?;
        Ok(())
    }

    /// A command for `lb-bench ARGS` in the arm's client pod, pinned to the client CPU; arm
    /// E's runs in the agent's cgroup.
    pub fn client_cmd(&self, arm: char, args: &[String]) -> Result<Command> {
        let pod = self.client(arm);
        let cgroup = if arm == 'E' {
            &self.cgroup
        } else {
            &self.plain
        };
        let mut cmd = command_in(Some(&pod.netns), Some(cgroup), "taskset")?;
        cmd.args(["-c", &CLIENT_CPU.to_string()])
            .arg(&self.bench_bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Ok(cmd)
    }

    /// Runs `lb-bench ARGS` as arm `arm` and parses its JSON.
    pub fn client_json(&self, arm: char, args: &[String]) -> Result<serde_json::Value> {
        let out = self
            .client_cmd(arm, args)?
            .output()
            .context("running lb-bench")?;
        if !out.status.success() {
            bail!(
                "lb-bench {args:?} (arm {arm}) failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "lb-bench printed no JSON: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Runs `program args` in `netns` with stdin from `input` and returns how long it took.
    pub fn timed_in(netns: &Netns, program: &str, args: &[&str], input: &Path) -> Result<Duration> {
        let mut cmd = command_in(Some(netns), None, program)?;
        cmd.args(args)
            .stdin(std::fs::File::open(input)?)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let t = Instant::now();
        let out = cmd.output().with_context(|| format!("running {program}"))?;
        let took = t.elapsed();
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let err: VecDeque<&str> = err.lines().take(5).collect();
            bail!("{program} {args:?} failed: {err:?}");
        }
        Ok(took)
    }
}
