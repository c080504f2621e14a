//! Every socket, thread and lock lives here. The protocol itself is in
//! `proto`.

pub(crate) mod acceptor;
pub(crate) mod broadcast;
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
use crate::proto::handshake::{Reject, Request, Response};
use crate::stats::Counters;

pub(crate) type InitFn<T> = dyn Fn(&Request, &mut Response) -> Result<T, Reject> + Send + Sync;
pub(crate) type HttpFn = dyn Fn(&Request) -> Reject + Send + Sync;
pub(crate) type ConnectFn<T> = dyn Fn(&Client<T>) + Send + Sync;
pub(crate) type MessageFn<T> = dyn Fn(&Client<T>, Message) + Send + Sync;
pub(crate) type DisconnectFn<T> = dyn Fn(&Client<T>, &CloseFrame, Option<&Error>) + Send + Sync;

/// User closures; an event kind without one goes to the channel.
pub(crate) struct Handlers<T> {
    pub(crate) connect: Option<Box<ConnectFn<T>>>,
    pub(crate) message: Option<Box<MessageFn<T>>>,
    pub(crate) drain: Option<Box<ConnectFn<T>>>,
    pub(crate) disconnect: Option<Box<DisconnectFn<T>>>,
    pub(crate) http: Option<Box<HttpFn>>,
}

impl<T> Default for Handlers<T> {
    fn default() -> Self {
        Handlers {
            connect: None,
            message: None,
            drain: None,
            disconnect: None,
            http: None,
        }
    }
}

/// The sending half of the user's event channel.
pub(crate) enum EventTx<T> {
    Unbounded(mpsc::Sender<Event<T>>),
    Bounded(mpsc::SyncSender<Event<T>>),
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
    pub(crate) events: RwLock<Option<EventTx<T>>>,
    /// Events that did not fit a full bounded channel during shutdown.
    pub(crate) overflow: Mutex<Vec<Event<T>>>,
    pub(crate) counters: Counters,
    /// Bytes of unfinished incoming messages, all connections together.
    pub(crate) buffered_in: std::sync::atomic::AtomicUsize,
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
    /// Connections with sends deferred by user threads, for the next
    /// flush job (see `Conn::write`).
    pub(crate) flushq: Mutex<Vec<Arc<conn::Conn<T>>>>,
}

impl<T: Send + Sync + 'static> Shared<T> {
    /// Deliver `Connect`; returns false if the handler panicked.
    pub(crate) fn emit_connect(&self, client: &Client<T>) -> bool {
        match &self.handlers.connect {
            Some(f) => guarded(&self.counters, "on_connect", client, || f(client)),
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
            Some(f) => guarded(&self.counters, "on_message", client, || f(client, message)),
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
                guarded(&self.counters, "on_disconnect", client, || {
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

    pub(crate) fn emit_drain(&self, client: &Client<T>) {
        match &self.handlers.drain {
            Some(f) => {
                guarded(&self.counters, "on_drain", client, || f(client));
            }
            None => self.send_event(Event::Drain {
                client: client.clone(),
            }),
        }
    }

    /// Hand an event to the user's channel. The user may have dropped the
    /// receiver; events then have nowhere to go, which is their choice.
    ///
    /// A bounded channel that is full makes the worker wait (sleeping, so
    /// it costs no CPU): its connection is not read meanwhile, and as the
    /// other workers reach the same point the whole server stops reading.
    /// That is the backpressure. Once shutdown starts, waiting could
    /// deadlock a consumer that is itself shutting down, so events that
    /// do not fit go to an overflow list that shutdown delivers last.
    fn send_event(&self, event: Event<T>) {
        let guard = self.events.read();
        let Some(tx) = guard.as_ref() else { return };
        let tx = match tx {
            EventTx::Unbounded(tx) => {
                let _ = tx.send(event);
                return;
            }
            EventTx::Bounded(tx) => tx,
        };
        let mut event = event;
        let mut nap = Duration::from_micros(100);
        loop {
            if self.stopping.load(Ordering::Acquire) {
                let mut overflow = self.overflow.lock();
                if !overflow.is_empty() {
                    // Keep order: once events overflow, all later ones do.
                    overflow.push(event);
                    return;
                }
                match tx.try_send(event) {
                    Ok(()) | Err(mpsc::TrySendError::Disconnected(_)) => return,
                    Err(mpsc::TrySendError::Full(e)) => {
                        overflow.push(e);
                        return;
                    }
                }
            }
            match tx.try_send(event) {
                Ok(()) | Err(mpsc::TrySendError::Disconnected(_)) => return,
                Err(mpsc::TrySendError::Full(e)) => event = e,
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(10));
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
        let tx = shared.events.write().take();
        let overflow = std::mem::take(&mut *shared.overflow.lock());
        if let (Some(EventTx::Bounded(tx)), false) = (tx, overflow.is_empty()) {
            // The channel is full and its reader may be this very thread:
            // a short-lived thread delivers the rest in order, then ends
            // the stream.
            let _ = std::thread::Builder::new()
                .name("enjent-drain-events".into())
                .spawn(move || {
                    for event in overflow {
                        if tx.send(event).is_err() {
                            return;
                        }
                    }
                });
        }
    }

    /// Queue `conn` for a flush job; the first connection into an empty
    /// list starts one, which takes the whole list.
    pub(crate) fn defer_flush(self: &Arc<Self>, conn: &Arc<conn::Conn<T>>) {
        let mut q = self.flushq.lock();
        q.push(Arc::clone(conn));
        if q.len() == 1 {
            drop(q);
            let s = Arc::clone(self);
            self.pool.execute(move || worker::flush_deferred(&s));
        }
    }

    /// Milliseconds since the server started: a cheap clock for timers.
    pub(crate) fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

/// Run user code, catching a panic so that one bad handler cannot take a
/// worker (or the server) down. The caller closes the client with 1011.
fn guarded<T>(counters: &Counters, what: &str, client: &Client<T>, f: impl FnOnce()) -> bool {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(()) => true,
        Err(panic) => {
            Counters::add(&counters.panics, 1);
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic".into());
            eprintln!("enjent: {what} handler panicked for client {client:?}: {msg}");
            false
        }
    }
}

/// The close frame for a handler panic.
pub(crate) fn panic_close() -> (CloseCode, &'static str) {
    (CloseCode::INTERNAL_ERROR, "handler panicked")
}
