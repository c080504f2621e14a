//! Flow control at its limits, seen from the peer (issue 12): steady memory
//! over connect/close churn with an unread channel, no queued bytes left
//! once sends have raced disconnects, huge durations that never panic, a
//! panicking `on_drain`, `send_timeout` from a user thread and from a
//! worker, `buffered_amount`, and a slow main loop whose events stay
//! within their byte budget.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use enjent::{
    Builder, Client, ClientId, Error, Event, Message, SendError, SendStatus, WebSocketServer,
};
use support::*;

// ---------------------------------------------------------------- helpers

/// Live heap bytes of this process, counted by the allocator below. RSS
/// alone can hide growth: memory that earlier tests freed stays resident
/// and is reused without RSS moving.
static LIVE_HEAP: AtomicI64 = AtomicI64::new(0);

/// Live heap as glibc's malloc lays it out: each allocation takes a chunk
/// of its size and a word, in steps of 16 B, 32 B at least (pages, past
/// the 128 KiB from which it maps them). Many tiny allocations cost this,
/// not their sizes.
static LIVE_CHUNKS: AtomicI64 = AtomicI64::new(0);

/// Allocations of exactly `WATCHED_SIZE` bytes (none while it is 0),
/// counted in `WATCHED`.
static WATCHED_SIZE: AtomicUsize = AtomicUsize::new(0);
static WATCHED: AtomicU64 = AtomicU64::new(0);

/// Allocations made on threads that set `COUNT_HERE`, counted in `HERE`.
static HERE: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static COUNT_HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn watch(size: usize) {
    if COUNT_HERE.with(std::cell::Cell::get) {
        HERE.fetch_add(1, Relaxed);
    }
    if size != 0 && size == WATCHED_SIZE.load(Relaxed) {
        WATCHED.fetch_add(1, Relaxed);
    }
}

fn chunk_of(size: usize) -> i64 {
    let chunk = if size >= 128 << 10 {
        (size + 16 + 4095) & !4095
    } else {
        ((size + 8 + 15) & !15).max(32)
    };
    chunk as i64
}

struct CountingAlloc;

// SAFETY: every call is forwarded to the system allocator unchanged; the
// counter is only arithmetic on the side.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc(layout) };
        watch(layout.size());
        if !p.is_null() {
            LIVE_HEAP.fetch_add(layout.size() as i64, Relaxed);
            LIVE_CHUNKS.fetch_add(chunk_of(layout.size()), Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc_zeroed(layout) };
        watch(layout.size());
        if !p.is_null() {
            LIVE_HEAP.fetch_add(layout.size() as i64, Relaxed);
            LIVE_CHUNKS.fetch_add(chunk_of(layout.size()), Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) };
        LIVE_HEAP.fetch_sub(layout.size() as i64, Relaxed);
        LIVE_CHUNKS.fetch_sub(chunk_of(layout.size()), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        watch(new_size);
        if !p.is_null() {
            LIVE_HEAP.fetch_add(new_size as i64 - layout.size() as i64, Relaxed);
            LIVE_CHUNKS.fetch_add(chunk_of(new_size) - chunk_of(layout.size()), Relaxed);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// The memory test runs alone (write lock); the others share (read lock),
/// so that nothing else allocates while it measures.
static ALONE: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    ALONE.read().unwrap_or_else(PoisonError::into_inner)
}

/// VmRSS of this process, in bytes.
fn rss() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("a VmRSS line");
    let kb: i64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmRSS in kB");
    kb * 1024
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Connect and upgrade with a few large reads (`raw_ws` reads the head a
/// byte at a time: too slow for 45,000 cycles). Returns the socket and
/// whatever arrived after the 101 head in the same reads.
fn upgrade(addr: SocketAddr, timeout: Duration) -> io::Result<(TcpStream, Vec<u8>)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    s.write_all(REQUEST.as_bytes())?;
    let mut got = Vec::with_capacity(256);
    let mut buf = [0u8; 512];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            if !got.starts_with(b"HTTP/1.1 101 ") {
                return Err(io::Error::other(format!(
                    "not a 101: {}",
                    String::from_utf8_lossy(&got)
                )));
            }
            let rest = got.split_off(end + 4);
            return Ok((s, rest));
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before the 101",
            ));
        }
        got.extend_from_slice(&buf[..n]);
    }
}

/// A masked close frame with code 1000.
fn close_frame() -> Vec<u8> {
    frame(0x88, &close_payload(1000, ""))
}

/// A server frame in words, for failure messages.
fn describe(first: u8, p: &[u8]) -> String {
    match first & 0x0F {
        0x8 if p.len() >= 2 => format!(
            "a close frame, code {} {:?}",
            u16::from_be_bytes([p[0], p[1]]),
            String::from_utf8_lossy(&p[2..])
        ),
        0x8 => "a close frame without a code".into(),
        0x9 => "a ping".into(),
        0xA => "a pong".into(),
        0x1 => format!("text {:?}", String::from_utf8_lossy(p)),
        op => format!("a frame with opcode {op:#x} of {} bytes", p.len()),
    }
}

/// Send messages made by `make` until one is refused for backpressure;
/// returns how many were accepted, the refused message (handed back) and
/// the bytes queued that the refusal reported. `first` is sent before any
/// new one (a message handed back earlier).
fn fill(
    c: &Client,
    first: Option<Message>,
    mut make: impl FnMut(usize) -> Message,
) -> (usize, Message, usize) {
    let start = Instant::now();
    let mut pending = first;
    let mut accepted = 0;
    loop {
        let m = pending.take().unwrap_or_else(|| make(accepted));
        match c.send(m) {
            Ok(_) => accepted += 1,
            Err(e) => {
                let Error::Backpressure { queued, .. } = *e.error() else {
                    panic!("expected Backpressure, got {:?}", e.error());
                };
                return (accepted, e.into_message(), queued);
            }
        }
        assert!(start.elapsed() < WAIT, "never refused");
    }
}

/// Fill until refused, then again after each pause until a pause frees
/// no room for even one message: the kernel's buffers are full too, and
/// from then on only the peer reading makes room. (A user thread can fill
/// the queue faster than the workers move it into the kernel, so one
/// refusal proves nothing.)
fn fill_stuck(c: &Client, mut make: impl FnMut(usize) -> Message) -> (usize, Message, usize) {
    let (mut total, mut back, _) = fill(c, None, &mut make);
    for _ in 0..50 {
        thread::sleep(Duration::from_millis(100));
        let (n, b, queued) = fill(c, Some(back), |i| make(total + i));
        (total, back) = (total + n, b);
        if n == 0 {
            return (total, back, queued);
        }
    }
    panic!("the queue kept draining with nobody reading");
}

/// A binary message whose first 4 bytes are `seq` and the rest a pattern
/// derived from it.
fn numbered(seq: usize, len: usize) -> Vec<u8> {
    let mut m = vec![(seq % 251) as u8; len];
    m[..4].copy_from_slice(&(seq as u32).to_be_bytes());
    m
}

fn check_numbered(p: &[u8], seq: usize, len: usize) {
    assert_eq!(p.len(), len, "message {seq}: length");
    let got = u32::from_be_bytes([p[0], p[1], p[2], p[3]]) as usize;
    assert_eq!(got, seq, "messages out of order");
    assert!(
        p[4..].iter().all(|&b| b == (seq % 251) as u8),
        "message {seq}: corrupted"
    );
}

/// The next event that is not a Drain (main-loop tests get those after
/// refusals).
fn next_not_drain(server: &WebSocketServer) -> Event {
    loop {
        match next(server) {
            Event::Drain { .. } => {}
            other => return other,
        }
    }
}

// ------------------------------------------------------------------ tests

/// One connect/close cycle over raw TCP, three ways: a full close
/// handshake read to EOF, a Close frame then gone, or just gone.
fn cycle(addr: SocketAddr, kind: usize, close: &[u8]) -> io::Result<()> {
    let (mut s, _) = upgrade(addr, WAIT)?;
    match kind {
        0 => {
            s.write_all(close)?;
            let mut buf = [0u8; 256];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                    Err(e) => return Err(e),
                }
            }
        }
        1 => s.write_all(close)?,
        _ => {}
    }
    Ok(())
}

