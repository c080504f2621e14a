//! Many writers at once on the paths made fast (small frames gathered,
//! buffers reused, deferred flushes): what the peer gets is counted, byte
//! for byte, against what each send was told.

mod support;

use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use enjent::{Event, Message, WebSocketServer};
use support::*;

const SENDERS: u8 = 6;
const PER_SENDER: u32 = 1_500;
const ECHO_TAG: u8 = 100;
const ECHOES: u32 = 1_500;

/// Size of message `seq` of sender `t`: around the gathering's limit
/// (125/126), around the decoders' spare (256), and now and then 64 KiB;
/// sender 0 also sends empty text messages.
fn size_of(t: u8, seq: u32) -> usize {
    const SIZES: [usize; 12] = [1, 2, 124, 125, 126, 127, 255, 256, 257, 3000, 5, 0];
    if seq % 97 == 96 {
        return 65_536;
    }
    let s = SIZES[(mix((u64::from(t) << 32) | u64::from(seq)) % SIZES.len() as u64) as usize];
    if s == 0 && t != 0 { 1 } else { s }
}

/// (opcode, payload) of message `seq` of sender `t`: its tag first, then
/// bytes from both. Text for odd `seq` (ASCII), binary for even.
fn message_of(t: u8, seq: u32) -> (u8, Vec<u8>) {
    let size = size_of(t, seq);
    let text = seq % 2 == 1 || size == 0;
    let mut p = Vec::with_capacity(size);
    if size > 0 {
        p.push(t);
    }
    let mut k = 1u32;
    while p.len() < size {
        let b = (seq.wrapping_mul(131) ^ k.wrapping_mul(7) ^ (u32::from(t) * 29)) as u8;
        p.push(if text { b'a' + b % 26 } else { b });
        k += 1;
    }
    if size >= 5 {
        p[1..5].copy_from_slice(&seq.to_be_bytes());
        if text {
            for b in &mut p[1..5] {
                *b = b'A' + (*b % 26);
            }
        }
    }
    (if text { 0x81 } else { 0x82 }, p)
}

fn to_message(op: u8, p: Vec<u8>) -> Message {
    if op == 0x81 {
        Message::Text(String::from_utf8(p).unwrap())
    } else {
        Message::Binary(p)
    }
}

fn frame_len(payload: usize) -> u64 {
    (payload
        + if payload < 126 {
            2
        } else if payload <= 0xFFFF {
            4
        } else {
            10
        }) as u64
}

/// Six threads send to one client of a main loop (sizes 0, 1, 125, 126,
/// 256, 257, 64 KiB mixed, text and binary) while it reads slowly and
/// pipelines requests the loop echoes: every frame arrives whole, in each
/// sender's order; a refusal hands back the message intact; and the stats
/// (messages and bytes out, dropped) are exact.
#[test]
fn many_senders_to_one_main_loop_client_lose_nothing_and_count_exactly() {
    many_senders(WebSocketServer::builder(), false);
}

#[test]
fn many_senders_to_one_closure_client_lose_nothing_and_count_exactly() {
    many_senders(WebSocketServer::builder(), true);
}

#[test]
fn many_senders_small_marks_main_loop() {
    many_senders(
        WebSocketServer::builder()
            .high_water(8 << 10)
            .low_water(2 << 10)
            .event_queue_bytes(32 << 10),
        false,
    );
}

#[test]
fn many_senders_small_marks_closures() {
    many_senders(
        WebSocketServer::builder()
            .high_water(8 << 10)
            .low_water(2 << 10),
        true,
    );
}

/// What a closure-style echo did: messages and bytes echoed, and its
/// sends refused (retried, and counted as dropped by the server).
#[derive(Default)]
struct Echoes {
    echoed: AtomicU64,
    bytes: AtomicU64,
    refused: AtomicU64,
}

