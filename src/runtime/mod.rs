//! Every socket, thread and lock lives here. The protocol itself is in
//! `proto`.

pub(crate) mod acceptor;
pub(crate) mod conn;
pub(crate) mod poller;
pub(crate) mod registry;
pub(crate) mod timer;
pub(crate) mod worker;

use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::mpsc;
use std::time::Instant;

use parking_lot::{Mutex, RwLock};
use polling::Poller;
use threadpool::ThreadPool;

use crate::client::Client;
use crate::config::Config;
use crate::error::Error;
use crate::event::Event;
use crate::message::{CloseCode, CloseFrame, Message};
use crate::proto::assemble::Limits;
use crate::proto::handshake::{Reject, Request};

pub(crate) type InitFn<T> = dyn Fn(&Request) -> Result<T, Reject> + Send + Sync;
pub(crate) type ConnectFn<T> = dyn Fn(&Client<T>) + Send + Sync;
pub(crate) type MessageFn<T> = dyn Fn(&Client<T>, Message) + Send + Sync;
pub(crate) type DisconnectFn<T> = dyn Fn(&Client<T>, &CloseFrame, Option<&Error>) + Send + Sync;

/// User closures; an event kind without one goes to the channel.
pub(crate) struct Handlers<T> {
    pub(crate) connect: Option<Box<ConnectFn<T>>>,
    pub(crate) message: Option<Box<MessageFn<T>>>,
    pub(crate) disconnect: Option<Box<DisconnectFn<T>>>,
}

impl<T> Default for Handlers<T> {
    fn default() -> Self {
        Handlers {
            connect: None,
            message: None,
            disconnect: None,
        }
    }
}

/// State every thread of one server shares.
pub(crate) struct Shared<T> {
    pub(crate) config: Config,
    pub(crate) limits: Limits,
    pub(crate) poller: Poller,
    pub(crate) pool: ThreadPool,
    pub(crate) registry: registry::Registry<T>,
    pub(crate) timers: timer::Timers,
    pub(crate) init: Box<InitFn<T>>,
    pub(crate) handlers: Handlers<T>,
    /// Taken (dropped) at the end of shutdown, which ends the user's
    /// event iterator.
    pub(crate) events: RwLock<Option<mpsc::Sender<Event<T>>>>,
    pub(crate) stopping: AtomicBool,
    pub(crate) next_id: AtomicU64,
    pub(crate) local_addr: SocketAddr,
    pub(crate) started: Instant,
    /// Poller loop exit flag.
    pub(crate) poller_stop: AtomicBool,
    pub(crate) threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// `WebSocketServer::shutdown`, reachable from its `Drop`, which
    /// cannot carry the `T: Send + Sync` bound itself.
    pub(crate) shutdown_fn: fn(&crate::server::WebSocketServer<T>),
}

impl<T: Send + Sync + 'static> Shared<T> {
    /// Deliver `Connect`; returns false if the handler panicked.
    pub(crate) fn emit_connect(&self, client: &Client<T>) -> bool {
        match &self.handlers.connect {
            Some(f) => guarded("on_connect", client, || f(client)),
            None => {
                self.send_event(Event::Connect {
                    client: client.clone(),
                });
                true
            }
        }
    }

    /// Deliver a message; returns false if the handler panicked.
    pub(crate) fn emit_message(&self, client: &Client<T>, message: Message) -> bool {
        match &self.handlers.message {
            Some(f) => guarded("on_message", client, || f(client, message)),
            None => {
                self.send_event(Event::Message {
                    client: client.clone(),
                    message,
                });
                true
            }
        }
    }

    pub(crate) fn emit_disconnect(
        &self,
        client: &Client<T>,
        close: CloseFrame,
        error: Option<Error>,
    ) {
        match &self.handlers.disconnect {
            Some(f) => {
                guarded("on_disconnect", client, || {
                    f(client, &close, error.as_ref())
                });
            }
            None => self.send_event(Event::Disconnect {
                client: client.clone(),
                close,
                error,
            }),
        }
    }

    fn send_event(&self, event: Event<T>) {
        if let Some(tx) = self.events.read().as_ref() {
            // The user may have dropped the receiver; events then have
            // nowhere to go, which is their choice.
            let _ = tx.send(event);
        }
    }

    /// Milliseconds since the server started: a cheap clock for timers.
    pub(crate) fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

/// Run user code, catching a panic so that one bad handler cannot take a
/// worker (or the server) down. The caller closes the client with 1011.
fn guarded<T>(what: &str, client: &Client<T>, f: impl FnOnce()) -> bool {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(()) => true,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic".into());
            eprintln!(
                "enjent: {what} handler panicked for client {client:?}: {msg}; closing it with 1011"
            );
            false
        }
    }
}

/// The close frame for a handler panic.
pub(crate) fn panic_close() -> (CloseCode, &'static str) {
    (CloseCode::INTERNAL_ERROR, "handler panicked")
}
