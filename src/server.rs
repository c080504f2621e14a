//! `WebSocketServer`, its builder, and the handle other threads use.

use std::fmt;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Weak, mpsc};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use polling::Poller;
use threadpool::ThreadPool;

use crate::bridge::{Bridge, BridgeEvent};
use crate::client::{Client, ClientId, SendStatus};
use crate::config::Config;
use crate::config::SlowClientPolicy;
use crate::error::{Error, Result, SendError};
use crate::event::{Event, EventIter, Events};
use crate::message::{CloseCode, CloseFrame, Message};
use crate::proto::assemble::Limits;
use crate::proto::handshake::{HttpResponse, Reject, Request, Response};
use crate::runtime::broadcast::broadcast;
use crate::runtime::{Handlers, InitFn, Shared, acceptor, events, flow, poller, registry, timer};
use crate::stats::{Counters, Stats};

/// A WebSocket server: an accept thread, a readiness loop and a worker
/// pool, serving clients whose user data is `T`.
///
/// Dropping it shuts it down (see [`WebSocketServer::shutdown`]).
///
/// ```no_run
/// use enjent::{Event, WebSocketServer};
///
/// let server = WebSocketServer::bind("127.0.0.1:13003")?;
/// for event in server.events() {
///     if let Event::Message { client, message } = event {
///         // `Err(Closed)` if the client left meanwhile: not a reason to
///         // end the loop, which serves everyone.
///         let _ = client.send(message);
///     }
/// }
/// # Ok::<(), enjent::Error>(())
/// ```
pub struct WebSocketServer<T = ()> {
    shared: Arc<Shared<T>>,
    events: Events<T>,
}

#[cfg(test)]
impl<T> WebSocketServer<T> {
    /// The runtime's state, for the crate's own tests.
    pub(crate) fn shared(&self) -> &Arc<Shared<T>> {
        &self.shared
    }
}

impl WebSocketServer<()> {
    /// A builder for a server whose clients carry no user data.
    pub fn builder() -> Builder<()> {
        Builder::with_init(Box::new(|_: &Request, _: &mut Response| Ok(())))
    }

    /// Start a server with the default configuration.
    ///
    /// # Errors
    ///
    /// As [`Builder::start`]: [`Error::Bind`] if the address cannot be
    /// listened on; [`Error::Io`] if the poller or a thread cannot be
    /// created.
    pub fn bind(addr: impl ToSocketAddrs) -> Result<WebSocketServer<()>> {
        WebSocketServer::builder().start(addr)
    }
}

impl<T: Send + Sync + 'static> WebSocketServer<T> {
    /// A builder for a server whose clients carry a `T` built by
    /// `strategy` from the upgrade request (the seed's
    /// `ClientInitializationStrategy`). Returning a [`Reject`] refuses the
    /// client with that HTTP status.
    ///
    /// The strategy runs on a pool worker, as the closures do, once the
    /// whole request is in: `handshake_timeout` does not cover it, and
    /// while it runs (a lookup in an auth service, say) it holds that
    /// worker. A strategy that can be slow needs its own timeout, and
    /// enough [`workers`](Builder::workers) for the handshakes that wait
    /// on it at once. Handshakes (this and [`on_http`](Builder::on_http)
    /// included) run on all workers but one at most, so that however many
    /// requests come, open connections keep a worker (with `workers(1)`,
    /// they share it).
    ///
    /// ```no_run
    /// use enjent::{Reject, WebSocketServer};
    ///
    /// let server = WebSocketServer::with_client_init(|req| {
    ///     req.query_param("name").ok_or_else(|| Reject::forbidden("a name is required"))
    /// })
    /// .start("127.0.0.1:0")?;
    /// # Ok::<(), enjent::Error>(())
    /// ```
    pub fn with_client_init<F>(strategy: F) -> Builder<T>
    where
        F: Fn(&Request) -> std::result::Result<T, Reject> + Send + Sync + 'static,
    {
        Builder::with_init(Box::new(move |req: &Request, _: &mut Response| {
            strategy(req)
        }))
    }

    /// As [`with_client_init`](WebSocketServer::with_client_init), with
    /// the `101` response in hand: the strategy may add headers to it
    /// (such as `Set-Cookie`) and choose the subprotocol.
    ///
    /// ```no_run
    /// use enjent::{Reject, WebSocketServer};
    ///
    /// let server = WebSocketServer::with_handshake(|req, resp| {
    ///     let name = req.query_param("name").ok_or_else(|| Reject::forbidden("name?"))?;
    ///     resp.header("Set-Cookie", format!("seen={name}; HttpOnly"));
    ///     if req.protocols().any(|p| p == "chat.v2") {
    ///         resp.protocol("chat.v2");
    ///     }
    ///     Ok(name)
    /// })
    /// .start("127.0.0.1:0")?;
    /// # Ok::<(), enjent::Error>(())
    /// ```
    pub fn with_handshake<F>(strategy: F) -> Builder<T>
    where
        F: Fn(&Request, &mut Response) -> std::result::Result<T, Reject> + Send + Sync + 'static,
    {
        Builder::with_init(Box::new(strategy))
    }

    /// The address the server listens on (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The event stream, for a `for event in server.events()` main loop.
    /// It ends once [`shutdown`](WebSocketServer::shutdown) has run. In
    /// the closure style (an [`on_message`](Builder::on_message) closure
    /// is registered) nothing comes through it: event kinds without a
    /// closure are not produced.
    pub fn events(&self) -> &Events<T> {
        &self.events
    }

    /// Wait for the next event; `None` once the server is shut down.
    pub fn recv(&self) -> Option<Event<T>> {
        self.events.recv().ok()
    }

    /// The next event if one is waiting.
    ///
    /// # Errors
    ///
    /// As [`mpsc::Receiver::try_recv`].
    pub fn try_recv(&self) -> std::result::Result<Event<T>, mpsc::TryRecvError> {
        self.events.try_recv()
    }

    /// Wait at most `timeout` for the next event.
    ///
    /// # Errors
    ///
    /// As [`mpsc::Receiver::recv_timeout`].
    pub fn recv_timeout(
        &self,
        timeout: Duration,
    ) -> std::result::Result<Event<T>, mpsc::RecvTimeoutError> {
        self.events.recv_timeout(timeout)
    }

    /// Iterate over events until the server shuts down.
    pub fn iter(&self) -> EventIter<'_, T> {
        self.events.iter()
    }

    /// A cloneable handle for other threads.
    pub fn handle(&self) -> ServerHandle<T> {
        ServerHandle::from_weak(Arc::downgrade(&self.shared))
    }

    /// See [`ServerHandle::send`].
    ///
    /// # Errors
    ///
    /// As [`ServerHandle::send`].
    pub fn send(
        &self,
        id: ClientId,
        message: impl Into<Message>,
    ) -> std::result::Result<SendStatus, SendError> {
        send(&self.shared, id, message.into(), None)
    }

    /// See [`ServerHandle::send_timeout`].
    ///
    /// # Errors
    ///
    /// As [`ServerHandle::send_timeout`].
    pub fn send_timeout(
        &self,
        id: ClientId,
        message: impl Into<Message>,
        timeout: Duration,
    ) -> std::result::Result<SendStatus, SendError> {
        send(&self.shared, id, message.into(), Some(timeout))
    }

    /// See [`ServerHandle::broadcast`].
    pub fn broadcast(&self, message: impl Into<Message>) -> Broadcast {
        broadcast(&self.shared, &message.into())
    }

    /// See [`ServerHandle::publish`].
    pub fn publish(&self, topic: &str, message: impl Into<Message>) -> Broadcast {
        self.shared.publish(topic, &message.into(), None)
    }

    /// See [`ServerHandle::subscribers`].
    pub fn subscribers(&self, topic: &str) -> usize {
        self.shared.topics.subscribers(topic)
    }

    /// See [`ServerHandle::close`].
    ///
    /// # Errors
    ///
    /// As [`ServerHandle::close`].
    pub fn close(&self, id: ClientId, code: CloseCode, reason: &str) -> Result<()> {
        with_conn(&self.shared, id, |conn| {
            conn.close_and_flush(&self.shared, code, reason)
        })
        .unwrap_or(Err(Error::Closed))
    }

    /// The client with this id, if connected.
    pub fn client(&self, id: ClientId) -> Option<Client<T>> {
        self.shared.registry.get(id).map(|c| c.client.clone())
    }

    /// Open connections (handshakes in progress excluded).
    pub fn connections(&self) -> usize {
        self.shared.registry.open_count()
    }

    /// A snapshot of the server's counters: atomic loads, and a short
    /// lock for the per-status and per-topic counts.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Stop the server: stop accepting, close every client with 1001 and
    /// let queued data flush (up to `close_timeout`), join every thread,
    /// deliver each `Disconnect`, then end the event stream so that a
    /// `for event in server.events()` loop finishes. Calling it again
    /// while it runs waits for it to finish, then does nothing. Called
    /// from a closure (on a pool worker), it starts the shutdown on a
    /// thread of its own and returns at once. In the main-loop style, a client's messages that come
    /// after its close frame while the event channel is a whole
    /// `event_queue_bytes` behind, or its own unconsumed events are at the
    /// hard limit, are discarded (and counted). It waits
    /// for every closure running to return: a closure
    /// that waits for the thread calling `shutdown` (or for anything that
    /// thread holds) makes it wait for good.
    pub fn shutdown(&self) {
        self.shared.shutdown();
    }
}