fn many_senders(builder: enjent::Builder, closures: bool) {
    let echoes = Arc::new(Echoes::default());
    let counts = Arc::clone(&echoes);
    // No keepalive: a ping would be a frame the counts do not expect (on
    // a machine slow enough to take 30 s).
    let builder = builder
        .workers(2)
        .kernel_send_buffer(Some(4096))
        .ping_interval(None);
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = Mutex::new(tx);
    let builder = if closures {
        builder
            .on_connect(move |c| tx.lock().unwrap().send(c.clone()).unwrap())
            .on_message(move |c, m| {
                let len = m.len();
                let mut m = m;
                let deadline = Instant::now() + WAIT;
                loop {
                    match c.send(m) {
                        Ok(_) => break,
                        Err(e) => {
                            assert!(e.error().is_backpressure(), "{}", e.error());
                            counts.refused.fetch_add(1, Ordering::SeqCst);
                            assert!(Instant::now() < deadline, "echo never taken");
                            m = e.into_message();
                            thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
                counts.echoed.fetch_add(1, Ordering::SeqCst);
                counts.bytes.fetch_add(frame_len(len), Ordering::SeqCst);
            })
    } else {
        builder
    };
    let server = builder.start("127.0.0.1:0").unwrap();
    let addr = server.local_addr();
    let mut s = small_window(addr);
    s.write_all(REQUEST.as_bytes()).unwrap();
    let head = read_101(&mut s);
    let target = if closures {
        rx.recv_timeout(WAIT).unwrap()
    } else {
        expect_connect(&server)
    };
    // The client's requests for the loop to echo, pipelined in bursts.
    let mut w = s.try_clone().unwrap();
    let requests = thread::spawn(move || {
        let mut wire = Vec::new();
        for i in 0..ECHOES {
            let (op, p) = message_of(ECHO_TAG, i);
            wire.extend(frame(op, &p));
            if i % 50 == 49 {
                w.write_all(&wire).unwrap();
                wire.clear();
                thread::sleep(Duration::from_millis(2));
            }
        }
        w.write_all(&wire).unwrap();
    });
    // The reader: slow for the first second, then as fast as it can.
    let done = Arc::new(AtomicBool::new(false));
    let received_bytes = Arc::new(AtomicU64::new(0));
    let reader = {
        let (done, received_bytes) = (Arc::clone(&done), Arc::clone(&received_bytes));
        let mut r = BufReader::with_capacity(1 << 16, s.try_clone().unwrap());
        thread::spawn(move || {
            let start = Instant::now();
            let mut next: HashMap<u8, u32> = HashMap::new();
            let want_total = u64::from(SENDERS) * u64::from(PER_SENDER) + u64::from(ECHOES);
            let mut got = 0u64;
            while got < want_total {
                let (op, p) = try_read_frame(&mut r).unwrap_or_else(|e| {
                    panic!("after {got} of {want_total} frames: {e}; {next:?}")
                });
                received_bytes.fetch_add(frame_len(p.len()), Ordering::Relaxed);
                let tag = if p.is_empty() { 0 } else { p[0] };
                let seq = next.entry(tag).or_default();
                let (want_op, want) = message_of(tag, *seq);
                assert_eq!(
                    (op, p.len()),
                    (want_op, want.len()),
                    "tag {tag}'s message {} (opcode, size)",
                    *seq
                );
                assert!(p == want, "tag {tag}'s message {} bytes differ", *seq);
                *seq += 1;
                got += 1;
                if start.elapsed() < Duration::from_secs(1) && got.is_multiple_of(40) {
                    thread::sleep(Duration::from_millis(3));
                }
            }
            done.store(true, Ordering::SeqCst);
            next
        })
    };
    let accepted = Arc::new(AtomicU64::new(0));
    let accepted_bytes = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(usize::from(SENDERS)));
    let senders: Vec<_> = (0..SENDERS)
        .map(|t| {
            let (target, barrier) = (target.clone(), Arc::clone(&barrier));
            let (accepted, accepted_bytes, refused) = (
                Arc::clone(&accepted),
                Arc::clone(&accepted_bytes),
                Arc::clone(&refused),
            );
            thread::spawn(move || {
                barrier.wait();
                for seq in 0..PER_SENDER {
                    let (op, p) = message_of(t, seq);
                    let len = p.len();
                    let mut m = to_message(op, p.clone());
                    let deadline = Instant::now() + WAIT * 3;
                    loop {
                        match target.send(m) {
                            Ok(_) => break,
                            Err(e) => {
                                assert!(
                                    e.error().is_backpressure(),
                                    "sender {t} message {seq}: {}",
                                    e.error()
                                );
                                refused.fetch_add(1, Ordering::Relaxed);
                                m = e.into_message();
                                assert_eq!(m.as_bytes(), &p[..], "handed back intact");
                                assert_eq!(m.is_text(), op == 0x81, "handed back as it was");
                                assert!(Instant::now() < deadline, "never taken");
                                thread::sleep(Duration::from_millis(1));
                            }
                        }
                    }
                    accepted.fetch_add(1, Ordering::Relaxed);
                    accepted_bytes.fetch_add(frame_len(len), Ordering::Relaxed);
                }
            })
        })
        .collect();
    // The main loop: echo every request (a reply refused is tried again).
    let mut echoed = 0u64;
    let mut echoed_bytes = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "stuck");
        if closures {
            thread::sleep(Duration::from_millis(20));
            continue;
        }
        match server.recv_timeout(Duration::from_millis(20)) {
            Ok(Event::Message { client, message }) => {
                let len = message.len();
                let r = client.send_timeout(message, WAIT);
                assert!(
                    r.is_ok(),
                    "echo refused: {:?}",
                    r.err().map(|e| e.to_string())
                );
                echoed += 1;
                echoed_bytes += frame_len(len);
            }
            Ok(Event::Drain { .. }) => {}
            Ok(other) => panic!("{other:?}"),
            Err(_) => {}
        }
    }
    for t in senders {
        t.join().unwrap();
    }
    requests.join().unwrap();
    let next = reader.join().unwrap();
    for t in 0..SENDERS {
        assert_eq!(next.get(&t), Some(&PER_SENDER), "sender {t}");
    }
    assert_eq!(next.get(&ECHO_TAG), Some(&ECHOES));
    if closures {
        echoed = echoes.echoed.load(Ordering::SeqCst);
        echoed_bytes = echoes.bytes.load(Ordering::SeqCst);
    }
    assert_eq!(echoed, u64::from(ECHOES));
    let sent_bytes = accepted_bytes.load(Ordering::Relaxed) + echoed_bytes;
    assert_eq!(received_bytes.load(Ordering::Relaxed), sent_bytes);
    // The loop's last event holds its charge until the next receive.
    let ok = eventually(Duration::from_secs(5), || {
        let _ = server.try_recv();
        let st = server.stats();
        st.bytes_queued == 0 && st.queued_budget_bytes == 0 && st.event_bytes == 0
    });
    let st = server.stats();
    assert!(ok, "left: {st:?}");
    assert_eq!(
        st.messages_out,
        accepted.load(Ordering::Relaxed) + echoed,
        "messages_out: {st:?}"
    );
    assert_eq!(st.messages_in, u64::from(ECHOES), "messages_in");
    assert_eq!(
        st.bytes_out,
        head.len() as u64 + sent_bytes,
        "bytes_out (101 of {} bytes): {st:?}",
        head.len()
    );
    assert_eq!(
        st.messages_dropped,
        refused.load(Ordering::Relaxed) + echoes.refused.load(Ordering::SeqCst),
        "messages_dropped: {st:?}"
    );
}

