//! One connection's protocol state after the handshake: the close
//! handshake and what to answer to control frames.
//!
//! ```text
//!              peer's Close: echo it
//!   +------+ -------------------------> +---------------+
//!   | Open |                            | CloseReceived |--+
//!   +------+ --+                        +---------------+  |
//!      |       | we send Close                             | our Close
//!      |       v                                           | flushed
//!      |   +-----------+   peer's Close                    v
//!      |   | CloseSent | ----------------------------> +--------+
//!      |   +-----------+                               | Closed |
//!      | protocol error: send Close(1002/1007/1009)    +--------+
//!      +---------------------------> +--------+
//!                                    | Failed |  flushed: half-close, drain
//!                                    +--------+  input until the peer closes
//! ```
//!
//! Once the peer's close has arrived (or the connection failed), input is
//! discarded. The I/O runtime sends what this machine asks for and closes
//! the TCP connection in `Closed`; in `Failed` it stops sending and waits
//! for the peer to close, so that a reset cannot destroy the close frame.

use crate::error::DecodeError;
use crate::message::{CloseCode, CloseFrame, Message};
use crate::proto::assemble::{Decoder, Incoming, Limits};

/// Where the close handshake stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Messages flow both ways.
    Open,
    /// We sent a Close and wait for the peer's.
    CloseSent,
    /// The peer sent a Close; ours answers it.
    CloseReceived,
    /// The peer broke the protocol; our Close says why.
    Failed,
    /// Both Close frames are exchanged.
    Closed,
}

/// What the runtime must do with what arrived.
#[derive(Debug, PartialEq, Eq)]
pub enum Output {
    /// Deliver a message to the user.
    Message(Message),
    /// Send a pong carrying this payload.
    SendPong(Vec<u8>),
    /// The peer answered a ping (it is alive).
    Pong,
    /// The peer closed. Send `reply` if there is one, then close the TCP
    /// connection.
    PeerClosed {
        /// The peer's close frame (`None`: no status code).
        frame: Option<CloseFrame>,
        /// Our answering Close, unless we had sent one already.
        reply: Option<CloseFrame>,
    },
    /// The peer broke the protocol. Send `reply` and close.
    Fail {
        /// What went wrong.
        error: DecodeError,
        /// The Close frame that tells the peer.
        reply: CloseFrame,
    },
}

/// Protocol state of one open connection.
///
/// ```
/// # use enjent::proto::conn::{Connection, Output, State};
/// # use enjent::proto::assemble::Limits;
/// let mut c = Connection::new(Limits::default());
/// // A masked close frame with code 1000 (mask key 0).
/// let mut input: &[u8] = &[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xE8];
/// match c.read(&mut input) {
///     Some(Output::PeerClosed { reply: Some(r), .. }) => assert_eq!(r.code.as_u16(), 1000),
///     other => panic!("{other:?}"),
/// }
/// assert_eq!(c.state(), State::CloseReceived);
/// ```
#[derive(Debug)]
pub struct Connection {
    decoder: Decoder,
    state: State,
}

impl Connection {
    /// A connection that has just completed its handshake.
    pub fn new(limits: Limits) -> Connection {
        Connection {
            decoder: Decoder::new(limits),
            state: State::Open,
        }
    }

    /// Accept compressed messages, as permessage-deflate was negotiated.
    #[cfg(feature = "deflate")]
    pub fn set_inflater(&mut self, inflater: crate::proto::deflate::Inflater) {
        self.decoder.set_inflater(inflater);
    }

    /// The close state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Whether data messages may still be sent.
    pub fn can_send(&self) -> bool {
        self.state == State::Open
    }

    /// Whether the peer may still send frames we care about.
    pub fn wants_input(&self) -> bool {
        matches!(self.state, State::Open | State::CloseSent)
    }

    /// Whether the connection is open and between messages with nothing
    /// held (see [`Decoder::is_at_rest`]): [`Connection::new`] with the
    /// same limits would make an equal one.
    ///
    /// [`Decoder::is_at_rest`]: crate::proto::assemble::Decoder::is_at_rest
    pub fn is_at_rest(&self) -> bool {
        self.state == State::Open && self.decoder.is_at_rest()
    }

    /// Whether the connection is open and the next byte it is fed starts
    /// a frame (see [`Decoder::at_frame_start`]).
    ///
    /// [`Decoder::at_frame_start`]: crate::proto::assemble::Decoder::at_frame_start
    pub fn at_frame_start(&self) -> bool {
        self.state == State::Open && self.decoder.at_frame_start()
    }

