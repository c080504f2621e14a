//! The handshake job: read the upgrade request without blocking, answer
//! plain HTTP, believe a trusted proxy, negotiate extensions, and turn
//! the socket into an open connection whose first service job it runs.

use std::cell::Cell;
use std::io::{self, Write};
use std::net::{IpAddr, Shutdown};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use polling::Event as Interest;

use crate::client::{Client, Origin};
use crate::error::Error;
use crate::message::{CloseCode, CloseFrame};
#[cfg(feature = "deflate")]
use crate::proto::deflate::ContextPermit;
use crate::proto::handshake::{
    Body, Reject, Request, Response, check_upgrade, head_and_body, parse_http, request_line_len,
    write_accept_response,
};
use crate::runtime::conn::{Conn, Extensions, Serving};
use crate::runtime::registry::Pending;
use crate::runtime::service::{read_size, read_some, service, with_scratch};
use crate::runtime::{Shared, panic_close};
use crate::stats::Counters;

thread_local! {
    /// The buffer this thread writes `101` responses into, kept from one
    /// handshake to the next (see [`keep_response`]).
    static SPARE_RESPONSE: Cell<String> = const { Cell::new(String::new()) };
}

/// The largest `101` buffer kept for the next handshake: a strategy's
/// headers can make one of any size, and a worker would hold the largest
/// it ever wrote.
const SPARE_RESPONSE_MAX: usize = 4096;

/// Keep `response`'s buffer for this thread's next `101`, unless it grew
/// past [`SPARE_RESPONSE_MAX`].
fn keep_response(response: String) {
    if response.capacity() <= SPARE_RESPONSE_MAX {
        let _ = SPARE_RESPONSE.try_with(|spare| spare.set(response));
    }
}

/// Answer (if there is an answer) and drop a handshake. A request read
/// so far that is a `HEAD` gets the answer's head alone (RFC 9110 section
/// 9.3.2), as it would from a worker.
pub(crate) fn abort_handshake<T>(shared: &Shared<T>, p: Pending, answer: Option<&Reject>) {
    let head_only = begins_head(&p.buf);
    abort_handshake_for(shared, p, answer, head_only);
}

/// Whether a request read so far (perhaps in part) is a `HEAD`.
pub(crate) fn begins_head(buf: &[u8]) -> bool {
    buf[crate::proto::handshake::leading_empty_lines(buf)..].starts_with(b"HEAD ")
}

/// [`abort_handshake`], for a `HEAD` request (`head_only`: the answer's
/// head without its body) or not.
pub(crate) fn abort_handshake_for<T>(
    shared: &Shared<T>,
    mut p: Pending,
    answer: Option<&Reject>,
    head_only: bool,
) {
    // Midway through a plain HTTP answer, or after one, nothing else can
    // be said.
    let answer = answer.filter(|_| p.out.is_empty() && !p.lingering);
    if let Some(reject) = answer {
        // Counted first, so that whoever reads the answer sees the count.
        shared.counters.refused(reject.status_sent());
        // Best effort: the socket is non-blocking and the answer small.
        let response = reject.to_response_for(head_only);
        if matches!((&p.stream).write(&response), Ok(n) if n == response.len()) {
            // Empty lines skipped and nothing after them: a head not
            // begun, which may still be coming (a `431` for too many).
            p.more |= may_send_more(&p.buf) || (p.buf.is_empty() && p.skipped > 0);
            // At most 4 KiB read here: the readiness loop answers crowds
            // of handshakes this way too (`408`s, `503`s for a queue too
            // long), and must not be held. What more comes is read by a
            // worker.
            return finish_answer(shared, Box::new(p), 4096);
        }
        let _ = p.stream.shutdown(Shutdown::Write);
    }
    drop_pending(shared, &p);
}

/// Take a handshake out: out of the poller and its slot. The socket
/// closes as `p` drops.
fn drop_pending<T>(shared: &Shared<T>, p: &Pending) {
    // A socket never put in the poller has nothing to leave.
    if p.registered {
        let _ = shared.poller.delete(&p.stream);
    }
    shared.registry.remove(p.key, p.peer.ip());
}

