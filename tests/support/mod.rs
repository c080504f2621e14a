//! Helpers shared by the integration tests: servers on 127.0.0.1:0, a
//! tungstenite client, raw sockets for bytes no real client would send,
//! and the example binaries.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use enjent::{Event, WebSocketServer};
use tungstenite::WebSocket;

pub mod deflate;
#[cfg(feature = "redis")]
pub mod redis;

pub const WAIT: Duration = Duration::from_secs(10);

pub type Ws = WebSocket<Sock>;

/// The tungstenite client's socket: a read or write that a signal
/// interrupts is tried again. A blocking read with a timeout returns
/// `EINTR` when the process is frozen and thawed (a cgroup freezer, as a
/// sandbox may freeze an idle machine), which tungstenite hands up as an
/// error: a CI run failed that way once, on no fault of the server.
/// (`read_exact`, `read_to_end` and `write_all` on a raw socket retry
/// already.)
#[derive(Debug)]
pub struct Sock(pub TcpStream);

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.0.read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        loop {
            match self.0.write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl std::ops::Deref for Sock {
    type Target = TcpStream;
    fn deref(&self) -> &TcpStream {
        &self.0
    }
}

/// Raise this process's soft limit on open files to its hard limit, once.
/// Some tests hold a few thousand sockets, both ends in this process, over
/// the 1,024 a default login allows; the hard limit is usually far higher.
#[cfg(unix)]
#[allow(unsafe_code)]
pub fn raise_fd_limit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `l` is a valid `struct rlimit` for both calls.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
                l.rlim_cur = l.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &l);
            }
        }
    });
}

#[cfg(not(unix))]
pub fn raise_fd_limit() {}

/// A server with no closures: every event goes to the channel.
pub fn server() -> WebSocketServer {
    WebSocketServer::builder()
        .workers(2)
        .start("127.0.0.1:0")
        .expect("start")
}

/// A tungstenite client connected to `addr` with a read timeout.
pub fn client(addr: SocketAddr) -> Ws {
    client_at(addr, "/")
}

pub fn client_at(addr: SocketAddr, path: &str) -> Ws {
    client_for(addr, format!("ws://{addr}{path}")).expect("connect")
}

/// A tungstenite client of `addr` with a request of one's own (a header,
/// a cookie), and a read timeout; the handshake's error if refused.
pub fn client_for(
    addr: SocketAddr,
    request: impl tungstenite::client::IntoClientRequest,
) -> tungstenite::Result<Ws> {
    raise_fd_limit();
    client_over(TcpStream::connect(addr)?, request)
}

/// A tungstenite client over `stream` (connected by the caller, with
/// socket options of its own), with no delay and a read timeout; the
/// handshake's error if refused.
pub fn client_over(
    stream: TcpStream,
    request: impl tungstenite::client::IntoClientRequest,
) -> tungstenite::Result<Ws> {
    // As `tungstenite::connect` does.
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(WAIT))?;
    match tungstenite::client(request, Sock(stream)) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(e)) => Err(e),
        // A blocking socket stops midway only when its read timed out.
        Err(tungstenite::HandshakeError::Interrupted(_)) => {
            Err(tungstenite::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no handshake answer within WAIT",
            )))
        }
    }
}

/// The next event, or a panic naming what was awaited.
pub fn next<T: Send + Sync + 'static>(server: &WebSocketServer<T>) -> Event<T> {
    server.recv_timeout(WAIT).expect("an event within the wait")
}

pub fn expect_connect<T: Send + Sync + 'static>(server: &WebSocketServer<T>) -> enjent::Client<T> {
    match next(server) {
        Event::Connect { client } => client,
        other => panic!("expected Connect, got {other:?}"),
    }
}

pub fn expect_message<T: Send + Sync + 'static>(
    server: &WebSocketServer<T>,
) -> (enjent::Client<T>, enjent::Message) {
    match next(server) {
        Event::Message { client, message } => (client, message),
        other => panic!("expected Message, got {other:?}"),
    }
}

