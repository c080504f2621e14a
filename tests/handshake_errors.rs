//! Bad upgrade requests get the right HTTP status, and the server keeps
//! serving other clients.

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use support::*;

fn status_of(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"))
}

#[test]
fn each_bad_request_gets_its_status() {
    let server = server();
    let addr = server.local_addr();
    let cases: Vec<(String, u16)> = vec![
        (REQUEST.replace("Version: 13", "Version: 8"), 426),
        (
            REQUEST.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
            400,
        ),
        (REQUEST.replace("GET", "POST"), 405),
        (REQUEST.replace("Upgrade: websocket\r\n", ""), 426),
        (
            REQUEST.replace("Connection: Upgrade", "Connection: close"),
            400,
        ),
        (REQUEST.replace("Host: localhost\r\n", ""), 400),
        // Headers RFC 6455 allows once, twice (the first used to win).
        (
            REQUEST.replace("Host: localhost\r\n", "Host: localhost\r\nHost: other\r\n"),
            400,
        ),
        (
            REQUEST.replace(
                "Version: 13\r\n",
                "Version: 13\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n",
            ),
            400,
        ),
        (
            "\x16\x03\x01\x02\x00garbage that is not http\r\n\r\n".into(),
            400,
        ),
        (
            REQUEST.replace("Host: localhost", &format!("Host: {}", "h".repeat(20_000))),
            431,
        ),
        // A whole request whose line alone is over the limit.
        (
            REQUEST.replace("GET / ", &format!("GET /{} ", "p".repeat(20_000))),
            414,
        ),
        // A body would be read as frames where a proxy framing by HTTP
        // skips it.
        (
            REQUEST.replace("\r\n\r\n", "\r\nContent-Length: 6\r\n\r\n") + "abcdef",
            400,
        ),
        (
            REQUEST.replace("\r\n\r\n", "\r\nTransfer-Encoding: chunked\r\n\r\n") + "0\r\n\r\n",
            400,
        ),
    ];
    for (request, want) in cases {
        let response = http(addr, request.as_bytes());
        assert_eq!(status_of(&response), want, "{response}");
        if want == 426 {
            assert!(
                response.contains("Sec-WebSocket-Version: 13\r\n"),
                "{response}"
            );
        }
    }
    assert!(
        server.try_recv().is_err(),
        "refused requests produce no events"
    );
    still_serves(addr, &server);
}

