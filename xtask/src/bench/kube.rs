//! The benchmark's Services, written three ways: as manifests for the agent, as the
//! `iptables-restore` input kube-proxy's iptables mode writes, and as the `nft -f` input of its
//! nftables mode.
//!
//! The iptables layout follows kube-proxy's `pkg/proxy/iptables/proxier.go`: nat `OUTPUT` →
//! `KUBE-SERVICES`, one rule per service port jumping to `KUBE-SVC-<hash>`, which marks
//! traffic from outside the cluster CIDR for masquerade and picks a `KUBE-SEP-<hash>` with
//! `-m statistic --mode random --probability 1/(n-i)`; each `KUBE-SEP-*` marks hairpin
//! traffic and DNATs. Chain names are "KUBE-SVC-"/"KUBE-SEP-" + the first 16 characters of
//! base32(sha256(servicePortName + protocol [+ endpoint])) as in `servicePortChainName` and
//! `servicePortEndpointChainName`. A partial sync rewrites the top-level chains
//! (`KUBE-SERVICES` with every service rule, `KUBE-POSTROUTING`, `KUBE-MARK-MASQ`, the filter
//! chains) and only the chains of changed services, with `--noflush`, as kube-proxy does since
//! `MinimizeIPTablesRestore`.
//!
//! The nftables layout follows `pkg/proxy/nftables/proxier.go`: table `ip kube-proxy`, a
//! `service-ips` verdict map keyed by `daddr . l4proto . dport`, a `service-<hash>-<name>`
//! chain per service port with a `numgen random mod n vmap` to `endpoint-<hash>-...` chains
//! that DNAT; a partial sync touches only the changed service's chains.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

use lb_testkit::objects::{ManifestList, ServiceManifest, SliceManifest};
use sha2::{Digest, Sha256};

/// The cluster (pod) CIDR for the masquerade rules.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The namespace of every benchmark Service.
pub const NAMESPACE: &str = "bench";
/// The service port of every Service (ClusterIP side).
pub const SERVICE_PORT: u16 = 80;
/// What the real backends listen on (TCP and UDP).
pub const POD_PORT: u16 = 8080;

/// One service port with its endpoints (`protocol` is "TCP" or "UDP").
#[derive(Clone, Debug)]
pub struct Svc {
    pub name: String,
    pub port_name: String,
    pub protocol: &'static str,
    pub vip: IpAddr,
    pub port: u16,
    pub target_port: u16,
    pub endpoints: Vec<IpAddr>,
}

impl Svc {
    /// kube-proxy's `ServicePortName.String()`: "ns/name:port".
    fn port_name_string(&self) -> String {
        format!("{NAMESPACE}/{}:{}", self.name, self.port_name)
    }

    fn proto_lower(&self) -> String {
        self.protocol.to_ascii_lowercase()
    }

    pub fn svc_chain(&self) -> String {
        format!(
            "KUBE-SVC-{}",
            hash16(&format!(
                "{}{}",
                self.port_name_string(),
                self.proto_lower()
            ))
        )
    }

    pub fn sep_chain(&self, ep: IpAddr) -> String {
        format!(
            "KUBE-SEP-{}",
            hash16(&format!(
                "{}{}{ep}:{}",
                self.port_name_string(),
                self.proto_lower(),
                self.target_port
            ))
        )
    }

    fn comment(&self) -> String {
        self.port_name_string()
    }
}

/// First 16 characters of base32(sha256(s)), like kube-proxy's `portProtoHash`.
pub fn hash16(s: &str) -> String {
    let digest = Sha256::digest(s.as_bytes());
    base32(&digest)[..16].to_string()
}

/// RFC 4648 base32 (Go's `base32.StdEncoding`), padding left out (we cut to 16 anyway).
fn base32(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &byte in data {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            out.push(ALPHABET[((buffer >> (bits - 5)) & 31) as usize] as char);
            bits -= 5;
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// The ClusterIP of background service `i` (10.96.0.0/12 upwards).
pub fn background_vip(i: usize) -> IpAddr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 10)) + i as u32).into()
}

