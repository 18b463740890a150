//! lb-agent: programs the eBPF Service load balancer from Kubernetes objects.
//!
//! The data path reads top to bottom: [`source`] (objects) → [`model`] (desired state) →
//! [`reconcile`] (diff and write order) → [`dataplane`] (maps and programs in the kernel).
pub mod agent;
pub mod api;
pub mod cidr;
pub mod dataplane;
pub mod describe;
pub mod fuzzing;
pub mod list;
pub mod model;
pub mod reconcile;
pub mod source;
pub mod status;
