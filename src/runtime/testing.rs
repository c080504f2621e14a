//! Helpers for the runtime's unit tests.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Barrier, Mutex, mpsc};
use std::time::Duration;

use crate::{Event, WebSocketServer};

/// A valid upgrade request.
pub(crate) const UPGRADE: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
    Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";

/// Send an upgrade request on `s` and read its `101`.
pub(crate) fn upgrade(s: &mut TcpStream) {
    s.write_all(UPGRADE).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
}

/// Connect a client to `server` (main-loop style) and take its `Connect`.
pub(crate) fn join<T: Send + Sync + 'static>(
    server: &WebSocketServer<T>,
) -> (TcpStream, crate::Client<T>) {
    let mut s = TcpStream::connect(server.local_addr()).unwrap();
    upgrade(&mut s);
    match server.recv_timeout(Duration::from_secs(10)) {
        Ok(Event::Connect { client }) => (s, client),
        other => panic!("{other:?}"),
    }
}

/// Client data whose `Drop` panics.
pub(crate) struct Bomb;

impl Drop for Bomb {
    fn drop(&mut self) {
        panic!("client data dropped");
    }
}

/// A main-loop server whose clients carry a [`Bomb`], and what it reports
/// to `on_error`.
pub(crate) fn bomb_server() -> (WebSocketServer<Bomb>, mpsc::Receiver<String>) {
    bomb_server_with(|b| b)
}

/// [`bomb_server`], configured further by `f`.
pub(crate) fn bomb_server_with(
    f: impl FnOnce(crate::Builder<Bomb>) -> crate::Builder<Bomb>,
) -> (WebSocketServer<Bomb>, mpsc::Receiver<String>) {
    let (tx, reported) = mpsc::channel::<String>();
    let tx = Mutex::new(tx);
    let builder = WebSocketServer::with_client_init(|_| Ok(Bomb)).on_error(move |_, e| {
        let _ = tx.lock().unwrap().send(e.to_string());
    });
    (f(builder).start("127.0.0.1:0").unwrap(), reported)
}

/// Wait for a [`bomb_server`]'s report of a client's data dropped (its
/// `Drop` panicked, guarded).
pub(crate) fn expect_drop_reported(reported: &mpsc::Receiver<String>) {
    let error = reported
        .recv_timeout(Duration::from_secs(5))
        .expect("the drop of the client's data was not reported");
    assert!(error.contains("client data dropped"), "{error}");
}

/// Wait for the `Disconnect` of client `id`, then make the channel let
/// go of that event's client (it keeps the last one until the next
/// receive).
pub(crate) fn wait_gone<T: Send + Sync + 'static>(
    server: &WebSocketServer<T>,
    id: crate::ClientId,
) {
    loop {
        match server.recv_timeout(Duration::from_secs(5)) {
            Ok(Event::Disconnect { client, .. }) if client.id() == id => break,
            Ok(_) => {}
            Err(e) => panic!("no Disconnect for {id:?}: {e:?}"),
        }
    }
    assert!(server.recv_timeout(Duration::from_millis(1)).is_err());
}

/// Keep every pool worker busy until the returned sender is dropped, so
/// that pool jobs queued meanwhile run only then.
pub(crate) fn hold_pool<T: Send + Sync + 'static>(
    shared: &crate::runtime::Shared<T>,
) -> mpsc::Sender<()> {
    let (release, held) = mpsc::channel::<()>();
    let held = Arc::new(Mutex::new(held));
    let workers = shared.pool.max_count();
    let started = Arc::new(Barrier::new(workers + 1));
    for _ in 0..workers {
        let (held, started) = (Arc::clone(&held), Arc::clone(&started));
        shared.pool.execute(move || {
            started.wait();
            let _ = held.lock().unwrap().recv();
        });
    }
    started.wait();
    release
}

/// A client of a [`bomb_server`] that has gone, its `Disconnect` taken,
/// held by the returned reference alone.
pub(crate) fn gone_bomb(server: &WebSocketServer<Bomb>) -> Arc<crate::runtime::conn::Conn<Bomb>> {
    let shared = server.shared();
    let (s, client) = join(server);
    let id = client.id();
    drop(client);
    let conn = shared.registry.snapshot().pop().unwrap();
    drop(s);
    wait_gone(server, id);
    // The teardown's own holds (its job, the readiness loop) go a moment
    // after the `Disconnect`: the test's must be the last.
    let t = std::time::Instant::now();
    while Arc::strong_count(&conn) > 1 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the client is still held"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    conn
}

/// A masked client frame.
pub(crate) fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let key = [0x37, 0xFA, 0x21, 0x3D];
    let mut out = vec![first];
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xFFFF {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&key);
    let start = out.len();
    out.extend_from_slice(payload);
    crate::proto::frame::apply_mask(&mut out[start..], key, 0);
    out
}
