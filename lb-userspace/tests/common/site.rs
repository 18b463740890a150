//! The north-south test site: an outside client, nodes with their own `lb-agent`
//! (`--nodeport-iface lan0`: XDP ingress, tc egress) and pods answering with their names (and,
//! with `--whoami`, the client address they saw), on a LAN.
//!
//! ```text
//!   client ns  lan0 192.168.60.100 ─┐
//!                                    ├─ lan ns: bridge ── node-a ns  lan0 192.168.60.1
//!                                    │                      br0 10.244.0.1 ── pod-a 10.244.0.10
//!                                    └─────────────────── node-b ns  lan0 192.168.60.2
//!                                                           br0 10.244.1.1 ── pod-r 10.244.1.10
//! ```
//! node-a routes 10.244.1.0/24 via node-b and back; pods route the LAN via their node. There are
//! no default routes: every route stays inside the test's namespaces. The externalIP
//! 198.51.100.10 is on no interface; the client routes it via node-a.
//!
//! [`Site::dual_stack`] gives every one of them an IPv6 address too (no duplicate address
//! detection): the LAN fd00:172::/64 (client ::100, node-a ::1, node-b ::2), node-a's pods
//! fd00:10:244::/64, node-b's fd00:10:244:1::/64, routed the same way, the pods serving both
//! families; the client routes the IPv6 externalIP fd00:198:51:100::10 via node-a.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    path::Path,
    process::Child,
    time::{Duration, Instant},
};

use lb_testkit::{
    AgentReady, Cgroup, Lan, Netns, Node, OutsideClient, Pod, command_in, make_dual_stack_router,
    make_router, spawn_in,
};

use super::{AGENT, Agent, BpffsDir, POD_PORT, PROBE, ProbeResult, TempDir};

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 100);
pub const NODE_A_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 1);
pub const NODE_B_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 2);
pub const LAN_PREFIX_LEN: u8 = 24;
pub const REMOTE_POD_IP: &str = "10.244.1.10";
pub const EXTERNAL_IP: &str = "198.51.100.10";
/// A dual-stack site's IPv6 addresses on the LAN.
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x172, 0, 0, 0, 0, 0, 0x100);
pub const NODE_A_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x172, 0, 0, 0, 0, 0, 1);
pub const NODE_B_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x172, 0, 0, 0, 0, 0, 2);
pub const LAN_PREFIX_LEN6: u8 = 64;
/// On no interface; a dual-stack site's client routes it via node-a.
pub const EXTERNAL_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x198, 0x51, 0x100, 0, 0, 0, 0x10);
pub const LAN_IFACE: &str = "lan0";
pub const AGENT_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Each agent runs alone in its node's network namespace: kube-proxy's ports on loopback.
pub const METRICS_ADDR: &str = "127.0.0.1:10249";
pub const HEALTHZ_ADDR: &str = "127.0.0.1:10256";

/// The whole topology; fields drop in order: agents, servers, namespaces, then directories.
pub struct Site {
    pub agents: Vec<Agent>,
    pub servers: Vec<Child>,
    /// node-b's pods (`pod-r`).
    pub remote_pods: Vec<Pod>,
    /// node-a's pods.
    pub pods: Vec<Pod>,
    pub client: OutsideClient,
    pub node_b: Option<Node>,
    pub node_a: Node,
    pub lan: Lan,
    pub cgroups: Vec<Cgroup>,
    pub manifests: TempDir,
    pub bpffs: Vec<BpffsDir>,
    /// Agents leave their pins and links on SIGTERM (a DaemonSet rollout), instead of
    /// `--cleanup-on-exit`.
    pub keep_pins_on_exit: bool,
    pub dual_stack: bool,
}

impl Site {
    /// The client, node-a with the local pods `local` (answering with their names), and when
    /// `remote` is set node-b with one pod, `pod-r`; IPv4 only.
    pub fn new(local: &[&str], remote: bool) -> Site {
        Site::build(local, remote, false)
    }

    /// Like [`Site::new`] with node-b, every namespace dual-stack.
    pub fn dual_stack(local: &[&str]) -> Site {
        Site::build(local, true, true)
    }

