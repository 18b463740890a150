//! Throwaway test topologies for the integration tests, the sandbox and the
//! benchmarks: network namespaces, cgroups, a bridge "node" with veth "pods", a
//! client outside the cluster on the node's uplink ([`OutsideClient`], [`Lan`]),
//! and spawning processes inside them. Everything is removed on drop, also when
//! a test panics, and names are unique so tests can run in parallel. Needs root.
//!
//! Dual-stack is opt-in: [`Node::dual_stack`] (and [`Node::dual_stack_in_subnet`] for a second
//! node), [`Lan::plug_dual_stack`] and [`OutsideClient::on_lan_dual_stack`] add IPv6 addresses
//! (ULA: pods fd00:10:244::/64, the LAN of the tests fd00:172::/64) beside the IPv4 ones,
//! usable at once ([`ipv6_without_dad`], `nodad`); the plain constructors stay IPv4-only.
//!
//! The Services and EndpointSlices they serve are written with [`objects`].
//!
//! The package's binaries, `lb-probe` (a traffic probe and name-answering server) and
//! `lb-bench` (the benchmark's client and server), are found with [`bin_path`]; a started
//! `lb-agent` is waited for with [`AgentReady`] (its `/healthz` and `lb-agent status`).

mod address;
mod bins;
mod bpffs;
mod cgroup;
pub mod chaos;
mod command;
mod names;
mod netns;
pub mod objects;
mod ready;
mod topology;
mod uplink;

pub use address::{IPV6_SYSCTLS, add_address, host_in, ipv6_without_dad, subnet};
pub use bins::bin_path;
pub use bpffs::BpffsDir;
pub use cgroup::{Cgroup, cgroup2_mount};
pub use command::{command_in, run_checked, spawn_in};
pub use names::{MAX_NAME_LEN, unique_name};
pub use netns::Netns;
pub use ready::{
    AgentReady, AgentStatus, ReadyWait, agent_links, agent_links_for, free_loopback_port,
};
pub use topology::{
    BRIDGE, BRIDGE_IP, BRIDGE_IP6, FIRST_POD_HOST, Node, POD_PREFIX_LEN, POD_PREFIX_LEN6,
    POD_PREFIX6, Pod,
};
pub use uplink::{
    LAN_BRIDGE, Lan, OutsideClient, ROUTER_SYSCTLS, ROUTER_SYSCTLS_V6, Uplink,
    make_dual_stack_router, make_router,
};

/// Fails with a clear message unless running as root (namespaces, veths and
/// cgroups need it).
pub fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        anyhow::bail!(
            "this needs root (euid is {euid}): it creates network namespaces, veth pairs and cgroups"
        );
    }
    Ok(())
}