#[test]
fn request_split_across_many_writes_is_accepted() {
    let server = server();
    let mut s = raw(server.local_addr());
    for b in REQUEST.as_bytes().chunks(5) {
        s.write_all(b).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    // A frame in the same write as the end of the request is processed too.
    s.write_all(&frame(0x81, b"right behind")).unwrap();
    expect_connect(&server);
    let (_, m) = expect_message(&server);
    assert_eq!(m.as_text(), Some("right behind"));
}

#[test]
fn frame_in_the_same_packet_as_the_request_is_not_lost() {
    let server = server();
    let mut s = raw(server.local_addr());
    let mut bytes = REQUEST.as_bytes().to_vec();
    bytes.extend(frame(0x82, &[9, 8, 7]));
    s.write_all(&bytes).unwrap();
    expect_connect(&server);
    let (_, m) = expect_message(&server);
    assert_eq!(m.as_bytes(), &[9, 8, 7]);
}

/// Requests of about the size the accept thread reads at once (2 KiB),
/// and longer ones, each sent whole with a frame behind it: every one is
/// served and its frame delivered; sent whole and then half-closed
/// (`nc -N`), every one still gets its `101` (a request of exactly the
/// first read's size, whose job then found only the end of input, was
/// once dropped unanswered).
#[test]
fn requests_around_the_first_reads_size_are_served_even_half_closed() {
    use std::io::Read;
    let server = server();
    let addr = server.local_addr();
    let padded = |len: usize| {
        let head = REQUEST.strip_suffix("\r\n").unwrap();
        let bare = head.len() + "X-Pad: \r\n\r\n".len();
        let request = format!("{head}X-Pad: {}\r\n\r\n", "p".repeat(len - bare));
        assert_eq!(request.len(), len);
        request
    };
    const LENS: [usize; 5] = [2047, 2048, 2049, 4096, 6000];
    // Kept open, so that no Disconnect comes between the events awaited.
    let mut open = Vec::new();
    for len in LENS {
        let mut s = raw(addr);
        let mut bytes = padded(len).into_bytes();
        bytes.extend(frame(0x81, format!("{len}").as_bytes()));
        s.write_all(&bytes).unwrap();
        expect_connect(&server);
        let (_, m) = expect_message(&server);
        assert_eq!(
            m.as_text(),
            Some(format!("{len}").as_str()),
            "request of {len} B"
        );
        open.push(s);
    }
    for len in LENS {
        for _ in 0..20 {
            let mut s = raw(addr);
            s.write_all(padded(len).as_bytes()).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut head = [0u8; 12];
            s.read_exact(&mut head)
                .unwrap_or_else(|e| panic!("request of {len} B, half-closed: {e}"));
            assert_eq!(&head, b"HTTP/1.1 101", "request of {len} B, half-closed");
        }
    }
}

#[test]
fn stalled_handshake_times_out_without_pinning_workers() {
    let server = enjent::WebSocketServer::builder()
        .workers(1)
        .handshake_timeout(Duration::from_millis(300))
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    // Slowloris: more stalled clients than workers, each sending half a
    // request. The one worker must still serve a good client meanwhile.
    let mut stalled: Vec<_> = (0..20)
        .map(|_| {
            let mut s = raw(addr);
            s.write_all(&REQUEST.as_bytes()[..30]).unwrap();
            s
        })
        .collect();
    let mut ws = client(addr);
    expect_connect(&server);
    ws.send(tungstenite::Message::text("hi")).unwrap();
    let (_, m) = expect_message(&server);
    assert_eq!(m.as_text(), Some("hi"));
    for s in &mut stalled {
        let mut out = String::new();
        use std::io::Read;
        let _ = s.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 408 "), "{out:?}");
    }
}

/// A handshake's deadline holds even for clients that keep sending a byte
/// of their request now and then, so that a worker often holds their
/// handshake just when the deadline's timer fires: the timer found nothing
/// to expire then, and the handshake was parked again with no deadline.
#[test]
fn a_trickling_handshake_is_cut_off_at_its_deadline() {
    const CLIENTS: usize = 150;
    let server = enjent::WebSocketServer::builder()
        .workers(1)
        .handshake_timeout(Duration::from_millis(200))
        .max_handshake_bytes(1 << 20)
        .max_connections_per_ip(1000)
        .start("127.0.0.1:0")
        .unwrap();
    let answers = Mutex::new(Vec::new());
    let left = trickle(
        server.local_addr(),
        CLIENTS,
        Duration::from_secs(6),
        &answers,
    );
    assert_eq!(
        left, 0,
        "{left} of {CLIENTS} trickling handshakes outlived a 200 ms deadline by seconds"
    );
    let answers = answers.lock().unwrap();
    assert!(
        answers.iter().all(|a| a.starts_with("HTTP/1.1 408 ")),
        "{answers:?}"
    );
}

/// Open `clients` connections that each send the start of a request and
/// then one more byte of a header every millisecond, until the server
/// answers (the answer joins `answers`) or closes, or `limit` passes.
/// Returns how many were still open then.
fn trickle(
    addr: SocketAddr,
    clients: usize,
    limit: Duration,
    answers: &Mutex<Vec<String>>,
) -> usize {
    use std::io::{ErrorKind, Read};
    let start = std::time::Instant::now();
    let mut open: Vec<std::net::TcpStream> = (0..clients)
        .map(|_| {
            let mut s = raw(addr);
            s.write_all(b"GET / HTTP/1.1\r\nX-Pad: ").unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    while !open.is_empty() && start.elapsed() < limit {
        open.retain_mut(|s| {
            let mut buf = [0u8; 256];
            match s.read(&mut buf) {
                Ok(0) => return false,
                Ok(n) => {
                    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
                    answers.lock().unwrap().push(answer);
                    return false;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => return false,
            }
            !matches!(s.write(b"a"), Err(e) if e.kind() != ErrorKind::WouldBlock)
        });
        std::thread::sleep(Duration::from_millis(1));
    }
    open.len()
}

/// A crowd trickling its requests a byte at a time (each byte a job for
/// the one worker, and a look at the head) does not keep a good client
/// waiting: it upgrades and gets 50 echoes while the crowd is still
/// trickling, well before the crowd's deadline; then each of the crowd
/// gets its 408.
#[test]
fn a_good_client_is_served_among_a_crowd_trickling_their_requests() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;
    const CLIENTS: usize = 150;
    const DEADLINE: Duration = Duration::from_secs(3);
    let server = enjent::WebSocketServer::builder()
        .workers(1)
        .handshake_timeout(DEADLINE)
        .max_handshake_bytes(1 << 20)
        .max_connections_per_ip(1000)
        .on_message(|c, m| {
            let _ = c.send(m);
        })
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let started = Instant::now();
    let trickling = Arc::new(AtomicBool::new(true));
    let answers = Arc::new(Mutex::new(Vec::new()));
    let crowd = {
        let (trickling, answers) = (Arc::clone(&trickling), Arc::clone(&answers));
        std::thread::spawn(move || {
            let left = trickle(addr, CLIENTS, DEADLINE * 3, &answers);
            trickling.store(false, Ordering::SeqCst);
            left
        })
    };
    // The crowd is connected and trickling.
    std::thread::sleep(Duration::from_millis(300));
    let mut ws = client(addr);
    for i in 0..50 {
        ws.send(tungstenite::Message::text(i.to_string())).unwrap();
        assert_eq!(
            ws.read().unwrap(),
            tungstenite::Message::text(i.to_string())
        );
    }
    let served_after = started.elapsed();
    assert!(
        trickling.load(Ordering::SeqCst) && answers.lock().unwrap().is_empty(),
        "the good client was served only after the crowd was cut off ({served_after:?})"
    );
    assert_eq!(crowd.join().unwrap(), 0, "tricklers never answered");
    let answers = answers.lock().unwrap();
    assert_eq!(answers.len(), CLIENTS);
    assert!(
        answers.iter().all(|a| a.starts_with("HTTP/1.1 408 ")),
        "{answers:?}"
    );
}

/// A trickling client is not cut off early either: each byte parks its
/// handshake again, and one parked within the last tick before the
/// deadline was answered 408 at once, up to a tick (50 ms) before it.
#[test]
fn a_trickling_handshake_is_not_cut_off_before_its_deadline() {
    use std::io::{ErrorKind, Read};
    use std::time::Instant;
    const DEADLINE: Duration = Duration::from_millis(300);
    let server = enjent::WebSocketServer::builder()
        .handshake_timeout(DEADLINE)
        .max_handshake_bytes(1 << 20)
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    for round in 0..5 {
        // Started before the connection exists, so never later than the
        // server's clock for it.
        let start = Instant::now();
        let mut s = raw(addr);
        s.write_all(b"GET / HTTP/1.1\r\nX-Pad: ").unwrap();
        s.set_nonblocking(true).unwrap();
        let mut answer = String::new();
        while start.elapsed() < Duration::from_secs(5) {
            let mut buf = [0u8; 256];
            match s.read(&mut buf) {
                Ok(n) => {
                    answer = String::from_utf8_lossy(&buf[..n]).into_owned();
                    break;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("round {round}: {e}"),
            }
            let _ = s.write(b"a");
            std::thread::sleep(Duration::from_millis(1));
        }
        let took = start.elapsed();
        assert!(
            answer.starts_with("HTTP/1.1 408 "),
            "round {round}: {answer:?}"
        );
        assert!(
            took >= DEADLINE,
            "round {round}: answered 408 after {took:?}, before the {DEADLINE:?} deadline"
        );
    }
}

/// Parked handshakes' deadlines are found by walking the list of their
/// slots a chunk of 1,024 at a time: a crowd of stalled half-requests over
/// three chunks is answered 408 to the last one.
#[test]
fn a_crowd_of_stalled_handshakes_is_answered_408_in_every_chunk() {
    use std::io::Read;
    const CLIENTS: usize = 2_100;
    let server = enjent::WebSocketServer::builder()
        .handshake_timeout(Duration::from_millis(500))
        .max_connections(CLIENTS)
        .max_connections_per_ip(CLIENTS)
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let mut stalled: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let mut s = raw(addr);
            s.write_all(&REQUEST.as_bytes()[..30]).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s
        })
        .collect();
    for (i, s) in stalled.iter_mut().enumerate() {
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 408 "), "client {i}: {out:?}");
    }
    assert_eq!(
        server.stats().handshakes_refused.get(&408),
        Some(&(CLIENTS as u64))
    );
}

/// A server with one worker and a 300 ms handshake deadline, whose worker
/// is blocked in `on_message` (by a client that sent one message) until
/// the returned sender sends, or 20 s pass.
fn with_the_worker_blocked(
    builder: enjent::Builder,
) -> (
    enjent::WebSocketServer,
    std::sync::mpsc::Sender<()>,
    std::net::TcpStream,
) {
    use std::sync::mpsc;
    let (release, gate) = mpsc::channel::<()>();
    let gate = Mutex::new(gate);
    let (entered_tx, entered) = mpsc::channel::<()>();
    let entered_tx = Mutex::new(entered_tx);
    let server = builder
        .workers(1)
        .handshake_timeout(Duration::from_millis(300))
        .on_message(move |_, _| {
            let _ = entered_tx.lock().unwrap().send(());
            let _ = gate.lock().unwrap().recv_timeout(Duration::from_secs(20));
        })
        .start("127.0.0.1:0")
        .unwrap();
    let mut blocker = raw_ws(server.local_addr());
    blocker.write_all(&frame(0x81, b"block")).unwrap();
    entered
        .recv_timeout(Duration::from_secs(5))
        .expect("the worker is in on_message");
    (server, release, blocker)
}

/// A hostile client's cheapest move: connect and send nothing. Even while
/// every worker is blocked in a user closure, each such client gets its
/// 408 at the handshake deadline and gives its slot back: the deadline is
/// kept by the poller, not by a job that may wait for a worker.
#[test]
fn silent_clients_get_408_while_every_worker_is_blocked() {
    let (server, release, _blocker) = with_the_worker_blocked(enjent::WebSocketServer::builder());
    let addr = server.local_addr();
    silent_clients_get_408(addr, 20);
    assert_eq!(
        server.stats().handshakes_refused.get(&408),
        Some(&20),
        "each silent client answered once"
    );
    release.send(()).unwrap();
    // Served again once the worker is free.
    let _ = raw_ws(addr);
}

/// Clients whose handshakes wait in the ready queue while the only worker
/// is blocked in a user closure. At the deadline the poller answers each
/// as a worker would have, instead of leaving it to wait for a worker with
/// no deadline: `503` to a whole request that came in time (the server was
/// too busy, not the client too slow; also to one whose client then shut
/// its side), `408` to half of one, `400` to a malformed one, and the
/// worker's own refusal (`405`, `426`) to one refused for its content.
/// Every slot is given back.
#[test]
fn queued_handshakes_are_answered_at_their_deadline_while_every_worker_is_blocked() {
    use std::io::Read;
    use std::time::Instant;
    const WHOLE: usize = 20;
    const HALF: usize = 5;
    const BAD: usize = 5;
    // Requests a worker refuses for their content alone: refused the
    // same way, not answered 503.
    const REFUSED: usize = 4;
    const CLIENTS: usize = WHOLE + HALF + BAD + REFUSED;
    let post = REQUEST.replacen("GET", "POST", 1);
    let plain = "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let (server, release, _blocker) = with_the_worker_blocked(
        enjent::WebSocketServer::builder()
            // The blocker and the queued clients: after them, new clients
            // are served only in slots the answered ones gave back.
            .max_connections(CLIENTS + 1)
            .max_connections_per_ip(CLIENTS + 1),
    );
    let addr = server.local_addr();
    let start = Instant::now();
    let sends: Vec<&[u8]> = (0..CLIENTS)
        .map(|i| match i {
            i if i < WHOLE => REQUEST.as_bytes(),
            i if i < WHOLE + HALF => &REQUEST.as_bytes()[..30],
            i if i < WHOLE + HALF + BAD => &b"\x16\x03\x01 not http at all\r\n\r\n"[..],
            i if i % 2 == 0 => post.as_bytes(),
            _ => plain.as_bytes(),
        })
        .collect();
    let mut waiting: Vec<_> = sends
        .iter()
        .enumerate()
        .map(|(i, bytes)| {
            let mut s = raw(addr);
            s.write_all(bytes).unwrap();
            if i < 2 {
                // Done sending (as `nc -N` or a health check may be): the
                // request is still answered.
                s.shutdown(std::net::Shutdown::Write).unwrap();
            }
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s
        })
        .collect();
    for (i, s) in waiting.iter_mut().enumerate() {
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let want = match i {
            i if i < WHOLE => "HTTP/1.1 503 ",
            i if i < WHOLE + HALF => "HTTP/1.1 408 ",
            i if i < WHOLE + HALF + BAD => "HTTP/1.1 400 ",
            i if i % 2 == 0 => "HTTP/1.1 405 ",
            _ => "HTTP/1.1 426 ",
        };
        assert!(
            out.starts_with(want),
            "client {i} after {:?}: {out:?}",
            start.elapsed()
        );
        if i < WHOLE {
            assert!(out.contains("Retry-After: 1\r\n"), "client {i}: {out:?}");
        }
    }
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "answers took {:?} with a 300 ms deadline",
        start.elapsed()
    );
    let refused = server.stats().handshakes_refused;
    assert_eq!(
        (
            refused.get(&503),
            refused.get(&408),
            refused.get(&400),
            refused.get(&405),
            refused.get(&426)
        ),
        (
            Some(&(WHOLE as u64)),
            Some(&(HALF as u64)),
            Some(&(BAD as u64)),
            Some(&(REFUSED as u64 / 2)),
            Some(&(REFUSED as u64 / 2))
        ),
        "each client answered once"
    );
    // Every slot comes back: as many new clients as were answered are
    // served once the worker is free. The clients answered while they may
    // still send (half a head, a malformed one) hold theirs in a lingering
    // close until they close, as they do here, or for the handshake
    // timeout; meanwhile a new client may be refused with 503.
    release.send(()).unwrap();
    drop(waiting);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut served = Vec::new();
    while served.len() < CLIENTS {
        let mut s = raw(addr);
        s.write_all(REQUEST.as_bytes()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut status = [0u8; 12];
        s.read_exact(&mut status).unwrap();
        match &status {
            b"HTTP/1.1 101" => served.push(s),
            b"HTTP/1.1 503" if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => panic!(
                "client {} of {CLIENTS} after {:?}: {:?}",
                served.len(),
                start.elapsed(),
                String::from_utf8_lossy(&status)
            ),
        }
    }
}

/// A request that comes a while after the connection (the handshake job
/// finds nothing, and the socket waits in the poller) is served, and a
/// frame sent with it is not lost.
#[test]
fn a_request_that_comes_late_is_served_with_its_first_frame() {
    let server = server();
    let mut s = raw(server.local_addr());
    std::thread::sleep(Duration::from_millis(150));
    let mut bytes = REQUEST.as_bytes().to_vec();
    bytes.extend(frame(0x81, b"late but here"));
    s.write_all(&bytes).unwrap();
    read_101(&mut s);
    expect_connect(&server);
    let (_, m) = expect_message(&server);
    assert_eq!(m.as_text(), Some("late but here"));
}

/// A handshake deadline past what the server took for "never" (a year):
/// shutdown still answers the half-sent handshakes waiting for their
/// bytes (a `HEAD` without the body). Was a bug: shutdown took only handshakes due within a year, so
/// these were left unanswered, and a failed registration leaked its slot.
#[test]
fn shutdown_answers_handshakes_with_a_deadline_past_a_year() {
    use std::io::Read;
    let server = enjent::WebSocketServer::builder()
        .handshake_timeout(Duration::from_secs(86_400 * 400))
        .start("127.0.0.1:0")
        .unwrap();
    let mut s = raw(server.local_addr());
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    // A `HEAD`'s answer is its head alone (RFC 9110 section 9.3.2).
    let mut h = raw(server.local_addr());
    h.write_all(b"\r\nHEAD / HTTP/1.1\r\nHost: x\r\n").unwrap();
    // Time for the half requests to be read and parked.
    std::thread::sleep(Duration::from_millis(300));
    server.shutdown();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer:?}");
    assert!(!answer.ends_with("\r\n\r\n"), "no body: {answer:?}");
    let mut answer = Vec::new();
    let _ = h.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer:?}");
    assert!(
        answer.ends_with("\r\n\r\n"),
        "a body after the head: {answer:?}"
    );
}

