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
#[cfg(feature = "deflate")]
use crate::proto::{deflate::compress_fresh, frame::encode_header_rsv};
use crate::runtime::Shared;
use crate::runtime::conn::Conn;
#[cfg(feature = "deflate")]
use crate::runtime::conn::RSV1;
use crate::runtime::flow::SharedFrame;
use crate::server::Broadcast;

/// Clients per chunk of work.
const CHUNK: usize = 256;
/// Below this many clients, one thread does it all (handing out work
/// would cost more than it saves).
const PARALLEL_FROM: usize = 4 * CHUNK;

/// The message encoded once per form the clients need.
pub(crate) struct Frames {
    plain: Arc<SharedFrame>,
    /// The message's payload length.
    #[cfg(feature = "deflate")]
    len: usize,
    /// The compressed frame for connections that compress without a
    /// context, made with the smallest window any of them agreed on (a
    /// stream made with a smaller window is valid for every larger one);
    /// `None` if none needs it or compressing did not pay.
    #[cfg(feature = "deflate")]
    deflated: Option<Arc<SharedFrame>>,
    /// For connections that keep a context and compress on their own.
    #[cfg(feature = "deflate")]
    message: Option<Message>,
}

impl Frames {
    pub(crate) fn new<T>(shared: &Shared<T>, message: &Message, conns: &[Arc<Conn<T>>]) -> Frames {
        let budget = &shared.counters.output;
        let plain = SharedFrame::new(encode_frame(message.opcode(), message.as_bytes()), budget);
        #[cfg(feature = "deflate")]
        {
            let mut deflated = None;
            let mut own_context = false;
            if let Some(config) = shared.config.compression {
                let mut smallest = None::<u8>;
                for c in conns {
                    if let Some(d) = &c.deflater
                        && d.wants(message.len())
                    {
                        match d.shared_variant() {
                            Some(bits) => smallest = Some(smallest.map_or(bits, |s| s.min(bits))),
                            None => own_context = true,
                        }
                    }
                }
                if let Some(bits) = smallest {
                    let z = compress_fresh(bits, config.get_level(), message.as_bytes());
                    if z.len() < message.len() || !config.get_skip_incompressible() {
                        let mut head = [0u8; 10];
                        let n = encode_header_rsv(&mut head, true, RSV1, message.opcode(), z.len());
                        let mut frame = Vec::with_capacity(n + z.len());
                        frame.extend_from_slice(&head[..n]);
                        frame.extend_from_slice(&z);
                        deflated = Some(SharedFrame::new(frame, budget));
                    }
                }
            }
            Frames {
                plain,
                len: message.len(),
                deflated,
                message: own_context.then(|| message.clone()),
            }
        }
        #[cfg(not(feature = "deflate"))]
        {
            let _ = conns;
            Frames { plain }
        }
    }

    /// The form `conn` needs: a frame shared with others, or (with a
    /// compression context of its own) the message to compress itself.
    fn pick<T>(&self, conn: &Conn<T>) -> Form<'_> {
        #[cfg(feature = "deflate")]
        if let Some(d) = &conn.deflater {
            match (d.shared_variant(), &self.deflated, &self.message) {
                (Some(_), Some(frame), _) if d.wants(self.len) => return Form::Frame(frame),
                (None, _, Some(message)) if d.wants(self.len) => return Form::Own(message),
                _ => {}
            }
        }
        #[cfg(not(feature = "deflate"))]
        let _ = conn;
        Form::Frame(&self.plain)
    }

    /// Send the right form to `conn`.
    fn send<T: Send + Sync + 'static>(
        &self,
        shared: &Arc<Shared<T>>,
        conn: &Arc<Conn<T>>,
    ) -> Result<SendStatus, Error> {
        match self.pick(conn) {
            Form::Frame(frame) => conn.send_shared(shared, frame),
            Form::Own(message) => conn
                .send_message(shared, message.clone())
                .map_err(crate::error::SendError::into_error),
        }
    }

    /// Queue the right form to `conn` without writing (see
    /// [`Conn::queue_shared`]): true if the caller must flush. A
    /// connection with a compression context of its own compresses in it
    /// and queues the result the same way.
    pub(crate) fn queue<T: Send + Sync + 'static>(
        &self,
        shared: &Arc<Shared<T>>,
        conn: &Arc<Conn<T>>,
    ) -> Result<bool, Error> {
        match self.pick(conn) {
            Form::Frame(frame) => conn.queue_shared(shared, frame),
            #[cfg(feature = "deflate")]
            Form::Own(message) => conn.queue_own(shared, message),
            #[cfg(not(feature = "deflate"))]
            Form::Own(message) => conn
                .send_message(shared, message.clone())
                .map(|_| false)
                .map_err(crate::error::SendError::into_error),
        }
    }
}

