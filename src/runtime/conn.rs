//! One open connection, and the write path every thread uses.
//!
//! Writes happen on the caller's thread. Whoever finds the queue empty
//! takes the write token, writes without holding the lock, and keeps
//! flushing what others queued meanwhile until the queue is empty or the
//! kernel pushes back; then the poller, which watches the socket for room
//! from then on, has a pool job finish the rest when the kernel takes
//! more. The token keeps frames whole and in order without holding a guard
//! across a socket write.
//!
//! What may be queued, and when reading stops and resumes, is decided by
//! [`Marks`](crate::runtime::flow::Marks) (see `flow.rs`).

use std::io::{self, IoSlice, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use parking_lot::Mutex;
use polling::Event as Interest;

use crate::client::{Client, SendStatus};
use crate::config::SlowClientPolicy;
use crate::error::{Error, Result, SendError};
use crate::message::{CloseCode, CloseFrame, Message};
use crate::proto::assemble::Limits;
use crate::proto::conn::Connection;
use crate::proto::frame::{OpCode, close_payload, encode_header, encode_header_rsv};
use crate::runtime::Shared;
use crate::runtime::flow::{CHUNK_COST, Chunk, GATHER_PAYLOAD, OutQueue, SharedFrame, Unwritten};
use crate::stats::Counters;

/// RSV1 as `encode_header_rsv` takes it: the permessage-deflate bit.
#[cfg(feature = "deflate")]
pub(crate) const RSV1: u8 = 0b100;

/// A user thread whose sends come this close together, on average, is
/// sending a stream of messages (a busy main loop): its sends go to the
/// pool, which writes them in batches. A lone send is written at once by
/// the caller, which is quicker than a hand-off. (Built with `--cfg
/// enjent_wide_burst`, 20 ms: `bench/instructions.sh --main-loop` counts
/// a main loop under valgrind, which sends more slowly than at full speed
/// and would write some of a burst's sends at once, with about as many
/// writes as at full speed.)
const BURST_GAP: std::time::Duration = if cfg!(enjent_wide_burst) {
    std::time::Duration::from_millis(20)
} else {
    std::time::Duration::from_micros(20)
};

thread_local! {
    /// When this thread last sent to an idle connection (a timed send),
    /// and how many sends it made since that corked or queued behind
    /// others (not timed: the clock is read only where it decides).
    static LAST_SEND: std::cell::Cell<(Option<std::time::Instant>, u32)> =
        const { std::cell::Cell::new((None, 0)) };
}

/// Whether this thread's sends since its previous timed one came within
/// `BURST_GAP` of each other on average.
fn sending_in_a_burst() -> bool {
    sending_in_a_burst_at(std::time::Instant::now())
}

/// [`sending_in_a_burst`], for a send at `now`.
fn sending_in_a_burst_at(now: std::time::Instant) -> bool {
    LAST_SEND.with(|last| {
        let (then, untimed) = last.get();
        // (At most 64 gaps: a thread that queued a million sends and then
        // paused is not still in a burst 20 s later.)
        let burst = then.is_some_and(|t| now - t < BURST_GAP * (untimed.min(63) + 1));
        last.set((Some(now), 0));
        burst
    })
}

thread_local! {
    /// The connection (its record's address) whose message this thread,
    /// a main loop's, took last, if it was the last message its read
    /// gave: its first reply, to an idle connection, is written at once
    /// rather than deferred as part of a burst. It is likely the only
    /// one (a request's answer), and no other of that read's messages
    /// is waiting to have its reply corked with it: a pool job to write
    /// it would cost more than the write. (Address 0: none. One that
    /// names a record since freed and reused can only make one write go
    /// at once, which is always right.)
    static ANSWERING: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Note which connection's last message of a read this thread took (0:
/// none, or not the last of its read).
pub(crate) fn answering(conn: usize) {
    ANSWERING.set(conn);
}

/// Whether a send to `conn`, which finds it idle, answers the last
/// message of a read that this thread took (see `ANSWERING`). The first
/// such send uses the note up; a send that finds the connection busy (a
/// job or a writer on it, or frames queued) never asks, and leaves it.
/// (A read of more than `events::BATCH` messages is handed out in lists
/// of that many: each list's last counts as a read's last.)
fn first_answer<T>(conn: &Conn<T>) -> bool {
    first_answer_at(std::ptr::from_ref(conn) as usize)
}

/// [`first_answer`], for the record at address `conn`.
fn first_answer_at(conn: usize) -> bool {
    let answering = ANSWERING.get();
    if answering != 0 && answering == conn {
        ANSWERING.set(0);
        // Not timed, but a send of this thread's for the burst's count.
        send_untimed();
        return true;
    }
    false
}

/// Count a send that corked or queued behind others (see `LAST_SEND`).
fn send_untimed() {
    LAST_SEND.with(|last| {
        let (then, untimed) = last.get();
        last.set((then, untimed.saturating_add(1)));
    });
}

/// What kind of frame a write carries.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Data,
    /// A data frame whose refusal is only a try (see `send_message_as`).
    DataTry,
    /// The smallest data frame, to learn whether any would be refused
    /// before making one (see `queue_own`): refused as `Data` is, and
    /// not counted sent if admitted. (Made only with compression.)
    #[cfg_attr(not(feature = "deflate"), allow(dead_code))]
    Probe,
    Control,
    /// A control frame of the user's (a ping): refused, as data is, by a
    /// queue at its limits, and a `Drain` follows, but it is not counted
    /// dropped and the slow-client policy does not apply.
    UserControl,
}

/// A data frame `write` did not take, with its payload for the caller to
/// hand back.
struct Refused {
    error: Error,
    body: Option<Chunk>,
}

/// Whether a connection is starved: paused because the event channel as
/// a whole is over its budget.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Starve {
    No,
    /// Starved, and what the client sent may still be its end (see
    /// `service::look_for_the_end`): input runs a job that looks.
    Looking,
    /// Starved, and a message waits at the front of its input: nothing
    /// more is looked at until it is read.
    Quiet,
}

/// The read side: touched only by the job that owns the connection.
pub(crate) struct ReadSide {
    pub(crate) proto: Connection,
    pub(crate) last_seen_ms: u64,
    pub(crate) ping_sent_ms: u64,
    /// The close frame to report in `Disconnect`, once known.
    pub(crate) report: Option<CloseFrame>,
    pub(crate) error: Option<Error>,
    pub(crate) eof: bool,
    pub(crate) write_shut: bool,
    /// Its messages are discarded: our close frame is out and the main
    /// loop was a whole budget behind when one came (see `service::handle`).
    pub(crate) discarding: bool,
    /// The job is tearing it down, and feeds what it kept: its events are
    /// bounded as a closing connection's are (see `service::handle`).
    pub(crate) ending: bool,
    /// Input read but not yet parsed: flow control paused the connection
    /// in the middle of a read, or the job's frame budget ran out. At
    /// most one read's worth, counted apart
    /// (`Shared::unparsed_in`), not in the partial-input budget.
    pub(crate) rest: Vec<u8>,
    /// Bytes of partial input (`proto.buffered()`) last counted in the
    /// server-wide total.
    pub(crate) buffered: usize,
    /// This pass queued a pong (corked, as the job's own sends are): it
    /// leaves before the next closure of the client's runs, which may
    /// hold the job for however long.
    pub(crate) pong_corked: bool,
    /// `last_seen_ms` was read from the clock after this pass's last
    /// handler ran: the pass's timers take it as the time (see
    /// `ReadSide::clock`) instead of reading the clock again.
    pub(crate) seen_now: bool,
    /// Server clock (ms) before which no pong is flushed ahead of a
    /// closure again: a pong queued sooner waits for the next closure
    /// after it, or for the pass's end. A flush for every pong would let a
    /// client interleaving pings with messages cost a write each (nine
    /// times the CPU for a flood of such pairs); this way it buys at most
    /// one a millisecond.
    pub(crate) pong_flush_after_ms: u64,
    /// Our answer to the peer's close, held back while the main loop has
    /// not taken this client's messages yet (see `Conn::defer_close`), so
    /// that its replies to them go out first.
    pub(crate) deferred_close: Option<CloseFrame>,
}

impl ReadSide {
    /// What the client sent was handled (its handlers have run): it was
    /// last seen now.
    pub(crate) fn seen(&mut self, now_ms: u64) {
        self.last_seen_ms = now_ms;
        self.seen_now = true;
    }

    /// The time for this pass's timers: when the client was last seen, if
    /// that was after the pass's last handler (one clock read a job
    /// fewer), else the clock's. Usually microseconds old; after a scan
    /// for `max_buffered_bytes`, as old as the scan is long, so that a
    /// deadline found due by the clock fires a tick later.
    pub(crate) fn clock(&mut self, now_ms: impl FnOnce() -> u64) -> u64 {
        if std::mem::take(&mut self.seen_now) {
            self.last_seen_ms
        } else {
            now_ms()
        }
    }

    fn new(proto: Connection, last_seen_ms: u64, ping_sent_ms: u64) -> ReadSide {
        ReadSide {
            proto,
            last_seen_ms,
            ping_sent_ms,
            report: None,
            error: None,
            eof: false,
            write_shut: false,
            discarding: false,
            ending: false,
            rest: Vec::new(),
            buffered: 0,
            pong_corked: false,
            seen_now: false,
            pong_flush_after_ms: 0,
            deferred_close: None,
        }
    }

    /// Nothing here but the clock: a fresh read side with the same two
    /// times would be equal.
    fn is_at_rest(&self) -> bool {
        self.proto.is_at_rest()
            && self.report.is_none()
            && self.error.is_none()
            && !self.eof
            && !self.write_shut
            && !self.discarding
            && self.rest.is_empty()
            && self.buffered == 0
    }
}

/// The read side as a connection keeps it between jobs.
pub(crate) enum Reading {
    /// Between messages with nothing held (most connections, most of the
    /// time): only the clock is kept, and a job that needs the read side
    /// makes it again. This spares an idle connection the read side's
    /// 256 B.
    Rest {
        last_seen_ms: u64,
        /// How long after `last_seen_ms` a ping still unanswered went out
        /// (saturated), or 0: the read side's `ping_sent_ms` in half the
        /// space, as only its order against `last_seen_ms` is ever read.
        ping_after_ms: u32,
    },
    /// In the middle of something: a partial message, compression state,
    /// a close on its way.
    Busy(Box<ReadSide>),
    /// A job has it (or it went with a panic).
    Taken,
}

impl Reading {
    /// At rest with the read side's clock.
    fn rest(last_seen_ms: u64, ping_sent_ms: u64) -> Reading {
        let after = ping_sent_ms.saturating_sub(last_seen_ms);
        Reading::Rest {
            last_seen_ms,
            ping_after_ms: u32::try_from(after).unwrap_or(u32::MAX),
        }
    }

    /// The read side's `ping_sent_ms` again: exact while a ping is
    /// unanswered (up to 49 days after the client was last seen), 0 if
    /// none is, which compares with any later `last_seen_ms` the same.
    fn ping_sent_ms(last_seen_ms: u64, ping_after_ms: u32) -> u64 {
        match ping_after_ms {
            0 => 0,
            after => last_seen_ms + u64::from(after),
        }
    }
}

thread_local! {
    /// A read side's allocation kept by this thread for the next job, so
    /// that taking a connection's read side at rest and putting it back
    /// costs no allocation.
    static SPARE: std::cell::Cell<Option<Box<ReadSide>>> = const { std::cell::Cell::new(None) };
}

/// Keep the allocation of a torn-down connection's read side for this
/// thread's next, if it has none: a client that leaves would otherwise
/// cost an allocation, made on one worker and freed on another. What the
/// read side held is dropped now.
pub(crate) fn recycle_read(mut r: Box<ReadSide>, limits: Limits) {
    let _ = SPARE.try_with(|spare| match spare.take() {
        Some(kept) => spare.set(Some(kept)),
        None => {
            *r = ReadSide::new(Connection::new(limits), 0, 0);
            spare.set(Some(r));
        }
    });
}

