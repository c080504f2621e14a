//! The opening handshake (RFC 6455 section 4.2): upgrade request in,
//! `101` or an HTTP error out.

use std::fmt;
use std::net::SocketAddr;

use base64::Engine;
use sha1::{Digest, Sha1};

/// The GUID every `Sec-WebSocket-Accept` is derived with.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Most header lines a request may carry.
pub const MAX_HEADERS: usize = 64;

/// A parsed upgrade request, handed to the client-init strategy.
///
/// Only the strategy sees it; it is not kept once the handshake is over.
#[derive(Clone)]
pub struct Request {
    /// The request head as received; the parts below are spans of it,
    /// so that a request costs two allocations however many headers it
    /// has (the head, and the list of header spans), and none on a
    /// pool worker that dropped one before (see [`SPARE_PARTS`]).
    head: Vec<u8>,
    method: Span,
    /// HTTP/1.`version`.
    version: u8,
    /// `None` for `/` where the head has no path (an absolute-form target
    /// without one, as `http://host?x=1`).
    path: Option<Span>,
    query: Option<Span>,
    headers: Vec<(Span, Span)>,
    peer_addr: Option<SocketAddr>,
    /// Empty until [`check_upgrade`] takes the key.
    key: Span,
    /// What the head says of a body after it, read once.
    body: Body,
}

/// A request's head and its list of header spans.
type Parts = (Vec<u8>, Vec<(Span, Span)>);

thread_local! {
    /// The head and the header list of the last request dropped on this
    /// thread, if it is one of the pool's workers, for the next one parsed
    /// here: a worker that answers handshakes one after another makes
    /// neither again. Any other thread (a user's, dropping a clone) keeps
    /// nothing: it may never parse a request, and would hold the last
    /// one's bytes (its cookies, say) for good.
    static SPARE_PARTS: std::cell::Cell<Parts> = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// The largest head kept for the next request (see [`SPARE_PARTS`]).
const SPARE_HEAD_MAX: usize = 8192;

impl Drop for Request {
    fn drop(&mut self) {
        if self.head.capacity() <= SPARE_HEAD_MAX && crate::runtime::service::on_worker() {
            let parts = (
                std::mem::take(&mut self.head),
                std::mem::take(&mut self.headers),
            );
            // `try_with`: a request dropped by another thread-local's
            // destructor, after this one is gone, frees its parts.
            let _ = SPARE_PARTS.try_with(|spare| spare.set(parts));
        }
    }
}

/// Where a part of the request lies in its head.
#[derive(Debug, Clone, Copy, Default)]
struct Span {
    start: usize,
    end: usize,
}

impl Span {
    /// The span of `part`, a slice of `whole` (empty if it is not one:
    /// only an empty part can be, such as a default for a missing one).
    fn of(whole: &[u8], part: &[u8]) -> Span {
        let start = (part.as_ptr() as usize).wrapping_sub(whole.as_ptr() as usize);
        match start.checked_add(part.len()) {
            Some(end) if end <= whole.len() => Span { start, end },
            _ => {
                debug_assert!(part.is_empty(), "a part of the request outside its head");
                Span::default()
            }
        }
    }
}

impl Request {
    fn bytes(&self, span: Span) -> &[u8] {
        self.head.get(span.start..span.end).unwrap_or_default()
    }

    /// A part httparse checked to be ASCII (method, target, header name)
    /// or a value already found to be UTF-8.
    fn text(&self, span: Span) -> &str {
        std::str::from_utf8(self.bytes(span)).unwrap_or_default()
    }

    /// Every header as raw name and value.
    fn raw_headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.headers
            .iter()
            .map(|&(n, v)| (self.bytes(n), self.bytes(v)))
    }

    /// The raw values of the headers named `name` (case-insensitive).
    pub(crate) fn values<'a, 'n>(
        &'a self,
        name: &'n str,
    ) -> impl Iterator<Item = &'a [u8]> + use<'a, 'n> {
        self.raw_headers()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    /// The HTTP method (always `GET` for a request that reached the
    /// handshake strategy; any method for the plain HTTP handler).
    pub fn method(&self) -> &str {
        self.text(self.method)
    }

    /// The path of the request target, without the query.
    pub fn path(&self) -> &str {
        self.path.map_or("/", |p| self.text(p))
    }

    /// The raw query string (after `?`), if any.
    pub fn query(&self) -> Option<&str> {
        self.query.map(|q| self.text(q))
    }

    /// The value of query parameter `name`, percent-decoded (`+` is a
    /// space). `None` if absent or not UTF-8 once decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query()?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k)? == name)
                .then(|| percent_decode(v))
                .flatten()
        })
    }

    /// The first header named `name` (case-insensitive), if its value is
    /// UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.values(name)
            .next()
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Every header as name and raw value, in the order received.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.headers
            .iter()
            .map(|&(n, v)| (self.text(n), self.bytes(v)))
    }

    /// The value of cookie `name` from the `Cookie` headers.
    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.values("cookie")
            .filter_map(|v| std::str::from_utf8(v).ok())
            .flat_map(|v| v.split(';'))
            .find_map(|c| {
                let (k, v) = ows_trim(c).split_once('=')?;
                (ows_trim(k) == name).then(|| ows_trim(v).trim_matches('"'))
            })
    }

    /// The client's address.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer_addr
    }

    pub(crate) fn set_peer_addr(&mut self, addr: SocketAddr) {
        self.peer_addr = Some(addr);
    }

    /// The `Sec-WebSocket-Key` the client sent (empty for a plain HTTP
    /// request).
    pub fn key(&self) -> &str {
        self.text(self.key)
    }

    /// The `Origin` header, which browsers send with every WebSocket
    /// upgrade.
    pub fn origin(&self) -> Option<&str> {
        self.header("Origin")
    }

    /// The subprotocols the client offered in `Sec-WebSocket-Protocol`, in
    /// its order.
    pub fn protocols(&self) -> impl Iterator<Item = &str> {
        self.header_tokens("Sec-WebSocket-Protocol")
    }

    /// Whether this asks for a WebSocket (`Upgrade: websocket` in an
    /// HTTP/1.1 request), as opposed to a plain HTTP request.
    pub fn is_upgrade(&self) -> bool {
        // An `Upgrade` header in an HTTP/1.0 request is ignored (RFC 9110
        // section 7.8): such a request is plain HTTP.
        self.version == 1 && self.values("Upgrade").any(|v| has_token(v, "websocket"))
    }

    /// Whether the request announces a body: a `Transfer-Encoding`, or a
    /// `Content-Length` other than zero (or one not read as a length).
    pub(crate) fn announces_body(&self) -> bool {
        self.body() != Body::None
    }

    /// What the head says of a body after it.
    pub(crate) fn body(&self) -> Body {
        self.body
    }

    /// The comma-separated tokens of every header named `name`.
    fn header_tokens<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.values(name)
            .filter_map(|v| std::str::from_utf8(v).ok())
            .flat_map(|v| v.split(','))
            .map(ows_trim)
            .filter(|t| !t.is_empty())
    }
}

/// What a request's head says of a body after it (RFC 9112 section 6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Body {
    /// None: no `Transfer-Encoding`, and no `Content-Length` or one of 0.
    None,
    /// `Content-Length` bytes (more than 0).
    Length(usize),
    /// A `Transfer-Encoding`, or a `Content-Length` that is malformed or
    /// disagrees with another: where the body ends is not known.
    Unknown,
}

