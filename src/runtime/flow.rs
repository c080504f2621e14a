//! Flow control, in one place.
//!
//! A connection *holds* the bytes queued to it (the outgoing queue) plus
//! the bytes of its events that the main loop has not consumed yet. Three
//! marks apply to what it holds:
//!
//! - at **high water**, the server stops reading from it and stops
//!   dispatching its messages (the unparsed rest of a read is kept, and
//!   counted with its partial input), so TCP pushes back on the peer;
//! - at **low water** or below, reading and dispatching resume, and a
//!   `Drain` is due if a send was refused meanwhile;
//! - over the **hard limit**, a data frame is refused (handed back to the
//!   caller) or the client is closed, per policy. The hard limit is at
//!   least `high + max_message_size + HEADROOM`, and what compression can
//!   add to a message when it may send one larger than it is, so a
//!   handler that answers each message with one of about its size never
//!   meets it: the gate stopped dispatching before it could (a main
//!   loop's events count on their client as large as their replies may
//!   be). Only fan-out (sends to a client other than the one being
//!   answered) and a main loop's replies larger than their messages can.
//!
//! The read gate (`service.rs`), `send` (`conn.rs`) and the event channel
//! (`events.rs`) all consult [`Marks`]; the outgoing queue keeps its own
//! byte count and the server-wide `bytes_queued` counter together.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use crate::config::Config;
use crate::stats::Counters;

/// What a queued chunk costs beyond its bytes: its slot in the queue (a
/// `Chunk` is 32 B) and, for an owned one, the allocation's overhead.
/// Flow control counts it, so that a peer that has the server queue many
/// tiny frames (pongs to a flood of empty pings that it never reads) is
/// paused when the memory they take reaches high water, not their bytes
/// (2 B a pong: some 65,000 of them, 4 MiB, at the default 128 KiB).
pub(crate) const CHUNK_COST: usize = 64;

/// What a shared frame costs beyond its bytes: its reference-counted
/// record (48 B as malloc gives it) and its bytes' allocation overhead.
/// Counted once in the output budget, and in each queue that holds it, as
/// a client that is sent publishes of a topic of its own holds their
/// frames alone: 2-byte frames queued for a client that never read took
/// twice what was counted of them.
pub(crate) const FRAME_RECORD: usize = 64;

/// Room above `high + max_message_size` in the hard limit: a reply's
/// frame header, and a pong or two. (What compression can add is counted
/// apart, see `Config::hard_limit`.)
pub(crate) const HEADROOM: usize = 1024;

/// The three marks, in bytes a connection holds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Marks {
    pub(crate) low: usize,
    pub(crate) high: usize,
    pub(crate) hard: usize,
}

impl Marks {
    pub(crate) fn new(config: &Config) -> Marks {
        Marks {
            low: config.low_water,
            high: config.high_water,
            hard: config.hard_limit(),
        }
    }

    /// Reading and dispatching stop for a connection holding this much:
    /// high water, or the hard limit once our close frame is queued (the
    /// peer's answer must be read even if nobody consumes its events).
    pub(crate) fn must_pause(&self, held: usize, closing: bool) -> bool {
        held >= if closing { self.hard } else { self.high }
    }

    /// Whether a connection holding this much has its read gate looked at
    /// under its lock (see `Conn::may_read_staged`): half of high water.
    pub(crate) fn half_high(&self, held: usize) -> bool {
        held >= self.high / 2
    }

    /// A paused connection holding this much is read again.
    pub(crate) fn may_resume(&self, held: usize) -> bool {
        held <= self.low
    }

    /// Whether a data frame of `len` bytes may join a queue of `queued`.
    /// An empty queue takes any one frame, so a message larger than the
    /// limit can still be sent to a client that keeps up.
    pub(crate) fn admits(&self, queued: usize, len: usize) -> bool {
        queued == 0 || queued.saturating_add(len) <= self.hard
    }

    /// Whether a data frame of `len` bytes may join `queue`, both counted
    /// as flow control counts them (see [`CHUNK_COST`]): the hard limit is
    /// on memory, as high water is, so that a client that never reads
    /// cannot be made to hold a great many tiny frames under it.
    pub(crate) fn admits_frame(&self, queue: &OutQueue, len: usize) -> bool {
        self.admits(queue.cost(), len + 2 * CHUNK_COST)
    }

    /// Most bytes corked while a job owns a connection: well under high
    /// water, so corking alone never pauses a connection.
    pub(crate) fn cork(&self) -> usize {
        (64 * 1024).min(self.high / 2)
    }
}

/// Payloads of at most this many bytes (those with a 2-byte header) are
/// copied with their header onto a gathered chunk (see
/// [`OutQueue::push_frame`]).
pub(crate) const GATHER_PAYLOAD: usize = 125;
/// A gathered chunk takes frames until it counts this many pieces (16
/// frames with payloads). Its pieces are counted until its last byte is
/// written, as each chunk was that it stands for, so that a write that
/// ends inside it leaves at most this many pieces (2 KiB) counted for
/// frames already gone, where separate chunks would have been popped.
const GATHER_PIECES: usize = 32;

/// A client's queue counts toward the server's output budget
/// (`max_queued_bytes`) once it costs more than this (shared frames'
/// bytes apart, which count once for all queues): the queues of clients
/// that keep up, a job's corked replies to small messages, never touch the
/// shared count.
pub(crate) const COUNTED_FROM: usize = 16 * 1024;

/// The server-wide budget on what is queued to clients
/// (`max_queued_bytes`). It counts the queues that cost more than
/// [`COUNTED_FROM`] (their bytes and pieces, shared frames' bytes apart),
/// and each frame shared between queues (a broadcast's, a publish's) once,
/// from when it is made until the last queue lets go of it.
pub(crate) struct OutputBudget {
    queues: AtomicUsize,
    frames: AtomicUsize,
    limit: usize,
    /// A queue that holds no more than this takes any one frame: the
    /// larger of [`COUNTED_FROM`] and low water.
    takes_one: usize,
}

impl Default for OutputBudget {
    fn default() -> Self {
        OutputBudget::new(usize::MAX, 0)
    }
}

impl OutputBudget {
    pub(crate) fn new(limit: usize, low_water: usize) -> OutputBudget {
        OutputBudget {
            queues: AtomicUsize::new(0),
            frames: AtomicUsize::new(0),
            limit,
            takes_one: low_water.max(COUNTED_FROM),
        }
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Whether, with `open` connections, a queue's share of the budget
    /// is more than the least any queue may hold (so that one client
    /// fewer would make it larger).
    pub(crate) fn share_above_least(&self, open: u64) -> bool {
        self.limit / open.max(1) as usize > self.takes_one
    }

    /// Whether a queue that costs `cost` takes any one frame, whatever
    /// the budget counts (see [`OutputBudget::refuses`]).
    pub(crate) fn takes_any(&self, cost: usize) -> bool {
        cost <= self.takes_one
    }

    /// What the budget counts now.
    pub(crate) fn used(&self) -> usize {
        self.queues
            .load(Relaxed)
            .saturating_add(self.frames.load(Relaxed))
    }

    /// `None` if a data frame may join `queue` as far as the server's
    /// budget goes; otherwise the total it counts. `owned` is what the
    /// frame adds to memory: its bytes, or nothing for a shared frame
    /// (counted already, once, when it was made). Over the budget, a frame
    /// is refused to a client whose queue, with it, would cost more than
    /// its share: the budget divided among the `open` connections. The
    /// queue is judged by all it holds, shared frames included: a client
    /// sent publishes of its own (each a shared frame of one queue) holds
    /// them as much as if they were its own. A queue that holds no more
    /// than low water (or [`COUNTED_FROM`], if that is more) takes any one
    /// frame: an empty one must (nothing would drain to tell of a
    /// refusal); a refused client is paused above low water, and its
    /// `Drain` at low water lets it take one again. A queue under its
    /// share is not refused: the clients holding the most are, as for
    /// `max_buffered_bytes`.
    pub(crate) fn refuses(
        &self,
        queue: &OutQueue,
        owned: usize,
        open: impl FnOnce() -> u64,
    ) -> Option<usize> {
        let cost = queue.cost();
        if self.takes_any(cost) {
            return None;
        }
        let after = cost.saturating_add(owned).saturating_add(2 * CHUNK_COST);
        let used = self.used();
        if used <= self.limit {
            return None;
        }
        let share = (self.limit / open().max(1) as usize).max(self.takes_one);
        (after > share).then_some(used)
    }
}

/// A whole encoded frame shared by many queues (a broadcast's, a
/// publish's), counted once in the output budget while it lives.
pub(crate) struct SharedFrame {
    bytes: Box<[u8]>,
    budget: Arc<OutputBudget>,
}

impl SharedFrame {
    pub(crate) fn new(bytes: Vec<u8>, budget: &Arc<OutputBudget>) -> Arc<SharedFrame> {
        budget.frames.fetch_add(bytes.len() + FRAME_RECORD, Relaxed);
        Arc::new(SharedFrame {
            bytes: bytes.into_boxed_slice(),
            budget: Arc::clone(budget),
        })
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for SharedFrame {
    fn drop(&mut self) {
        self.budget
            .frames
            .fetch_sub(self.bytes.len() + FRAME_RECORD, Relaxed);
    }
}

/// Bytes waiting to be written.
pub(crate) enum Chunk {
    /// A frame header, inline.
    Head([u8; 10], u8),
    /// Bytes owned by this connection (a payload, a control frame).
    Owned(Vec<u8>),
    /// Small frames copied one after another (see
    /// [`OutQueue::push_frame`]), and how many pieces (headers and
    /// payloads) they came as: flow control counts each piece as the
    /// chunk it would have been.
    Gathered(Vec<u8>, u32),
    /// A whole encoded frame shared with other connections (broadcast).
    Shared(Arc<SharedFrame>),
}

impl Chunk {
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Head(b, n) => &b[..usize::from(*n)],
            Chunk::Owned(v) | Chunk::Gathered(v, _) => v,
            Chunk::Shared(a) => a.bytes(),
        }
    }

