//! Topics across servers through Redis (`--features redis`): every test
//! starts its own `redis-server` on a free loopback port, with no
//! persistence, as a child process, and kills it at the end.
//!
//! Skipped, with a note on stderr, when redis-server is not installed,
//! unless `ENJENT_REQUIRE_REDIS=1` (as in CI).

#![cfg(feature = "redis")]

mod support;

use std::io::{self, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use enjent::bridge::{Bridge, BridgeEvent, RedisBridge};
use enjent::{Client, Message, WebSocketServer};
use support::redis::{Instance, Redis, subscriber_omem};
use support::{frame, raw_ws, try_read_frame, within};

const WAIT: Duration = Duration::from_secs(15);

// ------------------------------------------------------- enjent instances

/// An instance in this process that speaks the pubsub example's text
/// protocol, and records what its bridge told.
struct Node {
    server: WebSocketServer,
    told: Arc<Mutex<Vec<BridgeEvent>>>,
}

fn command(client: &Client, message: Message) {
    let Some(text) = message.as_text() else {
        return;
    };
    let (verb, rest) = text.split_once(' ').unwrap_or((text, ""));
    match verb {
        "sub" => {
            client.subscribe(rest).unwrap();
            // Tell the client its subscription is in place here.
            let _ = client.send(format!("subscribed {rest}"));
        }
        "unsub" => {
            client.unsubscribe(rest);
        }
        "pub" => {
            let (topic, payload) = rest.split_once(' ').unwrap();
            client.publish(topic, payload);
        }
        _ => panic!("unexpected command {text:?}"),
    }
}

impl Node {
    fn start(redis: &Redis) -> Node {
        Node::start_with(redis, |b| b)
    }

    fn start_with(redis: &Redis, f: impl FnOnce(enjent::Builder) -> enjent::Builder) -> Node {
        let node = Node::start_at(&redis.url(), f);
        node.wait_told(|e| *e == BridgeEvent::Up, "Up at start", 0);
        node
    }

    /// An instance on the Redis at `url`, not waiting for it to be up.
    fn start_at(url: &str, f: impl FnOnce(enjent::Builder) -> enjent::Builder) -> Node {
        // Redis is killed outright here, which every connection notices
        // at once: the timeout is for a Redis that hangs, and long enough
        // that a loaded machine is not taken for one (a reconnection
        // would lose messages, and the tests count those).
        Node::start_timeout(url, Duration::from_secs(5), f)
    }

    /// As `start_at`, with the bridge's Redis `timeout`.
    fn start_timeout(
        url: &str,
        timeout: Duration,
        f: impl FnOnce(enjent::Builder) -> enjent::Builder,
    ) -> Node {
        let told: Arc<Mutex<Vec<BridgeEvent>>> = Arc::default();
        let t = Arc::clone(&told);
        let bridge = RedisBridge::new(url).unwrap().timeout(timeout);
        let builder = WebSocketServer::builder()
            .workers(2)
            .bridge(bridge)
            .on_bridge(move |e| t.lock().unwrap().push(e.clone()))
            .on_message(command);
        let server = f(builder).start("127.0.0.1:0").unwrap();
        Node { server, told }
    }

    fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Wait until the bridge told an event matching `f` after the first
    /// `skip` it told.
    fn wait_told(&self, f: impl Fn(&BridgeEvent) -> bool, what: &str, skip: usize) {
        let deadline = Instant::now() + WAIT;
        while !self.told.lock().unwrap().iter().skip(skip).any(&f) {
            assert!(
                Instant::now() < deadline,
                "the bridge never told {what}: {:?}",
                self.told.lock().unwrap()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn told_count(&self) -> usize {
        self.told.lock().unwrap().len()
    }

    fn bridge(&self) -> enjent::BridgeStats {
        self.server.stats().bridge.expect("a bridge")
    }
}

/// Two instances: a client of the second subscribed to `topic`, at Redis
/// too; the first to publish.
fn publisher_and_subscriber(redis: &Redis, topic: &str) -> (Node, Node, Peer) {
    let a = Node::start(redis);
    let b = Node::start(redis);
    let mut sub = Peer::connect(b.addr());
    sub.sub(topic);
    redis.wait_numsub(topic, 1);
    (a, b, sub)
}

/// A raw WebSocket client of the text protocol.
struct Peer {
    s: TcpStream,
    r: BufReader<TcpStream>,
}

impl Peer {
    fn connect(addr: SocketAddr) -> Peer {
        let s = raw_ws(addr);
        s.set_read_timeout(Some(WAIT)).unwrap();
        let r = BufReader::new(s.try_clone().unwrap());
        Peer { s, r }
    }

    fn say(&mut self, text: &str) {
        self.s.write_all(&frame(0x81, text.as_bytes())).unwrap();
    }

    fn read(&mut self) -> io::Result<String> {
        let (op, p) = try_read_frame(&mut self.r)?;
        assert_eq!(op, 0x81, "a text frame");
        Ok(String::from_utf8(p).unwrap())
    }

    fn sub(&mut self, topic: &str) {
        self.say(&format!("sub {topic}"));
        assert_eq!(self.read().unwrap(), format!("subscribed {topic}"));
    }

    /// Nothing arrives within `d`.
    fn silent_for(&mut self, d: Duration) -> bool {
        self.s.set_read_timeout(Some(d)).unwrap();
        let mut b = [0u8; 1];
        let quiet = matches!(self.r.read(&mut b), Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut));
        self.s.set_read_timeout(Some(WAIT)).unwrap();
        quiet
    }
}

// ------------------------------------------------------------------ tests

#[test]
fn three_instances_deliver_every_publish_once_in_order_and_not_to_its_sender() {
    let Some(redis) = Redis::start() else { return };
    within(Duration::from_secs(60), move || {
        const EACH: usize = 2;
        const M: usize = 300;
        let nodes: Vec<Node> = (0..3).map(|_| Node::start(&redis)).collect();
        let mut peers = Vec::new();
        for node in &nodes {
            for _ in 0..EACH {
                let mut p = Peer::connect(node.addr());
                p.sub("room");
                peers.push(p);
            }
        }
        redis.wait_numsub("room", 3);
        let n = peers.len();
        // Every peer publishes M numbered messages while it reads.
        let handles: Vec<_> = peers
            .into_iter()
            .enumerate()
            .map(|(me, mut p)| {
                thread::spawn(move || {
                    let mut w = p.s.try_clone().unwrap();
                    let writer = thread::spawn(move || {
                        for i in 0..M {
                            let pad = "x".repeat(i % 97);
                            w.write_all(&frame(
                                0x81,
                                format!("pub room {me} {i} {pad}").as_bytes(),
                            ))
                            .unwrap();
                        }
                    });
                    let mut next = vec![0usize; n];
                    for _ in 0..(n - 1) * M {
                        let text = p.read().expect("every publish of the others");
                        let mut words = text.split(' ');
                        let from: usize = words.next().unwrap().parse().unwrap();
                        let i: usize = words.next().unwrap().parse().unwrap();
                        assert_ne!(from, me, "a peer got its own publish");
                        assert_eq!(i, next[from], "peer {me}: from {from}, out of order");
                        next[from] += 1;
                    }
                    writer.join().unwrap();
                    // And nothing more: no duplicate comes late.
                    assert!(
                        p.silent_for(Duration::from_millis(300)),
                        "peer {me}: a duplicate"
                    );
                    next
                })
            })
            .collect();
        for (me, h) in handles.into_iter().enumerate() {
            let next = h.join().unwrap();
            for (from, &got) in next.iter().enumerate() {
                assert_eq!(got, if from == me { 0 } else { M });
            }
        }
        for node in &nodes {
            let b = node.bridge();
            assert_eq!(
                (b.missed, b.duplicates, b.invalid, b.dropped),
                (0, 0, 0, 0),
                "{b:?}"
            );
            assert!(b.up);
            // Each node published its own peers' messages once, and got
            // the other nodes' ones once.
            assert_eq!(b.published, (EACH * M) as u64);
            assert_eq!(b.received, (2 * EACH * M) as u64);
        }
    });
}

#[test]
fn numsub_counts_the_instances_with_local_subscribers() {
    let Some(redis) = Redis::start() else { return };
    within(Duration::from_secs(60), move || {
        let (a, b, c) = (
            Node::start(&redis),
            Node::start(&redis),
            Node::start(&redis),
        );
        assert_eq!(redis.numsub("enjent:t:t"), 0);
        let mut pa = Peer::connect(a.addr());
        pa.sub("t");
        redis.wait_numsub("t", 1);
        let mut pb1 = Peer::connect(b.addr());
        pb1.sub("t");
        redis.wait_numsub("t", 2);
        let mut pb2 = Peer::connect(b.addr());
        pb2.sub("t");
        let pc = Peer::connect(c.addr());
        // A second subscriber on B subscribes nothing more at Redis; C has
        // none.
        thread::sleep(Duration::from_millis(200));
        assert_eq!(redis.numsub("enjent:t:t"), 2);
        assert_eq!(b.bridge().channels, 1);
        assert_eq!(c.bridge().channels, 0);
        pb1.say("unsub t");
        thread::sleep(Duration::from_millis(200));
        assert_eq!(redis.numsub("enjent:t:t"), 2, "B still has a subscriber");
        // The last one on B leaves by disconnecting.
        drop(pb2);
        redis.wait_numsub("t", 1);
        pa.say("unsub t");
        redis.wait_numsub("t", 0);
        // Each server's count follows once its unsubscribe is answered.
        let deadline = Instant::now() + WAIT;
        while [&a, &b, &c].iter().any(|n| n.bridge().channels != 0) {
            assert!(Instant::now() < deadline, "a server still counts a channel");
            thread::sleep(Duration::from_millis(10));
        }
        drop((pb1, pc));
    });
}

#[test]
fn a_message_to_one_user_reaches_them_on_whichever_instance_they_are() {
    let Some(redis) = Redis::start() else { return };
    within(Duration::from_secs(60), move || {
        let nodes: Vec<Node> = (0..3).map(|_| Node::start(&redis)).collect();
        // Each user subscribes to a topic of their own where they connect.
        let users = ["ann", "bob", "cat"];
        let mut peers: Vec<Peer> = users
            .iter()
            .zip(&nodes)
            .map(|(u, n)| {
                let mut p = Peer::connect(n.addr());
                p.sub(&format!("user:{u}"));
                p
            })
            .collect();
        for u in users {
            redis.wait_numsub(&format!("user:{u}"), 1);
        }
        // From the first instance's server side, to each user.
        for u in users {
            nodes[0]
                .server
                .publish(&format!("user:{u}"), format!("hello {u}"));
        }
        for (p, u) in peers.iter_mut().zip(users) {
            assert_eq!(p.read().unwrap(), format!("hello {u}"));
            assert!(
                p.silent_for(Duration::from_millis(200)),
                "{u} got another's"
            );
        }
    });
}

#[test]
fn redis_killed_mid_stream_local_delivery_goes_on_and_gaps_are_counted() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    within(Duration::from_secs(90), move || {
        // A small outbox, so that most of what is published during the
        // outage overflows it and is dropped.
        let a = Node::start_with(&redis, |b| b.bridge_outbox_bytes(2048));
        let b = Node::start(&redis);
        let mut local = Peer::connect(a.addr());
        local.sub("feed");
        let mut remote = Peer::connect(b.addr());
        remote.sub("feed");
        redis.wait_numsub("feed", 2);

        // A publishes a numbered message every millisecond throughout.
        let stop = Arc::new(AtomicBool::new(false));
        let published = Arc::new(AtomicU64::new(0));
        let slowest = Arc::new(AtomicU64::new(0));
        let publisher = {
            let (stop, published, slowest) = (stop.clone(), published.clone(), slowest.clone());
            let handle = a.server.handle();
            thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Relaxed) {
                    let t = Instant::now();
                    handle.publish("feed", format!("{i}"));
                    slowest.fetch_max(t.elapsed().as_micros() as u64, Relaxed);
                    i += 1;
                    published.store(i, Relaxed);
                    thread::sleep(Duration::from_millis(1));
                }
            })
        };
        // Readers: the numbers each peer got.
        let reader = |mut p: Peer| {
            thread::spawn(move || {
                let mut got = Vec::new();
                while let Ok(t) = p.read() {
                    if t == "end" {
                        break;
                    }
                    got.push(t.parse::<u64>().unwrap());
                }
                got
            })
        };
        let local_count = Arc::new(AtomicU64::new(0));
        let local_reader = {
            let count = Arc::clone(&local_count);
            thread::spawn(move || {
                let mut got = Vec::new();
                while let Ok(t) = local.read() {
                    if t == "end" {
                        break;
                    }
                    got.push(t.parse::<u64>().unwrap());
                    count.store(got.len() as u64, Relaxed);
                }
                got
            })
        };
        let remote_reader = reader(remote);

        thread::sleep(Duration::from_millis(300));
        let (told_a, told_b) = (a.told_count(), b.told_count());
        redis.kill9();
        let down = |e: &BridgeEvent| matches!(e, BridgeEvent::Down { .. });
        a.wait_told(down, "Down", told_a);
        b.wait_told(down, "Down", told_b);
        assert!(!a.bridge().up && !b.bridge().up);
        // Down, local delivery goes on.
        let before = local_count.load(Relaxed);
        thread::sleep(Duration::from_millis(1000));
        assert!(
            local_count.load(Relaxed) > before + 20,
            "local delivery stalled while Redis was down"
        );
        let (told_a, told_b) = (a.told_count(), b.told_count());
        redis.restart();
        a.wait_told(|e| *e == BridgeEvent::Up, "Up again", told_a);
        b.wait_told(|e| *e == BridgeEvent::Up, "Up again", told_b);
        redis.wait_numsub("feed", 2);
        thread::sleep(Duration::from_millis(300));
        stop.store(true, Relaxed);
        publisher.join().unwrap();
        let total = published.load(Relaxed);
        // The last numbered message reached B: it is caught up.
        let last = (total - 1).to_string();
        let deadline = Instant::now() + WAIT;
        while b.bridge().received == 0 || a.bridge().outbox_bytes > 0 {
            assert!(Instant::now() < deadline);
            thread::sleep(Duration::from_millis(10));
        }
        thread::sleep(Duration::from_millis(300));
        a.server.publish("feed", "end");
        let local_got = local_reader.join().unwrap();
        let remote_got = remote_reader.join().unwrap();

        // Locally: everything, in order.
        assert_eq!(local_got, (0..total).collect::<Vec<_>>());
        // Remotely: in order, no duplicate, up to the last; and every
        // number not received is counted as missed.
        assert!(
            remote_got.windows(2).all(|w| w[0] < w[1]),
            "out of order or twice"
        );
        assert_eq!(remote_got.first(), Some(&0));
        assert_eq!(remote_got.last().map(u64::to_string), Some(last));
        let bs = b.bridge();
        let missed = bs
            .missed_by_origin
            .get(&a.bridge().origin)
            .copied()
            .unwrap_or(0);
        assert_eq!(
            remote_got.len() as u64 + missed,
            total,
            "received {} + missed {missed} != published {total}; {bs:?}",
            remote_got.len()
        );
        assert!(missed > 0, "the outage lost nothing? {bs:?}");
        assert!(a.bridge().dropped > 0);
        assert_eq!(bs.missed, missed);
        assert!(bs.reconnects >= 1);
        // publish never waited for Redis (whose timeouts are 5 s; the
        // bound leaves room for a loaded machine's scheduling).
        let slowest = Duration::from_micros(slowest.load(Relaxed));
        assert!(
            slowest < Duration::from_secs(2),
            "a publish took {slowest:?}"
        );
    });
}

