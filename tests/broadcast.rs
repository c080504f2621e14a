//! A broadcast reaches every client once, and its report counts them.

mod support;

use enjent::Message;
use support::*;
use tungstenite::Message as Tm;

#[test]
fn broadcast_reaches_every_client() {
    let server = server();
    let mut clients: Vec<_> = (0..20).map(|_| client(server.local_addr())).collect();
    for _ in 0..20 {
        expect_connect(&server);
    }
    let report = server.broadcast("hello all");
    assert_eq!(report.written + report.queued, 20, "{report:?}");
    assert_eq!((report.dropped, report.closed), (0, 0));
    let report = server.handle().broadcast(Message::Binary(vec![1; 70_000]));
    assert_eq!(report.written + report.queued, 20, "{report:?}");
    for ws in &mut clients {
        assert_eq!(ws.read().unwrap(), Tm::text("hello all"));
        assert_eq!(ws.read().unwrap(), Tm::binary(vec![1u8; 70_000]));
    }
}

#[test]
fn broadcast_skips_closing_clients() {
    let server = server();
    let mut a = client(server.local_addr());
    let mut b = client(server.local_addr());
    let b_addr = b.get_ref().local_addr().unwrap();
    // Connect events of different clients may come in either order.
    let (c1, c2) = (expect_connect(&server), expect_connect(&server));
    let cb = if c1.peer_addr() == b_addr { c1 } else { c2 };
    cb.close(enjent::CloseCode::NORMAL, "").unwrap();
    let report = server.broadcast("after");
    assert_eq!(report.closed, 1, "{report:?}");
    assert_eq!(report.written + report.queued, 1);
    assert_eq!(a.read().unwrap(), Tm::text("after"));
    // The closing client's last frame is the close: nothing after it.
    match b.read() {
        Ok(Tm::Close(Some(f))) => assert_eq!(u16::from(f.code), 1000),
        other => panic!("expected the close, got {other:?}"),
    }
    match b.read() {
        Ok(m) => panic!("{m:?} after the close frame"),
        Err(tungstenite::Error::ConnectionClosed) => {}
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn a_large_broadcast_split_across_workers_reaches_everyone_once() {
    // Over a thousand clients: the broadcast is shared out in chunks.
    let server = enjent::WebSocketServer::builder()
        .workers(4)
        .start("127.0.0.1:0")
        .unwrap();
    let mut socks: Vec<_> = (0..1500).map(|_| raw_ws(server.local_addr())).collect();
    for _ in 0..1500 {
        expect_connect(&server);
    }
    let report = server.broadcast(vec![3u8; 100]);
    assert_eq!(report.written + report.queued, 1500, "{report:?}");
    for text in ["second", "x"] {
        let r = server.broadcast(text);
        assert_eq!(
            (r.written + r.queued, r.dropped, r.closed),
            (1500, 0, 0),
            "{r:?}"
        );
    }
    for s in &mut socks {
        assert_eq!(read_frame(s), (0x82, vec![3u8; 100]));
        assert_eq!(read_frame(s), (0x81, b"second".to_vec()));
        assert_eq!(read_frame(s), (0x81, b"x".to_vec()));
    }
}
