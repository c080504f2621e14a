//! Readiness is edge-triggered: an event reports what changed, once. These
//! tests look for input, or frames to write, that no event will report
//! again, which the server must come back for by itself.

mod support;

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use enjent::WebSocketServer;
use support::*;

/// The tests load the machine; one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const MESSAGE: usize = 64 * 1024;

/// `n` masked binary frames of `MESSAGE` bytes, built once.
fn burst(n: usize) -> Vec<u8> {
    frames(n, MESSAGE)
}

/// A job reads at most 1 MiB before it lets the worker go. Clients whose
/// bursts wait whole in the kernel while the only worker is held (their
/// receive buffers grown by an earlier stream) have more than that there
/// when their jobs start, and send nothing after: no event comes for what
/// a job leaves. Every message must still be read, each client's in full.
#[test]
fn input_a_job_leaves_at_its_budget_is_read_though_nothing_more_comes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const CLIENTS: usize = 4;
    const WARM: usize = 128; // 8 MiB each, to grow the receive buffers
    const BURST: usize = 48; // 3 MiB each, sent while the worker is held
    // Messages read, by the client's port.
    let counts: Arc<Mutex<HashMap<u16, usize>>> = Arc::default();
    let (held, release) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let (h, r, c) = (Arc::clone(&held), Arc::clone(&release), Arc::clone(&counts));
    let server = WebSocketServer::builder()
        .workers(1)
        .on_message(move |client, m| {
            if m.len() == 3 {
                h.store(true, Ordering::SeqCst);
                while !r.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(1));
                }
            } else {
                *c.lock()
                    .unwrap()
                    .entry(client.peer_addr().port())
                    .or_default() += 1;
            }
        })
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let mut clients: Vec<_> = (0..CLIENTS).map(|_| raw_ws(addr)).collect();
    let ports: Vec<u16> = clients
        .iter()
        .map(|s| s.local_addr().unwrap().port())
        .collect();
    let read = |ports: &[u16]| -> Vec<usize> {
        let c = counts.lock().unwrap();
        ports
            .iter()
            .map(|p| c.get(p).copied().unwrap_or(0))
            .collect()
    };
    let warm = burst(WARM);
    for s in &mut clients {
        s.write_all(&warm).unwrap();
    }
    assert!(
        eventually(WAIT * 3, || read(&ports).iter().all(|&n| n == WARM)),
        "the warm-up streams were not all read: {:?}",
        read(&ports)
    );
    // Hold the only worker, and let each client's burst land.
    let mut gate = raw_ws(addr);
    gate.write_all(&frame(0x82, &[0, 0, 0])).unwrap();
    assert!(eventually(WAIT, || held.load(Ordering::SeqCst)));
    let data = Arc::new(burst(BURST));
    let writers: Vec<_> = clients
        .iter()
        .map(|s| {
            let mut w = s.try_clone().unwrap();
            let data = Arc::clone(&data);
            thread::spawn(move || w.write_all(&data).unwrap())
        })
        .collect();
    // The bursts must wait whole in the kernel, or the jobs would not
    // find more than their budget there with nothing more to come.
    assert!(
        eventually(WAIT, || writers.iter().all(|w| w.is_finished())),
        "the bursts did not fit in the kernel's buffers"
    );
    release.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    assert!(
        eventually(WAIT, || read(&ports).iter().all(|&n| n == WARM + BURST)),
        "messages read per client: {:?} of {}",
        read(&ports),
        WARM + BURST
    );
    assert_eq!(counts.lock().unwrap().len(), CLIENTS);
    drop(clients);
}

/// Frames another thread sends while a flush job (the one a burst of sends
/// starts) is letting go of the connection are corked behind it. If that
/// flush's last write took everything, the socket has room, and the poller
/// reports room only after a write that found none: the flush must write
/// them itself. Each connection's socket was backed up once first, so that
/// the poller already watches it for room (no system call is left that
/// would look). Four threads each stream rounds of messages to their own
/// client, and every message of every round must arrive, with no
/// keepalive or input to rescue them. (A first version of edge-triggered
/// interest left some there in every run, by the fifteenth round.)
#[test]
fn sends_corked_as_a_flush_lets_go_are_written_though_no_event_comes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const CLIENTS: usize = 4;
    let server = WebSocketServer::builder()
        .ping_interval(None)
        .idle_timeout(None)
        .start("127.0.0.1:0")
        .unwrap();
    let pairs: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let s = raw_ws(server.local_addr());
            (s, expect_connect(&server))
        })
        .collect();
    let streams: Vec<_> = pairs
        .into_iter()
        .map(|(mut s, client)| {
            thread::spawn(move || {
                // Back the socket up: 4 MiB sent while the client reads
                // nothing at first.
                const BIG: u32 = 64;
                let reader = {
                    let mut r = s.try_clone().unwrap();
                    thread::spawn(move || {
                        thread::sleep(Duration::from_millis(300));
                        for i in 0..BIG {
                            let (op, p) = read_frame(&mut r);
                            assert_eq!((op, p.len()), (0x82, MESSAGE), "backlog frame {i}");
                        }
                    })
                };
                for _ in 0..BIG {
                    client
                        .send_timeout(vec![1u8; MESSAGE], WAIT)
                        .expect("the backlog is read");
                }
                reader.join().unwrap();
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                const ROUNDS: u32 = 20;
                const BURST: u32 = 2000;
                for round in 0..ROUNDS {
                    for k in 0..BURST {
                        client.send(format!("{round}.{k}")).unwrap();
                    }
                    for k in 0..BURST {
                        let (op, p) = try_read_frame(&mut s).unwrap_or_else(|e| {
                            panic!("round {round}: message {k} of {BURST} never came ({e})")
                        });
                        assert_eq!((op, p), (0x81, format!("{round}.{k}").into_bytes()));
                    }
                }
            })
        })
        .collect();
    for t in streams {
        t.join().unwrap();
    }
}
