//! The readiness loop: one thread waits on one `polling::Poller` and turns
//! each readiness event into one pool job. A connection's interest is
//! edge-triggered and never re-armed: an event that finds its job running
//! tells the job to go round again (see `conn::claim_event`). Where the
//! poller has no edge-triggered mode (Windows, illumos), a connection's
//! interest is oneshot and each job re-arms it (see `conn::Watch`). A
//! handshake's interest is oneshot everywhere, re-armed by its job while
//! it waits for more of the request.

// `Poller::add` is unsafe; this module alone may call it.
#![allow(unsafe_code)]

use std::io;
use std::net::TcpStream;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use polling::{Event as Interest, Events, Poller};

use crate::proto::handshake::{Reject, parse_http};
use crate::runtime::conn::{Conn, claim, claim_event};
use crate::runtime::handshake::{
    abort_handshake, abort_handshake_for, handshake, refuse_by_content,
};
use crate::runtime::registry::{Found, Pending, handshake_deadline_ms};
use crate::runtime::service::service;
use crate::runtime::{Shared, Throttled};

/// Register a socket with oneshot `interest`, re-armed with `modify`: a
/// handshake's, or a connection's where the poller has no edge-triggered
/// mode (see `conn::Watch`).
pub(crate) fn register(poller: &Poller, stream: &TcpStream, interest: Interest) -> io::Result<()> {
    // SAFETY: the socket must stay open while registered. Every socket
    // registered here lives in a registry slot (as a `Pending` or a `Conn`)
    // and leaves the poller through `Poller::delete` before it is dropped:
    // `drop_pending` (handshake.rs) and `teardown` (service.rs, also on a
    // job's panic) are the ways out of a slot, and each deletes first a
    // socket that was registered (the handshake's `registered` flag is set
    // before the `add`). The fd is closed only
    // when the last `Arc<Conn>` drops, after that. The exceptions are
    // bugs: a handshake job that panics drops its `Pending` as it unwinds,
    // registered or not, and so may a panic in this loop or the accept
    // thread (the slot it frees); on epoll, the backend on Linux, and
    // kqueue, closing the only descriptor of a socket takes it out of the
    // interest list.
    unsafe { poller.add(stream, interest) }
}

/// Register a connection's socket with edge-triggered `interest` (see
/// `conn::Watch`).
pub(crate) fn register_edge(
    poller: &Poller,
    stream: &TcpStream,
    interest: Interest,
) -> io::Result<()> {
    // SAFETY: as in `register`: the same slots, and the same ways out.
    unsafe { poller.add_with_mode(stream, interest, polling::PollMode::Edge) }
}

/// How long the loop pauses after a wake-up that brought only pongs to
/// keepalive pings, so that the next wait finds the rest of them together.
///
/// Pings go out in batches (see `Timers::keepalive_tick`), and their pongs
/// trickle back over the milliseconds the batch takes to write. Waking for
/// every few of them cost a third of a ping's price in `epoll` calls,
/// thread wake-ups and context switches. The pause delays other
/// connections' events by at most this much, and only while nothing but
/// pongs is arriving: one event of any other kind ends it.
const PONG_PAUSE: Duration = Duration::from_micros(200);

/// Work the poller hands to the pool.
pub(crate) enum Job<T> {
    /// Readiness reported for a connection or a handshake.
    Ready(Found<T>),
    /// A connection's timer is due.
    Timer(Arc<crate::runtime::conn::Conn<T>>),
}

