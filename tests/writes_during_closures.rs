//! What is queued to a client while one of its own closures runs long
//! goes out as the client reads, not at the closure's end: the socket
//! takes only so much at once, and the rest must not wait for the closure.
//! A serial lock keeps the tests from competing for the CPUs.

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use enjent::{Client, CloseCode, WebSocketServer};
use support::*;

static SERIAL: Mutex<()> = Mutex::new(());

const SIZE: usize = 64 * 1024;

/// Closures held by a test: how many are in, and the flag that lets them
/// go, set when dropped (so that a failing test does not leave the
/// server's drop waiting for them).
struct Hold {
    _release: Release,
    inside: Arc<AtomicUsize>,
    entered: Receiver<()>,
}

impl Hold {
    /// Wait until one more closure is held.
    fn entered(&self) {
        self.entered
            .recv_timeout(WAIT)
            .expect("the closure to start");
    }
}

/// A server whose `on_message` holds its worker on "hold" until released,
/// and which hands each client's handle to the returned receiver.
fn holding_server(workers: usize, hard_limit: usize) -> (WebSocketServer, Hold, Receiver<Client>) {
    let release = Arc::new(AtomicBool::new(false));
    let inside = Arc::new(AtomicUsize::new(0));
    let (entered_tx, entered) = channel();
    let (clients_tx, clients) = channel::<Client>();
    let (r, i, e, c) = (
        Arc::clone(&release),
        Arc::clone(&inside),
        Mutex::new(entered_tx),
        Mutex::new(clients_tx),
    );
    let server = WebSocketServer::builder()
        .workers(workers)
        .max_backpressure(hard_limit)
        .close_timeout(Duration::from_secs(3))
        .on_connect(move |client| {
            client.subscribe("t").unwrap();
            c.lock().unwrap().send(client.clone()).unwrap();
        })
        .on_message(move |client, m| {
            if m.as_text() == Some("nap") {
                thread::sleep(Duration::from_millis(5));
            }
            if m.as_text() == Some("reply, then hold") {
                // Corked: the closure's own send waits for its pass's
                // end, or for another thread's send to take it along.
                client.send("reply").unwrap();
            }
            if m.as_text().is_some_and(|t| t.ends_with("hold")) {
                stay_until(&r, &i, || {
                    let _ = e.lock().unwrap().send(());
                });
            }
        })
        .start("127.0.0.1:0")
        .unwrap();
    let hold = Hold {
        _release: Release(release),
        inside,
        entered,
    };
    (server, hold, clients)
}

/// Open `count` clients (through 4 KiB windows if `small_window`), send
/// each the text `first` and wait until the closure it starts is held:
/// from then on its job holds the client. Each socket with its handle.
fn held_clients(
    server: &WebSocketServer,
    hold: &Hold,
    handles: &Receiver<Client>,
    count: usize,
    first: &[u8],
    small_window: bool,
) -> Vec<(TcpStream, Client)> {
    (0..count)
        .map(|_| {
            let mut s = if small_window {
                raw_ws_small_window(server.local_addr())
            } else {
                raw_ws(server.local_addr())
            };
            let client = handles.recv_timeout(WAIT).unwrap();
            s.write_all(&frame(0x81, first)).unwrap();
            hold.entered();
            (s, client)
        })
        .collect()
}

/// Sets its flag when dropped: a closure held on the flag is let go
/// however a test ends, or the server's drop would wait for ever.
struct Release(Arc<AtomicBool>);

impl Drop for Release {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Hold the closure calling it until `release` is set, counted in
/// `inside` meanwhile; `entered` runs once it is counted.
fn stay_until(release: &AtomicBool, inside: &AtomicUsize, entered: impl FnOnce()) {
    inside.fetch_add(1, Ordering::SeqCst);
    entered();
    while !release.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(5));
    }
    inside.fetch_sub(1, Ordering::SeqCst);
}

/// Read `count` binary messages numbered in order (see `numbered`),
/// starting at `from`.
fn read_numbered(s: &mut TcpStream, from: u32, count: u32) {
    for i in from..from + count {
        let (first, p) = read_frame(s);
        assert_eq!(first, 0x82, "message {i}");
        assert!(p == numbered(i, SIZE), "message {i} out of order");
    }
}

/// Send `count` numbered messages with `send_timeout`; how many were not
/// sent (all from the first refusal on).
fn produce(client: &Client, count: u32) -> u32 {
    for i in 0..count {
        if client
            .send_timeout(numbered(i, SIZE), Duration::from_secs(5))
            .is_err()
        {
            return count - i;
        }
    }
    0
}