#[test]
fn a_client_that_stops_reading_harms_no_one_and_redis_buffers_stay_small() {
    let Some(redis) = Redis::start() else { return };
    within(Duration::from_secs(90), move || {
        // 12.8 MB: more than the stalled client's socket buffers and queue
        // can hold, in bursts of 640 KB.
        const N: usize = 400;
        const BURST: usize = 20;
        const SIZE: usize = 32 * 1024;
        let a = Node::start(&redis);
        let b = Node::start(&redis);
        let mut stalled = Peer::connect(b.addr());
        stalled.sub("big");
        let mut fast = Peer::connect(b.addr());
        fast.sub("big");
        redis.wait_numsub("big", 1);
        let omem = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (omem, done) = (omem.clone(), done.clone());
            let port = redis.port;
            thread::spawn(move || {
                while !done.load(Relaxed) {
                    omem.fetch_max(subscriber_omem(port), Relaxed);
                    thread::sleep(Duration::from_millis(5));
                }
            })
        };
        // A burst from A, then B's reading client gets all of it: B's
        // bridge never waits for the stalled client.
        let pad = "p".repeat(SIZE);
        for burst in 0..N / BURST {
            for i in burst * BURST..(burst + 1) * BURST {
                a.server.publish("big", format!("{i} {pad}"));
            }
            for i in burst * BURST..(burst + 1) * BURST {
                let t = fast.read().unwrap_or_else(|e| {
                    panic!(
                        "message {i} never came: {e}\nA: {:?}\nB: {:?}",
                        a.server.stats(),
                        b.server.stats()
                    )
                });
                assert!(t.starts_with(&format!("{i} ")), "message {i} out of order");
            }
        }
        done.store(true, Relaxed);
        sampler.join().unwrap();
        let omem = omem.load(Relaxed);
        eprintln!("{N} x {SIZE} B through Redis: largest subscriber output buffer {omem} B");
        assert!(omem < 2 << 20, "Redis buffered {omem} B for a subscriber");
        let bs = b.bridge();
        assert_eq!((bs.received, bs.missed), (N as u64, 0));
        // The stalled client was refused copies; the reading one got all.
        let stats = b.server.stats();
        assert!(stats.messages_dropped > 0, "{stats:?}");
        drop(stalled);
    });
}

