//! Pings: answered automatically, sent on demand, sent to silent clients;
//! clients silent past the idle timeout are closed.

mod support;

use std::io::Write;
use std::time::{Duration, Instant};

use enjent::{CloseCode, Error, WebSocketServer};
use support::*;

#[test]
fn ping_is_answered_with_the_same_payload() {
    let server = server();
    let mut s = raw_ws(server.local_addr());
    expect_connect(&server);
    s.write_all(&frame(0x89, b"are you there")).unwrap();
    assert_eq!(read_frame(&mut s), (0x8A, b"are you there".to_vec()));
    s.write_all(&frame(0x89, &[7; 125])).unwrap();
    assert_eq!(read_frame(&mut s), (0x8A, vec![7; 125]));
}

#[test]
fn ping_on_demand_reaches_the_client() {
    let server = server();
    let mut s = raw_ws(server.local_addr());
    let c = expect_connect(&server);
    server.handle().ping(c.id()).unwrap();
    assert_eq!(read_frame(&mut s), (0x89, vec![]));
    c.ping().unwrap();
    assert_eq!(read_frame(&mut s), (0x89, vec![]));
}

#[test]
fn silent_client_is_pinged_then_closed_for_idleness() {
    let server = WebSocketServer::builder()
        .ping_interval(Some(Duration::from_millis(200)))
        .idle_timeout(Some(Duration::from_millis(700)))
        .close_timeout(Duration::from_millis(300))
        .start("127.0.0.1:0")
        .unwrap();
    // The server times the silence from the handshake, so `start` comes
    // before it: taken after the Connect event, it could lag the server's
    // clock by more than the bounds' slack on a loaded machine, and the
    // ping or the close would look early.
    let start = Instant::now();
    let mut s = raw_ws(server.local_addr());
    expect_connect(&server);
    // A ping comes after ~200 ms of silence; we do not answer it.
    assert_eq!(read_frame(&mut s), (0x89, vec![]));
    assert!(
        start.elapsed() >= Duration::from_millis(150),
        "{:?}",
        start.elapsed()
    );
    // Then the idle close, with 1001.
    assert_eq!(read_close(&mut s), Some(1001));
    assert!(
        start.elapsed() >= Duration::from_millis(600),
        "{:?}",
        start.elapsed()
    );
    let (_, close, error) = expect_disconnect(&server);
    assert_eq!(close.code, CloseCode::GOING_AWAY);
    assert_eq!(close.reason, "idle timeout");
    assert!(matches!(error, Some(Error::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut));
}

#[test]
fn a_client_answering_pings_stays_connected() {
    let server = WebSocketServer::builder()
        .ping_interval(Some(Duration::from_millis(200)))
        .idle_timeout(Some(Duration::from_secs(2)))
        .start("127.0.0.1:0")
        .unwrap();
    // tungstenite answers pings while reading. An idle timeout ten pings
    // long leaves room for a loaded machine to delay this thread.
    let mut ws = client(server.local_addr());
    let c = expect_connect(&server);
    ws.get_ref()
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        match ws.read() {
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("connection ended: {e}"),
        }
    }
    assert!(
        c.is_open(),
        "two and a half idle timeouts passed, but pongs kept it alive"
    );
    assert!(server.try_recv().is_err(), "no Disconnect");
}

/// After a keepalive ping, the connection's next event is taken for its
/// pong, and the readiness loop may pause to gather more pongs. Whatever
/// the client sends instead of, or along with, the pong must still be
/// delivered.
#[test]
fn messages_sent_after_a_keepalive_ping_are_delivered() {
    let server = WebSocketServer::builder()
        .ping_interval(Some(Duration::from_millis(100)))
        .start("127.0.0.1:0")
        .unwrap();
    let mut s = raw_ws(server.local_addr());
    expect_connect(&server);
    for round in 0..3u8 {
        assert_eq!(read_frame(&mut s), (0x89, vec![]));
        let text = format!("round {round}");
        let mut bytes = Vec::new();
        // Round 1 answers with a message alone, the others with the pong
        // and a message in one write.
        if round != 1 {
            bytes.extend(frame(0x8A, b""));
        }
        bytes.extend(frame(0x81, text.as_bytes()));
        s.write_all(&bytes).unwrap();
        let (_, message) = expect_message(&server);
        assert_eq!(message, enjent::Message::Text(text));
    }
}

