//! lb-probe: a traffic probe and a name-answering server for the tests, the
//! sandbox and the benchmarks.
//!
//! `lb-probe serve --name NAME --tcp PORT --udp PORT [--bind ADDR]...` answers every TCP
//! request with a minimal HTTP response whose body is `NAME\n` (so
//! `curl http://ClusterIP/` works, like Kubernetes' serve_hostname image) and
//! every UDP datagram with `NAME\n`. A request starting with `WHOAMI` gets the
//! client's address as the server sees it (`IP:PORT\n`) instead. A UDP request whose
//! first line is `BIG N` gets its answer (to the rest) padded with spaces to N bytes, so
//! a reply can be made big enough to fragment. It prints `ready` once all sockets are
//! bound and runs until killed. Each `--bind` address (default 0.0.0.0) gets its own sockets;
//! an IPv6 one is IPv6-only, so `--bind 0.0.0.0 --bind ::` serves both families on one port
//! with each client seen in its own family (an IPv4 client as `10.244.0.5:PORT`, not
//! `[::ffff:10.244.0.5]:PORT`).
//!
//! `lb-probe tcp|udp ADDR:PORT ...` makes a series of requests and prints one
//! JSON object: how many attempts, which names answered, which errors
//! happened, which peer addresses the sockets saw (`peers`: getpeername for TCP and connected
//! UDP, the reply's source from recvfrom for unconnected UDP), for UDP the reply's source as
//! recvfrom shows it in both modes (`sources`), and the local addresses the sockets had
//! (`locals`, getsockname, address only). An IPv6 target is reached from an `AF_INET6` socket;
//! an IPv4-mapped one (`[::ffff:10.96.0.10]:80`) from an `AF_INET6` socket that is not
//! IPv6-only, so the kernel's IPv4 path carries it, and its peers show mapped
//! (`[::ffff:10.96.0.10]:80`). It exits 0 even when requests failed; the caller asserts on the
//! JSON.
//!
//! `lb-probe bind tcp|udp ADDR:PORT` binds one socket (a TCP listener or a UDP
//! socket), closes it again and prints `{"bound": true}` or
//! `{"bound": false, "errno": N, "error": "..."}`; it exits 0 either way.

use std::collections::BTreeMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket,
};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use socket2::{Domain, Protocol, Socket, Type};

/// Longest request the server reads.
const MAX_REQUEST: usize = 4096;
/// How long the server waits for a request (and for the client to close).
const SERVER_IO_TIMEOUT: Duration = Duration::from_secs(2);
/// What the TCP client sends unless asked for WHOAMI.
const HTTP_REQUEST: &[u8] = b"GET / HTTP/1.0\r\n\r\n";
const WHOAMI: &[u8] = b"WHOAMI";
/// A UDP request's first line `BIG N`: pad the reply to N bytes.
const BIG: &[u8] = b"BIG ";

#[derive(Parser)]
#[command(name = "lb-probe", about = "Traffic probe and name-answering server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer TCP (HTTP) and UDP requests with NAME until killed.
    Serve(ServeArgs),
    /// Make sequential TCP connections and report the answers as JSON.
    Tcp(TcpArgs),
    /// Send UDP requests and report the answers as JSON.
    Udp(UdpArgs),
    /// Bind one socket and report whether the bind succeeded, as JSON.
    Bind(BindArgs),
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BindProtocol {
    Tcp,
    Udp,
}

#[derive(Args)]
struct BindArgs {
    #[arg(value_enum)]
    protocol: BindProtocol,
    /// The address to bind.
    #[arg(value_name = "ADDR:PORT")]
    address: SocketAddr,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("listeners").required(true).multiple(true).args(["tcp", "udp"])))]
