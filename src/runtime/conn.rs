//! One open connection, and the write path every thread uses.
//!
//! Writes happen on the caller's thread. Whoever finds the queue empty
//! takes the write token, writes without holding the lock, and keeps
//! flushing what others queued meanwhile until the queue is empty or the
//! kernel pushes back; then writable interest is armed and a pool job
//! finishes the rest. The token keeps frames whole and in order without
//! holding a guard across a socket write.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use polling::Event as Interest;

use crate::client::{Client, SendStatus};
use crate::config::SlowClientPolicy;
use crate::error::{Error, Result};
use crate::message::{CloseCode, CloseFrame, Message};
use crate::proto::assemble::Limits;
use crate::proto::conn::Connection;
use crate::proto::frame::{OpCode, close_payload, encode_header, encode_header_rsv};

/// RSV1 as `encode_header_rsv` takes it: the permessage-deflate bit.
#[cfg(feature = "deflate")]
pub(crate) const RSV1: u8 = 0b100;
use crate::runtime::Shared;
use crate::stats::Counters;

/// A user thread whose previous send was this recent is sending a
/// stream of messages (a busy main loop): its sends go to the pool, which
/// writes them in batches. A lone send is written at once by the caller,
/// which is quicker than a hand-off.
const BURST_GAP: std::time::Duration = std::time::Duration::from_micros(20);

thread_local! {
    static LAST_SEND: std::cell::Cell<Option<std::time::Instant>> =
        const { std::cell::Cell::new(None) };
}

/// Whether this thread's previous send was within `BURST_GAP`.
fn sending_in_a_burst() -> bool {
    let now = std::time::Instant::now();
    LAST_SEND.with(|last| {
        let burst = last.get().is_some_and(|t| now - t < BURST_GAP);
        last.set(Some(now));
        burst
    })
}

/// Most bytes corked while a job owns a connection; a send that would
/// pass it writes everything at once.
const CORK: usize = 64 * 1024;

/// Bytes waiting to be written.
pub(crate) enum Chunk {
    /// A frame header, inline.
    Head([u8; 10], u8),
    /// Bytes owned by this connection (a payload, a control frame).
    Owned(Vec<u8>),
    /// A whole encoded frame shared with other connections (broadcast).
    Shared(Arc<[u8]>),
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Head(b, n) => &b[..usize::from(*n)],
            Chunk::Owned(v) => v,
            Chunk::Shared(a) => a,
        }
    }
}

/// What kind of frame a write carries.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Data,
    Control,
    Close,
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
    /// Bytes of partial incoming messages last counted in the server-wide
    /// total.
    pub(crate) buffered: usize,
}

/// The write side and the job schedule, behind one lock.
pub(crate) struct WriteSide {
    pub(crate) queue: VecDeque<Chunk>,
    /// Bytes of `queue.front()` already written.
    pub(crate) head: usize,
    /// Bytes waiting in `queue`.
    pub(crate) queued: usize,
    /// A thread holds the write token.
    pub(crate) writing: bool,
    /// A pool job owns the connection right now.
    pub(crate) job_running: bool,
    /// Something happened while the job ran: it must go round again.
    pub(crate) job_again: bool,
    /// The close frame we queued; no data frames may follow it.
    pub(crate) close_sent: Option<CloseFrame>,
    /// Server clock (ms) by which the close handshake must be over.
    pub(crate) close_deadline_ms: u64,
    pub(crate) write_error: Option<io::ErrorKind>,
    /// The job left readable interest off (queue over the limit).
    pub(crate) read_paused: bool,
    /// The socket is in the poller. A connection whose request was in at
    /// accept time is first registered when its first job ends.
    pub(crate) registered: bool,
    /// The oneshot interest armed in the poller, until an event reports
    /// (and so disarms) it. A job that would arm the same again (one a
    /// timer started, which consumed no event) spares the system call.
    pub(crate) armed: Option<(bool, bool)>,
    /// A send was refused for backpressure: tell the user (`Drain`) once
    /// the queue is empty again.
    pub(crate) drain_wanted: bool,
    /// A ping went out (keepalive, or `Client::ping`) and no event has been
    /// reported since: the next one is most likely its pong, which nobody
    /// waits for (pongs are not reported to the user).
    pub(crate) pong_due: bool,
    /// The queue emptied after a refusal; the job emits `Drain`.
    pub(crate) drain_due: bool,
    /// The `Close` slow-client policy closed this connection.
    pub(crate) closed_for_backpressure: bool,
    /// Shutdown ran out of patience: tear down now.
    pub(crate) force_close: bool,
    pub(crate) finished: bool,
}