/// Background service `i` with `endpoints` made-up pod IPs (10.128.0.0/9, never answered:
/// the measured path never reaches them, but every layout stores them).
pub fn background(i: usize, endpoints: usize) -> Svc {
    let base = u32::from(Ipv4Addr::new(10, 128, 0, 1)) + (i * endpoints) as u32;
    Svc {
        name: format!("svc-{i}"),
        port_name: "http".into(),
        protocol: "TCP",
        vip: background_vip(i),
        port: SERVICE_PORT,
        target_port: POD_PORT,
        endpoints: (0..endpoints as u32)
            .map(|j| Ipv4Addr::from(base + j).into())
            .collect(),
    }
}

// ------------------------------------------------------------------ manifests (the agent)

/// The Service of those ports (one per `Svc` sharing name and VIP), selecting `app: <name>`.
/// An IPv6 VIP makes a single-stack IPv6 Service (`ipFamilies: [IPv6]`), as the API writes it;
/// an IPv4 one is written as before, without the family fields the agent defaults.
pub fn service_manifest(ports: &[&Svc]) -> ServiceManifest {
    let first = ports[0];
    let mut service =
        ServiceManifest::cluster_ip(NAMESPACE, &first.name, first.vip).selector("app", &first.name);
    if first.vip.is_ipv6() {
        service = service
            .ip_families(&["IPv6"])
            .ip_family_policy("SingleStack");
    }
    ports.iter().fold(service, |service, p| {
        service.port(&p.port_name, p.protocol, p.port, p.target_port)
    })
}

/// The EndpointSlice of those ports (all endpoints ready, on node `node`).
pub fn slice_manifest(ports: &[&Svc], node: &str) -> SliceManifest {
    let first = ports[0];
    let address_type = if first.vip.is_ipv6() { "IPv6" } else { "IPv4" };
    let slice = SliceManifest::new(NAMESPACE, &format!("{}-abcde", first.name), &first.name)
        .address_type(address_type)
        .managed_by_controller();
    let slice = ports.iter().fold(slice, |slice, p| {
        slice.port(&p.port_name, p.protocol, p.target_port)
    });
    first.endpoints.iter().fold(slice, |slice, ip| {
        slice
            .endpoint(ip)
            .on_node(node)
            .conditions(true, true, false)
    })
}

/// A `kind: List` JSON manifest of Services and their slices, one group of ports per service.
pub fn manifest(groups: &[Vec<&Svc>], node: &str) -> String {
    let mut list = ManifestList::with_capacity(groups.len() * 2);
    for group in groups {
        list.push(service_manifest(group));
        list.push(slice_manifest(group, node));
    }
    list.to_json()
}

// ------------------------------------------------------------------ iptables

fn filter_table(out: &mut String) {
    out.push_str(
        "*filter\n\
         :KUBE-NODEPORTS - [0:0]\n\
         :KUBE-SERVICES - [0:0]\n\
         :KUBE-EXTERNAL-SERVICES - [0:0]\n\
         :KUBE-FIREWALL - [0:0]\n\
         :KUBE-FORWARD - [0:0]\n\
         :KUBE-PROXY-FIREWALL - [0:0]\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         COMMIT\n",
    );
}

fn nat_head(out: &mut String) {
    out.push_str(
        "*nat\n\
         :KUBE-SERVICES - [0:0]\n\
         :KUBE-NODEPORTS - [0:0]\n\
         :KUBE-POSTROUTING - [0:0]\n\
         :KUBE-MARK-MASQ - [0:0]\n",
    );
}

fn nat_fixed_rules(out: &mut String) {
    out.push_str(
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
    );
}

fn services_rules(out: &mut String, services: &[Svc]) {
    for s in services {
        let _ = writeln!(
            out,
            "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m {p} -p {p} -d {}/32 --dport {} -j {}",
            s.comment(),
            s.vip,
            s.port,
            s.svc_chain(),
            p = s.proto_lower()
        );
    }
    out.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
}