struct ServeArgs {
    /// The name to answer with.
    #[arg(long)]
    name: String,
    /// A TCP port to listen on (repeatable).
    #[arg(long = "tcp", value_name = "PORT")]
    tcp: Vec<u16>,
    /// A UDP port to listen on (repeatable).
    #[arg(long = "udp", value_name = "PORT")]
    udp: Vec<u16>,
    /// An address to bind every port on (repeatable: one socket each; an IPv6 address binds
    /// an IPv6-only socket).
    #[arg(long = "bind", value_name = "ADDR", default_values_t = [IpAddr::V4(Ipv4Addr::UNSPECIFIED)])]
    bind: Vec<IpAddr>,
}

#[derive(Args)]
struct LoopArgs {
    /// Stop after N requests (default 1 unless --duration-ms is given).
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Stop after D milliseconds.
    #[arg(long, value_name = "D")]
    duration_ms: Option<u64>,
    /// Sleep I milliseconds between requests.
    #[arg(long, value_name = "I", default_value_t = 0)]
    interval_ms: u64,
    /// Per-request connect/send/receive timeout in milliseconds.
    #[arg(long, value_name = "T", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..))]
    timeout_ms: u64,
    /// Send `WHOAMI` so that replies are the source address the server saw.
    #[arg(long)]
    whoami: bool,
}

#[derive(Args)]
struct TcpArgs {
    /// Where to connect.
    #[arg(value_name = "ADDR:PORT")]
    target: SocketAddr,
    /// Instead of a request, hold each connection open for H milliseconds without sending,
    /// and record how it ended: `timeout` when it was still open, `reset` when it was
    /// aborted or reset, an error `other:closed` when the server closed it.
    #[arg(long, value_name = "H")]
    hold_ms: Option<u64>,
    #[command(flatten)]
    run: LoopArgs,
}

#[derive(Args)]
struct UdpArgs {
    /// Where to send.
    #[arg(value_name = "ADDR:PORT")]
    target: SocketAddr,
    /// Use connect + send + recv (records peer_addr) instead of send_to + recv_from
    /// (records the reply's source address).
    #[arg(long)]
    connected: bool,
    /// Open a fresh socket for every request.
    #[arg(long)]
    new_socket_each: bool,
    /// Bind the socket to this source address first (default: the wildcard, the kernel
    /// picks the source after routing).
    #[arg(long, value_name = "ADDR")]
    source: Option<IpAddr>,
    /// After an error other than a timeout (the socket was destroyed, say), open a new
    /// socket for the next request, as an application reconnecting would.
    #[arg(long)]
    reopen_on_error: bool,
    /// Pad each request with spaces to N bytes (a datagram bigger than the MTU fragments).
    #[arg(long, value_name = "N")]
    size: Option<usize>,
    /// Ask the server for replies of N bytes (`BIG N`); a reply of another size counts as
    /// the error `other:reply size`.
    #[arg(long, value_name = "N")]
    reply_size: Option<usize>,
    #[command(flatten)]
    run: LoopArgs,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => match serve(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lb-probe serve: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Tcp(args) => report(probe_tcp(&args)),
        Command::Udp(args) => report(probe_udp(&args)),
        Command::Bind(args) => {
            let outcome = match args.protocol {
                BindProtocol::Tcp => TcpListener::bind(args.address).map(drop),
                BindProtocol::Udp => UdpSocket::bind(args.address).map(drop),
            };
            let json = match outcome {
                Ok(()) => serde_json::json!({ "bound": true }),
                Err(e) => serde_json::json!({
                    "bound": false,
                    "errno": e.raw_os_error(),
                    "error": e.to_string(),
                }),
            };
            println!("{json}");
            ExitCode::SUCCESS
        }
    }
}

// ---------------------------------------------------------------- server

