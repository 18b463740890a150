//! `cargo xtask run [--down]`: a local sandbox to see the agent work, as root.
//!
//! 1. Runs `setup`, then builds `lb-agent` and `lb-probe` (debug).
//! 2. Removes a sandbox that is already up, then builds one with lb-testkit: a node network
//!    namespace with a bridge, three pods `hostnames-1..3` each running
//!    `lb-probe serve --name hostnames-N` on port 9376 (like Kubernetes' serve_hostname), a
//!    client pod, a cgroup for the client pod's processes, and a client outside the cluster
//!    (`lbs-outside`, 192.168.77.100) on a LAN with the node's `ext0` (192.168.77.1).
//! 3. Copies `manifests/examples/*.yaml` to `/run/lb-sandbox/manifests` and adds, per Service,
//!    the EndpointSlice that Kubernetes' EndpointSlice controller would write for those pods.
//! 4. Starts `lb-agent run --manifests ... --nodeport-iface ext0` (in the node's namespace,
//!    its socket programs attached to the sandbox cgroup only, XDP and tc to `ext0`) and waits
//!    until it is ready: its `/healthz` answers 200 and `lb-agent status` shows every program
//!    linked.
//! 5. Sends traffic from the client pod to the ClusterIPs, and from the outside client to the
//!    NodePort on 192.168.77.1, prints how it spread over the pods and what `lb-agent list`
//!    shows, and how to try it by hand.
//!
//! Everything stays up after `run` exits, recorded in `/run/lb-sandbox/state.json`;
//! `cargo xtask run --down` removes it (and `run` does, before building a new one, or when
//! building fails). Nothing touches the host's own interfaces or its root cgroup, and the
//! sandbox has no routes out: no default route anywhere, the outside client reaches the
//! node's LAN address only, and the pods route the LAN via the node.

mod sandbox;
mod slices;
mod traffic;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::{cmd, host, setup};
use sandbox::{
    Binaries, CLIENT_NETNS, NODE_LAN_IP, OUTSIDE_IP, OUTSIDE_NETNS, PODS, STATE_DIR, Sandbox,
};
use slices::ServiceInfo as _;
use traffic::Origin;

#[derive(clap::Args)]
pub struct Args {
    /// Remove the sandbox instead: stop the agent and detach its programs, kill the pods'
    /// servers and every process in the sandbox cgroup and namespaces (shells opened in the
    /// client pod or the outside client too), delete the namespaces, the cgroup and
    /// /run/lb-sandbox.
    #[arg(long)]
    pub down: bool,
}

/// The example Services the traffic goes to, and how many connections each gets.
const TRAFFIC: [(&str, u64); 2] = [("hostnames", 300), ("hostnames-sticky", 30)];
/// The example NodePort Service, reached from the outside client: connections, and how many
/// more ask the pods which address they came from.
const NODEPORT_TRAFFIC: (&str, u64, u64) = ("hostnames-nodeport", 300, 10);

pub fn run(args: &Args) -> Result<()> {
    if !host::is_root() {
        bail!(
            "`cargo xtask run` must run as root: it creates network namespaces and a cgroup and \
             loads BPF programs (try `sudo -E env \"PATH=$PATH\" cargo xtask run`)"
        );
    }
    refuse_inside_sandbox()?;
    if args.down {
        return sandbox::down();
    }

    setup::run(&setup::Args { check: false })?;
    let bins = build()?;
    if sandbox::exists() {
        println!("run: a sandbox is up: removing it first (as `cargo xtask run --down` does)");
        sandbox::down()?;
    }
    let examples = host::workspace_root().join("manifests/examples");
    let sandbox = sandbox::up(&bins, &examples)?;

    let all_answered = show_traffic(&sandbox, &bins.probe)?;
    let all_answered = show_nodeport_traffic(&sandbox, &bins.probe)? && all_answered;
    show_list(&sandbox, &bins.agent);
    print_how_to_try(&sandbox, &bins.agent);
    if !all_answered {
        bail!(
            "some connections failed (see above); the sandbox stays up to look into it \
             (`cargo xtask run --down` removes it)"
        );
    }
    Ok(())
}