pub(crate) struct Conn<T> {
    pub(crate) key: usize,
    pub(crate) stream: TcpStream,
    pub(crate) client: Client<T>,
    /// The job takes the read side out for as long as it runs, so that no
    /// guard is held across user closures; `None` only meanwhile.
    pub(crate) read: Mutex<Option<ReadSide>>,
    pub(crate) io: Mutex<WriteSide>,
    /// Set once our close frame is queued (read lock-free by the job).
    pub(crate) closing: AtomicBool,
    /// Server clock (ms) of the timer entry booked for this connection;
    /// 0 when none.
    pub(crate) timer_at: AtomicU64,
    /// permessage-deflate's sending side, when negotiated.
    #[cfg(feature = "deflate")]
    pub(crate) deflater: Option<crate::proto::deflate::Deflater>,
}

/// What the handshake negotiated beyond the base protocol.
#[cfg(feature = "deflate")]
pub(crate) type Extensions = Option<(
    crate::proto::deflate::Agreed,
    crate::proto::deflate::Compression,
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
        key: usize,
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
        let deflater = extensions.map(|(agreed, config)| {
            proto.set_inflater(crate::proto::deflate::Inflater::new(&agreed));
            crate::proto::deflate::Deflater::new(&agreed, &config)
        });
        #[cfg(not(feature = "deflate"))]
        let Extensions = extensions;
        Conn {
            key,
            stream,
            client,
            #[cfg(feature = "deflate")]
            deflater,
            read: Mutex::new(Some(ReadSide {
                proto,
                last_seen_ms: now_ms,
                ping_sent_ms: 0,
                report: None,
                error: None,
                eof: false,
                write_shut: false,
                buffered: 0,
            })),
            io: Mutex::new(WriteSide {
                queue: VecDeque::new(),
                head: 0,
                queued: 0,
                writing: true,
                job_running: true,
                job_again: false,
                close_sent: None,
                close_deadline_ms: 0,
                write_error: None,
                read_paused: false,
                registered,
                armed: None,
                drain_wanted: false,
                pong_due: false,
                drain_due: false,
                closed_for_backpressure: false,
                force_close: false,
                finished: false,
            }),
            closing: AtomicBool::new(false),
            timer_at: AtomicU64::new(0),
        }
    }

    /// Bytes waiting in the send queue.
    pub(crate) fn queued(&self) -> usize {
        self.io.lock().queued
    }

    pub(crate) fn can_send(&self) -> bool {
        let w = self.io.lock();
        !w.finished && w.close_sent.is_none() && w.write_error.is_none()
    }

    pub(crate) fn send_message(
        self: &Arc<Self>,
        shared: &Arc<Shared<T>>,
        message: Message,
    ) -> Result<SendStatus> {
        #[cfg(feature = "deflate")]
        if let Some(d) = &self.deflater
            && d.wants(message.len())
        {
            let op = message.opcode();
            if d.keeps_context() {
                return d.compress_in_context(message.as_bytes(), |z| {
                    self.send_data(shared, RSV1, op, z)
                });
            }
            if let Some(z) = d.compress_once(message.as_bytes()) {
                return self.send_data(shared, RSV1, op, z);
            }
        }
        let op = message.opcode();
        self.send_data(shared, 0, op, message.into_bytes())
    }

    fn send_data(
        self: &Arc<Self>,
        shared: &Arc<Shared<T>>,
        rsv: u8,
        op: OpCode,
        body: Vec<u8>,
    ) -> Result<SendStatus> {
        let mut head = [0u8; 10];
        let n = encode_header_rsv(&mut head, true, rsv, op, body.len());
        self.write(
            shared,
            Chunk::Head(head, n as u8),
            Some(Chunk::Owned(body)),
            Kind::Data,
            !crate::runtime::worker::on_worker() && sending_in_a_burst(),
        )
    }

    /// Send a frame encoded once for many connections.
    pub(crate) fn send_shared(
        self: &Arc<Self>,
        shared: &Arc<Shared<T>>,
        frame: &Arc<[u8]>,
    ) -> Result<SendStatus> {
        self.write(
            shared,
            Chunk::Shared(Arc::clone(frame)),
            None,
            Kind::Data,
            false,
        )
    }

    /// Send a ping (keepalive, or the user's), noting that a pong is due.
    pub(crate) fn send_ping(self: &Arc<Self>, shared: &Arc<Shared<T>>) -> Result<()> {
        self.io.lock().pong_due = true;
        self.send_control(shared, OpCode::Ping, &[])
    }

    pub(crate) fn send_control(
        self: &Arc<Self>,
        shared: &Arc<Shared<T>>,
        op: OpCode,
        payload: &[u8],
    ) -> Result<()> {
        let mut head = [0u8; 10];
        let n = encode_header(&mut head, true, op, payload.len());
        let body = (!payload.is_empty()).then(|| Chunk::Owned(payload.to_vec()));
        self.write(
            shared,
            Chunk::Head(head, n as u8),
            body,
            Kind::Control,
            false,
        )
        .map(|_| ())
    }

    /// Write the `101` response with the write token that `new` hands
    /// the handshake job. The connection is already reachable (by id, by
    /// broadcast), so frames sent meanwhile wait in the queue behind the
    /// token, and a client that has read its `101` is sure to get every
    /// broadcast after it.
    pub(crate) fn send_upgrade(self: &Arc<Self>, shared: &Arc<Shared<T>>, bytes: Vec<u8>) {
        let result = write_vectored(&self.stream, &[IoSlice::new(&bytes)]);
        if let Ok(n) = result {
            Counters::add(&shared.counters.bytes_out, n as u64);
            shared.counters.queued((bytes.len() - n) as i64);
        }
        let mut w = self.io.lock();
        match result {
            Ok(n) if n == bytes.len() => {}
            Ok(n) => {
                w.queued += bytes.len() - n;
                w.queue.push_front(Chunk::Owned(bytes));
                w.head = n;
            }
            Err(e) => w.write_error = Some(e.kind()),
        }
        self.flush_holding_token(shared, w);
    }

    /// Queue our close frame (user close, shutdown, or answer to the peer).
    pub(crate) fn send_close(
        self: &Arc<Self>,
        shared: &Arc<Shared<T>>,
        frame: CloseFrame,
    ) -> Result<()> {
        {
            let mut w = self.io.lock();
            if w.finished || w.close_sent.is_some() {
                return Err(Error::Closed);
            }
            w.close_sent = Some(frame.clone());
            w.close_deadline_ms = shared.now_ms() + shared.config.close_timeout.as_millis() as u64;
        }
        self.closing.store(true, Ordering::Release);
        let payload = close_payload(frame.code.as_u16(), &frame.reason);
        let mut head = [0u8; 10];
        let n = encode_header(&mut head, true, OpCode::Close, payload.len());
        self.write(
            shared,
            Chunk::Head(head, n as u8),
            Some(Chunk::Owned(payload)),
            Kind::Close,
            false,
        )
        .map(|_| ())
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

    /// Queue or write one frame. `defer` (a data frame sent from a thread
    /// outside the pool) hands the write to the pool when the connection
    /// is idle, so that a user thread sending many messages spends no
    /// syscall on each: workers write them, batched per connection.
    fn write(
        self: &Arc<Self>,
        shared: &Arc<Shared<T>>,
        head: Chunk,
        body: Option<Chunk>,
        kind: Kind,
        defer: bool,
    ) -> Result<SendStatus> {
        let len = head.bytes().len() + body.as_ref().map_or(0, |b| b.bytes().len());
        let mut w = self.io.lock();
        if w.finished || w.write_error.is_some() {
            return Err(Error::Closed);
        }
        // A close frame has set close_sent just before coming here; every
        // other frame stops once it is queued.
        if kind != Kind::Close && w.close_sent.is_some() {
            return Err(Error::Closed);
        }
        // Corking: while a job owns the connection (a handler's own echo,
        // or another thread's send meanwhile), frames wait for the job's
        // end and leave together in one vectored write, up to CORK bytes.
        // Corked bytes count as queued; half the backpressure limit at most
        // keeps pongs and sends from being refused for them.
        let cork = w.job_running && w.queued + len <= CORK.min(shared.config.max_backpressure / 2);
        let waiting_for_writable = !w.queue.is_empty() && !w.job_running;
        // Whatever path it takes, a data frame that would join a queue
        // already over the limit is refused.
        let limit = shared.config.max_backpressure;
        if kind == Kind::Data && !cork && w.queued > 0 && w.queued + len > limit {
            let queued = w.queued;
            w.drain_wanted = true;
            drop(w);
            Counters::add(&shared.counters.dropped, 1);
            self.over_limit(shared);
            return Err(Error::Backpressure { queued, limit });
        }
        if w.writing || cork || waiting_for_writable {
            w.queue.push_back(head);
            if let Some(b) = body {
                w.queue.push_back(b);
            }
            w.queued += len;
            drop(w);
            shared.counters.queued(len as i64);
            if kind == Kind::Data {
                Counters::add(&shared.counters.messages_out, 1);
            }
            return Ok(SendStatus::Queued);
        }
        if defer && !w.job_running && !w.writing && w.queue.is_empty() {
            w.queue.push_back(head);
            if let Some(b) = body {
                w.queue.push_back(b);
            }
            w.queued += len;
            // The flush job owns the connection until it is done; sends
            // meanwhile cork behind this one.
            w.job_running = true;
            drop(w);
            shared.counters.queued(len as i64);
            Counters::add(&shared.counters.messages_out, 1);
            shared.defer_flush(self);
            return Ok(SendStatus::Queued);
        }
        if !w.queue.is_empty() {
            // Corked frames and this one are over CORK: all go now.
            w.queue.push_back(head);
            if let Some(b) = body {
                w.queue.push_back(b);
            }
            w.queued += len;
            w.writing = true;
            shared.counters.queued(len as i64);
            if kind == Kind::Data {
                Counters::add(&shared.counters.messages_out, 1);
            }
            self.flush_holding_token(shared, w);
            let w = self.io.lock();
            return match (w.write_error, w.queue.is_empty()) {
                (Some(_), _) => Err(Error::Closed),
                (None, true) => Ok(SendStatus::Written),
                (None, false) => Ok(SendStatus::Queued),
            };
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
            Counters::add(&shared.counters.bytes_out, n as u64);
            shared.counters.queued((len - n) as i64);
        }
        if kind == Kind::Data && result.is_ok() {
            Counters::add(&shared.counters.messages_out, 1);
        }
        let mut w = self.io.lock();
        let status = match result {
            Ok(n) if n == len => SendStatus::Written,
            Ok(n) => {
                // Put what is left in front of anything queued meanwhile.
                let head_len = head.bytes().len();
                if let Some(b) = body {
                    w.queue.push_front(b);
                }
                let skip = if n < head_len {
                    w.queue.push_front(head);
                    n
                } else {
                    n - head_len
                };
                w.head = skip;
                w.queued += len - n;
                SendStatus::Queued
            }
            Err(e) => {
                w.write_error = Some(e.kind());
                SendStatus::Queued
            }
        };
        self.flush_holding_token(shared, w);
        match status {
            SendStatus::Queued if self.io.lock().write_error.is_some() => Err(Error::Closed),
            s => Ok(s),
        }
    }

    /// Arm oneshot interest, registering the socket first if it is not in
    /// the poller yet. False if the poller refused (out of kernel memory).
    pub(crate) fn arm(
        &self,
        shared: &Shared<T>,
        w: &mut WriteSide,
        readable: bool,
        writable: bool,
    ) -> bool {
        if w.armed == Some((readable, writable)) {
            return true;
        }
        let interest = Interest::new(self.key, readable, writable);
        let done = if w.registered {
            shared.poller.modify(&self.stream, interest)
        } else {
            crate::runtime::poller::register(&shared.poller, &self.stream, interest)
        };
        if done.is_err() {
            return false;
        }
        w.registered = true;
        w.armed = Some((readable, writable));
        true
    }

    /// Flush from a pool job on writable readiness.
    pub(crate) fn flush_from_job(self: &Arc<Self>, shared: &Arc<Shared<T>>) {
        let mut w = self.io.lock();
        if w.writing || w.queue.is_empty() || w.finished {
            return;
        }
        w.writing = true;
        self.flush_holding_token(shared, w);
    }

    /// With the token held: write the queue until it is empty, the kernel
    /// pushes back, or a write fails; then give the token back and make
    /// sure whatever is left will be flushed.
    pub(crate) fn flush_holding_token<'a>(
        self: &'a Arc<Self>,
        shared: &Arc<Shared<T>>,
        mut w: parking_lot::MutexGuard<'a, WriteSide>,
    ) {
        loop {
            if w.queue.is_empty() || w.write_error.is_some() || w.finished {
                break;
            }
            let mut queue = std::mem::take(&mut w.queue);
            let mut head = w.head;
            drop(w);
            let result = write_queue(&self.stream, &mut queue, &mut head);
            w = self.io.lock();
            let newer = std::mem::replace(&mut w.queue, queue);
            w.queue.extend(newer);
            w.head = head;
            match result {
                Ok((written, drained)) => {
                    w.queued -= written.min(w.queued);
                    Counters::add(&shared.counters.bytes_out, written as u64);
                    shared.counters.queued(-(written as i64));
                    if w.queue.is_empty() && w.queue.capacity() > 8 {
                        // Give back the memory of a queue that grew.
                        w.queue = VecDeque::new();
                    }
                    if !drained {
                        // The socket is full; writable interest takes over.
                        break;
                    }
                }
                Err(e) => {
                    w.write_error = Some(e.kind());
                    break;
                }
            }
        }
        w.writing = false;
        let pending_bytes = !w.queue.is_empty() && w.write_error.is_none() && !w.finished;
        if w.drain_wanted && w.queue.is_empty() {
            w.drain_wanted = false;
            w.drain_due = true;
        }
        // The job must run if a write failed, if our close frame just left
        // (the close handshake moves on), or to tell the user of a drain.
        let needs_job = w.write_error.is_some()
            || (w.close_sent.is_some() && w.queue.is_empty())
            || w.drain_due;
        if w.job_running {
            // The job re-arms (and notices errors) when it ends.
            if needs_job {
                w.job_again = true;
            }
            return;
        }
        if needs_job && !w.finished {
            w.job_running = true;
            drop(w);
            spawn_job(shared, self);
            return;
        }
        let resume_reading = w.read_paused && w.queued <= shared.config.max_backpressure;
        if pending_bytes || resume_reading {
            w.read_paused &= !resume_reading;
            let readable = w.queued <= shared.config.max_backpressure;
            self.arm(shared, &mut w, readable, pending_bytes);
        }
    }
}