/// Eight clients, each held in its own closure, and a producer thread per
/// client sending it 8 MiB with `send_timeout` (past what the socket and
/// the 1.1 MiB hard limit hold, so each producer must wait for room) while
/// its client reads through a 4 KiB window. Every send succeeds and every
/// client gets all of its messages, in order, while all eight closures
/// are still held. Before, the room a reading client made was written only
/// at its closure's end: the producers' sends timed out.
#[test]
fn send_timeout_from_other_threads_flows_while_the_clients_closures_are_held() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const CLIENTS: usize = 8;
    // 8 MiB each: past what the server's socket takes (Linux's send
    // buffer grows to 4 MiB by default) and the hard limit together.
    const COUNT: u32 = 128;
    // A worker for each held closure, and two for everything else.
    let (server, hold, handles) = holding_server(CLIENTS + 2, 1 << 20);
    let mut readers = Vec::new();
    let mut producers = Vec::new();
    for (mut s, client) in held_clients(&server, &hold, &handles, CLIENTS, b"hold", true) {
        producers.push(thread::spawn(move || produce(&client, COUNT)));
        readers.push(thread::spawn(move || {
            // Not reading at first: the queue fills to the hard limit.
            thread::sleep(Duration::from_millis(500));
            read_numbered(&mut s, 0, COUNT);
            s
        }));
    }
    let refused: Vec<u32> = producers.into_iter().map(|p| p.join().unwrap()).collect();
    let _sockets: Vec<_> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    assert_eq!(refused, vec![0; CLIENTS], "sends refused per client");
    // Everything arrived with every closure still held.
    assert_eq!(hold.inside.load(Ordering::SeqCst), CLIENTS);
}

/// The socket is already full when the client's closure starts, with
/// some queued behind it (under high water, so the client is still read):
/// the job's own flush before the closure finds the socket full. The rest
/// still goes out as the client reads, while the closure is held: the
/// poller reports the room the client makes, and a worker writes it.
/// (A first version woke a writer only for other threads' flushes; this
/// stalled.)
#[test]
fn a_backlog_queued_before_a_closure_flows_while_it_is_held() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (server, hold, handles) = holding_server(4, 1 << 20);
    let mut s = raw_ws_small_window(server.local_addr());
    let client = handles.recv_timeout(WAIT).unwrap();
    // Fill the socket, then queue a little behind it.
    let mut sent = 0;
    while client.buffered_amount() == 0 {
        assert!(sent < 256, "the socket took 16 MiB");
        client.send(numbered(sent, SIZE)).unwrap();
        sent += 1;
        // Apart, so that no send is left for a deferred flush (sends in a
        // burst from a thread outside the pool are).
        thread::sleep(Duration::from_millis(1));
    }
    client.send(numbered(sent, SIZE)).unwrap();
    sent += 1;
    s.write_all(&frame(0x81, b"hold")).unwrap();
    hold.entered();
    assert!(client.buffered_amount() > 0);
    read_numbered(&mut s, 0, sent);
    assert_eq!(hold.inside.load(Ordering::SeqCst), 1);
}

/// A close from another thread while the client's closure is held, with
/// more queued before it (8 MiB) than the socket takes at once: the
/// client, reading through a 4 KiB window, gets every message and the
/// close frame while the closure is still held. Before, what the socket
/// did not take waited for the closure's end: nothing more arrived (the
/// read timed out here; a closure that ended past the close's deadline
/// gave end of stream, the rest undelivered).
#[test]
fn a_close_during_a_held_closure_delivers_more_than_the_socket_holds() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // 8 MiB: more than the server's socket takes.
    const COUNT: u32 = 128;
    let (server, hold, handles) = holding_server(4, 16 << 20);
    let mut s = raw_ws_small_window(server.local_addr());
    let client = handles.recv_timeout(WAIT).unwrap();
    s.write_all(&frame(0x81, b"hold")).unwrap();
    hold.entered();
    for i in 0..COUNT {
        client.send(numbered(i, SIZE)).unwrap();
    }
    client.close(CloseCode::new(4000), "bye").unwrap();
    assert!(client.buffered_amount() > 0, "the socket took it all");
    thread::sleep(Duration::from_millis(300));
    read_numbered(&mut s, 0, COUNT);
    let (first, p) = read_frame(&mut s);
    assert_eq!(first, 0x88);
    assert_eq!(p, close_payload(4000, "bye"));
    assert_eq!(hold.inside.load(Ordering::SeqCst), 1);
    s.write_all(&frame(0x88, &close_payload(4000, ""))).unwrap();
    drop(hold);
    assert!(closed_by_server(&mut s));
}

