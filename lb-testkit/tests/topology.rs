//! Tests of lb-testkit itself. They create real namespaces and cgroups: run as root.

use std::io::{ErrorKind, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lb_testkit::{Cgroup, Netns, Node, require_root, run_checked, spawn_in};

fn netns_list() -> Result<String> {
    run_checked(Command::new("ip").args(["netns", "list"]))
}

fn assert_netns_gone(names: &[String]) -> Result<()> {
    let list = netns_list()?;
    for name in names {
        let listed = list
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name));
        assert!(!listed, "netns {name} still listed:\n{list}");
    }
    Ok(())
}

/// Accepts one connection on `ip` inside `netns` (on this thread), sends a
/// greeting and returns the client's address. Gives up after 10 s.
fn serve_once(netns: &Netns, ip: Ipv4Addr, port_tx: mpsc::Sender<u16>) -> Result<SocketAddr> {
    netns.enter_thread()?;
    let listener = TcpListener::bind((ip, 0))?;
    port_tx.send(listener.local_addr()?.port())?;
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match listener.accept() {
            Ok((mut conn, peer)) => {
                conn.set_nonblocking(false)?;
                conn.write_all(b"hello from a\n")?;
                return Ok(peer);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e).context("accept"),
        }
    }
}

#[test]
fn pods_on_a_node_can_talk_over_tcp() -> Result<()> {
    require_root()?;
    let mut node = Node::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    assert_ne!(a.ip, b.ip);
    let cgroup = Cgroup::new("tk")?;

    thread::scope(|s| -> Result<()> {
        let (port_tx, port_rx) = mpsc::channel();
        let server = s.spawn(|| serve_once(&a.netns, a.ip, port_tx));
        let port = port_rx
            .recv_timeout(Duration::from_secs(10))
            .context("server did not start")?;
        let script = format!("exec 3<>/dev/tcp/{}/{port}; cat <&3", a.ip);
        let out = spawn_in(Some(&b.netns), Some(&cgroup), "bash", &["-c", &script])?
            .wait_with_output()?;
        let peer = server.join().expect("server thread panicked")?;
        assert!(
            out.status.success(),
            "client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from a\n");
        assert_eq!(peer.ip(), b.ip);
        Ok(())
    })?;

    // The node reaches the pods through the bridge too.
    let addrs = b
        .netns
        .run(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"])?;
    assert!(addrs.contains(&format!("{}/24", b.ip)), "{addrs}");
    let routes = a.netns.run(&["ip", "route", "show", "default"])?;
    assert!(
        routes.trim().is_empty(),
        "pods must have no default route: {routes}"
    );
    Ok(())
}

#[test]
fn spawned_process_is_in_the_netns_and_cgroup_and_dies_with_the_cgroup() -> Result<()> {
    require_root()?;
    let netns = Netns::new("tk")?;
    let cgroup = Cgroup::new("tk")?;
    let mut child = spawn_in(Some(&netns), Some(&cgroup), "sleep", &["30"])?;
    let pid = child.id() as i32;

    assert_eq!(cgroup.procs()?, [pid]);
    let child_ns = std::fs::metadata(format!("/proc/{pid}/ns/net"))?.ino();
    assert_eq!(child_ns, std::fs::metadata(netns.path())?.ino());
    assert_eq!(netns.pids()?, [pid]);

    let cgroup_dir = cgroup.path().to_path_buf();
    drop(cgroup);
    let status = child.wait()?;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert!(!cgroup_dir.exists(), "{} left behind", cgroup_dir.display());
    Ok(())
}

#[test]
fn dropping_a_netns_kills_its_processes() -> Result<()> {
    require_root()?;
    let netns = Netns::new("tk")?;
    let mut child = netns.command("sleep").arg("30").spawn()?;
    let name = netns.name().to_string();
    drop(netns);
    assert_eq!(child.wait()?.signal(), Some(libc::SIGKILL));
    assert_netns_gone(&[name])
}

#[test]
fn run_reports_the_failing_command() -> Result<()> {
    require_root()?;
    let netns = Netns::new("tk")?;
    let err = netns
        .run(&["ip", "link", "set", "nosuchdev", "up"])
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("nosuchdev") && msg.contains(netns.name()),
        "{msg}"
    );
    Ok(())
}

#[test]
fn everything_is_removed_on_drop() -> Result<()> {
    require_root()?;
    let (names, cgroup_dir) = {
        let mut node = Node::new()?;
        let a = node.add_pod("a")?;
        let b = node.add_pod("b")?;
        let cgroup = Cgroup::new("tk")?;
        let names = vec![
            node.netns().name().to_string(),
            a.netns.name().into(),
            b.netns.name().into(),
        ];
        let listed = netns_list()?;
        for name in &names {
            assert!(listed.contains(name.as_str()), "{name} not in:\n{listed}");
        }
        (names, cgroup.path().to_path_buf())
    };
    assert_netns_gone(&names)?;
    assert!(!cgroup_dir.exists(), "{} left behind", cgroup_dir.display());
    Ok(())
}

#[test]
fn cleanup_also_happens_when_a_test_panics() -> Result<()> {
    require_root()?;
    let (tx, rx) = mpsc::channel::<(Vec<String>, PathBuf, Child)>();
    let result = thread::spawn(move || {
        let mut node = Node::new().unwrap();
        let pod = node.add_pod("p").unwrap();
        let cgroup = Cgroup::new("tk").unwrap();
        let sleeper = spawn_in(Some(&pod.netns), Some(&cgroup), "sleep", &["30"]).unwrap();
        let names = vec![
            node.netns().name().to_string(),
            pod.netns.name().to_string(),
        ];
        tx.send((names, cgroup.path().to_path_buf(), sleeper))
            .unwrap();
        panic!("deliberate panic to test cleanup");
    })
    .join();
    assert!(result.is_err());
    let (names, cgroup_dir, mut sleeper) = rx.recv()?;
    assert_eq!(sleeper.wait()?.signal(), Some(libc::SIGKILL));
    assert_netns_gone(&names)?;
    if cgroup_dir.exists() {
        bail!("{} left behind", cgroup_dir.display());
    }
    Ok(())
}
