//! permessage-deflate (RFC 7692) over real sockets: negotiation, both
//! directions, fragmented and broadcast messages, context takeover, and
//! the bounds on what a compressed message may expand to.
//!
//! The client side is written by hand with flate2, since the test clients
//! at hand do not speak the extension. Run with `--features deflate`.

#![cfg(feature = "deflate")]

mod support;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};

use enjent::{Compression, Error, Message, WebSocketServer};
use flate2::{Compress, Decompress, FlushCompress};
use support::deflate::*;
use support::*;

fn echo_server(configure: impl FnOnce(enjent::Builder) -> enjent::Builder) -> WebSocketServer {
    configure(WebSocketServer::builder().workers(2).on_message(|c, m| {
        let _ = c.send(m);
    }))
    .start("127.0.0.1:0")
    .unwrap()
}

/// A client past an upgrade that agreed on compression, answered
/// `answer`, with a receive window of a few KiB: what it has not read
/// waits in the server's queue, not in the kernel.
fn small_window_with_compression(addr: SocketAddr, answer: &str) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&addr.into()).unwrap();
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let req = REQUEST.replace("\r\n\r\n", &format!("\r\n{PDE}\r\n\r\n"));
    s.write_all(req.as_bytes()).unwrap();
    let head = read_101(&mut s);
    assert_eq!(extensions(&head), Some(answer));
    s
}

fn text_block(n: usize) -> String {
    "All work and no play makes Jack a dull boy. "
        .repeat(n / 44 + 1)
        .chars()
        .take(n)
        .collect()
}

#[test]
fn negotiation_answers_and_declines() {
    let server = echo_server(|b| b);
    let addr = server.local_addr();
    let (head, _s) = upgrade(addr, &format!("{PDE}; client_max_window_bits\r\n"));
    assert_eq!(
        extensions(&head),
        Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
    );
    let (head, _s) = upgrade(addr, &format!("{PDE}; server_max_window_bits=10\r\n"));
    assert!(
        extensions(&head)
            .unwrap()
            .ends_with("; server_max_window_bits=10"),
        "{head}"
    );
    // An offer we cannot honour is declined; the next one is taken.
    let (head, _s) = upgrade(
        addr,
        &format!("{PDE}; mystery=1, permessage-deflate; server_max_window_bits=12\r\n"),
    );
    assert!(extensions(&head).unwrap().ends_with("=12"), "{head}");
    // A 256-byte window is accepted, and honoured by never compressing:
    // zlib cannot produce one.
    let (head, mut s) = upgrade(addr, &format!("{PDE}; server_max_window_bits=8\r\n"));
    assert!(extensions(&head).unwrap().ends_with("=8"), "{head}");
    let text = text_block(4000);
    s.write_all(&frame(0xC1, &deflate(text.as_bytes())))
        .unwrap();
    assert_eq!(read_frame(&mut s), (0x81, text.into_bytes()));
    let (head, _s) = upgrade(addr, &format!("{PDE}; server_max_window_bits=20\r\n"));
    assert_eq!(extensions(&head), None);
    let (head, _s) = upgrade(addr, "Sec-WebSocket-Extensions: x-webkit-deflate-frame\r\n");
    assert_eq!(extensions(&head), None);
    let (head, _s) = upgrade(addr, "");
    assert_eq!(extensions(&head), None);

    let off = echo_server(|b| b.compression(None));
    let (head, _s) = upgrade(off.local_addr(), &format!("{PDE}\r\n"));
    assert_eq!(extensions(&head), None);
}

#[test]
fn compressed_messages_both_ways() {
    let server = echo_server(|b| b);
    let (_h, mut s) = upgrade(server.local_addr(), &format!("{PDE}\r\n"));
    let text = text_block(5000);
    // A compressed text message in, and echoed back compressed.
    s.write_all(&frame(0xC1, &deflate(text.as_bytes())))
        .unwrap();
    let (first, payload) = read_frame(&mut s);
    assert_eq!(first, 0xC1, "FIN + RSV1 + text");
    assert!(payload.len() < text.len() / 10, "{}", payload.len());
    assert_eq!(inflate(&payload), text.as_bytes());

    // A short message goes out plain even if it came in compressed.
    s.write_all(&frame(0xC1, &deflate(b"hi"))).unwrap();
    assert_eq!(read_frame(&mut s), (0x81, b"hi".to_vec()));

    // Uncompressed messages are still fine on a deflate connection, and a
    // long incompressible one goes out plain.
    let mut x = 7u32;
    let noise: Vec<u8> = (0..3000)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect();
    s.write_all(&frame(0x82, &noise)).unwrap();
    assert_eq!(read_frame(&mut s), (0x82, noise));

    // Fragmented: RSV1 on the first frame only.
    let z = deflate(text.as_bytes());
    let (a, b) = z.split_at(z.len() / 2);
    s.write_all(&frame(0x42, a)).unwrap();
    s.write_all(&frame(0x89, b"ping")).unwrap();
    s.write_all(&frame(0x80, b)).unwrap();
    assert_eq!(read_frame(&mut s), (0x8A, b"ping".to_vec()));
    let (first, payload) = read_frame(&mut s);
    assert_eq!(first, 0xC2);
    assert_eq!(inflate(&payload), text.as_bytes());
}