#[test]
fn killing_one_instance_leaves_the_others_working() {
    let Some(redis) = Redis::start() else { return };
    within(Duration::from_secs(60), move || {
        let mut instances: Vec<Instance> = (0..3).map(|_| Instance::start(&redis)).collect();
        let mut peers: Vec<Peer> = instances
            .iter()
            .map(|i| {
                let mut p = Peer::connect(i.addr);
                p.say("sub t");
                p
            })
            .collect();
        redis.wait_numsub("t", 3);
        // From the third instance, to the two others.
        peers[2].say("pub t before");
        for p in &mut peers[..2] {
            assert_eq!(p.read().unwrap(), "before");
        }
        // kill -9 the third.
        let mut gone = instances.pop().unwrap();
        gone.child.kill().unwrap();
        gone.child.wait().unwrap();
        redis.wait_numsub("t", 2);
        peers[0].say("pub t after");
        assert_eq!(peers[1].read().unwrap(), "after");
        peers[1].say("pub t back");
        assert_eq!(peers[0].read().unwrap(), "back");
        assert!(peers[0].silent_for(Duration::from_millis(200)));
        assert!(peers[1].silent_for(Duration::from_millis(200)));
        drop(gone);
    });
}

/// Publishes waiting in the outbox for an engine that is down when the
/// server shuts down are lost: they are counted as dropped, as are
/// publishes made after the bridge stopped. (Needs no redis-server: the
/// bridge points at a port nothing listens on.)
#[test]
fn publishes_the_engine_never_took_by_shutdown_are_counted_dropped() {
    // A port bound but not listening, held to the end: connects to it are
    // refused, and no redis-server another test starts can take it.
    let holder = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    holder
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let port = holder.local_addr().unwrap().as_socket().unwrap().port();
    let told: Arc<Mutex<Vec<BridgeEvent>>> = Arc::default();
    let t = Arc::clone(&told);
    let server = WebSocketServer::builder()
        .workers(2)
        .close_timeout(Duration::from_millis(500))
        .bridge(RedisBridge::new(&format!("redis://127.0.0.1:{port}")).unwrap())
        .on_bridge(move |e| t.lock().unwrap().push(e.clone()))
        .start("127.0.0.1:0")
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while !told
        .lock()
        .unwrap()
        .iter()
        .any(|e| matches!(e, BridgeEvent::Down { .. }))
    {
        assert!(Instant::now() < deadline, "never told Down");
        thread::sleep(Duration::from_millis(10));
    }
    for i in 0..50 {
        server.publish("t", format!("{i}"));
    }
    let before = server.stats().bridge.unwrap();
    assert_eq!(before.dropped + before.published + before.refused, 0);
    assert!(before.outbox_bytes > 0);
    server.shutdown();
    server.publish("t", "after");
    let after = server.stats().bridge.unwrap();
    assert_eq!(
        (
            after.dropped,
            after.published,
            after.refused,
            after.outbox_bytes
        ),
        (51, 0, 0, 0),
        "{after:?}"
    );
    drop(holder);
}

