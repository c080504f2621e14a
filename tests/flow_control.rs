//! Flow control (issue 12), seen from the peer over real sockets: an echo
//! loses nothing however fast a client pipelines and however slowly it
//! reads, a half-closed client still gets everything, the partial-message
//! budget counts bytes received (not bytes announced) and closes the
//! biggest holder, and a blocked handler delays only its own connection.
//!
//! The tests are heavy (tens of megabytes, a thousand sockets), so they run
//! one at a time; none asserts speed except the explicit round-trip bound of
//! the blocked-handler tests.

mod support;

use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use enjent::{Client, Event, Message, WebSocketServer};
use support::*;

/// Held by every test: they would otherwise compete for two CPUs.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Long enough for anything here to finish on a loaded machine; a test
/// that waits this long has hung.
const DEADLINE: Duration = Duration::from_secs(60);

/// An `on_message` closure echoing every message, counting refused sends.
fn echo(errors: &Arc<AtomicUsize>) -> impl Fn(&Client, Message) + Send + Sync + 'static {
    let errors = Arc::clone(errors);
    move |c, m| {
        if c.send(m).is_err() {
            errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Poll `done` until it holds; panic naming `what` after [`WAIT`].
fn wait_until(what: &str, done: impl FnMut() -> bool) {
    wait_within(WAIT, what, done);
}

/// [`wait_until`] with a bound of `limit`.
fn wait_within(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

const PIPELINED: u32 = 10_000;

/// Read the `count` echoes, slower than they are sent (a stall first, then
/// a pause every 50 frames), checking each; then shut the socket down.
fn read_echoes(s: TcpStream, count: u32) -> Result<(), String> {
    let mut r = BufReader::with_capacity(16 * 1024, s);
    thread::sleep(Duration::from_millis(300));
    let mut result = Ok(());
    for i in 0..count {
        if i % 50 == 0 {
            thread::sleep(Duration::from_millis(1));
        }
        let want = echo_payload(i);
        match try_read_frame(&mut r) {
            Ok((0x82, p)) if p == want => {}
            Ok((first, p)) => {
                result = Err(format!(
                    "echo {i} (of {count}, {} bytes) is missing or wrong: got {}",
                    want.len(),
                    describe(first, &p)
                ));
                break;
            }
            Err(e) => {
                result = Err(format!("echo {i} (of {count}) never came: {e}"));
                break;
            }
        }
    }
    // Ends the writer if it is stuck, and tells the server we are gone.
    let _ = r.get_ref().shutdown(Shutdown::Both);
    result
}

/// A raw upgraded socket whose writes cannot hang a test forever.
fn raw_client(addr: std::net::SocketAddr) -> TcpStream {
    let s = raw_ws(addr);
    s.set_write_timeout(Some(DEADLINE)).unwrap();
    s
}

#[test]
fn pipelined_echo_loses_nothing_closure_style() {
    let _serial = serial();
    let errors = Arc::new(AtomicUsize::new(0));
    let server = WebSocketServer::builder()
        .workers(2)
        .on_message(echo(&errors))
        .start("127.0.0.1:0")
        .unwrap();
    let s = raw_client(server.local_addr());
    let w = s.try_clone().unwrap();
    let writer = thread::spawn(move || pipeline(w, PIPELINED));
    let read = read_echoes(s, PIPELINED);
    let refused = errors.load(Ordering::Relaxed);
    assert_eq!(read, Ok(()), "({refused} echo sends were refused)");
    writer.join().unwrap().expect("the writer");
    assert_eq!(refused, 0, "echo sends refused");
    assert_eq!(server.stats().messages_dropped, 0);
}

#[test]
fn pipelined_echo_loses_nothing_main_loop_style() {
    let _serial = serial();
    let server = WebSocketServer::builder()
        .workers(2)
        .start("127.0.0.1:0")
        .unwrap();
    let s = raw_client(server.local_addr());
    let w = s.try_clone().unwrap();
    let writer = thread::spawn(move || pipeline(w, PIPELINED));
    let reader = thread::spawn(move || read_echoes(s, PIPELINED));
    // The main loop: echo everything until the client leaves (the reader
    // shuts the socket down when it is done or has seen a gap).
    let start = Instant::now();
    let (mut echoed, mut refused) = (0u32, 0usize);
    loop {
        match server.recv_timeout(Duration::from_millis(100)) {
            Ok(Event::Message { client, message }) => {
                echoed += 1;
                if client.send(message).is_err() {
                    refused += 1;
                }
            }
            Ok(Event::Disconnect { .. }) => break,
            Ok(_) => {}
            Err(_) => assert!(start.elapsed() < DEADLINE, "the client never left"),
        }
    }
    let read = reader.join().unwrap();
    assert_eq!(
        read,
        Ok(()),
        "({refused} of {echoed} echo sends were refused)"
    );
    writer.join().unwrap().expect("the writer");
    assert_eq!((echoed, refused), (PIPELINED, 0), "(echoed, refused)");
    assert_eq!(server.stats().messages_dropped, 0);
}

#[test]
fn half_close_after_close_gets_everything() {
    let _serial = serial();
    let errors = Arc::new(AtomicUsize::new(0));
    // A hard limit far above what is sent: any echo that goes missing was
    // lost to the half-close, not refused.
    let server = WebSocketServer::builder()
        .max_backpressure(64 << 20)
        .on_message(echo(&errors))
        .start("127.0.0.1:0")
        .unwrap();
    let s = raw_client(server.local_addr());
    let mut w = s.try_clone().unwrap();
    let (done_tx, done_rx) = mpsc::channel();
    let writer = thread::spawn(move || -> io::Result<()> {
        for i in 0..200 {
            w.write_all(&frame(0x82, &numbered(i, 60_000)))?;
        }
        w.write_all(&frame(0x88, &close_payload(1000, "")))?;
        w.shutdown(Shutdown::Write)?;
        let _ = done_tx.send(());
        Ok(())
    });
    // Start reading once everything is sent, or once the server has
    // stopped taking more (then the rest needs us to read).
    let _ = done_rx.recv_timeout(Duration::from_millis(500));
    let mut r = BufReader::new(s);
    for i in 0..200 {
        let (first, p) =
            try_read_frame(&mut r).unwrap_or_else(|e| panic!("echo {i} of 200 never came: {e}"));
        assert!(
            first == 0x82 && p == numbered(i, 60_000),
            "echo {i} of 200 is missing or wrong: got {}",
            describe(first, &p)
        );
    }
    let (first, p) = try_read_frame(&mut r).expect("the close reply");
    assert_eq!(
        first,
        0x88,
        "got {} instead of the close reply",
        describe(first, &p)
    );
    assert_eq!(p.get(..2), Some(&1000u16.to_be_bytes()[..]), "close reply");
    let mut rest = [0u8; 64];
    match r.read(&mut rest) {
        Ok(0) => {}
        Ok(n) => panic!("{n} bytes after the close reply"),
        Err(e) => panic!("no clean FIN after the close reply: {e}"),
    }
    writer.join().unwrap().expect("the writer");
    assert_eq!(errors.load(Ordering::Relaxed), 0, "echo sends refused");
}

#[test]
fn header_only_flood_cannot_lock_out_an_honest_client() {
    let _serial = serial();
    let errors = Arc::new(AtomicUsize::new(0));
    let server = WebSocketServer::builder()
        .max_buffered_bytes(256 << 20)
        .max_message_size(1 << 20)
        .on_message(echo(&errors))
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    // A binary FIN frame announcing 1,000,000 bytes that never come.
    let mut header = vec![0x82, 0x80 | 127];
    header.extend_from_slice(&1_000_000u64.to_be_bytes());
    header.extend_from_slice(&[0x12, 0x34, 0x56, 0x78]);
    assert_eq!(header.len(), 14);
    // 1,100 such headers announce far more than the budget (and at 256 KiB
    // reserved for each, 1,100 x 256 KiB would pass it too).
    let flood: Vec<TcpStream> = (0..1_100)
        .map(|_| {
            let mut s = raw_client(addr);
            s.write_all(&header).unwrap();
            s
        })
        .collect();
    // Let the server read the last headers (nothing to observe: they
    // should cost nothing).
    thread::sleep(Duration::from_millis(500));
    let mut honest = raw_client(addr);
    let payload = numbered(7, 200_000);
    let wire = frame(0x82, &payload);
    let (first_half, second_half) = wire.split_at(wire.len() / 2);
    honest.write_all(first_half).unwrap();
    thread::sleep(Duration::from_millis(200));
    honest.write_all(second_half).unwrap();
    let (first, p) = read_frame(&mut honest);
    assert!(
        first == 0x82 && p == payload,
        "the honest client got {} instead of its echo",
        describe(first, &p)
    );
    let stats = server.stats();
    assert_eq!(
        (stats.buffered_closes, stats.protocol_errors.get(&1009)),
        (0, None),
        "connections were closed for bytes that were only announced"
    );
    assert!(
        stats.buffered_in_bytes < 1 << 20,
        "{} bytes counted as buffered for headers alone",
        stats.buffered_in_bytes
    );
    assert_eq!(errors.load(Ordering::Relaxed), 0, "echo sends refused");
    drop(flood);
}

#[test]
fn over_the_buffered_budget_the_biggest_holder_is_closed_with_1009() {
    let _serial = serial();
    let errors = Arc::new(AtomicUsize::new(0));
    let server = WebSocketServer::builder()
        .max_buffered_bytes(4 << 20)
        .max_message_size(8 << 20)
        .on_message(echo(&errors))
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    // Both frame headers are 14 bytes (64-bit length).
    let (mut big, mut small) = (raw_client(addr), raw_client(addr));
    // The big holder: 3 MiB of a 3.5 MiB message.
    let big_wire = frame(0x82, &numbered(1, 7 << 19));
    big.write_all(&big_wire[..14 + (3 << 20)]).unwrap();
    wait_until("the server to hold the big client's 3 MiB", || {
        server.stats().buffered_in_bytes >= 3 << 20
    });
    // The small holder's 1.5 MiB of a 2 MiB message take the total past
    // 4 MiB: the big holder goes, not the one whose bytes came last.
    let small_payload = numbered(2, 2 << 20);
    let small_wire = frame(0x82, &small_payload);
    let (head, tail) = small_wire.split_at(14 + (3 << 19));
    small.write_all(head).unwrap();
    wait_until("a connection to be closed with 1009", || {
        server.stats().buffered_closes > 0
    });
    // The small holder finishes and gets its echo.
    let _ = small.write_all(tail);
    let (first, p) = read_frame(&mut small);
    assert!(
        first == 0x82 && p == small_payload,
        "the smaller holder got {} instead of its echo",
        describe(first, &p)
    );
    assert_eq!(read_close(&mut big), Some(1009), "the big holder's close");
    // Counted as a close for the budget, not as a protocol error.
    let stats = server.stats();
    assert_eq!(stats.buffered_closes, 1, "{stats:?}");
    assert!(stats.protocol_errors.is_empty(), "{stats:?}");
    assert_eq!(errors.load(Ordering::Relaxed), 0, "echo sends refused");
}

/// With four workers and `blocked` handlers asleep for 3 s, 200 other
/// clients connect and each gets its echo within 2 s.
fn blocked_handlers_leave_the_others_served(blocked: usize) {
    let _serial = serial();
    const BLOCK: Duration = Duration::from_secs(3);
    let asleep = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let (count, refused) = (Arc::clone(&asleep), Arc::clone(&errors));
    let server = WebSocketServer::builder()
        .workers(4)
        .on_message(move |c, m| {
            if m.as_bytes() == b"block" {
                count.fetch_add(1, Ordering::SeqCst);
                thread::sleep(BLOCK);
                count.fetch_sub(1, Ordering::SeqCst);
            }
            if c.send(m).is_err() {
                refused.fetch_add(1, Ordering::Relaxed);
            }
        })
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let mut blockers: Vec<TcpStream> = (0..blocked).map(|_| raw_client(addr)).collect();
    for b in &mut blockers {
        b.write_all(&frame(0x82, b"block")).unwrap();
    }
    wait_until("the blocking handlers to start", || {
        asleep.load(Ordering::SeqCst) == blocked
    });
    // The blocked clients keep sending: what piles up for them must hold
    // up no one else.
    let more: Vec<_> = blockers
        .iter()
        .map(|b| {
            let mut w = b.try_clone().unwrap();
            thread::spawn(move || -> io::Result<()> {
                for i in 0..32 {
                    w.write_all(&frame(0x82, &numbered(i, 32 * 1024)))?;
                }
                Ok(())
            })
        })
        .collect();
    // Handshakes go on meanwhile too.
    let mut others: Vec<TcpStream> = (0..200).map(|_| raw_client(addr)).collect();
    let sent: Vec<Instant> = others
        .iter_mut()
        .enumerate()
        .map(|(i, s)| {
            s.write_all(&frame(0x82, &numbered(i as u32, 16))).unwrap();
            Instant::now()
        })
        .collect();
    // Read in turn: a round trip measured here is at most longer than the
    // real one.
    for (i, s) in others.iter_mut().enumerate() {
        let (first, p) = read_frame(s);
        let took = sent[i].elapsed();
        assert!(
            first == 0x82 && p == numbered(i as u32, 16),
            "client {i} got {}",
            describe(first, &p)
        );
        assert!(
            took < Duration::from_secs(2),
            "client {i} waited {took:?} for its echo with {blocked} handler(s) blocked"
        );
    }
    assert_eq!(
        asleep.load(Ordering::SeqCst),
        blocked,
        "the blocked handlers returned before the others were served: nothing was shown"
    );
    // The blocked connections were only delayed.
    for b in &mut blockers {
        assert_eq!(read_frame(b), (0x82, b"block".to_vec()));
        for i in 0..32 {
            let (first, p) = read_frame(b);
            assert!(
                first == 0x82 && p == numbered(i, 32 * 1024),
                "a blocked client's echo {i}: got {}",
                describe(first, &p)
            );
        }
    }
    for w in more {
        w.join().unwrap().expect("a blocked client's writer");
    }
    assert_eq!(errors.load(Ordering::Relaxed), 0, "echo sends refused");
}

/// A burst, round after round: `CLIENTS` clients, connected and idle,
/// write one frame each at the same instant; `blocked` of them (spread
/// through the crowd) send `block`, whose handler sleeps 3 s, on a server
/// with four workers. The connections that became ready together with a
/// blocked one must not wait for it: every other client gets its echo
/// within 1.5 s, well before the blocked handlers wake.
///
/// Where a blocked connection lands among the others depends on timing,
/// so one burst may not show a delay (on the old poller, which handed the
/// connections ready in one wait to the pool in four batches, about one
/// blocked handler in three delayed none): hence the crowd, and rounds
/// until `BLOCKS` handlers have blocked. Four: with one blocked a round,
/// a regression to the old poller escapes all four rounds with a chance
/// of about 1 in 80 (with six, 1 in 730, but each round costs CI 3 s in
/// each of its two passes), and the test with three a round still blocks
/// six handlers in its two.
fn burst_with_blocked_handlers(blocked: usize) {
    let _serial = serial();
    const CLIENTS: usize = 500;
    const BLOCKS: usize = 4;
    const BLOCK: Duration = Duration::from_secs(3);
    const BOUND: Duration = Duration::from_millis(1500);
    let rounds = BLOCKS.div_ceil(blocked);
    let started = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let (begun, refused) = (Arc::clone(&started), Arc::clone(&errors));
    let server = WebSocketServer::builder()
        .workers(4)
        .on_message(move |c, m| {
            if m.as_bytes() == b"block" {
                begun.fetch_add(1, Ordering::SeqCst);
                thread::sleep(BLOCK);
            }
            if c.send(m).is_err() {
                refused.fetch_add(1, Ordering::Relaxed);
            }
        })
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let blockers: Vec<usize> = (0..blocked)
        .map(|k| (2 * k + 1) * CLIENTS / (2 * blocked))
        .collect();
    let clients: Vec<TcpStream> = (0..CLIENTS).map(|_| raw_client(addr)).collect();
    // Every connection is now open and waiting for data.
    thread::sleep(Duration::from_millis(200));
    // A round starts once every client is spinning on `go` (a barrier
    // would release them one at a time, through its mutex); between
    // rounds they wait at `done`, asleep, for the blocked ones.
    let armed = Arc::new(AtomicUsize::new(0));
    let go = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(Barrier::new(CLIENTS));
    let threads: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            let (armed, go, stop, done) = (
                Arc::clone(&armed),
                Arc::clone(&go),
                Arc::clone(&stop),
                Arc::clone(&done),
            );
            let payload = if blockers.contains(&i) {
                b"block".to_vec()
            } else {
                numbered(i as u32, 16)
            };
            thread::spawn(move || -> Result<Vec<Duration>, String> {
                let wire = frame(0x82, &payload);
                let mut took = Vec::with_capacity(rounds);
                for round in 0..rounds {
                    if round > 0 {
                        done.wait();
                    }
                    armed.fetch_add(1, Ordering::SeqCst);
                    while go.load(Ordering::Acquire) <= round {
                        if stop.load(Ordering::Relaxed) {
                            return Err(format!("client {i} was stopped"));
                        }
                        thread::yield_now();
                    }
                    let sent = Instant::now();
                    s.write_all(&wire)
                        .map_err(|e| format!("client {i} could not send: {e}"))?;
                    let (first, p) = try_read_frame(&mut s)
                        .map_err(|e| format!("client {i}'s echo never came: {e}"))?;
                    took.push(sent.elapsed());
                    if first != 0x82 || p != payload {
                        return Err(format!("client {i} got {}", describe(first, &p)));
                    }
                }
                Ok(took)
            })
        })
        .collect();
    for round in 0..rounds {
        let start = Instant::now();
        while armed.load(Ordering::SeqCst) < CLIENTS * (round + 1) {
            if start.elapsed() > DEADLINE || threads.iter().any(|t| t.is_finished()) {
                // A client failed (or one hangs): report those that did,
                // then stop the rest.
                let failed: Vec<_> = threads.into_iter().filter(|t| t.is_finished()).collect();
                stop.store(true, Ordering::Relaxed);
                for t in failed {
                    t.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
                }
                panic!("round {round} never started");
            }
            thread::sleep(Duration::from_millis(1));
        }
        go.store(round + 1, Ordering::Release);
    }
    let took: Vec<Vec<Duration>> = threads
        .into_iter()
        .map(|t| t.join().unwrap().unwrap_or_else(|e| panic!("{e}")))
        .collect();
    // (round, client, wait) of every other client that waited too long.
    let mut late: Vec<(usize, usize, Duration)> = (0..rounds)
        .flat_map(|r| took.iter().enumerate().map(move |(i, t)| (r, i, t[r])))
        .filter(|&(_, i, t)| !blockers.contains(&i) && t >= BOUND)
        .collect();
    let per_round: Vec<usize> = (0..rounds)
        .map(|r| late.iter().filter(|l| l.0 == r).count())
        .collect();
    late.sort_by_key(|l| std::cmp::Reverse(l.2));
    assert!(
        late.is_empty(),
        "{} of {} echoes took {BOUND:?} or more with {blocked} handler(s) blocked for \
         {BLOCK:?} ({per_round:?} in the {rounds} rounds; the longest (round, client, \
         wait): {:?})",
        late.len(),
        rounds * (CLIENTS - blocked),
        &late[..late.len().min(8)]
    );
    for &b in &blockers {
        for (r, &t) in took[b].iter().enumerate() {
            assert!(
                t >= BLOCK && t < BLOCK + BOUND,
                "in round {r}, blocked client {b} got its echo after {t:?}: its \
                 handler did not block from the start, with the others"
            );
        }
    }
    assert_eq!(
        started.load(Ordering::SeqCst),
        rounds * blocked,
        "handlers blocked"
    );
    assert_eq!(errors.load(Ordering::Relaxed), 0, "echo sends refused");
}

#[test]
fn blocked_handler_in_a_burst_delays_only_its_own_connection() {
    burst_with_blocked_handlers(1);
}

#[test]
fn three_handlers_blocked_in_a_burst_still_serve_the_rest() {
    burst_with_blocked_handlers(3);
}

#[test]
fn blocked_handler_delays_only_its_own_connection() {
    blocked_handlers_leave_the_others_served(1);
}

#[test]
fn three_of_four_workers_blocked_still_serve_the_rest() {
    blocked_handlers_leave_the_others_served(3);
}

/// Work the pool runs outside the ready queue (a user thread's deferred
/// send, a resumed connection's job, a broadcast's share) must not wait
/// for a flood of ready work to end: with one worker kept busy by
/// clients that pipeline without a break, messages a user thread sends in
/// a burst to a quiet client still arrive while the flood goes on.
#[test]
fn a_deferred_send_is_not_starved_by_a_flood_of_ready_work() {
    let _serial = serial();
    let errors = Arc::new(AtomicUsize::new(0));
    let joined: Arc<Mutex<Vec<Client>>> = Arc::default();
    let j = Arc::clone(&joined);
    let server = WebSocketServer::builder()
        .workers(1)
        .on_connect(move |c| j.lock().unwrap().push(c.clone()))
        .on_message(echo(&errors))
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let mut floods = Vec::new();
    for _ in 0..16 {
        let s = raw_client(addr);
        let mut w = s.try_clone().unwrap();
        let mut r = s;
        let stop_w = Arc::clone(&stop);
        floods.push(thread::spawn(move || {
            let burst: Vec<u8> = (0..64).flat_map(|_| frame(0x82, &[7u8; 32])).collect();
            while !stop_w.load(Ordering::Relaxed) {
                if w.write_all(&burst).is_err() {
                    break;
                }
            }
        }));
        let stop_r = Arc::clone(&stop);
        floods.push(thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            while !stop_r.load(Ordering::Relaxed) {
                if matches!(r.read(&mut buf), Ok(0) | Err(_)) {
                    break;
                }
            }
        }));
    }
    let mut quiet = raw_client(addr);
    // The quiet client's Connect comes after the floods' (each opened in
    // turn): find it by its address.
    let quiet_addr = quiet.local_addr().unwrap();
    let t = Instant::now();
    let client = loop {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "quiet client never seen"
        );
        let found = joined
            .lock()
            .unwrap()
            .iter()
            .find(|c| c.peer_addr() == quiet_addr)
            .cloned();
        if let Some(c) = found {
            break c;
        }
        thread::sleep(Duration::from_millis(10));
    };
    thread::sleep(Duration::from_millis(1000));
    // A burst: after the first, sends within 20 µs of the one before are
    // handed to a pool job to write, batched.
    let sent = Instant::now();
    for i in 0..20 {
        client.send(format!("through the flood {i}")).unwrap();
    }
    quiet
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 20 {
        match try_read_frame(&mut quiet) {
            Ok((_, payload)) => got.push(String::from_utf8(payload).unwrap()),
            Err(_) => break,
        }
    }
    let waited = sent.elapsed();
    stop.store(true, Ordering::Relaxed);
    drop(server);
    for f in floods {
        let _ = f.join();
    }
    let want: Vec<String> = (0..20).map(|i| format!("through the flood {i}")).collect();
    assert_eq!(got, want, "within 5 s while the flood went on");
    eprintln!("the burst arrived after {waited:?}");
}