#[test]
fn a_zip_bomb_gets_1009_not_gigabytes() {
    let server = WebSocketServer::builder()
        .max_message_size(1 << 20)
        .start("127.0.0.1:0")
        .unwrap();
    let (_h, mut s) = upgrade(server.local_addr(), &format!("{PDE}\r\n"));
    let _ = expect_connect(&server);
    // 16 MiB of zeros deflate to about 16 KiB: well under the limit on
    // the wire, far over it inflated.
    let bomb = deflate(&vec![0u8; 16 << 20]);
    assert!(bomb.len() < 1 << 17, "{}", bomb.len());
    s.write_all(&frame(0xC2, &bomb)).unwrap();
    assert_eq!(read_close(&mut s), Some(1009));
    drop(s);
    let (_, close, error) = expect_disconnect(&server);
    assert_eq!(close.code.as_u16(), 1009);
    match error {
        Some(Error::MessageTooLarge { size, limit }) => {
            assert_eq!(limit, 1 << 20);
            assert_eq!(size, limit + 1, "inflating stops one byte past the limit");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(server.stats().protocol_errors.get(&1009), Some(&1));
}

#[test]
fn broken_compressed_input_is_refused() {
    let server = echo_server(|b| b);
    let addr = server.local_addr();
    let cases: [(Vec<u8>, u16); 5] = [
        // Not deflate data at all.
        (frame(0xC1, &[0xff, 0xff, 0xff, 0xff, 0xff]), 1002),
        // RSV1 on a control frame.
        (frame(0xC9, b""), 1002),
        // RSV1 on a continuation frame.
        (
            [frame(0x41, &deflate(b"abc")), frame(0xC0, b"")].concat(),
            1002,
        ),
        // Inflates to invalid UTF-8 in a text message.
        (
            frame(0xC1, &deflate(&[0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xff])),
            1007,
        ),
        // A final block, then bytes that start no valid block.
        (
            frame(0xC1, &{
                let mut c = Compress::new(flate2::Compression::default(), false);
                let mut v = Vec::with_capacity(64);
                c.compress_vec(b"abc", &mut v, FlushCompress::Finish)
                    .unwrap();
                v.extend_from_slice(&[1, 2, 3]);
                v
            }),
            1002,
        ),
    ];
    for (bytes, code) in cases {
        let (_h, mut s) = upgrade(addr, &format!("{PDE}\r\n"));
        s.write_all(&bytes).unwrap();
        assert_eq!(read_close(&mut s), Some(code));
    }
    // Without the extension agreed, RSV1 is a protocol error.
    let (_h, mut s) = upgrade(addr, "");
    s.write_all(&frame(0xC1, &deflate(b"abc"))).unwrap();
    assert_eq!(read_close(&mut s), Some(1002));
}

/// A compressed message cut short, or a stored block that announces more
/// than it holds, was delivered as part of the message or as bytes the
/// client never sent (the appended tail among them): seen from the
/// client, nothing is echoed, and the close says 1002.
#[test]
fn a_compressed_message_cut_short_gets_1002_and_no_echo() {
    let server = echo_server(|b| b);
    let addr = server.local_addr();
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(40);
    let z = deflate(text.as_bytes());
    let mut payloads: Vec<Vec<u8>> = [2, 5, 10, 31, z.len() / 2]
        .iter()
        .map(|cut| z[..z.len() - cut].to_vec())
        .collect();
    // A stored block announcing 100 bytes, 10 of them sent.
    let mut stored = vec![0x00, 100, 0x00, !100u8, 0xff];
    stored.extend_from_slice(&[b'A'; 10]);
    payloads.push(stored);
    for (i, payload) in payloads.iter().enumerate() {
        let (_h, mut s) = upgrade(addr, &format!("{PDE}\r\n"));
        let opcode = if i + 1 == payloads.len() { 0xC2 } else { 0xC1 };
        s.write_all(&frame(opcode, payload)).unwrap();
        let (first, p) = read_frame(&mut s);
        assert_eq!(first, 0x88, "case {i}: {}", describe(first, &p));
        assert_eq!(u16::from_be_bytes([p[0], p[1]]), 1002, "case {i}");
    }
    // The whole message still comes back.
    let (_h, mut s) = upgrade(addr, &format!("{PDE}\r\n"));
    s.write_all(&frame(0xC1, &z)).unwrap();
    let (first, p) = read_frame(&mut s);
    assert_eq!(first & 0x0f, 0x1);
    let back = if first & 0x40 != 0 { inflate(&p) } else { p };
    assert_eq!(back, text.as_bytes());
}

#[test]
fn broadcast_compresses_once_for_every_window_size() {
    let server = WebSocketServer::builder().start("127.0.0.1:0").unwrap();
    let addr = server.local_addr();
    let (_h, mut a) = upgrade(addr, &format!("{PDE}\r\n"));
    let (_h, mut b) = upgrade(addr, &format!("{PDE}; server_max_window_bits=9\r\n"));
    let (_h, mut plain) = upgrade(addr, "");
    for _ in 0..3 {
        expect_connect(&server);
    }
    let text = text_block(20_000);
    let report = server.broadcast(Message::Text(text.clone()));
    assert_eq!(report.written + report.queued, 3);
    let mut payloads = Vec::new();
    for s in [&mut a, &mut b] {
        let (first, payload) = read_frame(s);
        assert_eq!(first, 0xC1);
        assert_eq!(inflate(&payload), text.as_bytes());
        payloads.push(payload);
    }
    // Compressed once, with the smaller window, which both can read.
    assert_eq!(payloads[0], payloads[1]);
    // A 9-bit window reads it too (nothing refers further back).
    let (_h, mut c) = upgrade(addr, &format!("{PDE}; server_max_window_bits=9\r\n"));
    expect_connect(&server);
    server.broadcast(Message::Text(text.clone()));
    let (_, payload) = read_frame(&mut c);
    assert_eq!(
        inflate_with(&mut Decompress::new_with_window_bits(false, 9), &payload),
        text.as_bytes()
    );
    assert_eq!(read_frame(&mut plain), (0x81, text.clone().into_bytes()));
}

/// Letters from a fixed pseudo-random sequence: compressible only by
/// their alphabet (about 0.6 of their size), not by repeats within it.
fn letters(n: usize, seed: u64) -> String {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

/// Whatever window a client allows the server (`server_max_window_bits`,
/// 9 to 14), the server's frames refer no further back than it: a
/// message that repeats a block just longer than the window three times
/// compresses to about three blocks' worth, where a larger window would
/// make the repeats back-references (a third of the size). An inflater
/// reads them with the client's window. Without and with context
/// takeover (a connection's own compressor, made with the client's size,
/// where stateless ones use 15, 12 or 9 bits).
#[test]
fn compressed_frames_fit_the_window_each_client_allowed() {
    for takeover in [false, true] {
        let server =
            echo_server(|b| b.compression(Some(Compression::default().context_takeover(takeover))));
        for bits in 9..=14u8 {
            let offer = if takeover {
                format!("{PDE}; server_max_window_bits={bits}\r\n")
            } else {
                format!(
                    "{PDE}; server_max_window_bits={bits}; server_no_context_takeover; \
                     client_no_context_takeover\r\n"
                )
            };
            let (head, mut s) = upgrade(server.local_addr(), &offer);
            assert!(
                extensions(&head)
                    .is_some_and(|e| e.ends_with(&format!("server_max_window_bits={bits}"))),
                "{head}"
            );
            let block = (1usize << bits) + 64;
            let mut theirs = Decompress::new_with_window_bits(false, bits);
            for round in 0..2u64 {
                let text = letters(block, u64::from(bits) * 2 + round).repeat(3);
                s.write_all(&frame(0x81, text.as_bytes())).unwrap();
                let (first, payload) = read_frame(&mut s);
                assert_eq!(first, 0xC1, "{bits} bits: not compressed");
                assert_eq!(inflate_with(&mut theirs, &payload), text.as_bytes());
                assert!(
                    payload.len() > block * 3 / 2,
                    "{bits} bits, context takeover {takeover}: {} B of {} (blocks of {block} B): \
                     a window larger than the client allowed",
                    payload.len(),
                    text.len()
                );
            }
        }
    }
}

#[test]
fn context_takeover_when_configured() {
    let server =
        echo_server(|b| b.compression(Some(Compression::default().context_takeover(true))));
    let (head, mut s) = upgrade(server.local_addr(), &format!("{PDE}\r\n"));
    assert_eq!(extensions(&head), Some("permessage-deflate"));
    // Both sides keep their context: the client's second message refers
    // back to its first, and so do the server's answers.
    let mut ours = Compress::new(flate2::Compression::default(), false);
    let mut theirs = Decompress::new(false);
    let text = text_block(3000);
    let mut sizes = Vec::new();
    for _ in 0..3 {
        s.write_all(&frame(0xC1, &deflate_with(&mut ours, text.as_bytes())))
            .unwrap();
        let (first, payload) = read_frame(&mut s);
        assert_eq!(first, 0xC1);
        sizes.push(payload.len());
        assert_eq!(inflate_with(&mut theirs, &payload), text.as_bytes());
    }
    assert!(sizes[1] * 3 < sizes[0] * 2, "{sizes:?}");
}

/// A publish queues a copy for a subscriber with a context of its own
/// under the topic's lock, compressed in that context: with several
/// threads publishing at once, and plain sends mixed in, the subscriber's
/// context still reads every message, each publisher's in its order.
#[test]
fn publishing_to_subscribers_with_a_context_of_their_own_keeps_their_order() {
    let server = WebSocketServer::builder()
        .workers(2)
        .compression(Some(Compression::default().context_takeover(true)))
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let (head, mut own) = upgrade(addr, &format!("{PDE}\r\n"));
    assert_eq!(extensions(&head), Some("permessage-deflate"));
    // One at a time: a second handshake can overtake the first's Connect
    // event (the 101 goes out before it), and then `c_own` was the plain
    // client, which failed this test one run in seven.
    let c_own = expect_connect(&server);
    let (_h, mut plain) = upgrade(addr, "");
    let c_plain = expect_connect(&server);
    c_own.subscribe("t").unwrap();
    c_plain.subscribe("t").unwrap();
    const THREADS: usize = 4;
    const EACH: usize = 60;
    let body = text_block(1500);
    let publishers: Vec<_> = (0..THREADS)
        .map(|k| {
            let (handle, body, c_own) = (server.handle(), body.clone(), c_own.clone());
            std::thread::spawn(move || {
                for i in 0..EACH {
                    let text = format!("{k} {i} {body}");
                    if i % 5 == 0 {
                        // A direct send between publishes, to the same
                        // context.
                        c_own.send(text).unwrap();
                    } else {
                        let r = handle.publish("t", text);
                        assert_eq!(r.dropped + r.closed, 0);
                    }
                }
            })
        })
        .collect();
    let read_all = |s: &mut TcpStream, ctx: Option<&mut Decompress>, want: usize| {
        let mut ctx = ctx;
        let mut next = [0usize; THREADS];
        for _ in 0..want {
            let (first, payload) = read_frame(s);
            let text = match (first, ctx.as_deref_mut()) {
                (0xC1, Some(d)) => String::from_utf8(inflate_with(d, &payload)).unwrap(),
                (0x81, _) => String::from_utf8(payload).unwrap(),
                other => panic!("unexpected frame {:?}", other.0),
            };
            let mut w = text.splitn(3, ' ');
            let k: usize = w.next().unwrap().parse().unwrap();
            let i: usize = w.next().unwrap().parse().unwrap();
            assert_eq!(w.next().unwrap(), body);
            // Plain clients miss the direct sends to the other client.
            while ctx.is_none() && next[k] % 5 == 0 && next[k] < i {
                next[k] += 1;
            }
            assert_eq!(i, next[k], "publisher {k} out of order");
            next[k] += 1;
        }
    };
    let mut theirs = Decompress::new(false);
    read_all(&mut own, Some(&mut theirs), THREADS * EACH);
    read_all(&mut plain, None, THREADS * (EACH - EACH / 5));
    for p in publishers {
        p.join().unwrap();
    }
    assert_eq!(c_plain.buffered_amount(), 0);
}

/// A deflate stream ended with a final block (as some compressors flush)
/// may be followed by another within the same message; each one ending
/// costs a reset, and with a context a window copied back in. Streams
/// of two bytes each cost that work for next to nothing, so a message
/// may hold only a few streams for its size: 100,000 of them (200 KB)
/// get 1009, where before they cost 100,000 windows of 32 KiB (3 GB
/// copied) with a context, and were delivered. A message of three
/// streams, each ended with a final block, is still delivered intact.
#[test]
fn a_message_of_many_tiny_deflate_streams_gets_1009() {
    for context in [false, true] {
        let server =
            echo_server(|b| b.compression(Some(Compression::default().context_takeover(context))));
        let addr = server.local_addr();
        // Three streams, each finished: delivered, in either mode.
        let (_h, mut s) = upgrade(addr, &format!("{PDE}\r\n"));
        let parts = [text_block(5000), text_block(300), text_block(40_000)];
        let mut payload = Vec::new();
        for p in &parts {
            let mut c = Compress::new(flate2::Compression::default(), false);
            let mut v = Vec::with_capacity(p.len() + 64);
            c.compress_vec(p.as_bytes(), &mut v, FlushCompress::Finish)
                .unwrap();
            payload.extend_from_slice(&v);
        }
        s.write_all(&frame(0xC1, &payload)).unwrap();
        let echoed = read_text_echo(&mut s);
        assert_eq!(echoed, parts.concat().as_bytes(), "context {context}");
        // 32 KiB of zeros, then 100,000 empty final blocks.
        let (_h, mut s) = upgrade(addr, &format!("{PDE}\r\n"));
        let mut c = Compress::new(flate2::Compression::default(), false);
        let mut payload = Vec::with_capacity(1 << 10);
        c.compress_vec(&vec![0u8; 32 << 10], &mut payload, FlushCompress::Sync)
            .unwrap();
        for _ in 0..100_000 {
            payload.extend_from_slice(&[0x03, 0x00]);
        }
        payload.push(0x00);
        s.write_all(&frame(0xC2, &payload)).unwrap();
        assert_eq!(read_close(&mut s), Some(1009), "context {context}");
    }
}

/// A sender may end a deflate stream in every fragment of a message: each
/// fragment allows one stream more than the payload's size does. A text
/// of 300 fragments, each a stream of its own ended with a final block
/// (about 5 KB of payload, where its size alone allows 82 streams), is
/// delivered intact without context takeover, and one of 40 with it.
/// Fragments buy streams, not window copies: 32 KiB of zeros, then 1,000
/// fragments of one empty final block each, still gets 1009 with a
/// context (each would copy the 32 KiB window back in), and a fragment of
/// 100,000 empty final blocks does without one.
#[test]
fn a_message_that_ends_a_stream_in_each_fragment_is_delivered() {
    let fragmented = |parts: &[Vec<u8>]| {
        let mut wire = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            let first =
                if i == 0 { 0x41 } else { 0x00 } | if i + 1 == parts.len() { 0x80 } else { 0 };
            wire.extend_from_slice(&frame(first, p));
        }
        wire
    };
    for context in [false, true] {
        let server =
            echo_server(|b| b.compression(Some(Compression::default().context_takeover(context))));
        let addr = server.local_addr();
        let (_h, mut s) = upgrade(addr, &format!("{PDE}\r\n"));
        // With a context, each stream's end copies the window back in,
        // held to four times the payload and 64 KiB: 40 parts.
        let count = if context { 40 } else { 300 };
        let texts: Vec<String> = (0..count).map(|i| format!("part {i}, ")).collect();
        let parts: Vec<Vec<u8>> = texts
            .iter()
            .map(|t| {
                let mut c = Compress::new(flate2::Compression::default(), false);
                let mut v = Vec::with_capacity(t.len() + 64);
                c.compress_vec(t.as_bytes(), &mut v, FlushCompress::Finish)
                    .unwrap();
                v
            })
            .collect();
        let size: usize = parts.iter().map(Vec::len).sum();
        assert!(
            2 + size / 64 < parts.len(),
            "{size} bytes allow the streams alone"
        );
        s.write_all(&fragmented(&parts)).unwrap();
        let echoed = read_text_echo(&mut s);
        assert_eq!(echoed, texts.concat().as_bytes(), "context {context}");

        let (_h, mut s) = upgrade(addr, &format!("{PDE}\r\n"));
        let mut c = Compress::new(flate2::Compression::default(), false);
        let mut zeros = Vec::with_capacity(1 << 10);
        c.compress_vec(&vec![0u8; 32 << 10], &mut zeros, FlushCompress::Finish)
            .unwrap();
        let mut parts = vec![zeros];
        if context {
            parts.extend((0..1000).map(|_| vec![0x03, 0x00]));
        } else {
            parts.push([0x03, 0x00].repeat(100_000));
        }
        s.write_all(&fragmented(&parts)).unwrap();
        assert_eq!(read_close(&mut s), Some(1009), "context {context}");
    }
}

/// A text frame read back, inflated if it came compressed.
fn read_text_echo(s: &mut TcpStream) -> Vec<u8> {
    let (first, echoed) = read_frame(s);
    assert_eq!(first & 0x0F, 0x1, "not text: {first:#x}");
    if first & 0x40 != 0 {
        inflate(&echoed)
    } else {
        echoed
    }
}

/// The size limits are on the message: one of exactly `max_message_size`
/// bytes that does not compress takes a little more on the wire, and is
/// still delivered.
#[test]
fn an_incompressible_message_at_the_limit_is_delivered() {
    let server = echo_server(|b| b.max_message_size(1 << 16));
    let (_h, mut s) = upgrade(server.local_addr(), &format!("{PDE}\r\n"));
    let data: Vec<u8> = (0..1u32 << 16)
        .map(|i| (mix(i as u64) >> 17) as u8)
        .collect();
    let z = deflate(&data);
    assert!(z.len() > 1 << 16, "{}", z.len());
    s.write_all(&frame(0xC2, &z)).unwrap();
    let (first, payload) = read_frame(&mut s);
    assert_eq!(first & 0x0F, 0x2);
    let got = if first & 0x40 != 0 {
        inflate(&payload)
    } else {
        payload
    };
    assert_eq!(got, data);
    // One byte more is over the limit, however it is sent.
    let mut more = data.clone();
    more.push(7);
    s.write_all(&frame(0xC2, &deflate(&more))).unwrap();
    assert_eq!(read_close(&mut s), Some(1009));
}

/// The threshold, from the peer's side: a compressible message one byte
/// under it goes out plain, one at it compressed; `threshold(128)` moves
/// the edge to 128.
#[test]
fn messages_under_the_threshold_go_out_plain() {
    for (server, edge) in [
        (echo_server(|b| b), 256),
        (
            echo_server(|b| b.compression(Some(Compression::default().threshold(128)))),
            128,
        ),
    ] {
        let (_h, mut s) = upgrade(server.local_addr(), &format!("{PDE}\r\n"));
        let under = text_block(edge - 1);
        s.write_all(&frame(0x81, under.as_bytes())).unwrap();
        assert_eq!(
            read_frame(&mut s),
            (0x81, under.into_bytes()),
            "edge {edge}"
        );
        let at = text_block(edge);
        s.write_all(&frame(0x81, at.as_bytes())).unwrap();
        let (first, payload) = read_frame(&mut s);
        assert_eq!(first, 0xC1, "{edge} bytes: compressed");
        assert!(payload.len() < edge);
        assert_eq!(inflate(&payload), at.as_bytes());
    }
}

/// Was a bug: under context takeover with threshold 0, an empty message
/// after a compressed one went out with an empty payload, which a client's
/// context reads as half a block header; the next message then failed to
/// inflate (Chrome works around exactly this in its own sender).
#[test]
fn an_empty_message_between_compressed_ones_keeps_the_clients_context() {
    let server = WebSocketServer::builder()
        .compression(Some(
            Compression::default().context_takeover(true).threshold(0),
        ))
        .start("127.0.0.1:0")
        .unwrap();
    let (head, mut s) = upgrade(server.local_addr(), &format!("{PDE}\r\n"));
    assert_eq!(extensions(&head), Some("permessage-deflate"));
    let c = expect_connect(&server);
    let text = text_block(2000);
    let mut theirs = Decompress::new(false);
    for m in [text.as_str(), "", "", text.as_str(), ""] {
        c.send(m).unwrap();
        let (first, payload) = read_frame(&mut s);
        assert_eq!(first, 0xC1, "{} bytes", m.len());
        assert!(!payload.is_empty(), "an empty compressed payload");
        assert_eq!(inflate_with(&mut theirs, &payload), m.as_bytes());
    }
}

/// Was a weak spot: at level 1, zlib's quick mode writes fixed-Huffman
/// blocks only, which grow bytes 144 to 255 by an eighth (nine bits
/// each), and with context takeover every message is compressed. The
/// echo of a message near `max_message_size` could then pass the hard
/// limit's 1 KiB margin over `high_water + max_message_size` and be
/// refused, though the client kept reading. The margin now counts that
/// growth: a client that pipelines 64 KiB messages of such bytes and
/// reads slowly gets every echo, and no send is refused. (Before, with
/// what was queued at each echo depending on timing, each of the two
/// high waters here had several echoes refused in most runs.)
#[test]
fn echoes_that_compression_grows_are_never_refused_to_a_client_that_reads() {
    for high in [240_000, 100_000] {
        echo_grown_messages(high);
    }
}

fn echo_grown_messages(high: usize) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    const N: usize = 120;
    const SIZE: usize = 1 << 16;
    let refused = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&refused);
    let server = WebSocketServer::builder()
        .workers(2)
        .max_message_size(SIZE)
        .high_water(high)
        .low_water(4096)
        .max_backpressure(16 * 1024)
        .compression(Some(Compression::default().context_takeover(true).level(1)))
        .on_message(move |c, m| {
            if c.send(m).is_err() {
                count.fetch_add(1, Ordering::SeqCst);
            }
        })
        .start("127.0.0.1:0")
        .unwrap();
    // What the client has not read waits in the server's queue.
    let mut s = small_window_with_compression(server.local_addr(), "permessage-deflate");
    let message = |i: usize| -> Vec<u8> {
        (0..SIZE)
            .map(|k| 144 + (mix((i * SIZE + k) as u64) >> 17) as u8 % 112)
            .collect()
    };
    // Sent plain (RSV1 clear), as RFC 7692 lets a client do.
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for i in 0..N {
            w.write_all(&frame(0x82, &message(i))).unwrap();
        }
    });
    let mut theirs = Decompress::new(false);
    let mut grew = 0;
    for i in 0..N {
        // A slow reader that keeps reading.
        std::thread::sleep(std::time::Duration::from_millis(10));
        let (first, payload) = read_frame(&mut s);
        assert_eq!(first, 0xC2, "echo {i}: {}", describe(first, &payload));
        if payload.len() > SIZE + 1024 {
            grew += 1;
        }
        assert!(
            inflate_with(&mut theirs, &payload) == message(i),
            "high water {high}: echo {i} is not message {i} ({} refused)",
            refused.load(Ordering::SeqCst)
        );
    }
    writer.join().unwrap();
    assert_eq!(
        grew, N,
        "level 1 did not grow every message past the old margin"
    );
    assert_eq!(refused.load(Ordering::SeqCst), 0, "echoes refused");
}

