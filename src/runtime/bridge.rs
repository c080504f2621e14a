//! The bridge's two threads and what they share with the server.
//!
//! - The **publisher** thread owns the engine's publishing connection. A
//!   publish puts an envelope in the outbox (bounded in bytes, never
//!   waiting); the thread sends the outbox in batches, in order. A batch
//!   that failed is sent again after reconnecting: receivers drop
//!   duplicates by sequence number.
//! - The **receiver** thread owns the receiving connection. At the start of
//!   each session it subscribes the channel of every topic with local
//!   subscribers (and its own control channel), then applies the changes
//!   topics report, and delivers what other servers published to the
//!   local subscribers.
//!
//! The receiver blocks in the engine waiting for messages; when a topic
//! gains its first subscriber or loses its last, the publisher thread
//! sends an empty envelope to the receiver's control channel to wake it,
//! so that a new subscription takes effect in a round trip, not a poll.
//! The same wake-up, at the start of each session, proves the round trip
//! through the engine: the receiver counts as up only once its own
//! wake-up came back (an engine that refuses this server's channels, such
//! as a Redis user without channel permissions, never gets there and is
//! reported down).
//!
//! Events for the user are queued in order and delivered with no lock
//! held, by whichever bridge thread gets to them, so a closure may call
//! any server method, `shutdown` included.
//!
//! Envelope, all integers big-endian:
//!
//! | bytes | field |
//! | --- | --- |
//! | 0 | version, 1 |
//! | 1 | kind: 0 text, 1 binary, 2 wake |
//! | 2..10 | origin: the sending server's random id |
//! | 10..14 | epoch of the origin's sequence numbers |
//! | 14..22 | sequence number, per origin and topic, from 1 |
//! | 22.. | the payload |
//!
//! An origin numbers each topic it publishes to; it forgets the numbers
//! of all topics at once (and starts a new epoch) when it has numbered
//! `SEQ_TOPICS` of them, so that its memory stays bounded.
//!
//! Locks are taken in this order: topics' `by_name` (or a topic's `subs`),
//! `changes`, `out`; `status`, then `told`.

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::bridge::{Bridge, BridgeEvent, Publisher, Subscriber};
use crate::message::Message;
use crate::runtime::Shared;
use crate::stats::BridgeStats;

const VERSION: u8 = 1;
const TEXT: u8 = 0;
const BINARY: u8 = 1;
const WAKE: u8 = 2;
const HEADER: usize = 22;

/// Topics an origin numbers before it starts a new epoch.
const SEQ_TOPICS: usize = 100_000;
/// At most this much goes to the engine in one batch.
const BATCH_ITEMS: usize = 512;
const BATCH_BYTES: usize = 1 << 20;
/// Channels per subscribe or unsubscribe command.
const CHANNELS_PER_COMMAND: usize = 1_000;
/// How long the receiver waits for a message before it looks again at
/// the changes and shutdown (a wake-up normally comes sooner).
const POLL: Duration = Duration::from_secs(1);
/// How long a topic's channel stays subscribed after its last local
/// subscriber left: a topic whose subscribers come and go does not churn
/// the engine, and its numbering stays continuous meanwhile.
const LINGER: Duration = Duration::from_secs(1);
/// Lingering channels due within this of each other go together.
const LINGER_BATCH: Duration = Duration::from_millis(50);
/// How long a session may go without its own wake-up coming back (while
/// the publisher is up) before it counts as failed.
const VERIFY: Duration = Duration::from_secs(5);
/// How long an unverified session waits for its wake-up before it sends
/// another.
const WAKE_AGAIN: Duration = Duration::from_millis(250);
/// What an item of the outbox costs beyond its bytes.
const ITEM_OVERHEAD: usize = 64;
/// Origins remembered at most, and how long a silent one is kept.
const MAX_ORIGINS: usize = 1024;
const ORIGIN_IDLE: Duration = Duration::from_secs(3600);
/// A sequence number further than this past the last one (or further
/// back than a batch), or an epoch other than the next few, is not
/// believed: it starts a new baseline and counts as invalid.
const MAX_SEQ_JUMP: u64 = 1 << 32;
const MAX_EPOCH_JUMP: u32 = 1 << 10;
/// `Missed` events told per second at most; the counters count them all.
const MISSED_EVENTS_PER_SEC: u32 = 16;
/// Reconnection backoff: doubling from the first to the last.
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_LAST: Duration = Duration::from_secs(1);

/// One envelope waiting for the engine.
pub(crate) struct Outgoing {
    channel: String,
    envelope: Vec<u8>,
}

struct Outbox {
    items: VecDeque<Outgoing>,
    bytes: usize,
    /// The last sequence number of each topic this server published to.
    seqs: HashMap<Box<str>, u64>,
    epoch: u32,
    /// Send a wake-up to the receiver's control channel.
    wake: bool,
    /// The publisher has stopped: what is pushed now is dropped.
    abandoned: bool,
}

/// What one origin has sent this server.
struct FromOrigin {
    epoch: u32,
    /// The last sequence number received per topic with local
    /// subscribers.
    last: HashMap<Box<str>, u64>,
    /// The epoch before this one and its numbers, to know a batch sent
    /// again across the origin's roll for the duplicate it is.
    before: Option<(u32, HashMap<Box<str>, u64>)>,
    missed: u64,
    seen: Instant,
}