thread_local! {
    static ON_POLLER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this is the poller thread (which `on_error` may run on).
pub(crate) fn on_poller() -> bool {
    ON_POLLER.with(std::cell::Cell::get)
}

/// The poller thread's loop, until shutdown sets `poller_stop`.
pub(crate) fn run<T: Send + Sync + 'static>(shared: Arc<Shared<T>>) {
    ON_POLLER.with(|p| p.set(true));
    let mut st = Turn {
        events: Events::new(),
        found: Vec::new(),
        due: Vec::new(),
        expired: Vec::new(),
        ready: Vec::new(),
        failing: false,
        panicked: Throttled::new(),
    };
    loop {
        match catch_unwind(AssertUnwindSafe(|| turn(&shared, &mut st))) {
            Ok(true) => return,
            Ok(false) => {}
            Err(panic) => {
                // A bug in the loop must not leave every client unserved:
                // it is reported, what the failed turn had in hand is
                // handed on or let go, and the loop goes on.
                st.panicked.report(&shared, || {
                    let message = panic_message(&*panic);
                    crate::error::Error::Internal(format!(
                        "the readiness loop panicked ({message}) and went on"
                    ))
                });
                if shared.poller_stop.load(Ordering::Acquire) {
                    return;
                }
                // Best effort: a panic in it too leaves what is left.
                let _ = catch_unwind(AssertUnwindSafe(|| recover(&shared, &mut st)));
                // Not a spin, should the panic come back every turn.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// What the loop keeps from one turn to the next.
#[allow(clippy::vec_box)] // the sweep's handshakes move on as boxes
struct Turn<T> {
    events: Events,
    found: Vec<Found<T>>,
    due: Vec<Arc<Conn<T>>>,
    expired: Vec<Box<crate::runtime::registry::Pending>>,
    /// Jobs claimed and not yet handed to the pool.
    ready: Vec<Job<T>>,
    /// The last wait failed (reported once per run of failures).
    failing: bool,
    /// Reports of a panic in the loop.
    panicked: Throttled,
}

/// What a turn does with a connection or handshake its readiness event
/// found: claim it and queue its job (or start a flush, or let go of it
/// if its job runs already). Whether it was most likely a pong, if
/// anything was found.
fn take_found<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    found: Found<T>,
    event: Interest,
    ready: &mut Vec<Job<T>>,
) -> Option<bool> {
    match found {
        Found::Open(conn) => {
            let claimed = claim_event(&conn, event.readable, event.writable);
            if claimed.run {
                ready.push(Job::Ready(Found::Open(conn)));
            } else if claimed.flush {
                let s = Arc::clone(shared);
                shared.pool.execute(move || {
                    conn.flush_from_job(&s);
                    let_go(&s, conn);
                });
            } else {
                let_go(shared, conn);
            }
            Some(claimed.pong)
        }
        Found::Nothing => None,
        f => {
            ready.push(Job::Ready(f));
            Some(false)
        }
    }
}

/// What a sweep does with a connection whose timer is due: claim it and
/// queue its timer job, or let go of it if its job runs already.
fn take_due<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    conn: Arc<Conn<T>>,
    ready: &mut Vec<Job<T>>,
) {
    if claim(&conn) {
        ready.push(Job::Timer(conn));
    } else {
        let_go(shared, conn);
    }
}

/// Answer a handshake whose deadline passed while it waited for the rest
/// of its request. A bug here must not end the readiness loop: the socket
/// closes as the unwinding drops it, and the slot is freed.
fn expire_handshake<T: Send + Sync + 'static>(shared: &Arc<Shared<T>>, p: Box<Pending>) {
    let (key, ip) = (p.key, p.peer.ip());
    let answered = catch_unwind(AssertUnwindSafe(|| {
        // A request that went wrong in a line not yet ended (the job
        // parses again only at a line's end) gets its error.
        let answer = match parse_http(&p.buf, shared.config.max_handshake_bytes) {
            Err(reject) => reject,
            Ok(_) => Reject::new(408).body("handshake timed out"),
        };
        abort_handshake(shared, *p, Some(&answer));
    }));
    if answered.is_err() {
        shared.registry.remove(key, ip);
    }
}

/// After a panic in a turn: finish what it had in hand as the turn would
/// have, and have the next turn run every sweep (one begun in the failed
/// turn had taken its booking).
fn recover<T: Send + Sync + 'static>(shared: &Arc<Shared<T>>, st: &mut Turn<T>) {
    // First: nothing below may keep the sweeps from running again.
    shared.timers.book(0);
    shared.timers.book_queued(0);
    shared.timers.book_parked(0);
    // Entries still listed line up with their events.
    let found = std::mem::take(&mut st.found);
    for (f, event) in found.into_iter().zip(st.events.iter()) {
        take_found(shared, f, event, &mut st.ready);
    }
    while let Some(conn) = st.due.pop() {
        take_due(shared, conn, &mut st.ready);
    }
    // Timed out, or overdue in the queue (which of the two is not kept):
    // closed unanswered.
    while let Some(p) = st.expired.pop() {
        let (key, ip) = (p.key, p.peer.ip());
        if catch_unwind(AssertUnwindSafe(|| abort_handshake(shared, *p, None))).is_err() {
            shared.registry.remove(key, ip);
        }
    }
    if !st.ready.is_empty() {
        dispatch(shared, &mut st.ready);
    }
    st.events.clear();
}

/// A panic's message, if it has one.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Panics injected into a server's threads (tests of their containment):
/// the address of its `Shared`, and where.
#[cfg(test)]
pub(crate) static PANIC_AT: parking_lot::Mutex<Vec<(usize, Site)>> =
    parking_lot::Mutex::new(Vec::new());

#[cfg(test)]
#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum Site {
    /// The loop, at the start of a turn.
    TurnStart,
    /// The loop, with connections found ready and not yet claimed.
    Found,
    /// The loop, with jobs claimed and not yet handed on.
    BeforeDispatch,
    /// The loop, once a sweep of the slots has begun.
    InSweep,
    /// The accept thread, with a slot reserved for the client.
    Accepted,
}

/// A hold of a server's thread at a site (tests of what happens while it
/// is away): the address of its `Shared`, where, the thread's word that
/// it is held, and the channel whose sender's drop lets it go.
#[cfg(test)]
pub(crate) type Hold = (
    usize,
    Site,
    std::sync::mpsc::Sender<()>,
    std::sync::mpsc::Receiver<()>,
);

/// Holds waiting for their thread to come by.
#[cfg(test)]
pub(crate) static HOLD_AT: parking_lot::Mutex<Vec<Hold>> = parking_lot::Mutex::new(Vec::new());

/// Panic if one is injected here for this server, or wait if a hold is
/// (test builds only).
#[cfg(test)]
pub(crate) fn inject<T>(shared: &Arc<Shared<T>>, site: Site) {
    let at = (Arc::as_ptr(shared) as usize, site);
    let mut list = PANIC_AT.lock();
    if let Some(i) = list.iter().position(|e| *e == at) {
        list.remove(i);
        drop(list);
        panic!("injected at {site:?}");
    }
    drop(list);
    let hold = {
        let mut holds = HOLD_AT.lock();
        let i = holds.iter().position(|h| (h.0, h.1) == at);
        i.map(|i| holds.remove(i))
    };
    if let Some((_, _, held, leave)) = hold {
        let _ = held.send(());
        // Until the test lets go (or gives up: a dropped sender).
        let _ = leave.recv();
    }
}

