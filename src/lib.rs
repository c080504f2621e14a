//! enjent: a WebSocket server (RFC 6455) for synchronous Rust.
//!
//! No async runtime: a dedicated thread accepts, a pool of workers does
//! handshakes and parses frames, one readiness loop (`polling`) tells the
//! workers which sockets have data, and your code gets events from a
//! channel or runs as closures. Sending works from any thread.
//!
//! An echo server:
//!
//! ```no_run
//! use enjent::{Event, WebSocketServer};
//!
//! let server = WebSocketServer::bind("127.0.0.1:13003")?;
//! println!("listening on {}", server.local_addr());
//! for event in server.events() {
//!     match event {
//!         Event::Connect { client } => println!("{} connected", client.id()),
//!         Event::Message { client, message } => {
//!             // A client that left meanwhile gives `Err(Closed)`: no
//!             // reason to end the loop, and so stop serving the others.
//!             let _ = client.send(message);
//!         }
//!         Event::Disconnect { client, close, .. } => println!("{} left: {close}", client.id()),
//!         _ => {}
//!     }
//! }
//! # Ok::<(), enjent::Error>(())
//! ```
//!
//! The same with closures, which run on the pool's workers:
//!
//! ```no_run
//! use enjent::WebSocketServer;
//!
//! let server = WebSocketServer::builder()
//!     .on_message(|client, message| {
//!         if let Err(e) = client.send(message) {
//!             eprintln!("echo to {} failed: {e}", client.id());
//!         }
//!     })
//!     .start("127.0.0.1:13003")?;
//! # drop(server);
//! # Ok::<(), enjent::Error>(())
//! ```
//!
//! # Flow control
//!
//! What a client *holds* is the bytes queued to it plus the bytes of its
//! events the main loop has not consumed (an event counts until the loop
//! asks for the next one; the messages one read gave, until it asks past
//! the last of them or those handled hold 4 KiB, or a 64th of
//! `event_queue_bytes` if less). At [`high_water`](Builder::high_water) the
//! server stops reading that client and dispatching its messages, checked
//! between messages; at [`low_water`](Builder::low_water) it reads again
//! and fires [`Event::Drain`] if a send was refused meanwhile. Over the
//! hard limit, [`max_backpressure`](Builder::max_backpressure), a send is
//! refused and the message handed back in a [`SendError`].
//!
//! The guarantee: a closure that answers each message with at most one
//! message of at most `max_message_size` bytes is never refused for a
//! client that keeps reading, however fast that client sends (unless the
//! server as a whole is over `max_queued_bytes`), because the
//! hard limit in force is at least `high_water + max_message_size + 1
//! KiB` (and what compression can add to a message, when it may send one
//! larger than it is). A main loop has it for replies no larger than the
//! messages they answer, each sent before it takes the next event: its
//! events not yet taken count on their client at their own size, and a
//! reply takes its event's place, its event's charge given back when the
//! loop moves on (or, within 4 KiB, past the read it came in: sends are
//! admitted on the queue alone, so this changes nothing here); each
//! message is counted as large as its reply may be sent, compression's
//! growth included. Only fan-out to
//! clients that do not keep up, and a main loop's replies larger than
//! their messages, meet it. The main loop's channel is bounded in bytes
//! ([`event_queue_bytes`](Builder::event_queue_bytes)): a slow loop makes
//! the server stop reading, never grow. Threads outside the pool can wait
//! for room with [`Client::send_timeout`].
//!
//! A whole round trip, run as a test: a server on a free port, a bare TCP
//! client that upgrades and sends "hi", and a main loop that echoes it.
//!
//! ```
//! use std::io::{Read, Write};
//! use enjent::{Event, Message, WebSocketServer};
//!
//! let server = WebSocketServer::bind("127.0.0.1:0")?;
//! let addr = server.local_addr();
//! let peer = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
//!     let mut s = std::net::TcpStream::connect(addr)?;
//!     s.write_all(b"GET / HTTP/1.1\r\nHost: example\r\nUpgrade: websocket\r\n\
//!                   Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
//!                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")?;
//!     // A text frame "hi", masked with the key 0 (which changes nothing).
//!     s.write_all(&[0x81, 0x82, 0, 0, 0, 0, b'h', b'i'])?;
//!     // The 101 head, then the echo: 4 bytes.
//!     let mut got = Vec::new();
//!     let mut buf = [0u8; 512];
//!     loop {
//!         let n = s.read(&mut buf)?;
//!         got.extend_from_slice(&buf[..n]);
//!         if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
//!             if got.len() >= end + 8 || n == 0 {
//!                 return Ok(got.split_off(end + 4));
//!             }
//!         }
//!     }
//! });
//! for event in server.events() {
//!     if let Event::Message { client, message } = event {
//!         assert_eq!(message, Message::Text("hi".into()));
//!         client.send(message)?;
//!         break;
//!     }
//! }
//! assert_eq!(peer.join().unwrap()?, [0x81, 2, b'h', b'i']);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Clients can carry data of your own, built from the upgrade request by a
//! client-init strategy that may also refuse them: see
//! [`WebSocketServer::with_client_init`]. The builder also chooses
//! subprotocols ([`Builder::protocols`]), allowed origins, a handler for
//! plain HTTP requests ([`Builder::on_http`]), trusted proxy headers, and,
//! with the `deflate` feature, permessage-deflate (`Builder::compression`).