fn service_chain_decls(out: &mut String, s: &Svc) {
    let _ = writeln!(out, ":{} - [0:0]", s.svc_chain());
    for &ep in &s.endpoints {
        let _ = writeln!(out, ":{} - [0:0]", s.sep_chain(ep));
    }
}

fn service_chain_rules(out: &mut String, s: &Svc) {
    let chain = s.svc_chain();
    let p = s.proto_lower();
    let _ = writeln!(
        out,
        "-A {chain} -m comment --comment \"{} cluster IP\" -m {p} -p {p} -d {}/32 --dport {} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
        s.comment(),
        s.vip,
        s.port
    );
    let n = s.endpoints.len();
    for (i, &ep) in s.endpoints.iter().enumerate() {
        let target = format!(
            "-m comment --comment \"{} -> {ep}:{}\"",
            s.comment(),
            s.target_port
        );
        if i + 1 < n {
            let _ = writeln!(
                out,
                "-A {chain} {target} -m statistic --mode random --probability {:.10} -j {}",
                1.0 / (n - i) as f64,
                s.sep_chain(ep)
            );
        } else {
            let _ = writeln!(out, "-A {chain} {target} -j {}", s.sep_chain(ep));
        }
    }
    for &ep in &s.endpoints {
        let sep = s.sep_chain(ep);
        let _ = writeln!(
            out,
            "-A {sep} -m comment --comment \"{}\" -s {ep}/32 -j KUBE-MARK-MASQ",
            s.comment()
        );
        let _ = writeln!(
            out,
            "-A {sep} -m comment --comment \"{}\" -m {p} -p {p} -j DNAT --to-destination {ep}:{}",
            s.comment(),
            s.target_port
        );
    }
}

/// The full sync: every chain and rule (loaded with `iptables-restore --noflush`).
pub fn iptables_full(services: &[Svc]) -> String {
    let mut out = String::with_capacity(services.len() * 3000);
    filter_table(&mut out);
    nat_head(&mut out);
    for s in services {
        service_chain_decls(&mut out, s);
    }
    nat_fixed_rules(&mut out);
    services_rules(&mut out, services);
    for s in services {
        service_chain_rules(&mut out, s);
    }
    out.push_str("COMMIT\n");
    out
}

/// The jumps from the built-in chains, which kube-proxy ensures with `iptables -I` outside
/// its restores.
pub const IPTABLES_JUMPS: [&[&str]; 3] = [
    &[
        "-t",
        "nat",
        "-I",
        "OUTPUT",
        "-m",
        "comment",
        "--comment",
        "kubernetes service portals",
        "-j",
        "KUBE-SERVICES",
    ],
    &[
        "-t",
        "nat",
        "-I",
        "PREROUTING",
        "-m",
        "comment",
        "--comment",
        "kubernetes service portals",
        "-j",
        "KUBE-SERVICES",
    ],
    &[
        "-t",
        "nat",
        "-I",
        "POSTROUTING",
        "-m",
        "comment",
        "--comment",
        "kubernetes postrouting rules",
        "-j",
        "KUBE-POSTROUTING",
    ],
];

/// The partial sync after `changed`'s endpoints went from `old` to its current ones: the
/// top-level chains in full, the changed service's chains, and `-X` for the endpoint chains
/// that are gone.
pub fn iptables_partial(services: &[Svc], changed: &Svc, old: &[IpAddr]) -> String {
    let mut out = String::with_capacity(services.len() * 200);
    filter_table(&mut out);
    nat_head(&mut out);
    service_chain_decls(&mut out, changed);
    // Stale endpoint chains are declared (so flushed) too, then deleted, as kube-proxy does.
    for &ep in old.iter().filter(|ep| !changed.endpoints.contains(ep)) {
        let _ = writeln!(out, ":{} - [0:0]", changed.sep_chain(ep));
    }
    nat_fixed_rules(&mut out);
    services_rules(&mut out, services);
    service_chain_rules(&mut out, changed);
    for &ep in old.iter().filter(|ep| !changed.endpoints.contains(ep)) {
        let _ = writeln!(out, "-X {}", changed.sep_chain(ep));
    }
    out.push_str("COMMIT\n");
    out
}