/// The main-loop style's guarantee under compression that grows a
/// message: a main loop far behind a client, answering each message with
/// one reply of the same bytes, is never refused. An event was charged
/// its message's length, but the reply can be an eighth larger at level 1
/// with context takeover, so answering the events a paused client held
/// took its queue past the hard limit (the margin covers one message's
/// growth). A message is now charged as the reply it may become.
#[test]
fn a_main_loop_far_behind_is_never_refused_a_grown_reply() {
    use std::time::Duration;
    const SIZE: usize = 1 << 16;
    let server = WebSocketServer::builder()
        .high_water(64 << 20)
        .low_water(16 << 20)
        .event_queue_bytes(1 << 30)
        .max_message_size(SIZE)
        .max_backpressure(0)
        .compression(Some(Compression::default().context_takeover(true).level(1)))
        .start("127.0.0.1:0")
        .unwrap();
    // Never reads: every reply stays queued.
    let s = small_window_with_compression(server.local_addr(), "permessage-deflate");
    // Bytes 144 to 255, nine bits each at level 1; 64 KiB apart, repeats
    // are beyond the window.
    let one = frame(
        0x82,
        &(0..SIZE as u64)
            .map(|k| 144 + (mix(k) >> 17) as u8 % 112)
            .collect::<Vec<_>>(),
    );
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        w.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
        // Stops when the server stops reading (paused at high water).
        for _ in 0..2000 {
            if w.write_all(&one).is_err() {
                return;
            }
        }
    });
    let client = match server.recv_timeout(WAIT) {
        Ok(enjent::Event::Connect { client }) => client,
        other => panic!("{other:?}"),
    };
    // Far behind: the client is paused at high water before its first
    // message is answered.
    assert!(eventually(Duration::from_secs(30), || server
        .stats()
        .read_pauses
        > 0));
    let (mut echoed, mut refused) = (0, 0);
    while let Ok(event) = server.events().recv_timeout(Duration::from_millis(500)) {
        if let enjent::Event::Message { message, .. } = event {
            match client.send(message) {
                Ok(_) => echoed += 1,
                Err(e) if matches!(e.error(), Error::Backpressure { .. }) => refused += 1,
                Err(e) => panic!("{e:?}"),
            }
        }
    }
    writer.join().unwrap();
    eprintln!("{echoed} replies queued, {refused} refused");
    assert!(echoed >= 900, "only {echoed} messages came");
    assert_eq!(refused, 0, "replies refused after {echoed}");
}