/// The write side, the flow-control state and the job schedule, behind
/// one lock.
pub(crate) struct WriteSide {
    pub(crate) out: OutQueue,
    /// A thread holds the write token.
    pub(crate) writing: bool,
    /// A pool job owns the connection right now.
    pub(crate) job_running: bool,
    /// The job's pass may run the client's closures (`on_connect`,
    /// `on_message`, `on_drain`), for however long: only the job's own
    /// thread corks its sends; a send from any other thread writes at once
    /// (see [`Serving`]).
    pub(crate) closures: bool,
    /// Something happened while the job ran: it must go round again.
    pub(crate) job_again: bool,
    /// Server clock (ms) by which the close handshake must be over.
    pub(crate) close_deadline_ms: u64,
    pub(crate) write_error: Option<io::ErrorKind>,
    /// Bytes of this connection's messages waiting in the event channel
    /// (its other events count on the channel's budget alone).
    pub(crate) events: usize,
    /// Flow control stopped reading and dispatching this connection.
    pub(crate) paused: bool,
    /// Paused because the event channel as a whole is over its budget
    /// (see [`Starve`]).
    pub(crate) starve: Starve,
    /// Nothing more will be read: end of file, or a read error.
    pub(crate) read_done: bool,
    /// What the poller watches the socket for (see [`Watch`]). A
    /// connection whose request was in at accept time is first registered
    /// when its first job ends (or a write of that job leaves bytes).
    pub(crate) watch: Watch,
    /// What is known of the socket's room since the last write began (see
    /// [`Room`]).
    pub(crate) room: Room,
    /// A send was refused for backpressure: tell the user (`Drain`) once
    /// the queue is down to low water.
    pub(crate) drain_wanted: bool,
    /// The queue drained after a refusal; the job emits `Drain`.
    pub(crate) drain_due: bool,
    /// A ping went out (keepalive, or `Client::ping`) and no event has been
    /// reported since: the next one is most likely its pong, which nobody
    /// waits for (pongs are not reported to the user).
    pub(crate) pong_due: bool,
    /// The `Close` slow-client policy closed this connection.
    pub(crate) closed_for_backpressure: bool,
    /// Server clock (ms) of the last write that took bytes: a client
    /// paused because it does not read shows its idleness here.
    pub(crate) last_progress_ms: u64,
    /// Tear down now: shutdown ran out of patience, the poller could not
    /// watch the socket, or the job is already tearing it down (and
    /// delivers what it kept, past any pause).
    pub(crate) force_close: bool,
    pub(crate) finished: bool,
}

/// What the poller watches a connection's socket for. Interest is
/// edge-triggered and stays armed: an event reports what changed (input
/// came, room was made, the peer left), never what merely still holds, so
/// no job re-arms it and a connection whose job runs costs the loop
/// nothing until something new happens. In exchange, whoever stops short
/// of draining the socket (a job at its budget) must come back by itself,
/// and an event that finds the connection busy must leave word (see
/// [`claim_event`]).
///
/// Watching for room starts the first time a write leaves bytes the
/// kernel would not take (one system call in a connection's life, and none
/// for most): watched from the start, every socket would report room once
/// as it is registered, a job's worth of work for nothing. On Linux, room
/// is reported after a write that found none; on kqueue (macOS, the BSDs)
/// the filter also fires as acknowledgements free space, which costs an
/// event (and, with nothing queued, nothing more) per acknowledgement.
///
/// Where the poller has no edge-triggered mode (Windows, illumos), interest
/// is oneshot instead: an event spends it, and each job arms again what the
/// connection's state calls for when it ends.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Watch {
    /// Not in the poller yet.
    Unregistered,
    /// In the poller with no interest armed: a handshake's oneshot
    /// interest, spent, or (oneshot) a connection's.
    Spent,
    /// Oneshot: input and hang-ups.
    OnceInput,
    /// Oneshot: room to write.
    OnceRoom,
    /// Oneshot: both.
    OnceBoth,
    /// Edge-triggered: input and hang-ups.
    Input,
    /// Edge-triggered: input, hang-ups and room to write.
    InputAndRoom,
}

/// What a writer knows of the socket's room, for the one that writes
/// next. With edge-triggered interest the poller reports room once, after
/// a write that found the socket full: a report no writer acts on, or a
/// queue left with nobody writing and no report to come, would leave the
/// queue waiting while the client reads the socket empty.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Room {
    /// Nothing since the last write began: it is still out, or it took
    /// all it was given, or failed (the connection then tears down).
    Unknown,
    /// The last write found the socket full, and no room was reported
    /// since: the poller will report it (a writer may let go).
    Awaited,
    /// Room was reported since the last write began: the kernel may have
    /// room that write did not find, and no later event would tell of it,
    /// so the writer (or the next) writes again.
    Reported,
}

/// A connection marked in [`Serving`] until dropped; the mark it replaced
/// comes back then.
pub(crate) struct Mark {
    key: &'static std::thread::LocalKey<std::cell::Cell<usize>>,
    before: usize,
}

impl Mark {
    fn set<T>(key: &'static std::thread::LocalKey<std::cell::Cell<usize>>, conn: &Conn<T>) -> Mark {
        let before = key.replace(std::ptr::from_ref(conn) as usize);
        Mark { key, before }
    }
}

impl Drop for Mark {
    fn drop(&mut self) {
        self.key.set(self.before);
    }
}