#[test]
fn the_stats_of_a_server_without_a_bridge_have_none() {
    let server = WebSocketServer::builder().start("127.0.0.1:0").unwrap();
    assert!(server.stats().bridge.is_none());
}

#[test]
fn an_on_bridge_closure_may_shut_the_server_down() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    within(Duration::from_secs(60), move || {
        // A common policy: on Down, stop, and let the orchestrator
        // restart the process.
        let handle: Arc<Mutex<Option<enjent::ServerHandle>>> = Arc::default();
        let h = Arc::clone(&handle);
        let server = WebSocketServer::builder()
            .bridge(
                RedisBridge::new(&redis.url())
                    .unwrap()
                    .timeout(Duration::from_millis(500)),
            )
            .on_bridge(move |e| {
                if matches!(e, BridgeEvent::Down { .. })
                    && let Some(h) = h.lock().unwrap().as_ref()
                {
                    h.shutdown();
                }
            })
            .start("127.0.0.1:0")
            .unwrap();
        *handle.lock().unwrap() = Some(server.handle());
        let deadline = Instant::now() + WAIT;
        while !server.stats().bridge.unwrap().up {
            assert!(Instant::now() < deadline, "never up");
            thread::sleep(Duration::from_millis(10));
        }
        redis.kill9();
        // The event stream ends: the server shut down.
        for _ in server.events() {}
        drop(server);
    });
}

