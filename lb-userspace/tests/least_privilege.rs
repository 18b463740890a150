//! The agent with only the capabilities the DaemonSet grants: the real `lb-agent run` under
//! `setpriv` (bounding, inheritable, ambient and so permitted and effective sets reduced to a
//! list, as uid 0 the way the DaemonSet's container runs, and as an unprivileged uid with
//! ambient capabilities), in a node namespace with a NodePort interface (XDP and tc), its
//! socket programs on a test cgroup, bpffs mounted beforehand as the DaemonSet's init
//! container does. With the DaemonSet's list it must program, serve a connection through a
//! ClusterIP and destroy a connected UDP socket of a removed backend; with one needed
//! capability less it must refuse to start, naming it.
//!
//! `capability_trials` (ignored: it starts the agent a dozen times) takes one capability away
//! at a time with the agent's own check off, to see what the kernel refuses; it prints the
//! table of docs/reliability.md "Least privilege":
//!
//!   cargo test -p lb-userspace --test least_privilege -- --ignored --nocapture
mod common;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use common::{AGENT, Agent, Cluster, POD_PORT, finish_probe};
use lb_testkit::{AgentReady, command_in, objects::ServiceManifest, objects::SliceManifest};

const NODE: &str = "node-a";
const LAN_IFACE: &str = "lan0";
const TCP_VIP: &str = "10.96.0.10:80";
const UDP_VIP: &str = "10.96.0.53:53";
/// The node namespace is the test's own: kube-proxy's ports are free there.
const HEALTHZ: &str = "127.0.0.1:10256";
const METRICS: &str = "127.0.0.1:10249";
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// An unprivileged uid (nobody) for the ambient-capability runs.
const NOBODY: u32 = 65534;

/// The capabilities `securityContext.capabilities.add` grants the container `container`
/// (under `initContainers` or `containers`) of the DaemonSet in `manifest` (relative to
/// manifests/), as `CAP_*` names; it must drop every other one.
fn granted_capabilities(manifest: &str, list: &str, container: &str) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests")
        .join(manifest);
    let text = std::fs::read_to_string(&path).expect("reading the DaemonSet");
    let daemonset: serde_yaml::Value = serde_yaml::from_str(&text).expect("the DaemonSet's YAML");
    let containers = daemonset["spec"]["template"]["spec"][list]
        .as_sequence()
        .expect("containers");
    let found = containers
        .iter()
        .find(|c| c["name"] == container)
        .unwrap_or_else(|| panic!("no container {container} in {manifest}"));
    let context = &found["securityContext"];
    assert_eq!(
        context["capabilities"]["drop"],
        serde_yaml::Value::Sequence(vec!["ALL".into()]),
        "{manifest}: {container} drops every capability it does not add"
    );
    assert_ne!(context["privileged"], true, "{manifest}: {container}");
    context["capabilities"]["add"]
        .as_sequence()
        .map(|caps| {
            caps.iter()
                .map(|cap| format!("CAP_{}", cap.as_str().expect("a capability name")))
                .collect()
        })
        .unwrap_or_default()
}

/// What the DaemonSet grants the agent.
fn daemonset_capabilities() -> Vec<String> {
    granted_capabilities("deploy/daemonset.yaml", "containers", "lb-agent")
}

/// `setpriv` arguments that leave exactly `caps` (bounding, inheritable, ambient; and so
/// permitted and effective after exec) to a process running as `uid`.
fn setpriv_args(caps: &[String], uid: u32) -> Vec<String> {
    let list = caps
        .iter()
        .map(|cap| format!(",+{}", cap.trim_start_matches("CAP_").to_lowercase()))
        .collect::<String>();
    vec![
        format!("--reuid={uid}"),
        format!("--regid={uid}"),
        "--clear-groups".into(),
        format!("--bounding-set=-all{list}"),
        format!("--inh-caps=-all{list}"),
        format!("--ambient-caps=-all{list}"),
        "--".into(),
    ]
}

/// A node namespace with a NodePort interface, two pods serving TCP and UDP, a TCP and a UDP
/// Service over them, and bpffs mounted where the agent pins (its parent, as /sys/fs/bpf on a
/// node).
struct Site {
    cluster: Cluster,
    bpffs: PathBuf,
}