#[derive(Default)]
struct Status {
    publisher_up: bool,
    receiver_up: bool,
    /// What the user was last told: `None` before anything was.
    told_up: Option<bool>,
    /// The bridge was up at some point: a later Up is a reconnection.
    ever_up: bool,
}

thread_local! {
    static ON_BRIDGE: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread is one of a bridge's: it must not wait for them.
pub(crate) fn on_bridge_thread() -> bool {
    ON_BRIDGE.with(Cell::get)
}

#[derive(Default)]
struct Counts {
    published: AtomicU64,
    received: AtomicU64,
    dropped: AtomicU64,
    refused: AtomicU64,
    missed: AtomicU64,
    duplicates: AtomicU64,
    invalid: AtomicU64,
    reconnects: AtomicU64,
    channels: AtomicU64,
}

/// The bridge state the server shares with the bridge's threads.
pub(crate) struct BridgeRt {
    engine: Box<dyn Bridge>,
    pub(crate) origin: u64,
    /// Channel name of a topic: this, then the topic's name.
    topic_prefix: String,
    /// This server's control channel.
    control: String,
    outbox_limit: usize,
    out: Mutex<Outbox>,
    out_cv: Condvar,
    /// Topics that gained their first subscriber (`true`) or lost their
    /// last since the receiver last looked: the latest state of each.
    /// Recorded only while a session is open (the next one starts from a
    /// snapshot of the topics), so it stays small through an outage.
    changes: Mutex<HashMap<Box<str>, bool>>,
    changes_pending: AtomicBool,
    session_open: AtomicBool,
    /// The receiver's session failed: the publisher reconnects too, its
    /// connection is likely as dead.
    publisher_stale: AtomicBool,
    /// The publisher connected again while the receiver was up: the
    /// receiver proves the round trip again (a wake-up of ours back)
    /// before the bridge is told up.
    reverify: AtomicBool,
    /// When the engine last took a batch carrying a wake-up.
    wake_sent: Mutex<Option<Instant>>,
    /// Shutdown is over: nothing more is told.
    closed: AtomicBool,
    from: Mutex<HashMap<u64, FromOrigin>>,
    status: Mutex<Status>,
    /// Events for the user, in order, and whether a thread is delivering
    /// them (with no lock held).
    told: Mutex<VecDeque<BridgeEvent>>,
    telling: AtomicBool,
    /// `Missed` events told in the current second: (its start, count).
    missed_told: Mutex<(Instant, u32)>,
    counts: Counts,
    stopping: AtomicBool,
    sleep: Mutex<()>,
    sleep_cv: Condvar,
}

impl BridgeRt {
    pub(crate) fn new(engine: Box<dyn Bridge>, prefix: &str, outbox_limit: usize) -> BridgeRt {
        let origin = random_origin();
        BridgeRt {
            engine,
            origin,
            topic_prefix: format!("{prefix}t:"),
            control: format!("{prefix}c:{origin:016x}"),
            outbox_limit,
            out: Mutex::new(Outbox {
                items: VecDeque::new(),
                bytes: 0,
                seqs: HashMap::new(),
                epoch: 0,
                wake: false,
                abandoned: false,
            }),
            out_cv: Condvar::new(),
            changes: Mutex::new(HashMap::new()),
            changes_pending: AtomicBool::new(false),
            session_open: AtomicBool::new(false),
            publisher_stale: AtomicBool::new(false),
            reverify: AtomicBool::new(false),
            wake_sent: Mutex::new(None),
            closed: AtomicBool::new(false),
            from: Mutex::new(HashMap::new()),
            status: Mutex::new(Status::default()),
            told: Mutex::new(VecDeque::new()),
            telling: AtomicBool::new(false),
            missed_told: Mutex::new((Instant::now(), 0)),
            counts: Counts::default(),
            stopping: AtomicBool::new(false),
            sleep: Mutex::new(()),
            sleep_cv: Condvar::new(),
        }
    }

    /// Hand a publish to the other servers: never waits.
    /// A publish's envelope, still to be numbered (see [`BridgeRt::push`]);
    /// `None` once stopping. Made before any lock is taken.
    pub(crate) fn prepare(&self, topic: &str, message: &Message) -> Option<Outgoing> {
        if self.stopping.load(Relaxed) {
            // The publisher is gone or going: not relayed, and counted.
            self.counts.dropped.fetch_add(1, Relaxed);
            return None;
        }
        let kind = if message.is_text() { TEXT } else { BINARY };
        let payload = message.as_bytes();
        let mut envelope = Vec::with_capacity(HEADER + payload.len());
        envelope.extend_from_slice(&[VERSION, kind]);
        envelope.extend_from_slice(&self.origin.to_be_bytes());
        envelope.extend_from_slice(&[0; 12]);
        envelope.extend_from_slice(payload);
        let channel = format!("{}{topic}", self.topic_prefix);
        Some(Outgoing { channel, envelope })
    }

    /// Number `item` and put it in the outbox, or drop and count it if the
    /// outbox is full: never waits.
    pub(crate) fn push(&self, topic: &str, item: Outgoing) {
        let Outgoing {
            channel,
            mut envelope,
        } = item;
        let mut out = self.out.lock();
        // The number is taken even if the outbox is full, so that
        // receivers count the message as missed.
        let seq = match out.seqs.get_mut(topic) {
            Some(seq) => {
                *seq += 1;
                *seq
            }
            None => {
                if out.seqs.len() >= SEQ_TOPICS {
                    out.seqs = HashMap::new();
                    out.epoch = out.epoch.wrapping_add(1);
                }
                out.seqs.insert(topic.into(), 1);
                1
            }
        };
        envelope[10..14].copy_from_slice(&out.epoch.to_be_bytes());
        envelope[14..22].copy_from_slice(&seq.to_be_bytes());
        let cost = item_cost(&channel, &envelope);
        if out.bytes + cost > self.outbox_limit || out.abandoned {
            drop(out);
            self.counts.dropped.fetch_add(1, Relaxed);
            return;
        }
        out.bytes += cost;
        out.items.push_back(Outgoing { channel, envelope });
        drop(out);
        self.out_cv.notify_one();
    }

    /// A topic gained its first local subscriber (`added`) or lost its
    /// last. Called under the topics' `by_name` lock, so that the changes
    /// come in the order they happened, and a session's snapshot of the
    /// topics (taken under the same lock) sees every change it was not
    /// told of.
    pub(crate) fn topic_changed(&self, topic: &str, added: bool) {
        if !self.session_open.load(SeqCst) {
            return;
        }
        self.changes.lock().insert(topic.into(), added);
        self.changes_pending.store(true, Relaxed);
        self.out.lock().wake = true;
        self.out_cv.notify_one();
    }

    pub(crate) fn stats(&self) -> BridgeStats {
        let c = &self.counts;
        let status = self.status.lock();
        let up = status.publisher_up && status.receiver_up;
        drop(status);
        let missed_by_origin: BTreeMap<u64, u64> = self
            .from
            .lock()
            .iter()
            .filter(|(_, f)| f.missed > 0)
            .map(|(&o, f)| (o, f.missed))
            .collect();
        BridgeStats {
            origin: self.origin,
            up,
            channels: c.channels.load(Relaxed),
            published: c.published.load(Relaxed),
            received: c.received.load(Relaxed),
            dropped: c.dropped.load(Relaxed),
            refused: c.refused.load(Relaxed),
            outbox_bytes: self.out.lock().bytes as u64,
            missed: c.missed.load(Relaxed),
            missed_by_origin,
            duplicates: c.duplicates.load(Relaxed),
            invalid: c.invalid.load(Relaxed),
            reconnects: c.reconnects.load(Relaxed),
        }
    }

    /// Start stopping both threads: the publisher sends what it can of
    /// the outbox and a last wake-up to the receiver.
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Relaxed);
        self.out.lock().wake = true;
        self.out_cv.notify_all();
        let _guard = self.sleep.lock();
        self.sleep_cv.notify_all();
    }

    /// Shutdown is over: the user is told nothing more.
    pub(crate) fn close(&self) {
        self.closed.store(true, SeqCst);
        self.told.lock().clear();
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Relaxed)
    }

    /// Sleep `d` unless stopping.
    fn pause(&self, d: Duration) {
        let mut guard = self.sleep.lock();
        if !self.stopping() {
            self.sleep_cv.wait_for(&mut guard, d);
        }
    }

    /// Record that one side went up or down, and tell the user when the
    /// bridge as a whole did.
    fn set_up<T: Send + Sync + 'static>(
        &self,
        shared: &Weak<Shared<T>>,
        publisher: bool,
        up: bool,
        error: Option<&io::Error>,
    ) {
        {
            let mut s = self.status.lock();
            if publisher {
                s.publisher_up = up;
                if up && s.receiver_up {
                    // A connection proves nothing of the round trip (an
                    // engine that holds publishes, as a paused Redis does,
                    // takes new connections all the same): the receiver
                    // waits for a wake-up of ours again. Under `status`,
                    // so the bridge is not told up in between.
                    s.receiver_up = false;
                    self.reverify.store(true, SeqCst);
                }
            } else {
                s.receiver_up = up;
            }
            let now = s.publisher_up && s.receiver_up;
            let event = match (now, s.told_up) {
                (true, Some(true)) | (false, Some(false)) => None,
                (true, _) => {
                    if s.ever_up {
                        self.counts.reconnects.fetch_add(1, Relaxed);
                    }
                    s.told_up = Some(true);
                    s.ever_up = true;
                    Some(BridgeEvent::Up)
                }
                // Down is told once something failed: at the start, both
                // sides are down until they connect.
                (false, _) => error.map(|e| {
                    s.told_up = Some(false);
                    BridgeEvent::Down {
                        error: e.to_string(),
                    }
                }),
            };
            // Queued under `status`, so in the order the changes happened.
            if let Some(event) = event {
                self.told.lock().push_back(event);
            }
        }
        self.deliver_told(shared);
    }

    /// Tell the user the queued events, in order, with no lock held; if
    /// another thread is at it, it tells them.
    fn deliver_told<T: Send + Sync + 'static>(&self, shared: &Weak<Shared<T>>) {
        loop {
            if self.telling.swap(true, SeqCst) {
                return;
            }
            loop {
                let next = self.told.lock().pop_front();
                let Some(event) = next else { break };
                if self.closed.load(SeqCst) {
                    continue;
                }
                if let Some(shared) = shared.upgrade() {
                    shared.emit_bridge(event);
                }
            }
            self.telling.store(false, SeqCst);
            // An event queued after the last look, while the flag was
            // still up, is ours to tell.
            if self.told.lock().is_empty() {
                return;
            }
        }
    }

    /// A message from the engine on a topic's channel this session
    /// subscribes.
    fn arrived<T: Send + Sync + 'static>(
        &self,
        shared: &Weak<Shared<T>>,
        channel: &str,
        data: &[u8],
    ) {
        let invalid = || {
            self.counts.invalid.fetch_add(1, Relaxed);
        };
        let Some(env) = Envelope::parse(data) else {
            return invalid();
        };
        if env.origin == self.origin {
            // Our own publish coming back.
            return;
        }
        let (Some(topic), TEXT | BINARY) = (channel.strip_prefix(&self.topic_prefix), env.kind)
        else {
            return invalid();
        };
        let message = match env.kind {
            TEXT => match std::str::from_utf8(env.payload) {
                Ok(text) => Message::Text(text.to_owned()),
                Err(_) => return invalid(),
            },
            _ => Message::Binary(env.payload.to_vec()),
        };
        let missed = match self.check_sequence(&env, topic) {
            Sequence::Next(missed) => missed,
            Sequence::Again => {
                self.counts.duplicates.fetch_add(1, Relaxed);
                return;
            }
            Sequence::Unbelievable => {
                // Delivered, on a new baseline: counted, not trusted.
                invalid();
                0
            }
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if missed > 0 {
            self.counts.missed.fetch_add(missed, Relaxed);
            if self.may_tell_missed() {
                self.told.lock().push_back(BridgeEvent::Missed {
                    origin: env.origin,
                    topic: topic.to_owned(),
                    count: missed,
                });
                self.deliver_told(&Arc::downgrade(&shared));
            }
        }
        let report = shared.topics.publish(&shared, topic, &message, None, None);
        // Not for a topic whose last subscriber here left while its channel
        // lingers: nobody here was sent it.
        if report.written + report.queued + report.dropped + report.closed > 0 {
            self.counts.received.fetch_add(1, Relaxed);
        }
    }

    /// Where `env` stands in its origin's numbering of `topic`.
    fn check_sequence(&self, env: &Envelope<'_>, topic: &str) -> Sequence {
        let now = Instant::now();
        let mut from = self.from.lock();
        if !from.contains_key(&env.origin) {
            make_room(&mut from, now);
        }
        let f = from.entry(env.origin).or_insert_with(|| FromOrigin {
            epoch: env.epoch,
            last: HashMap::new(),
            before: None,
            missed: 0,
            seen: now,
        });
        f.seen = now;
        let mut unbelievable = false;
        if let Some((epoch, last)) = &f.before
            && *epoch == env.epoch
            && last
                .get(topic)
                .is_some_and(|&last| sent_again(env.seq, last))
        {
            // Sent again after a reconnection, from before the roll that
            // came in the same batch.
            return Sequence::Again;
        }
        if env.epoch != f.epoch {
            // The origin started numbering afresh (after numbering many
            // topics). Anything else (an old epoch, a far one) is not
            // believed, but followed all the same, so that a forged
            // envelope cannot silence an origin: the next genuine one
            // takes the numbering back.
            let ahead = env.epoch.wrapping_sub(f.epoch);
            unbelievable = !f.last.is_empty() && !(1..MAX_EPOCH_JUMP).contains(&ahead);
            let before = std::mem::take(&mut f.last);
            // Kept only across a believable roll: numbers a forged epoch
            // planted must not make the genuine ones duplicates later.
            f.before = (!unbelievable).then_some((f.epoch, before));
            f.epoch = env.epoch;
        }
        let (seq, last) = (env.seq, f.last.get(topic).copied());
        let outcome = match last {
            // The first since this server subscribed: nothing to compare.
            None => Sequence::Next(0),
            Some(last) if sent_again(seq, last) => return Sequence::Again,
            Some(last) if seq > last && seq - last <= MAX_SEQ_JUMP => {
                Sequence::Next(seq - last - 1)
            }
            Some(_) => Sequence::Unbelievable,
        };
        if let Some(l) = f.last.get_mut(topic) {
            *l = seq;
        } else {
            f.last.insert(topic.into(), seq);
        }
        match outcome {
            Sequence::Next(missed) => {
                f.missed = f.missed.saturating_add(missed);
                if unbelievable {
                    Sequence::Unbelievable
                } else {
                    outcome
                }
            }
            other => other,
        }
    }

    /// Whether another `Missed` event may be told this second.
    fn may_tell_missed(&self) -> bool {
        let mut m = self.missed_told.lock();
        let now = Instant::now();
        if now.duration_since(m.0) >= Duration::from_secs(1) {
            *m = (now, 0);
        }
        m.1 += 1;
        m.1 <= MISSED_EVENTS_PER_SEC
    }

    /// Forget the numbers of topics no longer subscribed here.
    fn forget(&self, keep: impl Fn(&str) -> bool) {
        let mut from = self.from.lock();
        for f in from.values_mut() {
            f.last.retain(|t, _| keep(t));
        }
        from.retain(|_, f| !f.last.is_empty() || f.missed > 0);
    }
}