/// Small sends (far under the 64 KiB cork) from other threads reach
/// eight clients while each one's own closure is held, each thread
/// sending to its client one at a time; the frame a closure sent itself
/// before it blocked comes first. Before, a send from another thread while
/// the client's job was running was corked to the job's end: nothing
/// arrived until the closures were let go (the reads timed out).
#[test]
fn small_sends_from_other_threads_arrive_while_the_clients_closure_is_held() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const CLIENTS: usize = 8;
    const COUNT: u32 = 50;
    let (server, hold, handles) = holding_server(CLIENTS + 2, 1 << 20);
    let peers = held_clients(
        &server,
        &hold,
        &handles,
        CLIENTS,
        b"reply, then hold",
        false,
    );
    let threads: Vec<_> = peers
        .into_iter()
        .map(|(mut s, client)| {
            thread::spawn(move || {
                for i in 0..COUNT {
                    client.send(format!("m{i}")).unwrap();
                    if i == 0 {
                        // Corked until now (the job's own sends wait for
                        // its pass's end): this send takes it along.
                        let (first, p) = read_frame(&mut s);
                        assert_eq!(
                            (first, &p[..]),
                            (0x81, &b"reply"[..]),
                            "the closure's own frame first"
                        );
                    }
                    // Each read before the next send: nothing here waits
                    // for anything but this one frame.
                    read_texts_from(&mut s, "m", i, 1);
                }
                s
            })
        })
        .collect();
    let _sockets: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(
        hold.inside.load(Ordering::SeqCst),
        CLIENTS,
        "every closure is still held"
    );
}

/// Read `count` text frames, `{prefix}{i}` for i from `from` on, in order.
fn read_texts_from(s: &mut TcpStream, prefix: &str, from: u32, count: u32) {
    for i in from..from + count {
        let (first, p) = read_frame(s);
        assert_eq!(first, 0x81, "{prefix}{i}");
        assert_eq!(String::from_utf8_lossy(&p), format!("{prefix}{i}"));
    }
}

/// Publishes and broadcasts from the test's thread reach eight subscribers
/// while each one's own closure is held: 20 of each, interleaved, every
/// one in order at every subscriber. Before, each waited for its
/// subscriber's closure to end.
#[test]
fn publishes_and_broadcasts_reach_clients_whose_closures_are_held() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const CLIENTS: usize = 8;
    let (server, hold, handles) = holding_server(CLIENTS + 2, 1 << 20);
    let mut sockets: Vec<_> = held_clients(&server, &hold, &handles, CLIENTS, b"hold", false)
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    for i in 0..20 {
        let p = server.publish("t", format!("p{i}"));
        assert_eq!(p.queued + p.written, CLIENTS, "publish {i}: {p:?}");
        let b = server.broadcast(format!("b{i}"));
        assert_eq!(b.queued + b.written, CLIENTS, "broadcast {i}: {b:?}");
    }
    for s in &mut sockets {
        for i in 0..20 {
            read_texts_from(s, "p", i, 1);
            read_texts_from(s, "b", i, 1);
        }
    }
    assert_eq!(
        hold.inside.load(Ordering::SeqCst),
        CLIENTS,
        "every closure is still held"
    );
}

/// A send from another thread while the client's `on_connect` is held
/// arrives after the `101`, before `on_connect` returns.
#[test]
fn a_send_during_a_held_on_connect_arrives_at_once() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let release = Arc::new(AtomicBool::new(false));
    let inside = Arc::new(AtomicUsize::new(0));
    let (clients_tx, clients) = channel::<Client>();
    let (r, i, c) = (
        Arc::clone(&release),
        Arc::clone(&inside),
        Mutex::new(clients_tx),
    );
    let server = WebSocketServer::builder()
        .workers(2)
        .on_connect(move |client| {
            stay_until(&r, &i, || c.lock().unwrap().send(client.clone()).unwrap());
        })
        .start("127.0.0.1:0")
        .unwrap();
    let _release = Release(Arc::clone(&release));
    let mut s = raw_ws(server.local_addr());
    let client = clients.recv_timeout(WAIT).unwrap();
    client.send("m0").unwrap();
    read_texts_from(&mut s, "m", 0, 1);
    assert!(
        inside.load(Ordering::SeqCst) == 1,
        "on_connect is still held"
    );
}