/// A request target in absolute form (RFC 9112 section 3.2.2: a server
/// must accept it) reaches the strategy as its path, not as a URL.
#[test]
fn an_absolute_form_target_is_routed_by_its_path() {
    let server = enjent::WebSocketServer::with_client_init(|req| {
        if req.path() == "/chat" && req.query_param("x").as_deref() == Some("1") {
            Ok(())
        } else {
            Err(enjent::Reject::new(404))
        }
    })
    .start("127.0.0.1:0")
    .unwrap();
    let mut s = raw(server.local_addr());
    s.write_all(
        REQUEST
            .replacen("GET / ", "GET http://localhost/chat?x=1 ", 1)
            .as_bytes(),
    )
    .unwrap();
    let head = read_101(&mut s);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    expect_connect(&server);
}

/// A plain HTTP answer with a status outside RFC 9110's classes goes out
/// as `500`, as a 1xx does, and is counted so.
#[test]
fn an_http_answer_outside_200_to_599_is_sent_as_500() {
    let server = enjent::WebSocketServer::builder()
        .on_http(|_| enjent::HttpResponse::new(700).body("odd"))
        .start("127.0.0.1:0")
        .unwrap();
    let response = http(
        server.local_addr(),
        b"GET /page HTTP/1.1\r\nHost: localhost\r\n\r\n",
    );
    assert_eq!(status_of(&response), 500, "{response}");
}