    /// Bytes still to come of a control frame begun (see
    /// [`Decoder::control_frame_left`]).
    ///
    /// [`Decoder::control_frame_left`]: crate::proto::assemble::Decoder::control_frame_left
    pub fn control_frame_left(&self) -> Option<usize> {
        self.decoder.control_frame_left()
    }

    /// Bytes held for an unfinished incoming message.
    pub fn buffered(&self) -> usize {
        self.decoder.buffered()
    }

    /// Record that we sent a Close (from [`State::Open`]).
    pub fn close_sent(&mut self) {
        if self.state == State::Open {
            self.state = State::CloseSent;
        }
    }

    /// Record that our answering Close has left: `CloseReceived` becomes
    /// `Closed`. (`Failed` stays: the peer may still be sending, so the
    /// runtime half-closes and drains until it stops.)
    pub fn reply_flushed(&mut self) {
        if self.state == State::CloseReceived {
            self.state = State::Closed;
        }
    }

    /// Consume input until something needs doing or the input is used up
    /// (`None`). Input that arrives once the peer can no longer send is
    /// discarded.
    pub fn read(&mut self, input: &mut &[u8]) -> Option<Output> {
        while self.wants_input() {
            let item = match self.decoder.decode(input) {
                Ok(Some(item)) => item,
                Ok(None) => return None,
                Err(error) => return self.fail(error),
            };
            return Some(match item {
                Incoming::Message(m) => Output::Message(m),
                Incoming::Ping(p) if self.state == State::Open => Output::SendPong(p),
                // Not answered once our Close is sent. RFC 6455 section
                // 5.5.2 asks for a pong until the peer's Close, but common
                // clients take any frame after the Close they received
                // for an error (tungstenite's "received after closing",
                // Chromium's), and skip pings after a close themselves.
                Incoming::Ping(_) => continue,
                Incoming::Pong(_) => Output::Pong,
                Incoming::Close(frame) => {
                    // The peer sends no more: a message it left unfinished
                    // never will be, and its buffers go now.
                    self.decoder.reset();
                    let reply = match self.state {
                        State::CloseSent => {
                            self.state = State::Closed;
                            None
                        }
                        _ => {
                            self.state = State::CloseReceived;
                            Some(match &frame {
                                Some(f) => CloseFrame::new(f.code, ""),
                                None => CloseFrame::new(CloseCode::NORMAL, ""),
                            })
                        }
                    };
                    Output::PeerClosed { frame, reply }
                }
            });
        }
        *input = &[];
        None
    }
}

impl Connection {
    /// Fail the connection from outside the decoder (a server-wide limit):
    /// like a decode error, it drops the unfinished message and asks for a
    /// close frame. `None` if the peer can no longer send anyway.
    pub fn fail(&mut self, error: DecodeError) -> Option<Output> {
        if !self.wants_input() {
            // Nothing more is read: let go of any unfinished message.
            self.decoder.reset();
            return None;
        }
        self.state = State::Failed;
        self.decoder.reset();
        let reply = CloseFrame::new(error.close_code(), fail_reason(error));
        Some(Output::Fail { error, reply })
    }
}

