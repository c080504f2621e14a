//! What happens to clients, as events for a main loop or closures.

use std::fmt;

use crate::client::Client;
use crate::error::Error;
use crate::message::{CloseFrame, Message};

/// Something that happened to a client, in order: `Connect`, its messages,
/// then `Disconnect`.
///
/// Received from [`WebSocketServer::events`](crate::WebSocketServer::events)
/// unless a closure was registered for that kind of event.
#[non_exhaustive]
pub enum Event<T = ()> {
    /// A client completed its handshake.
    Connect {
        /// The new client.
        client: Client<T>,
    },
    /// A client sent a message.
    Message {
        /// Who sent it.
        client: Client<T>,
        /// What it sent.
        message: Message,
    },
    /// A client's send queue is empty again after a `send` was refused
    /// with [`Error::Backpressure`]: producers can resume.
    Drain {
        /// The client that caught up.
        client: Client<T>,
    },
    /// A client is gone.
    Disconnect {
        /// Who left. Sending to it fails with [`Error::Closed`].
        client: Client<T>,
        /// How the connection ended (RFC 6455 section 7.1.5): the peer's
        /// close frame if one arrived, whoever closed first (code 1005 if
        /// it carried none); ours if the server failed the connection
        /// (1002, 1007, 1009, 1011) or closed it for idleness (1001);
        /// otherwise 1006, the connection dropped without a close frame.
        close: CloseFrame,
        /// What went wrong, if anything did: a protocol violation, an I/O
        /// error, a timeout.
        error: Option<Error>,
    },
}

impl<T> Event<T> {
    /// The client this event is about.
    pub fn client(&self) -> &Client<T> {
        match self {
            Event::Connect { client }
            | Event::Message { client, .. }
            | Event::Drain { client }
            | Event::Disconnect { client, .. } => client,
        }
    }
}

impl<T> fmt::Debug for Event<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Connect { client } => f.debug_struct("Connect").field("client", client).finish(),
            Event::Message { client, message } => f
                .debug_struct("Message")
                .field("client", client)
                .field("message", message)
                .finish(),
            Event::Drain { client } => f.debug_struct("Drain").field("client", client).finish(),
            Event::Disconnect {
                client,
                close,
                error,
            } => f
                .debug_struct("Disconnect")
                .field("client", client)
                .field("close", close)
                .field("error", error)
                .finish(),
        }
    }
}