/// What one connection is sent of a message encoded for many.
enum Form<'a> {
    Frame(&'a Arc<SharedFrame>),
    #[cfg_attr(not(feature = "deflate"), allow(dead_code))]
    Own(&'a Message),
}

/// What a parallel job does for each connection.
enum Op {
    /// Send the broadcast's frame.
    Send(Frames),
    /// Flush the write token a publish took (`Conn::queue_shared`).
    Flush,
}

struct Job<T: Send + Sync + 'static> {
    conns: Vec<Arc<Conn<T>>>,
    /// For letting go of the recipients (see `Drop`).
    shared: Arc<Shared<T>>,
    op: Op,
    /// Next chunk to claim.
    next: AtomicUsize,
    /// Chunks finished, with their counts.
    done: Mutex<(usize, Broadcast)>,
    finished: Condvar,
}

/// A recipient torn down meanwhile may be held by the job alone (a
/// publish's, its deferred leave done as the topic was let go): its drop,
/// which runs the user's `Drop` for its data, goes to a worker, guarded, as
/// the readiness loop's last holds do, on whichever thread drops the job
/// last (the caller, or a helper still finishing).
impl<T: Send + Sync + 'static> Drop for Job<T> {
    fn drop(&mut self) {
        for conn in std::mem::take(&mut self.conns) {
            crate::runtime::poller::let_go(&self.shared, conn);
        }
    }
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
                let result = match &self.op {
                    Op::Send(frames) => frames.send(shared, conn),
                    Op::Flush => conn.flush_taken(shared),
                };
                count(&mut part, result);
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
        Err(e) if e.is_backpressure() => report.dropped += 1,
        Err(_) => report.closed += 1,
    }
}

pub(crate) fn broadcast<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    message: &Message,
) -> Broadcast {
    let conns = shared.registry.snapshot();
    let frames = Frames::new(shared, message, &conns);
    for_each(shared, conns, Op::Send(frames))
}

/// Flush, for a publish, the connections whose write token it took: with
/// many subscribers the pool's idle workers help, as for a broadcast.
pub(crate) fn flush_all<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    conns: Vec<Arc<Conn<T>>>,
) -> Broadcast {
    for_each(shared, conns, Op::Flush)
}