/// One turn of the loop: wait, hand what is ready to the pool, run the
/// sweeps that are due. True once shutdown has stopped the loop.
fn turn<T: Send + Sync + 'static>(shared: &Arc<Shared<T>>, st: &mut Turn<T>) -> bool {
    #[cfg(test)]
    inject(shared, Site::TurnStart);
    let timeout = shared
        .timers
        .next()
        .map(|at| Duration::from_millis(at.saturating_sub(shared.now_ms())));
    st.events.clear();
    match shared.poller.wait(&mut st.events, timeout) {
        Err(e) if e.kind() != io::ErrorKind::Interrupted => {
            // Reported once per run of failures, not every retry.
            if !st.failing {
                st.failing = true;
                shared.report(None, crate::error::Error::Io(e));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        _ => st.failing = false,
    }
    if shared.poller_stop.load(Ordering::Acquire) {
        return true;
    }
    shared
        .registry
        .take_ready(st.events.iter().map(|e| e.key), &mut st.found);
    #[cfg(test)]
    if st.found.iter().any(|f| matches!(f, Found::Open(_))) {
        inject(shared, Site::Found);
    }
    // Connections that became ready together, and those whose timer
    // is due, are handed to the pool in at most `workers` batches: one
    // pool job per batch rather than per connection, which saves a
    // channel hop and a wake-up each.
    let ready = &mut st.ready;
    // Events that were most likely pongs, and those of any other kind.
    let (mut pongs, mut others) = (0, 0);
    // Taken one by one, so that what a panic leaves is still listed.
    for (slot, event) in st.found.iter_mut().zip(st.events.iter()) {
        match take_found(
            shared,
            std::mem::replace(slot, Found::Nothing),
            event,
            ready,
        ) {
            Some(true) => pongs += 1,
            Some(false) => others += 1,
            None => {}
        }
    }
    st.found.clear();
    #[cfg(test)]
    if !ready.is_empty() {
        inject(shared, Site::BeforeDispatch);
    }
    // Readiness first: a sweep walks every slot, and what is ready
    // should not wait for it.
    if !ready.is_empty() {
        dispatch(shared, ready);
    }
    let now = shared.now_ms();
    if shared.timers.start_sweep(now) {
        #[cfg(test)]
        inject(shared, Site::InSweep);
        shared.registry.sweep(now, &shared.timers, &mut st.due);
        while let Some(conn) = st.due.pop() {
            take_due(shared, conn, ready);
        }
        if !ready.is_empty() {
            dispatch(shared, ready);
        }
    }
    let swept_handshakes = shared.timers.start_handshake_sweep(now);
    if swept_handshakes {
        shared
            .registry
            .sweep_handshakes(now, shared.started, &shared.timers, &mut st.expired);
        while let Some(p) = st.expired.pop() {
            expire_handshake(shared, p);
        }
    }
    // Handshakes whose bytes came, still waiting for a worker at their
    // deadline (every worker is busy, or blocked in a user closure):
    // answered here. Also looked for at every sweep of the parked
    // ones, which may find the deadline of a handshake the poller has
    // since queued.
    if shared.timers.start_queue_scan(now) || swept_handshakes {
        take_overdue_handshakes(shared, now, &mut st.expired);
        while let Some(p) = st.expired.pop() {
            let (key, ip) = (p.key, p.peer.ip());
            // A bug here must not end the readiness loop: the socket
            // closes as the unwinding drops it, and the slot is freed.
            if catch_unwind(AssertUnwindSafe(|| abort_queued_handshake(shared, *p))).is_err() {
                shared.registry.remove(key, ip);
            }
        }
    }
    if pongs > 0 && others == 0 {
        std::thread::sleep(PONG_PAUSE);
    } else {
        pace(shared);
    }
    false
}

/// Longest the loop waits for the ready queue to empty before it waits
/// for readiness again.
const PACE_WAIT: Duration = Duration::from_micros(500);

/// While every worker holds a drainer and connections' jobs are still
/// queued, wait until a drainer takes the last of them (or finds the
/// queue empty, or unwinds), at most `PACE_WAIT`, before waiting for
/// readiness again. What becomes ready meanwhile could not be taken
/// before a worker is free; harvested once the queue is taken, it comes
/// in one turn instead of several. On Linux a turn costs the loop a
/// context switch and five system calls (`polling` sets its timer and
/// re-arms its notifier at every wait): under the 32 B echo the loop
/// turned 18,000-28,000 times a second for a few events each, and took
/// 15-20% of the server's CPU. While fewer drainers than workers run,
/// the loop does not wait: what comes next may have a worker at once.
/// The bound keeps the loop's own work going (handshake deadlines,
/// sweeps, room to write) when no drainer comes back: every worker
/// blocked in a user closure, or running other pool work after its
/// fair turn (still counted as a drainer).
fn pace<T: Send + Sync + 'static>(shared: &Arc<Shared<T>>) {
    let mut q = shared.ready.lock();
    if q.jobs.is_empty()
        || q.drainers < shared.config.workers
        || shared.poller_stop.load(Ordering::Acquire)
    {
        return;
    }
    q.pacing = true;
    let _waited = shared.drained.wait_for(&mut q, PACE_WAIT);
    q.pacing = false;
    #[cfg(test)]
    {
        q.paced[usize::from(_waited.timed_out())] += 1;
    }
}

