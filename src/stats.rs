//! Counters for `stats()`: atomics bumped on the hot path, read into a
//! plain snapshot.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{
    AtomicBool, AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};

use crate::runtime::flow::OutputBudget;

use parking_lot::Mutex;

/// A snapshot of the server's counters, from
/// [`WebSocketServer::stats`](crate::WebSocketServer::stats). Counts are
/// totals since the server started unless the field says otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Connections open now (handshake done, not yet disconnected). A
    /// connection leaves this count just before its `Disconnect` is
    /// emitted, so a `Disconnect` closure may still be running when it
    /// reads 0.
    pub connections: u64,
    /// Handshakes completed with `101`.
    pub handshakes_accepted: u64,
    /// Handshakes refused, by the HTTP status they were answered with
    /// (400, 403, 405, 408 for a handshake timeout, 426, 431, 500 for a
    /// strategy that panicked, 503 over a connection limit, out of file
    /// descriptors, with no worker free by the deadline or while shutting
    /// down, or a strategy's own status).
    pub handshakes_refused: BTreeMap<u16, u64>,
    /// Data messages received.
    pub messages_in: u64,
    /// Payload bytes of the data messages received.
    pub bytes_in: u64,
    /// Data messages accepted by `send` and `broadcast` (each broadcast
    /// recipient counts once).
    pub messages_out: u64,
    /// Bytes written to WebSocket connections: frames, and the `101`
    /// answers that opened them. HTTP answers that open no connection
    /// (refusals, `on_http` pages) are counted in `handshakes_refused` and
    /// `http_answered`, not here.
    pub bytes_out: u64,
    /// Bytes waiting in send queues now (a frame broadcast to many
    /// clients counts in each of their queues).
    pub bytes_queued: u64,
    /// What `max_queued_bytes` counts now: the queues that cost more than
    /// 16 KiB (their bytes and 64 B a queued piece), and each frame shared
    /// by several queues (a broadcast's, a publish's) once, until the
    /// last of them has written it or let it go.
    pub queued_budget_bytes: u64,
    /// Messages refused (handed back, or missed by a broadcast) because a
    /// client's queue was over the hard limit, or the server over
    /// `max_queued_bytes` with that client among those holding the most.
    pub messages_dropped: u64,
    /// Data messages not delivered because they came after the client's
    /// close frame was queued and the main loop was a whole
    /// `event_queue_bytes` behind, or that client's own unconsumed events
    /// had reached the hard limit (from the first such message on, all of
    /// that client's): it is read on only to find its answering Close (as
    /// a browser drops every message once `close()` is called). Also what
    /// a connection torn down (a failed write, a close timed out, a forced
    /// close) had read past those same limits. They are counted in
    /// `messages_in` too.
    pub messages_discarded: u64,
    /// Clients closed by the `Close` backpressure policy.
    pub backpressure_closes: u64,
    /// Clients closed for idleness.
    pub idle_timeouts: u64,
    /// Clients failed with 1009 because partial input over all clients
    /// passed `max_buffered_bytes` (the largest holders; their
    /// `Disconnect` error is `MessageTooLarge` with that total and the
    /// budget). Not counted in `protocol_errors`.
    pub buffered_closes: u64,
    /// Connections failed for breaking the protocol or a limit of their
    /// own, by the close code sent (1002, 1007, 1009). A peer that breaks
    /// it after the server's own close frame gets no second one, and is
    /// not counted here (its `Disconnect` has the error).
    pub protocol_errors: BTreeMap<u16, u64>,
    /// User closures or strategies that panicked.
    pub handler_panics: u64,
    /// Failures the server recovered from (see
    /// [`Error::Internal`](crate::Error::Internal)): a bug of its own
    /// caught in one connection's job, in the readiness loop or in the
    /// accept thread (counted once every ten seconds at most), a failed
    /// wait of the readiness
    /// loop, `accept` out of file descriptors (counted once every ten
    /// seconds at most, each refused client in `handshakes_refused`), a
    /// thread that could not start (reported as
    /// [`Error::Io`](crate::Error::Io)).
    pub internal_errors: u64,
    /// Plain HTTP requests answered by the `on_http` handler.
    pub http_answered: u64,
    /// Bytes charged for events waiting in the event channel now
    /// (main-loop style).
    pub event_bytes: u64,
    /// Bytes of unfinished incoming messages held now (see
    /// `max_buffered_bytes`).
    pub buffered_in_bytes: u64,
    /// Bytes read but kept unparsed because flow control paused their
    /// client in the middle of a read, or its job had used its budget
    /// (4,096 frames, or 1 MiB delivered once that is more than was read,
    /// as compressed messages can) and let the worker go (at most one read,
    /// 256 KiB, per client; while this is at a quarter of
    /// `max_buffered_bytes` or more, reads take at most 4 KiB).
    pub unparsed_in_bytes: u64,
    /// Topics with at least one subscriber now.
    pub topics: u64,
    /// Times flow control stopped reading a client (its queue and events
    /// at high water, or the event channel over its budget).
    pub read_pauses: u64,
    /// The bridge to other servers, if one was configured.
    pub bridge: Option<BridgeStats>,
}

