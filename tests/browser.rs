//! The chat example in a real browser: `tests/browser/chat.js` drives
//! headless Chromium through Playwright against `examples/chat` (two tabs
//! join room A and one room B; each room's lines and join/leave notices
//! reach its own tabs only; binary data makes the round trip; a tab
//! leaves, and one moves from B to A), and no Chromium process outlives
//! it.
//!
//! Needs /usr/bin/chromium, node, and `(cd tests/browser && npm ci)`.
//! Without them the test says on stderr what is missing and passes, unless
//! `ENJENT_REQUIRE_BROWSER=1` (as in CI). `cargo test` builds the chat
//! example before it runs this file.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::WAIT;

const CHROMIUM: &str = "/usr/bin/chromium";
/// The script stops itself after 60 s; this is the backstop.
const DEADLINE: Duration = Duration::from_secs(70);

fn script_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// What is missing to run the test, each with how to install it.
fn missing_prerequisites() -> Vec<String> {
    let mut missing = Vec::new();
    if !Path::new(CHROMIUM).is_file() {
        missing.push(format!(
            "{CHROMIUM}: apt-get install --no-install-recommends chromium"
        ));
    }
    let node = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !node.is_ok_and(|s| s.success()) {
        missing.push("node: apt-get install nodejs npm".into());
    }
    if !script_dir()
        .join("node_modules/playwright-core/package.json")
        .is_file()
    {
        missing.push(
            "tests/browser/node_modules/playwright-core: (cd tests/browser && npm ci)".into(),
        );
    }
    missing
}

/// A child's stdout or stderr, read line by line on a thread.
fn lines_of(pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// `examples/chat` on a free port; killed on drop.
struct Chat {
    child: Child,
    addr: SocketAddr,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Chat {
    fn start() -> Chat {
        let bin = support::example_bin("chat", &["examples/chat.html"]);
        let mut child = Command::new(&bin)
            .arg("127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
        let lines = lines_of(child.stdout.take().unwrap());
        let mut chat = Chat {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            lines,
            seen: Vec::new(),
        };
        let first = chat.next_line();
        chat.addr = first
            .strip_prefix("listening on ws://")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
        assert_eq!(
            chat.next_line(),
            format!("open http://{}/ in a browser", chat.addr)
        );
        chat
    }

    fn next_line(&mut self) -> String {
        let line = self
            .lines
            .recv_timeout(WAIT)
            .expect("a line from the chat example in time");
        self.seen.push(line.clone());
        line
    }

    /// Take in the lines printed so far.
    fn drain(&mut self) {
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(line);
        }
    }

    /// Wait for a line starting with `prefix`; every line seen so far if
    /// none comes.
    fn wait_for(&mut self, prefix: &str) -> Result<String, Vec<String>> {
        if let Some(l) = self.seen.iter().find(|l| l.starts_with(prefix)) {
            return Ok(l.clone());
        }
        while let Ok(line) = self.lines.recv_timeout(WAIT) {
            self.seen.push(line.clone());
            if line.starts_with(prefix) {
                return Ok(line);
            }
        }
        Err(self.seen.clone())
    }
}

impl Drop for Chat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An empty Chromium profile directory, removed on drop.
struct Profile(PathBuf);

impl Profile {
    fn new() -> Profile {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir =
            std::env::temp_dir().join(format!("enjent-chromium-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        Profile(dir)
    }

    /// Processes whose command line names this profile (Chromium's),
    /// zombies excluded (their command line is empty).
    fn users(&self) -> Vec<u32> {
        let needle = self.0.to_string_lossy().into_owned();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
            })
            .collect()
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Signal `pid` (a process this test started) with `kill`, the command.
fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Run `node chat.js URL` to its end, or stop it at `DEADLINE`: its exit
/// status (`None` if it had to be stopped), stdout and stderr.
fn run_script(url: &str, profile: &Profile) -> (Option<ExitStatus>, String, String) {
    let mut node = Command::new("node")
        .arg(script_dir().join("chat.js"))
        .arg(url)
        .env("ENJENT_BROWSER_PROFILE", &profile.0)
        .env("NO_COLOR", "1")
        .env("FORCE_COLOR", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node starts");
    let out = lines_of(node.stdout.take().unwrap());
    let err = lines_of(node.stderr.take().unwrap());
    let start = Instant::now();
    let status = loop {
        match node.try_wait().unwrap() {
            Some(status) => break Some(status),
            None if start.elapsed() > DEADLINE => break None,
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    if status.is_none() {
        // SIGTERM lets Playwright close Chromium; then no more waiting.
        signal(node.id(), "-TERM");
        let grace = Instant::now();
        while node.try_wait().unwrap().is_none() && grace.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = node.kill();
    }
    let _ = node.wait();
    let collect = |rx: mpsc::Receiver<String>| {
        let mut text = String::new();
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(2)) {
            text.push_str(&line);
            text.push('\n');
        }
        text
    };
    (status, collect(out), collect(err))
}

#[test]
fn chat_works_in_headless_chromium() {
    let missing = missing_prerequisites();
    if !missing.is_empty() {
        let list = missing.join("\n  ");
        if std::env::var("ENJENT_REQUIRE_BROWSER").as_deref() == Ok("1") {
            panic!("ENJENT_REQUIRE_BROWSER=1 but the browser test cannot run; missing:\n  {list}");
        }
        eprintln!("skipping the browser test; missing:\n  {list}");
        return;
    }
    let mut chat = Chat::start();
    let profile = Profile::new();
    let url = format!("http://{}/", chat.addr);
    let started = Instant::now();
    let (status, out, err) = run_script(&url, &profile);
    eprintln!("chat.js took {:?}:\n{out}{err}", started.elapsed());

    // Chromium must be gone with the script: give it a moment, then kill
    // what is left (ours: it runs on our profile) and fail.
    let grace = Instant::now();
    while !profile.users().is_empty() && grace.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left = profile.users();
    for pid in &left {
        signal(*pid, "-KILL");
    }

    chat.drain();
    let report = || {
        format!(
            "node stdout:\n{out}\nnode stderr:\n{err}\nchat example:\n{}",
            chat.seen.join("\n")
        )
    };
    match status {
        None => panic!("chat.js still running after {DEADLINE:?}\n{}", report()),
        Some(s) if !s.success() => panic!("chat.js failed ({s})\n{}", report()),
        Some(_) => {}
    }
    assert!(
        out.lines().any(|l| l == "PASS"),
        "no PASS line\n{}",
        report()
    );
    assert!(
        left.is_empty(),
        "Chromium processes outlived the script: {left:?}"
    );
    // Built with `deflate`, the example accepts Chromium's offer, so the
    // messages above went compressed both ways; without it, no extension.
    let extensions = out
        .lines()
        .find_map(|l| l.strip_prefix("extensions: "))
        .unwrap_or_else(|| panic!("no extensions line\n{}", report()));
    if cfg!(feature = "deflate") {
        assert_eq!(
            extensions,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
    } else {
        assert_eq!(extensions, "");
    }
    // The server saw the browsers come and go, each in its room.
    for prefix in [
        "ann joined room A from 127.0.0.1",
        "bob joined room A",
        "cy joined room B",
        "bytes joined room lobby",
        "bob left room A (1001",
        "cy left room B (1000",
        "cy joined room A",
    ] {
        if let Err(seen) = chat.wait_for(prefix) {
            panic!("the chat example never printed {prefix:?}; it printed {seen:?}");
        }
    }
}
