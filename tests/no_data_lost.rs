//! Nothing is lost: thousands of numbered messages of mixed sizes
//! (1 B to 64 KiB) pipelined from one client, and from 50 at once, arrive
//! in order and byte-exact, both through the event loop and closures.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use enjent::{Event, Message, WebSocketServer};
use support::*;

/// Deterministic mixed sizes: mostly small, some up to 64 KiB.
fn payload(client: u32, i: u32) -> Vec<u8> {
    let mut x = (client as u64 + 1) * 0x9E37_79B9 + i as u64 * 0x85EB_CA6B;
    x ^= x >> 13;
    let size = match x % 10 {
        0 => 1 + (x as usize >> 8) % (64 * 1024),
        1..=3 => 1 + (x as usize >> 8) % 4096,
        _ => 1 + (x as usize >> 8) % 200,
    };
    let mut p = Vec::with_capacity(size.max(8));
    p.extend_from_slice(&client.to_be_bytes());
    p.extend_from_slice(&i.to_be_bytes());
    p.extend((0..size.saturating_sub(8)).map(|k| (k as u32 ^ i) as u8));
    p
}

fn pipeline(addr: std::net::SocketAddr, client: u32, count: u32) -> std::net::TcpStream {
    let mut s = raw_ws(addr);
    let mut wire = Vec::new();
    for i in 0..count {
        wire.extend(frame(0x82, &payload(client, i)));
        if wire.len() > 1 << 20 {
            s.write_all(&wire).unwrap();
            wire.clear();
        }
    }
    s.write_all(&wire).unwrap();
    s
}

#[test]
fn ten_thousand_messages_from_one_client_arrive_in_order() {
    let server = WebSocketServer::builder().start("127.0.0.1:0").unwrap();
    let addr = server.local_addr();
    let writer = std::thread::spawn(move || pipeline(addr, 0, 10_000));
    expect_connect(&server);
    for i in 0..10_000 {
        let (_, m) = expect_message(&server);
        assert!(
            m.as_bytes() == payload(0, i).as_slice(),
            "message {i} differs"
        );
    }
    drop(writer.join().unwrap());
    expect_disconnect(&server);
}

#[test]
fn fifty_clients_at_once_each_in_order_through_closures() {
    let seen: Arc<Mutex<Vec<Vec<u32>>>> = Arc::new(Mutex::new(vec![Vec::new(); 50]));
    let sink = Arc::clone(&seen);
    let server = WebSocketServer::builder()
        .on_message(move |_, m: Message| {
            let b = m.as_bytes();
            let client = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            let i = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
            assert!(b == payload(client, i).as_slice());
            sink.lock().unwrap()[client as usize].push(i);
        })
        .queue_unhandled_events(true)
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let writers: Vec<_> = (0..50)
        .map(|c| std::thread::spawn(move || pipeline(addr, c, 400)))
        .collect();
    let sockets: Vec<_> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    let mut connects = 0;
    while connects < 50 {
        if let Event::Connect { .. } = next(&server) {
            connects += 1;
        }
    }
    drop(sockets);
    let mut disconnects = 0;
    while disconnects < 50 {
        if let Event::Disconnect { .. } = next(&server) {
            disconnects += 1;
        }
    }
    // Every message was handled before its client's Disconnect.
    let seen = seen.lock().unwrap();
    for (c, list) in seen.iter().enumerate() {
        assert_eq!(list, &(0..400).collect::<Vec<_>>(), "client {c}");
    }
}

#[test]
fn messages_queued_before_close_reach_the_client_before_the_close_frame() {
    let server = WebSocketServer::builder()
        .max_backpressure(64 << 20)
        .start("127.0.0.1:0")
        .unwrap();
    let mut s = raw_ws(server.local_addr());
    let c = expect_connect(&server);
    for i in 0..2_000u32 {
        c.send(payload(1, i)).unwrap();
    }
    c.close(enjent::CloseCode::NORMAL, "done").unwrap();
    for i in 0..2_000 {
        let (first, p) = read_frame(&mut s);
        assert_eq!(first, 0x82);
        assert!(p == payload(1, i), "message {i}");
    }
    assert_eq!(read_close(&mut s), Some(1000));
}

