//! What happens to clients, as events for a main loop or closures.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use crate::bridge::BridgeEvent;
use crate::client::Client;
use crate::error::Error;
use crate::message::{CloseFrame, Message};
use crate::runtime::Shared;
use crate::runtime::events::{Batch, Envelope};

/// Something that happened to a client, in order: `Connect`, its messages,
/// then `Disconnect`. The order holds within one event style: when some
/// kinds go to closures and others to the channel, a closure may run
/// before that client's earlier events are read from the channel.
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
    /// A client's send queue is down to low water again after a `send`
    /// was refused with [`Error::Backpressure`] or
    /// [`Error::ServerBackpressure`]: producers can resume.
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
        /// (1002, 1007, 1009, 1011), closed it for idleness (1001) or under
        /// the `Close` slow-client policy (1008);
        /// otherwise 1006, the connection dropped without a close frame
        /// (as when the peer, instead of answering a close of ours, broke
        /// the protocol: `error` says how).
        close: CloseFrame,
        /// What went wrong, if anything did: a protocol violation, an I/O
        /// error, a timeout.
        error: Option<Error>,
    },
    /// Something went wrong that no other event reports: a closure of
    /// yours panicked ([`Error::HandlerPanicked`]), or the server recovered
    /// from a failure of its own ([`Error::Internal`], [`Error::Io`]). The
    /// library writes nothing to stderr; this (or
    /// [`on_error`](crate::Builder::on_error)) is where such things go. In
    /// the closure style (an `on_message` closure) this event, like every
    /// kind without a closure, is not queued: register `on_error` there;
    /// `stats()` counts the errors either way.
    Error {
        /// The client concerned, if there is one.
        client: Option<Client<T>>,
        /// What happened.
        error: Error,
    },
    /// The bridge to other servers went up or down, or missed messages
    /// (see [`Builder::bridge`](crate::Builder::bridge)). In the closure
    /// style, register [`on_bridge`](crate::Builder::on_bridge) instead.
    Bridge(BridgeEvent),
}

impl<T> Event<T> {
    /// The client this event is about (`None` only for an
    /// [`Error`](Event::Error) that concerns no client).
    pub fn client(&self) -> Option<&Client<T>> {
        match self {
            Event::Connect { client }
            | Event::Message { client, .. }
            | Event::Drain { client }
            | Event::Disconnect { client, .. } => Some(client),
            Event::Error { client, .. } => client.as_ref(),
            Event::Bridge(_) => None,
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
            Event::Error { client, error } => f
                .debug_struct("Error")
                .field("client", client)
                .field("error", error)
                .finish(),
            Event::Bridge(event) => f.debug_tuple("Bridge").field(event).finish(),
        }
    }
}

/// The event stream of a server in the main-loop style, from
/// [`WebSocketServer::events`](crate::WebSocketServer::events):
/// `for event in server.events() { ... }`.
///
/// It is bounded in bytes
/// ([`event_queue_bytes`](crate::Builder::event_queue_bytes)), and each
/// message counts against its client's flow control until the loop asks
/// for the next event, so that the reply to it is sent first (and a
/// client's Close is answered after it): a main loop that falls behind
/// makes the server stop reading sockets, never grow. Messages of one
/// client that one read gave come one after another (64 at most; another
/// client's events may come between such runs), and count together until
/// the loop asks for the event after the last of them, or until those
/// already handled hold 4 KiB or a 64th of `event_queue_bytes`, whichever
/// is less. A loop that stops asking (it breaks out while the server runs
/// on) holds its last message's charge (and those of the messages read
/// with it and taken before it, within that bound): that client's Close
/// is answered at `close_timeout`.
///
/// It ends once the server has shut down and every event sent before
/// was received.
pub struct Events<T = ()> {
    rx: mpsc::Receiver<Batch<T>>,
    /// The rest of a batch received, handed out before the channel's next.
    batched: RefCell<std::vec::IntoIter<Envelope<T>>>,
    shared: Arc<Shared<T>>,
    /// The event handed out last, whose charge is given back at the next
    /// receive; with a batch's messages, those of the batch handed out
    /// before it too (see [`Events::release`]).
    held: Cell<Option<(Option<Client<T>>, usize)>>,
    /// The most a batch's messages hold together (see `release`).
    held_together: usize,
}

/// The most the messages of a batch handed out hold together before their
/// charges are given back, if that is less than a 64th of
/// `event_queue_bytes`.
const HELD_TOGETHER: usize = 4096;

