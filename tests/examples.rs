//! The examples run as documented: `echo` in both modes with its flags,
//! `events` printing the seed's lines, `custom_client` refusing with 403,
//! `chat` serving its page and relaying lines within a room
//! (tests/browser.rs drives it in Chromium).
//! `echo`, in both modes, also keeps up with a client that pipelines
//! 10,000 messages and reads slowly, without a refused echo on stderr.
//! `cargo test` builds the examples before it runs this file.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use support::*;
use tungstenite::Message as Tm;

struct Example {
    child: Child,
    out: BufReader<ChildStdout>,
    addr: SocketAddr,
    /// Collects the child's stderr until it exits, when started with
    /// [`Example::start_capturing_stderr`] (otherwise stderr is inherited).
    err: Option<JoinHandle<String>>,
}

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Example {
    fn start(name: &str, args: &[&str]) -> Example {
        Example::launch(name, args, false)
    }

    /// As [`Example::start`], with stderr read (by a thread, so the child
    /// never blocks on a full pipe) until [`Example::stop`].
    fn start_capturing_stderr(name: &str, args: &[&str]) -> Example {
        Example::launch(name, args, true)
    }

    /// As [`Example::start`], in a shell that first sets the child's
    /// limit on open files to `limit`.
    fn start_with_fd_limit(name: &str, args: &[&str], limit: u32) -> Example {
        let bin = example_bin(name, &[]);
        let script = format!("ulimit -n {limit} && exec \"$0\" \"$@\"");
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script).arg(&bin).args(args);
        Example::spawn(cmd, &bin, false)
    }

    fn launch(name: &str, args: &[&str], capture_stderr: bool) -> Example {
        let bin = example_bin(name, &[]);
        let mut cmd = Command::new(&bin);
        cmd.args(args);
        Example::spawn(cmd, &bin, capture_stderr)
    }

    fn spawn(mut cmd: Command, bin: &std::path::Path, capture_stderr: bool) -> Example {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(if capture_stderr {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
        let err = child.stderr.take().map(|mut e| {
            thread::spawn(move || {
                let mut text = Vec::new();
                let _ = e.read_to_end(&mut text);
                String::from_utf8_lossy(&text).into_owned()
            })
        });
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ws://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        Example {
            child,
            out,
            addr,
            err,
        }
    }

    /// Kill the child and return everything it wrote on stderr (empty if
    /// stderr was not captured).
    fn stop(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.err
            .take()
            .map(|t| t.join().expect("the stderr reader"))
            .unwrap_or_default()
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        line.trim_end().to_owned()
    }
}

#[test]
fn echo_echoes_and_honours_max_message_size() {
    let ex = Example::start(
        "echo",
        &["127.0.0.1:0", "echo", "--max-message-size", "1000"],
    );
    let mut ws = client(ex.addr);
    ws.send(Tm::text("ping?")).unwrap();
    assert_eq!(ws.read().unwrap(), Tm::text("ping?"));
    ws.send(Tm::binary(vec![0u8; 1001])).unwrap();
    match ws.read() {
        Ok(Tm::Close(Some(f))) => assert_eq!(u16::from(f.code), 1009),
        other => panic!("{other:?}"),
    }
}

/// `name --help` succeeds and lists each of `flags`; an unknown option
/// fails with the usage. Returns the example's binary.
fn help_and_a_bad_option(name: &str, flags: &[&str]) -> std::path::PathBuf {
    let bin = example_bin(name, &[]);
    let help = Command::new(&bin).arg("--help").output().unwrap();
    assert!(help.status.success(), "{help:?}");
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in flags {
        assert!(text.contains(flag), "{flag} missing from {text}");
    }
    let bad = Command::new(&bin).arg("--no-such-flag").output().unwrap();
    assert!(!bad.status.success(), "{bad:?}");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("unknown option --no-such-flag") && err.contains(&format!("usage: {name}")),
        "{err}"
    );
    bin
}

#[test]
fn pubsub_help_succeeds_and_a_bad_option_fails_with_the_usage() {
    help_and_a_bad_option(
        "pubsub",
        &["--max-message-size", "--kernel-send-buffer", "--redis"],
    );
}