/// Binds every listener, prints `ready`, then serves until killed.
fn serve(args: &ServeArgs) -> io::Result<()> {
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for &ip in &args.bind {
        tcp.extend(bind_all(
            &args.tcp,
            |port| tcp_listener((ip, port).into()),
            "tcp",
        )?);
        udp.extend(bind_all(
            &args.udp,
            |port| udp_bound((ip, port).into()),
            "udp",
        )?);
    }
    let mut workers = Vec::new();
    for listener in tcp {
        let name = args.name.clone();
        workers.push(thread::spawn(move || serve_tcp(&listener, &name)));
    }
    for socket in udp {
        let name = args.name.clone();
        workers.push(thread::spawn(move || serve_udp(&socket, &name)));
    }
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "ready")?;
    stdout.flush()?;
    for worker in workers {
        let _ = worker.join();
    }
    Ok(())
}

/// A socket of `address`'s family; an IPv6 one IPv6-only when `v6_only` (a server's), or
/// explicitly not (a client's, so an IPv4-mapped peer goes over IPv4).
fn socket_for(
    address: SocketAddr,
    kind: Type,
    protocol: Protocol,
    v6_only: bool,
) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(address), kind, Some(protocol))?;
    if address.is_ipv6() {
        socket.set_only_v6(v6_only)?;
    }
    Ok(socket)
}

/// A TCP listener on `address`, as `TcpListener::bind` makes it (SO_REUSEADDR), IPv6-only for
/// an IPv6 address.
fn tcp_listener(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket_for(address, Type::STREAM, Protocol::TCP, true)?;
    socket.set_reuse_address(true)?;
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// A UDP socket bound to `address`, IPv6-only for an IPv6 address.
fn udp_bound(address: SocketAddr) -> io::Result<UdpSocket> {
    let socket = socket_for(address, Type::DGRAM, Protocol::UDP, true)?;
    socket.bind(&address.into())?;
    Ok(socket.into())
}

fn bind_all<S>(
    ports: &[u16],
    bind: impl Fn(u16) -> io::Result<S>,
    proto: &str,
) -> io::Result<Vec<S>> {
    ports
        .iter()
        .map(|&port| {
            bind(port)
                .map_err(|e| io::Error::new(e.kind(), format!("bind {proto} port {port}: {e}")))
        })
        .collect()
}

fn serve_tcp(listener: &TcpListener, name: &str) {
    loop {
        match listener.accept() {
            Ok((conn, peer)) => {
                let name = name.to_string();
                thread::spawn(move || handle_tcp(conn, peer, &name));
            }
            // Out of descriptors or an aborted handshake: back off a little.
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Reads the request, answers with an HTTP response, and closes gracefully.
fn handle_tcp(mut conn: TcpStream, peer: SocketAddr, name: &str) {
    let _ = conn.set_read_timeout(Some(SERVER_IO_TIMEOUT));
    let _ = conn.set_write_timeout(Some(SERVER_IO_TIMEOUT));
    let request = read_request(&mut conn);
    let body = reply_body(&request, peer, name);
    let response = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if conn.write_all(response.as_bytes()).is_ok() {
        // Half-close, then drain until the client closes, so unread request
        // bytes never turn our close into a reset.
        let _ = conn.shutdown(Shutdown::Write);
        let mut sink = [0u8; 1024];
        while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
    }
}

/// Reads until the end of the HTTP headers, a full WHOAMI line, EOF, 4 KiB or the timeout.
fn read_request(conn: &mut TcpStream) -> Vec<u8> {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while request.len() < MAX_REQUEST && !request_complete(&request) {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => request.extend_from_slice(&buf[..n.min(MAX_REQUEST - request.len())]),
        }
    }
    request
}

fn request_complete(request: &[u8]) -> bool {
    find(request, b"\r\n\r\n").is_some()
        || (request.starts_with(WHOAMI) && request.contains(&b'\n'))
}

/// `NAME\n`, or the client's `IP:PORT\n` for a WHOAMI request.
fn reply_body(request: &[u8], peer: SocketAddr, name: &str) -> String {
    if request.starts_with(WHOAMI) {
        format!("{peer}\n")
    } else {
        format!("{name}\n")
    }
}

/// The answer to a UDP request: `reply_body`, padded to N bytes after a `BIG N` line.
fn udp_reply(request: &[u8], peer: SocketAddr, name: &str) -> Vec<u8> {
    let Some(rest) = request.strip_prefix(BIG) else {
        return reply_body(request, peer, name).into_bytes();
    };
    let line_end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
    let size: usize = String::from_utf8_lossy(&rest[..line_end])
        .trim()
        .parse()
        .unwrap_or(0);
    let body = rest.get(line_end + 1..).unwrap_or_default();
    let mut reply = reply_body(body, peer, name).into_bytes();
    if reply.len() < size {
        reply.resize(size.min(65_507), b' ');
    }
    reply
}

fn serve_udp(socket: &UdpSocket, name: &str) {
    let mut buf = vec![0u8; 65536];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((n, peer)) => {
                let _ = socket.send_to(&udp_reply(&buf[..n], peer, name), peer);
            }
            Err(_) => thread::sleep(Duration::from_millis(1)),
        }
    }
}

// ---------------------------------------------------------------- clients

/// What a series of requests saw; printed as one JSON object.
#[derive(Default)]
struct Tally {
    attempts: u64,
    replies: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    peers: BTreeMap<String, u64>,
    sources: BTreeMap<String, u64>,
    locals: BTreeMap<String, u64>,
    first_error: Option<String>,
}

impl Tally {
    fn reply(&mut self, name: String) {
        *self.replies.entry(name).or_default() += 1;
    }

    fn peer(&mut self, peer: SocketAddr) {
        *self.peers.entry(peer.to_string()).or_default() += 1;
    }

    /// A UDP reply's source as recvfrom gave it.
    fn source(&mut self, source: SocketAddr) {
        *self.sources.entry(source.to_string()).or_default() += 1;
    }

    /// The socket's own address (getsockname), without the port.
    fn local(&mut self, local: io::Result<SocketAddr>) {
        if let Ok(local) = local {
            *self.locals.entry(local.ip().to_string()).or_default() += 1;
        }
    }

    fn error(&mut self, what: &str, e: &io::Error) {
        let kind = error_kind(e);
        if self.first_error.is_none() {
            // A receive timeout surfaces as EAGAIN; say what it means.
            let detail = match e.kind() {
                ErrorKind::WouldBlock => "timed out waiting for data".to_string(),
                _ => e.to_string(),
            };
            self.first_error = Some(format!("attempt {}: {what}: {detail}", self.attempts + 1));
        }
        *self.errors.entry(kind).or_default() += 1;
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "attempts": self.attempts,
            "replies": self.replies,
            "errors": self.errors,
            "peers": self.peers,
            "sources": self.sources,
            "locals": self.locals,
            "first_error": self.first_error,
        })
    }
}

