//! Soak test: churn against an in-process server for a while, then report
//! memory, file descriptors and the server's counters at start and end.
//!
//! ```text
//! cargo run --release --example soak -- [--seconds N] [--steady N] [--pipelined N] [--main-loop]
//! ```
//!
//! Churn threads connect, exchange checked messages and leave every way a
//! client can (close handshake, drop, FIN mid-frame); slow readers fill
//! their queues and vanish; steady clients stay connected and keep
//! talking; pipelining clients (8 by default) write numbered messages of
//! 1 B to 64 KiB from one thread as fast as they can while another thread
//! reads the echoes more slowly, checking each arrives in order and
//! byte-exact, in rounds of a few thousand messages ended by a close
//! handshake. Flow control must keep every echo: the echo handler counts
//! the sends refused for any reason but a closed client, and the run fails
//! if that count plus the server's `messages_dropped` is not 0. Any
//! mismatch or unexpected error stops the run with a non-zero exit. The
//! messages of leaving clients discarded with the event channel a whole
//! budget behind (`messages_discarded`, the cases the README's "Nothing
//! lost" names) are printed, not failed on.
//! Memory and fds are the whole process's (clients included).
//!
//! `--main-loop` handles messages and disconnects in a thread that takes
//! the server's events instead of closures (the other event style), and
//! that stalls for 20 ms every 20,000 events, so that its channel fills and
//! the workers' read gate pauses clients while it is away.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use enjent::{Error, Event, WebSocketServer};
use tungstenite::Message as Tm;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(|l| l.to_owned())
        })
        .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    masked_with(first, payload, [1, 2, 3, 4])
}

/// A masked client frame with the masking key `key`.
fn masked_with(first: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(first);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&key);
    let start = out.len();
    out.extend_from_slice(payload);
    // Four bytes at a time: the pipelined writers mask megabytes a second.
    let k = u32::from_ne_bytes(key);
    let mut words = out[start..].chunks_exact_mut(4);
    for w in &mut words {
        let v = u32::from_ne_bytes([w[0], w[1], w[2], w[3]]) ^ k;
        w.copy_from_slice(&v.to_ne_bytes());
    }
    for (b, k) in words.into_remainder().iter_mut().zip(key) {
        *b ^= k;
    }
    out
}

/// One churn cycle; returns messages verified.
fn churn_once(addr: SocketAddr, round: u64) -> Result<u64, String> {
    let (mut ws, _) = tungstenite::connect(format!("ws://{addr}/")).map_err(|e| e.to_string())?;
    let n = 1 + round % 20;
    for i in 0..n {
        let body = format!(
            "{round}:{i}:{}",
            "z".repeat((round * 7 + i) as usize % 3000)
        );
        ws.send(Tm::text(body.clone())).map_err(|e| e.to_string())?;
        match ws.read().map_err(|e| e.to_string())? {
            Tm::Text(t) if t.as_str() == body => {}
            other => return Err(format!("echo mismatch: {other:?}")),
        }
    }
    match round % 3 {
        0 => {
            ws.close(None).map_err(|e| e.to_string())?;
            while ws.read().is_ok() {}
        }
        1 => drop(ws),
        _ => {
            // FIN in the middle of a frame.
            let mut s = match ws.into_inner() {
                tungstenite::stream::MaybeTlsStream::Plain(s) => s,
                _ => return Err("tls?".into()),
            };
            let f = masked(0x82, &[9; 500]);
            s.write_all(&f[..200]).map_err(|e| e.to_string())?;
        }
    }
    Ok(n)
}

/// Messages in a pipelined round (fewer if the time runs out first).
const ROUND: u64 = 2000;

/// How long a pipelined client waits on its socket before it calls an
/// echo missing (a stalled flow control shows up as this, not a hang).
const PIPE_WAIT: Duration = Duration::from_secs(20);

const UPGRADE: &str = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// splitmix64: sizes, kinds, contents and masking keys of the pipelined
/// messages, so that the reader rebuilds what the writer sent.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// 128 KiB of filler bytes, binary and printable ASCII, that pipelined
/// messages are cut from.
fn filler() -> &'static (Vec<u8>, Vec<u8>) {
    static FILLER: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    FILLER.get_or_init(|| {
        let binary: Vec<u8> = (0..128 * 1024u64).map(|i| mix(i) as u8).collect();
        let text = binary.iter().map(|b| b' ' + b % 95).collect();
        (binary, text)
    })
}

