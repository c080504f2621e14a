//! Load generator for WebSocket servers with the `examples/echo`
//! interface. Non-blocking sockets on `polling` event loops, so one
//! process can hold tens of thousands of clients; every payload that comes
//! back is checked byte for byte (a mismatch fails the run).
//!
//! ```text
//! loadgen idle      --clients 1000,10000,19900 [--seconds 30] [--idle-at 10000] --server-pid PID
//! loadgen echo      --clients 100 --size 32 --inflight 8 [--seconds 10]
//! loadgen broadcast --clients 10000 --size 32 [--rounds 20]   (server in broadcast mode)
//! loadgen connect   [--seconds 10] [--concurrency 64]
//! loadgen pubsub    --shape fanout [--clients 10000] [--size 32] [--rounds 20]
//! loadgen pubsub    --shape chat [--topics 1000] [--subscribers 10] [--rate 1] [--seconds 10]
//!                   (server: `examples/pubsub`, or a peer in pubsub mode)
//! loadgen idle      ... --subscribe 1000   (pubsub server: then measure
//!                   what subscriptions cost, over 1000 topics)
//! common: --addr 127.0.0.1:13003 --label NAME --threads N --server-pid PID
//!         --extensions OFFER (a Sec-WebSocket-Extensions header to send)
//! ```
//!
//! Several servers (instances of a cluster sharing topics, e.g. through
//! Redis): `--addr A,B,C` connects client `i` to the `i % 3`-th address
//! (the fan-out publisher, client 0, to the first); `--server-pid P,Q,R`
//! sums their CPU; `--broker-pid PID` also reports the broker's (Redis).
//! Then `pubsub` first waits until a subscription on one server gets what
//! is published on another (see `await_probes`), and reports the latency
//! of deliveries that crossed servers apart. `echo` and `connect` take
//! several addresses too; `idle` and `broadcast` measure one server.
//!
//! Human-readable figures go to stderr; one JSON line goes to stdout.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use base64::Engine;
use polling::{Event, Events, Poller};
use sha1::{Digest, Sha1};

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

struct Opts {
    scenario: String,
    /// Client `i` connects to `addrs[i % addrs.len()]`.
    addrs: Vec<SocketAddr>,
    label: String,
    clients: Vec<usize>,
    size: usize,
    inflight: usize,
    seconds: f64,
    rounds: usize,
    concurrency: usize,
    threads: usize,
    /// The servers' processes (CPU is their sum; `idle` takes one).
    server_pids: Vec<u32>,
    /// A message broker between the servers (Redis): its CPU is reported.
    broker_pid: Option<u32>,
    /// `idle`: hold the clients idle at this step (default: the last).
    idle_at: Option<usize>,
    /// Whether `--clients` was given (`pubsub` has its own default).
    clients_given: bool,
    /// `pubsub`: `fanout` (one topic, one publisher) or `chat`.
    shape: String,
    /// `pubsub --shape chat`: topics, and subscribers per topic.
    topics: usize,
    subscribers: usize,
    /// `pubsub --shape chat`: messages each client publishes per second.
    rate: f64,
    /// `idle`: then subscribe the clients over this many topics and
    /// measure what that costs (server in pubsub mode).
    subscribe: Option<usize>,
}