thread_local! {
    /// The connection whose job this thread runs, by address; 0 for none.
    /// See [`Serving`].
    static SERVING: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the thread that runs a connection's job, for as long as it does:
/// while the job's pass may run one of the client's closures, that thread's
/// sends to the client cork (they leave together when the pass ends), and
/// any other thread's are written at once, since the closure may hold the
/// job for however long.
pub(crate) struct Serving;

impl Serving {
    pub(crate) fn start<T>(conn: &Conn<T>) -> Mark {
        Mark::set(&SERVING, conn)
    }
}

impl WriteSide {
    /// Paused for the event channel (see [`Starve`]).
    pub(crate) fn starved(&self) -> bool {
        self.starve != Starve::No
    }

    /// Whether it is torn down at the end of this pass: a write failed,
    /// or it is forced closed (or already being torn down).
    pub(crate) fn doomed(&self) -> bool {
        self.write_error.is_some() || self.force_close
    }

    /// What flow control counts against the connection: its queue's
    /// cost in memory (bytes, and a little for each frame) and its events
    /// not yet consumed.
    pub(crate) fn held(&self) -> usize {
        self.out.cost() + self.events
    }

    /// What its pauses are judged by: what it holds, or, once our close
    /// frame is queued, its queue alone. A closing client's answer must
    /// be read even if nobody consumes its events any more (the main
    /// loop may be the one shutting down); those are bounded by the
    /// event channel's budget instead, past which its messages are
    /// dropped and counted (`service::handle`).
    pub(crate) fn pausing_for(&self, closing: bool) -> usize {
        if closing {
            self.out.cost()
        } else {
            self.held()
        }
    }
}

/// The top bit of `Conn::holding_in`: condemned for the budget. A
/// connection never holds 2^31 bytes of a message, even on 32-bit targets.
pub(crate) const CONDEMNED: usize = 1 << (usize::BITS - 1);

pub(crate) struct Conn<T> {
    pub(crate) stream: TcpStream,
    pub(crate) client: Client<T>,
    /// The job takes the read side out for as long as it runs, so that no
    /// guard is held across user closures (see [`Conn::take_read`]).
    pub(crate) read: Mutex<Reading>,
    pub(crate) io: Mutex<WriteSide>,
    /// Set once our close frame is queued: under the `io` lock, and read
    /// with it held or lock-free by the job. No data frame may follow.
    pub(crate) closing: AtomicBool,
    /// Whether the read gate must be looked at under the `io` lock (see
    /// [`Conn::may_read_staged`]). Cleared only by a look that let the
    /// job read with the connection holding less than half of high water
    /// and no send refused; set, under the lock, by a look that did not,
    /// and by whatever since brought it to half of high water or was
    /// refused: while it is clear, the connection holds less than half.
    look: AtomicBool,
    /// Server clock (ms) of the timer entry booked for this connection;
    /// 0 when none.
    pub(crate) timer_at: AtomicU64,
    /// Bytes of partial input held (the read side's `buffered`), readable
    /// by other jobs looking for the largest holders; with the
    /// `CONDEMNED` bit once it is chosen to be failed for the budget (its
    /// job then judges it, and fails it with 1009 if it still must be).
    pub(crate) holding_in: AtomicUsize,
    /// permessage-deflate's sending side, when negotiated.
    #[cfg(feature = "deflate")]
    /// Boxed: a connection that did not negotiate it pays one word.
    pub(crate) deflater: Option<Box<crate::proto::deflate::Deflater>>,
}

// An idle connection's record: with the `Arc`'s counts, in the
// allocator's 144 B class (it was 176 B at 152 B, before the outgoing
// queue's chunks moved into a box made only while something is queued).
#[cfg(all(target_pointer_width = "64", not(feature = "deflate")))]
const _: () = assert!(std::mem::size_of::<Conn<()>>() <= 120);

impl<T> Conn<T> {
    /// Take the read side for a job: made again from the clock if the
    /// connection was at rest; `None` if another job has it (or it went
    /// with a panic).
    pub(crate) fn take_read(&self, limits: Limits) -> Option<Box<ReadSide>> {
        let taken = std::mem::replace(&mut *self.read.lock(), Reading::Taken);
        match taken {
            Reading::Busy(r) => Some(r),
            Reading::Rest {
                last_seen_ms,
                ping_after_ms,
            } => {
                let ping_sent_ms = Reading::ping_sent_ms(last_seen_ms, ping_after_ms);
                #[allow(unused_mut)]
                let mut proto = Connection::new(limits);
                // Compression was agreed, and no context of the client's
                // is held yet (once one is, the read side is never at
                // rest): a fresh inflater holds no state.
                #[cfg(feature = "deflate")]
                if let Some(d) = &self.deflater {
                    proto.set_inflater(d.inflater());
                }
                let side = ReadSide::new(proto, last_seen_ms, ping_sent_ms);
                Some(match SPARE.take() {
                    Some(mut spare) => {
                        *spare = side;
                        spare
                    }
                    None => Box::new(side),
                })
            }
            Reading::Taken => None,
        }
    }

    /// Give the read side back at the end of a job: at rest, only its
    /// clock is kept (its allocation stays with this thread for the next).
    pub(crate) fn put_read(&self, r: Box<ReadSide>) {
        // Taken by the pass's `clock` (a read side at rest must equal a
        // fresh one).
        debug_assert!(!r.seen_now, "a pass's read time was not taken");
        if r.is_at_rest() {
            *self.read.lock() = Reading::rest(r.last_seen_ms, r.ping_sent_ms);
            SPARE.set(Some(r));
        } else {
            *self.read.lock() = Reading::Busy(r);
        }
    }
}

/// What the handshake negotiated beyond the base protocol.
#[cfg(feature = "deflate")]
pub(crate) type Extensions = Option<(
    crate::proto::deflate::Agreed,
    crate::proto::deflate::Compression,
    Option<crate::proto::deflate::ContextPermit>,
)>;
/// What the handshake negotiated beyond the base protocol: nothing
/// without the `deflate` feature.
#[cfg(not(feature = "deflate"))]
pub(crate) struct Extensions;

impl<T: Send + Sync + 'static> Conn<T> {
    /// A connection fresh from its handshake. Its job is running (the
    /// handshake job becomes its first service job), and the handshake job
    /// holds the write token until the `101` is out (see
    /// [`Conn::send_upgrade`]).
    pub(crate) fn new(
        stream: TcpStream,
        client: Client<T>,
        limits: Limits,
        now_ms: u64,
        extensions: Extensions,
        registered: bool,
    ) -> Conn<T> {
        #[allow(unused_mut)]
        let mut proto = Connection::new(limits);
        #[cfg(feature = "deflate")]
        let deflater = extensions.map(|(agreed, config, permit)| {
            let mut d = crate::proto::deflate::Deflater::new(&agreed, &config);
            proto.set_inflater(d.inflater());
            if let Some(p) = permit {
                d.hold(p);
            }
            Box::new(d)
        });
        #[cfg(not(feature = "deflate"))]
        let Extensions = extensions;
        Conn {
            stream,
            client,
            #[cfg(feature = "deflate")]
            deflater,
            read: Mutex::new(if proto.is_at_rest() {
                Reading::rest(now_ms, 0)
            } else {
                Reading::Busy(Box::new(ReadSide::new(proto, now_ms, 0)))
            }),
            io: Mutex::new(WriteSide {
                out: OutQueue::default(),
                writing: true,
                job_running: true,
                closures: false,
                job_again: false,
                close_deadline_ms: 0,
                write_error: None,
                events: 0,
                paused: false,
                starve: Starve::No,
                read_done: false,
                watch: if registered {
                    Watch::Spent
                } else {
                    Watch::Unregistered
                },
                room: Room::Unknown,
                drain_wanted: false,
                drain_due: false,
                pong_due: false,
                closed_for_backpressure: false,
                last_progress_ms: now_ms,
                force_close: false,
                finished: false,
            }),
            closing: AtomicBool::new(false),
            look: AtomicBool::new(true),
            timer_at: AtomicU64::new(0),
            holding_in: AtomicUsize::new(0),
        }
    }

    /// The connection's poller key, worked out from its client's id
    /// rather than kept: the id names the slot and its generation.
    pub(crate) fn key(&self) -> usize {
        crate::runtime::registry::key_of_id(self.client.id())
    }

    /// What the outgoing queue holds, as flow control counts it.
    pub(crate) fn queued_cost(&self) -> usize {
        self.io.lock().out.cost()
    }

    pub(crate) fn can_send(&self) -> bool {
        !self.takes_no_frame(&self.io.lock())
    }

    /// Whether no data frame may be queued any more: the connection is
    /// torn down, a write failed, or our close frame is queued (no frame
    /// follows it).
    fn takes_no_frame(&self, w: &WriteSide) -> bool {
        w.finished || w.write_error.is_some() || self.closing.load(Ordering::Acquire)
    }

    /// Whether a frame of `len` bytes, to a queue that costs `cost`, waits
    /// for the end of the job that owns the connection (see `write`).
    fn corks(&self, shared: &Shared<T>, w: &WriteSide, cost: usize, len: usize) -> bool {
        w.job_running
            && (!w.closures || self.served_here())
            && cost + len + 2 * CHUNK_COST <= shared.marks.cork()
    }

    /// Send a data message; a refusal hands it back.
    pub(crate) fn send_message(
        self: &Arc<Self>,
        shared: &Arc<Shared<T>>,
        message: Message,
    ) -> std::result::Result<SendStatus, SendError> {
        self.send_message_as(shared, message, false)
    }

    /// `quiet`: a refusal is only a try (`send_timeout` will wait and try
    /// again): it is not counted as dropped, does not ask for a `Drain`,
    /// and does not apply the slow-client policy.
    fn send_message_as(
        self: &Arc<Self>,
        shared: &Arc<Shared<T>>,
        message: Message,
        quiet: bool,
    ) -> std::result::Result<SendStatus, SendError> {
        self.try_message(shared, message, quiet).map_err(|(e, _)| e)
    }

    /// [`send_message_as`](Conn::send_message_as), and with a refusal the
    /// length of the payload refused: compressed, if it was.
    fn try_message(
        self: &Arc<Self>,
        shared: &Arc<Shared<T>>,
        message: Message,
        quiet: bool,
    ) -> std::result::Result<SendStatus, (SendError, usize)> {
        let plain = message.len();
        #[cfg(feature = "deflate")]
        if let Some(d) = &self.deflater
            && d.wants(plain)
        {
            // The message is only borrowed while it is compressed, so a
            // refusal can hand back the original.
            let op = message.opcode();
            let mut tried = plain;
            let sent = if d.keeps_context() {
                d.compress_in_context(message.as_bytes(), |z| {
                    tried = z.len();
                    self.send_data(shared, RSV1, op, z, quiet)
                })
            } else {
                match d.compress_once(message.as_bytes()) {
                    Some(z) => {
                        tried = z.len();
                        self.send_data(shared, RSV1, op, z, quiet)
                    }
                    None => {
                        return self
                            .send_plain(shared, message, quiet)
                            .map_err(|e| (e, plain));
                    }
                }
            };
            return sent.map_err(|r| (SendError::new(r.error, message), tried));
        }
        self.send_plain(shared, message, quiet)
            .map_err(|e| (e, plain))
    }

    fn send_plain(
        self: &Arc<Self>,
        shared: &Arc<Shared<T>>,
        message: Message,
        quiet: bool,
    ) -> std::result::Result<SendStatus, SendError> {
        let (op, text) = (message.opcode(), message.is_text());
        self.send_data(shared, 0, op, message.into_bytes(), quiet)
            .map_err(|r| {
                let bytes = match r.body {
                    Some(Chunk::Owned(v)) => v,
                    _ => Vec::new(),
                };
                // Only a refusal comes here: checking the text again is
                // cheaper than keeping a copy on every send.
                let message = if text {
                    String::from_utf8(bytes)
                        .map(Message::Text)
                        .unwrap_or_else(|e| Message::Binary(e.into_bytes()))
                } else {
                    Message::Binary(bytes)
                };
                SendError::new(r.error, message)
            })
    }

    /// As [`send_message`](Conn::send_message), but a thread outside the
    /// pool waits until `deadline` for room under the hard limit. A pool
    /// worker never waits: it would hold up the very job that drains the
    /// queue.
    pub(crate) fn send_message_until(
        self: &Arc<Self>,
        shared: &Arc<Shared<T>>,
        mut message: Message,
        deadline: Instant,
    ) -> std::result::Result<SendStatus, SendError> {
        loop {
            // Tries before the deadline are quiet; the last one counts.
            let last = crate::runtime::service::on_worker() || Instant::now() >= deadline;
            match self.try_message(shared, message, !last) {
                Err((e, tried)) if !last && e.error().is_backpressure() => {
                    message = e.into_message();
                    // Room for the frame refused: its payload as it was
                    // encoded (compressed, if it was: a 7 MiB text may go
                    // out as 21 KB) and the largest header. A retry
                    // encodes it the same, or, with a context (reset by
                    // the refusal), afresh, and a refusal of that waits
                    // for its own length: never a retry that finds room
                    // at once and is refused again.
                    shared.wait_for_room(self, tried.saturating_add(14), deadline);
                }
                Err((e, _)) => return Err(e),
                Ok(status) => return Ok(status),
            }
        }
    }

    /// The most bytes a message of `len` bytes is sent as here (more than
    /// `len` only with compression that may grow it).
    pub(crate) fn payload_bound(&self, len: usize) -> usize {
        #[cfg(feature = "deflate")]
        if let Some(d) = &self.deflater {
            return d.worst_len(len);
        }
        len
    }

    fn send_data(
        self: &Arc<Self>,
        shared: &Arc<Shared<T>>,
        rsv: u8,
        op: OpCode,
        body: Vec<u8>,
        quiet: bool,
    ) -> std::result::Result<SendStatus, Refused> {
        let mut head = [0u8; 10];
        let n = encode_header_rsv(&mut head, true, rsv, op, body.len());
        let may_defer = !crate::runtime::service::on_worker();
        let locked = if body.len() <= GATHER_PAYLOAD {
            match self.cork_small(shared, &head[..n], &body, may_defer) {
                Ok(()) => {
                    // Its bytes copied, the payload's buffer serves the
                    // next message decoded (as `push_frame` has it).
                    crate::proto::assemble::recycle_payload(body);
                    return Ok(SendStatus::Queued);
                }
                Err(w) => Some(w),
            }
        } else {
            None
        };
        let kind = if quiet { Kind::DataTry } else { Kind::Data };
        self.write_locked(
            shared,
            locked,
            Chunk::Head(head, n as u8),
            Some(Chunk::Owned(body)),
            kind,
            may_defer,
        )
    }

    /// A small data frame sent while the job owns the connection, copied
    /// onto the gathered chunk at the back of its queue: what `write`
    /// does with it (admits it, corks it, `push_frame` gathers it), with
    /// the queue's cost worked out once. Where anything else could
    /// happen, nothing is done and the lock is handed back: `write` then
    /// decides it all, under the same hold.
    fn cork_small(
        &self,
        shared: &Shared<T>,
        head: &[u8],
        body: &[u8],
        may_defer: bool,
    ) -> std::result::Result<(), parking_lot::MutexGuard<'_, WriteSide>> {
        let mut w = self.io.lock();
        let cost = w.out.cost();
        // Corked, and so admitted: the cork is under the hard limit, and a
        // queue that costs no more than the output budget's least share
        // takes any frame.
        if self.takes_no_frame(&w)
            || !self.corks(shared, &w, cost, head.len() + body.len())
            || !shared.counters.output.takes_any(cost)
        {
            return Err(w);
        }
        let Some(after) = w.out.gather_onto_back(cost, head, body, &shared.counters) else {
            return Err(w);
        };
        shared.counters.message_out();
        self.note_holding(&shared.marks, w.drain_wanted, after + w.events);
        drop(w);
        if may_defer {
            send_untimed();
        }
        Ok(())
    }

    /// Send a frame encoded once for many connections.
    pub(crate) fn send_shared(
        self: &Arc<Self>,
        shared: &Arc<Shared<T>>,
        frame: &Arc<SharedFrame>,
    ) -> Result<SendStatus> {
        self.write(
            shared,
            Chunk::Shared(Arc::clone(frame)),
            None,
            Kind::Data,
            false,
        )
        .map_err(|r| r.error)
    }

    /// Send a keepalive ping, noting that a pong is due.
    pub(crate) fn send_ping(self: &Arc<Self>, shared: &Arc<Shared<T>>) -> Result<()> {
        self.io.lock().pong_due = true;
        self.send_control(shared, OpCode::Ping, &[])
    }

    /// Send the user's ping, noting that a pong is due. Refused as a
    /// data frame is by a queue at its limits: a user that pings a client
    /// that reads nothing, on a timer, would otherwise grow its queue
    /// past the hard limit, without bound where no idle timeout ends it.
    pub(crate) fn send_user_ping(self: &Arc<Self>, shared: &Arc<Shared<T>>) -> Result<()> {
        self.control_as(shared, OpCode::Ping, &[], Kind::UserControl)?;
        // After it is let in (a pong that comes first is only taken for
        // input): a refused ping expects no pong.
        self.io.lock().pong_due = true;
        Ok(())
    }

    pub(crate) fn send_control(
        self: &Arc<Self>,
        shared: &Arc<Shared<T>>,
        op: OpCode,
        payload: &[u8],
    ) -> Result<()> {
        self.control_as(shared, op, payload, Kind::Control)
    }

    /// A control frame of `kind` (`Control`, or the user's).
    fn control_as(
        self: &Arc<Self>,
        shared: &Arc<Shared<T>>,
        op: OpCode,
        payload: &[u8],
        kind: Kind,
    ) -> Result<()> {
        let mut head = [0u8; 10];
        let n = encode_header(&mut head, true, op, payload.len());
        let body = (!payload.is_empty()).then(|| Chunk::Owned(payload.to_vec()));
        self.write(shared, Chunk::Head(head, n as u8), body, kind, false)
            .map(|_| ())
            .map_err(|r| r.error)
    }

    /// Write the `101` response with the write token that `new` hands
    /// the handshake job. The connection is already reachable (by id, by
    /// broadcast), so frames sent meanwhile wait in the queue behind the
    /// token, and a client that has read its `101` is sure to get every
    /// broadcast after it.
    pub(crate) fn send_upgrade(self: &Arc<Self>, shared: &Arc<Shared<T>>, bytes: &[u8]) {
        let result = write_vectored(&self.stream, &[IoSlice::new(bytes)]);
        let mut w = self.io.lock();
        // `on_connect` comes next, on this thread (see `Serving`).
        w.closures = shared.handlers.connect.is_some();
        match result {
            Ok(n) => {
                shared.counters.bytes_out(n);
                if n < bytes.len() {
                    // What the socket did not take, in front of anything
                    // queued meanwhile.
                    w.out.push_front_partial(
                        Chunk::Owned(bytes[n..].to_vec()),
                        None,
                        0,
                        &shared.counters,
                    );
                    self.note_held(&shared.marks, &w);
                }
            }
            Err(e) => w.write_error = Some(e.kind()),
        }
        self.flush_holding_token(shared, w);
    }

    /// Queue our close frame (user close, shutdown, or answer to the peer).
    /// `closing` is set and the frame queued under one hold of the lock:
    /// the job takes `closing` for our close frame sent, so a peer's Close
    /// read between the two would be taken for the answer to ours, and the
    /// connection torn down before ours was queued.
    pub(crate) fn send_close(
        self: &Arc<Self>,
        shared: &Arc<Shared<T>>,
        frame: CloseFrame,
    ) -> Result<()> {
        self.send_close_claiming(shared, frame).1
    }

    /// [`Conn::send_close`], and whether this close is the connection's
    /// own: no close of ours came before it (decided under the lock that
    /// sets `closing`, so a user's close on another thread is either
    /// before it or refused). True also when the frame cannot be written
    /// (the connection failed or is finished with no close sent): its code
    /// is then what the connection ended with.
    pub(crate) fn send_close_claiming(
        self: &Arc<Self>,
        shared: &Arc<Shared<T>>,
        frame: CloseFrame,
    ) -> (bool, Result<()>) {
        let claimed = self.queue_close(shared, frame);
        if claimed.0 {
            // Nothing more is admitted to this queue: a thread waiting in
            // `send_timeout` for room in it waits no more.
            shared.room_made(self);
        }
        claimed
    }

    /// [`Conn::send_close_claiming`] but for waking the threads that wait
    /// for room.
    fn queue_close(
        self: &Arc<Self>,
        shared: &Arc<Shared<T>>,
        frame: CloseFrame,
    ) -> (bool, Result<()>) {
        let payload = close_payload(frame.code.as_u16(), &frame.reason);
        let mut head = [0u8; 10];
        let n = encode_header(&mut head, true, OpCode::Close, payload.len());
        let mut w = self.io.lock();
        if self.closing.load(Ordering::Acquire) {
            return (false, Err(Error::Closed));
        }
        if w.finished {
            return (true, Err(Error::Closed));
        }
        // Set under the lock, which every check of it below holds.
        self.closing.store(true, Ordering::Release);
        w.close_deadline_ms = shared.now_ms().saturating_add(shared.close_timeout_ms());
        let unpaused = w.paused && !shared.marks.must_pause(w.pausing_for(true), true);
        // A closing client is not paused for the event channel: should
        // its queue keep it paused now, the pause ends by the queue alone.
        w.starve = Starve::No;
        if unpaused {
            // The peer's answer must be read, even if nobody consumes
            // this client's events any more (the main loop may be the
            // one shutting down). What came during the pause was not
            // reported to be read (see `claim_event`): a job reads it, as
            // at every end of a pause.
            w.paused = false;
        }
        if w.write_error.is_some() {
            return (true, Err(Error::Closed));
        }
        let idle = !w.writing && !w.job_running && w.out.is_empty();
        self.enqueue(
            shared,
            &mut w,
            Chunk::Head(head, n as u8),
            Some(Chunk::Owned(payload)),
        );
        // Otherwise whoever holds the connection takes it along: a writer
        // (it flushes until the queue is empty), the job (at its end), or
        // the poller's report of room for a queue the kernel pushed back
        // on (no write now, which under a topic's lock, from a publish
        // that closes a slow subscriber, would be a system call each).
        if idle {
            w.writing = true;
            self.flush_holding_token(shared, w);
            if unpaused {
                schedule(shared, self);
            }
        } else if unpaused && claim_locked(&mut w) {
            drop(w);
            spawn_job(shared, self);
        }
        (true, Ok(()))
    }

    /// User-initiated close: validate, queue the close frame, and make sure
    /// a job books the close deadline.
    pub(crate) fn close(
        self: &Arc<Self>,
        shared: &Arc<Shared<T>>,
        code: CloseCode,
        reason: &str,
    ) -> Result<()> {
        if !code.is_sendable() {
            return Err(Error::InvalidInput("close code may not be sent"));
        }
        if reason.len() > 123 {
            return Err(Error::InvalidInput("close reason over 123 bytes"));
        }
        self.send_close(shared, CloseFrame::new(code, reason))?;
        schedule(shared, self);
        Ok(())
    }

    /// A close asked for by the user (or by shutdown), outside any lock:
    /// as [`Conn::close`], and if a job owns the connection and nobody is
    /// writing, what is queued, the close frame last, is written now. The
    /// job would write it only at its end, and one of the client's own
    /// closures may run past `close_timeout` (the close frame never
    /// written, the peer dropped for not answering it).
    pub(crate) fn close_and_flush(
        self: &Arc<Self>,
        shared: &Arc<Shared<T>>,
        code: CloseCode,
        reason: &str,
    ) -> Result<()> {
        self.close(shared, code, reason)?;
        let w = self.io.lock();
        if w.job_running {
            self.flush_unless_writing(shared, w);
        }
        Ok(())
    }

    /// A send was refused for backpressure: under the `Close` policy, the
    /// client goes (after what is queued, within `close_timeout`).
    fn over_limit(self: &Arc<Self>, shared: &Arc<Shared<T>>) {
        if shared.config.slow_client_policy == SlowClientPolicy::Close
            && self
                .close(shared, CloseCode::POLICY, "send queue over limit")
                .is_ok()
        {
            self.io.lock().closed_for_backpressure = true;
            Counters::add(&shared.counters.backpressure_closes, 1);
        }
    }

    /// Tear down at the next job, whatever state the connection is in.
    pub(crate) fn force_close(self: &Arc<Self>, shared: &Arc<Shared<T>>) {
        self.io.lock().force_close = true;
        schedule(shared, self);
    }

    /// The read gate, asked between messages: whether the job may go on
    /// reading and dispatching. At high water (or with the event channel
    /// over its budget) the connection pauses; whoever brings it back
    /// under the marks resumes it (see [`Conn::resume_locked`]).
    pub(crate) fn may_read(self: &Arc<Self>, shared: &Arc<Shared<T>>) -> bool {
        self.may_read_staged(shared, 0)
    }

    /// [`may_read`](Self::may_read), counting `staged` bytes of this
    /// connection's events a job has staged and not charged yet.
    ///
    /// Asked for every message, it takes no lock while [`Conn::look`] is
    /// clear: the connection then holds less than half of high water, and
    /// with at most as much again staged it is under high water, as the
    /// look would find. (Not paused either: a pause sets it.) The event
    /// channel's budget is shared, and is asked lock-free either way.
    #[inline]
    pub(crate) fn may_read_staged(
        self: &Arc<Self>,
        shared: &Arc<Shared<T>>,
        staged: usize,
    ) -> bool {
        if !self.look.load(Ordering::Relaxed)
            && staged < shared.marks.high / 2
            && !shared.events.must_wait(staged)
        {
            return true;
        }
        self.look_at_gate(shared, staged)
    }

    /// [`Conn::may_read_staged`] under the lock.
    fn look_at_gate(self: &Arc<Self>, shared: &Arc<Shared<T>>, staged: usize) -> bool {
        let mut w = self.io.lock();
        // Clear again below, only if nothing asks for the next look.
        self.look.store(true, Ordering::Relaxed);
        // Once our close frame is queued, the peer's answer must be read
        // even if the main loop has stopped consuming (it may be the one
        // shutting down): its events no longer pause it (the channel's
        // budget bounds them), and its queue only at the hard limit.
        let closing = self.closing.load(Ordering::Acquire);
        if w.doomed() {
            // Torn down at the end of this pass, and nothing more will be
            // written: a pause protects nothing now, and what was read
            // (whole messages kept unparsed by one, the peer's close
            // among them) is delivered before the `Disconnect`. At most
            // one read's rest, and what the socket still gives; but not
            // past the event channel's budget or the hard limit of this
            // client's events: the teardown then feeds the rest, and
            // discards (and counts) what is past them.
            let staged = if closing { 0 } else { staged };
            return !(shared.events.over_budget_with(staged)
                || w.events + staged >= shared.marks.hard);
        }
        if w.paused {
            return false;
        }
        // A client a send was refused to (its own limit, or the server's
        // budget, which can refuse it under high water) is not read until
        // its queue is down to low water, when its `Drain` is due: its
        // replies would be refused too, and the server would read and
        // drop its input as fast as it sends.
        if !closing && w.drain_wanted && !shared.marks.may_resume(w.out.cost()) {
            w.paused = true;
            Counters::add(&shared.counters.read_pauses, 1);
            return false;
        }
        // Staged events count as events: not once closing.
        let staged = if closing { 0 } else { staged };
        if shared
            .marks
            .must_pause(w.pausing_for(closing) + staged, closing)
        {
            w.paused = true;
            Counters::add(&shared.counters.read_pauses, 1);
            return false;
        }
        if !closing && shared.events.must_wait(staged) {
            w.paused = true;
            w.starve = Starve::Looking;
            drop(w);
            Counters::add(&shared.counters.read_pauses, 1);
            shared.events.starve(shared, self);
            return false;
        }
        if !w.drain_wanted && !shared.marks.half_high(w.held()) {
            self.look.store(false, Ordering::Relaxed);
        }
        true
    }

    /// After what it holds grew, or a send to it was refused (with the
    /// `io` lock held): whether the read gate must be looked at under the
    /// lock again (see [`Conn::look`]).
    pub(crate) fn note_held(&self, marks: &crate::runtime::flow::Marks, w: &WriteSide) {
        self.note_holding(marks, w.drain_wanted, w.held());
    }

    /// [`Conn::note_held`], with what the connection holds worked out.
    fn note_holding(&self, marks: &crate::runtime::flow::Marks, drain_wanted: bool, held: usize) {
        // Written only when it changes: a client over half of high water
        // would otherwise have every frame queued to it write the line
        // its job reads for every message.
        if (drain_wanted || marks.half_high(held)) && !self.look.load(Ordering::Relaxed) {
            self.look.store(true, Ordering::Relaxed);
        }
    }

    /// Resume a paused connection if it is back under low water (or, if
    /// `starved_over` and it was paused for the channel alone, under high
    /// water); returns whether a job must run to go on reading.
    pub(crate) fn resume_locked(
        shared: &Shared<T>,
        w: &mut WriteSide,
        starved_over: bool,
        closing: bool,
    ) -> bool {
        if !w.paused || w.finished {
            return false;
        }
        if w.starved() {
            if !starved_over {
                return false;
            }
            w.starve = Starve::No;
            // Paused under high water, for the channel alone: it reads
            // again as soon as the channel has room, unless what it holds
            // reached high water meanwhile. Then this is a pause like any
            // other, which low water ends.
            if !shared.marks.must_pause(w.held(), false) {
                w.paused = false;
                return true;
            }
        }
        if !shared.marks.may_resume(w.pausing_for(closing)) {
            return false;
        }
        w.paused = false;
        true
    }

    /// Take `bytes` of this connection's events off its account (the main
    /// loop consumed them), resuming it if that brings it under low water,
    /// and running a job to answer the peer's close if that waited for
    /// the last of them.
    pub(crate) fn events_consumed(self: &Arc<Self>, shared: &Arc<Shared<T>>, bytes: usize) {
        let mut w = self.io.lock();
        w.events = w.events.saturating_sub(bytes);
        let closing = self.closing.load(Ordering::Acquire);
        let resumed = Self::resume_locked(shared, &mut w, false, closing);
        // A close deadline before our close is queued: the peer's close
        // (or its FIN) came, and our answer may be waiting for this.
        let answer = w.events == 0 && w.close_deadline_ms != 0 && !closing;
        if (resumed || answer) && claim_locked(&mut w) {
            drop(w);
            spawn_job(shared, self);
        }
    }

    /// The peer's close came while the main loop has not taken all of this
    /// client's messages: whether our answer waits for it (true), so that
    /// the loop's replies to them go out before it, as a closure's do. It
    /// waits at most `close_timeout`, and the answer then has a
    /// `close_timeout` of its own to leave; the client has sent its last
    /// message, and what it sends after is read and discarded.
    pub(crate) fn defer_close(&self, shared: &Shared<T>, now_ms: u64) -> bool {
        let mut w = self.io.lock();
        if w.events == 0 || w.finished || self.closing.load(Ordering::Acquire) {
            return false;
        }
        if w.close_deadline_ms == 0 {
            w.close_deadline_ms = now_ms.saturating_add(shared.close_timeout_ms());
        }
        true
    }

    /// A close answer waits (`defer_close`): whether it is due now, the
    /// main loop having taken this client's events or `close_timeout`
    /// having passed.
    pub(crate) fn deferred_close_due(&self, now_ms: u64) -> bool {
        let w = self.io.lock();
        // The deadline stays: the close sent now sets its own, and if ours
        // went first (the user's), this one still ends the wait for it.
        w.events == 0 || (w.close_deadline_ms != 0 && now_ms >= w.close_deadline_ms)
    }

    /// Starved (see `look_for_the_end`): whether what the client sent may
    /// still be looked at for its end. `false` stops that until the
    /// connection is starved again.
    pub(crate) fn looks_for_end(&self, go_on: Option<bool>) -> bool {
        let mut w = self.io.lock();
        if let Some(go_on) = go_on
            && w.starved()
        {
            w.starve = if go_on {
                Starve::Looking
            } else {
                Starve::Quiet
            };
        }
        w.paused && w.starve == Starve::Looking && !w.finished
    }

    /// The event channel has room again: resume if starved.
    pub(crate) fn unstarve(self: &Arc<Self>, shared: &Arc<Shared<T>>) {
        let mut w = self.io.lock();
        let closing = self.closing.load(Ordering::Acquire);
        if Self::resume_locked(shared, &mut w, true, closing) && claim_locked(&mut w) {
            drop(w);
            spawn_job(shared, self);
        }
    }

    /// Queue or write one frame. `may_defer` (a data frame sent from a
    /// thread outside the pool) hands the write to the pool when the
    /// connection is idle and the thread is sending in a burst, so that a
    /// user thread sending many messages spends no syscall on each:
    /// workers write them, batched per connection. (The burst is judged
    /// only here, where it decides something: the clock is not read for
    /// frames that cork or queue anyway, which are only counted.)
    fn write(
        self: &Arc<Self>,
        shared: &Arc<Shared<T>>,
        head: Chunk,
        body: Option<Chunk>,
        kind: Kind,
        may_defer: bool,
    ) -> std::result::Result<SendStatus, Refused> {
        self.write_locked(shared, None, head, body, kind, may_defer)
    }

    /// [`Conn::write`], under the hold of the connection's lock `locked`
    /// if one is handed in (else it takes the lock).
    fn write_locked<'a>(
        self: &'a Arc<Self>,
        shared: &Arc<Shared<T>>,
        locked: Option<parking_lot::MutexGuard<'a, WriteSide>>,
        head: Chunk,
        body: Option<Chunk>,
        kind: Kind,
        may_defer: bool,
    ) -> std::result::Result<SendStatus, Refused> {
        let len = head.bytes().len() + body.as_ref().map_or(0, |b| b.bytes().len());
        let owned = len - head.shared_len() - body.as_ref().map_or(0, Chunk::shared_len);
        let mut w = match self.admit_locked(shared, locked, kind, len, owned) {
            Ok(w) => w,
            Err(error) => return Err(Refused { error, body }),
        };
        // Corking: while a job owns the connection (a handler's own echo,
        // or another thread's send while the job reads), frames wait for
        // the job's end and leave together in one vectored write. While
        // the job may be in one of the client's closures, only its own
        // thread's frames wait.
        // Measured as flow control measures (bytes and a little per frame),
        // so that many tiny frames corked in one job cannot pause it.
        let cork = self.corks(shared, &w, w.out.cost(), len);
        let waiting_for_writable = !w.out.is_empty() && !w.job_running;
        if w.writing || cork || waiting_for_writable {
            self.enqueue(shared, &mut w, head, body);
            if may_defer {
                send_untimed();
            }
            return Ok(SendStatus::Queued);
        }
        if may_defer
            && !w.job_running
            && w.out.is_empty()
            && !first_answer(self)
            && sending_in_a_burst()
        {
            self.enqueue(shared, &mut w, head, body);
            // The flush job owns the connection until it is done; sends
            // meanwhile cork behind this one.
            w.job_running = true;
            drop(w);
            shared.defer_flush(self);
            return Ok(SendStatus::Queued);
        }
        if !w.out.is_empty() {
            // Corked frames and this one are over the cork: all go now.
            self.enqueue(shared, &mut w, head, body);
            w.writing = true;
            self.flush_holding_token(shared, w);
            let w = self.io.lock();
            return self
                .judge(&w)
                .map_err(|error| Refused { error, body: None });
        }
        w.writing = true;
        drop(w);

        let result = {
            let parts = [
                IoSlice::new(head.bytes()),
                IoSlice::new(body.as_ref().map_or(&[][..], |b| b.bytes())),
            ];
            write_vectored(&self.stream, &parts)
        };
        if let Ok(n) = result {
            shared.counters.bytes_out(n);
        }
        let mut w = self.io.lock();
        if matches!(result, Ok(n) if n > 0) {
            // The client reads: what its idleness is judged by when it is
            // paused for its queue.
            w.last_progress_ms = shared.now_ms();
        }
        let outcome = match result {
            Ok(n) if n == len => {
                // Written whole: its payload's buffer serves the next
                // message decoded (on a worker), or goes back to the
                // decoders (from a main loop).
                if let Some(Chunk::Owned(b)) = body {
                    crate::proto::assemble::recycle_payload(b);
                }
                Ok(SendStatus::Written)
            }
            // Torn down meanwhile (by its job, or a shutdown forcing it):
            // the caller is told, since its `Disconnect` may be out
            // already. With nothing written it gets the message back;
            // with part of the frame written, the rest is counted as not
            // delivered and there is nothing to hand back.
            Ok(0) if w.finished => Err(Refused {
                error: Error::Closed,
                body,
            }),
            Ok(n) if w.finished => {
                self.client.add_unsent(len - n);
                Err(Refused {
                    error: Error::Closed,
                    body: None,
                })
            }
            Ok(n) => {
                // Put what is left in front of anything queued meanwhile.
                w.out.push_front_partial(head, body, n, &shared.counters);
                self.note_held(&shared.marks, &w);
                Ok(SendStatus::Queued)
            }
            Err(e) => {
                // Nothing went out: the caller gets the message back.
                w.write_error = Some(e.kind());
                Err(Refused {
                    error: Error::Closed,
                    body,
                })
            }
        };
        self.flush_holding_token(shared, w);
        if matches!(&outcome, Err(Refused { body: Some(_), .. }))
            && matches!(kind, Kind::Data | Kind::DataTry)
        {
            // Handed back, never sent: not a message out after all.
            shared.counters.message_not_out();
        }
        match outcome {
            // The rest failed to go out: the connection is closing, and
            // what was queued is counted as undelivered when it goes.
            Ok(SendStatus::Queued) if self.io.lock().write_error.is_some() => Err(Refused {
                error: Error::Closed,
                body: None,
            }),
            o => o,
        }
    }

    /// Whether a frame of `len` bytes (`owned` of them its own, not a
    /// shared frame's) may be queued: the one check every write path
    /// makes. A refused data frame is counted, asks for a
    /// `Drain` (unless the close policy closes the client) and applies
    /// the slow-client policy (unless only a try).
    /// On success the lock is handed on, and a data frame is counted out.
    fn admit(
        self: &Arc<Self>,
        shared: &Arc<Shared<T>>,
        kind: Kind,
        len: usize,
        owned: usize,
    ) -> std::result::Result<parking_lot::MutexGuard<'_, WriteSide>, Error> {
        self.admit_locked(shared, None, kind, len, owned)
    }

    /// [`Conn::admit`], under the hold of the connection's lock `locked`
    /// if one is handed in (else it takes the lock).
    fn admit_locked<'a>(
        self: &'a Arc<Self>,
        shared: &Arc<Shared<T>>,
        locked: Option<parking_lot::MutexGuard<'a, WriteSide>>,
        kind: Kind,
        len: usize,
        owned: usize,
    ) -> std::result::Result<parking_lot::MutexGuard<'a, WriteSide>, Error> {
        let mut w = locked.unwrap_or_else(|| self.io.lock());
        // No frame follows our close frame (which `send_close` queues
        // itself).
        if self.takes_no_frame(&w) {
            return Err(Error::Closed);
        }
        let limited = kind != Kind::Control;
        if limited && let Err(error) = shared.admits_frame(&w.out, len, owned) {
            match kind {
                Kind::Data | Kind::Probe => {
                    // Under the close policy the client is closed instead,
                    // and no `Drain` is due it: asked for here, a flush
                    // racing the close (the kernel taking the queue as
                    // its buffers grow) could fire one before the close
                    // frame is queued, though the client takes no more.
                    if shared.config.slow_client_policy != SlowClientPolicy::Close {
                        w.drain_wanted = true;
                        self.note_held(&shared.marks, &w);
                    }
                    drop(w);
                    Counters::add(&shared.counters.dropped, 1);
                    self.over_limit(shared);
                }
                Kind::UserControl => {
                    w.drain_wanted = true;
                    self.note_held(&shared.marks, &w);
                }
                Kind::DataTry | Kind::Control => {}
            }
            return Err(error);
        }
        if matches!(kind, Kind::Data | Kind::DataTry) {
            shared.counters.message_out();
        }
        Ok(w)
    }

    /// Queue a frame shared with other connections without writing it:
    /// a publish queues to every subscriber under its topic's lock (so
    /// all see one order) and writes after letting go of it. Returns
    /// whether the caller now holds the write token and must flush (see
    /// [`Conn::flush_taken`]).
    pub(crate) fn queue_shared(
        self: &Arc<Self>,
        shared: &Arc<Shared<T>>,
        frame: &Arc<SharedFrame>,
    ) -> Result<bool> {
        let mut w = self.admit(shared, Kind::Data, frame.bytes().len(), 0)?;
        let idle = !w.writing && !w.job_running && w.out.is_empty();
        w.out
            .push(Chunk::Shared(Arc::clone(frame)), &shared.counters);
        self.note_held(&shared.marks, &w);
        Ok(self.take_token(shared, &mut w, idle))
    }

    /// After a frame was queued without writing: whether its queuer takes
    /// the write token (and must flush). It does if the connection was
    /// idle, and if a job owns it with more corked than the cork holds (a
    /// closure of the client's own may run for long: the publishes must
    /// not pile up to the hard limit behind it, as `write` does not let
    /// sends). Otherwise whoever holds the connection (a writer, the job,
    /// or the poller's report of room for a queue) takes the frame along.
    fn take_token(&self, shared: &Shared<T>, w: &mut WriteSide, idle: bool) -> bool {
        let over_cork = !w.writing
            && w.job_running
            && (w.out.cost() > shared.marks.cork() || w.closures && !self.served_here());
        if idle || over_cork {
            w.writing = true;
        }
        idle || over_cork
    }

    /// Compress `message` in this connection's own context and queue it
    /// without writing, as [`Conn::queue_shared`] does: true if the caller
    /// must flush. A publish queues under its topic's lock, and writes
    /// only after letting go of it.
    #[cfg(feature = "deflate")]
    pub(crate) fn queue_own(
        self: &Arc<Self>,
        shared: &Arc<Shared<T>>,
        message: &Message,
    ) -> Result<bool> {
        let Some(d) = &self.deflater else {
            return Err(Error::Internal("queue_own without compression".into()));
        };
        // A subscriber whose queue would refuse even the smallest frame
        // (one that never reads, at its hard limit) is refused before the
        // message is compressed for it: under the topic's lock, which
        // every other subscriber's copy waits for, and only to be thrown
        // away (and the context with it).
        drop(self.admit(shared, Kind::Probe, 3, 3)?);
        let op = message.opcode();
        d.compress_in_context(message.as_bytes(), |z| {
            let mut head = [0u8; 10];
            let n = encode_header_rsv(&mut head, true, RSV1, op, z.len());
            let mut w = self.admit(shared, Kind::Data, n + z.len(), n + z.len())?;
            let idle = !w.writing && !w.job_running && w.out.is_empty();
            self.enqueue(
                shared,
                &mut w,
                Chunk::Head(head, n as u8),
                Some(Chunk::Owned(z)),
            );
            Ok(self.take_token(shared, &mut w, idle))
        })
    }

    /// Flush with the write token [`Conn::queue_shared`] handed over.
    pub(crate) fn flush_taken(self: &Arc<Self>, shared: &Arc<Shared<T>>) -> Result<SendStatus> {
        let w = self.io.lock();
        self.flush_holding_token(shared, w);
        self.judge(&self.io.lock())
    }

    /// What became of a frame queued and then flushed, judged by the bytes
    /// still counted, not by the chunks in the queue: another writer (the
    /// job, at its end) may have taken them out to write. A connection
    /// torn down since wrote it if nothing was counted lost then (a client
    /// that read everything and left); otherwise it may have been lost.
    fn judge(&self, w: &WriteSide) -> Result<SendStatus> {
        if w.write_error.is_some() || (w.finished && self.client.unsent() > 0) {
            Err(Error::Closed)
        } else if w.finished || w.out.bytes() == 0 {
            Ok(SendStatus::Written)
        } else {
            Ok(SendStatus::Queued)
        }
    }

    fn enqueue(&self, shared: &Shared<T>, w: &mut WriteSide, head: Chunk, body: Option<Chunk>) {
        w.out.push_frame(head, body, &shared.counters);
        self.note_held(&shared.marks, w);
    }

    /// Have the poller watch the socket, edge-triggered (see [`Watch`]):
    /// for input from the first call on, registering the socket if it is
    /// not in the poller yet, and for room too once a write left bytes.
    /// At most two system calls in a connection's life; none after. False
    /// if the poller refused (out of kernel memory).
    pub(crate) fn arm(&self, shared: &Shared<T>, w: &mut WriteSide) -> bool {
        if !shared.edge {
            return self.arm_once(shared, w);
        }
        let wanted = if w.watch == Watch::InputAndRoom || !w.out.is_empty() {
            Watch::InputAndRoom
        } else {
            Watch::Input
        };
        if w.watch >= wanted {
            return true;
        }
        let interest = Interest::new(self.key(), true, wanted == Watch::InputAndRoom);
        let done = if w.watch != Watch::Unregistered {
            shared
                .poller
                .modify_with_mode(&self.stream, interest, polling::PollMode::Edge)
        } else {
            crate::runtime::poller::register_edge(&shared.poller, &self.stream, interest)
        };
        if done.is_err() {
            return false;
        }
        w.watch = wanted;
        true
    }

    /// `arm` where interest is oneshot: what the connection's state calls
    /// for, unless armed already. Nothing is armed while nothing is wanted
    /// (a paused connection with nothing to write): armed, a reset socket
    /// would report at once, over and over. Whatever ends the pause or
    /// queues output runs a job, which arms what is wanted then.
    fn arm_once(&self, shared: &Shared<T>, w: &mut WriteSide) -> bool {
        // A starved connection is looked at for its end (`claim_event`).
        let looking = w.paused && w.starve == Starve::Looking;
        let readable = (!w.paused || looking) && !w.read_done && !w.finished;
        let writable = !w.out.is_empty() && !w.writing && w.write_error.is_none();
        let wanted = match (readable, writable) {
            (false, false) => return true,
            (true, false) => Watch::OnceInput,
            (false, true) => Watch::OnceRoom,
            (true, true) => Watch::OnceBoth,
        };
        if w.watch == wanted {
            return true;
        }
        let interest = Interest::new(self.key(), readable, writable);
        let done = if w.watch == Watch::Unregistered {
            crate::runtime::poller::register(&shared.poller, &self.stream, interest)
        } else {
            shared.poller.modify(&self.stream, interest)
        };
        if done.is_err() {
            return false;
        }
        w.watch = wanted;
        true
    }

    /// Flush from a pool job: on room reported while the connection's
    /// job runs a closure, or the job's own before a closure.
    pub(crate) fn flush_from_job(self: &Arc<Self>, shared: &Arc<Shared<T>>) {
        self.flush_unless_writing(shared, self.io.lock());
    }

    /// The flush that starts a job's pass, which notes whether the pass
    /// may run the client's closures (see [`WriteSide::closures`]): with
    /// `on_message`, it may. Noted under the same hold of the lock as the
    /// flush starts, so that a frame another thread corked before is in
    /// this flush, and one after is written by its sender.
    pub(crate) fn start_pass(self: &Arc<Self>, shared: &Arc<Shared<T>>, on_message: bool) {
        let mut w = self.io.lock();
        w.closures = on_message;
        self.flush_unless_writing(shared, w);
    }

    /// Take a due `Drain` for the job to emit. If `on_drain` is set and the
    /// pass was not already running closures, it is from now on (see
    /// [`Conn::start_pass`]), and what other threads corked meanwhile is
    /// flushed first.
    pub(crate) fn take_drain_due(self: &Arc<Self>, shared: &Arc<Shared<T>>) -> bool {
        let mut w = self.io.lock();
        let due = std::mem::take(&mut w.drain_due);
        if due && shared.handlers.drain.is_some() && !w.closures {
            w.closures = true;
            self.flush_unless_writing(shared, w);
        }
        due
    }

    /// Whether this thread runs this connection's job (see [`Serving`]).
    fn served_here(&self) -> bool {
        SERVING.get() == std::ptr::from_ref(self) as usize
    }

    /// Take the write token and flush, unless someone holds it or there
    /// is nothing to write.
    fn flush_unless_writing<'a>(
        self: &'a Arc<Self>,
        shared: &Arc<Shared<T>>,
        mut w: parking_lot::MutexGuard<'a, WriteSide>,
    ) {
        if w.writing || w.out.is_empty() || w.finished {
            return;
        }
        w.writing = true;
        self.flush_holding_token(shared, w);
    }

    /// With the token held: write the queue until it is empty, the kernel
    /// pushes back, or a write fails; then give the token back and make
    /// sure whatever is left will be flushed, and that flow control hears
    /// of the room made. Returns whether the queue is still not empty: the
    /// kernel pushed back (or a write failed), since the loop writes what
    /// others queue meanwhile.
    pub(crate) fn flush_holding_token<'a>(
        self: &'a Arc<Self>,
        shared: &Arc<Shared<T>>,
        mut w: parking_lot::MutexGuard<'a, WriteSide>,
    ) -> bool {
        let before = w.out.bytes();
        loop {
            if w.out.is_empty() || w.write_error.is_some() || w.finished {
                break;
            }
            // Room the poller reports from now on is for this write, or
            // for the next try if this one finds none.
            w.room = Room::Unknown;
            let mut taken = w.out.take_for_write();
            drop(w);
            let (written, result) = write_queue(&self.stream, &mut taken);
            w = self.io.lock();
            if w.finished {
                // Torn down while this write was out: teardown counted
                // these bytes as lost, but some went.
                shared.counters.bytes_out(written);
                self.client.sub_unsent(written);
                break;
            }
            if written > 0 {
                w.last_progress_ms = shared.now_ms();
            }
            w.out.put_back(taken, written, &shared.counters);
            match result {
                // The socket is full: the poller reports room, unless it
                // did since this write began (then write again).
                Ok(false) if w.room != Room::Reported => {
                    w.room = Room::Awaited;
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    // The job tears the connection down (even after part
                    // of the queue went: no event would report the error).
                    w.write_error = Some(e.kind());
                    break;
                }
            }
        }
        w.writing = false;
        let made_room = w.out.bytes() < before;
        if w.drain_wanted && shared.marks.may_resume(w.out.cost()) {
            w.drain_wanted = false;
            w.drain_due = true;
        }
        let closing = self.closing.load(Ordering::Acquire);
        let resumed = Self::resume_locked(shared, &mut w, false, closing);
        // The job must run if a write failed, if our close frame just left
        // (the close handshake moves on), if the peer is gone and the
        // queue is done, to tell the user of a drain, or to read again.
        let needs_job = w.write_error.is_some()
            || (self.closing.load(Ordering::Acquire) && w.out.is_empty())
            || (w.read_done && w.out.is_empty())
            || w.drain_due
            || resumed;
        let mut spawn = false;
        if w.job_running {
            // The job notices errors when it ends. Room the socket makes
            // for what is left is reported at once, while a closure may
            // hold the job (see `claim_event`).
            if needs_job {
                w.job_again = true;
            }
            if !w.out.is_empty() && !w.finished && !self.arm(shared, &mut w) {
                w.force_close = true;
                w.job_again = true;
            }
        } else if needs_job && !w.finished {
            w.job_running = true;
            spawn = true;
        } else if !w.finished && !self.arm(shared, &mut w) {
            // Out of kernel memory for the poller: nothing would wake this
            // connection again. Its job tears it down, as a job's own
            // failed arm does.
            w.force_close = true;
            w.job_running = true;
            spawn = true;
        }
        // `room_made` takes the lock `send_timeout` waiters hold while
        // they look at this queue: never with this one held.
        let left = !w.out.is_empty();
        drop(w);
        if spawn {
            spawn_job(shared, self);
        }
        if made_room {
            shared.room_made(self);
        }
        left
    }
}

