//! The short chaos run of CI (`cargo xtask chaos` is the full one): the real agent killed with
//! kill -9 (also during its first sync after a start), stopped with SIGTERM and restarted with
//! other map limits, under ClusterIP and NodePort TCP and UDP traffic and endpoint churn. After
//! every restart its maps must equal a fresh agent's on the same manifests, and no request may
//! fail. See lb_testkit::chaos.
mod common;

use common::{AGENT, PROBE};

#[test]
fn restarts_at_random_points_keep_every_request_answered_and_the_maps_equal_a_fresh_build() {
    lb_testkit::require_root().expect("the kernel tests need root");
    let seed = std::env::var("LB_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(14);
    let report = lb_testkit::chaos::run(&lb_testkit::chaos::Config {
        agent: AGENT.into(),
        probe: PROBE.clone(),
        kills: 10,
        sigterms: 2,
        limit_changes: 1,
        seed,
        verbose: true,
        keep_logs: false,
    })
    .expect("the chaos run");
    eprint!("{}", report.text());
    assert_eq!(report.restarts, 13, "{}", report.text());
    assert!(
        report.attempts > 1000,
        "too little traffic: {}",
        report.text()
    );
    assert!(report.passed(), "seed {seed}: {}", report.text());
}

/// The comparison can fail: a backend written behind the agent's back (named by no slot) and a
/// frontend's backend removed show up in `lb-agent list -o description` and in `list`'s
/// warnings.
#[test]
fn the_description_shows_entries_no_frontend_reaches_and_missing_backends() {
    use lb_agent::reconcile::ServiceMaps as _;
    use lb_testkit::objects::{ServiceManifest, SliceManifest};

    let mut cluster = common::Cluster::new(&["pod-a"]);
    let pod = cluster.pod_ip("pod-a");
    cluster.write_manifest(
        "web.yaml",
        &ServiceManifest::cluster_ip("default", "web", "10.96.0.10")
            .port("http", "TCP", 80, common::POD_PORT)
            .to_yaml(),
    );
    cluster.write_manifest(
        "web-slice.yaml",
        &SliceManifest::new("default", "web-1", "web")
            .port("http", "TCP", common::POD_PORT)
            .endpoint(pod)
            .on_node("node-a")
            .ready(true)
            .to_yaml(),
    );
    cluster.start_agent();
    let bpffs = cluster.bpffs.path().to_owned();
    let clean = lb_agent::describe::describe(&bpffs).expect("describing the pins");
    assert!(clean.leaks.is_empty(), "{:?}", clean.leaks);
    assert_eq!(
        clean.frontends["10.96.0.10:80/TCP"].backends,
        [format!("{pod}:8080 (local)")]
    );
    assert_eq!(
        clean.frontends["10.96.0.10:80/TCP"].service.as_deref(),
        Some("default/web:http")
    );
    cluster.agent().kill();

    let mut maps =
        lb_agent::dataplane::BpfServiceMaps::open_pinned(&bpffs.join("maps")).expect("the maps");
    let contents = maps.dump().expect("reading the maps");
    let (&id, &backend) = contents.backends.iter().next().expect("one backend");
    let mut stray = backend;
    stray.backend.port = 256;
    maps.put_backend(id + 1000, stray)
        .expect("writing a stray backend");
    maps.remove_backend(id, stray.backend.family())
        .expect("removing the live backend");
    let broken = lb_agent::describe::describe(&bpffs).expect("describing the pins");
    assert_ne!(broken, clean);
    assert_eq!(
        broken.leaks,
        [
            "10.96.0.10:80/TCP: live slot 0 names a missing backend".to_string(),
            format!("backend {pod}:256 is named by no live slot"),
        ],
        "{broken:#?}"
    );
    let bpffs_arg = bpffs.display().to_string();
    let output = std::process::Command::new(common::AGENT)
        .args(["list", "--bpffs", &bpffs_arg])
        .output()
        .expect("lb-agent list");
    let warnings = String::from_utf8_lossy(&output.stderr);
    assert!(
        warnings.contains("named by no live slot") && warnings.contains("missing backend"),
        "{warnings}"
    );
}