/// One read of compressed messages may inflate to hundreds of times its
/// size: a job stops at its byte budget (1 MiB) whatever the read held,
/// and lets other clients have the worker. With one worker, held by a
/// third client's closure, client A writes 200 messages of 1 MiB of
/// zeros, about 1 KB each compressed, in one write; then client B sends
/// one message. Once the worker is let go, A's job runs first, and B's
/// message must be handled within A's first few. Before, the job inflated
/// and handed over all of its read first (121 here).
#[test]
fn a_read_of_compressed_messages_is_cut_at_the_jobs_byte_budget() {
    let b_at = compressed_floods_then_one_message(1, 200);
    // Without the cut it comes after a whole read (60 and more).
    assert!(
        (1..20).contains(&b_at),
        "B's message handled after {b_at} of A's"
    );
}

/// The same with a crowd: six clients each write 40 such messages (40 MiB
/// inflated each) before B's one. Each flood's job is cut at the budget
/// and goes behind B in the ready queue, so B's message is handled after
/// a turn of each, not after 240 MiB of inflating.
#[test]
fn a_crowd_of_compressed_floods_leaves_room_for_a_plain_message() {
    let b_at = compressed_floods_then_one_message(6, 40);
    assert!(
        (1..6 * 5).contains(&b_at),
        "B's message handled after {b_at} of the floods'"
    );
}

