//! Pool jobs: the handshake, and the service job that reads, flushes,
//! keeps time and tears down. One job at a time owns a connection.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use polling::Event as Interest;

use crate::client::{Client, ClientId, Origin};
use crate::error::DecodeError;
use crate::error::Error;
use crate::message::{CloseCode, CloseFrame};
use crate::proto::conn::{Output, State};
use crate::proto::frame::OpCode;
use crate::proto::handshake::{
    Reject, Request, Response, accept_response, check_upgrade, parse_http,
};
use crate::runtime::conn::{Conn, Extensions, ReadSide};
use crate::runtime::registry::Pending;
use crate::runtime::timer::Timers;
use crate::runtime::{Shared, panic_close};
use crate::stats::Counters;

/// Per-worker read buffer: connections own no read buffer while idle.
const SCRATCH: usize = 256 * 1024;
/// Most bytes one job reads from one connection before letting others
/// have the worker (the poller brings it back at once if more is there).
const READ_BUDGET: usize = 1 << 20;

thread_local! {
    static SCRATCH_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn with_scratch<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
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

/// The pool job behind deferred sends: write what user threads queued,
/// for every connection waiting, then hand each back (or run its service
/// job if something else came up meanwhile).
pub(crate) fn flush_deferred<T: Send + Sync + 'static>(shared: &Arc<Shared<T>>) {
    let batch = std::mem::take(&mut *shared.flushq.lock());
    for conn in &batch {
        let mut w = conn.io.lock();
        if !w.queue.is_empty() && !w.writing && w.write_error.is_none() && !w.finished {
            w.writing = true;
            conn.flush_holding_token(shared, w);
            w = conn.io.lock();
        }
        if w.finished {
            continue;
        }
        if w.job_again {
            // A readiness event, a timer or a failed write came while the
            // flush held the connection: the full job takes over.
            w.job_again = false;
            drop(w);
            service(shared, conn, &[], false);
            continue;
        }
        w.job_running = false;
        if !w.queue.is_empty() && !w.writing && w.write_error.is_none() {
            // The socket is full: writable interest finishes the rest.
            let readable = !w.read_paused;
            conn.arm(shared, &mut w, readable, true);
        }
    }
}

/// The pool's thread name.
pub(crate) const WORKER_NAME: &str = "enjent-worker";

