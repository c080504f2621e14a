//! The close handshake both ways, close-code validation, and the close
//! timeout for peers that never answer.

mod support;

use std::io::Write;
use std::time::{Duration, Instant};

use enjent::{CloseCode, Error, WebSocketServer};
use support::*;

/// A server in the main-loop style with this close timeout.
fn with_close_timeout(t: Duration) -> WebSocketServer {
    WebSocketServer::builder()
        .close_timeout(t)
        .start("127.0.0.1:0")
        .unwrap()
}

#[test]
fn server_close_sends_code_and_reason_and_waits_for_the_answer() {
    let server = server();
    let mut s = raw_ws(server.local_addr());
    let c = expect_connect(&server);
    c.send("before close").unwrap();
    c.close(CloseCode::new(4001), "bye now").unwrap();
    // Nothing may follow our close frame.
    assert!(matches!(
        c.send("after close").map_err(|e| e.into_error()),
        Err(Error::Closed)
    ));
    assert!(matches!(c.close(CloseCode::NORMAL, ""), Err(Error::Closed)));
    let (first, p) = read_frame(&mut s);
    assert_eq!((first, p.as_slice()), (0x81, &b"before close"[..]));
    let (first, p) = read_frame(&mut s);
    assert_eq!(first, 0x88);
    assert_eq!(p, close_payload(4001, "bye now"));
    // Messages the client sends before answering are still delivered.
    s.write_all(&frame(0x81, b"in flight")).unwrap();
    s.write_all(&frame(0x88, &close_payload(4001, ""))).unwrap();
    let (_, m) = expect_message(&server);
    assert_eq!(m.as_text(), Some("in flight"));
    let (_, close, error) = expect_disconnect(&server);
    // The peer's frame is the connection's close code (RFC 6455 7.1.5).
    assert_eq!(
        (close.code, close.reason.as_str()),
        (CloseCode::new(4001), "")
    );
    assert!(error.is_none(), "{error:?}");
    assert!(closed_by_server(&mut s));
}

#[test]
fn close_with_a_reserved_code_is_refused() {
    let server = server();
    let _ws = client(server.local_addr());
    let c = expect_connect(&server);
    for bad in [0u16, 999, 1005, 1006, 1015, 2000, 5000] {
        assert!(
            matches!(
                c.close(CloseCode::new(bad), ""),
                Err(Error::InvalidInput(_))
            ),
            "{bad}"
        );
    }
    assert!(matches!(
        c.close(CloseCode::NORMAL, &"x".repeat(124)),
        Err(Error::InvalidInput(_))
    ));
    assert!(c.is_open(), "a refused close changes nothing");
    c.close(CloseCode::NORMAL, "").unwrap();
}

/// What `close` accepts reaches the peer byte-exact: a reason of exactly
/// 123 bytes (multi-byte characters included), and the edges of the
/// application range; what it refuses puts nothing on the wire.
#[test]
fn close_reasons_and_codes_at_their_limits_reach_the_peer() {
    let server = server();
    // 40 three-byte characters and 3 more bytes: 123 bytes.
    let reason = format!("{}abc", "\u{20AC}".repeat(40));
    assert_eq!(reason.len(), 123);
    for code in [3000u16, 4999] {
        let mut s = raw_ws(server.local_addr());
        let c = expect_connect(&server);
        // Refused first: nothing goes out for them.
        assert!(c.close(CloseCode::new(1004), "").is_err());
        assert!(
            c.close(CloseCode::new(code), &format!("{reason}x"))
                .is_err()
        );
        c.close(CloseCode::new(code), &reason).unwrap();
        let (first, p) = read_frame(&mut s);
        assert_eq!(first, 0x88);
        assert_eq!(u16::from_be_bytes([p[0], p[1]]), code);
        assert_eq!(&p[2..], reason.as_bytes());
        s.write_all(&frame(0x88, &p[..2])).unwrap();
        assert!(closed_by_server(&mut s));
        let (_, close, _) = expect_disconnect(&server);
        assert_eq!(close.code.as_u16(), code);
    }
}

#[test]
fn client_close_with_no_code_is_answered_and_reported_as_1005() {
    let server = server();
    let mut s = raw_ws(server.local_addr());
    expect_connect(&server);
    s.write_all(&frame(0x88, b"")).unwrap();
    assert_eq!(read_close(&mut s), Some(1000));
    assert!(closed_by_server(&mut s));
    let (_, close, error) = expect_disconnect(&server);
    assert_eq!(close.code, CloseCode::NO_STATUS);
    assert!(error.is_none());
}