/// The flow-control guarantee at its edge: with `max_message_size` at
/// 256 KiB, twice the default high water, and every other setting at its
/// default, a client pipelining messages of exactly that size between
/// 1-byte ones, and reading slowly, still gets every echo and no reply is
/// refused: the hard limit in force is never below high water plus one
/// largest message.
#[test]
fn echoes_of_messages_at_max_message_size_are_never_refused() {
    let _serial = serial();
    const MAX: usize = 256 * 1024;
    const COUNT: u32 = 200;
    let size = |i: u32| if i.is_multiple_of(2) { MAX } else { 1 };
    let errors = Arc::new(AtomicUsize::new(0));
    let server = WebSocketServer::builder()
        .workers(2)
        .max_message_size(MAX)
        .on_message(echo(&errors))
        .start("127.0.0.1:0")
        .unwrap();
    let s = raw_client(server.local_addr());
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || -> io::Result<()> {
        for i in 0..COUNT {
            w.write_all(&frame(0x82, &numbered(i, size(i))))?;
        }
        Ok(())
    });
    let mut r = BufReader::with_capacity(16 * 1024, s);
    thread::sleep(Duration::from_millis(300));
    for i in 0..COUNT {
        if i % 10 == 0 {
            thread::sleep(Duration::from_millis(5));
        }
        let (first, p) = try_read_frame(&mut r).unwrap_or_else(|e| {
            panic!(
                "echo {i} never came ({} refused): {e}",
                errors.load(Ordering::Relaxed)
            )
        });
        assert_eq!(first, 0x82);
        assert!(
            p == numbered(i, size(i)),
            "echo {i} is wrong ({} bytes)",
            p.len()
        );
    }
    writer.join().unwrap().expect("the writer");
    assert_eq!(errors.load(Ordering::Relaxed), 0, "echo sends refused");
    assert_eq!(server.stats().messages_dropped, 0);
}