/// The body that `headers` (names and values) announce. `Content-Length`
/// is read as RFC 9112 section 6.3 reads it: digits only, in lines and
/// comma-separated values that must all agree (`0, 0` is what proxies
/// write when they merge two lines).
fn body_of<'a>(headers: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> Body {
    let mut length = None;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            return Body::Unknown;
        }
        if !name.eq_ignore_ascii_case(b"content-length") {
            continue;
        }
        for n in value.split(|&b| b == b',') {
            let n = n.trim_ascii();
            let n = (!n.is_empty() && n.iter().all(u8::is_ascii_digit))
                .then(|| std::str::from_utf8(n).ok()?.parse::<usize>().ok())
                .flatten();
            match (n, length) {
                (Some(n), None) => length = Some(n),
                (Some(n), Some(l)) if n == l => {}
                _ => return Body::Unknown,
            }
        }
    }
    match length {
        None | Some(0) => Body::None,
        Some(n) => Body::Length(n),
    }
}

/// The length of the head at the start of `buf` and the body it
/// announces, if the head is whole and can be read as HTTP/1 at all, even
/// if it is refused for what it says (no `Host`, a bad target).
pub(crate) fn head_and_body(buf: &[u8]) -> Option<(usize, Body)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => Some((
            n,
            body_of(req.headers.iter().map(|h| (h.name.as_bytes(), h.value))),
        )),
        // A later HTTP/1 minor version, read as `parse_http` reads it.
        Err(httparse::Error::Version) => match later_version(buf) {
            Some(Later::Minor(at)) => head_and_body(&as_http11(buf, at)),
            _ => None,
        },
        _ => None,
    }
}

/// A copy of `buf` whose later HTTP/1 minor version (its digit at `at`,
/// from [`later_version`]) says 1, which httparse reads.
fn as_http11(buf: &[u8], at: usize) -> Vec<u8> {
    let mut copy = buf.to_vec();
    copy[at] = b'1';
    copy
}

/// `s` without the spaces and tabs around it: HTTP's optional whitespace
/// (RFC 9110 section 5.6.3), where `str::trim` would take off any
/// Unicode space.
fn ows_trim(s: &str) -> &str {
    s.trim_matches([' ', '\t'])
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("method", &self.method())
            .field("version", &self.version)
            .field("path", &self.path())
            .field("query", &self.query())
            .field(
                "headers",
                &self
                    .raw_headers()
                    .map(|(n, v)| (String::from_utf8_lossy(n), String::from_utf8_lossy(v)))
                    .collect::<Vec<_>>(),
            )
            .field("peer_addr", &self.peer_addr)
            .field("key", &self.key())
            .finish()
    }
}

/// The answer to an accepted upgrade, filled in by the handshake strategy
/// (see [`WebSocketServer::with_handshake`](crate::WebSocketServer::with_handshake)):
/// extra headers such as `Set-Cookie`, and the subprotocol.
#[derive(Debug, Clone, Default)]
pub struct Response {
    headers: Vec<(String, String)>,
    protocol: Option<String>,
    offered: Vec<String>,
}

impl Response {
    pub(crate) fn for_request(request: &Request) -> Response {
        Response {
            headers: Vec::new(),
            protocol: None,
            offered: request.protocols().map(str::to_owned).collect(),
        }
    }

    /// Add a header to the `101` response. A name that is not an HTTP
    /// token, a value with control characters, and the headers the
    /// handshake itself sets are dropped.
    pub fn header(&mut self, name: impl Into<String>, value: impl Into<String>) -> &mut Self {
        let (name, value) = (name.into(), value.into());
        let reserved = [
            "upgrade",
            "connection",
            "content-length",
            "transfer-encoding",
            "sec-websocket-accept",
            "sec-websocket-protocol",
            "sec-websocket-extensions",
        ];
        if header_ok(&name, &value, &reserved) {
            self.headers.push((name, value));
        }
        self
    }

    /// Choose the subprotocol, overriding the server's preference list.
    /// Returns false, and changes nothing, if the client did not offer it.
    pub fn protocol(&mut self, name: &str) -> bool {
        if self.offered.iter().any(|p| p == name) {
            self.protocol = Some(name.to_owned());
            true
        } else {
            false
        }
    }

    /// The subprotocol chosen so far, if any.
    pub fn chosen_protocol(&self) -> Option<&str> {
        self.protocol.as_deref()
    }

    /// Pick the first of `preference` that the client offered, unless a
    /// protocol is chosen already.
    pub(crate) fn prefer(&mut self, preference: &[String]) {
        if self.protocol.is_none() {
            self.protocol = preference
                .iter()
                .find(|p| self.offered.contains(p))
                .cloned();
        }
    }

    pub(crate) fn into_parts(self) -> (Vec<(String, String)>, Option<String>) {
        (self.headers, self.protocol)
    }
}

/// A plain HTTP response, for the handler of requests that are not
/// upgrades (see [`Builder::on_http`](crate::Builder::on_http)). The same
/// type as [`Reject`]: any status from 200 to 599 may be used; others
/// (1xx included) are sent as `500`.
///
/// ```
/// # use enjent::HttpResponse;
/// let page = HttpResponse::new(200).content_type("text/html").body("<h1>hi</h1>");
/// assert_eq!(page.status(), 200);
/// ```
pub type HttpResponse = Reject;

/// An HTTP refusal: status, headers and body. The client-init strategy
/// returns one to turn a client away.
///
/// ```
/// # use enjent::Reject;
/// let r = Reject::new(403).body("no name given").header("X-Why", "name");
/// assert_eq!(r.status(), 403);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    status: u16,
    headers: Vec<(String, String)>,
    content_type: String,
    body: String,
}

impl Reject {
    /// A refusal with this status code and an empty body.
    pub fn new(status: u16) -> Reject {
        Reject {
            status,
            headers: Vec::new(),
            content_type: "text/plain; charset=utf-8".into(),
            body: String::new(),
        }
    }

    /// Set the `Content-Type` (default `text/plain; charset=utf-8`).
    /// A value with a control character other than tab (CR, LF, NUL,
    /// DEL, ...) is ignored, as [`header`](Reject::header) ignores one.
    pub fn content_type(mut self, value: impl Into<String>) -> Reject {
        let value = value.into();
        if header_ok("Content-Type", &value, &[]) {
            self.content_type = value;
        }
        self
    }

    /// 400 Bad Request with `why` as the body.
    pub fn bad_request(why: impl Into<String>) -> Reject {
        Reject::new(400).body(why)
    }

    /// 403 Forbidden with `why` as the body.
    pub fn forbidden(why: impl Into<String>) -> Reject {
        Reject::new(403).body(why)
    }

    /// Set the body (sent as `text/plain` unless
    /// [`content_type`](Reject::content_type) says otherwise).
    pub fn body(mut self, body: impl Into<String>) -> Reject {
        self.body = body.into();
        self
    }

    /// Add a response header. A name that is not an HTTP token, a value
    /// with control characters, and the headers the response sets itself
    /// (`Connection`, `Content-Length`, `Content-Type`, which has its own
    /// setter, `Transfer-Encoding`) are dropped.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Reject {
        let (name, value) = (name.into(), value.into());
        let reserved = [
            "connection",
            "content-length",
            "content-type",
            "transfer-encoding",
        ];
        if header_ok(&name, &value, &reserved) {
            self.headers.push((name, value));
        }
        self
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The body.
    pub fn body_text(&self) -> &str {
        &self.body
    }

    /// The status the response carries: one that cannot end a response
    /// (1xx), or outside the classes RFC 9110 defines (200-599), is sent
    /// as 500.
    pub(crate) fn status_sent(&self) -> u16 {
        if (200..=599).contains(&self.status) {
            self.status
        } else {
            500
        }
    }

    /// The full HTTP response, ending the connection.
    pub fn to_response(&self) -> Vec<u8> {
        self.to_response_for(false)
    }

