//! Read backpressure: when the main loop falls behind a bounded event
//! queue, the server stops reading instead of buffering, and nothing is
//! lost; shutdown from the consuming thread does not deadlock.

mod support;

use std::io::Write;
use std::time::{Duration, Instant};

use enjent::{Event, WebSocketServer};
use support::*;

#[test]
fn a_full_event_queue_stops_reading_and_loses_nothing() {
    let server = WebSocketServer::builder()
        .event_queue_bytes(16 * 1024)
        .start("127.0.0.1:0")
        .unwrap();
    let mut s = raw_ws(server.local_addr());
    s.set_nonblocking(true).unwrap();
    // Nobody consumes events. Write numbered messages until the socket
    // pushes back: it must, since the server stops reading.
    let mut sent = 0u32; // frames written completely
    let start = Instant::now();
    let mut stalls = 0;
    let mut pending = Vec::new();
    while start.elapsed() < Duration::from_secs(20) {
        if pending.is_empty() {
            pending = frame(0x81, format!("{sent:08}{}", "x".repeat(1000)).as_bytes());
        }
        match s.write(&pending) {
            Ok(n) => {
                pending.drain(..n);
                if pending.is_empty() {
                    sent += 1;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                stalls += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("{e}"),
        }
        if stalls >= 5 {
            break;
        }
    }
    assert!(stalls >= 5, "the server kept reading with nobody consuming");
    assert!(sent < 200_000, "{sent} messages before any stall");
    // Now consume: every message arrives, in order.
    expect_connect(&server);
    for i in 0..sent {
        let (_, m) = expect_message(&server);
        assert_eq!(&m.as_text().unwrap()[..8], format!("{i:08}"), "message {i}");
    }
}

#[test]
fn shutdown_from_the_consumer_thread_with_a_full_queue_delivers_everything_after() {
    let server = WebSocketServer::builder()
        .event_queue_bytes(4096)
        .close_timeout(Duration::from_millis(300))
        .start("127.0.0.1:0")
        .unwrap();
    let clients: Vec<_> = (0..4).map(|_| raw_ws(server.local_addr())).collect();
    for (i, mut s) in clients.iter().enumerate() {
        for j in 0..50 {
            s.write_all(&frame(0x81, format!("{i}:{j}").as_bytes()))
                .unwrap();
        }
    }
    std::thread::sleep(Duration::from_millis(200)); // let the queue fill
    let start = Instant::now();
    server.shutdown();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    let mut messages = std::collections::HashMap::<u64, Vec<String>>::new();
    let mut disconnects = 0;
    for event in server.events() {
        match event {
            Event::Message { client, message } => messages
                .entry(client.id().as_u64())
                .or_default()
                .push(message.into_text().unwrap()),
            Event::Disconnect { .. } => disconnects += 1,
            _ => {}
        }
    }
    assert_eq!(disconnects, 4);
    let mut total = 0;
    for list in messages.values() {
        // Per client, in order with no gaps (each client's prefix is
        // whatever the server had read before it stopped reading).
        let i = list[0].split(':').next().unwrap().to_owned();
        for (j, m) in list.iter().enumerate() {
            assert_eq!(m, &format!("{i}:{j}"));
        }
        total += list.len();
    }
    assert!(total > 0);
    drop(clients);
}
