//! The service job: one at a time per connection, it flushes, reads and
//! dispatches (as far as flow control lets it), keeps time, and tears
//! down. Also the flush job behind deferred sends.

use std::cell::RefCell;
use std::io::{self, Read};
use std::net::Shutdown;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::error::{DecodeError, Error};
use crate::message::{CloseCode, CloseFrame};
use crate::proto::conn::{Output, State};
use crate::proto::frame::OpCode;
use crate::runtime::conn::{CONDEMNED, Conn, ReadSide, Room, Serving, recycle_read, schedule};
use crate::runtime::events::{BATCH, Staged};
use crate::runtime::poller::Job;
use crate::runtime::registry::Found;
use crate::runtime::timer::Timers;
use crate::runtime::{Shared, ms, panic_close};
use crate::stats::Counters;

/// Per-worker read buffer: connections own no read buffer while idle.
const SCRATCH: usize = 256 * 1024;
/// Most bytes one job reads (or inflates) for one connection before
/// letting others have the worker (the job goes to the back of the ready
/// queue if input is left over or may be left on the socket).
pub(crate) const READ_BUDGET: usize = 1 << 20;
/// The least a read costs against `READ_BUDGET`: at most 1,024 reads a job.
const READ_COST: usize = 1024;
/// Most bytes one read takes while the input kept unparsed, all clients
/// together, is over its bound (see [`read_size`]).
const SMALL_READ: usize = 4096;
/// Most frames (messages, pings, pongs; a fragmented message counts once)
/// one job handles for one connection before letting others have the
/// worker, even within one read: what is left of the read waits in the
/// connection, and the connection at the back of the ready queue.
const FRAME_BUDGET: usize = 4096;

thread_local! {
    static SCRATCH_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

pub(crate) fn with_scratch<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH_BUF.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < SCRATCH {
            // Zeroed by the allocator (fresh pages from the kernel, at
            // this size), not by writing: the pages a worker never reads
            // into are never touched, so they cost no memory.
            *buf = vec![0; SCRATCH];
        }
        f(&mut buf)
    })
}

thread_local! {
    static ON_WORKER: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// The pool's thread name.
pub(crate) const WORKER_NAME: &str = "enjent-worker";

/// Whether the current thread is one of the pool's workers (looked up
/// once per thread: it is asked on every send).
pub(crate) fn on_worker() -> bool {
    ON_WORKER.with(|c| match c.get() {
        Some(b) => b,
        None => {
            let b = std::thread::current().name() == Some(WORKER_NAME);
            c.set(Some(b));
            b
        }
    })
}

/// Read without blocking: `Ok(None)` means nothing there right now.
pub(crate) fn read_some(
    mut stream: &std::net::TcpStream,
    buf: &mut [u8],
) -> io::Result<Option<usize>> {
    loop {
        match stream.read(buf) {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

/// The pool job behind deferred sends: write what user threads queued,
/// for every connection waiting, then hand each back (or run its service
/// job if something else came up meanwhile).
pub(crate) fn flush_deferred<T: Send + Sync + 'static>(shared: &Arc<Shared<T>>) {
    let batch = std::mem::take(&mut *shared.flushq.lock());
    for conn in batch {
        flush_deferred_one(shared, &conn);
        // Torn down meanwhile, it may be held by this batch alone.
        crate::runtime::poller::let_go_here(shared, conn);
    }
}

fn flush_deferred_one<T: Send + Sync + 'static>(shared: &Arc<Shared<T>>, conn: &Arc<Conn<T>>) {
    let mut w = flush_before_letting_go(shared, conn, conn.io.lock());
    if w.finished {
        return;
    }
    if w.job_again {
        // A readiness event, a timer or a failed write came while the
        // flush held the connection: the full job takes over, on a
        // worker of its own (a handler it runs may block, and the rest
        // of this batch must not wait for it).
        w.job_again = false;
        drop(w);
        crate::runtime::conn::spawn_job(shared, conn);
        return;
    }
    w.job_running = false;
    if !w.writing && !conn.arm(shared, &mut w) {
        w.force_close = true;
        w.job_running = true;
        drop(w);
        service(shared, conn, &[], true);
    }
}

/// The service job: flush, read and process, keep time, then end (or go
/// round again) or tear down. `first` holds bytes that arrived with the handshake.
///
/// User code is guarded where it is called; should the server itself
/// panic while serving, the connection is torn down (reported with 1011)
/// instead of being left without a job forever.
pub(crate) fn service<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    conn: &Arc<Conn<T>>,
    first: &[u8],
    fresh: bool,
) {
    // Sends from its closures use this job's references to the server and
    // to the connection.
    let serve = || {
        crate::runtime::current::lend(shared, conn, || service_inner(shared, conn, first, fresh))
    };
    if catch_unwind(AssertUnwindSafe(serve)).is_err() {
        shared.report(
            Some(&conn.client),
            Error::Internal("serving the client failed; it was closed with 1011".into()),
        );
        // The job's read side went with the unwinding.
        let close = CloseFrame::new(CloseCode::INTERNAL_ERROR, "internal error");
        let error = Error::Io(io::Error::other(
            "internal error while serving the connection",
        ));
        teardown(shared, conn, None, Some(close), Some(error));
    }
}

fn service_inner<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    conn: &Arc<Conn<T>>,
    first: &[u8],
    fresh: bool,
) {
    let mut first = first;
    // `fresh`: nothing is known to be readable (the socket was just read
    // dry by the handshake, or a timer started this job). Anything newer
    // is reported (and makes the job go round), so the first pass skips a
    // read that would only return EAGAIN.
    let mut read_now = !fresh;
    // One budget for the whole job, however many passes it makes.
    let mut budget = JobBudget::FULL;
    let _serving = Serving::start(&**conn);
    // Whether a pass may run closures that hold the job for however long
    // (`on_error` is left out: it reports). Without them, as in the
    // main-loop style, other threads' sends cork while the job reads.
    let on_message = shared.handlers.message.is_some();
    loop {
        conn.start_pass(shared, on_message);
        // Take the read side out: no guard is held while user closures
        // run. Only this job touches it; the lock is never contended.
        let Some(mut r) = conn.take_read(shared.limits) else {
            return;
        };
        let drain = conn.take_drain_due(shared);
        if conn.holding_in.load(Ordering::SeqCst) & CONDEMNED != 0 {
            budget_call(shared, conn, &mut r);
        }
        if drain && !conn.closing.load(Ordering::Acquire) && r.proto.state() == State::Open {
            before_closure(shared, conn, &mut r);
            if !shared.emit_drain(conn) {
                close_for_panic(shared, conn, &mut r);
            }
        }
        if !first.is_empty() {
            let (delivered, count) = feed(shared, conn, &mut r, first, &budget);
            r.seen(shared.now_ms());
            budget.spend(first.len().max(delivered), count);
            account_buffered(shared, conn, &mut r);
            first = &[];
            // Starved by what came with the request: a Close behind it
            // waits unparsed, and the socket was read dry (no read below
            // on this pass, which would look).
            if !read_now {
                look_if_starved(shared, conn, &mut r, &mut budget);
            }
        }
        // Whether the socket may hold input no event will report: the
        // pass stopped reading at its budget.
        let mut undrained = false;
        if read_now {
            undrained = !read_available(shared, conn, &mut r, &mut budget);
        }
        read_now = true;
        let now = r.clock(|| shared.now_ms());
        let mut close_deadline = 0;
        if let Some(done) = progress(shared, conn, &mut r, now, &mut close_deadline) {
            // What it read and kept (for a pause, or the budget) is
            // delivered before the `Disconnect`: a pause protects nothing
            // now. Whatever the reason (a failed write, a force, or a
            // close that timed out), the gate must not stop it: doomed,
            // it lets everything through. However many frames: plain
            // input is at most one read. Only inflating is cut, at one
            // more job's bytes, and what is left of it is dropped.
            if !r.rest.is_empty() {
                conn.io.lock().force_close = true;
                r.ending = true;
                let rest = std::mem::take(&mut r.rest);
                shared.unparsed_in.fetch_sub(rest.len(), Ordering::Relaxed);
                // A message finishing in it counts whole, up to the
                // message limit: plain input is never cut.
                let last = JobBudget {
                    frames: usize::MAX,
                    bytes: READ_BUDGET.saturating_add(shared.config.max_message_size),
                };
                feed(shared, conn, &mut r, &rest, &last);
            }
            teardown(shared, conn, Some(&mut r), None, done);
            recycle_read(r, shared.limits);
            return;
        }
        book_timer(shared, conn, &r, now, close_deadline);
        // Input left over (the job stopped at its budget, or a pause did):
        // nothing on the socket may wake the connection again.
        let leftover = !r.rest.is_empty() && !r.eof;
        // The flush below takes any pong along.
        r.pong_corked = false;
        conn.put_read(r);

        let mut w = conn.io.lock();
        // No closure of the client's runs before the next pass: other
        // threads' frames cork again until it starts.
        w.closures = false;
        // Frames corked while the job ran leave now, in one write.
        w = flush_before_letting_go(shared, conn, w);
        // Another pass is due (`job_again`), or input is left (unparsed,
        // or unread on the socket) with the gate open. Within the budget,
        // go round; past it, go to the back of the ready queue, still
        // owning the connection: whatever became ready meanwhile runs
        // first, and the next job (a full pass) starts with the rest. A
        // paused connection with input left is run again by whatever
        // resumes it.
        let again = std::mem::take(&mut w.job_again);
        if again && !budget.spent() {
            continue;
        }
        if (again || (leftover || undrained) && !w.paused) && !w.finished {
            drop(w);
            crate::runtime::poller::dispatch(
                shared,
                &mut vec![Job::Ready(Found::Open(Arc::clone(conn)))],
            );
            return;
        }
        // The first job registers the socket; later ones find it watched.
        if !conn.arm(shared, &mut w) {
            // Out of kernel memory for the poller: this connection could
            // never be woken again. Tear it down now.
            w.force_close = true;
            continue;
        }
        w.job_running = false;
        return;
    }
}