/// A client that resets its connection with data still queued to it: the
/// `Disconnect` says so, with the reset's kind and the count of bytes not
/// delivered, which `buffered_amount()` gives too.
#[test]
fn a_reset_with_data_queued_reports_what_was_not_delivered() {
    let server = WebSocketServer::builder()
        .workers(2)
        .max_backpressure(64 << 20)
        .start("127.0.0.1:0")
        .unwrap();
    let s = raw_ws(server.local_addr());
    let client = expect_connect(&server);
    // 16 MiB: far more than the sockets' buffers hold, so most of it is
    // queued while the client reads nothing.
    client.send(vec![7u8; 16 << 20]).unwrap();
    let t = std::time::Instant::now();
    while client.buffered_amount() == 0 {
        assert!(t.elapsed() < WAIT, "nothing was queued");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // Closed with unread data in its receive buffer: the kernel resets.
    drop(s);
    let (_, _, error) = expect_disconnect(&server);
    let Some(enjent::Error::Io(e)) = error else {
        panic!("{error:?}")
    };
    let unsent = client.buffered_amount();
    assert!(unsent > 0);
    assert!(
        e.to_string()
            .ends_with(&format!("; {unsent} queued bytes were not delivered")),
        "{e} ({:?}), {unsent} unsent",
        e.kind()
    );
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "{e} ({:?})",
        e.kind()
    );
}

/// A numbered message from writer `t`: its number, its seq, and a body of
/// a size that varies (8 B to about 2 KiB), so that some sends write at
/// once and others queue or cork.
fn numbered_from(t: u32, i: u32) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&t.to_be_bytes());
    p.extend_from_slice(&i.to_be_bytes());
    p.resize(8 + ((i as usize * 37 + t as usize * 101) % 2000), t as u8);
    p
}

/// Eight threads send while a ninth closes the client (`close`, or the
/// server's `shutdown`). From the peer's side: every send that returned
/// `Ok` arrives, in its thread's order, before the close frame; none that
/// returned an error does; nothing follows the close frame.
fn sends_racing(stop: fn(&enjent::Client, &enjent::ServerHandle), code: u16, rounds: u32) {
    use std::sync::Barrier;
    use std::thread;
    const WRITERS: u32 = 8;
    // Rounds where the stop landed while the writers ran (some sends
    // accepted, some refused): the race this is about.
    let mut raced = 0;
    for round in 0..rounds {
        let server = WebSocketServer::builder()
            .max_backpressure(64 << 20)
            .start("127.0.0.1:0")
            .unwrap();
        let mut s = raw_ws(server.local_addr());
        let c = expect_connect(&server);
        let reader = thread::spawn(move || {
            let mut got: Vec<Vec<u32>> = vec![Vec::new(); WRITERS as usize];
            loop {
                let (first, p) = read_frame(&mut s);
                if first == 0x88 {
                    let code = u16::from_be_bytes([p[0], p[1]]);
                    // Answer it, then nothing but the end may come.
                    s.write_all(&frame(0x88, &p[..2])).unwrap();
                    match try_read_frame(&mut s) {
                        Err(_) => {}
                        Ok((f, q)) => panic!("after the close: {}", describe(f, &q)),
                    }
                    return (got, code);
                }
                assert_eq!(first, 0x82, "{}", describe(first, &p));
                let t = u32::from_be_bytes(p[..4].try_into().unwrap());
                let i = u32::from_be_bytes(p[4..8].try_into().unwrap());
                assert!(p == numbered_from(t, i), "writer {t} message {i} corrupted");
                got[t as usize].push(i);
            }
        });
        let go = Arc::new(Barrier::new(WRITERS as usize + 1));
        let writers: Vec<_> = (0..WRITERS)
            .map(|t| {
                let (c, go) = (c.clone(), Arc::clone(&go));
                thread::spawn(move || {
                    go.wait();
                    let mut accepted = Vec::new();
                    for i in 0..5_000 {
                        match c.send(numbered_from(t, i)) {
                            Ok(_) => accepted.push(i),
                            Err(e) if matches!(e.error(), enjent::Error::Closed) => break,
                            Err(e) => panic!("writer {t}: {e}"),
                        }
                    }
                    accepted
                })
            })
            .collect();
        let handle = server.handle();
        go.wait();
        // Somewhere in the writers' run: from at once to a few ms in.
        thread::sleep(std::time::Duration::from_micros(u64::from(round % 8) * 400));
        stop(&c, &handle);
        let accepted: Vec<Vec<u32>> = writers.into_iter().map(|w| w.join().unwrap()).collect();
        let (got, got_code) = reader.join().unwrap();
        assert_eq!(got_code, code, "round {round}");
        let total: usize = accepted.iter().map(Vec::len).sum();
        if total > 0 && total < (WRITERS * 5_000) as usize {
            raced += 1;
        }
        for t in 0..WRITERS as usize {
            assert!(
                got[t] == accepted[t],
                "round {round}, writer {t}: {} accepted, {} arrived (first difference at {:?})",
                accepted[t].len(),
                got[t].len(),
                got[t].iter().zip(&accepted[t]).position(|(a, b)| a != b)
            );
        }
    }
    assert!(
        raced * 2 >= rounds,
        "the stop landed mid-run in only {raced} of {rounds} rounds"
    );
}

