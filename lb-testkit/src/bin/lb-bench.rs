//! lb-bench: the client/server pair of `cargo xtask bench` (netperf is not packaged here).
//!
//! `lb-bench serve --id N --port P [--bind ADDR]...` answers on TCP and UDP port P of each
//! `--bind` address (default 0.0.0.0; an IPv6 one IPv6-only, so `--bind 0.0.0.0 --bind ::`
//! serves both families): every byte received on a TCP connection is answered with the one
//! byte N (so a client knows which backend it reached), every UDP datagram with the byte N. It
//! prints `ready` once bound.
//!
//! The clients run for `--duration-ms` and print one JSON object:
//! - `crr`: TCP_CRR, connect, 1-byte request, 1-byte reply, close (the client closes first),
//!   sequentially, to a `--target` picked at random each time when several are given;
//! - `rr`: TCP_RR, one connection, lock-step 1-byte exchanges;
//! - `udp`: UDP request/reply, `--connected` (connect + send + recv) or unconnected
//!   (send_to + recv_from) on one socket of the target's family;
//! - `watch`: like `crr`, recording which backend answered when (wall clock, ns since the
//!   epoch) as runs of consecutive answers from the same backend, for programming latency.
//!
//! Latencies are per exchange (connect to close for `crr`), in nanoseconds.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand};
use socket2::{Domain, Protocol, Socket, Type};

#[derive(Parser)]
#[command(
    name = "lb-bench",
    about = "Benchmark client and server (TCP_CRR, TCP_RR, UDP)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer 1-byte TCP and UDP requests with the byte ID until killed.
    Serve(ServeArgs),
    /// TCP_CRR: connect, 1-byte request and reply, close; sequentially.
    Crr(ClientArgs),
    /// TCP_RR: lock-step 1-byte exchanges on one connection.
    Rr(ClientArgs),
    /// UDP request/reply on one socket.
    Udp(UdpArgs),
    /// CRR recording which backend answered when (runs of equal answers).
    Watch(ClientArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// The byte every reply carries.
    #[arg(long)]
    id: u8,
    /// TCP and UDP port.
    #[arg(long)]
    port: u16,
    /// Threads accepting and serving TCP connections (per address).
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// An address to serve on (repeatable; an IPv6 address binds IPv6-only sockets).
    #[arg(long = "bind", value_name = "ADDR", default_values_t = [IpAddr::V4(Ipv4Addr::UNSPECIFIED)])]
    bind: Vec<IpAddr>,
}

#[derive(Args)]
struct ClientArgs {
    /// Where to connect; with several, each connection picks one at random.
    #[arg(long = "target", required = true)]
    targets: Vec<SocketAddr>,
    /// How long to run.
    #[arg(long, default_value_t = 1000)]
    duration_ms: u64,
    /// Per-operation timeout.
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
    /// Also stop as soon as standard input closes (the caller decides when it has seen enough).
    #[arg(long)]
    until_stdin_closes: bool,
}

#[derive(Args)]
struct UdpArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// connect() the socket once and use send/recv (else send_to/recv_from every time).
    #[arg(long)]
    connected: bool,
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Serve(args) => serve(&args).map(|()| serde_json::Value::Null),
        Command::Crr(args) => Ok(crr(&args, false)),
        Command::Watch(args) => Ok(crr(&args, true)),
        Command::Rr(args) => rr(&args),
        Command::Udp(args) => udp(&args),
    };
    match result {
        Ok(serde_json::Value::Null) => ExitCode::SUCCESS,
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lb-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------- server

fn serve(args: &ServeArgs) -> io::Result<()> {
    let mut workers = Vec::new();
    for &ip in &args.bind {
        let address = SocketAddr::new(ip, args.port);
        let listener = bound(address, Type::STREAM, Protocol::TCP)?;
        listener.listen(1024)?;
        let listener = TcpListener::from(listener);
        let udp = UdpSocket::from(bound(address, Type::DGRAM, Protocol::UDP)?);
        for _ in 0..args.workers.max(1) {
            let listener = listener.try_clone()?;
            let id = args.id;
            workers.push(thread::spawn(move || {
                loop {
                    match listener.accept() {
                        Ok((conn, _)) => serve_conn(conn, id),
                        Err(_) => thread::sleep(Duration::from_millis(1)),
                    }
                }
            }));
        }
        let id = args.id;
        workers.push(thread::spawn(move || {
            let mut buf = [0u8; 2048];
            loop {
                if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(&[id], peer);
                }
            }
        }));
    }
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "ready")?;
    stdout.flush()?;
    drop(stdout);
    for worker in workers {
        let _ = worker.join();
    }
    Ok(())
}

/// A socket bound to `address` (with SO_REUSEADDR, as `TcpListener::bind` sets it), IPv6-only
/// for an IPv6 address.
fn bound(address: SocketAddr, kind: Type, protocol: Protocol) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(address), kind, Some(protocol))?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&address.into())?;
    Ok(socket)
}

/// Answers every byte with `id` until the client closes.
fn serve_conn(mut conn: TcpStream, id: u8) {
    let _ = conn.set_nodelay(true);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = [0u8; 64];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if conn.write_all(&vec![id; n]).is_err() {
                    return;
                }
            }
        }
    }
}

// ---------------------------------------------------------------- clients

/// A tiny xorshift generator: which target to use (no dependency for a coin toss).
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id());
        Rng(seed | 1)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn epoch_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Latencies (ns) and errors of a run, summarised as JSON.
