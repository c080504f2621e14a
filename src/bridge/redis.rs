//! The [`Bridge`] over Redis Pub/Sub, with the `redis` crate's synchronous
//! client: one connection publishes (a pipeline per batch), one subscribes.

use std::io;
use std::time::Duration;

use redis::{Client, Connection, PubSub, RedisError};

use super::{Bridge, Publisher, Subscriber};

/// Topics shared through Redis Pub/Sub: one Redis channel per topic that
/// has local subscribers.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use enjent::WebSocketServer;
/// use enjent::bridge::RedisBridge;
///
/// let server = WebSocketServer::builder()
///     .bridge(RedisBridge::new("redis://127.0.0.1:6379")?)
///     .start("0.0.0.0:8080")?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RedisBridge {
    client: Client,
    timeout: Duration,
}

impl RedisBridge {
    /// A bridge to the Redis at `url` (`redis://[user:password@]host[:port][/db]`).
    /// Nothing connects until the server starts.
    ///
    /// # Errors
    ///
    /// An invalid URL, as [`io::ErrorKind::InvalidInput`].
    pub fn new(url: &str) -> io::Result<RedisBridge> {
        let client = Client::open(url)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        Ok(RedisBridge {
            client,
            timeout: Duration::from_secs(2),
        })
    }

    /// How long connecting, a write, or a command's reply may take before
    /// the connection counts as failed (default 2 s). Also how often an
    /// idle receiving connection is checked with a `PING`, at most.
    pub fn timeout(mut self, timeout: Duration) -> RedisBridge {
        self.timeout = timeout.max(Duration::from_millis(1));
        self
    }

    fn connect(&self) -> io::Result<Connection> {
        let con = self
            .client
            .get_connection_with_timeout(self.timeout)
            .map_err(io_error)?;
        con.set_write_timeout(Some(self.timeout))
            .map_err(io_error)?;
        con.set_read_timeout(Some(self.timeout)).map_err(io_error)?;
        Ok(con)
    }
}

fn io_error(e: RedisError) -> io::Error {
    let kind = if e.is_timeout() {
        io::ErrorKind::TimedOut
    } else if e.is_connection_refusal() {
        io::ErrorKind::ConnectionRefused
    } else if e.is_connection_dropped() {
        io::ErrorKind::ConnectionAborted
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e.to_string())
}

impl Bridge for RedisBridge {
    fn publisher(&self) -> io::Result<Box<dyn Publisher>> {
        Ok(Box::new(RedisPublisher {
            con: self.connect()?,
        }))
    }

    fn subscriber(
        &self,
        session: &mut dyn FnMut(&mut dyn Subscriber) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut con = self.connect()?;
        let mut sub = RedisSubscriber {
            pubsub: con.as_pubsub(),
            read_timeout: self.timeout,
            timeout: self.timeout,
        };
        let result = session(&mut sub);
        if result.is_err() {
            // Dropping the subscription would unsubscribe everything, and
            // wait for a connection that already failed: close it first.
            let _ = sub.pubsub.set_read_timeout(Some(Duration::from_millis(1)));
        }
        result
    }
}

struct RedisPublisher {
    con: Connection,
}

impl Publisher for RedisPublisher {
    fn publish(&mut self, batch: &[(&str, &[u8])], refused: &mut Vec<usize>) -> io::Result<()> {
        let mut pipe = redis::pipe();
        // One answer per command, errors included: a refused channel
        // (NOPERM) refuses that message only.
        pipe.ignore_errors();
        for (channel, payload) in batch {
            pipe.cmd("PUBLISH").arg(*channel).arg(*payload);
        }
        let answers: Vec<redis::RedisResult<redis::Value>> =
            pipe.query(&mut self.con).map_err(io_error)?;
        // A Redis that is busy or loading will take the batch later: sent
        // again after reconnecting (receivers drop what arrives twice).
        if let Some(e) = answers.iter().find_map(|a| {
            a.as_ref().err().filter(|e| {
                matches!(
                    e.code(),
                    Some("BUSY" | "LOADING" | "TRYAGAIN" | "MASTERDOWN")
                )
            })
        }) {
            return Err(io::Error::other(e.to_string()));
        }
        refused.extend(
            answers
                .iter()
                .enumerate()
                .filter(|(_, a)| a.is_err())
                .map(|(i, _)| i),
        );
        Ok(())
    }
}

struct RedisSubscriber<'a> {
    pubsub: PubSub<'a>,
    /// The read timeout set now.
    read_timeout: Duration,
    /// The one commands get (`RedisBridge::timeout`).
    timeout: Duration,
}

impl RedisSubscriber<'_> {
    fn read_timeout(&mut self, t: Duration) -> io::Result<()> {
        if self.read_timeout != t {
            self.pubsub.set_read_timeout(Some(t)).map_err(io_error)?;
            self.read_timeout = t;
        }
        Ok(())
    }
}

impl Subscriber for RedisSubscriber<'_> {
    fn subscribe(&mut self, channels: &[&str]) -> io::Result<()> {
        self.read_timeout(self.timeout)?;
        self.pubsub.subscribe(channels).map_err(io_error)
    }

    fn unsubscribe(&mut self, channels: &[&str]) -> io::Result<()> {
        self.read_timeout(self.timeout)?;
        self.pubsub.unsubscribe(channels).map_err(io_error)
    }

    fn receive(&mut self, timeout: Duration) -> io::Result<Option<(String, Vec<u8>)>> {
        self.read_timeout(timeout.max(Duration::from_millis(1)))?;
        match self.pubsub.get_message() {
            Ok(msg) => Ok(Some((
                msg.get_channel_name().to_owned(),
                msg.get_payload_bytes().to_vec(),
            ))),
            Err(e) if e.is_timeout() => {
                // Nothing came: make sure the connection is alive, so that
                // a Redis gone silent is noticed.
                self.read_timeout(self.timeout)?;
                self.pubsub.ping::<redis::Value>().map_err(io_error)?;
                Ok(None)
            }
            Err(e) => Err(io_error(e)),
        }
    }
}