/// A ping and then a message whose closure blocks, in one write: the
/// pong comes while the closure is held (a peer that times its pings
/// would otherwise give up on the connection). Before, the job's pong was
/// corked to its pass's end, behind the closure.
#[test]
fn a_pong_is_not_held_behind_a_closure_in_the_same_read() {
    pongs_while_held(
        &[(0x89, b"are you there"), (0x81, b"hold")],
        &[b"are you there"],
    );
}

/// Write `frames` (the last a "hold") to a holding server in one write,
/// and read `pongs` while the closure is still held.
fn pongs_while_held(frames: &[(u8, &[u8])], pongs: &[&[u8]]) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (server, hold, handles) = holding_server(2, 1 << 20);
    let mut s = raw_ws(server.local_addr());
    handles.recv_timeout(WAIT).unwrap();
    let all: Vec<u8> = frames.iter().flat_map(|(op, p)| frame(*op, p)).collect();
    s.write_all(&all).unwrap();
    hold.entered();
    for ping in pongs {
        let (first, p) = read_frame(&mut s);
        assert_eq!((first, &p[..]), (0x8A, *ping));
    }
    assert_eq!(
        hold.inside.load(Ordering::SeqCst),
        1,
        "the closure is still held"
    );
}

/// The crowd version of the close above: eight clients, each held in its
/// own closure, each sent 8 MiB and then closed by its own thread, all at
/// once; each client starts reading, through a 4 KiB window, once its
/// close is queued. Every client gets every message and its close frame
/// while all eight closures are still held, and all are gone once they
/// answer and are let go.
#[test]
fn closes_of_a_crowd_held_in_closures_deliver_everything_queued_before_them() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const CLIENTS: usize = 8;
    // 8 MiB each: more than the server's socket takes.
    const COUNT: u32 = 128;
    let (server, hold, handles) = holding_server(CLIENTS + 2, 16 << 20);
    let peers = held_clients(&server, &hold, &handles, CLIENTS, b"hold", true);
    let threads: Vec<_> = peers
        .into_iter()
        .enumerate()
        .map(|(n, (mut s, client))| {
            let closer = thread::spawn(move || {
                for i in 0..COUNT {
                    client.send(numbered(i, SIZE)).unwrap();
                }
                client
                    .close(CloseCode::new(4000 + n as u16), "bye")
                    .unwrap();
                assert!(client.buffered_amount() > 0, "the socket took it all");
            });
            thread::spawn(move || {
                // What the socket did not take is all queued by now.
                closer.join().unwrap();
                read_numbered(&mut s, 0, COUNT);
                let (first, p) = read_frame(&mut s);
                assert_eq!(first, 0x88, "client {n}");
                assert_eq!(p, close_payload(4000 + n as u16, "bye"), "client {n}");
                s
            })
        })
        .collect();
    let mut sockets: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(
        hold.inside.load(Ordering::SeqCst),
        CLIENTS,
        "every closure is still held"
    );
    for s in &mut sockets {
        s.write_all(&frame(0x88, &close_payload(4000, ""))).unwrap();
    }
    // Each job reads its client's answer once its closure returns.
    drop(hold);
    assert!(eventually(WAIT, || server.stats().connections == 0));
}

/// A client interleaving pings with messages, 5,000 pairs in one write,
/// to an echo closure: every pong and every echo comes back, each pong
/// before its pair's echo (a pong is flushed before a closure at most
/// once a millisecond, and the rest cork: see `bench/pingflood.py` for
/// the cost).
#[test]
fn pings_interleaved_with_messages_are_all_answered_in_order() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const PAIRS: u32 = 5_000;
    let server = WebSocketServer::builder()
        .on_message(|client, m| {
            client.send(m).unwrap();
        })
        .start("127.0.0.1:0")
        .unwrap();
    let mut s = raw_ws(server.local_addr());
    let mut all = Vec::new();
    for i in 0..PAIRS {
        all.extend(frame(0x89, format!("p{i}").as_bytes()));
        all.extend(frame(0x81, format!("m{i}").as_bytes()));
    }
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || w.write_all(&all).unwrap());
    for i in 0..PAIRS {
        let (first, p) = read_frame(&mut s);
        assert_eq!((first, p), (0x8A, format!("p{i}").into_bytes()), "pong {i}");
        let (first, p) = read_frame(&mut s);
        assert_eq!((first, p), (0x81, format!("m{i}").into_bytes()), "echo {i}");
    }
    writer.join().unwrap();
}