/// Building or removing the sandbox from inside it would kill this very process (and the
/// shell it runs in) halfway.
fn refuse_inside_sandbox() -> Result<()> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let in_cgroup = cgroup
        .lines()
        .filter_map(|l| l.strip_prefix("0::"))
        .any(|p| p == "/lb-sandbox" || p.starts_with("/lb-sandbox/"));
    let own_netns = std::fs::metadata("/proc/self/ns/net").ok();
    let in_netns = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("lbs-"))
        .any(|e| {
            use std::os::unix::fs::MetadataExt as _;
            let (Some(own), Ok(ns)) = (&own_netns, e.metadata()) else {
                return false;
            };
            own.dev() == ns.dev() && own.ino() == ns.ino()
        });
    if in_cgroup || in_netns {
        bail!(
            "this shell is inside the sandbox (its cgroup or one of its namespaces), which `run` \
             and `run --down` remove: exit it and run the command from a shell on the host"
        );
    }
    Ok(())
}

/// `cargo build -p lb-userspace --bin lb-agent -p lb-testkit --bin lb-probe`: the agent (whose
/// build script compiles the eBPF programs) and the probe.
pub(crate) fn build() -> Result<Binaries> {
    println!(
        "run: building lb-agent and lb-probe (debug; the build compiles the eBPF programs too, \
         which takes a few minutes the first time)"
    );
    let mut build = host::workspace_cargo();
    build.args([
        "build",
        "-p",
        "lb-userspace",
        "--bin",
        "lb-agent",
        "-p",
        "lb-testkit",
        "--bin",
        "lb-probe",
    ]);
    cmd::run(&mut build)?;
    let debug = target_dir().join("debug");
    let bins = Binaries {
        agent: debug.join("lb-agent"),
        probe: debug.join("lb-probe"),
    };
    for bin in [&bins.agent, &bins.probe] {
        if !bin.is_file() {
            bail!("the build finished but {} is missing", bin.display());
        }
    }
    Ok(bins)
}