/// Write `queue` (the first `*head` bytes of its front already written)
/// with vectored writes until it is empty or the kernel takes no more.
/// Returns the bytes written and whether the queue was emptied.
fn write_queue(
    stream: &TcpStream,
    queue: &mut VecDeque<Chunk>,
    head: &mut usize,
) -> io::Result<(usize, bool)> {
    let mut total = 0;
    while !queue.is_empty() {
        let mut slices = [IoSlice::new(&[]); 32];
        let mut n = 0;
        let mut want = 0;
        for (i, chunk) in queue.iter().take(slices.len()).enumerate() {
            let bytes = if i == 0 {
                &chunk.bytes()[*head..]
            } else {
                chunk.bytes()
            };
            slices[i] = IoSlice::new(bytes);
            want += bytes.len();
            n += 1;
        }
        let mut written = write_vectored(stream, &slices[..n])?;
        total += written;
        let short = written < want;
        while written > 0 {
            let Some(front) = queue.front() else { break };
            let left = front.bytes().len() - *head;
            if written >= left {
                written -= left;
                *head = 0;
                queue.pop_front();
            } else {
                *head += written;
                written = 0;
            }
        }
        // Drop empty chunks at the front (a zero-length payload).
        while queue.front().is_some_and(|c| c.bytes().len() == *head) {
            queue.pop_front();
            *head = 0;
        }
        if short {
            return Ok((total, queue.is_empty()));
        }
    }
    Ok((total, true))
}