/// Write what was corked while a job (or a deferred flush) owned the
/// connection, before it lets go: until the queue is empty, or the last
/// write found the socket full and no room was reported since (the poller
/// will report it: [`Room::Awaited`]). Otherwise, with frames queued, it
/// writes again when it takes the lock back: with edge-triggered
/// interest, nothing else would write them.
///
/// What it looks at is the connection's state then, not its own write's
/// outcome: while the lock was let go, room may have been reported and
/// another thread may have written the queue out (a send over the cork),
/// leaving the socket with room and a frame corked since. Judged by its
/// own write, which had found the socket full, it let go with that frame
/// queued and no report to come. And should another thread hold the
/// write token, the queue and any room reported are that writer's (it
/// looks for room after its write, and leaves [`Room::Awaited`] only on a
/// full socket): taken here, a report was lost, and that writer, whose
/// write had filled the socket before the room came, stopped. Either way
/// the queue waited while the client read the socket empty (found by
/// adversarial reviews; `tests/hot_paths.rs` and the tests below).
fn flush_before_letting_go<'a, T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    conn: &'a Arc<Conn<T>>,
    mut w: parking_lot::MutexGuard<'a, crate::runtime::conn::WriteSide>,
) -> parking_lot::MutexGuard<'a, crate::runtime::conn::WriteSide> {
    while !w.out.is_empty() && !w.writing && w.write_error.is_none() && !w.finished {
        w.writing = true;
        conn.flush_holding_token(shared, w);
        #[cfg(test)]
        tests::between_writes();
        w = conn.io.lock();
        if w.room == Room::Awaited {
            // Only a short write leaves it, and any write resets it first.
            debug_assert!(!w.out.is_empty() || w.finished);
            break;
        }
    }
    w
}

/// What one job may still do for its connection before it lets others
/// have the worker.
struct JobBudget {
    frames: usize,
    bytes: usize,
}

impl JobBudget {
    /// A job's whole budget.
    const FULL: JobBudget = JobBudget {
        frames: FRAME_BUDGET,
        bytes: READ_BUDGET,
    };

    /// Bytes read or inflated (whichever is more: a few compressed bytes
    /// cannot buy unbounded work) and frames handled.
    fn spend(&mut self, bytes: usize, frames: usize) {
        self.bytes = self.bytes.saturating_sub(bytes);
        self.frames = self.frames.saturating_sub(frames);
    }

    fn spent(&self) -> bool {
        self.bytes == 0 || self.frames == 0
    }
}

/// Read and handle what the socket has, as far as the job's budget and
/// flow control let it (see [`read_on`]); then, if the connection is
/// starved (now, or since before this job), look for the client's end
/// (see [`look_for_the_end`]). Returns false if input may be left on the
/// socket that no event will report (the budget ran out).
fn read_available<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    conn: &Arc<Conn<T>>,
    r: &mut ReadSide,
    budget: &mut JobBudget,
) -> bool {
    let open = read_on(shared, conn, r, budget);
    look_if_starved(shared, conn, r, budget);
    open
}

