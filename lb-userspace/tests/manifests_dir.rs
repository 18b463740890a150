//! The shipped manifests, read the way `lb-agent run --manifests DIR` reads them: the examples
//! in `manifests/examples/` (which the local sandbox serves) must come out as the three
//! services they describe, and the deployment manifests must read without problems (and
//! describe no service). Nothing here needs root or the kernel.
use std::{net::Ipv4Addr, path::PathBuf};

use lb_agent::{
    model::{self, Family, Frontend, FrontendKind, ObjectKey, Protocol, ProxyIdentity},
    source::manifests,
};

fn manifests_dir(sub: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests")
        .join(sub)
}

fn identity() -> ProxyIdentity {
    ProxyIdentity {
        node_name: "node-a".into(),
        service_proxy_name: None,
    }
}

#[test]
fn examples_read_as_three_services_with_fixed_cluster_ips() {
    let snapshot = manifests::read_dir(&manifests_dir("examples"));
    assert!(
        snapshot.problems.is_empty(),
        "problems reading manifests/examples: {:#?}",
        snapshot.problems
    );
    let names: Vec<String> = snapshot
        .objects
        .services
        .keys()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        names,
        [
            "default/hostnames",
            "default/hostnames-nodeport",
            "default/hostnames-sticky"
        ]
    );
    // The examples carry no EndpointSlices: the sandbox (or the cluster) provides them.
    assert!(snapshot.objects.endpoint_slices.is_empty());

    let (state, diagnostics) = model::build(&snapshot.objects, &identity());
    assert!(diagnostics.is_empty(), "diagnostics: {diagnostics:#?}");
    let expected = [
        (Ipv4Addr::new(10, 96, 0, 100), "hostnames", None),
        (Ipv4Addr::new(10, 96, 0, 101), "hostnames-nodeport", None),
        (Ipv4Addr::new(10, 96, 0, 102), "hostnames-sticky", Some(60)),
    ];
    let cluster_ips: Vec<&Frontend> = state
        .frontends
        .iter()
        .filter(|(_, s)| s.kind == FrontendKind::ClusterIP)
        .map(|(f, _)| f)
        .collect();
    assert_eq!(cluster_ips.len(), expected.len(), "{state:#?}");
    for (ip, name, affinity) in expected {
        let frontend = Frontend::new(ip.into(), 80, Protocol::Tcp);
        let service = state
            .frontends
            .get(&frontend)
            .unwrap_or_else(|| panic!("no service at {frontend}: {state:#?}"));
        assert_eq!(service.kind, FrontendKind::ClusterIP);
        assert_eq!(&*service.name.namespace, "default");
        assert_eq!(&*service.name.name, name);
        assert_eq!(&*service.name.port, "default", "{name}: port name");
        assert!(
            state.backends_of(&frontend).is_empty(),
            "{name}: no endpoints yet"
        );
        assert_eq!(service.affinity_timeout_secs, affinity, "{name}: affinity");
    }
}

#[test]
fn examples_node_port_is_the_only_external_frontend() {
    let snapshot = manifests::read_dir(&manifests_dir("examples"));
    let (state, diagnostics) = model::build(&snapshot.objects, &identity());
    assert!(diagnostics.is_empty(), "diagnostics: {diagnostics:#?}");
    let frontends: Vec<_> = state
        .frontends
        .iter()
        .filter(|(_, s)| s.kind.is_external())
        .map(|(f, _)| *f)
        .collect();
    assert_eq!(
        frontends,
        [Frontend::node_port(Family::V4, 30080, Protocol::Tcp)],
        "{state:#?}"
    );
    let desired = &state.frontends[&frontends[0]];
    assert_eq!(&*desired.name.name, "hostnames-nodeport");
    assert!(
        !desired.local_only,
        "externalTrafficPolicy defaults to Cluster"
    );
    let cluster_ip = Frontend::new(Ipv4Addr::new(10, 96, 0, 101).into(), 80, Protocol::Tcp);
    assert_eq!(
        desired.set(),
        state.frontends[&cluster_ip].set(),
        "the NodePort and its ClusterIP share one backend set"
    );
    assert!(
        state.backends_of(&frontends[0]).is_empty(),
        "no endpoints yet"
    );
    assert!(
        state.health_checks.is_empty(),
        "no Local policy, no health check"
    );
}

#[test]
fn examples_target_port_and_node_port() {
    let snapshot = manifests::read_dir(&manifests_dir("examples"));
    for (name, node_port) in [
        ("hostnames", None),
        ("hostnames-nodeport", Some(30080)),
        ("hostnames-sticky", None),
    ] {
        let service = &snapshot.objects.services[&ObjectKey::new("default", name)];
        let spec = service.spec.as_ref().expect("spec");
        assert_eq!(spec.ports.len(), 1, "{name}");
        assert_eq!(spec.ports[0].node_port, node_port, "{name}: nodePort");
        assert!(spec.has_selector, "{name}: has a selector");
        // What the agent keeps of a Service has no targetPort or selector (the endpoints
        // carry the ports); the file itself says where the pods listen.
        let text = std::fs::read_to_string(manifests_dir("examples").join(format!("{name}.yaml")))
            .expect("example file");
        let service = serde_yaml::Deserializer::from_str(&text)
            .map(|document| {
                <k8s_openapi::api::core::v1::Service as serde::Deserialize>::deserialize(document)
            })
            .filter_map(Result::ok)
            .find(|s| s.metadata.name.as_deref() == Some(name))
            .expect("the Service in its file");
        let spec = service.spec.expect("spec");
        let port = &spec.ports.as_ref().expect("ports")[0];
        assert_eq!(
            port.target_port,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(9376)),
            "{name}: serve_hostname listens on 9376"
        );
        let selector = spec.selector.expect("selector");
        assert_eq!(selector.get("app").map(String::as_str), Some("hostnames"));
    }
}

#[test]
fn deploy_manifests_read_without_problems_and_describe_no_service() {
    for sub in ["deploy", "cleanup"] {
        let snapshot = manifests::read_dir(&manifests_dir(sub));
        assert!(
            snapshot.problems.is_empty(),
            "problems reading manifests/{sub}: {:#?}",
            snapshot.problems
        );
        assert!(snapshot.objects.services.is_empty(), "manifests/{sub}");
    }
}