/// Writes of at most this many bytes are copied into one buffer first.
const SMALL_WRITE: usize = 512;

/// One vectored write, retried on EINTR; `WouldBlock` counts as 0 bytes.
///
/// A single part, or parts of at most `SMALL_WRITE` bytes together
/// gathered into one buffer, go out with `send`: on Linux, `writev` on a
/// socket goes through the file layer (position lock, iovec import),
/// which costs more than copying a ping or a short message.
fn write_vectored(mut stream: &TcpStream, parts: &[IoSlice<'_>]) -> io::Result<usize> {
    let mut buf = [0u8; SMALL_WRITE];
    let mut gathered = 0;
    let parts = if parts.len() > 1 && parts.iter().map(|p| p.len()).sum::<usize>() <= SMALL_WRITE {
        for p in parts {
            buf[gathered..gathered + p.len()].copy_from_slice(p);
            gathered += p.len();
        }
        &[IoSlice::new(&buf[..gathered])][..]
    } else {
        parts
    };
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

/// `claim` for a readiness event the poller harvested, which disarmed the
/// oneshot interest. Also returns whether the event is most likely the
/// pong to a keepalive ping, which nobody waits for.
pub(crate) fn claim_event<T>(conn: &Conn<T>) -> (bool, bool) {
    let mut w = conn.io.lock();
    w.armed = None;
    let pong = std::mem::take(&mut w.pong_due);
    (claim_locked(&mut w), pong)
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

fn spawn_job<T: Send + Sync + 'static>(shared: &Arc<Shared<T>>, conn: &Arc<Conn<T>>) {
    let (s, c) = (Arc::clone(shared), Arc::clone(conn));
    shared
        .pool
        .execute(move || crate::runtime::worker::service(&s, &c, &[], false));
}