#[test]
fn peer_that_never_answers_is_dropped_after_close_timeout() {
    let server = with_close_timeout(Duration::from_millis(300));
    let mut s = raw_ws(server.local_addr());
    let c = expect_connect(&server);
    let start = Instant::now();
    c.close(CloseCode::NORMAL, "").unwrap();
    assert_eq!(read_close(&mut s), Some(1000));
    // We never answer: no close frame arrived, so the connection's close
    // code is 1006 (RFC 6455 section 7.1.5), and the error says why.
    let (_, close, error) = expect_disconnect(&server);
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(close.code, CloseCode::ABNORMAL);
    match error {
        Some(Error::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::TimedOut),
        other => panic!("{other:?}"),
    }
    assert!(closed_by_server(&mut s));
}

/// Pings after the server's close, before the peer's answer, are not
/// answered. RFC 6455 section 5.5.2 asks for a pong until the peer's
/// Close, but common clients take any frame after the Close they received
/// for an error: tungstenite (below) reports `ReceivedAfterClosing`, and
/// Chromium fails the connection. Those clients skip pings after a close
/// themselves. The answer still completes the close, with no frame after
/// ours.
#[test]
fn pings_after_our_close_are_not_answered_and_the_answer_completes_it() {
    let server = server();
    let mut s = raw_ws(server.local_addr());
    let c = expect_connect(&server);
    c.close(CloseCode::NORMAL, "bye").unwrap();
    assert_eq!(read_close(&mut s), Some(1000));
    let mut wire = frame(0x89, b"one");
    wire.extend(frame(0x88, &close_payload(1000, "")));
    s.write_all(&wire).unwrap();
    let mut after = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut after);
    assert!(after.is_empty(), "sent after its close: {after:?}");
    let (_, close, error) = expect_disconnect(&server);
    assert_eq!(close.code, CloseCode::NORMAL);
    assert!(error.is_none(), "{error:?}");
    // A tungstenite client whose keepalive ping crosses the server's
    // close: it gets the close and then the end, not an error.
    let mut ws = client(server.local_addr());
    let c = expect_connect(&server);
    c.close(CloseCode::NORMAL, "bye").unwrap();
    ws.send(tungstenite::Message::Ping(b"keepalive".to_vec().into()))
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(matches!(ws.read(), Ok(tungstenite::Message::Close(_))));
    match ws.read() {
        Err(tungstenite::Error::ConnectionClosed) => {}
        other => panic!("after the close: {other:?}"),
    }
    expect_disconnect(&server);
}

/// A peer being closed must not hold more than an open one can, whatever
/// it sends: while closing, the gate reads on for the peer's answer, and
/// pings then queue nothing (see above). Here a crowd of eight clients
/// closed at once, as at shutdown or an idle close, each sending 30,000
/// pings of 125 bytes (3.8 MB of pongs if answered, more than the kernel
/// takes) and then its answer, and reading nothing: each one's queue
/// stays under 32 KiB. (When pongs were answered after our close, each
/// grew to the hard limit: 1 MiB counted, 522 KB of pongs.)
#[test]
fn a_ping_flood_after_our_close_queues_no_more_than_high_water() {
    const CLIENTS: usize = 8;
    let server = WebSocketServer::builder()
        .high_water(16 * 1024)
        .low_water(4 * 1024)
        .max_message_size(64 * 1024)
        .max_backpressure(1 << 20)
        .close_timeout(Duration::from_secs(1))
        .ping_interval(None)
        .start("127.0.0.1:0")
        .unwrap();
    let mut sockets = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        sockets.push(raw_ws_small_window(server.local_addr()));
        clients.push(expect_connect(&server));
    }
    for c in &clients {
        c.close(CloseCode::NORMAL, "bye").unwrap();
    }
    let mut wire = frame(0x89, &[7u8; 125]).repeat(30_000);
    wire.extend(frame(0x88, &close_payload(1000, "")));
    let wire = std::sync::Arc::new(wire);
    let writers: Vec<_> = sockets
        .iter()
        .map(|s| {
            let mut w = s.try_clone().unwrap();
            w.set_write_timeout(Some(WAIT)).unwrap();
            let wire = std::sync::Arc::clone(&wire);
            std::thread::spawn(move || {
                let _ = w.write_all(&wire);
            })
        })
        .collect();
    // Until every connection ends (their queues never drain: the close
    // timeout ends them), the most the server queued for any of them.
    let (mut most, mut gone) = (0, 0);
    let started = Instant::now();
    while gone < CLIENTS {
        for c in &clients {
            most = most.max(c.buffered_amount());
        }
        match server.recv_timeout(Duration::from_millis(1)) {
            Ok(enjent::Event::Disconnect { .. }) => gone += 1,
            Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(e) => panic!("{e}"),
        }
        assert!(started.elapsed() < WAIT, "never torn down");
    }
    assert!(
        most < 32 * 1024,
        "{most} bytes of pongs queued to one client"
    );
    drop(sockets);
    for w in writers {
        w.join().unwrap();
    }
}