#[derive(Default)]
struct Stats {
    latencies: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

impl Stats {
    fn error(&mut self, what: &str, e: &io::Error) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{what}: {e}"));
        }
    }

    fn json(mut self, elapsed: Duration) -> serde_json::Value {
        self.latencies.sort_unstable();
        let pct = |p: f64| -> f64 {
            if self.latencies.is_empty() {
                return 0.0;
            }
            let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
            self.latencies[i] as f64 / 1000.0
        };
        let ok = self.latencies.len() as u64;
        serde_json::json!({
            "ok": ok,
            "errors": self.errors,
            "first_error": self.first_error,
            "elapsed_s": elapsed.as_secs_f64(),
            "rate": ok as f64 / elapsed.as_secs_f64().max(1e-9),
            "p50_us": pct(0.50),
            "p99_us": pct(0.99),
            "mean_us": if ok == 0 { 0.0 } else {
                self.latencies.iter().sum::<u64>() as f64 / ok as f64 / 1000.0
            },
        })
    }
}

/// One CRR exchange; the answering backend's id.
fn crr_once(target: SocketAddr, timeout: Duration) -> Result<u8, (&'static str, io::Error)> {
    let mut conn = TcpStream::connect_timeout(&target, timeout).map_err(|e| ("connect", e))?;
    let exchange = (|| {
        conn.set_nodelay(true)?;
        conn.set_read_timeout(Some(timeout))?;
        conn.write_all(b"x")?;
        let mut reply = [0u8; 1];
        conn.read_exact(&mut reply)?;
        Ok::<u8, io::Error>(reply[0])
    })();
    // Dropping `conn` closes it: the client closes first.
    exchange.map_err(|e| ("exchange", e))
}

/// A run of consecutive answers from one backend (`watch`).
struct Segment {
    id: i32,
    first_ns: u64,
    last_ns: u64,
    count: u64,
}

fn crr(args: &ClientArgs, watch: bool) -> serde_json::Value {
    let timeout = Duration::from_millis(args.timeout_ms);
    let duration = Duration::from_millis(args.duration_ms);
    let mut rng = Rng::new();
    let mut stats = Stats::default();
    let mut segments: Vec<Segment> = Vec::new();
    let stop = Arc::new(AtomicBool::new(false));
    if args.until_stdin_closes {
        let stop = stop.clone();
        thread::spawn(move || {
            let _ = io::copy(&mut io::stdin(), &mut io::sink());
            stop.store(true, Ordering::Relaxed);
        });
    }
    let started = Instant::now();
    while started.elapsed() < duration && !stop.load(Ordering::Relaxed) {
        let target = args.targets[rng.below(args.targets.len())];
        let at_ns = if watch { epoch_ns() } else { 0 };
        let t = Instant::now();
        let answer = match crr_once(target, timeout) {
            Ok(id) => {
                stats.latencies.push(t.elapsed().as_nanos() as u64);
                i32::from(id)
            }
            Err((what, e)) => {
                stats.error(what, &e);
                -1
            }
        };
        if watch {
            match segments.last_mut() {
                Some(s) if s.id == answer => {
                    s.last_ns = at_ns;
                    s.count += 1;
                }
                _ => segments.push(Segment {
                    id: answer,
                    first_ns: at_ns,
                    last_ns: at_ns,
                    count: 1,
                }),
            }
        }
    }
    let mut json = stats.json(started.elapsed());
    if watch {
        json["segments"] = segments
            .iter()
            .map(|s| serde_json::json!([s.id, s.first_ns, s.last_ns, s.count]))
            .collect();
    }
    json
}

fn rr(args: &ClientArgs) -> io::Result<serde_json::Value> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let duration = Duration::from_millis(args.duration_ms);
    let mut conn = TcpStream::connect_timeout(&args.targets[0], timeout)?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(timeout))?;
    let mut stats = Stats::default();
    let mut reply = [0u8; 1];
    let started = Instant::now();
    while started.elapsed() < duration {
        let t = Instant::now();
        match conn
            .write_all(b"x")
            .and_then(|()| conn.read_exact(&mut reply))
        {
            Ok(()) => stats.latencies.push(t.elapsed().as_nanos() as u64),
            Err(e) => {
                stats.error("exchange", &e);
                break;
            }
        }
    }
    Ok(stats.json(started.elapsed()))
}

fn udp(args: &UdpArgs) -> io::Result<serde_json::Value> {
    let target = args.client.targets[0];
    let timeout = Duration::from_millis(args.client.timeout_ms);
    let duration = Duration::from_millis(args.client.duration_ms);
    let any: IpAddr = match target {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = UdpSocket::bind((any, 0))?;
    socket.set_read_timeout(Some(timeout))?;
    if args.connected {
        socket.connect(target)?;
    }
    let mut stats = Stats::default();
    let mut buf = [0u8; 64];
    let started = Instant::now();
    while started.elapsed() < duration {
        let t = Instant::now();
        let result = if args.connected {
            socket.send(b"x").and_then(|_| socket.recv(&mut buf))
        } else {
            socket
                .send_to(b"x", target)
                .and_then(|_| socket.recv_from(&mut buf).map(|(n, _)| n))
        };
        match result {
            Ok(_) => stats.latencies.push(t.elapsed().as_nanos() as u64),
            Err(e) => stats.error("exchange", &e),
        }
    }
    Ok(stats.json(started.elapsed()))
}