/// End the loop's wait in `pace`, if it waits.
fn end_pace<T: Send + Sync + 'static>(shared: &Shared<T>, q: &mut ReadyQueue<T>) {
    if q.pacing {
        q.pacing = false;
        shared.drained.notify_one();
    }
}

/// Let go of the loop's hold on a connection. Should it be the last (its
/// job tore it down meanwhile), the record, and the user's `T` with it, is
/// dropped on a worker: a `Drop` of the user's that blocks or panics must
/// not stall or end the readiness loop.
pub(crate) fn let_go<T: Send + Sync + 'static>(shared: &Arc<Shared<T>>, conn: Arc<Conn<T>>) {
    if let Some(last) = Arc::into_inner(conn) {
        let s = Arc::clone(shared);
        shared.pool.execute(move || {
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| drop(last))) {
                s.report_panic("the drop of a client's data", None, &*panic);
            }
        });
    }
}

/// Let go of a drainer's hold on a connection, on this thread. Should it
/// be the last (its job tore it down), a `Drop` of the user's `T` that
/// panics is reported, and does not unwind out of the drainer: the jobs
/// queued behind it would wait for a drainer until some other event came.
pub(crate) fn let_go_here<T: Send + Sync + 'static>(shared: &Arc<Shared<T>>, conn: Arc<Conn<T>>) {
    if let Some(last) = Arc::into_inner(conn)
        && let Err(panic) = catch_unwind(AssertUnwindSafe(|| drop(last)))
    {
        shared.report_panic("the drop of a client's data", None, &*panic);
    }
}

/// Most overdue handshakes one pass of the loop answers; more wait for the
/// next pass (booked at once), so that due timers and readiness are not
/// held up behind a crowd of them.
const OVERDUE_PER_PASS: usize = 256;

/// Take out of the ready queue the handshakes still waiting a tick after
/// their deadline (as the sweep rounds it), and book the earliest such
/// time of those left. A handshake in the queue is in no slot the sweep can
/// see (its slot is held), so this is how its deadline is kept while no
/// worker takes it. The tick of grace is for one dispatched in this very
/// pass, or just before: a free worker takes it well within that.
#[allow(clippy::vec_box)] // moved on as boxes, as the sweep's
fn take_overdue_handshakes<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    now: u64,
    overdue: &mut Vec<Box<Pending>>,
) {
    let grace = crate::runtime::timer::TICK_MS;
    let at = |p: &Pending| handshake_deadline_ms(shared.started, p.deadline) + grace;
    let mut next = u64::MAX;
    {
        let mut q = shared.ready.lock();
        // One look first: the queue is rebuilt only when something in it
        // is overdue, not at every sweep that finds handshakes waiting.
        let mut any = false;
        for (_, p) in &q.handshakes {
            let t = at(p);
            if t <= now {
                any = true;
                break;
            }
            next = next.min(t);
        }
        if any {
            next = u64::MAX;
            let waiting = std::mem::take(&mut q.handshakes);
            q.handshakes.reserve(waiting.len());
            for (place, p) in waiting {
                if at(&p) <= now && overdue.len() < OVERDUE_PER_PASS {
                    overdue.push(p);
                } else {
                    // Left for the next pass if over this one's share.
                    next = next.min(at(&p).max(now));
                    q.handshakes.push_back((place, p));
                }
            }
        }
    }
    if next != u64::MAX {
        // On the poller thread: the wait that follows sees it.
        shared.timers.book_queued(next);
    }
}

/// Most bytes read from a queued handshake the poller answers.
const OVERDUE_READ: usize = 64 * 1024;

/// Answer a handshake that waited in the ready queue past its deadline,
/// on the poller thread. What the client sent is read (at most
/// `OVERDUE_READ`, and 4 KiB more by `abort_handshake`, so this thread
/// cannot be held) and parsed, which also
/// spares most closes a reset under the answer (not one after more bytes
/// than that, or after bytes that come later):
/// - a whole request came in time, and the server was too busy: `503`,
///   with `Retry-After`, if answering it needs user code (`on_http`, the
///   client-init strategy); a request a worker would have refused for
///   its content alone gets that refusal (`405`, `426`, `400`, `403`);
///   during shutdown every whole request gets `503`, as from a worker;
/// - more than this reads, and no end seen: `503` too (a worker would
///   have read on);
/// - part of one, and the client stalled: `408`, as for those parked;
/// - a malformed one, or one over `max_handshake_bytes`: the parser's
///   refusal, as a worker would have answered;
/// - the client left before sending anything: nothing. (One that sent its
///   request and then shut its side is still answered.)
fn abort_queued_handshake<T: Send + Sync + 'static>(shared: &Arc<Shared<T>>, mut p: Pending) {
    if !p.out.is_empty() || p.lingering {
        // Midway through a plain HTTP answer, or after one: nothing else
        // can be said.
        return abort_handshake(shared, p, None);
    }
    let max = shared.config.max_handshake_bytes;
    let cap = max.saturating_add(1).min(OVERDUE_READ);
    let failed = crate::runtime::service::with_scratch(|buf| {
        while p.buf.len() < cap {
            let room = buf.len().min(cap - p.buf.len());
            match crate::runtime::service::read_some(&p.stream, &mut buf[..room]) {
                Ok(Some(0)) | Ok(None) => break,
                Ok(Some(n)) => p.buf.extend_from_slice(&buf[..n]),
                Err(_) => return true,
            }
        }
        false
    });
    if failed || p.buf.is_empty() {
        // The socket broke, or the client left without a word.
        return abort_handshake(shared, p, None);
    }
    let busy = || {
        if shared.stopping.load(Ordering::Acquire) {
            Reject::new(503).body("server shutting down")
        } else {
            Reject::new(503)
                .header("Retry-After", "1")
                .body("server busy: no worker took the handshake before its deadline")
        }
    };
    // Empty lines a worker skipped still count.
    let parsed = parse_http(&p.buf, max.saturating_sub(p.skipped).max(1));
    let head_only = crate::runtime::handshake::begins_head(&p.buf);
    let answer = match parsed {
        // Only what needs user code (`on_http`, the client-init strategy)
        // is left unanswered for being busy; a request a worker would
        // refuse for its content is refused as the worker would.
        Ok(Some((mut request, _))) => {
            let needs_user_code = !request.is_upgrade() && shared.handlers.http.is_some();
            if needs_user_code || shared.stopping.load(Ordering::Acquire) {
                busy()
            } else {
                refuse_by_content(shared, &mut request)
                    .err()
                    .unwrap_or_else(busy)
            }
        }
        Ok(None) if p.buf.len() >= cap && cap <= max => busy(),
        Ok(None) => Reject::new(408).body("handshake timed out"),
        Err(reject) => reject,
    };
    abort_handshake_for(shared, p, Some(&answer), head_only);
}

