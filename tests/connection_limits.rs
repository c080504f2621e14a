//! Connection limits: per-IP caps, and a flood of handshakes that never
//! finish cannot lock out good clients.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use enjent::WebSocketServer;
use support::*;

/// A socket from a chosen loopback source address (127.0.0.0/8 is all
/// ours on Linux).
fn from(src: [u8; 4], to: SocketAddr) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from((src, 0)).into()).unwrap();
    sock.connect(&to.into()).unwrap();
    sock.into()
}

#[test]
fn per_ip_limit_answers_503_and_recovers() {
    let server = WebSocketServer::builder()
        .max_connections_per_ip(2)
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let a = client(addr);
    let _b = client(addr);
    expect_connect(&server);
    expect_connect(&server);
    let refused = http(addr, REQUEST.as_bytes());
    assert!(refused.starts_with("HTTP/1.1 503 "), "{refused}");
    drop(a);
    expect_disconnect(&server);
    let _c = client(addr);
    expect_connect(&server);
    assert_eq!(
        server.stats().handshakes_refused.get(&503),
        Some(&1),
        "{:?}",
        server.stats()
    );
    // Another address is not affected by this one's count.
    let mut other = from([127, 0, 0, 2], addr);
    other.write_all(REQUEST.as_bytes()).unwrap();
    let mut head = [0u8; 12];
    other.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
}

/// A `HEAD` refused for too many connections gets the `503`'s head and
/// no body (RFC 9110 section 9.3.2), once its request is in when the
/// accept thread takes it. Here the accept thread is held (the main loop
/// is twice its event budget behind) while the request arrives.
#[test]
fn a_head_refused_for_too_many_connections_gets_no_body() {
    let server = WebSocketServer::builder()
        .max_connections(1)
        .event_queue_bytes(1024)
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let mut a = raw_ws(addr);
    expect_connect(&server);
    // 4 KiB unconsumed: past twice the budget.
    a.write_all(&frame(0x82, &[7; 4096])).unwrap();
    let t = std::time::Instant::now();
    while server.stats().event_bytes < 2048 {
        assert!(t.elapsed() < WAIT, "{:?}", server.stats());
        std::thread::sleep(Duration::from_millis(5));
    }
    // One more refusal sends the accept thread round to the budget's
    // check before its next `accept` (on a thread of its own: under load
    // the accept thread may have gone round already, past the budget,
    // and this one then waits in the backlog too, ahead of the HEAD).
    let first = std::thread::spawn(move || http(addr, REQUEST.as_bytes()));
    if !eventually(Duration::from_secs(2), || {
        server.stats().handshakes_refused.get(&503) == Some(&1)
    }) {
        eprintln!("the accept thread stopped before the first request");
    }
    let mut head = raw(addr);
    head.write_all(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // The main loop catches up (an event's charge is given back at the
    // next receive); the accept thread goes on.
    expect_message(&server);
    assert!(server.recv_timeout(Duration::from_millis(1)).is_err());
    let mut out = Vec::new();
    let _ = head.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 503 "), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("content-length: "),
        "{text}"
    );
    assert!(
        text.ends_with("\r\n\r\n"),
        "a body after the head: {text:?}"
    );
    let first = first.join().unwrap();
    assert!(first.starts_with("HTTP/1.1 503 "), "{first}");
    assert_eq!(server.stats().handshakes_refused.get(&503), Some(&2));
}

#[test]
fn a_per_ip_cap_keeps_a_flooding_address_from_crowding_out_others() {
    let server = WebSocketServer::builder()
        .max_connections(100)
        .max_connections_per_ip(10)
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    // 500 stalled handshakes from one address take at most 10 slots.
    let flood: Vec<TcpStream> = (0..500).map(|_| from([127, 0, 0, 4], addr)).collect();
    std::thread::sleep(Duration::from_millis(100));
    // Ten good clients (the cap applies to 127.0.0.1 too).
    let good: Vec<_> = (0..10).map(|_| client(addr)).collect();
    for _ in 0..10 {
        expect_connect(&server);
    }
    drop(good);
    // Waited for: a flood connect can return before the connection is
    // ready to `accept` (its last ACK dropped while the listen backlog was
    // full; it completes when the server's SYN-ACK is retransmitted, a
    // second or more later), so the acceptor may not have refused it yet.
    let refused_503 = || {
        server
            .stats()
            .handshakes_refused
            .get(&503)
            .copied()
            .unwrap_or(0)
    };
    let t = std::time::Instant::now();
    while refused_503() < 490 && t.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(refused_503() >= 490, "{:?}", server.stats());
    drop(flood);
}