pub fn expect_disconnect<T: Send + Sync + 'static>(
    server: &WebSocketServer<T>,
) -> (enjent::Client<T>, enjent::CloseFrame, Option<enjent::Error>) {
    match next(server) {
        Event::Disconnect {
            client,
            close,
            error,
        } => (client, close, error),
        other => panic!("expected Disconnect, got {other:?}"),
    }
}

pub const REQUEST: &str = "GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// A raw socket with a read timeout.
pub fn raw(addr: SocketAddr) -> TcpStream {
    raise_fd_limit();
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// `n` clients that connect and send nothing, each of which must get its
/// `408` (read for at most 5 s each), and all within 3 s of the first
/// connecting: for servers with a 300 ms `handshake_timeout`.
pub fn silent_clients_get_408(addr: SocketAddr, n: usize) {
    let start = Instant::now();
    let mut silent: Vec<_> = (0..n).map(|_| raw(addr)).collect();
    for (i, s) in silent.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(
            out.starts_with("HTTP/1.1 408 "),
            "silent client {i} after {:?}: {out:?}",
            start.elapsed()
        );
    }
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "408s took {:?} with a 300 ms deadline",
        start.elapsed()
    );
}

/// Send `request` and read the HTTP response head (and body, for errors,
/// until the server closes).
pub fn http(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = raw(addr);
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// A raw socket past a successful handshake.
pub fn raw_ws(addr: SocketAddr) -> TcpStream {
    let mut s = raw(addr);
    s.write_all(REQUEST.as_bytes()).unwrap();
    let head = read_101(&mut s);
    assert!(
        head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
        "{head}"
    );
    s
}

/// A raw connection whose receive buffer is a few KiB (asked for before
/// it connects, so that the window the server sees is small), with
/// `WAIT` to read and no delay to write; nothing sent yet.
pub fn small_window(addr: SocketAddr) -> TcpStream {
    raise_fd_limit();
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&addr.into()).unwrap();
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// A raw client past its handshake whose receive buffer is a few KiB, so
/// that a server queue builds up soon after it stops reading.
pub fn raw_ws_small_window(addr: SocketAddr) -> TcpStream {
    let mut s = small_window(addr);
    s.write_all(REQUEST.as_bytes()).unwrap();
    read_101(&mut s);
    s
}

/// Read an HTTP response head a byte at a time (no byte of what follows
/// it is taken) and check that it is a `101`.
pub fn read_101(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    head
}

/// A masked client frame; `first` is the FIN/RSV/opcode byte.
pub fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    frame_with_key(first, payload, [0x12, 0x34, 0x56, 0x78])
}

/// A masked client frame with a chosen masking key.
pub fn frame_with_key(first: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
    let mut out = vec![first];
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xFFFF {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&key);
    if key == [0; 4] {
        // Masking with the zero key changes nothing: megabytes cost no
        // XOR loop.
        out.extend_from_slice(payload);
    } else {
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    }
    out
}

/// A close frame payload.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    p
}

/// Read one unmasked server frame: (first byte, payload).
pub fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    try_read_frame(s).expect("a server frame")
}

/// Read one unmasked server frame from any reader, returning errors
/// (a reader thread reports them rather than panicking).
pub fn try_read_frame(r: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    r.read_exact(&mut h)?;
    if h[1] & 0x80 != 0 {
        return Err(std::io::Error::other("a server frame was masked"));
    }
    let len = match h[1] & 0x7F {
        126 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b)?;
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            r.read_exact(&mut b)?;
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut p = vec![0u8; len];
    r.read_exact(&mut p)?;
    Ok((h[0], p))
}

/// Read frames until a close frame; returns its code (None if empty).
pub fn read_close(s: &mut TcpStream) -> Option<u16> {
    loop {
        let (first, p) = read_frame(s);
        if first & 0x0F == 0x8 {
            assert_eq!(first, 0x88);
            return (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]));
        }
    }
}