fn fail_reason(e: DecodeError) -> &'static str {
    match e {
        DecodeError::TooLarge { .. } => "message too big",
        DecodeError::Protocol(p) if p.close_code() == CloseCode::INVALID_PAYLOAD => "invalid utf-8",
        // Too many fragments, or compressed streams: over a limit too.
        DecodeError::Protocol(p) if p.close_code() == CloseCode::TOO_BIG => "message too big",
        DecodeError::Protocol(_) => "protocol error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ProtocolError;

    /// A client frame masked with the zero key (payload stays readable).
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        assert!(payload.len() < 126);
        let mut out = vec![first, 0x80 | payload.len() as u8, 0, 0, 0, 0];
        out.extend_from_slice(payload);
        out
    }

    fn read_all(c: &mut Connection, mut input: &[u8]) -> Vec<Output> {
        let mut out = Vec::new();
        while let Some(o) = c.read(&mut input) {
            out.push(o);
        }
        assert!(input.is_empty());
        out
    }

    #[test]
    fn peer_close_is_echoed_and_later_input_discarded() {
        let mut c = Connection::new(Limits::default());
        let mut wire = frame(0x81, b"last words");
        wire.extend(frame(0x88, &[0x03, 0xE9, b'b', b'y', b'e']));
        wire.extend(frame(0x81, b"ignored"));
        wire.extend([0xFF; 9]); // garbage, also ignored
        let out = read_all(&mut c, &wire);
        assert_eq!(
            out,
            vec![
                Output::Message(Message::Text("last words".into())),
                Output::PeerClosed {
                    frame: Some(CloseFrame::new(CloseCode::GOING_AWAY, "bye")),
                    reply: Some(CloseFrame::new(CloseCode::GOING_AWAY, "")),
                },
            ]
        );
        assert_eq!(c.state(), State::CloseReceived);
        assert!(!c.can_send());
        c.reply_flushed();
        assert_eq!(c.state(), State::Closed);
    }

    /// A close in the middle of a fragmented message ends it: the peer
    /// sends no more, so its unfinished message lets go of its buffers
    /// (the server-wide budget counts them until then).
    #[test]
    fn a_close_mid_message_releases_the_unfinished_message() {
        let mut c = Connection::new(Limits::default());
        let out = read_all(&mut c, &frame(0x01, &[b'x'; 100]));
        assert!(out.is_empty());
        assert_eq!(c.buffered(), 100);
        let out = read_all(&mut c, &frame(0x88, &[0x03, 0xE8]));
        assert!(matches!(out[..], [Output::PeerClosed { .. }]), "{out:?}");
        assert_eq!(c.buffered(), 0);
    }

    #[test]
    fn empty_close_is_answered_with_1000() {
        let mut c = Connection::new(Limits::default());
        let out = read_all(&mut c, &frame(0x88, b""));
        assert_eq!(
            out,
            vec![Output::PeerClosed {
                frame: None,
                reply: Some(CloseFrame::new(CloseCode::NORMAL, "")),
            }]
        );
    }

    #[test]
    fn server_initiated_close_waits_for_the_answer() {
        let mut c = Connection::new(Limits::default());
        c.close_sent();
        assert_eq!(c.state(), State::CloseSent);
        // Messages still arrive; pings are not answered after our Close
        // (common clients take a frame after a Close for an error).
        let mut wire = frame(0x82, &[1, 2]);
        wire.extend(frame(0x89, b"p"));
        wire.extend(frame(0x88, &[0x03, 0xE8]));
        wire.extend(frame(0x89, b"late"));
        let out = read_all(&mut c, &wire);
        assert_eq!(
            out,
            vec![
                Output::Message(Message::Binary(vec![1, 2])),
                Output::PeerClosed {
                    frame: Some(CloseFrame::new(CloseCode::NORMAL, "")),
                    reply: None,
                },
            ]
        );
        assert_eq!(c.state(), State::Closed);
    }

    #[test]
    fn a_close_for_a_limit_says_so_whatever_the_error() {
        let mut c = Connection::new(Limits {
            max_fragments: 2,
            ..Limits::default()
        });
        let mut wire = frame(0x01, b"a");
        wire.extend(frame(0x00, b"b"));
        wire.extend(frame(0x00, b"c"));
        let out = read_all(&mut c, &wire);
        assert!(
            matches!(
                out.as_slice(),
                [Output::Fail { reply, .. }]
                    if reply.code == CloseCode::TOO_BIG && reply.reason == "message too big"
            ),
            "{out:?}"
        );
    }

    #[test]
    fn ping_gets_pong_payload() {
        let mut c = Connection::new(Limits::default());
        assert_eq!(
            read_all(&mut c, &frame(0x89, b"abc")),
            vec![Output::SendPong(b"abc".to_vec())]
        );
        assert_eq!(read_all(&mut c, &frame(0x8A, b"abc")), vec![Output::Pong]);
    }

    #[test]
    fn failures_pick_their_close_code() {
        let cases: [(Vec<u8>, u16); 4] = [
            (frame(0xC1, b"x"), 1002),
            (frame(0x81, &[0xFF]), 1007),
            (frame(0x88, &[0x03]), 1002),
            (
                vec![0x82, 0xFF, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0, 0],
                1009,
            ),
        ];
        for (wire, code) in cases {
            let mut c = Connection::new(Limits::default());
            let out = read_all(&mut c, &wire);
            match &out[..] {
                [Output::Fail { reply, .. }] => assert_eq!(reply.code.as_u16(), code),
                other => panic!("{other:?}"),
            }
            assert_eq!(c.state(), State::Failed);
            c.reply_flushed();
            assert_eq!(
                c.state(),
                State::Failed,
                "a failed connection drains, it does not close"
            );
        }
        let mut c = Connection::new(Limits::default());
        match &read_all(&mut c, &frame(0x83, b""))[..] {
            [Output::Fail { error, .. }] => {
                assert_eq!(
                    *error,
                    DecodeError::Protocol(ProtocolError::ReservedOpcode(3))
                )
            }
            other => panic!("{other:?}"),
        }
    }
}