#[test]
fn a_flood_of_stalled_handshakes_cannot_lock_out_good_clients() {
    // 20 slots; 200 attackers that send half a request and stall.
    let server = WebSocketServer::builder()
        .max_connections(20)
        .handshake_timeout(Duration::from_millis(300))
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let mut flood: Vec<TcpStream> = Vec::new();
    for _ in 0..200 {
        let mut s = from([127, 0, 0, 3], addr);
        let _ = s.write_all(&REQUEST.as_bytes()[..20]);
        flood.push(s);
    }
    // Slots free up as stalled handshakes time out; a good client that
    // retries gets in well within a few timeouts.
    let mut admitted = false;
    for _ in 0..100 {
        let mut s = raw(addr);
        s.write_all(REQUEST.as_bytes()).unwrap();
        let mut head = [0u8; 12];
        if s.read_exact(&mut head).is_ok() && &head == b"HTTP/1.1 101" {
            admitted = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(admitted, "a good client never got in");
    let stats = server.stats();
    assert!(
        stats.handshakes_refused.get(&408).copied().unwrap_or(0) > 0,
        "{stats:?}"
    );
    drop(flood);
}

/// Run as a child process with a limit of 64 open files (see below): a
/// server alone, its clients in the parent. It prints its address, shuts
/// down when told on stdin, then checks the accept thread has ended, the
/// port is free, and running out was reported, not on the accept thread.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn out_of_fds_child() {
    use std::io::BufRead;
    use std::sync::{Arc, Mutex};
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `l` is a valid `struct rlimit` for both calls.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut l), 0);
        l.rlim_cur = 64.min(l.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &l), 0);
    }
    let threads: Arc<Mutex<Vec<String>>> = Arc::default();
    let t = Arc::clone(&threads);
    let server = WebSocketServer::builder()
        .workers(2)
        .close_timeout(Duration::from_millis(200))
        .on_error(move |_, e| {
            let name = std::thread::current().name().unwrap_or("?").to_owned();
            t.lock().unwrap().push(format!("{name}: {e}"));
        })
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    println!("listening on {addr}");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "shutdown");
    server.shutdown();
    let names: Vec<String> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .collect();
    assert!(
        !names.iter().any(|n| n.trim_end() == "enjent-accept"),
        "the accept thread outlived shutdown"
    );
    std::net::TcpListener::bind(addr).expect("the port is free again");
    let threads = threads.lock().unwrap();
    assert!(
        threads.iter().any(|t| t.contains("Too many open files")),
        "running out of descriptors was not reported: {threads:?}"
    );
    assert!(
        threads.iter().all(|t| !t.starts_with("enjent-accept")),
        "on_error ran on the accept thread: {threads:?}"
    );
}

