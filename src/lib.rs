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
//!             client.send(message)?;
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
//!         let _ = client.send(message);
//!     })
//!     .start("127.0.0.1:13003")?;
//! # drop(server);
//! # Ok::<(), enjent::Error>(())
//! ```
//!
//! Clients can carry data of your own, built from the upgrade request by a
//! client-init strategy that may also refuse them: see
//! [`WebSocketServer::with_client_init`].

#![deny(unsafe_code)]
#![deny(missing_docs, missing_debug_implementations)]

// The README's code blocks are compiled as doc tests, so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

mod client;
mod config;
mod error;
mod event;
mod message;
pub mod proto;
mod runtime;
mod server;
mod stats;

pub use client::{Client, ClientId, SendStatus};
pub use config::{Config, SlowClientPolicy};
pub use error::{Error, ProtocolError, Result};
pub use event::Event;
pub use message::{CloseCode, CloseFrame, Message};
#[cfg(feature = "deflate")]
pub use proto::deflate::Compression;
pub use proto::handshake::{HttpResponse, Reject, Request, Response};
pub use server::{Broadcast, Builder, ServerHandle, WebSocketServer};
pub use stats::Stats;