/// A request sent in pieces is parsed again only when a line has ended;
/// what goes wrong inside a line not yet ended is still answered with
/// its own status: a bad byte in a header name gets `400` (at the
/// handshake's deadline, not `408`), and a head that reaches
/// `max_handshake_bytes` inside a line gets `431` at once.
#[test]
fn a_request_that_goes_wrong_mid_line_gets_its_own_status() {
    use std::io::Read;
    let server = enjent::WebSocketServer::builder()
        .handshake_timeout(Duration::from_secs(1))
        .max_handshake_bytes(1024)
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let answer = |s: &mut std::net::TcpStream| {
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        String::from_utf8_lossy(&got).into_owned()
    };

    let mut s = raw(addr);
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    s.write_all(b"Bad\x01Name: x").unwrap();
    assert_eq!(status_of(&answer(&mut s)), 400);

    // Exactly the limit, the last line not ended: no more may come.
    let mut s = raw(addr);
    let start = b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: ";
    s.write_all(start).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    s.write_all(&vec![b'p'; 1024 - start.len()]).unwrap();
    let started = std::time::Instant::now();
    let text = answer(&mut s);
    assert_eq!(status_of(&text), 431, "{text}");
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "answered at the deadline, after {:?}",
        started.elapsed()
    );
}

/// A `HEAD` upgrade request that no worker took before its deadline is
/// refused by the readiness loop as a worker would refuse it (`405`),
/// with the head and no body.
#[test]
fn a_head_request_refused_by_the_readiness_loop_has_no_body() {
    use std::io::Read;
    let server = enjent::WebSocketServer::builder()
        .workers(1)
        .handshake_timeout(Duration::from_millis(500))
        .on_message(|_, _| std::thread::sleep(Duration::from_millis(1500)))
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    // The only worker is held by a slow closure.
    let mut busy = raw_ws(addr);
    busy.write_all(&frame(0x81, b"hold")).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut s = raw(addr);
    s.write_all(REQUEST.replacen("GET", "HEAD", 1).as_bytes())
        .unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got);
    assert_eq!(status_of(&text), 405, "{text}");
    assert!(
        text.ends_with("\r\n\r\n"),
        "a body after the head: {text:?}"
    );
}