/// Read without blocking: `Ok(None)` means nothing there right now.
fn read_some(mut stream: &std::net::TcpStream, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        match stream.read(buf) {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

/// Give up on a handshake: optionally answer, then close.
pub(crate) fn abort_handshake<T>(shared: &Shared<T>, p: Pending, answer: Option<&Reject>) {
    // Midway through a plain HTTP answer, nothing else can be said.
    let answer = answer.filter(|_| p.out.is_empty());
    if let Some(reject) = answer {
        // Counted first, so that whoever reads the answer sees the count.
        shared.counters.refused(reject.status());
        // Best effort: the socket is non-blocking and the answer small.
        let _ = (&p.stream).write(&reject.to_response());
        let _ = p.stream.shutdown(Shutdown::Write);
    }
    let _ = shared.poller.delete(&p.stream);
    shared.registry.remove(p.key, None, p.peer.ip());
}

/// The handshake job: read what is there, parse, and accept, refuse or
/// wait for more. A bug that panics here costs only this connection: its
/// socket closes as the unwinding drops it, and its slot is freed.
pub(crate) fn handshake<T: Send + Sync + 'static>(shared: &Arc<Shared<T>>, p: Box<Pending>) {
    let (key, ip) = (p.key, p.peer.ip());
    if catch_unwind(AssertUnwindSafe(|| handshake_inner(shared, p))).is_err() {
        Counters::add(&shared.counters.panics, 1);
        eprintln!("enjent: internal error during a handshake from {ip}; connection dropped");
        shared.registry.remove(key, None, ip);
    }
}

fn handshake_inner<T: Send + Sync + 'static>(shared: &Arc<Shared<T>>, mut p: Box<Pending>) {
    if shared.stopping.load(Ordering::Acquire) {
        return abort_handshake(
            shared,
            *p,
            Some(&Reject::new(503).body("server shutting down")),
        );
    }
    if !p.out.is_empty() {
        return continue_http(shared, p);
    }
    let max = shared.config.max_handshake_bytes;
    let read = with_scratch(|buf| -> io::Result<bool> {
        loop {
            match read_some(&p.stream, buf)? {
                Some(0) => return Ok(false),
                Some(n) => {
                    p.buf.extend_from_slice(&buf[..n]);
                    if p.buf.len() > max || n < buf.len() {
                        return Ok(true);
                    }
                }
                None => return Ok(true),
            }
        }
    });
    match read {
        Ok(true) => {}
        // The client left or the socket broke before the request was in.
        Ok(false) | Err(_) => return abort_handshake(shared, *p, None),
    }
    let (mut request, used) = match parse_http(&p.buf, max) {
        Ok(Some(done)) => done,
        Ok(None) => {
            park_handshake(shared, p, Interest::readable(0));
            return;
        }
        Err(reject) => return abort_handshake(shared, *p, Some(&reject)),
    };
    request.set_peer_addr(p.peer);
    if !request.is_upgrade()
        && let Some(http) = &shared.handlers.http
    {
        let answer = catch_unwind(AssertUnwindSafe(|| http(&request))).unwrap_or_else(|_| {
            Counters::add(&shared.counters.panics, 1);
            eprintln!(
                "enjent: HTTP handler panicked for {}; answering 500",
                p.peer
            );
            Reject::new(500).body("internal error")
        });
        let head_only = request.method() == "HEAD";
        Counters::add(&shared.counters.http_answered, 1);
        p.out = answer.to_response_for(head_only);
        p.buf = Vec::new();
        return continue_http(shared, p);
    }
    if let Err(reject) = check_upgrade(&mut request) {
        return abort_handshake(shared, *p, Some(&reject));
    }
    if let Some(allowed) = &shared.config.allowed_origins
        && let Some(origin) = request.origin()
        && !allowed.iter().any(|a| a.eq_ignore_ascii_case(origin))
    {
        return abort_handshake(shared, *p, Some(&Reject::forbidden("origin not allowed")));
    }
    let mut answer = Response::for_request(&request);
    let data = match catch_unwind(AssertUnwindSafe(|| (shared.init)(&request, &mut answer))) {
        Ok(Ok(data)) => data,
        Ok(Err(reject)) => return abort_handshake(shared, *p, Some(&reject)),
        Err(_) => {
            Counters::add(&shared.counters.panics, 1);
            eprintln!(
                "enjent: client-init strategy panicked for {}; answering 500",
                p.peer
            );
            return abort_handshake(shared, *p, Some(&Reject::new(500).body("internal error")));
        }
    };
    answer.prefer(&shared.config.protocols);
    let forwarded = if shared.config.trust_proxy {
        forwarded_ip(&request, &shared.config.forwarded_header)
    } else {
        None
    };
    let (mut headers, protocol) = answer.into_parts();
    if let Some(p) = &protocol {
        headers.push(("Sec-WebSocket-Protocol".into(), p.clone()));
    }
    let extensions = negotiate_extensions(shared, &request, &mut headers);
    let response = accept_response(request.key(), &headers);
    drop(request);

    let id = ClientId::new(shared.next_id.fetch_add(1, Ordering::Relaxed));
    let Pending {
        key,
        stream,
        peer,
        buf,
        registered,
        ..
    } = *p;
    let now = shared.now_ms();
    let conn = Arc::new_cyclic(|weak| {
        let origin = Origin {
            peer,
            forwarded,
            protocol: protocol.map(String::into_boxed_str),
        };
        let client = Client::new(id, origin, data, weak.clone(), Arc::downgrade(shared));
        Conn::new(
            key,
            stream,
            client,
            shared.limits,
            now,
            extensions,
            registered,
        )
    });
    // Reachable first, then the 101: frames sent in between queue behind
    // it (the new connection starts with the write token held).
    shared.registry.open(key, id, Arc::clone(&conn));
    Counters::add(&shared.counters.accepted, 1);
    conn.send_upgrade(shared, response);
    // As for parking: shutdown's close-everyone pass either saw this
    // connection or we see the flag.
    if shared.stopping.load(Ordering::Acquire) {
        let _ = conn.close(shared, CloseCode::GOING_AWAY, "server shutdown");
    }
    if !shared.emit_connect(&conn.client) {
        let (code, reason) = panic_close();
        // Reported as 1011 unless the peer's answer says otherwise.
        if let Some(r) = conn.read.lock().as_mut() {
            r.report = Some(CloseFrame::new(code, reason));
        }
        let _ = conn.close(shared, code, reason);
    }
    // Bytes after the request are the first frames.
    let leftover = &buf[used..];
    service(shared, &conn, leftover, true);
}