/// [`look_for_the_end`], if the connection is starved and may still be
/// looked at. (Only a main loop's connections starve.)
fn look_if_starved<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    conn: &Arc<Conn<T>>,
    r: &mut ReadSide,
    budget: &mut JobBudget,
) {
    if shared.handlers.message.is_none() && !r.eof && conn.looks_for_end(None) {
        look_for_the_end(shared, conn, r, budget);
    }
}

/// Read and dispatch while flow control allows, within the job's budget.
/// False if it stopped at the budget with the socket maybe not drained:
/// no event will report what is left there (interest is edge-triggered),
/// so the job must come back for it.
fn read_on<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    conn: &Arc<Conn<T>>,
    r: &mut ReadSide,
    budget: &mut JobBudget,
) -> bool {
    if budget.spent() {
        return false;
    }
    // Input a pause or the budget left unparsed comes before anything
    // newer, once the gate is open again (a timer or a flush can run the
    // job meanwhile). It is what the client sent: it counts as activity.
    // So does input still waiting at the end of a pass (see `progress`).
    if !r.rest.is_empty() {
        if !conn.may_read(shared) {
            return true;
        }
        let rest = std::mem::take(&mut r.rest);
        shared.unparsed_in.fetch_sub(rest.len(), Ordering::Relaxed);
        let (delivered, count) = feed(shared, conn, r, &rest, budget);
        r.seen(shared.now_ms());
        account_buffered(shared, conn, r);
        budget.spend(rest.len().max(delivered), count);
        // What is still left waits for the next job (budget) or for the
        // gate (pause); either way this job reads no more.
        if !r.rest.is_empty() {
            return true;
        }
        if budget.spent() {
            return false;
        }
    }
    // A read that failed ended the input too (`end_of_input`). The error an
    // idle close leaves for the report is no reason to stop reading: the
    // peer's answering Close must be read, and input left unread would be
    // reported by no event again (with oneshot interest, by one after
    // every job, until the close timeout).
    if r.eof {
        return true;
    }
    with_scratch(|buf| {
        // A paused connection is not read: what it sends may need answers
        // (echoes, pongs) that would only grow what it holds. Whatever
        // ends the pause runs a job, which reads on.
        while r.rest.is_empty() && conn.may_read(shared) {
            let room = read_size(shared, buf.len());
            match read_some(&conn.stream, &mut buf[..room]) {
                Ok(Some(0)) => {
                    end_of_input(conn, r, None);
                    return true;
                }
                Ok(Some(n)) => {
                    let (delivered, count) = feed(shared, conn, r, &buf[..n], budget);
                    // Seen as of the end of its handling: time spent in
                    // slow handlers is not the client's idleness.
                    r.seen(shared.now_ms());
                    account_buffered(shared, conn, r);
                    // At least `READ_COST` a read: a client that sends a
                    // byte at a time, as fast as it is read, is read to
                    // `WouldBlock` now, and must not keep the worker for a
                    // million reads.
                    budget.spend(n.max(delivered).max(READ_COST), count);
                    // Edge-triggered, read on to `WouldBlock`, even after a
                    // short read: the peer's FIN may have come with the
                    // data, and only a read finds it (no event reports it
                    // again). Oneshot, a short read means the socket is
                    // drained: what is left is reported once armed again.
                    if n < room && !shared.edge {
                        return true;
                    }
                    if budget.spent() {
                        return false;
                    }
                }
                Ok(None) => return true,
                Err(e) => {
                    end_of_input(conn, r, Some(e));
                    return true;
                }
            }
        }
        // A pause stopped it (its end runs a job), or a cut read left a
        // rest (the job comes back for it).
        true
    })
}

/// A connection starved for the main loop's channel is not read (its
/// messages would only grow what the loop is behind on), but the client
/// may have left: its Close, or its FIN, would wait unseen for as long as
/// the loop is behind, the connection holding its socket and its slot (a
/// review left 1,332 clients in CLOSE-WAIT behind a stalled loop). So
/// what it sent is looked at, front first: what a read kept unparsed,
/// then the socket, peeked at. Control frames at the front (a Close, a
/// ping, a pong) are taken, as much of them as has come, and handled as
/// any are (a Close's answer waits for the loop's replies, at most
/// `close_timeout`); the end of the input ends the connection. A message
/// at the front stays for when the loop catches up, untaken, and nothing
/// more is looked at until the connection is starved again. Every look
/// takes bytes or stops looking, so none is made again for the same
/// bytes (where interest is oneshot, armed on bytes already there, they
/// would be reported at once, and again).
fn look_for_the_end<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    conn: &Arc<Conn<T>>,
    r: &mut ReadSide,
    budget: &mut JobBudget,
) {
    // Control frames back to back (a flood of pings) are taken together,
    // a read for as many as this holds, as `read_on` would.
    let mut front = [0u8; 4096];
    while conn.looks_for_end(None) {
        if budget.spent() {
            // Control frames enough for one job: the next one looks on.
            conn.io.lock().job_again = true;
            return;
        }
        let taken = if r.rest.is_empty() {
            let n = match conn.stream.peek(&mut front) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => return end_of_input(conn, r, Some(e)),
            };
            if n == 0 {
                return end_of_input(conn, r, None);
            }
            let len = control_run(r, &front[..n]);
            if len == 0 {
                conn.looks_for_end(Some(false));
                return;
            }
            match read_some(&conn.stream, &mut front[..len]) {
                Ok(Some(0)) => return end_of_input(conn, r, None),
                Ok(Some(m)) => front[..m].to_vec(),
                Ok(None) => return,
                Err(e) => return end_of_input(conn, r, Some(e)),
            }
        } else {
            let len = control_run(r, &r.rest);
            if len == 0 {
                conn.looks_for_end(Some(false));
                return;
            }
            shared.unparsed_in.fetch_sub(len, Ordering::Relaxed);
            r.rest.drain(..len).collect()
        };
        let (_, count) = feed(shared, conn, r, &taken, budget);
        r.seen(shared.now_ms());
        account_buffered(shared, conn, r);
        budget.spend(taken.len().max(READ_COST), count);
    }
}

