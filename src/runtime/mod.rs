//! Every socket, thread and lock lives here. The protocol itself is in
//! `proto`.

pub(crate) mod acceptor;
pub(crate) mod conn;
pub(crate) mod poller;
pub(crate) mod registry;
pub(crate) mod timer;
pub(crate) mod worker;

use std::net::SocketAddr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, mpsc};
use std::time::Duration;
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
    pub(crate) shutdown_fn: fn(&Arc<Shared<T>>),
    /// True once shutdown has run; held while it runs.
    pub(crate) shutdown_lock: Mutex<bool>,
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

    /// Stop accepting, close every client with 1001, wait for them (then
    /// force them), join the threads and the pool, and end the event
    /// stream. Runs once; a second caller waits for the first to finish.
    pub(crate) fn shutdown(self: &Arc<Self>) {
        if worker::on_worker() {
            // A worker cannot wait for the pool it belongs to.
            let shared = Arc::clone(self);
            let _ = std::thread::Builder::new()
                .name("enjent-shutdown".into())
                .spawn(move || shared.shutdown());
            return;
        }
        let mut done = self.shutdown_lock.lock();
        if *done {
            return;
        }
        *done = true;
        let shared = self;
        shared.stopping.store(true, Ordering::Release);
        // Wake the accept thread out of `accept`.
        let wake = match shared.local_addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => {
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), shared.local_addr.port())
            }
            IpAddr::V6(ip) if ip.is_unspecified() => {
                SocketAddr::new(Ipv6Addr::LOCALHOST.into(), shared.local_addr.port())
            }
            _ => shared.local_addr,
        };
        let woke = TcpStream::connect_timeout(&wake, Duration::from_secs(1)).is_ok();
        let mut threads = std::mem::take(&mut *shared.threads.lock());
        // threads[0] is the accept thread. If it could not be woken it stays
        // blocked in accept; it holds no connection and ends with the
        // process.
        if !threads.is_empty() {
            let acceptor = threads.remove(0);
            if woke {
                let _ = acceptor.join();
            }
        }
        // Parked handshakes go now; those on a worker see `stopping`.
        for key in shared.registry.handshake_keys() {
            if let Some(p) = shared
                .registry
                .take_expired_handshake(key, worker::far_future())
            {
                crate::runtime::worker::abort_handshake(
                    shared,
                    *p,
                    Some(&Reject::new(503).body("server shutting down")),
                );
            }
        }
        for conn in shared.registry.snapshot() {
            let _ = conn.close(shared, CloseCode::GOING_AWAY, "server shutdown");
        }
        let patience = shared.config.close_timeout + Duration::from_millis(200);
        if !shared.registry.wait_empty(patience) {
            for conn in shared.registry.snapshot() {
                conn.force_close(shared);
            }
            shared.registry.wait_empty(Duration::from_secs(2));
        }
        shared.poller_stop.store(true, Ordering::Release);
        let _ = shared.poller.notify();
        for t in threads {
            let _ = t.join();
        }
        shared.pool.join();
        // Dropping the sender ends the user's event iterator once the
        // events already sent are read.
        shared.events.write().take();
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
