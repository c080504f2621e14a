//! Malformed frames get the right close code; what the client sent before
//! the error is delivered; other clients are not disturbed.

mod support;

use std::io::Write;

use enjent::{CloseCode, Error, ProtocolError, WebSocketServer};
use support::*;

fn check(
    server: &WebSocketServer,
    bad: &[u8],
    want_code: u16,
    check_error: impl Fn(&Error) -> bool,
) {
    let mut s = raw_ws(server.local_addr());
    let c = expect_connect(server);
    let mut wire = frame(0x81, b"sent before");
    wire.extend_from_slice(bad);
    s.write_all(&wire).unwrap();
    let (_, m) = expect_message(server);
    assert_eq!(m.as_text(), Some("sent before"));
    assert_eq!(read_close(&mut s), Some(want_code));
    // The server stops sending (FIN) after its close frame, then waits for
    // our side to close before it lets go of the socket.
    assert!(closed_by_server(&mut s), "server half-closes after failing");
    drop(s);
    let (from, close, error) = expect_disconnect(server);
    assert_eq!(from.id(), c.id());
    assert_eq!(close.code.as_u16(), want_code);
    let error = error.expect("an error is reported");
    assert!(check_error(&error), "{error:?}");
}

#[test]
fn protocol_violations_close_with_1002() {
    let server = WebSocketServer::builder()
        .workers(2)
        .start("127.0.0.1:0")
        .unwrap();
    let p = |e: ProtocolError| move |err: &Error| matches!(err, Error::Protocol(x) if *x == e);
    check(
        &server,
        &[0x81, 0x03, b'a', b'b', b'c'],
        1002,
        p(ProtocolError::UnmaskedFrame),
    );
    check(
        &server,
        &frame(0xC1, b"x"),
        1002,
        p(ProtocolError::ReservedBits),
    );
    check(
        &server,
        &frame(0x83, b""),
        1002,
        p(ProtocolError::ReservedOpcode(3)),
    );
    check(
        &server,
        &frame(0x09, b""),
        1002,
        p(ProtocolError::FragmentedControlFrame),
    );
    check(
        &server,
        &frame(0x89, &[0; 126]),
        1002,
        p(ProtocolError::ControlFrameTooLong),
    );
    check(
        &server,
        &frame(0x80, b"x"),
        1002,
        p(ProtocolError::UnexpectedContinuation),
    );
    let mut two = frame(0x01, b"a");
    two.extend(frame(0x81, b"b"));
    check(&server, &two, 1002, p(ProtocolError::ExpectedContinuation));
    check(
        &server,
        &frame(0x88, &[0x03]),
        1002,
        p(ProtocolError::InvalidClosePayload),
    );
    check(
        &server,
        &frame(0x88, &close_payload(1005, "")),
        1002,
        p(ProtocolError::InvalidCloseCode(1005)),
    );
    still_serves(server.local_addr(), &server);
}

#[test]
fn invalid_utf8_closes_with_1007() {
    let server = server();
    let utf8 = |err: &Error| matches!(err, Error::Protocol(ProtocolError::InvalidUtf8));
    check(&server, &frame(0x81, &[0xCE, 0xBA, 0xFF]), 1007, utf8);
    // Fail fast: the bad fragment is rejected though the message never ends.
    check(&server, &frame(0x01, &[0xED, 0xA0, 0x80]), 1007, utf8);
    // And inside one frame: a text frame announcing 1,000 bytes, of which
    // only the first three (invalid) come; the rest is never sent.
    let mut long = vec![b'a'; 1000];
    long[..3].copy_from_slice(&[0xFF, 0xFE, 0xFD]);
    check(&server, &frame(0x81, &long)[..8 + 3], 1007, utf8);
    let mut reason = close_payload(1000, "");
    reason.extend_from_slice(&[0xC0, 0x80]);
    check(&server, &frame(0x88, &reason), 1007, utf8);
    still_serves(server.local_addr(), &server);
}