#[test]
fn after_an_outage_exactly_the_topics_with_subscribers_are_subscribed_again() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    within(Duration::from_secs(60), move || {
        let a = Node::start(&redis);
        let mut keep = Peer::connect(a.addr());
        keep.sub("kept");
        let mut leaving = Peer::connect(a.addr());
        leaving.sub("left");
        redis.wait_numsub("kept", 1);
        redis.wait_numsub("left", 1);
        let told = a.told_count();
        redis.kill9();
        a.wait_told(|e| matches!(e, BridgeEvent::Down { .. }), "Down", told);
        // While Redis is down: one topic loses its subscriber, many come
        // and go (a user topic per connection, say), one is new.
        leaving.say("unsub left");
        let mut churn = Peer::connect(a.addr());
        for i in 0..2000 {
            churn.say(&format!("sub u{i}"));
            churn.say(&format!("unsub u{i}"));
        }
        for i in 0..2000 {
            assert_eq!(churn.read().unwrap(), format!("subscribed u{i}"));
        }
        churn.sub("new");
        let told = a.told_count();
        redis.restart();
        a.wait_told(|e| *e == BridgeEvent::Up, "Up again", told);
        let channels: Vec<String> = redis::from_redis_value(
            support::redis::query(redis.port, &["PUBSUB", "CHANNELS", "enjent:t:*"]).unwrap(),
        )
        .unwrap();
        let mut channels = channels;
        channels.sort();
        assert_eq!(channels, ["enjent:t:kept", "enjent:t:new"]);
        assert_eq!(a.bridge().channels, 2);
    });
}

/// `received` counts publishes that reached subscribers here. A topic's
/// channel is kept a second after its last subscriber here leaves; what
/// comes for it meanwhile reaches nobody and is not counted. (It was: every
/// client leaving its own topic left a second of such phantoms.)
#[test]
fn publishes_to_a_topic_nobody_here_subscribes_any_more_are_not_counted_received() {
    let Some(redis) = Redis::start() else { return };
    within(Duration::from_secs(60), move || {
        let (a, b, mut sub) = publisher_and_subscriber(&redis, "t");
        sub.sub("u");
        redis.wait_numsub("u", 1);
        // Done when the next command is answered: B lets the channel go
        // only a second later.
        sub.say("unsub t");
        sub.sub("v");
        assert_eq!(
            redis.numsub("enjent:t:t"),
            1,
            "B let the channel go already"
        );
        let handle = a.server.handle();
        for _ in 0..100 {
            handle.publish("t", "x");
        }
        handle.publish("u", "last");
        // One connection, in order: the 100 came to B before this.
        assert_eq!(sub.read().unwrap(), "last");
        // Counted just after the delivery.
        let t = Instant::now();
        while b.bridge().received == 0 {
            assert!(t.elapsed() < WAIT, "the last one was not counted");
            thread::sleep(Duration::from_millis(5));
        }
        let bb = b.bridge();
        assert_eq!((bb.received, bb.missed, bb.invalid), (1, 0, 0), "{bb:?}");
    });
}

#[test]
fn unsubscribing_and_subscribing_again_counts_nothing_missed() {
    let Some(redis) = Redis::start() else { return };
    within(Duration::from_secs(60), move || {
        let (a, b, sub) = publisher_and_subscriber(&redis, "t");
        let stop = Arc::new(AtomicBool::new(false));
        let publisher = {
            let (stop, handle) = (stop.clone(), a.server.handle());
            thread::spawn(move || {
                while !stop.load(Relaxed) {
                    handle.publish("t", "x".repeat(100));
                    thread::sleep(Duration::from_micros(200));
                }
            })
        };
        // B's only subscriber leaves and comes back while A publishes:
        // quickly (B keeps the channel a moment), then twice long enough
        // for B to unsubscribe at Redis, and subscribe again.
        let mut r = sub.s.try_clone().unwrap();
        for _ in 0..30 {
            r.write_all(&frame(0x81, b"unsub t")).unwrap();
            thread::sleep(Duration::from_millis(5));
            r.write_all(&frame(0x81, b"sub t")).unwrap();
            thread::sleep(Duration::from_millis(10));
        }
        for _ in 0..2 {
            r.write_all(&frame(0x81, b"unsub t")).unwrap();
            redis.wait_numsub("t", 0);
            r.write_all(&frame(0x81, b"sub t")).unwrap();
            redis.wait_numsub("t", 1);
            thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, Relaxed);
        publisher.join().unwrap();
        let (ab, bb) = (a.bridge(), b.bridge());
        assert_eq!(ab.dropped, 0, "{ab:?}");
        assert!(bb.received > 0, "{bb:?}");
        assert_eq!(
            (bb.missed, bb.invalid),
            (0, 0),
            "{bb:?}\nA told {:?}\nB told {:?}",
            a.told.lock().unwrap(),
            b.told.lock().unwrap()
        );
    });
}