/// The examples that take only an address: `--help` printed nothing
/// and failed, taken as an address that does not resolve, and a second
/// argument was ignored.
#[test]
fn the_address_only_examples_have_help_and_refuse_what_they_do_not_take() {
    for name in ["events", "chat", "custom_client"] {
        let bin = help_and_a_bad_option(name, &["ADDR"]);
        // `--help` after the address too.
        let help = finished(&bin, &["127.0.0.1:0", "--help"]);
        assert!(help.status.success(), "{name}: {help:?}");
        assert!(String::from_utf8_lossy(&help.stdout).contains(&format!("usage: {name}")));
        // One that ignored the second argument would serve on: killed
        // and failed, not waited for.
        let extra = finished(&bin, &["127.0.0.1:0", "more"]);
        assert!(!extra.status.success(), "{name}: {extra:?}");
        let err = String::from_utf8_lossy(&extra.stderr);
        assert!(
            err.contains("unexpected argument more") && err.contains(&format!("usage: {name}")),
            "{name}: {err}"
        );
    }
}

/// Run `bin` with `args` to its end, which must come within 10 s.
fn finished(bin: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{} {args:?} was still running after 10 s", bin.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn echo_help_succeeds_and_a_bad_option_fails_with_the_usage() {
    // Every flag the parser knows is in the usage text.
    let bin = help_and_a_bad_option(
        "echo",
        &[
            "--max-message-size",
            "--ping-interval",
            "--no-keepalive",
            "--workers",
            "--main-loop",
            "--trust-proxy",
            "--kernel-send-buffer",
            "--compress-all",
            "--compress-level",
        ],
    );
    let short = Command::new(&bin)
        .args(["--ping-interval", "0.06"])
        .output()
        .unwrap();
    assert!(!short.status.success(), "{short:?}");
    // The least it says it takes starts.
    let ex = Example::start("echo", &["127.0.0.1:0", "--ping-interval", "0.07"]);
    let mut ws = client(ex.addr);
    ws.send(Tm::text("fast pings")).unwrap();
    assert_eq!(ws.read().unwrap(), Tm::text("fast pings"));
}

#[test]
fn echo_broadcast_mode_relays_to_everyone_including_the_sender() {
    let ex = Example::start("echo", &["127.0.0.1:0", "broadcast"]);
    let mut a = client(ex.addr);
    let mut b = client(ex.addr);
    a.send(Tm::text("to all")).unwrap();
    assert_eq!(a.read().unwrap(), Tm::text("to all"));
    assert_eq!(b.read().unwrap(), Tm::text("to all"));
}

#[test]
fn echo_trust_proxy_prints_each_clients_forwarded_address() {
    for style in [
        &["127.0.0.1:0", "--trust-proxy"][..],
        &["127.0.0.1:0", "--trust-proxy", "--main-loop"],
    ] {
        let mut ex = Example::start("echo", style);
        let proxied = REQUEST.replacen("\r\n\r\n", "\r\nX-Forwarded-For: 10.1.2.3\r\n\r\n", 1);
        let mut s = raw(ex.addr);
        s.write_all(proxied.as_bytes()).unwrap();
        let line = ex.line();
        let peer = s.local_addr().unwrap();
        assert_eq!(
            line.split(' ').nth(3),
            Some(peer.to_string().as_str()),
            "{line}"
        );
        assert!(
            line.starts_with("connect ") && line.ends_with(" forwarded 10.1.2.3"),
            "{style:?}: {line}"
        );
        let mut ws = client(ex.addr);
        let line = ex.line();
        assert!(line.ends_with(" forwarded -"), "{style:?}: {line}");
        ws.send(Tm::text("still an echo")).unwrap();
        assert_eq!(ws.read().unwrap(), Tm::text("still an echo"));
    }
}