/// Whether the server closed the TCP connection (EOF or reset) in time.
pub fn closed_by_server(s: &mut TcpStream) -> bool {
    let deadline = Instant::now() + WAIT;
    let mut buf = [0u8; 1024];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
    false
}

/// Echo check with a fresh tungstenite client: proves the server still
/// serves others.
pub fn still_serves(addr: SocketAddr, server: &WebSocketServer) {
    let mut ws = client(addr);
    let c = expect_connect(server);
    ws.send(tungstenite::Message::text("still here")).unwrap();
    let (from, m) = expect_message(server);
    assert_eq!(from.id(), c.id());
    assert_eq!(m.as_text(), Some("still here"));
    from.send(m).unwrap();
    assert_eq!(ws.read().unwrap(), tungstenite::Message::text("still here"));
}

/// `target/debug/examples/NAME`, which `cargo test` builds (but not
/// `cargo test --test FILE` alone). Fails if it is older than
/// `examples/NAME.rs`, a file it includes by `#[path]`, one of
/// `more_sources` (paths in the crate) or any file of the library's
/// `src/`, so that a test never passes on old code;
/// `ENJENT_ALLOW_STALE=1` makes that a note instead.
pub fn example_bin(name: &str, more_sources: &[&str]) -> PathBuf {
    // target/debug/deps/TEST-HASH -> target/debug/examples/NAME
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| {
            panic!(
                "{} is missing: run `cargo build --examples` (plain `cargo test` builds it)",
                bin.display()
            )
        });
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut sources = vec![root.join(format!("examples/{name}.rs"))];
    sources.extend(more_sources.iter().map(|s| root.join(s)));
    files_under(&root.join("src"), &mut sources);
    // What the example includes from `examples/support/` (by `#[path]`),
    // which only its own build depends on.
    if let Ok(text) = std::fs::read_to_string(&sources[0]) {
        for line in text.lines() {
            let file = line.trim().strip_prefix("#[path = \"");
            if let Some(file) = file.and_then(|f| f.strip_suffix("\"]")) {
                sources.push(root.join("examples").join(file));
            }
        }
    }
    let allow = std::env::var_os("ENJENT_ALLOW_STALE").is_some_and(|v| v == "1");
    for src in &sources {
        let modified = std::fs::metadata(src).and_then(|m| m.modified());
        if modified.is_ok_and(|t| t > built) {
            let msg = format!(
                "{} is newer than {}: run `cargo build --examples` (with this test's \
                 features), or set ENJENT_ALLOW_STALE=1",
                src.display(),
                bin.display()
            );
            assert!(allow, "{msg}");
            eprintln!("note: {msg}");
        }
    }
    bin
}

/// Every file under `dir`, recursively, added to `out`.
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

// The pipelined echo client of tests/flow_control.rs and tests/examples.rs.

/// A frame seen where another was expected, for failure messages.
pub fn describe(first: u8, p: &[u8]) -> String {
    if first == 0x88 && p.len() >= 2 {
        format!(
            "a close frame with code {}",
            u16::from_be_bytes([p[0], p[1]])
        )
    } else if p.len() >= 4 {
        format!(
            "frame {first:#04x} of {} bytes starting with index {}",
            p.len(),
            u32::from_be_bytes([p[0], p[1], p[2], p[3]])
        )
    } else {
        format!("frame {first:#04x} of {} bytes", p.len())
    }
}

