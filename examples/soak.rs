//! Soak test: churn against an in-process server for a while, then report
//! memory, file descriptors and the server's counters at start and end.
//!
//! ```text
//! cargo run --release --example soak -- [--seconds N] [--steady N]
//! ```
//!
//! Churn threads connect, exchange checked messages and leave every way a
//! client can (close handshake, drop, FIN mid-frame); slow readers fill
//! their queues and vanish; steady clients stay connected and keep
//! talking. Any mismatch or unexpected error stops the run with a non-zero
//! exit. Memory and fds are the whole process's (clients included).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use enjent::{Error, WebSocketServer};
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
    let mut out = vec![first];
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
    out.extend_from_slice(&[1, 2, 3, 4]);
    out.extend(
        payload
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ [1, 2, 3, 4][i % 4]),
    );
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

fn main() -> Result<(), Error> {
    let mut seconds = 60u64;
    let mut steady = 50usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().and_then(|v| v.parse().ok());
        match (a.as_str(), v) {
            ("--seconds", Some(v)) => seconds = v,
            ("--steady", Some(v)) => steady = v as usize,
            _ => {
                return Err(Error::InvalidInput(
                    "usage: soak [--seconds N] [--steady N]",
                ));
            }
        }
    }
    // Every event goes to a closure, so the channel stays empty (events
    // nobody reads would be counted as growth).
    let disconnects = Arc::new(AtomicU64::new(0));
    let d = disconnects.clone();
    let server = WebSocketServer::builder()
        .max_backpressure(256 * 1024)
        .close_timeout(Duration::from_secs(1))
        .on_connect(|_| {})
        .on_message(|c, m| {
            let _ = c.send(m);
        })
        .on_disconnect(move |_, _, _| {
            d.fetch_add(1, Relaxed);
        })
        .start("127.0.0.1:0")?;
    let addr = server.local_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let verified = Arc::new(AtomicU64::new(0));
    let cycles = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicBool::new(false));

    // Warm up once so the baseline includes the pool's scratch buffers.
    churn_once(addr, 0).map_err(|_| Error::Closed)?;
    std::thread::sleep(Duration::from_millis(200));
    let (rss0, fds0) = (rss_kib(), fds());
    println!("start: rss {rss0} KiB, fds {fds0}, {steady} steady clients, {seconds} s");

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
            let s = server.stats();
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
        }
    }
    stop.store(true, Relaxed);
    for t in threads {
        let _ = t.join();
    }
    drop(steady_clients);
    // Let every connection finish its close.
    let wait = Instant::now();
    while server.connections() > 0 && wait.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let s = server.stats();
    let (rss1, fds1) = (rss_kib(), fds());
    println!(
        "end:   rss {rss1} KiB, fds {fds1}, connections {}, handshakes {}, disconnects {}, churn cycles {}, messages verified {}",
        s.connections,
        s.handshakes_accepted,
        disconnects.load(Relaxed),
        cycles.load(Relaxed),
        verified.load(Relaxed) + tick * steady as u64
    );
    println!("stats: {s:?}");
    println!(
        "growth: rss {:+} KiB, fds {:+}",
        rss1 as i64 - rss0 as i64,
        fds1 as i64 - fds0 as i64
    );
    if failed.load(Relaxed)
        || fds1 != fds0
        || s.connections != 0
        || disconnects.load(Relaxed) != s.handshakes_accepted
    {
        eprintln!("soak FAILED");
        std::process::exit(1);
    }
    Ok(())
}