/// The same for a `HEAD` that is partial (`408`) or malformed (`400`):
/// its answer from the readiness loop has no body either, as from a
/// worker. Before, only a whole request was looked at for its method.
#[test]
fn a_partial_or_malformed_head_refused_by_the_readiness_loop_has_no_body() {
    use std::io::Read;
    let (server, release, _blocker) = with_the_worker_blocked(enjent::WebSocketServer::builder());
    let addr = server.local_addr();
    for (request, status) in [
        (&b"HEAD / HTTP/1.1\r\nHost: x\r\n"[..], 408),
        (&b"HEAD / HTTP/1.1\r\nBad header\r\n\r\n"[..], 400),
    ] {
        let mut s = raw(addr);
        s.write_all(request).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let text = String::from_utf8_lossy(&got);
        assert_eq!(status_of(&text), status, "{text}");
        assert!(
            text.ends_with("\r\n\r\n"),
            "a body after the head: {text:?}"
        );
    }
    drop(release);
}

/// Empty lines before the request line are skipped (RFC 9112 section 2.2)
/// and not kept, but count against `max_handshake_bytes`: 3,600 bytes of
/// them, sent in pieces (CRLF and bare LF, one CRLF split across two
/// writes), then a request, to a server limited to 4,096, get `101`;
/// 4,800 and a request get `431`. A lone CR that is not the start of a CRLF is not an
/// empty line: the request is refused. (Kept, each empty line cost a
/// parse of all of them before it: `bench/trickle.py ... blank`.)
#[test]
fn empty_lines_before_the_request_line_are_skipped_and_counted() {
    let server = enjent::WebSocketServer::builder()
        .max_handshake_bytes(4096)
        .start("127.0.0.1:0")
        .unwrap();
    let mut s = raw(server.local_addr());
    for _ in 0..6 {
        s.write_all(&b"\r\n\n".repeat(200)).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    s.write_all(b"\r").unwrap();
    std::thread::sleep(Duration::from_millis(2));
    s.write_all(b"\n").unwrap();
    std::thread::sleep(Duration::from_millis(2));
    s.write_all(REQUEST.as_bytes()).unwrap();
    read_101(&mut s);
    let _ = expect_connect(&server);
    // In one write, so that the refusal finds nothing unread to reset.
    let over = [b"\r\n\n".repeat(1600), REQUEST.as_bytes().to_vec()].concat();
    assert_eq!(status_of(&http(server.local_addr(), &over)), 431);
    let lone_cr = format!("\r{REQUEST}");
    assert_eq!(
        status_of(&http(server.local_addr(), lone_cr.as_bytes())),
        400
    );
}

/// RFC 9112 section 3.2 over a real socket, for upgrades and for plain
/// HTTP alike: a Host header that is missing (in HTTP/1.1), repeated or
/// not `host[:port]`, or a target its method may not use, gets `400`
/// before any user code sees the request. A later HTTP/1 minor version
/// is served as HTTP/1.1; HTTP/2 gets `505`.
#[test]
fn hosts_targets_and_versions_are_checked_before_user_code_sees_them() {
    let seen = std::sync::Arc::new(Mutex::new(Vec::<String>::new()));
    let log = seen.clone();
    let server = enjent::WebSocketServer::builder()
        .on_http(move |req| {
            let line = format!("{} {}", req.method(), req.path());
            log.lock().unwrap().push(line);
            enjent::HttpResponse::new(200).body("page")
        })
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let upgrade_with_host =
        |host: &str| REQUEST.replace("Host: localhost", &format!("Host: {host}"));
    let upgrade_to = |target: &str| REQUEST.replacen("GET / ", &format!("GET {target} "), 1);
    let page = |line: &str, headers: &str| format!("{line}\r\n{headers}\r\n");
    let mut refused: Vec<String> = Vec::new();
    for host in [
        "a b",
        "a@b",
        "http://x",
        "x:99999999",
        "[::1",
        "x:80:80",
        "caf\u{e9}",
    ] {
        refused.push(upgrade_with_host(host));
        refused.push(page("GET /page HTTP/1.1", &format!("Host: {host}\r\n")));
        refused.push(page("GET /page HTTP/1.0", &format!("Host: {host}\r\n")));
    }
    for target in [
        "*",
        "x:80",
        "chat",
        "/a#frag",
        "ftp://x/chat",
        "http://x:99999/",
        "http://u@x/",
    ] {
        refused.push(upgrade_to(target));
        refused.push(page(&format!("GET {target} HTTP/1.1"), "Host: x\r\n"));
    }
    refused.push(page("GET /page HTTP/1.1", ""));
    refused.push(page("GET /page HTTP/1.1", "Host: a\r\nHost: a\r\n"));
    refused.push(page("GET /page HTTP/1.0", "Host: a\r\nhost: b\r\n"));
    refused.push(page("CONNECT /page HTTP/1.1", "Host: a\r\n"));
    refused.push(REQUEST.replace(
        "Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Key: \u{a0}dGhlIHNhbXBsZSBub25jZQ==\u{a0}",
    ));
    for request in &refused {
        let response = http(addr, request.as_bytes());
        assert_eq!(status_of(&response), 400, "{request:?} got {response}");
    }
    let response = http(addr, REQUEST.replace("HTTP/1.1", "HTTP/2.0").as_bytes());
    assert_eq!(status_of(&response), 505, "{response}");
    assert!(
        seen.lock().unwrap().is_empty(),
        "{:?}",
        seen.lock().unwrap()
    );
    assert!(
        server.try_recv().is_err(),
        "refused requests produce no events"
    );

    // What the rules allow reaches the handler.
    for (request, line) in [
        (page("GET /old HTTP/1.0", ""), "GET /old"),
        (
            page("OPTIONS * HTTP/1.1", "Host: [::1]:80\r\n"),
            "OPTIONS *",
        ),
        (
            page("GET http://h:8/p?q HTTP/1.1", "Host: h:8\r\n"),
            "GET /p",
        ),
        (page("GET /later HTTP/1.3", "Host: h\r\n"), "GET /later"),
    ] {
        let response = http(addr, request.as_bytes());
        assert_eq!(status_of(&response), 200, "{request:?} got {response}");
        assert_eq!(seen.lock().unwrap().pop().as_deref(), Some(line));
    }
    // HTTP/1.2 is read as 1.1: the upgrade goes through, and the client is
    // served.
    let mut s = raw(addr);
    s.write_all(REQUEST.replace("HTTP/1.1", "HTTP/1.2").as_bytes())
        .unwrap();
    let head = read_101(&mut s);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let client = expect_connect(&server);
    s.write_all(&frame(0x81, b"hi")).unwrap();
    let message = expect_message(&server);
    assert_eq!(message.0.id(), client.id());
}

/// The status a new client's upgrade request gets (`101` if served).
fn upgrade_status(addr: SocketAddr) -> (u16, std::net::TcpStream) {
    use std::io::Read;
    let mut s = raw(addr);
    s.write_all(REQUEST.as_bytes()).unwrap();
    let mut status = [0u8; 12];
    s.read_exact(&mut status).unwrap();
    (status_of(&String::from_utf8_lossy(&status)), s)
}

/// An upload an `on_http` page refuses after its head: the client goes on
/// sending its body, as HTTP clients do before they read. The server
/// reads and drops it until the client closes (a lingering close), so
/// every byte is taken, the answer is read whole and the connection ends
/// with a clean end, not a reset (which over a real network can destroy
/// the answer before the client reads it). Was a bug: the server closed
/// after a bounded read, and the client's writes failed with a reset.
/// Its slot comes back as soon as the client closes, not at the end of the
/// lingering's deadline.
#[test]
fn a_refused_upload_is_read_to_its_end_and_its_answer_is_not_reset() {
    use std::io::Read;
    const BODY: usize = 32 << 20;
    let server = enjent::WebSocketServer::builder()
        .handshake_timeout(Duration::from_secs(30))
        .max_connections(1)
        .on_http(|_| enjent::HttpResponse::new(404).body("no uploads here"))
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let mut s = raw(addr);
    s.write_all(
        format!("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {BODY}\r\n\r\n").as_bytes(),
    )
    .unwrap();
    // The answer comes while the body is on its way.
    std::thread::sleep(Duration::from_millis(100));
    let chunk = vec![b'u'; 64 * 1024];
    for sent in (0..BODY).step_by(chunk.len()) {
        if let Err(e) = s.write_all(&chunk) {
            panic!("the body's write failed after {sent} of {BODY} bytes: {e}");
        }
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)
        .expect("the answer, then a clean end");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 404 "), "{answer:?}");
    assert!(answer.ends_with("no uploads here"), "{answer:?}");
    drop(s);
    // One slot: a new client is served once the server has seen the
    // client's end, long before the 30 s the lingering may last.
    let start = std::time::Instant::now();
    loop {
        match upgrade_status(addr).0 {
            101 => break,
            503 if start.elapsed() < Duration::from_secs(3) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            status => panic!("{status} after {:?}", start.elapsed()),
        }
    }
}

/// A head over `max_handshake_bytes` gets `431` while its client is still
/// sending it: the client that reads the answer and then sends the rest
/// (as one whose writes are queued in its kernel does) is not reset. Over
/// it by header lines, or by empty lines before the request line (skipped,
/// and counted).
#[test]
fn a_head_too_large_is_answered_431_and_the_rest_of_it_read() {
    use std::io::Read;
    let server = enjent::WebSocketServer::builder()
        .max_handshake_bytes(8 * 1024)
        .start("127.0.0.1:0")
        .unwrap();
    let padding = format!("X-Padding: {}\r\n", "p".repeat(1000));
    let empty = "\r\n".repeat(500);
    for (what, start, line) in [
        ("header lines", "GET / HTTP/1.1\r\nHost: x\r\n", &padding),
        ("empty lines", "", &empty),
    ] {
        let mut s = raw(server.local_addr());
        s.write_all(start.as_bytes()).unwrap();
        // Just over the limit, then the answer and our end of it.
        for _ in 0..10 {
            s.write_all(line.as_bytes()).unwrap();
        }
        let mut answer = Vec::new();
        s.read_to_end(&mut answer)
            .unwrap_or_else(|e| panic!("{what}: the answer and its end: {e}"));
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 431 "), "{what}: {answer:?}");
        // 8 MiB more, far more than the server reads at once.
        for sent in 0..8 * 1024 {
            if let Err(e) = s.write_all(line.as_bytes()) {
                panic!("{what}: the head's write failed after {sent} lines more: {e}");
            }
        }
        s.write_all(b"\r\n").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)
            .unwrap_or_else(|e| panic!("{what}: a clean end: {e}"));
        assert!(rest.is_empty(), "{what}: {rest:?}");
    }
}