/// Wait until the server has handled all it will (its count of messages
/// in stops moving). Bounded by [`DEADLINE`], not [`WAIT`]: this waits for
/// the server to parse a crowd's input, which on a loaded machine took
/// more than 10 s (a debug build, beside other load).
fn settle(server: &WebSocketServer) {
    let mut last = u64::MAX;
    wait_within(DEADLINE, "the server to settle", || {
        let now = server.stats().messages_in;
        let settled = now == last;
        last = now;
        thread::sleep(Duration::from_millis(200));
        settled
    });
}

/// The cheapest way to make the server hold memory it did not choose to:
/// many clients pipeline small messages and never read. Each is paused at
/// high water in the middle of a read, and keeps the unparsed rest of that
/// read. Past a quarter of `max_buffered_bytes` of such rests (all
/// clients), reads are cut to 4 KiB, so each client paused from then on
/// keeps at most that: the crowd's rests stay near the bound, where they
/// grew with the crowd by up to a whole read (256 KiB) each. One client
/// then reads everything back: the cut reads lose nothing.
#[test]
fn a_crowd_of_paused_pipeliners_keeps_unparsed_input_bounded() {
    let _serial = serial();
    const CLIENTS: usize = 100;
    const SIZE: usize = 125;
    const BUDGET: usize = 1 << 20;
    let workers = 4;
    let errors = Arc::new(AtomicUsize::new(0));
    let server = WebSocketServer::builder()
        .workers(workers)
        .high_water(16 << 10)
        .low_water(4 << 10)
        .max_buffered_bytes(BUDGET)
        .on_message(echo(&errors))
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    // 4 MiB of frames a client, more than the kernel's buffers and ours
    // take once the server stops reading.
    let wire = frames(4 * 1024 * 1024 / (SIZE + 6), SIZE);
    let mut socks: Vec<(TcpStream, usize)> = (0..CLIENTS)
        .map(|_| {
            // Its echoes fill the server's queue soon after they start.
            let s = raw_ws_small_window(addr);
            s.set_nonblocking(true).unwrap();
            (s, 0)
        })
        .collect();
    write_until_quiet(&mut socks, &wire, false);
    settle(&server);
    let stats = server.stats();
    assert!(
        stats.read_pauses >= CLIENTS as u64,
        "only {} pauses for {CLIENTS} clients",
        stats.read_pauses
    );
    // The crowd's rests crossed the line where reads are cut (else this
    // tests nothing), and stayed within it, plus what each worker may
    // have been reading as the total crossed it, plus 4 KiB a client.
    let bound = BUDGET / 4 + workers * 256 * 1024 + CLIENTS * 4096;
    let kept = stats.unparsed_in_bytes;
    eprintln!("unparsed input of {CLIENTS} paused clients: {kept} bytes (bound {bound})");
    assert!(
        kept >= (BUDGET / 4) as u64,
        "only {kept} bytes unparsed: the reads were never cut"
    );
    assert!(
        kept <= bound as u64,
        "{kept} bytes kept unparsed by {CLIENTS} paused clients, over {bound}"
    );
    // The first client reads back an echo of every whole frame it sent.
    let (s, sent) = socks.swap_remove(0);
    s.set_nonblocking(false).unwrap();
    let mut r = BufReader::with_capacity(64 * 1024, s);
    let whole = sent / (SIZE + 6);
    for i in 0..whole {
        match try_read_frame(&mut r) {
            Ok((0x82, p)) if p.len() == SIZE => {}
            Ok((first, p)) => panic!("echo {i} of {whole}: got {}", describe(first, &p)),
            Err(e) => panic!("echo {i} of {whole} never came: {e}"),
        }
    }
    assert_eq!(errors.load(Ordering::Relaxed), 0, "echo sends refused");
    assert_eq!(server.stats().messages_dropped, 0);
}