/// kube-proxy's rules for one NodePort service (`externalTrafficPolicy: Cluster`): the
/// nodeports jump at the end of `KUBE-SERVICES`, `KUBE-NODEPORTS` → `KUBE-EXT-*` (mark for
/// masquerade) → `KUBE-SVC-*`.
pub fn iptables_nodeport(s: &Svc, node_port: u16) -> String {
    let mut out = String::new();
    filter_table(&mut out);
    nat_head(&mut out);
    let ext = s.svc_chain().replace("KUBE-SVC-", "KUBE-EXT-");
    let _ = writeln!(out, ":{ext} - [0:0]");
    service_chain_decls(&mut out, s);
    nat_fixed_rules(&mut out);
    services_rules(&mut out, std::slice::from_ref(s));
    let p = s.proto_lower();
    let _ = writeln!(
        out,
        "-A KUBE-NODEPORTS -m comment --comment \"{}\" -m {p} -p {p} --dport {node_port} -j {ext}",
        s.comment()
    );
    let _ = writeln!(
        out,
        "-A {ext} -m comment --comment \"masquerade traffic for {} external destinations\" -j KUBE-MARK-MASQ",
        s.comment()
    );
    let _ = writeln!(out, "-A {ext} -j {}", s.svc_chain());
    service_chain_rules(&mut out, s);
    out.push_str("COMMIT\n");
    out
}

// ------------------------------------------------------------------ nftables

fn nft_service_chain(s: &Svc) -> String {
    format!(
        "service-{}-{NAMESPACE}/{}/{}/{}",
        &hash16(&format!("{}{}", s.port_name_string(), s.proto_lower()))[..8],
        s.name,
        s.proto_lower(),
        s.port_name
    )
}

fn nft_endpoint_chain(s: &Svc, ep: IpAddr) -> String {
    format!(
        "endpoint-{}-{NAMESPACE}/{}/{}/{}__{ep}/{}",
        &hash16(&format!(
            "{}{}{ep}:{}",
            s.port_name_string(),
            s.proto_lower(),
            s.target_port
        ))[..8],
        s.name,
        s.proto_lower(),
        s.port_name,
        s.target_port
    )
}

fn nft_service_body(out: &mut String, s: &Svc) {
    let chain = nft_service_chain(s);
    let p = s.proto_lower();
    // Endpoint chains first: the service chain's vmap names them.
    for &ep in &s.endpoints {
        let ec = nft_endpoint_chain(s, ep);
        let _ = writeln!(out, "add chain ip kube-proxy {ec}");
        let _ = writeln!(out, "flush chain ip kube-proxy {ec}");
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {ec} ip saddr {ep} jump mark-for-masquerade"
        );
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {ec} meta l4proto {p} dnat to {ep}:{}",
            s.target_port
        );
    }
    let _ = writeln!(out, "add chain ip kube-proxy {chain}");
    let _ = writeln!(out, "flush chain ip kube-proxy {chain}");
    let _ = writeln!(
        out,
        "add rule ip kube-proxy {chain} ip daddr {} {p} dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        s.vip, s.port
    );
    let arms: Vec<String> = s
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, &ep)| format!("{i} : goto {}", nft_endpoint_chain(s, ep)))
        .collect();
    if !arms.is_empty() {
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {chain} numgen random mod {} vmap {{ {} }}",
            s.endpoints.len(),
            arms.join(" , ")
        );
    }
}