/// Deadlines are found by sweeping every slot, a chunk of 1,024 at a time.
/// A crowd over three chunks: every silent client is pinged and then
/// closed for idleness, and no client that keeps talking is closed, while
/// the talkers' jobs book their deadlines during the sweeps. Silent raw
/// sockets are the cheapest thing a hostile crowd can hold open.
#[test]
fn a_crowd_of_silent_clients_is_pinged_and_closed_and_talkers_are_not() {
    const SILENT: usize = 1_500;
    const TALKERS: usize = 1_000;
    let server = WebSocketServer::builder()
        .ping_interval(Some(Duration::from_millis(400)))
        .idle_timeout(Some(Duration::from_millis(1_500)))
        .close_timeout(Duration::from_millis(300))
        .max_connections(SILENT + TALKERS)
        .max_connections_per_ip(SILENT + TALKERS)
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let hello = frame(0x81, b"still here");
    let mut silent = Vec::new();
    let mut talkers = Vec::new();
    // Talkers talk from the start (every 100 ms of the setup), so that
    // a slow setup on a loaded machine cannot make them idle.
    let mut last_talk = Instant::now();
    for i in 0..SILENT + TALKERS {
        let s = raw_ws(addr);
        if i % 5 < 3 {
            silent.push(s);
        } else {
            talkers.push(s);
        }
        while server.try_recv().is_ok() {}
        if last_talk.elapsed() >= Duration::from_millis(100) {
            for s in &mut talkers {
                s.write_all(&hello).unwrap();
            }
            last_talk = Instant::now();
        }
    }
    assert_eq!((silent.len(), talkers.len()), (SILENT, TALKERS));
    // Talk every 150 ms (well inside the 400 ms ping interval) for 3 s,
    // past two idle timeouts, taking the events as they come.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        for s in &mut talkers {
            s.write_all(&hello).unwrap();
        }
        let round = Instant::now();
        while round.elapsed() < Duration::from_millis(150) {
            if server.recv_timeout(Duration::from_millis(10)).is_err() {
                continue;
            }
        }
    }
    // Every silent client: a ping, then the idle close with 1001.
    for (i, s) in silent.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(read_frame(s), (0x89, vec![]), "silent client {i}");
        assert_eq!(read_close(s), Some(1001), "silent client {i}");
    }
    // No talker was closed: whatever it was sent (a ping at most, if this
    // thread fell behind), none of it is a close.
    for (i, s) in talkers.iter_mut().enumerate() {
        s.set_nonblocking(true).unwrap();
        loop {
            match try_read_frame(s) {
                Ok((op, _)) => assert_ne!(op & 0x0F, 0x8, "talker {i} was closed"),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("talker {i}: {e}"),
            }
        }
    }
    assert!(server.stats().idle_timeouts >= SILENT as u64);
    assert_eq!(
        server.stats().idle_timeouts,
        SILENT as u64,
        "only the silent"
    );
}

/// A silent client gets one ping, not one per ping interval, before it is
/// closed for idleness.
#[test]
fn an_unanswered_ping_is_not_repeated_before_the_idle_close() {
    let server = WebSocketServer::builder()
        .ping_interval(Some(Duration::from_millis(100)))
        .idle_timeout(Some(Duration::from_millis(1_000)))
        .close_timeout(Duration::from_millis(200))
        .start("127.0.0.1:0")
        .unwrap();
    let mut s = raw_ws(server.local_addr());
    expect_connect(&server);
    let mut pings = 0;
    let code = loop {
        let (first, p) = read_frame(&mut s);
        match first {
            0x89 => pings += 1,
            0x88 => break u16::from_be_bytes([p[0], p[1]]),
            other => panic!("unexpected frame {other:#x}"),
        }
    };
    assert_eq!(code, 1001);
    assert_eq!(pings, 1, "one ping over ten ping intervals of silence");
}

/// Was a bug: after closing a client for idleness the server stopped
/// reading it, as if the socket had failed. The client's answering Close
/// was never read: the connection waited out the close timeout, reported
/// with our 1001 instead of the client's code (RFC 6455 section 7.1.5),
/// and the unread input woke it again and again meanwhile, a worker and
/// the readiness loop spinning for the whole close timeout.
#[test]
fn an_idle_close_reads_the_answering_close() {
    let server = WebSocketServer::builder()
        .ping_interval(None)
        .idle_timeout(Some(Duration::from_millis(300)))
        // Far beyond the reads' timeout: only an EOF that follows the
        // answer, not one at the close timeout, lands within it.
        .close_timeout(Duration::from_secs(60))
        .start("127.0.0.1:0")
        .unwrap();
    let mut s = raw_ws(server.local_addr());
    let _ = expect_connect(&server);
    let (first, payload) = read_frame(&mut s);
    assert_eq!(first, 0x88);
    assert_eq!(&payload[..2], &1001u16.to_be_bytes());
    // A message, then the answer, in one write.
    let mut answer = frame(0x81, b"last words");
    answer.extend(frame(0x88, &close_payload(4001, "bye")));
    s.write_all(&answer).unwrap();
    // The server closes the TCP connection once both closes are exchanged.
    assert!(closed_by_server(&mut s), "no EOF");
    let (_, m) = expect_message(&server);
    assert_eq!(m.as_text(), Some("last words"));
    let (_, close, error) = expect_disconnect(&server);
    assert_eq!(close.code, CloseCode::new(4001), "{close:?} {error:?}");
    assert!(
        matches!(&error, Some(Error::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut),
        "{error:?}"
    );
}

/// Time a handler takes is not its client's idleness: the client is seen
/// as of the end of its message's handling, and the pass's timers take
/// that time. Each message here is handled for 600 ms, against an idle
/// timeout of 400 ms, and the client sends its next 100 ms after each
/// echo: it is never idle for 400 ms, and is not closed.
#[test]
fn time_in_a_slow_handler_is_not_its_clients_idleness() {
    let server = WebSocketServer::builder()
        .ping_interval(None)
        .idle_timeout(Some(Duration::from_millis(400)))
        .on_message(|c, m| {
            std::thread::sleep(Duration::from_millis(600));
            let _ = c.send(m);
        })
        .start("127.0.0.1:0")
        .unwrap();
    let mut s = raw_ws(server.local_addr());
    for i in 0..3u8 {
        s.write_all(&frame(0x82, &[i])).unwrap();
        assert_eq!(read_frame(&mut s), (0x82, vec![i]), "echo {i}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(server.stats().idle_timeouts, 0);
}