/// Accept permessage-deflate if offered and enabled, adding the answer to
/// the `101` headers.
#[cfg(feature = "deflate")]
fn negotiate_extensions<T>(
    shared: &Shared<T>,
    request: &Request,
    headers: &mut Vec<(String, String)>,
) -> Extensions {
    let config = shared.config.compression?;
    let offers: Vec<&str> = request
        .headers()
        .filter(|(n, _)| n.eq_ignore_ascii_case("Sec-WebSocket-Extensions"))
        .filter_map(|(_, v)| std::str::from_utf8(v).ok())
        .collect();
    let (agreed, answer) = crate::proto::deflate::negotiate(&offers.join(","), &config)?;
    headers.push(("Sec-WebSocket-Extensions".into(), answer));
    Some((agreed, config))
}

/// Without the `deflate` feature no extension is ever agreed.
#[cfg(not(feature = "deflate"))]
fn negotiate_extensions<T>(
    _: &Shared<T>,
    _: &Request,
    _: &mut Vec<(String, String)>,
) -> Extensions {
    Extensions
}

/// The client address the trusted proxy reported in `header`. For
/// `X-Forwarded-For`, the last entry over all its lines: the one the
/// nearest proxy appended (earlier ones come from the client and prove
/// nothing). For any other header, its one value.
fn forwarded_ip(request: &Request, header: &str) -> Option<IpAddr> {
    let mut values = request
        .headers()
        .filter(|(n, _)| n.eq_ignore_ascii_case(header))
        .filter_map(|(_, v)| std::str::from_utf8(v).ok());
    let entry = if header.eq_ignore_ascii_case("X-Forwarded-For") {
        values.flat_map(|v| v.split(',')).last()?
    } else {
        values.next()?
    };
    parse_ip(entry.trim().trim_matches('"'))
}

/// An address as proxies write it: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`,
/// `[2001:db8::1]` or `[2001:db8::1]:5678`.
fn parse_ip(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Ok(addr) = s.parse::<std::net::SocketAddr>() {
        return Some(addr.ip());
    }
    s.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

/// Wait for the socket (readable for more of the request, writable for
/// more of an HTTP answer), within the handshake deadline.
fn park_handshake<T>(shared: &Arc<Shared<T>>, mut p: Box<Pending>, want: Interest) {
    let (key, deadline, booked) = (p.key, p.deadline, p.timer_booked);
    let registered = std::mem::replace(&mut p.registered, true);
    p.timer_booked = true;
    let armed = shared.registry.park(p, |p| {
        let interest = Interest::new(p.key, want.readable, want.writable);
        if registered {
            shared.poller.modify(&p.stream, interest)
        } else {
            crate::runtime::poller::register(&shared.poller, &p.stream, interest)
        }
    });
    if matches!(armed, Some(Err(_)))
        && let Some(p) = shared.registry.take_expired_handshake(key, far_future())
    {
        // Out of kernel memory for the poller: this client cannot wait.
        return abort_handshake(
            shared,
            *p,
            Some(&Reject::new(503).body("server cannot take more connections")),
        );
    }
    if !booked {
        book_handshake_deadline(shared, key, deadline);
    }
    // Shutdown sets `stopping` before it sweeps parked handshakes, and
    // both take the slab lock: either its sweep saw this one, or we see
    // the flag and take it back.
    if shared.stopping.load(Ordering::Acquire)
        && let Some(p) = shared.registry.take_expired_handshake(key, far_future())
    {
        abort_handshake(
            shared,
            *p,
            Some(&Reject::new(503).body("server shutting down")),
        );
    }
}

/// Write what is left of a plain HTTP answer without blocking: a slow
/// reader waits parked (writable interest), never on a worker, and the
/// handshake deadline cuts it off. Once all is out, close.
fn continue_http<T>(shared: &Arc<Shared<T>>, mut p: Box<Pending>) {
    while p.sent < p.out.len() {
        match (&p.stream).write(&p.out[p.sent..]) {
            Ok(0) => break,
            Ok(n) => p.sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return park_handshake(shared, p, Interest::writable(0));
            }
            Err(_) => break,
        }
    }
    let _ = p.stream.shutdown(Shutdown::Write);
    // Read what the client sent meanwhile (a request body, a pipelined
    // request): closing with unread bytes would send a reset, which can
    // destroy the answer before the client reads it.
    with_scratch(|buf| {
        for _ in 0..16 {
            if !matches!(read_some(&p.stream, buf), Ok(Some(n)) if n > 0) {
                break;
            }
        }
    });
    let _ = shared.poller.delete(&p.stream);
    shared.registry.remove(p.key, None, p.peer.ip());
}