impl<T> fmt::Debug for WebSocketServer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebSocketServer")
            .field("local_addr", &self.shared.local_addr)
            .finish_non_exhaustive()
    }
}

impl<T> Drop for WebSocketServer<T> {
    fn drop(&mut self) {
        // `shutdown` needs `T: Send + Sync + 'static`, which every server
        // has (the builder requires it); the bound cannot be repeated on
        // Drop, so the call goes through a function pointer stored at
        // start.
        (self.shared.shutdown_fn)(&self.shared);
    }
}

/// A cloneable, `Send + Sync` handle on a running server, for sending
/// from any thread. It does not keep the server alive: once the server is
/// gone, every call that returns a `Result` fails with [`Error::Closed`];
/// `broadcast` and `publish` reach nobody and return an empty report, as
/// when there is nobody to reach ([`is_running`](ServerHandle::is_running)
/// tells the two apart), and the counts are zero.
pub struct ServerHandle<T = ()> {
    shared: Weak<Shared<T>>,
}

impl<T> Clone for ServerHandle<T> {
    fn clone(&self) -> Self {
        ServerHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<T> fmt::Debug for ServerHandle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerHandle").finish_non_exhaustive()
    }
}

impl<T: Send + Sync + 'static> ServerHandle<T> {
    pub(crate) fn from_weak(shared: Weak<Shared<T>>) -> ServerHandle<T> {
        ServerHandle { shared }
    }

    fn shared(&self) -> Result<Arc<Shared<T>>> {
        self.shared.upgrade().ok_or(Error::Closed)
    }

    /// Send a message to one client (see [`Client::send`]).
    ///
    /// # Errors
    ///
    /// The message is handed back with [`Error::Closed`] if the client is
    /// gone (this server never reuses ids, so a late send can never reach
    /// someone else), or [`Error::Backpressure`] if its queue is over the
    /// hard limit ([`Error::ServerBackpressure`] if over its share of
    /// `max_queued_bytes`). Ids are unique per server only: one taken from another
    /// server can name a client of this one.
    pub fn send(
        &self,
        id: ClientId,
        message: impl Into<Message>,
    ) -> std::result::Result<SendStatus, SendError> {
        let message = message.into();
        match self.shared.upgrade() {
            Some(shared) => send(&shared, id, message, None),
            None => Err(SendError::new(Error::Closed, message)),
        }
    }

    /// Send a message to one client, waiting up to `timeout` for room (see
    /// [`Client::send_timeout`]).
    ///
    /// # Errors
    ///
    /// As [`send`](ServerHandle::send), once the time is up.
    pub fn send_timeout(
        &self,
        id: ClientId,
        message: impl Into<Message>,
        timeout: Duration,
    ) -> std::result::Result<SendStatus, SendError> {
        let message = message.into();
        match self.shared.upgrade() {
            Some(shared) => send(&shared, id, message, Some(timeout)),
            None => Err(SendError::new(Error::Closed, message)),
        }
    }

    /// Send a message to every connected client. The frame is encoded once
    /// and shared by all the queues.
    pub fn broadcast(&self, message: impl Into<Message>) -> Broadcast {
        match self.shared() {
            Ok(s) => broadcast(&s, &message.into()),
            Err(_) => Broadcast::default(),
        }
    }

    /// Publish a message to every subscriber of `topic` (see
    /// [`Client::subscribe`]). It is framed, and compressed, once and the
    /// one buffer shared by every subscriber's queue. Every subscriber
    /// sees a topic's messages in the same order; a slow subscriber gets
    /// the per-client flow control (the copy is refused and counted, or
    /// the client closed, per [`slow_client_policy`](Builder::slow_client_policy)),
    /// and never slows the others. Returns the per-client counts.
    pub fn publish(&self, topic: &str, message: impl Into<Message>) -> Broadcast {
        match self.shared() {
            Ok(s) => s.publish(topic, &message.into(), None),
            Err(_) => Broadcast::default(),
        }
    }

    /// How many clients are subscribed to `topic` now. It takes the
    /// topic's lock, so it waits for a publish to the topic in progress
    /// to be queued to every subscriber (with compression in each one's
    /// own context, a big topic's may take a while).
    pub fn subscribers(&self, topic: &str) -> usize {
        self.shared
            .upgrade()
            .map_or(0, |s| s.topics.subscribers(topic))
    }

    /// Close one client with `code` and `reason` (see [`Client::close`]).
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] if the client is gone or closing;
    /// [`Error::InvalidInput`] for a code that may not be sent or a reason
    /// over 123 bytes.
    pub fn close(&self, id: ClientId, code: CloseCode, reason: &str) -> Result<()> {
        let shared = self.shared()?;
        with_conn(&shared, id, |conn| {
            conn.close_and_flush(&shared, code, reason)
        })
        .unwrap_or(Err(Error::Closed))
    }

    /// Ping one client.
    ///
    /// # Errors
    ///
    /// As [`Client::ping`].
    pub fn ping(&self, id: ClientId) -> Result<()> {
        let shared = self.shared()?;
        with_conn(&shared, id, |conn| conn.send_user_ping(&shared)).unwrap_or(Err(Error::Closed))
    }

    /// The client with this id, if connected.
    pub fn client(&self, id: ClientId) -> Option<Client<T>> {
        let shared = self.shared.upgrade()?;
        shared.registry.get(id).map(|c| c.client.clone())
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.shared.upgrade().map_or(0, |s| s.registry.open_count())
    }

    /// Whether the server still runs: false once its shutdown has begun,
    /// or it is gone. A `broadcast` or `publish` that found nobody returns
    /// the same empty report either way; this, asked after it, tells a
    /// stopped server from an empty topic (a shutdown that began between
    /// the two calls reads as stopped).
    pub fn is_running(&self) -> bool {
        self.shared
            .upgrade()
            .is_some_and(|s| !s.stopping.load(std::sync::atomic::Ordering::Acquire))
    }

    /// A snapshot of the server's counters (all zero once it is gone).
    pub fn stats(&self) -> Stats {
        self.shared
            .upgrade()
            .map_or_else(Stats::default, |s| s.stats())
    }

    /// Shut the server down, as [`WebSocketServer::shutdown`] does. Called
    /// from a closure on a pool worker, it starts the shutdown on a new
    /// thread and returns at once (a worker cannot wait for the pool it
    /// belongs to).
    pub fn shutdown(&self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.shutdown();
        }
    }
}