/// A peer that breaks the protocol after the server's close, instead of
/// answering it: the server sends no second close frame, so the report is
/// not a 1002 that never went out (as it was), and no protocol error is
/// counted by a close code sent. No close frame came back: 1006, with the
/// violation as the error.
#[test]
fn a_protocol_error_after_our_close_is_reported_without_a_code_never_sent() {
    let server = server();
    let mut s = raw_ws(server.local_addr());
    let c = expect_connect(&server);
    c.close(CloseCode::NORMAL, "bye").unwrap();
    assert_eq!(read_close(&mut s), Some(1000));
    // A reserved opcode where the answer should be.
    s.write_all(&frame(0x83, b"no")).unwrap();
    // Nothing more on the wire: no second close frame, then the end.
    let mut after = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut after);
    assert!(after.is_empty(), "sent after its close: {after:?}");
    drop(s);
    let (_, close, error) = expect_disconnect(&server);
    assert_eq!(close.code, CloseCode::ABNORMAL, "{close:?}");
    assert!(matches!(error, Some(Error::Protocol(_))), "{error:?}");
    assert!(
        server.stats().protocol_errors.is_empty(),
        "{:?}",
        server.stats()
    );
}

/// Closes crossing: the server's `close()` while the client's Close is on
/// its way. Whichever the server sees first, the client gets a close frame
/// before the connection ends (RFC 6455 section 5.5.1: an endpoint that
/// receives a Close sends one back if it has not sent one), and `close()`
/// either queues it or says the connection was already closing. Was a
/// bug: `close()` marked the connection closing, let go of its lock, and
/// only then queued its frame; a peer's Close read in between was taken
/// for the answer to it, and the connection torn down with no close frame
/// sent.
#[test]
fn closes_crossing_always_leave_the_client_a_close_frame() {
    let server = WebSocketServer::builder()
        .workers(2)
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let mut missing = 0;
    for round in 0..200 {
        let mut s = raw_ws(addr);
        let c = expect_connect(&server);
        let closer = std::thread::spawn(move || c.close(CloseCode::new(4000), "server"));
        s.write_all(&frame(0x88, &close_payload(4001, "client")))
            .unwrap();
        let result = closer.join().unwrap();
        assert!(
            matches!(result, Ok(()) | Err(Error::Closed)),
            "round {round}: {result:?}"
        );
        let mut got_close = false;
        while let Ok((first, _)) = try_read_frame(&mut s) {
            if first == 0x88 {
                got_close = true;
            }
        }
        if !got_close {
            missing += 1;
        }
        let _ = expect_disconnect(&server);
    }
    assert_eq!(missing, 0, "connections that ended without our close frame");
}

/// Was a bug: a close asked for while one of the client's own closures
/// ran was only queued, for the job to write at its end; a closure slower
/// than `close_timeout` then ended in the close timing out, with neither
/// the close frame nor the message queued before it written (the client
/// saw its connection end with nothing). Now the close writes what is
/// queued at once.
#[test]
fn a_close_during_a_slow_closure_reaches_the_client_in_time() {
    let slot: std::sync::Arc<std::sync::Mutex<Option<enjent::Client>>> = Default::default();
    let kept = std::sync::Arc::clone(&slot);
    let server = WebSocketServer::builder()
        .workers(2)
        .close_timeout(Duration::from_secs(1))
        .on_connect(move |c| *kept.lock().unwrap() = Some(c.clone()))
        .on_message(|_, m| {
            if m.as_text() == Some("block") {
                std::thread::sleep(Duration::from_secs(2));
            }
        })
        .start("127.0.0.1:0")
        .unwrap();
    let mut s = raw_ws(server.local_addr());
    assert!(eventually(WAIT, || slot.lock().unwrap().is_some()));
    let c = slot.lock().unwrap().clone().unwrap();
    s.write_all(&frame(0x81, b"block")).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    c.send("x").unwrap();
    c.close(CloseCode::new(4000), "bye").unwrap();
    let (first, p) = read_frame(&mut s);
    assert_eq!((first, p.as_slice()), (0x81, &b"x"[..]));
    let (first, p) = read_frame(&mut s);
    assert_eq!(first, 0x88);
    assert_eq!(p, close_payload(4000, "bye"));
    s.write_all(&frame(0x88, &close_payload(4000, ""))).unwrap();
    assert!(closed_by_server(&mut s));
}