/// The bridge's counters, in [`Stats::bridge`]. Counts are totals since
/// the server started unless the field says otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BridgeStats {
    /// This server's id in the envelopes it sends, random at each start.
    pub origin: u64,
    /// Whether both of the bridge's connections are up now.
    pub up: bool,
    /// Topic channels subscribed at the engine now.
    pub channels: u64,
    /// Publishes the engine took from this server.
    pub published: u64,
    /// Publishes of other servers that reached a topic with subscribers
    /// here (counted once each, however many subscribers). One that comes
    /// for a topic whose last subscriber here has just left (its channel
    /// is kept a second) is not counted.
    pub received: u64,
    /// Publishes dropped because the outbox was full (the engine slow or
    /// down; other servers count them as missed), or because the server
    /// stopped before the engine took them (the engine down at shutdown),
    /// or was publishing after its bridge stopped.
    pub dropped: u64,
    /// Publishes the engine answered with an error (a channel the Redis
    /// user may not publish to, say): dropped, never sent again. Also
    /// subscriptions it refused (a topic's channel the user may not
    /// subscribe to): that topic gets nothing from other servers.
    pub refused: u64,
    /// Bytes waiting in the outbox now.
    pub outbox_bytes: u64,
    /// Publishes of other servers that never arrived here, found by the
    /// gaps in their sequence numbers.
    pub missed: u64,
    /// `missed`, by the origin that sent them. An origin silent for an
    /// hour is let go when a new one is heard, as is the least recently
    /// heard past 1,024, and takes its count with it (`missed` keeps it):
    /// after restarts of other servers these may add up to less than
    /// `missed`.
    pub missed_by_origin: BTreeMap<u64, u64>,
    /// Publishes that arrived twice (sent again after a reconnection) and
    /// were delivered once.
    pub duplicates: u64,
    /// Messages on the bridge's channels that were not a valid envelope,
    /// or carried a sequence number or epoch too far from the last to be
    /// believed (delivered on a new baseline).
    pub invalid: u64,
    /// Times the bridge came back up after being up before.
    pub reconnects: u64,
}

/// Shards of the counters every message moves: each thread adds to its
/// own (see [`shard`]), on a cache line of its own, and a snapshot sums
/// them (one after another: while traffic flows, a sum is of counts read
/// at slightly different times, exact once it stops). One shared set,
/// written by every worker for every message, had each increment wait for
/// the line to come from another core.
///
/// The first `HELD_SHARDS` are each held by one live thread at a time,
/// which adds to them with a plain load and store: a locked add, even on
/// a line of the thread's own, took 40 cycles of each message's two in
/// `message_in` (0.75% of the server's CPU on a 32 B echo, and as much
/// again for the other counts). There are enough for the pool's default
/// two workers a core up to 16 cores, with the server's own threads and
/// some of the user's. Threads that find none free (or that count while
/// they end) are given the other `SHARED_SHARDS` in turn and add to them
/// atomically, as every thread did before.
const HELD_SHARDS: usize = 32;
const SHARED_SHARDS: usize = 8;
const SHARDS: usize = HELD_SHARDS + SHARED_SHARDS;

#[derive(Default)]
#[repr(align(128))]
struct Hot {
    messages_in: AtomicU64,
    bytes_in: AtomicU64,
    messages_out: AtomicU64,
    bytes_out: AtomicU64,
    /// Moves both ways (a decrease added as its two's complement): one
    /// shard may be below zero, the sum never is.
    bytes_queued: AtomicU64,
}

/// A server's shards (5 KiB).
struct HotShards([Hot; SHARDS]);

impl Default for HotShards {
    fn default() -> Self {
        HotShards(std::array::from_fn(|_| Hot::default()))
    }
}

/// Which of the held shards a live thread holds.
static HELD: [AtomicBool; HELD_SHARDS] = [const { AtomicBool::new(false) }; HELD_SHARDS];

/// Gives the thread's shard back when the thread ends.
struct Holder(Cell<usize>);

impl Drop for Holder {
    fn drop(&mut self) {
        let i = self.0.get();
        if i < HELD_SHARDS {
            // From here on (other thread-locals' destructors may still
            // count) this thread adds to a shared shard.
            MINE.set(shared_shard());
            HELD[i].store(false, Release);
        }
    }
}