/// A short, stable name for an I/O error.
fn error_kind(e: &io::Error) -> String {
    let kind = match e.kind() {
        ErrorKind::ConnectionRefused => "refused",
        ErrorKind::TimedOut | ErrorKind::WouldBlock => "timeout",
        ErrorKind::NetworkUnreachable | ErrorKind::HostUnreachable => "unreachable",
        ErrorKind::PermissionDenied => "permission",
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
            "reset"
        }
        _ => {
            return match e.raw_os_error() {
                Some(errno) => format!("other:errno {errno}"),
                None => format!("other:{e}"),
            };
        }
    };
    kind.to_string()
}

fn report(tally: Tally) -> ExitCode {
    println!("{}", tally.to_json());
    ExitCode::SUCCESS
}

/// Calls `attempt` until the count or the duration is used up, sleeping the
/// interval in between. Without either limit, makes one attempt.
fn run_loop(args: &LoopArgs, tally: &mut Tally, mut attempt: impl FnMut(&mut Tally)) {
    let deadline = args
        .duration_ms
        .map(|d| Instant::now() + Duration::from_millis(d));
    let count = match (args.count, deadline) {
        (None, None) => Some(1),
        (count, _) => count,
    };
    let interval = Duration::from_millis(args.interval_ms);
    loop {
        let out_of_time = deadline.is_some_and(|d| Instant::now() >= d);
        if out_of_time || count.is_some_and(|c| tally.attempts >= c) {
            return;
        }
        attempt(tally);
        tally.attempts += 1;
        if !interval.is_zero() && count.is_none_or(|c| tally.attempts < c) {
            let left = deadline.map_or(interval, |d| d.saturating_duration_since(Instant::now()));
            thread::sleep(interval.min(left));
        }
    }
}