/// Where a message stands in its origin's numbering.
enum Sequence {
    /// New, after this many missed.
    Next(u64),
    /// Already delivered.
    Again,
    /// Too far from the last to be believed.
    Unbelievable,
}

/// Whether number `seq` is one an origin sent again after a reconnection,
/// its last being `last`: at most a batch back.
fn sent_again(seq: u64, last: u64) -> bool {
    seq <= last && last - seq < BATCH_ITEMS as u64
}

/// Make room for one more origin: forget those silent for long, and the
/// least recently heard if still full.
fn make_room(from: &mut HashMap<u64, FromOrigin>, now: Instant) {
    from.retain(|_, f| now.duration_since(f.seen) < ORIGIN_IDLE);
    while from.len() >= MAX_ORIGINS {
        let oldest = from.iter().min_by_key(|(_, f)| f.seen).map(|(&o, _)| o);
        match oldest {
            Some(o) => from.remove(&o),
            None => break,
        };
    }
}

/// What an outbox item costs against `bridge_outbox_bytes`.
fn item_cost(channel: &str, envelope: &[u8]) -> usize {
    channel.len() + envelope.len() + ITEM_OVERHEAD
}

struct Envelope<'a> {
    kind: u8,
    origin: u64,
    epoch: u32,
    seq: u64,
    payload: &'a [u8],
}

