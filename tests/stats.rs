//! `stats()` counts what happened: handshakes, messages and bytes both
//! ways, refusals by status, protocol errors by close code, idle closes.

mod support;

use std::io::Write;
use std::time::Duration;

use enjent::WebSocketServer;
use support::*;
use tungstenite::Message as Tm;

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

    let mut ws = client(addr);
    let c = expect_connect(&server);
    ws.send(Tm::text("12345")).unwrap();
    ws.send(Tm::binary(vec![0u8; 100])).unwrap();
    expect_message(&server);
    expect_message(&server);
    c.send("abc").unwrap();
    server.broadcast("xy");
    // Sends from this (non-pool) thread are written by a worker: wait
    // until the client has both, and the counters have caught up.
    assert_eq!(ws.read().unwrap(), Tm::text("abc"));
    assert_eq!(ws.read().unwrap(), Tm::text("xy"));
    let deadline = std::time::Instant::now() + WAIT;
    while server.stats().bytes_out < 129 + 5 + 4 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let s = server.stats();
    assert_eq!((s.connections, s.handshakes_accepted), (1, 1));
    assert_eq!((s.messages_in, s.bytes_in), (2, 105));
    assert_eq!(s.messages_out, 2);
    assert!(s.bytes_out >= 129 + 5 + 4, "{s:?}"); // 101 response and two frames

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
