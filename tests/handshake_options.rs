//! Subprotocols, allowed origins, extra response headers, the plain HTTP
//! handler and trusted proxy headers, over real sockets.

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};

use enjent::{HttpResponse, Message, Reject, WebSocketServer};
use support::*;

/// Send an upgrade request with `extra` header lines and return the
/// response head and the socket (open if the answer was 101).
fn upgrade(addr: SocketAddr, extra: &str) -> (String, TcpStream) {
    upgrade_bytes(addr, extra.as_bytes())
}

/// [`upgrade`] with header lines that need not be UTF-8.
fn upgrade_bytes(addr: SocketAddr, extra: &[u8]) -> (String, TcpStream) {
    let mut s = raw(addr);
    let head = REQUEST
        .strip_suffix("\r\n")
        .expect("a request ends its head");
    s.write_all(&[head.as_bytes(), extra, b"\r\n"].concat())
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).unwrap() == 0 {
            break;
        }
        head.push(b[0]);
    }
    (String::from_utf8(head).unwrap(), s)
}

fn status(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[test]
fn server_preference_picks_the_subprotocol() {
    let server = WebSocketServer::builder()
        .protocols(["chat.v2", "chat.v1"])
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();

    // The server's order wins over the client's.
    let (head, _s) = upgrade(addr, "Sec-WebSocket-Protocol: chat.v1, chat.v2\r\n");
    assert_eq!(status(&head), 101, "{head}");
    assert!(
        head.contains("\r\nSec-WebSocket-Protocol: chat.v2\r\n"),
        "{head}"
    );
    assert_eq!(expect_connect(&server).protocol(), Some("chat.v2"));

    // Offers split over two header lines count as one list.
    let (head, _s) = upgrade(
        addr,
        "Sec-WebSocket-Protocol: x\r\nSec-WebSocket-Protocol: chat.v1\r\n",
    );
    assert!(
        head.contains("\r\nSec-WebSocket-Protocol: chat.v1\r\n"),
        "{head}"
    );
    assert_eq!(expect_connect(&server).protocol(), Some("chat.v1"));

    // Nothing in common: accepted without a protocol (the client decides).
    let (head, _s) = upgrade(addr, "Sec-WebSocket-Protocol: mqtt\r\n");
    assert_eq!(status(&head), 101);
    assert!(!head.contains("Sec-WebSocket-Protocol"), "{head}");
    assert_eq!(expect_connect(&server).protocol(), None);

    // A real client sees the choice too.
    let mut req =
        tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{addr}/"))
            .unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "chat.v1".parse().unwrap());
    let (_ws, resp) = tungstenite::connect(req).unwrap();
    assert_eq!(
        resp.headers().get("Sec-WebSocket-Protocol").unwrap(),
        "chat.v1"
    );
    assert_eq!(expect_connect(&server).protocol(), Some("chat.v1"));
}

