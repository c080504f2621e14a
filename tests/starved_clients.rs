//! The server's CPU while clients starved for an unread main loop wait:
//! alone in its own test binary, so that no other test's server adds to
//! the process's CPU it counts.

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use enjent::WebSocketServer;
use support::*;

/// Looking at a starved connection costs nothing while what is there
/// cannot end it: a client whose Close never comes whole (`88 FD`, the
/// start of one), and a starved client with a message kept unparsed that
/// sends on. Where interest is oneshot, armed on bytes already there
/// reports them at once: a look that left it armed would run a job after
/// job (CI runs this with oneshot interest too).
#[cfg(target_os = "linux")]
#[test]
fn clients_that_leave_while_the_main_loop_is_behind_cost_nothing_while_they_wait() {
    let server = WebSocketServer::builder()
        .event_queue_bytes(16 * 1024)
        .ping_interval(None)
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    // The first fills the channel and is starved with a message kept.
    let mut flood = raw_ws(addr);
    let mut wire = frame(0x82, &[7u8; 20 * 1024]);
    wire.extend(frame(0x82, &[8u8; 100]));
    flood.write_all(&wire).unwrap();
    assert!(eventually(WAIT, || server.stats().read_pauses >= 1));
    let mut partial: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut s = raw_ws(addr);
            s.write_all(&[0x88, 0xfd]).unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let before = process_ticks();
    for _ in 0..10 {
        flood.write_all(&frame(0x82, b"more")).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    let ticks = process_ticks() - before;
    eprintln!("1 s with 9 starved clients waiting: {ticks} ticks of the server's CPU");
    assert!(ticks < 20, "{ticks} ticks in 1 s");
    // The partial Closes end when they come whole.
    for s in &mut partial {
        let mut mask_and_rest = vec![0u8; 4];
        mask_and_rest.extend(close_payload(1000, "late"));
        // `88 FD` announced 125 bytes: pad the reason to them.
        mask_and_rest.resize(4 + 125, b' ');
        s.write_all(&mask_and_rest).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    for s in &mut partial {
        assert_eq!(read_close(s), Some(1000));
        assert!(closed_by_server(s));
    }
}
