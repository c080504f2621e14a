//! The server-wide budget on what is queued to clients
//! (`max_queued_bytes`), seen from the peers: a crowd that never reads is
//! held to the budget, however many threads send to it, while a reader
//! among it is never refused; what each member was sent before the budget
//! refused it arrives whole and in order once it reads, with a `Drain`; a
//! frame broadcast to many slow clients counts once; under many writers
//! at once, with clients leaving, the count comes back to zero; a
//! `send_timeout` waits for the budget; and the `Close` policy closes a
//! client refused for it with 1008.

mod support;

use std::collections::HashSet;
use std::io::Read;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use enjent::{Client, ClientId, Error, SlowClientPolicy, WebSocketServer};
use support::*;

/// Bytes a queue holds before the budget counts it (the library's
/// `COUNTED_FROM`).
const COUNTED_FROM: u64 = 16 * 1024;

/// One test at a time: each loads both cores, and one measures the
/// process's CPU time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A closure-style server that records its clients and their drains.
struct Recorded {
    server: WebSocketServer,
    clients: Arc<Mutex<Vec<Client>>>,
    drained: Arc<Mutex<HashSet<ClientId>>>,
}

fn recorded(builder: enjent::Builder<()>) -> Recorded {
    let clients = Arc::new(Mutex::new(Vec::new()));
    let drained = Arc::new(Mutex::new(HashSet::new()));
    let (c2, d2) = (Arc::clone(&clients), Arc::clone(&drained));
    let server = builder
        .workers(2)
        // The crowd never sends: no ping may reach its members.
        .ping_interval(None)
        .on_connect(move |c| c2.lock().unwrap().push(c.clone()))
        .on_drain(move |c| {
            d2.lock().unwrap().insert(c.id());
        })
        .on_message(|_, _| {})
        .start("127.0.0.1:0")
        .unwrap();
    Recorded {
        server,
        clients,
        drained,
    }
}

