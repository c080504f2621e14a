//! The accept thread: blocks in `accept`, hands each socket to the pool
//! through the ready queue; its handshake job reads the request, or puts
//! the socket in the poller until the request comes.

use std::io::{self, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::proto::handshake::Reject;
use crate::runtime::Shared;
use crate::runtime::handshake::far_future;
use crate::runtime::poller::{Job, dispatch};
use crate::runtime::registry::{Found, Pending};

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
        // A worker reads what has arrived; if the request is not in yet,
        // its handshake job puts the socket in the poller (registering it
        // with the interest its wait needs). Looking first, from this
        // thread, cost a system call on every connection to spare one only
        // on those whose request was late. The job joins the queue the
        // poller's work goes to, so that while every worker is draining it
        // a handshake wakes no thread.
        let pending = Box::new(Pending {
            key,
            stream,
            peer,
            buf: Vec::new(),
            deadline,
            out: Vec::new(),
            sent: 0,
            registered: false,
        });
        handshakes.push(Job::Ready(Found::Handshake(pending)));
        dispatch(&shared, &mut handshakes);
    }
}

fn refuse(mut stream: &TcpStream, reject: &Reject) {
    let _ = stream.write(&reject.to_response());
    let _ = stream.shutdown(std::net::Shutdown::Write);
}