/// A client that stops reading while threads send it small (gathered) and
/// larger frames, then resets: the `Disconnect` reports the bytes not
/// delivered, and with what was written they make every byte accepted;
/// the server's counts of what is queued come back to zero.
#[test]
fn a_client_that_stops_reading_then_resets_is_told_every_byte() {
    for round in 0..6 {
        stopped_reader(round);
    }
}

fn stopped_reader(round: u32) {
    let server = small_buffers().start("127.0.0.1:0").unwrap();
    let addr = server.local_addr();
    let mut s = small_window(addr);
    s.write_all(REQUEST.as_bytes()).unwrap();
    let head = read_101(&mut s);
    let target = expect_connect(&server);
    let accepted_bytes = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..4u8)
        .map(|t| {
            let (target, accepted_bytes, stop) = (
                target.clone(),
                Arc::clone(&accepted_bytes),
                Arc::clone(&stop),
            );
            thread::spawn(move || {
                let mut seq = 0;
                while !stop.load(Ordering::Relaxed) {
                    let (op, p) = message_of(t, seq);
                    let len = p.len();
                    match target.send(to_message(op, p)) {
                        Ok(_) => {
                            accepted_bytes.fetch_add(frame_len(len), Ordering::Relaxed);
                        }
                        Err(e) if e.error().is_backpressure() => {
                            thread::sleep(Duration::from_micros(200))
                        }
                        Err(e) => {
                            assert!(matches!(e.error(), enjent::Error::Closed), "{}", e.error());
                            break;
                        }
                    }
                    seq += 1;
                    if seq % 64 == 0 {
                        thread::yield_now();
                    }
                }
            })
        })
        .collect();
    // Read a little, then nothing.
    let mut r = s.try_clone().unwrap();
    let mut read = 0u64;
    for _ in 0..(50 + round * 37) {
        let (_, p) = try_read_frame(&mut r).unwrap();
        read += frame_len(p.len());
    }
    thread::sleep(Duration::from_millis(150));
    // Reset, as sends go on.
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(r);
    drop(s);
    let (close, error) = loop {
        match server.recv_timeout(WAIT).expect("a Disconnect") {
            Event::Disconnect { close, error, .. } => break (close, error),
            Event::Drain { .. } => {}
            other => panic!("{other:?}"),
        }
    };
    stop.store(true, Ordering::Relaxed);
    for t in senders {
        t.join().unwrap();
    }
    // The Disconnect's charge is given back at the next receive.
    let _ = server.try_recv();
    let unsent = undelivered(error.as_ref());
    let ok = eventually(Duration::from_secs(5), || {
        let st = server.stats();
        st.bytes_queued == 0 && st.queued_budget_bytes == 0 && st.event_bytes == 0
    });
    let st = server.stats();
    assert!(ok, "round {round}: left: {st:?}");
    let accepted = accepted_bytes.load(Ordering::Relaxed);
    let written = st.bytes_out - head.len() as u64;
    assert!(read <= written);
    assert!(
        written + unsent >= accepted,
        "round {round}: accepted {accepted} B, written {written} B + reported undelivered {unsent} B = {} (close {close:?}, error {error:?})",
        written + unsent
    );
    assert!(
        target.buffered_amount() as u64 + written >= accepted,
        "round {round}: buffered_amount {} + written {written} < accepted {accepted}",
        target.buffered_amount()
    );
}