/// `n` cycles on four client threads; returns how many failed for want
/// of a local port (the client's ephemeral ports, not the server's
/// doing). Any other failure (no `101`, an end before it) fails the test.
fn churn(addr: SocketAddr, n: usize) -> usize {
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (next, failed) = (Arc::clone(&next), Arc::clone(&failed));
            thread::spawn(move || {
                let close = close_frame();
                let mut in_a_row = 0;
                loop {
                    let i = next.fetch_add(1, Relaxed);
                    if i >= n {
                        return;
                    }
                    match cycle(addr, i % 3, &close) {
                        Ok(()) => in_a_row = 0,
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::AddrNotAvailable | io::ErrorKind::AddrInUse
                            ) =>
                        {
                            failed.fetch_add(1, Relaxed);
                            in_a_row += 1;
                            assert!(in_a_row < 100, "100 cycles in a row failed: {e}");
                            thread::sleep(Duration::from_millis(10));
                        }
                        Err(e) => panic!("cycle {i} failed on the server's side: {e}"),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a churning thread panicked");
    }
    failed.load(Relaxed)
}

/// Every client gone: `stats().connections` back to 0.
fn settle(server: &WebSocketServer) {
    assert!(
        eventually(WAIT, || server.stats().connections == 0
            && server.connections() == 0),
        "connections never returned to 0: {:?}",
        server.stats()
    );
    // Let the last teardown jobs finish what they free.
    thread::sleep(Duration::from_millis(200));
}

/// A server that echoes each message from its closure, and leaves its
/// event channel unread.
fn echoing_server() -> WebSocketServer {
    WebSocketServer::builder()
        .on_message(|c, m| {
            let _ = c.send(m);
        })
        .start("127.0.0.1:0")
        .unwrap()
}

#[test]
fn unread_channel_holds_steady_memory_over_churn() {
    let _alone = ALONE.write().unwrap_or_else(PoisonError::into_inner);
    within(Duration::from_secs(120), || {
        // Closure style: only on_message; the channel is never read.
        let server = echoing_server();
        let addr = server.local_addr();
        let mut failed = churn(addr, 5_000);
        settle(&server);
        let (rss0, heap0) = (rss(), LIVE_HEAP.load(Relaxed));
        failed += churn(addr, 40_000);
        settle(&server);
        let (rss1, heap1) = (rss(), LIVE_HEAP.load(Relaxed));
        let (rss_growth, heap_growth) = (rss1 - rss0, heap1 - heap0);
        let stats = server.stats();
        eprintln!(
            "40,000 cycles after warm-up: RSS {rss0} -> {rss1} ({rss_growth:+}), \
             live heap {heap0} -> {heap1} ({heap_growth:+}); {failed} cycles failed; {stats:?}"
        );
        assert!(failed < 450, "{failed} of 45,000 cycles failed");
        assert!(
            stats.handshakes_accepted >= 44_550,
            "only {} handshakes",
            stats.handshakes_accepted
        );
        // Measured: a few KiB over 90,000 cycles. 112 KiB is under 3 B
        // a cycle of the 40,000, so even a 16 B registry slot leaked by
        // one cycle in five fails; RSS moves in the allocator's steps,
        // so its bound is looser. (90,000 cycles took up to a minute of
        // CI's time: the clients' ports in TIME_WAIT make each connect
        // dearer as they fill the range.)
        const HEAP_LIMIT: i64 = 112 << 10;
        const RSS_LIMIT: i64 = 8 << 20;
        assert!(
            heap_growth < HEAP_LIMIT,
            "live heap grew {heap_growth} bytes over 40,000 cycles \
             ({} per cycle)",
            heap_growth / 40_000
        );
        assert!(
            rss_growth < RSS_LIMIT,
            "RSS grew {rss_growth} bytes over 40,000 cycles ({} per cycle)",
            rss_growth / 40_000
        );
        assert!(
            server.try_recv().is_err(),
            "closure style: the channel carries nothing"
        );
    });
}

/// What the sending threads got back.
#[derive(Debug, Default)]
struct Tally {
    ok: usize,
    refused: usize,
    closed: usize,
    other: usize,
}

impl Tally {
    fn count(&mut self, r: Result<SendStatus, SendError>) {
        match r {
            Ok(_) => self.ok += 1,
            Err(e) => match e.error() {
                Error::Backpressure { .. } => self.refused += 1,
                Error::Closed => self.closed += 1,
                _ => self.other += 1,
            },
        }
    }

    fn add(&mut self, t: Tally) {
        self.ok += t.ok;
        self.refused += t.refused;
        self.closed += t.closed;
        self.other += t.other;
    }
}

/// A peer of the racing test: reads (or not) for a random while, then
/// leaves in one of five ways.
fn racing_peer(i: usize, mut s: TcpStream) {
    let mut rng = Rng::new(i as u64 + 7);
    let how = i % 5;
    // 2 and 3 never read: their queues fill.
    let reads = how != 2 && how != 3;
    let until = Instant::now() + Duration::from_millis(100 + rng.below(1_900));
    s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    while Instant::now() < until {
        if reads {
            match s.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if is_timeout(&e) => {}
                Err(_) => return,
            }
        } else {
            thread::sleep(Duration::from_millis(20));
        }
    }
    match how {
        // Close, then read until the server closes (or 3 s).
        0 => {
            if s.write_all(&close_frame()).is_err() {
                return;
            }
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                match s.read(&mut buf) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if is_timeout(&e) => {}
                    Err(_) => return,
                }
            }
        }
        // Close without ever reading: the server's reply cannot get out.
        3 => {
            let _ = s.write_all(&close_frame());
            thread::sleep(Duration::from_millis(rng.below(1_000)));
        }
        // Reset at once.
        4 => {
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        }
        // 1: FIN; 2: unread data, so the kernel resets.
        _ => {}
    }
}

#[test]
fn sends_racing_disconnects_leave_no_queued_bytes() {
    const CLIENTS: usize = 50;
    let _g = shared();
    within(Duration::from_secs(60), || {
        let server = WebSocketServer::builder()
            .workers(4)
            .max_message_size(64 * 1024)
            .high_water(32 * 1024)
            .low_water(8 * 1024)
            .max_backpressure(256 * 1024)
            .close_timeout(Duration::from_millis(500))
            .start("127.0.0.1:0")
            .unwrap();
        let addr = server.local_addr();
        let sockets: Vec<TcpStream> = (0..CLIENTS)
            .map(|_| upgrade(addr, WAIT).expect("upgrade").0)
            .collect();
        let clients: Arc<Vec<Client>> =
            Arc::new((0..CLIENTS).map(|_| expect_connect(&server)).collect());
        let ids: Arc<Vec<ClientId>> = Arc::new(clients.iter().map(|c| c.id()).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let senders: Vec<_> = (0..8u64)
            .map(|t| {
                let handle = server.handle();
                let (clients, ids, stop) =
                    (Arc::clone(&clients), Arc::clone(&ids), Arc::clone(&stop));
                thread::spawn(move || {
                    let mut rng = Rng::new(1_000 + t);
                    let mut tally = Tally::default();
                    let body = vec![0x5Au8; 64 * 1024];
                    while !stop.load(Relaxed) {
                        let len = rng.below(64 * 1024 + 1) as usize;
                        let message = Message::from(&body[..len]);
                        let who = rng.below(CLIENTS as u64) as usize;
                        match rng.below(20) {
                            0 => {
                                let report = handle.broadcast(message);
                                tally.ok += report.written + report.queued;
                                tally.refused += report.dropped;
                                tally.closed += report.closed;
                            }
                            1..=9 => tally.count(handle.send(ids[who], message)),
                            _ => tally.count(clients[who].send(message)),
                        }
                    }
                    tally
                })
            })
            .collect();
        let peers: Vec<_> = sockets
            .into_iter()
            .enumerate()
            .map(|(i, s)| thread::spawn(move || racing_peer(i, s)))
            .collect();
        for p in peers {
            p.join().expect("a peer thread panicked");
        }
        // Sends go on a little after the last peer left.
        thread::sleep(Duration::from_millis(200));
        stop.store(true, Relaxed);
        let mut tally = Tally::default();
        for s in senders {
            tally.add(s.join().expect("a sending thread panicked"));
        }
        assert!(
            eventually(WAIT, || server.connections() == 0),
            "clients still connected: {} ({:?})",
            server.connections(),
            server.stats()
        );
        eventually(Duration::from_secs(5), || server.stats().bytes_queued == 0);
        let stats = server.stats();
        eprintln!("{tally:?}\n{stats:?}");
        assert_eq!(stats.bytes_queued, 0, "queued bytes left behind: {tally:?}");
        assert_eq!(stats.connections, 0, "{stats:?}");
        assert!(tally.refused > 0, "no queue ever filled: {tally:?}");
        assert!(tally.closed > 0, "no send raced a disconnect: {tally:?}");
        assert_eq!(tally.other, 0, "errors a send does not document: {tally:?}");
        assert_eq!(
            stats.messages_dropped, tally.refused as u64,
            "refusals seen by the senders vs counted: {tally:?}"
        );
        assert_eq!(stats.handler_panics, 0, "{stats:?}");
        // Each client had exactly one Disconnect.
        let mut gone = HashSet::new();
        while gone.len() < CLIENTS {
            match server.recv_timeout(WAIT) {
                Ok(Event::Disconnect { client, .. }) => {
                    assert!(ids.contains(&client.id()), "{:?}", client.id());
                    assert!(
                        gone.insert(client.id()),
                        "two Disconnects for {:?}",
                        client.id()
                    )
                }
                Ok(_) => {}
                Err(e) => panic!("{} Disconnects of {CLIENTS}: {e}", gone.len()),
            }
        }
        // The counter has not drifted below 0 either (a snapshot shows a
        // negative count as 0): with one new client whose queue is full,
        // it is that client's queue exactly.
        let probe = upgrade(addr, WAIT).expect("upgrade").0; // never reads
        let p = match next_not_drain(&server) {
            Event::Connect { client } => client,
            other => panic!("expected the probe's Connect, got {other:?}"),
        };
        let (_, _, refused_at) = fill_stuck(&p, |_| vec![0u8; 16 * 1024].into());
        let mut seen = (0, 0);
        let agree = eventually(Duration::from_secs(2), || {
            seen = (server.stats().bytes_queued, p.buffered_amount() as u64);
            seen.1 > 0 && seen.0 == seen.1
        });
        assert!(
            agree,
            "stats().bytes_queued {} with one client whose queue holds {} \
             (refused at {refused_at}): the count drifted during the race",
            seen.0, seen.1
        );
        drop(probe);
    });
}

/// A change to a builder.
type Configure = fn(Builder) -> Builder;

/// The text of a caught panic.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic".into())
}

