//! One agent per pin directory: the lock on the bpffs directory, a second agent that fails
//! naming the first or waits for it (`--lock-wait`, a DaemonSet rollout) and takes over
//! without a failed connection, and `cleanup` refusing beside a live agent. Real agents on a
//! real bpffs, real connections through a ClusterIP.
mod common;

use std::time::Duration;

use common::{Cluster, POD_PORT, finish_probe};
use lb_testkit::objects::{ServiceManifest, SliceManifest};

const TCP_VIP: &str = "10.96.0.10:80";

/// The Service `web` at TCP_VIP over the ready pods `backends`.
fn web(cluster: &Cluster, backends: &[&str]) {
    let service = ServiceManifest::cluster_ip("default", "web", "10.96.0.10")
        .selector("app", "web")
        .port("http", "TCP", 80, POD_PORT);
    cluster.write_manifest("web.yaml", &service.to_yaml());
    let slice = backends
        .iter()
        .fold(SliceManifest::new("default", "web-1", "web"), |s, b| {
            s.endpoint(cluster.pod_ip(b)).on_node("node-a").ready(true)
        })
        .port("http", "TCP", POD_PORT);
    cluster.write_manifest("web-slice.yaml", &slice.to_yaml());
}

fn list(cluster: &Cluster) -> serde_json::Value {
    let bpffs = cluster.bpffs.path().display().to_string();
    serde_json::from_str(&cluster.agent_command(&["list", "--bpffs", &bpffs, "-o", "json"]))
        .expect("list -o json")
}

#[test]
fn a_second_agent_on_the_same_pin_directory_fails_at_once_naming_the_first() {
    let mut cluster = Cluster::new(&["pod-a"]);
    web(&cluster, &["pod-a"]);
    cluster.start_agent();
    let first_pid = cluster.agent().pid();
    let programmed = list(&cluster);

    let started = std::time::Instant::now();
    let mut second = cluster.spawn_another_agent(&[]);
    let status = second
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the second agent kept running:\n{}", second.log()));
    eprintln!(
        "a second agent exited {:?} after it started",
        started.elapsed()
    );
    let log = second.log();
    assert!(!status.success(), "the second agent exited 0:\n{log}");
    assert!(
        log.contains(&format!("locked by pid {first_pid} (")) && log.contains("lb-agent run"),
        "the error names the first agent's pid and command line:\n{log}"
    );
    assert!(
        !log.contains("programs attached"),
        "the second agent touched the data path:\n{log}"
    );
    // The first one is undisturbed.
    assert!(cluster.agent().is_running());
    assert_eq!(list(&cluster), programmed);
    let after = cluster.probe(&["tcp", TCP_VIP, "--count", "5"]);
    assert_eq!(after.replies.get("pod-a"), Some(&5), "{after:?}");
}

#[test]
fn with_lock_wait_a_second_agent_takes_over_when_the_first_exits_without_a_failed_connection() {
    let mut cluster = Cluster::new(&["pod-a", "pod-b"]);
    web(&cluster, &["pod-a"]);
    cluster.start_agent();
    let first_pid = cluster.agent().pid();
    let programmed = list(&cluster);
    assert_eq!(programmed.as_array().map(Vec::len), Some(1), "{programmed}");

    let steady = cluster.probe_in_background(&[
        "tcp",
        TCP_VIP,
        "--duration-ms",
        "6000",
        "--interval-ms",
        "2",
    ]);
    let mut second = cluster.spawn_another_agent(&["--lock-wait", "30s"]);
    second.wait_for_log(
        &format!("holder=pid {first_pid} ("),
        Duration::from_secs(10),
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        second.is_running(),
        "the second agent did not wait:\n{}",
        second.log()
    );
    assert!(!second.log().contains("pin directory locked"));

    // A DaemonSet rollout: the old pod gets SIGTERM. A connection opened through the first
    // agent is held across the exit and the takeover (the test servers close a connection
    // idle for 2 s: the hold stays below that).
    let held = cluster.probe_in_background(&["tcp", TCP_VIP, "--hold-ms", "1900"]);
    std::thread::sleep(Duration::from_millis(200));
    let handover = std::time::Instant::now();
    let status = cluster.agent().terminate();
    assert!(status.success(), "{status:?}");
    second.wait_for_log("socket programs attached", Duration::from_secs(20));
    let took = handover.elapsed();
    eprintln!("takeover: SIGTERM to the second agent's programs attached in {took:?}");
    assert_eq!(
        list(&cluster),
        programmed,
        "the second agent adopted the maps as the first programmed them"
    );
    // It serves: a change reaches the maps.
    web(&cluster, &["pod-a", "pod-b"]);
    cluster.tcp_until(TCP_VIP, Duration::from_secs(5), |r| {
        r.replies.contains_key("pod-b")
    });

    let held = finish_probe(held);
    assert_eq!(
        held.errors.get("timeout"),
        Some(&1),
        "the connection opened through the first agent stayed open: {held:?}"
    );
    assert!(
        took < Duration::from_millis(1700),
        "the takeover ({took:?}) ended after the held connection"
    );
    let steady = finish_probe(steady);
    assert!(steady.attempts > 200, "{steady:?}");
    assert_eq!(
        steady.failures(),
        0,
        "connections failed during the takeover: {steady:?}\n{}",
        second.log()
    );
}

#[test]
fn lock_wait_gives_up_naming_the_holder() {
    let mut cluster = Cluster::new(&["pod-a"]);
    web(&cluster, &["pod-a"]);
    cluster.start_agent();
    let first_pid = cluster.agent().pid();
    let mut second = cluster.spawn_another_agent(&["--lock-wait", "1s"]);
    let status = second
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("--lock-wait 1s kept waiting:\n{}", second.log()));
    let log = second.log();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(&format!("still locked by pid {first_pid} (")) && log.contains("1s"),
        "{log}"
    );
    assert!(cluster.agent().is_running());
}

#[test]
fn cleanup_refuses_while_an_agent_runs() {
    let mut cluster = Cluster::new(&["pod-a"]);
    web(&cluster, &["pod-a"]);
    cluster.start_agent();
    let pid = cluster.agent().pid();
    let bpffs = cluster.bpffs.path().display().to_string();

    let (ok, _, stderr) = cluster.agent_command_outcome(&["cleanup", "--bpffs", &bpffs]);
    assert!(!ok, "cleanup ran beside a live agent: {stderr}");
    assert!(
        stderr.contains("cleanup refused") && stderr.contains(&format!("pid {pid}")),
        "{stderr}"
    );
    let served = cluster.probe(&["tcp", TCP_VIP, "--count", "5"]);
    assert_eq!(served.replies.get("pod-a"), Some(&5), "{served:?}");
    assert!(cluster.bpffs.is_mounted());

    // Read-only commands need no lock; status names who holds it.
    assert_eq!(list(&cluster).as_array().map(Vec::len), Some(1));
    let status: serde_json::Value =
        serde_json::from_str(&cluster.agent_command(&["status", "--bpffs", &bpffs, "-o", "json"]))
            .expect("status -o json");
    let locked_by = status["locked_by"].as_str().unwrap_or_default();
    assert!(locked_by.starts_with(&format!("pid {pid} (")), "{status}");

    cluster.agent().terminate();
    cluster.agent_command(&["cleanup", "--bpffs", &bpffs]);
    let after = cluster.probe(&["tcp", TCP_VIP, "--count", "1", "--timeout-ms", "500"]);
    assert!(after.replies.is_empty(), "cleanup left programs: {after:?}");
    assert!(!cluster.bpffs.is_mounted());
}