/// The same crowd (answered with 64 KiB a message, so that each client is
/// paused after a few), and then late clients that come once the crowd's
/// rests are past the line: each sends its request and 200 frames in one
/// write, never waiting for the `101`. What comes with a request is read
/// by the handshake, and kept unparsed as the connection's first input
/// once the client is paused. The handshake reads as connections do, so
/// each late client keeps at most `max_handshake_bytes`, the accept
/// thread's first read (2 KiB) and one cut read (4 KiB) (measured: under
/// 2 KiB each; about 20 KiB each, the lot over the bound, when the
/// handshake reads whole). A late client that then reads gets an answer
/// to every frame.
#[test]
fn clients_that_pipeline_behind_their_request_keep_little_unparsed_past_the_line() {
    let _serial = serial();
    const CROWD: usize = 100;
    const LATE: usize = 50;
    const SIZE: usize = 125;
    const BUDGET: usize = 1 << 20;
    const MAX_HANDSHAKE: usize = 4096;
    const REPLY: usize = 64 * 1024;
    const LATE_FRAMES: usize = 200;
    let errors = Arc::new(AtomicUsize::new(0));
    let server = WebSocketServer::builder()
        .workers(4)
        .high_water(16 << 10)
        .low_water(4 << 10)
        .max_buffered_bytes(BUDGET)
        .max_handshake_bytes(MAX_HANDSHAKE)
        // Each message is answered with 64 KiB, so that a client is paused
        // after a few (once the kernel's buffers and ours are full),
        // with most of what came with its request not yet parsed.
        .on_message({
            let errors = Arc::clone(&errors);
            move |c, _| {
                if c.send(Message::Binary(vec![5u8; REPLY])).is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let wire = frames(4 * 1024 * 1024 / (SIZE + 6), SIZE);
    let mut crowd: Vec<(TcpStream, usize)> = (0..CROWD)
        .map(|_| {
            let s = raw_ws_small_window(addr);
            s.set_nonblocking(true).unwrap();
            (s, 0)
        })
        .collect();
    write_until_quiet(&mut crowd, &wire, false);
    settle(&server);
    let before = server.stats().unparsed_in_bytes;
    assert!(
        before >= (BUDGET / 4) as u64,
        "only {before} bytes unparsed: reads are not cut yet"
    );
    // The late clients: each sends its request and 200 frames (26 KiB,
    // one segment on loopback) in one write, and reads nothing.
    let mut stream = REQUEST.as_bytes().to_vec();
    stream.extend_from_slice(&frames(LATE_FRAMES, SIZE));
    let mut late: Vec<TcpStream> = (0..LATE)
        .map(|_| {
            let mut s = small_window(addr);
            s.write_all(&stream).unwrap();
            s
        })
        .collect();
    settle(&server);
    let stats = server.stats();
    assert!(
        stats.connections >= (CROWD + LATE) as u64,
        "{} connections: the late clients were not all taken",
        stats.connections
    );
    let added = stats.unparsed_in_bytes.saturating_sub(before);
    let each = MAX_HANDSHAKE + 2048 + 4096;
    let bound = LATE * each;
    eprintln!(
        "unparsed input added by {LATE} late pipeliners: {added} bytes (bound {bound}, \
         {before} before)"
    );
    assert!(
        added <= bound as u64,
        "{LATE} late clients added {added} bytes unparsed, over {bound} ({each} a client)"
    );
    // A late client reads back an answer to every frame it sent.
    let mut s = late.swap_remove(0);
    s.set_read_timeout(Some(WAIT)).unwrap();
    read_101(&mut s);
    let mut r = BufReader::with_capacity(64 * 1024, s);
    for i in 0..LATE_FRAMES {
        match try_read_frame(&mut r) {
            Ok((0x82, p)) if p.len() == REPLY => {}
            Ok((first, p)) => panic!("answer {i}: got {}", describe(first, &p)),
            Err(e) => panic!("answer {i} of {LATE_FRAMES} never came: {e}"),
        }
    }
    assert_eq!(errors.load(Ordering::Relaxed), 0, "sends refused");
    assert_eq!(server.stats().messages_dropped, 0);
}

/// Threads blocked in `send_timeout` on clients that never read are woken
/// by room made in their own client's queue (or the budget), not by every
/// write to anyone: 16 of them wait 3 s while 6 other clients are echoed
/// to as fast as they read, and between them use next to no CPU (each
/// wake-up checks its queue and sleeps again; woken by every flush, they
/// spent seconds of it).
#[cfg(target_os = "linux")]
#[test]
fn send_timeout_waiters_are_not_woken_by_other_clients_writes() {
    waiters_sleep_while_others_are_echoed(false);
}

/// The same with the stuck clients refused by the server-wide budget,
/// not their own limits: writes to clients that hold nothing counted in
/// the budget make it no room, and wake none of its waiters (each flush
/// woke them all: 16 spent 179 ticks of CPU in 3 s, in a run before the
/// change).
#[cfg(target_os = "linux")]
#[test]
fn send_timeout_budget_waiters_are_not_woken_by_writes_that_leave_the_server_over_budget() {
    waiters_sleep_while_others_are_echoed(true);
}

/// 16 stuck clients, each filled until refused (by its own hard limit,
/// or, with `budget`, by a server-wide budget of 1 MiB that they hold
/// between them), then a thread each in `send_timeout` for 3 s while 6
/// other clients are echoed: what the 16 threads spend.
#[cfg(target_os = "linux")]
fn waiters_sleep_while_others_are_echoed(budget: bool) {
    const STUCK: usize = 16;
    const SIZE: usize = 8 * 1024;
    let _serial = serial();
    let clients = Arc::new(Mutex::new(Vec::<Client>::new()));
    let joined = Arc::clone(&clients);
    let errors = Arc::new(AtomicUsize::new(0));
    let builder = WebSocketServer::builder()
        .workers(2)
        .max_message_size(64 * 1024)
        .high_water(64 * 1024)
        .low_water(16 * 1024);
    let builder = if budget {
        // Each client's own limit (256 KiB) is far from what the 16 can
        // hold between them; the budget is met first.
        builder
            .max_backpressure(256 * 1024)
            .max_queued_bytes(1024 * 1024)
    } else {
        builder.max_backpressure(0)
    };
    let server = builder
        .on_connect(move |c| joined.lock().unwrap().push(c.clone()))
        .on_message(echo(&errors))
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let stuck: Vec<TcpStream> = (0..STUCK).map(|_| raw_ws_small_window(addr)).collect();
    wait_until("the stuck clients to connect", || {
        clients.lock().unwrap().len() == STUCK
    });
    let handles = clients.lock().unwrap().clone();
    // Fill each queue until refused (at its hard limit, or past its share
    // of the budget), and the kernel's buffers under it, until a pause
    // makes no room.
    let mut rounds = 0;
    loop {
        // A message to each in turn, so that the queues grow together
        // and the budget, where there is one, refuses them all.
        let mut took = 0;
        loop {
            let before = took;
            for c in &handles {
                if c.send(Message::Binary(vec![7; SIZE])).is_ok() {
                    took += 1;
                }
            }
            assert!(took < 100_000, "never refused");
            if took == before {
                break;
            }
        }
        if took == 0 {
            break;
        }
        rounds += 1;
        assert!(rounds < 100, "the stuck clients' queues kept draining");
        thread::sleep(Duration::from_millis(300));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let echoers: Vec<_> = (0..6)
        .map(|_| {
            let mut s = raw_client(addr);
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut echoed = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    s.write_all(&frame(0x82, b"ping-pong")).unwrap();
                    let (_, payload) = read_frame(&mut s);
                    assert_eq!(payload, b"ping-pong");
                    echoed += 1;
                }
                echoed
            })
        })
        .collect();
    let waiters: Vec<_> = handles
        .into_iter()
        .map(|c| {
            thread::spawn(move || {
                let before = thread_ticks();
                let result = c.send_timeout(Message::Binary(vec![7; SIZE]), Duration::from_secs(3));
                let by_budget = result
                    .as_ref()
                    .is_err_and(|e| matches!(e.error(), enjent::Error::ServerBackpressure { .. }));
                let why = result.as_ref().err().map(|e| e.error().to_string());
                (why, by_budget, thread_ticks() - before)
            })
        })
        .collect();
    let mut spent = 0;
    for w in waiters {
        let (refused, by_budget, ticks) = w.join().unwrap();
        assert!(refused.is_some(), "a stuck client took a message");
        assert_eq!(by_budget, budget, "refused by the wrong limit: {refused:?}");
        spent += ticks;
    }
    stop.store(true, Ordering::Relaxed);
    let echoed: u64 = echoers.into_iter().map(|e| e.join().unwrap()).sum();
    assert!(
        echoed > 1_000,
        "only {echoed} echoes: no load to wake anyone"
    );
    assert!(
        spent <= 30,
        "{STUCK} waiters spent {spent} ticks of CPU in 3 s while {echoed} echoes went to others"
    );
    drop(stuck);
}

/// A client whose queue publishes took past high water has none of its
/// messages dispatched: its handler sends nothing back, so nothing of its
/// own job looks at what it holds, and the read gate (which a job passes
/// without the connection's lock while its client holds less than half
/// of high water) must be told of what other threads queued. The client
/// subscribes, reads nothing, is sent 200 KiB of publishes, then
/// pipelines 100 messages. None of the publishes may be refused (its hard
/// limit is 1 MiB): a refusal tells the gate too, and the test would no
/// longer show that a frame queued does.
#[test]
fn a_client_over_high_water_from_publishes_is_not_read() {
    let _serial = serial();
    let handled = Arc::new(AtomicUsize::new(0));
    let h2 = Arc::clone(&handled);
    let server = WebSocketServer::builder()
        .max_message_size(64 * 1024)
        .high_water(64 * 1024)
        .low_water(16 * 1024)
        .max_backpressure(1 << 20)
        .kernel_send_buffer(Some(4096))
        .ping_interval(None)
        .on_message(move |c, m| {
            if m.as_bytes() == b"sub" {
                c.subscribe("t").unwrap();
                let _ = c.send("subscribed");
            } else {
                h2.fetch_add(1, Ordering::SeqCst);
            }
        })
        .start("127.0.0.1:0")
        .unwrap();
    let mut s = raw_ws_small_window(server.local_addr());
    s.write_all(&frame(0x81, b"sub")).unwrap();
    assert_eq!(read_frame(&mut s).1, b"subscribed");
    for _ in 0..200 {
        let _ = server.publish("t", vec![1u8; 1024]);
    }
    let st = server.stats();
    let queued = st.bytes_queued;
    assert!(queued > 64 * 1024, "only {queued} B queued");
    assert_eq!(st.messages_dropped, 0, "a publish was refused");
    let all: Vec<u8> = (0..100).flat_map(|_| frame(0x82, &[2u8; 16])).collect();
    s.write_all(&all).unwrap();
    // Long enough for every message, were they read.
    thread::sleep(Duration::from_secs(1));
    let st = server.stats();
    eprintln!(
        "{queued} B queued; {} of 100 handled; {} read pauses",
        handled.load(Ordering::SeqCst),
        st.read_pauses
    );
    assert_eq!(
        handled.load(Ordering::SeqCst),
        0,
        "messages dispatched over high water"
    );
    drop(s);
}
