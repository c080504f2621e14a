//! Closures registered on the builder run on pool workers, in order per
//! client, and a panicking closure closes only its client (1011).

mod support;

use std::sync::mpsc;
use std::time::Duration;

use enjent::{CloseCode, WebSocketServer};
use support::*;
use tungstenite::Message as Tm;

#[derive(Debug, PartialEq)]
enum Seen {
    Connect(u64),
    Message(u64, String),
    Disconnect(u64, u16),
}

#[test]
fn closures_see_connect_messages_disconnect_in_order() {
    let (tx, rx) = mpsc::channel();
    let (t1, t2, t3) = (tx.clone(), tx.clone(), tx);
    let server = WebSocketServer::builder()
        .on_connect(move |c| t1.send(Seen::Connect(c.id().as_u64())).unwrap())
        .on_message(move |c, m| {
            t2.send(Seen::Message(
                c.id().as_u64(),
                m.as_text().unwrap().to_owned(),
            ))
            .unwrap();
            c.send(m).unwrap();
        })
        .on_disconnect(move |c, close, _| {
            t3.send(Seen::Disconnect(c.id().as_u64(), close.code.as_u16()))
                .unwrap()
        })
        .start("127.0.0.1:0")
        .unwrap();
    let mut ws = client(server.local_addr());
    for i in 0..50 {
        ws.send(Tm::text(format!("m{i}"))).unwrap();
    }
    for i in 0..50 {
        assert_eq!(ws.read().unwrap(), Tm::text(format!("m{i}")));
    }
    ws.close(None).unwrap();
    let get = || rx.recv_timeout(WAIT).unwrap();
    let Seen::Connect(id) = get() else { panic!() };
    for i in 0..50 {
        assert_eq!(get(), Seen::Message(id, format!("m{i}")));
    }
    assert_eq!(get(), Seen::Disconnect(id, 1005));
    // Events that have closures never reach the channel.
    assert!(server.recv_timeout(Duration::from_millis(100)).is_err());
}

#[test]
fn a_panicking_closure_closes_its_client_with_1011_and_the_server_goes_on() {
    let server = WebSocketServer::builder()
        .on_message(|c, m| {
            if m.as_text() == Some("boom") {
                panic!("user code failed");
            }
            c.send(m).unwrap();
        })
        .queue_unhandled_events(true)
        .start("127.0.0.1:0")
        .unwrap();
    let mut bad = client(server.local_addr());
    let mut good = client(server.local_addr());
    // Both clients connected. Their Connect events are read before the
    // panic is provoked: a client's `Connect` is queued just after its
    // `101` is written, so the `Error` for the bad client's panic could
    // otherwise overtake the good client's `Connect`.
    assert!(matches!(next(&server), enjent::Event::Connect { .. }));
    assert!(matches!(next(&server), enjent::Event::Connect { .. }));
    bad.send(Tm::text("boom")).unwrap();
    match bad.read() {
        Ok(Tm::Close(Some(f))) => assert_eq!(u16::from(f.code), 1011),
        other => panic!("{other:?}"),
    }
    // Only the bad one was closed.
    for i in 0..10 {
        good.send(Tm::text(i.to_string())).unwrap();
        assert_eq!(good.read().unwrap(), Tm::text(i.to_string()));
    }
    // The panic is reported as an event, never on stderr.
    match next(&server) {
        enjent::Event::Error {
            client: Some(c),
            error: enjent::Error::HandlerPanicked { handler, message },
        } => {
            assert_eq!(
                (handler, message.as_str()),
                ("on_message", "user code failed")
            );
            assert_eq!(server.stats().handler_panics, 1);
            let _ = c;
        }
        other => panic!("expected the handler's panic, got {other:?}"),
    }
    drop(bad);
    match next(&server) {
        enjent::Event::Disconnect { close, .. } => {
            assert_eq!(close.code, CloseCode::INTERNAL_ERROR)
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(server.connections(), 1);
}

/// A closure that closes its client and then panics: the client gets the
/// closure's close, not a 1011 after it, and the `Disconnect` reports what
/// it would have without the panic. Before, it reported 1011 whenever the
/// client did not answer the close.
#[test]
fn a_panic_after_a_closures_own_close_leaves_that_close_and_its_report() {
    let (tx, rx) = mpsc::channel();
    let t2 = tx.clone();
    let server = WebSocketServer::builder()
        .on_message(move |c, m| {
            let text = m.as_text().unwrap().to_owned();
            tx.send(Seen::Message(c.id().as_u64(), text.clone()))
                .unwrap();
            c.close(CloseCode::new(4000), "bye").unwrap();
            if text == "then panic" {
                panic!("after its own close");
            }
        })
        .on_disconnect(move |c, close, _| {
            t2.send(Seen::Disconnect(c.id().as_u64(), close.code.as_u16()))
                .unwrap()
        })
        .close_timeout(Duration::from_millis(300))
        .start("127.0.0.1:0")
        .unwrap();
    let mut codes = Vec::new();
    for text in ["close", "then panic"] {
        let mut ws = client(server.local_addr());
        ws.send(Tm::text(text)).unwrap();
        // The wire has the closure's close, and nothing after it.
        match ws.read() {
            Ok(Tm::Close(Some(f))) => assert_eq!((u16::from(f.code), &*f.reason), (4000, "bye")),
            other => panic!("{text}: {other:?}"),
        }
        // The client never answers: the server gives up at close_timeout.
        let Seen::Message(id, _) = rx.recv_timeout(WAIT).unwrap() else {
            panic!()
        };
        match rx.recv_timeout(WAIT).unwrap() {
            Seen::Disconnect(d, code) if d == id => codes.push(code),
            other => panic!("{text}: {other:?}"),
        }
        drop(ws);
    }
    assert_eq!(
        codes[0], codes[1],
        "the panic changed the report: {codes:?}"
    );
    assert_eq!(codes[0], 1006);
    assert_eq!(server.stats().handler_panics, 1);
}

#[test]
fn closures_can_broadcast_through_the_client_handle() {
    let server = WebSocketServer::builder()
        .on_message(|c, m| {
            let report = c.server().broadcast(m);
            assert_eq!(report.dropped, 0);
        })
        .queue_unhandled_events(true)
        .start("127.0.0.1:0")
        .unwrap();
    let mut a = client(server.local_addr());
    let mut b = client(server.local_addr());
    // Both connected (their Connect events are in the channel).
    expect_connect(&server);
    expect_connect(&server);
    a.send(Tm::text("to all")).unwrap();
    assert_eq!(a.read().unwrap(), Tm::text("to all"));
    assert_eq!(b.read().unwrap(), Tm::text("to all"));
}