/// In the main-loop style, a client's Close that comes while the loop has
/// not taken its last messages is answered after the loop's replies to
/// them, as a closure's replies are: a crowd of clients each sending 200
/// messages and then Close (half of them with their FIN too) gets every
/// echo, in order, and then the answer. Before, the Close was answered as
/// soon as it was read, and the loop's replies to the messages before it
/// were refused (`Error::Closed`).
#[test]
fn a_close_behind_messages_is_answered_after_the_main_loops_replies() {
    crowd_ends_behind_a_slow_loop(true);
}

/// A client that ends its messages with its FIN and no Close (it sends no
/// more, but reads) gets the main loop's replies to them too, as a
/// closure's, before the server closes the connection: found by a review,
/// which saw such clients get none of their 300 echoes while every reply
/// of the loop was refused (`Error::Closed`).
#[test]
fn a_fin_behind_messages_waits_for_the_main_loops_replies() {
    crowd_ends_behind_a_slow_loop(false);
}

/// 20 clients each send 200 messages, then a Close (half of them with
/// their FIN too) or only their FIN, to a main loop slower than they
/// are; each must get every echo, in order, then the answer to its
/// Close, and then the end of the connection.
fn crowd_ends_behind_a_slow_loop(close: bool) {
    use std::net::Shutdown;
    const CLIENTS: usize = 20;
    const MESSAGES: u32 = 200;
    // A close timeout longer than the test: the ends come when the loop
    // has taken the messages, not when the wait for it runs out.
    let server = with_close_timeout(Duration::from_secs(30));
    let addr = server.local_addr();
    let started = Instant::now();
    let crowd: Vec<_> = (0..CLIENTS)
        .map(|i| {
            std::thread::spawn(move || {
                let mut s = raw_ws(addr);
                let mut out = Vec::new();
                for m in 0..MESSAGES {
                    out.extend(frame(0x82, &numbered(m, 16)));
                }
                if close {
                    out.extend(frame(0x88, &close_payload(1000, "bye")));
                }
                s.write_all(&out).unwrap();
                if !close || i % 2 == 1 {
                    s.shutdown(Shutdown::Write).unwrap();
                }
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                for m in 0..MESSAGES {
                    let (first, p) = read_frame(&mut s);
                    assert_eq!(first, 0x82, "client {i}, echo {m}");
                    assert_eq!(p, numbered(m, 16), "client {i}, echo {m}");
                }
                if close {
                    assert_eq!(read_close(&mut s), Some(1000), "client {i}");
                }
                assert!(closed_by_server(&mut s), "client {i}");
            })
        })
        .collect();
    // A loop slower than the clients: each one's end is read while most
    // of its messages still wait in the channel.
    let (mut refused, mut disconnects) = (0, 0);
    while disconnects < CLIENTS {
        match next(&server) {
            enjent::Event::Message { client, message } => {
                std::thread::sleep(Duration::from_micros(100));
                if client.send(message).is_err() {
                    refused += 1;
                }
            }
            enjent::Event::Disconnect {
                close: reported, ..
            } => {
                let code = if close {
                    CloseCode::NORMAL
                } else {
                    CloseCode::ABNORMAL
                };
                assert_eq!(reported.code, code);
                disconnects += 1;
            }
            _ => {}
        }
    }
    assert_eq!(refused, 0, "replies refused");
    for c in crowd {
        c.join().unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the ends waited for the close timeout: {:?}",
        started.elapsed()
    );
}

/// And that wait is at most `close_timeout`: a loop that does not take the
/// message does not keep a client that sent its FIN.
#[test]
fn a_fin_behind_messages_waits_for_the_main_loop_at_most_the_close_timeout() {
    let server = with_close_timeout(Duration::from_millis(500));
    let mut s = raw_ws(server.local_addr());
    let started = Instant::now();
    s.write_all(&frame(0x82, b"unanswered")).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert!(closed_by_server(&mut s));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
    late_reply_is_refused_then_disconnect(&server, CloseCode::ABNORMAL);
}

/// The loop comes back to a client that is gone: the reply it makes to
/// its message now is refused (nothing follows the end), and then comes
/// its `Disconnect`, with `code`.
fn late_reply_is_refused_then_disconnect(server: &WebSocketServer, code: CloseCode) {
    expect_connect(server);
    let (client, message) = expect_message(server);
    assert!(matches!(
        client.send(message).map_err(|e| e.into_error()),
        Err(Error::Closed)
    ));
    let (_, close, _) = expect_disconnect(server);
    assert_eq!(close.code, code);
}