fn parse_opts() -> Result<Opts, String> {
    let mut args = std::env::args().skip(1);
    let scenario = args
        .next()
        .ok_or("usage: loadgen idle|echo|broadcast|connect|pubsub [options]")?;
    let mut o = Opts {
        scenario,
        addrs: vec!["127.0.0.1:13003".parse().unwrap()],
        label: "server".into(),
        clients: vec![100],
        size: 32,
        inflight: 8,
        seconds: 10.0,
        rounds: 20,
        concurrency: 64,
        threads: 2,
        server_pids: Vec::new(),
        broker_pid: None,
        idle_at: None,
        clients_given: false,
        shape: "fanout".into(),
        topics: 1000,
        subscribers: 10,
        rate: 1.0,
        subscribe: None,
    };
    while let Some(flag) = args.next() {
        let v = args.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |_| format!("bad value for {flag}: {v}");
        match flag.as_str() {
            "--addr" => {
                o.addrs = v
                    .split(',')
                    .map(|a| a.parse().map_err(|_| format!("bad address {a}")))
                    .collect::<Result<_, _>>()?
            }
            "--label" => o.label = v.clone(),
            "--clients" => {
                o.clients = v
                    .split(',')
                    .map(|c| c.parse().map_err(bad))
                    .collect::<Result<_, _>>()?;
                o.clients_given = true;
            }
            "--size" => o.size = v.parse().map_err(bad)?,
            "--inflight" => o.inflight = v.parse().map_err(bad)?,
            "--seconds" => {
                o.seconds = v
                    .parse()
                    .map_err(|_| format!("bad value for {flag}: {v}"))?
            }
            "--rounds" => o.rounds = v.parse().map_err(bad)?,
            "--concurrency" => o.concurrency = v.parse().map_err(bad)?,
            "--threads" => o.threads = v.parse::<usize>().map_err(bad)?.max(1),
            "--server-pid" => {
                o.server_pids = v
                    .split(',')
                    .map(|p| p.parse().map_err(bad))
                    .collect::<Result<_, _>>()?
            }
            "--broker-pid" => o.broker_pid = Some(v.parse().map_err(bad)?),
            "--idle-at" => o.idle_at = Some(v.parse().map_err(bad)?),
            "--shape" if v == "fanout" || v == "chat" => o.shape = v.clone(),
            "--shape" => return Err(format!("--shape is fanout or chat, not {v}")),
            "--topics" => o.topics = v.parse::<usize>().map_err(bad)?.max(1),
            "--subscribers" => o.subscribers = v.parse::<usize>().map_err(bad)?.max(2),
            "--rate" => {
                o.rate = v
                    .parse::<f64>()
                    .ok()
                    .filter(|r| *r > 0.0)
                    .ok_or(format!("bad value for {flag}: {v}"))?
            }
            "--subscribe" => o.subscribe = Some(v.parse::<usize>().map_err(bad)?.max(2)),
            "--extensions" => {
                let _ = EXTENSIONS.set(v.clone());
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok(o)
}

impl Opts {
    /// Whether `--server-pid` was given.
    fn has_server(&self) -> bool {
        !self.server_pids.is_empty()
    }

    /// CPU time of the servers, summed, if given.
    fn server_cpu(&self) -> Option<f64> {
        self.has_server()
            .then(|| self.server_pids.iter().map(|&p| cpu_seconds(p)).sum())
    }

    /// The one server of a scenario that measures one.
    fn one_server(&self) -> Result<(), String> {
        if self.addrs.len() > 1 || self.server_pids.len() > 1 {
            return Err(format!(
                "{} measures one server: one --addr, one --server-pid",
                self.scenario
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- process

fn proc_field(pid: u32, file: &str, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resident set size in KiB.
fn rss_kib(pid: u32) -> u64 {
    proc_field(pid, "status", "VmRSS:").unwrap_or(0)
}

/// CPU time (user + system) in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces).
    let rest = &s[s.rfind(')').map_or(0, |i| i + 2)..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// Packets the kernel dropped for a full backlog (loopback traffic goes
/// through it; a dropped packet costs a retransmission, 10-200+ ms) and TCP
/// segments retransmitted, system-wide: (drops, retransmits).
fn net_losses() -> (u64, u64) {
    let drops = std::fs::read_to_string("/proc/net/softnet_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok())
        .sum();
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let retrans = match (tcp.next(), tcp.next()) {
        (Some(names), Some(values)) => names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == "RetransSegs")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0),
        _ => 0,
    };
    (drops, retrans)
}

/// Raise the soft fd limit to the hard limit; returns (soft, hard).
fn raise_fd_limit() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    (lim.rlim_cur, lim.rlim_max)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

// ---------------------------------------------------------------- frames

fn masked_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], key: [u8; 4]) {
    out.push(0x80 | opcode);
    let n = payload.len();
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n <= 0xFFFF {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(&key);
    let start = out.len();
    out.extend_from_slice(payload);
    // Word-at-a-time, so masking 64 KiB payloads does not make the load
    // generator the bottleneck.
    enjent::proto::frame::apply_mask(&mut out[start..], key, 0);
}

/// Parse one unmasked server frame from the front of `buf`:
/// (opcode, payload range, total length).
fn parse_frame(buf: &[u8]) -> Option<(u8, usize, usize, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let op = buf[0] & 0x0F;
    let (len, hl) = match buf[1] & 0x7F {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b) as usize, 10)
        }
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    (buf.len() >= hl + len).then_some((op, hl, hl + len, hl + len))
}

/// Pseudo-random filler, made once: payloads are slices of it at an
/// offset that depends on the message, so every message differs but
/// building and checking one costs a memcpy, not a generator per byte.
fn pattern() -> &'static [u8] {
    static P: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    P.get_or_init(|| {
        let mut x = 0x1234_5678u32;
        (0..(1 << 20) + 4096)
            .map(|_| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (x >> 24) as u8
            })
            .collect()
    })
}

/// Payload of message `seq` from `client`: its ids, then filler.
fn fill_payload(out: &mut Vec<u8>, client: u32, seq: u64, size: usize) {
    out.clear();
    out.extend_from_slice(&client.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    let need = size.max(12) - 12;
    let start = (seq as usize * 31 + client as usize * 17) % 4096;
    let p = pattern();
    let mut left = need;
    while left > 0 {
        let take = left.min(p.len() - start);
        out.extend_from_slice(&p[start..start + take]);
        left -= take;
    }
}

// ---------------------------------------------------------------- clients

struct Client {
    id: u32,
    stream: TcpStream,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    /// Send times of messages in flight (echo preserves order).
    sent_at: VecDeque<Instant>,
    next_seq: u64,
    expect_seq: u64,
    writable_wanted: bool,
    /// `pubsub` chat: the next sequence number expected from each member
    /// of this client's topic.
    peer_next: Vec<u64>,
    /// `pubsub`: answers still expected to the `sync` that follows its
    /// subscriptions.
    acks_pending: u32,
    /// `pubsub` over several servers: a bit per prober whose probe this
    /// client has received (see `await_probes`).
    probes_seen: u64,
}

fn connect_from(src: Ipv4Addr, to: SocketAddr) -> io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    // Close with a reset: no TIME_WAIT left behind to exhaust the ports of
    // the next run.
    s.set_linger(Some(Duration::ZERO))?;
    s.bind(&SocketAddr::from((src, 0)).into())?;
    s.connect(&to.into())?;
    s.set_tcp_nodelay(true)?;
    Ok(s.into())
}

/// Source address for client `i`: a block of 20,000 clients per address
/// (each has ~28k ephemeral ports), in a 127.x.y.0/24 that changes with
/// the process id so back-to-back runs never share ports.
fn source_for(i: usize) -> Ipv4Addr {
    let run = std::process::id() as usize % 200;
    Ipv4Addr::new(
        127,
        10 + (run / 100) as u8,
        (run % 100) as u8,
        2 + (i / 20_000) as u8,
    )
}

/// `--extensions VALUE`: a `Sec-WebSocket-Extensions` offer every client
/// sends (e.g. `permessage-deflate`, to measure what a negotiated
/// extension costs an idle connection). Payloads are still sent plain.
static EXTENSIONS: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn request(addr: SocketAddr) -> Vec<u8> {
    let ext = EXTENSIONS
        .get()
        .map(|v| format!("Sec-WebSocket-Extensions: {v}\r\n"))
        .unwrap_or_default();
    format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{ext}\r\n"
    )
    .into_bytes()
}

fn expected_accept() -> String {
    let mut h = Sha1::new();
    h.update(KEY.as_bytes());
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// Open `n` connections (blocking connect, then the handshake), starting
/// at client index `first`; client `i` to `addrs[i % addrs.len()]`.
fn open_clients(addrs: &[SocketAddr], first: usize, n: usize) -> io::Result<Vec<Client>> {
    let reqs: Vec<Vec<u8>> = addrs.iter().map(|&a| request(a)).collect();
    let accept = format!(
        "sec-websocket-accept: {}\r\n",
        expected_accept().to_ascii_lowercase()
    );
    let mut out = Vec::with_capacity(n);
    // Send requests in batches, then read the answers, so handshakes
    // overlap instead of costing a round trip each.
    for chunk_start in (first..first + n).step_by(256) {
        let end = (chunk_start + 256).min(first + n);
        let mut batch = Vec::new();
        for i in chunk_start..end {
            let k = i % addrs.len();
            let mut s = connect_from(source_for(i), addrs[k])?;
            s.write_all(&reqs[k])?;
            batch.push((i, s));
        }
        for (i, mut s) in batch {
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            // The server sends nothing after its 101 until we speak (a
            // ping comes only after seconds of silence), so reading in
            // chunks cannot swallow a frame.
            let mut head = Vec::with_capacity(256);
            let mut buf = [0u8; 512];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let k = s.read(&mut buf)?;
                if k == 0 {
                    return Err(io::Error::other(format!(
                        "client {i}: closed during handshake"
                    )));
                }
                head.extend_from_slice(&buf[..k]);
            }
            // Header names are case-insensitive (some servers send them
            // lowercase).
            let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
            if !head.starts_with("http/1.1 101") || !head.contains(&accept) {
                return Err(io::Error::other(format!(
                    "client {i}: bad handshake answer: {head}"
                )));
            }
            s.set_nonblocking(true)?;
            out.push(Client {
                id: i as u32,
                stream: s,
                rbuf: Vec::new(),
                wbuf: Vec::new(),
                sent_at: VecDeque::new(),
                next_seq: 0,
                expect_seq: 0,
                writable_wanted: false,
                peer_next: Vec::new(),
                acks_pending: 0,
                probes_seen: 0,
            });
        }
    }
    Ok(out)
}

/// What a client's event loop does with complete frames.
trait Handler: Send {
    /// A data frame arrived for client `c`. Return Err to fail the run.
    fn on_message(
        &mut self,
        c: &mut Client,
        opcode: u8,
        payload: &[u8],
        now: Instant,
    ) -> Result<(), String>;
    /// Called each loop turn: queue more to send.
    fn pump(&mut self, _c: &mut Client, _now: Instant) {}
}

fn try_flush(c: &mut Client) -> io::Result<()> {
    while !c.wbuf.is_empty() {
        match c.stream.write(&c.wbuf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                c.wbuf.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Read and dispatch everything available; answers pings.
fn drain_reads<H: Handler>(
    c: &mut Client,
    h: &mut H,
    scratch: &mut [u8],
    now: Instant,
) -> Result<bool, String> {
    loop {
        match c.stream.read(scratch) {
            Ok(0) => return Err(format!("client {}: server closed the connection", c.id)),
            Ok(n) => {
                c.rbuf.extend_from_slice(&scratch[..n]);
                let mut pos = 0;
                while let Some((op, start, end, _)) = parse_frame(&c.rbuf[pos..]) {
                    let payload = c.rbuf[pos + start..pos + end].to_vec();
                    pos += end;
                    match op {
                        0x9 => masked_frame(&mut c.wbuf, 0xA, &payload, [1, 2, 3, 4]),
                        0xA => {}
                        0x8 => {
                            return Err(format!(
                                "client {}: server sent close {:?}",
                                c.id, payload
                            ));
                        }
                        0x1 | 0x2 => h.on_message(c, op, &payload, now)?,
                        other => return Err(format!("client {}: unexpected opcode {other}", c.id)),
                    }
                }
                c.rbuf.drain(..pos);
                if c.rbuf.is_empty() {
                    c.rbuf = Vec::new();
                }
                if n < scratch.len() {
                    return Ok(true);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) => return Err(format!("client {}: {e}", c.id)),
        }
    }
}

/// Run clients on one poller until `stop` is set or `done` says so.
fn event_loop<H: Handler>(
    mut clients: Vec<Client>,
    h: &mut H,
    stop: &AtomicBool,
    done: impl Fn(&H) -> bool,
) -> Result<Vec<Client>, String> {
    let poller = Poller::new().map_err(|e| e.to_string())?;
    for (k, c) in clients.iter().enumerate() {
        // SAFETY: each stream stays open while registered; deleted below.
        unsafe { poller.add(&c.stream, Event::readable(k)) }.map_err(|e| e.to_string())?;
    }
    let mut events = Events::new();
    let mut scratch = vec![0u8; 256 * 1024];
    let now = Instant::now();
    for c in clients.iter_mut() {
        h.pump(c, now);
        try_flush(c).map_err(|e| e.to_string())?;
    }
    while !stop.load(Relaxed) && !done(h) {
        events.clear();
        poller
            .wait(&mut events, Some(Duration::from_millis(50)))
            .map_err(|e| e.to_string())?;
        let now = Instant::now();
        for ev in events.iter() {
            let c = &mut clients[ev.key];
            if ev.readable {
                drain_reads(c, h, &mut scratch, now)?;
            }
            h.pump(c, now);
            try_flush(c).map_err(|e| format!("client {}: {e}", c.id))?;
            c.writable_wanted = !c.wbuf.is_empty();
            poller
                .modify(&c.stream, Event::new(ev.key, true, c.writable_wanted))
                .map_err(|e| e.to_string())?;
        }
    }
    for c in &clients {
        let _ = poller.delete(&c.stream);
    }
    Ok(clients)
}

// ---------------------------------------------------------------- idle

struct Idle;

impl Handler for Idle {
    fn on_message(&mut self, c: &mut Client, _: u8, _: &[u8], _: Instant) -> Result<(), String> {
        Err(format!("client {}: unexpected message while idle", c.id))
    }
}

fn scenario_idle(o: &Opts) -> Result<String, String> {
    o.one_server()?;
    let pid = *o.server_pids.first().ok_or("idle needs --server-pid")?;
    let (soft, hard) = raise_fd_limit();
    eprintln!("fd limit: soft {soft}, hard {hard}");
    // One connection first, so that the baseline includes what the
    // server allocates once (worker buffers, first slab page).
    let warm = open_clients(&o.addrs, 0, 1).map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(500));
    let base = rss_kib(pid);
    eprintln!("{}: baseline rss {base} KiB with 1 client", o.label);
    let mut all = warm;
    let mut steps = Vec::new();
    let idle_at = o.idle_at.unwrap_or(o.clients.last().copied().unwrap_or(0));
    let mut idle = None;
    for &target in &o.clients {
        let more = target.saturating_sub(all.len());
        let t0 = Instant::now();
        all.extend(open_clients(&o.addrs, all.len(), more).map_err(|e| e.to_string())?);
        let took = t0.elapsed();
        std::thread::sleep(Duration::from_secs(1));
        let rss = rss_kib(pid);
        let per = (rss.saturating_sub(base)) as f64 * 1024.0 / (all.len() - 1) as f64;
        eprintln!(
            "{}: {} clients: rss {rss} KiB, +{} KiB over baseline, {per:.0} B per connection (opened in {:.1} s)",
            o.label,
            all.len(),
            rss.saturating_sub(base),
            took.as_secs_f64()
        );
        steps.push(format!(
            "{{\"clients\":{},\"rss_kib\":{rss},\"bytes_per_conn\":{per:.0}}}",
            all.len()
        ));
        if idle.is_none() && target >= idle_at {
            // Hold them idle (answering pings) and measure the server's CPU.
            let stop = AtomicBool::new(false);
            let cpu0 = cpu_seconds(pid);
            let t0 = Instant::now();
            let seconds = o.seconds;
            let held = std::mem::take(&mut all);
            all = std::thread::scope(|s| {
                let stop = &stop;
                let h = s.spawn(move || event_loop(held, &mut Idle, stop, |_| false));
                std::thread::sleep(Duration::from_secs_f64(seconds));
                stop.store(true, Relaxed);
                h.join()
                    .unwrap_or_else(|_| Err("event loop panicked".into()))
            })?;
            let secs = t0.elapsed().as_secs_f64();
            let cpu = (cpu_seconds(pid) - cpu0) / secs * 100.0;
            eprintln!(
                "{}: {} idle clients for {secs:.0} s: server CPU {cpu:.2}% of one core, rss {} KiB",
                o.label,
                all.len(),
                rss_kib(pid)
            );
            idle = Some((all.len(), secs, cpu));
        }
    }
    let (idle_clients, secs, cpu) =
        idle.ok_or(format!("--idle-at {idle_at} is above every --clients step"))?;
    let subscribed = match o.subscribe {
        Some(k) => format!(
            ",\"subscribe\":{}",
            subscription_memory(o, pid, base, all, k)?
        ),
        None => String::new(),
    };
    Ok(format!(
        "{{\"scenario\":\"idle\",\"label\":\"{}\",\"baseline_rss_kib\":{base},\"steps\":[{}],\"idle_clients\":{idle_clients},\"idle_seconds\":{secs:.1},\"idle_cpu_percent\":{cpu:.3}{subscribed}}}",
        o.label,
        steps.join(",")
    ))
}

/// `idle --subscribe K` (server in pubsub mode): what subscriptions cost.
/// Every phase adds one subscription to some clients and waits for the
/// answer to their `sync`:
///
/// 0. no subscription, only `sync` (so that whatever answering costs a
///    connection is in the baseline);
/// 1. all N clients, client i in topic `t{i % K}`: N clients in K topics;
/// 2. the first half also in an existing topic, `t{(i + 1) % K}`: the cost
///    of one more subscription, no new topic;
/// 3. the second half also in a topic of its own, `u{i}`: one more
///    subscription and one new topic each.
///
/// Per topic = (phase 3 - phase 2) / (N / 2); a client's first
/// subscription = (phase 1 - K topics) / N.
fn subscription_memory(
    o: &Opts,
    pid: u32,
    base: u64,
    all: Vec<Client>,
    k: usize,
) -> Result<String, String> {
    let n = all.len();
    if n < 4 || k > n {
        return Err(format!(
            "--subscribe {k} needs at least 4 clients and no more topics than clients"
        ));
    }
    let half = (n / 2) as u32;
    let mut groups = vec![all];
    let mut rss = Vec::new();
    let phases: [&dyn Fn(u32) -> Option<Vec<String>>; 4] = [
        &|_| Some(vec![]),
        &|i| Some(vec![format!("t{}", i as usize % k)]),
        &|i| (i < half).then(|| vec![format!("t{}", (i as usize + 1) % k)]),
        &|i| (i >= half).then(|| vec![format!("u{i}")]),
    ];
    for (p, plan) in phases.iter().enumerate() {
        let t0 = Instant::now();
        groups = subscribe_all(groups, plan)?;
        let took = t0.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(500));
        rss.push(rss_kib(pid));
        eprintln!(
            "{}: subscription phase {p} done in {took:.2} s: rss {} KiB",
            o.label, rss[p]
        );
    }
    let b = |a: usize, z: usize| (rss[z] as f64 - rss[a] as f64) * 1024.0;
    let per_conn_before = (rss[0].saturating_sub(base)) as f64 * 1024.0 / (n - 1) as f64;
    let per_conn_after = (rss[1].saturating_sub(base)) as f64 * 1024.0 / (n - 1) as f64;
    let all_in = b(0, 1) / n as f64;
    let extra = b(1, 2) / half as f64;
    let per_topic = b(2, 3) / (n as u32 - half) as f64 - extra;
    let first = (b(0, 1) - k as f64 * per_topic) / n as f64;
    let name_len = format!("u{}", n - 1).len();
    eprintln!(
        "{}: {n} clients in {k} topics: {per_conn_before:.0} B per connection before, {per_conn_after:.0} B after ({all_in:.0} B per subscription, topics included); a first subscription {first:.0} B, one more {extra:.0} B, a topic {per_topic:.0} B (names of {name_len} bytes)",
        o.label
    );
    Ok(format!(
        "{{\"clients\":{n},\"topics\":{k},\"rss_kib\":[{}],\"bytes_per_conn_before\":{per_conn_before:.0},\"bytes_per_conn_after\":{per_conn_after:.0},\"bytes_per_sub_all_in\":{all_in:.0},\"bytes_per_first_sub\":{first:.0},\"bytes_per_extra_sub\":{extra:.0},\"bytes_per_topic\":{per_topic:.0},\"topic_name_len\":{name_len}}}",
        rss.iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(",")
    ))
}

// ---------------------------------------------------------------- echo

struct Echo {
    size: usize,
    inflight: usize,
    sending: bool,
    received: u64,
    latencies_us: Vec<f64>,
    payload: Vec<u8>,
}

impl Handler for Echo {
    fn on_message(
        &mut self,
        c: &mut Client,
        op: u8,
        payload: &[u8],
        now: Instant,
    ) -> Result<(), String> {
        fill_payload(&mut self.payload, c.id, c.expect_seq, self.size);
        if op != 0x2 || payload != self.payload.as_slice() {
            return Err(format!(
                "client {}: echo {} does not match what was sent",
                c.id, c.expect_seq
            ));
        }
        c.expect_seq += 1;
        let sent = c.sent_at.pop_front().ok_or("an echo nobody sent")?;
        self.latencies_us
            .push(now.duration_since(sent).as_secs_f64() * 1e6);
        self.received += 1;
        Ok(())
    }

    fn pump(&mut self, c: &mut Client, now: Instant) {
        while self.sending && c.sent_at.len() < self.inflight {
            fill_payload(&mut self.payload, c.id, c.next_seq, self.size);
            masked_frame(&mut c.wbuf, 0x2, &self.payload, [9, 8, 7, 6]);
            c.sent_at.push_back(now);
            c.next_seq += 1;
        }
    }
}

/// Split clients over `threads` groups, client `i` in group `i % threads`.
fn split_groups(clients: Vec<Client>, threads: usize) -> Vec<Vec<Client>> {
    let mut groups: Vec<Vec<Client>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, c) in clients.into_iter().enumerate() {
        groups[i % threads].push(c);
    }
    groups.retain(|g| !g.is_empty());
    groups
}

type Loop<H> = std::thread::JoinHandle<Result<(H, Vec<Client>), String>>;

/// An event loop per group, until `stop` (which the first failure sets).
fn spawn_loops<H: Handler + 'static>(
    groups: Vec<Vec<Client>>,
    make: impl Fn() -> H,
    stop: &Arc<AtomicBool>,
) -> Vec<Loop<H>> {
    groups
        .into_iter()
        .map(|g| {
            let mut h = make();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let r = event_loop(g, &mut h, &stop, |_| false);
                if r.is_err() {
                    stop.store(true, Relaxed);
                }
                r.map(|clients| (h, clients))
            })
        })
        .collect()
}

fn join_loops<H>(loops: Vec<Loop<H>>) -> Result<Vec<(H, Vec<Client>)>, String> {
    loops
        .into_iter()
        .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
        .collect()
}

fn run_threads<H: Handler + 'static>(
    clients: Vec<Client>,
    threads: usize,
    make: impl Fn() -> H,
    stop: Arc<AtomicBool>,
) -> Result<Vec<H>, String> {
    let loops = spawn_loops(split_groups(clients, threads), make, &stop);
    Ok(join_loops(loops)?.into_iter().map(|(h, _)| h).collect())
}

