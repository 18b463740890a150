//! Waiting until a started `lb-agent` is ready, from what it serves rather than from the
//! wording of its log: its `/healthz` answers 200, and `lb-agent status -o json` (which reads
//! the pinned links, and asks `/healthz` too) shows every program linked, each link running a
//! program that was not linked before the agent started.
//!
//! `/healthz` alone does not do: it answers 200 from the end of the agent's first sync, and
//! the agent attaches its programs right after that sync. Links alone do not do either: after
//! a restart the pins of the earlier agent are there from the start, until the new agent
//! swaps its own programs in.

use std::collections::{BTreeSet, HashSet};
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Child;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::{Netns, command_in, run_checked};

/// The links an agent pins: its eight socket-address programs (four per family),
/// sock_release and post_bind4/6 (bind protection) on the cgroup, and XDP and tc on each
/// `--nodeport-iface`.
pub fn agent_links(nodeport_ifaces: usize) -> usize {
    11 + 2 * nodeport_ifaces
}

/// [`agent_links`] of an agent started with the arguments `args`: two fewer with
/// `--bind-protection=false`, and one fewer per interface with `--tc-attach netlink`.
pub fn agent_links_for<S: AsRef<str>>(args: &[S]) -> usize {
    let ifaces = args
        .iter()
        .filter(|a| a.as_ref() == "--nodeport-iface")
        .count();
    let unprotected = args.iter().any(|a| a.as_ref() == "--bind-protection=false");
    // A netlink tc filter is no link: one pin fewer per interface.
    let netlink_tc = args.iter().any(|a| a.as_ref() == "--tc-attach=netlink")
        || args
            .windows(2)
            .any(|w| w[0].as_ref() == "--tc-attach" && w[1].as_ref() == "netlink");
    agent_links(ifaces) - 2 * usize::from(unprotected) - if netlink_tc { ifaces } else { 0 }
}

/// A TCP port on 127.0.0.1 that is free now and that this process has not handed out before:
/// for the `--healthz-addr` and `--metrics-addr` of agents that share this network namespace
/// (tests run side by side). The port is bound and released again (its socket had no
/// connection, so nothing lingers); another process could take it in between, which the
/// agent would report as a failure to bind.
pub fn free_loopback_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding 127.0.0.1:0");
        let port = listener.local_addr().expect("a bound address").port();
        if GIVEN.lock().expect("ports lock").insert(port) {
            return port;
        }
    }
}

/// Where an agent is, to wait for it: its binary (for `lb-agent status`), its `--bpffs`, its
/// `--healthz-addr` as seen from `netns` (the namespace it runs in; `None`: this one), and how
/// many links it pins ([`agent_links`]).
#[derive(Clone, Copy, Debug)]
pub struct AgentReady<'a> {
    pub agent: &'a Path,
    pub bpffs: &'a Path,
    pub healthz: SocketAddr,
    pub netns: Option<&'a Netns>,
    pub links: usize,
}

/// What `lb-agent status -o json` reported: the agent's `/healthz` answer as it saw it, and
/// the pinned links (program name, program id).
#[derive(Clone, Debug)]
pub struct AgentStatus {
    pub healthy: bool,
    pub links: Vec<(String, Option<u32>)>,
    pub json: serde_json::Value,
}

/// An [`AgentReady`] that knows which programs were linked before the agent started.
#[derive(Debug)]
pub struct ReadyWait<'a> {
    ready: AgentReady<'a>,
    earlier: HashSet<u32>,
}