/// With one worker held by a closure, `floods` clients each write `sent`
/// compressed messages of 1 MiB of zeros in one write, then client B
/// writes one plain message, then the worker is let go. Returns how many
/// flood messages were handled before B's.
fn compressed_floods_then_one_message(floods: usize, sent: usize) -> usize {
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};
    let order: Arc<Mutex<Vec<usize>>> = Arc::default();
    let seen = Arc::clone(&order);
    let (release, held) = mpsc::channel::<()>();
    let held = Mutex::new(held);
    let (holding, is_held) = mpsc::channel::<()>();
    let holding = Mutex::new(holding);
    let server = WebSocketServer::builder()
        .workers(1)
        .max_message_size(1 << 20)
        .on_message(move |_, m| {
            if m.as_text() == Some("hold") {
                let _ = holding.lock().unwrap().send(());
                let _ = held.lock().unwrap().recv();
            } else {
                seen.lock().unwrap().push(m.len());
            }
        })
        .start("127.0.0.1:0")
        .unwrap();
    let mut attackers: Vec<_> = (0..floods)
        .map(|_| upgrade(server.local_addr(), &format!("{PDE}\r\n")).1)
        .collect();
    let mut b = raw_ws(server.local_addr());
    let mut c = raw_ws(server.local_addr());
    c.write_all(&frame(0x81, b"hold")).unwrap();
    is_held.recv_timeout(WAIT).expect("the worker held");
    let wire = frame(0xC2, &deflate(&vec![0u8; 1 << 20])).repeat(sent);
    assert!(
        wire.len() < 256 << 10,
        "{} B: more than one read",
        wire.len()
    );
    for a in &mut attackers {
        a.write_all(&wire).unwrap();
    }
    // The floods are ready first (their readiness reported before B's).
    std::thread::sleep(std::time::Duration::from_millis(50));
    b.write_all(&frame(0x82, b"b")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    drop(release);
    let total = floods * sent + 1;
    assert!(
        eventually(WAIT * 3, || order.lock().unwrap().len() == total),
        "{} of {total} messages handled",
        order.lock().unwrap().len(),
    );
    let order = order.lock().unwrap();
    order.iter().position(|&n| n == 1).unwrap()
}

