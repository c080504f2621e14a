//! `stats()` counts what happened: handshakes, messages and bytes both
//! ways, refusals by status, protocol errors by close code, idle closes.

mod support;

use std::io::{Read, Write};
use std::time::Duration;

use enjent::WebSocketServer;
use support::*;

#[test]
fn counters_follow_a_scripted_session() {
    // `ws` is closed for idleness at the end. Its Disconnect must not come
    // while the script below still expects other events (or sends to it),
    // so the idle timeout leaves the script room on a loaded machine.
    let server = WebSocketServer::builder()
        .idle_timeout(Some(Duration::from_secs(5)))
        .ping_interval(None)
        .close_timeout(Duration::from_millis(200))
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    assert_eq!(server.stats(), enjent::Stats::default());

    // A raw client, so that every byte the server wrote can be counted.
    let mut ws = raw(addr);
    ws.write_all(REQUEST.as_bytes()).unwrap();
    let head = read_101(&mut ws);
    let c = expect_connect(&server);
    ws.write_all(&frame(0x81, b"12345")).unwrap();
    ws.write_all(&frame(0x82, &[0u8; 100])).unwrap();
    expect_message(&server);
    expect_message(&server);
    c.send("abc").unwrap();
    server.broadcast("xy");
    // Sends from this (non-pool) thread are written by a worker: wait
    // until the client has both, and the counters have caught up.
    let mut got = [0u8; 9];
    ws.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"\x81\x03abc\x81\x02xy");
    let written = (head.len() + got.len()) as u64;
    let deadline = std::time::Instant::now() + WAIT;
    while server.stats().bytes_out < written && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let s = server.stats();
    assert_eq!((s.connections, s.handshakes_accepted), (1, 1));
    assert_eq!((s.messages_in, s.bytes_in), (2, 105));
    assert_eq!(s.messages_out, 2);
    // Exactly the 101 response and the two frames: nothing counted twice,
    // nothing written uncounted.
    assert_eq!(s.bytes_out, written, "{s:?}");

    // Refusals by status.
    http(addr, REQUEST.replace("13", "8").as_bytes());
    http(addr, REQUEST.replace("GET", "PUT").as_bytes());
    // Protocol errors by code.
    let mut bad = raw_ws(addr);
    expect_connect(&server);
    bad.write_all(&frame(0x81, &[0xFF])).unwrap();
    assert_eq!(read_close(&mut bad), Some(1007));
    drop(bad);
    expect_disconnect(&server);
    let mut bad = raw_ws(addr);
    expect_connect(&server);
    bad.write_all(&[0x81, 0x01, b'x']).unwrap();
    assert_eq!(read_close(&mut bad), Some(1002));
    drop(bad);
    expect_disconnect(&server);

    // `ws` stays silent: it is closed for idleness.
    let (_, close, _) = expect_disconnect(&server);
    assert_eq!(close.code.as_u16(), 1001);
    let s = server.stats();
    assert_eq!(s.handshakes_refused.get(&426), Some(&1), "{s:?}");
    assert_eq!(s.handshakes_refused.get(&405), Some(&1), "{s:?}");
    assert_eq!(s.protocol_errors.get(&1007), Some(&1), "{s:?}");
    assert_eq!(s.protocol_errors.get(&1002), Some(&1), "{s:?}");
    assert_eq!(s.idle_timeouts, 1);
    assert_eq!(s.connections, 0);
    assert_eq!(s.handshakes_accepted, 3);
    assert_eq!(server.handle().stats(), s);
}

/// A publish counts one message out per subscriber it reached, and its
/// bytes once per subscriber, as each subscriber's socket took them; the
/// publishing client is left out, as `Client::publish` says.
#[test]
fn a_publish_counts_each_subscriber_it_reached() {
    let server = WebSocketServer::builder()
        .ping_interval(None)
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let mut socks = Vec::new();
    let mut heads = 0;
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut s = raw(addr);
        s.write_all(REQUEST.as_bytes()).unwrap();
        heads += read_101(&mut s).len() as u64;
        let c = expect_connect(&server);
        assert!(c.subscribe("news").unwrap());
        socks.push(s);
        clients.push(c);
    }
    let before = server.stats();
    assert_eq!((before.messages_out, before.bytes_out), (0, heads));
    // The first client publishes: the other three get it.
    let report = clients[0].publish("news", "hello");
    assert_eq!(report.written + report.queued, 3, "{report:?}");
    let mut got = [0u8; 7];
    for s in &mut socks[1..] {
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"\x81\x05hello");
    }
    // From the handle, all four get it.
    let report = server.publish("news", "hello");
    assert_eq!(report.written + report.queued, 4, "{report:?}");
    for s in &mut socks {
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"\x81\x05hello");
    }
    let want = heads + 7 * 7;
    assert!(
        eventually(WAIT, || server.stats().bytes_out == want),
        "{:?}",
        server.stats()
    );
    let s = server.stats();
    assert_eq!((s.messages_out, s.bytes_out), (7, want), "{s:?}");
    assert_eq!(s.topics, 1);
    // Nothing reached the publisher from its own publish.
    socks[0]
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut more = [0u8; 1];
    assert!(
        socks[0].read(&mut more).is_err(),
        "the publisher got its own publish"
    );
}
