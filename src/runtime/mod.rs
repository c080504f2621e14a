//! Every socket, thread and lock lives here. The protocol itself is in
//! `proto`.

pub(crate) mod acceptor;
pub(crate) mod bridge;
pub(crate) mod broadcast;
pub(crate) mod conn;
pub(crate) mod current;
pub(crate) mod events;
pub(crate) mod flow;
pub(crate) mod handshake;
pub(crate) mod poller;
pub(crate) mod registry;
pub(crate) mod service;
#[cfg(test)]
pub(crate) mod testing;
pub(crate) mod timer;
pub(crate) mod topics;

use std::net::SocketAddr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};
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
pub(crate) type ErrorFn<T> = dyn Fn(Option<&Client<T>>, &Error) + Send + Sync;
pub(crate) type BridgeFn = dyn Fn(&crate::bridge::BridgeEvent) + Send + Sync;

/// User closures; an event kind without one goes to the channel.
pub(crate) struct Handlers<T> {
    pub(crate) connect: Option<Box<ConnectFn<T>>>,
    pub(crate) message: Option<Box<MessageFn<T>>>,
    pub(crate) drain: Option<Box<ConnectFn<T>>>,
    pub(crate) disconnect: Option<Box<DisconnectFn<T>>>,
    pub(crate) error: Option<Box<ErrorFn<T>>>,
    pub(crate) bridge: Option<Box<BridgeFn>>,
    pub(crate) http: Option<Box<HttpFn>>,
}

impl<T> Default for Handlers<T> {
    fn default() -> Self {
        Handlers {
            connect: None,
            message: None,
            drain: None,
            disconnect: None,
            error: None,
            bridge: None,
            http: None,
        }
    }
}

/// A thread in `send_timeout` waiting for room (see
/// [`Shared::wait_for_room`]).
pub(crate) struct RoomWaiter {
    /// The connection it would send to, by address.
    conn: usize,
    /// Whether its last try was refused for the server-wide budget rather
    /// than its own queue's limit.
    for_budget: bool,
    /// What it waits on, woken by [`Shared::room_made`].
    cv: Arc<Condvar>,
}

/// How a [`RoomWaiter`] names its connection: by address (the waiter holds
/// the connection, so no other can have it meanwhile).
fn waiter_key<T>(conn: &conn::Conn<T>) -> usize {
    std::ptr::from_ref(conn) as usize
}

/// How long a thread waiting for room sleeps before it looks again with
/// no wake-up; long in unit tests, so that they see a wake-up lost.
const ROOM_POLL: Duration = if cfg!(test) {
    Duration::from_secs(10)
} else {
    Duration::from_millis(50)
};