    /// The HTTP response; for a `HEAD` request (`head_only`), without the
    /// body. A status that cannot end a response (1xx, including 101, or
    /// outside 200-599) is sent as 500; 204 and 304 carry no body.
    pub fn to_response_for(&self, head_only: bool) -> Vec<u8> {
        let status = self.status_sent();
        let bodiless = matches!(status, 204 | 304);
        // A response that names an upgrade also lists it as a connection
        // option (RFC 9110 section 7.8).
        let upgrade = self
            .headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("upgrade"));
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nConnection: {}\r\n",
            status,
            reason_phrase(status),
            if upgrade { "close, upgrade" } else { "close" },
        );
        if !bodiless {
            out.push_str(&format!(
                "Content-Type: {}\r\nContent-Length: {}\r\n",
                self.content_type,
                self.body.len()
            ));
        }
        for (n, v) in &self.headers {
            out.push_str(n);
            out.push_str(": ");
            out.push_str(v);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        if !bodiless && !head_only {
            out.push_str(&self.body);
        }
        out.into_bytes()
    }
}

/// Whether a header may be added by user code: a token name that is not
/// one of `reserved`, and a value free of control characters (tab
/// excepted), so that no header or response can be injected.
fn header_ok(name: &str, value: &str, reserved: &[&str]) -> bool {
    let token = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
    !name.is_empty()
        && name.bytes().all(token)
        && value
            .bytes()
            .all(|c| c == b'\t' || (c >= 0x20 && c != 0x7f))
        && !reserved.iter().any(|r| name.eq_ignore_ascii_case(r))
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status, reason_phrase(self.status))
    }
}

/// A refusal is the error of a client-init strategy.
impl std::error::Error for Reject {}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        414 => "URI Too Long",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// Parse an upgrade request from the bytes received so far.
///
/// Returns `Ok(None)` while the request is incomplete; otherwise the
/// request and its length in bytes (what follows is frame data), or the
/// HTTP refusal to answer with.
///
/// ```
/// # use enjent::proto::handshake::parse_request;
/// let req = b"GET /chat?room=1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
///             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
///             Sec-WebSocket-Version: 13\r\n\r\n";
/// let (r, n) = parse_request(req, 8192).unwrap().unwrap();
/// assert_eq!((r.path(), r.query(), n), ("/chat", Some("room=1"), req.len()));
/// assert!(parse_request(&req[..20], 8192).unwrap().is_none());
/// ```
pub fn parse_request(buf: &[u8], max_bytes: usize) -> Result<Option<(Request, usize)>, Reject> {
    let Some((mut request, len)) = parse_http(buf, max_bytes)? else {
        return Ok(None);
    };
    check_upgrade(&mut request)?;
    Ok(Some((request, len)))
}

/// How many bytes of empty lines (CRLF, or a bare LF) `buf` starts with:
/// a server ignores them before a request line (RFC 9112 section 2.2). A
/// lone CR is no empty line: the parse refuses it.
pub(crate) fn leading_empty_lines(buf: &[u8]) -> usize {
    let mut i = 0;
    loop {
        match &buf[i..] {
            [b'\r', b'\n', ..] => i += 2,
            [b'\n', ..] => i += 1,
            _ => return i,
        }
    }
}

/// The length of the request line `buf` starts with (after any empty
/// lines), or of all of `buf` if the line has not ended.
pub(crate) fn request_line_len(buf: &[u8]) -> usize {
    let rest = &buf[leading_empty_lines(buf)..];
    rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len())
}

/// Parse any HTTP/1.x request head from the bytes received so far, as
/// [`parse_request`] does, without requiring it to be an upgrade.
///
/// # Errors
///
/// `400` for a malformed request, `431` for one too large (`414` if its
/// request line alone is).
pub fn parse_http(buf: &[u8], max_bytes: usize) -> Result<Option<(Request, usize)>, Reject> {
    // A request line alone over the limit: its target is what is too
    // long (RFC 9112 section 3.2).
    let too_large = || {
        if request_line_len(buf) >= max_bytes {
            Reject::new(414).body("request line too long")
        } else {
            Reject::new(431).body("request headers too large")
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= max_bytes => return Err(too_large()),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Reject::new(431).body("too many request headers"));
        }
        // A later HTTP/1 minor version is read as HTTP/1.1 (RFC 9110
        // section 2.5), which httparse does not know: parse a copy that
        // says 1.1 (which cannot come back here for its version).
        Err(httparse::Error::Version) => match later_version(buf) {
            Some(Later::Minor(at)) => return parse_http(&as_http11(buf, at), max_bytes),
            Some(Later::Major) => {
                return Err(Reject::new(505).body("this server speaks HTTP/1.1"));
            }
            None => {
                return Err(Reject::bad_request(
                    "malformed request: invalid HTTP version",
                ));
            }
        },
        Err(e) => return Err(Reject::bad_request(format!("malformed request: {e}"))),
    };
    if len > max_bytes {
        return Err(too_large());
    }
    let method = req.method.unwrap_or_default();
    let target = req.path.unwrap_or_default();
    let version = req.version.unwrap_or(1);
    check_target(method, target)?;
    check_host(
        version,
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("host")),
    )?;
    let (path, query) = origin_form(target);
    let span = |part: &str| Span::of(buf, part.as_bytes());
    let (mut head, mut headers) = SPARE_PARTS.try_with(|s| s.take()).unwrap_or_default();
    head.clear();
    head.extend_from_slice(&buf[..len]);
    headers.clear();
    headers.extend(
        req.headers
            .iter()
            .map(|h| (span(h.name), Span::of(buf, h.value))),
    );
    let request = Request {
        method: span(method),
        version,
        path: path.map(span),
        query: query.map(span),
        headers,
        peer_addr: None,
        key: Span::default(),
        body: body_of(req.headers.iter().map(|h| (h.name.as_bytes(), h.value))),
        head,
    };
    Ok(Some((request, len)))
}

/// A version httparse refused that is a later one than HTTP/1.1.
enum Later {
    /// HTTP/1.x for x over 1; the index in the buffer of the `x`.
    Minor(usize),
    /// HTTP/2 or later.
    Major,
}

/// Whether the request line `buf` starts with names a later HTTP version
/// than 1.1.
fn later_version(buf: &[u8]) -> Option<Later> {
    let start = leading_empty_lines(buf);
    let line = &buf[start..start + request_line_len(buf)];
    // Neither method nor target may hold a space: the version follows
    // the line's last one.
    let at = start + line.windows(6).rposition(|w| w == b" HTTP/")? + 6;
    match &buf[at..] {
        [b'1', b'.', minor, rest @ ..]
            if (b'2'..=b'9').contains(minor) && matches!(rest, [] | [b'\r' | b'\n', ..]) =>
        {
            Some(Later::Minor(at + 2))
        }
        // `HTTP/2`, `HTTP/3.0`: a version, and one not spoken here. (What
        // is no version at all, as `HTTP/2x`, is malformed.)
        [major, rest @ ..]
            if (b'2'..=b'9').contains(major)
                && matches!(
                    rest,
                    [] | [b'\r' | b'\n', ..]
                        | [b'.']
                        | [b'.', b'0'..=b'9']
                        | [b'.', b'0'..=b'9', b'\r' | b'\n', ..]
                ) =>
        {
            Some(Later::Major)
        }
        _ => None,
    }
}