/// What a broadcast did, counted per client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Broadcast {
    /// Clients whose kernel buffer took the whole frame.
    pub written: usize,
    /// Clients for which some of the frame waits in their queue.
    pub queued: usize,
    /// Clients that did not get this message for want of room: over
    /// their `max_backpressure`, or the server over `max_queued_bytes`
    /// ([`Error::is_backpressure`]).
    pub dropped: usize,
    /// Clients that were closing and could not be sent to.
    pub closed: usize,
}

/// Run `f` on the connection of client `id`, if it is open. The lookup's
/// hold may turn out to be the record's last (the client left while `f`
/// ran, a `send_timeout` waiting, say): the record, and the user's `Drop`
/// for the client's data with it, is then let go on a worker, guarded, not
/// on the caller's thread (perhaps another client's closure, which a panic
/// there would close).
fn with_conn<T: Send + Sync + 'static, R>(
    shared: &Arc<Shared<T>>,
    id: ClientId,
    f: impl FnOnce(&Arc<crate::runtime::conn::Conn<T>>) -> R,
) -> Option<R> {
    let conn = shared.registry.get(id)?;
    let result = f(&conn);
    poller::let_go(shared, conn);
    Some(result)
}

fn send<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    id: ClientId,
    message: Message,
    timeout: Option<Duration>,
) -> std::result::Result<SendStatus, SendError> {
    let Some(conn) = shared.registry.get(id) else {
        return Err(SendError::new(Error::Closed, message));
    };
    let result = match timeout {
        None => conn.send_message(shared, message),
        Some(t) => {
            let deadline = Instant::now()
                .checked_add(t)
                .unwrap_or_else(crate::runtime::handshake::far_future);
            conn.send_message_until(shared, message, deadline)
        }
    };
    // As `with_conn` does.
    poller::let_go(shared, conn);
    result
}

/// Configures and starts a [`WebSocketServer`]. Every setter's doc gives
/// its default.
#[must_use = "a Builder does nothing until `start` is called"]
pub struct Builder<T = ()> {
    config: Config,
    init: Box<InitFn<T>>,
    handlers: Handlers<T>,
    bridge: Option<Box<dyn Bridge>>,
}

impl<T> fmt::Debug for Builder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("config", &self.config)
            .field("bridge", &self.bridge.is_some())
            .finish_non_exhaustive()
    }
}

