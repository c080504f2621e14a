//! The accept thread: blocks in `accept`, hands each socket to the pool.

use std::io::{self, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::proto::handshake::Reject;
use crate::runtime::Shared;
use crate::runtime::poller::register;
use crate::runtime::registry::Pending;
use crate::runtime::worker::handshake;

pub(crate) fn run<T: Send + Sync + 'static>(shared: Arc<Shared<T>>, listener: TcpListener) {
    loop {
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
        if register(&shared.poller, &stream, key).is_err() {
            shared.registry.remove(key, None, peer.ip());
            shared.counters.refused(503);
            refuse(
                &stream,
                &Reject::new(503).body("server cannot take more connections"),
            );
            continue;
        }
        let pending = Box::new(Pending {
            key,
            stream,
            peer,
            buf: Vec::new(),
            deadline: Instant::now() + shared.config.handshake_timeout,
            timer_booked: false,
            out: Vec::new(),
            sent: 0,
        });
        let s = Arc::clone(&shared);
        shared.pool.execute(move || handshake(&s, pending));
    }
}

fn refuse(mut stream: &TcpStream, reject: &Reject) {
    let _ = stream.write(&reject.to_response());
    let _ = stream.shutdown(std::net::Shutdown::Write);
}