#[test]
fn the_strategy_adds_headers_and_chooses_the_protocol() {
    let server = WebSocketServer::with_handshake(|req, resp| {
        let name = req
            .query_param("name")
            .ok_or_else(|| Reject::forbidden("name?"))?;
        resp.header("Set-Cookie", format!("user={name}; HttpOnly"));
        // Headers the handshake owns, and broken ones, are not taken.
        resp.header("Upgrade", "h2c")
            .header("X-Bad\r\nInjected", "1");
        assert!(!resp.protocol("not-offered"));
        assert!(resp.protocol("b"));
        Ok(name)
    })
    .protocols(["a"])
    .start("127.0.0.1:0")
    .unwrap();
    let mut s = raw(server.local_addr());
    let req = REQUEST
        .replace("GET / ", "GET /?name=ann ")
        .replace("\r\n\r\n", "\r\nSec-WebSocket-Protocol: a, b\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert_eq!(status(&head), 101, "{head}");
    assert!(
        head.contains("\r\nSet-Cookie: user=ann; HttpOnly\r\n"),
        "{head}"
    );
    assert!(head.contains("\r\nSec-WebSocket-Protocol: b\r\n"), "{head}");
    assert!(
        !head.contains("h2c") && !head.contains("Injected"),
        "{head}"
    );
    let client = expect_connect(&server);
    assert_eq!(
        (client.data().as_str(), client.protocol()),
        ("ann", Some("b"))
    );
}

#[test]
fn origins_outside_the_list_get_403() {
    let server = WebSocketServer::builder()
        .allowed_origins(["https://chat.example.com", "http://localhost:8080"])
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let (head, _s) = upgrade(addr, "Origin: https://CHAT.example.com\r\n");
    assert_eq!(status(&head), 101, "{head}");
    expect_connect(&server);
    let (head, _s) = upgrade(addr, "Origin: https://evil.example\r\n");
    assert_eq!(status(&head), 403, "{head}");
    let (head, _s) = upgrade(addr, "Origin: https://chat.example.com.evil.example\r\n");
    assert_eq!(status(&head), 403, "{head}");
    // No Origin: not a browser, let through.
    let (head, _s) = upgrade(addr, "");
    assert_eq!(status(&head), 101, "{head}");
    expect_connect(&server);
    // An allowed Origin does not cover a second one (RFC 6454 section
    // 7.3: a browser sends one), nor does a value that is not UTF-8.
    let (head, _s) = upgrade(
        addr,
        "Origin: https://chat.example.com\r\nOrigin: https://evil.example\r\n",
    );
    assert_eq!(status(&head), 403, "{head}");
    let (head, _s) = upgrade_bytes(addr, b"Origin: https://chat.example.com\xff\r\n");
    assert_eq!(status(&head), 403, "{head}");
    // Twice the same allowed one is still allowed.
    let (head, _s) = upgrade(
        addr,
        "Origin: https://chat.example.com\r\nOrigin: http://localhost:8080\r\n",
    );
    assert_eq!(status(&head), 101, "{head}");
    expect_connect(&server);
    assert_eq!(server.stats().handshakes_refused.get(&403), Some(&4));
}

#[test]
fn plain_http_goes_to_the_handler_and_upgrades_still_work() {
    let page = "<!doctype html><p>hello</p>".repeat(40_000); // ~1 MiB
    let body = page.clone();
    let server = WebSocketServer::builder()
        .on_http(move |req| match (req.method(), req.path()) {
            ("GET", "/") => HttpResponse::new(200)
                .content_type("text/html; charset=utf-8")
                .body(body.clone()),
            ("GET", "/boom") => panic!("handler bug"),
            (m, p) => HttpResponse::new(404).body(format!("no {m} {p}")),
        })
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();

    let resp = http(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{}", &resp[..80]);
    assert!(resp.contains("\r\nContent-Type: text/html; charset=utf-8\r\n"));
    let (_, got) = resp.split_once("\r\n\r\n").unwrap();
    assert_eq!(got.len(), page.len());
    assert!(got == page);

    let resp = http(
        addr,
        b"POST /form HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 404 "), "{resp}");
    assert!(resp.ends_with("no POST /form"), "{resp}");

    let resp = http(addr, b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 500 "), "{resp}");

    // An HTTP/1.0 request's `Upgrade` is ignored (RFC 9110 section 7.8):
    // it is plain HTTP, for the handler (before: refused with `400`).
    let resp = http(
        addr,
        b"GET /old HTTP/1.0\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 404 "), "{resp}");
    assert!(resp.ends_with("no GET /old"), "{resp}");

    // The same port still upgrades.
    let mut ws = client(addr);
    // The handler's panic is reported as an event, never on stderr.
    match next(&server) {
        enjent::Event::Error {
            client: None,
            error: enjent::Error::HandlerPanicked { handler, message },
        } => assert_eq!((handler, message.as_str()), ("on_http", "handler bug")),
        other => panic!("expected the handler's panic, got {other:?}"),
    }
    expect_connect(&server);
    ws.send(tungstenite::Message::text("hi")).unwrap();
    let (c, m) = expect_message(&server);
    assert_eq!(m, Message::Text("hi".into()));
    c.send(m).unwrap();
    assert_eq!(ws.read().unwrap(), tungstenite::Message::text("hi"));
    assert_eq!(server.stats().http_answered, 4);
}

#[test]
fn without_a_handler_plain_http_gets_426() {
    let server = server();
    let resp = http(server.local_addr(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        resp.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
        "{resp}"
    );
    assert!(resp.contains("\r\nUpgrade: websocket\r\n"), "{resp}");
    // An upgrade to another protocol (as `curl --http2` asks): the same.
    let resp = http(
        server.local_addr(),
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 426 "), "{resp}");
    assert!(resp.contains("\r\nUpgrade: websocket\r\n"), "{resp}");
    let resp = http(server.local_addr(), b"nonsense\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 400 "), "{resp}");
}

#[test]
fn forwarded_address_only_when_the_proxy_is_trusted() {
    let trusting = WebSocketServer::builder()
        .trust_proxy(true)
        .start("127.0.0.1:0")
        .unwrap();
    let addr = trusting.local_addr();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    // Sockets stay open to the end, so that no Disconnect comes between
    // the Connects awaited.
    let mut open = Vec::new();
    let mut seen = |extra: &str| {
        let (_h, s) = upgrade(addr, extra);
        open.push(s);
        (expect_connect(&trusting), ())
    };

    // The last X-Forwarded-For entry is the one the proxy appended; the
    // first is the client's claim, and so is an X-Real-IP the proxy
    // does not set.
    let (c, _s) = seen("X-Real-IP: 6.6.6.6\r\nX-Forwarded-For: 10.9.9.9, 203.0.113.7\r\n");
    assert_eq!(c.forwarded_addr(), Some(ip("203.0.113.7")));
    assert_eq!(c.ip(), ip("203.0.113.7"));
    assert_eq!(c.peer_addr().ip(), ip("127.0.0.1"));
    // Split over lines, with ports and brackets.
    let (c, _s) = seen("X-Forwarded-For: 10.9.9.9\r\nX-Forwarded-For: [2001:db8::5]:443\r\n");
    assert_eq!(c.forwarded_addr(), Some(ip("2001:db8::5")));
    let (c, _s) = seen("X-Forwarded-For: 198.51.100.2:5678\r\n");
    assert_eq!(c.forwarded_addr(), Some(ip("198.51.100.2")));
    let (c, _s) = seen("X-Forwarded-For: 2001:db8::9\r\n");
    assert_eq!(c.forwarded_addr(), Some(ip("2001:db8::9")));
    // An IPv4 client of a proxy on a dual-stack socket: its IPv4 address.
    for form in [
        "::ffff:192.0.2.7",
        "[::ffff:192.0.2.7]:443",
        "::FFFF:c000:0207",
    ] {
        let (c, _s) = seen(&format!("X-Forwarded-For: {form}\r\n"));
        assert_eq!(c.forwarded_addr(), Some(ip("192.0.2.7")), "{form}");
        assert_eq!(c.ip(), ip("192.0.2.7"), "{form}");
    }
    // Nonsense or nothing: the TCP peer.
    for extra in [
        "X-Forwarded-For: not-an-address\r\n",
        "X-Real-IP: 6.6.6.6\r\n",
    ] {
        let (c, _s) = seen(extra);
        assert_eq!(c.forwarded_addr(), None, "{extra}");
        assert_eq!(c.ip(), ip("127.0.0.1"));
    }

    // A proxy that overwrites X-Real-IP can be believed on that instead.
    let real_ip = WebSocketServer::builder()
        .trust_proxy(true)
        .forwarded_header("X-Real-IP")
        .start("127.0.0.1:0")
        .unwrap();
    let (_h, _s) = upgrade(
        real_ip.local_addr(),
        "X-Real-IP: 203.0.113.9\r\nX-Forwarded-For: 6.6.6.6\r\n",
    );
    assert_eq!(
        expect_connect(&real_ip).forwarded_addr(),
        Some(ip("203.0.113.9"))
    );
    // Twice, it was added beside the client's, not over it: neither is
    // believed.
    let (_h, _s2) = upgrade(
        real_ip.local_addr(),
        "X-Real-IP: 6.6.6.6\r\nX-Real-IP: 203.0.113.9\r\n",
    );
    assert_eq!(expect_connect(&real_ip).forwarded_addr(), None);

    // RFC 7239: the `for=` of the last element, over all lines.
    let rfc = WebSocketServer::builder()
        .trust_proxy(true)
        .forwarded_header("Forwarded")
        .start("127.0.0.1:0")
        .unwrap();
    let mut kept = Vec::new();
    for (extra, want) in [
        (
            "Forwarded: for=6.6.6.6;proto=https\r\nForwarded: proto=http;For=\"[2001:db8::7]:4711\", by=1.1.1.1\r\n",
            None,
        ),
        (
            "Forwarded: for=6.6.6.6, for=203.0.113.4;proto=https\r\n",
            Some(ip("203.0.113.4")),
        ),
        (
            "Forwarded: for=6.6.6.6\r\nForwarded: proto=http;For=\"[2001:db8::7]:4711\"\r\n",
            Some(ip("2001:db8::7")),
        ),
        ("Forwarded: for=unknown\r\n", None),
        // A client's own `host=` (quoted, so its separators split nothing)
        // cannot plant a `for=`, nor can a quote it leaves open reach the
        // element the proxy appended.
        (
            "Forwarded: for=203.0.113.4;host=\"x,for=6.6.6.6\"\r\n",
            Some(ip("203.0.113.4")),
        ),
        (
            "Forwarded: host=\"x;for=6.6.6.6\";for=203.0.113.4\r\n",
            Some(ip("203.0.113.4")),
        ),
        (
            "Forwarded: for=6.6.6.6;host=\"x, for=203.0.113.4\r\n",
            Some(ip("203.0.113.4")),
        ),
        // An escaped quote in the proxy's own element is not a quote.
        (
            "Forwarded: for=6.6.6.6;x=\", for=203.0.113.4;host=\"a\\\"b\"\r\n",
            Some(ip("203.0.113.4")),
        ),
        ("Forwarded: for=_hidden\r\n", None),
    ] {
        let (_h, s) = upgrade(rfc.local_addr(), extra);
        kept.push(s);
        assert_eq!(expect_connect(&rfc).forwarded_addr(), want, "{extra}");
    }

    let plain = server();
    let (_h, _s) = upgrade(plain.local_addr(), "X-Forwarded-For: 203.0.113.7\r\n");
    assert_eq!(expect_connect(&plain).forwarded_addr(), None);
}

#[test]
fn slow_http_readers_hold_no_worker_and_are_cut_off_at_the_deadline() {
    let page = "x".repeat(8 << 20);
    let server = WebSocketServer::builder()
        .workers(2)
        .handshake_timeout(std::time::Duration::from_secs(2))
        .on_http(move |_| HttpResponse::new(200).body(page.clone()))
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    // More slow readers than workers, each with a tiny receive buffer,
    // none reading.
    let slow: Vec<TcpStream> = (0..4)
        .map(|_| {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_recv_buffer_size(4096).unwrap();
            s.connect(&addr.into()).unwrap();
            let mut s: TcpStream = s.into();
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            s
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    // The server still upgrades and echoes at once.
    let started = std::time::Instant::now();
    let mut ws = client(addr);
    expect_connect(&server);
    ws.send(tungstenite::Message::text("quick")).unwrap();
    let (c, m) = expect_message(&server);
    c.send(m).unwrap();
    assert_eq!(ws.read().unwrap(), tungstenite::Message::text("quick"));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // At the deadline the slow readers are closed, well short of 8 MiB.
    std::thread::sleep(std::time::Duration::from_secs(3));
    for mut s in slow {
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut got = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        assert!(got < 8 << 20, "got all {got} bytes");
    }
}

#[test]
fn head_and_bodies_and_odd_statuses() {
    let server = WebSocketServer::builder()
        .on_http(|req| match req.path() {
            "/none" => HttpResponse::new(204).body("dropped"),
            "/early" => HttpResponse::new(103).body("not final"),
            _ => HttpResponse::new(200)
                .header("Content-Length", "1")
                .header("X-Ok", "yes")
                .header("X-Bad", "a\u{0}b")
                .body("hello"),
        })
        .start("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let resp = http(addr, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
    assert!(resp.contains("\r\nContent-Length: 5\r\n"), "{resp}");
    assert!(resp.ends_with("\r\n\r\n"), "HEAD has no body: {resp}");
    assert!(
        resp.contains("\r\nX-Ok: yes\r\n") && !resp.contains("X-Bad"),
        "{resp}"
    );
    assert_eq!(resp.matches("Content-Length").count(), 1, "{resp}");
    let resp = http(addr, b"GET /none HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 204 "), "{resp}");
    assert!(
        !resp.contains("dropped") && !resp.contains("Content-Length"),
        "{resp}"
    );
    let resp = http(addr, b"GET /early HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 500 "), "{resp}");
    // A request body the server never reads does not reset the answer.
    let body = vec![b'b'; 200_000];
    let mut req = format!(
        "POST /form HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    let resp = http(addr, &req);
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp:.80}");
    assert!(resp.ends_with("\r\n\r\nhello"), "{resp:.80}");
}

/// `on_http` answers one request per connection, says so
/// (`Connection: close`), and a second request pipelined behind the first
/// gets no answer: the connection ends after the first.
#[test]
fn on_http_answers_one_request_per_connection() {
    let server = WebSocketServer::builder()
        .on_http(|req| enjent::HttpResponse::new(200).body(format!("page {}", req.path())))
        .start("127.0.0.1:0")
        .unwrap();
    let both = b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\n\r\n";
    let out = http(server.local_addr(), both);
    assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
    assert!(out.contains("\r\nConnection: close\r\n"), "{out}");
    assert!(out.ends_with("page /one"), "{out}");
    assert_eq!(out.matches("HTTP/1.1").count(), 1, "{out}");
}

/// Was a bug: a refusal from a worker (the strategy's `Err`, a request
/// refused by its content) was written with one non-blocking write, so a
/// long body (a strategy's 403 page) reached a client that did not read
/// at once cut short, though its head announced it whole. It is now
/// written as the socket drains, as `on_http`'s answers are. And a `HEAD`
/// request's refusal has no body.
#[test]
fn a_long_refusal_reaches_a_slow_reader_whole() {
    let page = "x".repeat(8 << 20);
    let server = WebSocketServer::with_client_init(move |_| -> Result<(), Reject> {
        Err(Reject::forbidden(page.clone()))
    })
    .workers(2)
    .start("127.0.0.1:0")
    .unwrap();
    let addr = server.local_addr();
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.connect(&addr.into()).unwrap();
    let mut s: TcpStream = s.into();
    s.write_all(REQUEST.as_bytes()).unwrap();
    // Not reading yet: the kernel takes a little of the answer.
    std::thread::sleep(std::time::Duration::from_millis(300));
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    let at = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head")
        + 4;
    let head = String::from_utf8_lossy(&got[..at]);
    assert_eq!(status(&head), 403, "{head}");
    assert!(head.contains("Content-Length: 8388608\r\n"), "{head}");
    assert_eq!(got.len() - at, 8 << 20, "the body came cut short");
    assert!(got[at..].iter().all(|&b| b == b'x'));

    // HEAD: refused by its method (405), with no body after the head.
    let mut h = raw(addr);
    h.write_all(REQUEST.replacen("GET", "HEAD", 1).as_bytes())
        .unwrap();
    let mut got = Vec::new();
    h.read_to_end(&mut got).unwrap();
    let text = String::from_utf8_lossy(&got);
    assert_eq!(status(&text), 405, "{text}");
    assert!(
        text.ends_with("\r\n\r\n"),
        "a body after the head: {text:?}"
    );
}

/// Was a bug: a last `X-Forwarded-For` line that is not UTF-8 was
/// skipped, so an earlier line, which the client may have written, gave
/// the forwarded address. Now such a request has none.
#[test]
fn a_forwarded_for_line_that_is_not_utf8_is_not_skipped() {
    let server = WebSocketServer::builder()
        .trust_proxy(true)
        .start("127.0.0.1:0")
        .unwrap();
    let mut req = REQUEST
        .replace(
            "\r\n\r\n",
            "\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-For: ",
        )
        .into_bytes();
    req.extend_from_slice(b"\xff, 203.0.113.7\r\n\r\n");
    let mut s = raw(server.local_addr());
    s.write_all(&req).unwrap();
    read_101(&mut s);
    let c = expect_connect(&server);
    assert_eq!(c.forwarded_addr(), None);
}
