//! Topics shared by several servers through a message engine.
//!
//! A server with a [`Bridge`] (see [`Builder::bridge`](crate::Builder::bridge))
//! publishes each message to its own subscribers, then hands it to the
//! engine in an envelope the library owns (origin, sequence number). Every
//! other server subscribed to the topic delivers it to its own
//! subscribers, once. The engine only carries bytes on named channels:
//! this module's traits are all a second engine has to implement.
//!
//! What the library does around the engine, whatever it is:
//!
//! - One channel per topic that has local subscribers: subscribed when the
//!   topic gains its first one, unsubscribed a second after its last one
//!   leaves (so that a topic whose subscribers come and go does not churn
//!   the engine).
//! - `publish` never waits for the engine: messages wait in a bounded
//!   outbox (`bridge_outbox_bytes`), and what does not fit is dropped and
//!   counted.
//! - A server drops its own messages when the engine echoes them back, so
//!   nobody gets a message twice and `Client::publish` leaves out its
//!   sender across servers too.
//! - Lost connections are reconnected with backoff, the channels of the
//!   topics with local subscribers subscribed again, and the user told
//!   [`BridgeEvent::Down`] and [`BridgeEvent::Up`].
//! - Each server numbers its messages per topic, so a receiver counts the
//!   messages it missed from each origin ([`BridgeEvent::Missed`],
//!   [`BridgeStats`](crate::stats::BridgeStats)) and drops duplicates.
//!
//! The guarantees: exactly once and in order per origin while the engine
//! is up; at most once across an outage, with the gaps counted when the
//! next message of the topic arrives.

#[cfg(feature = "redis")]
mod redis;

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::RedisBridge;

use std::fmt;
use std::io;
use std::time::Duration;

/// A message engine that carries publishes between servers.
///
/// The server calls it from two threads of its own: one publishes, one
/// receives. Each opens its own connection, and opens it again (with
/// backoff) after an error.
pub trait Bridge: Send + Sync + 'static {
    /// Connect a publishing connection.
    ///
    /// # Errors
    ///
    /// Any failure to connect; the server retries with backoff.
    fn publisher(&self) -> io::Result<Box<dyn Publisher>>;

    /// Connect a receiving connection and run `session` on it, returning
    /// what it returns. The session subscribes, unsubscribes and receives
    /// through the [`Subscriber`] it is given, and returns `Ok` when the
    /// server is shutting down, or the first error of the connection.
    ///
    /// It takes a closure rather than returning the subscriber so that an
    /// engine whose subscription borrows its connection can keep both on
    /// the stack.
    ///
    /// # Errors
    ///
    /// A failure to connect, or the session's error.
    fn subscriber(
        &self,
        session: &mut dyn FnMut(&mut dyn Subscriber) -> io::Result<()>,
    ) -> io::Result<()>;
}

/// A bridge's publishing connection.
pub trait Publisher: Send {
    /// Publish each `(channel, payload)` in order, waiting until the
    /// engine answered for them all. Push onto `refused` the index of each
    /// item the engine answered with an error (a channel it does not
    /// allow, say): those are dropped and counted
    /// ([`BridgeStats::refused`](crate::stats::BridgeStats::refused)),
    /// never sent again.
    ///
    /// # Errors
    ///
    /// A failed connection: the server reconnects and publishes the same
    /// batch again (receivers drop what arrives twice).
    fn publish(&mut self, batch: &[(&str, &[u8])], refused: &mut Vec<usize>) -> io::Result<()>;
}

/// A bridge's receiving connection, inside [`Bridge::subscriber`].
pub trait Subscriber {
    /// Start receiving the messages published to `channels`.
    ///
    /// # Errors
    ///
    /// A failed connection. A channel the engine refuses is not an error:
    /// the others are subscribed, and [`take_refused`](Subscriber::take_refused)
    /// names it. An engine that cannot tell a refused subscription may
    /// return `Ok`: the server notices when its own messages do not come
    /// back.
    fn subscribe(&mut self, channels: &[&str]) -> io::Result<()>;

    /// The channels `subscribe` found refused since this was last called
    /// (a channel the engine's user may not use, say): they are left out
    /// and counted ([`BridgeStats::refused`](crate::stats::BridgeStats::refused)).
    /// By default none.
    fn take_refused(&mut self) -> Vec<String> {
        Vec::new()
    }

    /// Stop receiving the messages published to `channels`.
    ///
    /// # Errors
    ///
    /// A failed connection.
    fn unsubscribe(&mut self, channels: &[&str]) -> io::Result<()>;

    /// The next message, as `(channel, payload)`, or `None` if none came
    /// within `timeout` and the connection is still alive (an engine may
    /// check that with a ping).
    ///
    /// # Errors
    ///
    /// A failed connection.
    fn receive(&mut self, timeout: Duration) -> io::Result<Option<(String, Vec<u8>)>>;
}

/// What happened to a server's bridge, from
/// [`Event::Bridge`](crate::Event::Bridge) or the
/// [`on_bridge`](crate::Builder::on_bridge) closure. `Missed` events are
/// told at most 16 times a second; the counters count every message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BridgeEvent {
    /// Both connections are up, every topic with local subscribers is
    /// subscribed again (after a start or an outage), and a message of
    /// this server's went through the engine and back.
    Up,
    /// A connection failed. Local delivery goes on; messages for the
    /// engine wait in the outbox, and what overflows it is dropped and
    /// counted. The bridge reconnects with backoff.
    Down {
        /// What failed.
        error: String,
    },
    /// Messages of another server were missed: its next message on a
    /// topic came with a sequence number `count` past the one expected.
    Missed {
        /// The server that sent them (see
        /// [`BridgeStats::origin`](crate::stats::BridgeStats::origin)).
        origin: u64,
        /// The topic.
        topic: String,
        /// How many were missed.
        count: u64,
    },
}

impl fmt::Display for BridgeEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BridgeEvent::Up => f.write_str("bridge up"),
            BridgeEvent::Down { error } => write!(f, "bridge down: {error}"),
            BridgeEvent::Missed {
                origin,
                topic,
                count,
            } => write!(
                f,
                "missed {count} messages of server {origin:016x} on topic {topic:?}"
            ),
        }
    }
}