#[test]
fn forged_and_garbage_messages_on_the_channels_harm_nothing() {
    let Some(redis) = Redis::start() else { return };
    within(Duration::from_secs(60), move || {
        let (a, b, mut sub) = publisher_and_subscriber(&redis, "t");
        a.server.publish("t", "first");
        assert_eq!(sub.read().unwrap(), "first");
        // Someone else on Redis: garbage, a bad version, bad UTF-8, and
        // an envelope claiming A's origin with the largest number.
        let origin = a.bridge().origin;
        let forged = |kind: u8, seq: u64, payload: &[u8]| {
            let mut e = vec![1, kind];
            e.extend_from_slice(&origin.to_be_bytes());
            e.extend_from_slice(&0u32.to_be_bytes());
            e.extend_from_slice(&seq.to_be_bytes());
            e.extend_from_slice(payload);
            e
        };
        let client = redis::Client::open(redis.url()).unwrap();
        let mut con = client.get_connection().unwrap();
        for data in [
            b"garbage".to_vec(),
            vec![9; 40],
            forged(0, 2, &[0xff, 0xfe]),
            forged(7, 2, b"bad kind"),
            forged(0, u64::MAX, b"forged"),
        ] {
            let _: i64 = redis::cmd("PUBLISH")
                .arg("enjent:t:t")
                .arg(data)
                .query(&mut con)
                .unwrap();
        }
        // A's own messages still arrive, in order.
        for i in 0..5 {
            a.server.publish("t", format!("real {i}"));
        }
        let mut got = Vec::new();
        while got.len() < 5 {
            let t = sub.read().unwrap();
            if t.starts_with("real") {
                got.push(t);
            }
        }
        assert_eq!(got, (0..5).map(|i| format!("real {i}")).collect::<Vec<_>>());
        let bb = b.bridge();
        assert!(bb.invalid >= 4, "{bb:?}");
        assert!(bb.up);
    });
}