fn scenario_echo(o: &Opts) -> Result<String, String> {
    let n = o.clients[0];
    let clients = open_clients(&o.addrs, 0, n).map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let (size, inflight) = (o.size, o.inflight);
    let cpu0 = o.server_cpu();
    let self_cpu0 = cpu_seconds(std::process::id());
    let t0 = Instant::now();
    let timer = {
        let stop = stop.clone();
        let secs = o.seconds;
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs_f64(secs));
            stop.store(true, Relaxed);
        })
    };
    let results = run_threads(
        clients,
        o.threads,
        move || Echo {
            size,
            inflight,
            sending: true,
            received: 0,
            latencies_us: Vec::new(),
            payload: Vec::new(),
        },
        stop,
    )?;
    let _ = timer.join();
    let elapsed = t0.elapsed().as_secs_f64();
    let received: u64 = results.iter().map(|r| r.received).sum();
    let mut lat: Vec<f64> = results.into_iter().flat_map(|r| r.latencies_us).collect();
    lat.sort_by(f64::total_cmp);
    let rate = received as f64 / elapsed;
    let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    let server_cpu = cpu0.map(|c0| (o.server_cpu().unwrap_or(0.0) - c0) / elapsed * 100.0);
    let self_cpu = (cpu_seconds(std::process::id()) - self_cpu0) / elapsed * 100.0;
    eprintln!(
        "{}: echo {n} clients x {size} B, {inflight} in flight: {rate:.0} msg/s, p50 {p50:.0} us, p99 {p99:.0} us (server CPU {}%, loadgen CPU {self_cpu:.0}%)",
        o.label,
        server_cpu.map_or("?".into(), |c| format!("{c:.0}"))
    );
    Ok(format!(
        "{{\"scenario\":\"echo\",\"label\":\"{}\",\"clients\":{n},\"size\":{size},\"inflight\":{inflight},\"messages\":{received},\"seconds\":{elapsed:.2},\"msgs_per_sec\":{rate:.0},\"p50_us\":{p50:.1},\"p99_us\":{p99:.1},\"server_cpu_percent\":{},\"loadgen_cpu_percent\":{self_cpu:.0}}}",
        o.label,
        server_cpu.map_or("null".into(), |c| format!("{c:.0}"))
    ))
}