/// The full nftables ruleset (kube-proxy's first sync).
pub fn nft_full(services: &[Svc]) -> String {
    let mut out = String::with_capacity(services.len() * 2500);
    out.push_str(
        "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }\n\
         add chain ip kube-proxy mark-for-masquerade\n\
         add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000\n\
         add chain ip kube-proxy masquerading\n\
         add rule ip kube-proxy masquerading mark and 0x4000 == 0 return\n\
         add rule ip kube-proxy masquerading mark set mark xor 0x4000\n\
         add rule ip kube-proxy masquerading masquerade fully-random\n\
         add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }\n\
         add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }\n\
         add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }\n\
         add rule ip kube-proxy nat-postrouting jump masquerading\n\
         add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }\n\
         add chain ip kube-proxy services\n\
         add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n\
         add rule ip kube-proxy nat-output jump services\n\
         add rule ip kube-proxy nat-prerouting jump services\n",
    );
    for s in services {
        nft_service_body(&mut out, s);
    }
    for chunk in services.chunks(1000) {
        let elements: Vec<String> = chunk
            .iter()
            .map(|s| {
                format!(
                    "{} . {} . {} : goto {}",
                    s.vip,
                    s.proto_lower(),
                    s.port,
                    nft_service_chain(s)
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "add element ip kube-proxy service-ips {{ {} }}",
            elements.join(" , ")
        );
    }
    out
}

/// The partial nftables sync for one service whose endpoints changed from `old`: its chains
/// rewritten, new endpoint chains added, stale ones deleted (after the service chain stops
/// naming them).
pub fn nft_partial(changed: &Svc, old: &[IpAddr]) -> String {
    let mut out = String::new();
    nft_service_body(&mut out, changed);
    for &ep in old.iter().filter(|ep| !changed.endpoints.contains(ep)) {
        let _ = writeln!(
            out,
            "delete chain ip kube-proxy {}",
            nft_endpoint_chain(changed, ep)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base32_matches_go() {
        // Go: base32.StdEncoding.EncodeToString([]byte("foobar")) == "MZXW6YTBOI======"
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
        assert_eq!(base32(b"f"), "MY");
    }

    #[test]
    fn the_manifest_holds_each_service_and_its_slice() {
        let (a, mut b) = (background(0, 2), background(1, 1));
        let mut b_udp = b.clone();
        b_udp.port_name = "dns".into();
        b_udp.protocol = "UDP";
        b.port = 81;
        let list: serde_json::Value =
            serde_json::from_str(&manifest(&[vec![&a], vec![&b, &b_udp]], "n")).unwrap();
        assert_eq!(
            (&list["apiVersion"], &list["kind"]),
            (&"v1".into(), &"List".into())
        );
        let items = list["items"].as_array().unwrap();
        assert_eq!(items.len(), 4);
        let service = &items[2];
        assert_eq!(service["kind"], "Service");
        assert_eq!(service["metadata"]["namespace"], NAMESPACE);
        assert_eq!(service["spec"]["clusterIP"], b.vip.to_string());
        assert_eq!(service["spec"]["selector"]["app"], "svc-1");
        assert_eq!(
            service["spec"]["ports"],
            serde_json::json!([
                {"name": "http", "protocol": "TCP", "port": 81, "targetPort": POD_PORT},
                {"name": "dns", "protocol": "UDP", "port": SERVICE_PORT, "targetPort": POD_PORT},
            ])
        );
        let slice = &items[1];
        assert_eq!(slice["kind"], "EndpointSlice");
        assert_eq!(slice["metadata"]["name"], "svc-0-abcde");
        assert_eq!(
            slice["metadata"]["labels"]["kubernetes.io/service-name"],
            "svc-0"
        );
        assert_eq!(
            slice["endpoints"][1],
            serde_json::json!({
                "addresses": [a.endpoints[1].to_string()], "nodeName": "n",
                "conditions": {"ready": true, "serving": true, "terminating": false},
            })
        );
        assert_eq!(items[3]["ports"][1]["protocol"], "UDP");
    }

    #[test]
    fn chain_names_have_kube_proxy_shape() {
        let s = background(3, 2);
        assert_eq!(s.svc_chain().len(), "KUBE-SVC-".len() + 16);
        assert!(s.sep_chain(s.endpoints[0]).starts_with("KUBE-SEP-"));
        let text = iptables_full(&[s]);
        assert!(text.contains("--probability 0.5000000000"));
    }
}