/// How many bytes at the front of `input` are control frames (Close,
/// ping, pong): the rest of one the decoder has begun, or whole ones back
/// to back, up to a Close, and the start of one not all there; 0 if a
/// message's frame comes first. A control frame longer than one may be
/// is taken as if it were 125 bytes long, and fails as soon as the
/// decoder sees its header.
fn control_run(r: &ReadSide, input: &[u8]) -> usize {
    if let Some(left) = r.proto.control_frame_left() {
        return left.min(input.len());
    }
    if !r.proto.at_frame_start() {
        return 0;
    }
    let mut at = 0;
    while at < input.len() {
        let len = match &input[at..] {
            [0x88..=0x8a] => return input.len(),
            [first @ 0x88..=0x8a, second, ..] => {
                let mask = if second & 0x80 != 0 { 4 } else { 0 };
                let len = 2 + mask + usize::from(second & 0x7f).min(125);
                if *first == 0x88 {
                    // Nothing after a Close is looked at.
                    return (at + len).min(input.len());
                }
                len
            }
            _ => return at,
        };
        at = (at + len).min(input.len());
    }
    at
}

/// How much one read may take. A client paused in the middle of a read
/// keeps the rest of it unparsed, up to a whole read each, so a crowd of
/// clients that send without reading could make the server hold a great
/// deal (10,000 of them up to 2.5 GB). Once such rests, all clients
/// together, reach a quarter of `max_buffered_bytes`, reads take at most
/// `SMALL_READ` each, so that every client paused from then on keeps at
/// most that (a new connection, what came with its request: the
/// handshake reads the same way, up to `max_handshake_bytes` and one read
/// more): the total stays within the bound plus that much a client (and
/// the reads in progress as it crossed). Other clients are only read in
/// smaller pieces meanwhile.
pub(crate) fn read_size<T>(shared: &Shared<T>, full: usize) -> usize {
    if shared.unparsed_in.load(Ordering::Relaxed) >= shared.config.max_buffered_bytes / 4 {
        SMALL_READ.min(full)
    } else {
        full
    }
}

/// The peer sent FIN, or reading failed: nothing more comes in.
fn end_of_input<T>(conn: &Conn<T>, r: &mut ReadSide, error: Option<io::Error>) {
    if let Some(e) = error
        && r.error.is_none()
    {
        r.error = Some(Error::Io(e));
    }
    r.eof = true;
    conn.io.lock().read_done = true;
}

/// Feed bytes to the protocol and act on each output, asking the read
/// gate between outputs. What is left when the gate closes, or once what
/// is left of the job's budget is used (messages and control frames
/// handled, or payload bytes delivered: one read of compressed messages
/// may inflate to hundreds of times its size), is kept in `r.rest`.
/// Returns the payload bytes delivered and the frames handled.
fn feed<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    conn: &Arc<Conn<T>>,
    r: &mut ReadSide,
    bytes: &[u8],
    budget: &JobBudget,
) -> (usize, usize) {
    if conn.closing.load(Ordering::Acquire) {
        r.proto.close_sent();
    }
    let mut input = bytes;
    let (mut delivered, mut count) = (0, 0);
    // Messages for the main loop, sent on together.
    let mut batch = shared.events.staging(&shared.marks, conn);
    while let Some(out) = r.proto.read(&mut input) {
        match &out {
            Output::Message(m) => {
                delivered += m.len();
                count += 1;
            }
            // A ping or a pong costs this job about what a tiny message
            // does (a ping's pong is queued): a flood of them is cut by
            // the same budget.
            Output::SendPong(_) | Output::Pong => count += 1,
            _ => {}
        }
        handle(shared, conn, r, out, &mut batch);
        // Bytes count once they pass what was read: inflating cuts a read
        // here (as can a message mostly read before); plain input is
        // otherwise charged as read, after it.
        let used = count >= budget.frames || delivered >= budget.bytes.max(bytes.len());
        // A teardown's feed passes no gate: what it cannot deliver it
        // discards and counts (`handle`).
        let gate = |r: &ReadSide| r.ending || conn.may_read_staged(shared, batch.pending());
        if !input.is_empty() && (used || !gate(r)) {
            r.rest.extend_from_slice(input);
            shared.unparsed_in.fetch_add(input.len(), Ordering::Relaxed);
            break;
        }
    }
    // Sent now, before anything else about this client can be.
    batch.send();
    (delivered, count)
}

/// Keep the server-wide count of bytes held for unfinished messages, and
/// enforce `max_buffered_bytes` (see [`enforce_budget`]).
fn account_buffered<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    conn: &Arc<Conn<T>>,
    r: &mut ReadSide,
) {
    if note_buffered(shared, conn, r) {
        enforce_budget(shared, conn, r);
    }
}

/// Publish this connection's count of partial input (others read it to
/// find the largest holder) and move the server-wide total. True if it
/// grew. Cheap when nothing changed: it runs before every delivery, so
/// that a handler that blocks is not taken to hold the message it was
/// given. (Input kept unparsed by a pause or the job's budget is not
/// counted here: it is at most one read per connection, counted apart.)
fn note_buffered<T>(shared: &Shared<T>, conn: &Conn<T>, r: &mut ReadSide) -> bool {
    let now = r.proto.buffered();
    if now == r.buffered {
        return false;
    }
    // The condemned bit is kept; a condemned holder's growth or release
    // moves the condemned total too, so that it stays exact.
    let old = conn
        .holding_in
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |h| {
            Some(h & CONDEMNED | now)
        })
        .unwrap_or_else(|h| h);
    let condemned = old & CONDEMNED != 0;
    let grew = now > r.buffered;
    if grew {
        let more = now - r.buffered;
        shared.buffered_in.fetch_add(more, Ordering::SeqCst);
        if condemned {
            shared.condemned_in.fetch_add(more, Ordering::SeqCst);
        }
    } else {
        let less = r.buffered - now;
        if condemned {
            shared.condemned_in.fetch_sub(less, Ordering::SeqCst);
        }
        shared.buffered_in.fetch_sub(less, Ordering::SeqCst);
    }
    r.buffered = now;
    grew
}