#[test]
fn events_prints_the_seed_lines() {
    let mut ex = Example::start("events", &["127.0.0.1:0"]);
    let mut ws = client(ex.addr);
    assert!(ex.line().starts_with("Got a new socket ID: "));
    ws.send(Tm::text("hello")).unwrap();
    let said = ex.line();
    assert!(
        said.starts_with("User ") && said.ends_with(" says : hello"),
        "{said}"
    );
    // A terminal escape and a line break are printed as escapes, not
    // sent to the terminal.
    ws.send(Tm::text("a\x1b[2J\nUser 1 disconnected")).unwrap();
    let said = ex.line();
    assert!(
        said.ends_with(" says : a\\u{1b}[2J\\nUser 1 disconnected"),
        "{said}"
    );
    // So is a close frame's reason.
    ws.close(Some(tungstenite::protocol::CloseFrame {
        code: tungstenite::protocol::frame::coding::CloseCode::Normal,
        reason: "\x1b[2J\nUser 9 says : forged".into(),
    }))
    .unwrap();
    let left = ex.line();
    assert!(
        left.ends_with(" disconnected (1000 (\\u{1b}[2J\\nUser 9 says : forged))"),
        "{left}"
    );
}

#[test]
fn custom_client_refuses_without_name_and_greets_with_one() {
    let mut ex = Example::start("custom_client", &["127.0.0.1:0"]);
    let refused = http(ex.addr, REQUEST.as_bytes());
    assert!(refused.starts_with("HTTP/1.1 403 "), "{refused}");
    let mut ws = join_as_ann(ex.addr).unwrap();
    assert_eq!(ws.read().unwrap(), Tm::text("welcome, ann"));
    assert_eq!(ex.line(), "ann joined (a session of 3 bytes)");
    ws.send(Tm::text("hi")).unwrap();
    assert_eq!(ws.read().unwrap(), Tm::text("ann: hi"));
    assert_eq!(ex.line(), "ann: hi");
    // A line break cannot forge a second line, on the terminal or to
    // the others.
    ws.send(Tm::text("hi\nbob: \x1b[31mforged")).unwrap();
    assert_eq!(ws.read().unwrap(), Tm::text("ann: hi bob:  [31mforged"));
    assert_eq!(ex.line(), "ann: hi bob:  [31mforged");
    // Nor can a name (this request has the cookie: only the name is
    // wrong).
    let mut req = upgrade_to("/?name=a%0Ab");
    let at = req.len() - 2;
    req.splice(at..at, b"Cookie: session=x\r\n".iter().copied());
    let refused = http(ex.addr, &req);
    assert!(
        refused.starts_with("HTTP/1.1 403 ") && refused.contains("control characters"),
        "{refused}"
    );
}

/// `custom_client`'s handshake as `ann`, with a session cookie.
fn join_as_ann(addr: SocketAddr) -> tungstenite::Result<Ws> {
    let mut req = tungstenite::client::IntoClientRequest::into_client_request(format!(
        "ws://{addr}/?name=ann"
    ))?;
    req.headers_mut()
        .insert("Cookie", "session=abc".parse().unwrap());
    client_for(addr, req)
}

/// Clients that leave before their welcome goes out (`send` answers
/// `Err(Closed)`) must not end the example's loop, which serves everyone.
#[test]
fn custom_client_goes_on_when_clients_leave_before_their_welcome() {
    let mut ex = Example::start("custom_client", &["127.0.0.1:0"]);
    let mut req = upgrade_to("/?name=gone");
    let at = req.len() - 2;
    req.splice(at..at, b"Cookie: session=x\r\n".iter().copied());
    for _ in 0..20 {
        let mut s = raw(ex.addr);
        let mut bytes = req.clone();
        bytes.extend(frame(0x88, &close_payload(1000, "")));
        s.write_all(&bytes).unwrap();
        // Gone at once: its close frame is answered and it is torn down,
        // likely before the main loop sends the welcome.
        drop(s);
    }
    let mut lines: Vec<String> = (0..40).map(|_| ex.line()).collect();
    lines.sort();
    lines.dedup();
    assert_eq!(lines, ["gone joined (a session of 1 bytes)", "gone left"]);
    let mut ws = join_as_ann(ex.addr).expect("the example still serves");
    assert_eq!(ws.read().unwrap(), Tm::text("welcome, ann"));
}

