//! The readiness loop: one thread waits on one `polling::Poller` and turns
//! each readiness event into one pool job. Interest is oneshot, so a
//! connection fires once and stays quiet until its job re-arms it.

// `Poller::add` is unsafe; this module alone may call it.
#![allow(unsafe_code)]

use std::io;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use polling::{Event as Interest, Events, Poller};

use crate::proto::handshake::Reject;
use crate::runtime::Shared;
use crate::runtime::conn::{claim, claim_event};
use crate::runtime::handshake::{abort_handshake, handshake};
use crate::runtime::registry::Found;
use crate::runtime::service::service;

/// Register a socket with oneshot `interest`; jobs re-arm it with
/// `modify`.
pub(crate) fn register(poller: &Poller, stream: &TcpStream, interest: Interest) -> io::Result<()> {
    // SAFETY: the socket must stay open while registered. Every socket
    // registered here lives in a registry slot (as a `Pending` or a `Conn`)
    // and leaves the poller through `Poller::delete` before it is dropped:
    // `abort_handshake`, `continue_http` (handshake.rs), `teardown` and
    // `panic_teardown` (service.rs) are the ways out of a slot, and each
    // deletes first a socket that was registered (the handshake's
    // `registered` flag is set before the `add`). The fd is closed only
    // when the last `Arc<Conn>` drops, after that.
    unsafe { poller.add(stream, interest) }
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

/// The poller thread's loop, until shutdown sets `poller_stop`.
pub(crate) fn run<T: Send + Sync + 'static>(shared: Arc<Shared<T>>) {
    let mut events = Events::new();
    let mut found = Vec::new();
    let mut due = Vec::new();
    let mut expired = Vec::new();
    let mut failing = false;
    loop {
        let timeout = shared
            .timers
            .next()
            .map(|at| Duration::from_millis(at.saturating_sub(shared.now_ms())));
        events.clear();
        match shared.poller.wait(&mut events, timeout) {
            Err(e) if e.kind() != io::ErrorKind::Interrupted => {
                // Reported once per run of failures, not every retry.
                if !failing {
                    failing = true;
                    shared.report(None, crate::error::Error::Io(e));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            _ => failing = false,
        }
        if shared.poller_stop.load(Ordering::Acquire) {
            return;
        }
        shared
            .registry
            .take_ready(events.iter().map(|e| e.key), &mut found);
        // Connections that became ready together, and those whose timer
        // is due, are handed to the pool in at most `workers` batches: one
        // pool job per batch rather than per connection, which saves a
        // channel hop and a wake-up each.
        let mut ready = Vec::new();
        // Events that were most likely pongs, and those of any other kind.
        let (mut pongs, mut others) = (0, 0);
        for f in found.drain(..) {
            match f {
                Found::Open(ref conn) => {
                    let (run, pong) = claim_event(conn);
                    if pong {
                        pongs += 1;
                    } else {
                        others += 1;
                    }
                    if run {
                        ready.push(Job::Ready(f));
                    }
                }
                Found::Nothing => {}
                f => {
                    others += 1;
                    ready.push(Job::Ready(f));
                }
            }
        }
        // Readiness first: a sweep walks every slot, and what is ready
        // should not wait for it.
        if !ready.is_empty() {
            dispatch(&shared, &mut ready);
        }
        let now = shared.now_ms();
        if shared.timers.start_sweep(now) {
            shared
                .registry
                .sweep(now, shared.started, &shared.timers, &mut due, &mut expired);
            for conn in due.drain(..) {
                if claim(&conn) {
                    ready.push(Job::Timer(conn));
                }
            }
            for p in expired.drain(..) {
                abort_handshake(
                    &shared,
                    *p,
                    Some(&Reject::new(408).body("handshake timed out")),
                );
            }
            if !ready.is_empty() {
                dispatch(&shared, &mut ready);
            }
        }
        if pongs > 0 && others == 0 {
            std::thread::sleep(PONG_PAUSE);
        }
    }
}

/// Ready work waiting for a worker, shared by the pool jobs that drain it.
pub(crate) struct ReadyQueue<T> {
    jobs: std::collections::VecDeque<Job<T>>,
    /// Pool jobs draining the queue now (some may be blocked in a user
    /// closure).
    drainers: usize,
}

impl<T> Default for ReadyQueue<T> {
    fn default() -> Self {
        ReadyQueue {
            jobs: std::collections::VecDeque::new(),
            drainers: 0,
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
    let spawn = {
        let mut q = shared.ready.lock();
        q.jobs.extend(ready.drain(..));
        // Drainers already running may be busy (or blocked in a user
        // closure): each job waiting may need one of its own, up to one
        // per worker.
        let n = shared
            .config
            .workers
            .saturating_sub(q.drainers)
            .min(q.jobs.len());
        q.drainers += n;
        n
    };
    for _ in 0..spawn {
        let s = Arc::clone(shared);
        shared.pool.execute(move || drain(&s));
    }
}

/// A pool job: run ready work until the shared queue is empty.
fn drain<T: Send + Sync + 'static>(shared: &Arc<Shared<T>>) {
    /// Leaves the drainer count right even if a job unwinds (jobs catch
    /// their own panics; this is the last line).
    struct Leave<'a, T: Send + Sync + 'static>(&'a Shared<T>, bool);
    impl<T: Send + Sync + 'static> Drop for Leave<'_, T> {
        fn drop(&mut self) {
            if !self.1 {
                self.0.ready.lock().drainers -= 1;
            }
        }
    }
    let mut leave = Leave(shared, false);
    loop {
        let job = {
            let mut q = shared.ready.lock();
            match q.jobs.pop_front() {
                Some(job) => job,
                None => {
                    q.drainers -= 1;
                    leave.1 = true;
                    return;
                }
            }
        };
        match job {
            Job::Ready(Found::Open(conn)) => service(shared, &conn, &[], false),
            Job::Ready(Found::Handshake(p)) => handshake(shared, p),
            Job::Ready(Found::Nothing) => {}
            // Nothing was reported readable: the job keeps time (pings,
            // timeouts) without a read that would find nothing. Readiness
            // that comes meanwhile makes it go round and read.
            Job::Timer(conn) => service(shared, &conn, &[], true),
        }
    }
}
