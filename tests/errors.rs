//! Errors reach the user as values, never as the library's own writes to
//! stderr: `on_error`, `Event::Error`, the counters, and with the `log`
//! feature the `log` facade.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use enjent::{Error, Reject, WebSocketServer};
use support::*;
use tungstenite::Message as Tm;

type Seen = Arc<Mutex<Vec<(Option<u64>, String)>>>;

/// What `on_error` was called with: the client's id and the error's text.
fn recorder() -> (
    Seen,
    impl Fn(Option<&enjent::Client>, &Error) + Send + Sync + 'static,
) {
    let seen: Seen = Arc::default();
    let sink = Arc::clone(&seen);
    let f = move |c: Option<&enjent::Client>, e: &Error| {
        sink.lock()
            .unwrap()
            .push((c.map(|c| c.id().as_u64()), e.to_string()));
    };
    (seen, f)
}

fn wait_for(seen: &Seen, n: usize) -> Vec<(Option<u64>, String)> {
    let start = Instant::now();
    loop {
        let got = seen.lock().unwrap().clone();
        if got.len() >= n || start.elapsed() > WAIT {
            return got;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A server whose three kinds of user code panic on request.
fn panicking_server(on_error: bool) -> (WebSocketServer, Seen) {
    let (seen, f) = recorder();
    let mut b = WebSocketServer::with_client_init(|req| {
        if req.query_param("init") == Some("panic".into()) {
            panic!("init panics");
        }
        Ok::<(), Reject>(())
    })
    .on_http(|req| {
        if req.path() == "/boom" {
            panic!("http panics");
        }
        Reject::new(404)
    })
    .on_message(|c, m| {
        if m.as_text() == Some("boom") {
            panic!("message panics");
        }
        let _ = c.send(m);
    });
    if on_error {
        b = b.on_error(f);
    }
    (b.start("127.0.0.1:0").unwrap(), seen)
}

/// Make each piece of user code panic once.
fn provoke(addr: std::net::SocketAddr) {
    let page = http(addr, b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(page.starts_with("HTTP/1.1 500 "), "{page}");
    let refused = http(
        addr,
        REQUEST.replace("GET / ", "GET /?init=panic ").as_bytes(),
    );
    assert!(refused.starts_with("HTTP/1.1 500 "), "{refused}");
    let mut ws = client(addr);
    ws.send(Tm::text("boom")).unwrap();
    match ws.read() {
        Ok(Tm::Close(Some(f))) => assert_eq!(u16::from(f.code), 1011),
        other => panic!("expected a 1011 close, got {other:?}"),
    }
}

#[test]
fn on_error_gets_every_panic_with_its_client() {
    let (server, seen) = panicking_server(true);
    provoke(server.local_addr());
    let got = wait_for(&seen, 3);
    let texts: Vec<&str> = got.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(
        texts.contains(&"on_http panicked: http panics"),
        "{texts:?}"
    );
    assert!(
        texts.contains(&"client-init strategy panicked: init panics"),
        "{texts:?}"
    );
    // Only the message handler's panic concerns a client.
    let with_client: Vec<_> = got.iter().filter(|(c, _)| c.is_some()).collect();
    assert_eq!(with_client.len(), 1, "{got:?}");
    assert_eq!(with_client[0].1, "on_message panicked: message panics");
    assert_eq!(server.stats().handler_panics, 3);
    assert_eq!(server.stats().internal_errors, 0);
    // With a closure for errors, nothing goes to the channel.
    assert!(server.try_recv().is_err());
    still_serves_echo(server.local_addr());
}

#[test]
fn without_on_error_the_panics_come_as_events_in_the_main_loop_style() {
    let (seen, f) = recorder();
    drop(f);
    let server = WebSocketServer::builder()
        .on_http(|_| panic!("http panics"))
        .start("127.0.0.1:0")
        .unwrap();
    let page = http(server.local_addr(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(page.starts_with("HTTP/1.1 500 "), "{page}");
    match next(&server) {
        enjent::Event::Error {
            client: None,
            error: Error::HandlerPanicked { handler, message },
        } => assert_eq!((handler, message.as_str()), ("on_http", "http panics")),
        other => panic!("expected the panic as an event, got {other:?}"),
    }
    assert!(seen.lock().unwrap().is_empty());
}

fn still_serves_echo(addr: std::net::SocketAddr) {
    let mut ws = client(addr);
    ws.send(Tm::text("still here")).unwrap();
    assert_eq!(ws.read().unwrap(), Tm::text("still here"));
}

/// Run as a child process (see below): panics in every piece of user code,
/// with Rust's panic hook silenced, so that anything left on stderr was
/// written by the library itself.
#[test]
fn child_that_panics_everywhere() {
    if std::env::var("ENJENT_STDERR_CHILD").is_err() {
        return;
    }
    std::panic::set_hook(Box::new(|_| {}));
    let (server, _) = panicking_server(false);
    provoke(server.local_addr());
    server.shutdown();
}

#[test]
fn the_library_writes_nothing_to_stderr() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_that_panics_everywhere",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("ENJENT_STDERR_CHILD", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "the child failed: {out:?}");
    // The child ran the test (a rename would run none, and pass).
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("test child_that_panics_everywhere ... ok") && stdout.contains("1 passed"),
        "the child did not run its test: {stdout}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.trim().is_empty(),
        "the library wrote to stderr: {stderr}"
    );
}

#[cfg(feature = "log")]
mod with_log {
    use super::*;
    use log::{Level, Log, Metadata, Record};

    struct Capture(Mutex<Vec<(Level, String)>>);

    impl Log for Capture {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &Record<'_>) {
            self.0
                .lock()
                .unwrap()
                .push((record.level(), record.args().to_string()));
        }
        fn flush(&self) {}
    }

    static LOGGER: Capture = Capture(Mutex::new(Vec::new()));

    #[test]
    fn errors_also_go_to_the_log_facade() {
        log::set_logger(&LOGGER).unwrap();
        log::set_max_level(log::LevelFilter::Trace);
        let (server, seen) = panicking_server(true);
        provoke(server.local_addr());
        wait_for(&seen, 3);
        let records = LOGGER.0.lock().unwrap().clone();
        let panics: Vec<_> = records
            .iter()
            .filter(|(l, m)| *l == Level::Warn && m.contains("panicked"))
            .collect();
        // The logger is process-wide: other tests' panics show up too.
        for what in [
            "on_message panicked: message panics",
            "on_http panicked: http panics",
            "client-init strategy panicked: init panics",
        ] {
            assert!(
                panics.iter().any(|(_, m)| m.contains(what)),
                "no warning for {what:?}: {records:?}"
            );
        }
    }
}

/// A panic in `on_connect` closes that client with 1011, and one in
/// `on_disconnect` is counted; both are reported with their client, every
/// `Connect` still has its `Disconnect`, and the server goes on.
#[test]
fn panics_in_on_connect_and_on_disconnect_are_caught_and_counted() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let (seen, f) = recorder();
    let first = Arc::new(AtomicBool::new(true));
    let disconnects = Arc::new(AtomicUsize::new(0));
    let d = Arc::clone(&disconnects);
    let server = WebSocketServer::builder()
        .on_connect(move |_| {
            if first.swap(false, Ordering::AcqRel) {
                panic!("connect panics");
            }
        })
        .on_message(|c, m| {
            let _ = c.send(m);
        })
        .on_disconnect(move |_, _, _| {
            d.fetch_add(1, Ordering::AcqRel);
            panic!("disconnect panics");
        })
        .on_error(f)
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    // The first client: closed with 1011 by its connect handler's panic.
    let mut a = client(addr);
    match a.read() {
        Ok(Tm::Close(Some(f))) => assert_eq!(u16::from(f.code), 1011),
        other => panic!("expected a 1011 close, got {other:?}"),
    }
    drop(a);
    // The next is served, then leaves.
    let mut b = client(addr);
    b.send(Tm::text("hi")).unwrap();
    assert_eq!(b.read().unwrap(), Tm::text("hi"));
    b.close(None).unwrap();
    while b.read().is_ok() {}
    let got = wait_for(&seen, 3);
    assert_eq!(got.len(), 3, "{got:?}");
    let texts: Vec<&str> = got.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(
        texts
            .iter()
            .filter(|t| **t == "on_connect panicked: connect panics")
            .count(),
        1,
        "{texts:?}"
    );
    assert_eq!(
        texts
            .iter()
            .filter(|t| **t == "on_disconnect panicked: disconnect panics")
            .count(),
        2,
        "{texts:?}"
    );
    assert!(got.iter().all(|(c, _)| c.is_some()), "{got:?}");
    assert_eq!(disconnects.load(Ordering::Acquire), 2);
    assert_eq!(server.stats().handler_panics, 3);
    let t = Instant::now();
    while server.connections() != 0 {
        assert!(
            t.elapsed() < WAIT,
            "{} still connected",
            server.connections()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    still_serves_echo(addr);
}

/// A client's data whose `Drop` panics, dropped by the pool worker that
/// tore its connection down, must not strand the other connections whose
/// jobs wait in the ready queue behind it. With the one worker held, A
/// (whose data panics when dropped) goes away and B sends a message; once
/// the worker is let go it tears A down, and B's message must still be
/// handled. Before, the panic unwound out of the worker's loop over the
/// ready queue, and B's job waited there until some other event came.
#[test]
fn a_panicking_drop_of_client_data_does_not_strand_the_ready_queue() {
    use std::sync::mpsc;
    struct Bomb(bool);
    impl Drop for Bomb {
        fn drop(&mut self) {
            if self.0 {
                panic!("client data dropped");
            }
        }
    }
    let (release, held) = mpsc::channel::<()>();
    let held = Mutex::new(held);
    let (holding, is_held) = mpsc::channel::<()>();
    let holding = Mutex::new(holding);
    let (handled, got) = mpsc::channel::<String>();
    let handled = Mutex::new(handled);
    let reported: Arc<Mutex<Vec<String>>> = Arc::default();
    let errors = Arc::clone(&reported);
    let server = WebSocketServer::with_client_init(|req| Ok(Bomb(req.path() == "/bomb")))
        .workers(1)
        .on_message(move |_, m| match m.as_text() {
            Some("hold") => {
                let _ = holding.lock().unwrap().send(());
                let _ = held.lock().unwrap().recv();
            }
            Some(t) => {
                let _ = handled.lock().unwrap().send(t.to_string());
            }
            None => {}
        })
        .on_error(move |_, e| errors.lock().unwrap().push(e.to_string()))
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let mut a = raw(addr);
    a.write_all(REQUEST.replacen("GET / ", "GET /bomb ", 1).as_bytes())
        .unwrap();
    read_101(&mut a);
    let mut b = raw_ws(addr);
    let mut h = raw_ws(addr);
    h.write_all(&frame(0x81, b"hold")).unwrap();
    is_held.recv_timeout(WAIT).expect("the worker held");
    drop(a);
    std::thread::sleep(Duration::from_millis(50));
    b.write_all(&frame(0x81, b"still served")).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    drop(release);
    assert_eq!(
        got.recv_timeout(Duration::from_secs(3)).as_deref(),
        Ok("still served")
    );
    // And the panic was reported, as every caught one is.
    let reported = reported.lock().unwrap();
    assert!(
        reported.iter().any(|e| e.contains("client data dropped")),
        "{reported:?}"
    );
    drop(h);
}

/// Clients leaving on their own while `shutdown` closes everyone: the
/// shutdown's hold on one may be the last, and its data's `Drop` then
/// runs on the thread calling `shutdown`. One that panics is reported,
/// and the shutdown goes on. Before, the panic unwound out of
/// `shutdown`, which had marked itself done: the readiness loop and the
/// pool were never stopped, and a second call returned at once.
#[test]
fn a_panicking_drop_of_client_data_during_shutdown_does_not_stop_it() {
    struct Bomb;
    impl Drop for Bomb {
        fn drop(&mut self) {
            panic!("client data dropped");
        }
    }
    raise_fd_limit();
    // The race (a client torn down between the snapshot and its turn) is
    // met in about half the rounds.
    for round in 0..10 {
        let reported: Arc<Mutex<Vec<String>>> = Arc::default();
        let errors = Arc::clone(&reported);
        let server = WebSocketServer::with_client_init(|_| Ok(Bomb))
            .on_message(|_, _| {})
            .on_error(move |_, e| errors.lock().unwrap().push(e.to_string()))
            .start("127.0.0.1:0")
            .unwrap();
        let addr = server.local_addr();
        let clients: Vec<_> = (0..400).map(|_| raw_ws(addr)).collect();
        let t = Instant::now();
        while server.connections() < 400 {
            assert!(t.elapsed() < WAIT, "{} connected", server.connections());
            std::thread::sleep(Duration::from_millis(5));
        }
        let leaving = std::thread::spawn(move || drop(clients));
        let handle = server.handle();
        let shut = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| server.shutdown()));
        leaving.join().unwrap();
        assert!(shut.is_ok(), "round {round}: shutdown panicked");
        assert!(!handle.is_running());
        assert_eq!(handle.connections(), 0, "round {round}");
        let reported = reported.lock().unwrap();
        assert!(
            reported.iter().all(|e| e.contains("client data dropped")),
            "{reported:?}"
        );
    }
}
