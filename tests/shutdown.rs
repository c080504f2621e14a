//! Shutdown closes every client with 1001 after flushing what was queued,
//! reports each Disconnect, and ends the event stream.

mod support;

use std::time::{Duration, Instant};

use enjent::{CloseCode, Event, WebSocketServer};
use support::*;
use tungstenite::Message as Tm;

#[test]
fn shutdown_flushes_closes_and_ends_the_event_loop() {
    let server = server();
    let addr = server.local_addr();
    let handle = server.handle();
    let readers: Vec<_> = (0..5)
        .map(|_| {
            let mut ws = client(addr);
            std::thread::spawn(move || {
                let mut got = 0;
                loop {
                    match ws.read() {
                        Ok(Tm::Binary(b)) => {
                            assert_eq!(b.len(), 100_000);
                            got += 1;
                        }
                        Ok(Tm::Close(f)) => {
                            // Keep reading: tungstenite sends its answer and
                            // then sees the server close the connection.
                            while ws.read().is_ok() {}
                            return (got, f.map(|f| u16::from(f.code)));
                        }
                        Ok(_) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(expect_connect(&server).id());
    }
    // Queue a lot to everyone, then shut down at once: all of it must
    // arrive before the close frame.
    for _ in 0..20 {
        handle.broadcast(vec![7u8; 100_000]);
    }
    let start = Instant::now();
    server.shutdown();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    for r in readers {
        assert_eq!(r.join().unwrap(), (20, Some(1001)));
    }
    let mut gone = Vec::new();
    for event in server.events() {
        if let Event::Disconnect { client, close, .. } = event {
            assert_eq!(close.code, CloseCode::GOING_AWAY);
            gone.push(client.id());
        }
    }
    // The loop above ended by itself: the stream is over.
    gone.sort();
    ids.sort();
    assert_eq!(gone, ids);
    assert!(handle.send(ids[0], "late").is_err());
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "the listener is closed"
    );
}

/// A handle outlives its server: `publish` and `broadcast` then reach
/// nobody, as with nobody subscribed, and `is_running` tells the two
/// apart.
#[test]
fn a_handle_tells_a_stopped_server_from_an_empty_topic() {
    let server = WebSocketServer::builder().start("127.0.0.1:0").unwrap();
    let handle = server.handle();
    assert!(handle.is_running());
    assert_eq!(handle.publish("nobody", "x"), enjent::Broadcast::default());
    server.shutdown();
    assert!(!handle.is_running());
    assert_eq!(handle.publish("nobody", "x"), enjent::Broadcast::default());
    drop(server);
    assert!(!handle.is_running());
    assert_eq!(handle.broadcast("x"), enjent::Broadcast::default());
}

#[test]
fn drop_shuts_down_and_unresponsive_clients_are_forced_off() {
    let server = WebSocketServer::builder()
        .close_timeout(Duration::from_millis(200))
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    // A raw client that never answers the close frame.
    let _s = raw_ws(addr);
    expect_connect(&server);
    let start = Instant::now();
    drop(server);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert!(std::net::TcpStream::connect(addr).is_err());
}

#[test]
fn events_loop_sees_disconnect_then_ends_when_shutdown_from_another_thread() {
    // The client below never reads, so it never answers the close frame.
    let server = WebSocketServer::builder()
        .close_timeout(Duration::from_millis(300))
        .start("127.0.0.1:0")
        .unwrap();
    let _ws = client(server.local_addr());
    expect_connect(&server);
    let handle = server.handle();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        handle.shutdown();
    });
    let mut disconnects = 0;
    for ev in server.events() {
        if matches!(ev, Event::Disconnect { .. }) {
            disconnects += 1;
        }
    }
    stopper.join().unwrap();
    assert_eq!(disconnects, 1);
}

/// Threads of this process named `name` (Linux: `/proc/self/task`).
#[cfg(target_os = "linux")]
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|comm| comm.trim_end() == name)
                .count()
        })
        .unwrap_or(0)
}