/// The request target's form must be one its method may use (RFC 9112
/// section 3.2): a path, `*` for OPTIONS, `host:port` for CONNECT, or an
/// absolute `http`, `https`, `ws` or `wss` URI. A fragment is never part
/// of it.
fn check_target(method: &str, target: &str) -> Result<(), Reject> {
    let bad = |why: &str| {
        Err(Reject::bad_request(format!(
            "invalid request target: {why}"
        )))
    };
    if target.contains('#') {
        return bad("a request target has no fragment");
    }
    if method == "CONNECT" {
        // RFC 9110 section 9.3.6: a host, and a port that is one.
        return match target.rsplit_once(':') {
            Some((host, port))
                if !host.is_empty()
                    && port_number(port.as_bytes()).is_some_and(|p| p > 0)
                    && valid_host(target.as_bytes()) =>
            {
                Ok(())
            }
            _ => bad("CONNECT takes host:port"),
        };
    }
    if target.starts_with('/') {
        return Ok(());
    }
    if target == "*" {
        return if method == "OPTIONS" {
            Ok(())
        } else {
            bad("`*` is for OPTIONS")
        };
    }
    let Some((scheme, rest)) = target.split_once("://") else {
        return bad("neither a path nor an absolute URI");
    };
    // RFC 6455 section 4.1 names http and https; the ws schemes name
    // the same resource.
    if !["http", "https", "ws", "wss"]
        .iter()
        .any(|s| scheme.eq_ignore_ascii_case(s))
    {
        return bad("not an http, https, ws or wss URI");
    }
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    // An http URI has a host (RFC 9110 section 4.2.1), and its user
    // information is an error (section 4.2.4).
    if authority.is_empty() || authority.starts_with(':') || !valid_host(authority.as_bytes()) {
        return bad("invalid host in the URI");
    }
    Ok(())
}

/// RFC 9112 section 3.2: an HTTP/1.1 request has one Host header, and a
/// request of any version at most one, with a valid value.
fn check_host<'h>(
    version: u8,
    mut hosts: impl Iterator<Item = &'h httparse::Header<'h>>,
) -> Result<(), Reject> {
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Err(Reject::bad_request("more than one Host header")),
        (None, _) if version == 1 => Err(Reject::bad_request("missing Host header")),
        (Some(h), _) if !valid_host(h.value) => Err(Reject::bad_request("invalid Host header")),
        _ => Ok(()),
    }
}

/// `uri-host [":" port]` (RFC 3986 section 3.2.2): a bracketed IP
/// literal, or a registered name of unreserved characters, sub-delimiters
/// and percent escapes (an IPv4 address is one), then a port of at most
/// 65535. An empty name is one (RFC 9112 section 3.2 has clients send it
/// for targets without an authority).
fn valid_host(value: &[u8]) -> bool {
    let (host_ok, port) = if let Some(rest) = value.strip_prefix(b"[") {
        let Some(end) = rest.iter().position(|&b| b == b']') else {
            return false;
        };
        let port = match &rest[end + 1..] {
            [] => None,
            [b':', port @ ..] => Some(port),
            _ => return false,
        };
        (ip_literal(&rest[..end]), port)
    } else {
        let (name, port) = match value.iter().position(|&b| b == b':') {
            Some(i) => (&value[..i], Some(&value[i + 1..])),
            None => (value, None),
        };
        (reg_name(name), port)
    };
    // `*DIGIT`, so empty is allowed.
    host_ok && port.is_none_or(|p| p.is_empty() || port_number(p).is_some())
}

/// A port written in digits alone (leading zeros allowed), if it is at
/// most 65535.
fn port_number(digits: &[u8]) -> Option<u16> {
    if digits.is_empty() {
        return None;
    }
    let mut n: u32 = 0;
    for &b in digits {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n * 10 + u32::from(b - b'0');
        if n > u32::from(u16::MAX) {
            return None;
        }
    }
    u16::try_from(n).ok()
}

/// A table by byte: ASCII letters and digits, and `others`.
const fn alphanumeric_and(others: &[u8]) -> [bool; 256] {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let mut i = 0;
    while i < others.len() {
        t[others[i] as usize] = true;
        i += 1;
    }
    t
}

/// The standard base64 alphabet, by byte.
const BASE64: [bool; 256] = alphanumeric_and(b"+/");

/// RFC 3986's `unreserved` and `sub-delims`, by byte.
const SUB_DELIM_OR_UNRESERVED: [bool; 256] = alphanumeric_and(b"-._~!$&'()*+,;=");

fn sub_delim_or_unreserved(b: u8) -> bool {
    SUB_DELIM_OR_UNRESERVED[usize::from(b)]
}

fn reg_name(name: &[u8]) -> bool {
    let mut i = 0;
    while i < name.len() {
        if name[i] == b'%' {
            if !name
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
            {
                return false;
            }
            i += 3;
        } else if sub_delim_or_unreserved(name[i]) {
            i += 1;
        } else {
            return false;
        }
    }
    true
}

/// What may stand between the brackets: an IPv6 address (with a zone,
/// `%25` and its name, as RFC 6874 writes it in a URI; clients should
/// leave it out of Host, and some do not), or an `IPvFuture` (`v` hex
/// digits `.` then what RFC 3986 allows).
fn ip_literal(lit: &[u8]) -> bool {
    let ipv6 =
        |a: &[u8]| std::str::from_utf8(a).is_ok_and(|s| s.parse::<std::net::Ipv6Addr>().is_ok());
    if let Some(i) = lit.windows(3).position(|w| w == b"%25") {
        // `1*( unreserved / pct-encoded )`.
        let zone = &lit[i + 3..];
        return ipv6(&lit[..i])
            && !zone.is_empty()
            && reg_name(zone)
            && !zone.iter().any(|b| b"!$&'()*+,;=".contains(b));
    }
    if let [b'v' | b'V', rest @ ..] = lit {
        let digits = rest.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        return digits > 0
            && matches!(&rest[digits..], [b'.', tail @ ..]
                if !tail.is_empty() && tail.iter().all(|&b| b == b':' || sub_delim_or_unreserved(b)));
    }
    ipv6(lit)
}

/// The path and query of a request target, read in absolute form
/// (`http://host/chat?x=1`, which RFC 9112 section 3.2.2 says a server
/// must accept) as in the origin form (`/chat?x=1`) that
/// [`Request::path`] and [`Request::query`] speak of. Both are slices of
/// `target`; a path of `None` is `/` (an absolute form without one).
fn origin_form(target: &str) -> (Option<&str>, Option<&str>) {
    fn split(t: &str) -> (Option<&str>, Option<&str>) {
        match t.bytes().position(|b| b == b'?') {
            Some(i) => (Some(&t[..i]), Some(&t[i + 1..])),
            None => (Some(t), None),
        }
    }
    // The origin form, as nearly every request has it (a scheme cannot
    // begin with `/`, so the search below would come to the same).
    if target.starts_with('/') {
        return split(target);
    }
    let Some((scheme, rest)) = target.split_once("://") else {
        return split(target);
    };
    let scheme_ok = scheme
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
    if !scheme_ok {
        return split(target);
    }
    match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => split(&rest[i..]),
        // An empty path means `/`: `http://host?x=1` is `/?x=1`.
        Some(i) => (None, Some(&rest[i + 1..])),
        None => (None, None),
    }
}