impl<'a> Envelope<'a> {
    fn parse(data: &'a [u8]) -> Option<Envelope<'a>> {
        if data.len() < HEADER || data[0] != VERSION || data[1] > WAKE {
            return None;
        }
        let u64_at = |i: usize| u64::from_be_bytes(data[i..i + 8].try_into().expect("8 bytes"));
        Some(Envelope {
            kind: data[1],
            origin: u64_at(2),
            epoch: u32::from_be_bytes(data[10..14].try_into().expect("4 bytes")),
            seq: u64_at(14),
            payload: &data[HEADER..],
        })
    }
}

/// A random id for this server: the standard library's per-process random
/// keys, the time and the process id.
fn random_origin() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// Doubling waits between connection attempts, with some jitter so that
/// many servers do not reconnect in step.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            next: BACKOFF_FIRST,
        }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_FIRST;
    }

    fn wait(&mut self, rt: &BridgeRt) {
        let jitter = random_origin() % (self.next.as_millis() as u64 / 4 + 1);
        rt.pause(self.next + Duration::from_millis(jitter));
        self.next = (self.next * 2).min(BACKOFF_LAST);
    }
}

/// The publisher thread.
pub(crate) fn run_publisher<T: Send + Sync + 'static>(rt: Arc<BridgeRt>, shared: Weak<Shared<T>>) {
    ON_BRIDGE.with(|b| b.set(true));
    let mut con: Option<Box<dyn Publisher>> = None;
    let mut backoff = Backoff::new();
    // The batch being sent, kept until the engine took it.
    let mut batch: Vec<Outgoing> = Vec::new();
    let mut refused: Vec<usize> = Vec::new();
    loop {
        if rt.publisher_stale.swap(false, Relaxed) && con.is_some() {
            con = None;
            rt.set_up(&shared, true, false, None);
        }
        let Some(publisher) = con.as_mut() else {
            if rt.stopping() {
                abandon(&rt, &mut batch);
                return;
            }
            match catch_unwind(AssertUnwindSafe(|| rt.engine.publisher())) {
                Ok(Ok(c)) => {
                    con = Some(c);
                    rt.set_up(&shared, true, true, None);
                }
                Ok(Err(e)) => {
                    rt.set_up(&shared, true, false, Some(&e));
                    backoff.wait(&rt);
                }
                Err(_) => {
                    let e = io::Error::other("the bridge's publisher() panicked");
                    rt.set_up(&shared, true, false, Some(&e));
                    backoff.wait(&rt);
                }
            }
            continue;
        };
        if batch.is_empty() {
            let mut out = rt.out.lock();
            while out.items.is_empty()
                && !out.wake
                && !rt.stopping()
                && !rt.publisher_stale.load(Relaxed)
            {
                rt.out_cv.wait(&mut out);
            }
            if rt.publisher_stale.load(Relaxed) {
                continue;
            }
            let mut bytes = 0;
            while batch.len() < BATCH_ITEMS && bytes < BATCH_BYTES {
                let Some(item) = out.items.pop_front() else {
                    break;
                };
                out.bytes -= item_cost(&item.channel, &item.envelope);
                bytes += item.envelope.len();
                batch.push(item);
            }
            if std::mem::take(&mut out.wake) {
                let mut envelope = vec![VERSION, WAKE];
                envelope.extend_from_slice(&rt.origin.to_be_bytes());
                envelope.extend_from_slice(&[0; 12]);
                batch.push(Outgoing {
                    channel: rt.control.clone(),
                    envelope,
                });
            }
            if batch.is_empty() {
                // Stopping, and nothing left to send: what is pushed now
                // is dropped and counted.
                out.abandoned = true;
                return;
            }
        }
        let items: Vec<(&str, &[u8])> = batch
            .iter()
            .map(|o| (o.channel.as_str(), o.envelope.as_slice()))
            .collect();
        refused.clear();
        let sent = catch_unwind(AssertUnwindSafe(|| publisher.publish(&items, &mut refused)))
            .unwrap_or_else(|_| Err(io::Error::other("the bridge's publish() panicked")));
        drop(items);
        match sent {
            Ok(()) => {
                // The wake-up, if any, is last and not a publish.
                let data = batch.iter().filter(|o| o.channel != rt.control).count();
                if batch.last().is_some_and(|o| o.channel == rt.control) {
                    *rt.wake_sent.lock() = Some(Instant::now());
                }
                refused.sort_unstable();
                refused.dedup();
                let refused_data = refused
                    .iter()
                    .filter(|&&i| batch.get(i).is_some_and(|o| o.channel != rt.control))
                    .count();
                rt.counts
                    .published
                    .fetch_add(data.saturating_sub(refused_data) as u64, Relaxed);
                rt.counts.refused.fetch_add(refused_data as u64, Relaxed);
                batch.clear();
                backoff.reset();
            }
            Err(e) => {
                con = None;
                rt.set_up(&shared, true, false, Some(&e));
                if rt.stopping() {
                    abandon(&rt, &mut batch);
                    return;
                }
                backoff.wait(&rt);
            }
        }
    }
}

