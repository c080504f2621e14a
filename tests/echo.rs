//! Messages of every kind and size come through byte-exact, in order.

mod support;

use std::io::Write;

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

/// Small payloads' buffers are reused from one message to the next on a
/// worker, whichever client sent them (a reply's, or a pong's, once its
/// bytes are copied into a queue): many clients pipelining small messages
/// of sizes close to each other (so that a buffer is reused often), text
/// with multi-byte characters and binary, each masked with a key of its
/// own, with pings among them, get every echo and every pong back as they
/// sent it, with no byte of an earlier message, theirs or another's.
/// With closures (the replies copied on the workers) and with a main loop
/// (the pongs copied on the workers, the replies on the loop's thread).
#[test]
fn reused_message_buffers_carry_no_earlier_bytes() {
    let closures = enjent::WebSocketServer::builder()
        .on_message(|c, m| {
            c.send(m).unwrap();
        })
        .start("127.0.0.1:0")
        .unwrap();
    echo_small_messages_from_many_clients(closures.local_addr());
    let main_loop = server();
    let addr = main_loop.local_addr();
    let clients = std::thread::spawn(move || echo_small_messages_from_many_clients(addr));
    while !clients.is_finished() {
        if let Ok(enjent::Event::Message { client, message }) = main_loop
            .events()
            .recv_timeout(std::time::Duration::from_millis(50))
        {
            client.send(message).unwrap();
        }
    }
    clients.join().unwrap();
}

/// 16 clients each pipeline 2,000 small messages and a ping after every
/// fifth, and check every echo and every pong, each in order, byte for
/// byte.
fn echo_small_messages_from_many_clients(addr: std::net::SocketAddr) {
    const CLIENTS: u32 = 16;
    const EACH: u32 = 2_000;
    // Message `i` of client `c`: 0 to 300 bytes, mostly 20 to 60, text
    // (with two-byte characters) on odd `i`, binary on even; a ping of
    // 0 to 60 bytes after every fifth.
    let message = |c: u32, i: u32| -> (u8, Vec<u8>) {
        let r = mix((u64::from(c) << 32) | u64::from(i));
        let size = match r % 50 {
            0 => 0,
            1 => 300,
            2..=5 => (r >> 8) as usize % 256,
            _ => 20 + (r >> 8) as usize % 40,
        };
        if i % 2 == 1 {
            let s: String = (0..size)
                .map(|k| {
                    if k % 7 == 3 {
                        'é'
                    } else {
                        char::from(b'a' + ((k as u32 + c * 3 + i) % 26) as u8)
                    }
                })
                .collect();
            (0x81, s.into_bytes())
        } else {
            let mut p = numbered(i, size);
            for b in p.iter_mut().skip(4) {
                *b ^= c as u8;
            }
            (0x82, p)
        }
    };
    let ping = |c: u32, i: u32| numbered(i ^ c, (mix(u64::from(i)) % 61) as usize);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            std::thread::spawn(move || {
                let mut s = raw_ws(addr);
                let mut reader = s.try_clone().unwrap();
                // Echoes in order, and pongs in order (a main loop's
                // echoes come after pongs its workers answered since).
                let check = std::thread::spawn(move || {
                    let (mut i, mut pong) = (0, 4);
                    while i < EACH || pong < EACH {
                        let (op, p) = try_read_frame(&mut reader).unwrap();
                        if op == 0x8A {
                            assert!(pong < EACH, "client {c}: a pong too many");
                            assert!(p == ping(c, pong), "client {c}, pong {pong}");
                            pong += 5;
                            continue;
                        }
                        let (want_op, want) = message(c, i);
                        assert_eq!(op, want_op, "client {c}, message {i}");
                        assert!(p == want, "client {c}, message {i}: {} bytes", p.len());
                        i += 1;
                    }
                });
                let mut wire = Vec::new();
                for i in 0..EACH {
                    let (op, p) = message(c, i);
                    let key = (mix(u64::from(c * EACH + i)) as u32).to_be_bytes();
                    wire.extend(frame_with_key(op, &p, key));
                    if i % 5 == 4 {
                        wire.extend(frame(0x89, &ping(c, i)));
                    }
                    if wire.len() > 16 * 1024 {
                        s.write_all(&wire).unwrap();
                        wire.clear();
                    }
                }
                s.write_all(&wire).unwrap();
                check.join().unwrap();
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
}