/// An instant after every deadline, to take a handshake out regardless.
pub(crate) fn far_future() -> std::time::Instant {
    std::time::Instant::now() + std::time::Duration::from_secs(86_400 * 365)
}

pub(crate) fn book_handshake_deadline<T>(
    shared: &Shared<T>,
    key: usize,
    deadline: std::time::Instant,
) {
    let at = deadline
        .saturating_duration_since(shared.started)
        .as_millis() as u64;
    if shared.timers.add(Timers::round(at), key) {
        let _ = shared.poller.notify();
    }
}

/// The service job: flush, read and process, keep time, then re-arm or
/// tear down. `first` holds bytes that arrived with the handshake.
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
    if catch_unwind(AssertUnwindSafe(|| {
        service_inner(shared, conn, first, fresh)
    }))
    .is_err()
    {
        Counters::add(&shared.counters.panics, 1);
        eprintln!(
            "enjent: internal error while serving client {}; closing it",
            conn.client.id()
        );
        panic_teardown(shared, conn);
    }
}

/// Tear down after a panic in the service job, which took the read side
/// with it.
fn panic_teardown<T: Send + Sync + 'static>(shared: &Arc<Shared<T>>, conn: &Arc<Conn<T>>) {
    let unsent = {
        let mut w = conn.io.lock();
        if w.finished {
            return;
        }
        w.finished = true;
        w.job_running = false;
        let unsent = w.queued;
        w.queue = Default::default();
        w.queued = 0;
        unsent
    };
    shared.counters.queued(-(unsent as i64));
    Counters::add(&shared.counters.disconnected, 1);
    let _ = shared.poller.delete(&conn.stream);
    let _ = conn.stream.shutdown(Shutdown::Both);
    shared.registry.remove(
        conn.key,
        Some(conn.client.id()),
        conn.client.peer_addr().ip(),
    );
    shared.emit_disconnect(
        &conn.client,
        CloseFrame::new(CloseCode::INTERNAL_ERROR, "internal error"),
        Some(Error::Io(io::Error::other(
            "internal error while serving the connection",
        ))),
    );
}

fn service_inner<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    conn: &Arc<Conn<T>>,
    first: &[u8],
    fresh: bool,
) {
    let mut first = first;
    // `fresh`: nothing is known to be readable (the socket was just read
    // dry by the handshake, or a timer started this job). Re-arming
    // reports anything newer, so the first pass skips a read that would
    // only return EAGAIN.
    let mut read_now = !fresh;
    loop {
        conn.flush_from_job(shared);
        // Take the read side out: no guard is held while user closures
        // run. Only this job touches it; the lock is never contended.
        let Some(mut r) = conn.read.lock().take() else {
            return;
        };
        let drain = std::mem::take(&mut conn.io.lock().drain_due);
        if drain && !conn.closing.load(Ordering::Acquire) && r.proto.state() == State::Open {
            shared.emit_drain(&conn.client);
        }
        if !first.is_empty() {
            r.last_seen_ms = shared.now_ms();
            process(shared, conn, &mut r, first);
            first = &[];
        }
        if read_now {
            read_available(shared, conn, &mut r);
        }
        read_now = true;
        let now = shared.now_ms();
        let mut close_deadline = 0;
        if let Some(done) = progress(shared, conn, &mut r, now, &mut close_deadline) {
            teardown(shared, conn, &mut r, done);
            return;
        }
        book_timer(shared, conn, &r, now, close_deadline);
        *conn.read.lock() = Some(r);

        let mut w = conn.io.lock();
        // Frames corked while the job ran leave now, in one write. What
        // is queued after this flush arms writable interest below.
        if !w.queue.is_empty() && !w.writing && w.write_error.is_none() && !w.finished {
            w.writing = true;
            conn.flush_holding_token(shared, w);
            w = conn.io.lock();
        }
        if w.job_again {
            w.job_again = false;
            continue;
        }
        let writable = !w.queue.is_empty() && !w.writing && w.write_error.is_none();
        // Over the backpressure limit, stop listening for input until the
        // queue drains (the flush that drains it turns reading back on).
        let readable = w.queued <= shared.config.max_backpressure;
        if !conn.arm(shared, &mut w, readable, writable) {
            // Out of kernel memory for the poller: this connection could
            // never be woken again. Tear it down now.
            w.force_close = true;
            continue;
        }
        w.read_paused = !readable;
        w.job_running = false;
        return;
    }
}