/// A closure keeps every message it is given: the kept ones stay as they
/// came, whatever is decoded after them on the same workers (whose
/// payload buffers are reused: `recycle_payload`).
#[test]
fn kept_messages_are_never_changed_later() {
    let kept: Arc<Mutex<Vec<(u32, Message)>>> = Arc::default();
    let k = Arc::clone(&kept);
    let server = WebSocketServer::builder()
        .workers(2)
        .on_message(move |_, m| {
            let i = if m.len() >= 5 {
                u32::from_be_bytes(m.as_bytes()[1..5].try_into().unwrap())
            } else {
                u32::MAX
            };
            k.lock().unwrap().push((i, m));
        })
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let clients: Vec<_> = (0..4u8)
        .map(|c| {
            thread::spawn(move || {
                let mut s = raw_ws(addr);
                let mut wire = Vec::new();
                for i in 0..3000u32 {
                    let (_, mut p) = message_of(c, i);
                    if p.len() >= 5 {
                        p[1..5].copy_from_slice(&i.to_be_bytes());
                    }
                    wire.extend(frame(0x82, &p));
                }
                s.write_all(&wire).unwrap();
                s
            })
        })
        .collect();
    let _open: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    assert!(
        eventually(WAIT, || kept.lock().unwrap().len() == 12_000),
        "{} of 12,000 messages",
        kept.lock().unwrap().len()
    );
    let kept = kept.lock().unwrap();
    for (i, m) in kept.iter() {
        if *i == u32::MAX {
            continue;
        }
        let tag = m.as_bytes()[0];
        let (_, mut want) = message_of(tag, *i);
        want[1..5].copy_from_slice(&i.to_be_bytes());
        assert!(
            m.as_bytes() == &want[..],
            "kept message {i} of {tag} changed"
        );
    }
}