impl Site {
    fn new(mount_bpffs: bool) -> Site {
        let cluster = Cluster::new(&["pod-a", "pod-b"]);
        let netns = cluster.node.netns();
        for args in [
            &[
                "ip", "link", "add", LAN_IFACE, "type", "veth", "peer", "name", "lan0p",
            ][..],
            &["ip", "link", "set", LAN_IFACE, "up"],
            &["ip", "link", "set", "lan0p", "up"],
            &["ip", "addr", "add", "192.168.77.1/24", "dev", LAN_IFACE],
        ] {
            netns.run(args).expect("adding the NodePort interface");
        }
        let root = cluster.bpffs.path().to_owned();
        std::fs::create_dir_all(&root).expect("creating the bpffs directory");
        if mount_bpffs {
            let output = std::process::Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(&root)
                .output()
                .expect("running mount");
            assert!(output.status.success(), "mounting bpffs: {output:?}");
        }
        let site = Site {
            bpffs: root.join("lb"),
            cluster,
        };
        let service = |name: &str, ip: &str, protocol: &str, port: i32, port_name: &str| {
            ServiceManifest::cluster_ip("default", name, ip)
                .selector("app", name)
                .port(port_name, protocol, port, POD_PORT)
        };
        site.write(
            "web.yaml",
            &service("web", "10.96.0.10", "TCP", 80, "http").to_yaml(),
        );
        site.write(
            "dns.yaml",
            &service("dns", "10.96.0.53", "UDP", 53, "dns").to_yaml(),
        );
        site.slices(&["pod-a", "pod-b"], &["pod-a"]);
        site
    }

    fn write(&self, file: &str, yaml: &str) {
        self.cluster.write_manifest(file, yaml);
    }

    /// The endpoints of `web` and of `dns`.
    fn slices(&self, web: &[&str], dns: &[&str]) {
        for (service, port_name, protocol, pods) in
            [("web", "http", "TCP", web), ("dns", "dns", "UDP", dns)]
        {
            let slice = pods.iter().fold(
                SliceManifest::new("default", &format!("{service}-1"), service),
                |slice, pod| {
                    slice
                        .endpoint(self.cluster.pod_ip(pod))
                        .on_node(NODE)
                        .ready(true)
                },
            );
            self.write(
                &format!("{service}-slice.yaml"),
                &slice.port(port_name, protocol, POD_PORT).to_yaml(),
            );
        }
    }

    /// Starts `lb-agent run` in the node namespace under setpriv with exactly `caps` as `uid`,
    /// with `extra` flags; `Ok` once it is ready, `Err(log)` when it exits or is not ready in
    /// time.
    fn start(&self, caps: &[String], uid: u32, extra: &[&str]) -> (Agent, Result<(), String>) {
        let netns = self.cluster.node.netns();
        let ready = AgentReady {
            agent: Path::new(AGENT),
            bpffs: &self.bpffs,
            healthz: HEALTHZ.parse().unwrap(),
            netns: Some(netns),
            links: lb_testkit::agent_links_for(&["--nodeport-iface", LAN_IFACE]),
        }
        .before_start()
        .expect("reading the links pinned before the start");
        let mut command = command_in(Some(netns), None, "setpriv").expect("a command in the node");
        command
            .args(setpriv_args(caps, uid))
            .arg(AGENT)
            .arg("run")
            .arg("--manifests")
            .arg(self.cluster.manifests.path())
            .arg("--cgroup")
            .arg(self.cluster.cgroup.path())
            .arg("--bpffs")
            .arg(&self.bpffs)
            .args(["--node-name", NODE, "--nodeport-iface", LAN_IFACE])
            .args(extra);
        let mut agent = Agent::spawn(
            command,
            Some(METRICS.parse().unwrap()),
            Some(HEALTHZ.parse().unwrap()),
        );
        let outcome = agent.try_wait_ready(&ready, START_TIMEOUT);
        (agent, outcome)
    }

    /// One TCP connection through the ClusterIP: which pod answered, or the error.
    fn tcp(&self) -> Result<String, String> {
        let result = self
            .cluster
            .probe(&["tcp", TCP_VIP, "--count", "1", "--timeout-ms", "1000"]);
        match result.replies.keys().next() {
            Some(pod) if result.failures() == 0 => Ok(pod.clone()),
            _ => Err(format!("{result:?}")),
        }
    }

