//! No file descriptor or thread leaks across 10,000 connections that end
//! every way a connection can end: close handshake, FIN in the middle of a
//! frame, reset, and a refused handshake.

mod support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use enjent::{Event, WebSocketServer};
use support::*;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn ten_thousand_connect_disconnect_cycles_leak_nothing() {
    if !std::path::Path::new("/proc/self/fd").exists() {
        eprintln!("skipped: no /proc/self/fd on this system");
        return;
    }
    let server = WebSocketServer::builder()
        .close_timeout(Duration::from_millis(200))
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    // Warm up (pool threads, scratch buffers), then take the baseline.
    drop(raw_ws(addr));
    expect_connect(&server);
    expect_disconnect(&server);
    // The Disconnect event can overtake the socket's close by a moment
    // (the worker drops its last reference after emitting it).
    std::thread::sleep(Duration::from_millis(300));
    let (fds, tasks) = (open_fds(), threads());

    let mut expected_disconnects = 0;
    for i in 0..10_000 {
        match i % 4 {
            // A full close handshake.
            0 => {
                let mut s = raw_ws(addr);
                s.write_all(&frame(0x88, &close_payload(1000, ""))).unwrap();
                assert_eq!(read_close(&mut s), Some(1000));
                expected_disconnects += 1;
            }
            // FIN in the middle of a frame.
            1 => {
                let mut s = raw_ws(addr);
                s.write_all(&frame(0x82, &[5; 300])[..100]).unwrap();
                expected_disconnects += 1;
            }
            // A reset: the client sends a ping and closes with linger 0,
            // which resets the connection whatever it has read.
            2 => {
                let mut s = raw_ws(addr);
                s.write_all(&frame(0x89, b"x")).unwrap();
                socket2::SockRef::from(&s)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                drop(s);
                expected_disconnects += 1;
            }
            // A refused handshake.
            _ => {
                let mut s = raw(addr);
                s.write_all(REQUEST.replace("13", "12").as_bytes()).unwrap();
                let mut out = Vec::new();
                let _ = s.read_to_end(&mut out);
                assert!(out.starts_with(b"HTTP/1.1 426"));
            }
        }
        // Keep the event channel drained as we go.
        while let Ok(ev) = server.try_recv() {
            if let Event::Disconnect { .. } = ev {
                expected_disconnects -= 1;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while expected_disconnects > 0 && Instant::now() < deadline {
        if let Ok(Event::Disconnect { .. }) = server.recv_timeout(Duration::from_millis(100)) {
            expected_disconnects -= 1;
        }
    }
    assert_eq!(
        expected_disconnects, 0,
        "every connection got its Disconnect"
    );
    assert_eq!(server.connections(), 0);
    // Sockets close when the last reference goes; give workers a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_fds() > fds && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(open_fds(), fds, "file descriptors leaked");
    assert_eq!(threads(), tasks, "threads leaked");
    assert_eq!(server.stats().bytes_queued, 0);
}
