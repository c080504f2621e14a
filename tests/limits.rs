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
    let limit = 256 * 1024;
    let server = WebSocketServer::builder()
        .max_backpressure(limit)
        .start("127.0.0.1:0")
        .unwrap();
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
    match err {
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
    let report = server.broadcast(vec![1u8; 16 * 1024]);
    assert_eq!(report.dropped, 1, "{report:?}");
}
