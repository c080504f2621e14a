//! A job's small replies are corked onto the queue's gathered chunk in
//! one look (`Conn::cork_small`) only where `write` would have done the
//! same: these reach the conditions that decide it over real sockets
//! (a close frame queued, the output budget spent, the cork full). Each
//! fails with its condition taken out of that path.

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use enjent::{Client, CloseCode, Error, WebSocketServer};
use support::*;

/// A closure closes its client after a small reply, then sends another:
/// the send is refused (`Closed`) and nothing follows the close frame.
/// The client reads nothing until the closure is done, so the close's
/// flush leaves the queue as [the rest of a 60 KiB message, begun; the
/// gathered chunk of "before" and the close frame, not begun], costing
/// less than the cork: the state where a small send could be copied onto
/// the chunk behind the close frame.
#[test]
fn a_small_send_after_a_closures_own_close_is_refused_and_not_written() {
    within(Duration::from_secs(60), || {
        const BIG: usize = 60 * 1024;
        let after: Arc<Mutex<Option<String>>> = Arc::default();
        let a2 = Arc::clone(&after);
        let server = WebSocketServer::builder()
            .workers(2)
            .ping_interval(None)
            // The cork (64 KiB) and the budget's least share (low water)
            // both over what the close's flush leaves.
            .low_water(64 * 1024)
            .kernel_send_buffer(Some(4096))
            .on_message(move |c, _| {
                c.send(vec![7u8; BIG]).unwrap();
                c.send("before").unwrap();
                c.close(CloseCode::new(4001), "bye").unwrap();
                let r = c.send("after").map_err(|e| e.into_error());
                *a2.lock().unwrap() = Some(format!("{r:?}"));
            })
            .start("127.0.0.1:0")
            .unwrap();
        let mut s = raw_ws_small_window(server.local_addr());
        s.write_all(&frame(0x81, b"go")).unwrap();
        assert!(eventually(WAIT, || after.lock().unwrap().is_some()));
        let r = after.lock().unwrap().clone();
        let (first, p) = read_frame(&mut s);
        assert_eq!((first, p.len()), (0x82, BIG));
        let (first, p) = read_frame(&mut s);
        assert_eq!((first, p.as_slice()), (0x81, &b"before"[..]));
        let (first, p) = read_frame(&mut s);
        assert_eq!(first, 0x88, "{}", describe(first, &p));
        assert_eq!(p, close_payload(4001, "bye"));
        s.write_all(&frame(0x88, &close_payload(4001, ""))).unwrap();
        // Nothing after the close frame: the server ends the connection.
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        match try_read_frame(&mut s) {
            Err(_) => {}
            Ok((first, p)) => panic!("{} after our close frame", describe(first, &p)),
        }
        assert_eq!(r.as_deref(), Some("Err(Closed)"));
    });
}