impl<T: Send + Sync + 'static> Events<T> {
    pub(crate) fn new(rx: mpsc::Receiver<Batch<T>>, shared: Arc<Shared<T>>) -> Events<T> {
        Events {
            rx,
            batched: RefCell::new(Vec::new().into_iter()),
            held: Cell::new(None),
            held_together: HELD_TOGETHER.min(shared.config.event_queue_bytes / 64),
            shared,
        }
    }

    /// Give back the charge held, before an event is taken: unless the
    /// next one is of the same batch (the messages one read of one client
    /// gave, see `events::Staged`) and what is held is under
    /// [`HELD_TOGETHER`] and a 64th of the budget. The batch's charges are
    /// then given back together, with one lock of the connection and one
    /// write of the budget's count (a line the workers write) where each
    /// message took its own: in a profile of the main loop's 32 B echo,
    /// taking events fell from 7.0% to 3.6% of the server's CPU. The bound
    /// keeps a large read's messages from crowding the budget while the
    /// loop works through them.
    fn release(&self) {
        let held = self.held.take();
        if let Some((_, charge)) = &held
            && *charge < self.held_together
            && self.batched.borrow().len() > 0
        {
            self.held.set(held);
            return;
        }
        if let Some((client, charge)) = held {
            self.shared
                .events
                .consumed(&self.shared, client.as_ref(), charge);
        }
    }

    /// The rest of the last batch first. Its list is let go of with its
    /// last event, whose charge counts it (`events::batch_extra`).
    fn batched(&self) -> Option<Event<T>> {
        let mut batched = self.batched.borrow_mut();
        let next = batched.next();
        let last = batched.len() == 0;
        if last {
            *batched = Vec::new().into_iter();
        }
        drop(batched);
        next.map(|e| self.hold(e, last))
    }

    fn unpack(&self, batch: Batch<T>) -> Event<T> {
        match batch {
            Batch::One(e) => self.hold(e, true),
            Batch::Many(v) => {
                *self.batched.borrow_mut() = v.into_iter();
                self.batched().expect("a batch is never empty")
            }
        }
    }

    /// Hand out `envelope`'s event, `last` of the messages its read gave
    /// (or the read's only event).
    fn hold(&self, envelope: Envelope<T>, last: bool) -> Event<T> {
        // The first reply to the last message of a read, sent to an idle
        // client, goes out at once (see `conn::answering`); any other
        // event clears the note.
        crate::runtime::conn::answering(match &envelope.event {
            Event::Message { client, .. } if last => client.conn_addr(),
            _ => 0,
        });
        // Held still: the batch's messages before this one, of the same
        // client.
        if let Some((client, charge)) = self.held.take() {
            debug_assert!(matches!(
                (&client, &envelope.event),
                (Some(held), Event::Message { client, .. }) if held.id() == client.id()
            ));
            self.held.set(Some((client, charge + envelope.charge)));
            return envelope.event;
        }
        // Only a message's charge is on its client (see `EventQueue::push`).
        let client = match &envelope.event {
            Event::Message { client, .. } => Some(client.clone()),
            _ => None,
        };
        self.held.set(Some((client, envelope.charge)));
        envelope.event
    }

    /// Wait for the next event.
    ///
    /// # Errors
    ///
    /// [`mpsc::RecvError`] once the server has shut down and every event
    /// was received.
    pub fn recv(&self) -> Result<Event<T>, mpsc::RecvError> {
        self.release();
        if let Some(e) = self.batched() {
            return Ok(e);
        }
        self.rx.recv().map(|b| self.unpack(b))
    }

    /// The next event if one is waiting.
    ///
    /// # Errors
    ///
    /// As [`mpsc::Receiver::try_recv`].
    pub fn try_recv(&self) -> Result<Event<T>, mpsc::TryRecvError> {
        self.release();
        if let Some(e) = self.batched() {
            return Ok(e);
        }
        self.rx.try_recv().map(|b| self.unpack(b))
    }

    /// Wait at most `timeout` for the next event.
    ///
    /// # Errors
    ///
    /// As [`mpsc::Receiver::recv_timeout`].
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Event<T>, mpsc::RecvTimeoutError> {
        self.release();
        if let Some(e) = self.batched() {
            return Ok(e);
        }
        self.rx.recv_timeout(timeout).map(|b| self.unpack(b))
    }

    /// Iterate, waiting for each event, until the server shuts down.
    pub fn iter(&self) -> EventIter<'_, T> {
        EventIter { events: self }
    }

    /// Iterate over the events waiting now, without waiting.
    pub fn try_iter(&self) -> EventTryIter<'_, T> {
        EventTryIter { events: self }
    }
}

impl<T> fmt::Debug for Events<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

/// Iterator over [`Events`], waiting for each.
#[derive(Debug)]
pub struct EventIter<'a, T> {
    events: &'a Events<T>,
}

impl<T: Send + Sync + 'static> Iterator for EventIter<'_, T> {
    type Item = Event<T>;
    fn next(&mut self) -> Option<Event<T>> {
        self.events.recv().ok()
    }
}

/// Iterator over the [`Events`] waiting now.
#[derive(Debug)]
pub struct EventTryIter<'a, T> {
    events: &'a Events<T>,
}

impl<T: Send + Sync + 'static> Iterator for EventTryIter<'_, T> {
    type Item = Event<T>;
    fn next(&mut self) -> Option<Event<T>> {
        self.events.try_recv().ok()
    }
}

impl<'a, T: Send + Sync + 'static> IntoIterator for &'a Events<T> {
    type Item = Event<T>;
    type IntoIter = EventIter<'a, T>;
    fn into_iter(self) -> EventIter<'a, T> {
        self.iter()
    }
}
