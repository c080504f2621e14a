//! A server-wide budget for unfinished incoming messages: a flood of
//! large fragmented messages cannot exhaust memory.

mod support;

use std::io::Write;

use enjent::{Error, WebSocketServer};
use support::*;

#[test]
fn partial_messages_over_the_server_wide_budget_close_with_1009() {
    // Each client may send 1 MiB messages, but all partial messages
    // together may hold only 1.5 MiB.
    let server = WebSocketServer::builder()
        .max_message_size(1 << 20)
        .max_buffered_bytes(3 << 19)
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let mut a = raw_ws(addr);
    let ca = expect_connect(&server);
    let mut b = raw_ws(addr);
    let cb = expect_connect(&server);
    // A holds 600 KiB of an unfinished message; fine. Waited for, not
    // slept on: the server must hold all of it before B sends.
    const A_LEN: usize = 600 * 1024;
    a.write_all(&frame(0x02, &vec![1; A_LEN])).unwrap();
    let t = std::time::Instant::now();
    while server.stats().buffered_in_bytes < A_LEN as u64 {
        assert!(
            t.elapsed() < WAIT,
            "the server never held A's {A_LEN} bytes"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // B's 1000 KiB take the total past 1.5 MiB, and whoever holds the most
    // is closed: B, which by then holds over 936 KiB, more than A. (With
    // 800 KiB each, B held the most only if its last read was the one
    // that crossed the line: otherwise A was closed.)
    b.write_all(&frame(0x02, &vec![2; 1000 * 1024])).unwrap();
    assert_eq!(read_close(&mut b), Some(1009));
    drop(b);
    let (who, close, error) = expect_disconnect(&server);
    assert_eq!((who.id(), close.code.as_u16()), (cb.id(), 1009));
    assert!(
        matches!(error, Some(Error::MessageTooLarge { .. })),
        "{error:?}"
    );
    // A is unaffected and finishes its message.
    a.write_all(&frame(0x80, b"end")).unwrap();
    let (who, m) = expect_message(&server);
    assert_eq!((who.id(), m.len()), (ca.id(), A_LEN + 3));
}
