//! The [`Bridge`] over Redis Pub/Sub, with the `redis` crate's synchronous
//! client: one connection publishes (a pipeline per batch), one subscribes.

use std::collections::VecDeque;
use std::io;
use std::mem::ManuallyDrop;
use std::time::{Duration, Instant};

use redis::{Client, Connection, Msg, RedisError, ServerErrorKind, Value};

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
    /// the connection counts as failed (default 2 s). A batch of publishes
    /// counts as one command: once it is written, its answers, together,
    /// must come within the timeout (checked between answers, so that one
    /// may overrun it by at most as much again). The receiving connection is also checked with
    /// a `PING` whenever a second (less while it waits for something) goes
    /// by with nothing received.
    pub fn timeout(mut self, timeout: Duration) -> RedisBridge {
        self.timeout = timeout.max(Duration::from_millis(1));
        self
    }

    fn connect(&self) -> io::Result<Link> {
        let con = self
            .client
            .get_connection_with_timeout(self.timeout)
            .map_err(io_error)?;
        con.set_write_timeout(Some(self.timeout))
            .map_err(io_error)?;
        con.set_read_timeout(Some(self.timeout)).map_err(io_error)?;
        Ok(Link {
            con,
            read_timeout: self.timeout,
        })
    }
}

/// A connection, with the read timeout set on it now (changed only when
/// it differs: each change is a system call).
struct Link {
    con: Connection,
    read_timeout: Duration,
}

impl Link {
    fn read_timeout(&mut self, t: Duration) -> io::Result<()> {
        if self.read_timeout != t {
            self.con.set_read_timeout(Some(t)).map_err(io_error)?;
            self.read_timeout = t;
        }
        Ok(())
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
            link: self.connect()?,
            timeout: self.timeout,
        }))
    }

    fn subscriber(
        &self,
        session: &mut dyn FnMut(&mut dyn Subscriber) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut sub = RedisSubscriber {
            link: self.connect()?,
            timeout: self.timeout,
            waiting: VecDeque::new(),
            refused: Vec::new(),
        };
        // The connection is dropped (closed) as it is, subscribed or not:
        // nothing waits for an unsubscribe.
        session(&mut sub)
    }
}

struct RedisPublisher {
    link: Link,
    /// `RedisBridge::timeout`: what a batch's answers may take in all.
    timeout: Duration,
}

impl Publisher for RedisPublisher {
    fn publish(&mut self, batch: &[(&str, &[u8])], refused: &mut Vec<usize>) -> io::Result<()> {
        let mut pipe = redis::pipe();
        for (channel, payload) in batch {
            pipe.cmd("PUBLISH").arg(*channel).arg(*payload);
        }
        self.link.read_timeout(self.timeout)?;
        self.link
            .con
            .send_packed_command(&pipe.get_packed_pipeline())
            .map_err(io_error)?;
        // The answers are read here, not by the library's pipeline, which
        // reads on after an answer that timed out, each read waiting the
        // whole timeout again: a Redis gone silent held a batch of 512 for
        // 512 timeouts. Here the whole batch has one deadline, and the first
        // failed read ends it (the connection is dropped then). The socket's
        // timeout is lowered as the deadline nears, halving, so that it
        // costs a few calls at most: a batch ends within twice the timeout.
        let deadline = Instant::now() + self.timeout;
        let mut answered = 0;
        while answered < batch.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "Redis answered {answered} of a batch of {} within {:?}",
                        batch.len(),
                        self.timeout
                    ),
                ));
            }
            if left < self.link.read_timeout / 2 {
                self.link.read_timeout(left)?;
            }
            match self.link.con.recv_response().map_err(io_error)? {
                // Pushed data between answers (RESP3): not an answer.
                Value::Push { .. } => continue,
                Value::ServerError(e) => {
                    // A Redis that is busy or loading will take the batch
                    // later: sent again after reconnecting (receivers drop
                    // what arrives twice).
                    if matches!(e.code(), "BUSY" | "LOADING" | "TRYAGAIN" | "MASTERDOWN") {
                        return Err(io::Error::other(format!("Redis answered {e}")));
                    }
                    // A refused channel (NOPERM, say) refuses that message
                    // only.
                    refused.push(answered);
                }
                _ => {}
            }
            answered += 1;
        }
        Ok(())
    }
}