/// Over `max_buffered_bytes`, choose the largest holders to be failed with
/// 1009 until the rest fit, whichever connection crossed the line.
///
/// A holder chosen is failed by its own job (only that job may touch its
/// decoder), which may be late: busy, or blocked in a handler. What it
/// holds counts as condemned meanwhile (exactly, as it grows or lets go),
/// so the next crossing chooses from the others instead of waiting for
/// it, and one crossing does not condemn more than it must. Its job
/// judges it again (see [`budget_call`]).
fn enforce_budget<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    conn: &Arc<Conn<T>>,
    r: &mut ReadSide,
) {
    // A pass looks again while the total is over, for crossings that came
    // while it held the lock; bounded, so that under steady pressure no
    // one job scans for ever (the next crossing scans again).
    let (mut passes, mut idle) = (0, 0);
    while over_budget(shared, 0) && passes < 16 {
        // One scan at a time. A crossing that finds one running leaves
        // its bytes to it: the scan looks again once it lets go, and the
        // fences make sure that either that look sees them or this
        // crossing gets the lock.
        std::sync::atomic::fence(Ordering::SeqCst);
        let Some(scan) = shared.budget_scan.try_lock() else {
            return;
        };
        let progress = scan_budget(shared, conn, r);
        drop(scan);
        std::sync::atomic::fence(Ordering::SeqCst);
        passes += 1;
        idle = if progress { 0 } else { idle + 1 };
        if idle == 3 {
            // Over, with no one left to choose: what is over is held by
            // connections being torn down, or counted a moment early.
            return;
        }
    }
}

/// Whether the partial input held, less what the condemned hold and `own`
/// (this job's, once chosen), is over `max_buffered_bytes`.
fn over_budget<T>(shared: &Shared<T>, own: usize) -> bool {
    shared
        .buffered_in
        .load(Ordering::SeqCst)
        .saturating_sub(shared.condemned_in.load(Ordering::SeqCst))
        .saturating_sub(own)
        > shared.config.max_buffered_bytes
}

/// One scan, with `budget_scan` held: condemn the largest holders until
/// the rest fit; this job's own connection, if among them, is failed
/// here. Whether it chose anyone.
fn scan_budget<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    conn: &Arc<Conn<T>>,
    r: &mut ReadSide,
) -> bool {
    // Every holder not condemned yet, the largest first: a scan of the
    // open connections, but only while over the budget.
    // (Each hold of the snapshot is let go guarded: one torn down
    // meanwhile may be held by it alone.)
    let let_go = |c| crate::runtime::poller::let_go(shared, c);
    let mut holders: Vec<_> = Vec::new();
    for c in shared.registry.snapshot() {
        let held = c.holding_in.load(Ordering::SeqCst);
        if held > 0 && held & CONDEMNED == 0 {
            holders.push((held, c));
        } else {
            let_go(c);
        }
    }
    holders.sort_unstable_by_key(|h| std::cmp::Reverse(h.0));
    let (mut chose, mut own) = (false, 0);
    let mut holders = holders.into_iter();
    for (_, v) in holders.by_ref() {
        if !over_budget(shared, own) {
            let_go(v);
            break;
        }
        if Arc::ptr_eq(&v, conn) {
            own = r.buffered;
        } else if shared.condemn(&v) {
            // A connection torn down since holds nothing: condemning it
            // counts nothing, and its job is not run again.
            chose = true;
            crate::runtime::conn::schedule(shared, &v);
        }
        let_go(v);
    }
    holders.for_each(|(_, c)| let_go(c));
    if own == 0 {
        return chose;
    }
    // Chosen: failed now, its bytes let go, and then any condemnation
    // another scan made of it (by now of nothing) taken back.
    fail_for_budget(shared, conn, r);
    shared.acquit(conn);
    true
}

/// The job of a connection condemned for the budget, judged with fresh
/// counts under the scan's lock (waiting for a running scan, which counts
/// it as gone): nothing if the total now fits; failed if it still holds
/// part of a message and failing it alone is enough; otherwise a ranked
/// scan chooses (maybe it). Then the others are looked at again, should
/// the total still be over.
fn budget_call<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    conn: &Arc<Conn<T>>,
    r: &mut ReadSide,
) {
    {
        let _scan = shared.budget_scan.lock();
        shared.acquit(conn);
        note_buffered(shared, conn, r);
        if over_budget(shared, 0) {
            if r.buffered > 0 && !over_budget(shared, r.buffered) {
                fail_for_budget(shared, conn, r);
            } else {
                scan_budget(shared, conn, r);
            }
        }
    }
    std::sync::atomic::fence(Ordering::SeqCst);
    // Crossings while it held the lock left their bytes to it.
    enforce_budget(shared, conn, r);
}

/// Fail this connection with 1009: it holds the most partial input while
/// the server-wide budget is exceeded.
fn fail_for_budget<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    conn: &Arc<Conn<T>>,
    r: &mut ReadSide,
) {
    let error = DecodeError::TooLarge {
        size: shared.buffered_in.load(Ordering::Relaxed) as u64,
        limit: shared.config.max_buffered_bytes as u64,
    };
    shared
        .unparsed_in
        .fetch_sub(r.rest.len(), Ordering::Relaxed);
    r.rest = Vec::new();
    if let Some(Output::Fail { error, reply }) = r.proto.fail(error) {
        close_failed(shared, conn, r, error, reply, |c| {
            Counters::add(&c.buffered_closes, 1);
        });
    }
    // The failed decoder let go of its buffers.
    note_buffered(shared, conn, r);
}

/// A user closure panicked while handling this client: close it with
/// 1011, reported as such unless the peer's answer says otherwise. If a
/// close was sent before (the closure's own, say), the wire has that one,
/// and the report is left as it would have been without the panic.
fn close_for_panic<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    conn: &Arc<Conn<T>>,
    r: &mut ReadSide,
) {
    let (code, reason) = panic_close();
    // After a close of ours (a user's on another thread, even one that
    // just now came first), that close is the one on the wire. After a
    // write error, the report is the 1011.
    let (ours, sent) = conn.send_close_claiming(shared, CloseFrame::new(code, reason));
    if ours {
        r.report = Some(CloseFrame::new(code, reason));
    }
    if sent.is_ok() {
        // The job goes round and books the close deadline.
        schedule(shared, conn);
    }
    r.proto.close_sent();
}

/// One of the client's closures is about to run, for however long: write
/// a corked pong (at most once a millisecond). (Room the socket makes for
/// a queue while the closure runs is written by another worker: see
/// `conn::claim_event`.)
fn before_closure<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    conn: &Arc<Conn<T>>,
    r: &mut ReadSide,
) {
    if r.pong_corked {
        // The closure may run long, and the peer may be timing its ping.
        // At most once a millisecond.
        let now = shared.now_ms();
        if now >= r.pong_flush_after_ms {
            r.pong_corked = false;
            r.pong_flush_after_ms = now + 1;
            conn.flush_from_job(shared);
        }
    }
}