/// Check that a parsed request is a valid WebSocket upgrade (RFC 6455
/// section 4.2.1) and take its key.
///
/// # Errors
///
/// The refusal to answer with: `405` for a method other than GET, `426`
/// without `Upgrade: websocket` or for a version other than 13, `400`
/// otherwise (HTTP/1.0 among them).
pub fn check_upgrade(request: &mut Request) -> Result<(), Reject> {
    if request.method() != "GET" {
        return Err(Reject::new(405)
            .header("Allow", "GET")
            .body("websocket upgrades use GET"));
    }
    if request.version != 1 {
        return Err(Reject::bad_request("websocket upgrades need HTTP/1.1"));
    }
    // The headers the upgrade reads, in one pass over them.
    let (mut keys, mut key) = (0usize, None);
    let (mut versions, mut version) = (0usize, None);
    let (mut upgrade, mut connection) = (false, false);
    for (name, value) in request.raw_headers() {
        if name.eq_ignore_ascii_case(b"sec-websocket-key") {
            keys += 1;
            key = key.or(Some(value));
        } else if name.eq_ignore_ascii_case(b"sec-websocket-version") {
            versions += 1;
            version = version.or(Some(value));
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = upgrade || has_token(value, "websocket");
        } else if name.eq_ignore_ascii_case(b"connection") {
            connection = connection || has_token(value, "upgrade");
        }
    }
    // RFC 6455 section 11.3: these appear once (and Host, which the
    // parse checked). Taking the first of two would read the request
    // differently from a proxy that takes the last, or joins them.
    if keys > 1 {
        return Err(Reject::bad_request(
            "more than one Sec-WebSocket-Key header",
        ));
    }
    if versions > 1 {
        return Err(Reject::bad_request(
            "more than one Sec-WebSocket-Version header",
        ));
    }
    // No upgrade, or one to another protocol (`h2c`, say): this
    // endpoint requires websocket.
    if !upgrade {
        return Err(Reject::new(426)
            .header("Upgrade", "websocket")
            .header("Sec-WebSocket-Version", "13")
            .body("this endpoint speaks websocket"));
    }
    if !connection {
        return Err(Reject::bad_request(
            "Connection header must include Upgrade",
        ));
    }
    // An upgrade request has no body (RFC 6455 section 4.1 sends none).
    // One announced would be read here as frames, where a proxy framing by
    // HTTP would skip it: the two would disagree on where frames start.
    if request.announces_body() {
        return Err(Reject::bad_request("an upgrade request has no body"));
    }
    match version {
        None => return Err(Reject::bad_request("missing Sec-WebSocket-Version header")),
        Some(v) if v.trim_ascii() == b"13" => {}
        Some(_) => {
            return Err(Reject::new(426)
                .header("Upgrade", "websocket")
                .header("Sec-WebSocket-Version", "13")
                .body("unsupported websocket version"));
        }
    }
    // Sixteen bytes in base64 are 24 characters, padding included.
    let key = key
        .map(ows_trim_bytes)
        .filter(|k| is_key(k))
        .ok_or_else(|| Reject::bad_request("missing or malformed Sec-WebSocket-Key"))?;
    request.key = Span::of(&request.head, key);
    Ok(())
}

/// Whether `k` is sixteen bytes in base64 as a key must be: 22 characters
/// of the standard alphabet, the last of them with no bits beyond the
/// 128th (one of `A`, `Q`, `g`, `w`), then `==`, as a strict decoder
/// takes it.
fn is_key(k: &[u8]) -> bool {
    matches!(k, [data @ .., last, b'=', b'='] if data.len() == 21
        && data.iter().all(|&b| BASE64[usize::from(b)])
        && matches!(last, b'A' | b'Q' | b'g' | b'w'))
}

/// Whether a header's value lists `token` (case-insensitive) among its
/// comma-separated tokens; a value that is not UTF-8 lists none.
fn has_token(value: &[u8], token: &str) -> bool {
    (value.is_ascii() || std::str::from_utf8(value).is_ok())
        && value
            .split(|&b| b == b',')
            .any(|t| ows_trim_bytes(t).eq_ignore_ascii_case(token.as_bytes()))
}

