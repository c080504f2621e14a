//! Behind NGINX: `examples/echo` proxied by a throwaway nginx on loopback,
//! configured with `SITE` (the configuration the README shows), keeps the
//! handshake, echoes of every size and the close handshake intact, and
//! with `--trust-proxy` the server sees the client's own address.
//!
//! Skipped, with a note on stderr, when nginx is not installed, unless
//! `ENJENT_REQUIRE_NGINX=1` (as in CI). `cargo test` builds the echo
//! example before it runs this file.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use support::WAIT;
use tungstenite::Message as Tm;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

/// The site configuration for NGINX in front of an enjent server on
/// 127.0.0.1:13003, as the README's "Deploy behind NGINX" shows it. It goes
/// in the `http` block; the test swaps in loopback ports for `listen 80;`
/// and the upstream address, and changes nothing else.
const SITE: &str = r#"# Connection: upgrade for WebSocket requests, close for plain HTTP.
map $http_upgrade $connection_upgrade {
    default upgrade;
    ''      close;
}

server {
    listen 80;

    location / {
        proxy_pass http://127.0.0.1:13003;
        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $connection_upgrade;
        proxy_set_header Host $host;
        # Builder::trust_proxy(true) reads the last X-Forwarded-For
        # entry; X-Real-IP only with forwarded_header("X-Real-IP").
        proxy_set_header X-Real-IP $remote_addr;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        # NGINX drops a connection idle this long (60 s by default); keep
        # it above enjent's ping_interval (30 s by default).
        proxy_read_timeout 120s;
        proxy_send_timeout 120s;
    }
}
"#;

const LISTEN: &str = "listen 80;";
const UPSTREAM: &str = "http://127.0.0.1:13003";

/// The nginx binary: Debian's place first, then `PATH`.
fn find_nginx() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::iter::once(PathBuf::from("/usr/sbin/nginx"))
        .chain(std::env::split_paths(&path).map(|d| d.join("nginx")))
        .find(|p| p.is_file())
}

/// nginx, or `None` after a note on stderr when it is missing and not
/// required.
fn nginx_or_skip() -> Option<PathBuf> {
    let found = find_nginx();
    if found.is_none() {
        let why = "nginx not found (looked at /usr/sbin/nginx and PATH); \
                   install it with `apt-get install nginx-light`";
        if std::env::var("ENJENT_REQUIRE_NGINX").as_deref() == Ok("1") {
            panic!("{why} (ENJENT_REQUIRE_NGINX=1)");
        }
        eprintln!("skipping the NGINX test: {why}");
    }
    found
}

/// A whole nginx.conf around `SITE`, everything nginx writes kept in
/// `prefix`.
fn nginx_conf(prefix: &Path, site: &str) -> String {
    let site: String = site.lines().map(|l| format!("    {l}\n")).collect();
    let p = prefix.display();
    format!(
        "# Written by tests/nginx.rs; nginx runs with -g 'daemon off;'.
worker_processes 1;
pid {p}/nginx.pid;
error_log {p}/error.log info;

events {{
    worker_connections 64;
}}

http {{
    access_log {p}/access.log;
    client_body_temp_path {p}/client_body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;

{site}}}
"
    )
}

/// A free loopback port (free when asked; nginx may lose a race for it,
/// which `Nginx::start` retries).
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// `examples/echo --trust-proxy` with its stdout lines on a channel.
struct Echo {
    child: Child,
    addr: SocketAddr,
    lines: mpsc::Receiver<String>,
}