/// Act on one protocol output. A message for the main loop joins
/// `batch`, which the caller sends on (see [`Staged`]).
fn handle<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    conn: &Arc<Conn<T>>,
    r: &mut ReadSide,
    out: Output,
    batch: &mut Staged<'_, T>,
) {
    match out {
        Output::Message(m) => {
            // The message leaves the decoder's buffers: say so before a
            // handler (which may block) has it.
            note_buffered(shared, conn, r);
            shared.counters.message_in(m.len());
            if r.discarding
                || ((r.ending || conn.closing.load(Ordering::Acquire))
                    && (shared.events.over_budget_with(batch.pending())
                        || conn.io.lock().events + batch.pending() >= shared.marks.hard))
            {
                // Our close frame is queued (or the connection is being
                // torn down with what it kept, which no gate stops) and
                // the main loop is a whole budget behind, or this client's
                // own unconsumed events reached the hard limit: the client is read on only to
                // find its answering Close (which neither must stop; its
                // events no longer pause it), and from this message on,
                // what data it sends is dropped and counted, all of it (as
                // a browser drops every message once `close()` is called),
                // or one client being closed could take the whole channel
                // from the others, and a crowd of them each queue up to
                // its hard limit of events. It is read, at network speed,
                // until it answers or `close_timeout` ends it.
                r.discarding = true;
                Counters::add(&shared.counters.discarded, 1);
                return;
            }
            if shared.handlers.message.is_none() {
                batch.stage(m);
                if batch.len() >= BATCH {
                    batch.send();
                }
            } else {
                before_closure(shared, conn, r);
                if !shared.emit_message(conn, m) {
                    close_for_panic(shared, conn, r);
                }
            }
        }
        Output::SendPong(payload) => {
            // A peer that pings without reading would grow its queue
            // without bound; over the hard limit, pongs are skipped (RFC
            // 6455 section 5.5.3 lets an endpoint answer only the most
            // recent ping). (None is answered once our close is queued.)
            if conn.queued_cost() <= shared.marks.hard
                && conn.send_control(shared, OpCode::Pong, &payload).is_ok()
            {
                r.pong_corked = true;
            }
        }
        Output::Pong => {}
        Output::PeerClosed { frame, reply } => {
            // RFC 6455 section 7.1.5: the connection's close code is the
            // one in the peer's close frame, whoever closed first.
            r.report = Some(frame.unwrap_or_else(|| CloseFrame::new(CloseCode::NO_STATUS, "")));
            if let Some(reply) = reply {
                // In the main-loop style the loop may not have taken the
                // client's last messages yet: its replies to them go out
                // before our answer, as a closure's would.
                // Messages of this read still staged go to the loop first:
                // they are counted on the client once sent.
                batch.send();
                if shared.handlers.message.is_none() && conn.defer_close(shared, shared.now_ms()) {
                    r.deferred_close = Some(reply);
                } else {
                    // Fails only if our own close went out first; then the
                    // peer's close completes the handshake anyway.
                    let _ = conn.send_close(shared, reply);
                }
            }
        }
        Output::Fail { error, reply } => {
            let code = reply.code.as_u16();
            close_failed(shared, conn, r, error, reply, |c| c.protocol_error(code));
        }
    }
}

/// The connection failed (its decoder's `Output::Fail`): report `error`,
/// send `reply` and count it with `count`. After a close of ours (the
/// user's, an idle close) the wire has that one and the reply is not
/// sent: the report stays as it was (the idle close's 1001, or 1006), and
/// nothing is counted for a code that never went out. A send that fails
/// only for a failed write still reports and counts what was meant.
fn close_failed<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    conn: &Arc<Conn<T>>,
    r: &mut ReadSide,
    error: DecodeError,
    reply: CloseFrame,
    count: impl FnOnce(&Counters),
) {
    r.error = Some(error.into());
    // Whether ours is decided with `closing` set, under one lock: a user's
    // close on another thread comes wholly before it or is refused.
    if conn.send_close_claiming(shared, reply.clone()).0 {
        count(&shared.counters);
        r.report = Some(reply);
    }
}