/// [`ows_trim`] for bytes.
fn ows_trim_bytes(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// `Sec-WebSocket-Accept` for a client's key.
///
/// ```
/// // The example from RFC 6455 section 1.3.
/// assert_eq!(
///     enjent::proto::handshake::accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
///     "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
/// );
/// ```
pub fn accept_key(key: &str) -> String {
    let mut out = String::with_capacity(28);
    push_accept_key(key, &mut out);
    out
}

fn push_accept_key(key: &str, out: &mut String) {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(GUID.as_bytes());
    // Twenty bytes are 28 characters; encoded into a buffer on the stack,
    // which skips the chunked writer that `encode_string` goes through.
    let mut accept = [0u8; 28];
    let n = base64::engine::general_purpose::STANDARD
        .encode_slice(sha.finalize(), &mut accept)
        .unwrap_or(0);
    debug_assert_eq!(n, 28, "a SHA-1 is 28 characters in base64");
    out.push_str(std::str::from_utf8(&accept[..n]).unwrap_or_default());
}

/// The `101 Switching Protocols` response for `key`, with extra headers.
pub fn accept_response(key: &str, extra: &[(String, String)]) -> Vec<u8> {
    let mut out = String::with_capacity(160);
    write_accept_response(key, extra, &mut out);
    out.into_bytes()
}

/// [`accept_response`], written at the end of `out` (a buffer the caller
/// reuses).
pub(crate) fn write_accept_response(key: &str, extra: &[(String, String)], out: &mut String) {
    out.push_str("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ");
    push_accept_key(key, out);
    out.push_str("\r\n");
    for (n, v) in extra {
        out.push_str(n);
        out.push_str(": ");
        out.push_str(v);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
}

/// Decode `%XX` escapes and `+`; `None` if the result is not UTF-8 or an
/// escape is malformed.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                // Two hex digits: `from_str_radix` would take a sign.
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "GET /chat?name=ann%20b&x HTTP/1.1\r\nHost: localhost\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nCookie: a=1; session=\"xyz\"\r\n\r\n";

    fn status(req: &str) -> u16 {
        parse_request(req.as_bytes(), 8192).unwrap_err().status()
    }

    /// A request dropped on a worker leaves its head and header list to
    /// the next one parsed on its thread, unless the head is over the cap:
    /// a thread does not hold a large request's bytes after it. One
    /// dropped on any other thread (a user's clone) leaves nothing.
    #[test]
    fn only_a_small_request_leaves_its_parts() {
        let parse = |req: &[u8]| parse_http(req, 1 << 16).unwrap().unwrap().0;
        let request = parse(GOOD.as_bytes());
        let _ = SPARE_PARTS.take();
        drop(request.clone());
        drop(request);
        let (head, headers) = SPARE_PARTS.take();
        assert_eq!(
            (head.capacity(), headers.capacity()),
            (0, 0),
            "kept on a thread not the pool's"
        );
        std::thread::Builder::new()
            .name(crate::runtime::service::WORKER_NAME.into())
            .spawn(move || on_a_worker(parse))
            .unwrap()
            .join()
            .unwrap();
    }

    fn on_a_worker(parse: impl Fn(&[u8]) -> Request) {
        let _ = SPARE_PARTS.take();
        drop(parse(GOOD.as_bytes()));
        let (head, headers) = SPARE_PARTS.take();
        assert!(head.capacity() >= GOOD.len(), "kept: {}", head.capacity());
        assert!(headers.capacity() >= 6);
        let big = GOOD.replace(
            "Cookie: a=1",
            &format!("Cookie: a={}", "1".repeat(SPARE_HEAD_MAX)),
        );
        drop(parse(big.as_bytes()));
        let (head, headers) = SPARE_PARTS.take();
        assert_eq!(
            (head.capacity(), headers.capacity()),
            (0, 0),
            "over the cap"
        );
    }

    /// `is_key` takes what a strict base64 decoder takes as sixteen bytes
    /// in 24 characters, and nothing else: every key with each position
    /// changed to every byte, and a pseudo-random sample of strings over
    /// the alphabet, `=` and a few bytes outside it.
    #[test]
    fn a_key_is_what_base64_decodes_to_sixteen_bytes() {
        let strict = |k: &[u8]| {
            let mut raw = [0u8; 18];
            k.len() == 24
                && base64::engine::general_purpose::STANDARD
                    .decode_slice(k, &mut raw)
                    .is_ok_and(|n| n == 16)
        };
        let mut checked = 0;
        let mut taken = 0;
        let mut check = |k: &[u8]| {
            assert_eq!(is_key(k), strict(k), "{:?}", String::from_utf8_lossy(k));
            checked += 1;
            taken += usize::from(strict(k));
        };
        for good in [
            &b"dGhlIHNhbXBsZSBub25jZQ=="[..],
            b"AAAAAAAAAAAAAAAAAAAAAA==",
            b"//////////////////////w==",
        ] {
            check(good);
            for at in 0..24 {
                for byte in 0..=255u8 {
                    let mut k = good.to_vec();
                    k[at] = byte;
                    check(&k);
                }
            }
            check(&good[..23]);
            check(&[good, b"="].concat());
        }
        let alphabet = b"ABCQgwxyz019+/=-_ \x80";
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..200_000 {
            let k: Vec<u8> = (0..24)
                .map(|i| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    // Mostly the alphabet, with the padding where it goes.
                    match (i, seed % 8) {
                        (22 | 23, 0..=5) => b'=',
                        _ => alphabet[(seed >> 8) as usize % alphabet.len()],
                    }
                })
                .collect();
            check(&k);
        }
        assert!(
            checked > 200_000 && taken > 1_000,
            "{checked} checked, {taken} taken"
        );
    }

    /// The hand-written helpers read as the library calls they replaced.
    #[test]
    fn ports_tokens_and_host_bytes_read_as_before() {
        for p in [
            "",
            "0",
            "80",
            "080",
            "0000000000080",
            "65535",
            "65536",
            "99999999999",
            "+80",
            "8 0",
            "١٢",
        ] {
            let old = (!p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                .then(|| p.parse::<u16>().ok())
                .flatten();
            assert_eq!(port_number(p.as_bytes()), old, "{p:?}");
        }
        for (value, token, has) in [
            (&b"websocket"[..], "websocket", true),
            (b" WebSocket \t", "websocket", true),
            (b"h2c, websocket", "websocket", true),
            (b"h2c,,websocket,", "websocket", true),
            (b"web socket", "websocket", false),
            (b"websockets", "websocket", false),
            (b"", "websocket", false),
            (b"keep-alive, Upgrade", "upgrade", true),
            (b"Upgrade, \xff", "upgrade", false),
            (b"h2c,\twebsocket", "websocket", true),
            ("websocket, \u{e9}".as_bytes(), "websocket", true),
        ] {
            assert_eq!(
                has_token(value, token),
                has,
                "{:?}",
                String::from_utf8_lossy(value)
            );
        }
        // The path ends at the first `?`.
        let mut req = GOOD.replacen("/chat?name=ann%20b&x", "/a?b?c", 1);
        let (r, _) = parse_request(req.as_bytes(), 8192).unwrap().unwrap();
        assert_eq!((r.path(), r.query()), ("/a", Some("b?c")));
        // Two keys and two versions: the keys are named first.
        req = req.replacen(
            "Sec-WebSocket-Version: 13\r\n",
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
            1,
        );
        let refused = parse_request(req.as_bytes(), 8192).unwrap_err();
        assert_eq!(
            (refused.status(), refused.body_text()),
            (400, "more than one Sec-WebSocket-Key header")
        );
        for b in 0..=255u8 {
            let old = b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b);
            assert_eq!(sub_delim_or_unreserved(b), old, "{b}");
        }
    }

    macro_rules! refused {
        ($name:ident, $from:expr, $to:expr, $status:expr) => {
            #[test]
            fn $name() {
                assert_eq!(status(&GOOD.replacen($from, $to, 1)), $status);
            }
        };
    }

    #[test]
    fn good_request() {
        let (r, n) = parse_request(GOOD.as_bytes(), 8192).unwrap().unwrap();
        assert_eq!(n, GOOD.len());
        assert_eq!(r.method(), "GET");
        assert_eq!(r.path(), "/chat");
        assert_eq!(r.query_param("name").as_deref(), Some("ann b"));
        assert_eq!(r.query_param("x").as_deref(), Some(""));
        assert_eq!(r.query_param("y"), None);
        assert_eq!(r.header("host"), Some("localhost"));
        assert_eq!(r.cookie("session"), Some("xyz"));
        assert_eq!(r.cookie("a"), Some("1"));
        assert_eq!(r.cookie("b"), None);
        assert_eq!(r.headers().count(), 6);
    }

    #[test]
    fn trailing_frame_bytes_are_not_consumed() {
        let mut bytes = GOOD.as_bytes().to_vec();
        bytes.extend_from_slice(&[0x81, 0x80, 0, 0, 0, 0]);
        let (_, n) = parse_request(&bytes, 8192).unwrap().unwrap();
        assert_eq!(n, GOOD.len());
    }

    #[test]
    fn every_prefix_is_partial() {
        for cut in 0..GOOD.len() {
            assert!(
                parse_request(&GOOD.as_bytes()[..cut], 8192)
                    .unwrap()
                    .is_none(),
                "{cut}"
            );
        }
    }

    refused!(
        a_body,
        "Host: localhost\r\n",
        "Host: localhost\r\nContent-Length: 6\r\n",
        400
    );
    refused!(
        a_chunked_body,
        "Host: localhost\r\n",
        "Host: localhost\r\nTransfer-Encoding: chunked\r\n",
        400
    );

    #[test]
    fn an_empty_body_is_no_body() {
        for length in ["0", " 0 ", "0, 0"] {
            let line = format!("Host: localhost\r\nContent-Length: {length}\r\n");
            let req = GOOD.replacen("Host: localhost\r\n", &line, 1);
            assert!(
                parse_request(req.as_bytes(), 8192).unwrap().is_some(),
                "{length}"
            );
        }
    }

    #[test]
    fn a_plain_get_with_a_body_is_told_to_upgrade() {
        let req = "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc";
        assert_eq!(status(req), 426);
    }

    #[test]
    fn headers_are_read_back_as_sent_from_the_one_copy_of_the_head() {
        // A key padded with spaces and tabs (optional whitespace, which
        // httparse takes off).
        let req = GOOD.replacen(
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Key: \t dGhlIHNhbXBsZSBub25jZQ== \t",
            1,
        );
        let mut bytes = req.trim_end().as_bytes().to_vec();
        // A value byte that is not UTF-8 (obs-text), as httparse allows,
        // and values that are empty or blank.
        bytes.extend_from_slice(
            b"\r\nX-Raw: caf\xe9\r\nx-raw: two\r\nX-Empty:\r\nX-Blank:  \t \r\n\r\n",
        );
        let (r, n) = parse_request(&bytes, 8192).unwrap().unwrap();
        assert_eq!(n, bytes.len());
        assert_eq!(r.key(), "dGhlIHNhbXBsZSBub25jZQ==");
        let names: Vec<&str> = r.headers().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "Host",
                "Upgrade",
                "Connection",
                "Sec-WebSocket-Key",
                "Sec-WebSocket-Version",
                "Cookie",
                "X-Raw",
                "x-raw",
                "X-Empty",
                "X-Blank"
            ]
        );
        let raw: Vec<&[u8]> = r
            .headers()
            .filter(|(n, _)| n.eq_ignore_ascii_case("x-raw"))
            .map(|(_, v)| v)
            .collect();
        assert_eq!(raw, [&b"caf\xe9"[..], b"two"]);
        // The first is not UTF-8: `header` gives none rather than the second.
        assert_eq!(r.header("X-RAW"), None);
        assert_eq!(r.header("connection"), Some("keep-alive, Upgrade"));
        assert_eq!(r.header("x-empty"), Some(""));
        assert_eq!(r.header("x-blank"), Some(""));
        assert_eq!(r.method(), "GET");
        let debug = format!("{r:?}");
        for part in [
            "method: \"GET\"",
            "path: \"/chat\"",
            "query: Some(\"name=ann%20b&x\")",
            "(\"Host\", \"localhost\")",
            "(\"X-Raw\", \"caf\u{fffd}\")",
            "(\"X-Empty\", \"\")",
            "key: \"dGhlIHNhbXBsZSBub25jZQ==\"",
        ] {
            assert!(debug.contains(part), "{part} not in {debug}");
        }
        assert_eq!(r.clone().query_param("name").as_deref(), Some("ann b"));
    }

    #[test]
    fn an_absolute_target_is_read_as_its_path_and_query() {
        for (target, path, query) in [
            ("http://localhost/chat?x=1", "/chat", Some("x=1")),
            ("HTTP://localhost:80/a/b", "/a/b", None),
            ("ws://h?q", "/", Some("q")),
            ("https://h", "/", None),
            ("/plain://not-a-scheme", "/plain://not-a-scheme", None),
        ] {
            let req = GOOD.replacen("/chat?name=ann%20b&x", target, 1);
            let (r, _) = parse_request(req.as_bytes(), 8192).unwrap().unwrap();
            assert_eq!((r.path(), r.query()), (path, query), "{target}");
        }
    }

    #[test]
    fn host_values_are_read_by_their_grammar() {
        let with_host = |host: &str| GOOD.replacen("Host: localhost", &format!("Host: {host}"), 1);
        for good in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:9001",
            "[::1]",
            "[::1]:443",
            "[2001:db8::7]:0",
            "[v1.fe80::a+en1]",
            "[fe80::1%25eth0]:9001",
            "[fe80::1%25en%301]",
            "EXAMPLE.com",
            "a-b_c~d.e!$&'()*+,;=",
            "caf%C3%A9.example",
            "h:",
            "h:65535",
            "h:0080",
            "",
        ] {
            assert!(
                parse_request(with_host(good).as_bytes(), 8192).is_ok(),
                "{good:?}"
            );
        }
        for bad in [
            "a b",
            "a@b",
            "user:pw@host",
            "http://x",
            "x:99999999",
            "x:65536",
            "x:8o",
            "x:80:80",
            "::1",
            "[::1",
            "[::1]x",
            "[::g]",
            "[fe80::1%eth0]",
            "[fe80::1%25]",
            "[fe80::1%25a,b]",
            "[v1.x%25eth0]",
            "[v.x]",
            "a%zz",
            "a%4",
            "a/b",
            "a\"b",
            "caf\u{e9}",
        ] {
            assert_eq!(status(&with_host(bad)), 400, "{bad:?}");
        }
    }

    #[test]
    fn request_targets_take_the_forms_their_methods_may() {
        let with_target = |method: &str, target: &str| {
            GOOD.replacen("GET /chat?name=ann%20b&x", &format!("{method} {target}"), 1)
        };
        for (method, target) in [
            ("GET", "/"),
            ("GET", "/a:b/c?d=e/f?g"),
            ("GET", "http://h/chat"),
            ("GET", "HTTPS://h:443"),
            ("GET", "wss://[::1]:9/x"),
            ("OPTIONS", "*"),
            ("CONNECT", "h:443"),
            ("CONNECT", "[::1]:443"),
        ] {
            let req = with_target(method, target);
            let (r, _) = parse_http(req.as_bytes(), 8192).unwrap().unwrap();
            assert_eq!(r.method(), method);
        }
        for (method, target) in [
            ("GET", "*"),
            ("GET", "x:80"),
            ("GET", "chat"),
            ("GET", "/a#frag"),
            ("GET", "http://h/a#frag"),
            ("GET", "ftp://x/chat"),
            ("GET", "http://x:99999/chat"),
            ("GET", "http:///chat"),
            ("GET", "http://:80/chat"),
            ("GET", "http://u@h/chat"),
            ("GET", "urn:x"),
            ("OPTIONS", "x"),
            ("CONNECT", "h"),
            ("CONNECT", "h:"),
            ("CONNECT", "[::1]"),
            ("CONNECT", ":443"),
            ("CONNECT", "h:0"),
            ("CONNECT", "h:65536"),
            ("CONNECT", "/"),
        ] {
            let req = with_target(method, target);
            let status = parse_http(req.as_bytes(), 8192).unwrap_err().status();
            assert_eq!(status, 400, "{method} {target}");
        }
    }

    #[test]
    fn http_1_0_may_leave_host_out_but_not_send_two() {
        let plain = "GET /page HTTP/1.0\r\n\r\n";
        let (r, _) = parse_http(plain.as_bytes(), 8192).unwrap().unwrap();
        assert_eq!(r.path(), "/page");
        let two = "GET /page HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n";
        assert_eq!(parse_http(two.as_bytes(), 8192).unwrap_err().status(), 400);
        let eleven = "GET /page HTTP/1.1\r\n\r\n";
        assert_eq!(
            parse_http(eleven.as_bytes(), 8192).unwrap_err().status(),
            400
        );
    }

    #[test]
    fn later_minor_versions_are_read_as_1_1_and_later_majors_get_505() {
        let req = GOOD.replacen("HTTP/1.1", "HTTP/1.2", 1);
        let (r, n) = parse_request(req.as_bytes(), 8192).unwrap().unwrap();
        assert_eq!((r.key(), n), ("dGhlIHNhbXBsZSBub25jZQ==", req.len()));
        assert!(r.is_upgrade());
        // Cut just after the version, and after its CR: more to come.
        for cut in [20, 30, 33, 34, 35] {
            let part = &req.as_bytes()[..cut];
            assert!(parse_request(part, 8192).unwrap().is_none(), "{part:?}");
        }
        for (version, expect) in [
            ("HTTP/2.0", 505),
            ("HTTP/3", 505),
            ("HTTP/2x", 400),
            ("HTTP/20.0", 400),
            ("HTTP/2.0.1", 400),
            ("HTTP/1.12", 400),
            ("HTTP/0.9", 400),
            ("HTTP/x.1", 400),
            ("HTTPS/1.1", 400),
        ] {
            let req = GOOD.replacen("HTTP/1.1", version, 1);
            assert_eq!(status(&req), expect, "{version}");
        }
        let reject = parse_http(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 8192).unwrap_err();
        assert_eq!(reject.status(), 505);
        assert!(
            reject
                .to_response()
                .starts_with(b"HTTP/1.1 505 HTTP Version Not Supported\r\n")
        );
    }

    #[test]
    fn a_key_wrapped_in_other_unicode_space_is_malformed() {
        for pad in ["\u{a0}", "\u{2003}", "\u{3000}"] {
            let req = GOOD.replacen(
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                &format!("Sec-WebSocket-Key: {pad}dGhlIHNhbXBsZSBub25jZQ=={pad}"),
                1,
            );
            assert_eq!(status(&req), 400, "{pad:?}");
            // Nor is such an Upgrade token `websocket`.
            let req = GOOD.replacen("Upgrade: WebSocket", &format!("Upgrade: {pad}websocket"), 1);
            assert_eq!(status(&req), 426, "{pad:?}");
        }
    }

    #[test]
    fn statuses_outside_200_to_599_are_sent_as_500() {
        for (status, sent) in [
            (100, 500),
            (101, 500),
            (200, 200),
            (599, 599),
            (600, 500),
            (700, 500),
            (1000, 500),
        ] {
            let r = Reject::new(status);
            assert_eq!(r.status_sent(), sent, "{status}");
            assert!(
                r.to_response()
                    .starts_with(format!("HTTP/1.1 {sent} ").as_bytes())
            );
        }
    }

    refused!(post, "GET", "POST", 405);
    refused!(http10, "HTTP/1.1", "HTTP/1.0", 400);
    refused!(no_host, "Host: localhost\r\n", "", 400);
    refused!(no_upgrade, "Upgrade: WebSocket\r\n", "", 426);
    refused!(wrong_upgrade, "Upgrade: WebSocket", "Upgrade: h2c", 426);
    refused!(
        no_connection,
        "Connection: keep-alive, Upgrade",
        "Connection: keep-alive",
        400
    );
    refused!(
        two_hosts,
        "Host: localhost\r\n",
        "Host: localhost\r\nhost: elsewhere\r\n",
        400
    );
    refused!(
        two_keys,
        "Sec-WebSocket-Version: 13\r\n",
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n",
        400
    );
    refused!(
        two_versions,
        "Sec-WebSocket-Version: 13\r\n",
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Version: 13\r\n",
        400
    );
    refused!(version_8, "Version: 13", "Version: 8", 426);
    refused!(no_version, "Sec-WebSocket-Version: 13\r\n", "", 400);
    refused!(
        no_key,
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        "",
        400
    );
    refused!(short_key, "dGhlIHNhbXBsZSBub25jZQ==", "dGhl", 400);
    refused!(not_http, "GET /chat", "GET /c hat", 400);

    #[test]
    fn version_426_names_the_supported_version() {
        let r = parse_request(
            GOOD.replacen("Version: 13", "Version: 7", 1).as_bytes(),
            8192,
        )
        .unwrap_err();
        let resp = String::from_utf8(r.to_response()).unwrap();
        assert!(
            resp.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
            "{resp}"
        );
        assert!(resp.contains("\r\nSec-WebSocket-Version: 13\r\n"), "{resp}");
        // RFC 9110 sections 15.5.22 and 7.8: a 426 names the protocol to
        // upgrade to, and lists the upgrade as a connection option.
        assert!(resp.contains("\r\nUpgrade: websocket\r\n"), "{resp}");
        assert!(
            resp.contains("\r\nConnection: close, upgrade\r\n"),
            "{resp}"
        );
    }

    #[test]
    fn a_refusal_without_upgrade_says_only_close() {
        let resp = String::from_utf8(Reject::new(403).to_response()).unwrap();
        assert!(resp.contains("\r\nConnection: close\r\n"), "{resp}");
    }

    #[test]
    fn a_request_line_over_the_limit_gets_414() {
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(9000));
        assert_eq!(
            parse_http(&long.as_bytes()[..8500], 8192)
                .unwrap_err()
                .status(),
            414
        );
    }

    #[test]
    fn empty_lines_are_whole_crlfs_or_lfs_and_a_lone_cr_is_none() {
        assert_eq!(leading_empty_lines(b"\r\n\n\r\nGET"), 5);
        assert_eq!(leading_empty_lines(b"\n\rGET"), 1);
        assert_eq!(leading_empty_lines(b"\r"), 0);
        assert_eq!(leading_empty_lines(b"\r\r\n"), 0);
        assert_eq!(leading_empty_lines(b""), 0);
        // The request line is measured after them, a lone CR and all.
        assert_eq!(request_line_len(b"\r\n\nGET / HTTP/1.1\r\n"), 15);
        assert_eq!(request_line_len(b"\n\rGET /"), 6);
    }

    #[test]
    fn content_length_is_digits_that_agree() {
        let body = |headers: &[(&str, &str)]| {
            body_of(headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
        };
        let length = |v: &str| body(&[("Content-Length", v)]);
        assert_eq!(body(&[("Host", "x")]), Body::None);
        assert_eq!(length("0"), Body::None);
        assert_eq!(length("00"), Body::None);
        assert_eq!(length("0, 0"), Body::None);
        assert_eq!(length(" 5 "), Body::Length(5));
        assert_eq!(length("5, 5"), Body::Length(5));
        assert_eq!(
            body(&[("content-length", "5"), ("CONTENT-LENGTH", "5")]),
            Body::Length(5)
        );
        for bad in [
            "+5",
            "-0",
            "5, 6",
            "",
            "5,",
            "0x5",
            "99999999999999999999999",
        ] {
            assert_eq!(length(bad), Body::Unknown, "{bad:?}");
        }
        assert_eq!(
            body(&[("Content-Length", "5"), ("Content-Length", "6")]),
            Body::Unknown
        );
        assert_eq!(body(&[("Transfer-Encoding", "chunked")]), Body::Unknown);
        // The head's end and body, whole but refused by `parse_http`.
        let no_host = b"GET / HTTP/1.1\r\nContent-Length: 2\r\n\r\nab";
        assert!(parse_request(no_host, 8192).is_err());
        assert_eq!(
            head_and_body(no_host),
            Some((no_host.len() - 2, Body::Length(2)))
        );
        assert_eq!(head_and_body(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
        let later = b"GET nowhere HTTP/1.2\r\nHost: x\r\nContent-Length: 1\r\n\r\nz";
        assert_eq!(
            head_and_body(later),
            Some((later.len() - 1, Body::Length(1)))
        );
        assert_eq!(head_and_body(b"GET / HTTP/2.0\r\nHost: x\r\n\r\n"), None);
    }

    #[test]
    fn oversized_headers_get_431() {
        let big = GOOD.replacen("Host: localhost", &format!("Host: {}", "a".repeat(9000)), 1);
        assert_eq!(
            parse_request(&big.as_bytes()[..8500], 8192)
                .unwrap_err()
                .status(),
            431
        );
        assert_eq!(status(&big), 431);
        let many: String = (0..70).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(
            status(&GOOD.replacen("Host", &format!("{many}Host"), 1)),
            431
        );
        // The count, not the size: `MAX_HEADERS` lines pass, one more
        // is refused (the README and `max_handshake_bytes` say so).
        let own = GOOD.matches("\r\n").count() - 2;
        let with = |n: usize| {
            let extra: String = (0..n).map(|i| format!("X-{i}: y\r\n")).collect();
            GOOD.replacen("Host", &format!("{extra}Host"), 1)
        };
        assert!(matches!(
            parse_request(with(MAX_HEADERS - own).as_bytes(), 8192),
            Ok(Some(_))
        ));
        assert_eq!(status(&with(MAX_HEADERS - own + 1)), 431);
    }

    #[test]
    fn accept_response_has_the_rfc_key() {
        let resp = String::from_utf8(accept_response("dGhlIHNhbXBsZSBub25jZQ==", &[])).unwrap();
        assert!(resp.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(resp.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(resp.ends_with("\r\n\r\n"));
    }

    #[test]
    fn reject_response_shape() {
        let r = Reject::forbidden("go away")
            .header("Bad\r\nName", "x")
            .header("X-Ok", "1");
        let resp = String::from_utf8(r.to_response()).unwrap();
        assert!(resp.starts_with("HTTP/1.1 403 Forbidden\r\n"));
        assert!(resp.contains("Content-Length: 7\r\n"));
        assert!(resp.contains("X-Ok: 1\r\n"));
        assert!(!resp.contains("Bad"));
        assert!(resp.ends_with("\r\n\r\ngo away"));
        // A content type with a control character is ignored, as a
        // header's is (RFC 9110 section 5.5).
        for bad in [
            "text/html\0",
            "text/html\x7f",
            "text/\x1bhtml",
            "a\r\nX-Evil: 1",
        ] {
            let resp = Reject::new(200).content_type(bad).body("x").to_response();
            let resp = String::from_utf8(resp).unwrap();
            assert!(
                resp.contains("Content-Type: text/plain; charset=utf-8\r\n"),
                "{bad:?}"
            );
        }
        let resp = Reject::new(200)
            .content_type("text/html;\tcharset=utf-8")
            .to_response();
        assert!(
            String::from_utf8(resp)
                .unwrap()
                .contains("Content-Type: text/html;\tcharset=utf-8\r\n")
        );
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Fb+c").as_deref(), Some("a/b c"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%C3%A9").as_deref(), Some("é"));
        assert_eq!(percent_decode("%FF"), None);
        assert_eq!(percent_decode("%+4"), None, "a sign is not a digit");
        assert_eq!(percent_decode("%-1"), None);
    }
}