/// A subscriber with a compression context of its own that never reads
/// is refused a publish before the message is compressed for it. The
/// compression ran under the topic's lock, which every other subscriber's
/// copy waits for, only to be thrown away (and the context reset): eight
/// such subscribers cost each publish eight compressions (found by a
/// review). The publishing thread's CPU is counted from
/// `/proc/thread-self/stat`.
#[cfg(target_os = "linux")]
#[test]
fn publishes_refused_to_stuck_subscribers_with_contexts_are_not_compressed() {
    const STUCK: usize = 8;
    let server = WebSocketServer::builder()
        .compression(Some(Compression::default().context_takeover(true)))
        .max_message_size(1 << 20)
        .max_backpressure(256 << 10)
        .ping_interval(None)
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let socks: Vec<TcpStream> = (0..STUCK)
        .map(|_| {
            let mut s = small_window(addr);
            s.write_all(
                REQUEST
                    .replace("\r\n\r\n", &format!("\r\n{PDE}\r\n\r\n"))
                    .as_bytes(),
            )
            .unwrap();
            assert_eq!(extensions(&read_101(&mut s)), Some("permessage-deflate"));
            expect_connect(&server).subscribe("t").unwrap();
            s
        })
        .collect();
    // Fill their sockets and queues with what compresses to nothing
    // less: bytes of a simple generator.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
    };
    let noise: Vec<u8> = (0..64 << 10).map(|_| next()).collect();
    // Text of sixteen letters in no order: it halves, at zlib's cost.
    let text: String = (0..256 << 10)
        .map(|_| char::from(b'a' + next() % 16))
        .collect();
    let mut n = 0;
    while server.publish("t", noise.clone()).dropped < STUCK {
        n += 1;
        assert!(n < 2000, "the subscribers' sockets took 128 MiB");
    }
    // And their queues to the last few bytes, with empty messages.
    while server.publish("t", "").dropped < STUCK {
        n += 1;
        assert!(
            n < 100_000,
            "the subscribers' queues took 64 KiB of empty messages"
        );
    }
    // Now every publish is refused to all of them: it must cost little.
    let before = thread_ticks();
    for _ in 0..20 {
        let r = server.publish("t", text.clone());
        assert_eq!(r.dropped, STUCK, "{r:?}");
    }
    let ticks = thread_ticks() - before;
    eprintln!("20 publishes of 256 KiB refused to {STUCK} stuck subscribers: {ticks} ticks");
    assert!(
        ticks < 30,
        "20 refused publishes took {ticks} ticks of the publisher's CPU"
    );
    drop(socks);
}

