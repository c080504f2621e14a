//! The examples run as documented: `echo` in both modes with its flags,
//! `events` printing the seed's lines, `custom_client` refusing with 403,
//! `chat` serving its page and relaying lines (tests/browser.rs drives it
//! in Chromium).
//! `cargo test` builds the examples before it runs this file.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdout, Command, Stdio};

use support::*;
use tungstenite::Message as Tm;

struct Example {
    child: Child,
    out: BufReader<ChildStdout>,
    addr: SocketAddr,
}

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Example {
    fn start(name: &str, args: &[&str]) -> Example {
        let bin = example_bin(name, &[]);
        let mut child = Command::new(&bin)
            .args(args)
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ws://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        Example { child, out, addr }
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
    ws.close(None).unwrap();
    let left = ex.line();
    assert!(left.contains(" disconnected"), "{left}");
}

#[test]
fn custom_client_refuses_without_name_and_greets_with_one() {
    let mut ex = Example::start("custom_client", &["127.0.0.1:0"]);
    let refused = http(ex.addr, REQUEST.as_bytes());
    assert!(refused.starts_with("HTTP/1.1 403 "), "{refused}");
    let mut req = tungstenite::client::IntoClientRequest::into_client_request(format!(
        "ws://{}/?name=ann",
        ex.addr
    ))
    .unwrap();
    req.headers_mut()
        .insert("Cookie", "session=abc".parse().unwrap());
    let (mut ws, _) = tungstenite::connect(req).unwrap();
    assert_eq!(ws.read().unwrap(), Tm::text("welcome, ann"));
    assert_eq!(ex.line(), "ann joined (session abc)");
    ws.send(Tm::text("hi")).unwrap();
    assert_eq!(ws.read().unwrap(), Tm::text("ann: hi"));
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
    let missing = http(ex.addr, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(missing.starts_with("HTTP/1.1 404 "), "{missing}");
    let long = format!("/chat?name={}", "a".repeat(33));
    for target in [
        "/chat",
        "/chat?name=",
        "/chat?name=%20%20",
        long.as_str(),
        "/chat?name=%2A%20bob",
        "/chat?name=a%0Ab",
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
fn chat_relays_lines_to_all_and_echoes_binary_to_the_sender() {
    let ex = Example::start("chat", &["127.0.0.1:0"]);
    let mut ann = client_at(ex.addr, "/chat?name=ann");
    assert_eq!(ann.read().unwrap(), Tm::text("* ann joined"));
    let mut bob = client_at(ex.addr, "/chat?name=bob+b");
    assert_eq!(bob.read().unwrap(), Tm::text("* bob b joined"));
    assert_eq!(ann.read().unwrap(), Tm::text("* bob b joined"));
    ann.send(Tm::text("hi <b>bob</b>")).unwrap();
    assert_eq!(ann.read().unwrap(), Tm::text("ann: hi <b>bob</b>"));
    assert_eq!(bob.read().unwrap(), Tm::text("ann: hi <b>bob</b>"));
    ann.send(Tm::text("  ")).unwrap(); // blank: not relayed
    let bytes: Vec<u8> = (0..=255).chain(0..=255).collect();
    bob.send(Tm::binary(bytes.clone())).unwrap();
    assert_eq!(bob.read().unwrap(), Tm::binary(bytes));
    bob.close(None).unwrap();
    // Neither the blank line nor bob's bytes reached ann: the leave notice
    // is the next thing she gets.
    assert_eq!(ann.read().unwrap(), Tm::text("* bob b left"));
}