/// Whether a client whose request so far is `buf` may send more than it
/// has: its head is not whole, or cannot be read (where it ends is not
/// known), or see [`more_after_head`]. A client that sent nothing is not
/// waited for.
fn may_send_more(buf: &[u8]) -> bool {
    match head_and_body(buf) {
        Some((used, body)) => more_after_head(body, buf.len() - used),
        None => !buf.is_empty(),
    }
}

/// Whether a client whose whole head announced `body`, with `after` bytes
/// come after the head, may send more: a body not all come (or one whose
/// end is not known), or bytes past the request's end (a pipelined
/// request, which more may follow).
fn more_after_head(body: Body, after: usize) -> bool {
    match body {
        Body::None => after != 0,
        Body::Length(n) => after != n,
        Body::Unknown => true,
    }
}

/// How a drain of a lingering socket ended.
enum Drained {
    /// The client closed its side (or the socket broke).
    Closed,
    /// Nothing more now; whether anything came.
    Dry(bool),
    /// The read budget was spent, and more may be there.
    Spent,
}

/// The whole answer is out: shut our side, read what the client still
/// sends, and close once it closes too. Input left unread at close makes
/// the kernel reset the connection, and a reset can destroy the answer
/// before the client reads it (over a real network, or on a client's
/// system that drops what it received at a reset): an upload refused
/// after its head, the rest of a head over `max_handshake_bytes`, a
/// pipelined request. So a client that may send more (`Pending::more`)
/// is given a lingering close, as web servers give one: parked readable,
/// what it sends read and dropped, `budget` bytes a job, until it closes,
/// for at most `handshake_timeout` after the answer. A client that sent a
/// whole, well-formed request (with all of the body it announced) and
/// nothing after it is closed at once. (The accept thread's refusals at
/// capacity do not come here: they have no slot to linger in.)
fn finish_answer<T>(shared: &Shared<T>, mut p: Box<Pending>, budget: usize) {
    if !p.lingering {
        let _ = p.stream.shutdown(Shutdown::Write);
    }
    let drained = with_scratch(|buf| {
        let (mut read, mut got) = (0, false);
        while read < budget {
            let room = buf.len().min(budget - read);
            match read_some(&p.stream, &mut buf[..room]) {
                Ok(Some(0)) | Err(_) => return Drained::Closed,
                Ok(Some(n)) => {
                    read += n;
                    got = true;
                }
                Ok(None) => return Drained::Dry(got),
            }
        }
        Drained::Spent
    });
    let linger = match drained {
        Drained::Closed => false,
        Drained::Dry(got) => p.lingering || p.more || got,
        Drained::Spent => true,
    };
    if !linger || shared.stopping.load(Ordering::Acquire) {
        return drop_pending(shared, &p);
    }
    if !std::mem::replace(&mut p.lingering, true) {
        p.deadline = std::time::Instant::now()
            .checked_add(shared.config.handshake_timeout)
            .unwrap_or_else(far_future);
        // Nothing of the request or the answer is needed again.
        p.buf = Vec::new();
        p.out = Vec::new();
        p.sent = 0;
        p.parsed = 0;
    }
    // Past its deadline, `park_handshake` closes it (nothing is answered
    // to a lingering handshake).
    park_handshake(shared, p, Interest::readable(0));
}

/// The refusal an upgrade request earns by its content alone, before any
/// user code sees it: `405`, `426` or `400` from RFC 6455's rules, `403`
/// for an origin not allowed. The readiness loop, which answers handshakes
/// no worker took in time, refuses the same requests the same way.
pub(crate) fn refuse_by_content<T: Send + Sync + 'static>(
    shared: &Shared<T>,
    request: &mut Request,
) -> Result<(), Reject> {
    check_upgrade(request)?;
    // Every `Origin` line must be allowed, not just the first (a browser
    // sends one; a second one of an attacker's must not hide behind it),
    // and a value that is not UTF-8 is no allowed origin.
    if let Some(allowed) = &shared.config.allowed_origins
        && request.values("Origin").any(|origin| {
            !allowed
                .iter()
                .any(|a| a.as_bytes().eq_ignore_ascii_case(origin))
        })
    {
        return Err(Reject::forbidden("origin not allowed"));
    }
    Ok(())
}

