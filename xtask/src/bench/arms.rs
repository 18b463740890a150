//! The arms: whom each arm's client talks to, the client's arguments, and how each arm's proxy
//! applies a change of a measured service.

use std::net::{IpAddr, SocketAddr};

use anyhow::Result;

use super::cluster::Cluster;
use super::kube::{self, POD_PORT, SERVICE_PORT, Svc};
use super::services::{
    KubeProxyState, LAST_VIP, Measured, RAND_VIP, V6_VIP, iptables_restore, nft_load,
};

/// The IPv6 arms: D6 (direct to the pods' IPv6 addresses, D's client) and E6 (ours, through
/// the IPv6 ClusterIP, E's client in the agent's cgroup).
pub const IPV6_ARMS: [&str; 2] = ["D6", "E6"];

/// Whose client an arm uses (`D`, `E`, `I`, `N`) and whom it talks to.
pub fn arm_target(cluster: &Cluster, arm: &str) -> (char, Vec<String>) {
    let at = |ip: IpAddr, port| SocketAddr::new(ip, port).to_string();
    let vip = |ip: IpAddr| vec![at(ip, SERVICE_PORT)];
    let direct = |ips: Vec<IpAddr>| ips.into_iter().map(|ip| at(ip, POD_PORT)).collect();
    match arm {
        "D" => ('D', direct(cluster.backend_ips())),
        "D6" => ('D', direct(cluster.backend_ips6())),
        "E" => ('E', vip(LAST_VIP.into())),
        "E6" => ('E', vip(V6_VIP.into())),
        "I" => ('I', vip(LAST_VIP.into())),
        "I-rand" => ('I', vip(RAND_VIP.into())),
        _ => ('N', vip(LAST_VIP.into())),
    }
}

/// The metric name of an arm's measurement: IPv6 arms' metrics are their own rows
/// (`IPv6 CRR rate`, against D6), the others' as they are (`CRR rate`, against D).
pub fn metric_of(arm: &str, metric: &str) -> String {
    if IPV6_ARMS.contains(&arm) {
        format!("IPv6 {metric}")
    } else {
        metric.to_owned()
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