    /// A connected UDP socket to `dns` (on pod-a) while pod-a leaves for pod-b: whether
    /// the socket was destroyed and its reopened successor reached pod-b.
    fn udp_socket_moves(&self) -> Result<(), String> {
        let running = self.cluster.probe_in_background(&[
            "udp",
            UDP_VIP,
            "--connected",
            "--reopen-on-error",
            "--duration-ms",
            "2500",
            "--interval-ms",
            "10",
            "--timeout-ms",
            "200",
        ]);
        std::thread::sleep(Duration::from_millis(700));
        // A backend is an address and port: pod-a leaves both Services to be removed.
        self.slices(&["pod-b"], &["pod-b"]);
        let result = finish_probe(running);
        let outcome = if result.replies.get("pod-a").is_some_and(|n| *n > 0)
            && result.replies.get("pod-b").is_some_and(|n| *n > 0)
        {
            Ok(())
        } else {
            Err(format!("{result:?}"))
        };
        self.slices(&["pod-a", "pod-b"], &["pod-a"]);
        outcome
    }
}

/// A bind mount made by the test (in its own mount namespace, the host's), unmounted and its
/// directory removed on drop.
struct BindMount(PathBuf);

impl BindMount {
    fn new(source: &str) -> BindMount {
        let target = Path::new("/run/lb-test").join(lb_testkit::unique_name("sysnet"));
        std::fs::create_dir_all(&target).expect("creating a mount point");
        let mount = BindMount(target);
        let status = std::process::Command::new("mount")
            .args(["--bind", source])
            .arg(&mount.0)
            .status()
            .expect("running mount");
        assert!(status.success(), "bind-mounting {source}");
        mount
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("--lazy")
            .arg(&self.0)
            .status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The agent's warnings and errors, for the trial table.
fn complaints(log: &str) -> Vec<String> {
    log.lines()
        .filter(|line| line.contains("WARN") || line.contains("ERROR") || line.contains("Error"))
        .map(|line| line.chars().take(400).collect())
        .collect()
}

/// The agent's error chain (`Error: ...`, `N: ...`) and, when the verifier refused a program,
/// its last words before `processed N insns`.
fn why_it_stopped(log: &str) -> String {
    let lines: Vec<&str> = log.lines().map(str::trim).collect();
    let mut why: Vec<String> = lines
        .iter()
        .filter(|line| {
            line.starts_with("Error:")
                || line.starts_with("setpriv:")
                || line
                    .split_once(": ")
                    .is_some_and(|(n, _)| n.parse::<u8>().is_ok())
        })
        .filter(|line| !line.contains("Verifier output"))
        .map(|line| line.to_string())
        .collect();
    if let Some(at) = lines.iter().position(|l| l.starts_with("processed ")) {
        let last = lines[..at].iter().rev().find(|l| !l.is_empty());
        why.extend(last.map(|l| format!("verifier: {l}")));
    }
    why.join(" / ")
}

#[test]
fn the_daemonsets_capabilities_program_serve_and_destroy_sockets_as_uid_0_and_as_nobody() {
    let caps = daemonset_capabilities();
    // As the DaemonSet does: /proc/sys/net seen elsewhere (there a hostPath, since the
    // container's /proc/sys is read-only), written through --reserved-ports-sysctl. Network
    // sysctls are the writer's namespace's: the node namespace's here.
    let proc_sys_net = BindMount::new("/proc/sys/net");
    let sysctl = proc_sys_net.0.join("ipv4/ip_local_reserved_ports");
    let sysctl_flag = format!("--reserved-ports-sysctl={}", sysctl.display());
    for uid in [0, NOBODY] {
        let site = Site::new(true);
        let (mut agent, outcome) = site.start(&caps, uid, &[&sysctl_flag]);
        if let Err(log) = outcome {
            panic!("uid {uid} with {caps:?}: the agent did not start:\n{log}");
        }
        let answered = site.tcp();
        assert!(
            answered
                .as_ref()
                .is_ok_and(|pod| pod == "pod-a" || pod == "pod-b"),
            "uid {uid}: {answered:?}\n{}",
            agent.log()
        );
        let moved = site.udp_socket_moves();
        agent.wait_for_log(
            "destroyed the sockets of removed backends",
            Duration::from_secs(5),
        );
        assert!(moved.is_ok(), "uid {uid}: {moved:?}\n{}", agent.log());
        let reserved = site
            .cluster
            .node
            .netns()
            .run(&["cat", "/proc/sys/net/ipv4/ip_local_reserved_ports"])
            .expect("reading the node's reserved ports");
        agent.wait_for_log(
            &format!("sysctl={}", sysctl.display()),
            Duration::from_secs(5),
        );
        assert!(
            reserved.contains("30000-32767"),
            "uid {uid}: the node namespace's reserved ports: {reserved:?}\n{}",
            agent.log()
        );
        let log = agent.log();
        assert!(
            complaints(&log).is_empty(),
            "uid {uid}: no warning with the DaemonSet's capabilities:\n{log}"
        );
        assert!(agent.terminate().success(), "{}", agent.log());

        // The cleanup DaemonSet's container: removing the pins takes no capability, as the
        // uid that pinned them (the DaemonSets' uid 0; another uid would need
        // CAP_DAC_OVERRIDE for pins of uid 0, which are mode 0600). Its one capability,
        // NET_ADMIN, is for the netlink tc filters of kernels before 6.6 (none here: tcx), so
        // cleanup runs with none at all.
        let granted = granted_capabilities("cleanup/daemonset.yaml", "initContainers", "cleanup");
        assert_eq!(
            granted,
            ["CAP_NET_ADMIN"],
            "the cleanup DaemonSet grants NET_ADMIN only"
        );
        let cleanup_caps: Vec<String> = Vec::new();
        let output = std::process::Command::new("setpriv")
            .args(setpriv_args(&cleanup_caps, uid))
            .arg(AGENT)
            .arg("cleanup")
            .arg("--bpffs")
            .arg(&site.bpffs)
            .output()
            .expect("running lb-agent cleanup");
        assert!(
            output.status.success(),
            "cleanup with {cleanup_caps:?} as uid {uid}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            !site.bpffs.exists(),
            "cleanup removed every pin and the directory"
        );
    }
}

#[test]
fn without_a_needed_capability_the_agent_refuses_to_start_naming_it() {
    let granted = daemonset_capabilities();
    for (gone, reason) in [
        ("CAP_SYS_PTRACE", "opening /proc/PID/ns/net"),
        ("CAP_NET_ADMIN", "destroying sockets of removed backends"),
        ("CAP_SYS_ADMIN", "bpf(2): creating the maps"),
    ] {
        let site = Site::new(true);
        let caps: Vec<String> = granted.iter().filter(|c| *c != gone).cloned().collect();
        let (mut agent, outcome) = site.start(&caps, 0, &[]);
        assert!(outcome.is_err(), "started without {gone}:\n{}", agent.log());
        let status = agent.wait_exit(Duration::from_secs(5));
        assert!(status.is_some_and(|s| !s.success()), "{status:?}");
        // The log is read by a thread of its own: it may trail the exit a little.
        agent.wait_for_log(
            &format!("lb-agent lacks the capabilities {gone}:"),
            Duration::from_secs(5),
        );
        let log = agent.log();
        assert!(
            log.contains(&format!("{gone} for {reason}")),
            "without {gone}:\n{log}"
        );
        assert!(
            !site.bpffs.join("links").exists()
                || std::fs::read_dir(site.bpffs.join("links"))
                    .unwrap()
                    .next()
                    .is_none(),
            "nothing attached"
        );
    }
}

#[test]
fn a_namespace_the_agent_may_not_reach_is_warned_about_not_skipped_silently() {
    let site = Site::new(true);
    let caps: Vec<String> = daemonset_capabilities()
        .into_iter()
        .filter(|c| c != "CAP_SYS_PTRACE")
        .collect();
    let (agent, outcome) = site.start(&caps, 0, &["--skip-capability-check"]);
    if let Err(log) = outcome {
        panic!("did not start without CAP_SYS_PTRACE and the check off:\n{log}");
    }
    assert!(site.tcp().is_ok(), "{}", agent.log());
    let moved = site.udp_socket_moves();
    assert!(
        moved.is_err(),
        "the socket was destroyed all the same: {moved:?}"
    );
    agent.wait_for_log(
        "(needs CAP_SYS_PTRACE); sockets in that network namespace are left alone",
        Duration::from_secs(5),
    );
}

/// What one trial showed.
struct Trial {
    removed: String,
    outcome: String,
}

#[test]
#[ignore = "a dozen agent starts; prints the table of docs/reliability.md"]
fn capability_trials() {
    let full: Vec<String> = [
        "CAP_BPF",
        "CAP_NET_ADMIN",
        "CAP_SYS_ADMIN",
        "CAP_PERFMON",
        "CAP_NET_RAW",
        "CAP_SYS_PTRACE",
        "CAP_DAC_OVERRIDE",
        "CAP_DAC_READ_SEARCH",
    ]
    .map(String::from)
    .to_vec();
    let daemonset = daemonset_capabilities();
    let mut rows = Vec::new();
    let mut cases: Vec<(String, Vec<String>, u32, bool)> =
        vec![("none".into(), full.clone(), 0, true)];
    for cap in &full {
        let caps = full.iter().filter(|c| *c != cap).cloned().collect();
        cases.push((cap.clone(), caps, 0, true));
    }
    cases.push(("all but the DaemonSet's".into(), daemonset.clone(), 0, true));
    for cap in &daemonset {
        let caps = daemonset.iter().filter(|c| *c != cap).cloned().collect();
        cases.push((format!("{cap} from the DaemonSet's"), caps, 0, true));
    }
    let mut plus_bpf = daemonset.clone();
    plus_bpf.retain(|c| c != "CAP_SYS_ADMIN");
    plus_bpf.extend(["CAP_BPF".into(), "CAP_PERFMON".into()]);
    cases.push((
        "CAP_SYS_ADMIN, with CAP_BPF+CAP_PERFMON".into(),
        plus_bpf,
        0,
        true,
    ));
    for (removed, caps) in [
        (
            "CAP_SYS_ADMIN and CAP_PERFMON, with CAP_BPF",
            &["CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_PTRACE"][..],
        ),
        (
            "CAP_SYS_ADMIN and CAP_NET_ADMIN, with CAP_BPF+CAP_PERFMON",
            &["CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE"],
        ),
    ] {
        let caps = caps.iter().map(|c| c.to_string()).collect();
        cases.push((removed.into(), caps, 0, true));
    }
    cases.push((
        "the DaemonSet's, bpffs not mounted".into(),
        daemonset.clone(),
        0,
        false,
    ));
    cases.push((
        "the DaemonSet's, as uid 65534".into(),
        daemonset.clone(),
        NOBODY,
        true,
    ));
    for (removed, caps, uid, mount) in cases {
        let site = Site::new(mount);
        let (agent, started) = site.start(&caps, uid, &["--skip-capability-check"]);
        let outcome = match started {
            Err(log) => format!("did not start: {}", why_it_stopped(&log)),
            Ok(()) => {
                let tcp = site.tcp();
                let udp = site.udp_socket_moves();
                std::thread::sleep(Duration::from_millis(300));
                let log = agent.log();
                format!(
                    "started; TCP via ClusterIP: {}; UDP socket of a removed backend destroyed: \
                     {}; warnings: {}",
                    tcp.map_or_else(|e| format!("FAILED {e}"), |pod| format!("ok ({pod})")),
                    udp.map_or_else(|e| format!("NO {e}"), |()| "yes".into()),
                    complaints(&log).join(" | ")
                )
            }
        };
        drop(agent);
        println!("TRIAL without {removed}: {outcome}");
        rows.push(Trial { removed, outcome });
    }
    println!("\n| removed | outcome |\n|---|---|");
    for row in &rows {
        println!("| {} | {} |", row.removed, row.outcome.replace('|', "/"));
    }
    for whole in ["none", "all but the DaemonSet's"] {
        let row = rows.iter().find(|r| r.removed == whole).unwrap();
        assert!(
            row.outcome.contains("destroyed: yes; warnings: ")
                && row.outcome.ends_with("warnings: "),
            "{whole}: {}",
            row.outcome
        );
    }
}