impl Recorded {
    /// Connect `s`'s client and return the server's handle on it.
    fn handle(&self, s: &TcpStream) -> Client {
        let addr = s.local_addr().unwrap();
        let t = Instant::now();
        loop {
            if let Some(c) = self
                .clients
                .lock()
                .unwrap()
                .iter()
                .find(|c| c.peer_addr() == addr)
            {
                return c.clone();
            }
            assert!(t.elapsed() < WAIT, "no Connect for {addr}");
            thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Each client's own limits small (a hard limit of about 129 KiB), so that
/// a budget of a few hundred KiB is the one in force (it is raised to at
/// least one client's hard limit).
fn small_client_limits() -> enjent::Builder<()> {
    WebSocketServer::builder()
        .max_message_size(64 * 1024)
        .high_water(64 * 1024)
        .low_water(16 * 1024)
        .max_backpressure(0)
}

/// A message of `size` bytes that starts with its number.
fn msg(i: u32, size: usize) -> Vec<u8> {
    numbered(i, size)
}

/// Read `count` binary frames numbered 0, 1, ... of `size` bytes from
/// `s`, on a thread; it returns how many it read in order before anything
/// else came, and the first thing that was not one of them.
fn read_in_order(mut s: TcpStream, count: u32, size: usize) -> thread::JoinHandle<(u32, String)> {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    thread::spawn(move || {
        for i in 0..count {
            match try_read_frame(&mut s) {
                Ok((0x82, p)) if p == msg(i, size) => {}
                Ok((first, p)) => return (i, describe(first, &p)),
                Err(e) => return (i, e.to_string()),
            }
        }
        (count, String::new())
    })
}

/// A crowd of clients that never read, each sent messages of its own by
/// several threads at once (the cheapest way to make a server hold
/// memory: no input at all). Without a server-wide budget each would hold
/// up to its own hard limit (1 MiB and more); with it, the queues together
/// stay within the budget and a share of it each. A client that reads,
/// sent as much meanwhile, is never refused; the crowd is, and once it
/// reads, each member gets exactly what was taken for it, in order, and a
/// `Drain`.
#[test]
fn a_crowd_that_never_reads_is_held_to_the_output_budget_and_a_reader_among_it_is_served() {
    let _serial = serial();
    within(Duration::from_secs(120), || {
        const BUDGET: usize = 2 << 20;
        const CROWD: usize = 40;
        const SIZE: usize = 8 * 1024;
        const WRITERS: usize = 4;
        const READER_MSGS: u32 = 2_000;
        let r = recorded(WebSocketServer::builder().max_queued_bytes(BUDGET));
        let addr = r.server.local_addr();
        let hard = r.server.config().max_backpressure() as u64;
        // The reader's window is as small as the crowd's: it differs only
        // in that it reads.
        let reader_sock = raw_ws_small_window(addr);
        let reader = r.handle(&reader_sock);
        let reading = read_in_order(reader_sock.try_clone().unwrap(), READER_MSGS, SIZE);
        let crowd: Vec<(TcpStream, Client)> = (0..CROWD)
            .map(|_| {
                let s = raw_ws_small_window(addr);
                let c = r.handle(&s);
                (s, c)
            })
            .collect();

        // The most the server's queues held at any moment, sampled.
        let stop = Arc::new(AtomicBool::new(false));
        let most = Arc::new(AtomicU64::new(0));
        let sampler = {
            let (stop, most, h) = (Arc::clone(&stop), Arc::clone(&most), r.server.handle());
            thread::spawn(move || {
                while !stop.load(Relaxed) {
                    most.fetch_max(h.stats().bytes_queued, Relaxed);
                    thread::sleep(Duration::from_millis(2));
                }
            })
        };

        // The reader is sent as much as it reads, from a thread of its own,
        // which lets its queue go down to 24 KiB before each message: it
        // holds less than its share of the budget (51 KiB), and is never
        // refused. (Which queues a share lets in is unit-tested in
        // `flow.rs`: here the kernel's buffers take most of what it is
        // sent.)
        let to_reader = {
            let c = reader.clone();
            thread::spawn(move || {
                for i in 0..READER_MSGS {
                    assert!(
                        eventually(WAIT, || c.buffered_amount() <= 24 * 1024),
                        "the reader's queue never went down"
                    );
                    if let Err(e) = c.send(msg(i, SIZE)) {
                        panic!("message {i} to the reader refused: {e}");
                    }
                }
            })
        };

        // Each writer sends to its share of the crowd, round after round,
        // until each of its members has been refused 20 times: with `send`
        // to half of them, and to the other half by publishing to a topic
        // each subscribes to alone (each publish a frame shared by one
        // queue, which must weigh on it as its own messages would).
        for (i, (_, c)) in crowd.iter().enumerate() {
            if i % 2 == 1 {
                assert!(c.subscribe(&format!("own-{i}")).unwrap());
            }
        }
        let writers: Vec<_> = (0..WRITERS)
            .map(|k| {
                let mine: Vec<(usize, Client)> = crowd
                    .iter()
                    .enumerate()
                    .skip(k)
                    .step_by(WRITERS)
                    .map(|(i, (_, c))| (i, c.clone()))
                    .collect();
                let h = r.server.handle();
                thread::spawn(move || {
                    let mut taken = vec![0u32; mine.len()];
                    let mut refused = vec![0u32; mine.len()];
                    let mut over_own_limit = 0;
                    let t = Instant::now();
                    while refused.iter().any(|&n| n < 20) {
                        assert!(t.elapsed() < Duration::from_secs(60), "never refused");
                        for (j, (i, c)) in mine.iter().enumerate() {
                            if i % 2 == 1 {
                                let b = h.publish(&format!("own-{i}"), msg(taken[j], SIZE));
                                match (b.written + b.queued, b.dropped, b.closed) {
                                    (1, 0, 0) => taken[j] += 1,
                                    (0, 1, 0) => refused[j] += 1,
                                    _ => panic!("publish to the crowd: {b:?}"),
                                }
                                continue;
                            }
                            match c.send(msg(taken[j], SIZE)) {
                                Ok(_) => taken[j] += 1,
                                Err(e) => match e.error() {
                                    Error::ServerBackpressure { .. } => refused[j] += 1,
                                    Error::Backpressure { .. } => {
                                        over_own_limit += 1;
                                        refused[j] += 1;
                                    }
                                    other => panic!("send to the crowd: {other}"),
                                },
                            }
                        }
                    }
                    (
                        mine.into_iter().map(|(_, c)| c).collect::<Vec<_>>(),
                        taken,
                        over_own_limit,
                    )
                })
            })
            .collect();
        let mut sent: Vec<(Client, u32)> = Vec::new();
        for w in writers {
            let (mine, taken, over_own_limit) = w.join().unwrap();
            assert_eq!(
                over_own_limit, 0,
                "the budget, not each client's own limit, refused the crowd"
            );
            sent.extend(mine.into_iter().zip(taken));
        }
        to_reader.join().unwrap();
        let (got, why) = reading.join().unwrap();
        assert_eq!(got, READER_MSGS, "the reader got all it was sent: {why}");
        stop.store(true, Relaxed);
        sampler.join().unwrap();

        let most = most.load(Relaxed);
        // The budget, then what each client under its share may still
        // take up to it (its share is the budget over 41 clients, at least
        // COUNTED_FROM), and a frame each; and the reader's 16 KiB.
        let n = CROWD as u64 + 1;
        let share = (BUDGET as u64 / n).max(COUNTED_FROM);
        let bound = BUDGET as u64 + n * (share + SIZE as u64 + 256) + 32 * 1024;
        let taken: u64 = sent.iter().map(|(_, n)| u64::from(*n)).sum();
        eprintln!(
            "the crowd took {taken} messages ({} B each), and queues held at most {most} B \
             (bound {bound}; each client's own hard limit {hard})",
            SIZE
        );
        assert!(
            most <= bound,
            "queues held {most} B, over the budget's bound of {bound}"
        );
        let st = r.server.stats();
        assert!(st.queued_budget_bytes > 0 && st.messages_dropped >= 20 * CROWD as u64);

        // Now the crowd reads: each gets what it was sent, in order, and a
        // Drain for the refusals.
        let taken_by_id: std::collections::HashMap<ClientId, u32> =
            sent.iter().map(|(c, n)| (c.id(), *n)).collect();
        let readers: Vec<_> = crowd
            .iter()
            .map(|(s, c)| {
                let n = taken_by_id[&c.id()];
                (c.id(), n, read_in_order(s.try_clone().unwrap(), n, SIZE))
            })
            .collect();
        for (id, n, rd) in readers {
            let (got, why) = rd.join().unwrap();
            assert_eq!(got, n, "crowd member {id:?}: {why}");
        }
        for (c, _) in &sent {
            assert!(
                eventually(WAIT, || r.drained.lock().unwrap().contains(&c.id())),
                "no Drain for {:?}",
                c.id()
            );
        }
        assert!(
            eventually(WAIT, || {
                let st = r.server.stats();
                st.queued_budget_bytes == 0 && st.bytes_queued == 0
            }),
            "something is still counted: {:?}",
            r.server.stats()
        );
        drop(crowd);
    });
}

/// A frame broadcast to many clients is one copy in memory, and the
/// budget counts it once: 30 clients that do not read are broadcast 16 KiB
/// frames until their queues (the kernel's buffers full) hold eight times
/// the budget together. None is refused, though counted per queue they
/// would be far over it; the budget counts about what a queue holds. Every
/// client gets every frame once it reads, and when all are written the
/// budget counts nothing (no frame outlived its queues).
#[test]
fn a_broadcast_to_many_slow_clients_counts_its_frame_once() {
    let _serial = serial();
    within(Duration::from_secs(90), || {
        const BUDGET: usize = 4 << 20;
        const CLIENTS: usize = 30;
        const SIZE: usize = 16 * 1024;
        let r = recorded(
            WebSocketServer::builder()
                .max_queued_bytes(BUDGET)
                .max_backpressure(4 << 20),
        );
        let addr = r.server.local_addr();
        let socks: Vec<TcpStream> = (0..CLIENTS)
            .map(|_| {
                let s = raw_ws_small_window(addr);
                r.handle(&s);
                s
            })
            .collect();
        let mut rounds = 0u32;
        while r.server.stats().bytes_queued < 8 * BUDGET as u64 {
            assert!(
                rounds < 4_000,
                "the queues never filled: {:?}",
                r.server.stats()
            );
            let b = r.server.broadcast(msg(rounds, SIZE));
            assert_eq!(
                (b.dropped, b.closed, b.written + b.queued),
                (0, 0, CLIENTS),
                "broadcast {rounds}: {b:?} ({:?})",
                r.server.stats()
            );
            rounds += 1;
        }
        let st = r.server.stats();
        eprintln!(
            "{rounds} broadcasts; queues hold {} B; the budget counts {} B",
            st.bytes_queued, st.queued_budget_bytes
        );
        assert!(
            st.queued_budget_bytes <= BUDGET as u64
                && st.queued_budget_bytes <= st.bytes_queued / 8,
            "each frame counted once: {st:?}"
        );
        let readers: Vec<_> = socks
            .iter()
            .map(|s| read_in_order(s.try_clone().unwrap(), rounds, SIZE))
            .collect();
        for (i, rd) in readers.into_iter().enumerate() {
            let (got, why) = rd.join().unwrap();
            assert_eq!(got, rounds, "client {i}: {why}");
        }
        assert!(
            eventually(WAIT, || {
                let st = r.server.stats();
                st.queued_budget_bytes == 0 && st.bytes_queued == 0
            }),
            "something is still counted: {:?}",
            r.server.stats()
        );
    });
}

/// Eight threads at once send, broadcast and publish, in sizes on both
/// sides of what the budget counts from, to clients that read, read
/// slowly, or never read and then leave, under a budget small enough that
/// it refuses some. When every client has gone, the budget counts nothing
/// and nothing is queued: every change of every queue was counted in and
/// out again, shared frames included.
#[test]
fn many_writers_at_once_with_clients_leaving_leave_the_budget_at_zero() {
    let _serial = serial();
    within(Duration::from_secs(90), || {
        const BUDGET: usize = 512 * 1024;
        let r = recorded(small_client_limits().max_queued_bytes(BUDGET));
        assert_eq!(r.server.config().max_queued_bytes(), BUDGET);
        let addr = r.server.local_addr();
        let topics = ["a", "b", "c"];
        let stop = Arc::new(AtomicBool::new(false));
        let mut socks = Vec::new();
        let mut readers = Vec::new();
        for i in 0..24 {
            let s = if i < 16 {
                raw_ws(addr)
            } else {
                raw_ws_small_window(addr)
            };
            let c = r.handle(&s);
            c.subscribe(topics[i % 3]).unwrap();
            if i < 16 {
                // Readers, half of them slow.
                let (mut rs, stop) = (s.try_clone().unwrap(), Arc::clone(&stop));
                let slow = i >= 8;
                rs.set_read_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                readers.push(thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match rs.read(&mut buf) {
                            Ok(0) => break,
                            Ok(_) => {}
                            Err(_) if !stop.load(Relaxed) => {}
                            Err(_) => break,
                        }
                        if slow {
                            thread::sleep(Duration::from_millis(3));
                        }
                    }
                }));
            }
            socks.push(s);
        }
        let refused = Arc::new(AtomicU64::new(0));
        let writers: Vec<_> = (0..8u64)
            .map(|k| {
                let (h, stop, refused) =
                    (r.server.handle(), Arc::clone(&stop), Arc::clone(&refused));
                let clients = r.clients.lock().unwrap().clone();
                thread::spawn(move || {
                    let mut rng = Rng::new(k + 1);
                    while !stop.load(Relaxed) {
                        let size = 1 + rng.below(40 * 1024) as usize;
                        let body = vec![k as u8; size];
                        match k {
                            0..=3 => {
                                let c = &clients[rng.below(clients.len() as u64) as usize];
                                match c.send(body) {
                                    Ok(_) => {}
                                    // Its own limit, or the budget: only the
                                    // budget's refusals are counted.
                                    Err(e) if matches!(e.error(), Error::Backpressure { .. }) => {}
                                    Err(e)
                                        if matches!(
                                            e.error(),
                                            Error::ServerBackpressure { .. }
                                        ) =>
                                    {
                                        refused.fetch_add(1, Relaxed);
                                    }
                                    Err(e) if matches!(e.error(), Error::Closed) => {}
                                    Err(e) => panic!("send: {e}"),
                                }
                            }
                            4 | 5 => {
                                h.broadcast(body);
                            }
                            _ => {
                                h.publish(["a", "b", "c"][rng.below(3) as usize], body);
                            }
                        }
                    }
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(1500));
        // The non-readers leave, with full queues.
        for s in socks.drain(16..) {
            drop(s);
        }
        thread::sleep(Duration::from_millis(1500));
        stop.store(true, Relaxed);
        for w in writers {
            w.join().unwrap();
        }
        let st = r.server.stats();
        eprintln!(
            "{} sends refused for the budget; {} messages out; budget counts {} B",
            refused.load(Relaxed),
            st.messages_out,
            st.queued_budget_bytes
        );
        assert!(
            refused.load(Relaxed) > 0,
            "the budget refused nothing: {st:?}"
        );
        // Readers read what is left, then everyone leaves.
        for s in &socks {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        for rd in readers {
            rd.join().unwrap();
        }
        drop(socks);
        assert!(
            eventually(WAIT, || {
                let st = r.server.stats();
                st.connections == 0 && st.queued_budget_bytes == 0 && st.bytes_queued == 0
            }),
            "something is still counted: {:?}",
            r.server.stats()
        );
    });
}

/// Fill the queues of `crowd` (which do not read) with `size`-byte
/// messages until the budget refuses each of them.
fn fill_until_refused(crowd: &[Client], size: usize) -> Vec<u32> {
    let mut taken = vec![0u32; crowd.len()];
    let mut done = vec![false; crowd.len()];
    let t = Instant::now();
    while done.iter().any(|d| !d) {
        assert!(t.elapsed() < WAIT, "the budget never refused");
        for (j, c) in crowd.iter().enumerate() {
            if done[j] {
                continue;
            }
            match c.send(msg(taken[j], size)) {
                Ok(_) => taken[j] += 1,
                Err(e) if matches!(e.error(), Error::ServerBackpressure { .. }) => done[j] = true,
                Err(e) => panic!("send: {e}"),
            }
        }
    }
    taken
}

/// `send_timeout` to a client refused for the budget waits (without
/// spinning), and succeeds once others have let go of enough (here, by
/// leaving).
#[test]
fn send_timeout_waits_for_the_budget_and_succeeds_when_others_let_go() {
    let _serial = serial();
    within(Duration::from_secs(60), || {
        const BUDGET: usize = 256 * 1024;
        const SIZE: usize = 8 * 1024;
        let r = recorded(small_client_limits().max_queued_bytes(BUDGET));
        assert_eq!(r.server.config().max_queued_bytes(), BUDGET);
        let addr = r.server.local_addr();
        let socks: Vec<TcpStream> = (0..12).map(|_| raw_ws_small_window(addr)).collect();
        let crowd: Vec<Client> = socks.iter().map(|s| r.handle(s)).collect();
        let taken = fill_until_refused(&crowd, SIZE);
        let target = crowd[0].clone();
        let n = taken[0];
        let waiter = thread::spawn(move || {
            let t = Instant::now();
            let result = target.send_timeout(msg(n, SIZE), Duration::from_secs(30));
            (result.map_err(|e| e.to_string()), t.elapsed())
        });
        // It waits without spinning: a retry loop would burn the 500 ms.
        #[cfg(target_os = "linux")]
        let before = cpu_ticks();
        thread::sleep(Duration::from_millis(500));
        assert!(!waiter.is_finished(), "send_timeout did not wait");
        #[cfg(target_os = "linux")]
        {
            let spent = cpu_ticks() - before;
            assert!(spent <= 15, "{spent} ticks of CPU in 50 while it waited");
        }
        // The others leave, and their queues with them.
        let mut socks = socks;
        let first = socks.remove(0);
        drop(socks);
        let (result, waited) = waiter.join().unwrap();
        assert!(result.is_ok(), "{result:?} after {waited:?}");
        assert!(waited >= Duration::from_millis(450), "{waited:?}");
        let (got, why) = read_in_order(first, n + 1, SIZE).join().unwrap();
        assert_eq!(got, n + 1, "{why}");
    });
}

/// Under the `Close` policy, a client the budget refuses is closed with
/// 1008, after what was queued before it.
#[test]
fn under_the_close_policy_a_client_refused_for_the_budget_is_closed_with_1008() {
    let _serial = serial();
    within(Duration::from_secs(60), || {
        const BUDGET: usize = 256 * 1024;
        const SIZE: usize = 8 * 1024;
        let r = recorded(
            small_client_limits()
                .max_queued_bytes(BUDGET)
                .slow_client_policy(SlowClientPolicy::Close)
                .close_timeout(Duration::from_secs(30)),
        );
        assert_eq!(r.server.config().max_queued_bytes(), BUDGET);
        let addr = r.server.local_addr();
        let socks: Vec<TcpStream> = (0..12).map(|_| raw_ws_small_window(addr)).collect();
        let crowd: Vec<Client> = socks.iter().map(|s| r.handle(s)).collect();
        let taken = fill_until_refused(&crowd, SIZE);
        let closes = r.server.stats().backpressure_closes;
        assert_eq!(closes, crowd.len() as u64, "each refused client is closing");
        for (s, n) in socks.into_iter().zip(taken) {
            let mut s = s;
            let (got, why) = {
                let h = read_in_order(s.try_clone().unwrap(), n, SIZE);
                h.join().unwrap()
            };
            assert_eq!(got, n, "{why}");
            s.set_read_timeout(Some(WAIT)).unwrap();
            assert_eq!(read_close(&mut s), Some(1008));
        }
    });
}

/// A client whose replies the budget refuses is not read on: once a send
/// to it is refused, it is paused until its queue is down to low water,
/// as a client over high water is. Clients that pipeline without reading
/// (their share of the budget, 21 KiB, under high water, 64 KiB) would
/// otherwise have their input read and their replies refused as fast as
/// they send.
#[test]
fn a_client_refused_for_the_budget_is_not_read_on() {
    let _serial = serial();
    within(Duration::from_secs(60), || {
        const BUDGET: usize = 256 * 1024;
        const CROWD: usize = 12;
        let refused = Arc::new(AtomicU64::new(0));
        let r2 = Arc::clone(&refused);
        // Low water at its default, 32 KiB, over the 16 KiB the budget
        // counts from: a client refused between the two must pause too.
        let server = small_client_limits()
            .low_water(32 * 1024)
            .max_queued_bytes(BUDGET)
            .workers(2)
            .ping_interval(None)
            .on_message(move |c, m| {
                if let Err(e) = c.send(m)
                    && e.error().is_backpressure()
                {
                    r2.fetch_add(1, Relaxed);
                }
            })
            .start("127.0.0.1:0")
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..CROWD)
            .map(|_| {
                let s = raw_ws_small_window(server.local_addr());
                let stop = Arc::clone(&stop);
                thread::spawn(move || {
                    let mut w = s.try_clone().unwrap();
                    w.set_write_timeout(Some(Duration::from_millis(500)))
                        .unwrap();
                    let burst: Vec<u8> = (0..16).flat_map(|_| frame(0x82, &[5u8; 1024])).collect();
                    while !stop.load(Relaxed) {
                        if std::io::Write::write_all(&mut w, &burst).is_err() {
                            // The server stopped reading: wait, and try on.
                            thread::sleep(Duration::from_millis(50));
                        }
                    }
                    s
                })
            })
            .collect();
        assert!(
            eventually(Duration::from_secs(20), || refused.load(Relaxed) > 0),
            "the budget never refused a reply: {:?}",
            server.stats()
        );
        thread::sleep(Duration::from_secs(2));
        let before = server.stats().bytes_in;
        thread::sleep(Duration::from_secs(2));
        let st = server.stats();
        let read = st.bytes_in - before;
        stop.store(true, Relaxed);
        let socks: Vec<TcpStream> = writers.into_iter().map(|w| w.join().unwrap()).collect();
        eprintln!(
            "{} replies refused; {read} B read in the last 2 s; {} read pauses",
            refused.load(Relaxed),
            st.read_pauses
        );
        assert!(
            read < 4 << 20,
            "{read} B of the crowd's input read in 2 s after the budget refused it"
        );
        drop(socks);
    });
}

/// Clients refused for the budget while each holds far less than half of
/// high water dispatch no message after their refused one: the read gate,
/// which a job passes without the connection's lock while its client
/// holds less than half of high water, is looked at under it again after
/// any refusal, and pauses the client (its queue is over low water). Each
/// of 8 clients pipelines 4 MiB of 1 KiB messages and reads nothing; the
/// budget (at least the hard limit, about 8 MiB) shared by 8 refuses each
/// at about 1 MiB, a quarter of half of high water.
#[test]
fn clients_refused_far_under_high_water_dispatch_nothing_after() {
    let _serial = serial();
    within(Duration::from_secs(60), || {
        const CROWD: usize = 8;
        let refused: Arc<Mutex<HashSet<ClientId>>> = Arc::default();
        let after = Arc::new(AtomicU64::new(0));
        let (r2, a2) = (Arc::clone(&refused), Arc::clone(&after));
        let server = WebSocketServer::builder()
            .max_message_size(64 * 1024)
            .high_water(8 << 20)
            .low_water(16 * 1024)
            .max_queued_bytes(1)
            // Nothing grows under the test: the queue, once the kernel's
            // few KiB are full, stays as it is.
            .kernel_send_buffer(Some(4096))
            .workers(2)
            .ping_interval(None)
            .on_message(move |c, m| {
                if r2.lock().unwrap().contains(&c.id()) {
                    a2.fetch_add(1, Relaxed);
                }
                if let Err(e) = c.send(m)
                    && e.error().is_backpressure()
                {
                    r2.lock().unwrap().insert(c.id());
                }
            })
            .start("127.0.0.1:0")
            .unwrap();
        let addr = server.local_addr();
        let writers: Vec<_> = (0..CROWD)
            .map(|_| {
                let s = raw_ws_small_window(addr);
                let mut w = s.try_clone().unwrap();
                w.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
                thread::spawn(move || {
                    let all: Vec<u8> = (0..4096).flat_map(|_| frame(0x82, &[7u8; 1024])).collect();
                    // The server stops reading: the write ends at its
                    // timeout.
                    let _ = std::io::Write::write_all(&mut w, &all);
                    s
                })
            })
            .collect();
        assert!(
            eventually(Duration::from_secs(20), || refused.lock().unwrap().len()
                >= CROWD / 2),
            "the budget refused {} clients: {:?}",
            refused.lock().unwrap().len(),
            server.stats()
        );
        // Long enough for thousands of messages, were they read on.
        thread::sleep(Duration::from_secs(1));
        let st = server.stats();
        eprintln!(
            "{} clients refused, {} messages dispatched after their refusals; {} in, {} read pauses",
            refused.lock().unwrap().len(),
            after.load(Relaxed),
            st.messages_in,
            st.read_pauses
        );
        assert_eq!(
            after.load(Relaxed),
            0,
            "messages dispatched after a refusal, the queue over low water"
        );
        let socks: Vec<TcpStream> = writers.into_iter().map(|w| w.join().unwrap()).collect();
        drop(socks);
    });
}