fn read_available<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    conn: &Arc<Conn<T>>,
    r: &mut ReadSide,
) {
    if r.eof || r.error.as_ref().is_some_and(|e| matches!(e, Error::Io(_))) {
        return;
    }
    // A client whose queue is over the limit is not read from until it
    // drains what we sent: what it sends may need answers (pongs, echoes)
    // that would only grow its queue. Its readable interest is off too
    // (see `service`), so this does not spin.
    if conn.queued() > shared.config.max_backpressure {
        return;
    }
    with_scratch(|buf| {
        let mut budget = READ_BUDGET;
        loop {
            match read_some(&conn.stream, buf) {
                Ok(Some(0)) => {
                    r.eof = true;
                    return;
                }
                Ok(Some(n)) => {
                    r.last_seen_ms = shared.now_ms();
                    let delivered = process(shared, conn, r, &buf[..n]);
                    account_buffered(shared, conn, r);
                    // Inflated messages count at their delivered size, so
                    // a few compressed bytes cannot buy unbounded work.
                    budget = budget.saturating_sub(n.max(delivered));
                    // A short read means the socket is drained (readiness is
                    // level-triggered, so anything newer re-fires).
                    if n < buf.len() || budget == 0 {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    if r.error.is_none() {
                        r.error = Some(Error::Io(e));
                    }
                    r.eof = true;
                    return;
                }
            }
        }
    });
}

/// Keep the server-wide count of bytes held for unfinished messages, and
/// fail the connection whose growth passes `max_buffered_bytes`.
fn account_buffered<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    conn: &Arc<Conn<T>>,
    r: &mut ReadSide,
) {
    let now = r.proto.buffered();
    if now <= r.buffered {
        shared
            .buffered_in
            .fetch_sub(r.buffered - now, Ordering::Relaxed);
        r.buffered = now;
        return;
    }
    let grew = now - r.buffered;
    let total = shared.buffered_in.fetch_add(grew, Ordering::Relaxed) + grew;
    r.buffered = now;
    let limit = shared.config.max_buffered_bytes;
    if total > limit {
        let error = DecodeError::TooLarge {
            size: total as u64,
            limit: limit as u64,
        };
        if let Some(out) = r.proto.fail(error) {
            handle(shared, conn, r, out);
        }
        // The failed decoder let go of its buffers.
        account_buffered(shared, conn, r);
    }
}

/// Feed bytes to the protocol and act on what comes out.
fn process<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    conn: &Arc<Conn<T>>,
    r: &mut ReadSide,
    bytes: &[u8],
) -> usize {
    if conn.closing.load(Ordering::Acquire) {
        r.proto.close_sent();
    }
    let mut input = bytes;
    let mut delivered = 0;
    while let Some(out) = r.proto.read(&mut input) {
        if let Output::Message(m) = &out {
            delivered += m.len();
        }
        handle(shared, conn, r, out);
    }
    delivered
}