/// Write `queue` (the first `*head` bytes of its front already written)
/// with vectored writes until it is empty or the kernel takes no more.
/// Returns the bytes written, and whether the queue was emptied or the
/// error that stopped it (after what did go out).
fn write_queue(stream: &TcpStream, taken: &mut Unwritten) -> (usize, io::Result<bool>) {
    let mut total = 0;
    while !taken.chunks.is_empty() {
        let (queue, head) = (&taken.chunks, taken.head);
        // Many small frames at the front (a backlog of tiny messages): one
        // copy and one `send` for as many as fit in `GATHER` bytes, where a
        // vectored write would take `IOVECS` of them.
        let (fit, fit_bytes) = small_run(queue, head);
        let (result, want) = if fit > IOVECS {
            (
                write_gathered(stream, queue, head, fit, fit_bytes),
                fit_bytes,
            )
        } else {
            let mut slices = [IoSlice::new(&[]); IOVECS];
            let mut n = 0;
            let mut want = 0;
            for (i, chunk) in queue.iter().take(slices.len()).enumerate() {
                let bytes = if i == 0 {
                    &chunk.bytes()[head..]
                } else {
                    chunk.bytes()
                };
                slices[i] = IoSlice::new(bytes);
                want += bytes.len();
                n += 1;
            }
            (write_vectored(stream, &slices[..n]), want)
        };
        let mut written = match result {
            Ok(w) => w,
            Err(e) => return (total, Err(e)),
        };
        total += written;
        let short = written < want;
        while written > 0 {
            let Some(front) = taken.chunks.front() else {
                break;
            };
            let left = front.bytes().len() - taken.head;
            if written >= left {
                written -= left;
                taken.head = 0;
                taken.pop_front();
            } else {
                taken.head += written;
                written = 0;
            }
        }
        // Drop empty chunks at the front (a zero-length payload).
        while taken
            .chunks
            .front()
            .is_some_and(|c| c.bytes().len() == taken.head)
        {
            taken.pop_front();
            taken.head = 0;
        }
        if short {
            return (total, Ok(taken.chunks.is_empty()));
        }
    }
    (total, Ok(true))
}