/// The publisher stops with publishes not sent (the engine down or
/// failing at shutdown): they are lost, so they are counted as dropped,
/// and the outbox is emptied.
fn abandon(rt: &BridgeRt, batch: &mut Vec<Outgoing>) {
    let mut out = rt.out.lock();
    let left = batch
        .drain(..)
        .chain(out.items.drain(..))
        .filter(|o| o.channel != rt.control)
        .count();
    out.bytes = 0;
    // A publish that passed `prepare` before the stop and pushes after
    // this is dropped and counted too.
    out.abandoned = true;
    drop(out);
    rt.counts.dropped.fetch_add(left as u64, Relaxed);
}

/// The receiver thread.
pub(crate) fn run_receiver<T: Send + Sync + 'static>(rt: Arc<BridgeRt>, shared: Weak<Shared<T>>) {
    ON_BRIDGE.with(|b| b.set(true));
    let mut backoff = Backoff::new();
    while !rt.stopping() {
        let mut verified = false;
        let result = catch_unwind(AssertUnwindSafe(|| {
            rt.engine.subscriber(&mut |sub: &mut dyn Subscriber| {
                session(&rt, &shared, sub, &mut verified)
            })
        }))
        .unwrap_or_else(|_| Err(io::Error::other("the bridge's subscriber panicked")));
        rt.session_open.store(false, SeqCst);
        rt.counts.channels.store(0, Relaxed);
        if verified {
            backoff.reset();
        }
        if rt.stopping() {
            break;
        }
        let e = result
            .err()
            .unwrap_or_else(|| io::Error::other("the bridge's subscriber returned"));
        {
            // Under `out`, so that the publisher cannot miss it between
            // its check and its wait.
            let _out = rt.out.lock();
            rt.publisher_stale.store(true, Relaxed);
        }
        rt.out_cv.notify_all();
        rt.set_up(&shared, false, false, Some(&e));
        backoff.wait(&rt);
    }
}