/// Over the server's budget, a job's corked replies are refused once its
/// client's queue costs more than its share, even under the cork: the
/// budget takes any frame only into a queue that costs no more than
/// `COUNTED_FROM` (here, as low water is 16 KiB). The first refusal's
/// `queued` is at most the share (the budget divided among the open
/// connections).
#[test]
fn corked_small_replies_are_refused_past_the_share_when_the_budget_is_spent() {
    within(Duration::from_secs(60), || {
        const BUDGET: usize = 256 * 1024;
        const CROWD: usize = 12;
        const SIZE: usize = 8 * 1024;
        let clients: Arc<Mutex<Vec<Client>>> = Arc::default();
        let first_refusal: Arc<Mutex<Option<(u32, Error)>>> = Arc::default();
        let (c2, f2) = (Arc::clone(&clients), Arc::clone(&first_refusal));
        let server = WebSocketServer::builder()
            .max_message_size(64 * 1024)
            .high_water(64 * 1024)
            .low_water(16 * 1024)
            .max_backpressure(0)
            .max_queued_bytes(BUDGET)
            // The crowd's queues stay as they are once the kernel's few
            // KiB are full.
            .kernel_send_buffer(Some(4096))
            .workers(2)
            .ping_interval(None)
            .on_connect(move |c| c2.lock().unwrap().push(c.clone()))
            .on_message(move |c, _| {
                for i in 0..200u32 {
                    if let Err(e) = c.send(vec![i as u8; 100]) {
                        f2.lock().unwrap().get_or_insert((i, e.into_error()));
                    }
                }
            })
            .start("127.0.0.1:0")
            .unwrap();
        let addr = server.local_addr();
        let socks: Vec<TcpStream> = (0..CROWD).map(|_| raw_ws_small_window(addr)).collect();
        assert!(eventually(WAIT, || clients.lock().unwrap().len() == CROWD));
        let crowd: Vec<Client> = clients.lock().unwrap().clone();
        // Fill the crowd until the budget refuses each of them, again
        // until what the pool flushes into the kernel after the
        // refusals leaves the budget spent.
        let t = Instant::now();
        loop {
            let mut done = [false; CROWD];
            while done.iter().any(|d| !d) {
                assert!(t.elapsed() < WAIT, "the budget never refused");
                for (j, c) in crowd.iter().enumerate() {
                    if !done[j] {
                        match c.send(vec![1u8; SIZE]) {
                            Ok(_) => {}
                            Err(e) if matches!(e.error(), Error::ServerBackpressure { .. }) => {
                                done[j] = true
                            }
                            Err(e) => panic!("send: {e}"),
                        }
                    }
                }
            }
            thread::sleep(Duration::from_millis(300));
            if server.stats().queued_budget_bytes > BUDGET as u64 {
                break;
            }
        }
        // The one that asks: reads nothing either.
        let mut s = raw_ws_small_window(addr);
        assert!(eventually(WAIT, || clients.lock().unwrap().len() == CROWD + 1));
        s.write_all(&frame(0x82, b"go")).unwrap();
        assert!(eventually(WAIT, || first_refusal.lock().unwrap().is_some()));
        let (i, e) = first_refusal.lock().unwrap().take().unwrap();
        let share = BUDGET / (CROWD + 1);
        match e {
            Error::ServerBackpressure { queued, .. } => assert!(
                queued <= share,
                "reply {i} refused only when the queue cost {queued}, over its share {share}"
            ),
            other => panic!("{other:?}"),
        }
        drop(socks);
    });
}

/// With low water above the cork (here 48 KiB against 32 KiB, half of
/// high water), the reply that takes a job's queue past the cork is
/// written at once, while the closure still runs: the cork, not the
/// budget's least share, bounds what a job holds. 143 replies of 100 B
/// cost 143 * 230 B as flow control counts them, 32,890 B, just past the
/// cork (32,768 B).
#[test]
fn the_reply_past_the_cork_is_written_during_the_closure_when_low_water_is_above_it() {
    within(Duration::from_secs(60), || {
        const REPLIES: usize = 143;
        let seen = Arc::new(AtomicBool::new(false));
        let during = Arc::new(AtomicBool::new(false));
        let ended = Arc::new(AtomicBool::new(false));
        let (s2, d2, e2) = (Arc::clone(&seen), Arc::clone(&during), Arc::clone(&ended));
        let server = WebSocketServer::builder()
            .high_water(64 * 1024)
            .low_water(48 * 1024)
            .workers(2)
            .ping_interval(None)
            .on_message(move |c, _| {
                for i in 0..REPLIES {
                    c.send(vec![i as u8; 100]).unwrap();
                }
                let t = Instant::now();
                while !s2.load(Relaxed) && t.elapsed() < Duration::from_secs(3) {
                    thread::sleep(Duration::from_millis(5));
                }
                d2.store(s2.load(Relaxed), Relaxed);
                e2.store(true, Relaxed);
            })
            .start("127.0.0.1:0")
            .unwrap();
        let mut s = raw_ws(server.local_addr());
        s.write_all(&frame(0x82, b"go")).unwrap();
        for i in 0..REPLIES {
            let (first, p) = read_frame(&mut s);
            assert_eq!((first, p), (0x82, vec![i as u8; 100]));
        }
        seen.store(true, Relaxed);
        assert!(eventually(WAIT, || ended.load(Relaxed)));
        assert!(
            during.load(Relaxed),
            "the replies reached the client only after the closure ended"
        );
    });
}