/// Cargo's target directory: `CARGO_TARGET_DIR`, else `target` in the workspace.
pub(crate) fn target_dir() -> PathBuf {
    let root = host::workspace_root();
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

/// Runs the connections of [`TRAFFIC`] and prints their spread; false if any failed.
fn show_traffic(sandbox: &Sandbox, probe: &Path) -> Result<bool> {
    let mut all_answered = true;
    for (name, count) in TRAFFIC {
        let service = sandbox.services.iter().find(|s| s.name() == name);
        let Some((service, target)) = service.and_then(|s| Some((s, s.first_frontend()?))) else {
            println!("\nrun: no Service {name} with a clusterIP in the examples: no traffic to it");
            continue;
        };
        let sticky = service.client_ip_affinity();
        println!(
            "\n{count} connections from the client pod to {name} ({target}{}):",
            if sticky {
                ", sessionAffinity: ClientIP"
            } else {
                ""
            }
        );
        let from = Origin::client_pod(sandbox);
        let result = traffic::probe(&from, probe, &target, count, false)
            .with_context(|| format!("sending traffic to {name}"))?;
        println!("{}", traffic::table(&result, &PODS));
        if result.failures() > 0 || result.attempts != count {
            all_answered = false;
        } else if sticky && result.replies.len() == 1 {
            println!("  (all to one pod: the client's affinity holds)");
        }
    }
    Ok(all_answered)
}

/// The NodePort Service's port on the node's LAN address, from the outside client, which is in
/// no sandbox cgroup: its packets meet the agent's XDP program on ext0, not its socket
/// programs. Prints the spread and the source address the pods saw; false if any failed.
fn show_nodeport_traffic(sandbox: &Sandbox, probe: &Path) -> Result<bool> {
    let (name, count, whoami_count) = NODEPORT_TRAFFIC;
    let Some(node_port) = nodeport_of(sandbox, name) else {
        println!("\nrun: no NodePort Service {name} in the examples: no traffic from outside");
        return Ok(true);
    };
    let target = format!("{NODE_LAN_IP}:{node_port}");
    println!(
        "\n{count} connections from the outside client ({OUTSIDE_NETNS}, {OUTSIDE_IP}) to \
         {name}'s NodePort ({target}, XDP on ext0):"
    );
    let from = Origin::outside(sandbox);
    let result = traffic::probe(&from, probe, &target, count, false)
        .with_context(|| format!("sending traffic to {target}"))?;
    println!("{}", traffic::table(&result, &PODS));
    let mut all_answered = result.failures() == 0 && result.attempts == count;

    let whoami = traffic::probe(&from, probe, &target, whoami_count, true)
        .with_context(|| format!("asking the pods behind {target} who connected"))?;
    let sources = traffic::sources(&whoami);
    let seen = sources
        .iter()
        .map(|(ip, n)| format!("{ip} in {n}/{whoami_count}"))
        .collect::<Vec<_>>()
        .join(", ");
    let what = if sources.keys().eq([&OUTSIDE_IP.to_string()]) {
        ": the outside client's own address (externalTrafficPolicy Cluster, but every backend \
         is on this node, so no SNAT)"
    } else if sources.is_empty() {
        "(no answer)"
    } else {
        ""
    };
    println!(
        "  --whoami ({whoami_count} more connections, the pod answering with the source it saw): \
         {seen}{what}"
    );
    if let Some(error) = &whoami.first_error {
        println!("  first error: {error}");
    }
    if whoami.failures() > 0 || whoami.attempts != whoami_count {
        all_answered = false;
    }
    Ok(all_answered)
}

/// The TCP nodePort of Service `name`, when the examples have it as a NodePort Service.
fn nodeport_of(sandbox: &Sandbox, name: &str) -> Option<u16> {
    sandbox
        .services
        .iter()
        .find(|s| s.name() == name)?
        .first_tcp_node_port()
}

/// `lb-agent list`: what the agent programmed.
fn show_list(sandbox: &Sandbox, agent: &Path) {
    let mut list = Command::new(agent);
    list.arg("list").arg("--bpffs").arg(&sandbox.state.bpffs);
    println!("\n$ {}", cmd::display(&list));
    match cmd::output(&mut list) {
        Ok(out) => print!("{out}"),
        Err(e) => println!("run: {e:#}"),
    }
}

fn print_how_to_try(sandbox: &Sandbox, agent: &Path) {
    let state = &sandbox.state;
    let cgroup = state
        .cgroup
        .as_deref()
        .map_or_else(|| "?".into(), |p| p.display().to_string());
    let curl = |name: &str| {
        let frontend = sandbox
            .services
            .iter()
            .find(|s| s.name() == name)
            .and_then(|s| s.first_frontend())?;
        Some(match frontend.strip_suffix(":80") {
            Some(ip) => format!("curl http://{ip}/"),
            None => format!("curl http://{frontend}/"),
        })
    };
    let list = format!("{} list --bpffs {}", agent.display(), state.bpffs.display());
    println!(
        "\nThe sandbox is up. To try it by hand, open a shell in the client pod, inside the \
         sandbox cgroup (the agent's programs apply to the processes there):\n"
    );
    println!(
        "  nsenter --net=/run/netns/{CLIENT_NETNS} bash -c 'echo $$ > {cgroup}/cgroup.procs && exec bash'\n"
    );
    println!("and in it:");
    if let Some(curl) = curl("hostnames") {
        println!("  {curl:<32} # hostnames: a pod at random each time");
    }
    if let Some(curl) = curl("hostnames-sticky") {
        println!("  {curl:<32} # hostnames-sticky: the same pod every time");
    }
    if let Some(node_port) = nodeport_of(sandbox, NODEPORT_TRAFFIC.0) {
        println!(
            "\nFrom outside the cluster (the outside client, in no sandbox cgroup: the NodePort is \
             translated by XDP on the node's ext0, a pod at random each time):\n"
        );
        println!(
            "  nsenter --net=/run/netns/{OUTSIDE_NETNS} curl http://{NODE_LAN_IP}:{node_port}/"
        );
    }
    println!();
    println!(
        "Agent log:   {}",
        state.state_dir.join("agent.log").display()
    );
    println!(
        "Manifests:   {} (the agent watches it: edit endpointslice-*.yaml to remove or add \
         endpoints, or add Services, then see the result with `{list}`)",
        state.manifests.display()
    );
    let pods = state
        .pods
        .iter()
        .map(|p| {
            let ip = p.ip.map(|ip| ip.to_string()).unwrap_or_default();
            format!("{} {ip} (netns {})", p.name, p.netns)
        })
        .collect::<Vec<_>>()
        .join(", ");
    println!("Pods:        {pods}; logs and state in {STATE_DIR}/");
    println!(
        "Outside:     netns {OUTSIDE_NETNS} {OUTSIDE_IP}, on a LAN with the node's ext0 \
         {NODE_LAN_IP} (it reaches nothing else)"
    );
    println!(
        "Remove it:   cargo xtask run --down   (also kills shells opened with the lines above: \
         they live in the sandbox cgroup or namespaces)"
    );
}