/// One connected receiving session: subscribe everything, prove the round
/// trip, then follow the changes and deliver what arrives.
fn session<T: Send + Sync + 'static>(
    rt: &BridgeRt,
    shared: &Weak<Shared<T>>,
    sub: &mut dyn Subscriber,
    verified: &mut bool,
) -> io::Result<()> {
    // Changes are recorded from now on; the snapshot, taken after clearing
    // them, has every change made before (see `topic_changed`).
    rt.session_open.store(true, SeqCst);
    rt.changes.lock().clear();
    rt.changes_pending.store(false, Relaxed);
    let Some(names) = shared.upgrade().map(|s| s.topics.names()) else {
        return Ok(());
    };
    let channels: Vec<String> = names
        .iter()
        .map(|n| format!("{}{n}", rt.topic_prefix))
        .collect();
    for chunk in channels.chunks(CHANNELS_PER_COMMAND) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        sub.subscribe(&refs)?;
    }
    let refused = sub.take_refused();
    // The control channel last: the engine answers one connection's
    // commands in order, so our wake-up can come back on it only once
    // every topic channel before it is subscribed (a client library may
    // return from a many-channel subscribe at its first confirmation).
    // A wake-up sent before the engine got this far is lost, and sent
    // again (see `WAKE_AGAIN`).
    sub.subscribe(&[rt.control.as_str()])?;
    if !sub.take_refused().is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the engine refused this server's control channel: are its channels refused \
             (Redis ACL channel permissions)?",
        ));
    }
    let mut subscribed: HashSet<String> = channels.into_iter().collect();
    leave_out_refused(rt, &mut subscribed, refused);
    {
        // Numbers of topics still subscribed are kept: a gap across the
        // outage is counted.
        let names: HashSet<&str> = names.iter().map(|n| &**n).collect();
        rt.forget(|t| names.contains(t));
    }
    // A wake-up of our own proves the round trip through the engine. The
    // session's clock starts first: only wake-ups sent after it count, and
    // the publisher may send this one at once.
    let mut started = Instant::now();
    rt.out.lock().wake = true;
    rt.out_cv.notify_one();
    // When the publisher first sent a wake-up this session.
    let mut first_wake: Option<Instant> = None;
    // Channels whose topic lost its last local subscriber, and since when,
    // and when the first of them is due to be let go.
    let mut lingering: HashMap<String, Instant> = HashMap::new();
    let mut next_due: Option<Instant> = None;
    loop {
        if rt.stopping() {
            return Ok(());
        }
        if rt.changes_pending.swap(false, Relaxed) {
            apply_changes(rt, sub, &mut subscribed, &mut lingering, &mut next_due)?;
        }
        if rt.reverify.swap(false, SeqCst) && *verified {
            // The publisher connected again (see `set_up`): prove the
            // round trip afresh.
            *verified = false;
            started = Instant::now();
            first_wake = None;
            rt.out.lock().wake = true;
            rt.out_cv.notify_one();
        }
        let mut wait = POLL;
        if let Some(due) = next_due {
            let now = Instant::now();
            if now >= due {
                next_due = unsubscribe_lingering(rt, sub, &mut subscribed, &mut lingering)?;
            }
            if let Some(due) = next_due {
                // Let go in batches, not one receive of a millisecond each.
                let until = due.saturating_duration_since(now).max(LINGER_BATCH);
                wait = wait.min(until);
            }
        }
        if !*verified {
            // Looked at on every pass, so that other servers' traffic
            // cannot hold it off: if our wake-ups have gone out for a
            // while and none came back, our channels are refused; if the
            // last went out a while ago, it may have beaten the control
            // channel's subscription: another.
            wait = wait.min(WAKE_AGAIN);
            let sent = *rt.wake_sent.lock();
            if let Some(sent) = sent.filter(|t| *t > started) {
                if first_wake.get_or_insert(sent).elapsed() > VERIFY {
                    return Err(io::Error::other(
                        "nothing this server published came back through the engine: \
                         are its channels refused (Redis ACL channel permissions)?",
                    ));
                }
                if sent.elapsed() > WAKE_AGAIN {
                    let mut out = rt.out.lock();
                    if !out.wake {
                        out.wake = true;
                        drop(out);
                        rt.out_cv.notify_one();
                    }
                }
            }
        }
        let Some((channel, data)) = sub.receive(wait)? else {
            continue;
        };
        if channel == rt.control {
            let ours = Envelope::parse(&data).is_some_and(|e| e.origin == rt.origin);
            if !ours {
                rt.counts.invalid.fetch_add(1, Relaxed);
            } else if !*verified {
                *verified = true;
                rt.set_up(shared, false, true, None);
            }
        } else if subscribed.contains(&channel) {
            rt.arrived(shared, &channel, &data);
        }
        // Anything else was read ahead from a channel just unsubscribed.
    }
}