/// An upgrade request for `target` (path and query), as raw bytes.
fn upgrade_to(target: &str) -> Vec<u8> {
    REQUEST
        .replacen("GET / ", &format!("GET {target} "), 1)
        .into_bytes()
}

#[test]
fn chat_serves_its_page_and_refuses_bad_names() {
    let mut ex = Example::start("chat", &["127.0.0.1:0"]);
    assert_eq!(ex.line(), format!("open http://{}/ in a browser", ex.addr));
    let page = http(ex.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(page.starts_with("HTTP/1.1 200 "), "{page}");
    assert!(page.contains("Content-Type: text/html; charset=utf-8\r\n"));
    assert!(page.contains("<title>enjent chat</title>"), "{page}");
    // HEAD: the same head, and no body.
    let head = http(ex.addr, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    let length = page
        .split("\r\n")
        .find(|l| l.starts_with("Content-Length: "));
    assert!(length.is_some_and(|l| head.contains(l)), "{head}");
    assert!(head.ends_with("\r\n\r\n"), "{head}");
    let post = http(
        ex.addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    );
    assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
    assert!(post.contains("Allow: GET, HEAD\r\n"), "{post}");
    let missing = http(ex.addr, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(missing.starts_with("HTTP/1.1 404 "), "{missing}");
    let long = format!("/chat?name={}", "a".repeat(33));
    let long_room = format!("/chat?name=ann&room={}", "a".repeat(33));
    for target in [
        "/chat",
        "/chat?name=",
        "/chat?name=%20%20",
        long.as_str(),
        "/chat?name=%2A%20bob",
        "/chat?name=a%0Ab",
        "/chat?room=A",
        "/chat?name=ann&room=",
        "/chat?name=ann&room=%20",
        "/chat?name=ann&room=a%2Fb",
        long_room.as_str(),
    ] {
        let refused = http(ex.addr, &upgrade_to(target));
        assert!(refused.starts_with("HTTP/1.1 403 "), "{target}: {refused}");
    }
    let elsewhere = http(ex.addr, &upgrade_to("/?name=ann"));
    assert!(elsewhere.starts_with("HTTP/1.1 404 "), "{elsewhere}");
    // 32 characters is the limit, counted in characters, not bytes.
    let mut ws = client_at(ex.addr, &format!("/chat?name={}", "%C3%A9".repeat(32)));
    assert_eq!(
        ws.read().unwrap(),
        Tm::text(format!("* {} joined", "é".repeat(32)))
    );
}

#[test]
fn chat_relays_lines_to_the_room_and_echoes_binary_to_the_sender() {
    let ex = Example::start("chat", &["127.0.0.1:0"]);
    // No room in the query: both are in the lobby.
    let mut ann = client_at(ex.addr, "/chat?name=ann");
    assert_eq!(ann.read().unwrap(), Tm::text("* ann joined"));
    let mut bob = client_at(ex.addr, "/chat?name=bob+b");
    assert_eq!(bob.read().unwrap(), Tm::text("* bob b joined"));
    assert_eq!(ann.read().unwrap(), Tm::text("* bob b joined"));
    ann.send(Tm::text("hi <b>bob</b>")).unwrap();
    assert_eq!(ann.read().unwrap(), Tm::text("ann: hi <b>bob</b>"));
    assert_eq!(bob.read().unwrap(), Tm::text("ann: hi <b>bob</b>"));
    // One line: a forged notice after a line break stays in ann's line.
    ann.send(Tm::text("bye\n* bob b left")).unwrap();
    assert_eq!(ann.read().unwrap(), Tm::text("ann: bye * bob b left"));
    assert_eq!(bob.read().unwrap(), Tm::text("ann: bye * bob b left"));
    ann.send(Tm::text("  ")).unwrap(); // blank: not relayed
    let bytes: Vec<u8> = (0..=255).chain(0..=255).collect();
    bob.send(Tm::binary(bytes.clone())).unwrap();
    assert_eq!(bob.read().unwrap(), Tm::binary(bytes));
    bob.close(None).unwrap();
    // Neither the blank line nor bob's bytes reached ann: the leave notice
    // is the next thing she gets.
    assert_eq!(ann.read().unwrap(), Tm::text("* bob b left"));
}

#[test]
fn chat_keeps_lines_and_notices_in_their_room() {
    let ex = Example::start("chat", &["127.0.0.1:0"]);
    let mut ann = client_at(ex.addr, "/chat?name=ann&room=A");
    assert_eq!(ann.read().unwrap(), Tm::text("* ann joined"));
    let mut bob = client_at(ex.addr, "/chat?name=bob&room=B+2");
    assert_eq!(bob.read().unwrap(), Tm::text("* bob joined"));
    let mut cy = client_at(ex.addr, "/chat?name=cy&room=A");
    assert_eq!(cy.read().unwrap(), Tm::text("* cy joined"));
    // bob's notice went out before cy connected: had it reached ann, it
    // would come before cy's.
    assert_eq!(ann.read().unwrap(), Tm::text("* cy joined"));
    bob.send(Tm::text("in B")).unwrap();
    assert_eq!(bob.read().unwrap(), Tm::text("bob: in B"));
    ann.send(Tm::text("in A")).unwrap();
    assert_eq!(ann.read().unwrap(), Tm::text("ann: in A"));
    assert_eq!(cy.read().unwrap(), Tm::text("ann: in A"));
    ann.close(None).unwrap();
    assert_eq!(cy.read().unwrap(), Tm::text("* ann left"));
    // Neither ann's line nor her leaving reached bob: his own line is next.
    bob.send(Tm::text("still in B")).unwrap();
    assert_eq!(bob.read().unwrap(), Tm::text("bob: still in B"));
}

// The pipelined echo, copied from tests/flow_control.rs (integration tests
// share code only through tests/support).

/// The two pipelined tests would otherwise compete for the CPUs.
static PIPELINING: Mutex<()> = Mutex::new(());

const PIPELINED: u32 = 10_000;

/// The whole exchange must be over by then. It takes a few seconds, but
/// the example is a debug build and shares two CPUs with the other tests
/// of this file: the bound is for a server that has stopped making
/// progress, not a slow one (a stall is also caught by the socket's
/// 10 s timeouts).
const DEADLINE: Duration = Duration::from_secs(60);

/// Pipeline [`PIPELINED`] messages to `addr` from a writer thread while
/// reading the echoes more slowly (a stall first, then a pause every 50
/// frames), checking each; then close with 1000 and read the reply.
fn pipelined_echo(addr: SocketAddr) -> Result<(), String> {
    let start = Instant::now();
    let s = raw_ws(addr);
    s.set_write_timeout(Some(WAIT)).unwrap();
    let w = s.try_clone().unwrap();
    let writer = thread::spawn(move || pipeline(w, PIPELINED));
    let mut r = BufReader::with_capacity(16 * 1024, s);
    thread::sleep(Duration::from_millis(300));
    let mut result = Ok(());
    for i in 0..PIPELINED {
        if i % 50 == 0 {
            thread::sleep(Duration::from_millis(1));
        }
        if start.elapsed() > DEADLINE {
            result = Err(format!("only {i} of {PIPELINED} echoes in {DEADLINE:?}"));
            break;
        }
        let want = echo_payload(i);
        match try_read_frame(&mut r) {
            Ok((0x82, p)) if p == want => {}
            Ok((first, p)) => {
                result = Err(format!(
                    "echo {i} (of {PIPELINED}, {} bytes) is missing or wrong: got {}",
                    want.len(),
                    describe(first, &p)
                ));
                break;
            }
            Err(e) => {
                result = Err(format!("echo {i} (of {PIPELINED}) never came: {e}"));
                break;
            }
        }
    }
    if result.is_err() {
        // Ends the writer if it is stuck.
        let _ = r.get_ref().shutdown(Shutdown::Both);
    }
    let written = writer.join().unwrap();
    result?;
    written.map_err(|e| format!("the writer: {e}"))?;
    let mut s = r.into_inner();
    s.write_all(&frame(0x88, &close_payload(1000, "")))
        .map_err(|e| format!("sending the close: {e}"))?;
    match try_read_frame(&mut s) {
        Ok((0x88, p)) if p.get(..2) == Some(&1000u16.to_be_bytes()[..]) => Ok(()),
        Ok((first, p)) => Err(format!(
            "got {} instead of the close reply",
            describe(first, &p)
        )),
        Err(e) => Err(format!("no close reply: {e}")),
    }
}

/// Start `echo` with `args`, run [`pipelined_echo`] against it, and check
/// that every echo came back and none was refused (the example says so on
/// stderr).
fn echo_keeps_up_with_a_pipelining_slow_reader(args: &[&str]) {
    let _serial = PIPELINING.lock().unwrap_or_else(PoisonError::into_inner);
    let mut ex = Example::start_capturing_stderr("echo", args);
    let result = pipelined_echo(ex.addr);
    let stderr = ex.stop();
    let lines: Vec<&str> = stderr.lines().collect();
    let first = &lines[..lines.len().min(5)];
    assert_eq!(
        result,
        Ok(()),
        "{args:?} ({} stderr lines, the first: {first:?})",
        lines.len()
    );
    assert!(
        stderr.is_empty(),
        "{args:?}: the example wrote {} lines on stderr, the first: {first:?}",
        lines.len()
    );
}

#[test]
fn echo_keeps_up_with_a_pipelining_slow_reader_closure_style() {
    echo_keeps_up_with_a_pipelining_slow_reader(&["127.0.0.1:0"]);
}

#[test]
fn echo_keeps_up_with_a_pipelining_slow_reader_main_loop_style() {
    echo_keeps_up_with_a_pipelining_slow_reader(&["127.0.0.1:0", "--main-loop"]);
}

/// Past the process's limit on open files, a client must still get an
/// answer (`503`), not wait in the listen backlog for someone to leave; and
/// once someone leaves, the next client is served again.
#[test]
fn echo_out_of_file_descriptors_answers_503_then_recovers() {
    let ex = Example::start_with_fd_limit("echo", &["127.0.0.1:0"], 40);
    let mut socks: Vec<_> = (0..80)
        .map(|_| {
            let mut s = raw(ex.addr);
            s.write_all(REQUEST.as_bytes()).unwrap();
            s
        })
        .collect();
    let (mut upgraded, mut refused) = (Vec::new(), 0);
    for (i, mut s) in socks.drain(..).enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head)
            .unwrap_or_else(|e| panic!("client {i} got no answer: {e}"));
        match &head {
            b"HTTP/1.1 101" => {
                read_101_rest(&mut s);
                upgraded.push(s);
            }
            b"HTTP/1.1 503" => refused += 1,
            other => panic!("client {i}: {:?}", String::from_utf8_lossy(other)),
        }
    }
    // About 30 fit under 40 descriptors beside the server's own.
    assert!(
        upgraded.len() >= 10 && refused >= 30,
        "{} upgraded, {refused} refused",
        upgraded.len()
    );
    // Those upgraded are served.
    let mut first = upgraded.remove(0);
    first.write_all(&frame(0x81, b"still here")).unwrap();
    assert_eq!(read_frame(&mut first), (0x81, b"still here".to_vec()));
    // Five leave; a newcomer gets in once the server has seen them go.
    drop(upgraded.drain(..5));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = raw(ex.addr);
        s.write_all(REQUEST.as_bytes()).unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).expect("an answer");
        if &head == b"HTTP/1.1 101" {
            break;
        }
        assert_eq!(&head, b"HTTP/1.1 503");
        assert!(Instant::now() < deadline, "still refused after others left");
        thread::sleep(Duration::from_millis(20));
    }
}

/// The rest of a `101` head, after its first 12 bytes.
fn read_101_rest(s: &mut std::net::TcpStream) {
    let mut tail = Vec::new();
    let mut b = [0u8; 1];
    while !tail.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).unwrap();
        tail.push(b[0]);
    }
}
