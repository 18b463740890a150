//! The sandbox: its fixed names, its state file, building it with lb-testkit and tearing it
//! down again.
//!
//! Everything it makes outlives `cargo xtask run`, so the testkit objects are never dropped
//! (their drop would remove them): they sit in `ManuallyDrop`, every name goes into the state
//! file as soon as it exists, and [`down`] removes things by name. The names are fixed, so
//! `down` also finds what a run left behind without a state file (killed while building).

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::ErrorKind;
use std::mem::ManuallyDrop;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use k8s_openapi::api::core::v1::Service;
use lb_testkit::{AgentReady, Cgroup, Netns, Node, OutsideClient, Pod, ROUTER_SYSCTLS, Uplink};
use serde::{Deserialize, Serialize};

use super::slices::{self, PodInfo, ServiceInfo as _};
use crate::cmd;

pub const STATE_DIR: &str = "/run/lb-sandbox";
const STATE_FILE: &str = "state.json";
/// The cgroup (under the cgroup2 mount) whose processes get the agent's socket programs.
const CGROUP_NAME: &str = "lb-sandbox";
/// The node's network namespace, also its name in EndpointSlices and `--node-name`.
pub const NODE_NETNS: &str = "lbs-node";
pub const CLIENT_NETNS: &str = "lbs-client";
/// A client outside the cluster, on a LAN with the node only: it reaches NodePorts.
pub const OUTSIDE_NETNS: &str = "lbs-outside";
/// The node's end of the LAN veth pair; the agent serves NodePorts on it (`--nodeport-iface`).
pub const NODE_LAN_IFACE: &str = "ext0";
/// The outside client's end.
const OUTSIDE_IFACE: &str = "eth0";
/// The LAN: the node's address on it, the outside client's, and the prefix length.
pub const NODE_LAN_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 100);
const LAN_PREFIX_LEN: u8 = 24;
/// The LAN: a veth pair from the node's `ext0` to the outside client's `eth0`.
const UPLINK: Uplink<'static> = Uplink {
    node_iface: NODE_LAN_IFACE,
    node_ip: NODE_LAN_IP,
    client_iface: OUTSIDE_IFACE,
    client_ip: OUTSIDE_IP,
    prefix_len: LAN_PREFIX_LEN,
};
/// The pods behind the example Services, like the `hostnames` Deployment's three replicas.
pub const PODS: [&str; 3] = ["hostnames-1", "hostnames-2", "hostnames-3"];
/// Their labels and namespace, as the Deployment's pod template gives them.
const POD_LABELS: [(&str, &str); 1] = [("app", "hostnames")];
const POD_NAMESPACE: &str = "default";
/// The port serve_hostname answers on (TCP and UDP here).
pub const POD_PORT: u16 = 9376;

const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(5);
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// The agent's `--healthz-addr` port (kube-proxy's, on every address of the node's namespace,
/// as by default); `run` waits for `/healthz` on loopback there.
const AGENT_HEALTHZ_PORT: u16 = 10256;
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// The pod's network namespace: `lbs-<pod>`.
fn pod_netns(pod: &str) -> String {
    format!("lbs-{pod}")
}

/// The LAN in CIDR notation (192.168.77.0/24), which the pods route via the node.
fn lan_cidr() -> String {
    UPLINK.subnet()
}