/// The handshake job: read what is there, parse, and accept, refuse or
/// wait for more. A bug that panics here costs only this connection: its
/// socket closes as the unwinding drops it, and its slot is freed.
pub(crate) fn handshake<T: Send + Sync + 'static>(shared: &Arc<Shared<T>>, p: Box<Pending>) {
    let (key, ip) = (p.key, p.peer.ip());
    if catch_unwind(AssertUnwindSafe(|| handshake_inner(shared, p))).is_err() {
        shared.registry.remove(key, ip);
        shared.report(
            None,
            Error::Internal(format!(
                "a handshake from {ip} failed; its connection was dropped"
            )),
        );
    }
}

/// Drop the empty lines (`\r\n` or `\n`) `buf` starts with; returns the
/// bytes dropped. A `\r` at its end may begin one: it is kept until the
/// next byte says.
fn skip_leading_empty_lines(buf: &mut Vec<u8>) -> usize {
    let i = crate::proto::handshake::leading_empty_lines(buf);
    buf.drain(..i);
    i
}

fn handshake_inner<T: Send + Sync + 'static>(shared: &Arc<Shared<T>>, mut p: Box<Pending>) {
    if p.lingering {
        return finish_answer(shared, p, LINGER_READ);
    }
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
    // What the accept thread read held all that had come: a whole request
    // needs no read (which would find nothing); part of one parks below,
    // and the poller says when more comes.
    let read = if std::mem::take(&mut p.read_dry) {
        Ok(true)
    } else {
        with_scratch(|buf| -> io::Result<bool> {
            loop {
                // What follows the request is the connection's first
                // input, and may be kept unparsed: read as connections are.
                let room = read_size(shared, buf.len());
                match read_some(&p.stream, &mut buf[..room])? {
                    Some(0) => return Ok(false),
                    Some(n) => {
                        p.buf.extend_from_slice(&buf[..n]);
                        if p.buf.len() > max || n < room {
                            return Ok(true);
                        }
                    }
                    None => return Ok(true),
                }
            }
        })
    };
    // Empty lines before the request line are skipped (RFC 9112 section
    // 2.2) and not kept: each would end a line, and so cost a parse of
    // all of them before it, a client sending newlines a byte at a time
    // making that grow with the square of their number. They still count
    // against the limit.
    let skipped = skip_leading_empty_lines(&mut p.buf);
    p.parsed = p.parsed.saturating_sub(skipped);
    p.skipped = p.skipped.saturating_add(skipped);
    if p.skipped >= max {
        let reject = Reject::new(431).body("request headers too large");
        return abort_handshake(shared, *p, Some(&reject));
    }
    let whole = max;
    let max = max - p.skipped;
    let ended = match read {
        Ok(true) => false,
        // The client sent something and then shut its side (or reset
        // the connection): a whole request is still taken, as when the
        // end of input is read after it.
        Ok(false) | Err(_) if !p.buf.is_empty() => true,
        // The client left or the socket broke before the request was in.
        Ok(false) | Err(_) => return abort_handshake(shared, *p, None),
    };
    // A request sent in small pieces is parsed again only once a line has
    // ended after what the last parse saw, not on every piece (which made
    // a head trickled a byte at a time cost parsing that grows with the
    // square of its size).
    if !ended && p.parsed > 0 && p.buf.len() < max && !p.buf[p.parsed..].contains(&b'\n') {
        park_handshake(shared, p, Interest::readable(0));
        return;
    }
    let (mut request, used) = match parse_http(&p.buf, max) {
        Ok(Some(done)) => done,
        // Part of a request, and no more can come.
        Ok(None) if ended => return abort_handshake(shared, *p, None),
        Ok(None) => {
            p.parsed = p.buf.len();
            park_handshake(shared, p, Interest::readable(0));
            return;
        }
        // Over what the empty lines before it left: `414` only if its
        // line alone is over the whole limit.
        Err(reject) if reject.status() == 414 && request_line_len(&p.buf) < whole => {
            let reject = Reject::new(431).body("request headers too large");
            return abort_handshake(shared, *p, Some(&reject));
        }
        Err(reject) => return abort_handshake(shared, *p, Some(&reject)),
    };
    request.set_peer_addr(p.peer);
    // Known now, before an answer clears what was read: whether a close
    // must linger for the rest (see `finish_answer`).
    p.more = more_after_head(request.body(), p.buf.len() - used);
    // (The handler first: without one, no header need be searched.)
    if let Some(http) = &shared.handlers.http
        && !request.is_upgrade()
    {
        let answer = catch_unwind(AssertUnwindSafe(|| http(&request))).unwrap_or_else(|panic| {
            shared.report_panic("on_http", None, panic.as_ref());
            Reject::new(500).body("internal error")
        });
        let head_only = request.method() == "HEAD";
        Counters::add(&shared.counters.http_answered, 1);
        p.out = answer.to_response_for(head_only);
        p.buf = Vec::new();
        p.parsed = 0;
        return continue_http(shared, p);
    }
    let head_only = request.method() == "HEAD";
    if let Err(reject) = refuse_by_content(shared, &mut request) {
        return refuse_in_full(shared, p, &reject, head_only);
    }
    let mut answer = Response::for_request(&request);
    let data = match catch_unwind(AssertUnwindSafe(|| (shared.init)(&request, &mut answer))) {
        Ok(Ok(data)) => data,
        Ok(Err(reject)) => return refuse_in_full(shared, p, &reject, head_only),
        Err(panic) => {
            shared.report_panic("client-init strategy", None, panic.as_ref());
            let reject = Reject::new(500).body("internal error");
            return refuse_in_full(shared, p, &reject, head_only);
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
    // Written into this thread's buffer for responses, which the write
    // below gives back (a partial write copies what is left).
    let mut response = SPARE_RESPONSE.try_with(Cell::take).unwrap_or_default();
    response.clear();
    write_accept_response(request.key(), &headers, &mut response);
    drop(request);

    if shared.stopping.load(Ordering::Acquire) {
        // Shutdown may be past its pass that closes every connection (a
        // slow client-init strategy): a connection opened now would be
        // neither closed nor served, its `Connect` never followed by a
        // `Disconnect`.
        return abort_handshake(
            shared,
            *p,
            Some(&Reject::new(503).body("server shutting down")),
        );
    }
    let id = shared.registry.client_id(p.key);
    let Pending {
        key,
        stream,
        peer,
        buf,
        registered,
        ..
    } = *p;
    // The connection works its poller key out from its id (`Conn::key`).
    debug_assert_eq!(crate::runtime::registry::key_of_id(id), key);
    let now = shared.now_ms();
    let conn = Arc::new_cyclic(|weak| {
        let origin = Origin {
            peer,
            forwarded,
            protocol: protocol.map(String::into_boxed_str),
        };
        let client = Client::new(id, origin, data, weak.clone(), Arc::downgrade(shared));
        Conn::new(stream, client, shared.limits, now, extensions, registered)
    });
    // Reachable first, then the 101: frames sent in between queue behind
    // it (the new connection starts with the write token held).
    shared.registry.open(key, Arc::clone(&conn));
    Counters::add(&shared.counters.accepted, 1);
    let _serving = Serving::start(&*conn);
    conn.send_upgrade(shared, response.as_bytes());
    keep_response(response);
    // As for parking: shutdown's close-everyone pass either saw this
    // connection or we see the flag.
    if shared.stopping.load(Ordering::Acquire) {
        let _ = conn.close(shared, CloseCode::GOING_AWAY, "server shutdown");
    }
    // The handshake is done: `on_connect` and the first job are the
    // connection's, and do not count against the cap on handshakes.
    crate::runtime::poller::handshake_over(shared);
    if !shared.emit_connect(&conn) {
        let (code, reason) = panic_close();
        // Reported as 1011 unless the peer's answer says otherwise, or a
        // close of the user's (from another thread) came first.
        let (ours, sent) = conn.send_close_claiming(shared, CloseFrame::new(code, reason));
        if ours && let Some(mut r) = conn.take_read(shared.limits) {
            r.report = Some(CloseFrame::new(code, reason));
            conn.put_read(r);
        }
        if sent.is_ok() {
            crate::runtime::conn::schedule(shared, &conn);
        }
    }
    // Bytes after the request are the first frames.
    let leftover = &buf[used..];
    service(shared, &conn, leftover, true);
    // That first job may have torn it down (the request came with a
    // Close), leaving this hold the last: its drop is no longer this
    // connection's job's.
    drop(_serving);
    crate::runtime::poller::let_go_here(shared, conn);
}

/// Accept permessage-deflate if offered and enabled, adding the answer to
/// the `101` headers.
#[cfg(feature = "deflate")]
fn negotiate_extensions<T>(
    shared: &Shared<T>,
    request: &Request,
    headers: &mut Vec<(String, String)>,
) -> Extensions {
    let mut config = shared.config.compression?;
    let offers: Vec<&str> = request
        .headers()
        .filter(|(n, _)| n.eq_ignore_ascii_case("Sec-WebSocket-Extensions"))
        .filter_map(|(_, v)| std::str::from_utf8(v).ok())
        .collect();
    if offers.is_empty() {
        return None;
    }
    // A place among the connections that keep contexts, or none kept.
    let permit = if config.get_context_takeover() {
        let p = ContextPermit::take(&shared.contexts, config.get_max_contexts());
        if p.is_none() {
            config = config.context_takeover(false);
        }
        p
    } else {
        None
    };
    let (agreed, answer) = crate::proto::deflate::negotiate(&offers.join(","), &config)?;
    headers.push(("Sec-WebSocket-Extensions".into(), answer));
    // Kept only by a connection that keeps a context (`Deflater::hold`).
    Some((agreed, config, permit))
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
/// nothing). For `Forwarded` (RFC 7239), the `for=` of its last element,
/// likewise. For any other header, its value if it came once: two lines
/// mean the proxy added its own beside the client's instead of replacing
/// it, and which is whose cannot be told.
fn forwarded_ip(request: &Request, header: &str) -> Option<IpAddr> {
    let mut values = request
        .headers()
        .filter(|(n, _)| n.eq_ignore_ascii_case(header))
        .map(|(_, v)| std::str::from_utf8(v).ok());
    let entry = if header.eq_ignore_ascii_case("X-Forwarded-For") {
        // The last element of the last line is the nearest proxy's. A
        // last line that is not UTF-8 gives none, rather than letting an
        // earlier line, which the client may have written, stand in.
        values.last()??.rsplit(',').next()?
    } else if header.eq_ignore_ascii_case("Forwarded") {
        // The last element of the last line is the nearest proxy's, found
        // from the end: what a client wrote before it, even a quote left
        // open, cannot reach into it. Inside it, separators in quoted
        // strings split nothing.
        let element = last_element(values.last()??);
        split_unquoted(element, ';')?.into_iter().find_map(|pair| {
            let (name, value) = pair.split_once('=')?;
            name.trim().eq_ignore_ascii_case("for").then_some(value)
        })?
    } else {
        match (values.next(), values.next()) {
            (Some(Some(v)), None) => v,
            _ => return None,
        }
    };
    parse_ip(entry.trim().trim_matches('"'))
}

/// What follows the last comma of `line` that is outside quoted strings,
/// counted from the end (the whole line if there is none).
fn last_element(line: &str) -> &str {
    // Bytes: the three that matter are ASCII, never part of a longer
    // character.
    let b = line.as_bytes();
    let mut quoted = false;
    for i in (0..b.len()).rev() {
        match b[i] {
            b'"' => {
                // Escaped (`\"`) if an odd number of backslashes precede it.
                let slashes = b[..i].iter().rev().take_while(|&&c| c == b'\\').count();
                if slashes % 2 == 0 {
                    quoted = !quoted;
                }
            }
            b',' if !quoted => return &line[i + 1..],
            _ => {}
        }
    }
    line
}

/// `s` split at `sep` where it is not inside a quoted string (RFC 9110
/// section 5.6.4, backslash escapes included); `None` if a quote is left
/// open.
fn split_unquoted(s: &str, sep: char) -> Option<Vec<&str>> {
    let (mut parts, mut start) = (Vec::new(), 0);
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    (!quoted).then_some(parts)
}

/// An address as proxies write it: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`,
/// `[2001:db8::1]` or `[2001:db8::1]:5678`. An IPv4 address written as
/// IPv4-mapped IPv6 (`::ffff:1.2.3.4`, as a proxy listening on a
/// dual-stack socket writes its IPv4 clients) is that IPv4 address, so
/// that lists and limits keyed on `Client::ip` see one form.
fn parse_ip(s: &str) -> Option<IpAddr> {
    let ip = if let Ok(ip) = s.parse::<IpAddr>() {
        ip
    } else if let Ok(addr) = s.parse::<std::net::SocketAddr>() {
        addr.ip()
    } else {
        s.strip_prefix('[')?.strip_suffix(']')?.parse().ok()?
    };
    Some(ip.to_canonical())
}

/// Wait for the socket (readable for more of the request, writable for
/// more of an HTTP answer), within the handshake deadline.
fn park_handshake<T>(shared: &Shared<T>, mut p: Box<Pending>, want: Interest) {
    // A handshake past its deadline, as the sweep rounds it, is answered
    // now rather than parked: a client sending a byte at the right
    // moments gets no more time than any other, and no less (the sweep
    // answers the others at that rounded deadline, not before).
    let due = crate::runtime::registry::handshake_deadline_ms(shared.started, p.deadline);
    if due <= shared.started.elapsed().as_millis() as u64 {
        return abort_handshake(
            shared,
            *p,
            Some(&Reject::new(408).body("handshake timed out")),
        );
    }
    let (key, deadline) = (p.key, p.deadline);
    let registered = std::mem::replace(&mut p.registered, true);
    let armed = shared.registry.park(p, |p| {
        let interest = Interest::new(p.key, want.readable, want.writable);
        if registered {
            shared.poller.modify(&p.stream, interest)
        } else {
            crate::runtime::poller::register(&shared.poller, &p.stream, interest)
        }
    });
    if matches!(armed, Some(Err(_)))
        && let Some(p) = shared.registry.take_expired_handshake(key, None)
    {
        // Out of kernel memory for the poller: this client cannot wait.
        return abort_handshake(
            shared,
            *p,
            Some(&Reject::new(503).body("server cannot take more connections")),
        );
    }
    // Booked at every park: a sweep skips a handshake a worker holds.
    book_handshake_deadline(shared, deadline);
    // Shutdown sets `stopping` before it sweeps parked handshakes, and
    // both take the slab lock: either its sweep saw this one, or we see
    // the flag and take it back.
    if shared.stopping.load(Ordering::Acquire)
        && let Some(p) = shared.registry.take_expired_handshake(key, None)
    {
        abort_handshake(
            shared,
            *p,
            Some(&Reject::new(503).body("server shutting down")),
        );
    }
}

/// Refuse a handshake from a worker with the whole answer, however long
/// its body (a strategy's 401 or 403 page, say): what the socket does not
/// take at once is written as the socket drains, as `on_http`'s answers
/// are, until the handshake deadline. (`abort_handshake`'s one write is
/// for the short answers of the threads that must not wait.)
fn refuse_in_full<T>(
    shared: &Arc<Shared<T>>,
    mut p: Box<Pending>,
    reject: &Reject,
    head_only: bool,
) {
    // Counted first, so that whoever reads the answer sees the count.
    shared.counters.refused(reject.status_sent());
    p.out = reject.to_response_for(head_only);
    p.sent = 0;
    p.buf = Vec::new();
    p.parsed = 0;
    continue_http(shared, p);
}

/// Write what is left of a plain HTTP answer without blocking: a slow
/// reader waits parked (writable interest), never on a worker, and the
/// handshake deadline cuts it off. Once all is out, close.
fn continue_http<T>(shared: &Shared<T>, mut p: Box<Pending>) {
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
    finish_answer(shared, p, LINGER_READ);
}

/// Most bytes a worker reads and drops from a lingering socket in one
/// job, as a connection's job reads at most this much.
const LINGER_READ: usize = crate::runtime::service::READ_BUDGET;

/// An instant after every deadline, to take a handshake out regardless.
pub(crate) fn far_future() -> std::time::Instant {
    std::time::Instant::now() + std::time::Duration::from_secs(86_400 * 365)
}

/// Book the deadline of a handshake just put in the ready queue, with the
/// tick of grace the queue's scan gives (`poller::take_overdue_handshakes`).
pub(crate) fn book_queued_handshake_deadline<T>(shared: &Shared<T>, deadline: std::time::Instant) {
    let at = crate::runtime::registry::handshake_deadline_ms(shared.started, deadline)
        + crate::runtime::timer::TICK_MS;
    if shared.timers.book_queued(at) {
        let _ = shared.poller.notify();
    }
}

pub(crate) fn book_handshake_deadline<T>(shared: &Shared<T>, deadline: std::time::Instant) {
    let at = crate::runtime::registry::handshake_deadline_ms(shared.started, deadline);
    if shared.timers.book_parked(at) {
        let _ = shared.poller.notify();
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    use super::{SPARE_RESPONSE, SPARE_RESPONSE_MAX, keep_response};

    /// A `101` larger than the socket takes at once (a strategy's header
    /// of 256 KiB, a client with a small receive buffer that reads only
    /// later) is queued from where the write stopped, in front of what is
    /// sent after it: the client reads the whole head, exact, then the
    /// frame.
    #[test]
    fn a_101_written_in_parts_arrives_whole_and_first() {
        let big = "v".repeat(256 << 10);
        let value = big.clone();
        let server = crate::WebSocketServer::with_handshake(move |_, resp| {
            resp.header("X-Big", value.clone());
            Ok(())
        })
        .max_backpressure(16 << 20)
        // The kernel's buffer for it fixed, small: a write stops short.
        .kernel_send_buffer(Some(16 << 10))
        .on_connect(|c| {
            c.send("after").unwrap();
        })
        .start("127.0.0.1:0")
        .unwrap();
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.connect(&server.local_addr().into()).unwrap();
        let mut s: TcpStream = socket.into();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(crate::runtime::testing::UPGRADE).unwrap();
        // The write stopped short: the rest is queued.
        let t = Instant::now();
        while server.stats().bytes_queued == 0 {
            assert!(t.elapsed() < Duration::from_secs(10), "nothing was queued");
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        let head_end = loop {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "closed after {} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
            if let Some(at) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
        };
        let sent = crate::proto::handshake::accept_response(
            "dGhlIHNhbXBsZSBub25jZQ==",
            &[("X-Big".to_owned(), big)],
        );
        assert!(
            got[..head_end] == sent[..],
            "the head differs: {head_end} bytes for {}",
            sent.len()
        );
        while got.len() < head_end + 7 {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(
            &got[head_end..],
            b"\x81\x05after",
            "the frame after the head"
        );
    }

    /// A `101` buffer is kept for the thread's next handshake unless it
    /// grew past the cap (a strategy's header of 50 MB would otherwise be
    /// held by the worker for good, as a review found).
    #[test]
    fn only_a_small_response_buffer_is_kept() {
        keep_response(String::with_capacity(200));
        assert_eq!(SPARE_RESPONSE.take().capacity(), 200);
        keep_response(String::with_capacity(SPARE_RESPONSE_MAX + 1));
        assert_eq!(SPARE_RESPONSE.take().capacity(), 0, "over the cap: dropped");
    }
}