/// Trickle a byte every 20 ms on `s` until a write fails (the server has
/// closed); how long that took, at most 10 s.
fn trickle_until_closed(mut s: std::net::TcpStream) -> Duration {
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if s.write_all(b"x").is_err() {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("still taken after 10 s");
}

/// The adversary's side of the lingering close: clients refused after
/// their head that go on sending a byte at a time and never close hold
/// their slots for the handshake timeout after the answer, no less (the
/// lingering is not cut short) and no longer, and the server serves others
/// meanwhile.
#[test]
fn clients_that_never_stop_sending_after_an_answer_are_cut_off() {
    use std::io::Read;
    const CLIENTS: usize = 20;
    let server = enjent::WebSocketServer::builder()
        .handshake_timeout(Duration::from_secs(1))
        .max_connections(CLIENTS + 1)
        .max_connections_per_ip(CLIENTS + 1)
        .on_http(|_| enjent::HttpResponse::new(403).body("no"))
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let tricklers: Vec<_> = (0..CLIENTS)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = raw(addr);
                s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
                    .unwrap();
                let mut answer = Vec::new();
                s.read_to_end(&mut answer).unwrap();
                let answer = String::from_utf8_lossy(&answer).into_owned();
                assert!(answer.starts_with("HTTP/1.1 403 "), "{answer:?}");
                trickle_until_closed(s)
            })
        })
        .collect();
    // One slot is left for an honest client while the others linger.
    std::thread::sleep(Duration::from_millis(200));
    let (status, mut ws) = upgrade_status(addr);
    assert_eq!(status, 101);
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        ws.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
    ws.write_all(&frame(0x81, b"served")).unwrap();
    let _ = expect_connect(&server);
    assert_eq!(expect_message(&server).1.as_text(), Some("served"));
    for t in tricklers {
        let lasted = t.join().unwrap();
        // The handshake timeout after the answer (closed at once, it was
        // cut off within a few writes), rounded up to the sweep's tick,
        // and the write that finds the close.
        assert!(
            lasted >= Duration::from_millis(800) && lasted < Duration::from_secs(4),
            "cut off after {lasted:?}"
        );
    }
    // Every lingering slot came back.
    let served: Vec<_> = (0..CLIENTS).map(|_| upgrade_status(addr)).collect();
    assert!(served.iter().all(|(s, _)| *s == 101));
}