thread_local! {
    /// This thread's shard; `usize::MAX` until it asks for one.
    static MINE: Cell<usize> = const { Cell::new(usize::MAX) };
    static HOLDER: Holder = const { Holder(Cell::new(usize::MAX)) };
}

/// This thread's shard of the hot counters: a free one taken at its first
/// count and held until it ends, or a shared one.
#[inline]
fn shard() -> usize {
    let i = MINE.get();
    if i != usize::MAX {
        return i;
    }
    take_shard()
}

#[cold]
fn take_shard() -> usize {
    // A thread whose thread-locals are being destroyed takes none: it
    // could not give it back.
    let taken = HOLDER
        .try_with(|holder| {
            let i = HELD
                .iter()
                .position(|held| held.compare_exchange(false, true, Acquire, Relaxed).is_ok())?;
            holder.0.set(i);
            Some(i)
        })
        .ok()
        .flatten();
    let i = taken.unwrap_or_else(shared_shard);
    MINE.set(i);
    i
}

/// One of the shared shards, given out in turn.
fn shared_shard() -> usize {
    use std::sync::atomic::AtomicUsize;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    HELD_SHARDS + NEXT.fetch_add(1, Relaxed) % SHARED_SHARDS
}

/// Add `n` to `counter`, of shard `i` (see [`HELD_SHARDS`]).
#[inline]
fn bump_u64(counter: &AtomicU64, i: usize, n: u64) {
    if i < HELD_SHARDS {
        counter.store(counter.load(Relaxed).wrapping_add(n), Relaxed);
    } else {
        counter.fetch_add(n, Relaxed);
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) accepted: AtomicU64,
    pub(crate) disconnected: AtomicU64,
    hot: HotShards,
    pub(crate) dropped: AtomicU64,
    pub(crate) discarded: AtomicU64,
    pub(crate) backpressure_closes: AtomicU64,
    pub(crate) idle_timeouts: AtomicU64,
    pub(crate) buffered_closes: AtomicU64,
    pub(crate) err_1002: AtomicU64,
    pub(crate) err_1007: AtomicU64,
    pub(crate) err_1009: AtomicU64,
    pub(crate) panics: AtomicU64,
    pub(crate) internal_errors: AtomicU64,
    pub(crate) http_answered: AtomicU64,
    pub(crate) read_pauses: AtomicU64,
    /// Refusals are rare and keyed by any status: a lock is fine here.
    pub(crate) refused: Mutex<BTreeMap<u16, u64>>,
    /// `max_queued_bytes` and what it counts (shared frames hold it too).
    pub(crate) output: Arc<OutputBudget>,
}

impl Counters {
    pub(crate) fn new(max_queued_bytes: usize, low_water: usize) -> Counters {
        Counters {
            output: Arc::new(OutputBudget::new(max_queued_bytes, low_water)),
            ..Counters::default()
        }
    }