/// Ready work waiting for a worker, shared by the pool jobs that drain it.
pub(crate) struct ReadyQueue<T> {
    /// Connections' jobs, each with its place in the arrival order.
    jobs: std::collections::VecDeque<(u64, Job<T>)>,
    /// Handshakes, apart: at most `handshake_cap` run at once (see
    /// `dispatch`); with its place in the arrival order.
    handshakes: std::collections::VecDeque<(u64, Box<Pending>)>,
    /// The next place in the arrival order.
    next: u64,
    /// Handshakes running on a drainer now.
    handshaking: usize,
    /// Pool jobs draining the queue now (some may be blocked in a user
    /// closure).
    drainers: usize,
    /// The readiness loop waits in `pace`: the drainer that takes the
    /// last job, finds none or unwinds wakes it (`end_pace`).
    pacing: bool,
    /// The loop's waits in `pace`: ended by a drainer, and timed out.
    #[cfg(test)]
    paced: [u64; 2],
}

impl<T> ReadyQueue<T> {
    fn push(&mut self, job: Job<T>) {
        let at = self.next;
        self.next += 1;
        match job {
            Job::Ready(Found::Handshake(p)) => self.handshakes.push_back((at, p)),
            job => self.jobs.push_back((at, job)),
        }
    }

    /// Jobs a drainer may take now.
    fn runnable(&self, cap: usize) -> usize {
        let handshakes = self
            .handshakes
            .len()
            .min(cap.saturating_sub(self.handshaking));
        self.jobs.len() + handshakes
    }

    /// The oldest job a drainer may take: a handshake only while fewer
    /// than `cap` run.
    fn pop(&mut self, cap: usize) -> Option<Job<T>> {
        let handshake_first = self.handshaking < cap
            && match (self.handshakes.front(), self.jobs.front()) {
                (Some((h, _)), Some((j, _))) => h < j,
                (Some(_), None) => true,
                _ => false,
            };
        if handshake_first {
            self.handshaking += 1;
            let (_, p) = self.handshakes.pop_front()?;
            return Some(Job::Ready(Found::Handshake(p)));
        }
        self.jobs.pop_front().map(|(_, job)| job)
    }
}

thread_local! {
    /// This drainer runs a handshake that counts against the cap.
    static HANDSHAKE_SLOT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The handshake this thread runs no longer counts against the cap: its
/// connection is open, and what runs next (`on_connect`, its first job)
/// is the connection's, which may block as any closure may. A handshake
/// waiting at the cap gets a drainer, if a worker is free.
pub(crate) fn handshake_over<T: Send + Sync + 'static>(shared: &Arc<Shared<T>>) {
    if !HANDSHAKE_SLOT.replace(false) {
        return;
    }
    let mut q = shared.ready.lock();
    q.handshaking -= 1;
    add_drainers(shared, q);
}

/// Start drainers for the jobs in `q` that may run now and that the
/// drainers running may not take: busy (or blocked in a user closure),
/// each may need one of its own, up to one per worker. Handshakes past
/// the cap wait for one to end.
fn add_drainers<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    mut q: parking_lot::MutexGuard<'_, ReadyQueue<T>>,
) {
    let workers = shared.config.workers;
    let n = workers
        .saturating_sub(q.drainers)
        .min(q.runnable(handshake_cap(workers)));
    q.drainers += n;
    drop(q);
    for _ in 0..n {
        let s = Arc::clone(shared);
        shared.pool.execute(move || drain(&s));
    }
}

/// Most handshakes that run at once: all workers but one, so that a slow
/// client-init strategy or `on_http` (a call to an auth service, say),
/// however many requests an attacker sends it, always leaves a worker to
/// the open connections.
fn handshake_cap(workers: usize) -> usize {
    workers.saturating_sub(1).max(1)
}

impl<T> Default for ReadyQueue<T> {
    fn default() -> Self {
        ReadyQueue {
            jobs: std::collections::VecDeque::new(),
            handshakes: std::collections::VecDeque::new(),
            next: 0,
            handshaking: 0,
            drainers: 0,
            pacing: false,
            #[cfg(test)]
            paced: [0; 2],
        }
    }
}