    fn build(local: &[&str], remote: bool, dual_stack: bool) -> Site {
        lb_testkit::require_root().expect("the kernel tests need root");
        let lan = Lan::new().expect("the LAN");
        let client_netns = Netns::new("cli").expect("client namespace");
        let v4 = |ip| (ip, LAN_PREFIX_LEN);
        let v6 = |ip| (ip, LAN_PREFIX_LEN6);
        let client = if dual_stack {
            OutsideClient::on_lan_dual_stack(
                client_netns,
                &lan,
                LAN_IFACE,
                v4(CLIENT_IP),
                v6(CLIENT_IP6),
            )
        } else {
            OutsideClient::on_lan(client_netns, &lan, LAN_IFACE, CLIENT_IP, LAN_PREFIX_LEN)
        }
        .expect("the outside client on the LAN");
        client
            .route(&format!("{EXTERNAL_IP}/32"), NODE_A_IP)
            .expect("the client's route to the externalIP");
        let node_a = if dual_stack {
            Node::dual_stack()
        } else {
            Node::new()
        }
        .expect("node-a");
        let node_b = remote.then(|| {
            let netns = Netns::new("nodeb").expect("node-b");
            if dual_stack {
                Node::dual_stack_in_subnet(netns, 1)
            } else {
                Node::in_subnet(netns, 1)
            }
            .expect("node-b")
        });
        let mut on_lan = vec![(&node_a, NODE_A_IP, NODE_A_IP6)];
        on_lan.extend(node_b.iter().map(|b| (b, NODE_B_IP, NODE_B_IP6)));
        for (node, ip, ip6) in on_lan {
            if dual_stack {
                lan.plug_dual_stack(node.netns(), LAN_IFACE, v4(ip), v6(ip6))
                    .and_then(|()| make_dual_stack_router(node.netns()))
            } else {
                lan.plug(node.netns(), LAN_IFACE, ip, LAN_PREFIX_LEN)
                    .and_then(|()| make_router(node.netns()))
            }
            .expect("a node on the LAN, routing");
        }
        if dual_stack {
            client
                .route(&format!("{EXTERNAL_IP6}/128"), NODE_A_IP6)
                .expect("the client's route to the IPv6 externalIP");
        }
        // Each node reaches the other's pods via the other.
        if let Some(node_b) = &node_b {
            for (from, to, via, via6) in [
                (&node_a, node_b, NODE_B_IP, NODE_B_IP6),
                (node_b, &node_a, NODE_A_IP, NODE_A_IP6),
            ] {
                let mut routes = vec![(to.pod_subnet(), via.to_string())];
                if let Some(subnet6) = to.pod_subnet6() {
                    routes.push((subnet6, via6.to_string()));
                }
                for (subnet, via) in routes {
                    run(from.netns(), &["ip", "route", "add", &subnet, "via", &via]);
                }
            }
        }
        let mut site = Site {
            agents: Vec::new(),
            servers: Vec::new(),
            remote_pods: Vec::new(),
            pods: Vec::new(),
            client,
            node_b,
            node_a,
            lan,
            cgroups: Vec::new(),
            manifests: TempDir::new("lbnp-manifests"),
            bpffs: Vec::new(),
            keep_pins_on_exit: false,
            dual_stack,
        };
        for name in local {
            let pod = site.node_a.add_pod(name).expect("a pod on node-a");
            site.servers.push(plug_pod(&pod, &site.node_a, dual_stack));
            site.pods.push(pod);
        }
        if let Some(node_b) = &mut site.node_b {
            let pod = node_b.add_pod("pod-r").expect("pod-r on node-b");
            assert_eq!(pod.ip.to_string(), REMOTE_POD_IP);
            site.servers.push(plug_pod(&pod, node_b, dual_stack));
            site.remote_pods.push(pod);
        }
        site
    }

    /// Starts an agent in node-a (and node-b when there is one), each serving NodePorts on
    /// its `lan0` (and the interfaces `extra` adds), and waits until they are ready: `/healthz`
    /// answers 200 and every program is linked.
    pub fn start_agents(&mut self) {
        self.start_agents_with(&[]);
    }