#[test]
fn a_redis_user_refused_some_channels_gets_them_counted_and_the_rest_through() {
    let Some(redis) = Redis::start() else { return };
    within(Duration::from_secs(60), move || {
        // Publishing only to topics starting with "ok", and its own
        // control channel.
        let url = redis_user(&redis, "limited", &["&enjent:t:ok*", "&enjent:c:*"]);
        let a = Node::start_at(&url, |b| b);
        a.wait_told(|e| *e == BridgeEvent::Up, "Up", 0);
        let b = Node::start(&redis);
        let mut sub = Peer::connect(b.addr());
        sub.sub("ok1");
        redis.wait_numsub("ok1", 1);
        a.server.publish("nope", "refused");
        a.server.publish("ok1", "through");
        assert_eq!(sub.read().unwrap(), "through");
        let deadline = Instant::now() + WAIT;
        while a.bridge().refused != 1 {
            assert!(Instant::now() < deadline, "{:?}", a.bridge());
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(a.bridge().published, 1);

        // A topic it may not subscribe to, asked for with others: Redis
        // refuses the whole command, and the others must still be
        // subscribed. (Before, they were not, and nothing counted it.)
        let mut mixed = Peer::connect(a.addr());
        let topics: Vec<String> = (0..20).map(|i| format!("ok-mixed-{i}")).collect();
        let mut wire = frame(0x81, b"sub nope");
        for t in &topics {
            wire.extend(frame(0x81, format!("sub {t}").as_bytes()));
        }
        mixed.s.write_all(&wire).unwrap();
        assert_eq!(mixed.read().unwrap(), "subscribed nope");
        for t in &topics {
            assert_eq!(mixed.read().unwrap(), format!("subscribed {t}"));
        }
        for t in &topics {
            redis.wait_numsub(t, 1);
        }
        for t in &topics {
            b.server.publish(t, t.as_str());
        }
        for t in &topics {
            assert_eq!(&mixed.read().unwrap(), t);
        }
        let stats = a.bridge();
        // Each session counts the refusal again: at least this one.
        assert!(stats.refused >= 2 && stats.channels == 20, "{stats:?}");

        // A user with no channel at all never comes up, and says why.
        let url = redis_user(&redis, "none", &[]);
        let c = Node::start_at(&url, |b| b);
        c.wait_told(
            |e| matches!(e, BridgeEvent::Down { error } if error.contains("permissions")),
            "Down for the permissions",
            0,
        );
        assert!(!c.told.lock().unwrap().contains(&BridgeEvent::Up));
        assert!(!c.bridge().up);
    });
}

/// A Redis user `name` that may use the channels `channels` (ACL
/// patterns) and any key and command; its URL.
fn redis_user(redis: &Redis, name: &str, channels: &[&str]) -> String {
    let mut args = vec![
        "ACL",
        "SETUSER",
        name,
        "on",
        ">secret",
        "~*",
        "+@all",
        "resetchannels",
    ];
    args.extend_from_slice(channels);
    let _: redis::Value = support::redis::query(redis.port, &args).unwrap();
    format!("redis://{name}:secret@127.0.0.1:{}/", redis.port)
}

/// The Redis adapter's receiving connection, driven directly: a
/// `SUBSCRIBE` that one forbidden channel makes Redis refuse whole is
/// made again channel by channel, so that the others are subscribed and
/// only the forbidden one is named refused; and reads that time out, each
/// followed by a `PING`, keep the connection working. (The first version
/// of this adapter read idle messages as answers: after a timeout the
/// client library skipped the next thing read, the `PING`'s answer, and
/// the connection failed at every idle second.)
#[test]
fn the_redis_receiver_subscribes_around_a_refused_channel_and_outlives_idle_reads() {
    let Some(redis) = Redis::start() else { return };
    within(Duration::from_secs(60), move || {
        let url = redis_user(&redis, "okonly", &["&enjent:t:ok*"]);
        let bridge = RedisBridge::new(&url)
            .unwrap()
            .timeout(Duration::from_millis(500));
        bridge
            .subscriber(&mut |sub| {
                sub.subscribe(&["enjent:t:ok-a", "enjent:t:nope", "enjent:t:ok-b"])?;
                assert_eq!(sub.take_refused(), vec!["enjent:t:nope".to_owned()]);
                assert_eq!(redis.numsub("enjent:t:ok-a"), 1);
                assert_eq!(redis.numsub("enjent:t:ok-b"), 1);
                // Idle reads, each ending in a PING, past the timeout.
                let idle = Instant::now();
                while idle.elapsed() < Duration::from_millis(1500) {
                    assert_eq!(sub.receive(Duration::from_millis(100))?, None);
                }
                let _: redis::Value =
                    support::redis::query(redis.port, &["PUBLISH", "enjent:t:ok-b", "hi"]).unwrap();
                let got = sub.receive(Duration::from_secs(5))?;
                assert_eq!(got, Some(("enjent:t:ok-b".to_owned(), b"hi".to_vec())));
                Ok(())
            })
            .unwrap();
    });
}

/// A batch of publishes that Redis stops answering fails within about the
/// timeout, however many it holds. The client library's pipeline read on
/// after an answer that timed out, each read waiting the whole timeout
/// again: a batch of 300 to a Redis gone silent took 300 timeouts (here
/// 30 s; with the defaults and a full batch of 512, 17 minutes), the bridge
/// down all that time and every publish meanwhile dropped.
#[test]
fn a_batch_to_a_redis_that_stops_answering_fails_within_the_timeout() {
    let Some(redis) = Redis::start() else { return };
    within(Duration::from_secs(60), move || {
        let payload = [7u8; 64];
        let batch: Vec<(&str, &[u8])> = (0..300).map(|_| ("enjent:t:x", &payload[..])).collect();
        let mut refused = Vec::new();
        // Answered while Redis answers (with a timeout a loaded machine
        // meets).
        let bridge = RedisBridge::new(&redis.url()).unwrap();
        bridge
            .publisher()
            .unwrap()
            .publish(&batch, &mut refused)
            .unwrap();
        assert!(refused.is_empty(), "{refused:?}");
        let bridge = bridge.timeout(Duration::from_millis(100));
        let mut publisher = bridge.publisher().unwrap();
        // Held, as `FAILOVER` holds them: nothing is answered.
        redis
            .try_query(&["CLIENT", "PAUSE", "20000", "WRITE"])
            .unwrap();
        let t = Instant::now();
        let sent = publisher.publish(&batch, &mut refused);
        let took = t.elapsed();
        redis.try_query(&["CLIENT", "UNPAUSE"]).unwrap();
        let e = sent.expect_err("a batch nobody answered succeeded");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(
            took < Duration::from_secs(1),
            "the batch failed after {took:?}"
        );
    });
}

/// A Redis that holds publishes (`CLIENT PAUSE WRITE`, which `FAILOVER`
/// also does) still takes new connections: a publisher that timed out
/// and connected again has proved no round trip, and the bridge is not
/// told `Up` until a wake-up of its own came back, after the pause. Before,
/// each reconnection told `Up` (and counted a reconnect), and the next
/// timeout `Down`, all through the pause.
#[test]
fn a_redis_that_holds_publishes_is_not_told_up_by_a_reconnection() {
    let Some(redis) = Redis::start() else {
        return;
    };
    within(Duration::from_secs(60), move || {
        let a = Node::start_timeout(&redis.url(), Duration::from_millis(300), |b| b);
        a.wait_told(|e| *e == BridgeEvent::Up, "Up at start", 0);
        let skip = a.told_count();
        let reconnects = a.bridge().reconnects;
        redis
            .try_query(&["CLIENT", "PAUSE", "3000", "WRITE"])
            .unwrap();
        let paused = Instant::now();
        let handle = a.server.handle();
        // Publishes through most of the pause: each waits at Redis, times
        // out, and the publisher connects again.
        while paused.elapsed() < Duration::from_millis(2500) {
            handle.publish("t", "x");
            thread::sleep(Duration::from_millis(50));
        }
        let during: Vec<BridgeEvent> = a.told.lock().unwrap()[skip..].to_vec();
        assert!(
            during.iter().any(|e| matches!(e, BridgeEvent::Down { .. })),
            "no timeout during the pause: {during:?}"
        );
        assert!(
            !during.contains(&BridgeEvent::Up),
            "told Up while Redis held every publish: {during:?}"
        );
        // After the pause, one Up and one reconnect.
        a.wait_told(|e| *e == BridgeEvent::Up, "Up after the pause", skip);
        assert_eq!(a.bridge().reconnects, reconnects + 1);
    });
}

/// An envelope with a sequence number from origin `origin` (epoch 0).
fn envelope(origin: u64, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut e = vec![1, 0];
    e.extend_from_slice(&origin.to_be_bytes());
    e.extend_from_slice(&0u32.to_be_bytes());
    e.extend_from_slice(&seq.to_be_bytes());
    e.extend_from_slice(payload);
    e
}

fn redis_publish(con: &mut redis::Connection, topic: &str, data: Vec<u8>) {
    let _: i64 = redis::cmd("PUBLISH")
        .arg(format!("enjent:t:{topic}"))
        .arg(data)
        .query(con)
        .unwrap();
}

/// What the README's "Guarantees" say of forged numbers, checked: an
/// envelope up to 511 ahead of an origin's number makes the genuine
/// messages it skipped count as duplicates (dropped, and counted), and
/// the origin is heard again once its numbers pass the forged one. And
/// gaps on many topics at once are all counted, but told as at most 16
/// `Missed` events a second.
#[test]
fn forged_numbers_and_gaps_on_many_topics_are_counted_and_told_at_a_bounded_rate() {
    let Some(redis) = Redis::start() else { return };
    within(Duration::from_secs(90), move || {
        let (a, b, mut sub) = publisher_and_subscriber(&redis, "t");
        a.server.publish("t", "first"); // a's number 1 on "t"
        assert_eq!(sub.read().unwrap(), "first");
        let client = redis::Client::open(redis.url()).unwrap();
        let mut con = client.get_connection().unwrap();
        let origin = a.bridge().origin;
        // 100 ahead: believed, delivered, 99 counted missed.
        redis_publish(&mut con, "t", envelope(origin, 101, b"forged"));
        assert_eq!(sub.read().unwrap(), "forged");
        assert_eq!(b.bridge().missed_by_origin.get(&origin), Some(&99));
        // a's genuine 2..=101 now look like messages sent again.
        let dups = b.bridge().duplicates;
        for i in 2..=101 {
            a.server.publish("t", format!("genuine {i}"));
        }
        let deadline = Instant::now() + WAIT;
        while b.bridge().duplicates < dups + 100 {
            assert!(Instant::now() < deadline, "{:?}", b.bridge());
            thread::sleep(Duration::from_millis(5));
        }
        assert!(
            sub.silent_for(Duration::from_millis(200)),
            "a dropped one arrived"
        );
        // Past the forged number, a is heard again, with nothing missed.
        a.server.publish("t", "genuine 102");
        assert_eq!(sub.read().unwrap(), "genuine 102");
        assert_eq!(b.bridge().duplicates, dups + 100);
        assert_eq!(b.bridge().missed_by_origin.get(&origin), Some(&99));

        // Gaps on 40 topics from an origin nobody runs: 8 missed on each.
        const TOPICS: usize = 40;
        for i in 0..TOPICS {
            sub.sub(&format!("m{i}"));
        }
        for i in 0..TOPICS {
            redis.wait_numsub(&format!("m{i}"), 1);
        }
        let told_before = b.told_count();
        let stranger = 0x5eed_u64;
        let started = Instant::now();
        for i in 0..TOPICS {
            redis_publish(&mut con, &format!("m{i}"), envelope(stranger, 1, b"one"));
            redis_publish(&mut con, &format!("m{i}"), envelope(stranger, 10, b"ten"));
        }
        for _ in 0..2 * TOPICS {
            let text = sub.read().unwrap();
            assert!(text == "one" || text == "ten", "{text}");
        }
        let took = started.elapsed();
        let bb = b.bridge();
        assert_eq!(
            bb.missed_by_origin.get(&stranger),
            Some(&(8 * TOPICS as u64))
        );
        assert_eq!(bb.missed, 99 + 8 * TOPICS as u64);
        let told: Vec<_> = b.told.lock().unwrap()[told_before..]
            .iter()
            .filter(|e| matches!(e, BridgeEvent::Missed { .. }))
            .cloned()
            .collect();
        eprintln!(
            "{} Missed events told for {TOPICS} gaps in {took:?}",
            told.len()
        );
        // At most 16 in each second the gaps came in (a second that began
        // before them may have told one already: the forged jump above).
        let seconds = took.as_secs() + 2;
        assert!(
            !told.is_empty() && told.len() as u64 <= 16 * seconds,
            "{} Missed events in {took:?}: {told:?}",
            told.len()
        );
        for e in &told {
            if let BridgeEvent::Missed { origin, count, .. } = e {
                assert_eq!((*origin, *count), (stranger, 8));
            }
        }
    });
}