    /// Connections open now.
    pub(crate) fn open(&self) -> u64 {
        self.accepted
            .load(Relaxed)
            .saturating_sub(self.disconnected.load(Relaxed))
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub(crate) fn queued(&self, delta: i64) {
        if delta != 0 {
            let i = shard();
            bump_u64(&self.hot.0[i].bytes_queued, i, delta as u64);
        }
    }

    /// A message of `len` bytes came in.
    pub(crate) fn message_in(&self, len: usize) {
        let i = shard();
        let hot = &self.hot.0[i];
        bump_u64(&hot.messages_in, i, 1);
        bump_u64(&hot.bytes_in, i, len as u64);
    }

    /// A data frame was let into a client's queue (or written).
    pub(crate) fn message_out(&self) {
        let i = shard();
        bump_u64(&self.hot.0[i].messages_out, i, 1);
    }

    /// A data frame let in by [`Counters::message_out`] was handed back
    /// unsent (its write found the connection gone).
    pub(crate) fn message_not_out(&self) {
        let i = shard();
        bump_u64(&self.hot.0[i].messages_out, i, 1u64.wrapping_neg());
    }

    /// `n` bytes went to the kernel.
    pub(crate) fn bytes_out(&self, n: usize) {
        let i = shard();
        bump_u64(&self.hot.0[i].bytes_out, i, n as u64);
    }

    fn sum(&self, field: impl Fn(&Hot) -> u64) -> u64 {
        self.hot.0.iter().map(field).fold(0, u64::wrapping_add)
    }

    pub(crate) fn refused(&self, status: u16) {
        *self.refused.lock().entry(status).or_insert(0) += 1;
    }

    pub(crate) fn protocol_error(&self, code: u16) {
        match code {
            1007 => Self::add(&self.err_1007, 1),
            1009 => Self::add(&self.err_1009, 1),
            _ => Self::add(&self.err_1002, 1),
        }
    }

    pub(crate) fn snapshot(&self) -> Stats {
        let accepted = self.accepted.load(Relaxed);
        let mut protocol_errors = BTreeMap::new();
        for (code, c) in [
            (1002, &self.err_1002),
            (1007, &self.err_1007),
            (1009, &self.err_1009),
        ] {
            let n = c.load(Relaxed);
            if n > 0 {
                protocol_errors.insert(code, n);
            }
        }
        Stats {
            connections: accepted.saturating_sub(self.disconnected.load(Relaxed)),
            handshakes_accepted: accepted,
            handshakes_refused: self.refused.lock().clone(),
            messages_in: self.sum(|h| h.messages_in.load(Relaxed)),
            bytes_in: self.sum(|h| h.bytes_in.load(Relaxed)),
            messages_out: self.sum(|h| h.messages_out.load(Relaxed)),
            bytes_out: self.sum(|h| h.bytes_out.load(Relaxed)),
            bytes_queued: (self.sum(|h| h.bytes_queued.load(Relaxed)) as i64).max(0) as u64,
            queued_budget_bytes: self.output.used() as u64,
            messages_dropped: self.dropped.load(Relaxed),
            messages_discarded: self.discarded.load(Relaxed),
            backpressure_closes: self.backpressure_closes.load(Relaxed),
            idle_timeouts: self.idle_timeouts.load(Relaxed),
            buffered_closes: self.buffered_closes.load(Relaxed),
            protocol_errors,
            handler_panics: self.panics.load(Relaxed),
            internal_errors: self.internal_errors.load(Relaxed),
            http_answered: self.http_answered.load(Relaxed),
            event_bytes: 0,
            buffered_in_bytes: 0,
            unparsed_in_bytes: 0,
            topics: 0,
            read_pauses: self.read_pauses.load(Relaxed),
            bridge: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forty-eight threads alive at once (more than there are held
    /// shards, so at least sixteen add to shared ones), each counting its
    /// own messages and moving bytes in and out of queues that one of
    /// them may take out on another shard: the sums are exact, and the
    /// queued total, whatever each shard holds, is what is still queued.
    #[test]
    fn many_threads_counting_at_once_sum_exactly() {
        const THREADS: u64 = 48;
        let c = Counters::default();
        let all_here = std::sync::Barrier::new(THREADS as usize);
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (c, all_here) = (&c, &all_here);
                s.spawn(move || {
                    // Each takes its shard before any counts on.
                    c.message_out();
                    all_here.wait();
                    for i in 0..10_000u64 {
                        c.message_in((t + i % 7) as usize);
                        c.message_out();
                        c.bytes_out(3);
                        c.queued(5);
                    }
                });
            }
        });
        // Taken out on this thread's shard alone: the others stay above
        // zero, this one far below.
        c.queued(-((THREADS * 10_000 * 5) as i64 - 40));
        let st = c.snapshot();
        assert_eq!(st.messages_in, THREADS * 10_000);
        let per_thread: u64 = (0..10_000u64).map(|i| i % 7).sum();
        assert_eq!(
            st.bytes_in,
            (0..THREADS).map(|t| 10_000 * t + per_thread).sum::<u64>()
        );
        assert_eq!(st.messages_out, THREADS * 10_001);
        assert_eq!(st.bytes_out, THREADS * 30_000);
        assert_eq!(st.bytes_queued, 40);
    }

    /// A shared shard is added to atomically: eight threads on one.
    #[test]
    fn a_shared_shard_counts_every_add_of_threads_at_once() {
        let (u, down) = (AtomicU64::new(0), AtomicU64::new(0));
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..100_000 {
                        bump_u64(&u, HELD_SHARDS, 1);
                        bump_u64(&down, SHARDS - 1, (-1i64) as u64);
                    }
                });
            }
        });
        assert_eq!(u.load(Relaxed), 800_000);
        assert_eq!(down.load(Relaxed) as i64, -800_000);
    }

    /// A thread that ends gives its held shard back. (Other tests' threads
    /// take shards too, so one of a few tries must find the ended
    /// thread's free; never given back, it never is.)
    #[test]
    fn a_thread_that_ends_gives_its_shard_back() {
        let freed = (0..20).any(|_| {
            let c = std::sync::Arc::new(Counters::default());
            let i = std::thread::spawn(move || {
                c.message_out();
                shard()
            })
            .join()
            .unwrap();
            // `join` waits for the thread's thread-locals' destructors.
            i < HELD_SHARDS && !HELD[i].load(Acquire)
        });
        assert!(freed);
    }
}