/// Hand ready work to the pool. It goes into one shared queue that up to
/// `workers` pool jobs drain one connection at a time, so a handler that
/// blocks holds up its own connection only: the connections that became
/// ready with it are taken by the other drainers. One pool job per
/// drainer rather than per connection saves a channel hop and a wake-up
/// each.
pub(crate) fn dispatch<T: Send + Sync + 'static>(shared: &Arc<Shared<T>>, ready: &mut Vec<Job<T>>) {
    let mut q = shared.ready.lock();
    for job in ready.drain(..) {
        q.push(job);
    }
    add_drainers(shared, q);
}

/// Ready jobs a drainer runs before it lets other pool work waiting for a
/// thread go first.
const FAIR_TURN: u32 = 64;

/// A pool job: run ready work until the shared queue is empty.
fn drain<T: Send + Sync + 'static>(shared: &Arc<Shared<T>>) {
    /// Leaves the drainer count right even if a job unwinds (jobs catch
    /// their own panics; this is the last line).
    struct Leave<'a, T: Send + Sync + 'static>(&'a Shared<T>, bool);
    impl<T: Send + Sync + 'static> Drop for Leave<'_, T> {
        fn drop(&mut self) {
            if !self.1 {
                let mut q = self.0.ready.lock();
                q.drainers -= 1;
                end_pace(self.0, &mut q);
            }
        }
    }
    let mut leave = Leave(shared, false);
    let mut served = 0u32;
    loop {
        served = served.saturating_add(1);
        if served > FAIR_TURN && shared.pool.queued_count() > 0 {
            // Other pool work waits for a thread (a user thread's
            // deferred sends, a resumed connection's job, a broadcast's
            // share), and under a flood the ready queue may never empty:
            // go to the back of the pool's queue, behind it, still
            // counted as a drainer.
            leave.1 = true;
            let s = Arc::clone(shared);
            shared.pool.execute(move || drain(&s));
            return;
        }
        let job = {
            let mut q = shared.ready.lock();
            match q.pop(handshake_cap(shared.config.workers)) {
                Some(job) => {
                    if q.jobs.is_empty() {
                        end_pace(shared, &mut q);
                    }
                    job
                }
                None => {
                    q.drainers -= 1;
                    end_pace(shared, &mut q);
                    leave.1 = true;
                    return;
                }
            }
        };
        match job {
            Job::Ready(Found::Open(conn)) => {
                service(shared, &conn, &[], false);
                let_go_here(shared, conn);
            }
            Job::Ready(Found::Handshake(p)) => {
                /// Counts the handshake as ended, unless `handshake_over`
                /// did, even if it unwinds.
                struct Ended<'a, T: Send + Sync + 'static>(&'a Shared<T>);
                impl<T: Send + Sync + 'static> Drop for Ended<'_, T> {
                    fn drop(&mut self) {
                        if HANDSHAKE_SLOT.replace(false) {
                            self.0.ready.lock().handshaking -= 1;
                        }
                    }
                }
                HANDSHAKE_SLOT.set(true);
                let _ended = Ended(shared);
                handshake(shared, p);
            }
            Job::Ready(Found::Nothing) => {}
            // Nothing was reported readable: the job keeps time (pings,
            // timeouts) without a read that would find nothing. Readiness
            // that comes meanwhile makes it go round and read.
            Job::Timer(conn) => {
                service(shared, &conn, &[], true);
                let_go_here(shared, conn);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::sync::{Arc, Mutex, mpsc};
    use std::time::Duration;

    use super::{HOLD_AT, PANIC_AT, Site};
    use crate::runtime::testing::{client_frame, upgrade};
    use crate::{Client, Message, WebSocketServer};

    /// An echo server (closures) and what it reports to `on_error`.
    fn echo_server(
        f: impl FnOnce(crate::Builder) -> crate::Builder,
    ) -> (WebSocketServer, mpsc::Receiver<String>) {
        let (tx, reported) = mpsc::channel::<String>();
        let tx = Mutex::new(tx);
        let builder = WebSocketServer::builder()
            .workers(2)
            .on_message(|c: &Client, m: Message| {
                let _ = c.send(m);
            })
            .on_error(move |_, e| {
                let _ = tx.lock().unwrap().send(e.to_string());
            });
        (f(builder).start("127.0.0.1:0").unwrap(), reported)
    }

    /// Inject a panic at `site` into `server`, until the guard drops: one
    /// left unfired (the test failed first) must not fire in a later
    /// test's server at the same address.
    #[must_use]
    fn inject(server: &WebSocketServer, site: Site) -> Injected {
        let at = (Arc::as_ptr(server.shared()) as usize, site);
        PANIC_AT.lock().push(at);
        Injected(at)
    }

    struct Injected((usize, Site));

    impl Drop for Injected {
        fn drop(&mut self) {
            PANIC_AT.lock().retain(|e| *e != self.0);
        }
    }

    /// Hold the loop of `server` at the start of its next turn, before it
    /// waits: returns once it is held, with the sender whose drop lets it
    /// go on.
    fn hold_loop(server: &WebSocketServer) -> mpsc::Sender<()> {
        let (held_tx, held) = mpsc::channel();
        let (leave, leave_rx) = mpsc::channel();
        let at = Arc::as_ptr(server.shared()) as usize;
        HOLD_AT
            .lock()
            .push((at, Site::TurnStart, held_tx, leave_rx));
        // Out of its wait, it comes round to the start of a turn.
        server.shared().poller.notify().unwrap();
        held.recv_timeout(Duration::from_secs(10))
            .expect("the loop was not held");
        leave
    }

    /// A server that takes messages and answers none (an answer's write
    /// would find a reset), with no keepalive or idle timeout (either
    /// would find a lost end in the end): its messages and disconnects.
    fn quiet_server() -> (WebSocketServer, mpsc::Receiver<Vec<u8>>, mpsc::Receiver<()>) {
        let (msg_tx, messages) = mpsc::channel();
        let (gone_tx, gone) = mpsc::channel();
        let (msg_tx, gone_tx) = (Mutex::new(msg_tx), Mutex::new(gone_tx));
        let server = WebSocketServer::builder()
            .workers(2)
            .ping_interval(None)
            .idle_timeout(None)
            .on_message(move |_, m: Message| {
                let _ = msg_tx.lock().unwrap().send(m.as_bytes().to_vec());
            })
            .on_disconnect(move |_, _, _| {
                let _ = gone_tx.lock().unwrap().send(());
            })
            .start("127.0.0.1:0")
            .unwrap();
        (server, messages, gone)
    }

    /// Three times: a client sends a message, then, while the loop is
    /// held, another and `end` (which ends its side); once the loop goes
    /// on, both messages and a `Disconnect` must come. What `end` returns
    /// is kept until then.
    fn ends_behind_the_last_message(end: fn(TcpStream) -> Option<TcpStream>, unseen: &str) {
        let (server, messages, gone) = quiet_server();
        for round in 0..3u8 {
            let mut s = connect(&server);
            // Nagle's wait for the first message's acknowledgement would
            // hold the last one back, to go with the end or be lost to it.
            s.set_nodelay(true).unwrap();
            s.write_all(&client_frame(0x82, &[round])).unwrap();
            let first = messages.recv_timeout(Duration::from_secs(10));
            assert_eq!(first.unwrap(), [round]);
            let leave = hold_loop(&server);
            s.write_all(&client_frame(0x82, b"last")).unwrap();
            let _kept = end(s);
            // Over loopback both are in once the calls return.
            std::thread::sleep(Duration::from_millis(20));
            drop(leave);
            let last = messages.recv_timeout(Duration::from_secs(10));
            assert_eq!(last.unwrap(), b"last");
            gone.recv_timeout(Duration::from_secs(5)).expect(unseen);
        }
    }

    /// A client's last message and its FIN, in before the loop waits, are
    /// reported by one event, and no event reports the FIN again: the job
    /// that reads the message must read on and find it. Fails if a short
    /// read is taken to have drained the socket (the connection then
    /// lives on, unseen, with no keepalive to find it).
    #[test]
    fn a_fin_that_came_with_the_last_message_ends_the_connection() {
        ends_behind_the_last_message(
            |s| {
                s.shutdown(std::net::Shutdown::Write).unwrap();
                Some(s)
            },
            "the FIN that came with the message went unseen",
        );
    }

    /// As above with a reset behind the message: the read that takes the
    /// message does not tell of the reset, the next read does. (Linux's
    /// `TCP_INQ` count, tried to save that read, counts a FIN but not a
    /// reset: a version that trusted it failed here.) Linux only: there
    /// the bytes that came before a reset are still read; elsewhere a
    /// reset may drop them.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_reset_that_came_with_the_last_message_ends_the_connection() {
        ends_behind_the_last_message(
            |s| {
                socket2::SockRef::from(&s)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                None
            },
            "the reset behind the message went unseen",
        );
    }

    fn connect(server: &WebSocketServer) -> TcpStream {
        let mut s = TcpStream::connect(server.local_addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        upgrade(&mut s);
        s
    }

    /// Read one short unmasked frame: (first byte, payload).
    fn read_short(s: &mut TcpStream) -> (u8, Vec<u8>) {
        let mut head = [0u8; 2];
        s.read_exact(&mut head).unwrap();
        let mut p = vec![0u8; usize::from(head[1] & 0x7f)];
        s.read_exact(&mut p).unwrap();
        (head[0], p)
    }

    /// Send `payload` and read its echo.
    fn echo(s: &mut TcpStream, payload: &[u8]) {
        s.write_all(&client_frame(0x82, payload)).unwrap();
        assert_eq!(read_short(s), (0x82, payload.to_vec()));
    }

    /// `each` echoes on each of `clients` connections at once, one in
    /// flight a connection, against an echo server with `workers`: the
    /// loop's waits in `pace`, ended by a drainer and timed out.
    fn paced_under(workers: usize, clients: usize, each: u32) -> [u64; 2] {
        let (server, _reported) = echo_server(|b| b.workers(workers));
        let talkers: Vec<_> = (0..clients)
            .map(|_| {
                let mut s = connect(&server);
                std::thread::spawn(move || {
                    for i in 0..each {
                        echo(&mut s, &i.to_le_bytes());
                    }
                })
            })
            .collect();
        for t in talkers {
            t.join().unwrap();
        }
        server.shared().ready.lock().paced
    }

    /// One connection's jobs, one at a time, leave workers of four free:
    /// the loop does not wait for a drainer, which would only delay what
    /// comes next. (Drainers that the machine stalls after their write,
    /// still counted, can fill the count now and then: a few waits are
    /// allowed. Without the check of the count, 299 in 300 echoes.)
    #[test]
    fn the_loop_does_not_pace_while_a_worker_is_free() {
        let [woken, timed_out] = paced_under(4, 1, 300);
        assert!(
            woken + timed_out <= 30,
            "{woken} waits ended by a drainer, {timed_out} timed out"
        );
    }

    /// Eight connections on one worker keep its drainer busy: the loop
    /// waits in `pace`, and the drainer that takes the last queued job (or
    /// finds none) ends such waits (without the wake-up, all 204 timed
    /// out).
    #[test]
    fn a_drainer_ends_the_loops_wait_for_the_queue() {
        let [woken, timed_out] = paced_under(1, 8, 200);
        assert!(
            woken > 0,
            "no wait ended by a drainer ({timed_out} timed out)"
        );
    }

    fn expect_report(reported: &mpsc::Receiver<String>, what: &str, site: Site) {
        let e = reported
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no report of {what}'s panic"));
        assert!(
            e.contains(what) && e.contains(&format!("injected at {site:?}")),
            "{e}"
        );
    }

    /// A panic in the readiness loop at `site`, which the message after
    /// the injection reaches: reported, and the loop goes on. The clients
    /// connected before it are still served, that message included, and
    /// new ones too.
    fn the_loop_goes_on_after_a_panic_at(site: Site) {
        let (server, reported) = echo_server(|b| b);
        let mut a = connect(&server);
        echo(&mut a, b"before");
        let _armed = inject(&server, site);
        // Messages until one reaches it (one that comes while the job
        // of the one before still runs is not claimed by the loop).
        let t = std::time::Instant::now();
        let e = loop {
            echo(&mut a, b"reaches it");
            if let Ok(e) = reported.recv_timeout(Duration::from_millis(50)) {
                break e;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "no report");
        };
        assert!(
            e.contains("the readiness loop") && e.contains(&format!("injected at {site:?}")),
            "{e}"
        );
        for i in 0..20u8 {
            echo(&mut a, &[i; 3]);
        }
        let mut b = connect(&server);
        echo(&mut b, b"after");
        assert_eq!(server.stats().internal_errors, 1);
    }

    /// At the start of a turn (the loop is waiting when the panic is
    /// injected: it comes at the turn after the one that message ends).
    /// Without the guard the poller thread ended, and with it every
    /// client's service.
    #[test]
    fn a_panic_in_the_readiness_loop_is_reported_and_the_loop_goes_on() {
        the_loop_goes_on_after_a_panic_at(Site::TurnStart);
    }

    /// In a turn that has claimed a connection's job, before handing it
    /// to the pool: the job still runs. (Were it dropped, the connection
    /// would stay claimed, never served again.)
    #[test]
    fn a_job_claimed_by_a_turn_that_panicked_still_runs() {
        the_loop_goes_on_after_a_panic_at(Site::BeforeDispatch);
    }

    /// With a connection found ready and not yet claimed: its event is
    /// still taken. (Let go of, its message would wait for the next.)
    #[test]
    fn a_readiness_event_a_turn_found_before_it_panicked_is_not_lost() {
        the_loop_goes_on_after_a_panic_at(Site::Found);
    }

    /// A panic once a sweep of the slots has begun (which takes its
    /// booking): the sweeps go on, so an idle client is still closed at
    /// its idle timeout. (Without booking them again, no sweep ran again
    /// until something else booked one.)
    #[test]
    fn timers_go_on_after_a_panic_in_a_sweep() {
        let (server, reported) = echo_server(|b| {
            b.ping_interval(None)
                .idle_timeout(Some(Duration::from_millis(600)))
        });
        let _armed = inject(&server, Site::InSweep);
        let mut a = connect(&server);
        expect_report(&reported, "the readiness loop", Site::InSweep);
        let (first, p) = read_short(&mut a);
        assert_eq!(first, 0x88, "no close for idleness");
        assert_eq!(u16::from_be_bytes([p[0], p[1]]), 1001);
    }

    /// The same for the accept thread: the client it was taking when it
    /// panicked is dropped and its slot freed, and the next ones are
    /// served.
    #[test]
    fn a_panic_in_the_accept_thread_is_reported_and_it_goes_on() {
        // Room for two: the slot of the client lost must come back for
        // the next to get in beside the first.
        let (gone_tx, gone) = mpsc::channel::<()>();
        let gone_tx = Mutex::new(gone_tx);
        let (server, reported) = echo_server(|b| {
            b.max_connections(2).on_disconnect(move |_, _, _| {
                let _ = gone_tx.lock().unwrap().send(());
            })
        });
        let mut a = connect(&server);
        let _armed = inject(&server, Site::Accepted);
        let mut lost = TcpStream::connect(server.local_addr()).unwrap();
        lost.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let _ = lost.write_all(crate::runtime::testing::UPGRADE);
        let mut buf = [0u8; 64];
        assert!(
            matches!(lost.read(&mut buf), Ok(0) | Err(_)),
            "the client accepted as the thread panicked was answered"
        );
        expect_report(&reported, "the accept thread", Site::Accepted);
        for _ in 0..5 {
            let mut b = connect(&server);
            echo(&mut b, b"after");
            drop(b);
            // Its slot back before the next (freed before its
            // `Disconnect`).
            gone.recv_timeout(Duration::from_secs(10))
                .expect("never left");
        }
        echo(&mut a, b"still");
        assert_eq!(server.stats().internal_errors, 1);
    }
}