/// Move the close handshake and timers along. `Some` means tear down now,
/// with the I/O error to report, if any.
fn progress<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    conn: &Arc<Conn<T>>,
    r: &mut ReadSide,
    now: u64,
    close_deadline_out: &mut u64,
) -> Option<Option<Error>> {
    if r.deferred_close.is_some()
        && conn.deferred_close_due(now)
        && let Some(reply) = r.deferred_close.take()
    {
        let _ = conn.send_close(shared, reply);
    }
    let (flushed, empty, close_deadline, write_error, force, loop_holds) = {
        let mut w = conn.io.lock();
        let empty = w.out.is_empty() && !w.writing;
        // The peer stopped sending (its FIN, no Close) while the main loop
        // holds some of its events: the loop's replies to them go out
        // before the end, as a closure's would, if it takes them within
        // the close timeout. (`events_consumed` runs the job when it has.)
        let loop_holds = r.eof && w.events > 0 && !conn.closing.load(Ordering::Acquire);
        if r.eof && (!empty || loop_holds) && w.close_deadline_ms == 0 {
            // The peer stopped sending but may still read: what is queued
            // (our close reply last) goes out within the close timeout.
            w.close_deadline_ms = now.saturating_add(shared.close_timeout_ms());
        }
        if !r.rest.is_empty() && !w.paused {
            // Input of the client's waits for this connection's next turn
            // (the job's budget ran out): it is not idle.
            r.last_seen_ms = now;
        }
        if w.paused {
            // Whether its queue alone keeps it paused: over low water
            // (over high water if starved, which it resumes under).
            let queue_alone = if w.starved() {
                shared.marks.must_pause(w.out.cost(), false)
            } else {
                !shared.marks.may_resume(w.out.cost())
            };
            if (w.events > 0 || w.starved()) && !queue_alone && !shared.is_awaited(conn) {
                // Not read because the main loop is behind: the client
                // is not idle, and its pongs wait unread. (Not when its
                // queue alone keeps it paused: only its reading ends that
                // pause, and the loop may be waiting for it, in a
                // `send_timeout` to it, say, holding the event it answers;
                // nor when anyone waits for room in its queue, which only
                // its reading makes.)
                r.last_seen_ms = now;
            } else {
                // Paused because it does not read what it asked for: it
                // is as idle as its socket is stuck.
                r.last_seen_ms = r.last_seen_ms.max(w.last_progress_ms);
            }
        }
        (
            empty && conn.closing.load(Ordering::Acquire),
            empty,
            w.close_deadline_ms,
            w.write_error,
            w.force_close,
            loop_holds,
        )
    };
    // Handed to `book_timer`, which would otherwise lock again for it.
    *close_deadline_out = close_deadline;
    if conn.closing.load(Ordering::Acquire) {
        r.proto.close_sent();
    }
    if force {
        return Some(Some(Error::Closed));
    }
    if let Some(kind) = write_error {
        return Some(Some(Error::Io(kind.into())));
    }
    if flushed {
        r.proto.reply_flushed();
    }
    // A client that sent Close and its FIN may still read: an answer that
    // waits for the main loop keeps the connection (up to its deadline),
    // as do events of a FIN's the loop holds.
    if r.eof && empty && r.deferred_close.is_none() && (!loop_holds || now >= close_deadline) {
        return Some(None);
    }
    match r.proto.state() {
        // Both close frames are exchanged and ours has left: the server
        // closes the TCP connection first (RFC 6455 section 7.1.1).
        State::Closed if flushed => return Some(None),
        // We failed the connection: stop sending, but keep reading (and
        // discarding) until the peer closes, so that our close frame is not
        // lost to a reset.
        State::Failed if flushed && !r.write_shut => {
            let _ = conn.stream.shutdown(Shutdown::Write);
            r.write_shut = true;
        }
        _ => {}
    }
    if close_deadline != 0 && now >= close_deadline {
        return Some(Some(Error::Io(io::ErrorKind::TimedOut.into())));
    }
    if r.proto.state() == State::Open && !r.eof {
        if let Some(idle) = shared.config.idle_timeout
            && now >= r.last_seen_ms.saturating_add(ms(idle))
        {
            let idle_close = CloseFrame::new(CloseCode::GOING_AWAY, "idle timeout");
            // Fails only if the user's close went out since `closing` was
            // read above: that close is the one on the wire, and this is
            // no idle timeout.
            // Counted first: the close lets go of the threads waiting
            // for room in this queue, which may read the count.
            Counters::add(&shared.counters.idle_timeouts, 1);
            if conn.send_close(shared, idle_close.clone()).is_ok() {
                r.report = Some(idle_close);
                r.error = Some(Error::Io(io::ErrorKind::TimedOut.into()));
            } else {
                shared
                    .counters
                    .idle_timeouts
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
            r.proto.close_sent();
            // That close set a deadline after the one read above.
            *close_deadline_out = conn.io.lock().close_deadline_ms;
            return None;
        }
        if let Some(every) = shared.config.ping_interval
            && now >= r.last_seen_ms.saturating_add(ms(every))
            && r.ping_sent_ms <= r.last_seen_ms
        {
            r.ping_sent_ms = now;
            let _ = conn.send_ping(shared);
        }
    }
    None
}

/// Book the connection's next deadline with the poller's timers.
fn book_timer<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    conn: &Arc<Conn<T>>,
    r: &ReadSide,
    now: u64,
    close_deadline: u64,
) {
    let mut next = u64::MAX;
    if close_deadline != 0 {
        next = Timers::round(close_deadline.max(now + 1));
    }
    if r.proto.state() == State::Open && !r.eof {
        let mut keepalive = u64::MAX;
        if let Some(idle) = shared.config.idle_timeout {
            keepalive = keepalive.min(r.last_seen_ms.saturating_add(ms(idle)));
        }
        if let Some(every) = shared.config.ping_interval
            && r.ping_sent_ms <= r.last_seen_ms
        {
            keepalive = keepalive.min(r.last_seen_ms.saturating_add(ms(every)));
        }
        if keepalive < crate::runtime::NEVER_MS {
            let tick =
                Timers::keepalive_tick(shared.config.ping_interval, shared.config.idle_timeout);
            next = next.min(Timers::round_to(keepalive.max(now + 1), tick));
        }
    }
    if next >= crate::runtime::NEVER_MS {
        return;
    }
    let booked = conn.timer_at.load(Ordering::Acquire);
    if booked != 0 && booked <= next {
        return;
    }
    // Stored before it is booked: see `Timers::book`.
    conn.timer_at.store(next, Ordering::SeqCst);
    if shared.timers.book(next) {
        let _ = shared.poller.notify();
    }
}

