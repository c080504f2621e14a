//! Connected clients: their id, address, user data, and sending to them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::error::{Error, Result, SendError};
use crate::message::{CloseCode, Message};
use crate::runtime::Shared;
use crate::runtime::conn::Conn;
use crate::server::ServerHandle;

/// A client's identity: unique for the server's whole lifetime, never
/// reused, so a late `send` can never reach a different client of that
/// server. Ids mean nothing to another server: every server's first
/// client is id 0's slot, so an id kept from one server (or from one
/// started earlier in this process) can name a client of another.
///
/// Ids are not sequential: an id names the server's slot for the
/// connection and how many connections that slot has held before, which
/// is how the server finds a client by id without a map.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(u64);

impl ClientId {
    pub(crate) fn new(n: u64) -> ClientId {
        ClientId(n)
    }

    /// The number behind the id (for logs and maps).
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Debug for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientId({})", self.0)
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What became of a message handed to `send`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendStatus {
    /// The kernel took the whole frame.
    Written,
    /// Part or all of it waits in the client's queue (under the hard
    /// limit, `max_backpressure`): it is written when the socket drains, or, for
    /// a send made while a worker is handling the client (from its own
    /// handler, or from any thread meanwhile), together with the other
    /// frames of that batch when the worker is done.
    Queued,
}

/// A connected client: its id, address and the user's `T`, and a way to
/// send to it. Cheap to clone; usable from any thread.
///
/// Holding a `Client` does not keep the connection open: once it is gone,
/// sending fails with [`Error::Closed`].
pub struct Client<T = ()> {
    inner: Arc<ClientInner<T>>,
}

struct ClientInner<T> {
    id: ClientId,
    peer: Peer,
    /// What few clients have (a forwarded address, a subprotocol, an IPv6
    /// peer address, bytes left undelivered when the connection ended),
    /// boxed so that the others do not pay for it: null, or made by
    /// `Box::into_raw`, at creation or by the first `add_unsent`. Once set
    /// it never changes, and it is freed only on drop.
    extra: AtomicPtr<Extra>,
    data: T,
    conn: Weak<Conn<T>>,
    shared: Weak<Shared<T>>,
}

/// The size of a client's handle (its shared part, with the user's `T`).
pub(crate) fn handle_size<T>() -> usize {
    std::mem::size_of::<ClientInner<T>>()
}

// An idle client's handle: five words, so that with the `Arc`'s counts it
// fits the allocator's 64 B class.
#[cfg(target_pointer_width = "64")]
const _: () = assert!(std::mem::size_of::<ClientInner<()>>() <= 40);

// The only unsafe code of this module: the `extra` box behind an atomic
// pointer, so that a client that has none pays one word, and one can be
// added to a shared client once, when its connection ends.
#[allow(unsafe_code)]
impl<T> ClientInner<T> {
    fn extra(&self) -> Option<&Extra> {
        // SAFETY: `extra` is null or a pointer from `Box::into_raw` that is
        // never changed nor freed while `self` is borrowed (see `Drop`).
        unsafe { self.extra.load(Ordering::Acquire).as_ref() }
    }

    /// The extra box, made now if the client had none.
    fn extra_or_new(&self) -> &Extra {
        if let Some(e) = self.extra() {
            return e;
        }
        let new = Box::into_raw(Box::new(Extra::default()));
        match self.extra.compare_exchange(
            std::ptr::null_mut(),
            new,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            // SAFETY: `new` came from `Box::into_raw` and is now `extra`,
            // which lives as long as `self` (see `extra`).
            Ok(_) => unsafe { &*new },
            Err(set) => {
                // SAFETY: `new` lost the race: it was never shared, and is
                // freed here once; `set` is `extra`, as above.
                drop(unsafe { Box::from_raw(new) });
                unsafe { &*set }
            }
        }
    }
}

#[allow(unsafe_code)]
impl<T> Drop for ClientInner<T> {
    fn drop(&mut self) {
        let extra = *self.extra.get_mut();
        if !extra.is_null() {
            // SAFETY: made by `Box::into_raw` and freed only here, once.
            drop(unsafe { Box::from_raw(extra) });
        }
    }
}

impl<T> ClientInner<T> {
    fn peer_addr(&self) -> SocketAddr {
        match self.peer {
            Peer::V4(ip, port) => SocketAddr::from((ip, port)),
            Peer::InExtra => self
                .extra()
                .and_then(|e| e.peer)
                // Not reached: an IPv6 peer is always in `extra`.
                .unwrap_or(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))),
        }
    }
}