/// One huge-duration configuration: a server that starts (huge durations
/// are saturated, never refused), answers, echoes, leaves an idle client
/// alone for 2 s and shuts down. The server is dropped outside any unwinding, so that a
/// panic in its shutdown is reported rather than aborting the run.
fn check_huge(configure: Configure) {
    let builder = configure(WebSocketServer::builder().workers(2).on_message(|c, m| {
        let _ = c.send(m);
    }));
    let server = match builder.start("127.0.0.1:0") {
        Ok(server) => server,
        Err(e) => panic!("start refused a huge duration: {e:?}"),
    };
    let session = std::panic::catch_unwind(AssertUnwindSafe(|| huge_session(&server)));
    let shutdown = std::panic::catch_unwind(AssertUnwindSafe(move || drop(server)));
    match (session, shutdown) {
        (Ok(()), Ok(())) => {}
        (Err(p), Ok(())) => std::panic::resume_unwind(p),
        (Ok(()), Err(p)) => panic!("dropping the server panicked: {}", panic_text(&*p)),
        (Err(a), Err(b)) => panic!(
            "{}; then dropping the server panicked: {}",
            panic_text(&*a),
            panic_text(&*b)
        ),
    }
}

fn huge_session(server: &WebSocketServer) {
    // Not in the server's first millisecond: a deadline computed from a
    // clock reading of 0 can hide an overflow.
    thread::sleep(Duration::from_millis(50));
    // A request refused while its body is still coming: the lingering
    // close after the answer has a deadline of its own.
    let mut refused = TcpStream::connect(server.local_addr()).unwrap();
    refused
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    refused
        .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        .unwrap();
    let mut answer = Vec::new();
    let _ = refused.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 405 "), "{answer:?}");
    refused.write_all(b"defghij").unwrap();
    drop(refused);
    let (mut s, early) = upgrade(server.local_addr(), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("no 101 within 5 s: {e}"));
    if !early.is_empty() {
        let what = match early.get(1) {
            Some(&len) if len < 126 => {
                let end = (2 + len as usize).min(early.len());
                describe(early[0], &early[2..end])
            }
            _ => "something".into(),
        };
        panic!("the server sent {what} right after the 101: {early:02x?}");
    }
    let echo = |s: &mut TcpStream, text: &str| {
        s.write_all(&frame(0x81, text.as_bytes())).unwrap();
        match try_read_frame(s) {
            Ok((0x81, p)) if p == text.as_bytes() => {}
            Ok((first, p)) => panic!("expected the echo of {text:?}, got {}", describe(first, &p)),
            Err(e) => panic!("expected the echo of {text:?}, got {e}"),
        }
    };
    echo(&mut s, "before");
    // Silence for 2 s: no close, no ping, no EOF.
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Err(e) if is_timeout(&e) => {}
        Ok(0) => panic!("the server closed the connection within 2 s"),
        Ok(_) => {
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let mut rest = [0u8; 256];
            let n = s.read(&mut rest).unwrap_or(0);
            let mut bytes = vec![b[0]];
            bytes.extend_from_slice(&rest[..n]);
            let what = if bytes.len() >= 2 {
                describe(bytes[0], bytes.get(2..).unwrap_or_default())
            } else {
                "one byte".into()
            };
            panic!("the server sent {what} within 2 s of silence ({bytes:02x?})")
        }
        Err(e) => panic!("the connection failed within 2 s: {e}"),
    }
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(server.stats().connections, 1);
    echo(&mut s, "after");
    s.write_all(&close_frame()).unwrap();
    match try_read_frame(&mut s) {
        Ok((0x88, _)) => {}
        Ok((first, p)) => panic!("expected the close reply, got {}", describe(first, &p)),
        Err(e) => panic!("expected the close reply, got {e}"),
    }
    assert!(closed_by_server(&mut s), "no EOF after the close handshake");
    assert!(
        eventually(Duration::from_secs(5), || server.connections() == 0),
        "the client never left"
    );
    // Seconds after the refusal (a panic is counted only once it has
    // unwound, which took over 100 ms here).
    assert_eq!(
        server.stats().internal_errors,
        0,
        "the lingering close after a refusal failed"
    );
}

