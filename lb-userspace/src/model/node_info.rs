//! A Node as the model and the health server keep it: its zone, addresses, pod CIDRs and
//! what makes it ineligible for load-balancer traffic, converted once when a source takes
//! the object in (a Node as the API server returns it carries its images, conditions and
//! capacity: tens of kilobytes). Values stay as written; the model reads them.
use k8s_openapi::api::core::v1::Node;

use super::{TO_BE_DELETED_TAINT, ZONE_LABEL};

/// What the agent reads of one Node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// Its `topology.kubernetes.io/zone` label.
    pub zone: Option<Box<str>>,
    /// `status.addresses`, in order.
    pub addresses: Box<[NodeAddressInfo]>,
    /// `spec.podCIDRs`.
    pub pod_cidrs: Box<[Box<str>]>,
    /// `spec.podCIDR` (objects from before dual-stack have only this).
    pub pod_cidr: Option<Box<str>>,
    /// It has a `deletionTimestamp`.
    pub deleting: bool,
    /// It carries the cluster autoscaler's [`TO_BE_DELETED_TAINT`] (any effect, any value).
    pub to_be_deleted: bool,
}

/// One `status.addresses` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeAddressInfo {
    /// `InternalIP`, `ExternalIP`, `Hostname`, ...
    pub type_: Box<str>,
    pub address: Box<str>,
}

impl From<&Node> for NodeInfo {
    fn from(node: &Node) -> Self {
        let spec = node.spec.as_ref();
        Self {
            zone: node
                .metadata
                .labels
                .as_ref()
                .and_then(|labels| labels.get(ZONE_LABEL))
                .map(|zone| Box::from(zone.as_str())),
            addresses: node
                .status
                .as_ref()
                .and_then(|status| status.addresses.as_ref())
                .into_iter()
                .flatten()
                .map(|a| NodeAddressInfo {
                    type_: Box::from(a.type_.as_str()),
                    address: Box::from(a.address.as_str()),
                })
                .collect(),
            pod_cidrs: spec
                .and_then(|spec| spec.pod_cidrs.as_ref())
                .into_iter()
                .flatten()
                .map(|cidr| Box::from(cidr.as_str()))
                .collect(),
            pod_cidr: spec
                .and_then(|spec| spec.pod_cidr.as_deref())
                .map(Box::from),
            deleting: node.metadata.deletion_timestamp.is_some(),
            to_be_deleted: spec
                .and_then(|spec| spec.taints.as_ref())
                .is_some_and(|taints| taints.iter().any(|t| t.key == TO_BE_DELETED_TAINT)),
        }
    }
}

impl From<Node> for NodeInfo {
    fn from(node: Node) -> Self {
        Self::from(&node)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{NodeAddress, NodeSpec, NodeStatus, Taint},
        apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    };

    use super::*;

    fn node() -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some("node-a".into()),
                labels: Some(
                    [
                        (ZONE_LABEL.into(), "zone-a".into()),
                        ("kubernetes.io/os".into(), "linux".into()),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: Some("10.244.1.0/24".into()),
                pod_cidrs: Some(vec!["10.244.1.0/24".into(), "fd00:1::/64".into()]),
                taints: Some(vec![Taint {
                    key: "node.kubernetes.io/unschedulable".into(),
                    effect: "NoSchedule".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(vec![
                    NodeAddress {
                        type_: "Hostname".into(),
                        address: "node-a".into(),
                    },
                    NodeAddress {
                        type_: "InternalIP".into(),
                        address: "192.168.1.10".into(),
                    },
                ]),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_node_keeps_zone_addresses_pod_cidrs_and_eligibility() {
        let info = NodeInfo::from(node());
        assert_eq!(
            info,
            NodeInfo {
                zone: Some("zone-a".into()),
                addresses: Box::new([
                    NodeAddressInfo {
                        type_: "Hostname".into(),
                        address: "node-a".into(),
                    },
                    NodeAddressInfo {
                        type_: "InternalIP".into(),
                        address: "192.168.1.10".into(),
                    },
                ]),
                pod_cidrs: Box::new(["10.244.1.0/24".into(), "fd00:1::/64".into()]),
                pod_cidr: Some("10.244.1.0/24".into()),
                deleting: false,
                to_be_deleted: false,
            }
        );
    }

    #[test]
    fn deletion_and_the_autoscaler_taint_are_kept() {
        let mut deleting = node();
        deleting.metadata.deletion_timestamp = Some(Time("2025-01-01T00:00:00Z".parse().unwrap()));
        assert!(NodeInfo::from(deleting).deleting);
        let mut tainted = node();
        tainted.spec.as_mut().unwrap().taints = Some(vec![Taint {
            key: TO_BE_DELETED_TAINT.into(),
            effect: "NoExecute".into(),
            value: Some("1700000000".into()),
            ..Default::default()
        }]);
        assert!(NodeInfo::from(tainted).to_be_deleted);
        assert_eq!(NodeInfo::from(Node::default()), NodeInfo::default());
    }
}
