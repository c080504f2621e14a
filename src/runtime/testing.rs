//! Helpers for the runtime's unit tests.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::{Event, WebSocketServer};

/// Connect a client to `server` (main-loop style) and take its `Connect`.
pub(crate) fn join<T: Send + Sync + 'static>(
    server: &WebSocketServer<T>,
) -> (TcpStream, crate::Client<T>) {
    let mut s = TcpStream::connect(server.local_addr()).unwrap();
    s.write_all(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
    match server.recv_timeout(Duration::from_secs(10)) {
        Ok(Event::Connect { client }) => (s, client),
        other => panic!("{other:?}"),
    }
}
