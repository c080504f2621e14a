//! Small frames are copied, header and payload, one after another onto a
//! buffer at the back of a client's queue, where larger ones keep chunks
//! of their own. These tests count what the client gets back: every
//! frame, whole, in each writer's order, whoever wrote it, however the
//! writes were torn, and whatever its size beside the gathering's limit.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use enjent::{Message, WebSocketServer};
use support::*;
use tungstenite::Message as WsMessage;

/// Writers on threads of their own, beside the job's replies.
const WRITERS: u8 = 8;
const PER_WRITER: u32 = 3_000;
/// The client's requests, each answered with `BURST` replies by its job.
const REQUESTS: u32 = 40;
const BURST: u32 = 100;
/// The job's replies are tagged as this writer.
const JOB: u8 = 255;
/// Each writer pings now and then (an empty frame, gathered too).
const PING_EVERY: u32 = 50;

/// Message `seq` of writer `w`: its tag, then bytes derived from both,
/// 5 to 160 bytes long, so that sizes on both sides of the gathering's
/// limit (125 bytes, the largest with a 2-byte header) come mixed.
fn payload(w: u8, seq: u32) -> Vec<u8> {
    let size = 5 + (mix((u64::from(w) << 32) | u64::from(seq)) % 156) as usize;
    let mut v = Vec::with_capacity(size);
    v.push(w);
    v.extend_from_slice(&seq.to_be_bytes());
    while v.len() < size {
        v.push((seq as u8).wrapping_mul(31) ^ (v.len() as u8) ^ w);
    }
    v
}

/// Eight threads and the client's own jobs write small and not so small
/// frames to one client, which reads nothing for the first half second
/// (its socket fills, writes tear, the queue grows): every frame arrives,
/// whole, each writer's in its order, and every ping.
#[test]
fn many_writers_to_one_client_lose_and_mix_up_nothing() {
    let (server, mut ws, target) = start(
        WebSocketServer::builder()
            // Nobody meets the hard limit: every send must be taken.
            .max_backpressure(64 << 20)
            .on_message(|client, m| {
                // A request: `BURST` replies from the job, numbered on
                // from where its request says.
                let first = u32::from_be_bytes(m.as_bytes()[..4].try_into().unwrap());
                for seq in first..first + BURST {
                    client
                        .send(Message::Binary(payload(JOB, seq)))
                        .expect("a reply is taken");
                }
            }),
    );
    for r in 0..REQUESTS {
        ws.send(WsMessage::binary((r * BURST).to_be_bytes().to_vec()))
            .unwrap();
    }
    ws.flush().unwrap();
    let start = Arc::new(Barrier::new(usize::from(WRITERS) + 1));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (target, start) = (target.clone(), Arc::clone(&start));
            thread::spawn(move || {
                start.wait();
                for seq in 0..PER_WRITER {
                    target
                        .send_timeout(Message::Binary(payload(w, seq)), WAIT)
                        .expect("a send is taken");
                    if seq % PING_EVERY == 0 {
                        target.ping().expect("a ping is taken");
                    }
                }
            })
        })
        .collect();
    start.wait();
    thread::sleep(Duration::from_millis(500));

    let mut next: HashMap<u8, u32> = HashMap::new();
    let mut pings = 0u32;
    let want_pings = u32::from(WRITERS) * PER_WRITER.div_ceil(PING_EVERY);
    let want = u32::from(WRITERS) * PER_WRITER + REQUESTS * BURST;
    let mut got = 0u32;
    let deadline = Instant::now() + Duration::from_secs(60);
    while got < want || pings < want_pings {
        assert!(
            Instant::now() < deadline,
            "{got} of {want} messages, {pings} pings"
        );
        match ws.read().expect("the client reads") {
            WsMessage::Binary(p) => {
                let w = p[0];
                let seq = u32::from_be_bytes(p[1..5].try_into().unwrap());
                let expected = next.entry(w).or_default();
                assert_eq!(seq, *expected, "writer {w}'s messages in order");
                assert_eq!(
                    &p[..],
                    &payload(w, seq)[..],
                    "writer {w}'s message {seq} whole"
                );
                *expected += 1;
                got += 1;
            }
            WsMessage::Ping(p) => {
                assert!(p.is_empty());
                pings += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    for w in writers {
        w.join().unwrap();
    }
    for w in 0..WRITERS {
        assert_eq!(next.get(&w), Some(&PER_WRITER), "writer {w}");
    }
    assert_eq!(next.get(&JOB), Some(&(REQUESTS * BURST)));
    // The writer counts what it wrote just after the client may have read
    // it.
    assert!(
        eventually(Duration::from_secs(5), || server.stats().bytes_queued == 0),
        "left queued: {}",
        server.stats().bytes_queued
    );
}

/// Tiny frames to a client that reads nothing fill its queue to the hard
/// limit as separate chunks would have: each counts its bytes and 64 B
/// for each piece (a header, a payload), and frames already written are
/// not counted long after (at most the 2 KiB of a gathered chunk a write
/// has begun). The refusal's count is what is queued, as that rule says.
#[test]
fn tiny_frames_to_a_client_that_reads_nothing_are_counted_as_their_pieces() {
    let (server, _ws, target) = start(WebSocketServer::builder());
    let limit = server.config().max_backpressure();
    let mut sent = 0usize;
    let mut fill = || loop {
        match target.send(Message::Binary(vec![7])) {
            Ok(_) => sent += 1,
            Err(e) => match e.error() {
                enjent::Error::Backpressure { queued, .. } => break *queued,
                other => panic!("after {sent} sends: {other}"),
            },
        }
        assert!(sent < 10 * limit, "never refused");
    };
    fill();
    // A write that was out when the refusal came is put back by now
    // (until then what it took is counted whole): nothing moves after
    // it, since the client reads nothing. Fill to the limit again.
    thread::sleep(Duration::from_millis(200));
    let queued = fill();
    let bytes = target.buffered_amount();
    // A 1-byte message is a 3-byte frame of two pieces.
    let counted = bytes + bytes / 3 * 2 * 64;
    assert!(
        queued >= counted && queued <= counted + 2048,
        "refused at {queued} counted with {bytes} bytes queued ({counted} as pieces), after {sent} sends, limit {limit}"
    );
    assert!(queued + 200 >= limit, "{queued} of {limit}");
}

/// A server from `builder` with a 4 KiB kernel send buffer for each
/// client, and a client of it whose receive window is 4 KiB, so that
/// writes tear often; the client's handle on the server's side.
fn start(builder: enjent::Builder) -> (WebSocketServer, Ws, enjent::Client) {
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let server = builder
        .kernel_send_buffer(Some(4096))
        .on_connect(move |client| tx.lock().unwrap().send(client.clone()).unwrap())
        .start("127.0.0.1:0")
        .expect("start");
    let addr = server.local_addr();
    let ws = client_over(small_window(addr), format!("ws://{addr}/")).expect("handshake");
    let target = rx.recv_timeout(WAIT).expect("the client connects");
    (server, ws, target)
}