/// `send_timeout` of a message that compresses well waits for room for
/// the frame it was refused, compressed, not for its plain size: a 7 MiB
/// text that goes out as about 21 KB, refused to a queue a few hundred
/// bytes short of its limit, goes as soon as a client that reads slowly
/// has made that room (it waited for 7 MiB of room, about 7 s here).
#[test]
fn send_timeout_waits_for_room_for_the_compressed_frame_not_the_plain_message() {
    let server = WebSocketServer::builder()
        .workers(2)
        .high_water(64 << 10)
        .low_water(16 << 10)
        .max_message_size(8 << 20)
        // Raised to high water, a message and 1 KiB: about 8.06 MiB.
        .max_backpressure(1)
        .ping_interval(None)
        .idle_timeout(None)
        .start("127.0.0.1:0")
        .unwrap();
    let s = small_window_with_compression(
        server.local_addr(),
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
    );
    let client = expect_connect(&server);
    // Full to within a few hundred bytes of the limit, with messages that
    // do not compress (they go out plain), ever smaller.
    let mut rng = Rng::new(44);
    let noise: Vec<u8> = (0..256 << 10).map(|_| rng.below(256) as u8).collect();
    for size in [256 << 10, 16 << 10, 1 << 10, 100] {
        for n in 0.. {
            match client.send(noise[..size].to_vec()) {
                Ok(_) => {}
                Err(e) if matches!(e.error(), Error::Backpressure { .. }) => break,
                Err(e) => panic!("{}", e.error()),
            }
            assert!(n < 100_000, "never refused");
        }
    }
    let text = text_block(7 << 20);
    // A client that reads about 1 MB/s, from after the first try, until
    // told to hurry.
    let hurry = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let hurry = std::sync::Arc::clone(&hurry);
        let mut s = s;
        std::thread::spawn(move || -> Vec<u8> {
            std::thread::sleep(std::time::Duration::from_millis(300));
            let mut since_pause = 0;
            loop {
                let (first, payload) = read_frame(&mut s);
                if first == 0xC1 {
                    return inflate(&payload);
                }
                assert_eq!(first, 0x82, "only the fill comes before the text");
                since_pause += payload.len();
                if since_pause >= 32 << 10 && !hurry.load(std::sync::atomic::Ordering::SeqCst) {
                    let ms = 30 * since_pause as u64 / (32 << 10);
                    std::thread::sleep(std::time::Duration::from_millis(ms));
                    since_pause = 0;
                }
            }
        })
    };
    let start = std::time::Instant::now();
    let sent = client.send_timeout(
        Message::Text(text.clone()),
        std::time::Duration::from_secs(12),
    );
    let took = start.elapsed();
    hurry.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(sent.is_ok(), "{}", sent.map(|_| ()).unwrap_err().error());
    let got = reader.join().unwrap();
    assert!(got == text.as_bytes(), "the text came back different");
    assert!(
        took < std::time::Duration::from_secs(5),
        "send_timeout held its caller {took:?} for a frame of about 21 KB"
    );
}