/// Do `op` for every connection: on this thread for a few, split into
/// chunks that idle workers help with for many.
fn for_each<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    conns: Vec<Arc<Conn<T>>>,
    op: Op,
) -> Broadcast {
    let helpers = shared
        .config
        .workers
        .min(conns.len() / CHUNK)
        .saturating_sub(1);
    let job = Arc::new(Job {
        conns,
        shared: Arc::clone(shared),
        op,
        next: AtomicUsize::new(0),
        done: Mutex::new((0, Broadcast::default())),
        finished: Condvar::new(),
    });
    if job.conns.len() >= PARALLEL_FROM {
        // Only workers idle now can help. A helper queued behind busy
        // ones (closures that block, a saturated pool) would start once
        // the caller has done the work; it holds only a weak reference,
        // so that meanwhile the job (every recipient's connection, the
        // frames) is not kept.
        let pool = &shared.pool;
        let idle = if pool.queued_count() == 0 {
            pool.max_count().saturating_sub(pool.active_count())
        } else {
            0
        };
        for _ in 0..helpers.min(idle) {
            let (job, shared2) = (Arc::downgrade(&job), Arc::clone(shared));
            shared.pool.execute(move || {
                if let Some(job) = job.upgrade() {
                    job.work(&shared2);
                }
            });
        }
    }
    // The caller works too, and only waits for chunks that a helper has
    // already claimed and is sending: it never waits on queued pool work,
    // so a broadcast from a worker cannot deadlock the pool.
    job.work(shared);
    let report = {
        let mut done = job.done.lock();
        while done.0 < job.chunks() {
            job.finished.wait(&mut done);
        }
        done.1
    };
    // Its recipients are let go as it drops (see `Drop for Job`).
    drop(job);
    report
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{Frames, Op, PARALLEL_FROM, for_each};
    use crate::runtime::testing::join;
    use crate::{Message, WebSocketServer};

    /// A recipient torn down while a broadcast or publish ran may be held
    /// by its job alone at the end: the user's `Drop` for its data then
    /// runs on a worker, guarded and reported, not on the thread that
    /// broadcast (whose call it would unwind out of).
    #[test]
    fn a_recipient_held_last_by_the_job_is_let_go_on_a_worker() {
        let (server, reported) = crate::runtime::testing::bomb_server();
        let shared = Arc::clone(server.shared());
        let conn = crate::runtime::testing::gone_bomb(&server);
        let frames = Frames::new(
            &shared,
            &Message::Binary(vec![1; 8]),
            std::slice::from_ref(&conn),
        );
        let report = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for_each(&shared, vec![conn], Op::Send(frames))
        }));
        let report = report.expect("the drop panicked in the broadcast");
        assert_eq!(report.closed, 1);
        crate::runtime::testing::expect_drop_reported(&reported);
    }

    /// Whoever drops a broadcast's job last (the caller, or a helper
    /// still finishing its chunk), a recipient the job holds alone is let
    /// go on a worker, guarded and reported: the drop does not run the
    /// user's `Drop` where it stands.
    #[test]
    fn a_job_dropped_holding_a_gone_recipient_lets_go_of_it_on_a_worker() {
        let (server, reported) = crate::runtime::testing::bomb_server();
        let shared = Arc::clone(server.shared());
        let conn = crate::runtime::testing::gone_bomb(&server);
        let job = super::Job {
            conns: vec![conn],
            shared: Arc::clone(&shared),
            op: Op::Flush,
            next: std::sync::atomic::AtomicUsize::new(0),
            done: parking_lot::Mutex::new((0, super::Broadcast::default())),
            finished: parking_lot::Condvar::new(),
        };
        let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(job)));
        assert!(
            dropped.is_ok(),
            "the user's Drop ran where the job was dropped"
        );
        crate::runtime::testing::expect_drop_reported(&reported);
    }

    /// With every worker busy, big broadcasts queue no helpers, and leave
    /// nothing holding their recipients once they return. Before, each
    /// queued a helper that held the whole job (here 1,024 references to
    /// the one client each) until a worker was free.
    #[test]
    fn big_broadcasts_on_a_busy_pool_leave_nothing_holding_their_recipients() {
        let server = WebSocketServer::builder()
            .workers(2)
            .start("127.0.0.1:0")
            .unwrap();
        let shared = Arc::clone(server.shared());
        let (_s, _client) = join(&server);
        let conn = shared.registry.snapshot().pop().unwrap();
        // Both workers held until the end.
        let release = crate::runtime::testing::hold_pool(&shared);
        let before = Arc::strong_count(&conn);
        for round in 0..50 {
            let conns = vec![Arc::clone(&conn); PARALLEL_FROM];
            let frames = Frames::new(&shared, &Message::Binary(vec![1; 8]), &conns);
            let report = for_each(&shared, conns, Op::Send(frames));
            assert_eq!(
                report.written + report.queued + report.dropped + report.closed,
                PARALLEL_FROM,
                "round {round}"
            );
            assert_eq!(
                Arc::strong_count(&conn),
                before,
                "round {round}: references to the client left behind"
            );
        }
        assert_eq!(shared.pool.queued_count(), 0, "helpers queued");
        drop(release);
    }
}
