//! The one error type of the crate.

use std::fmt;
use std::io;

use crate::message::CloseCode;

/// A `Result` whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in enjent.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The listening socket could not be bound (the seed's
    /// `WebSocketServerException`).
    Bind {
        /// The address that was asked for.
        addr: String,
        /// What the operating system said.
        source: io::Error,
    },
    /// A socket operation failed.
    Io(io::Error),
    /// The peer broke RFC 6455; the connection was closed with
    /// [`ProtocolError::close_code`].
    Protocol(ProtocolError),
    /// A message or frame exceeded a configured limit (close code 1009).
    /// For a client closed because partial input over all clients passed
    /// `max_buffered_bytes`, `size` is that total and `limit` the budget.
    MessageTooLarge {
        /// The size that was announced or reached, in bytes.
        size: u64,
        /// The configured limit, in bytes.
        limit: u64,
    },
    /// The client's outgoing queue is over `max_backpressure`; the message
    /// (or the user's ping) was not queued.
    Backpressure {
        /// What is already queued for the client, this message not
        /// counted (with it, over the limit): its bytes, and 64 B for each
        /// piece waiting (a frame is one or two), as flow control counts
        /// memory.
        queued: usize,
        /// The configured limit, in bytes.
        limit: usize,
    },
    /// Everything queued to clients together is over `max_queued_bytes`,
    /// and this client's queue, with the message, would hold more than its
    /// share of it (the budget divided among the open connections; a queue
    /// holding no more than `low_water` is never refused); the message was
    /// not queued. As with
    /// [`Error::Backpressure`], a [`Drain`](crate::Event::Drain) comes
    /// once this client's queue is down to low water (none under
    /// [`SlowClientPolicy::Close`](crate::SlowClientPolicy::Close), which
    /// closes the client instead).
    ServerBackpressure {
        /// What is already queued for this client, counted as
        /// [`Error::Backpressure`] counts it.
        queued: usize,
        /// What the budget counted, all clients together.
        total: usize,
        /// The budget, `max_queued_bytes`.
        limit: usize,
    },
    /// The client (or the server) is closed or closing; nothing more can be
    /// sent.
    Closed,
    /// An argument was refused, such as a close code that may not be sent.
    InvalidInput(&'static str),
    /// The builder was given a configuration that cannot work.
    InvalidConfig(&'static str),
    /// A topic limit was reached (`max_topic_len`, `max_topics_per_client`
    /// or `max_topics`); the subscription was not made.
    TopicLimit(&'static str),
    /// A closure of yours (`on_connect`, `on_message`, ...) or the
    /// client-init strategy panicked. The panic was caught: the client it
    /// was handling is closed with 1011 (a strategy's is answered `500`),
    /// and the server goes on.
    HandlerPanicked {
        /// Which one: `"on_connect"`, `"on_message"`, `"on_drain"`,
        /// `"on_disconnect"`, `"on_http"`, `"on_bridge"` or
        /// `"client-init strategy"`.
        handler: &'static str,
        /// The panic's message, when it carried a string.
        message: String,
    },
    /// The server itself failed in a way it recovered from: a bug in
    /// enjent that panicked in one connection's job, which was closed, or
    /// in the readiness loop or the accept thread, which went on (a panic
    /// in either of those two is reported at most once every ten
    /// seconds).
    /// (A failed system call it recovered from, such as the readiness
    /// loop's wait or `accept` out of file descriptors, is [`Error::Io`].)
    Internal(String),
}

/// A message that `send` did not take, handed back with the reason, so
/// that a retry (after [`Event::Drain`](crate::Event::Drain), say) needs no
/// clone.
///
/// It converts into [`Error`], so `?` works in functions returning
/// [`Result`].
pub struct SendError {
    error: Error,
    message: crate::message::Message,
}

impl SendError {
    pub(crate) fn new(error: Error, message: crate::message::Message) -> SendError {
        SendError { error, message }
    }

    /// Why the message was not taken: [`Error::Backpressure`],
    /// [`Error::ServerBackpressure`] or [`Error::Closed`].
    pub fn error(&self) -> &Error {
        &self.error
    }

    /// The message, to send again later or elsewhere. Empty when the
    /// connection failed (`Error::Closed`) once the frame was queued
    /// behind others or partly written: its bytes went with the queue, and
    /// whether some reached the client cannot be told. With compression,
    /// the whole message comes back in that case too, though part of its
    /// frame may have gone out.
    pub fn into_message(self) -> crate::message::Message {
        self.message
    }

    /// The reason, giving up the message.
    pub fn into_error(self) -> Error {
        self.error
    }

    /// Both halves.
    pub fn into_parts(self) -> (Error, crate::message::Message) {
        (self.error, self.message)
    }
}

impl fmt::Debug for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendError")
            .field("error", &self.error)
            .field("message_len", &self.message.len())
            .finish()
    }
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "message not sent: {}", self.error)
    }
}

impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl From<SendError> for Error {
    fn from(e: SendError) -> Error {
        e.error
    }
}

impl Error {
    /// Whether a send (or a ping) was refused for a queue that is too
    /// full ([`Error::Backpressure`] or [`Error::ServerBackpressure`]):
    /// the message was handed back, and a [`Drain`](crate::Event::Drain)
    /// says when to try again (under
    /// [`SlowClientPolicy::Close`](crate::SlowClientPolicy::Close) the
    /// client is closed instead, and none comes).
    pub fn is_backpressure(&self) -> bool {
        matches!(
            self,
            Error::Backpressure { .. } | Error::ServerBackpressure { .. }
        )
    }

    /// The close code this error sends to the peer, if it ends a connection.
    pub fn close_code(&self) -> Option<CloseCode> {
        match self {
            Error::Protocol(e) => Some(e.close_code()),
            Error::MessageTooLarge { .. } => Some(CloseCode::TOO_BIG),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Bind { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            Error::Io(e) => write!(f, "i/o error: {e}"),
            Error::Protocol(e) => write!(f, "protocol error: {e}"),
            Error::MessageTooLarge { size, limit } => {
                write!(f, "message of {size} bytes is over the limit of {limit}")
            }
            Error::Backpressure { queued, limit } => {
                write!(
                    f,
                    "{queued} bytes already queued (64 B a queued piece counted for its place); with this message, over the limit of {limit}"
                )
            }
            Error::ServerBackpressure {
                queued,
                total,
                limit,
            } => {
                write!(
                    f,
                    "{queued} bytes already queued to this client, and {total} to all clients, over the server's budget of {limit}"
                )
            }
            Error::Closed => f.write_str("connection closed"),
            Error::InvalidInput(what) => write!(f, "invalid input: {what}"),
            Error::InvalidConfig(what) => write!(f, "invalid configuration: {what}"),
            Error::HandlerPanicked { handler, message } => {
                write!(f, "{handler} panicked: {message}")
            }
            Error::Internal(what) => write!(f, "internal error: {what}"),
            Error::TopicLimit(what) => write!(f, "topic limit: {what}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Bind { source, .. } => Some(source),
            Error::Io(e) => Some(e),
            Error::Protocol(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

impl From<ProtocolError> for Error {
    fn from(e: ProtocolError) -> Self {
        Error::Protocol(e)
    }
}

/// How a peer broke RFC 6455.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A reserved bit (RSV1-3) was set with no extension negotiated.
    ReservedBits,
    /// The opcode is reserved (3-7 or 11-15).
    ReservedOpcode(u8),
    /// A client frame was not masked.
    UnmaskedFrame,
    /// A control frame carried more than 125 bytes.
    ControlFrameTooLong,
    /// A control frame had FIN clear.
    FragmentedControlFrame,
    /// A continuation frame arrived with no message in progress.
    UnexpectedContinuation,
    /// A new data frame arrived while a fragmented message was unfinished.
    ExpectedContinuation,
    /// The 64-bit length had its most significant bit set.
    InvalidLength,
    /// A text message or close reason was not valid UTF-8 (close code 1007).
    InvalidUtf8,
    /// A close frame had a one-byte payload.
    InvalidClosePayload,
    /// A close frame carried a code that may not be sent.
    InvalidCloseCode(u16),
    /// Data arrived after the peer's close frame.
    DataAfterClose,
    /// A message had more fragments than allowed.
    TooManyFragments,
    /// A message marked compressed (permessage-deflate) did not inflate.
    BadCompression,
    /// RSV1 (the compression bit) was set on a control or continuation
    /// frame.
    CompressedControlOrContinuation,
    /// A compressed message ended and restarted its deflate stream more
    /// often than its size allows (final blocks of two bytes each, which
    /// cost the inflater work out of proportion to them; close code 1009).
    TooManyDeflateStreams,
}

impl ProtocolError {
    /// The close code that answers this error: 1007 for bad UTF-8, 1009
    /// for too many fragments or deflate streams, 1002 for the rest.
    pub fn close_code(self) -> CloseCode {
        match self {
            ProtocolError::InvalidUtf8 => CloseCode::INVALID_PAYLOAD,
            ProtocolError::TooManyFragments | ProtocolError::TooManyDeflateStreams => {
                CloseCode::TOO_BIG
            }
            _ => CloseCode::PROTOCOL_ERROR,
        }
    }

    fn message(self) -> &'static str {
        match self {
            ProtocolError::ReservedBits => "reserved bits set",
            ProtocolError::ReservedOpcode(_) => "reserved opcode",
            ProtocolError::UnmaskedFrame => "client frame not masked",
            ProtocolError::ControlFrameTooLong => "control frame longer than 125 bytes",
            ProtocolError::FragmentedControlFrame => "fragmented control frame",
            ProtocolError::UnexpectedContinuation => "continuation frame with no message started",
            ProtocolError::ExpectedContinuation => "new message before the last one ended",
            ProtocolError::InvalidLength => "frame length has its top bit set",
            ProtocolError::InvalidUtf8 => "invalid utf-8",
            ProtocolError::InvalidClosePayload => "close frame with a one-byte payload",
            ProtocolError::InvalidCloseCode(_) => "invalid close code",
            ProtocolError::DataAfterClose => "data after close frame",
            ProtocolError::TooManyFragments => "too many fragments in one message",
            ProtocolError::BadCompression => "compressed message does not inflate",
            ProtocolError::CompressedControlOrContinuation => {
                "compression bit on a control or continuation frame"
            }
            ProtocolError::TooManyDeflateStreams => "too many deflate streams in one message",
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::ReservedOpcode(op) => write!(f, "reserved opcode {op}"),
            ProtocolError::InvalidCloseCode(c) => write!(f, "invalid close code {c}"),
            e => f.write_str(e.message()),
        }
    }
}

impl std::error::Error for ProtocolError {}

/// Why the decoder in [`proto`](crate::proto) refused a peer's bytes: a
/// protocol rule, or a size limit. It becomes [`Error`] at the surface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes broke RFC 6455.
    Protocol(ProtocolError),
    /// A frame or message was over its limit.
    TooLarge {
        /// The size announced or reached, in bytes.
        size: u64,
        /// The limit, in bytes.
        limit: u64,
    },
}

impl DecodeError {
    /// The close code that answers it (1002, 1007 or 1009).
    pub fn close_code(self) -> CloseCode {
        match self {
            DecodeError::Protocol(p) => p.close_code(),
            DecodeError::TooLarge { .. } => CloseCode::TOO_BIG,
        }
    }
}

impl From<ProtocolError> for DecodeError {
    fn from(e: ProtocolError) -> Self {
        DecodeError::Protocol(e)
    }
}

impl From<DecodeError> for Error {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::Protocol(p) => Error::Protocol(p),
            DecodeError::TooLarge { size, limit } => Error::MessageTooLarge { size, limit },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_stays_small() {
        // Errors travel in every Result of the hot path; keep them two words
        // plus a tag at most.
        assert!(
            std::mem::size_of::<Error>() <= 40,
            "{}",
            std::mem::size_of::<Error>()
        );
    }

    #[test]
    fn close_codes_follow_rfc() {
        assert_eq!(
            ProtocolError::InvalidUtf8.close_code(),
            CloseCode::INVALID_PAYLOAD
        );
        assert_eq!(
            ProtocolError::ReservedBits.close_code(),
            CloseCode::PROTOCOL_ERROR
        );
        let e = Error::MessageTooLarge { size: 10, limit: 5 };
        assert_eq!(e.close_code(), Some(CloseCode::TOO_BIG));
        assert_eq!(e.to_string(), "message of 10 bytes is over the limit of 5");
    }
}