/// The connection is over: leave the registry and the poller, close the
/// socket, count what was never delivered, and tell the user, last of all
/// its events. The one way out for an open connection, after a normal end
/// or a panic (`r` is `None` then: the read side went with the unwinding,
/// and `close`/`error` say what to report).
fn teardown<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    conn: &Arc<Conn<T>>,
    r: Option<&mut ReadSide>,
    close: Option<CloseFrame>,
    io_error: Option<Error>,
) {
    let (unsent, for_backpressure, write_error) = {
        let mut w = conn.io.lock();
        if w.finished {
            return;
        }
        w.finished = true;
        w.job_running = false;
        // What it held leaves with it, under the lock that marks it
        // finished, condemned or not: a scan finds it holding nothing.
        let held = conn.holding_in.swap(0, Ordering::SeqCst);
        if held & CONDEMNED != 0 {
            shared
                .condemned_in
                .fetch_sub(held & !CONDEMNED, Ordering::SeqCst);
        }
        shared
            .buffered_in
            .fetch_sub(held & !CONDEMNED, Ordering::SeqCst);
        let unsent = w.out.clear(&shared.counters);
        // Counted under the lock that marks it finished: a sender that
        // finds it finished reads whether anything was lost.
        conn.client.add_unsent(unsent);
        (unsent, w.closed_for_backpressure, w.write_error)
    };
    // Subscriptions end before the `Disconnect`: a subscriber count read
    // after it no longer counts this client.
    shared.topics.remove_client(conn);
    Counters::add(&shared.counters.disconnected, 1);
    let _ = shared.poller.delete(&conn.stream);
    // Anyone waiting for room in this queue learns it is closed; those
    // waiting for the budget, that their share of it grew.
    shared.room_made_by_leaving(conn);
    let (report, read_error) = match r {
        Some(r) => {
            r.buffered = 0;
            shared
                .unparsed_in
                .fetch_sub(std::mem::take(&mut r.rest).len(), Ordering::Relaxed);
            (r.report.take(), r.error.take())
        }
        None => (None, None),
    };
    // The fd may outlive this job (a broadcast in progress holds the
    // connection), so the peer is told now. After a reset there is no
    // connection left to tell: skip the system call.
    let reset = |k: io::ErrorKind| k == io::ErrorKind::ConnectionReset;
    let was_reset = write_error.is_some_and(reset)
        || [read_error.as_ref(), io_error.as_ref()]
            .into_iter()
            .flatten()
            .any(|e| matches!(e, Error::Io(e) if reset(e.kind())));
    if !was_reset {
        let _ = conn.stream.shutdown(Shutdown::Both);
    }
    shared
        .registry
        .remove(conn.key(), conn.client.peer_addr().ip());

    let close = close.or(report).unwrap_or_else(|| {
        if for_backpressure {
            CloseFrame::new(CloseCode::POLICY, "send queue over limit")
        } else {
            CloseFrame::new(CloseCode::ABNORMAL, "connection dropped")
        }
    });
    let mut error = read_error.or(io_error);
    if error.is_none() && close.code == CloseCode::ABNORMAL {
        error = Some(Error::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    if unsent > 0 {
        // The count goes with the error that ended the connection (a
        // reset, a timeout), which keeps its kind.
        error = match error {
            None => Some(Error::Io(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("{unsent} queued bytes were not delivered"),
            ))),
            Some(Error::Io(e)) => Some(Error::Io(io::Error::new(
                e.kind(),
                format!("{e}; {unsent} queued bytes were not delivered"),
            ))),
            other => other,
        };
    }
    shared.emit_disconnect(conn, close, error);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    thread_local! {
        /// Run once by `flush_before_letting_go` between its write and
        /// its next look at the connection.
        static BETWEEN: RefCell<Option<Box<dyn FnOnce()>>> = const { RefCell::new(None) };
    }

    pub(super) fn between_writes() {
        if let Some(f) = BETWEEN.with(|b| b.borrow_mut().take()) {
            f();
        }
    }

    /// A server (for its shared state), and a client's socket with its
    /// other end, the server's: non-blocking, with a send buffer of a few
    /// KiB.
    fn server_and_socket() -> (
        crate::WebSocketServer,
        std::net::TcpStream,
        std::net::TcpStream,
    ) {
        let server = crate::WebSocketServer::builder()
            .start("127.0.0.1:0")
            .unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (stream, _) = l.accept().unwrap();
        stream.set_nonblocking(true).unwrap();
        socket2::SockRef::from(&stream)
            .set_send_buffer_size(4096)
            .unwrap();
        (server, client, stream)
    }

    /// A job's last flush whose write found the socket full, and which
    /// finds, taking the lock back, another thread holding the write token
    /// and the poller's report of room, leaves the report to that writer
    /// (which looks for room after its own write). Before, it took the
    /// report and let go; the writer, whose write had filled the socket
    /// before the room came, found none and stopped; and nothing wrote the
    /// queue again while the client read the socket empty.
    #[test]
    fn room_reported_while_another_thread_writes_is_left_to_it() {
        // A client that does not read.
        let (server, _client, stream) = server_and_socket();
        let shared = server.shared();
        let id = crate::runtime::registry::Registry::<()>::new().client_id(0);
        let conn = Arc::new(crate::runtime::conn::for_test(stream, id));
        // More than the kernel takes (a few KiB here, and the client's
        // receive buffer), in a queue owned by a job whose pass is ending.
        let total = 4 << 20;
        {
            let mut w = conn.io.lock();
            for _ in 0..total >> 16 {
                w.out.push(
                    crate::runtime::flow::Chunk::Owned(vec![7; 1 << 16]),
                    &shared.counters,
                );
            }
            w.writing = false;
        }
        // While the job's write is out, another thread takes the token,
        // and the poller reports room during that thread's write.
        let other = Arc::clone(&conn);
        BETWEEN.with(|b| {
            *b.borrow_mut() = Some(Box::new(move || {
                let mut w = other.io.lock();
                w.writing = true;
                w.room = Room::Reported;
            }))
        });
        let w = flush_before_letting_go(shared, &conn, conn.io.lock());
        let queued = w.out.bytes();
        assert!(queued > 0 && queued < total, "the job's write was short");
        assert!(w.writing, "the other thread holds the token");
        assert_eq!(
            w.room,
            Room::Reported,
            "the report of room was taken from its writer"
        );
    }

    /// A job whose last write found the socket full, and which finds,
    /// taking the lock back, that room was reported meanwhile, another
    /// thread wrote the whole queue out (a send over the cork), and a
    /// small send corked a frame after it, writes that frame: the socket
    /// is not full, so no report of room is to come. Before, judged by its
    /// own write's outcome, it let go with the frame queued and nobody to
    /// write it (found by a second review).
    #[test]
    fn a_frame_corked_after_another_writer_emptied_the_queue_is_written() {
        use std::io::{Read, Write};
        let (server, client, stream) = server_and_socket();
        let shared = Arc::clone(server.shared());
        // The socket full, before the job's write.
        let mut prefill = 0;
        loop {
            match (&stream).write(&[1u8; 4096]) {
                Ok(n) => prefill += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        let id = crate::runtime::registry::Registry::<()>::new().client_id(0);
        let conn = Arc::new(crate::runtime::conn::for_test(stream, id));
        {
            let mut w = conn.io.lock();
            w.out.push(
                crate::runtime::flow::Chunk::Owned(vec![7; 2000]),
                &shared.counters,
            );
            w.writing = false;
        }
        let (other, s2) = (Arc::clone(&conn), Arc::clone(&shared));
        let mut reader = client.try_clone().unwrap();
        BETWEEN.with(|b| {
            *b.borrow_mut() = Some(Box::new(move || {
                assert_eq!(
                    other.io.lock().room,
                    Room::Awaited,
                    "the job's write found the socket full"
                );
                // The client reads the socket empty, and the poller
                // reports room (left for the job: no closure runs).
                let mut buf = vec![0u8; prefill];
                reader.read_exact(&mut buf).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(50));
                other.io.lock().room = Room::Reported;
                // A send over the cork takes the token and writes the
                // whole queue.
                let mut w = other.io.lock();
                w.writing = true;
                assert!(!other.flush_holding_token(&s2, w), "the queue written out");
                // A small send corks behind the job.
                other.io.lock().out.push(
                    crate::runtime::flow::Chunk::Owned(vec![9; 10]),
                    &s2.counters,
                );
            }))
        });
        let w = flush_before_letting_go(&shared, &conn, conn.io.lock());
        let (queued, writing, room) = (w.out.bytes(), w.writing, w.room);
        drop(w);
        assert_eq!(
            queued, 0,
            "the job let go with {queued} bytes queued (writing {writing}, room {room:?}): nobody would write them"
        );
        let mut rest = vec![0u8; 2010];
        let mut client = client;
        client.read_exact(&mut rest).unwrap();
        assert!(rest[..2000].iter().all(|&b| b == 7) && rest[2000..].iter().all(|&b| b == 9));
    }
}