#[test]
fn sends_racing_close_from_eight_threads_arrive_if_accepted_and_before_the_close() {
    sends_racing(
        |c, _| c.close(enjent::CloseCode::NORMAL, "bye").unwrap(),
        1000,
        32,
    );
}

#[test]
fn sends_racing_shutdown_from_eight_threads_arrive_if_accepted_and_before_the_close() {
    sends_racing(|_, h| h.shutdown(), 1001, 16);
}

/// A backlog of tiny messages from eight threads, which a reader that
/// starts late then takes all at once: the queue goes out many frames to
/// a write, cut anywhere by the kernel's buffer, and every message
/// arrives whole, once, in its thread's order.
#[test]
fn a_backlog_of_tiny_messages_from_eight_threads_arrives_whole_and_in_order() {
    use std::thread;
    const WRITERS: u32 = 8;
    const EACH: u32 = 20_000;
    let server = WebSocketServer::builder()
        .max_backpressure(64 << 20)
        .ping_interval(None)
        .start("127.0.0.1:0")
        .unwrap();
    let mut s = raw_ws(server.local_addr());
    let c = expect_connect(&server);
    // 4 to 40 bytes each after the number.
    let tiny = |t: u32, i: u32| {
        let mut p = Vec::new();
        p.extend_from_slice(&t.to_be_bytes());
        p.extend_from_slice(&i.to_be_bytes());
        p.resize(8 + (i as usize * 7 + t as usize) % 37, b'a' + t as u8);
        p
    };
    let writers: Vec<_> = (0..WRITERS)
        .map(|t| {
            let c = c.clone();
            thread::spawn(move || {
                for i in 0..EACH {
                    c.send(tiny(t, i)).unwrap();
                }
            })
        })
        .collect();
    // Let a backlog build before reading anything.
    thread::sleep(std::time::Duration::from_millis(300));
    let mut next = vec![0u32; WRITERS as usize];
    for _ in 0..WRITERS * EACH {
        let (first, p) = read_frame(&mut s);
        assert_eq!(first, 0x82, "{}", describe(first, &p));
        let t = u32::from_be_bytes(p[..4].try_into().unwrap());
        let i = u32::from_be_bytes(p[4..8].try_into().unwrap());
        assert_eq!(i, next[t as usize], "writer {t}: out of order or lost");
        assert!(p == tiny(t, i), "writer {t} message {i} corrupted");
        next[t as usize] += 1;
    }
    for w in writers {
        w.join().unwrap();
    }
    assert!(next.iter().all(|&n| n == EACH), "{next:?}");
    assert_eq!(server.stats().messages_out, u64::from(WRITERS * EACH));
}

/// A client paused in the middle of a read (its unconsumed events at high
/// water) has whole messages read and kept unparsed. When it then resets,
/// those are delivered before its `Disconnect`: nothing will be written to
/// it any more, so the pause protects nothing, and the server has them.
/// (What was still in the kernel is gone with the reset.) Before, the job
/// that found the failed write tore the connection down with them unread.
#[test]
fn messages_read_and_held_by_a_pause_are_delivered_when_the_client_resets() {
    held_by_a_pause_then_reset(1);
}

