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
        .ping_interval(Some(Duration::from_millis(100)))
        .idle_timeout(Some(Duration::from_millis(400)))
        .start("127.0.0.1:0")
        .unwrap();
    // tungstenite answers pings while reading.
    let mut ws = client(server.local_addr());
    let c = expect_connect(&server);
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    }
    let until = Instant::now() + Duration::from_millis(1200);
    while Instant::now() < until {
        match ws.read() {
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("connection ended: {e}"),
        }
    }
    assert!(
        c.is_open(),
        "three idle timeouts passed, but pongs kept it alive"
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