/// State every thread of one server shares.
pub(crate) struct Shared<T> {
    pub(crate) config: Config,
    pub(crate) limits: Limits,
    pub(crate) poller: Poller,
    /// Connections' interest is edge-triggered (see `conn::Watch`); else
    /// oneshot, where the poller has no edge-triggered mode.
    pub(crate) edge: bool,
    pub(crate) pool: ThreadPool,
    pub(crate) registry: registry::Registry<T>,
    pub(crate) timers: timer::Timers,
    pub(crate) init: Box<InitFn<T>>,
    pub(crate) handlers: Handlers<T>,
    /// Flow control's marks (see `flow.rs`).
    pub(crate) marks: flow::Marks,
    /// The user's event channel, bounded in bytes.
    pub(crate) events: events::EventQueue<T>,
    /// Subscriptions and publishing.
    pub(crate) topics: topics::Topics<T>,
    /// Topics shared with other servers, if a bridge was configured.
    pub(crate) bridge: Option<Arc<bridge::BridgeRt>>,
    /// Ready connections and handshakes waiting for a worker.
    pub(crate) ready: Mutex<poller::ReadyQueue<T>>,
    /// Signalled, while the readiness loop waits in `poller::pace`, by
    /// the drainer that takes the last queued job, finds none or unwinds
    /// (`poller::end_pace`).
    pub(crate) drained: parking_lot::Condvar,
    /// Threads in `send_timeout` waiting for room in some queue.
    pub(crate) room_waiters: std::sync::atomic::AtomicUsize,
    /// Those threads, each with the connection it waits on, and the lock
    /// they wait with.
    pub(crate) awaited: Mutex<Vec<RoomWaiter>>,
    pub(crate) room: Mutex<()>,
    pub(crate) counters: Counters,
    /// Partial input held by connections chosen to be failed for
    /// `max_buffered_bytes` whose jobs have not done it yet (those whose
    /// `holding_in` has its `CONDEMNED` bit): the budget counts it as
    /// gone. Kept exact as they grow or let go (see `note_buffered`).
    pub(crate) condemned_in: std::sync::atomic::AtomicUsize,
    /// Held by the one scan for the largest holders.
    pub(crate) budget_scan: Mutex<()>,
    /// Input read but kept unparsed by flow control, all connections.
    pub(crate) unparsed_in: std::sync::atomic::AtomicUsize,
    /// Bytes of unfinished incoming messages, all connections together.
    pub(crate) buffered_in: std::sync::atomic::AtomicUsize,
    pub(crate) stopping: AtomicBool,
    pub(crate) local_addr: SocketAddr,
    /// The listening socket again (Linux), to wake the accept thread by
    /// shutting its reading down, which needs no new file descriptor;
    /// taken (and closed) by shutdown.
    pub(crate) accept_wake: Mutex<Option<TcpStream>>,
    pub(crate) started: Instant,
    /// Poller loop exit flag.
    pub(crate) poller_stop: AtomicBool,
    pub(crate) threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// The bridge's publisher and receiver threads.
    pub(crate) bridge_threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// `WebSocketServer::shutdown`, reachable from its `Drop`, which
    /// cannot carry the `T: Send + Sync` bound itself.
    pub(crate) shutdown_fn: fn(&Arc<Shared<T>>),
    /// True once shutdown has run; held while it runs.
    pub(crate) shutdown_lock: Mutex<bool>,
    /// Whether a shutdown was asked for, so that closures calling it
    /// again start no more threads.
    pub(crate) shutdown_asked: AtomicBool,
    /// Connections with sends deferred by user threads, for the next
    /// flush job (see `Conn::write`).
    pub(crate) flushq: Mutex<Vec<Arc<conn::Conn<T>>>>,
    /// Connections that may keep compression contexts now (see
    /// `Compression::max_contexts`).
    #[cfg(feature = "deflate")]
    pub(crate) contexts: Arc<std::sync::atomic::AtomicUsize>,
}

/// Reports that the readiness loop and the accept thread make of their
/// own troubles: at most one every ten seconds each, so that a trouble
/// that comes back every time neither floods `on_error` nor costs the
/// thread more than the trouble itself; and made from a pool thread, since
/// `on_error` is user code, which must not hold up the loop or the thread
/// that shutdown joins.
pub(crate) struct Throttled(Option<Instant>);

impl Throttled {
    pub(crate) const fn new() -> Self {
        Throttled(None)
    }

    /// Report the error `make` makes, unless one was reported in the last
    /// ten seconds (then `make` is not called).
    pub(crate) fn report<T: Send + Sync + 'static>(
        &mut self,
        shared: &Arc<Shared<T>>,
        make: impl FnOnce() -> Error,
    ) {
        if self
            .0
            .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
        {
            return;
        }
        self.0 = Some(Instant::now());
        let error = make();
        let s = Arc::clone(shared);
        shared.pool.execute(move || s.report(None, error));
    }
}