/// A send from another thread while the client's `on_drain` is held (the
/// only closure of a server otherwise in the main-loop style) arrives at
/// once.
#[test]
fn a_send_during_a_held_on_drain_arrives_at_once() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let release = Arc::new(AtomicBool::new(false));
    let inside = Arc::new(AtomicUsize::new(0));
    let (r, i) = (Arc::clone(&release), Arc::clone(&inside));
    let server = WebSocketServer::builder()
        .workers(2)
        .max_backpressure(1 << 20)
        .on_drain(move |_| stay_until(&r, &i, || ()))
        .start("127.0.0.1:0")
        .unwrap();
    let _release = Release(Arc::clone(&release));
    let mut s = raw_ws_small_window(server.local_addr());
    let client = expect_connect(&server);
    // Until refused: the queue is past the hard limit.
    let mut sent = 0;
    while client.send(numbered(sent, SIZE)).is_ok() {
        sent += 1;
        assert!(sent < 1024, "never refused");
    }
    // Reading it all brings the queue under low water: on_drain runs.
    read_numbered(&mut s, 0, sent);
    assert!(
        eventually(WAIT, || inside.load(Ordering::SeqCst) == 1),
        "on_drain ran"
    );
    client.send("after").unwrap();
    let (first, p) = read_frame(&mut s);
    assert_eq!((first, &p[..]), (0x81, &b"after"[..]));
    assert!(inside.load(Ordering::SeqCst) == 1, "on_drain is still held");
}

/// Two pings, each before a message, in one write: the first message's
/// closure takes 5 ms and the second's blocks. Both pongs come while the
/// second is held: a pong is flushed before a closure once a millisecond,
/// not once a pass (a first version held the second behind the closure).
#[test]
fn a_second_pong_in_the_same_read_is_not_held_behind_a_later_closure() {
    pongs_while_held(
        &[
            (0x89, b"one"),
            (0x81, b"nap"),
            (0x89, b"two"),
            (0x81, b"hold"),
        ],
        &[b"one", b"two"],
    );
}

/// The cheapest harm the pong flush invites, by a crowd: sixteen clients
/// each write 2,000 pairs of ping and message at once to an echo closure,
/// beside a client echoing one message at a time. Every flooder gets
/// every pong and echo in order, and the plain client all of its echoes.
#[test]
fn a_crowd_interleaving_pings_with_messages_is_answered_in_full_beside_a_plain_client() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const CROWD: usize = 16;
    const PAIRS: u32 = 2_000;
    let server = WebSocketServer::builder()
        .on_message(|client, m| {
            client.send(m).unwrap();
        })
        .start("127.0.0.1:0")
        .unwrap();
    let mut all = Vec::new();
    for i in 0..PAIRS {
        all.extend(frame(0x89, format!("p{i}").as_bytes()));
        all.extend(frame(0x81, format!("m{i}").as_bytes()));
    }
    let all = Arc::new(all);
    let crowd: Vec<_> = (0..CROWD)
        .map(|n| {
            let mut s = raw_ws(server.local_addr());
            let (mut w, all) = (s.try_clone().unwrap(), Arc::clone(&all));
            thread::spawn(move || {
                let writer = thread::spawn(move || w.write_all(&all).unwrap());
                for i in 0..PAIRS {
                    let (first, p) = read_frame(&mut s);
                    assert_eq!(
                        (first, p),
                        (0x8A, format!("p{i}").into_bytes()),
                        "{n}: pong {i}"
                    );
                    let (first, p) = read_frame(&mut s);
                    assert_eq!(
                        (first, p),
                        (0x81, format!("m{i}").into_bytes()),
                        "{n}: echo {i}"
                    );
                }
                writer.join().unwrap();
            })
        })
        .collect();
    let mut plain = raw_ws(server.local_addr());
    for i in 0..200 {
        let text = format!("plain {i}");
        plain.write_all(&frame(0x81, text.as_bytes())).unwrap();
        let (first, p) = read_frame(&mut plain);
        assert_eq!((first, p), (0x81, text.into_bytes()));
    }
    for c in crowd {
        c.join().unwrap();
    }
}