#[test]
fn huge_durations_never_panic() {
    let _g = shared();
    const MAX: Duration = Duration::MAX;
    let cases: [(&str, Configure); 5] = [
        ("all four at Duration::MAX", |b| {
            b.handshake_timeout(MAX)
                .idle_timeout(Some(MAX))
                .ping_interval(Some(MAX))
                .close_timeout(MAX)
        }),
        ("handshake_timeout(MAX)", |b| b.handshake_timeout(MAX)),
        ("idle_timeout(Some(MAX))", |b| b.idle_timeout(Some(MAX))),
        // (With the default idle timeout, a ping after it is refused.)
        ("ping_interval(Some(MAX))", |b| {
            b.ping_interval(Some(MAX)).idle_timeout(None)
        }),
        ("close_timeout(MAX)", |b| b.close_timeout(MAX)),
    ];
    // All at once: each waits 2 s.
    let runs: Vec<_> = cases
        .into_iter()
        .map(|(name, configure)| (name, thread::spawn(move || check_huge(configure))))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut failures = Vec::new();
    for (name, run) in runs {
        while !run.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        if !run.is_finished() {
            failures.push(format!("{name}: did not finish within 60 s"));
            continue;
        }
        if let Err(panic) = run.join() {
            failures.push(format!("{name}: {}", panic_text(&*panic)));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn on_drain_panic_closes_with_1011() {
    let _g = shared();
    within(Duration::from_secs(60), || {
        let server = WebSocketServer::builder()
            .max_message_size(16 * 1024)
            .high_water(32 * 1024)
            .low_water(8 * 1024)
            .max_backpressure(64 * 1024)
            .on_drain(|_| panic!("on_drain fails on purpose"))
            .start("127.0.0.1:0")
            .unwrap();
        let mut s = raw_ws(server.local_addr());
        let c = expect_connect(&server);
        // This thread fills the queue until a send is refused.
        // One refusal is enough: the drain that follows it panics and
        // closes the client, so the queue cannot be filled again.
        let (accepted, _, _) = fill(&c, None, |i| numbered(i, 16 * 1024).into());
        // Now the client reads everything; the drain's handler panics.
        let mut data = 0;
        let code = loop {
            match try_read_frame(&mut s) {
                Ok((0x82, p)) => {
                    check_numbered(&p, data, 16 * 1024);
                    data += 1;
                }
                Ok((0x88, p)) => break (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]])),
                Ok((first, p)) => panic!("unexpected {}", describe(first, &p)),
                Err(e) => panic!(
                    "no close frame after {data} of {accepted} messages \
                     (the drain's panic did not close the client): {e}"
                ),
            }
        };
        assert_eq!(data, accepted, "every accepted message before the close");
        assert_eq!(code, Some(1011));
        // Answer as a client does, echoing the code.
        s.write_all(&frame(0x88, &close_payload(1011, ""))).unwrap();
        // The panic comes as an error event about that client, then its
        // Disconnect.
        let mut reported = false;
        loop {
            match next_not_drain(&server) {
                Event::Error {
                    client: Some(client),
                    error: Error::HandlerPanicked { handler, .. },
                } => {
                    assert_eq!((client.id(), handler), (c.id(), "on_drain"));
                    reported = true;
                }
                Event::Disconnect { client, close, .. } => {
                    assert_eq!(client.id(), c.id());
                    assert_eq!(close.code.as_u16(), 1011);
                    break;
                }
                other => panic!("expected Disconnect, got {other:?}"),
            }
        }
        assert!(reported, "the on_drain panic was not reported");
        assert!(server.stats().handler_panics >= 1);
    });
}

/// A server whose hard limit is 64 KiB (the other limits low enough that
/// it stays in force).
fn small_queue_server() -> Builder {
    WebSocketServer::builder()
        .max_message_size(16 * 1024)
        .high_water(32 * 1024)
        .low_water(8 * 1024)
        .max_backpressure(64 * 1024)
}

#[test]
fn send_timeout_waits_for_room_from_a_user_thread() {
    const LEN: usize = 8 * 1024;
    let _g = shared();
    within(Duration::from_secs(60), || {
        let server = small_queue_server().start("127.0.0.1:0").unwrap();
        let mut s = raw_ws(server.local_addr());
        let c = expect_connect(&server);
        let (mut sent, back, _) = fill_stuck(&c, |i| numbered(i, LEN).into());
        // Taken before the reader's 300 ms begin: after the spawn, a stall
        // of this thread would eat into them, and the wait below could
        // look shorter than 100 ms although no room was made early.
        let t0 = Instant::now();
        // The client starts reading after 300 ms, checking the order; the
        // text "end" closes the sequence.
        let reader = thread::spawn(move || {
            thread::sleep(Duration::from_millis(300));
            let mut seq = 0;
            loop {
                let (first, p) = read_frame(&mut s);
                match first {
                    0x82 => {
                        check_numbered(&p, seq, LEN);
                        seq += 1;
                    }
                    0x81 if p == b"end" => return seq,
                    _ => panic!("unexpected {}", describe(first, &p)),
                }
            }
        });
        // The message refused last goes first: order is kept.
        let r = c.send_timeout(back, Duration::from_secs(5));
        let waited = t0.elapsed();
        assert!(
            r.is_ok(),
            "send_timeout: {:?}",
            r.map_err(|e| e.into_error())
        );
        sent += 1;
        assert!(
            waited >= Duration::from_millis(100),
            "send_timeout returned after {waited:?}, before the client read anything"
        );
        for _ in 0..50 {
            let r = c.send_timeout(numbered(sent, LEN), Duration::from_secs(5));
            assert!(
                r.is_ok(),
                "send_timeout: {:?}",
                r.map_err(|e| e.into_error())
            );
            sent += 1;
        }
        let r = c.send_timeout("end", Duration::from_secs(5));
        assert!(
            r.is_ok(),
            "send_timeout: {:?}",
            r.map_err(|e| e.into_error())
        );
        assert_eq!(reader.join().expect("the reader failed"), sent);
    });
}

#[test]
fn send_timeout_refuses_after_the_timeout_and_hands_the_message_back() {
    let _g = shared();
    within(Duration::from_secs(60), || {
        let server = small_queue_server().start("127.0.0.1:0").unwrap();
        let _s = raw_ws(server.local_addr()); // never reads
        let c = expect_connect(&server);
        fill_stuck(&c, |_| vec![0u8; 8 * 1024].into());
        let message = Message::from(numbered(12_345, 8 * 1024));
        let timeout = Duration::from_millis(200);
        // From the client, then through the server handle with the id.
        for via_handle in [false, true] {
            let t0 = Instant::now();
            let r = if via_handle {
                server
                    .handle()
                    .send_timeout(c.id(), message.clone(), timeout)
            } else {
                c.send_timeout(message.clone(), timeout)
            };
            let took = t0.elapsed();
            let e = r.expect_err("the client never reads: there is never room");
            assert!(
                matches!(e.error(), Error::Backpressure { .. }),
                "{:?}",
                e.error()
            );
            assert!(took >= timeout * 3 / 4, "gave up after {took:?}");
            assert!(took < Duration::from_secs(5), "took {took:?}");
            assert_eq!(e.into_message(), message, "the message comes back");
        }
    });
}

#[test]
fn send_timeout_on_a_worker_does_not_wait() {
    let _g = shared();
    within(Duration::from_secs(60), || {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let timeout = Duration::from_secs(5);
        let server = small_queue_server()
            .on_message(move |c, _| {
                // Fill this client's queue from its own handler.
                let chunk = vec![0u8; 16 * 1024];
                let mut refusal = None;
                for _ in 0..100_000 {
                    if let Err(e) = c.send(chunk.clone()) {
                        refusal = Some(format!("{:?}", e.error()));
                        break;
                    }
                }
                let t0 = Instant::now();
                let r = c.send_timeout(chunk, timeout);
                let took = t0.elapsed();
                let r = r.map(|_| ()).map_err(|e| format!("{:?}", e.error()));
                tx.lock().unwrap().send((refusal, r, took)).unwrap();
            })
            .start("127.0.0.1:0")
            .unwrap();
        let mut s = raw_ws(server.local_addr()); // sends once, never reads
        s.write_all(&frame(0x81, b"go")).unwrap();
        let (refusal, r, took) = rx.recv_timeout(WAIT * 2).expect("the handler reported");
        let refusal = refusal.expect("the handler's sends were never refused");
        assert!(refusal.contains("Backpressure"), "{refusal}");
        assert!(
            took < timeout / 2,
            "send_timeout on a worker waited {took:?}"
        );
        let e = r.expect_err("still no room: refused at once");
        assert!(e.contains("Backpressure"), "{e}");
    });
}

#[test]
fn buffered_amount_reports_queued_bytes() {
    const LEN: usize = 16 * 1024;
    let _g = shared();
    within(Duration::from_secs(60), || {
        let server = small_queue_server().start("127.0.0.1:0").unwrap();
        let mut s = raw_ws(server.local_addr());
        let c = expect_connect(&server);
        let (accepted, _, _) = fill_stuck(&c, |i| numbered(i, LEN).into());
        let mut seen = (0, 0);
        let agree = eventually(Duration::from_secs(2), || {
            seen = (c.buffered_amount() as u64, server.stats().bytes_queued);
            seen.0 > 0 && seen.0 == seen.1
        });
        assert!(
            agree,
            "buffered_amount {} vs stats().bytes_queued {} (one client)",
            seen.0, seen.1
        );
        // The client reads everything: back to 0.
        for i in 0..accepted {
            let (first, p) = read_frame(&mut s);
            assert_eq!(first, 0x82);
            check_numbered(&p, i, LEN);
        }
        assert!(
            eventually(WAIT, || c.buffered_amount() == 0
                && server.stats().bytes_queued == 0),
            "after reading all: buffered_amount {}, bytes_queued {}",
            c.buffered_amount(),
            server.stats().bytes_queued
        );

        // A second client leaves with data still queued for it.
        let gone = raw_ws(server.local_addr());
        let g = match next_not_drain(&server) {
            Event::Connect { client } => client,
            other => panic!("expected Connect, got {other:?}"),
        };
        fill_stuck(&g, |i| numbered(i, LEN).into());
        assert!(g.buffered_amount() > 0);
        socket2::SockRef::from(&gone)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(gone);
        match next_not_drain(&server) {
            Event::Disconnect { client, .. } => {
                assert_eq!(client.id(), g.id());
                assert!(
                    client.buffered_amount() > 0,
                    "bytes never delivered are reported after the Disconnect"
                );
            }
            other => panic!("expected Disconnect, got {other:?}"),
        }
        assert!(
            eventually(WAIT, || server.stats().bytes_queued == 0),
            "bytes_queued {} once the client is gone",
            server.stats().bytes_queued
        );
    });
}