impl<T: Send + Sync + 'static> Shared<T> {
    /// Deliver `Connect`; returns false if the handler panicked.
    pub(crate) fn emit_connect(&self, conn: &conn::Conn<T>) -> bool {
        let client = &conn.client;
        match &self.handlers.connect {
            Some(f) => self.guarded("on_connect", client, || f(client)),
            None => {
                self.events.push(
                    &self.marks,
                    conn,
                    Event::Connect {
                        client: client.clone(),
                    },
                );
                true
            }
        }
    }

    /// Deliver a message; returns false if the handler panicked.
    pub(crate) fn emit_message(&self, conn: &conn::Conn<T>, message: Message) -> bool {
        let client = &conn.client;
        match &self.handlers.message {
            Some(f) => self.guarded("on_message", client, || f(client, message)),
            None => {
                self.events.push(
                    &self.marks,
                    conn,
                    Event::Message {
                        client: client.clone(),
                        message,
                    },
                );
                true
            }
        }
    }

    pub(crate) fn emit_disconnect(
        &self,
        conn: &conn::Conn<T>,
        close: CloseFrame,
        error: Option<Error>,
    ) {
        let client = &conn.client;
        match &self.handlers.disconnect {
            Some(f) => {
                self.guarded("on_disconnect", client, || {
                    f(client, &close, error.as_ref())
                });
            }
            None => self.events.push(
                &self.marks,
                conn,
                Event::Disconnect {
                    client: client.clone(),
                    close,
                    error,
                },
            ),
        }
    }

    /// Publish to the local subscribers of `topic` but `except`, then to
    /// the other servers through the bridge, if any.
    pub(crate) fn publish(
        self: &Arc<Self>,
        topic: &str,
        message: &Message,
        except: Option<&conn::Conn<T>>,
    ) -> crate::server::Broadcast {
        // A name no server could subscribe to goes nowhere else.
        let relay = self
            .bridge
            .as_deref()
            .filter(|_| !topic.is_empty() && topic.len() <= self.config.max_topic_len);
        self.topics.publish(self, topic, message, except, relay)
    }

    /// Tell the user what happened to the bridge: `on_bridge` if
    /// registered, else an `Event::Bridge`.
    pub(crate) fn emit_bridge(&self, event: crate::bridge::BridgeEvent) {
        #[cfg(feature = "log")]
        match &event {
            crate::bridge::BridgeEvent::Up => log::info!("enjent: {event}"),
            _ => log::warn!("enjent: {event}"),
        }
        match &self.handlers.bridge {
            Some(f) => {
                if let Err(panic) = catch_unwind(AssertUnwindSafe(|| f(&event))) {
                    self.report_panic("on_bridge", None, panic.as_ref());
                }
            }
            None => self.events.push_unattached(Event::Bridge(event)),
        }
    }

    /// Deliver `Drain`; returns false if the handler panicked.
    pub(crate) fn emit_drain(&self, conn: &conn::Conn<T>) -> bool {
        let client = &conn.client;
        match &self.handlers.drain {
            Some(f) => self.guarded("on_drain", client, || f(client)),
            None => {
                self.events.push(
                    &self.marks,
                    conn,
                    Event::Drain {
                        client: client.clone(),
                    },
                );
                true
            }
        }
    }

    /// Run user code, catching a panic so that one bad handler cannot
    /// take a worker (or the server) down; the panic is reported as an
    /// error. The caller closes the client with 1011.
    fn guarded(&self, what: &'static str, client: &Client<T>, f: impl FnOnce()) -> bool {
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(()) => true,
            Err(panic) => {
                self.report_panic(what, Some(client), panic.as_ref());
                false
            }
        }
    }

    /// Count and report a caught panic of user code.
    pub(crate) fn report_panic(
        &self,
        handler: &'static str,
        client: Option<&Client<T>>,
        panic: &(dyn std::any::Any + Send),
    ) {
        Counters::add(&self.counters.panics, 1);
        let message = crate::runtime::poller::panic_message(panic);
        self.report(client, Error::HandlerPanicked { handler, message });
    }

    /// Tell the user of an error no other event reports: `on_error` if
    /// registered, else an `Event::Error`; also the `log` facade with the
    /// `log` feature. Never stderr.
    pub(crate) fn report(&self, client: Option<&Client<T>>, error: Error) {
        if !matches!(error, Error::HandlerPanicked { .. }) {
            Counters::add(&self.counters.internal_errors, 1);
        }
        #[cfg(feature = "log")]
        match (&error, client) {
            (Error::HandlerPanicked { .. }, Some(c)) => {
                log::warn!("enjent: client {}: {error}", c.id())
            }
            (Error::HandlerPanicked { .. }, None) => log::warn!("enjent: {error}"),
            (_, Some(c)) => log::error!("enjent: client {}: {error}", c.id()),
            (_, None) => log::error!("enjent: {error}"),
        }
        match &self.handlers.error {
            Some(f) => {
                // A panic in the error handler itself has nowhere left to
                // go: it is counted and dropped.
                if catch_unwind(AssertUnwindSafe(|| f(client, &error))).is_err() {
                    Counters::add(&self.counters.panics, 1);
                }
            }
            None => match client.and_then(Client::conn) {
                Some(conn) => self.events.push(
                    &self.marks,
                    &conn,
                    Event::Error {
                        client: client.cloned(),
                        error,
                    },
                ),
                None => self.events.push_unattached(Event::Error {
                    client: client.cloned(),
                    error,
                }),
            },
        }
    }

    /// The counters, with the gauges only `Shared` knows.
    pub(crate) fn stats(&self) -> crate::stats::Stats {
        let mut s = self.counters.snapshot();
        s.event_bytes = self.events.bytes() as u64;
        s.buffered_in_bytes = self.buffered_in.load(Ordering::Relaxed) as u64;
        s.unparsed_in_bytes = self.unparsed_in.load(Ordering::Relaxed) as u64;
        s.topics = self.topics.count() as u64;
        s.bridge = self.bridge.as_ref().map(|b| b.stats());
        s
    }

    /// The close timeout in server-clock milliseconds.
    pub(crate) fn close_timeout_ms(&self) -> u64 {
        ms(self.config.close_timeout)
    }

    /// Whether a data frame of `len` bytes, `owned` of them its own (not
    /// a shared frame's), may join `queue`: under the client's hard limit,
    /// and within the server's output budget (see
    /// [`flow::OutputBudget::refuses`]). The refusal's error if not.
    pub(crate) fn admits_frame(
        &self,
        queue: &flow::OutQueue,
        len: usize,
        owned: usize,
    ) -> Result<(), Error> {
        if !self.marks.admits_frame(queue, len) {
            return Err(Error::Backpressure {
                queued: queue.cost(),
                limit: self.marks.hard,
            });
        }
        let budget = &self.counters.output;
        if let Some(total) = budget.refuses(queue, owned, || self.counters.open()) {
            return Err(Error::ServerBackpressure {
                queued: queue.cost(),
                total,
                limit: budget.limit(),
            });
        }
        Ok(())
    }

    /// Wait (a thread outside the pool, in `send_timeout`) until `conn`'s
    /// queue could take `len` more bytes, it began to close (it then
    /// admits nothing more), or `deadline` passed.
    pub(crate) fn wait_for_room(&self, conn: &conn::Conn<T>, len: usize, deadline: Instant) {
        let mut guard = self.room.lock();
        self.room_waiters.fetch_add(1, Ordering::SeqCst);
        // Against a flush that lowers the budget's (relaxed) counts and
        // then finds no waiter: one of the two sees the other (the fence
        // in `wake_for_room` pairs with this one).
        std::sync::atomic::fence(Ordering::SeqCst);
        // A condition variable of its own: a flush wakes only the threads
        // its room may serve.
        let cv = Arc::new(Condvar::new());
        let mine = |w: &RoomWaiter| Arc::ptr_eq(&w.cv, &cv);
        self.awaited.lock().push(RoomWaiter {
            conn: waiter_key(conn),
            for_budget: false,
            cv: Arc::clone(&cv),
        });
        loop {
            let for_budget = {
                let w = conn.io.lock();
                if w.finished || w.write_error.is_some() || conn.closing.load(Ordering::Acquire) {
                    break;
                }
                match self.admits_frame(&w.out, len, len) {
                    Ok(()) => break,
                    Err(e) => matches!(e, Error::ServerBackpressure { .. }),
                }
            };
            if let Some(me) = self.awaited.lock().iter_mut().find(|w| mine(w)) {
                me.for_budget = for_budget;
            }
            // The flush that makes room notifies under this same lock,
            // after its queue changed, and reads what each waiter waits
            // for under it too. The bound is a safety net only, for room
            // made where no flush or teardown tells (a broadcast's frame
            // let go outside any queue).
            let until = deadline.min(Instant::now() + ROOM_POLL);
            if cv.wait_until(&mut guard, until).timed_out() && Instant::now() >= deadline {
                break;
            }
        }
        {
            let mut awaited = self.awaited.lock();
            if let Some(i) = awaited.iter().position(mine) {
                awaited.swap_remove(i);
            }
        }
        self.room_waiters.fetch_sub(1, Ordering::SeqCst);
    }

    /// Whether a thread waits for room in `conn`'s queue (see
    /// `wait_for_room`): the client is then idle as its socket is stuck,
    /// even if paused for the main loop, which may be the one waiting.
    pub(crate) fn is_awaited(&self, conn: &conn::Conn<T>) -> bool {
        self.room_waiters.load(Ordering::SeqCst) > 0
            && self
                .awaited
                .lock()
                .iter()
                .any(|w| w.conn == waiter_key(conn))
    }

    /// `conn`'s queue shrank or closed: wake the threads waiting for room
    /// in it, and those whose last try the server-wide budget refused, if
    /// the budget may now take them. Not the others: a thread blocked on
    /// a client that never reads would otherwise wake at every write to
    /// anyone (16 of them spent most of a core so).
    pub(crate) fn room_made(&self, conn: &conn::Conn<T>) {
        self.wake_for_room(conn, false);
    }

    /// [`Shared::room_made`] for `conn`'s teardown: one client fewer
    /// makes every other's share of the budget larger (where it is above
    /// its floor).
    pub(crate) fn room_made_by_leaving(&self, conn: &conn::Conn<T>) {
        self.wake_for_room(conn, true);
    }

    fn wake_for_room(&self, conn: &conn::Conn<T>, left: bool) {
        // The room made (the budget's relaxed counts lowered) is seen by
        // a waiter that registers after this, or this sees the waiter.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.room_waiters.load(Ordering::SeqCst) == 0 {
            return;
        }
        let key = waiter_key(conn);
        // The budget refuses only while it counts more than its limit,
        // and then the queues over their share of it (the limit over the
        // open connections). So room in a queue wakes its waiters for the
        // budget only once the count is back under the limit, or when a
        // client left: while the server stays over budget, writes to
        // clients that keep up (which it does not count) would wake them
        // all for nothing, at every flush. A client's leaving wakes them
        // only where the share is more than the least a queue may hold
        // (under 8,192 clients at the defaults): past that, churn would.
        // Room the budget gets elsewhere (a broadcast's frame let go once
        // all its queues wrote it, or two flushes that each lowered one
        // of its two counts on a weakly ordered CPU) is found by the
        // waiters' poll.
        let budget = &self.counters.output;
        let for_budget = budget.used() <= budget.limit()
            || (left && budget.share_above_least(self.counters.open()));
        let _guard = self.room.lock();
        for w in self.awaited.lock().iter() {
            if w.conn == key || (w.for_budget && for_budget) {
                w.cv.notify_one();
            }
        }
    }

    /// Stop accepting, close every client with 1001, wait for them (then
    /// force them), join the threads and the pool, and end the event
    /// stream. Runs once; a second caller waits for the first to finish.
    pub(crate) fn shutdown(self: &Arc<Self>) {
        if service::on_worker() || bridge::on_bridge_thread() || poller::on_poller() {
            // A worker cannot wait for the pool it belongs to, nor a
            // bridge thread (in `on_bridge`) for the bridge, nor the
            // poller (in `on_error`) for itself. One thread does it, for
            // however many closures ask.
            if self.shutdown_asked.swap(true, Ordering::AcqRel) {
                return;
            }
            let shared = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name("enjent-shutdown".into())
                .spawn(move || shared.shutdown());
            if let Err(e) = spawned {
                // The next call tries again.
                self.shutdown_asked.store(false, Ordering::Release);
                self.report(None, Error::Io(e));
            }
            return;
        }
        self.shutdown_asked.store(true, Ordering::Release);
        let mut done = self.shutdown_lock.lock();
        if *done {
            return;
        }
        *done = true;
        let shared = self;
        shared.stopping.store(true, Ordering::Release);
        // Wake the accept thread out of `accept`. A wildcard bind is
        // reached through loopback; for `[::]`, IPv4's if IPv6's is off
        // (a dual-stack socket takes both).
        let port = shared.local_addr.port();
        let wakes = match shared.local_addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => {
                vec![SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)]
            }
            IpAddr::V6(ip) if ip.is_unspecified() => vec![
                SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port),
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port),
            ],
            _ => vec![shared.local_addr],
        };
        // On Linux, shutting the listening socket's reading down ends a
        // blocked `accept` at once, and needs no new file descriptor (a
        // connect does, which a server out of them cannot make). Elsewhere
        // that fails, and the connect wakes it.
        let by_shutdown = shared
            .accept_wake
            .lock()
            .as_ref()
            .is_some_and(|l| l.shutdown(std::net::Shutdown::Read).is_ok());
        let by_connect = !by_shutdown
            && wakes
                .iter()
                .any(|wake| TcpStream::connect_timeout(wake, Duration::from_secs(1)).is_ok());
        let mut threads = std::mem::take(&mut *shared.threads.lock());
        // threads[0] is the accept thread, given a few seconds to see the
        // wake. If it never does (no wake could be made), it stays blocked
        // in accept; it holds no connection and ends with the process.
        if !threads.is_empty() {
            let acceptor = threads.remove(0);
            let patience =
                Instant::now() + Duration::from_secs(if by_shutdown || by_connect { 5 } else { 0 });
            while !acceptor.is_finished() && Instant::now() < patience {
                std::thread::sleep(Duration::from_millis(1));
            }
            if acceptor.is_finished() {
                let _ = acceptor.join();
            }
        }
        // The listening socket closes with the accept thread's copy.
        drop(shared.accept_wake.lock().take());
        // Parked handshakes go now; those on a worker see `stopping`.
        for key in shared.registry.handshake_keys() {
            if let Some(p) = shared.registry.take_expired_handshake(key, None) {
                handshake::abort_handshake(
                    shared,
                    *p,
                    Some(&Reject::new(503).body("server shutting down")),
                );
            }
        }
        // A client that left meanwhile may be held by this snapshot
        // alone: its data's `Drop` runs here, guarded, so that a panic in
        // it does not end the shutdown half done.
        for conn in shared.registry.snapshot() {
            let _ = conn.close_and_flush(shared, CloseCode::GOING_AWAY, "server shutdown");
            poller::let_go_here(shared, conn);
        }
        let patience = shared
            .config
            .close_timeout
            .saturating_add(Duration::from_millis(200));
        if !shared.registry.wait_empty(patience) {
            for conn in shared.registry.snapshot() {
                conn.force_close(shared);
                poller::let_go_here(shared, conn);
            }
            shared.registry.wait_empty(Duration::from_secs(2));
        }
        shared.poller_stop.store(true, Ordering::Release);
        let _ = shared.poller.notify();
        for t in threads {
            let _ = t.join();
        }
        shared.pool.join();
        // The bridge last: it sends what publishes left in its outbox.
        if let Some(bridge) = &shared.bridge {
            bridge.stop();
        }
        // It gets `close_timeout` to send the rest of its outbox; an engine
        // that does not answer keeps its threads until their own timeouts
        // (a batch of publishes within twice `RedisBridge::timeout`; a
        // connection attempt, one per address the name resolves to), but
        // shutdown does not wait for them: what they drop then is counted
        // after it returns.
        let deadline = Instant::now()
            .checked_add(shared.config.close_timeout)
            .unwrap_or_else(handshake::far_future);
        for t in std::mem::take(&mut *shared.bridge_threads.lock()) {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
        if let Some(bridge) = &shared.bridge {
            bridge.close();
        }
        // Dropping the sender ends the user's event iterator once the
        // events already sent are read.
        shared.events.close();
    }

    /// Mark `conn` condemned for the budget, what it holds counted as
    /// gone; false if it was already.
    pub(crate) fn condemn(&self, conn: &conn::Conn<T>) -> bool {
        let old = conn.holding_in.fetch_or(conn::CONDEMNED, Ordering::SeqCst);
        if old & conn::CONDEMNED != 0 {
            return false;
        }
        self.condemned_in.fetch_add(old, Ordering::SeqCst);
        true
    }

    /// Take `conn`'s condemnation back; false if it had none.
    pub(crate) fn acquit(&self, conn: &conn::Conn<T>) -> bool {
        let old = conn
            .holding_in
            .fetch_and(!conn::CONDEMNED, Ordering::SeqCst);
        if old & conn::CONDEMNED == 0 {
            return false;
        }
        self.condemned_in
            .fetch_sub(old & !conn::CONDEMNED, Ordering::SeqCst);
        true
    }

    /// Queue `conn` for a flush job; the first connection into an empty
    /// list starts one, which takes the whole list.
    pub(crate) fn defer_flush(self: &Arc<Self>, conn: &Arc<conn::Conn<T>>) {
        let mut q = self.flushq.lock();
        q.push(Arc::clone(conn));
        if q.len() == 1 {
            drop(q);
            let s = Arc::clone(self);
            self.pool.execute(move || service::flush_deferred(&s));
        }
    }

    /// Milliseconds since the server started: a cheap clock for timers.
    pub(crate) fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