// ---------------------------------------------------------------- broadcast

struct Listen {
    size: usize,
    got: u64,
    /// (round, receive time) per message received.
    seen: Vec<(u64, Instant)>,
    payload: Vec<u8>,
}

impl Handler for Listen {
    fn on_message(
        &mut self,
        c: &mut Client,
        op: u8,
        payload: &[u8],
        now: Instant,
    ) -> Result<(), String> {
        if payload.len() < 12 {
            return Err(format!("client {}: short broadcast", c.id));
        }
        let round = u64::from_be_bytes(payload[4..12].try_into().unwrap_or_default());
        fill_payload(&mut self.payload, u32::MAX, round, self.size);
        if op != 0x2 || payload != self.payload.as_slice() {
            return Err(format!("client {}: broadcast {round} does not match", c.id));
        }
        self.got += 1;
        self.seen.push((round, now));
        Ok(())
    }
}

fn scenario_broadcast(o: &Opts) -> Result<String, String> {
    o.one_server()?;
    let n = o.clients[0];
    let (soft, hard) = raise_fd_limit();
    eprintln!("fd limit: soft {soft}, hard {hard}");
    let mut sender = open_clients(&o.addrs, 0, 1)
        .map_err(|e| e.to_string())?
        .remove(0);
    let listeners = open_clients(&o.addrs, 1, n).map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(500));
    let stop = Arc::new(AtomicBool::new(false));
    let size = o.size;
    let stop2 = stop.clone();
    let threads = o.threads;
    let runner = std::thread::spawn(move || {
        run_threads(
            listeners,
            threads,
            move || Listen {
                size,
                got: 0,
                seen: Vec::new(),
                payload: Vec::new(),
            },
            stop2,
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    // The sender (client 0) also receives every broadcast; it reads them
    // on its own, blocking, which also paces the rounds.
    sender
        .stream
        .set_nonblocking(false)
        .map_err(|e| e.to_string())?;
    sender
        .stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut sent_at = Vec::new();
    let mut payload = Vec::new();
    let mut frame = Vec::new();
    let t0 = Instant::now();
    for r in 0..o.rounds as u64 {
        fill_payload(&mut payload, u32::MAX, r, size);
        frame.clear();
        masked_frame(&mut frame, 0x2, &payload, [5, 5, 5, 5]);
        sent_at.push(Instant::now());
        sender.stream.write_all(&frame).map_err(|e| e.to_string())?;
        // Wait for our own copy, then a pause so rounds do not overlap.
        let mut buf = Vec::new();
        let mut chunk = [0u8; 65536];
        loop {
            let k = sender
                .stream
                .read(&mut chunk)
                .map_err(|e| format!("sender: {e}"))?;
            if k == 0 {
                return Err("sender: server closed".into());
            }
            buf.extend_from_slice(&chunk[..k]);
            if let Some((op, s, e, _)) = parse_frame(&buf) {
                if op == 0x9 {
                    buf.drain(..e);
                    continue;
                }
                if buf[s..e] != payload[..] {
                    return Err("sender: its own broadcast came back wrong".into());
                }
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Give stragglers time, then stop.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        if Instant::now() > deadline {
            break;
        }
        // Stop early once every listener thread has seen every round;
        // we cannot peek into threads, so wait a fixed settle time.
        if t0.elapsed() > Duration::from_millis(100 * o.rounds as u64 + 2_000) {
            break;
        }
    }
    stop.store(true, Relaxed);
    let results = runner.join().map_err(|_| "listener panicked")??;
    let got: u64 = results.iter().map(|r| r.got).sum();
    let expected = (n * o.rounds) as u64;
    if got != expected {
        return Err(format!("{got} of {expected} broadcast deliveries arrived"));
    }
    // Per round: time from send to the last delivery, and all latencies.
    let mut last = vec![0f64; o.rounds];
    let mut lat = Vec::with_capacity(got as usize);
    for r in &results {
        for &(round, at) in &r.seen {
            let ms = at.duration_since(sent_at[round as usize]).as_secs_f64() * 1e3;
            lat.push(ms);
            last[round as usize] = last[round as usize].max(ms);
        }
    }
    let by_round: Vec<String> = last.iter().map(|ms| format!("{ms:.0}")).collect();
    eprintln!("last delivery by round (ms): {}", by_round.join(" "));
    lat.sort_by(f64::total_cmp);
    last.sort_by(f64::total_cmp);
    let (l50, l99) = (percentile(&last, 0.5), percentile(&last, 0.99));
    let (d50, d99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    let rate = n as f64 / (l50 / 1e3).max(1e-9);
    eprintln!(
        "{}: broadcast to {n} clients x {size} B, {} rounds: last delivery p50 {l50:.2} ms, p99 {l99:.2} ms; each delivery p50 {d50:.2} ms, p99 {d99:.2} ms; {rate:.0} deliveries/s",
        o.label, o.rounds
    );
    Ok(format!(
        "{{\"scenario\":\"broadcast\",\"label\":\"{}\",\"clients\":{n},\"size\":{size},\"rounds\":{},\"last_p50_ms\":{l50:.3},\"last_p99_ms\":{l99:.3},\"delivery_p50_ms\":{d50:.3},\"delivery_p99_ms\":{d99:.3},\"deliveries_per_sec\":{rate:.0}}}",
        o.label, o.rounds
    ))
}

// ---------------------------------------------------------------- connect

fn scenario_connect(o: &Opts) -> Result<String, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let accept = format!(
        "sec-websocket-accept: {}\r\n",
        expected_accept().to_ascii_lowercase()
    );
    let cpu0 = o.server_cpu();
    let t0 = Instant::now();
    let workers: Vec<_> = (0..o.concurrency)
        .map(|w| {
            // Worker `w` to the `w % n`-th address.
            let addr = o.addrs[w % o.addrs.len()];
            let (stop, done, failed, accept, req) = (
                stop.clone(),
                done.clone(),
                failed.clone(),
                accept.clone(),
                request(addr),
            );
            std::thread::spawn(move || {
                let mut i = w;
                let mut head = Vec::with_capacity(256);
                while !stop.load(Relaxed) {
                    let ok = (|| -> io::Result<bool> {
                        // Spread over source addresses; reset on close so
                        // no TIME_WAIT piles up on either side.
                        let s = socket2::Socket::new(
                            socket2::Domain::IPV4,
                            socket2::Type::STREAM,
                            None,
                        )?;
                        s.set_linger(Some(Duration::ZERO))?;
                        s.bind(
                            &SocketAddr::from((Ipv4Addr::new(127, 0, 1 + (i % 50) as u8, 1), 0))
                                .into(),
                        )?;
                        s.connect(&addr.into())?;
                        s.set_tcp_nodelay(true)?;
                        let mut s: TcpStream = s.into();
                        s.set_read_timeout(Some(Duration::from_secs(10)))?;
                        s.write_all(&req)?;
                        head.clear();
                        let mut buf = [0u8; 512];
                        while !head.ends_with(b"\r\n\r\n") {
                            let k = s.read(&mut buf)?;
                            if k == 0 {
                                return Ok(false);
                            }
                            head.extend_from_slice(&buf[..k]);
                        }
                        let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                        Ok(text.starts_with("http/1.1 101") && text.contains(&accept))
                    })();
                    match ok {
                        Ok(true) => done.fetch_add(1, Relaxed),
                        _ => failed.fetch_add(1, Relaxed),
                    };
                    i += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(o.seconds));
    stop.store(true, Relaxed);
    for w in workers {
        let _ = w.join();
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let (ok, bad) = (done.load(Relaxed), failed.load(Relaxed));
    if bad > ok / 100 {
        return Err(format!("{bad} of {} handshakes failed", ok + bad));
    }
    let rate = ok as f64 / elapsed;
    // The server's CPU for each handshake (and its close): the load
    // generator's threads share the machine, so the rate alone also
    // measures how much of it they left the server.
    let cpu_us = cpu0.map(|c0| (o.server_cpu().unwrap_or(0.0) - c0) * 1e6 / ok.max(1) as f64);
    eprintln!(
        "{}: {rate:.0} handshakes/s ({ok} in {elapsed:.1} s, {bad} failed, {} threads, server CPU {} us each)",
        o.label,
        o.concurrency,
        cpu_us.map_or("?".into(), |c| format!("{c:.1}"))
    );
    Ok(format!(
        "{{\"scenario\":\"connect\",\"label\":\"{}\",\"handshakes\":{ok},\"failed\":{bad},\"seconds\":{elapsed:.2},\"handshakes_per_sec\":{rate:.0},\"server_cpu_us_per_handshake\":{}}}",
        o.label,
        cpu_us.map_or("null".into(), |c| format!("{c:.2}"))
    ))
}

// ---------------------------------------------------------------- pubsub
//
// The text protocol of `examples/pubsub`: `sub TOPIC`, `unsub TOPIC`,
// `pub TOPIC PAYLOAD` (to every subscriber of TOPIC but the sender). The
// protocol has no acknowledgement, so after its subscriptions a client
// sends `sync`, which is no command: the answer (`error: ...`) comes after
// the server has carried out everything before it.

/// Where the timestamps in payloads count from (one clock for the whole
/// process).
fn epoch() -> Instant {
    static E: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *E.get_or_init(Instant::now)
}

fn micros(at: Instant) -> u64 {
    at.saturating_duration_since(epoch()).as_micros() as u64
}

/// Fixed part of a pubsub payload: sender, sequence number and send time,
/// in hex.
const PUB_HEAD: usize = 28;

/// Payload (text) of message `seq` from `sender`, sent at `us`: 8 + 8 + 12
/// hex digits, then letters that depend on sender and sequence number.
fn pubsub_payload(out: &mut Vec<u8>, sender: u32, seq: u64, us: u64, size: usize) {
    out.clear();
    let _ = write!(out, "{sender:08x}{seq:08x}{us:012x}");
    let start = (seq as usize * 31 + sender as usize * 17) % 4096;
    let p = pattern();
    let need = size.saturating_sub(PUB_HEAD);
    let mut k = 0;
    while k < need {
        let take = (need - k).min(p.len() - start);
        out.extend(p[start..start + take].iter().map(|b| b'a' + b % 26));
        k += take;
    }
}

/// Check a delivery byte for byte: (sender, seq, send time in us).
fn check_pubsub(payload: &[u8], size: usize, scratch: &mut Vec<u8>) -> Option<(u32, u64, u64)> {
    if payload.len() != size.max(PUB_HEAD) {
        return None;
    }
    let hex = |r: std::ops::Range<usize>| {
        std::str::from_utf8(&payload[r])
            .ok()
            .and_then(|t| u64::from_str_radix(t, 16).ok())
    };
    let (sender, seq, us) = (hex(0..8)? as u32, hex(8..16)?, hex(16..28)?);
    pubsub_payload(scratch, sender, seq, us, size);
    (scratch.as_slice() == payload).then_some((sender, seq, us))
}

/// The `pub` command for one message, as a masked text frame.
fn pub_frame(out: &mut Vec<u8>, topic: &str, payload: &[u8], scratch: &mut Vec<u8>) {
    scratch.clear();
    scratch.extend_from_slice(b"pub ");
    scratch.extend_from_slice(topic.as_bytes());
    scratch.push(b' ');
    scratch.extend_from_slice(payload);
    masked_frame(out, 0x1, scratch, [3, 1, 4, 1]);
}

/// Waits for the answers to `sync`.
struct SyncAcks {
    /// Clients of this loop still waiting.
    waiting: usize,
}

impl Handler for SyncAcks {
    fn on_message(
        &mut self,
        c: &mut Client,
        op: u8,
        payload: &[u8],
        _: Instant,
    ) -> Result<(), String> {
        if op != 0x1 || !payload.starts_with(b"error: ") || c.acks_pending == 0 {
            return Err(format!(
                "client {}: unexpected message while subscribing: {:?}",
                c.id,
                String::from_utf8_lossy(&payload[..payload.len().min(80)])
            ));
        }
        c.acks_pending -= 1;
        if c.acks_pending == 0 {
            self.waiting -= 1;
        }
        Ok(())
    }
}

/// Each client for which `plan` gives topics subscribes to them, then sends
/// `sync`; returns once every such client has its answer (at most 60 s).
fn subscribe_all(
    groups: Vec<Vec<Client>>,
    plan: impl Fn(u32) -> Option<Vec<String>>,
) -> Result<Vec<Vec<Client>>, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let stop = AtomicBool::new(false);
    let mut waiting = Vec::new();
    let mut groups = groups;
    for g in &mut groups {
        let mut n = 0;
        for c in g.iter_mut() {
            let Some(topics) = plan(c.id) else { continue };
            for t in topics {
                masked_frame(
                    &mut c.wbuf,
                    0x1,
                    format!("sub {t}").as_bytes(),
                    [7, 7, 7, 7],
                );
            }
            masked_frame(&mut c.wbuf, 0x1, b"sync", [7, 7, 7, 7]);
            c.acks_pending += 1;
            n += 1;
        }
        waiting.push(n);
    }
    let results: Vec<Result<(SyncAcks, Vec<Client>), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = groups
            .into_iter()
            .zip(waiting)
            .map(|(g, waiting)| {
                let stop = &stop;
                s.spawn(move || {
                    let mut h = SyncAcks { waiting };
                    let r = event_loop(g, &mut h, stop, |h| {
                        h.waiting == 0 || Instant::now() > deadline
                    });
                    if r.is_err() {
                        stop.store(true, Relaxed);
                    }
                    r.map(|g| (h, g))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
            .collect()
    });
    let mut out = Vec::new();
    for r in results {
        let (h, g) = r?;
        if h.waiting > 0 {
            return Err(format!(
                "{} clients had no answer to their subscriptions after 60 s",
                h.waiting
            ));
        }
        out.push(g);
    }
    Ok(out)
}

/// A probe: `probe` and the sender's id, in hex. Deliveries are at least
/// `PUB_HEAD` bytes of hex, so neither is taken for the other.
fn is_probe(payload: &[u8]) -> bool {
    payload.starts_with(b"probe ")
}

/// Waits for the probes each client needs.
struct Probes<'a> {
    /// The bits of the probers client `id` must hear from.
    need: &'a (dyn Fn(u32) -> u64 + Sync),
    /// The bit of prober `id`.
    bit: &'a (dyn Fn(u32) -> u64 + Sync),
    /// Clients of this loop still waiting.
    waiting: usize,
}

impl Handler for Probes<'_> {
    fn on_message(
        &mut self,
        c: &mut Client,
        op: u8,
        payload: &[u8],
        _: Instant,
    ) -> Result<(), String> {
        let sender = (op == 0x1 && is_probe(payload))
            .then(|| std::str::from_utf8(&payload[6..]).ok())
            .flatten()
            .and_then(|h| u32::from_str_radix(h, 16).ok());
        let Some(sender) = sender else {
            return Err(format!(
                "client {}: unexpected message while probing: {:?}",
                c.id,
                String::from_utf8_lossy(&payload[..payload.len().min(80)])
            ));
        };
        let need = (self.need)(c.id);
        let was = c.probes_seen & need == need;
        c.probes_seen |= (self.bit)(sender);
        if !was && c.probes_seen & need == need {
            self.waiting -= 1;
        }
        Ok(())
    }
}

/// Servers that share topics through a broker (Redis) subscribe to it
/// after they answered the client: the answer to `sync` says that the
/// client's server has its subscription, not yet that the others' messages
/// reach it. So before measuring, each prober (`probe(id)` gives its
/// topic) publishes `probe ID`, again every 250 ms, until every client
/// has received a probe from each prober in `need(id)` (a bit per prober:
/// `bit(id)`). The probers must be spread so that this proves every
/// server's subscription: a probe crosses servers. Late probes arrive
/// while measuring: deliveries ignore them. Returns the probe rounds.
fn await_probes(
    groups: &mut Vec<Vec<Client>>,
    probe: impl Fn(u32) -> Option<String>,
    need: &(dyn Fn(u32) -> u64 + Sync),
    bit: &(dyn Fn(u32) -> u64 + Sync),
) -> Result<usize, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let stop = AtomicBool::new(false);
    for round in 0.. {
        let waiting: Vec<usize> = groups
            .iter()
            .map(|g| {
                g.iter()
                    .filter(|c| c.probes_seen & need(c.id) != need(c.id))
                    .count()
            })
            .collect();
        let left: usize = waiting.iter().sum();
        if left == 0 {
            return Ok(round);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{left} clients had no probe from every server after 30 s: are the servers bridged?"
            ));
        }
        for c in groups.iter_mut().flatten() {
            if let Some(topic) = probe(c.id) {
                let text = format!("pub {topic} probe {:08x}", c.id);
                masked_frame(&mut c.wbuf, 0x1, text.as_bytes(), [2, 7, 1, 8]);
            }
        }
        let round_end = Instant::now() + Duration::from_millis(250);
        let results: Vec<Result<Vec<Client>, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = std::mem::take(groups)
                .into_iter()
                .zip(waiting)
                .map(|(g, waiting)| {
                    let stop = &stop;
                    s.spawn(move || {
                        let mut h = Probes { need, bit, waiting };
                        let r = event_loop(g, &mut h, stop, |h| {
                            h.waiting == 0 || Instant::now() > round_end
                        });
                        if r.is_err() {
                            stop.store(true, Relaxed);
                        }
                        r
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
                .collect()
        });
        for r in results {
            groups.push(r?);
        }
    }
    unreachable!()
}

/// Percentiles 50 and 99 of unsorted values.
fn p50_p99(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (percentile(&v, 0.5), percentile(&v, 0.99))
}

/// Fan-out subscribers: every delivery comes from `publisher`, in order.
struct FanoutSub {
    size: usize,
    publisher: u32,
    delivered: Arc<AtomicU64>,
    /// (round, latency in ms) per delivery.
    seen: Vec<(u64, f64)>,
    /// Several servers: the latency of each delivery from another server
    /// than the publisher's (the first), in ms.
    naddrs: usize,
    cross_ms: Vec<f64>,
    scratch: Vec<u8>,
}

impl Handler for FanoutSub {
    fn on_message(
        &mut self,
        c: &mut Client,
        op: u8,
        payload: &[u8],
        now: Instant,
    ) -> Result<(), String> {
        if op == 0x1 && is_probe(payload) {
            return Ok(());
        }
        let got = (op == 0x1)
            .then(|| check_pubsub(payload, self.size, &mut self.scratch))
            .flatten();
        let Some((sender, seq, us)) = got else {
            return Err(format!(
                "client {}: not a delivery: {:?}",
                c.id,
                String::from_utf8_lossy(&payload[..payload.len().min(80)])
            ));
        };
        if sender != self.publisher || seq != c.expect_seq {
            return Err(format!(
                "client {}: got message {seq} from client {sender}, expected {} from {}",
                c.id, c.expect_seq, self.publisher
            ));
        }
        c.expect_seq += 1;
        let ms = micros(now).saturating_sub(us) as f64 / 1e3;
        self.seen.push((seq, ms));
        if self.naddrs > 1 && !(c.id as usize).is_multiple_of(self.naddrs) {
            self.cross_ms.push(ms);
        }
        self.delivered.fetch_add(1, Relaxed);
        Ok(())
    }
}

/// One topic, `n` subscribers, one publisher (not subscribed) publishing
/// `rounds` messages, each once the previous one has reached everyone.
fn scenario_fanout(o: &Opts) -> Result<String, String> {
    let n = if o.clients_given {
        o.clients[0]
    } else {
        10_000
    };
    let size = o.size.max(PUB_HEAD);
    let rounds = o.rounds.max(1);
    let (soft, hard) = raise_fd_limit();
    eprintln!("fd limit: soft {soft}, hard {hard}");
    epoch();
    let topic = "fanout";
    let mut publisher = open_clients(&o.addrs, 0, 1)
        .map_err(|e| e.to_string())?
        .remove(0);
    let t_open = Instant::now();
    let subs = open_clients(&o.addrs, 1, n).map_err(|e| e.to_string())?;
    let t_sub = Instant::now();
    let mut groups = subscribe_all(split_groups(subs, o.threads), |_| Some(vec![topic.into()]))?;
    eprintln!(
        "{}: {n} clients connected in {:.1} s, subscribed in {:.2} s",
        o.label,
        (t_sub - t_open).as_secs_f64(),
        t_sub.elapsed().as_secs_f64()
    );
    let naddrs = o.addrs.len();
    if naddrs > 1 {
        // The publisher probes until its probe reached every subscriber,
        // on every server.
        let t0 = Instant::now();
        groups[0].push(publisher);
        let probes = await_probes(
            &mut groups,
            |id| (id == 0).then(|| topic.to_string()),
            &|id| u64::from(id != 0),
            &|_| 1,
        )?;
        let g = groups
            .iter_mut()
            .find(|g| g.iter().any(|c| c.id == 0))
            .ok_or("the publisher got lost")?;
        let at = g.iter().position(|c| c.id == 0).unwrap_or_default();
        publisher = g.remove(at);
        eprintln!(
            "{}: {naddrs} servers: a publish on the first reached every subscriber after {probes} probe rounds, {:.2} s",
            o.label,
            t0.elapsed().as_secs_f64()
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let delivered = Arc::new(AtomicU64::new(0));
    let loops = {
        let delivered = delivered.clone();
        spawn_loops(
            groups,
            move || FanoutSub {
                size,
                publisher: 0,
                delivered: delivered.clone(),
                seen: Vec::new(),
                naddrs,
                cross_ms: Vec::new(),
                scratch: Vec::new(),
            },
            &stop,
        )
    };
    std::thread::sleep(Duration::from_millis(200));
    let losses0 = net_losses();
    let published = (|| -> Result<(f64, f64, f64), String> {
        let s = &mut publisher.stream;
        s.set_nonblocking(false).map_err(|e| e.to_string())?;
        let (mut payload, mut frame, mut scratch) = (Vec::new(), Vec::new(), Vec::new());
        let cpu0 = o.server_cpu().unwrap_or(0.0);
        let broker0 = o.broker_pid.map_or(0.0, cpu_seconds);
        let t0 = Instant::now();
        for r in 0..rounds as u64 {
            pubsub_payload(&mut payload, 0, r, micros(Instant::now()), size);
            frame.clear();
            pub_frame(&mut frame, topic, &payload, &mut scratch);
            s.write_all(&frame).map_err(|e| format!("publisher: {e}"))?;
            // Until this round has reached everyone, then a pause so that
            // rounds do not overlap.
            let deadline = Instant::now() + Duration::from_secs(30);
            while delivered.load(Relaxed) < n as u64 * (r + 1) {
                if stop.load(Relaxed) {
                    return Err("a subscriber failed".into());
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "round {r}: {} of {n} deliveries after 30 s",
                        delivered.load(Relaxed) - n as u64 * r
                    ));
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let secs = t0.elapsed().as_secs_f64();
        let cpu = o.server_cpu().map_or(0.0, |c| c - cpu0);
        let broker = o.broker_pid.map_or(0.0, |pid| cpu_seconds(pid) - broker0);
        Ok((secs, cpu, broker))
    })();
    let losses = net_losses();
    let (drops, retrans) = (
        losses.0.saturating_sub(losses0.0),
        losses.1.saturating_sub(losses0.1),
    );
    stop.store(true, Relaxed);
    let results = join_loops(loops);
    let (secs, server_cpu, broker_cpu) = published?;
    let results = results?;
    // The publisher is not subscribed: it must have received nothing (an
    // `error: ` answer would mean a publish was refused).
    publisher
        .stream
        .set_nonblocking(true)
        .map_err(|e| e.to_string())?;
    let mut rest = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(k) = publisher.stream.read(&mut chunk) {
        if k == 0 {
            return Err("publisher: server closed the connection".into());
        }
        rest.extend_from_slice(&chunk[..k]);
    }
    while let Some((op, st, e, _)) = parse_frame(&rest) {
        if op != 0x9 {
            return Err(format!(
                "publisher: got {:?}",
                String::from_utf8_lossy(&rest[st..e.min(st + 80)])
            ));
        }
        rest.drain(..e);
    }
    for (_, clients) in &results {
        if let Some(c) = clients.iter().find(|c| c.expect_seq != rounds as u64) {
            return Err(format!(
                "client {}: {} of {rounds} messages",
                c.id, c.expect_seq
            ));
        }
    }
    let mut last = vec![0f64; rounds];
    let mut lat = Vec::with_capacity(n * rounds);
    let cross: Vec<f64> = results
        .iter()
        .flat_map(|(h, _)| h.cross_ms.iter().copied())
        .collect();
    for (h, _) in &results {
        for &(round, ms) in &h.seen {
            lat.push(ms);
            last[round as usize] = last[round as usize].max(ms);
        }
    }
    if lat.len() != n * rounds {
        return Err(format!(
            "{} of {} deliveries arrived",
            lat.len(),
            n * rounds
        ));
    }
    let by_round: Vec<String> = last.iter().map(|ms| format!("{ms:.1}")).collect();
    eprintln!("last delivery by round (ms): {}", by_round.join(" "));
    lat.sort_by(f64::total_cmp);
    last.sort_by(f64::total_cmp);
    let (l50, l99) = (percentile(&last, 0.5), percentile(&last, 0.99));
    let (d50, d99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    let rate = n as f64 / (l50 / 1e3).max(1e-9);
    let cpu_pct = o.has_server().then(|| server_cpu / secs * 100.0);
    let cpu_ms_round = o.has_server().then(|| server_cpu * 1e3 / rounds as f64);
    let show = |v: Option<f64>, p: usize| v.map_or("null".to_string(), |v| format!("{v:.p$}"));
    // Several servers: the deliveries that crossed from the first to
    // another; and the broker's CPU.
    let mut extra = String::new();
    if naddrs > 1 {
        let (c50, c99) = p50_p99(cross.clone());
        eprintln!(
            "{}: {naddrs} servers: {} deliveries crossed from the first server to another: p50 {c50:.2} ms, p99 {c99:.2} ms",
            o.label,
            cross.len()
        );
        extra += &format!(
            ",\"servers\":{naddrs},\"cross_deliveries\":{},\"cross_delivery_p50_ms\":{c50:.3},\"cross_delivery_p99_ms\":{c99:.3}",
            cross.len()
        );
    }
    if o.broker_pid.is_some() {
        let pct = broker_cpu / secs * 100.0;
        eprintln!("{}: broker CPU {pct:.0}% of a core", o.label);
        extra += &format!(",\"broker_cpu_percent\":{pct:.1}");
    }
    eprintln!(
        "{}: publish to 1 topic of {n} subscribers x {size} B, {rounds} rounds: last delivery p50 {l50:.2} ms, p99 {l99:.2} ms; each delivery p50 {d50:.2} ms, p99 {d99:.2} ms; {rate:.0} deliveries/s (server CPU {} ms per round; machine-wide {drops} packets dropped, {retrans} retransmitted)",
        o.label,
        show(cpu_ms_round, 1)
    );
    Ok(format!(
        "{{\"scenario\":\"pubsub\",\"shape\":\"fanout\",\"label\":\"{}\",\"clients\":{n},\"size\":{size},\"rounds\":{rounds},\"last_p50_ms\":{l50:.3},\"last_p99_ms\":{l99:.3},\"delivery_p50_ms\":{d50:.3},\"delivery_p99_ms\":{d99:.3},\"deliveries_per_sec\":{rate:.0},\"server_cpu_percent\":{},\"server_cpu_ms_per_round\":{},\"net_drops\":{drops},\"tcp_retrans\":{retrans}{extra}}}",
        o.label,
        show(cpu_pct, 1),
        show(cpu_ms_round, 2)
    ))
}

/// Chat: client `i` is in topic `i % topics`, as member `i / topics`.
struct ChatRecv {
    topics: usize,
    size: usize,
    delivered: Arc<AtomicU64>,
    /// Latency of each delivery, in us.
    lat_us: Vec<f64>,
    /// Several servers (client `i` on the `i % naddrs`-th): the latency of
    /// each delivery from a sender on another server than the receiver's.
    naddrs: usize,
    cross_us: Vec<f64>,
    /// Several servers: (send time, latency) of each delivery, in us, for
    /// the latency second by second.
    timed_us: Vec<(u64, f64)>,
    scratch: Vec<u8>,
}

impl Handler for ChatRecv {
    fn on_message(
        &mut self,
        c: &mut Client,
        op: u8,
        payload: &[u8],
        now: Instant,
    ) -> Result<(), String> {
        if op == 0x1 && is_probe(payload) {
            return Ok(());
        }
        let got = (op == 0x1)
            .then(|| check_pubsub(payload, self.size, &mut self.scratch))
            .flatten();
        let Some((sender, seq, us)) = got else {
            return Err(format!(
                "client {}: not a delivery: {:?}",
                c.id,
                String::from_utf8_lossy(&payload[..payload.len().min(80)])
            ));
        };
        let t = self.topics as u32;
        let member = (sender / t) as usize;
        if sender == c.id {
            return Err(format!("client {}: got its own message {seq}", c.id));
        }
        if sender % t != c.id % t || member >= c.peer_next.len() {
            return Err(format!(
                "client {}: got a message from client {sender}, not in its topic",
                c.id
            ));
        }
        if seq != c.peer_next[member] {
            return Err(format!(
                "client {}: got message {seq} from client {sender}, expected {}",
                c.id, c.peer_next[member]
            ));
        }
        c.peer_next[member] += 1;
        let lat = micros(now).saturating_sub(us) as f64;
        self.lat_us.push(lat);
        if self.naddrs > 1 {
            if sender as usize % self.naddrs != c.id as usize % self.naddrs {
                self.cross_us.push(lat);
            }
            self.timed_us.push((us, lat));
        }
        self.delivered.fetch_add(1, Relaxed);
        Ok(())
    }
}

struct ChatShared {
    topics: usize,
    size: usize,
    naddrs: usize,
    /// Each client's first message is due at `start` plus its share of one
    /// period; no message is sent from `end` on.
    start: Instant,
    end: Instant,
    period: f64,
    stop: AtomicBool,
    sent: AtomicU64,
    /// Threads still publishing.
    sending: AtomicU64,
    delivered: Arc<AtomicU64>,
}

/// One thread of chat clients: publish on schedule, check every delivery.
fn chat_loop(mut clients: Vec<Client>, sh: &ChatShared) -> Result<(ChatRecv, Vec<Client>), String> {
    let poller = Poller::new().map_err(|e| e.to_string())?;
    for (k, c) in clients.iter().enumerate() {
        // SAFETY: each stream stays open while registered; deleted below.
        unsafe { poller.add(&c.stream, Event::readable(k)) }.map_err(|e| e.to_string())?;
    }
    let mut h = ChatRecv {
        topics: sh.topics,
        size: sh.size,
        delivered: sh.delivered.clone(),
        lat_us: Vec::new(),
        naddrs: sh.naddrs,
        cross_us: Vec::new(),
        timed_us: Vec::new(),
        scratch: Vec::new(),
    };
    let (mut payload, mut scratch) = (Vec::new(), Vec::new());
    let mut events = Events::new();
    let mut buf = vec![0u8; 256 * 1024];
    let len = clients.len();
    // Message `m` of client `j` is due at start + (m + j / len) periods.
    let due = |m: u64, j: usize| {
        sh.start + Duration::from_secs_f64(sh.period * (m as f64 + j as f64 / len as f64))
    };
    let (mut m, mut j) = (0u64, 0usize);
    let (mut sending, mut told) = (true, false);
    let result = (|| -> Result<(), String> {
        while !sh.stop.load(Relaxed) {
            let now = Instant::now();
            while sending && due(m, j) <= now {
                if due(m, j) >= sh.end {
                    sending = false;
                    break;
                }
                let c = &mut clients[j];
                let topic = format!("chat{}", c.id as usize % sh.topics);
                pubsub_payload(
                    &mut payload,
                    c.id,
                    c.next_seq,
                    micros(Instant::now()),
                    sh.size,
                );
                pub_frame(&mut c.wbuf, &topic, &payload, &mut scratch);
                c.next_seq += 1;
                sh.sent.fetch_add(1, Relaxed);
                try_flush(c).map_err(|e| format!("client {}: {e}", c.id))?;
                if !c.wbuf.is_empty() && !c.writable_wanted {
                    c.writable_wanted = true;
                    poller
                        .modify(&c.stream, Event::new(j, true, true))
                        .map_err(|e| e.to_string())?;
                }
                j += 1;
                if j == len {
                    (m, j) = (m + 1, 0);
                }
            }
            if sending && now >= sh.end {
                sending = false;
            }
            let timeout = if sending {
                due(m, j)
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(50))
            } else {
                Duration::from_millis(50)
            };
            events.clear();
            poller
                .wait(&mut events, Some(timeout))
                .map_err(|e| e.to_string())?;
            let now = Instant::now();
            for ev in events.iter() {
                let c = &mut clients[ev.key];
                if ev.readable {
                    drain_reads(c, &mut h, &mut buf, now)?;
                }
                try_flush(c).map_err(|e| format!("client {}: {e}", c.id))?;
                c.writable_wanted = !c.wbuf.is_empty();
                poller
                    .modify(&c.stream, Event::new(ev.key, true, c.writable_wanted))
                    .map_err(|e| e.to_string())?;
            }
            if !sending && !told {
                told = true;
                sh.sending.fetch_sub(1, Relaxed);
            }
        }
        Ok(())
    })();
    for c in &clients {
        let _ = poller.delete(&c.stream);
    }
    if result.is_err() {
        sh.stop.store(true, Relaxed);
    }
    result.map(|_| (h, clients))
}

/// `topics` topics of `subscribers` clients each; every client publishes
/// to its own topic `rate` times a second for `seconds`, and must receive
/// every message of the other members of its topic, in order, and none of
/// its own.
fn scenario_chat(o: &Opts) -> Result<String, String> {
    let (t, per) = (o.topics, o.subscribers);
    let n = t * per;
    let size = o.size.max(PUB_HEAD);
    let (soft, hard) = raise_fd_limit();
    eprintln!("fd limit: soft {soft}, hard {hard}");
    epoch();
    let t_open = Instant::now();
    let clients = open_clients(&o.addrs, 0, n).map_err(|e| e.to_string())?;
    let t_sub = Instant::now();
    let mut groups = subscribe_all(split_groups(clients, o.threads), |id| {
        Some(vec![format!("chat{}", id as usize % t)])
    })?;
    eprintln!(
        "{}: {n} clients connected in {:.1} s, subscribed in {:.2} s",
        o.label,
        (t_sub - t_open).as_secs_f64(),
        t_sub.elapsed().as_secs_f64()
    );
    for c in groups.iter_mut().flatten() {
        c.peer_next = vec![0; per];
    }
    let naddrs = o.addrs.len();
    if naddrs > 1 {
        if t % naddrs == 0 {
            eprintln!(
                "{}: warning: {t} topics over {naddrs} servers: every topic's members are on one server (client i on server i % {naddrs}), no delivery crosses servers",
                o.label
            );
        }
        // Members 0 and 1 of each topic (clients `topic` and `topic + t`,
        // on two servers when `t % naddrs != 0`) probe; every member
        // needs both probes but its own. Then each server with members
        // has received a probe from another server: its subscription is
        // in the broker.
        let t0 = Instant::now();
        let tt = t as u32;
        let bit = move |id: u32| if id < 2 * tt { 1u64 << (id / tt) } else { 0 };
        let probes = await_probes(
            &mut groups,
            |id| (id < 2 * tt).then(|| format!("chat{}", id % tt)),
            &move |id| 0b11 & !bit(id),
            &bit,
        )?;
        eprintln!(
            "{}: {naddrs} servers: every member reached from two servers after {probes} probe rounds, {:.2} s",
            o.label,
            t0.elapsed().as_secs_f64()
        );
    }
    let start = Instant::now() + Duration::from_millis(200);
    let sh = Arc::new(ChatShared {
        topics: t,
        size,
        naddrs,
        start,
        end: start + Duration::from_secs_f64(o.seconds),
        period: 1.0 / o.rate,
        stop: AtomicBool::new(false),
        sent: AtomicU64::new(0),
        sending: AtomicU64::new(groups.len() as u64),
        delivered: Arc::new(AtomicU64::new(0)),
    });
    let loops: Vec<_> = groups
        .into_iter()
        .map(|g| {
            let sh = sh.clone();
            std::thread::spawn(move || chat_loop(g, &sh))
        })
        .collect();
    std::thread::sleep(start.saturating_duration_since(Instant::now()));
    let cpu0 = o.server_cpu().unwrap_or(0.0);
    let broker0 = o.broker_pid.map_or(0.0, cpu_seconds);
    let self_cpu0 = cpu_seconds(std::process::id());
    let losses0 = net_losses();
    // Until every thread has stopped publishing, then until every delivery
    // is in (at most 15 s more).
    let drained = (|| -> Result<Instant, String> {
        let mut deadline = None;
        loop {
            std::thread::sleep(Duration::from_micros(500));
            if sh.stop.load(Relaxed) {
                return Err("a client failed".into());
            }
            if sh.sending.load(Relaxed) > 0 {
                continue;
            }
            let expected = sh.sent.load(Relaxed) * (per as u64 - 1);
            let got = sh.delivered.load(Relaxed);
            if got >= expected {
                return Ok(Instant::now());
            }
            let d = *deadline.get_or_insert(Instant::now() + Duration::from_secs(15));
            if Instant::now() > d {
                return Err(format!("{got} of {expected} deliveries arrived"));
            }
        }
    })();
    let server_cpu = o.server_cpu().unwrap_or(0.0) - cpu0;
    let broker_cpu = o.broker_pid.map_or(0.0, |pid| cpu_seconds(pid) - broker0);
    let self_cpu = cpu_seconds(std::process::id()) - self_cpu0;
    let losses = net_losses();
    let (drops, retrans) = (
        losses.0.saturating_sub(losses0.0),
        losses.1.saturating_sub(losses0.1),
    );
    sh.stop.store(true, Relaxed);
    let results: Result<Vec<_>, String> = loops
        .into_iter()
        .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
        .collect();
    let drained = drained?;
    let results = results?;
    // Every client got every message of the others in its topic, and none
    // of its own.
    let mut sent_by = vec![0u64; n];
    for c in results.iter().flat_map(|(_, g)| g) {
        sent_by[c.id as usize] = c.next_seq;
    }
    for c in results.iter().flat_map(|(_, g)| g) {
        for (k, &got) in c.peer_next.iter().enumerate() {
            let sender = c.id as usize % t + k * t;
            let want = if sender == c.id as usize {
                0
            } else {
                sent_by[sender]
            };
            if got != want {
                return Err(format!(
                    "client {}: {got} of {want} messages from client {sender}",
                    c.id
                ));
            }
        }
    }
    let published = sh.sent.load(Relaxed);
    let delivered = sh.delivered.load(Relaxed);
    let secs = drained.duration_since(start).as_secs_f64();
    let cross: Vec<f64> = results
        .iter()
        .flat_map(|(h, _)| h.cross_us.iter().copied())
        .collect();
    if naddrs > 1 {
        // By the second the message was sent in: whether a backlog built up.
        let start_us = micros(start);
        let mut by_sec: Vec<Vec<f64>> = Vec::new();
        for &(us, lat) in results.iter().flat_map(|(h, _)| &h.timed_us) {
            let k = (us.saturating_sub(start_us) / 1_000_000) as usize;
            if by_sec.len() <= k {
                by_sec.resize_with(k + 1, Vec::new);
            }
            by_sec[k].push(lat);
        }
        let text: Vec<String> = by_sec
            .into_iter()
            .map(|v| {
                let (a, b) = p50_p99(v);
                format!("{:.1}/{:.1}", a / 1e3, b / 1e3)
            })
            .collect();
        eprintln!(
            "{}: latency p50/p99 (ms) by second sent: {}",
            o.label,
            text.join(" ")
        );
    }
    let mut lat: Vec<f64> = results.into_iter().flat_map(|(h, _)| h.lat_us).collect();
    lat.sort_by(f64::total_cmp);
    let ms = |p| percentile(&lat, p) / 1e3;
    let (p50, p99, p999, max) = (ms(0.5), ms(0.99), ms(0.999), ms(1.0));
    let rate = delivered as f64 / secs;
    let offered = n as f64 * o.rate * (per - 1) as f64;
    let cpu_pct = o.has_server().then(|| server_cpu / secs * 100.0);
    let self_pct = self_cpu / secs * 100.0;
    let show = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v:.0}"));
    // Several servers: the deliveries that crossed servers; and the
    // broker's CPU.
    let mut extra = String::new();
    if naddrs > 1 {
        let crossed = cross.len();
        let (c50, c99) = p50_p99(cross);
        let (c50, c99) = (c50 / 1e3, c99 / 1e3);
        eprintln!(
            "{}: {naddrs} servers: {crossed} of {delivered} deliveries crossed servers: p50 {c50:.2} ms, p99 {c99:.2} ms",
            o.label
        );
        extra += &format!(
            ",\"servers\":{naddrs},\"cross_deliveries\":{crossed},\"cross_p50_ms\":{c50:.3},\"cross_p99_ms\":{c99:.3}"
        );
    }
    if o.broker_pid.is_some() {
        let pct = broker_cpu / secs * 100.0;
        eprintln!("{}: broker CPU {pct:.0}% of a core", o.label);
        extra += &format!(",\"broker_cpu_percent\":{pct:.1}");
    }
    eprintln!(
        "{}: chat, {t} topics x {per} subscribers publishing {} msg/s each x {size} B for {:.0} s: {published} published, {delivered} deliveries, {rate:.0}/s (offered {offered:.0}/s); latency p50 {p50:.2} ms, p99 {p99:.2} ms, p99.9 {p999:.2} ms, max {max:.2} ms (server CPU {}%, loadgen CPU {self_pct:.0}%; machine-wide {drops} packets dropped, {retrans} retransmitted)",
        o.label,
        o.rate,
        o.seconds,
        show(cpu_pct)
    );
    Ok(format!(
        "{{\"scenario\":\"pubsub\",\"shape\":\"chat\",\"label\":\"{}\",\"topics\":{t},\"subscribers\":{per},\"clients\":{n},\"size\":{size},\"rate\":{},\"seconds\":{secs:.2},\"published\":{published},\"deliveries\":{delivered},\"deliveries_per_sec\":{rate:.0},\"offered_per_sec\":{offered:.0},\"p50_ms\":{p50:.3},\"p99_ms\":{p99:.3},\"p999_ms\":{p999:.3},\"max_ms\":{max:.3},\"server_cpu_percent\":{},\"loadgen_cpu_percent\":{self_pct:.0},\"net_drops\":{drops},\"tcp_retrans\":{retrans}{extra}}}",
        o.label,
        o.rate,
        show(cpu_pct)
    ))
}

fn main() {
    let o = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let result = match o.scenario.as_str() {
        "idle" => scenario_idle(&o),
        "echo" => scenario_echo(&o),
        "broadcast" => scenario_broadcast(&o),
        "connect" => scenario_connect(&o),
        "pubsub" if o.shape == "chat" => scenario_chat(&o),
        "pubsub" => scenario_fanout(&o),
        other => Err(format!("unknown scenario {other}")),
    };
    match result {
        Ok(json) => println!("{json}"),
        Err(e) => {
            eprintln!("FAILED: {e}");
            std::process::exit(1);
        }
    }
}