/// Writes of at most this many bytes are copied into one buffer first.
const SMALL_WRITE: usize = 512;
/// Most parts of one vectored write.
const IOVECS: usize = 32;
/// Most bytes of small frames copied together into one `send`.
const GATHER: usize = 16 * 1024;

/// How many chunks at the front of `queue` (the first `head` bytes of its
/// front already written) fit in `GATHER` bytes together, and their bytes.
fn small_run(queue: &std::collections::VecDeque<Chunk>, head: usize) -> (usize, usize) {
    let (mut n, mut bytes) = (0, 0);
    for (i, chunk) in queue.iter().enumerate() {
        let len = chunk.bytes().len() - if i == 0 { head } else { 0 };
        if bytes + len > GATHER {
            break;
        }
        bytes += len;
        n += 1;
    }
    (n, bytes)
}

/// Copy the first `n` chunks of `queue` (`bytes` in all, after `head`)
/// into one buffer and write it. The buffer is on the heap, sized to fit,
/// and not zeroed: the caller may be a user thread with a small stack.
fn write_gathered(
    stream: &TcpStream,
    queue: &std::collections::VecDeque<Chunk>,
    head: usize,
    n: usize,
    bytes: usize,
) -> io::Result<usize> {
    let mut buf = Vec::with_capacity(bytes);
    for (i, chunk) in queue.iter().take(n).enumerate() {
        buf.extend_from_slice(if i == 0 {
            &chunk.bytes()[head..]
        } else {
            chunk.bytes()
        });
    }
    debug_assert_eq!(buf.len(), bytes);
    write_vectored(stream, &[IoSlice::new(&buf)])
}