fn request_payload(args: &LoopArgs, http: bool) -> &'static [u8] {
    match (args.whoami, http) {
        (true, _) => b"WHOAMI\r\n\r\n",
        (false, true) => HTTP_REQUEST,
        (false, false) => b"HELLO\n",
    }
}

fn probe_tcp(args: &TcpArgs) -> Tally {
    let timeout = Duration::from_millis(args.run.timeout_ms);
    let payload = request_payload(&args.run, true);
    let mut tally = Tally::default();
    run_loop(&args.run, &mut tally, |tally| match args.hold_ms {
        Some(hold) => tcp_hold(args.target, timeout, Duration::from_millis(hold), tally),
        None => tcp_once(args.target, timeout, payload, tally),
    });
    tally
}

/// One connection held open without a request for `hold`; how it ended is recorded.
fn tcp_hold(target: SocketAddr, timeout: Duration, hold: Duration, tally: &mut Tally) {
    let mut conn = match tcp_connect(target, timeout) {
        Ok(conn) => conn,
        Err(e) => return tally.error(&format!("connect {target}"), &e),
    };
    if let Ok(peer) = conn.peer_addr() {
        tally.peer(peer);
    }
    tally.local(conn.local_addr());
    let mut buf = [0u8; 64];
    let ended = conn
        .set_read_timeout(Some(hold.max(Duration::from_millis(1))))
        .and_then(|()| conn.read(&mut buf));
    match ended {
        Ok(_) => tally.error("hold", &io::Error::other("closed")),
        Err(e) => tally.error("hold", &e),
    }
}

/// One connection: connect, send the request, read to EOF, record the body.
fn tcp_once(target: SocketAddr, timeout: Duration, payload: &[u8], tally: &mut Tally) {
    let mut conn = match tcp_connect(target, timeout) {
        Ok(conn) => conn,
        Err(e) => return tally.error(&format!("connect {target}"), &e),
    };
    if let Ok(peer) = conn.peer_addr() {
        tally.peer(peer);
    }
    tally.local(conn.local_addr());
    let exchange = (|| {
        conn.set_read_timeout(Some(timeout))?;
        conn.set_write_timeout(Some(timeout))?;
        conn.write_all(payload)?;
        let mut response = Vec::new();
        conn.read_to_end(&mut response)?;
        Ok::<_, io::Error>(response)
    })();
    match exchange {
        Ok(response) if response.is_empty() => tally.error("exchange", &empty_reply()),
        Ok(response) => tally.reply(http_body(&response)),
        Err(e) => tally.error("exchange", &e),
    }
}

/// A connection to `target` from a socket of its family (`AF_INET6`, not IPv6-only, for an
/// IPv6 or IPv4-mapped target), as `TcpStream::connect_timeout` makes it.
fn tcp_connect(target: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let socket = socket_for(target, Type::STREAM, Protocol::TCP, false)?;
    socket.connect_timeout(&target.into(), timeout)?;
    Ok(socket.into())
}

fn empty_reply() -> io::Error {
    io::Error::new(ErrorKind::UnexpectedEof, "empty reply")
}