/// Subscribe the topics that gained a first subscriber since the last
/// time; those that lost their last start lingering (see `LINGER`).
fn apply_changes(
    rt: &BridgeRt,
    sub: &mut dyn Subscriber,
    subscribed: &mut HashSet<String>,
    lingering: &mut HashMap<String, Instant>,
    next_due: &mut Option<Instant>,
) -> io::Result<()> {
    let changes = std::mem::take(&mut *rt.changes.lock());
    let now = Instant::now();
    let mut add = Vec::new();
    for (topic, added) in changes {
        let channel = format!("{}{topic}", rt.topic_prefix);
        match (added, subscribed.contains(&channel)) {
            (true, false) => add.push(channel),
            // Back before its channel was let go: nothing to do.
            (true, true) => {
                lingering.remove(&channel);
            }
            (false, true) => {
                lingering.entry(channel).or_insert(now);
                next_due.get_or_insert(now + LINGER);
            }
            (false, false) => {}
        }
    }
    for chunk in add.chunks(CHANNELS_PER_COMMAND) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        sub.subscribe(&refs)?;
    }
    if !add.is_empty() {
        // Newly subscribed: numbered from a fresh baseline.
        let added: HashSet<&str> = add.iter().map(|c| &c[rt.topic_prefix.len()..]).collect();
        rt.forget(|t| !added.contains(t));
    }
    subscribed.extend(add);
    leave_out_refused(rt, subscribed, sub.take_refused());
    Ok(())
}

/// Take the channels the engine refused out of `subscribed`, count them,
/// and set the count of channels subscribed.
fn leave_out_refused(rt: &BridgeRt, subscribed: &mut HashSet<String>, refused: Vec<String>) {
    for channel in &refused {
        subscribed.remove(channel);
    }
    rt.counts.refused.fetch_add(refused.len() as u64, Relaxed);
    rt.counts.channels.store(subscribed.len() as u64, Relaxed);
}