/// Message `seq` of the pipelined round `key`: (opcode, payload). Its size
/// (1 B to 64 KiB, mostly small), kind (a quarter text) and bytes follow
/// from `key` and `seq`; the payload starts with `#seq:`, as far as it
/// fits.
fn pipelined_message(key: u64, seq: u64) -> (u8, Vec<u8>) {
    let h = mix(key ^ seq.wrapping_mul(0xD6E8_FEB8_6659_FD93));
    let r = h >> 16;
    let len = match h % 100 {
        0 => 1,
        1 => 64 * 1024,
        2..=49 => 1 + r % 125,
        50..=79 => 126 + r % (4096 - 126),
        80..=94 => 4096 + r % (16384 - 4096),
        _ => 16384 + r % (64 * 1024 - 16384 + 1),
    } as usize;
    let text = (h >> 8).is_multiple_of(4);
    let (binary, ascii) = filler();
    let source = if text { ascii } else { binary };
    let tag = format!("#{seq}:");
    let mut p = Vec::with_capacity(len);
    p.extend_from_slice(&tag.as_bytes()[..tag.len().min(len)]);
    let from = (r >> 24) as usize % (64 * 1024);
    p.extend_from_slice(&source[from..from + len - p.len()]);
    (if text { 0x1 } else { 0x2 }, p)
}

/// A raw socket past the handshake, with `PIPE_WAIT` timeouts.
fn raw_ws(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(PIPE_WAIT))?;
    s.set_write_timeout(Some(PIPE_WAIT))?;
    s.write_all(UPGRADE.as_bytes())?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 4096 {
            return Err(std::io::Error::other("handshake response too long"));
        }
        s.read_exact(&mut b)?;
        head.push(b[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101 ") {
        return Err(std::io::Error::other(format!(
            "handshake refused: {}",
            String::from_utf8_lossy(&head)
        )));
    }
    Ok(s)
}

/// The next message from the server, put together from its frames:
/// (opcode, payload). Pings and pongs are skipped; a close frame comes back
/// as opcode 8.
fn read_message(r: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    let bad = |what: String| Err(std::io::Error::other(what));
    let mut opcode = None;
    let mut message = Vec::new();
    loop {
        let mut h = [0u8; 2];
        r.read_exact(&mut h)?;
        if h[1] & 0x80 != 0 || h[0] & 0x70 != 0 {
            return bad(format!("masked or RSV frame {:02x} {:02x}", h[0], h[1]));
        }
        let len = match h[1] & 0x7F {
            126 => {
                let mut b = [0u8; 2];
                r.read_exact(&mut b)?;
                u16::from_be_bytes(b) as u64
            }
            127 => {
                let mut b = [0u8; 8];
                r.read_exact(&mut b)?;
                u64::from_be_bytes(b)
            }
            n => n as u64,
        };
        if len > 1 << 20 {
            return bad(format!("frame of {len} B"));
        }
        let mut p = vec![0u8; len as usize];
        r.read_exact(&mut p)?;
        match h[0] & 0x0F {
            0x9 | 0xA => continue,
            0x8 => return Ok((8, p)),
            0x0 if opcode.is_some() => message.extend_from_slice(&p),
            op @ (0x1 | 0x2) if opcode.is_none() => {
                opcode = Some(op);
                message = p;
            }
            _ => return bad(format!("unexpected frame {:02x}", h[0])),
        }
        if h[0] & 0x80 != 0
            && let Some(op) = opcode
        {
            return Ok((op, message));
        }
    }
}

/// The writing half of a pipelined round: up to `ROUND` messages as fast
/// as the socket takes them (fewer once `stop` is set), then a close.
/// Returns how many messages it sent.
fn write_round(s: &TcpStream, key: u64, stop: &AtomicBool) -> Result<u64, String> {
    let mut out = BufWriter::with_capacity(64 * 1024, s);
    let mut n = 0;
    while n < ROUND && !stop.load(Relaxed) {
        let (op, p) = pipelined_message(key, n);
        let mask = (mix(key.wrapping_add(n)) as u32).to_ne_bytes();
        out.write_all(&masked_with(0x80 | op, &p, mask))
            .map_err(|e| format!("write of message {n}: {e}"))?;
        n += 1;
    }
    out.write_all(&masked(0x88, &1000u16.to_be_bytes()))
        .and_then(|()| out.flush())
        .map_err(|e| format!("write of the close after {n} messages: {e}"))?;
    Ok(n)
}