/// One vectored write, retried on EINTR; `WouldBlock` counts as 0 bytes.
///
/// A single part, or parts of at most `SMALL_WRITE` bytes together
/// gathered into one buffer, go out with `send`: on Linux, `writev` on a
/// socket goes through the file layer (position lock, iovec import),
/// which costs more than copying a ping or a short message.
fn write_vectored(stream: &TcpStream, parts: &[IoSlice<'_>]) -> io::Result<usize> {
    if parts.len() > 1 && parts.iter().map(|p| p.len()).sum::<usize>() <= SMALL_WRITE {
        write_small_parts(stream, parts)
    } else {
        write_parts(stream, parts)
    }
}

/// [`write_vectored`] of parts of at most `SMALL_WRITE` bytes together:
/// copied into one buffer and sent. (Apart, so that the buffer is made,
/// and zeroed, only here: a job's usual write is one gathered chunk.)
fn write_small_parts(stream: &TcpStream, parts: &[IoSlice<'_>]) -> io::Result<usize> {
    let mut buf = [0u8; SMALL_WRITE];
    let mut gathered = 0;
    for p in parts {
        buf[gathered..gathered + p.len()].copy_from_slice(p);
        gathered += p.len();
    }
    write_parts(stream, &[IoSlice::new(&buf[..gathered])])
}

/// One write of `parts` (`send` for a single part, `writev` for more),
/// retried on EINTR; `WouldBlock` counts as 0 bytes.
fn write_parts(mut stream: &TcpStream, parts: &[IoSlice<'_>]) -> io::Result<usize> {
    loop {
        let r = match parts {
            [one] => stream.write(one),
            _ => stream.write_vectored(parts),
        };
        match r {
            Ok(0) if parts.iter().any(|p| !p.is_empty()) => {
                return Err(io::Error::from(io::ErrorKind::WriteZero));
            }
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) => return Err(e),
        }
    }
}

/// Make sure a job runs for `conn` soon: start one, or tell the running one
/// to go round again.
pub(crate) fn schedule<T: Send + Sync + 'static>(shared: &Arc<Shared<T>>, conn: &Arc<Conn<T>>) {
    if claim(conn) {
        spawn_job(shared, conn);
    }
}

/// Take the right to run `conn`'s job: true if the caller must now run it
/// (or hand it to the pool); false if a job is running (told to go round
/// again) or the connection is finished.
pub(crate) fn claim<T>(conn: &Conn<T>) -> bool {
    claim_locked(&mut conn.io.lock())
}

/// `claim` for a readiness event the poller harvested: `input` if it
/// reports input or a hang-up, `room` if room to write. Interest is
/// edge-triggered, so the event is the only word of what it reports: if
/// the connection is busy, word is left for whoever holds it (the job
/// goes round again; a writer, or the job's last flush, tries again). Also
/// tells whether the event
/// is most likely the pong to a keepalive ping, which nobody waits for,
/// and whether a worker should flush while the job runs.
pub(crate) fn claim_event<T>(conn: &Conn<T>, input: bool, room: bool) -> Claimed {
    let mut w = conn.io.lock();
    if matches!(
        w.watch,
        Watch::OnceInput | Watch::OnceRoom | Watch::OnceBoth
    ) {
        // Oneshot: the event disarmed it.
        w.watch = Watch::Spent;
    }
    let pong = input && std::mem::take(&mut w.pong_due);
    let nothing = Claimed {
        run: false,
        pong,
        flush: false,
    };
    if w.finished {
        return nothing;
    }
    if room {
        // For whoever writes next, or is writing: the room may have come
        // after its last write, which found none, and no event would
        // report it again.
        w.room = Room::Reported;
    }
    // Edge-triggered, a queue nobody writes waits for room, which only an
    // event that reports room brings. Oneshot, any event spent the
    // interest, writable included: a flush, which arms it again if the
    // socket does not take everything, follows any event.
    let edge = matches!(w.watch, Watch::Input | Watch::InputAndRoom);
    let to_write = !w.writing && !w.out.is_empty() && (room || !edge);
    if w.job_running {
        // Input: the job goes round and reads it. Room: the job's last
        // flush takes it, or, if the job may be in one of the client's
        // closures (for however long), a worker writes what the socket
        // takes now.
        if input {
            w.job_again = true;
        }
        return Claimed {
            run: false,
            pong,
            flush: to_write && w.closures,
        };
    }
    // Input to a paused connection waits in the kernel: whatever ends the
    // pause runs a job, which reads it. Only a job looks at what came to a
    // starved one, which may be the client's end.
    let look = input && w.paused && w.starve == Starve::Looking;
    if (input && !w.paused) || to_write || look {
        w.job_running = true;
        return Claimed {
            run: true,
            pong,
            flush: false,
        };
    }
    nothing
}

/// What the poller does with a connection's readiness event.
pub(crate) struct Claimed {
    /// Run its job (the poller's event claimed it).
    pub(crate) run: bool,
    /// The event was most likely the pong to a keepalive ping.
    pub(crate) pong: bool,
    /// Its job runs (maybe in a closure), and the event reported room for
    /// a queue nobody is writing: have a worker flush.
    pub(crate) flush: bool,
}

fn claim_locked(w: &mut WriteSide) -> bool {
    if w.finished {
        return false;
    }
    if w.job_running {
        w.job_again = true;
        return false;
    }
    w.job_running = true;
    true
}

/// Run `conn`'s service job on the pool. Its hold may be the connection's
/// last (the job tore it down, or it was torn down while the job waited):
/// then the user's `Drop` for the client's data runs guarded, reported if it
/// panics, not unwinding out of the pool's thread unreported.
pub(crate) fn spawn_job<T: Send + Sync + 'static>(shared: &Arc<Shared<T>>, conn: &Arc<Conn<T>>) {
    let (s, c) = (Arc::clone(shared), Arc::clone(conn));
    shared.pool.execute(move || {
        crate::runtime::service::service(&s, &c, &[], false);
        crate::runtime::poller::let_go_here(&s, c);
    });
}

