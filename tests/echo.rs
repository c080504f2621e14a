//! Messages of every kind and size come through byte-exact, in order.

mod support;

use enjent::Message;
use support::*;
use tungstenite::Message as Tm;

#[test]
fn text_and_binary_round_trip_through_the_event_loop() {
    let server = server();
    let mut ws = client(server.local_addr());
    let c = expect_connect(&server);
    ws.send(Tm::text("héllo wörld")).unwrap();
    ws.send(Tm::binary(vec![0u8, 1, 2, 255])).unwrap();
    ws.send(Tm::text("")).unwrap();
    let (from, m) = expect_message(&server);
    assert_eq!(from.id(), c.id());
    assert_eq!(m, Message::Text("héllo wörld".into()));
    c.send(m).unwrap();
    let (_, m) = expect_message(&server);
    assert_eq!(m, Message::Binary(vec![0, 1, 2, 255]));
    c.send(m).unwrap();
    let (_, m) = expect_message(&server);
    assert_eq!(m, Message::Text(String::new()));
    c.send(m).unwrap();
    assert_eq!(ws.read().unwrap(), Tm::text("héllo wörld"));
    assert_eq!(ws.read().unwrap(), Tm::binary(vec![0u8, 1, 2, 255]));
    assert_eq!(ws.read().unwrap(), Tm::text(""));
}

#[test]
fn large_messages_both_ways() {
    let server = enjent::WebSocketServer::builder()
        .max_message_size(8 << 20)
        .on_message(|c, m| {
            c.send(m).unwrap();
        })
        .start("127.0.0.1:0")
        .unwrap();
    let mut ws = client(server.local_addr());
    for size in [125usize, 126, 65535, 65536, 1 << 20, 5 << 20] {
        let payload: Vec<u8> = (0..size).map(|i| (i * 7 % 256) as u8).collect();
        ws.send(Tm::binary(payload.clone())).unwrap();
        match ws.read().unwrap() {
            Tm::Binary(b) => assert!(b[..] == payload[..], "size {size}"),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn fragmented_message_with_interleaved_ping_from_raw_socket() {
    let server = server();
    let mut s = raw_ws(server.local_addr());
    expect_connect(&server);
    use std::io::Write;
    let mut wire = frame(0x01, "frag".as_bytes());
    wire.extend(frame(0x89, b"mid"));
    wire.extend(frame(0x00, "men".as_bytes()));
    wire.extend(frame(0x80, "ted €".as_bytes()));
    // Dribble it out a few bytes at a time.
    for chunk in wire.chunks(3) {
        s.write_all(chunk).unwrap();
        s.flush().unwrap();
    }
    let (first, p) = read_frame(&mut s);
    assert_eq!(
        (first, p.as_slice()),
        (0x8A, &b"mid"[..]),
        "pong echoes the ping payload"
    );
    let (_, m) = expect_message(&server);
    assert_eq!(m.as_text(), Some("fragmented €"));
}

#[test]
fn many_messages_pipelined_arrive_in_order() {
    let server = enjent::WebSocketServer::builder()
        .on_message(|c, m| {
            c.send(m).unwrap();
        })
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            std::thread::spawn(move || {
                let mut ws = client(addr);
                for i in 0..500 {
                    let body = format!("{t}:{i}:{}", "x".repeat(i % 300));
                    ws.write(Tm::text(body)).unwrap();
                }
                ws.flush().unwrap();
                for i in 0..500 {
                    let want = format!("{t}:{i}:{}", "x".repeat(i % 300));
                    assert_eq!(ws.read().unwrap(), Tm::text(want));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}