/// The same when the loop has caught up: a message and the Close in one
/// packet (the message not yet in the channel when the Close is read),
/// one client after another, half with their FIN, each get the echo and
/// then the answer. And a client's `Connect` the loop holds does not
/// hold its answer: only messages are waited for.
#[test]
fn a_message_and_close_in_one_packet_get_the_echo_then_the_answer() {
    use std::net::Shutdown;
    let server = with_close_timeout(Duration::from_secs(30));
    let addr = server.local_addr();
    let started = Instant::now();
    let clients = std::thread::spawn(move || {
        for i in 0..20u32 {
            let mut s = raw_ws(addr);
            let mut out = frame(0x82, &numbered(i, 8));
            out.extend(frame(0x88, &close_payload(1000, "")));
            s.write_all(&out).unwrap();
            if i % 2 == 1 {
                s.shutdown(Shutdown::Write).unwrap();
            }
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            assert_eq!(read_frame(&mut s), (0x82, numbered(i, 8)), "client {i}");
            assert_eq!(read_close(&mut s), Some(1000), "client {i}");
        }
        // Held `Connect`: answered at once all the same.
        let mut s = raw_ws(addr);
        s.write_all(&frame(0x88, &close_payload(1000, ""))).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        assert_eq!(read_close(&mut s), Some(1000));
    });
    let (mut connects, mut disconnects) = (0, 0);
    // Until the last client's `Connect`, held while it closes.
    while connects < 21 || disconnects < 20 {
        match next(&server) {
            enjent::Event::Message { client, message } => {
                client.send(message).unwrap();
            }
            enjent::Event::Connect { .. } => connects += 1,
            enjent::Event::Disconnect { .. } => disconnects += 1,
            other => panic!("{other:?}"),
        }
    }
    clients.join().unwrap();
    assert!(started.elapsed() < Duration::from_secs(20));
    expect_disconnect(&server);
}

/// The answer that waits for the main loop waits at most `close_timeout`:
/// a loop that does not take the client's message for seconds does not
/// keep the client from its close answer.
#[test]
fn a_close_behind_messages_waits_for_the_main_loop_at_most_the_close_timeout() {
    let server = with_close_timeout(Duration::from_millis(500));
    let mut s = raw_ws(server.local_addr());
    let started = Instant::now();
    let mut out = frame(0x82, b"unanswered");
    out.extend(frame(0x88, &close_payload(1000, "")));
    s.write_all(&out).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(read_close(&mut s), Some(1000), "no echo, then the answer");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "answered after {took:?}"
    );
    assert!(closed_by_server(&mut s));
    // The loop comes back: the reply it makes now is refused, not sent
    // after our close frame.
    late_reply_is_refused_then_disconnect(&server, CloseCode::NORMAL);
}

/// The user's close while the answer waits (the loop fills the client's
/// queue to its hard limit and closes it; the client sent more messages,
/// then Close, and reads nothing): ours goes first, stuck behind the
/// replies, and the connection still ends within twice the close timeout
/// (the wait's, then the close's own), with its `Disconnect`.
#[test]
fn a_users_close_while_the_answer_waits_still_ends_the_connection() {
    let server = with_close_timeout(Duration::from_secs(2));
    let mut s = raw_ws_small_window(server.local_addr());
    let mut out = Vec::new();
    for m in 0..50 {
        out.extend(frame(0x82, &numbered(m, 1000)));
    }
    out.extend(frame(0x88, &close_payload(1000, "")));
    s.write_all(&out).unwrap();
    expect_connect(&server);
    let (client, _) = expect_message(&server);
    // Let the client's Close be read while its messages wait; then
    // replies until its queue is full, and our close behind them.
    std::thread::sleep(Duration::from_millis(200));
    let mut sent = 0;
    while client
        .send(enjent::Message::Binary(vec![7; 256 * 1024]))
        .is_ok()
    {
        sent += 1;
        assert!(sent < 1000, "the client's queue never filled");
    }
    client.close(CloseCode::GOING_AWAY, "bye").unwrap();
    let started = Instant::now();
    loop {
        match server.recv_timeout(Duration::from_secs(15)) {
            Ok(enjent::Event::Message { .. }) => {}
            Ok(enjent::Event::Disconnect { .. }) => break,
            other => panic!("expected the Disconnect, got {other:?}"),
        }
    }
    // The wait's 2 s, then at most the close's own 2 s.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}