/// The body after the headers (the whole response if there are none), trimmed.
fn http_body(response: &[u8]) -> String {
    let body = find(response, b"\r\n\r\n").map_or(response, |i| &response[i + 4..]);
    String::from_utf8_lossy(body).trim().to_string()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn probe_udp(args: &UdpArgs) -> Tally {
    let timeout = Duration::from_millis(args.run.timeout_ms);
    let mut payload = Vec::new();
    if let Some(size) = args.reply_size {
        payload.extend(format!("BIG {size}\n").as_bytes());
    }
    payload.extend(request_payload(&args.run, false));
    if let Some(size) = args.size {
        payload.resize(payload.len().max(size), b' ');
    }
    let payload = &payload[..];
    let mut tally = Tally::default();
    let mut shared: Option<UdpSocket> = None;
    run_loop(&args.run, &mut tally, |tally| {
        if args.new_socket_each {
            shared = None;
        }
        if shared.is_none() {
            match udp_socket(args, timeout) {
                Ok(socket) => shared = Some(socket),
                Err(e) => return tally.error(&format!("udp socket for {}", args.target), &e),
            }
        }
        if let Some(socket) = &shared
            && let Err(kind) = udp_once(socket, args, payload, tally)
            && args.reopen_on_error
            && !matches!(kind, ErrorKind::WouldBlock | ErrorKind::TimedOut)
        {
            shared = None;
        }
    });
    tally
}

/// A socket on `--source` or the wildcard address of the target's family (`AF_INET6`, not
/// IPv6-only, for an IPv6 or IPv4-mapped target), connected to the target in `--connected`
/// mode.
fn udp_socket(args: &UdpArgs, timeout: Duration) -> io::Result<UdpSocket> {
    let any: IpAddr = match args.target {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let local = SocketAddr::new(args.source.unwrap_or(any), 0);
    let socket = socket_for(args.target, Type::DGRAM, Protocol::UDP, false)?;
    socket.bind(&local.into())?;
    let socket = UdpSocket::from(socket);
    socket.set_read_timeout(Some(timeout))?;
    if args.connected {
        socket.connect(args.target)?;
    }
    Ok(socket)
}

/// One request/reply. Unconnected mode records the reply's source address
/// (what the recvmsg hook rewrites) as the peer; connected mode records `peer_addr()`
/// (getpeername). Both record the reply's source as recvfrom shows it, and the socket's own
/// address. Returns the error's kind when it failed.
fn udp_once(
    socket: &UdpSocket,
    args: &UdpArgs,
    payload: &[u8],
    tally: &mut Tally,
) -> Result<(), ErrorKind> {
    drain_stale_replies(socket);
    let mut buf = vec![0u8; 65_536];
    let result = if args.connected {
        socket
            .send(payload)
            .and_then(|_| socket.recv_from(&mut buf))
            .and_then(|(n, source)| Ok((n, source, socket.peer_addr()?)))
    } else {
        socket
            .send_to(payload, args.target)
            .and_then(|_| socket.recv_from(&mut buf))
            .map(|(n, source)| (n, source, source))
    };
    if result.is_ok() {
        tally.local(socket.local_addr());
    }
    match result {
        Ok((n, source, peer)) if args.reply_size.is_some_and(|size| size != n) => {
            tally.peer(peer);
            tally.source(source);
            let e = io::Error::other("reply size");
            tally.error(&format!("udp {}: a reply of {n} bytes", args.target), &e);
            Err(e.kind())
        }
        Ok((n, source, peer)) => {
            tally.peer(peer);
            tally.source(source);
            tally.reply(String::from_utf8_lossy(&buf[..n]).trim().to_string());
            Ok(())
        }
        Err(e) => {
            tally.error(&format!("udp {}", args.target), &e);
            Err(e.kind())
        }
    }
}

/// Discards late replies to earlier, timed-out requests so they are not
/// counted as the answer to the next one.
fn drain_stale_replies(socket: &UdpSocket) {
    if socket.set_nonblocking(true).is_err() {
        return;
    }
    let mut buf = [0u8; 2048];
    while socket.recv_from(&mut buf).is_ok() {}
    let _ = socket.set_nonblocking(false);
}