impl Echo {
    fn start() -> Echo {
        let bin = support::example_bin("echo", &[]);
        let mut child = Command::new(&bin)
            .args(["127.0.0.1:0", "--trust-proxy"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut echo = Echo {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            lines,
        };
        let first = echo.line();
        echo.addr = first
            .strip_prefix("listening on ws://")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
        echo
    }

    fn line(&self) -> String {
        self.lines
            .recv_timeout(WAIT)
            .expect("a line from the echo server in time")
    }

    /// The `connect ID from PEER forwarded IP` line of the next client:
    /// (peer, forwarded).
    fn connect_line(&self) -> (SocketAddr, String) {
        let line = self.line();
        match line.split(' ').collect::<Vec<_>>()[..] {
            ["connect", _, "from", peer, "forwarded", fwd] => (peer.parse().unwrap(), fwd.into()),
            _ => panic!("unexpected line {line:?}"),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nginx (master and one worker) in its own prefix directory; stopped
/// and the directory removed on drop, panics included.
struct Nginx {
    child: Child,
    bin: PathBuf,
    prefix: PathBuf,
    addr: SocketAddr,
}

impl Nginx {
    /// nginx proxying to `upstream`, accepting connections; retries on
    /// another port if it loses the race for the one it was given.
    fn start(bin: &Path, upstream: SocketAddr) -> Nginx {
        assert_eq!(SITE.matches(LISTEN).count(), 1, "SITE lost its {LISTEN}");
        assert_eq!(SITE.matches(UPSTREAM).count(), 1, "SITE lost {UPSTREAM}");
        Nginx::start_site(bin, upstream.port(), |listen| {
            SITE.replace(LISTEN, &format!("listen {listen};"))
                .replace(UPSTREAM, &format!("http://{upstream}"))
        })
    }

    /// nginx with the site `site(listen)`, listening on `listen`.
    fn start_site(bin: &Path, tag: u16, site: impl Fn(SocketAddr) -> String) -> Nginx {
        for attempt in 1.. {
            let prefix = std::env::temp_dir().join(format!(
                "enjent-nginx-{}-{}-{attempt}",
                std::process::id(),
                tag
            ));
            let _ = std::fs::remove_dir_all(&prefix);
            std::fs::create_dir_all(&prefix).unwrap();
            let addr = free_addr();
            let conf = nginx_conf(&prefix, &site(addr));
            std::fs::write(prefix.join("nginx.conf"), conf).unwrap();
            let child = Command::new(bin)
                .args(Nginx::args(&prefix))
                .args(["-g", "daemon off;"])
                .stdin(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
            let mut nginx = Nginx {
                child,
                bin: bin.to_owned(),
                prefix,
                addr,
            };
            match nginx.wait_ready() {
                Ok(()) => return nginx,
                Err(log) if attempt < 3 && log.contains("Address already in use") => continue,
                Err(log) => panic!("nginx did not start: {log}"),
            }
        }
        unreachable!()
    }

    /// `-p PREFIX/ -c PREFIX/nginx.conf -e PREFIX/error.log`: nothing read
    /// or written outside the prefix, startup errors included.
    fn args(prefix: &Path) -> [String; 6] {
        let p = prefix.display();
        [
            "-p".into(),
            format!("{p}/"),
            "-c".into(),
            format!("{p}/nginx.conf"),
            "-e".into(),
            format!("{p}/error.log"),
        ]
    }

    /// Wait until nginx has written its pid file, which it does only once
    /// it listens on `addr`; its error log if it exits first or takes too
    /// long. A connect that succeeds would prove nothing: until nginx
    /// binds, the kernel may give the port `free_addr` let go to another
    /// test (its own `free_addr` listener, an echo server), and a client
    /// connecting there is reset or answered by a stranger (which failed
    /// `plain_http_through_nginx_gets_the_servers_answer` once in CI).
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + WAIT;
        let pid = self.child.id().to_string();
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited ({status}):\n{}", self.error_log()));
            }
            let written = std::fs::read_to_string(self.prefix.join("nginx.pid"));
            if written.is_ok_and(|w| w.trim() == pid) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "not accepting after {WAIT:?}:\n{}",
            self.error_log()
        ))
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.prefix.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    /// `nginx -s stop` (SIGTERM to the master, which stops its worker),
    /// then SIGKILL if it has not exited within 5 s.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new(&self.bin)
                .args(Nginx::args(&self.prefix))
                .args(["-s", "stop"])
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while let Ok(None) = self.child.try_wait() {
                if Instant::now() > deadline {
                    let _ = self.child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("nginx error.log:\n{}", self.error_log());
        }
        let _ = std::fs::remove_dir_all(&self.prefix);
    }
}

/// `Echo` behind `Nginx`. Fields drop in order: nginx first.
struct Proxy {
    nginx: Nginx,
    echo: Echo,
}

impl Proxy {
    fn start(bin: &Path) -> Proxy {
        let echo = Echo::start();
        let nginx = Nginx::start(bin, echo.addr);
        Proxy { nginx, echo }
    }

    /// A WebSocket through nginx to `path`, from source address `from`
    /// (any 127.x.y.z is loopback on Linux), with `headers` added.
    fn connect(
        &self,
        from: Ipv4Addr,
        path: &str,
        headers: &[(&'static str, &str)],
    ) -> (support::Ws, tungstenite::handshake::client::Response) {
        let stream = tcp_from(from, self.nginx.addr);
        let url = format!("ws://{}{path}", self.nginx.addr);
        let mut req = tungstenite::client::IntoClientRequest::into_client_request(url).unwrap();
        for (name, value) in headers {
            req.headers_mut().insert(*name, value.parse().unwrap());
        }
        tungstenite::client(req, support::Sock(stream))
            .unwrap_or_else(|e| panic!("handshake through nginx: {e}"))
    }
}

/// A TCP connection to `to` from source address `from`, with timeouts.
fn tcp_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    socket
        .bind(&SocketAddr::new(IpAddr::V4(from), 0).into())
        .unwrap_or_else(|e| panic!("bind {from}: {e}"));
    socket.connect_timeout(&to.into(), WAIT).unwrap();
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_write_timeout(Some(WAIT)).unwrap();
    stream
}

/// Bytes that no off-by-one or reordering keeps equal.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9E37_79B9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

const LOCAL: Ipv4Addr = Ipv4Addr::LOCALHOST;

#[test]
fn websocket_through_nginx_echoes_and_closes() {
    let Some(bin) = nginx_or_skip() else { return };
    let proxy = Proxy::start(&bin);
    let (mut ws, resp) = proxy.connect(LOCAL, "/", &[]);
    assert_eq!(resp.status(), 101);
    let header = |name| resp.headers().get(name).and_then(|v| v.to_str().ok());
    assert_eq!(
        header("upgrade").map(str::to_ascii_lowercase).as_deref(),
        Some("websocket")
    );

    ws.send(Tm::text("héllo through nginx")).unwrap();
    assert_eq!(ws.read().unwrap(), Tm::text("héllo through nginx"));
    ws.send(Tm::binary(pattern(300))).unwrap();
    assert_eq!(ws.read().unwrap(), Tm::binary(pattern(300)));
    // 1 MiB, the server's default max_message_size.
    let big = pattern(1 << 20);
    ws.send(Tm::binary(big.clone())).unwrap();
    match ws.read().unwrap() {
        Tm::Binary(back) => assert!(back[..] == big[..], "1 MiB echo differs"),
        other => panic!("expected the 1 MiB echo, got {other:?}"),
    }

    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .unwrap();
    match ws.read() {
        Ok(Tm::Close(Some(f))) => assert_eq!(u16::from(f.code), 1000),
        other => panic!("expected the close reply, got {other:?}"),
    }
    assert!(matches!(
        ws.read(),
        Err(tungstenite::Error::ConnectionClosed)
    ));
    // The server then ends the TCP connection, and nginx passes that on.
    let mut rest = Vec::new();
    let n = ws.get_mut().read_to_end(&mut rest);
    assert!(matches!(n, Ok(0)), "{n:?} {rest:?}");
}

#[test]
fn plain_http_through_nginx_gets_the_servers_answer() {
    let Some(bin) = nginx_or_skip() else { return };
    let proxy = Proxy::start(&bin);
    let mut s = tcp_from(LOCAL, proxy.nginx.addr);
    s.write_all(b"GET / HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out);
    // Not a WebSocket request, and the echo server has no on_http: 426.
    assert!(out.starts_with("HTTP/1.1 426 "), "{out}");
}

#[test]
fn trust_proxy_sees_the_client_address_through_nginx() {
    let Some(bin) = nginx_or_skip() else { return };
    let proxy = Proxy::start(&bin);

    let (mut ws, _) = proxy.connect(Ipv4Addr::new(127, 0, 0, 5), "/", &[]);
    let (peer, forwarded) = proxy.echo.connect_line();
    assert_eq!(forwarded, "127.0.0.5");
    // The TCP peer is nginx, which connects from 127.0.0.1.
    assert_eq!(peer.ip(), IpAddr::V4(LOCAL));
    ws.send(Tm::text("still echoing")).unwrap();
    assert_eq!(ws.read().unwrap(), Tm::text("still echoing"));

    // nginx appends the address it saw to X-Forwarded-For (and replaces
    // X-Real-IP), so a client cannot claim an address.
    let spoof = [("X-Real-IP", "6.6.6.6"), ("X-Forwarded-For", "6.6.6.6")];
    let _ws2 = proxy.connect(Ipv4Addr::new(127, 0, 0, 6), "/", &spoof);
    assert_eq!(proxy.echo.connect_line().1, "127.0.0.6");

    // Straight to the server, no proxy headers: no forwarded address.
    let _direct = support::client(proxy.echo.addr);
    let (peer, forwarded) = proxy.echo.connect_line();
    assert_eq!((peer.ip(), forwarded.as_str()), (IpAddr::V4(LOCAL), "-"));
}

/// The `nginx` code blocks of the README, in order.
fn readme_nginx_blocks() -> Vec<String> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    readme
        .split("```nginx\n")
        .skip(1)
        .map(|b| b[..b.find("```").expect("a closed ```nginx block")].to_string())
        .collect()
}

/// The README's "Deploy behind NGINX" block is `SITE` exactly, and its
/// "Scaling out" block `CLUSTER`.
#[test]
fn readme_shows_the_tested_nginx_configs() {
    let blocks = readme_nginx_blocks();
    assert_eq!(
        blocks.first().map(String::as_str),
        Some(SITE),
        "README.md's first nginx block differs from tests/nginx.rs SITE"
    );
    assert_eq!(
        blocks.get(1).map(String::as_str),
        Some(CLUSTER),
        "README.md's second nginx block (Scaling out) differs from tests/nginx.rs CLUSTER"
    );
}

/// The README's "Scaling out" configuration: instances of enjent behind
/// one NGINX, their topics shared through Redis. The test swaps in
/// loopback ports for `listen 80;` and the three `server` lines.
const CLUSTER: &str = r#"map $http_upgrade $connection_upgrade {
    default upgrade;
    ''      close;
}

upstream enjent {
    # Any balancing works: a topic reaches every instance through Redis.
    least_conn;
    server 127.0.0.1:13004;
    server 127.0.0.1:13005;
    server 127.0.0.1:13006;
}

server {
    listen 80;

    location / {
        proxy_pass http://enjent;
        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $connection_upgrade;
        proxy_set_header Host $host;
        proxy_read_timeout 120s;
        proxy_send_timeout 120s;
    }
}
"#;

/// Three `examples/pubsub --redis` instances behind NGINX with `CLUSTER`:
/// real clients land on all three, and a topic reaches all of them.
#[cfg(feature = "redis")]
#[test]
fn nginx_spreads_clients_over_instances_that_share_topics_through_redis() {
    use support::redis::{Instance, Redis};
    use tungstenite::Message as Tm;
    let Some(bin) = nginx_or_skip() else { return };
    let Some(redis) = Redis::start() else { return };
    let instances: Vec<Instance> = (0..3).map(|_| Instance::start(&redis)).collect();
    let servers = ["13004", "13005", "13006"];
    for port in servers {
        assert_eq!(
            CLUSTER
                .matches(&format!("server 127.0.0.1:{port};"))
                .count(),
            1
        );
    }
    let nginx = Nginx::start_site(&bin, instances[0].addr.port(), |listen| {
        let mut site = CLUSTER.replace(LISTEN, &format!("listen {listen};"));
        for (port, i) in servers.iter().zip(&instances) {
            site = site.replace(&format!("127.0.0.1:{port}"), &i.addr.to_string());
        }
        site
    });
    // Nine clients through NGINX, all in one topic.
    let mut clients: Vec<support::Ws> = (0..9)
        .map(|_| {
            let stream = tcp_from(LOCAL, nginx.addr);
            let (ws, _) =
                tungstenite::client(format!("ws://{}/", nginx.addr), support::Sock(stream))
                    .expect("a handshake through nginx");
            ws
        })
        .collect();
    for ws in &mut clients {
        ws.send(Tm::text("sub room")).unwrap();
        // Any unknown command is answered with an error, after the `sub`
        // before it: then the subscription is in place.
        ws.send(Tm::text("sync")).unwrap();
        match ws.read().unwrap() {
            Tm::Text(t) if t.starts_with("error: ") => {}
            other => panic!("expected the error for `sync`, got {other:?}"),
        }
    }
    // Every instance got some: each subscribed the topic at Redis.
    redis.wait_numsub("room", 3);
    for (i, ws) in clients.iter_mut().enumerate() {
        ws.send(Tm::text(format!("pub room from {i}"))).unwrap();
    }
    for (i, ws) in clients.iter_mut().enumerate() {
        let mut got: Vec<String> = (0..8)
            .map(|_| match ws.read().expect("a publish of another client") {
                Tm::Text(t) => t.to_string(),
                other => panic!("client {i} got {other:?}"),
            })
            .collect();
        got.sort();
        let want: Vec<String> = (0..9)
            .filter(|&j| j != i)
            .map(|j| format!("from {j}"))
            .collect();
        assert_eq!(got, want, "client {i}");
    }
    drop(nginx);
}