//!
//! # Errors and panics
//!
//! The library writes nothing to stderr. What no other event reports (a
//! closure of yours panicked, or the server recovered from a failure of
//! its own) comes as [`Event::Error`], or to [`Builder::on_error`], is
//! counted in [`Stats`], and with the `log` feature also goes to the
//! [`log`](https://docs.rs/log) facade. A panic in a closure stays visible
//! by default the way every Rust panic is: the standard panic hook prints
//! it (install your own hook with `std::panic::set_hook` to route it).
//!
//! # Feature flags
//!
//! - `deflate`: permessage-deflate (RFC 7692), with `flate2`'s pure-Rust
//!   zlib backend.
//! - `log`: errors also go to the `log` facade (handler panics at `warn`,
//!   internal errors at `error`).
//! - `redis`: topics shared across instances through Redis
//!   (`RedisBridge`), with the `redis` crate and no async runtime.
//!
//! # API notes: deliberate departures from the Rust API Guidelines
//!
//! - [`WebSocketServer::builder`], [`WebSocketServer::with_client_init`]
//!   and [`WebSocketServer::with_handshake`] return a [`Builder`] rather
//!   than living on it: the names are the seed library's, and a
//!   `Builder<T>`'s `T` is fixed by the strategy, so it has to start there.
//! - [`HttpResponse`] and [`Reject`] are one type under two names: a
//!   refused upgrade and an answer to plain HTTP are both an HTTP
//!   response, and each name reads right where it is used.
//! - [`Request::query_param`] returns an owned `String`: it decodes
//!   percent escapes, and a borrowed value would tie a client's data to
//!   the request it was built from.
//! - [`Broadcast`] is not `#[must_use]`: its counts are information, and
//!   a broadcast whose report is ignored is still a broadcast.

#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(unsafe_code)]
#![deny(missing_docs, missing_debug_implementations)]

// The README's code blocks are compiled as doc tests, so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

pub mod bridge;
mod client;
mod config;
mod error;
mod event;
mod message;
pub mod proto;
mod runtime;
mod server;
mod shelf;
mod stats;

pub use client::{Client, ClientId, SendStatus};
pub use config::{Config, SlowClientPolicy};
pub use error::{Error, ProtocolError, Result, SendError};
pub use event::{Event, EventIter, EventTryIter, Events};
pub use message::{CloseCode, CloseFrame, Message};
#[cfg(feature = "deflate")]
pub use proto::deflate::Compression;
pub use proto::handshake::{HttpResponse, Reject, Request, Response};
pub use server::{Broadcast, Builder, ServerHandle, WebSocketServer};
pub use stats::{BridgeStats, Stats};

// The Send/Sync/Clone a user relies on, checked at compile time.
const _: () = {
    const fn send_sync<X: Send + Sync>() {}
    const fn send<X: Send>() {}
    send_sync::<Client<()>>();
    send_sync::<ServerHandle<()>>();
    send_sync::<Error>();
    send_sync::<SendError>();
    send_sync::<Message>();
    send_sync::<Stats>();
    send_sync::<Config>();
    send::<WebSocketServer<()>>();
    send::<Events<()>>();
    send::<Event<()>>();
};