/// The same for a crowd: eight clients paused at once with input kept,
/// all resetting together, each torn down while paused. Every message the
/// server had read reaches the main loop, client by client in order.
#[test]
fn messages_held_by_pauses_are_delivered_when_a_crowd_resets() {
    held_by_a_pause_then_reset(8);
}

/// Reset every socket, and send to each client until all are torn down:
/// the sends find the resets (the readiness loop may too).
fn reset_until_gone(
    server: &WebSocketServer,
    sockets: Vec<std::net::TcpStream>,
    clients: &[enjent::Client],
) {
    for s in sockets {
        let _ = socket2::SockRef::from(&s).set_linger(Some(std::time::Duration::ZERO));
    }
    assert!(
        eventually(WAIT, || {
            for client in clients {
                let _ = client.send(vec![1u8; 16]);
            }
            server.stats().connections == 0
        }),
        "not torn down: {:?}",
        server.stats()
    );
}

fn held_by_a_pause_then_reset(clients: usize) {
    const SENT: u32 = 100;
    const SIZE: usize = 1024;
    let server = WebSocketServer::builder()
        .high_water(8 * 1024)
        .low_water(2 * 1024)
        .event_queue_bytes(16 << 20)
        .ping_interval(None)
        .start("127.0.0.1:0")
        .unwrap();
    // Message `i` of client `c`: numbered, with the client in byte 4.
    let message = |c: usize, i: u32| {
        let mut m = numbered(i, SIZE);
        m[4] = c as u8;
        m
    };
    let mut sockets = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..clients {
        sockets.push(raw_ws(server.local_addr()));
        handles.push(expect_connect(&server));
    }
    let mut frame_len = 0;
    for (c, s) in sockets.iter_mut().enumerate() {
        let wire: Vec<u8> = (0..SENT)
            .flat_map(|i| frame(0x82, &message(c, i)))
            .collect();
        frame_len = wire.len() / SENT as usize;
        s.write_all(&wire).unwrap();
    }
    // Nobody consumes: each client's own events reach high water, and
    // the read that did it keeps its rest unparsed.
    assert!(
        eventually(WAIT, || {
            let st = server.stats();
            st.read_pauses >= clients as u64 && st.unparsed_in_bytes >= frame_len as u64
        }),
        "no input held by pauses: {:?}",
        server.stats()
    );
    let before = server.stats();
    let held = before.unparsed_in_bytes as usize / frame_len;
    // The connections end while still paused: the events are read only
    // after.
    reset_until_gone(&server, sockets, &handles);
    let mut got = vec![0u32; clients];
    let mut gone = 0;
    while gone < clients {
        match next(&server) {
            Event::Message { client, message: m } => {
                let c = handles.iter().position(|h| h.id() == client.id()).unwrap();
                assert_eq!(
                    m.as_bytes(),
                    &message(c, got[c])[..],
                    "client {c}, message {}",
                    got[c]
                );
                got[c] += 1;
            }
            Event::Disconnect { error, .. } => {
                assert!(error.is_some(), "a reset is an error");
                gone += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let total: u64 = got.iter().map(|&n| n as u64).sum();
    assert!(
        total >= before.messages_in + held as u64,
        "{got:?} delivered: {} before the resets, and {held} whole messages held unparsed then ({before:?})",
        before.messages_in
    );
    assert_eq!(server.stats().unparsed_in_bytes, 0);
}

/// The same with tiny messages: a read's rest may hold tens of thousands
/// (here about 10,000 empty ones, 6 bytes each, in a read of 64 KiB),
/// more than a job's 4,096 frames. All are delivered at the teardown: plain input is at most one
/// read, so feeding it whole is bounded; only inflating is cut by the
/// budget. Before, the teardown stopped at 4,096 and dropped the rest.
#[test]
fn thousands_of_tiny_messages_held_by_a_pause_are_delivered_at_a_reset() {
    const SENT: u32 = 60_000;
    let server = WebSocketServer::builder()
        .high_water(8 * 1024)
        .low_water(2 * 1024)
        // Room for all of their events (about 1.6 MB): past the hard
        // limit a connection being torn down has the rest discarded (see
        // the crowd test below).
        .max_backpressure(4 << 20)
        .event_queue_bytes(64 << 20)
        .ping_interval(None)
        .start("127.0.0.1:0")
        .unwrap();
    let mut s = raw_ws(server.local_addr());
    let client = expect_connect(&server);
    let one = frame(0x82, b"");
    let _ = s.write_all(&one.repeat(SENT as usize));
    assert!(
        eventually(WAIT, || server.stats().unparsed_in_bytes
            >= 4096 * one.len() as u64 * 2),
        "no input held by a pause: {:?}",
        server.stats()
    );
    let before = server.stats();
    let held = before.unparsed_in_bytes / one.len() as u64;
    reset_until_gone(&server, vec![s], &[client]);
    let mut got = 0u64;
    loop {
        match next(&server) {
            Event::Message { .. } => got += 1,
            Event::Disconnect { .. } => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        got >= before.messages_in + held,
        "{got} delivered: {} before the reset, and {held} held unparsed then",
        before.messages_in
    );
    assert_eq!(server.stats().unparsed_in_bytes, 0);
}

/// A teardown's feed is not cut after a large message that began before
/// the pause and ends in what was kept. The client's 7,850-byte message
/// leaves its events just under high water (8 KiB); then a fragmented
/// message of 1.5 MiB is read but for its last fragment; a ping between
/// the fragments makes the server queue a pong, which takes what the
/// client holds past high water, so the read is kept from there: the
/// last fragment and ten small messages. The client reads nothing, gets
/// a reply of 16 MiB (over the hard limit, so the close below does not
/// end the pause) and is closed, and its close times out. The teardown
/// delivers the large message and the ten behind it. Before, it stopped
/// after the large message (1 MiB delivered) and dropped the ten.
#[test]
fn a_teardown_delivers_what_follows_a_large_message_finished_in_the_kept_input() {
    let server = WebSocketServer::builder()
        .high_water(8 * 1024)
        .low_water(2 * 1024)
        .max_message_size(2 << 20)
        .event_queue_bytes(64 << 20)
        .close_timeout(std::time::Duration::from_millis(300))
        .ping_interval(None)
        .start("127.0.0.1:0")
        .unwrap();
    let mut s = raw_ws_small_window(server.local_addr());
    let client = expect_connect(&server);
    const BIG: usize = 3 << 19;
    // Charged 7,850 + 144 bytes, with the `Connect` event's 144 (given
    // back only when the main loop asks for the next event): 8,138, under
    // 8,192; the pong's 131 take it over.
    let mut head = frame(0x82, &[1u8; 7850]);
    head.extend(frame(0x02, &vec![2u8; BIG - 1]));
    s.write_all(&head).unwrap();
    assert!(
        eventually(WAIT, || server.stats().buffered_in_bytes
            >= (BIG - 1) as u64),
        "the first fragment not read: {:?}",
        server.stats()
    );
    let mut tail = frame(0x89, b"p");
    tail.extend(frame(0x80, b"z"));
    for i in 0..10u8 {
        tail.extend(frame(0x82, &[i; 10]));
    }
    s.write_all(&tail).unwrap();
    assert!(
        eventually(WAIT, || server.stats().unparsed_in_bytes > 0),
        "nothing kept by a pause: {:?}",
        server.stats()
    );
    client.send(vec![9u8; 16 << 20]).unwrap();
    client.close(enjent::CloseCode::NORMAL, "bye").unwrap();
    let mut sizes = Vec::new();
    loop {
        match next(&server) {
            Event::Message { message, .. } => sizes.push(message.len()),
            Event::Disconnect { .. } => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    let mut want = vec![7850, BIG];
    want.extend([10; 10]);
    assert_eq!(sizes, want);
    assert_eq!(server.stats().unparsed_in_bytes, 0);
    drop(s);
}

/// What a crowd of connections being torn down delivers stays within the
/// event channel's budget: eight clients each pipeline 60,000 empty
/// messages nobody consumes and reset; each teardown feeds what it kept
/// (some 10,000 messages) with no gate to stop it, and once the channel
/// is over its budget (1 MiB here) the rest is discarded and counted,
/// as for a client being closed. Before, every teardown handed all of
/// it to the channel: about 12 MB of charges over a budget of 1 MiB.
#[test]
fn a_crowd_torn_down_with_kept_input_stays_within_the_event_budget() {
    const CLIENTS: usize = 8;
    let server = WebSocketServer::builder()
        .event_queue_bytes(1 << 20)
        .ping_interval(None)
        .start("127.0.0.1:0")
        .unwrap();
    let mut sockets = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..CLIENTS {
        sockets.push(raw_ws(server.local_addr()));
        handles.push(expect_connect(&server));
    }
    let wire = frame(0x82, b"").repeat(60_000);
    for s in &mut sockets {
        s.write_all(&wire).unwrap();
    }
    assert!(
        eventually(WAIT, || server.stats().read_pauses >= CLIENTS as u64),
        "not all paused: {:?}",
        server.stats()
    );
    let before = server.stats();
    reset_until_gone(&server, sockets, &handles);
    let after = server.stats();
    // The budget, and a batch (64 messages) past it for each connection.
    assert!(
        after.event_bytes <= (1 << 20) + CLIENTS as u64 * 64 * 200,
        "{} bytes of events charged over a budget of 1 MiB ({before:?})",
        after.event_bytes
    );
    assert!(after.messages_discarded > 0, "{after:?}");
    assert_eq!(after.unparsed_in_bytes, 0);
}

/// The same for a teardown nobody forced: a client paused because it
/// reads nothing (its queue, a reply of 8 MiB, over the hard limit) is
/// closed by the server, never answers, and its close times out. What the
/// server read and kept unparsed for the pause (here everything the
/// client sent, in one read) is delivered before the `Disconnect`.
/// Before, the teardown fed it only as far as the still-closed gate let
/// it: one message, and the rest was dropped.
#[test]
fn messages_held_by_a_pause_are_delivered_when_a_close_times_out() {
    const SENT: u32 = 40;
    const SIZE: usize = 1024;
    let seen: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let sink = Arc::clone(&seen);
    let server = WebSocketServer::builder()
        .high_water(8 * 1024)
        .low_water(2 * 1024)
        .max_message_size(2048)
        .max_backpressure(16 * 1024)
        .close_timeout(std::time::Duration::from_millis(300))
        .ping_interval(None)
        .on_message(move |c, m: Message| {
            let mut seen = sink.lock().unwrap();
            if seen.is_empty() {
                // A reply larger than the hard limit, to a client that
                // reads nothing: most of it stays queued.
                c.send(vec![9u8; 8 << 20]).unwrap();
            }
            seen.push(m.as_bytes().to_vec());
        })
        .queue_unhandled_events(true)
        .start("127.0.0.1:0")
        .unwrap();
    let mut s = raw_ws_small_window(server.local_addr());
    let client = expect_connect(&server);
    let wire: Vec<u8> = (0..SENT)
        .flat_map(|i| frame(0x82, &numbered(i, SIZE)))
        .collect();
    let frame_len = wire.len() / SENT as usize;
    s.write_all(&wire).unwrap();
    // Its queue over high water after the first message, the read (the
    // whole write, 41 KB) keeps its rest unparsed: the server has every
    // message.
    assert!(
        eventually(WAIT, || {
            let st = server.stats();
            st.unparsed_in_bytes > 0
                && st.messages_in + st.unparsed_in_bytes / frame_len as u64 == SENT as u64
        }),
        "not all read, or nothing held by a pause: {:?}",
        server.stats()
    );
    // The server closes; the client reads nothing and never answers. With
    // its queue over the hard limit the close does not end the pause,
    // and the close times out.
    client
        .close(enjent::CloseCode::NORMAL, "bye")
        .expect("close queued");
    match next(&server) {
        Event::Disconnect { .. } => {}
        other => panic!("unexpected {other:?}"),
    }
    let seen = seen.lock().unwrap();
    assert_eq!(
        seen.len(),
        SENT as usize,
        "messages the server had read were dropped"
    );
    for (i, m) in seen.iter().enumerate() {
        assert!(m == &numbered(i as u32, SIZE), "message {i}");
    }
    assert_eq!(server.stats().unparsed_in_bytes, 0);
    drop(s);
}