impl<'a> AgentReady<'a> {
    /// Call before starting the agent: notes the programs linked now (an earlier agent's, left
    /// pinned), which the new agent must have replaced to be ready.
    pub fn before_start(self) -> Result<ReadyWait<'a>> {
        let earlier = self
            .status()?
            .links
            .iter()
            .filter_map(|(_, id)| *id)
            .collect();
        Ok(ReadyWait {
            ready: self,
            earlier,
        })
    }

    /// Runs `lb-agent status -o json` in the agent's namespace.
    pub fn status(&self) -> Result<AgentStatus> {
        let mut cmd = command_in(self.netns, None, self.agent)?;
        cmd.arg("status")
            .arg("--bpffs")
            .arg(self.bpffs)
            .arg("--healthz-addr")
            .arg(self.healthz.to_string())
            .args(["-o", "json"])
            .env("RUST_BACKTRACE", "0");
        let out = run_checked(&mut cmd)?;
        let json: serde_json::Value = serde_json::from_str(&out)
            .with_context(|| format!("`lb-agent status -o json` printed no JSON: {out}"))?;
        let links = json["links"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|link| {
                let program = link["program"].as_str().unwrap_or("?").to_owned();
                let id = link["program_id"]
                    .as_u64()
                    .and_then(|id| u32::try_from(id).ok());
                (program, id)
            })
            .collect();
        Ok(AgentStatus {
            healthy: json["agent"]["healthy"] == true,
            links,
            json,
        })
    }

    /// `GET /healthz` in the agent's namespace: the status code and the body.
    pub fn healthz(&self) -> Result<(u16, String)> {
        let address = self.healthz;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    if let Some(netns) = self.netns {
                        netns.enter_thread()?;
                    }
                    http_get(address, "/healthz")
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the /healthz request panicked"))?
        })
    }
}

impl ReadyWait<'_> {
    /// Waits until the agent `child` is ready: `/healthz` answers 200 and its status shows at
    /// least the expected links, each running a program not linked before it started. Fails
    /// when `child` exits first or `timeout` passes, saying what was seen last.
    pub fn wait(&self, child: &mut Child, timeout: Duration) -> Result<AgentStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("lb-agent exited ({status}) before it was ready");
            }
            let last = match self.ready.healthz() {
                Ok((200, _)) => {
                    let status = self.ready.status()?;
                    if self.is_ready(&status) {
                        return Ok(status);
                    }
                    format!(
                        "/healthz answers 200; `lb-agent status` shows {} (wanted at least {} \
                         links, none running a program linked before the start: {:?}){}",
                        describe_links(&status),
                        self.ready.links,
                        self.earlier,
                        if status.healthy {
                            ""
                        } else {
                            ", and not healthy"
                        }
                    )
                }
                Ok((code, body)) => format!("/healthz answers {code}: {}", body.trim()),
                Err(error) => format!("no answer on /healthz at {}: {error:#}", self.ready.healthz),
            };
            if Instant::now() >= deadline {
                bail!("lb-agent was not ready within {timeout:?}: {last}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn is_ready(&self, status: &AgentStatus) -> bool {
        status.healthy
            && status.links.len() >= self.ready.links
            && status
                .links
                .iter()
                .all(|(_, id)| id.is_some_and(|id| !self.earlier.contains(&id)))
    }
}

fn describe_links(status: &AgentStatus) -> String {
    if status.links.is_empty() {
        return "no links".into();
    }
    let links: Vec<String> = status
        .links
        .iter()
        .map(|(program, id)| match id {
            Some(id) => format!("{program} (program {id})"),
            None => format!("{program} (program ?)"),
        })
        .collect();
    format!("{} links: {}", links.len(), links.join(", "))
}

/// A plain HTTP/1.0 GET: the status code and the body.
fn http_get(address: SocketAddr, path: &str) -> Result<(u16, String)> {
    let timeout = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&address, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP answer: {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::{agent_links, agent_links_for, free_loopback_port};

    #[test]
    fn ports_are_not_handed_out_twice() {
        let ports: BTreeSet<u16> = (0..50).map(|_| free_loopback_port()).collect();
        assert_eq!(ports.len(), 50);
        assert!(!ports.contains(&0));
    }

    #[test]
    fn links_of_the_socket_programs_and_each_interface() {
        assert_eq!(agent_links(0), 11);
        assert_eq!(agent_links(2), 15);
        assert_eq!(agent_links_for(&["--nodeport-iface", "lan0"]), 13);
        assert_eq!(
            agent_links_for(&["--bind-protection=false", "--nodeport-iface", "a"]),
            11
        );
    }
}