    /// The pieces the chunk counts as (see [`Chunk::Gathered`]).
    fn pieces(&self) -> usize {
        match self {
            Chunk::Gathered(_, k) => *k as usize,
            _ => 1,
        }
    }

    /// The chunk as it may wait in a queue, which counts its bytes: an
    /// owned one keeps no more memory than its bytes and a little. A
    /// compressed payload is made in a buffer sized by the message before
    /// compression (a 1 MiB message that compresses to 1 KiB had 512 KiB),
    /// and a queue of such replies to a client that does not read held far
    /// more than flow control counted.
    fn fitted(self) -> Chunk {
        match self {
            Chunk::Owned(mut v) if v.capacity() - v.len() > v.len() / 4 + CHUNK_COST => {
                v.shrink_to_fit();
                Chunk::Owned(v)
            }
            chunk => chunk,
        }
    }

    /// 1 for a shared frame, 0 for any other chunk.
    fn frames(&self) -> usize {
        usize::from(matches!(self, Chunk::Shared(_)))
    }

    /// Bytes of a shared frame (counted once, in the budget's frames).
    pub(crate) fn shared_len(&self) -> usize {
        match self {
            Chunk::Shared(a) => a.bytes.len(),
            _ => 0,
        }
    }
}

/// A connection's outgoing queue. It owns its byte count and keeps the
/// server-wide `bytes_queued` in step with it: every byte in is either
/// written out or counted as lost when the queue is cleared. So it does
/// its share of the output budget (see [`OutputBudget`]): every change
/// of what it costs goes through its methods, each of which brings the
/// budget's count in step.
///
/// The chunks live in a box made when something is queued and freed as
/// soon as they are all written, so that an idle connection's record pays
/// one word for them instead of a `VecDeque` and a cursor (32 B less,
/// which moves the record into a smaller allocator class).
#[derive(Default)]
pub(crate) struct OutQueue {
    pending: Option<Box<Unwritten>>,
    /// Bytes waiting, the front's written part excluded.
    bytes: usize,
}

/// The most slots a spare box's ring may have (see [`SPARE`]): what a new
/// box's ring takes at its first chunk, so that a queue started from a
/// spare holds no more memory than one started afresh.
const SPARE_RING: usize = 4;

thread_local! {
    /// The box of a queue this thread wrote out, with its ring's
    /// allocation, kept for the next queue this thread starts: a job's
    /// replies would otherwise make and free a box and a ring each time
    /// (two allocations and two frees of glibc's, about 280 instructions a
    /// job). One a thread, empty, counted nowhere.
    static SPARE: std::cell::Cell<Option<Box<Unwritten>>> = const { std::cell::Cell::new(None) };

    /// The buffer of a gathered chunk this thread wrote out, kept for the
    /// next gathered chunk this thread starts in an idle queue: a job's
    /// replies to small messages would otherwise allocate it, grow it as
    /// they are copied on, and free it each time. One a thread, at most
    /// [`SPARE_GATHERED`] bytes, counted nowhere. A chunk started from it
    /// may hold more than its frames are counted as while its job runs;
    /// one that stays queued after a write is shrunk to its count (see
    /// [`OutQueue::put_back`]).
    static SPARE_BUFFER: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The largest gathered buffer kept for reuse (see [`SPARE_BUFFER`]): what
/// a chunk of 16 frames of 125-byte payloads grows to.
const SPARE_GATHERED: usize = 4096;

/// Queues' boxes that a thread wrote out while it kept one already, for
/// threads that start queues without writing them out: a main loop's
/// sends start the queues that workers flush (see [`crate::shelf`]). At
/// most 16, each with a ring of at most [`SPARE_RING`] slots (about 250 B).
static BOXES: crate::shelf::Shelf<Box<Unwritten>> = crate::shelf::Shelf::process_wide(16);

/// Gathered buffers that a thread wrote out while it kept a larger one,
/// for the same threads, as [`BOXES`]: at most 8, of at most
/// [`SHELVED_GATHERED`] bytes.
static GATHERED: crate::shelf::Shelf<Vec<u8>> = crate::shelf::Shelf::process_wide(8);

/// The largest gathered buffer put on the shelf: a main loop's sends to a
/// connection between two flushes are a few frames.
const SHELVED_GATHERED: usize = 1024;
/// The smallest: a frame's (a 32 B message's first takes 98), so that the
/// shelf does not fill with the buffers of lone pongs, which serve nobody.
const SHELVED_GATHERED_LEAST: usize = 128;

/// The most memory a gathered chunk's buffer may hold, `len` bytes of
/// frames counted as `pieces` pieces: its bytes, and a piece's
/// [`CHUNK_COST`] for each piece but the one its slot and allocation take.
fn gathered_allowance(len: usize, pieces: usize) -> usize {
    len + CHUNK_COST * pieces.saturating_sub(1)
}

/// This thread's spare buffer, empty, if it holds `at_least` bytes; else
/// one from the shelf that does.
fn take_spare_buffer(at_least: usize) -> Option<Vec<u8>> {
    SPARE_BUFFER
        .try_with(|spare| {
            let v = spare.take();
            if v.capacity() >= at_least {
                Some(v)
            } else {
                spare.set(v);
                None
            }
        })
        .ok()
        .flatten()
        .or_else(|| shelved_buffer(at_least))
}

/// A gathered buffer of at least `at_least` bytes from the shelf. (Apart,
/// as the other shelf's steps, so that the paths of a thread that keeps
/// its own spares stay as short as they were.)
#[cold]
fn shelved_buffer(at_least: usize) -> Option<Vec<u8>> {
    GATHERED.take_where(|v| v.capacity() >= at_least)
}

/// A box from the shelf.
#[cold]
fn shelved_box() -> Option<Box<Unwritten>> {
    BOXES.take()
}

/// Put a box not kept on the shelf.
#[cold]
fn shelve_box(b: Box<Unwritten>) {
    BOXES.put(b);
}

/// Keep a written-out gathered chunk's buffer for this thread's next one,
/// if it is no larger than [`SPARE_GATHERED`] and larger than the one kept.
fn keep_spare_buffer(mut v: Vec<u8>) {
    if v.capacity() > SPARE_GATHERED {
        return;
    }
    v.clear();
    // `try_with`: see `OutQueue::pending`. The buffer not kept goes on the
    // shelf (or is dropped) outside the cell.
    let not_kept = SPARE_BUFFER.try_with(|spare| {
        let kept = spare.take();
        if kept.capacity() >= v.capacity() {
            spare.set(kept);
            v
        } else {
            spare.set(v);
            kept
        }
    });
    // The other goes on the shelf, if small enough, for a thread that
    // starts gathered chunks without writing them out.
    if let Ok(v) = not_kept
        && v.capacity() > 0
    {
        shelve_buffer(v);
    }
}

/// Put a gathered buffer not kept on the shelf, if small enough.
#[cold]
fn shelve_buffer(v: Vec<u8>) {
    if (SHELVED_GATHERED_LEAST..=SHELVED_GATHERED).contains(&v.capacity()) {
        GATHERED.put(v);
    }
}

/// The chunks of a queue, taken out whole to be written without the lock.
#[derive(Default)]
pub(crate) struct Unwritten {
    pub(crate) chunks: VecDeque<Chunk>,
    /// Bytes of the front chunk already written.
    pub(crate) head: usize,
    /// In the queue's own box: chunks a writer has taken out, which still
    /// count for what the queue costs.
    taken: usize,
    /// Bytes of shared frames among the chunks (counted once, apart from
    /// the queues, in the budget).
    shared: usize,
    /// Pieces in gathered chunks beyond one a chunk: what they count as,
    /// beyond the chunks themselves.
    gathered: usize,
    /// Shared frames among the chunks (each costs the queue its
    /// [`FRAME_RECORD`] too).
    frames: usize,
    /// In the queue's own box: shared frames among the chunks a writer has
    /// taken out.
    taken_frames: usize,
    /// In the queue's own box: bytes of shared frames among the chunks a
    /// writer has taken out.
    taken_shared: usize,
    /// In the queue's own box: what the queue adds to the budget's count.
    counted: usize,
}

impl Unwritten {
    /// Bytes of the shared frames among the chunks not written yet (the
    /// front's written part is not in the queue's bytes either).
    fn shared_unwritten(&self) -> usize {
        let front_written = match self.chunks.front() {
            Some(c @ Chunk::Shared(_)) => self.head.min(c.shared_len()),
            _ => 0,
        };
        self.shared.saturating_sub(front_written)
    }

    /// Take the front chunk off (written, or empty). A gathered chunk's
    /// buffer is kept for the thread's next one (see [`SPARE_BUFFER`]); a
    /// small payload's goes back to the decoders (see `recycle_payload`).
    pub(crate) fn pop_front(&mut self) {
        if let Some(c) = self.chunks.pop_front() {
            debug_assert!(self.shared >= c.shared_len());
            self.shared = self.shared.saturating_sub(c.shared_len());
            self.frames -= c.frames();
            self.gathered -= c.pieces() - 1;
            match c {
                Chunk::Gathered(v, _) => keep_spare_buffer(v),
                Chunk::Owned(v) => crate::proto::assemble::recycle_payload(v),
                _ => {}
            }
        }
    }
}

impl OutQueue {
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// What the queue costs in memory, as flow control counts it: its
    /// bytes and [`CHUNK_COST`] for each chunk (each piece of a gathered
    /// one), those a writer has taken out meanwhile included.
    pub(crate) fn cost(&self) -> usize {
        self.bytes
            + self.pending.as_ref().map_or(0, |p| {
                (p.chunks.len() + p.gathered + p.taken) * CHUNK_COST
                    + (p.frames + p.taken_frames) * FRAME_RECORD
            })
    }

    /// What the queue costs, shared frames (their bytes and records,
    /// counted once, apart) not included: what the output budget counts
    /// of it.
    pub(crate) fn owned_cost(&self) -> usize {
        self.cost()
            .saturating_sub(self.pending.as_ref().map_or(0, |p| {
                p.shared_unwritten() + p.taken_shared + (p.frames + p.taken_frames) * FRAME_RECORD
            }))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pending.as_ref().is_none_or(|p| p.chunks.is_empty())
    }

    /// Bring the output budget's count of this queue in step with what it
    /// costs now. Queues under [`COUNTED_FROM`] count nothing, so a queue
    /// that stays under it never touches the shared count.
    #[inline]
    fn recount(&mut self, counters: &Counters) {
        let owned = self.owned_cost();
        let now = if owned > COUNTED_FROM { owned } else { 0 };
        let Some(p) = self.pending.as_mut() else {
            debug_assert_eq!(now, 0, "a queue with no box costs nothing");
            return;
        };
        if now != p.counted {
            let budget = &counters.output;
            if now > p.counted {
                budget.queues.fetch_add(now - p.counted, Relaxed);
            } else {
                budget.queues.fetch_sub(p.counted - now, Relaxed);
            }
            p.counted = now;
        }
    }

    #[inline(always)]
    fn pending(&mut self) -> &mut Unwritten {
        // `try_with`: a queue may be used from another thread-local's
        // destructor (a server kept in one, shut down as its thread ends)
        // after this one is gone; `with` would panic there, and a panic in
        // a thread-local's destructor aborts the process.
        self.pending.get_or_insert_with(|| {
            SPARE
                .try_with(std::cell::Cell::take)
                .ok()
                .flatten()
                .or_else(shelved_box)
                .unwrap_or_default()
        })
    }

    /// If the queue is written out, let go of its box: this thread's
    /// spare, if its ring is no larger than a new one's (see [`SPARE`]).
    fn let_go_of_box_if_empty(&mut self) {
        let Some(mut p) = self.pending.take_if(|p| p.chunks.is_empty()) else {
            return;
        };
        debug_assert_eq!(p.counted, 0);
        if p.chunks.capacity() <= SPARE_RING {
            *p = Unwritten {
                chunks: std::mem::take(&mut p.chunks),
                ..Unwritten::default()
            };
            // Whatever was there before goes on the shelf, outside the
            // cell. (Gone, see `pending`: then the box is simply dropped.)
            if let Ok(Some(older)) = SPARE.try_with(|spare| spare.replace(Some(p))) {
                shelve_box(older);
            }
        }
    }

    /// Queue a frame: its header and its payload, if any. A small payload
    /// (at most [`GATHER_PAYLOAD`] bytes, or none) is copied with its
    /// header onto the gathered chunk at the back of the queue, or a new
    /// one, instead of taking chunks of its own: a job's replies to many
    /// small messages are then one buffer, which costs a push and a pop
    /// for them all, and the write sends it as it is. Each frame is
    /// counted as the chunks it would have been (two, or one without a
    /// payload). A chunk, its slot and its allocation take no more memory
    /// than its frames are counted as (their bytes and [`CHUNK_COST`] for
    /// each piece) until a write begins it; then it takes no more frames,
    /// and keeps the bytes written from it (at most about 2 KiB), as a
    /// payload's chunk of its own did. One started in an idle queue takes
    /// the thread's spare buffer (see [`SPARE_BUFFER`]), or one from the
    /// shelf (see [`GATHERED`]), which may be
    /// larger until the write that follows (at the job's end, or a
    /// deferred flush's; a write that fails leaves it to the teardown): if
    /// it stays queued, it is shrunk to that measure then.
    pub(crate) fn push_frame(&mut self, head: Chunk, body: Option<Chunk>, counters: &Counters) {
        let small = match (&head, &body) {
            (Chunk::Head(..), None) => true,
            (Chunk::Head(..), Some(Chunk::Owned(b))) => b.len() <= GATHER_PAYLOAD,
            _ => false,
        };
        if !small {
            self.push(head, counters);
            if let Some(b) = body {
                self.push(b, counters);
            }
            return;
        }
        let (h, b) = (head.bytes(), body.as_ref().map_or(&[][..], Chunk::bytes));
        let n = h.len() + b.len();
        let pieces = 1 + usize::from(body.is_some());
        // Nothing queued, nor out with a queue's writer (whose bytes still
        // count): this frame starts the queue. (A direct write in flight
        // leaves it idle; its rest, two chunks at most, goes in front.)
        let idle = self.bytes == 0;
        self.bytes += n;
        counters.queued(n as i64);
        let p = self.pending();
        // The front chunk is the one a write has begun if `head` is set.
        let begun = p.head > 0 && p.chunks.len() == 1;
        match p.chunks.back_mut() {
            Some(Chunk::Gathered(v, k)) if !begun && *k as usize + pieces <= GATHER_PIECES => {
                if v.capacity() - v.len() < n {
                    // To what its frames are counted as, this one's
                    // included, less one piece for the chunk's slot and
                    // allocation: far more than their bytes, so that a few
                    // more fit before it grows again.
                    let counted = gathered_allowance(v.len() + n, *k as usize + pieces);
                    v.reserve_exact(counted - v.len());
                }
                v.extend_from_slice(h);
                v.extend_from_slice(b);
                *k += pieces as u32;
                p.gathered += pieces;
            }
            _ => {
                let allowance = gathered_allowance(n, pieces);
                let mut v = idle
                    .then(|| take_spare_buffer(allowance))
                    .flatten()
                    .unwrap_or_else(|| Vec::with_capacity(allowance));
                v.extend_from_slice(h);
                v.extend_from_slice(b);
                p.chunks.push_back(Chunk::Gathered(v, pieces as u32));
                p.gathered += pieces - 1;
            }
        }
        self.recount(counters);
        // Its bytes copied, the payload's buffer serves the next message
        // this thread decodes, or, from a thread that does not decode (a
        // main loop's), goes back to the decoders.
        if let Some(Chunk::Owned(b)) = body {
            crate::proto::assemble::recycle_payload(b);
        }
    }

    /// Copy a small frame (a header and a payload of at most
    /// [`GATHER_PAYLOAD`] bytes) onto the gathered chunk at the back, as
    /// [`OutQueue::push_frame`] does, if that makes and grows nothing:
    /// there is such a chunk, no write has begun on it, it takes two more
    /// pieces, and its buffer has room. `cost` is what the queue costs now
    /// ([`OutQueue::cost`]); the frame adds its bytes and two pieces.
    /// Returns what the queue costs with it; `None`, with nothing done,
    /// otherwise.
    #[inline]
    pub(crate) fn gather_onto_back(
        &mut self,
        cost: usize,
        head: &[u8],
        body: &[u8],
        counters: &Counters,
    ) -> Option<usize> {
        debug_assert!(body.len() <= GATHER_PAYLOAD && cost == self.cost());
        let n = head.len() + body.len();
        let p = self.pending.as_deref_mut()?;
        let begun = p.head > 0 && p.chunks.len() == 1;
        let Some(Chunk::Gathered(v, k)) = p.chunks.back_mut() else {
            return None;
        };
        if begun || *k as usize + 2 > GATHER_PIECES || v.capacity() - v.len() < n {
            return None;
        }
        v.extend_from_slice(head);
        v.extend_from_slice(body);
        *k += 2;
        p.gathered += 2;
        let counted = p.counted;
        self.bytes += n;
        counters.queued(n as i64);
        // What it costs now: under the count's threshold, a queue that
        // counted nothing still counts nothing.
        let after = cost + n + 2 * CHUNK_COST;
        if after > COUNTED_FROM || counted != 0 {
            self.recount(counters);
        }
        debug_assert_eq!(self.cost(), after);
        Some(after)
    }

    pub(crate) fn push(&mut self, chunk: Chunk, counters: &Counters) {
        let chunk = chunk.fitted();
        let n = chunk.bytes().len();
        self.bytes += n;
        counters.queued(n as i64);
        let p = self.pending();
        p.shared += chunk.shared_len();
        p.frames += chunk.frames();
        p.chunks.push_back(chunk);
        self.recount(counters);
    }

    /// Put back the unwritten end of a frame that a direct write began:
    /// `skip` bytes of `first` were written. It goes before anything
    /// queued meanwhile.
    pub(crate) fn push_front_partial(
        &mut self,
        first: Chunk,
        second: Option<Chunk>,
        skip: usize,
        counters: &Counters,
    ) {
        let (first, second) = (first.fitted(), second.map(Chunk::fitted));
        let total = first.bytes().len() + second.as_ref().map_or(0, |c| c.bytes().len());
        let left = total - skip;
        let first_len = first.bytes().len();
        let p = self.pending();
        debug_assert!(p.head == 0 || p.chunks.is_empty());
        if let Some(c) = second {
            p.shared += c.shared_len();
            p.frames += c.frames();
            p.chunks.push_front(c);
        }
        if skip < first_len {
            p.shared += first.shared_len();
            p.frames += first.frames();
            p.chunks.push_front(first);
            p.head = skip;
        } else {
            p.head = skip - first_len;
        }
        self.bytes += left;
        counters.queued(left as i64);
        self.recount(counters);
    }

    /// Take the chunks out to write them without the lock held. Until they
    /// are put back the queue holds only what is queued meanwhile (and
    /// reads as empty if nothing is), but still counts them in its cost:
    /// the hard limit must not let in more while a write is out.
    pub(crate) fn take_for_write(&mut self) -> Unwritten {
        debug_assert!(!self.is_empty(), "only a queue with chunks is written");
        let p = self.pending();
        // While they are out, the queue's bytes are as they were: so is
        // what they hold of shared frames.
        p.taken_shared = p.shared_unwritten();
        p.taken_frames = p.frames;
        let taken = Unwritten {
            chunks: std::mem::take(&mut p.chunks),
            head: std::mem::take(&mut p.head),
            shared: std::mem::take(&mut p.shared),
            frames: std::mem::take(&mut p.frames),
            gathered: std::mem::take(&mut p.gathered),
            ..Unwritten::default()
        };
        p.taken = taken.chunks.len() + taken.gathered;
        taken
    }

    /// Put written-from chunks back in front of those queued meanwhile,
    /// and count `written` bytes as gone.
    pub(crate) fn put_back(&mut self, mut taken: Unwritten, written: usize, counters: &Counters) {
        // The box stays with the queue (unless a teardown cleared it).
        let mut own = self.pending.take().unwrap_or_default();
        taken.chunks.append(&mut own.chunks);
        taken.shared += own.shared;
        taken.frames += own.frames;
        taken.gathered += own.gathered;
        taken.counted = own.counted;
        *own = taken;
        self.pending = Some(own);
        let written = written.min(self.bytes);
        self.bytes -= written;
        counters.queued(-(written as i64));
        counters.bytes_out(written);
        self.recount(counters);
        self.fit_spare_started();
        // A queue written out gives its memory back at once, whichever
        // path wrote it (a job, a publish, a user thread's flush), so that
        // no connection at rest keeps a box. (It counts nothing now.)
        self.let_go_of_box_if_empty();
    }

    /// A gathered chunk started from a thread's spare buffer (see
    /// [`SPARE_BUFFER`]) may hold more than its frames are counted as; one
    /// that stays queued after a write is shrunk to its count. Such a chunk
    /// starts an idle queue, and only a direct write's rest (two chunks at
    /// most) is put in front of it: it is among the first three.
    fn fit_spare_started(&mut self) {
        let Some(p) = self.pending.as_mut() else {
            return;
        };
        for c in p.chunks.iter_mut().take(3) {
            if let Chunk::Gathered(v, k) = c {
                let allowance = gathered_allowance(v.len(), *k as usize);
                if v.capacity() > allowance {
                    v.shrink_to(allowance);
                }
            }
        }
    }

    /// Drop everything (the connection is gone); returns the bytes lost.
    pub(crate) fn clear(&mut self, counters: &Counters) -> usize {
        let lost = self.bytes;
        if let Some(p) = &self.pending {
            counters.output.queues.fetch_sub(p.counted, Relaxed);
        }
        *self = OutQueue::default();
        counters.queued(-(lost as i64));
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A queue written out leaves its box to the thread, empty and
    /// counting nothing, and the next queue the thread starts takes it; a
    /// box whose ring grew past a new one's first size is not kept.
    #[test]
    fn a_written_out_box_is_kept_for_the_next_queue_only_with_a_new_ring() {
        let c = Counters::default();
        drop(SPARE.take());
        let mut q = OutQueue::default();
        q.push(Chunk::Owned(vec![1; 10]), &c);
        // Written whole: the writer pops every chunk.
        let mut t = q.take_for_write();
        t.pop_front();
        q.put_back(t, 10, &c);
        assert!(q.pending.is_none());
        let spare = SPARE.take().expect("the box was not kept");
        assert!(spare.chunks.is_empty() && spare.chunks.capacity() <= SPARE_RING);
        assert_eq!((spare.counted, spare.taken, spare.head), (0, 0, 0));
        let ring = spare.chunks.capacity();
        assert!(ring > 0, "the ring's allocation was not kept");
        SPARE.set(Some(spare));
        let mut q2 = OutQueue::default();
        q2.push(Chunk::Owned(vec![2; 5]), &c);
        assert!(SPARE.take().is_none(), "the new queue did not take it");
        assert_eq!(q2.pending.as_ref().unwrap().chunks.capacity(), ring);
        for _ in 0..9 {
            q2.push(Chunk::Owned(vec![3; 5]), &c);
        }
        let mut t = q2.take_for_write();
        while !t.chunks.is_empty() {
            t.pop_front();
        }
        let n = q2.bytes;
        q2.put_back(t, n, &c);
        assert!(q2.pending.is_none());
        assert!(SPARE.take().is_none(), "a grown ring was kept");
        assert_eq!(c.output.queues.load(Relaxed), 0);
    }

    /// A queue used from a thread-local's destructor after the spare's
    /// own is gone (found by a review: `with` panicked there, and the
    /// panic in a destructor aborted the process).
    #[test]
    fn a_queue_used_after_the_spare_is_gone_does_without_it() {
        struct Late(OutQueue, Counters);
        impl Drop for Late {
            fn drop(&mut self) {
                // Else this test would not test what it is named for.
                assert!(SPARE.try_with(|_| ()).is_err(), "the spare is still there");
                assert!(SPARE_BUFFER.try_with(|_| ()).is_err());
                self.0.push(Chunk::Owned(vec![1]), &self.1);
                assert_eq!(self.0.bytes(), 1);
                // A small frame, gathered, written out.
                let mut q = OutQueue::default();
                q.push_frame(small_frame(1), Some(Chunk::Owned(vec![7])), &self.1);
                let mut t = q.take_for_write();
                t.pop_front();
                q.put_back(t, 3, &self.1);
                assert!(q.is_empty());
            }
        }
        thread_local! {
            static LATE: std::cell::RefCell<Option<Late>> = const { std::cell::RefCell::new(None) };
        }
        std::thread::spawn(|| {
            // Registered first, so destroyed after the spare.
            LATE.with(|l| *l.borrow_mut() = Some(Late(OutQueue::default(), Counters::default())));
            let c = Counters::default();
            let mut q = OutQueue::default();
            q.push(Chunk::Owned(vec![1; 10]), &c);
            let mut t = q.take_for_write();
            t.pop_front();
            q.put_back(t, 10, &c);
            // And a gathered buffer kept.
            q.push_frame(small_frame(5), Some(Chunk::Owned(vec![5; 5])), &c);
            let mut t = q.take_for_write();
            t.pop_front();
            q.put_back(t, 7, &c);
            assert!(SPARE_BUFFER.take().capacity() > 0);
        })
        .join()
        .unwrap();
    }

    /// The header of a frame with a payload of `n` bytes (at most 125).
    fn small_frame(n: usize) -> Chunk {
        Chunk::Head([0x82, n as u8, 0, 0, 0, 0, 0, 0, 0, 0], 2)
    }

    /// The buffer of a gathered chunk written out is kept by the thread,
    /// and the next gathered chunk the thread starts in an idle queue
    /// takes it, as large as it is; one in a queue with something queued
    /// or out with a writer does not. A chunk from the spare that stays
    /// queued after a write, begun or not, is shrunk to what its frames
    /// are counted as; a large buffer is not kept, and a smaller one does
    /// not displace a larger.
    #[test]
    fn a_gathered_buffer_is_kept_and_fitted_to_its_count_if_it_stays() {
        let c = Counters::default();
        SPARE_BUFFER.take();
        // Sixteen frames of 125 bytes: a chunk of 4,016 bytes' allowance.
        let mut q = OutQueue::default();
        for _ in 0..16 {
            q.push_frame(small_frame(125), Some(Chunk::Owned(vec![1; 125])), &c);
        }
        let mut t = q.take_for_write();
        assert_eq!(t.chunks.len(), 1);
        let (ptr, cap) = (
            t.chunks[0].bytes().as_ptr(),
            match &t.chunks[0] {
                Chunk::Gathered(v, _) => v.capacity(),
                _ => unreachable!(),
            },
        );
        assert_eq!(cap, gathered_allowance(16 * 127, 32));
        t.pop_front();
        q.put_back(t, 16 * 127, &c);
        let capacity = |q: &OutQueue, i: usize| match &q.pending.as_ref().unwrap().chunks[i] {
            Chunk::Gathered(v, _) => (v.as_ptr(), v.capacity(), v.len()),
            _ => panic!("not gathered"),
        };
        // An idle queue's first small frame takes it.
        let mut q = OutQueue::default();
        q.push_frame(small_frame(3), Some(Chunk::Owned(vec![2; 3])), &c);
        assert_eq!(capacity(&q, 0), (ptr, cap, 5));
        // A queue not idle does not (the spare is gone anyway: put one
        // back to see).
        SPARE_BUFFER.set(Vec::with_capacity(1000));
        let mut busy = OutQueue::default();
        busy.push(Chunk::Owned(vec![0; 200]), &c);
        busy.push_frame(small_frame(3), Some(Chunk::Owned(vec![2; 3])), &c);
        assert_eq!(capacity(&busy, 1).1, gathered_allowance(5, 2));
        assert_eq!(SPARE_BUFFER.take().capacity(), 1000);
        // Nor does one whose chunks are out with a writer.
        SPARE_BUFFER.set(Vec::with_capacity(1000));
        let mut out = OutQueue::default();
        out.push(Chunk::Owned(vec![0; 200]), &c);
        let taken = out.take_for_write();
        out.push_frame(small_frame(3), Some(Chunk::Owned(vec![2; 3])), &c);
        assert_eq!(capacity(&out, 0).1, gathered_allowance(5, 2));
        out.put_back(taken, 0, &c);
        assert_eq!(SPARE_BUFFER.take().capacity(), 1000);
        // Written in part (two of its five bytes): it stays, begun, and is
        // fitted to its count, its bytes kept.
        let mut t = q.take_for_write();
        t.head = 2;
        q.put_back(t, 2, &c);
        let (_, fitted, len) = capacity(&q, 0);
        assert_eq!((fitted, len), (gathered_allowance(5, 2), 5));
        assert_eq!(q.bytes(), 3);
        // Not written at all: fitted too.
        SPARE_BUFFER.set(Vec::with_capacity(3000));
        let mut r = OutQueue::default();
        r.push_frame(small_frame(0), None, &c);
        assert_eq!(capacity(&r, 0).1, 3000);
        let t = r.take_for_write();
        r.put_back(t, 0, &c);
        assert_eq!(capacity(&r, 0).1, gathered_allowance(2, 1));
        // Behind a direct write's rest (a header begun and its payload),
        // put in front of it while the write was out: fitted there too.
        SPARE_BUFFER.set(Vec::with_capacity(3000));
        let mut d = OutQueue::default();
        d.push_frame(small_frame(1), Some(Chunk::Owned(vec![1])), &c);
        d.push_front_partial(
            Chunk::Head([0x82, 126, 1, 0, 0, 0, 0, 0, 0, 0], 4),
            Some(Chunk::Owned(vec![3; 256])),
            1,
            &c,
        );
        assert_eq!(capacity(&d, 2).1, 3000);
        let t = d.take_for_write();
        d.put_back(t, 0, &c);
        assert_eq!(capacity(&d, 2).1, gathered_allowance(3, 2));
        // A buffer over 4 KiB is not kept; a smaller one does not displace
        // a larger.
        keep_spare_buffer(Vec::with_capacity(SPARE_GATHERED + 1));
        assert_eq!(SPARE_BUFFER.take().capacity(), 0);
        keep_spare_buffer(Vec::with_capacity(2000));
        keep_spare_buffer(vec![1; 500]);
        let kept = SPARE_BUFFER.take();
        assert_eq!((kept.capacity(), kept.len()), (2000, 0));
        for q in [&mut q, &mut busy, &mut out, &mut r, &mut d] {
            q.clear(&c);
        }
    }

    #[test]
    fn marks_gate_and_admit() {
        let m = Marks {
            low: 10,
            high: 100,
            hard: 1000,
        };
        assert!(!m.must_pause(99, false));
        assert!(m.must_pause(100, false));
        assert!(!m.must_pause(999, true));
        assert!(m.must_pause(1000, true));
        assert!(m.may_resume(10));
        assert!(!m.may_resume(11));
        assert!(m.admits(0, 5000), "an empty queue takes any frame");
        assert!(m.admits(500, 500));
        assert!(!m.admits(500, 501));
        assert!(!m.admits(usize::MAX, 1));
    }

    #[test]
    fn queue_counts_every_byte_in_and_out() {
        let c = Counters::default();
        let mut q = OutQueue::default();
        q.push(Chunk::Owned(vec![1; 10]), &c);
        q.push(Chunk::Head([0; 10], 2), &c);
        assert_eq!(q.bytes(), 12);
        assert_eq!(q.cost(), 12 + 2 * CHUNK_COST);
        let mut taken = q.take_for_write();
        assert!(q.is_empty(), "the chunks are out for writing");
        assert_eq!(q.cost(), 12 + 2 * CHUNK_COST, "but still count");
        q.push(Chunk::Owned(vec![2; 3]), &c);
        assert_eq!(q.cost(), 15 + 3 * CHUNK_COST);
        taken.head += 4;
        q.put_back(taken, 4, &c);
        assert_eq!(q.bytes(), 11);
        assert_eq!(
            q.cost(),
            11 + 3 * CHUNK_COST,
            "the count of taken chunks is reset"
        );
        assert_eq!(c.snapshot().bytes_queued, 11);
        // All written: the writer popped every chunk.
        let mut taken = q.take_for_write();
        taken.chunks.clear();
        taken.head = 0;
        q.put_back(taken, 11, &c);
        assert_eq!(q.bytes(), 0);
        assert!(q.pending.is_none(), "a queue written out keeps no box");
        q.push(Chunk::Owned(vec![3; 11]), &c);
        assert_eq!(q.clear(&c), 11);
        assert_eq!(c.snapshot().bytes_queued, 0);
    }

    /// Small frames go onto one gathered chunk, in order, and cost what
    /// they would have as chunks of their own, through a write taken out,
    /// a partial write put back, and the pops that empty it; big payloads
    /// and shared frames are chunks of their own; a chunk takes at most
    /// `GATHER_PIECES` pieces, none after a write has begun it, and is
    /// with its slot no larger than what its frames are counted as.
    #[test]
    fn small_frames_are_gathered_and_counted_as_their_pieces() {
        assert!(std::mem::size_of::<Chunk>() <= 32, "a chunk's slot");
        let c = Counters::default();
        let mut q = OutQueue::default();
        let frame = |q: &mut OutQueue, h: u8, body: Option<Vec<u8>>| {
            q.push_frame(Chunk::Head([h; 10], 2), body.map(Chunk::Owned), &c)
        };
        let chunks = |q: &OutQueue| q.pending.as_ref().map_or(0, |p| p.chunks.len());
        // Every gathered chunk's memory within what its frames count.
        let fits = |q: &OutQueue| {
            for ch in &q.pending.as_ref().unwrap().chunks {
                if let Chunk::Gathered(v, k) = ch {
                    // Its slot and allocation are the last piece's share.
                    let counted = v.len() + *k as usize * CHUNK_COST;
                    assert!(v.capacity() + CHUNK_COST <= counted, "{}", v.capacity());
                }
            }
        };
        frame(&mut q, 1, Some(vec![2; 3]));
        frame(&mut q, 3, None);
        frame(&mut q, 4, Some(vec![5; GATHER_PAYLOAD]));
        assert_eq!(q.bytes(), 5 + 2 + 2 + GATHER_PAYLOAD);
        assert_eq!(q.cost(), q.bytes() + 5 * CHUNK_COST, "five pieces");
        assert_eq!(chunks(&q), 1);
        fits(&q);
        // Over the size: a head and a payload of their own.
        frame(&mut q, 6, Some(vec![7; GATHER_PAYLOAD + 1]));
        assert_eq!(chunks(&q), 3);
        // After them, a new gathered chunk.
        frame(&mut q, 8, None);
        assert_eq!(chunks(&q), 4);
        let bytes = 9 + GATHER_PAYLOAD + 2 + GATHER_PAYLOAD + 1 + 2;
        assert_eq!(q.bytes(), bytes);
        assert_eq!(q.cost(), bytes + 8 * CHUNK_COST);
        let mut want = vec![1, 1, 2, 2, 2, 3, 3, 4, 4];
        want.extend([5; GATHER_PAYLOAD]);
        want.extend([6, 6]);
        want.extend([7; GATHER_PAYLOAD + 1]);
        want.extend([8, 8]);
        let all = |u: &Unwritten| -> Vec<u8> {
            u.chunks
                .iter()
                .flat_map(|c| c.bytes().iter().copied())
                .collect()
        };

        // Taken out for a write: still counted; frames queued meanwhile
        // are counted on top, in a chunk of their own.
        let mut taken = q.take_for_write();
        assert_eq!(q.cost(), bytes + 8 * CHUNK_COST);
        frame(&mut q, 9, Some(vec![10; 4]));
        assert_eq!(q.cost(), bytes + 6 + 10 * CHUNK_COST);
        want.extend([9, 9, 10, 10, 10, 10]);
        assert_eq!(all(&taken)[..], want[..bytes]);
        // The first gathered chunk written but for 3 bytes.
        taken.head = 9 + GATHER_PAYLOAD - 3;
        q.put_back(taken, 9 + GATHER_PAYLOAD - 3, &c);
        assert_eq!(q.bytes(), bytes + 6 - (9 + GATHER_PAYLOAD - 3));
        assert_eq!(
            q.cost(),
            q.bytes() + 10 * CHUNK_COST,
            "pieces stay till popped"
        );
        // Pops as the writer pops them.
        let mut taken = q.take_for_write();
        for _ in 0..3 {
            taken.pop_front();
        }
        taken.head = 0;
        q.put_back(taken, 3 + 2 + GATHER_PAYLOAD + 1, &c);
        assert_eq!(q.bytes(), 2 + 6);
        assert_eq!(
            q.cost(),
            2 + 6 + 3 * CHUNK_COST,
            "a frame of 1 piece, one of 2"
        );
        let mut taken = q.take_for_write();
        assert_eq!(all(&taken)[..], want[want.len() - 8..]);
        taken.pop_front();
        taken.pop_front();
        assert_eq!(taken.gathered, 0);
        q.put_back(taken, 8, &c);
        assert!(q.pending.is_none(), "a queue written out keeps no box");
        assert_eq!(q.cost(), 0);
        assert_eq!(c.snapshot().bytes_queued, 0);

        // At most `GATHER_PIECES` pieces a chunk. (The chunks written above
        // left their buffer to the thread, which a chunk started in an
        // idle queue takes, larger than its count until a write: see
        // `a_gathered_buffer_is_kept_and_fitted_to_its_count_if_it_stays`.)
        drop(SPARE_BUFFER.take());
        for i in 0..GATHER_PIECES as u8 {
            frame(&mut q, i, Some(vec![i; 30]));
            fits(&q);
        }
        assert_eq!(chunks(&q), 2, "16 frames, then 16 more");
        assert_eq!(
            q.cost(),
            GATHER_PIECES * 32 + 2 * GATHER_PIECES * CHUNK_COST
        );
        q.clear(&c);
        // A chunk a write has begun takes no more frames, though it has
        // room for them.
        frame(&mut q, 1, Some(vec![1; 30]));
        let mut taken = q.take_for_write();
        taken.head = 5;
        q.put_back(taken, 5, &c);
        frame(&mut q, 2, None);
        assert_eq!(chunks(&q), 2);
        assert_eq!(q.cost(), 27 + 2 + 3 * CHUNK_COST);
        let c2 = Counters::default();
        let mut r = OutQueue::default();
        r.push_frame(Chunk::Head([1; 10], 2), None, &c2);
        let mut taken = r.take_for_write();
        taken.head = 1;
        r.put_back(taken, 1, &c2);
        r.push_frame(Chunk::Head([2; 10], 2), None, &c2);
        assert_eq!(chunks(&r), 2, "not onto the chunk begun");
        assert_eq!(r.cost(), 3 + 2 * CHUNK_COST);
        r.clear(&c2);
        q.clear(&c);

        // A queue of gathered frames over `COUNTED_FROM` is in the
        // output budget, at what it costs.
        let c3 = Counters::new(1 << 20, 0);
        let mut g = OutQueue::default();
        for i in 0..200u8 {
            g.push_frame(
                Chunk::Head([i; 10], 2),
                Some(Chunk::Owned(vec![i; 32])),
                &c3,
            );
        }
        assert!(g.owned_cost() > COUNTED_FROM);
        assert_eq!(c3.output.used(), g.owned_cost());
        g.clear(&c3);
        assert_eq!(c3.output.used(), 0);

        // A shared frame is never copied.
        let budget = Arc::clone(&c.output);
        q.push(Chunk::Shared(SharedFrame::new(vec![1; 4], &budget)), &c);
        frame(&mut q, 2, None);
        assert_eq!(chunks(&q), 2);
        assert_eq!(q.clear(&c), 6);
    }

    /// A small frame gathered onto the back (`gather_onto_back`, a job's
    /// corked reply) leaves the queue as `push_frame` would: the same
    /// bytes in the same order, the same cost, and the same counts in the
    /// server's totals and output budget, through partial writes and past
    /// `COUNTED_FROM`. It makes and grows nothing: it declines an empty
    /// queue, a chunk a write has begun, a chunk that is not gathered or
    /// has no pieces to spare, and a buffer with no room.
    #[test]
    fn gathering_onto_the_back_is_what_push_frame_does() {
        let (c1, c2) = (Counters::new(1 << 20, 0), Counters::new(1 << 20, 0));
        let (mut q1, mut q2) = (OutQueue::default(), OutQueue::default());
        let head = |i: usize| Chunk::Head([i as u8; 10], 2);
        assert!(
            q2.gather_onto_back(0, &[1, 1], &[1], &c2).is_none(),
            "an empty queue"
        );
        let (mut gathered, mut declined) = (0, 0);
        for i in 0..1500usize {
            let body = vec![(i % 251) as u8; (i * 37) % (GATHER_PAYLOAD + 1)];
            q1.push_frame(head(i), Some(Chunk::Owned(body.clone())), &c1);
            let cost = q2.cost();
            let chunks = q2.pending.as_ref().map_or(0, |p| p.chunks.len());
            if q2
                .gather_onto_back(cost, &[i as u8; 2], &body, &c2)
                .is_some()
            {
                gathered += 1;
                assert_eq!(q2.pending.as_ref().unwrap().chunks.len(), chunks);
            } else {
                declined += 1;
                q2.push_frame(head(i), Some(Chunk::Owned(body)), &c2);
            }
            assert_eq!(
                (q1.bytes(), q1.cost()),
                (q2.bytes(), q2.cost()),
                "frame {i}"
            );
            assert_eq!(q1.owned_cost(), q2.owned_cost());
            assert_eq!(c1.snapshot().bytes_queued, c2.snapshot().bytes_queued);
            assert_eq!(c1.output.used(), c2.output.used(), "frame {i}");
            // Now and then a write of part of the queue, the same for both.
            if i % 97 == 96 {
                let (mut t1, mut t2) = (q1.take_for_write(), q2.take_for_write());
                let bytes = |t: &Unwritten| -> Vec<u8> {
                    t.chunks
                        .iter()
                        .flat_map(|c| c.bytes().iter().copied())
                        .collect()
                };
                assert_eq!(bytes(&t1), bytes(&t2), "frame {i}");
                // Its first chunk written, and a byte of the next.
                let written = t1.chunks.front().unwrap().bytes().len();
                t1.pop_front();
                t2.pop_front();
                t1.head = 1;
                t2.head = 1;
                q1.put_back(t1, written + 1, &c1);
                q2.put_back(t2, written + 1, &c2);
            }
        }
        assert!(
            q1.owned_cost() > COUNTED_FROM,
            "past the budget's threshold"
        );
        assert!(gathered > 1000 && declined > 50, "{gathered} {declined}");
        assert_eq!(q1.clear(&c1), q2.clear(&c2));
        assert_eq!((c1.output.used(), c2.output.used()), (0, 0));

        // Not onto a chunk a write has begun, nor one of another kind, nor
        // one with no pieces to spare, nor a buffer with no room.
        let mut q = OutQueue::default();
        q.push_frame(head(1), Some(Chunk::Owned(vec![1; 2])), &c1);
        let mut taken = q.take_for_write();
        taken.head = 1;
        q.put_back(taken, 1, &c1);
        let cost = q.cost();
        assert!(
            q.gather_onto_back(cost, &[1, 1], &[1], &c1).is_none(),
            "a chunk begun"
        );
        q.clear(&c1);
        q.push(Chunk::Owned(vec![1; 200]), &c1);
        let cost = q.cost();
        assert!(
            q.gather_onto_back(cost, &[1, 1], &[1], &c1).is_none(),
            "not gathered"
        );
        q.clear(&c1);
        for i in 0..GATHER_PIECES / 2 {
            q.push_frame(head(i), Some(Chunk::Owned(vec![1; 2])), &c1);
        }
        let cost = q.cost();
        assert!(
            q.gather_onto_back(cost, &[1, 1], &[1], &c1).is_none(),
            "pieces"
        );
        q.clear(&c1);
        drop(SPARE_BUFFER.take());
        q.push_frame(head(1), Some(Chunk::Owned(vec![1; 2])), &c1);
        let Some(Chunk::Gathered(v, _)) = q.pending.as_ref().unwrap().chunks.back() else {
            panic!("gathered");
        };
        let room = v.capacity() - v.len();
        let cost = q.cost();
        assert!(
            q.gather_onto_back(cost, &[1, 1], &vec![1; room - 1], &c1)
                .is_none(),
            "no room"
        );
        assert!(
            q.gather_onto_back(cost, &[1, 1], &vec![1; room - 2], &c1)
                .is_some(),
            "just room"
        );
        q.clear(&c1);
    }

    /// The edges the test above does not reach: a chunk whose pieces are
    /// odd (a frame with no payload, a pong's, is one) and one short of
    /// the limit takes no frame of two, though its buffer has room; and
    /// a frame that takes the queue's cost to just under, at or just over
    /// `COUNTED_FROM` leaves the output budget's count as `push_frame`
    /// leaves it.
    #[test]
    fn gathering_at_the_piece_limit_and_across_the_budgets_threshold() {
        let c = Counters::new(1 << 20, 0);
        let head = || Chunk::Head([0x8a, 0, 0, 0, 0, 0, 0, 0, 0, 0], 2);
        let mut q = OutQueue::default();
        q.push_frame(head(), None, &c);
        for _ in 0..(GATHER_PIECES - 1) / 2 {
            q.push_frame(head(), Some(Chunk::Owned(vec![1; 2])), &c);
        }
        let Some(Chunk::Gathered(v, k)) = q.pending.as_mut().unwrap().chunks.back_mut() else {
            panic!("gathered");
        };
        assert_eq!(*k as usize, GATHER_PIECES - 1);
        v.reserve(1024);
        let cost = q.cost();
        assert!(
            q.gather_onto_back(cost, &[1, 1], &[1], &c).is_none(),
            "one piece over"
        );
        q.clear(&c);

        let (c1, c2) = (Counters::new(1 << 20, 0), Counters::new(1 << 20, 0));
        // A chunk of its own (`x` bytes and a piece), then a gathered frame
        // of 12 bytes (two pieces); then the frame added, 52 bytes and two
        // pieces.
        let before = CHUNK_COST + 12 + 2 * CHUNK_COST;
        let frame = 52 + 2 * CHUNK_COST;
        for after in COUNTED_FROM - 3..=COUNTED_FROM + 4 {
            let x = after - frame - before;
            let (mut q1, mut q2) = (OutQueue::default(), OutQueue::default());
            for (q, c) in [(&mut q1, &c1), (&mut q2, &c2)] {
                q.push(Chunk::Owned(vec![1; x]), c);
                q.push_frame(head(), Some(Chunk::Owned(vec![1; 10])), c);
            }
            q1.push_frame(head(), Some(Chunk::Owned(vec![1; 50])), &c1);
            let cost = q2.cost();
            assert!(
                q2.gather_onto_back(cost, &[0x8a, 0], &[1; 50], &c2)
                    .is_some()
            );
            assert_eq!((q1.cost(), q2.cost()), (after, after));
            assert_eq!(c1.output.used(), c2.output.used(), "cost {after}");
            q1.clear(&c1);
            q2.clear(&c2);
        }
    }

    /// The budget's count follows each queue over `COUNTED_FROM` through
    /// every change (pushes, a write taken out and put back partly done,
    /// a write that empties it, a teardown), counts a shared frame once
    /// however many queues hold it, and no queue under the threshold
    /// touches it.
    #[test]
    fn the_budget_counts_big_queues_and_shared_frames_once() {
        let c = Counters::new(1 << 20, 0);
        let budget = Arc::clone(&c.output);
        let mut small = OutQueue::default();
        small.push(Chunk::Owned(vec![0; 1000]), &c);
        assert_eq!(budget.used(), 0, "a small queue counts nothing");

        let mut big = OutQueue::default();
        big.push(Chunk::Head([0; 10], 4), &c);
        big.push(Chunk::Owned(vec![0; 20_000]), &c);
        assert_eq!(big.owned_cost(), 20_004 + 2 * CHUNK_COST);
        assert_eq!(budget.used(), big.owned_cost());

        // A frame shared by both queues and a third: counted once, from
        // when it is made.
        let frame = SharedFrame::new(vec![7; 30_000], &budget);
        // Its bytes and its record.
        let shared = 30_000 + FRAME_RECORD;
        assert_eq!(budget.used(), big.owned_cost() + shared);
        small.push(Chunk::Shared(Arc::clone(&frame)), &c);
        big.push(Chunk::Shared(Arc::clone(&frame)), &c);
        let mut third = OutQueue::default();
        third.push(Chunk::Shared(Arc::clone(&frame)), &c);
        drop(frame);
        assert_eq!(
            small.owned_cost(),
            1000 + 2 * CHUNK_COST,
            "the shared bytes are not the queue's own"
        );
        assert_eq!(
            small.cost(),
            1000 + 30_000 + 2 * CHUNK_COST + FRAME_RECORD,
            "but it holds them, and their record"
        );
        assert_eq!(budget.used(), big.owned_cost() + shared);

        // Taken out and partly written: still counted until put back.
        let before = budget.used();
        let mut taken = big.take_for_write();
        big.push(Chunk::Owned(vec![1; 100]), &c);
        assert_eq!(budget.used(), before + 100 + CHUNK_COST);
        // The head and the payload went out; the shared frame did not.
        taken.pop_front();
        taken.pop_front();
        big.put_back(taken, 20_004, &c);
        assert_eq!(big.owned_cost(), 100 + 2 * CHUNK_COST);
        assert_eq!(budget.used(), shared, "under the threshold again");

        // The small queue written out: the frame is still in `big` and
        // `third`.
        let mut taken = small.take_for_write();
        taken.pop_front();
        taken.pop_front();
        small.put_back(taken, 31_000, &c);
        assert!(small.pending.is_none());
        assert_eq!(budget.used(), shared);

        // A shared frame at the front, partly written: what the queue
        // holds besides it is still all counted.
        let mut taken = big.take_for_write();
        assert_eq!(budget.used(), shared, "the queue holds 228 B of its own");
        taken.head = 10_000;
        big.put_back(taken, 10_000, &c);
        assert_eq!(big.owned_cost(), 100 + 2 * CHUNK_COST);
        big.push(Chunk::Owned(vec![3; 20_000]), &c);
        assert_eq!(big.owned_cost(), 20_100 + 3 * CHUNK_COST);
        assert_eq!(budget.used(), shared + big.owned_cost());
        let mut taken = big.take_for_write();
        assert_eq!(big.owned_cost(), 20_100 + 3 * CHUNK_COST, "nor while out");
        taken.pop_front();
        taken.head = 0;
        big.put_back(taken, 20_000, &c);
        assert_eq!(big.owned_cost(), 20_100 + 2 * CHUNK_COST);
        assert_eq!(budget.used(), shared + big.owned_cost());

        // A big queue torn down gives back its count, and the frame goes
        // with the last queue that held it.
        third.push(Chunk::Owned(vec![2; 40_000]), &c);
        let big_own = big.owned_cost();
        assert_eq!(budget.used(), shared + big_own + 40_000 + 2 * CHUNK_COST);
        assert_eq!(third.clear(&c), 70_000);
        assert_eq!(
            budget.used(),
            big_own,
            "`big` wrote its copy of the frame: `third` held the last"
        );
        big.clear(&c);
        assert_eq!(budget.used(), 0);
        assert_eq!(c.snapshot().bytes_queued, 0);
    }

    /// Over the budget, a frame is refused only to a queue that would hold
    /// more than its share (the budget over the open connections, at least
    /// `COUNTED_FROM`), judged by all it holds, shared frames included;
    /// an empty queue, or one that stays under the threshold, always takes
    /// it; a shared frame adds only its place; under the budget, anyone
    /// takes it.
    #[test]
    fn over_the_budget_only_queues_past_their_share_are_refused() {
        let c = Counters::new(1 << 20, 0);
        let budget = &c.output;
        let queue_of = |n: usize| {
            let mut q = OutQueue::default();
            if n > 0 {
                q.push(Chunk::Owned(vec![0; n]), &c);
            }
            q
        };
        let (empty, small, mid, big) = (
            queue_of(0),
            queue_of(10_000),
            queue_of(60_000),
            queue_of(200_000),
        );
        let ten = || 10;
        let thousand = || 1000;
        assert_eq!(budget.refuses(&big, 1000, ten), None, "under the budget");
        // Over it: 1 MiB more of queues.
        let mut hog = queue_of(1 << 20);
        assert!(budget.used() > budget.limit());
        let over = Some(budget.used());
        // Ten connections: a share of 104,857 B.
        assert_eq!(
            budget.refuses(&empty, 500_000, ten),
            None,
            "an empty queue takes one"
        );
        assert_eq!(
            budget.refuses(&small, 500_000, thousand),
            None,
            "a queue under the threshold takes one"
        );
        assert_eq!(budget.refuses(&mid, 8_000, ten), None, "under its share");
        assert_eq!(budget.refuses(&mid, 50_000, ten), over);
        assert_eq!(budget.refuses(&big, 1, ten), over);
        // A thousand connections: the share is the threshold.
        assert_eq!(budget.refuses(&mid, 8_000, thousand), over);
        let mut small_big = queue_of(17_000);
        let over = Some(budget.used());
        assert_eq!(budget.refuses(&small_big, 8_000, thousand), over);
        assert_eq!(
            budget.refuses(&mid, 500_000, ten),
            over,
            "a large frame of its own"
        );
        assert_eq!(
            budget.refuses(&mid, 0, ten),
            None,
            "a shared frame (500,000 B, say) adds only its place"
        );
        small_big.clear(&c);
        // Shared frames a queue holds count as its own in judging it: the
        // frames of a topic only it subscribes to.
        let mut publishes = OutQueue::default();
        for _ in 0..8 {
            publishes.push(
                Chunk::Shared(SharedFrame::new(vec![1; 8_000], &c.output)),
                &c,
            );
        }
        assert!(publishes.owned_cost() < COUNTED_FROM);
        let over = Some(budget.used());
        assert_eq!(
            budget.refuses(&publishes, 0, ten),
            None,
            "64 KB, under its share"
        );
        assert_eq!(budget.refuses(&publishes, 0, thousand), over);
        hog.clear(&c);
        publishes.clear(&c);
        assert_eq!(
            budget.refuses(&big, 1000, thousand),
            None,
            "under the budget again"
        );
    }
}
