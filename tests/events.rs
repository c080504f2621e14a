//! A client's events arrive in order (Connect, messages, Disconnect) and
//! the Disconnect carries the close code and reason.

mod support;

use enjent::{CloseCode, Error, Event, Message};
use support::*;
use tungstenite::Message as Tm;
use tungstenite::protocol::CloseFrame as TCloseFrame;
use tungstenite::protocol::frame::coding::CloseCode as TCode;

#[test]
fn connect_messages_disconnect_in_order_with_close_reason() {
    let server = server();
    let mut ws = client(server.local_addr());
    for i in 0..100 {
        ws.send(Tm::text(i.to_string())).unwrap();
    }
    ws.close(Some(TCloseFrame {
        code: TCode::Library(4000),
        reason: "done here".into(),
    }))
    .unwrap();
    let c = expect_connect(&server);
    for i in 0..100 {
        let (from, m) = expect_message(&server);
        assert_eq!(from.id(), c.id());
        assert_eq!(m, Message::Text(i.to_string()));
    }
    let (from, close, error) = expect_disconnect(&server);
    assert_eq!(from.id(), c.id());
    assert_eq!(close.code, CloseCode::new(4000));
    assert_eq!(close.reason, "done here");
    assert!(error.is_none(), "{error:?}");
    // The server echoed the code, once, then closed the TCP connection.
    let mut echoed = 0;
    loop {
        match ws.read() {
            Ok(Tm::Close(Some(f))) => {
                assert_eq!(f.code, TCode::Library(4000));
                echoed += 1;
            }
            Ok(other) => panic!("{other:?} instead of the echoed close"),
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(echoed, 1, "the close code was not echoed");
    // Sending to a gone client is an error, not a panic.
    assert!(matches!(
        from.send("late").map_err(|e| e.into_error()),
        Err(Error::Closed)
    ));
    assert!(matches!(
        server.send(c.id(), "late").map_err(|e| e.into_error()),
        Err(Error::Closed)
    ));
}

#[test]
fn abrupt_drop_is_reported_as_1006_with_an_io_error() {
    let server = server();
    let mut s = raw_ws(server.local_addr());
    let c = expect_connect(&server);
    use std::io::Write;
    s.write_all(&frame(0x81, b"before the drop")).unwrap();
    drop(s);
    let (_, m) = expect_message(&server);
    assert_eq!(m.as_text(), Some("before the drop"));
    let (from, close, error) = expect_disconnect(&server);
    assert_eq!(from.id(), c.id());
    assert_eq!(close.code, CloseCode::ABNORMAL);
    assert!(matches!(error, Some(Error::Io(_))), "{error:?}");
}

#[test]
fn ids_are_unique_and_never_reused() {
    let server = server();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..20 {
        let mut ws = client(server.local_addr());
        let c = expect_connect(&server);
        assert!(seen.insert(c.id()), "id {} reused", c.id());
        // The new client most likely holds the slot the last one left:
        // only its own id finds it.
        assert_eq!(server.client(c.id()).map(|x| x.id()), Some(c.id()));
        for old in seen.iter().filter(|id| **id != c.id()) {
            assert!(server.client(*old).is_none(), "{old} found {}", c.id());
            assert!(server.send(*old, "not for you").is_err());
        }
        ws.close(None).unwrap();
        expect_disconnect(&server);
    }
}

#[test]
fn an_ipv6_peer_keeps_its_whole_address() {
    if let Err(e) = std::net::TcpListener::bind("[::1]:0") {
        // Skipped only where the loopback has no IPv6 address at all (as in
        // containers with IPv6 off); where it has one, a failed bind is a
        // failure, not a skip.
        let lo_has_v6 = std::fs::read_to_string("/proc/net/if_inet6")
            .is_ok_and(|t| t.lines().any(|l| l.split_whitespace().last() == Some("lo")));
        assert!(!lo_has_v6, "[::1] is configured but binding it failed: {e}");
        eprintln!("skipped: this machine has no IPv6 loopback");
        return;
    }
    let server = enjent::WebSocketServer::builder()
        .workers(2)
        .start("[::1]:0")
        .expect("start on ::1");
    let mut ws = client(server.local_addr());
    let c = expect_connect(&server);
    let local = ws.get_ref().local_addr().unwrap();
    assert!(local.is_ipv6());
    assert_eq!(c.peer_addr(), local);
    assert_eq!(c.ip(), local.ip());
    assert_eq!(c.forwarded_addr(), None);
    assert_eq!(c.protocol(), None);
    assert!(format!("{c:?}").contains(&local.to_string()));
    ws.send(Tm::text("over v6")).unwrap();
    let (_, m) = expect_message(&server);
    assert_eq!(m.as_text(), Some("over v6"));
}

#[test]
fn peer_address_and_lookup_by_id() {
    let server = server();
    let ws = client(server.local_addr());
    let c = expect_connect(&server);
    let local = ws.get_ref().local_addr().unwrap();
    assert_eq!(c.peer_addr(), local);
    assert_eq!(server.client(c.id()).map(|x| x.id()), Some(c.id()));
    assert_eq!(server.connections(), 1);
    assert!(c.is_open());
    drop(ws);
    assert!(matches!(next(&server), Event::Disconnect { .. }));
    assert!(server.client(c.id()).is_none());
    assert!(!c.is_open());
}
