//! The examples run as documented: `echo` in both modes with its flags,
//! `events` printing the seed's lines, `custom_client` refusing with 403.
//! `cargo test` builds the examples before it runs this file.

mod support;

use std::io::{BufRead, BufReader};
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
        // target/debug/deps/examples-HASH -> target/debug/examples/NAME
        let exe = std::env::current_exe().unwrap();
        let bin = exe
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .join("examples")
            .join(name);
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