/// A server out of file descriptors answers each new client `503` (the
/// spare it spends comes back every time), and still shuts down while at
/// its limit, ending its accept thread and freeing its port; running out
/// is reported from a worker, not from the accept thread (which shutdown
/// joins). The server runs in a child process with a limit of 64 open
/// files; its clients are here.
#[cfg(target_os = "linux")]
#[test]
fn out_of_file_descriptors_each_client_gets_503_and_shutdown_still_ends() {
    use std::io::BufRead;
    if std::env::var("ENJENT_FD_CHILD").is_ok() {
        return out_of_fds_child();
    }
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "out_of_file_descriptors_each_client_gets_503_and_shutdown_still_ends",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("ENJENT_FD_CHILD", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let addr: SocketAddr = loop {
        let mut line = String::new();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the child said nothing"
        );
        // libtest may have written the test's name on the same line.
        if let Some(at) = line.find("listening on ") {
            break line[at + 13..].trim().parse().unwrap();
        }
    };
    let ask = || -> (TcpStream, u16) {
        let mut s = raw(addr);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(REQUEST.as_bytes()).unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).expect("an answer");
        (s, String::from_utf8_lossy(&head[9..]).parse().unwrap_or(0))
    };
    let mut upgraded = Vec::new();
    while upgraded.len() < 100 {
        match ask() {
            (s, 101) => upgraded.push(s),
            (_, 503) => break,
            (_, other) => panic!("status {other}"),
        }
    }
    assert!(
        (10..100).contains(&upgraded.len()),
        "{} upgraded before the first refusal",
        upgraded.len()
    );
    for i in 0..4 {
        assert_eq!(ask().1, 503, "refusal {}", i + 2);
    }
    // One leaves: the accept thread takes its descriptor and blocks in
    // `accept` with it, nobody waiting, the process at its limit again.
    // A wake by connecting cannot be made now; shutdown must still end it.
    drop(upgraded.pop());
    std::thread::sleep(Duration::from_millis(300));
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"shutdown\n")
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the child never finished: shutdown hung");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut rest = String::new();
    let _ = out.read_to_string(&mut rest);
    let status = child.wait().unwrap();
    assert!(status.success() && rest.contains("1 passed"), "{rest}");
    drop(upgraded);
}

/// A flood of valid upgrade requests to a slow client-init strategy (a
/// call to an auth service, say) cannot take every worker from the open
/// connections: handshakes run on all workers but one at most, and an
/// open client's echoes come back at once. Before, both workers sat in
/// the strategy and its messages waited behind every queued handshake,
/// seconds at the flood's rate.
#[test]
fn a_flood_of_handshakes_to_a_slow_strategy_leaves_a_worker_to_open_clients() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    raise_fd_limit();
    let server = WebSocketServer::with_client_init(|_| {
        std::thread::sleep(Duration::from_millis(300));
        Ok(())
    })
    .workers(2)
    .handshake_timeout(Duration::from_secs(5))
    .on_message(|c, m| {
        let _ = c.send(m);
    })
    .start("127.0.0.1:0")
    .unwrap();
    let addr = server.local_addr();
    let mut a = raw_ws(addr);
    let stop = Arc::new(AtomicBool::new(false));
    // About 40 requests a second, against 3 the strategy serves.
    let flood: Vec<_> = (0..4)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut held = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(mut s) = TcpStream::connect(addr) {
                        let _ = s.write_all(REQUEST.as_bytes());
                        held.push(s);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(600));
    let mut slowest = Duration::ZERO;
    for i in 0..10u8 {
        let t = std::time::Instant::now();
        a.write_all(&frame(0x82, &[i])).unwrap();
        let (op, payload) = read_frame(&mut a);
        assert_eq!((op, payload), (0x82, vec![i]));
        slowest = slowest.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        f.join().unwrap();
    }
    assert!(
        slowest < Duration::from_millis(250),
        "an open client's echo waited {slowest:?} behind the handshakes"
    );
}

/// The cap on handshakes counts the handshake only: a new client's
/// `on_connect` (which may block, as any closure may) is the
/// connection's. With two workers and one `on_connect` held, another
/// client's handshake is answered at once. When the cap still covered
/// `on_connect`, it waited for it, the other worker idle, and got `503`
/// at `handshake_timeout`.
#[test]
fn a_held_on_connect_leaves_the_other_worker_to_new_clients() {
    use std::sync::mpsc;
    let (release, gate) = mpsc::channel::<()>();
    let gate = std::sync::Mutex::new(gate);
    let (entered_tx, entered) = mpsc::channel::<()>();
    let entered_tx = std::sync::Mutex::new(entered_tx);
    let server = WebSocketServer::builder()
        .workers(2)
        .handshake_timeout(Duration::from_secs(3))
        .on_connect(move |_| {
            if entered_tx.lock().unwrap().send(()).is_ok() {
                let _ = gate.lock().unwrap().recv_timeout(Duration::from_secs(20));
            }
        })
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let _held = raw_ws(addr);
    entered
        .recv_timeout(Duration::from_secs(5))
        .expect("on_connect runs");
    // Later ones pass straight through `on_connect`.
    drop(entered);
    let t = std::time::Instant::now();
    let _next = raw_ws(addr);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "a new client waited {:?} for a held on_connect",
        t.elapsed()
    );
    drop(release);
}