/// The receiving connection, spoken to directly rather than through the
/// client library's `PubSub`, which returns from a `SUBSCRIBE` at its
/// first answer and takes an error answer (a channel the Redis user may
/// not use, which refuses the whole command) for a success.
struct RedisSubscriber {
    link: Link,
    /// The one commands get (`RedisBridge::timeout`).
    timeout: Duration,
    /// Messages read while waiting for a command's answers.
    waiting: VecDeque<(String, Vec<u8>)>,
    /// Channels refused since `take_refused` was last called.
    refused: Vec<String>,
}

/// One thing read from a subscribed connection.
enum Read {
    Message(String, Vec<u8>),
    /// A `NOPERM` answer: the whole command was refused.
    Refused,
    /// Any other answer: a `subscribe`, `unsubscribe` or `pong`.
    Answer,
}

impl RedisSubscriber {
    /// Read a command's next answer, or a message that came before it.
    /// (`recv_response` reads as for an answer: after a timeout it skips
    /// the next thing read, which ends the session anyway.)
    fn read(&mut self) -> io::Result<Read> {
        let value = self.link.con.recv_response().map_err(io_error)?;
        if let Value::ServerError(e) = value {
            if e.kind() == Some(ServerErrorKind::NoPerm) {
                return Ok(Read::Refused);
            }
            // Busy, say: try again on a new connection.
            return Err(io::Error::other(format!("Redis answered {e}")));
        }
        Ok(match Msg::from_owned_value(value) {
            Some(msg) => Read::Message(
                msg.get_channel_name().to_owned(),
                msg.get_payload_bytes().to_vec(),
            ),
            None => Read::Answer,
        })
    }

    /// Send `command` with `args` and read its `answers` answers (one per
    /// channel, or one for a `PING`), keeping the messages that come
    /// meanwhile. False if it was refused (one error answer).
    fn command(&mut self, command: &str, args: &[&str], answers: usize) -> io::Result<bool> {
        self.link.read_timeout(self.timeout)?;
        let packed = redis::cmd(command).arg(args).get_packed_command();
        self.link
            .con
            .send_packed_command(&packed)
            .map_err(io_error)?;
        let mut left = answers;
        while left > 0 {
            match self.read()? {
                Read::Message(channel, payload) => self.waiting.push_back((channel, payload)),
                Read::Refused => return Ok(false),
                Read::Answer => left -= 1,
            }
        }
        Ok(true)
    }
}

impl Subscriber for RedisSubscriber {
    fn subscribe(&mut self, channels: &[&str]) -> io::Result<()> {
        if channels.is_empty() || self.command("SUBSCRIBE", channels, channels.len())? {
            return Ok(());
        }
        // One channel the user may not use refuses them all: find which,
        // so that the others are subscribed.
        for &channel in channels {
            if !self.command("SUBSCRIBE", &[channel], 1)? {
                self.refused.push(channel.to_owned());
            }
        }
        Ok(())
    }

    fn unsubscribe(&mut self, channels: &[&str]) -> io::Result<()> {
        if !channels.is_empty() {
            // Answered once per channel, subscribed or not.
            self.command("UNSUBSCRIBE", channels, channels.len())?;
        }
        Ok(())
    }

    fn take_refused(&mut self) -> Vec<String> {
        std::mem::take(&mut self.refused)
    }

    fn receive(&mut self, timeout: Duration) -> io::Result<Option<(String, Vec<u8>)>> {
        if let Some(message) = self.waiting.pop_front() {
            return Ok(Some(message));
        }
        self.link
            .read_timeout(timeout.max(Duration::from_millis(1)))?;
        // Read as the library reads messages, not answers: a timeout then
        // leaves the next thing read alone (`recv_response` would skip it,
        // taking it for the late answer to a command). Kept from dropping:
        // a `PubSub` unsubscribes everything when dropped. It holds
        // nothing (its queue is filled only by its own commands).
        let read = ManuallyDrop::new(self.link.con.as_pubsub()).get_message();
        match read {
            Ok(msg) => Ok(Some((
                msg.get_channel_name().to_owned(),
                msg.get_payload_bytes().to_vec(),
            ))),
            Err(e) if e.is_timeout() => {
                // Nothing came: make sure the connection is alive, so that
                // a Redis gone silent is noticed.
                self.command("PING", &[], 1)?;
                Ok(self.waiting.pop_front())
            }
            Err(e) => Err(io_error(e)),
        }
    }
}