/// A stateless xorshift64* of `seed`: the same sizes on every run.
pub fn mix(seed: u64) -> u64 {
    let mut x = seed.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// Payload `i` of `size` bytes: the index (when it fits), then bytes
/// derived from the index and the offset, so any mix-up shows.
pub fn numbered(i: u32, size: usize) -> Vec<u8> {
    let mut p: Vec<u8> = (0..size)
        .map(|k| (k as u32).wrapping_mul(31) as u8 ^ (k >> 8) as u8 ^ i as u8)
        .collect();
    if size >= 4 {
        p[..4].copy_from_slice(&i.to_be_bytes());
    }
    p
}

/// Message `i` of the pipelined echo: mostly up to 8 KiB, every 20th up
/// to 64 KiB, and each length-encoding edge now and then.
pub fn echo_payload(i: u32) -> Vec<u8> {
    let size = match i % 500 {
        0 => 1,
        1 => 125,
        2 => 126,
        3 => 127,
        4 => 65_535,
        5 => 65_536,
        _ if i % 20 == 19 => 1 + (mix(i.into()) % 65_536) as usize,
        _ => 1 + (mix(i.into()) % 8_192) as usize,
    };
    numbered(i, size)
}

/// `n` masked binary frames of `size` bytes each, built once, to pipeline.
pub fn frames(n: usize, size: usize) -> Vec<u8> {
    let one = frame(0x82, &vec![7u8; size]);
    let mut out = Vec::with_capacity(one.len() * n);
    for _ in 0..n {
        out.extend_from_slice(&one);
    }
    out
}

/// Write `count` masked binary frames as fast as the socket takes them.
pub fn pipeline(mut s: TcpStream, count: u32) -> std::io::Result<()> {
    let mut wire = Vec::with_capacity(512 * 1024);
    for i in 0..count {
        wire.extend(frame(0x82, &echo_payload(i)));
        if wire.len() >= 256 * 1024 {
            s.write_all(&wire)?;
            wire.clear();
        }
    }
    s.write_all(&wire)
}

/// Run `f` on its own thread; a hang fails the test after `limit` instead
/// of blocking the run. A panic in `f` is passed on as is.
pub fn within<R: Send + 'static>(limit: Duration, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let body = std::thread::spawn(move || {
        let r = f();
        let _ = done_tx.send(());
        r
    });
    match done_rx.recv_timeout(limit) {
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("did not finish within {limit:?}")
        }
        _ => match body.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        },
    }
}

/// Poll `f` every few milliseconds until it holds or `limit` passes.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// CPU time this process has used, in the kernel's ticks (1/100 s).
#[cfg(target_os = "linux")]
pub fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // After the command's name (in parentheses): state is the first
    // field, utime the 12th and stime the 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// xorshift64: reproducible randomness without a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x % n
    }
}

/// Write `wire` to each non-blocking socket, as much as each takes, until
/// none takes more for half a second (a minute at most); each socket's
/// count is what it took. With `round_and_round`, each writes `wire` over
/// and over instead of once.
#[allow(dead_code)]
pub fn write_until_quiet(socks: &mut [(TcpStream, usize)], wire: &[u8], round_and_round: bool) {
    let mut quiet_since = Instant::now();
    let start = Instant::now();
    while quiet_since.elapsed() < Duration::from_millis(500) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the writes never stopped"
        );
        let mut wrote = false;
        for (s, sent) in socks.iter_mut() {
            while round_and_round || *sent < wire.len() {
                let at = *sent % wire.len();
                match s.write(&wire[at..]) {
                    Ok(n) => {
                        *sent += n;
                        wrote = true;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("write: {e}"),
                }
            }
        }
        if wrote {
            quiet_since = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The CPU this thread has used, in clock ticks (user and system).
#[cfg(target_os = "linux")]
pub fn thread_ticks() -> u64 {
    ticks_in("/proc/thread-self/stat")
}

/// The CPU this process has used, in clock ticks (user and system).
#[cfg(target_os = "linux")]
pub fn process_ticks() -> u64 {
    ticks_in("/proc/self/stat")
}

#[cfg(target_os = "linux")]
fn ticks_in(stat: &str) -> u64 {
    let stat = std::fs::read_to_string(stat).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}