impl<T: Send + Sync + 'static> Builder<T> {
    fn with_init(init: Box<InitFn<T>>) -> Builder<T> {
        Builder {
            config: Config::default(),
            init,
            handlers: Handlers::default(),
            bridge: None,
        }
    }

    /// Most connections at once, handshakes included; the next is answered
    /// `503`. Default: 1,000,000 (the process fd limit is the real bound).
    pub fn max_connections(mut self, n: usize) -> Self {
        self.config.max_connections = n;
        self
    }

    /// Largest incoming message; a bigger one closes the connection with
    /// 1009. Default: 1 MiB.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.config.max_message_size = bytes;
        self
    }

    /// Largest incoming frame payload (1009 over it). Default: the same as
    /// `max_message_size`.
    pub fn max_frame_size(mut self, bytes: usize) -> Self {
        self.config.max_frame_size = Some(bytes);
        self
    }

    /// Most frames one incoming message may be split into (1009 over it).
    /// Default: 131,072.
    pub fn max_fragments(mut self, n: u32) -> Self {
        self.config.max_fragments = n;
        self
    }

    /// Largest upgrade request; a bigger one is answered `431` (`414` if
    /// its request line alone is bigger). Empty lines before the request
    /// line are skipped, and count. Default: 16 KiB. A request of more
    /// than [`MAX_HEADERS`](crate::proto::handshake::MAX_HEADERS) (64)
    /// header lines (an upgrade, or one for [`on_http`](Builder::on_http))
    /// is answered `431` too, whatever its size: that count is fixed.
    pub fn max_handshake_bytes(mut self, bytes: usize) -> Self {
        self.config.max_handshake_bytes = bytes;
        self
    }

    /// Time a client has to send its whole upgrade request; then it is
    /// answered `408` and closed. It also bounds the writing of an
    /// [`on_http`](Builder::on_http) answer, but not the client-init
    /// strategy's run. Default: 10 s.
    ///
    /// After a plain HTTP answer (a refusal, an `on_http` page) to a
    /// client that may still be sending (part of a head; a head that
    /// cannot be read as HTTP/1, so where it ends is not known; a body
    /// announced and not all come, or chunked; bytes after its request),
    /// the server shuts its side and reads and drops what comes until the
    /// client closes, for at most this long again, counted from the answer
    /// (a lingering close): closing with the client's bytes unread would
    /// reset the connection, which can destroy the answer before the
    /// client reads it. Such a client holds its connection slot meanwhile,
    /// so one answered near its deadline holds it up to twice this long. A
    /// client that sent nothing is closed at once after its `408`. Not
    /// lingered: the `503`s of [`max_connections`](Builder::max_connections),
    /// [`max_connections_per_ip`](Builder::max_connections_per_ip), out of
    /// file descriptors or when the poller cannot take the socket; answers
    /// during shutdown; and an answer the socket did not take whole in one
    /// write (the connection is then closed).
    pub fn handshake_timeout(mut self, t: Duration) -> Self {
        self.config.handshake_timeout = t;
        self
    }

    /// Ping a client silent for this long; `None` disables pings. Default:
    /// 30 s. When both are set, it must end before `idle_timeout` with two
    /// keepalive ticks to spare (a ping goes out up to a tick late, and its
    /// pong must come back), or `start` refuses the settings: every silent
    /// but healthy client would be closed before its ping. With pings off,
    /// `idle_timeout` still closes a client silent for that long: turn it
    /// off too to keep silent clients. Keepalive deadlines are rounded up to a thirty-second of the
    /// shorter of this and `idle_timeout` (at most 1 s), so that clients
    /// due at nearly the same time are pinged together. While only pongs
    /// are arriving, the readiness loop pauses 200 µs between waits to
    /// gather them, so an event arriving then may wait that much longer.
    pub fn ping_interval(mut self, t: Option<Duration>) -> Self {
        self.config.ping_interval = t;
        self
    }

    /// Close (1001) a client silent for this long; `None` never does.
    /// Default: 75 s. Rounded up like `ping_interval`'s deadlines (at most
    /// 1 s late). A shorter idle timeout needs a shorter `ping_interval`
    /// (or none) too: with the default 30 s ping, anything under about
    /// 32 s is refused at `start` (see `ping_interval`).
    pub fn idle_timeout(mut self, t: Option<Duration>) -> Self {
        self.config.idle_timeout = t;
        self
    }

    /// Time a peer has to answer our close frame before the TCP connection
    /// is dropped. Default: 5 s.
    pub fn close_timeout(mut self, t: Duration) -> Self {
        self.config.close_timeout = t;
        self
    }

    /// The hard limit on what is queued to one client, counted as
    /// [`high_water`](Builder::high_water) counts it (each queued piece
    /// 64 B more than its bytes, for what it costs in memory; a frame is
    /// one piece, or two when its payload is queued apart): past it
    /// `send` refuses with
    /// [`Error::Backpressure`] (or, per
    /// [`slow_client_policy`](Builder::slow_client_policy), the client is
    /// closed), and so does the user's `ping` (the policy does not apply
    /// to it). The limit in force is at least `high_water +
    /// max_message_size + 1 KiB`, so that a reply to any message fits:
    /// only fan-out (and, from a main loop, replies larger than their
    /// messages) can meet it. With compression (the `deflate` feature)
    /// that may send a message larger than it is (context takeover, or
    /// `skip_incompressible(false)`), it is raised by what compression can
    /// add too: an eighth of `max_message_size` and a little (nine bits a
    /// byte at worst, and the blocks' headers). Default: 1 MiB (so 1 MiB + 129 KiB with
    /// the other defaults; [`Config::max_backpressure`] tells).
    pub fn max_backpressure(mut self, bytes: usize) -> Self {
        self.config.max_backpressure = bytes;
        self
    }

    /// High-water mark, in bytes a client holds (queued to it, each queued
    /// frame counted 64 B more for what it costs in memory, 128 B when its
    /// payload is queued apart from its header, plus its
    /// events the main loop has not consumed): at it, the server stops
    /// reading from that client and dispatching its messages until it is
    /// down to [`low_water`](Builder::low_water). Checked between
    /// messages. Default: 128 KiB.
    pub fn high_water(mut self, bytes: usize) -> Self {
        self.config.high_water = bytes;
        self
    }

    /// Low-water mark: a client paused at high water is read again once it
    /// holds this much or less, and a [`Drain`](Event::Drain) is due if a
    /// send to it was refused. Must be below `high_water`. Default:
    /// 32 KiB.
    pub fn low_water(mut self, bytes: usize) -> Self {
        self.config.low_water = bytes;
        self
    }

    /// Worker threads, 1 to 4,096. Default: twice the number of CPUs (4 if
    /// unknown).
    ///
    /// Most of a worker's time goes to system calls, and on a busy machine
    /// the scheduler sometimes puts two of them on one CPU. With twice as
    /// many workers as CPUs, a broadcast still has a sender on every CPU:
    /// with one per CPU, the slowest of 20 broadcasts to 10,000 clients
    /// took 76-124 ms, with two per CPU 64-76 ms.
    pub fn workers(mut self, n: usize) -> Self {
        self.config.workers = n;
        self
    }

    /// Most connections (handshakes included) from one IPv4 address, or
    /// one IPv6 /64 (which one host or one network is given whole, so a
    /// client could otherwise use as many addresses as it likes); more
    /// are answered `503`. IPv4 clients of a dual-stack socket count by
    /// their IPv4 address, and those of a translator (64:ff9b::/96) or
    /// of Teredo (2001::/32) by their whole IPv6 address. Behind a proxy every client has the proxy's
    /// address, so leave it off there. Default: no limit.
    pub fn max_connections_per_ip(mut self, n: usize) -> Self {
        self.config.max_connections_per_ip = n;
        self
    }

    /// The send buffer to ask of the kernel for each client's socket
    /// (`SO_SNDBUF`, set on the listening socket at `start`, and on each
    /// client's socket as it is accepted), or `None` to leave its size to
    /// the kernel. Default: `None`.
    ///
    /// No budget of the server counts what the kernel holds for a client
    /// that does not read: left to itself, Linux grows a socket's send
    /// buffer up to `net.ipv4.tcp_wmem`'s largest (4 MiB by default),
    /// and over loopback (a proxy on the same host) the kernel took
    /// 2.99 MB for a client that never reads, where `Some(65_536)` held
    /// it to 100 KB (`tests/limits.rs`, counting the bytes the kernel
    /// took from the server). A thousand such clients sent a
    /// few large messages each (a fan-out) can take the host's TCP memory
    /// to its pressure threshold (`net.ipv4.tcp_mem`), where every
    /// socket's buffers shrink: clients that do read then fall behind,
    /// and what is sent to them is refused at their limits. Set it where
    /// untrusted clients are sent much (a topic anyone may subscribe to).
    ///
    /// A fixed size stops the kernel growing the buffer, which clients far
    /// away need for speed: at most about a buffer's worth is in flight,
    /// so on Linux a client 50 ms away is sent about 5 MB/s at most at
    /// `131_072` (by that arithmetic; not measured). Over loopback it
    /// slowed the 64 KiB echo by a tenth to a half (four pairs; the
    /// README's figures). Linux doubles the value (the allowance for its
    /// overhead), takes at least about 4.6 KB, and caps it at
    /// `net.core.wmem_max` (212,992 by default); macOS, FreeBSD and
    /// DragonFly refuse a value over their `kern.ipc.maxsockbuf` (the
    /// other BSDs have limits of their own), and `start` then fails with
    /// [`Error::Io`]. Known on Linux, Android, macOS, iOS and
    /// the BSDs; elsewhere `start` fails with an `Unsupported` error.
    /// Must be at least 1 and at most 1 GiB.
    pub fn kernel_send_buffer(mut self, bytes: Option<usize>) -> Self {
        self.config.kernel_send_buffer = bytes;
        self
    }

    /// Most bytes held for unfinished incoming messages, all clients
    /// together. Only bytes received count, never sizes a frame header
    /// announces (the buffers they are in grow by doubling, so they may
    /// take up to twice as much memory). Past it, the clients holding the most are closed with
    /// 1009, largest first, until the rest fit, whoever crossed the line.
    /// (Input a paused client read but has not parsed, at most one read
    /// each, is counted apart, in `stats().unparsed_in_bytes`; once that
    /// reaches a quarter of this budget, reads take at most 4 KiB each,
    /// so a client paused meanwhile keeps at most that.) Must not be 0.
    /// Default: 256 MiB.
    pub fn max_buffered_bytes(mut self, bytes: usize) -> Self {
        self.config.max_buffered_bytes = bytes;
        self
    }

    /// Most bytes queued to clients, all clients together: what `send`,
    /// `broadcast` and `publish` have queued and the kernel has not taken
    /// yet. A frame shared by many queues (a broadcast's, a publish's)
    /// counts once, and a client's queue counts only once it holds more
    /// than 16 KiB (bytes, and 64 B a queued piece), so that clients that
    /// keep up never touch the count. Past it, a data frame is refused to
    /// each client whose queue would, with it, hold more than its share
    /// (the budget divided among the open connections; a queue holding
    /// no more than `low_water` is never refused;
    /// a queue is judged by all it holds, shared frames included, and a
    /// shared frame adds only its place to it):
    /// [`Error::ServerBackpressure`](crate::Error::ServerBackpressure),
    /// handing the message back, with a `Drain` once that client's queue
    /// is down to `low_water` (under [`SlowClientPolicy::Close`], the
    /// client is closed with 1008, as over its own hard limit; a client
    /// refused a send is not read until its queue is down to `low_water`).
    /// A client under its share may still fill up to it, and one with
    /// `low_water` or less queued still takes one frame, so the queues
    /// hold at most the budget, plus as much again (or `low_water` a
    /// client, if that is more), plus a frame a client. `stats().queued_budget_bytes` is what it counts now.
    /// The budget in force is at least one client's hard limit
    /// ([`max_backpressure`](Builder::max_backpressure)), so that a client
    /// alone meets its own limit first ([`Config::max_queued_bytes`]
    /// tells). Must not be 0. Default: 256 MiB.
    pub fn max_queued_bytes(mut self, bytes: usize) -> Self {
        self.config.max_queued_bytes = bytes;
        self
    }

    /// What a send over `max_backpressure` does to the client. Default:
    /// [`SlowClientPolicy::Refuse`].
    pub fn slow_client_policy(mut self, policy: SlowClientPolicy) -> Self {
        self.config.slow_client_policy = policy;
        self
    }

    /// Budget of the event channel, in bytes (payloads plus 144 bytes an
    /// event, and for a client's messages read together, what their
    /// batch's list takes beyond that: at most 251 bytes a batch on 64-bit
    /// targets), all clients together. A main loop this far behind makes
    /// the server stop dispatching messages until it catches up to half of
    /// it, and one twice as far behind (connects and disconnects are
    /// always queued) makes it stop accepting connections until it is
    /// under that again. While it waits for half, no client reads past
    /// those that stopped for it. Nothing is dropped, but for these cases:
    /// a client whose close frame is queued (by `close`, an idle close or
    /// `shutdown`) is read on meanwhile, to find its answering Close, and
    /// from its first message that finds the channel this far behind, or
    /// its own unconsumed events at the hard limit (`max_backpressure`), on,
    /// its messages are discarded (as a browser drops every message once
    /// `close()` is called); and a connection torn down (a write to it
    /// failed, its close timed out, shutdown forced it) delivers what it
    /// had read up to those same limits and discards the rest. Both are
    /// counted in `stats().messages_discarded`. Unused in the closure style.
    /// Default: 64 MiB.
    pub fn event_queue_bytes(mut self, bytes: usize) -> Self {
        self.config.event_queue_bytes = bytes;
        self
    }

    /// Most topics one client may be subscribed to; past it
    /// [`Client::subscribe`] returns [`Error::TopicLimit`]. Default: 256.
    pub fn max_topics_per_client(mut self, n: usize) -> Self {
        self.config.max_topics_per_client = n;
        self
    }

    /// Longest topic name, in bytes ([`Error::TopicLimit`] past it).
    /// Default: 256.
    pub fn max_topic_len(mut self, bytes: usize) -> Self {
        self.config.max_topic_len = bytes;
        self
    }

    /// Most topics the server holds at once (a topic exists while it has
    /// a subscriber); a subscription that would make one more returns
    /// [`Error::TopicLimit`]. Default: 1,000,000.
    pub fn max_topics(mut self, n: usize) -> Self {
        self.config.max_topics = n;
        self
    }

    /// In the closure style (an [`on_message`](Builder::on_message)
    /// closure is registered), also send the kinds of event that have no
    /// closure (`Connect`, `Drain`, `Disconnect`) to the event channel.
    /// Off by default: a program that registers closures usually never
    /// reads the channel, and events waiting there forever would grow the
    /// server by every connection it ever had. Turn it on only if you
    /// read them.
    pub fn queue_unhandled_events(mut self, on: bool) -> Self {
        self.config.queue_unhandled_events = on;
        self
    }

    /// Subprotocols the server speaks, most preferred first. The first of
    /// them that the client offered in `Sec-WebSocket-Protocol` is chosen
    /// (unless the handshake strategy chose one) and is visible as
    /// [`Client::protocol`]. A client that offers none of them is still
    /// accepted, with no protocol: RFC 6455 leaves it to the client to
    /// leave. Default: none.
    pub fn protocols<I, S>(mut self, preference: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config.protocols = preference.into_iter().map(Into::into).collect();
        self
    }

    /// Accept upgrades only from these origins (compared without regard to
    /// ASCII case, e.g. `"https://chat.example.com"`); any other `Origin`
    /// is answered `403`, as is a request with two `Origin` lines of which
    /// one is not allowed. A request without `Origin` (not from a browser)
    /// is let through. Default: any origin.
    pub fn allowed_origins<I, S>(mut self, origins: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config.allowed_origins = Some(origins.into_iter().map(Into::into).collect());
        self
    }

    /// Believe the reverse proxy's [`forwarded_header`](Builder::forwarded_header)
    /// as the client's address, exposed as [`Client::forwarded_addr`] and
    /// [`Client::ip`]. Turn on only when clients can reach the server
    /// through the proxy alone, or they can claim any address. Default:
    /// off.
    pub fn trust_proxy(mut self, on: bool) -> Self {
        self.config.trust_proxy = on;
        self
    }

    /// The header a trusted proxy reports the client's address in.
    /// `X-Forwarded-For` (the default) is read at its last entry, the one
    /// the proxy appended, so what a client sent in it is ignored; every
    /// common proxy appends to it (NGINX's `$proxy_add_x_forwarded_for`,
    /// HAProxy's `option forwardfor`, cloud load balancers). `Forwarded`
    /// (RFC 7239) is read the same way, at the `for=` of its last element.
    /// Name another header, such as `X-Real-IP`, only if the proxy always
    /// overwrites it: it is believed only when it comes once. What is
    /// read is what the nearest proxy wrote, at the end of the header:
    /// behind a chain of proxies it is the previous hop's address, and a
    /// proxy that puts its header before the client's own lets the client
    /// choose it. Entries may
    /// carry a port (`1.2.3.4:5678`, `[::1]:80`); an obfuscated or
    /// `unknown` one gives no address.
    pub fn forwarded_header(mut self, name: impl Into<String>) -> Self {
        self.config.forwarded_header = name.into();
        self
    }

    /// permessage-deflate (RFC 7692, feature `deflate`): `Some` accepts a
    /// client's offer with these settings, `None` declines every offer.
    /// Default: accepted, with no context takeover either way (so idle
    /// connections hold no compression state), messages from 256 bytes
    /// compressed at level 6, and incoming messages inflated only up to
    /// `max_message_size` (1009 past it).
    #[cfg(feature = "deflate")]
    pub fn compression(mut self, settings: Option<crate::Compression>) -> Self {
        self.config.compression = settings;
        self
    }

    /// Answer plain HTTP requests (those without `Upgrade: websocket`, and
    /// every HTTP/1.0 request, whose `Upgrade` is ignored) with `f`, run
    /// on a pool worker, so one port can serve a page and the socket. The
    /// connection is closed after the response (a request body is not
    /// read for `f`: it is read and dropped after the answer; see
    /// [`handshake_timeout`](Builder::handshake_timeout)). Without it
    /// they get `426 Upgrade Required` (`405`, or `400` if malformed or
    /// HTTP/1.0).
    /// A panic in `f` is answered `500`. The whole answer must be
    /// written by the `handshake_timeout` counted from the connection's
    /// accept: a client too slow to read it by then is cut off midway.
    pub fn on_http(mut self, f: impl Fn(&Request) -> HttpResponse + Send + Sync + 'static) -> Self {
        self.handlers.http = Some(Box::new(f));
        self
    }

    /// Run `f` on a pool worker when a client connects, instead of sending
    /// [`Event::Connect`]. A panic in it closes the client with 1011.
    pub fn on_connect(mut self, f: impl Fn(&Client<T>) + Send + Sync + 'static) -> Self {
        self.handlers.connect = Some(Box::new(f));
        self
    }

    /// Run `f` on a pool worker for each message, instead of sending
    /// [`Event::Message`]. A client's messages reach it one at a time, in
    /// order. A panic in it closes the client with 1011.
    pub fn on_message(mut self, f: impl Fn(&Client<T>, Message) + Send + Sync + 'static) -> Self {
        self.handlers.message = Some(Box::new(f));
        self
    }

    /// Run `f` on a pool worker when a client's queue is down to low water
    /// after a send was refused for backpressure, instead of sending
    /// [`Event::Drain`]. A panic in it closes the client with 1011.
    pub fn on_drain(mut self, f: impl Fn(&Client<T>) + Send + Sync + 'static) -> Self {
        self.handlers.drain = Some(Box::new(f));
        self
    }

    /// Run `f` on a pool worker when a client is gone, instead of sending
    /// [`Event::Disconnect`]; it gets the close frame and the error, as the
    /// event does.
    pub fn on_disconnect(
        mut self,
        f: impl Fn(&Client<T>, &CloseFrame, Option<&Error>) + Send + Sync + 'static,
    ) -> Self {
        self.handlers.disconnect = Some(Box::new(f));
        self
    }

    /// Run `f` on the thread where it happened when something goes wrong
    /// that no other event reports, instead of sending [`Event::Error`]:
    /// a closure of yours or the client-init strategy panicked
    /// ([`Error::HandlerPanicked`]; the client is closed with 1011, or
    /// answered `500`), or the server recovered from a failure of its own
    /// ([`Error::Internal`], [`Error::Io`]). The library never writes to
    /// stderr itself; a panic stays visible through Rust's panic hook,
    /// which prints it unless you install your own. A panic in `f` is
    /// counted and dropped. `f` may run on the readiness loop's thread
    /// (for a failing `epoll_wait`), where every connection's I/O waits
    /// for it: keep it short, and do not block in it (`send_timeout`
    /// included).
    pub fn on_error(
        mut self,
        f: impl Fn(Option<&Client<T>>, &Error) + Send + Sync + 'static,
    ) -> Self {
        self.handlers.error = Some(Box::new(f));
        self
    }

    /// Share topics with other servers through a message engine, such as
    /// `RedisBridge` (feature `redis`, in [`bridge`](crate::bridge)): a
    /// publish here also reaches the subscribers of every server on the
    /// same engine, and theirs reach the subscribers here. See the
    /// [`bridge`](crate::bridge) module for what is guaranteed.
    pub fn bridge(mut self, bridge: impl Bridge) -> Self {
        self.bridge = Some(Box::new(bridge));
        self
    }

    /// What the bridge's channel names start with (default `enjent:`):
    /// servers with the same prefix on one engine share their topics;
    /// another prefix keeps an application apart, as long as neither
    /// prefix plus `t:` starts the other (`app` and `appt:` share the
    /// channel `appt:t:x`, `app`'s topic `t:x` and `appt:`'s topic `x`; so
    /// do `app:` and `app:t:`). A topic's channel is the prefix, `t:`, then
    /// the topic.
    pub fn bridge_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.bridge_prefix = prefix.into();
        self
    }

    /// Bytes of publishes that may wait for the bridge's engine (default
    /// 8 MiB): while the engine is slow or down, publishes wait here; what
    /// does not fit is dropped and counted
    /// ([`BridgeStats::dropped`](crate::stats::BridgeStats::dropped)),
    /// and local delivery goes on.
    pub fn bridge_outbox_bytes(mut self, bytes: usize) -> Self {
        self.config.bridge_outbox_bytes = bytes;
        self
    }

    /// Run `f` on the bridge's thread when the bridge goes up or down or
    /// misses messages, instead of sending [`Event::Bridge`]. A panic in
    /// it is reported as [`Error::HandlerPanicked`].
    pub fn on_bridge(mut self, f: impl Fn(&BridgeEvent) + Send + Sync + 'static) -> Self {
        self.handlers.bridge = Some(Box::new(f));
        self
    }

    /// Bind `addr` and start the accept thread, the poller thread and the
    /// pool.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a setting that cannot work;
    /// [`Error::Bind`] if the address cannot be listened on; [`Error::Io`]
    /// if the poller or a thread cannot be created, or the system refuses
    /// [`kernel_send_buffer`](Builder::kernel_send_buffer) (`Unsupported`
    /// where it is not known).
    pub fn start(self, addr: impl ToSocketAddrs) -> Result<WebSocketServer<T>> {
        self.config.validate().map_err(Error::InvalidConfig)?;
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|e| Error::Bind {
                addr: "(unresolved)".into(),
                source: e,
            })?
            .collect();
        let listener = TcpListener::bind(&addrs[..]).map_err(|e| Error::Bind {
            addr: addrs
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            source: e,
        })?;
        crate::runtime::acceptor::widen_backlog(&listener);
        let listener_nodelay = crate::runtime::acceptor::set_listener_nodelay(&listener);
        if let Some(bytes) = self.config.kernel_send_buffer {
            crate::runtime::acceptor::set_send_buffer(&listener, bytes).map_err(|e| {
                Error::Io(std::io::Error::new(
                    e.kind(),
                    format!("kernel_send_buffer of {bytes} bytes: {e}"),
                ))
            })?;
        }
        let local_addr = listener.local_addr()?;
        #[cfg(target_os = "linux")]
        let accept_wake = listener
            .try_clone()
            .ok()
            .map(|l| std::net::TcpStream::from(std::os::fd::OwnedFd::from(l)));
        #[cfg(not(target_os = "linux"))]
        let accept_wake = None;
        let main_loop = self.handlers.message.is_none();
        let bridge = self.bridge.map(|engine| {
            Arc::new(crate::runtime::bridge::BridgeRt::new(
                engine,
                &self.config.bridge_prefix,
                self.config.bridge_outbox_bytes,
            ))
        });
        let (event_queue, rx) = events::EventQueue::new(
            self.config.event_queue_bytes,
            main_loop,
            self.config.queue_unhandled_events,
        );
        let config = self.config;
        let limits = Limits {
            max_message_size: config.max_message_size,
            max_frame_size: config.max_frame_size(),
            max_fragments: config.max_fragments,
        };
        // The pool starts its threads at once, and panics if one cannot be
        // made (too many workers for the process's limits).
        let pool = std::panic::catch_unwind(|| {
            threadpool::Builder::new()
                .num_threads(config.workers)
                .thread_name(crate::runtime::service::WORKER_NAME.into())
                .build()
        })
        .map_err(|_| {
            Error::Io(std::io::Error::other(format!(
                "could not start {} worker threads",
                config.workers
            )))
        })?;
        let poller = Poller::new()?;
        let shared = Arc::new(Shared {
            limits,
            edge: poller.supports_edge() && !config.oneshot_readiness,
            poller,
            pool,
            registry: registry::Registry::new(),
            timers: timer::Timers::new(),
            init: self.init,
            handlers: self.handlers,
            marks: flow::Marks::new(&config),
            events: event_queue,
            ready: Mutex::new(poller::ReadyQueue::default()),
            drained: parking_lot::Condvar::new(),
            topics: crate::runtime::topics::Topics::new(bridge.clone()),
            bridge: bridge.clone(),
            bridge_threads: Mutex::new(Vec::new()),
            room_waiters: AtomicUsize::new(0),
            awaited: Mutex::new(Vec::new()),
            room: Mutex::new(()),
            counters: Counters::new(config.max_queued_bytes(), config.low_water),
            buffered_in: AtomicUsize::new(0),
            condemned_in: AtomicUsize::new(0),
            budget_scan: parking_lot::Mutex::new(()),
            unparsed_in: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            local_addr,
            accept_wake: Mutex::new(accept_wake),
            started: Instant::now(),
            poller_stop: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
            shutdown_fn: |shared| shared.shutdown(),
            shutdown_lock: Mutex::new(false),
            shutdown_asked: AtomicBool::new(false),
            flushq: Mutex::new(Vec::new()),
            #[cfg(feature = "deflate")]
            contexts: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            config,
        });
        shared.topics.set_shared(Arc::downgrade(&shared));
        let events = Events::new(rx, Arc::clone(&shared));
        // Dropped on a failure below, the server shuts down what did
        // start: no thread is left serving a port nobody can stop.
        let server = WebSocketServer { shared, events };
        let shared = &server.shared;
        let s = Arc::clone(shared);
        let accept = std::thread::Builder::new()
            .name("enjent-accept".into())
            .spawn(move || acceptor::run(s, listener, listener_nodelay))?;
        shared.threads.lock().push(accept);
        let s = Arc::clone(shared);
        let poll = std::thread::Builder::new()
            .name("enjent-poller".into())
            .spawn(move || poller::run(s))?;
        shared.threads.lock().push(poll);
        if let Some(bridge) = &shared.bridge {
            for publisher in [true, false] {
                let (b, s) = (Arc::clone(bridge), Arc::downgrade(shared));
                let thread = std::thread::Builder::new()
                    .name(
                        if publisher {
                            "enjent-bridge-pub"
                        } else {
                            "enjent-bridge-sub"
                        }
                        .into(),
                    )
                    .spawn(move || {
                        if publisher {
                            crate::runtime::bridge::run_publisher(b, s)
                        } else {
                            crate::runtime::bridge::run_receiver(b, s)
                        }
                    })?;
                shared.bridge_threads.lock().push(thread);
            }
        }
        Ok(server)
    }
}