impl<T> Clone for Client<T> {
    fn clone(&self) -> Self {
        Client {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<T> fmt::Debug for Client<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.inner.id)
            .field("peer", &self.inner.peer_addr())
            .finish_non_exhaustive()
    }
}

/// The peer's address: an IPv4 one in a word, an IPv6 one in `Extra`.
#[derive(Clone, Copy)]
enum Peer {
    V4(Ipv4Addr, u16),
    InExtra,
}

#[derive(Default)]
struct Extra {
    forwarded: Option<IpAddr>,
    protocol: Option<Box<str>>,
    peer: Option<SocketAddr>,
    /// Queued bytes that were never delivered, once the connection is
    /// gone.
    unsent: AtomicUsize,
}

/// What the handshake settled about a client, besides its data.
pub(crate) struct Origin {
    pub(crate) peer: SocketAddr,
    pub(crate) forwarded: Option<IpAddr>,
    pub(crate) protocol: Option<Box<str>>,
}

impl<T: Send + Sync + 'static> Client<T> {
    pub(crate) fn new(
        id: ClientId,
        origin: Origin,
        data: T,
        conn: Weak<Conn<T>>,
        shared: Weak<Shared<T>>,
    ) -> Client<T> {
        Client {
            inner: Arc::new(ClientInner {
                id,
                peer: match origin.peer {
                    SocketAddr::V4(v4) => Peer::V4(*v4.ip(), v4.port()),
                    SocketAddr::V6(_) => Peer::InExtra,
                },
                extra: AtomicPtr::new(
                    if origin.forwarded.is_some()
                        || origin.protocol.is_some()
                        || origin.peer.is_ipv6()
                    {
                        Box::into_raw(Box::new(Extra {
                            forwarded: origin.forwarded,
                            protocol: origin.protocol,
                            peer: origin.peer.is_ipv6().then_some(origin.peer),
                            unsent: AtomicUsize::new(0),
                        }))
                    } else {
                        std::ptr::null_mut()
                    },
                ),
                data,
                conn,
                shared,
            }),
        }
    }

    pub(crate) fn conn(&self) -> Option<Arc<Conn<T>>> {
        self.inner.conn.upgrade()
    }

    /// The address of the client's connection record, to compare with
    /// (no count touched; the record may be gone).
    pub(crate) fn conn_addr(&self) -> usize {
        self.inner.conn.as_ptr() as usize
    }

    pub(crate) fn sub_unsent(&self, bytes: usize) {
        if let Some(e) = self.inner.extra() {
            let _ = e
                .unsent
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_sub(bytes))
                });
        }
    }

    /// Bytes counted as never delivered (by a teardown, under the
    /// connection's `io` lock).
    pub(crate) fn unsent(&self) -> usize {
        self.inner
            .extra()
            .map_or(0, |e| e.unsent.load(Ordering::Relaxed))
    }

    pub(crate) fn add_unsent(&self, bytes: usize) {
        if bytes > 0 {
            let e = self.inner.extra_or_new();
            e.unsent.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// The client's id.
    pub fn id(&self) -> ClientId {
        self.inner.id
    }

    /// The address of the TCP peer (behind a reverse proxy, the proxy's).
    pub fn peer_addr(&self) -> SocketAddr {
        self.inner.peer_addr()
    }

    /// The client's address as the reverse proxy reported it in
    /// its forwarded header (the last `X-Forwarded-For` entry unless
    /// [`forwarded_header`](crate::Builder::forwarded_header) names
    /// another); `None` unless the server was
    /// built with [`trust_proxy`](crate::Builder::trust_proxy) and the
    /// request carried a valid one.
    pub fn forwarded_addr(&self) -> Option<IpAddr> {
        self.inner.extra().and_then(|e| e.forwarded)
    }

    /// The client's IP address: the forwarded one if trusted and present,
    /// else the TCP peer's.
    pub fn ip(&self) -> IpAddr {
        self.forwarded_addr().unwrap_or(self.peer_addr().ip())
    }

    /// The subprotocol agreed in the handshake, if any.
    pub fn protocol(&self) -> Option<&str> {
        self.inner.extra()?.protocol.as_deref()
    }

    /// The value the client-init strategy built for this client.
    pub fn data(&self) -> &T {
        &self.inner.data
    }

    /// Whether the connection is open for sending.
    pub fn is_open(&self) -> bool {
        self.inner.conn.upgrade().is_some_and(|c| c.can_send())
    }

    /// Send a message.
    ///
    /// It is written now if the socket takes it, else queued. Flow control
    /// (see the crate docs) guarantees that answering each message from
    /// this client with one message of at most its size is never refused
    /// for its queue while the client reads (in a closure, of up to
    /// `max_message_size`): the server stops reading a client whose queue
    /// passes high water. The server-wide budget (`max_queued_bytes`) can
    /// still refuse it while the server as a whole is over it.
    /// Sends beyond that (fan-out, a client that stopped reading) meet the
    /// hard limit, `max_backpressure`.
    ///
    /// # Errors
    ///
    /// The message is handed back in the [`SendError`], with
    /// [`Error::Backpressure`] if the client's queue is over the hard
    /// limit, or [`Error::ServerBackpressure`] if all clients' queues
    /// together are over `max_queued_bytes` and this one holds more than
    /// its share (in both cases a [`Drain`](crate::Event::Drain) event
    /// follows once its queue is down to low water, unless
    /// [`SlowClientPolicy::Close`](crate::SlowClientPolicy::Close) closes
    /// the client instead; [`Error::is_backpressure`] tells either), or
    /// [`Error::Closed`] if
    /// the client is gone or closing.
    pub fn send(&self, message: impl Into<Message>) -> std::result::Result<SendStatus, SendError> {
        // From one of its closures, with the job's references to the
        // connection and the server.
        crate::runtime::current::with_arcs(
            &self.inner.conn,
            &self.inner.shared,
            message.into(),
            |conn, shared, message| conn.send_message(shared, message),
        )
        .unwrap_or_else(|message| Err(SendError::new(Error::Closed, message)))
    }

    /// Send a message, waiting up to `timeout` for room in the client's
    /// queue if it is over the hard limit (or for the server's queues to
    /// be back within `max_queued_bytes`). Meant for threads outside the
    /// pool (a main loop, a producer thread); called from a closure on a
    /// pool worker it does not wait (the worker may be the one that would
    /// drain the queue) and behaves as [`send`](Client::send).
    ///
    /// On a main loop's thread the wait holds every client's events, not
    /// only this one's: keep `timeout` short there. A client that stopped
    /// reading ends it, at the latest, when `idle_timeout` (if set) and
    /// then `close_timeout` close it.
    ///
    /// # Errors
    ///
    /// As [`send`](Client::send), once the time is up.
    pub fn send_timeout(
        &self,
        message: impl Into<Message>,
        timeout: Duration,
    ) -> std::result::Result<SendStatus, SendError> {
        let message = message.into();
        match (self.inner.conn.upgrade(), self.inner.shared.upgrade()) {
            (Some(conn), Some(shared)) => {
                let deadline = Instant::now()
                    .checked_add(timeout)
                    .unwrap_or_else(crate::runtime::handshake::far_future);
                conn.send_message_until(&shared, message, deadline)
            }
            _ => Err(SendError::new(Error::Closed, message)),
        }
    }

    /// Bytes queued for this client and not yet handed to the kernel (as
    /// a browser's `WebSocket.bufferedAmount`). Once the client is gone,
    /// the bytes that were queued and never delivered: 0 if everything
    /// went out.
    pub fn buffered_amount(&self) -> usize {
        if let Some(conn) = self.inner.conn.upgrade() {
            let w = conn.io.lock();
            if !w.finished {
                return w.out.bytes();
            }
        }
        self.unsent()
    }

    /// Send a ping with an empty payload.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] if the client is gone or closing;
    /// [`Error::Backpressure`] or [`Error::ServerBackpressure`] if its
    /// queue, or the server's budget, would refuse a message of no bytes
    /// now: the ping is not sent, and a [`Drain`](crate::Event::Drain)
    /// follows as for a message (it is not counted dropped, and the
    /// slow-client policy does not apply).
    pub fn ping(&self) -> Result<()> {
        let conn = self.inner.conn.upgrade().ok_or(Error::Closed)?;
        let shared = self.inner.shared.upgrade().ok_or(Error::Closed)?;
        conn.send_user_ping(&shared)
    }

    /// Start the close handshake: messages already queued go first, then a
    /// close frame with `code` and `reason`. The client is disconnected when
    /// it answers, or after `close_timeout`. What it sends meanwhile is
    /// still delivered, unless (main-loop style) the event channel is a
    /// whole `event_queue_bytes` behind, or this client's own unconsumed
    /// events reach the hard limit: see `Stats::messages_discarded`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for a code that may not be sent or a reason
    /// over 123 bytes; [`Error::Closed`] if already closed or closing.
    pub fn close(&self, code: CloseCode, reason: &str) -> Result<()> {
        let conn = self.inner.conn.upgrade().ok_or(Error::Closed)?;
        let shared = self.inner.shared.upgrade().ok_or(Error::Closed)?;
        conn.close_and_flush(&shared, code, reason)
    }

    /// Subscribe to `topic`, so that every [`publish`](Client::publish)
    /// to it reaches this client. Returns whether the subscription is
    /// new. It ends with [`unsubscribe`](Client::unsubscribe) or when the
    /// client goes (before its `Disconnect` is emitted).
    ///
    /// # Errors
    ///
    /// [`Error::TopicLimit`] past `max_topic_len`, `max_topics_per_client`
    /// or `max_topics`; [`Error::InvalidInput`] for an empty name;
    /// [`Error::Closed`] if the client is gone.
    pub fn subscribe(&self, topic: &str) -> Result<bool> {
        let conn = self.inner.conn.upgrade().ok_or(Error::Closed)?;
        let shared = self.inner.shared.upgrade().ok_or(Error::Closed)?;
        shared.topics.subscribe(&shared, &conn, topic)
    }

    /// End the subscription to `topic`; whether there was one.
    pub fn unsubscribe(&self, topic: &str) -> bool {
        match (self.inner.conn.upgrade(), self.inner.shared.upgrade()) {
            (Some(conn), Some(shared)) => shared.topics.unsubscribe(&conn, topic),
            _ => false,
        }
    }

    /// Whether this client is subscribed to `topic`.
    pub fn is_subscribed(&self, topic: &str) -> bool {
        self.inner
            .shared
            .upgrade()
            .is_some_and(|s| s.topics.is_subscribed(self.inner.id, topic))
    }

    /// The topics this client is subscribed to, in the order it
    /// subscribed.
    pub fn topics(&self) -> Vec<String> {
        self.inner
            .shared
            .upgrade()
            .map_or_else(Vec::new, |s| s.topics.topics_of(self.inner.id))
    }

    /// Publish to every subscriber of `topic` except this client (as
    /// uWebSockets' `ws.publish`); see [`ServerHandle::publish`]. A
    /// thread's `send` and `publish` calls that reach the same client
    /// keep that thread's order.
    pub fn publish(&self, topic: &str, message: impl Into<Message>) -> crate::server::Broadcast {
        let Some(shared) = self.inner.shared.upgrade() else {
            return crate::server::Broadcast::default();
        };
        let conn = self.inner.conn.upgrade();
        shared.publish(topic, &message.into(), conn.as_deref())
    }

    /// A handle on the server this client belongs to, for broadcasting from
    /// a closure.
    pub fn server(&self) -> ServerHandle<T> {
        ServerHandle::from_weak(self.inner.shared.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(peer: &str, protocol: Option<&str>) -> Client<()> {
        Client::new(
            ClientId::new(7),
            Origin {
                peer: peer.parse().unwrap(),
                forwarded: None,
                protocol: protocol.map(Box::from),
            },
            (),
            Weak::new(),
            Weak::new(),
        )
    }

    /// Undelivered bytes are counted in the box the rare fields share,
    /// made by the first count if the client had none: threads counting
    /// at once race to make it, and none of their counts is lost.
    #[test]
    fn unsent_bytes_counted_from_many_threads_are_all_kept() {
        for (peer, protocol) in [
            ("127.0.0.1:5000", None),
            ("127.0.0.1:5000", Some("chat")),
            ("[::1]:5000", None),
        ] {
            for _ in 0..50 {
                let c = client(peer, protocol);
                assert_eq!(c.buffered_amount(), 0);
                std::thread::scope(|s| {
                    for t in 1..=8 {
                        let c = c.clone();
                        s.spawn(move || c.add_unsent(t));
                    }
                });
                assert_eq!(c.buffered_amount(), 36, "{peer} {protocol:?}");
                c.sub_unsent(6);
                assert_eq!(c.buffered_amount(), 30);
                assert_eq!(c.peer_addr(), peer.parse().unwrap());
                assert_eq!(c.protocol(), protocol);
            }
        }
    }
}