/// What is up, as recorded in `/run/lb-sandbox/state.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct State {
    pub state_dir: PathBuf,
    pub manifests: PathBuf,
    pub bpffs: PathBuf,
    pub cgroup: Option<PathBuf>,
    pub node: Option<NodeState>,
    pub pods: Vec<PodState>,
    pub client: Option<PodState>,
    pub outside: Option<OutsideState>,
    pub agent: Option<Process>,
    /// The lb-agent binary (for `list` and `cleanup`).
    pub agent_binary: Option<PathBuf>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeState {
    /// The node's name (`--node-name`, endpoints' `nodeName`).
    pub name: String,
    pub netns: String,
    pub bridge: String,
    pub bridge_ip: Option<Ipv4Addr>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PodState {
    pub name: String,
    pub netns: String,
    pub ip: Option<Ipv4Addr>,
    /// The pod's `lb-probe serve`.
    pub server: Option<Process>,
}

/// The client outside the cluster and the LAN that joins it to the node.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct OutsideState {
    pub netns: String,
    pub ip: Option<Ipv4Addr>,
    /// The node's end of the veth pair (in the node's namespace) and its address.
    pub node_iface: String,
    pub node_ip: Option<Ipv4Addr>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Process {
    pub pid: i32,
    pub log: PathBuf,
}

impl State {
    fn fresh() -> State {
        let dir = PathBuf::from(STATE_DIR);
        State {
            manifests: dir.join("manifests"),
            bpffs: dir.join("bpf"),
            state_dir: dir,
            ..State::default()
        }
    }

    /// Writes the state file (atomically: a half-written file would lose names).
    fn save(&self) -> Result<()> {
        let path = self.state_dir.join(STATE_FILE);
        let tmp = self.state_dir.join(".state.json.tmp");
        fs::write(&tmp, serde_json::to_string_pretty(self)? + "\n")
            .with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }

    pub fn file() -> PathBuf {
        Path::new(STATE_DIR).join(STATE_FILE)
    }

    /// The recorded state; `Ok(None)` without a state file.
    fn load() -> Result<Option<State>> {
        let path = State::file();
        match fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .with_context(|| format!("{} does not parse", path.display())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn node_name(&self) -> &str {
        self.node.as_ref().map_or(NODE_NETNS, |n| n.name.as_str())
    }
}

/// A sandbox that is up: its state, and the testkit objects that `run` still uses to start
/// client processes. They are never dropped (that would remove them).
pub struct Sandbox {
    pub state: State,
    pub client: ManuallyDrop<Pod>,
    pub outside: ManuallyDrop<OutsideClient>,
    pub cgroup: ManuallyDrop<Cgroup>,
    pub services: Vec<Service>,
}

/// The binaries the sandbox runs.
pub struct Binaries {
    pub agent: PathBuf,
    pub probe: PathBuf,
}

/// Builds the sandbox and starts the agent. On failure, removes whatever it made.
pub fn up(bins: &Binaries, examples: &Path) -> Result<Sandbox> {
    let mut state = State::fresh();
    match build(bins, examples, &mut state) {
        Ok(sandbox) => Ok(sandbox),
        Err(error) => {
            eprintln!("run: building the sandbox failed (the error is at the end); removing it");
            if let Err(down_error) = teardown(Some(&state)) {
                eprintln!("run: removing it failed too: {down_error:#}");
            }
            Err(error)
        }
    }
}

fn build(bins: &Binaries, examples: &Path, state: &mut State) -> Result<Sandbox> {
    fs::create_dir_all(&state.state_dir)
        .with_context(|| format!("creating {}", state.state_dir.display()))?;
    state.agent_binary = Some(bins.agent.clone());
    state.save()?;

    let mut node = ManuallyDrop::new(
        Node::with_netns(Netns::named(NODE_NETNS)?).context("creating the node namespace")?,
    );
    state.node = Some(NodeState {
        name: NODE_NETNS.to_owned(),
        netns: NODE_NETNS.to_owned(),
        bridge: lb_testkit::BRIDGE.to_owned(),
        bridge_ip: Some(node.bridge_ip()),
    });
    state.save()?;
    lb_testkit::make_router(node.netns())?;
    println!(
        "run: node {NODE_NETNS}: network namespace {NODE_NETNS} with bridge {} {}/{}, \
         forwarding ({})",
        lb_testkit::BRIDGE,
        node.bridge_ip(),
        lb_testkit::POD_PREFIX_LEN,
        ROUTER_SYSCTLS.join(" ")
    );

    for name in PODS {
        let netns = pod_netns(name);
        let pod = ManuallyDrop::new(
            node.add_pod_in(name, Netns::named(&netns)?)
                .with_context(|| format!("creating pod {name}"))?,
        );
        state.pods.push(PodState {
            name: name.to_owned(),
            netns: netns.clone(),
            ip: Some(pod.ip),
            server: None,
        });
        state.save()?;
        // Replies to the outside client go back through the node (its tc program on ext0
        // gives them the NodePort's address again). No default route.
        pod.netns
            .run(&[
                "ip",
                "route",
                "add",
                &lan_cidr(),
                "via",
                &node.bridge_ip().to_string(),
            ])
            .with_context(|| format!("routing the LAN from pod {name}"))?;
        let port = POD_PORT.to_string();
        let log = state.state_dir.join(format!("{name}.log"));
        let mut serve = lb_testkit::command_in(Some(&pod.netns), None, &bins.probe)?;
        serve.args(["serve", "--name", name, "--tcp", &port, "--udp", &port]);
        let mut child = spawn_detached(serve, &log)?;
        if let Some(pod_state) = state.pods.last_mut() {
            pod_state.server = Some(Process {
                pid: child.id() as i32,
                log: log.clone(),
            });
        }
        state.save()?;
        wait_for_line(&mut child, &log, "ready", SERVER_READY_TIMEOUT)
            .with_context(|| format!("starting lb-probe serve in pod {name}"))?;
        println!(
            "run: pod {name}: {}, netns {netns}, lb-probe serve on :{port} TCP+UDP (pid {}, log {})",
            pod.ip,
            child.id(),
            log.display()
        );
    }

    let client = ManuallyDrop::new(
        node.add_pod_in("client", Netns::named(CLIENT_NETNS)?)
            .context("creating the client pod")?,
    );
    state.client = Some(PodState {
        name: "client".to_owned(),
        netns: CLIENT_NETNS.to_owned(),
        ip: Some(client.ip),
        server: None,
    });
    state.save()?;
    println!("run: pod client: {}, netns {CLIENT_NETNS}", client.ip);

    let outside_netns =
        Netns::named(OUTSIDE_NETNS).context("creating the outside client's namespace")?;
    state.outside = Some(OutsideState {
        netns: OUTSIDE_NETNS.to_owned(),
        ip: Some(OUTSIDE_IP),
        node_iface: NODE_LAN_IFACE.to_owned(),
        node_ip: Some(NODE_LAN_IP),
    });
    state.save()?;
    // No routes beyond the /24 each end gets with its address.
    let outside = ManuallyDrop::new(
        OutsideClient::direct(outside_netns, node.netns(), &UPLINK)
            .context("joining the outside client to the node")?,
    );
    println!(
        "run: outside client: netns {OUTSIDE_NETNS}, {OUTSIDE_IFACE} {OUTSIDE_IP}/{LAN_PREFIX_LEN}, \
         a veth pair to the node's {NODE_LAN_IFACE} {NODE_LAN_IP}/{LAN_PREFIX_LEN} (it reaches \
         the node's LAN address only; the pods route {} via {})",
        lan_cidr(),
        node.bridge_ip()
    );

    let cgroup = ManuallyDrop::new(Cgroup::named(CGROUP_NAME)?);
    state.cgroup = Some(cgroup.path().to_path_buf());
    state.save()?;
    println!(
        "run: cgroup {} for the client pod's processes (the agent attaches there, nowhere else)",
        cgroup.path().display()
    );

    let services = write_manifests(examples, state)?;

    let log = state.state_dir.join("agent.log");
    let mut agent = lb_testkit::command_in(Some(node.netns()), None, &bins.agent)?;
    agent
        .arg("run")
        .arg("--manifests")
        .arg(&state.manifests)
        .arg("--cgroup")
        .arg(cgroup.path())
        .arg("--bpffs")
        .arg(&state.bpffs)
        .args(["--node-name", state.node_name()])
        .arg("--healthz-addr")
        .arg(SocketAddr::from((Ipv4Addr::UNSPECIFIED, AGENT_HEALTHZ_PORT)).to_string())
        .args(["--nodeport-iface", NODE_LAN_IFACE]);
    println!(
        "run: starting the agent in the node's network namespace (so that it sees none of the \
         host's interfaces), log in {}:",
        log.display()
    );
    println!(
        "+ RUST_LOG=info nsenter --net=/run/netns/{NODE_NETNS} {}",
        cmd::display(&agent)
    );
    // A backtrace would push the error out of the log tail a failed start prints.
    agent.env("RUST_LOG", "info").env("RUST_BACKTRACE", "0");
    let ready = AgentReady {
        agent: &bins.agent,
        bpffs: &state.bpffs,
        healthz: SocketAddr::from((Ipv4Addr::LOCALHOST, AGENT_HEALTHZ_PORT)),
        netns: Some(node.netns()),
        links: lb_testkit::agent_links(1),
    }
    .before_start()
    .context("running `lb-agent status` before starting the agent")?;
    let mut child = spawn_detached(agent, &log)?;
    state.agent = Some(Process {
        pid: child.id() as i32,
        log: log.clone(),
    });
    state.save()?;
    let status = ready
        .wait(&mut child, AGENT_READY_TIMEOUT)
        .map_err(|error| {
            let text = fs::read_to_string(&log).unwrap_or_default();
            anyhow!("{error:#}; the end of its log:\n{}", tail(&text, 30))
        })
        .context("starting lb-agent")?;
    println!(
        "run: lb-agent is up (pid {}): /healthz answers 200, {} programs linked (the socket \
         programs on the sandbox cgroup, XDP and tc on {NODE_LAN_IFACE})",
        child.id(),
        status.links.len()
    );

    Ok(Sandbox {
        state: std::mem::take(state),
        client,
        outside,
        cgroup,
        services,
    })
}

/// Copies the example manifests and adds the EndpointSlices for the sandbox pods. Returns the
/// Services.
fn write_manifests(examples: &Path, state: &State) -> Result<Vec<Service>> {
    fs::create_dir_all(&state.manifests)
        .with_context(|| format!("creating {}", state.manifests.display()))?;
    let files = slices::manifest_files(examples)?;
    if files.is_empty() {
        bail!("no *.yaml files in {}", examples.display());
    }
    let mut services = Vec::new();
    for file in &files {
        let text =
            fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        services.extend(
            slices::services_in(&text).with_context(|| format!("parsing {}", file.display()))?,
        );
        let name = file.file_name().context("a file without a name")?;
        fs::copy(file, state.manifests.join(name))
            .with_context(|| format!("copying {}", file.display()))?;
    }
    println!(
        "run: manifests: copied {} file(s) from {} to {}",
        files.len(),
        examples.display(),
        state.manifests.display()
    );
    let pods: Vec<PodInfo> = state
        .pods
        .iter()
        .filter_map(|pod| {
            Some(PodInfo {
                name: pod.name.clone(),
                namespace: POD_NAMESPACE.to_owned(),
                labels: POD_LABELS
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                ip: pod.ip?,
                ports: vec![POD_PORT],
            })
        })
        .collect();
    for service in &services {
        let Some((slice, notes)) = slices::endpoint_slice(service, &pods, state.node_name()) else {
            println!(
                "run: manifests: Service {} has no selector (or is ExternalName): no slice",
                service.name()
            );
            continue;
        };
        for note in notes {
            println!("run: manifests: note: {note}");
        }
        let file = state
            .manifests
            .join(format!("endpointslice-{}.yaml", service.name()));
        fs::write(&file, slices::slice_file(&slice))
            .with_context(|| format!("writing {}", file.display()))?;
        println!(
            "run: manifests: wrote {} (EndpointSlice {} for Service {})",
            file.display(),
            slice.name(),
            service.name()
        );
    }
    Ok(services)
}

/// Spawns `cmd` in a session of its own (so it outlives us and no terminal signal reaches
/// it) with stdin from /dev/null and stdout and stderr to `log`.
fn spawn_detached(mut cmd: Command, log: &Path) -> Result<Child> {
    let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: setsid is async-signal-safe; nothing here allocates.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("cannot start {}", cmd::display(&cmd)))
}

/// Waits until `log` has a line containing `needle`; fails with the log's tail when `child`
/// exits first or `timeout` passes.
fn wait_for_line(child: &mut Child, log: &Path, needle: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = fs::read_to_string(log).unwrap_or_default();
        if text.lines().any(|l| l.contains(needle)) {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            // What it wrote just before exiting.
            let text = fs::read_to_string(log).unwrap_or_default();
            bail!(
                "it exited ({status}) before logging {needle:?}; the end of its log:\n{}",
                tail(&text, 30)
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "it did not log {needle:?} within {timeout:?}; the end of its log:\n{}",
                tail(&text, 30)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| format!("  | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

// ------------------------------------------------------------------------------ teardown

/// The sandbox's cgroup: recorded, else `lb-sandbox` under the cgroup2 mount.
fn cgroup_path(state: Option<&State>) -> Option<PathBuf> {
    state
        .and_then(|s| s.cgroup.clone())
        .or_else(|| Some(lb_testkit::cgroup2_mount().ok()?.join(CGROUP_NAME)))
}

/// Every sandbox namespace: the recorded ones and the fixed names, pods and the outside
/// client first, node last.
fn netns_names(state: Option<&State>) -> Vec<String> {
    let mut names: Vec<String> = PODS.iter().map(|p| pod_netns(p)).collect();
    names.push(CLIENT_NETNS.to_owned());
    names.push(OUTSIDE_NETNS.to_owned());
    if let Some(state) = state {
        names.extend(state.pods.iter().map(|p| p.netns.clone()));
        names.extend(state.client.iter().map(|p| p.netns.clone()));
        names.extend(state.outside.iter().map(|o| o.netns.clone()));
    }
    let mut seen = BTreeSet::new();
    names.retain(|n| !n.is_empty() && seen.insert(n.clone()));
    let node = state
        .and_then(|s| s.node.as_ref())
        .map_or(NODE_NETNS, |n| n.netns.as_str());
    for name in [node, NODE_NETNS] {
        if seen.insert(name.to_owned()) {
            names.push(name.to_owned());
        }
    }
    names
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// Whether anything of a sandbox is there.
pub fn exists() -> bool {
    Path::new(STATE_DIR).exists()
        || netns_names(None).iter().any(|n| netns_exists(n))
        || cgroup_path(None).is_some_and(|p| p.exists())
}

/// `cargo xtask run --down`: removes the sandbox recorded in the state file (and anything
/// with the sandbox's fixed names). Idempotent.
pub fn down() -> Result<()> {
    let state = match State::load() {
        Ok(state) => state,
        Err(e) => {
            println!("down: {e:#}; removing what carries the sandbox's fixed names");
            None
        }
    };
    if state.is_none() && !exists() {
        println!("down: no sandbox is up (no {})", State::file().display());
        return Ok(());
    }
    teardown(state.as_ref())
}

/// Stops the agent, removes its pins and bpffs, kills what is left in the sandbox cgroup and
/// namespaces, removes them and the state directory. Tolerates anything being missing, and
/// keeps going after errors (reporting them all at the end).
fn teardown(state: Option<&State>) -> Result<()> {
    let mut errors: Vec<String> = Vec::new();
    let me = std::process::id() as i32;
    let default_state = State::fresh();
    let paths = state.unwrap_or(&default_state);

    // 1. The agent: SIGTERM, so it stops watching and leaves its pinned state consistent.
    let mut agents: BTreeSet<i32> = BTreeSet::new();
    if let Some(agent) = state.and_then(|s| s.agent.as_ref())
        && is_agent(agent.pid, &paths.bpffs)
    {
        agents.insert(agent.pid);
    }
    for netns in netns_names(state).iter().filter(|n| netns_exists(n)) {
        agents.extend(
            netns_pids(netns)
                .into_iter()
                .filter(|&p| is_agent(p, &paths.bpffs)),
        );
    }
    for &pid in &agents {
        println!("down: stopping lb-agent (pid {pid}) with SIGTERM");
        signal(pid, libc::SIGTERM);
    }
    for pid in wait_gone(&agents, AGENT_STOP_TIMEOUT) {
        println!("down: lb-agent (pid {pid}) still runs after {AGENT_STOP_TIMEOUT:?}: SIGKILL");
        signal(pid, libc::SIGKILL);
        wait_gone(&[pid].into(), DRAIN_TIMEOUT);
    }

    // 2. Its programs and pins: `lb-agent cleanup` detaches, unpins and unmounts its bpffs.
    if is_mount_point(&paths.bpffs) {
        let binary = paths
            .agent_binary
            .clone()
            .filter(|b| b.is_file())
            .or_else(|| Some(super::target_dir().join("debug/lb-agent")).filter(|b| b.is_file()));
        match binary {
            Some(binary) => {
                let mut cleanup = Command::new(binary);
                cleanup.arg("cleanup").arg("--bpffs").arg(&paths.bpffs);
                if let Err(e) = cmd::run(&mut cleanup) {
                    errors.push(format!("{e:#}"));
                }
            }
            None => println!("down: no lb-agent binary to run `lb-agent cleanup` with"),
        }
        if is_mount_point(&paths.bpffs) {
            println!(
                "down: unmounting {} (its pins go with it)",
                paths.bpffs.display()
            );
            if let Err(e) = unmount(&paths.bpffs) {
                errors.push(e);
            }
        }
    }

    // 3. Whatever runs in the sandbox cgroup: probes, and shells opened in the client pod.
    if let Some(cgroup) = cgroup_path(state).filter(|p| p.is_dir())
        && let Err(e) = empty_cgroup(&cgroup, me)
    {
        errors.push(format!("{e:#}"));
    }

    // 4. The namespaces, with whatever still runs in them (the pods' servers).
    for netns in netns_names(state).iter().filter(|n| netns_exists(n)) {
        let pids: Vec<i32> = netns_pids(netns).into_iter().filter(|&p| p != me).collect();
        if pids.is_empty() {
            println!("down: removing netns {netns}");
        } else {
            println!(
                "down: removing netns {netns}, killing what runs in it: {}",
                describe(&pids)
            );
        }
        for &pid in &pids {
            signal(pid, libc::SIGKILL);
        }
        wait_gone(&pids.iter().copied().collect(), DRAIN_TIMEOUT);
        if let Err(e) = cmd::output(Command::new("ip").args(["netns", "del", netns])) {
            errors.push(format!("{e:#}"));
        }
    }
    // Servers whose namespace was already gone (a half-removed sandbox).
    for pod in state.iter().flat_map(|s| &s.pods) {
        if let Some(server) = &pod.server
            && is_server(server.pid, &pod.name)
        {
            println!(
                "down: killing lb-probe serve of pod {} (pid {})",
                pod.name, server.pid
            );
            signal(server.pid, libc::SIGKILL);
        }
    }

    // 5. The cgroup directory.
    if let Some(cgroup) = cgroup_path(state).filter(|p| p.is_dir()) {
        println!("down: removing cgroup {}", cgroup.display());
        if let Err(e) = remove_cgroup(&cgroup) {
            errors.push(format!("removing {}: {e}", cgroup.display()));
        }
    }

    // 6. The state directory (manifests, logs, state file), never with something mounted in it.
    let dir = &paths.state_dir;
    if dir.exists() {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            println!("down: removing {}", dir.display());
            if let Err(e) = fs::remove_dir_all(dir) {
                errors.push(format!("removing {}: {e}", dir.display()));
            }
        } else {
            errors.push(format!(
                "not removing {}: still mounted there: {}",
                dir.display(),
                mounts.join(", ")
            ));
        }
    }

    if !errors.is_empty() {
        bail!(
            "the sandbox was not removed completely:\n  {}",
            errors.join("\n  ")
        );
    }
    println!("down: the sandbox is gone");
    Ok(())
}

/// Kills every process in the cgroup (never this one) and waits until it is empty.
fn empty_cgroup(cgroup: &Path, me: i32) -> Result<()> {
    let procs = read_procs(cgroup);
    if procs.contains(&me) {
        bail!(
            "this process is in {}: run `cargo xtask run --down` from outside the sandbox",
            cgroup.display()
        );
    }
    if procs.is_empty() {
        return Ok(());
    }
    println!(
        "down: killing what runs in cgroup {} (shells opened in the client pod live there): {}",
        cgroup.display(),
        describe(&procs)
    );
    let kill = cgroup.join("cgroup.kill");
    if kill.exists() {
        fs::write(&kill, "1").with_context(|| format!("writing {}", kill.display()))?;
    } else {
        for &pid in &procs {
            signal(pid, libc::SIGKILL);
        }
    }
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        let left = read_procs(cgroup);
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "still in {} after {DRAIN_TIMEOUT:?}: {}",
                cgroup.display(),
                describe(&left)
            );
        }
        // Processes that are our own children (a failed run) must be reaped.
        for &pid in &left {
            reap(pid);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read_procs(cgroup: &Path) -> Vec<i32> {
    fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Removes the cgroup and any child cgroups, deepest first.
fn remove_cgroup(dir: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_cgroup(&entry.path())?;
        }
    }
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        match fs::remove_dir(dir) {
            Err(e) if e.kind() == ErrorKind::ResourceBusy && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            other => return other,
        }
    }
}

fn netns_pids(netns: &str) -> Vec<i32> {
    cmd::output(Command::new("ip").args(["netns", "pids", netns]))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The process's arguments, when it (still) exists.
fn cmdline(pid: i32) -> Option<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

fn program_is(args: &[String], name: &str) -> bool {
    args.first()
        .is_some_and(|a| Path::new(a).file_name().is_some_and(|f| f == name))
}

/// Whether `pid` is an `lb-agent run` pinning under `bpffs` (not a reused pid).
fn is_agent(pid: i32, bpffs: &Path) -> bool {
    let bpffs = bpffs.to_string_lossy();
    cmdline(pid).is_some_and(|args| {
        program_is(&args, "lb-agent") && args.windows(2).any(|w| w[0] == "--bpffs" && w[1] == bpffs)
    })
}

/// Whether `pid` is the `lb-probe serve --name <pod>` the sandbox started.
fn is_server(pid: i32, pod: &str) -> bool {
    alive(pid)
        && cmdline(pid).is_some_and(|args| {
            program_is(&args, "lb-probe")
                && args.windows(2).any(|w| w[0] == "--name" && w[1] == pod)
        })
}

/// `pid (name)` for each, for messages.
fn describe(pids: &[i32]) -> String {
    pids.iter()
        .map(|&pid| {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            match comm.trim() {
                "" => pid.to_string(),
                comm => format!("{pid} ({comm})"),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn signal(pid: i32, signal: i32) {
    if pid > 0 && pid != std::process::id() as i32 {
        // SAFETY: plain syscall; a stale pid only yields ESRCH.
        unsafe { libc::kill(pid, signal) };
    }
}

/// Reaps `pid` if it is an exited child of ours (a failed `run` tearing down what it started).
fn reap(pid: i32) {
    let mut status = 0;
    // SAFETY: plain syscall; for a pid that is not our child it fails with ECHILD.
    unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
}

/// Whether the process exists and has not exited (a zombie has).
fn alive(pid: i32) -> bool {
    reap(pid);
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // `pid (comm) S ...`: the state follows the last `)`.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

/// Waits (bounded) until every pid is gone; returns those still alive.
fn wait_gone(pids: &BTreeSet<i32>, timeout: Duration) -> Vec<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let alive: Vec<i32> = pids.iter().copied().filter(|&p| alive(p)).collect();
        if alive.is_empty() || Instant::now() >= deadline {
            return alive;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Mount points from /proc/self/mountinfo.
fn mount_points() -> Vec<PathBuf> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
        .collect()
}

fn is_mount_point(path: &Path) -> bool {
    mount_points().iter().any(|m| m == path)
}

/// Mounts at or below `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    mount_points()
        .into_iter()
        .filter(|m| m.starts_with(dir))
        .map(|m| m.display().to_string())
        .collect()
}

fn unmount(path: &Path) -> std::result::Result<(), String> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    while is_mount_point(path) {
        // SAFETY: a NUL-terminated path.
        if unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(format!(
                "unmounting {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_and_node_goes_last() {
        let names = netns_names(None);
        assert_eq!(names.last().map(String::as_str), Some(NODE_NETNS));
        assert_eq!(names.len(), PODS.len() + 3);
        assert!(names.iter().any(|n| n == OUTSIDE_NETNS));
        let fixed = [CGROUP_NAME, NODE_LAN_IFACE, OUTSIDE_IFACE].map(str::to_owned);
        for name in names.iter().chain(&fixed) {
            assert!(name.len() <= lb_testkit::MAX_NAME_LEN, "{name} is too long");
        }
    }

    #[test]
    fn state_round_trips_and_tolerates_missing_fields() {
        let state: State = serde_json::from_str(r#"{"pods":[{"name":"hostnames-1"}]}"#).unwrap();
        assert_eq!(state.pods[0].name, "hostnames-1");
        assert!(state.agent.is_none());
        let text = serde_json::to_string(&State::fresh()).unwrap();
        let back: State = serde_json::from_str(&text).unwrap();
        assert_eq!(back.bpffs, Path::new("/run/lb-sandbox/bpf"));
    }

    #[test]
    fn the_lan_is_a_slash_24_holding_both_ends() {
        assert_eq!(lan_cidr(), "192.168.77.0/24");
        assert_eq!(
            lb_testkit::subnet(OUTSIDE_IP, LAN_PREFIX_LEN),
            lb_testkit::subnet(NODE_LAN_IP, LAN_PREFIX_LEN)
        );
    }

    #[test]
    fn tails_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "  | b\n  | c");
        assert_eq!(tail("", 2), "");
    }
}