/// Server-clock milliseconds that mean "never": durations are saturated
/// to this, so that adding one to the clock cannot overflow.
pub(crate) const NEVER_MS: u64 = 1 << 62;

/// A duration in server-clock milliseconds, saturated at `NEVER_MS`.
pub(crate) fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(NEVER_MS)) as u64
}

/// The close frame for a handler panic.
pub(crate) fn panic_close() -> (CloseCode, &'static str) {
    (CloseCode::INTERNAL_ERROR, "handler panicked")
}

#[cfg(test)]
mod tests {
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    use crate::runtime::testing::upgrade;
    use crate::{Client, Error, Event, Message, WebSocketServer};

    /// A client whose socket takes in little (the least receive buffer
    /// the kernel allows, so that the server's buffers under it fill
    /// sooner) and is never read, with its handle.
    fn stuck(server: &WebSocketServer) -> (TcpStream, Client) {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(1).unwrap();
        sock.connect(&server.local_addr().into()).unwrap();
        let mut s: TcpStream = sock.into();
        upgrade(&mut s);
        // Past the others' `Drain`s and `Disconnect`s.
        loop {
            match server.recv_timeout(Duration::from_secs(10)) {
                Ok(Event::Connect { client }) => return (s, client),
                Ok(Event::Drain { .. } | Event::Disconnect { .. }) => {}
                other => panic!("{other:?}"),
            }
        }
    }

