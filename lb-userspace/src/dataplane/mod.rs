//! Loading, attaching and pinning the eBPF programs, and reading and writing their maps
//! through the `lb-common` types. Nothing here knows Kubernetes.
pub mod batch;
pub mod bpffs;
pub mod inspect;
pub mod links;
pub mod loader;
pub mod lock;
pub mod maps;
pub mod migrate;
pub mod names;
pub mod nodeport;
pub mod privileges;
pub mod reasons;
pub mod stats;
mod sys;

pub use loader::{Dataplane, Limits};
pub use maps::BpfServiceMaps;