/// One pipelined round on a fresh connection: a writer thread sends
/// (`write_round`) while this thread reads the echoes, sleeping 1 ms every
/// `pace` of them until `stop` is set, so it reads more slowly than the
/// writer writes. Each echo must come in order and byte-exact, then the
/// close reply, then EOF, with one echo per message sent. Returns
/// (messages, payload bytes) verified.
fn pipelined_round(
    addr: SocketAddr,
    key: u64,
    pace: u64,
    stop: &AtomicBool,
) -> Result<(u64, u64), String> {
    let s = raw_ws(addr).map_err(|e| format!("connect: {e}"))?;
    let w = s.try_clone().map_err(|e| format!("try_clone: {e}"))?;
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || {
            let sent = write_round(&w, key, stop);
            if sent.is_err() {
                // Wake the reader rather than leave it to time out.
                let _ = w.shutdown(Shutdown::Both);
            }
            sent
        });
        let mut input = BufReader::with_capacity(64 * 1024, &s);
        let (mut got, mut bytes) = (0u64, 0u64);
        let read = loop {
            match read_message(&mut input) {
                Ok((8, p)) if p.get(..2) == Some(&1000u16.to_be_bytes()[..]) => break Ok(()),
                Ok((8, p)) => break Err(format!("close reply {p:?} after {got} echoes")),
                Ok((op, p)) => {
                    let (want_op, want) = pipelined_message(key, got);
                    if op != want_op || p != want {
                        break Err(format!(
                            "echo {got} wrong: opcode {op}, {} B, starts {:?} (sent opcode {want_op}, {} B)",
                            p.len(),
                            String::from_utf8_lossy(&p[..p.len().min(12)]),
                            want.len()
                        ));
                    }
                    got += 1;
                    bytes += p.len() as u64;
                    if got % pace == 0 && !stop.load(Relaxed) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                Err(e) => break Err(format!("echo {got} missing: {e}")),
            }
        };
        if read.is_err() {
            // Unblock the writer, which the server may have stopped reading.
            let _ = s.shutdown(Shutdown::Both);
        }
        let sent = writer
            .join()
            .unwrap_or_else(|_| Err("writer panicked".into()));
        read?;
        let sent = sent?;
        if got != sent {
            return Err(format!("{got} echoes for {sent} messages"));
        }
        // After the close handshake the server closes the connection.
        let mut rest = [0u8; 64];
        match input.read(&mut rest) {
            Ok(0) => Ok((got, bytes)),
            Ok(n) => Err(format!("{n} bytes after the close reply")),
            Err(e) => Err(format!("no EOF after the close reply: {e}")),
        }
    })
}

/// Counters of the pipelined clients.
#[derive(Default)]
struct Pipelined {
    rounds: AtomicU64,
    verified: AtomicU64,
    bytes: AtomicU64,
    /// Rounds that failed: an echo missing, wrong or out of order, or the
    /// count, close reply or EOF not as expected.
    bad: AtomicU64,
}

/// A pipelining client: rounds until `stop`, each on a new connection,
/// with its reading pace changing from round to round.
fn pipelined_client(
    addr: SocketAddr,
    client: u64,
    stop: &AtomicBool,
    failed: &AtomicBool,
    counts: &Pipelined,
) {
    let mut round = 0u64;
    while !stop.load(Relaxed) {
        let key = mix(client << 32 | round);
        let pace = [1, 4, 16][((client + round) % 3) as usize];
        match pipelined_round(addr, key, pace, stop) {
            Ok((n, bytes)) => {
                counts.rounds.fetch_add(1, Relaxed);
                counts.verified.fetch_add(n, Relaxed);
                counts.bytes.fetch_add(bytes, Relaxed);
            }
            Err(e) => {
                eprintln!("pipelined client {client} round {round} failed: {e}");
                counts.bad.fetch_add(1, Relaxed);
                failed.store(true, Relaxed);
                stop.store(true, Relaxed);
            }
        }
        round += 1;
    }
}

/// Echo `m` to `c`, counting a refusal for any reason but a client that
/// has gone.
fn echo(c: &enjent::Client, m: enjent::Message, refused: &AtomicU64) {
    if let Err(e) = c.send(m)
        && !matches!(e.error(), Error::Closed)
    {
        refused.fetch_add(1, Relaxed);
    }
}