// The pool is only ever used through `&`, from many threads.
const _: fn() = || {
    fn sync<X: Sync + Send>() {}
    sync::<ThreadPool>();
};

#[cfg(test)]
mod tests {
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::sync::Arc;
    use std::time::Duration;

    use crate::runtime::testing;

    /// A lookup's hold on a client's record can outlast every other (the
    /// client leaves while a `send_timeout` to it waits, say): the record,
    /// with the user's `Drop` for the client's data, is then let go on a
    /// worker, guarded and reported, not on the caller's thread, which may
    /// be another client's closure.
    #[test]
    fn a_lookup_holding_a_gone_client_last_lets_go_of_it_on_a_worker() {
        let (server, reported) = testing::bomb_server();
        let shared = Arc::clone(server.shared());
        let (s, client) = testing::join(&server);
        let id = client.id();
        drop(client);
        let ran = catch_unwind(AssertUnwindSafe(|| {
            super::with_conn(&shared, id, |conn| {
                drop(s);
                testing::wait_gone(&server, id);
                // The teardown's own holds go a moment after.
                let t = std::time::Instant::now();
                while Arc::strong_count(conn) > 1 {
                    assert!(t.elapsed() < Duration::from_secs(10), "still held");
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        }));
        assert!(
            matches!(ran, Ok(Some(()))),
            "the user's Drop ran on the caller's thread"
        );
        crate::runtime::testing::expect_drop_reported(&reported);
    }
}