    pub fn start_agents_with(&mut self, extra: &[&str]) {
        let mut nodes = vec![(self.node_a.netns(), "node-a")];
        if let Some(node_b) = &self.node_b {
            nodes.push((node_b.netns(), "node-b"));
        }
        // A second start (a restart) reuses each node's cgroup and pins.
        if self.bpffs.is_empty() {
            for _ in &nodes {
                self.cgroups.push(Cgroup::new("lbnp").expect("test cgroup"));
                self.bpffs.push(BpffsDir::new());
            }
        }
        let mut args = vec!["--nodeport-iface", LAN_IFACE];
        args.extend(extra);
        let (metrics, healthz) = (METRICS_ADDR.parse().unwrap(), HEALTHZ_ADDR.parse().unwrap());
        let mut started = Vec::new();
        for (index, (netns, node_name)) in nodes.into_iter().enumerate() {
            let (cgroup, bpffs) = (&self.cgroups[index], &self.bpffs[index]);
            let ready = AgentReady {
                agent: Path::new(AGENT),
                bpffs: bpffs.path(),
                healthz,
                netns: Some(netns),
                links: lb_testkit::agent_links_for(&args),
            }
            .before_start()
            .expect("reading the links pinned before the agent starts");
            let mut cmd = command_in(Some(netns), None, AGENT).expect("agent command");
            cmd.args([
                "run",
                "--manifests",
                &self.manifests.path().display().to_string(),
                "--cgroup",
                &cgroup.path().display().to_string(),
                "--bpffs",
                &bpffs.path().display().to_string(),
                "--node-name",
                node_name,
                "--nodeport-iface",
                LAN_IFACE,
            ]);
            if !self.keep_pins_on_exit {
                cmd.arg("--cleanup-on-exit");
            }
            cmd.args(extra);
            started.push((Agent::spawn(cmd, Some(metrics), Some(healthz)), ready));
        }
        for (agent, ready) in &mut started {
            agent.wait_ready(ready, AGENT_START_TIMEOUT);
        }
        self.agents = started.into_iter().map(|(agent, _)| agent).collect();
    }

    /// The agents' logs and each namespace's nonzero kernel counters (checksum errors,
    /// drops), for failure messages.
    pub fn logs(&self) -> String {
        let mut text: Vec<String> = self
            .agents
            .iter()
            .enumerate()
            .map(|(i, a)| format!("--- agent {i}:\n{}", a.log()))
            .collect();
        let mut namespaces = vec![
            ("client", self.client.netns()),
            ("node-a", self.node_a.netns()),
        ];
        namespaces.extend(self.node_b.iter().map(|n| ("node-b", n.netns())));
        namespaces.extend(self.pods.iter().map(|p| (p.name.as_str(), &p.netns)));
        namespaces.extend(self.remote_pods.iter().map(|p| (p.name.as_str(), &p.netns)));
        for (name, netns) in namespaces {
            let counters = netns.run(&["nstat", "-a", "-s"]).unwrap_or_default();
            let interesting: Vec<&str> = counters
                .lines()
                .filter(|l| {
                    [
                        "Csum", "Err", "Drop", "Discard", "Fail", "Rst", "InSegs", "OutSegs",
                        "Forw",
                    ]
                    .iter()
                    .any(|k| l.contains(k))
                })
                .collect();
            text.push(format!(
                "--- counters of {name}:\n{}",
                interesting.join("\n")
            ));
        }
        text.join("\n")
    }

