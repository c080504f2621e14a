//! The client-init strategy builds each client's data from the request,
//! or refuses it with an HTTP status and body.

mod support;

use enjent::{Error, Event, Reject, WebSocketServer};
use support::*;

#[derive(Debug)]
struct User {
    name: String,
    session: String,
    path: String,
}

fn start() -> WebSocketServer<User> {
    WebSocketServer::with_client_init(|req| {
        let name = req
            .query_param("name")
            .ok_or_else(|| Reject::forbidden("name required"))?;
        let session = req
            .cookie("session")
            .ok_or_else(|| Reject::new(401).body("no session"))?;
        if name == "panic" {
            panic!("strategy bug");
        }
        Ok(User {
            name,
            session: session.to_owned(),
            path: req.path().to_owned(),
        })
    })
    .start("127.0.0.1:0")
    .unwrap()
}

#[test]
fn data_comes_from_query_and_cookie() {
    let server = start();
    let mut req = tungstenite::client::IntoClientRequest::into_client_request(format!(
        "ws://{}/room/7?name=Ann%20Lee",
        server.local_addr()
    ))
    .unwrap();
    req.headers_mut()
        .insert("Cookie", "theme=dark; session=s3cr3t".parse().unwrap());
    let (_ws, _) = tungstenite::connect(req).unwrap();
    let Event::Connect { client } = server.recv_timeout(WAIT).unwrap() else {
        panic!()
    };
    assert_eq!(client.data().name, "Ann Lee");
    assert_eq!(client.data().session, "s3cr3t");
    assert_eq!(client.data().path, "/room/7");
}

#[test]
fn refusals_carry_status_and_body() {
    let server = start();
    let addr = server.local_addr();
    let no_name = http(addr, REQUEST.replace("GET / ", "GET /?x=1 ").as_bytes());
    assert!(
        no_name.starts_with("HTTP/1.1 403 Forbidden\r\n"),
        "{no_name}"
    );
    assert!(no_name.ends_with("\r\n\r\nname required"), "{no_name}");
    let no_cookie = http(
        addr,
        REQUEST.replace("GET / ", "GET /?name=bob ").as_bytes(),
    );
    assert!(no_cookie.starts_with("HTTP/1.1 401 "), "{no_cookie}");
    let with_cookie = REQUEST
        .replace("GET / ", "GET /?name=panic ")
        .replace("\r\n\r\n", "\r\nCookie: session=1\r\n\r\n");
    let panicked = http(addr, with_cookie.as_bytes());
    assert!(
        panicked.starts_with("HTTP/1.1 500 "),
        "a panicking strategy answers 500: {panicked}"
    );
    // The strategy's panic is reported as an event (never on stderr);
    // refused clients produce no other.
    match server.recv_timeout(WAIT) {
        Ok(Event::Error {
            client: None,
            error: Error::HandlerPanicked { handler, .. },
        }) => assert_eq!(handler, "client-init strategy"),
        other => panic!("expected the strategy's panic, got {other:?}"),
    }
    assert!(
        server.try_recv().is_err(),
        "refused clients produce no events"
    );
    // And a good one still gets in.
    let good = REQUEST
        .replace("GET / ", "GET /?name=eve ")
        .replace("\r\n\r\n", "\r\nCookie: session=2\r\n\r\n");
    let mut s = raw(addr);
    use std::io::Write;
    s.write_all(good.as_bytes()).unwrap();
    let Event::Connect { client } = server.recv_timeout(WAIT).unwrap() else {
        panic!()
    };
    assert_eq!(client.data().name, "eve");
}

/// Was a bug: a handshake whose client-init strategy returned after
/// shutdown had closed every connection was opened anyway, with no poller
/// left to serve or close it: the user saw its `Connect` and never its
/// `Disconnect`. It is now refused with `503`.
#[test]
fn a_handshake_that_outlasts_shutdown_is_refused_not_opened() {
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let entered_tx = std::sync::Mutex::new(entered_tx);
    let server = WebSocketServer::with_client_init(move |_req| {
        let _ = entered_tx.lock().unwrap().send(());
        std::thread::sleep(std::time::Duration::from_millis(1500));
        Ok(())
    })
    .close_timeout(std::time::Duration::from_millis(100))
    .start("127.0.0.1:0")
    .unwrap();
    let addr = server.local_addr();
    let client = std::thread::spawn(move || http(addr, REQUEST.as_bytes()));
    entered_rx.recv_timeout(WAIT).unwrap();
    server.shutdown();
    let answer = client.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    let mut connects = 0;
    let mut disconnects = 0;
    while let Ok(event) = server.recv_timeout(std::time::Duration::from_millis(200)) {
        match event {
            Event::Connect { .. } => connects += 1,
            Event::Disconnect { .. } => disconnects += 1,
            _ => {}
        }
    }
    assert_eq!((connects, disconnects), (0, 0));
    assert_eq!(server.connections(), 0);
}
