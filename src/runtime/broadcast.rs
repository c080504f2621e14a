//! Broadcast: encode the frame once, then hand it to every client's write
//! path. Large broadcasts are split into chunks that idle pool workers
//! help with, so a broadcast to 10,000 clients uses every core.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::{Condvar, Mutex};

use crate::client::SendStatus;
use crate::error::Error;
use crate::message::Message;
use crate::proto::frame::encode_frame;
use crate::runtime::Shared;
use crate::runtime::conn::Conn;
use crate::server::Broadcast;

/// Clients per chunk of work.
const CHUNK: usize = 256;
/// Below this many clients, one thread does it all (handing out work
/// would cost more than it saves).
const PARALLEL_FROM: usize = 4 * CHUNK;

struct Job<T> {
    conns: Vec<Arc<Conn<T>>>,
    frame: Arc<[u8]>,
    /// Next chunk to claim.
    next: AtomicUsize,
    /// Chunks finished, with their counts.
    done: Mutex<(usize, Broadcast)>,
    finished: Condvar,
}

impl<T: Send + Sync + 'static> Job<T> {
    fn chunks(&self) -> usize {
        self.conns.len().div_ceil(CHUNK)
    }

    /// Claim and send chunks until none are left.
    fn work(&self, shared: &Arc<Shared<T>>) {
        loop {
            let k = self.next.fetch_add(1, Ordering::Relaxed);
            if k >= self.chunks() {
                return;
            }
            let end = ((k + 1) * CHUNK).min(self.conns.len());
            let mut part = Broadcast::default();
            for conn in &self.conns[k * CHUNK..end] {
                count(&mut part, conn.send_shared(shared, &self.frame));
            }
            let mut done = self.done.lock();
            done.0 += 1;
            done.1.written += part.written;
            done.1.queued += part.queued;
            done.1.dropped += part.dropped;
            done.1.closed += part.closed;
            if done.0 == self.chunks() {
                self.finished.notify_all();
            }
        }
    }
}

fn count(report: &mut Broadcast, result: Result<SendStatus, Error>) {
    match result {
        Ok(SendStatus::Written) => report.written += 1,
        Ok(SendStatus::Queued) => report.queued += 1,
        Err(Error::Backpressure { .. }) => report.dropped += 1,
        Err(_) => report.closed += 1,
    }
}

pub(crate) fn broadcast<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    message: &Message,
) -> Broadcast {
    let frame: Arc<[u8]> = encode_frame(message.opcode(), message.as_bytes()).into();
    let conns = shared.registry.snapshot();
    let helpers = shared
        .config
        .workers
        .min(conns.len() / CHUNK)
        .saturating_sub(1);
    if conns.len() < PARALLEL_FROM || helpers == 0 {
        let mut report = Broadcast::default();
        for conn in &conns {
            count(&mut report, conn.send_shared(shared, &frame));
        }
        return report;
    }
    let job = Arc::new(Job {
        conns,
        frame,
        next: AtomicUsize::new(0),
        done: Mutex::new((0, Broadcast::default())),
        finished: Condvar::new(),
    });
    for _ in 0..helpers {
        let (job, shared2) = (Arc::clone(&job), Arc::clone(shared));
        shared.pool.execute(move || job.work(&shared2));
    }
    // The caller works too, and only waits for chunks that a helper has
    // already claimed and is sending: it never waits on queued pool work,
    // so a broadcast from a worker cannot deadlock the pool.
    job.work(shared);
    let mut done = job.done.lock();
    while done.0 < job.chunks() {
        job.finished.wait(&mut done);
    }
    done.1
}