/// Act on one protocol output.
fn handle<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    conn: &Arc<Conn<T>>,
    r: &mut ReadSide,
    out: Output,
) {
    match out {
        Output::Message(m) => {
            Counters::add(&shared.counters.messages_in, 1);
            Counters::add(&shared.counters.bytes_in, m.len() as u64);
            if !shared.emit_message(&conn.client, m) {
                let (code, reason) = panic_close();
                r.report = Some(CloseFrame::new(code, reason));
                let _ = conn.close(shared, code, reason);
                r.proto.close_sent();
            }
        }
        Output::SendPong(payload) => {
            // A peer that pings without reading would grow its queue
            // without bound; over the limit, pongs are skipped (RFC
            // 6455 section 5.5.3 lets an endpoint answer only the most
            // recent ping).
            if conn.queued() <= shared.config.max_backpressure {
                let _ = conn.send_control(shared, OpCode::Pong, &payload);
            }
        }
        Output::Pong => {}
        Output::PeerClosed { frame, reply } => {
            // RFC 6455 section 7.1.5: the connection's close code is the
            // one in the peer's close frame, whoever closed first.
            r.report = Some(frame.unwrap_or_else(|| CloseFrame::new(CloseCode::NO_STATUS, "")));
            if let Some(reply) = reply {
                // Fails only if our own close went out first; then the
                // peer's close completes the handshake anyway.
                let _ = conn.send_close(shared, reply);
            }
        }
        Output::Fail { error, reply } => {
            shared.counters.protocol_error(reply.code.as_u16());
            r.error = Some(error.into());
            r.report = Some(reply.clone());
            let _ = conn.send_close(shared, reply);
        }
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
    let (flushed, close_deadline, write_error, force) = {
        let w = conn.io.lock();
        (
            w.queue.is_empty() && !w.writing && w.close_sent.is_some(),
            w.close_deadline_ms,
            w.write_error,
            w.force_close,
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
    if r.eof {
        return Some(None);
    }
    if flushed {
        r.proto.reply_flushed();
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
    if r.proto.state() == State::Open {
        if let Some(idle) = shared.config.idle_timeout
            && now >= r.last_seen_ms + idle.as_millis() as u64
        {
            Counters::add(&shared.counters.idle_timeouts, 1);
            r.report = Some(CloseFrame::new(CloseCode::GOING_AWAY, "idle timeout"));
            r.error = Some(Error::Io(io::ErrorKind::TimedOut.into()));
            let _ = conn.send_close(
                shared,
                CloseFrame::new(CloseCode::GOING_AWAY, "idle timeout"),
            );
            r.proto.close_sent();
            // That close set a deadline after the one read above.
            *close_deadline_out = conn.io.lock().close_deadline_ms;
            return None;
        }
        if let Some(every) = shared.config.ping_interval
            && now >= r.last_seen_ms + every.as_millis() as u64
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
    if r.proto.state() == State::Open {
        let mut keepalive = u64::MAX;
        if let Some(idle) = shared.config.idle_timeout {
            keepalive = keepalive.min(r.last_seen_ms + idle.as_millis() as u64);
        }
        if let Some(every) = shared.config.ping_interval
            && r.ping_sent_ms <= r.last_seen_ms
        {
            keepalive = keepalive.min(r.last_seen_ms + every.as_millis() as u64);
        }
        if keepalive != u64::MAX {
            let tick =
                Timers::keepalive_tick(shared.config.ping_interval, shared.config.idle_timeout);
            next = next.min(Timers::round_to(keepalive.max(now + 1), tick));
        }
    }
    if next == u64::MAX {
        return;
    }
    let booked = conn.timer_at.load(Ordering::Acquire);
    if booked != 0 && booked <= next {
        return;
    }
    conn.timer_at.store(next, Ordering::Release);
    if shared.timers.add(next, conn.key) {
        let _ = shared.poller.notify();
    }
}

/// The connection is over: leave the registry and the poller, close the
/// socket, and tell the user, last of all its events.
fn teardown<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    conn: &Arc<Conn<T>>,
    r: &mut ReadSide,
    io_error: Option<Error>,
) {
    let (unsent, for_backpressure, write_error) = {
        let mut w = conn.io.lock();
        w.finished = true;
        w.job_running = false;
        let unsent = w.queued;
        w.queue = Default::default();
        w.queued = 0;
        (unsent, w.closed_for_backpressure, w.write_error)
    };
    shared.counters.queued(-(unsent as i64));
    shared.buffered_in.fetch_sub(r.buffered, Ordering::Relaxed);
    r.buffered = 0;
    Counters::add(&shared.counters.disconnected, 1);
    let _ = shared.poller.delete(&conn.stream);
    // The fd may outlive this job (a broadcast in progress holds the
    // connection), so the peer is told now. After a reset there is no
    // connection left to tell: skip the system call.
    let reset = |k: io::ErrorKind| k == io::ErrorKind::ConnectionReset;
    let was_reset = write_error.is_some_and(reset)
        || [r.error.as_ref(), io_error.as_ref()]
            .into_iter()
            .flatten()
            .any(|e| matches!(e, Error::Io(e) if reset(e.kind())));
    if !was_reset {
        let _ = conn.stream.shutdown(Shutdown::Both);
    }
    shared.registry.remove(
        conn.key,
        Some(conn.client.id()),
        conn.client.peer_addr().ip(),
    );

    let close = r.report.take().unwrap_or_else(|| {
        if for_backpressure {
            CloseFrame::new(CloseCode::POLICY, "send queue over limit")
        } else {
            CloseFrame::new(CloseCode::ABNORMAL, "connection dropped")
        }
    });
    let mut error = r.error.take().or(io_error);
    if error.is_none() && close.code == CloseCode::ABNORMAL {
        error = Some(Error::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    if unsent > 0 && error.is_none() {
        error = Some(Error::Io(io::Error::new(
            io::ErrorKind::BrokenPipe,
            format!("{unsent} queued bytes were not delivered"),
        )));
    }
    shared.emit_disconnect(&conn.client, close, error);
}
