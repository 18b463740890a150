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
    })
    .expect("the chaos run");
    eprint!("{}", report.text());
    assert_eq!(report.restarts, 13, "{}", report.text());
    assert!(report.attempts > 1000, "too little traffic: {}", report.text());
    assert!(report.passed(), "seed {seed}: {}", report.text());
}
