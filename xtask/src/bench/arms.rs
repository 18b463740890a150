//! The arms: whom each arm's client talks to, the client's arguments, and how each arm's proxy
//! applies a change of a measured service.

use std::net::Ipv4Addr;

use anyhow::Result;

use super::cluster::Cluster;
use super::kube::{self, POD_PORT, SERVICE_PORT, Svc};
use super::services::{KubeProxyState, LAST_VIP, Measured, RAND_VIP, iptables_restore, nft_load};

pub fn arm_target(cluster: &Cluster, arm: &str) -> (char, Vec<String>) {
    let vip = |ip: Ipv4Addr| vec![format!("{ip}:{SERVICE_PORT}")];
    match arm {
        "D" => (
            'D',
            cluster
                .backend_ips()
                .iter()
                .map(|ip| format!("{ip}:{POD_PORT}"))
                .collect(),
        ),
        "E" => ('E', vip(LAST_VIP)),
        "I" => ('I', vip(LAST_VIP)),
        "I-rand" => ('I', vip(RAND_VIP)),
        _ => ('N', vip(LAST_VIP)),
    }
}

pub fn client_args(mode: &str, targets: &[String], dur_ms: u64, extra: &[&str]) -> Vec<String> {
    let mut args = vec![mode.to_string()];
    for t in targets {
        args.push("--target".into());
        args.push(t.clone());
    }
    args.push("--duration-ms".into());
    args.push(dur_ms.to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

pub fn arm_label(arm: char) -> &'static str {
    match arm {
        'D' => "D",
        'E' => "E",
        'I' => "I",
        _ => "N",
    }
}

/// Applies a change of one measured service as the arm's proxy would.
pub fn apply_change(
    cluster: &mut Cluster,
    arm: char,
    measured: &Measured,
    changed: &Svc,
    kp_i: &mut KubeProxyState,
    kp_n: &mut KubeProxyState,
) -> Result<()> {
    match arm {
        'E' => cluster.write_manifest("measured.json", &measured.manifest()),
        'I' => {
            let old = kp_i.replace(changed);
            let text = kube::iptables_partial(&kp_i.services, changed, &old);
            iptables_restore(cluster, &cluster.client('I').netns, &text).map(|_| ())
        }
        _ => {
            let old = kp_n.replace(changed);
            nft_load(
                cluster,
                &cluster.client('N').netns,
                &kube::nft_partial(changed, &old),
            )
            .map(|_| ())
        }
    }
}