/// Every closure that asks for a shutdown while one is under way must not
/// cost a thread: 100 handlers asking at once start one shutdown thread,
/// not 100 that each wait out the whole shutdown.
#[cfg(target_os = "linux")]
#[test]
fn a_hundred_closures_asking_for_shutdown_start_one_thread() {
    use std::io::Write;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    let gone = Arc::new(AtomicUsize::new(0));
    let server = {
        let gone = Arc::clone(&gone);
        WebSocketServer::builder()
            .close_timeout(Duration::from_millis(500))
            .on_message(|client, _| client.server().shutdown())
            .on_disconnect(move |_, _, _| {
                gone.fetch_add(1, Ordering::AcqRel);
            })
            .start("127.0.0.1:0")
            .unwrap()
    };
    let addr = server.local_addr();
    // Raw clients that never read: none answers the close, so the
    // shutdown waits `close_timeout` with its lock held.
    let mut socks: Vec<_> = (0..100).map(|_| raw_ws(addr)).collect();
    let (done, peak) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let watcher = {
        let (done, peak) = (Arc::clone(&done), Arc::clone(&peak));
        std::thread::spawn(move || {
            while !done.load(Ordering::Acquire) {
                peak.fetch_max(threads_named("enjent-shutdown"), Ordering::AcqRel);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    for s in &mut socks {
        s.write_all(&frame(0x81, b"stop")).unwrap();
    }
    // The stream ends when the shutdown is over.
    for _ in server.events() {}
    done.store(true, Ordering::Release);
    watcher.join().unwrap();
    assert_eq!(gone.load(Ordering::Acquire), 100);
    let peak = peak.load(Ordering::Acquire);
    assert!(peak >= 1, "the watcher never saw the shutdown thread");
    assert!(peak <= 1, "{peak} shutdown threads at once");
}

/// A client that never reads, with data queued, at `shutdown()`: its close
/// times out (before shutdown's own patience would force it), and its
/// `Disconnect` says so, keeping the kind, with the count of bytes it
/// never got, which `buffered_amount()` gives too.
#[test]
fn a_client_forced_off_by_shutdown_with_data_queued_is_told_so() {
    let server = WebSocketServer::builder()
        .close_timeout(Duration::from_millis(200))
        .max_backpressure(16 << 20)
        .start("127.0.0.1:0")
        .unwrap();
    let _s = raw_ws_small_window(server.local_addr()); // never reads
    let c = expect_connect(&server);
    for _ in 0..64 {
        c.send(vec![1u8; 64 * 1024]).unwrap();
    }
    assert!(c.buffered_amount() > 0, "nothing stayed queued");
    let handle = server.handle();
    let stopper = std::thread::spawn(move || handle.shutdown());
    let mut told = None;
    for ev in server.events() {
        if let Event::Disconnect { client, error, .. } = ev {
            told = Some((client, error));
        }
    }
    stopper.join().unwrap();
    let (client, error) = told.expect("a Disconnect");
    assert_eq!(client.id(), c.id());
    let left = client.buffered_amount();
    assert!(left > 0);
    match error {
        Some(enjent::Error::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
            assert!(e.to_string().contains(&left.to_string()), "{e}: {left}");
        }
        other => panic!("{other:?}"),
    }
}

/// Shutdown called from the main loop's own thread, so that nothing
/// consumes events until it returns, with clients streaming messages the
/// loop had fallen behind on (each paused by its own unconsumed events).
/// Their close must still be read: each is read on at network speed to
/// its answer, which ends its connection, not the close timeout. What
/// each sends meanwhile is delivered until its own unconsumed events
/// reach the hard limit (about 1 MiB here), and from there on dropped and
/// counted (`messages_discarded`), as a browser drops every message once
/// `close()` is called: so that one client being closed cannot take the
/// whole event channel from the others. Before, a closing client was
/// paused at that limit instead, with nobody left to end the pause: the
/// rest of its messages and its answer stayed in the kernel, lost
/// uncounted with the socket, and each `Disconnect` said 1006 after the
/// close timeout.
#[test]
fn shutdown_from_the_main_loop_reads_closing_clients_to_their_answer() {
    use std::io::Write;
    const CLIENTS: usize = 4;
    const SENT: u32 = 3000;
    let server = WebSocketServer::builder()
        .close_timeout(Duration::from_secs(3))
        .ping_interval(None)
        .start("127.0.0.1:0")
        .unwrap();
    let message = |c: usize, i: u32| {
        let mut m = numbered(i, 1024);
        m[4] = c as u8;
        m
    };
    let mut ids = Vec::new();
    let mut sockets = Vec::new();
    for _ in 0..CLIENTS {
        sockets.push(raw_ws(server.local_addr()));
        ids.push(expect_connect(&server).id());
    }
    let mut answerers = Vec::new();
    for (c, mut s) in sockets.into_iter().enumerate() {
        let mut w = s.try_clone().unwrap();
        let wire: Vec<u8> = (0..SENT)
            .flat_map(|i| frame(0x82, &message(c, i)))
            .collect();
        let writer = std::thread::spawn(move || {
            // Blocks while the server is paused; the close lets it go on.
            w.write_all(&wire).unwrap();
            w
        });
        answerers.push(std::thread::spawn(move || {
            // Nothing comes but the close; then every message is sent,
            // and the answer after them.
            let (first, payload) = read_frame(&mut s);
            assert_eq!((first, &payload[..2]), (0x88, &1001u16.to_be_bytes()[..]));
            let mut w = writer.join().unwrap();
            w.write_all(&frame(0x88, &close_payload(1001, "bye")))
                .unwrap();
            assert!(closed_by_server(&mut s));
        }));
    }
    assert!(
        eventually(WAIT, || server.stats().read_pauses >= CLIENTS as u64),
        "not all paused: {:?}",
        server.stats()
    );
    let start = Instant::now();
    server.shutdown();
    let took = start.elapsed();
    let mut got = vec![0u32; CLIENTS];
    let mut closes = Vec::new();
    for event in server.events() {
        match event {
            Event::Message { client, message: m } => {
                let c = ids.iter().position(|&id| id == client.id()).unwrap();
                assert!(
                    m.as_bytes() == &message(c, got[c])[..],
                    "client {c}, message {}",
                    got[c]
                );
                got[c] += 1;
            }
            Event::Disconnect { close, error, .. } => closes.push((close.code, error.is_none())),
            _ => {}
        }
    }
    for a in answerers {
        a.join().unwrap();
    }
    // Every message read was delivered, in order, or counted: none went
    // with the socket.
    let delivered: u64 = got.iter().map(|&n| u64::from(n)).sum();
    let discarded = server.stats().messages_discarded;
    assert_eq!(
        delivered + discarded,
        u64::from(SENT) * CLIENTS as u64,
        "{got:?}, {discarded} discarded"
    );
    assert!(got.iter().all(|&n| n >= 900), "{got:?}");
    assert_eq!(closes, vec![(CloseCode::GOING_AWAY, true); CLIENTS]);
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
}

/// The same for a client paused for the event channel (starved) whose
/// queue is over the hard limit when shutdown closes it: the close does
/// not end a pause its queue keeps, and once the client has read its
/// queue, the pause must end by the queue alone, whatever the channel. A
/// is starved by B's flood, sent 16 MiB (an empty queue takes any one
/// frame) and closed by shutdown from the main loop's thread; it reads
/// everything and answers. Before, the pause waited for the channel,
/// which nobody consumed: A's answer was never read, its `Disconnect`
/// said 1006 and shutdown waited out the close timeout.
#[test]
fn shutdown_from_the_main_loop_reads_a_starved_client_with_a_full_queue() {
    use std::io::Write;
    let server = WebSocketServer::builder()
        .high_water(1 << 20)
        .low_water(256 << 10)
        .event_queue_bytes(256 << 10)
        .max_message_size(64 << 10)
        .max_backpressure(2 << 20)
        .close_timeout(Duration::from_secs(3))
        .ping_interval(None)
        .start("127.0.0.1:0")
        .unwrap();
    let mut a = raw_ws_small_window(server.local_addr());
    let ca = expect_connect(&server);
    let mut b = raw_ws(server.local_addr());
    expect_connect(&server);
    // B's flood takes the channel over its budget, and B is starved.
    b.write_all(&frame(0x82, &[1u8; 1024]).repeat(512)).unwrap();
    assert!(eventually(WAIT, || server.stats().read_pauses >= 1));
    // Then A's one message finds it so: A is starved too.
    a.write_all(&frame(0x81, b"a")).unwrap();
    assert!(
        eventually(WAIT, || server.stats().read_pauses >= 2),
        "{:?}",
        server.stats()
    );
    ca.send(vec![7u8; 16 << 20]).unwrap();
    assert!(ca.buffered_amount() > 2 << 20, "the kernel took it all");
    let answer = |mut s: std::net::TcpStream| {
        std::thread::spawn(move || {
            loop {
                let (first, _) = read_frame(&mut s);
                if first == 0x88 {
                    s.write_all(&frame(0x88, &close_payload(1001, ""))).unwrap();
                    return closed_by_server(&mut s);
                }
            }
        })
    };
    let (ra, rb) = (answer(a), answer(b));
    let start = Instant::now();
    server.shutdown();
    let took = start.elapsed();
    let mut closes = Vec::new();
    for event in server.events() {
        if let Event::Disconnect { client, close, .. } = event {
            closes.push((client.id() == ca.id(), close.code));
        }
    }
    assert!(ra.join().unwrap() && rb.join().unwrap());
    closes.sort();
    assert_eq!(
        closes,
        vec![
            (false, CloseCode::GOING_AWAY),
            (true, CloseCode::GOING_AWAY)
        ]
    );
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
}

thread_local! {
    static KEPT: std::cell::RefCell<Option<WebSocketServer>> = const { std::cell::RefCell::new(None) };
}

/// A server kept in a thread-local is shut down as its thread ends,
/// after the thread wrote to a client: the shutdown's close frames are
/// queued from the thread-local's destructor, once the send path's own
/// thread-local state may be gone (found by a review: the queue's spare
/// box, kept in a thread-local, made that abort the process). Both
/// clients get their close.
#[test]
fn a_server_kept_in_a_thread_local_shuts_down_as_its_thread_ends() {
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let server = server();
        let addr = server.local_addr();
        // One at a time: handshakes run on workers side by side, so two
        // clients' `Connect`s can come in either order.
        let a = client(addr);
        let ca = expect_connect(&server);
        let b = client(addr);
        let _cb = expect_connect(&server);
        // Kept first: thread-locals are destroyed in the reverse order of
        // their first use, so the send path's come before this one.
        KEPT.with(|k| *k.borrow_mut() = Some(server));
        ca.send("hi").unwrap();
        ca.close(CloseCode::NORMAL, "bye").unwrap();
        tx.send((a, b)).unwrap();
    });
    let (mut a, mut b) = rx.recv().unwrap();
    let saw_close = |ws: &mut Ws, code: u16| loop {
        match ws.read() {
            Ok(Tm::Close(Some(f))) => {
                assert_eq!(u16::from(f.code), code);
                break;
            }
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    };
    saw_close(&mut a, 1000);
    saw_close(&mut b, 1001);
    // Our answers end the shutdown's wait for them.
    let _ = a.flush();
    let _ = b.flush();
    t.join()
        .expect("the thread (and its server's shutdown) ended");
}