    fn kib(n: usize) -> Message {
        Message::Binary(vec![7; n << 10])
    }

    /// Whether a refusal was for the server-wide budget (or the client's
    /// own limit).
    fn for_budget(e: &Error) -> bool {
        match e {
            Error::ServerBackpressure { .. } => true,
            Error::Backpressure { .. } => false,
            other => panic!("{other}"),
        }
    }

    /// Send to `c` in 8 KiB messages until its queue holds at least
    /// `queued` bytes and has held them for half a second: the kernel's
    /// buffers under it are full.
    fn saturate(c: &Client, queued: usize) {
        let start = Instant::now();
        let mut steady = Instant::now();
        loop {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "it kept draining"
            );
            let before = c.buffered_amount();
            if before < queued {
                c.send(kib(8)).unwrap();
                steady = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(50));
            if c.buffered_amount() < before {
                steady = Instant::now();
            }
            if steady.elapsed() > Duration::from_millis(500) {
                return;
            }
        }
    }

    /// Send `n` KiB messages to each of `clients` until refused, and once
    /// more 300 ms later; the last refusal. A flush that ran late (the
    /// pool busy, the machine loaded) moves bytes into a socket's kernel
    /// buffer after the first refusal, up to tens of KiB, and the room it
    /// makes would let a waiter in before the test makes any; the second
    /// fill takes that room back.
    fn fill(clients: &[&Client], n: usize) -> crate::SendError {
        let refused = |c: &Client| loop {
            if let Err(e) = c.send(kib(n)) {
                break e;
            }
        };
        for c in clients {
            refused(c);
        }
        std::thread::sleep(Duration::from_millis(300));
        let mut last = None;
        for c in clients {
            last = Some(refused(c));
        }
        last.expect("no client to fill")
    }

    /// Two threads wait in `send_timeout` on one client that the
    /// server-wide budget refuses and whose socket takes nothing (so its
    /// own flushes make no room); the others leaving makes room in the
    /// budget, and both are woken and send, well inside the 10 s a waiter
    /// sleeps here when nothing wakes it. (With one record per client
    /// rather than per waiter, the second could be left asleep.) Then a
    /// thread waiting on a client refused by its own queue's limit is
    /// woken when that client reads.
    #[test]
    fn threads_in_send_timeout_are_woken_by_the_room_they_wait_for() {
        let (server, _target_sock, crowd, waiters) = two_waiting_for_the_budget();
        let left = Instant::now();
        drop(crowd);
        each_sent_soon(waiters, left, "they left");

        // Refused by its own queue: woken by that client reading.
        let (mut sock, c) = stuck(&server);
        let refused = fill(&[&c], 32);
        assert!(!for_budget(refused.error()), "{}", refused.error());
        let waiter = std::thread::spawn(move || {
            let t = Instant::now();
            let r = c.send_timeout(kib(32), Duration::from_secs(30));
            (r.map_err(|e| e.to_string()), t.elapsed())
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(!waiter.is_finished(), "the waiter did not wait");
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            while std::io::Read::read(&mut sock, &mut buf).is_ok_and(|n| n > 0) {}
        });
        let (result, waited) = waiter.join().unwrap();
        assert!(result.is_ok(), "{result:?} after {waited:?}");
        assert!(
            waited < Duration::from_secs(5),
            "woken only by the poll: {waited:?}"
        );
        drop(server);
        let _ = reader.join();
    }

    /// A thread waiting in `send_timeout`, with what it returns and how
    /// long it took.
    type Waiter =
        std::thread::JoinHandle<(std::result::Result<crate::SendStatus, String>, Duration)>;

    /// Each waiter sent, within 5 s of `since` (when `what` happened):
    /// woken by the room, not by its 10 s poll.
    fn each_sent_soon(waiters: Vec<Waiter>, since: Instant, what: &str) {
        for w in waiters {
            let (result, waited) = w.join().unwrap();
            assert!(result.is_ok(), "{result:?} after {waited:?}");
            let after = since.elapsed();
            assert!(
                after < Duration::from_secs(5),
                "woken only by the poll: {after:?} after {what}"
            );
        }
    }

    /// A server whose budget (256 KiB) seven stuck clients fill, and two
    /// threads waiting (30 s at most) to send 16 KiB to an eighth, which
    /// has 24 KiB queued and is refused for the budget (with 8 open, a
    /// share is 32 KiB: 24 + 16 is over it).
    fn two_waiting_for_the_budget() -> (
        WebSocketServer,
        TcpStream,
        Vec<(TcpStream, Client)>,
        Vec<Waiter>,
    ) {
        let server = WebSocketServer::builder()
            .max_message_size(64 * 1024)
            .high_water(64 * 1024)
            .low_water(16 * 1024)
            .max_backpressure(0)
            .max_queued_bytes(256 * 1024)
            .close_timeout(Duration::from_millis(200))
            // A fixed send buffer: left to itself, Linux grows a socket's
            // buffer later while its client reads nothing, and the bytes
            // it takes then leave the budget with room (a CI run saw the
            // waiters sent at once with 180 KB queued of the 256 KiB).
            .kernel_send_buffer(Some(4096))
            .start("127.0.0.1:0")
            .unwrap();
        // The target first, alone: its kernel buffers full, 24 KiB queued
        // (over low water, which takes any one frame).
        let (target_sock, target) = stuck(&server);
        saturate(&target, 24 << 10);
        // Seven more take the rest of the budget.
        let crowd: Vec<(TcpStream, Client)> = (0..7).map(|_| stuck(&server)).collect();
        fill(&crowd.iter().map(|(_, c)| c).collect::<Vec<_>>(), 8);
        let refused = target.send(kib(16)).unwrap_err();
        assert!(for_budget(refused.error()), "{}", refused.error());
        let waiters: Vec<Waiter> = (0..2)
            .map(|_| {
                let c = target.clone();
                std::thread::spawn(move || {
                    let t = Instant::now();
                    let r = c.send_timeout(kib(16), Duration::from_secs(30));
                    (r.map_err(|e| e.to_string()), t.elapsed())
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        (server, target_sock, crowd, waiters)
    }

    /// Threads waiting for the budget are woken by room made in it where
    /// nobody leaves: the clients holding it read, and the flush that
    /// brings the count back under the limit wakes them (the poll here
    /// is 10 s). Writes that leave the count over the limit wake none
    /// (`tests/flow_control.rs` counts their CPU).
    #[test]
    fn threads_waiting_for_the_budget_are_woken_when_others_read() {
        let (server, _target_sock, crowd, waiters) = two_waiting_for_the_budget();
        if waiters.iter().any(|w| w.is_finished()) {
            // Say how they ended: a room made early (a late flush of the
            // crowd's queues), or an error.
            let ended: Vec<_> = waiters.into_iter().map(|w| w.join().unwrap()).collect();
            let queued = server.stats().bytes_queued;
            panic!("the waiters did not wait: {ended:?}, {queued} B queued");
        }
        let reading = Instant::now();
        let readers: Vec<_> = crowd
            .into_iter()
            .map(|(mut sock, c)| {
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    while std::io::Read::read(&mut sock, &mut buf).is_ok_and(|n| n > 0) {}
                    drop(c);
                })
            })
            .collect();
        each_sent_soon(waiters, reading, "the others read");
        drop(server);
        for r in readers {
            let _ = r.join();
        }
    }

    /// A thread in `send_timeout` on a client that is then closed is let
    /// go by the close: a closing queue admits nothing more. Here the poll
    /// is 10 s and the close handshake's timeout 3 s, so a waiter that
    /// the close does not wake, or that does not see it, waits for one of
    /// them.
    #[test]
    fn a_close_lets_go_of_the_threads_waiting_for_room() {
        let server = WebSocketServer::builder()
            .max_message_size(64 * 1024)
            .high_water(64 * 1024)
            .low_water(16 * 1024)
            .max_backpressure(0)
            .close_timeout(Duration::from_secs(3))
            .start("127.0.0.1:0")
            .unwrap();
        let (_sock, c) = stuck(&server);
        fill(&[&c], 32);
        let waiter = {
            let c = c.clone();
            std::thread::spawn(move || {
                let r = c.send_timeout(kib(32), Duration::from_secs(30));
                (r.map_err(|e| e.into_error()), Instant::now())
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        assert!(!waiter.is_finished(), "the waiter did not wait");
        let closed = Instant::now();
        c.close(crate::CloseCode::NORMAL, "bye").unwrap();
        let (result, ended) = waiter.join().unwrap();
        assert!(matches!(result, Err(Error::Closed)), "{result:?}");
        let after = ended.saturating_duration_since(closed);
        assert!(
            after < Duration::from_secs(1),
            "the waiter ended {after:?} after the close"
        );
    }
}
