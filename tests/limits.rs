//! Connection limit (503 over it, recovering as clients leave) and
//! per-client backpressure (a bounded queue, reported, never a silent
//! drop).

mod support;

use std::time::{Duration, Instant};

use enjent::{Error, SendStatus, WebSocketServer};
use support::*;

#[test]
fn over_max_connections_gets_503_and_the_count_recovers() {
    let server = WebSocketServer::builder()
        .max_connections(3)
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let mut held: Vec<_> = (0..3).map(|_| client(addr)).collect();
    for _ in 0..3 {
        expect_connect(&server);
    }
    let refused = http(addr, REQUEST.as_bytes());
    assert!(refused.starts_with("HTTP/1.1 503 "), "{refused}");
    held.pop().unwrap().close(None).unwrap();
    expect_disconnect(&server);
    // The slot is free again.
    let _again = client(addr);
    expect_connect(&server);
}

#[test]
fn a_client_that_does_not_read_hits_backpressure_and_others_do_not_notice() {
    let server = WebSocketServer::builder()
        .max_message_size(64 * 1024)
        .high_water(32 * 1024)
        .low_water(8 * 1024)
        .max_backpressure(256 * 1024)
        .start("127.0.0.1:0")
        .unwrap();
    let limit = server.config().max_backpressure();
    assert_eq!(limit, 256 * 1024, "the limit asked for is above the floor");
    let addr = server.local_addr();
    let _stuck = raw_ws(addr); // never reads
    let stuck = expect_connect(&server);
    let mut ws = client(addr);
    let good = expect_connect(&server);
    let chunk = vec![0u8; 16 * 1024];
    let mut queued_seen = false;
    let start = Instant::now();
    let err = loop {
        match stuck.send(chunk.clone()) {
            Ok(SendStatus::Queued) => queued_seen = true,
            Ok(SendStatus::Written) => {}
            Err(e) => break e,
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the queue never filled"
        );
    };
    assert!(queued_seen);
    match err.into_error() {
        Error::Backpressure { queued, limit: l } => {
            assert_eq!(l, limit);
            assert!(queued <= limit, "queue {queued} over limit {limit}");
        }
        other => panic!("{other:?}"),
    }
    // The stuck client does not slow down the good one.
    for i in 0..100 {
        good.send(format!("{i}")).unwrap();
        assert_eq!(
            ws.read().unwrap(),
            tungstenite::Message::text(i.to_string())
        );
    }
    // The kernel's buffers for the stuck client can grow meanwhile and take
    // what was queued: fill the queue up to the limit again, then
    // broadcast at once.
    loop {
        match stuck.send(chunk.clone()) {
            Ok(_) => {}
            Err(e) if matches!(e.error(), Error::Backpressure { .. }) => break,
            Err(e) => panic!("{e:?}"),
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no refill");
    }
    let report = server.broadcast(vec![1u8; 16 * 1024]);
    assert_eq!(report.dropped, 1, "{report:?}");
}

#[test]
fn a_client_that_pings_without_reading_stops_being_read() {
    // Each ping asks for a pong; a client that never reads would make its
    // queue grow forever. Over the limit the server stops reading it, so
    // its own writes back up.
    let server = WebSocketServer::builder()
        .max_backpressure(8 * 1024)
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let mut s = raw_ws(addr);
    expect_connect(&server);
    s.set_nonblocking(true).unwrap();
    let ping = frame(0x89, &[b'p'; 125]);
    let mut sent = 0usize;
    let mut stalled_at = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while sent < 256 << 20 && Instant::now() < deadline {
        use std::io::Write;
        match s.write(&ping) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Give the server time to drain, if it were going to.
                std::thread::sleep(Duration::from_millis(200));
                if s.write(&ping).is_err() {
                    stalled_at = Some(sent);
                    break;
                }
            }
            Err(e) => panic!("{e}"),
        }
    }
    let stalled_at = stalled_at.expect("the server kept reading a client that does not read");
    assert!(
        stalled_at < 64 << 20,
        "stalled only after {stalled_at} bytes"
    );
    // Others are unaffected.
    let mut ws = client(addr);
    let c = expect_connect(&server);
    c.send("fine").unwrap();
    assert_eq!(ws.read().unwrap(), tungstenite::Message::text("fine"));
}
