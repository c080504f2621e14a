//! The accept thread: blocks in `accept`, hands each socket to the pool
//! (through the ready queue, if its request is in) or to the poller.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::proto::handshake::Reject;
use crate::runtime::Shared;
use crate::runtime::handshake::{
    abort_handshake, book_handshake_deadline, book_queued_handshake_deadline, far_future,
};
use crate::runtime::poller::{Job, dispatch, register};
use crate::runtime::registry::{Found, Pending};

/// Bytes the accept thread reads of a request that is already in: a
/// browser's upgrade request fits; a longer one is read on by the job.
const FIRST_READ: usize = 2048;

pub(crate) fn run<T: Send + Sync + 'static>(shared: Arc<Shared<T>>, listener: TcpListener) {
    let mut handshakes = Vec::with_capacity(1);
    loop {
        // A main loop far behind (its event channel twice over budget) is
        // not handed more clients: they wait in the listen backlog.
        while shared.events.far_over_budget() && !shared.stopping.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of fds or memory: back off instead of spinning; the
                // listener keeps the backlog until clients leave.
                if e.kind() != io::ErrorKind::Interrupted
                    && e.kind() != io::ErrorKind::ConnectionAborted
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                continue;
            }
        };
        if stream.set_nonblocking(true).is_err() {
            continue;
        }
        let _ = stream.set_nodelay(true);
        let config = &shared.config;
        let Some(key) = shared.registry.reserve(
            config.max_connections,
            config.max_connections_per_ip,
            peer.ip(),
        ) else {
            shared.counters.refused(503);
            refuse(&stream, &Reject::new(503).body("too many connections"));
            continue;
        };
        let deadline = Instant::now()
            .checked_add(shared.config.handshake_timeout)
            .unwrap_or_else(far_future);
        // If the request is already in, a worker takes it now, with the
        // bytes read here (the job reads again only if this read filled
        // its buffer, or the request is not whole); otherwise the poller
        // hands the socket over once it is, rather than a job reading
        // nothing.
        let mut first = [0u8; FIRST_READ];
        let (arrived, gone, buf) = match (&stream).read(&mut first) {
            Ok(0) => (false, true, Vec::new()),
            Ok(n) => (true, false, first[..n].to_vec()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => (false, false, Vec::new()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => (false, false, Vec::new()),
            Err(_) => (false, true, Vec::new()),
        };
        let read_dry = arrived && buf.len() < FIRST_READ;
        let pending = Box::new(Pending {
            key,
            stream,
            peer,
            buf,
            deadline,
            out: Vec::new(),
            sent: 0,
            registered: !arrived && !gone,
            read_dry,
        });
        if gone {
            // Left (or reset) before sending a byte: nothing to answer.
            abort_handshake(&shared, *pending, None);
            continue;
        }
        if arrived {
            // Not in the poller yet: the handshake job registers it, with
            // the interest its first wait needs (one system call, off this
            // thread). It joins the queue the poller's work goes to, so
            // that while the pool is busy a handshake wakes no thread.
            handshakes.push(Job::Ready(Found::Handshake(pending)));
            dispatch(&shared, &mut handshakes);
            // It may wait in the queue (every worker busy, or blocked in a
            // closure, including pool jobs that are not drainers), where
            // the poller keeps its deadline. Booked after it is queued: a
            // scan that began meanwhile either sees this booking or finds
            // the handshake in the queue (and books the queue's earliest).
            book_queued_handshake_deadline(&shared, deadline);
            continue;
        }
        // Registered while its slot is locked, so that the readiness
        // event cannot look for it before it is there.
        let registered = shared.registry.park(pending, |p| {
            register(&shared.poller, &p.stream, polling::Event::readable(key))
        });
        if !matches!(registered, Some(Ok(()))) {
            if let Some(p) = shared.registry.take_expired_handshake(key, None) {
                abort_handshake(
                    &shared,
                    *p,
                    Some(&Reject::new(503).body("server cannot take more connections")),
                );
            }
            continue;
        }
        book_handshake_deadline(&shared, deadline);
    }
}

fn refuse(mut stream: &TcpStream, reject: &Reject) {
    let _ = stream.write(&reject.to_response());
    let _ = stream.shutdown(std::net::Shutdown::Write);
}