/// Unsubscribe the channels that lingered long enough (and those due
/// within `LINGER_BATCH`); when the next is due.
fn unsubscribe_lingering(
    rt: &BridgeRt,
    sub: &mut dyn Subscriber,
    subscribed: &mut HashSet<String>,
    lingering: &mut HashMap<String, Instant>,
) -> io::Result<Option<Instant>> {
    let now = Instant::now();
    let due: Vec<String> = lingering
        .iter()
        .filter(|(_, since)| now + LINGER_BATCH >= **since + LINGER)
        .map(|(c, _)| c.clone())
        .collect();
    for chunk in due.chunks(CHANNELS_PER_COMMAND) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        sub.unsubscribe(&refs)?;
    }
    let gone: HashSet<&str> = due.iter().map(|c| &c[rt.topic_prefix.len()..]).collect();
    rt.forget(|t| !gone.contains(t));
    for channel in &due {
        subscribed.remove(channel);
        lingering.remove(channel);
    }
    rt.counts.channels.store(subscribed.len() as u64, Relaxed);
    Ok(lingering.values().min().map(|since| *since + LINGER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_need_their_header() {
        assert!(Envelope::parse(&[1; HEADER - 1]).is_none());
        assert!(Envelope::parse(&[9; HEADER]).is_none());
        let mut e = vec![VERSION, BINARY];
        e.extend_from_slice(&7u64.to_be_bytes());
        e.extend_from_slice(&3u32.to_be_bytes());
        e.extend_from_slice(&42u64.to_be_bytes());
        e.extend_from_slice(b"hi");
        let p = Envelope::parse(&e).unwrap();
        assert_eq!(
            (p.kind, p.origin, p.epoch, p.seq, p.payload),
            (BINARY, 7, 3, 42, &b"hi"[..])
        );
    }

    struct NoEngine;

    impl Bridge for NoEngine {
        fn publisher(&self) -> io::Result<Box<dyn Publisher>> {
            Err(io::Error::other("no engine"))
        }
        fn subscriber(
            &self,
            _: &mut dyn FnMut(&mut dyn Subscriber) -> io::Result<()>,
        ) -> io::Result<()> {
            Err(io::Error::other("no engine"))
        }
    }

    /// Where a message of origin 7's `epoch` and number `seq` on `topic`
    /// stands at `rt`.
    fn check(rt: &BridgeRt, epoch: u32, topic: &str, seq: u64) -> Sequence {
        let env = Envelope {
            kind: TEXT,
            origin: 7,
            epoch,
            seq,
            payload: b"",
        };
        rt.check_sequence(&env, topic)
    }

    #[test]
    fn a_forged_number_or_epoch_cannot_silence_an_origin() {
        let rt = BridgeRt::new(Box::new(NoEngine), "p:", 1 << 20);
        let check = |epoch: u32, seq: u64| check(&rt, epoch, "t", seq);
        assert!(matches!(check(0, 1), Sequence::Next(0)));
        assert!(matches!(check(0, 3), Sequence::Next(1)));
        // Sent again after a reconnection.
        assert!(matches!(check(0, 2), Sequence::Again));
        // Forged: far ahead. Not believed, and the genuine numbers that
        // follow take over again, delivered.
        assert!(matches!(
            check(0, 3 + (1 << 32) + 5),
            Sequence::Unbelievable
        ));
        assert!(matches!(check(0, 4), Sequence::Unbelievable));
        assert!(matches!(check(0, 5), Sequence::Next(0)));
        // Forged: the next epoch. The genuine one takes the numbering back.
        assert!(matches!(check(1, 1), Sequence::Next(0)));
        assert!(matches!(check(0, 6), Sequence::Unbelievable));
        assert!(matches!(check(0, 7), Sequence::Next(0)));
        assert_eq!(rt.from.lock()[&7].missed, 1);
    }

    /// A batch that straddles the origin's roll to a new epoch (after it
    /// numbered 100,000 topics), sent again after a reconnection: both
    /// halves are duplicates. Before, the old epoch's half was taken for
    /// an unbelievable jump back (delivered again) and the new epoch's
    /// for the next numbers after it (delivered again).
    #[test]
    fn a_batch_sent_again_across_an_epoch_roll_is_all_duplicates() {
        let rt = BridgeRt::new(Box::new(NoEngine), "p:", 1 << 20);
        let check = |epoch: u32, topic: &str, seq: u64| check(&rt, epoch, topic, seq);
        assert!(matches!(check(0, "t", 6), Sequence::Next(0)));
        assert!(matches!(check(0, "t", 7), Sequence::Next(0)));
        assert!(matches!(check(1, "u", 1), Sequence::Next(0)));
        // The batch again: (0, t, 7), (1, u, 1).
        assert!(matches!(check(0, "t", 7), Sequence::Again));
        assert!(matches!(check(1, "u", 1), Sequence::Again));
        assert!(matches!(check(1, "u", 2), Sequence::Next(0)));
        assert!(matches!(check(1, "t", 1), Sequence::Next(0)));
        assert_eq!(rt.from.lock()[&7].missed, 0);
    }

    /// A forged envelope of the next epoch, taken back by the genuine
    /// numbers, leaves nothing behind that would make the genuine next
    /// epoch's first messages duplicates when it really comes.
    #[test]
    fn a_forged_next_epoch_does_not_make_the_real_one_duplicates() {
        let rt = BridgeRt::new(Box::new(NoEngine), "p:", 1 << 20);
        let check = |epoch: u32, seq: u64| check(&rt, epoch, "t", seq);
        assert!(matches!(check(5, 1), Sequence::Next(0)));
        // Forged: the next epoch, number 9.
        assert!(matches!(check(6, 9), Sequence::Next(0)));
        // The genuine numbers take it back (not believed: a jump back).
        assert!(matches!(check(5, 2), Sequence::Unbelievable));
        assert!(matches!(check(5, 3), Sequence::Next(0)));
        // The real roll: its first numbers are new messages.
        assert!(matches!(check(6, 1), Sequence::Next(0)));
        assert!(matches!(check(6, 2), Sequence::Next(0)));
    }

    #[test]
    fn origins_differ() {
        assert_ne!(random_origin(), random_origin());
    }
}