#[test]
fn slow_main_loop_bounds_memory() {
    const CLIENTS: usize = 20;
    const MESSAGES: usize = 2_000;
    const LEN: usize = 4 * 1024;
    const BUDGET: u64 = 1 << 20;
    // One read's worth per connection past the budget, at most.
    const BOUND: u64 = BUDGET + CLIENTS as u64 * 64 * 1024;
    let _g = shared();
    within(Duration::from_secs(90), || {
        let server = WebSocketServer::builder()
            .event_queue_bytes(BUDGET as usize)
            .start("127.0.0.1:0")
            .unwrap();
        let addr = server.local_addr();
        // Message j of client i: [i, j, pattern of (i + j)].
        let payload = |i: usize, j: usize| {
            let mut p = vec![(i + j) as u8; LEN];
            p[..4].copy_from_slice(&(i as u32).to_be_bytes());
            p[4..8].copy_from_slice(&(j as u32).to_be_bytes());
            p
        };
        // All connect first, then all write.
        let sockets: Vec<TcpStream> = (0..CLIENTS)
            .map(|_| upgrade(addr, WAIT).expect("upgrade").0)
            .collect();
        let writers: Vec<_> = sockets
            .into_iter()
            .enumerate()
            .map(|(i, mut s)| {
                s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
                thread::spawn(move || {
                    let mut batch = Vec::with_capacity(16 * (LEN + 14));
                    for j in 0..MESSAGES {
                        batch.extend(frame_with_key(0x82, &payload(i, j), [0; 4]));
                        if batch.len() >= 15 * (LEN + 14) || j + 1 == MESSAGES {
                            s.write_all(&batch).expect("write");
                            batch.clear();
                        }
                    }
                    s // kept open until the main loop has read everything
                })
            })
            .collect();
        // The main loop does not read for 2 s.
        let mut most = 0;
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            most = most.max(server.stats().event_bytes);
            thread::sleep(Duration::from_millis(20));
        }
        let now = server.stats().event_bytes;
        most = most.max(now);
        eprintln!("event_bytes after 2 s: {now}, most seen: {most}");
        assert!(
            now > 0,
            "nothing was read meanwhile: the check proves nothing"
        );
        assert!(
            most <= BOUND,
            "{most} bytes of events waiting, budget {BUDGET} (bound {BOUND})"
        );
        // Then it reads everything: all there, in order, intact.
        let mut per_client: HashMap<ClientId, (usize, usize)> = HashMap::new();
        let mut complete = 0;
        let deadline = Instant::now() + Duration::from_secs(60);
        while complete < CLIENTS {
            assert!(
                Instant::now() < deadline,
                "still missing messages: {per_client:?}"
            );
            match server.recv_timeout(WAIT) {
                Ok(Event::Message { client, message }) => {
                    let p = message.as_bytes();
                    let i = u32::from_be_bytes([p[0], p[1], p[2], p[3]]) as usize;
                    let (who, next) = per_client.entry(client.id()).or_insert((i, 0));
                    assert_eq!(*who, i, "messages of two clients mixed");
                    let j = u32::from_be_bytes([p[4], p[5], p[6], p[7]]) as usize;
                    assert_eq!(j, *next, "client {i}: out of order");
                    assert_eq!(p, &payload(i, j)[..], "client {i}, message {j}");
                    *next += 1;
                    if *next == MESSAGES {
                        complete += 1;
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("{e}: {per_client:?}"),
            }
        }
        assert_eq!(per_client.len(), CLIENTS);
        assert!(per_client.values().all(|&(_, n)| n == MESSAGES));
        for w in writers {
            drop(w.join().expect("a writer failed"));
        }
    });
}

/// Settings that would quietly break the server are refused at `start`
/// with a reason: a ping due after the idle close (every silent, healthy
/// client closed), a timeout under the timers' millisecond (zero: every
/// client closed at once), a zero partial-input budget (every message
/// that spans two reads closed with 1009), more workers than make sense.
#[test]
fn settings_that_would_break_the_server_are_refused_with_a_reason() {
    let _g = shared();
    let cases: [(Configure, &str); 8] = [
        // A ping up to a keepalive tick late (31 ms here) and its pong
        // would come after the idle close.
        (
            |b| {
                b.ping_interval(Some(Duration::from_millis(990)))
                    .idle_timeout(Some(Duration::from_secs(1)))
            },
            "ping_interval",
        ),
        // The default 30 s ping with a 10 s idle close.
        (
            |b| b.idle_timeout(Some(Duration::from_secs(10))),
            "ping_interval",
        ),
        (
            |b| b.ping_interval(Some(Duration::from_secs(100))),
            "ping_interval",
        ),
        (
            |b| {
                b.ping_interval(Some(Duration::from_secs(10)))
                    .idle_timeout(Some(Duration::from_secs(10)))
            },
            "ping_interval",
        ),
        (|b| b.idle_timeout(Some(Duration::from_micros(500))), "1 ms"),
        (|b| b.close_timeout(Duration::from_micros(999)), "1 ms"),
        (|b| b.max_buffered_bytes(0), "max_buffered_bytes"),
        (|b| b.workers(5000), "workers"),
    ];
    for (i, (configure, word)) in cases.into_iter().enumerate() {
        match configure(WebSocketServer::builder()).start("127.0.0.1:0") {
            Err(Error::InvalidConfig(why)) => {
                assert!(why.contains(word), "case {i}: {why:?} does not name {word}")
            }
            Err(e) => panic!("case {i}: {e:?}, not InvalidConfig"),
            Ok(_) => panic!("case {i}: started"),
        }
    }
    // What stays allowed: pings off with the idle close, both off, a ping
    // with two ticks (50 ms each here) to spare.
    for configure in [
        (|b| b.ping_interval(None)) as Configure,
        |b| b.ping_interval(None).idle_timeout(None),
        |b| {
            b.ping_interval(Some(Duration::from_secs(100)))
                .idle_timeout(None)
        },
        |b| {
            b.ping_interval(Some(Duration::from_millis(900)))
                .idle_timeout(Some(Duration::from_secs(1)))
        },
    ] {
        configure(WebSocketServer::builder())
            .start("127.0.0.1:0")
            .unwrap();
    }
}

/// Replies that compress far below their size, queued for clients that
/// send and never read, hold about what flow control counts: their
/// compressed bytes. Each was made in a buffer sized by the message before
/// compression (half of it), so a queue of 1 KiB replies to 1 MiB messages
/// held hundreds of times what was counted (measured: 8 clients that never
/// read pinned 441 MB of heap, with 874 KB counted as queued; now 5.6 MB).
#[cfg(feature = "deflate")]
#[test]
fn compressed_replies_queued_for_non_readers_hold_what_flow_control_counts() {
    use flate2::{Compress, FlushCompress};
    const CLIENTS: usize = 8;
    let _alone = ALONE.write().unwrap_or_else(PoisonError::into_inner);
    within(Duration::from_secs(200), || {
        let server = echoing_server();
        let addr = server.local_addr();
        // 32 messages of zeros, 256 KiB to 1 MiB, each a few hundred
        // bytes once compressed (sync flush, tail cut, as RFC 7692 has it).
        let wire: Vec<u8> = (0..32u32)
            .flat_map(|i| {
                let size = (256 << 10) + (i as usize * 24_593) % (768 << 10) - 64;
                let mut c = Compress::new(flate2::Compression::best(), false);
                let mut z = Vec::with_capacity(size / 64 + 1024);
                c.compress_vec(&vec![0u8; size], &mut z, FlushCompress::Sync)
                    .unwrap();
                assert!(z.ends_with(&[0, 0, 0xff, 0xff]), "one call took it all");
                z.truncate(z.len() - 4);
                let mut f = frame(0xc2, &z);
                f.shrink_to_fit();
                f
            })
            .collect();
        let before = LIVE_HEAP.load(Relaxed);
        let mut socks: Vec<(TcpStream, usize)> = (0..CLIENTS)
            .map(|_| {
                let mut s = small_window(addr);
                let req = REQUEST.replace(
                    "\r\n\r\n",
                    "\r\nSec-WebSocket-Extensions: permessage-deflate; \
                     client_no_context_takeover\r\n\r\n",
                );
                s.write_all(req.as_bytes()).unwrap();
                let head = read_101(&mut s);
                assert!(head.contains("permessage-deflate"), "{head}");
                s.set_nonblocking(true).unwrap();
                (s, 0)
            })
            .collect();
        // Each client sends its messages round and round, as much as its
        // socket takes, until the server stops reading all of them.
        write_until_quiet(&mut socks, &wire, true);
        // About 40,000 messages inflated and compressed again (the
        // kernel's buffers take some thousands of the tiny replies a
        // client): 28 s of a core alone, and past 30 s once in a loaded
        // run. A hang would never settle. (The test's bound is 200 s:
        // `write_until_quiet` may take 60 of them.)
        let mut last = u64::MAX;
        assert!(eventually(Duration::from_secs(80), || {
            let now = server.stats().messages_in;
            let settled = now == last;
            last = now;
            thread::sleep(Duration::from_millis(200));
            settled
        }));
        let stats = server.stats();
        let grown = LIVE_HEAP.load(Relaxed) - before;
        eprintln!(
            "{CLIENTS} clients that never read: heap {grown:+} bytes, {} queued, {} messages in",
            stats.bytes_queued, stats.messages_in
        );
        assert!(
            stats.messages_in >= (CLIENTS * 100) as u64,
            "only {} messages in: the queues never filled",
            stats.messages_in
        );
        // Each client: its queue at high water (128 KiB as counted), a
        // read's unparsed rest (up to 256 KiB), its inflater and
        // compressor: well under 2 MiB.
        let bound = (CLIENTS * (2 << 20)) as i64;
        assert!(
            grown < bound,
            "{CLIENTS} clients that never read hold {grown} bytes of heap, over {bound}"
        );
        drop(socks);
        assert!(eventually(WAIT, || server.stats().connections == 0));
    });
}

/// Tiny publishes to subscribers that never read, each on a topic of its
/// own (a user's feed): every frame a queue holds is then a shared frame
/// of one queue, whose record (a reference-counted box) and allocation
/// take memory besides the frame's bytes and the queue's slot. Flow
/// control counted only those two, so a client that never read held
/// about twice the hard limit of heap (reproduced by a review: RSS grew
/// 170 B per queued 30-byte frame, counted 94 B).
#[test]
fn tiny_publishes_queued_for_non_readers_hold_what_flow_control_counts() {
    const CLIENTS: usize = 8;
    const HARD: usize = 256 << 10;
    let _alone = ALONE.write().unwrap_or_else(PoisonError::into_inner);
    within(Duration::from_secs(120), || {
        let feeds = Arc::new(AtomicUsize::new(0));
        let f2 = Arc::clone(&feeds);
        // A hard limit of 256 KiB (high water and a message of 16 KiB are
        // less).
        let server = WebSocketServer::builder()
            .max_message_size(16 << 10)
            .max_backpressure(HARD)
            .on_connect(move |c| {
                let n = f2.fetch_add(1, Relaxed);
                c.subscribe(&format!("feed-{n}")).unwrap();
            })
            .start("127.0.0.1:0")
            .unwrap();
        let addr = server.local_addr();
        let socks: Vec<TcpStream> = (0..CLIENTS).map(|_| raw_ws_small_window(addr)).collect();
        let topics: Vec<String> = (0..CLIENTS).map(|n| format!("feed-{n}")).collect();
        assert!(eventually(WAIT, || topics
            .iter()
            .all(|t| server.subscribers(t) == 1)));
        let before = LIVE_CHUNKS.load(Relaxed);
        // Fill each client's kernel buffers with 16 KiB messages until one
        // has to wait in its queue.
        let big = vec![7u8; 16 << 10];
        for t in &topics {
            let mut n = 0;
            while server.publish(t, big.clone()).written == 1 {
                n += 1;
                assert!(n < 4096, "64 MiB went into a socket that is never read");
            }
        }
        // Then empty messages (2-byte frames) until each queue refuses
        // them: at the hard limit as flow control counts it.
        let mut refused = [0; CLIENTS];
        let mut published = 0;
        while refused.iter().any(|&r| r < 100) {
            for (t, r) in topics.iter().zip(refused.iter_mut()) {
                let b = server.publish(t, Vec::new());
                if b.dropped == 1 {
                    *r += 1;
                } else {
                    assert_eq!(b.queued, 1, "{b:?}");
                    *r = 0;
                }
                published += 1;
            }
            assert!(published < 10_000_000, "the queues never refused");
        }
        let grown = LIVE_CHUNKS.load(Relaxed) - before;
        eprintln!(
            "{CLIENTS} subscribers that never read: heap {grown:+} bytes (as malloc lays it out) \
             after {published} tiny publishes, {} queued",
            server.stats().bytes_queued
        );
        // Each queue: up to its hard limit as counted, a few KiB for its
        // box and the part of a 16 KiB frame before the tiny ones; what
        // else a connection holds was there before.
        let bound = (CLIENTS * (HARD + HARD / 8 + (32 << 10))) as i64;
        assert!(
            grown < bound,
            "{CLIENTS} queues at their hard limit hold {grown} bytes of heap, over {bound}"
        );
        drop(socks);
        assert!(eventually(WAIT, || server.stats().connections == 0));
    });
}

/// A job's reply to a client whose socket is full stays queued. Started
/// in an idle queue, its gathered chunk takes the worker's kept buffer (up
/// to 4 KiB, grown by an earlier job's sixteen replies), far larger than
/// one small frame is counted as; the write that finds the socket full
/// must fit it to its count, or each such client holds about 4 KiB more
/// than flow control counts (20 clients: the heap grew 81.5 KB without the
/// fit, against 5.0 KB; the worker's own spare box and buffer, held at the
/// start and taken by the last client, are about 4.4 KB of what each
/// holds, so the clients hold about 9.4 KB against 86 KB).
#[test]
fn replies_left_queued_in_a_kept_buffer_hold_what_flow_control_counts() {
    const CLIENTS: usize = 20;
    let _alone = ALONE.write().unwrap_or_else(PoisonError::into_inner);
    within(Duration::from_secs(120), || {
        let server = WebSocketServer::builder()
            .workers(1)
            .kernel_send_buffer(Some(4096))
            .ping_interval(None)
            .on_message(|c, m| {
                let _ = c.send(m);
            })
            .start("127.0.0.1:0")
            .unwrap();
        let addr = server.local_addr();
        let mut reader = raw_ws(addr);
        let mut stuck: Vec<TcpStream> = (0..CLIENTS).map(|_| raw_ws_small_window(addr)).collect();
        let burst: Vec<u8> = (0..16).flat_map(|_| frame(0x82, &[1; 125])).collect();
        let one = frame(0x82, &[2; 125]);
        let mut out = 0;
        // Polled closely: a few thousand waits for one echo each.
        let soon = |limit: Duration, f: &dyn Fn() -> bool| {
            let deadline = Instant::now() + limit;
            while !f() {
                if Instant::now() >= deadline {
                    return false;
                }
                thread::sleep(Duration::from_micros(100));
            }
            true
        };
        let wait_out = |out: u64| {
            assert!(
                soon(WAIT, &|| server.stats().messages_out >= out),
                "{out} echoes"
            )
        };
        // Settled first: the reader's first echoes and the clients' own
        // queues' first allocations are not what is measured.
        reader.write_all(&burst).unwrap();
        for _ in 0..16 {
            assert_eq!(read_frame(&mut reader).1.len(), 125);
        }
        out += 16;
        wait_out(out);
        let before = LIVE_CHUNKS.load(Relaxed);
        let mut queued = server.stats().bytes_queued;
        for s in &mut stuck {
            // The worker's kept buffer grown to its largest: sixteen
            // replies of 125 bytes, gathered by one job, written out.
            reader.write_all(&burst).unwrap();
            for _ in 0..16 {
                assert_eq!(read_frame(&mut reader).1.len(), 125);
            }
            out += 16;
            wait_out(out);
            // This client's messages one at a time, until its reply stays.
            let mut sent = 0;
            loop {
                s.write_all(&one).unwrap();
                sent += 1;
                out += 1;
                wait_out(out);
                let written = soon(Duration::from_millis(100), &|| {
                    server.stats().bytes_queued == queued
                });
                if !written {
                    break;
                }
                assert!(sent < 2_000, "2,000 replies went into a socket never read");
            }
            queued = server.stats().bytes_queued;
        }
        let grown = LIVE_CHUNKS.load(Relaxed) - before;
        eprintln!(
            "{CLIENTS} clients with a reply stuck: heap {grown:+} bytes (as malloc lays it out), \
             {queued} bytes queued"
        );
        // Each: its queue's box and ring (256 B as malloc lays them out),
        // the reply's chunk as counted (129 bytes and one piece), and
        // room for what a stuck write may leave besides.
        let bound = (CLIENTS * 1024) as i64;
        assert!(
            grown < bound,
            "{CLIENTS} clients, each with one reply stuck, hold {grown} bytes of heap, over {bound}"
        );
        drop(stuck);
        assert!(eventually(WAIT, || server.stats().connections == 1));
    });
}

/// The messages a job reads together reach the main loop as one batch,
/// whose list holds each event where a lone one's channel slot would, and
/// takes a slot of its own: a batch of two in a list grown to four held
/// 264 B a 1-byte message where 145 B was charged (found by a review).
/// Tiny messages sent in pairs, one pair a read, to a main loop that reads
/// nothing hold what they are charged.
#[test]
fn tiny_messages_in_pairs_held_for_an_unread_main_loop_hold_what_is_charged() {
    const CLIENTS: usize = 20;
    const PAIRS: usize = 100;
    let _alone = ALONE.write().unwrap_or_else(PoisonError::into_inner);
    within(Duration::from_secs(60), || {
        // One worker: its read buffer (256 KiB) is made in the first round,
        // before the measure; a second worker's might be made in it.
        let server = WebSocketServer::builder()
            .workers(1)
            .ping_interval(None)
            .event_queue_bytes(64 << 20)
            .start("127.0.0.1:0")
            .unwrap();
        let addr = server.local_addr();
        let mut socks: Vec<TcpStream> = (0..CLIENTS).map(|_| raw_ws(addr)).collect();
        assert!(eventually(WAIT, || server.stats().connections == CLIENTS as u64));
        let pair = [frame(0x82, &[1]), frame(0x82, &[2])].concat();
        let mut sent = 0;
        let mut round = |socks: &mut [TcpStream]| {
            for s in socks.iter_mut() {
                s.write_all(&pair).unwrap();
            }
            sent += 2 * CLIENTS as u64;
            assert!(eventually(WAIT, || server.stats().messages_in == sent));
        };
        // What the first messages make once (the worker's read buffer) is
        // before the measure.
        round(&mut socks);
        thread::sleep(Duration::from_millis(200));
        let (heap, charged) = (LIVE_CHUNKS.load(Relaxed), server.stats().event_bytes);
        for _ in 0..PAIRS {
            round(&mut socks);
        }
        // Counted in when read, charged once the job has staged them all.
        let least = charged + (2 * CLIENTS * PAIRS * 145) as u64;
        assert!(eventually(WAIT, || server.stats().event_bytes >= least));
        thread::sleep(Duration::from_millis(200));
        let grown = LIVE_CHUNKS.load(Relaxed) - heap;
        let charged = (server.stats().event_bytes - charged) as i64;
        eprintln!(
            "{} tiny messages in pairs: heap {grown:+} bytes (as malloc lays it out), events \
             charged {charged}",
            2 * CLIENTS * PAIRS
        );
        assert!(charged >= (2 * CLIENTS * PAIRS * 145) as i64);
        assert!(
            grown <= charged + charged / 20,
            "{} tiny messages hold {grown} bytes, charged {charged}",
            2 * CLIENTS * PAIRS
        );
        // Last, the loop takes every event; then a batch of 64 (a list of
        // 5.6 KB), which, once the loop has taken all of it, leaves nothing
        // held, its list included.
        let take_all = || {
            let mut taken = 0;
            while let Ok(e) = server.try_recv() {
                taken += u64::from(matches!(e, Event::Message { .. }));
            }
            taken
        };
        take_all();
        let heap = LIVE_CHUNKS.load(Relaxed);
        let all: Vec<u8> = (0..64u8).flat_map(|i| frame(0x82, &[i])).collect();
        socks[0].write_all(&all).unwrap();
        drop(all);
        let mut taken = 0;
        assert!(
            eventually(WAIT, || {
                taken += take_all();
                taken == 64
            }),
            "{taken} of 64 messages"
        );
        let left = LIVE_CHUNKS.load(Relaxed) - heap;
        eprintln!("a batch of 64 taken: heap {left:+} bytes");
        assert!(
            left < 2 << 10,
            "{left} bytes held once a batch of 64 was taken"
        );
        drop(socks);
    });
}

/// Clients that come and go while the main loop reads nothing leave a
/// `Connect` and a `Disconnect` each in the channel, until twice its
/// budget stops the accept thread. The `Disconnect`'s client handle keeps
/// the connection's record alive (and the close's reason): the channel's
/// count must include what they hold, or twice the budget is much more
/// memory than it says (a review measured 452 B a pair, charged 288 B).
#[test]
fn connects_and_disconnects_held_for_an_unread_main_loop_hold_what_is_charged() {
    let _alone = ALONE.write().unwrap_or_else(PoisonError::into_inner);
    within(Duration::from_secs(120), || {
        let server = WebSocketServer::builder()
            .event_queue_bytes(64 << 20)
            .start("127.0.0.1:0")
            .unwrap();
        let addr = server.local_addr();
        let come_and_go = |n: usize| {
            for i in 0..n {
                let mut s = raw_ws(addr);
                if i % 2 == 0 {
                    s.write_all(&frame(0x88, &close_payload(1000, "going")))
                        .unwrap();
                    let _ = read_close(&mut s);
                }
            }
            assert!(eventually(WAIT, || server.stats().connections == 0));
            thread::sleep(Duration::from_millis(200));
            (LIVE_CHUNKS.load(Relaxed), server.stats().event_bytes as i64)
        };
        // What the first connections make once (the registry's first
        // slots, the buffers each thread keeps) is in the first round's
        // figures; the second round's growth is the events' alone.
        let (heap, charged) = come_and_go(1000);
        let (heap2, charged2) = come_and_go(2000);
        let (grown, charged) = (heap2 - heap, charged2 - charged);
        eprintln!(
            "2000 more clients came and went: heap {grown:+} bytes (as malloc lays it out), \
             events charged {charged}"
        );
        assert!(
            grown <= charged + charged / 10,
            "2000 clients' events hold {grown} bytes, charged {charged}"
        );
    });
}

/// Messages that come in pieces, held for a main loop that reads
/// nothing: the channel charges each its length, so the buffer each was
/// assembled in must not hold much more (it grew by doubling as the
/// pieces came: 40,000 bytes in a buffer of 64-72 KiB, twice what was
/// charged, before it was fitted).
#[test]
fn messages_that_came_in_pieces_held_for_an_unread_main_loop_hold_what_is_charged() {
    const CLIENTS: usize = 100;
    const LEN: usize = 40_000;
    let _alone = ALONE.write().unwrap_or_else(PoisonError::into_inner);
    within(Duration::from_secs(60), || {
        // Two workers: each makes a read buffer of 256 KiB on its first
        // job, in the first round, whatever the machine's cores.
        let server = WebSocketServer::builder()
            .workers(2)
            .event_queue_bytes(64 << 20)
            .start("127.0.0.1:0")
            .unwrap();
        let addr = server.local_addr();
        let wire = frame(0x82, &vec![7u8; LEN]);
        let cut = wire.len() - 4_000;
        let mut kept = Vec::new();
        let mut round = |n: u64| {
            let mut socks: Vec<TcpStream> = (0..CLIENTS).map(|_| raw_ws(addr)).collect();
            assert!(eventually(WAIT, || server.stats().connections == n * CLIENTS as u64));
            thread::sleep(Duration::from_millis(200));
            let (heap, charged) = (LIVE_CHUNKS.load(Relaxed), server.stats().event_bytes);
            for s in &mut socks {
                s.write_all(&wire[..cut]).unwrap();
            }
            // The first parts are read (and held) before the rest comes.
            thread::sleep(Duration::from_millis(300));
            for s in &mut socks {
                s.write_all(&wire[cut..]).unwrap();
            }
            let each = 144 + LEN as u64;
            assert!(eventually(WAIT, || server.stats().event_bytes
                >= charged + CLIENTS as u64 * each));
            thread::sleep(Duration::from_millis(200));
            kept.extend(socks);
            (
                LIVE_CHUNKS.load(Relaxed) - heap,
                (server.stats().event_bytes - charged) as i64,
            )
        };
        // What the first messages make once (each worker's read buffer)
        // is in the first round's figures; the second round's growth is
        // the messages' alone.
        round(1);
        let (grown, charged) = round(2);
        eprintln!(
            "{CLIENTS} messages of {LEN} B in two pieces: heap {grown:+} bytes (as malloc lays \
             it out), events charged {charged}"
        );
        assert!(
            grown <= charged + charged / 10,
            "{CLIENTS} messages hold {grown} bytes, charged {charged}"
        );
        drop(kept);
    });
}

/// A main loop sends back what its workers decoded, so each message's
/// buffer ends on the loop's thread, where glibc frees it at several times
/// the cost of the worker's own. Those buffers go back to the decoders:
/// 8 clients sending 2,000 messages each, 8 in flight, through a main
/// loop that echoes them get every echo back, in order, byte for byte,
/// and the server makes few new buffers of the payload's size (which
/// nothing else here asks for): one a message before. With 77 B payloads
/// (gathered where they queue, so given back by the loop's thread, by way
/// of the shelf) and 200 B ones (queued whole, so given back by the
/// worker that writes them); and the small echoes' queues, their boxes
/// and the buffers they are gathered in come to the loop's thread from
/// shelves of those the workers wrote out. Then replies larger than the
/// requests (200 B
/// to 40 B), whose buffers fit no message decoded: they are let go, and
/// a second round of them leaves the heap where the first did (a version
/// that kept them grew a group past its bound as it went between the
/// shelf and the workers, by about a buffer a message).
#[test]
fn a_main_loop_gives_the_buffers_of_what_it_sent_back_to_the_decoders() {
    let _alone = ALONE.write().unwrap_or_else(PoisonError::into_inner);
    within(Duration::from_secs(120), || {
        let server = WebSocketServer::builder()
            .ping_interval(None)
            .start("127.0.0.1:0")
            .unwrap();
        for len in [77, 200] {
            let (echoed, made, by_loop) = echo_through_a_main_loop(&server, len, len);
            eprintln!(
                "{echoed} messages of {len} B echoed by a main loop: {made} buffers of {len} B \
                 made, {by_loop} allocations on the loop's thread"
            );
            assert!(
                made < echoed / 10,
                "{made} buffers of {len} B made for {echoed} messages"
            );
            // Gathered, the small echoes take the loop's thread nothing
            // but a chunk's growth now and then (about 12,600 allocations
            // without the shelves of boxes and gathered buffers). (A queue
            // of larger ones grows a ring past what a box is kept with.)
            if len == 77 {
                assert!(
                    by_loop < echoed / 3,
                    "{by_loop} allocations on the loop's thread for {echoed} echoes"
                );
            }
        }
        echo_through_a_main_loop(&server, 40, 200);
        thread::sleep(Duration::from_millis(200));
        let heap = LIVE_CHUNKS.load(Relaxed);
        echo_through_a_main_loop(&server, 40, 200);
        thread::sleep(Duration::from_millis(200));
        let grown = LIVE_CHUNKS.load(Relaxed) - heap;
        eprintln!("16000 more replies of 200 B to 40 B: heap {grown:+} bytes");
        assert!(
            grown < 128 << 10,
            "16000 replies of 200 B to 40 B grew the heap by {grown} bytes"
        );
    });
}

/// 8 clients send `server` 2,000 messages of `len` bytes each, 8 in
/// flight, each answered by a main loop with a reply of `reply` bytes
/// made from it (the message itself if as long): how many were answered
/// (each reply checked by its client), how many allocations of `len`
/// bytes were made meanwhile, and how many allocations the loop's thread
/// made (the replies' queues, their boxes, the buffers they are gathered
/// in: taken from the shelves of what the workers wrote out).
fn echo_through_a_main_loop(server: &WebSocketServer, len: usize, reply: usize) -> (u64, u64, u64) {
    const CLIENTS: usize = 8;
    const EACH: usize = 2_000;
    const IN_FLIGHT: usize = 8;
    let addr = server.local_addr();
    let before = server.stats().connections;
    let payload = |c: usize, i: usize, len: usize| {
        let mut p = numbered(i, len);
        p[len - 1] = c as u8;
        p
    };
    // Everything the clients send and expect is made before the count.
    let frames: Vec<Vec<Vec<u8>>> = (0..CLIENTS)
        .map(|c| {
            (0..EACH)
                .map(|i| frame(0x82, &payload(c, i, len)))
                .collect()
        })
        .collect();
    let expected: Vec<Vec<Vec<u8>>> = (0..CLIENTS)
        .map(|c| (0..EACH).map(|i| payload(c, i, reply)).collect())
        .collect();
    let head: Vec<u8> = if reply <= 125 {
        vec![0x82, reply as u8]
    } else {
        [&[0x82, 126][..], &(reply as u16).to_be_bytes()].concat()
    };
    let socks: Vec<TcpStream> = (0..CLIENTS).map(|_| raw_ws(addr)).collect();
    assert!(eventually(WAIT, || {
        server.stats().connections == before + CLIENTS as u64
    }));
    WATCHED.store(0, Relaxed);
    WATCHED_SIZE.store(len, Relaxed);
    let clients: Vec<_> = socks
        .into_iter()
        .zip(frames)
        .zip(expected)
        .enumerate()
        .map(|(c, ((mut s, frames), expected))| {
            // Made before the count: the client makes nothing of `len`.
            let mut f = vec![0u8; head.len() + reply];
            let head = head.clone();
            thread::spawn(move || {
                for next in &frames[..IN_FLIGHT] {
                    s.write_all(next).unwrap();
                }
                for (i, want) in expected.iter().enumerate() {
                    s.read_exact(&mut f).unwrap();
                    assert_eq!(f[..head.len()], head[..], "client {c}, reply {i}");
                    assert!(f[head.len()..] == want[..], "client {c}, reply {i}");
                    if let Some(next) = frames.get(i + IN_FLIGHT) {
                        s.write_all(next).unwrap();
                    }
                }
            })
        })
        .collect();
    let mut answered = 0;
    HERE.store(0, Relaxed);
    COUNT_HERE.with(|c| c.set(true));
    while clients.iter().any(|c| !c.is_finished()) {
        if let Ok(Event::Message { client, message }) =
            server.events().recv_timeout(Duration::from_millis(50))
        {
            let message = if reply == len {
                message
            } else {
                // The reply the client expects: message `i`'s numbering
                // at the reply's length, with the client's byte last.
                let p = message.as_bytes();
                let i = u32::from_be_bytes(p[..4].try_into().unwrap()) as usize;
                let mut r = numbered(i, reply);
                r[reply - 1] = p[len - 1];
                Message::Binary(r)
            };
            client.send(message).unwrap();
            answered += 1;
        }
    }
    COUNT_HERE.with(|c| c.set(false));
    WATCHED_SIZE.store(0, Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(answered, (CLIENTS * EACH) as u64);
    assert!(eventually(WAIT, || server.stats().connections == before));
    (answered, WATCHED.load(Relaxed), HERE.load(Relaxed))
}