/// A connection over `stream` for unit tests, in no registry and with no
/// server behind its client handle.
#[cfg(test)]
pub(crate) fn for_test(stream: TcpStream, id: crate::client::ClientId) -> Conn<()> {
    let client = crate::client::Client::new(
        id,
        crate::client::Origin {
            peer: stream.peer_addr().unwrap(),
            forwarded: None,
            protocol: None,
        },
        (),
        std::sync::Weak::new(),
        std::sync::Weak::new(),
    );
    #[cfg(feature = "deflate")]
    let extensions = None;
    #[cfg(not(feature = "deflate"))]
    let extensions = Extensions;
    Conn::new(stream, client, Default::default(), 0, extensions, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A main loop's first answers, written at once without a look at
    /// the clock, still count as sends of its burst: after a timed send
    /// and 60 first answers, a send 30 gaps later belongs to the burst,
    /// where after the timed send alone it would not. Each note is used
    /// by one answer. (The sends' times are given, not read: a test
    /// preempted between two looks at the clock must not fail.)
    #[test]
    fn first_answers_count_toward_the_loops_burst() {
        let conn = 0x1000;
        let then = std::time::Instant::now();
        let later = then + BURST_GAP * 30;
        LAST_SEND.set((Some(then), 0));
        assert!(!sending_in_a_burst_at(later));
        LAST_SEND.set((Some(then), 0));
        for _ in 0..60 {
            answering(conn);
            assert!(first_answer_at(conn));
            assert!(!first_answer_at(conn), "a note serves one answer");
        }
        answering(conn + 8);
        assert!(!first_answer_at(conn), "another record's note");
        assert_eq!(LAST_SEND.get(), (Some(then), 60), "first answers counted");
        assert!(sending_in_a_burst_at(later));
        assert_eq!(LAST_SEND.get(), (Some(later), 0), "the send timed");
    }

    /// A pass's timers take the time its read was handled at, once, and
    /// only if a read was: otherwise (and for a second ask) the clock's.
    #[test]
    fn a_pass_takes_its_reads_time_once() {
        let limits = Limits {
            max_message_size: 1 << 20,
            max_frame_size: 1 << 20,
            max_fragments: 16,
        };
        let mut r = ReadSide::new(Connection::new(limits), 5, 0);
        assert_eq!(r.clock(|| 9), 9, "no read yet: the clock");
        r.seen(7);
        assert_eq!(r.last_seen_ms, 7);
        assert_eq!(r.clock(|| 9), 7, "the read's time");
        assert_eq!(r.clock(|| 11), 11, "taken once");
    }

    /// A torn-down connection's read side is kept as this thread's spare
    /// with nothing of what it held (a review: without the reset, the
    /// thread would keep a closed connection's buffers until its next
    /// connection); a spare already there is not displaced.
    #[test]
    fn a_recycled_read_side_holds_nothing() {
        let limits = Limits::default();
        let _ = SPARE.take();
        let mut r = Box::new(ReadSide::new(Connection::new(limits), 5, 3));
        r.rest = vec![7; 100_000];
        r.buffered = 100_000;
        r.eof = true;
        r.report = Some(crate::message::CloseFrame::new(
            crate::message::CloseCode::NORMAL,
            "x".repeat(100),
        ));
        r.error = Some(crate::error::Error::Closed);
        let at = std::ptr::from_ref(&*r) as usize;
        recycle_read(r, limits);
        let kept = SPARE.take().expect("kept");
        assert_eq!(
            std::ptr::from_ref(&*kept) as usize,
            at,
            "the same allocation"
        );
        assert_eq!(kept.rest.capacity(), 0);
        assert_eq!((kept.buffered, kept.eof, kept.last_seen_ms), (0, false, 0));
        assert!(kept.report.is_none() && kept.error.is_none());
        assert!(kept.proto.is_at_rest(), "a fresh decoder");
        SPARE.set(Some(kept));
        recycle_read(
            Box::new(ReadSide::new(Connection::new(limits), 1, 0)),
            limits,
        );
        assert_eq!(
            SPARE.take().map(|k| std::ptr::from_ref(&*k) as usize),
            Some(at)
        );
    }

    /// A service job's hold may be a torn-down connection's last: the
    /// user's `Drop` for the client's data then runs guarded and is
    /// reported, instead of unwinding out of the pool's thread unreported.
    #[test]
    fn a_job_holding_a_gone_client_last_lets_go_of_it_guarded() {
        let (server, reported) = crate::runtime::testing::bomb_server();
        let shared = Arc::clone(server.shared());
        let conn = crate::runtime::testing::gone_bomb(&server);
        let release = crate::runtime::testing::hold_pool(&shared);
        spawn_job(&shared, &conn);
        drop(conn);
        drop(release);
        crate::runtime::testing::expect_drop_reported(&reported);
    }

    /// The handshake's hold on a new connection whose first job tore it
    /// down (the request came with a Close) may be the last: the user's
    /// `Drop` runs guarded and is reported as such, not as a failed
    /// handshake. Closure style: no event holds the client.
    #[test]
    fn a_handshake_holding_its_client_last_lets_go_of_it_guarded() {
        use std::io::{Read, Write};
        let (server, reported) = crate::runtime::testing::bomb_server_with(|b| {
            b.on_message(|_, _| {})
                .on_connect(|_| {})
                .on_disconnect(|_, _, _| {})
        });
        let mut s = TcpStream::connect(server.local_addr()).unwrap();
        let mut wire = crate::runtime::testing::UPGRADE.to_vec();
        wire.extend(crate::runtime::testing::client_frame(
            0x88,
            &1000u16.to_be_bytes(),
        ));
        s.write_all(&wire).unwrap();
        // The 101 and the close's answer, then the end.
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut all = Vec::new();
        let _ = s.read_to_end(&mut all);
        crate::runtime::testing::expect_drop_reported(&reported);
    }

    /// The same for the pool job that writes what user threads deferred.
    #[test]
    fn a_deferred_flush_holding_a_gone_client_last_lets_go_of_it_guarded() {
        let (server, reported) = crate::runtime::testing::bomb_server();
        let shared = Arc::clone(server.shared());
        let conn = crate::runtime::testing::gone_bomb(&server);
        let release = crate::runtime::testing::hold_pool(&shared);
        shared.defer_flush(&conn);
        drop(conn);
        drop(release);
        crate::runtime::testing::expect_drop_reported(&reported);
    }

    /// A small reply corked onto the gathered chunk by `cork_small` that
    /// takes what its connection holds to half of high water sets
    /// `look`, as `write` does: while it is clear, the read gate takes
    /// no lock and lets the job read on, trusting that the connection
    /// holds less than half. The connection is claimed from the test, as
    /// a job is (once its first job is done), so that its replies cork.
    /// Before each 100 B reply it is made to hold one byte under half
    /// (main-loop events), with `look` clear, and the reply is offered to
    /// `cork_small` itself: where that declines (no room in the gathered
    /// chunk, or none begun), it goes through `send` with no events held
    /// instead, which grows the chunk; the first reply `cork_small` takes
    /// must set `look`. Then the job runs and the client reads every
    /// reply, in order. (Not through `send` alone: which replies take the
    /// short path depends on the chunk's sizes.)
    #[test]
    fn a_small_reply_corked_to_half_of_high_water_has_the_gate_looked_at() {
        use std::io::Read;
        /// Hands the connection to a job, with no events held, however
        /// the test ends (else its shutdown waits out the close timeout).
        struct Release<'a>(&'a Arc<Shared<()>>, &'a Arc<Conn<()>>);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.1.io.lock().events = 0;
                spawn_job(self.0, self.1);
            }
        }
        let server = crate::WebSocketServer::builder()
            .high_water(8 * 1024)
            .low_water(2 * 1024)
            .ping_interval(None)
            .start("127.0.0.1:0")
            .unwrap();
        let shared = Arc::clone(server.shared());
        let (mut s, client) = crate::runtime::testing::join(&server);
        let conn = client.conn().unwrap();
        let half = shared.marks.high / 2;
        let t = std::time::Instant::now();
        while !claim(&conn) {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(10),
                "never idle"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let release = Release(&shared, &conn);
        let mut sent = 0u8;
        loop {
            assert!(sent < 40, "cork_small took none of {sent} replies");
            let body = [sent; 100];
            {
                let mut w = conn.io.lock();
                w.events = half - 1 - w.out.cost();
            }
            conn.look.store(false, Ordering::Relaxed);
            match conn.cork_small(&shared, &[0x82, 100], &body, false) {
                Ok(()) => {
                    sent += 1;
                    let held = conn.io.lock().held();
                    assert!(held >= half, "reply {sent} left {held}");
                    assert!(
                        conn.look.load(Ordering::Relaxed),
                        "reply {sent}, corked by cork_small, took the connection to \
                         {held} (half of high water: {half}) and left `look` clear"
                    );
                    break;
                }
                Err(w) => {
                    drop(w);
                    conn.io.lock().events = 0;
                    let status = client.send(body.to_vec()).unwrap();
                    assert_eq!(status, SendStatus::Queued, "reply {sent} not corked");
                    sent += 1;
                }
            }
        }
        drop(release);
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        for i in 0..sent {
            let mut frame = [0u8; 102];
            s.read_exact(&mut frame)
                .unwrap_or_else(|e| panic!("reply {i} of {sent}: {e}"));
            assert_eq!(frame[..2], [0x82, 100], "reply {i}");
            assert_eq!(frame[2..], [i; 100], "reply {i}");
        }
    }

    /// A main loop's first reply to the last message of a read goes out
    /// at once, from the loop's thread, even in a burst whose sends the
    /// pool writes; what follows it in the burst, to that client or to
    /// another, is deferred as before. The pool is held, so that what is
    /// deferred waits, and the thread is made to be in a burst before
    /// each send (as if it had just sent 63 others). A send to another
    /// client before the answer leaves the note; another event taken
    /// after the message clears it; the answer to a read's first message
    /// of two is deferred, and the second's corks behind it.
    #[test]
    fn a_main_loops_first_reply_to_a_reads_last_message_is_written_at_once() {
        use std::io::{Read, Write};
        use std::time::Duration;

        use crate::Event;
        use crate::runtime::testing::{client_frame, hold_pool, join};

        /// The next frame `s` reads within `wait`, with a payload of one
        /// byte, or `None`.
        fn next(s: &mut TcpStream, wait: Duration) -> Option<u8> {
            s.set_read_timeout(Some(wait)).unwrap();
            let mut frame = [0u8; 3];
            match s.read_exact(&mut frame) {
                Ok(()) => {
                    assert_eq!(frame[..2], [0x82, 1]);
                    Some(frame[2])
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                Err(e) => panic!("{e}"),
            }
        }
        let in_a_burst = || LAST_SEND.set((Some(Instant::now()), 63));
        let server = crate::WebSocketServer::builder()
            .ping_interval(None)
            .start("127.0.0.1:0")
            .unwrap();
        let (mut a, _) = join(&server);
        let (mut b, other) = join(&server);
        let wait = Duration::from_millis(300);
        // Send `byte` to `client` in a burst: it must not reach `s` (by
        // `wait`) while the pool is held.
        let deferred = |client: &crate::Client, byte: u8, s: &mut TcpStream, why: &str| {
            in_a_burst();
            client.send(vec![byte]).unwrap();
            assert_eq!(next(s, wait), None, "{why}");
        };
        // The client of the next event, a message `what`.
        let asked = |what: &[u8]| match server.recv_timeout(Duration::from_secs(10)) {
            Ok(Event::Message { client, message }) if message.as_bytes() == what => client,
            other => panic!("{other:?}"),
        };
        a.write_all(&client_frame(0x82, b"?")).unwrap();
        let asker = asked(b"?");
        let release = hold_pool(server.shared());
        // A send to another client first: deferred, the note kept.
        deferred(&other, 3, &mut b, "a send to another client went at once");
        in_a_burst();
        asker.send(vec![1u8]).unwrap();
        assert_eq!(
            next(&mut a, Duration::from_secs(5)),
            Some(1),
            "the answer waited"
        );
        deferred(&asker, 2, &mut a, "a second answer went at once");
        drop(release);
        assert_eq!(next(&mut a, Duration::from_secs(5)), Some(2));
        assert_eq!(next(&mut b, Duration::from_secs(5)), Some(3));
        // An event of another kind taken after the message (a client's
        // `Connect`) clears the note: the answer is deferred.
        a.write_all(&client_frame(0x82, b"!")).unwrap();
        let asker = asked(b"!");
        let (_c, _) = join(&server);
        let release = hold_pool(server.shared());
        deferred(
            &asker,
            6,
            &mut a,
            "an answer after another event went at once",
        );
        drop(release);
        assert_eq!(next(&mut a, Duration::from_secs(5)), Some(6));
        // A read of two messages (one write): the answer to the first is
        // deferred with the burst, and the second's corks behind it.
        a.write_all(&[client_frame(0x82, b"x"), client_frame(0x82, b"y")].concat())
            .unwrap();
        let first = asked(b"x");
        let release = hold_pool(server.shared());
        deferred(
            &first,
            4,
            &mut a,
            "the answer to a read's first went at once",
        );
        let second = asked(b"y");
        deferred(&second, 5, &mut a, "an answer went before the one queued");
        drop(release);
        assert_eq!(next(&mut a, Duration::from_secs(5)), Some(4));
        assert_eq!(next(&mut a, Duration::from_secs(5)), Some(5));
    }

    /// The clock kept at rest gives back a `ping_sent_ms` that every
    /// later `last_seen_ms` compares with as it did with the original.
    #[test]
    fn a_clock_at_rest_keeps_whether_a_ping_is_unanswered() {
        let day = 86_400_000;
        for (last_seen, ping_sent) in [
            (5_000, 0),
            (5_000, 4_000),
            (5_000, 5_000),
            (5_000, 5_001),
            (5_000, 35_000),
            (40 * day, 40 * day + 30_000),
            (5_000, 5_000 + 60 * day),
        ] {
            let Reading::Rest {
                last_seen_ms,
                ping_after_ms,
            } = Reading::rest(last_seen, ping_sent)
            else {
                panic!("not at rest");
            };
            assert_eq!(last_seen_ms, last_seen);
            let back = Reading::ping_sent_ms(last_seen_ms, ping_after_ms);
            if ping_sent.saturating_sub(last_seen) <= u64::from(u32::MAX) {
                for later in [last_seen, last_seen + 1, ping_sent, ping_sent + 1] {
                    assert_eq!(
                        back <= later,
                        ping_sent <= later,
                        "{last_seen} {ping_sent} {later}"
                    );
                }
            } else {
                assert!(back > last_seen, "still unanswered, if sooner");
            }
        }
        // The variant's tag fits beside the clock: 16 B, not 24.
        #[cfg(target_pointer_width = "64")]
        assert_eq!(std::mem::size_of::<Reading>(), 16);
    }
}

#[cfg(test)]
mod close_claim_tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use crate::runtime::testing::join;
    use crate::{CloseCode, CloseFrame, Event, WebSocketServer};

    /// A failure's close and a user's close on another thread, at once:
    /// exactly one is the connection's own, whichever came first, and the
    /// other is refused. Before, a job read `closing` and sent in two
    /// steps, and a user's close between them made both count as theirs.
    #[test]
    fn of_two_closes_at_once_exactly_one_is_the_connections_own() {
        let server = WebSocketServer::builder().start("127.0.0.1:0").unwrap();
        let shared = Arc::clone(server.shared());
        for round in 0..300 {
            let (s, client) = join(&server);
            let conn = shared
                .registry
                .snapshot()
                .into_iter()
                .find(|c| c.client.id() == client.id())
                .unwrap();
            // Both threads spin to the start, one a little later each
            // round, so that the two closes overlap in every order.
            let go = Arc::new(AtomicBool::new(false));
            let user = {
                let (client, go) = (client.clone(), Arc::clone(&go));
                std::thread::spawn(move || {
                    while !go.load(Ordering::Acquire) {
                        std::hint::spin_loop();
                    }
                    for _ in 0..round % 30 {
                        std::hint::spin_loop();
                    }
                    client.close(CloseCode::NORMAL, "bye").is_ok()
                })
            };
            std::thread::sleep(std::time::Duration::from_micros(200));
            go.store(true, Ordering::Release);
            for _ in 0..round % 7 {
                std::hint::spin_loop();
            }
            let (ours, sent) = conn.send_close_claiming(
                &shared,
                CloseFrame::new(CloseCode::PROTOCOL_ERROR, "protocol error"),
            );
            let user_sent = user.join().unwrap();
            assert_eq!(ours, sent.is_ok(), "round {round}");
            assert!(
                ours != user_sent,
                "round {round}: ours {ours}, the user's {user_sent}"
            );
            // After either, no later close is the connection's own.
            let (again, _) = conn.send_close_claiming(
                &shared,
                CloseFrame::new(CloseCode::PROTOCOL_ERROR, "protocol error"),
            );
            assert!(!again, "round {round}");
            drop(s);
            loop {
                match server.recv_timeout(std::time::Duration::from_secs(10)) {
                    Ok(Event::Disconnect { client: c, .. }) if c.id() == client.id() => break,
                    Ok(_) => {}
                    Err(e) => panic!("round {round}: {e:?}"),
                }
            }
        }
    }
}
