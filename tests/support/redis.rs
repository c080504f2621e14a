//! A throwaway `redis-server` for the tests of the `redis` feature, and
//! `examples/pubsub --redis` instances as child processes.
//!
//! Each `Redis` runs on a free loopback port with no persistence, as a
//! child process, never the system service; it is killed on drop.

use std::io::{BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long the Redis helpers wait for Redis to reach a state.
const WAIT: Duration = Duration::from_secs(15);

pub fn redis_bin() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::iter::once(PathBuf::from("/usr/bin/redis-server"))
        .chain(std::env::split_paths(&path).map(|d| d.join("redis-server")))
        .find(|p| p.is_file())
        .or_else(|| {
            let why = "redis-server not found (looked at /usr/bin and PATH); \
                       install it with `apt-get install redis-server`";
            if std::env::var("ENJENT_REQUIRE_REDIS").as_deref() == Ok("1") {
                panic!("{why} (ENJENT_REQUIRE_REDIS=1)");
            }
            eprintln!("skipping: {why}");
            None
        })
}

/// A throwaway redis-server on a loopback port.
pub struct Redis {
    bin: PathBuf,
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
}

impl Redis {
    pub fn start() -> Option<Redis> {
        let bin = redis_bin()?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = std::env::temp_dir().join(format!("enjent-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut redis = Redis {
            bin,
            child: None,
            port,
            dir,
        };
        redis.restart();
        Some(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Start it (again) on its port, and wait until it answers.
    pub fn restart(&mut self) {
        assert!(self.child.is_none());
        let deadline = Instant::now() + WAIT;
        loop {
            let mut child = Command::new(&self.bin)
                .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .arg("--dir")
                .arg(&self.dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server");
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // the port is still taken: try again
                }
                // Our own server, not another test's that got the port
                // first: a free port is only free until someone binds it.
                if self.try_query(&["PING"]).is_ok() && self.answers_as(child.id()) {
                    self.child = Some(child);
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            assert!(Instant::now() < deadline, "redis-server did not start");
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Whether the server on our port is the process `pid`.
    fn answers_as(&self, pid: u32) -> bool {
        let line = format!("process_id:{pid}");
        self.try_query(&["INFO", "server"])
            .ok()
            .and_then(|v| redis::from_redis_value::<String>(v).ok())
            .is_some_and(|info| info.lines().any(|l| l.trim() == line))
    }

    pub fn try_query(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        query(self.port, args)
    }

    /// `PUBSUB NUMSUB channel`: how many connections subscribe it.
    pub fn numsub(&self, channel: &str) -> i64 {
        let v: Vec<redis::Value> =
            redis::from_redis_value(self.try_query(&["PUBSUB", "NUMSUB", channel]).unwrap())
                .unwrap();
        redis::from_redis_value(v[1].clone()).unwrap()
    }

    pub fn wait_numsub(&self, topic: &str, n: i64) {
        let channel = format!("enjent:t:{topic}");
        let deadline = Instant::now() + WAIT;
        let mut now = self.numsub(&channel);
        while now != n {
            assert!(
                Instant::now() < deadline,
                "NUMSUB {channel} stayed {now}, expected {n}"
            );
            thread::sleep(Duration::from_millis(10));
            now = self.numsub(&channel);
        }
    }
}

/// One command to the Redis on `port`, on a connection of its own.
pub fn query(port: u16, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let mut con = client.get_connection_with_timeout(Duration::from_secs(1))?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut con)
}

/// The largest output buffer (`omem`) of a subscribed connection of the
/// Redis on `port`.
pub fn subscriber_omem(port: u16) -> u64 {
    let list: String = redis::from_redis_value(query(port, &["CLIENT", "LIST"]).unwrap()).unwrap();
    list.lines()
        .filter(|l| l.split(' ').any(|f| f.starts_with("sub=") && f != "sub=0"))
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("omem=")))
        .filter_map(|v| v.parse().ok())
        .max()
        .unwrap_or(0)
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `examples/pubsub --redis URL` as a child process.
pub struct Instance {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Instance {
    pub fn start(redis: &Redis) -> Instance {
        let bin = super::example_bin("pubsub", &[]);
        let mut child = Command::new(&bin)
            .args(["127.0.0.1:0", "--redis", &redis.url()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ws://")
            .unwrap_or_else(|| {
                panic!(
                    "{} printed {line:?}: built without --features redis?",
                    bin.display()
                )
            })
            .parse()
            .unwrap();
        // Keep reading stdout so that the child never blocks on it.
        thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = out.read_to_end(&mut sink);
        });
        Instance { child, addr }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
