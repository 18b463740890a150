//! Tests of the outside client and the LAN: real namespaces and veth pairs, run as root.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lb_testkit::{Lan, Netns, Node, OutsideClient, Uplink, require_root};

/// Accepts one connection on `ip` in `netns` (on this thread), says hello and returns the
/// client's address. Gives up after 10 s.
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
                conn.write_all(b"hello")?;
                return Ok(peer);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e).context("accept"),
        }
    }
}

/// Connects from `client` to a server at `ip` in `server` and returns the address the server
/// saw.
fn connect(client: &Netns, server: &Netns, ip: Ipv4Addr) -> Result<SocketAddr> {
    thread::scope(|s| {
        let (port_tx, port_rx) = mpsc::channel();
        let accepted = s.spawn(|| serve_once(server, ip, port_tx));
        let port = port_rx
            .recv_timeout(Duration::from_secs(10))
            .context("server did not start")?;
        let greeting = s
            .spawn(move || -> Result<String> {
                client.enter_thread()?;
                let mut conn = TcpStream::connect_timeout(
                    &SocketAddr::from((ip, port)),
                    Duration::from_secs(5),
                )?;
                let mut text = String::new();
                conn.read_to_string(&mut text)?;
                Ok(text)
            })
            .join()
            .expect("client thread")?;
        assert_eq!(greeting, "hello");
        accepted.join().expect("server thread")
    })
}

fn links(netns: &Netns) -> Result<String> {
    netns.run(&["ip", "-br", "link"])
}

#[test]
fn an_outside_client_reaches_the_node_over_its_uplink_and_goes_with_its_link() -> Result<()> {
    require_root()?;
    let node = Node::new()?;
    let uplink = Uplink {
        node_iface: "ext0",
        node_ip: Ipv4Addr::new(192, 168, 77, 1),
        client_iface: "eth0",
        client_ip: Ipv4Addr::new(192, 168, 77, 100),
        prefix_len: 24,
    };
    let client = OutsideClient::direct(Netns::new("out")?, node.netns(), &uplink)?;
    assert_eq!(client.subnet(), "192.168.77.0/24");
    assert_eq!((client.iface(), client.ip()), ("eth0", uplink.client_ip));

    let peer = connect(client.netns(), node.netns(), uplink.node_ip)?;
    assert_eq!(peer.ip(), uplink.client_ip);
    // Only the subnet's routes: no default route on either side.
    for netns in [client.netns(), node.netns()] {
        let routes = netns.run(&["ip", "route", "show", "default"])?;
        assert!(routes.trim().is_empty(), "{}: {routes}", netns.name());
    }
    // A route the caller adds.
    client.route("198.51.100.10/32", uplink.node_ip)?;
    let route = client
        .netns()
        .run(&["ip", "route", "get", "198.51.100.10"])?;
    assert!(route.contains("via 192.168.77.1 dev eth0"), "{route}");

    assert!(links(node.netns())?.contains("ext0"));
    drop(client);
    let left = links(node.netns())?;
    assert!(!left.contains("ext0"), "the node's end is left: {left}");
    Ok(())
}

#[test]
fn a_lan_joins_clients_and_nodes_and_takes_their_lan_interfaces_with_it() -> Result<()> {
    require_root()?;
    let lan = Lan::new()?;
    let node_a = Netns::new("na")?;
    let node_b = Netns::new("nb")?;
    let (a_ip, b_ip) = (
        Ipv4Addr::new(192, 168, 60, 1),
        Ipv4Addr::new(192, 168, 60, 2),
    );
    lan.plug(&node_a, "lan0", a_ip, 24)?;
    lan.plug(&node_b, "lan0", b_ip, 24)?;
    let client_ip = Ipv4Addr::new(192, 168, 60, 100);
    let client = OutsideClient::on_lan(Netns::new("cli")?, &lan, "lan0", client_ip, 24)?;

    for (node, ip) in [(&node_a, a_ip), (&node_b, b_ip)] {
        assert_eq!(connect(client.netns(), node, ip)?.ip(), client_ip);
    }
    assert_eq!(connect(&node_a, &node_b, b_ip)?.ip(), a_ip);
    let bridged = lan
        .netns()
        .run(&["ip", "-br", "link", "show", "master", "lanbr"])?;
    assert_eq!(bridged.lines().count(), 3, "{bridged}");

    drop(client);
    drop(lan);
    for node in [&node_a, &node_b] {
        let left = links(node)?;
        assert!(!left.contains("lan0"), "{}: {left}", node.name());
    }
    Ok(())
}

#[test]
fn overlong_interface_names_are_refused_before_anything_is_made() -> Result<()> {
    require_root()?;
    let lan = Lan::new()?;
    let member = Netns::new("m")?;
    let error = lan
        .plug(
            &member,
            "a-very-long-interface",
            Ipv4Addr::new(192, 168, 1, 1),
            24,
        )
        .unwrap_err();
    assert!(format!("{error:#}").contains("longer than 15"), "{error:#}");
    assert!(
        lan.netns()
            .run(&["ip", "-br", "link", "show", "master", "lanbr"])?
            .trim()
            .is_empty()
    );
    Ok(())
}