/// Eight clients of a main loop under a small server-wide output budget:
/// three threads send to them (small, gathered, and larger frames) and
/// broadcast; four clients read everything, four read nothing and then
/// reset. Every byte accepted is written or reported undelivered, the
/// readers get all that was sent to them, and the budget's counts come
/// back to zero.
#[test]
fn a_crowd_under_a_small_output_budget_accounts_every_byte() {
    let server = small_buffers()
        .max_queued_bytes(256 << 10)
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let mut heads = 0u64;
    let mut socks = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..8 {
        let mut s = small_window(addr);
        s.write_all(REQUEST.as_bytes()).unwrap();
        heads += read_101(&mut s).len() as u64;
        socks.push(s);
        clients.push(expect_connect(&server));
    }
    let per_client: Arc<Vec<AtomicU64>> = Arc::new((0..8).map(|_| AtomicU64::new(0)).collect());
    let accepted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let closed_bytes = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let handle = server.handle();
    let senders: Vec<_> = (0..3u8)
        .map(|t| {
            let clients = clients.clone();
            let closed_bytes = Arc::clone(&closed_bytes);
            let (per_client, accepted, refused, stop, handle) = (
                Arc::clone(&per_client),
                Arc::clone(&accepted),
                Arc::clone(&refused),
                Arc::clone(&stop),
                handle.clone(),
            );
            thread::spawn(move || {
                let mut seq = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let (op, p) = message_of(t, seq);
                    let len = frame_len(p.len());
                    if seq % 50 == 7 {
                        let b = handle.broadcast(to_message(op, p));
                        accepted.fetch_add(len * (b.written + b.queued) as u64, Ordering::Relaxed);
                        refused.fetch_add(b.dropped as u64, Ordering::Relaxed);
                        closed_bytes.fetch_add(len * b.closed as u64, Ordering::Relaxed);
                    } else {
                        let c = (mix(u64::from(seq) ^ (u64::from(t) << 40)) % 8) as usize;
                        match clients[c].send(to_message(op, p)) {
                            Ok(_) => {
                                accepted.fetch_add(len, Ordering::Relaxed);
                                per_client[c].fetch_add(len, Ordering::Relaxed);
                            }
                            Err(e) => {
                                assert!(
                                    e.error().is_backpressure()
                                        || matches!(e.error(), enjent::Error::Closed),
                                    "{}",
                                    e.error()
                                );
                                if e.error().is_backpressure() {
                                    refused.fetch_add(1, Ordering::Relaxed);
                                } else {
                                    closed_bytes.fetch_add(len, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                    seq += 1;
                    if seq.is_multiple_of(32) {
                        thread::sleep(Duration::from_micros(100));
                    }
                }
            })
        })
        .collect();
    let (readers, unsent) = read_reset_and_drain(&server, socks, &clients, &stop, senders);
    let st = server.stats();
    for client in clients.iter().take(4) {
        client.close(enjent::CloseCode::NORMAL, "").unwrap();
    }
    let got: Vec<u64> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    for (c, g) in got.iter().enumerate() {
        let sent = per_client[c].load(Ordering::Relaxed);
        assert!(*g >= sent, "reader {c} got {g} of at least {sent}");
    }
    let accepted = accepted.load(Ordering::Relaxed);
    let written = st.bytes_out - heads;
    // A send told `Closed` may have been written in part, the rest
    // counted undelivered: both tell of it.
    let closed = closed_bytes.load(Ordering::Relaxed);
    assert!(
        written + unsent >= accepted && written + unsent <= accepted + closed,
        "written {written} + undelivered {unsent} vs accepted {accepted} (+ {closed} told Closed): {st:?}"
    );
    assert_nothing_held(&server);
    assert_eq!(
        st.messages_dropped,
        refused.load(Ordering::Relaxed),
        "{st:?}"
    );
}

/// The bytes a `Disconnect`'s error reports as not delivered.
fn undelivered(error: Option<&enjent::Error>) -> u64 {
    let Some(m) = error.map(ToString::to_string) else {
        return 0;
    };
    let Some(at) = m.find(" queued bytes were not delivered") else {
        return 0;
    };
    let digits: String = m[..at]
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    digits.parse().unwrap()
}

/// Publishes take a subscriber's write token from under the topic's lock
/// and flush after (`queue_shared`, `flush_taken`), another way in to the
/// same queues: three threads publish mixed sizes to a topic of eight
/// clients, with sends to each between; four read everything, four read
/// nothing and then reset. Each reader's queue drains while it reads, and
/// the counts come back to zero.
#[test]
fn publishes_to_readers_and_stuck_subscribers_all_go_out() {
    let server = small_buffers().start("127.0.0.1:0").unwrap();
    let addr = server.local_addr();
    let mut socks = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..8 {
        socks.push(raw_ws_small_window(addr));
        let client = expect_connect(&server);
        assert!(client.subscribe("t").unwrap());
        clients.push(client);
    }
    let stop = Arc::new(AtomicBool::new(false));
    // What a publish wrote or queued to each client is not told apart, so
    // the check is that the readers' queues drain while they read.
    let handle = server.handle();
    let publishers: Vec<_> = (0..3u8)
        .map(|t| {
            let (handle, stop, clients) = (handle.clone(), Arc::clone(&stop), clients.clone());
            thread::spawn(move || {
                let mut seq = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let (op, p) = message_of(t, seq);
                    if seq.is_multiple_of(3) {
                        let c = (mix(u64::from(seq) ^ (u64::from(t) << 40)) % 8) as usize;
                        let _ = clients[c].send(to_message(op, p));
                    } else {
                        handle.publish("t", to_message(op, p));
                    }
                    seq += 1;
                    if seq.is_multiple_of(32) {
                        thread::sleep(Duration::from_micros(100));
                    }
                }
            })
        })
        .collect();
    let (readers, _) = read_reset_and_drain(&server, socks, &clients, &stop, publishers);
    let written = server.stats().bytes_out;
    for client in clients.iter().take(4) {
        client.close(enjent::CloseCode::NORMAL, "").unwrap();
    }
    let got: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(
        got > 0 && got <= written,
        "the readers got {got} of {written} bytes written"
    );
    assert_nothing_held(&server);
}

/// The crowd's run, once its senders are going: the first four clients
/// read, the rest reset after 700 ms; then the senders stop, and the
/// readers' queues must drain. The readers (to be closed by the test),
/// and the bytes the resets' `Disconnect`s report undelivered.
fn read_reset_and_drain(
    server: &WebSocketServer,
    mut socks: Vec<std::net::TcpStream>,
    clients: &[enjent::Client],
    stop: &AtomicBool,
    senders: Vec<thread::JoinHandle<()>>,
) -> (Vec<thread::JoinHandle<u64>>, u64) {
    let readers = read_until_closed(socks.drain(..4));
    thread::sleep(Duration::from_millis(700));
    let unsent = reset_and_count(server, socks.into_iter());
    stop.store(true, Ordering::Relaxed);
    for t in senders {
        t.join().unwrap();
    }
    drain(server, &clients[..4]);
    (readers, unsent)
}

/// A reader for each socket, reading until its close frame (which the
/// test sends once that client's queue is empty); each returns the bytes
/// of the frames before it.
fn read_until_closed(
    socks: impl Iterator<Item = std::net::TcpStream>,
) -> Vec<thread::JoinHandle<u64>> {
    socks
        .map(|s| {
            thread::spawn(move || {
                let mut r = BufReader::with_capacity(1 << 16, s);
                let mut got = 0u64;
                loop {
                    let (op, p) = try_read_frame(&mut r).unwrap_or_else(|e| {
                        panic!("read nothing for {WAIT:?} after {got} bytes: {e}")
                    });
                    if op == 0x88 {
                        return got;
                    }
                    got += frame_len(p.len());
                }
            })
        })
        .collect()
}

/// Reset each socket (as sends go on) and wait for their `Disconnect`s
/// (a main loop's `Drain`s between): the bytes they report undelivered.
fn reset_and_count(
    server: &WebSocketServer,
    socks: impl Iterator<Item = std::net::TcpStream>,
) -> u64 {
    let mut n = 0;
    for s in socks {
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
        n += 1;
    }
    let mut unsent = 0u64;
    let mut gone = 0;
    let deadline = Instant::now() + WAIT;
    while gone < n {
        assert!(Instant::now() < deadline, "{gone} of {n} gone");
        match server.recv_timeout(WAIT) {
            Ok(Event::Disconnect { error, .. }) => {
                gone += 1;
                unsent += undelivered(error.as_ref());
            }
            Ok(Event::Drain { .. }) => {}
            other => panic!("{other:?}"),
        }
    }
    unsent
}

/// Wait while the readers read for everything queued to their clients
/// to go out (taking the main loop's `Drain`s). A write that lost the
/// poller's report of room left a queue waiting here with the socket
/// empty (`flush_before_letting_go`).
fn drain(server: &WebSocketServer, readers: &[enjent::Client]) {
    for (c, client) in readers.iter().enumerate() {
        let deadline = Instant::now() + WAIT;
        while client.buffered_amount() > 0 {
            assert!(
                Instant::now() < deadline,
                "reader {c}'s queue still holds {} bytes after {WAIT:?} while it reads",
                client.buffered_amount()
            );
            let _ = server.recv_timeout(Duration::from_millis(10));
        }
    }
}

/// The server's counts of what is queued and of events unconsumed come
/// back to zero (the last event received gives its charge back at the
/// next receive).
fn assert_nothing_held(server: &WebSocketServer) {
    let ok = eventually(Duration::from_secs(5), || {
        let _ = server.try_recv();
        let st = server.stats();
        st.bytes_queued == 0 && st.queued_budget_bytes == 0 && st.event_bytes == 0
    });
    assert!(ok, "left: {:?}", server.stats());
}

/// Two workers, a kernel send buffer of a few KiB (queues build up soon),
/// and no keepalive (a ping would be a frame the counts do not expect, on
/// a machine slow enough to take 30 s).
fn small_buffers() -> enjent::Builder {
    WebSocketServer::builder()
        .workers(2)
        .kernel_send_buffer(Some(4096))
        .ping_interval(None)
}