#[test]
fn oversized_message_closes_with_1009_from_the_header_alone() {
    let server = WebSocketServer::builder()
        .max_message_size(1000)
        .start("127.0.0.1:0")
        .unwrap();
    let big = |err: &Error| {
        matches!(
            err,
            Error::MessageTooLarge {
                size: 5000,
                limit: 1000
            }
        )
    };
    // Only the header of a 5000-byte frame: the limit needs no payload.
    check(&server, &frame(0x82, &[0; 5000])[..8], 1009, big);
    // The same limit over fragments.
    let mut frags = frame(0x02, &[1; 600]);
    frags.extend(frame(0x80, &[1; 600]));
    check(&server, &frags, 1009, |e| {
        matches!(
            e,
            Error::MessageTooLarge {
                size: 1200,
                limit: 1000
            }
        )
    });
    assert_eq!(
        Error::MessageTooLarge { size: 1, limit: 0 }.close_code(),
        Some(CloseCode::TOO_BIG)
    );
    still_serves(server.local_addr(), &server);
}

#[test]
fn garbage_stream_never_panics_the_server() {
    let server = server();
    let addr = server.local_addr();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..50 {
        let mut s = raw_ws(addr);
        expect_connect(&server);
        let junk: Vec<u8> = (0..4096)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let _ = s.write_all(&junk);
        drop(s);
        // Whatever the junk decoded to, the client ends with a Disconnect.
        loop {
            if let enjent::Event::Disconnect { .. } = next(&server) {
                break;
            }
        }
    }
    still_serves(addr, &server);
}

/// `max_frame_size` and `max_fragments` reach the wire: a frame one byte
/// over gets 1009 from its header, a message of one fragment too many gets
/// 1009, and what is within both is delivered.
#[test]
fn frame_and_fragment_limits_close_with_1009() {
    let server = WebSocketServer::builder()
        .max_frame_size(100)
        .max_fragments(16)
        .start("127.0.0.1:0")
        .unwrap();
    // 16 frames of 100 bytes: one message of 1,600, within both limits.
    let mut s = raw_ws(server.local_addr());
    expect_connect(&server);
    let mut wire = frame(0x02, &[7; 100]);
    for _ in 0..14 {
        wire.extend(frame(0x00, &[7; 100]));
    }
    wire.extend(frame(0x80, &[7; 100]));
    s.write_all(&wire).unwrap();
    let (_, m) = expect_message(&server);
    assert_eq!(m.len(), 1600);
    drop(s);
    expect_disconnect(&server);
    // A frame of 101 bytes: its header is enough.
    check(&server, &frame(0x82, &[0; 101])[..6], 1009, |e| {
        matches!(
            e,
            Error::MessageTooLarge {
                size: 101,
                limit: 100
            }
        )
    });
    // Seventeen fragments, all empty.
    let mut frags = frame(0x01, b"");
    for _ in 0..16 {
        frags.extend(frame(0x00, b""));
    }
    check(&server, &frags, 1009, |e| {
        matches!(e, Error::Protocol(ProtocolError::TooManyFragments))
    });
    still_serves(server.local_addr(), &server);
}

/// The cheapest flood of the default fragment limit: 20 clients at once,
/// each sending one message of 131,073 empty fragments (6 bytes a frame).
/// Each is closed with 1009, and the server goes on serving.
#[test]
fn empty_fragment_floods_end_with_1009_at_the_default_limit() {
    let server = WebSocketServer::builder()
        .workers(2)
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let flooders: Vec<_> = (0..20)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = raw_ws(addr);
                let mut wire = frame(0x01, b"");
                let empty = frame(0x00, b"");
                for _ in 0..131_072 {
                    wire.extend_from_slice(&empty);
                }
                // The server may close before all of it is written.
                let _ = s.write_all(&wire);
                read_close(&mut s)
            })
        })
        .collect();
    for f in flooders {
        assert_eq!(f.join().unwrap(), Some(1009));
    }
    let mut gone = 0;
    while gone < 20 {
        match next(&server) {
            enjent::Event::Connect { .. } => {}
            enjent::Event::Disconnect { close, .. } => {
                assert_eq!(close.code.as_u16(), 1009);
                gone += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    still_serves(addr, &server);
}