/// The other event style: take every event until `looping` is cleared,
/// echoing messages and counting disconnects; stall now and then as a
/// main loop with other work does.
fn run_main_loop(
    server: WebSocketServer,
    disconnects: &AtomicU64,
    refused: &AtomicU64,
    looping: &AtomicBool,
) -> WebSocketServer {
    let mut taken = 0u64;
    while looping.load(Relaxed) {
        match server.recv_timeout(Duration::from_millis(50)) {
            Ok(Event::Message { client, message }) => echo(&client, message, refused),
            Ok(Event::Disconnect { .. }) => {
                disconnects.fetch_add(1, Relaxed);
            }
            Ok(_) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        taken += 1;
        if taken.is_multiple_of(20_000) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    server
}

fn main() -> Result<(), Error> {
    let mut seconds = 60u64;
    let mut steady = 50usize;
    let mut pipelined = 8usize;
    let mut main_loop = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--main-loop" {
            main_loop = true;
            continue;
        }
        let v = args.next().and_then(|v| v.parse().ok());
        match (a.as_str(), v) {
            ("--seconds", Some(v)) => seconds = v,
            ("--steady", Some(v)) => steady = v as usize,
            ("--pipelined", Some(v)) => pipelined = v as usize,
            _ => {
                return Err(Error::InvalidInput(
                    "usage: soak [--seconds N] [--steady N] [--pipelined N] [--main-loop]",
                ));
            }
        }
    }
    // With closures every event goes to one, so the channel stays empty
    // (events nobody reads would be counted as growth); in the main loop
    // every event is taken.
    let disconnects = Arc::new(AtomicU64::new(0));
    // Sends refused for any reason but a client that has gone: flow
    // control promises an echo handler none.
    let refused = Arc::new(AtomicU64::new(0));
    let mut builder = WebSocketServer::builder()
        .max_backpressure(256 * 1024)
        .close_timeout(Duration::from_secs(1));
    if !main_loop {
        let (d, r) = (disconnects.clone(), refused.clone());
        builder = builder
            .on_connect(|_| {})
            .on_message(move |c, m| echo(c, m, &r))
            .on_disconnect(move |_, _, _| {
                d.fetch_add(1, Relaxed);
            });
    }
    let server = builder.start("127.0.0.1:0")?;
    let handle = server.handle();
    let addr = server.local_addr();
    // The main loop runs until the end's wait for closes is over.
    let looping = Arc::new(AtomicBool::new(true));
    let (server, main_thread) = if main_loop {
        let (d, r, looping) = (disconnects.clone(), refused.clone(), looping.clone());
        let t = std::thread::spawn(move || run_main_loop(server, &d, &r, &looping));
        (None, Some(t))
    } else {
        (Some(server), None)
    };
    let stop = Arc::new(AtomicBool::new(false));
    let verified = Arc::new(AtomicU64::new(0));
    let cycles = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let pipe = Arc::new(Pipelined::default());

    // Warm up once so the baseline includes the pool's scratch buffers.
    churn_once(addr, 0).map_err(|_| Error::Closed)?;
    std::thread::sleep(Duration::from_millis(200));
    let (rss0, fds0) = (rss_kib(), fds());
    println!("start: rss {rss0} KiB, fds {fds0}, {steady} steady clients, {seconds} s");
    println!(
        "pipelined: {pipelined} clients, rounds of {ROUND} messages of 1 B to 64 KiB, read more slowly than written"
    );

    let mut threads = Vec::new();
    for t in 0..4u64 {
        let (stop, verified, cycles, failed) = (
            stop.clone(),
            verified.clone(),
            cycles.clone(),
            failed.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let mut round = t;
            while !stop.load(Relaxed) {
                match churn_once(addr, round) {
                    Ok(n) => {
                        verified.fetch_add(n, Relaxed);
                        cycles.fetch_add(1, Relaxed);
                    }
                    Err(e) => {
                        eprintln!("churn failed: {e}");
                        failed.store(true, Relaxed);
                        stop.store(true, Relaxed);
                    }
                }
                round += 4;
            }
        }));
    }
    // Slow readers: ask for echoes of big messages, never read, vanish.
    {
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            while !stop.load(Relaxed) {
                if let Ok(mut s) = TcpStream::connect(addr) {
                    let req = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
                    let _ = s.write_all(req.as_bytes());
                    let mut head = [0u8; 129];
                    let _ = s.read(&mut head);
                    let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
                    for _ in 0..200 {
                        if s.write_all(&masked(0x82, &[7; 60_000])).is_err() {
                            break;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(300));
                }
            }
        }));
    }
    // Pipelining clients: write as fast as they can, read more slowly.
    for client in 0..pipelined as u64 {
        let (stop, failed, pipe) = (stop.clone(), failed.clone(), pipe.clone());
        threads.push(std::thread::spawn(move || {
            pipelined_client(addr, client, &stop, &failed, &pipe);
        }));
    }
    // Steady clients: stay for the whole run.
    let mut steady_clients: Vec<_> = (0..steady)
        .filter_map(|_| {
            tungstenite::connect(format!("ws://{addr}/"))
                .ok()
                .map(|(ws, _)| ws)
        })
        .collect();
    let start = Instant::now();
    let mut last_report = Instant::now();
    let mut tick = 0u64;
    while start.elapsed() < Duration::from_secs(seconds) && !stop.load(Relaxed) {
        for ws in &mut steady_clients {
            let body = format!("steady {tick}");
            if ws.send(Tm::text(body.clone())).is_err()
                || !matches!(ws.read(), Ok(Tm::Text(t)) if t.as_str() == body)
            {
                eprintln!("steady client lost its echo");
                failed.store(true, Relaxed);
            }
        }
        tick += 1;
        std::thread::sleep(Duration::from_millis(100));
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            let s = handle.stats();
            println!(
                "{:>5} s: rss {} KiB, fds {}, connections {}, cycles {}, messages verified {}, queued {} B",
                start.elapsed().as_secs(),
                rss_kib(),
                fds(),
                s.connections,
                cycles.load(Relaxed),
                verified.load(Relaxed),
                s.bytes_queued
            );
            println!(
                "       pipelined rounds {}, messages verified {}, read pauses {}, dropped {}",
                pipe.rounds.load(Relaxed),
                pipe.verified.load(Relaxed),
                s.read_pauses,
                s.messages_dropped + refused.load(Relaxed)
            );
        }
    }
    stop.store(true, Relaxed);
    for t in threads {
        let _ = t.join();
    }
    drop(steady_clients);
    // Let every connection finish its close.
    let wait = Instant::now();
    while handle.connections() > 0 && wait.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    looping.store(false, Relaxed);
    // Kept until the end: the handle's figures are the running server's.
    let (main_loop_failed, looped) = match main_thread.map(|t| t.join()) {
        Some(Ok(server)) => (false, Some(server)),
        Some(Err(_)) => (true, None),
        None => (false, None),
    };
    let s = handle.stats();
    let (rss1, fds1) = (rss_kib(), fds());
    println!(
        "end:   rss {rss1} KiB, fds {fds1}, connections {}, handshakes {}, disconnects {}, churn cycles {}, messages verified {}",
        s.connections,
        s.handshakes_accepted,
        disconnects.load(Relaxed),
        cycles.load(Relaxed),
        verified.load(Relaxed) + tick * steady as u64
    );
    let refusals = refused.load(Relaxed);
    let dropped = s.messages_dropped + refusals;
    let bad = pipe.bad.load(Relaxed);
    println!(
        "pipelined: {pipelined} clients, rounds {}, messages verified {} ({} MiB), rounds failed {bad}, read pauses {}",
        pipe.rounds.load(Relaxed),
        pipe.verified.load(Relaxed),
        pipe.bytes.load(Relaxed) >> 20,
        s.read_pauses
    );
    println!(
        "dropped: {dropped} (messages_dropped {}, handler refusals {refusals})",
        s.messages_dropped
    );
    // Not a failure: messages of clients on their way out, found with the
    // event channel a whole budget behind or the client's unconsumed
    // events at the hard limit (main-loop style; the README's "Nothing
    // lost" names these cases).
    println!(
        "discarded: {} (messages_discarded, of leaving clients)",
        s.messages_discarded
    );
    println!("stats: {s:?}");
    println!(
        "growth: rss {:+} KiB, fds {:+}",
        rss1 as i64 - rss0 as i64,
        fds1 as i64 - fds0 as i64
    );
    let mut why = Vec::new();
    if failed.load(Relaxed) {
        why.push("a client failed".to_string());
    }
    if main_loop_failed {
        why.push("the main loop panicked".to_string());
    }
    if bad > 0 {
        why.push(format!("{bad} pipelined rounds missed or mangled echoes"));
    }
    if dropped > 0 {
        why.push(format!("{dropped} messages dropped"));
    }
    if fds1 != fds0 {
        why.push(format!("fds {fds0} -> {fds1}"));
    }
    if s.connections != 0 {
        why.push(format!("{} connections left", s.connections));
    }
    if disconnects.load(Relaxed) != s.handshakes_accepted {
        why.push(format!(
            "{} disconnects for {} handshakes",
            disconnects.load(Relaxed),
            s.handshakes_accepted
        ));
    }
    drop((server, looped));
    if !why.is_empty() {
        eprintln!("soak FAILED");
        return Err(Error::Io(std::io::Error::other(why.join(", "))));
    }
    Ok(())
}