/// A client answered `408` at its deadline, half its head sent, that goes
/// on sending: the lingering has a deadline of its own, counted from the
/// answer, not the handshake's, which has passed.
#[test]
fn a_408_is_followed_by_a_lingering_close_of_its_own() {
    use std::io::Read;
    let server = enjent::WebSocketServer::builder()
        .handshake_timeout(Duration::from_millis(500))
        .start("127.0.0.1:0")
        .unwrap();
    let mut s = raw(server.local_addr());
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer:?}");
    let lasted = trickle_until_closed(s);
    assert!(
        lasted >= Duration::from_millis(350) && lasted < Duration::from_secs(3),
        "cut off {lasted:?} after the 408"
    );
}

/// A whole request with nothing after it (all of its body, if it
/// announced one) is closed at once after its answer: no lingering holds
/// its slot. From a worker's refusal, and after an `on_http` page.
#[test]
fn a_whole_request_is_not_lingered_on() {
    use std::io::Read;
    let refusing = enjent::WebSocketServer::builder();
    let paging = enjent::WebSocketServer::builder()
        .on_http(|_| enjent::HttpResponse::new(404).body("not here"));
    for (what, builder, request, status) in [
        (
            "a refusal",
            refusing,
            "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            "HTTP/1.1 426 ",
        ),
        (
            "a page",
            paging,
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
            "HTTP/1.1 404 ",
        ),
        // Refused for what a whole head says: its end is known.
        (
            "a head with no Host",
            enjent::WebSocketServer::builder(),
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            "HTTP/1.1 400 ",
        ),
        (
            "a bad target",
            enjent::WebSocketServer::builder(),
            "GET nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab",
            "HTTP/1.1 400 ",
        ),
    ] {
        let server = builder
            .handshake_timeout(Duration::from_secs(30))
            .max_connections(1)
            .start("127.0.0.1:0")
            .unwrap();
        let addr = server.local_addr();
        let mut s = raw(addr);
        s.write_all(request.as_bytes()).unwrap();
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).unwrap();
        let answer = String::from_utf8_lossy(&answer).into_owned();
        assert!(answer.starts_with(status), "{what}: {answer:?}");
        // `s` stays open: its slot is free anyway.
        let start = std::time::Instant::now();
        let status = loop {
            match upgrade_status(addr).0 {
                503 if start.elapsed() < Duration::from_secs(1) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                status => break status,
            }
        };
        assert_eq!(status, 101, "{what}: after {:?}", start.elapsed());
        drop(s);
    }
}