    pub fn write_manifest(&self, file: &str, yaml: &str) {
        let tmp = self.manifests.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).expect("writing a manifest");
        std::fs::rename(&tmp, self.manifests.path().join(file)).expect("renaming a manifest");
    }

    pub fn remove_manifest(&self, file: &str) {
        std::fs::remove_file(self.manifests.path().join(file)).expect("removing a manifest");
    }

    /// Pod `name`, of either node.
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .chain(&self.remote_pods)
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Pod `name`'s IPv4 address.
    pub fn pod_ip(&self, name: &str) -> String {
        self.pod(name).ip.to_string()
    }

    /// `lb-probe ARGS` from the outside client.
    pub fn probe(&self, args: &[&str]) -> ProbeResult {
        probe_in(self.client.netns(), None, args)
    }

    /// `lb-probe ARGS` from inside node-a, in its agent's cgroup (where the socket programs
    /// apply): from pod `pod`'s network namespace, or from the node's own with `None`.
    pub fn probe_in_node(&self, pod: Option<&str>, args: &[&str]) -> ProbeResult {
        let netns = match pod {
            Some(name) => {
                &self
                    .pods
                    .iter()
                    .find(|p| p.name == name)
                    .expect("pod")
                    .netns
            }
            None => self.node_a.netns(),
        };
        probe_in(netns, Some(&self.cgroups[0]), args)
    }

    /// Repeats `probe(args)` until `done` holds, or fails after `timeout` with the agents' logs.
    pub fn probe_until(
        &self,
        args: &[&str],
        timeout: Duration,
        done: impl Fn(&ProbeResult) -> bool,
    ) -> ProbeResult {
        let started = Instant::now();
        loop {
            let result = self.probe(args);
            if done(&result) {
                return result;
            }
            assert!(
                started.elapsed() < timeout,
                "not reached within {timeout:?}: {args:?} -> {result:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// An HTTP GET from the client: (status, body), or the connection error.
    pub fn http_get(&self, target: &str) -> Result<(u16, String), String> {
        let target: SocketAddr = target.parse().unwrap();
        let client = self.client.netns().path().to_owned();
        std::thread::spawn(move || {
            let file = std::fs::File::open(&client).map_err(|e| e.to_string())?;
            // SAFETY: a valid namespace fd; this thread only.
            if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) }
                != 0
            {
                return Err("setns".to_string());
            }
            let mut conn = TcpStream::connect_timeout(&target, Duration::from_secs(1))
                .map_err(|e| e.to_string())?;
            conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            conn.write_all(b"GET /healthz HTTP/1.0\r\n\r\n")
                .map_err(|e| e.to_string())?;
            let mut response = String::new();
            conn.read_to_string(&mut response)
                .map_err(|e| e.to_string())?;
            let status = response
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let body = response
                .split("\r\n\r\n")
                .nth(1)
                .unwrap_or_default()
                .to_string();
            Ok((status, body))
        })
        .join()
        .expect("http thread")
    }
}

/// `lb-probe ARGS` in `netns` (and `cgroup`), its JSON result.
pub fn probe_in(netns: &Netns, cgroup: Option<&Cgroup>, args: &[&str]) -> ProbeResult {
    let child = spawn_in(Some(netns), cgroup, &*PROBE, args).expect("starting lb-probe");
    let output = child.wait_with_output().expect("waiting for lb-probe");
    assert!(
        output.status.success(),
        "lb-probe {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("lb-probe JSON")
}

pub fn run(netns: &Netns, args: &[&str]) {
    netns
        .run(args)
        .unwrap_or_else(|e| panic!("{args:?}: {e:#}"));
}

/// `lb-probe serve` on POD_PORT in `netns`, answering with `name`: on both families when
/// `dual_stack` (an IPv6-only socket beside the IPv4 one), else on 0.0.0.0.
pub fn serve(netns: &Netns, name: &str, dual_stack: bool) -> Child {
    let port = POD_PORT.to_string();
    let mut args = vec!["serve", "--name", name, "--tcp", &port, "--udp", &port];
    if dual_stack {
        args.extend(["--bind", "0.0.0.0", "--bind", "::"]);
    }
    let mut server =
        spawn_in(Some(netns), None, &*PROBE, &args).expect("starting a backend server");
    let mut first = String::new();
    BufReader::new(server.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("server ready line");
    assert_eq!(first.trim(), "ready");
    server
}

/// Routes the LAN (each family's) from `pod` via its `node`, and starts its server.
fn plug_pod(pod: &Pod, node: &Node, dual_stack: bool) -> Child {
    let lan = lb_testkit::subnet(NODE_A_IP, LAN_PREFIX_LEN);
    let bridge = node.bridge_ip().to_string();
    run(&pod.netns, &["ip", "route", "add", &lan, "via", &bridge]);
    if let Some(bridge6) = node.bridge_ip6() {
        let lan6 = lb_testkit::subnet(NODE_A_IP6, LAN_PREFIX_LEN6);
        run(
            &pod.netns,
            &["ip", "route", "add", &lan6, "via", &bridge6.to_string()],
        );
    }
    serve(&pod.netns, &pod.name, dual_stack)
}
