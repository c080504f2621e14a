//! Topics: clients subscribe by name, and a publish reaches every
//! subscriber, framed (and compressed) once.
//!
//! Each topic's subscriber list sits behind its own lock, which also
//! orders the topic's publishes: a publish queues its frame to every
//! subscriber while holding it, so all of them see the topic's messages in
//! one order, and writes to the sockets only after letting go (no lock is
//! held across a socket write). Publishes to different topics run in
//! parallel.
//!
//! A client with no subscriptions costs nothing here; the first one gives
//! it an entry in `by_client`. A topic whose last subscriber leaves is
//! removed.
//!
//! Locks are taken in this order: `by_client`, `by_name`, a topic's
//! `subs`, a connection's `io`; but `by_name` is never held while a
//! `subs` is awaited (a publish holds a topic's `subs` for its whole
//! fan-out, and every other topic needs `by_name`), and a shard of
//! `by_client` is let go while a busy `subs` is awaited, a few times
//! before it is held (see `lock_subs`). `leavers` is taken under a
//! `subs` or under none. A teardown never waits for a `subs`: it leaves
//! the removal to the holder (see `Topics::leave`), and the connection
//! then held last to a worker (`Topics::let_go`). It may still wait for
//! its shard of `by_client`, held by a subscribe that waits for a busy
//! `subs` after letting eight publishes go first.

use std::borrow::Borrow;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{Mutex, RwLock};

use crate::client::ClientId;
use crate::error::{Error, Result};
use crate::message::Message;
use crate::runtime::Shared;
use crate::runtime::bridge::BridgeRt;
use crate::runtime::broadcast::Frames;
use crate::runtime::conn::Conn;
use crate::server::Broadcast;

pub(crate) struct Topic<T> {
    name: Box<str>,
    /// The subscribers; the lock also puts the topic's publishes in one
    /// order.
    subs: Mutex<Subs<Conn<T>>>,
    /// Its last subscriber left (set under `subs`): it is out of
    /// `by_name`, or about to be, and a subscribe that finds it makes a
    /// new one.
    dead: AtomicBool,
    /// Leaves of clients torn down while the topic was busy wait in
    /// `Topics::leavers` (set with the leavers' lock held; see `settle`).
    leaving: AtomicBool,
    /// Threads that let their shard go to wait for `subs` (tests wait for
    /// them instead of sleeping).
    #[cfg(test)]
    waiting: std::sync::atomic::AtomicUsize,
    /// Leaves left for the next holder.
    #[cfg(test)]
    deferred: std::sync::atomic::AtomicUsize,
}

/// A leave that had to look at more subscribers than this makes the list
/// keep an index of where each one is.
const INDEX_AFTER: usize = 1024;

/// A topic's subscribers: one inline (a user's own topic, say), a list,
/// or a list with an index. A list is in no order a publish depends on:
/// a leave moves the last subscriber into the hole.
///
/// A subscriber is looked for from the end: a client that joins and
/// leaves in a loop is found at once (it was last in). A leave that had
/// to walk further (more than `INDEX_AFTER` looks) makes the list keep an
/// index, which finds each subscriber at once from then on, until fewer
/// than half that many are left. Without it two clients could make every
/// leave a walk of a big topic's whole list under its lock (each leave
/// moves the other, the last in, into the deep slot it left, and it joins
/// again last), and old subscribers leaving together (a crowd dropped at
/// once) walked it for each. A topic nobody leaves from deep in its list
/// pays nothing for it, not even a word.
enum Subs<C> {
    One(Arc<C>),
    Many(Vec<Arc<C>>),
    Indexed(Box<Indexed<C>>),
}

// A topic's subscribers take three words, as a plain list did: the index
// costs a topic nothing until it is made.
#[cfg(target_pointer_width = "64")]
const _: () = assert!(std::mem::size_of::<Subs<Conn<()>>>() == 24);

/// A list, and where each of its members is in it by slot: two 32-bit
/// numbers an entry, about 15-30 B a member with the table's room.
struct Indexed<C> {
    list: Vec<Arc<C>>,
    at: HashMap<u32, u32>,
}

/// What a subscriber is found by in an index.
trait Slot {
    fn slot(&self) -> u32;
}

impl<T: Send + Sync + 'static> Slot for Conn<T> {
    /// The connection's registry slot, the low half of its id: no two
    /// live connections share it. One torn down may still be in a topic
    /// whose lock was busy at its teardown (its leave is deferred) when
    /// its slot is given to another: a removal that finds the slot's
    /// entry naming another member walks the list.
    fn slot(&self) -> u32 {
        self.client.id().as_u64() as u32
    }
}

/// A list index as an index keeps it: a list of more than `u32::MAX`
/// members would need more connections than slots.
fn pos(i: usize) -> u32 {
    u32::try_from(i).expect("fewer members than slots")
}

/// Grown by an eighth rather than doubled: a slot here is most of what a
/// subscription costs, and a topic's list seldom grows fast enough for
/// the copies to matter.
fn push_to<C>(list: &mut Vec<Arc<C>>, member: Arc<C>) {
    if list.len() == list.capacity() {
        list.reserve_exact((list.len() / 8).max(1));
    }
    list.push(member);
}

/// The room to give a table of `len` entries back to, if three quarters
/// of its `capacity` are empty (after a surge of clients or topics), as
/// `shrink` does for a list. Small tables are left alone.
fn shrunk(len: usize, capacity: usize) -> Option<usize> {
    (capacity > 64 && len * 4 < capacity).then_some(len * 2)
}

/// Most have left: give the memory back.
fn shrink<C>(list: &mut Vec<Arc<C>>) {
    if list.len() * 4 < list.capacity() {
        list.shrink_to(list.len() * 2);
    }
}

#[cfg(test)]
fn looked() {
    tests::EXAMINED.with(|n| n.set(n.get() + 1));
}

#[cfg(not(test))]
fn looked() {}

impl<C: Slot> Subs<C> {
    fn as_slice(&self) -> &[Arc<C>] {
        match self {
            Subs::One(c) => std::slice::from_ref(c),
            Subs::Many(v) => v,
            Subs::Indexed(x) => &x.list,
        }
    }

    /// Add `member`, which must not be in.
    fn push(&mut self, member: Arc<C>) {
        match self {
            Subs::Many(v) => push_to(v, member),
            Subs::Indexed(x) => {
                x.at.insert(member.slot(), pos(x.list.len()));
                push_to(&mut x.list, member);
            }
            Subs::One(first) => {
                let first = Arc::clone(first);
                *self = Subs::Many(vec![first, member]);
            }
        }
    }

    /// Take `member` out (if it is in); whether any subscriber is left.
    fn remove(&mut self, member: &Arc<C>) -> bool {
        match self {
            Subs::One(c) if Arc::ptr_eq(c, member) => {
                // Empty, for a publish that holds the topic already.
                *self = Subs::Many(Vec::new());
                return false;
            }
            Subs::One(_) => return true,
            Subs::Many(v) => {
                let found = v.iter().rposition(|c| {
                    looked();
                    Arc::ptr_eq(c, member)
                });
                if let Some(i) = found {
                    let walked = v.len() - i;
                    v.swap_remove(i);
                    if walked > INDEX_AFTER && v.len() >= INDEX_AFTER / 2 {
                        let list = std::mem::take(v);
                        let at = list.iter().enumerate();
                        let at = at.map(|(i, c)| (c.slot(), pos(i))).collect();
                        *self = Subs::Indexed(Box::new(Indexed { list, at }));
                    }
                }
            }
            Subs::Indexed(x) => {
                looked();
                // Only the member itself is taken out: slots are not
                // shared by live connections, but a mistake here must not
                // drop someone else.
                let slot = member.slot();
                let found = x.at.get(&slot).map(|&i| i as usize);
                let found =
                    found.filter(|&i| x.list.get(i).is_some_and(|c| Arc::ptr_eq(c, member)));
                if let Some(i) = found {
                    x.at.remove(&slot);
                    x.list.swap_remove(i);
                    if let Some(moved) = x.list.get(i) {
                        x.at.insert(moved.slot(), pos(i));
                    }
                    if x.at.len() * 4 < x.at.capacity() {
                        x.at.shrink_to(x.at.len() * 2);
                    }
                } else if let Some(i) = x.list.iter().rposition(|c| {
                    looked();
                    Arc::ptr_eq(c, member)
                }) {
                    // Its slot's entry names another member: a client
                    // whose leave was deferred (see `Topics::leave`) is
                    // still here when its slot is given to a new client,
                    // which may join too. Found by a walk, then, and the
                    // entry left to its owner.
                    x.list.swap_remove(i);
                    if let Some(moved) = x.list.get(i) {
                        x.at.insert(moved.slot(), pos(i));
                    }
                }
                if x.list.len() < INDEX_AFTER / 2 {
                    *self = Subs::Many(std::mem::take(&mut x.list));
                }
            }
        }
        let list = match self {
            Subs::Many(v) => v,
            Subs::Indexed(x) => &mut x.list,
            Subs::One(_) => return true,
        };
        shrink(list);
        match list.len() {
            0 => false,
            1 => {
                let last = list.pop().expect("one left");
                *self = Subs::One(last);
                true
            }
            _ => true,
        }
    }
}

/// A topic in the set of all of them, found by its name: the name is
/// stored once, in the topic.
struct Named<T>(Arc<Topic<T>>);

impl<T> Borrow<str> for Named<T> {
    fn borrow(&self) -> &str {
        &self.0.name
    }
}

impl<T> Hash for Named<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // As `str` hashes, so that lookups by `&str` find it.
        self.0.name.hash(state);
    }
}

impl<T> PartialEq for Named<T> {
    fn eq(&self, other: &Self) -> bool {
        self.0.name == other.0.name
    }
}

impl<T> Eq for Named<T> {}

/// The topics of the clients in one shard that have any. A client's
/// first topic is in `first`, a map whose entry is two words; the rest
/// are in `rest`, ordered by client and then by when they were made, so
/// that a client's other topics are one range. Measured with 10,000
/// clients, this costs about 55 B a subscription, first or not (a single
/// map of per-client lists cost about 70 B for the first).
struct ByClient<T> {
    first: HashMap<ClientId, Arc<Topic<T>>>,
    rest: BTreeMap<(ClientId, u64), Arc<Topic<T>>>,
    /// Orders the entries of `rest`.
    next: u64,
}

impl<T> ByClient<T> {
    fn new() -> Self {
        ByClient {
            first: HashMap::new(),
            rest: BTreeMap::new(),
            next: 0,
        }
    }

    /// The client's topics, in the order it subscribed.
    fn of(&self, id: ClientId) -> impl Iterator<Item = &Arc<Topic<T>>> {
        let rest = self.rest.range((id, 0)..=(id, u64::MAX)).map(|(_, t)| t);
        self.first.get(&id).into_iter().chain(rest)
    }

    fn has(&self, id: ClientId, name: &str) -> bool {
        self.of(id).any(|t| &*t.name == name)
    }

    fn push(&mut self, id: ClientId, topic: Arc<Topic<T>>) {
        match self.first.entry(id) {
            Entry::Occupied(_) => {
                self.rest.insert((id, self.next), topic);
                self.next += 1;
            }
            Entry::Vacant(slot) => {
                slot.insert(topic);
            }
        }
    }

    /// Take the client's topic `name` out.
    fn remove(&mut self, id: ClientId, name: &str) -> Option<Arc<Topic<T>>> {
        let first = self.first.get(&id)?;
        if &*first.name != name {
            let key = self
                .rest
                .range((id, 0)..=(id, u64::MAX))
                .find(|(_, t)| &*t.name == name)
                .map(|(key, _)| *key)?;
            return self.rest.remove(&key);
        }
        let topic = self.first.remove(&id);
        if let Some(n) = shrunk(self.first.len(), self.first.capacity()) {
            self.first.shrink_to(n);
        }
        // The next oldest becomes the first.
        let next = self
            .rest
            .range((id, 0)..=(id, u64::MAX))
            .next()
            .map(|(key, _)| *key);
        if let Some(t) = next.and_then(|key| self.rest.remove(&key)) {
            self.first.insert(id, t);
        }
        topic
    }

    /// Take all the client's topics out.
    fn take(&mut self, id: ClientId) -> Vec<Arc<Topic<T>>> {
        let Some(first) = self.first.remove(&id) else {
            return Vec::new();
        };
        if let Some(n) = shrunk(self.first.len(), self.first.capacity()) {
            self.first.shrink_to(n);
        }
        let keys: Vec<_> = self
            .rest
            .range((id, 0)..=(id, u64::MAX))
            .map(|(key, _)| *key)
            .collect();
        let rest = keys.iter().filter_map(|key| self.rest.remove(key));
        std::iter::once(first).chain(rest).collect()
    }
}

/// `by_client` is split in this many maps, each with its own lock: a
/// subscribe locks only its client's shard, and as the clients grow in
/// number each map grows in small steps (one big table, grown by
/// doubling, left holes of about 20 B per client in the heap, measured
/// with 10,000 clients).
const CLIENT_SHARDS: usize = 64;

pub(crate) struct Topics<T> {
    by_name: RwLock<HashSet<Named<T>>>,
    /// The topics of each client that has any.
    by_client: Box<[Mutex<ByClient<T>>]>,
    /// Told when a topic gains its first subscriber or loses its last.
    bridge: Option<Arc<BridgeRt>>,
    /// Clients torn down while a topic of theirs was busy (a publish
    /// fanning out), to be taken out of it by whoever holds it next: a
    /// teardown runs on a pool worker, which must not wait out someone
    /// else's fan-out (with a compression per subscriber, seconds at ten
    /// thousand). Seldom more than a few.
    leavers: Mutex<Vec<Leaver<T>>>,
    /// The server, for `let_go` (set once it is made).
    shared: std::sync::OnceLock<std::sync::Weak<Shared<T>>>,
}

/// A client to take out of a topic (see `Topics::leavers`).
type Leaver<T> = (Arc<Topic<T>>, Arc<Conn<T>>);

impl<T> Topics<T> {
    pub(crate) fn new(bridge: Option<Arc<BridgeRt>>) -> Self {
        Topics {
            by_name: RwLock::new(HashSet::new()),
            by_client: (0..CLIENT_SHARDS)
                .map(|_| Mutex::new(ByClient::new()))
                .collect(),
            bridge,
            leavers: Mutex::new(Vec::new()),
            shared: std::sync::OnceLock::new(),
        }
    }
}

impl<T> Topics<T> {
    /// Tell the topics their server, once it is made.
    pub(crate) fn set_shared(&self, shared: std::sync::Weak<Shared<T>>) {
        let _ = self.shared.set(shared);
    }

    /// The shard of `by_client` that holds `id`'s topics.
    fn clients(&self, id: ClientId) -> parking_lot::MutexGuard<'_, ByClient<T>> {
        self.by_client[id.as_u64() as usize % CLIENT_SHARDS].lock()
    }
}

/// A topic's subscribers, locked through [`Topics::lock`]: leaves that
/// waited for the lock are done when it is taken, and looked for again
/// once it is let go (`Topics::settle`); a topic emptied while held is
/// forgotten then.
struct Locked<'a, T: Send + Sync + 'static> {
    topics: &'a Topics<T>,
    topic: &'a Arc<Topic<T>>,
    subs: Option<parking_lot::MutexGuard<'a, Subs<Conn<T>>>>,
    /// Its last subscriber left while held (`dead` is set).
    emptied: bool,
    /// Clients whose leave was done when it was taken, let go after it.
    gone: Vec<Arc<Conn<T>>>,
}

impl<T: Send + Sync + 'static> std::ops::Deref for Locked<'_, T> {
    type Target = Subs<Conn<T>>;
    fn deref(&self) -> &Self::Target {
        self.subs.as_ref().expect("held until dropped")
    }
}

impl<T: Send + Sync + 'static> std::ops::DerefMut for Locked<'_, T> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.subs.as_mut().expect("held until dropped")
    }
}

impl<T: Send + Sync + 'static> Drop for Locked<'_, T> {
    fn drop(&mut self) {
        drop(self.subs.take());
        self.topics.let_go(std::mem::take(&mut self.gone));
        if self.emptied {
            self.topics.forget(self.topic);
        }
        // Unwinding (a panic while it was held), leaves wait for the next
        // to take the topic: a drop that panicked now would abort.
        if !std::thread::panicking() {
            self.topics.settle(self.topic);
        }
    }
}

impl<T: Send + Sync + 'static> Topics<T> {
    /// Subscribe `conn` to `name`: `Ok(true)` if it was new.
    pub(crate) fn subscribe(
        &self,
        shared: &Shared<T>,
        conn: &Arc<Conn<T>>,
        name: &str,
    ) -> Result<bool> {
        let config = &shared.config;
        if name.is_empty() {
            return Err(Error::InvalidInput("empty topic name"));
        }
        if name.len() > config.max_topic_len {
            return Err(Error::TopicLimit("topic name longer than max_topic_len"));
        }
        let id = conn.client.id();
        let mut clients = self.clients(id);
        let mut waits = 0;
        loop {
            // Checked under `by_client`, which teardown takes after
            // marking the connection finished: a subscription either is
            // seen by the teardown's cleanup or never made.
            if conn.io.lock().finished {
                return Err(Error::Closed);
            }
            if clients.has(id, name) {
                return Ok(false);
            }
            if clients.of(id).count() >= config.max_topics_per_client {
                return Err(Error::TopicLimit(
                    "client already in max_topics_per_client topics",
                ));
            }
            // The name lock is never held while a topic's lock is awaited:
            // a publish holds that one for its whole fan-out, and every
            // other topic's publishes, subscribes and leaves need the name
            // lock.
            let found = self.by_name.read().get(name).map(|Named(t)| Arc::clone(t));
            let Some(t) = found else {
                let mut names = self.by_name.write();
                match names.get(name) {
                    // Made meanwhile: join it as below.
                    Some(Named(t)) if !t.dead.load(Ordering::Acquire) => continue,
                    Some(_) => {
                        // Its last subscriber is leaving; that leave
                        // finds it gone and tells no one twice.
                        names.remove(name);
                        if let Some(bridge) = &self.bridge {
                            bridge.topic_changed(name, false);
                        }
                    }
                    None if names.len() >= config.max_topics => {
                        return Err(Error::TopicLimit("server already has max_topics topics"));
                    }
                    None => {}
                }
                let t = Arc::new(Topic {
                    name: name.into(),
                    subs: Mutex::new(Subs::One(Arc::clone(conn))),
                    dead: AtomicBool::new(false),
                    leaving: AtomicBool::new(false),
                    #[cfg(test)]
                    waiting: std::sync::atomic::AtomicUsize::new(0),
                    #[cfg(test)]
                    deferred: std::sync::atomic::AtomicUsize::new(0),
                });
                names.insert(Named(Arc::clone(&t)));
                if let Some(bridge) = &self.bridge {
                    bridge.topic_changed(name, true);
                }
                clients.push(id, t);
                return Ok(true);
            };
            let Some(mut subs) = self.lock_subs(&mut clients, &t, &mut waits) else {
                // Let go of the shard while a publish fans out; what was
                // checked above is checked again.
                continue;
            };
            if t.dead.load(Ordering::Acquire) {
                // Emptied since it was found: take it out (if its leave
                // has not yet) and make a new one.
                drop(subs);
                self.forget(&t);
                continue;
            }
            subs.push(Arc::clone(conn));
            drop(subs);
            clients.push(id, t);
            return Ok(true);
        }
    }

    /// Lock `topic`'s subscribers while holding a shard of `by_client`.
    /// A publish holds them for its whole fan-out, which takes long for a
    /// topic of many subscribers; the shard's other clients (their
    /// subscribes, leaves and teardowns, which run on the pool) must not
    /// wait for it. So if the topic is busy, the shard is let go until
    /// the publish is done, and `None` tells the caller to look again,
    /// as anything may have changed meanwhile. After a few such waits (a
    /// topic published to without a break) it waits holding the shard,
    /// so that the caller gets its turn.
    fn lock_subs<'a>(
        &'a self,
        clients: &mut parking_lot::MutexGuard<'_, ByClient<T>>,
        topic: &'a Arc<Topic<T>>,
        waits: &mut u32,
    ) -> Option<Locked<'a, T>> {
        if let Some(subs) = topic.subs.try_lock() {
            return Some(self.locked(topic, subs));
        }
        if *waits >= 8 {
            return Some(self.lock(topic));
        }
        *waits += 1;
        parking_lot::MutexGuard::unlocked(clients, || {
            #[cfg(test)]
            topic.waiting.fetch_add(1, Ordering::SeqCst);
            drop(self.lock(topic));
        });
        None
    }

    /// Lock `topic`'s subscribers (see [`Locked`]).
    fn lock<'a>(&'a self, topic: &'a Arc<Topic<T>>) -> Locked<'a, T> {
        self.locked(topic, topic.subs.lock())
    }

    /// `subs`, just locked, as a [`Locked`]: leaves that waited for it
    /// are done first.
    fn locked<'a>(
        &'a self,
        topic: &'a Arc<Topic<T>>,
        mut subs: parking_lot::MutexGuard<'a, Subs<Conn<T>>>,
    ) -> Locked<'a, T> {
        let (emptied, gone) = self.apply_leavers(topic, &mut subs);
        Locked {
            topics: self,
            topic,
            subs: Some(subs),
            emptied,
            gone,
        }
    }

    /// Take out of `subs` (`topic`'s, held) the clients whose teardown
    /// found it busy. Whether that emptied it (it is then dead), and the
    /// clients, to be let go of only once `subs` is: one may be the last
    /// reference to its connection, whose drop may run the user's `Drop`
    /// for its data, which may publish to this very topic.
    fn apply_leavers(
        &self,
        topic: &Topic<T>,
        subs: &mut Subs<Conn<T>>,
    ) -> (bool, Vec<Arc<Conn<T>>>) {
        if !topic.leaving.load(Ordering::SeqCst) {
            return (false, Vec::new());
        }
        // Cleared before they are taken: one added after this is either
        // taken below or sets it again.
        topic.leaving.store(false, Ordering::SeqCst);
        let gone: Vec<Arc<Conn<T>>> = {
            let mut all = self.leavers.lock();
            let mut mine = Vec::new();
            let mut i = 0;
            while i < all.len() {
                if std::ptr::eq(&*all[i].0, topic) {
                    mine.push(all.swap_remove(i).1);
                } else {
                    i += 1;
                }
            }
            if all.is_empty() && all.capacity() > 64 {
                all.shrink_to(8);
            }
            mine
        };
        if gone.is_empty() || subs.as_slice().is_empty() {
            return (false, gone);
        }
        let mut left = true;
        for conn in &gone {
            left = subs.remove(conn);
        }
        if !left {
            topic.dead.store(true, Ordering::Release);
        }
        (!left, gone)
    }

    /// Let go of clients whose deferred leave was done. The hold on one
    /// may be its connection's last (its teardown is over), whose drop
    /// runs the user's `Drop` for its data: that goes to a worker,
    /// guarded, as the readiness loop's last holds do, never here, where
    /// the caller may hold a shard of `by_client` (a `Drop` that used the
    /// topics would deadlock) or be any thread (one that panicked would
    /// unwind through a teardown, a subscribe, a user's publish).
    fn let_go(&self, gone: Vec<Arc<Conn<T>>>) {
        if gone.is_empty() {
            return;
        }
        // Whoever called holds the server, so this is never its last.
        let shared = self.shared.get().and_then(std::sync::Weak::upgrade);
        for conn in gone {
            match &shared {
                Some(s) => crate::runtime::poller::let_go(s, conn),
                None => drop(conn),
            }
        }
    }

    /// Someone just let go of `topic`'s subscribers: if a teardown left a
    /// leave for whoever held them meanwhile, do it, unless another
    /// thread holds them now (its own letting go comes here too).
    ///
    /// A teardown sets `leaving` and then tries the lock; whoever lets go
    /// of it then reads `leaving`. With a fence between the two in each,
    /// one of them sees the other's: the leave is never left behind with
    /// nobody holding the topic.
    fn settle(&self, topic: &Arc<Topic<T>>) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if topic.leaving.load(Ordering::SeqCst)
            && let Some(subs) = topic.subs.try_lock()
        {
            // Taking it does the leaves; letting go settles again.
            drop(self.locked(topic, subs));
        }
    }

    /// Unsubscribe `conn` from `name`: whether it was subscribed.
    pub(crate) fn unsubscribe(&self, conn: &Arc<Conn<T>>, name: &str) -> bool {
        let id = conn.client.id();
        let mut clients = self.clients(id);
        let mut waits = 0;
        loop {
            let Some(topic) = clients.of(id).find(|t| &*t.name == name).cloned() else {
                return false;
            };
            let Some(mut subs) = self.lock_subs(&mut clients, &topic, &mut waits) else {
                continue;
            };
            clients.remove(id, name);
            drop(clients);
            let left = subs.remove(conn);
            if !left {
                topic.dead.store(true, Ordering::Release);
                // Forgotten once let go, by the guard.
                subs.emptied = true;
            }
            drop(subs);
            return true;
        }
    }

    /// Take `conn` out of `topic`, and the topic out of the server if it
    /// was the last subscriber.
    /// If a publish holds the topic, its leave is left to whoever holds
    /// it next, and the teardown goes on: the connection is finished, so
    /// sends to it fail meanwhile.
    fn leave(&self, topic: &Arc<Topic<T>>, conn: &Arc<Conn<T>>) {
        let Some(subs) = topic.subs.try_lock() else {
            {
                let mut leavers = self.leavers.lock();
                leavers.push((Arc::clone(topic), Arc::clone(conn)));
                topic.leaving.store(true, Ordering::SeqCst);
                #[cfg(test)]
                topic.deferred.fetch_add(1, Ordering::SeqCst);
            }
            // Whoever held it may have let go before `leaving` was set.
            self.settle(topic);
            return;
        };
        let mut subs = self.locked(topic, subs);
        if !subs.remove(conn) {
            topic.dead.store(true, Ordering::Release);
            subs.emptied = true;
        }
    }

    /// Take a topic whose last subscriber left out of `by_name`, unless
    /// that was done already (or a new topic of its name is there).
    fn forget(&self, topic: &Arc<Topic<T>>) {
        let mut names = self.by_name.write();
        if names
            .get(&*topic.name)
            .is_some_and(|Named(t)| Arc::ptr_eq(t, topic))
        {
            names.remove(&*topic.name);
            if let Some(n) = shrunk(names.len(), names.capacity()) {
                names.shrink_to(n);
            }
            if let Some(bridge) = &self.bridge {
                bridge.topic_changed(&topic.name, false);
            }
        }
    }

    /// The connection is going: end all its subscriptions (before its
    /// `Disconnect` is emitted).
    pub(crate) fn remove_client(&self, conn: &Arc<Conn<T>>) {
        let mine = self.clients(conn.client.id()).take(conn.client.id());
        for topic in &mine {
            self.leave(topic, conn);
        }
    }

    pub(crate) fn is_subscribed(&self, id: ClientId, name: &str) -> bool {
        self.clients(id).has(id, name)
    }

    /// The client's topics, in the order it subscribed.
    pub(crate) fn topics_of(&self, id: ClientId) -> Vec<String> {
        self.clients(id)
            .of(id)
            .map(|t| t.name.to_string())
            .collect()
    }

    pub(crate) fn subscribers(&self, name: &str) -> usize {
        let topic = self.by_name.read().get(name).map(|Named(t)| Arc::clone(t));
        topic.map_or(0, |t| self.lock(&t).as_slice().len())
    }

    /// The names of the topics that have subscribers now.
    pub(crate) fn names(&self) -> Vec<Box<str>> {
        self.by_name
            .read()
            .iter()
            .map(|Named(t)| t.name.clone())
            .collect()
    }

    /// Topics that have subscribers now.
    pub(crate) fn count(&self) -> usize {
        self.by_name.read().len()
    }

    /// Publish `message` to every subscriber of `name` but `except`, and
    /// hand it to `relay` (the bridge) too: under the topic's lock if the
    /// topic is here, so that the other servers get the topic's messages
    /// in the order its subscribers here do.
    pub(crate) fn publish(
        &self,
        shared: &Arc<Shared<T>>,
        name: &str,
        message: &Message,
        except: Option<&Conn<T>>,
        relay: Option<&BridgeRt>,
    ) -> Broadcast {
        let mut report = Broadcast::default();
        // The envelope is made before any lock is taken.
        let relayed = relay.and_then(|b| Some((b, b.prepare(name, message)?)));
        if name.is_empty() || name.len() > shared.config.max_topic_len {
            // No topic has such a name (`subscribe` refuses it): not
            // worth hashing, up to a whole message's length, under the
            // lock every topic's creation and removal needs.
            if let Some((bridge, item)) = relayed {
                bridge.push(name, item);
            }
            return report;
        }
        let Some(topic) = self.by_name.read().get(name).map(|Named(t)| Arc::clone(t)) else {
            if let Some((bridge, item)) = relayed {
                bridge.push(name, item);
            }
            return report;
        };
        let mut to_flush = Vec::new();
        {
            let subs = self.lock(&topic);
            let subs = subs.as_slice();
            let frames = Frames::new(shared, message, subs);
            for conn in subs.iter() {
                if except.is_some_and(|e| std::ptr::eq(e, &**conn)) {
                    continue;
                }
                match frames.queue(shared, conn) {
                    Ok(true) => to_flush.push(Arc::clone(conn)),
                    Ok(false) => report.queued += 1,
                    Err(e) if e.is_backpressure() => report.dropped += 1,
                    Err(_) => report.closed += 1,
                }
            }
            if let Some((bridge, item)) = relayed {
                bridge.push(name, item);
            }
        }
        let flushed = crate::runtime::broadcast::flush_all(shared, to_flush);
        report.written += flushed.written;
        report.queued += flushed.queued;
        // A subscriber whose write failed, or that was torn down between
        // queueing and flushing, lost it with the connection.
        report.closed += flushed.closed;
        report.dropped += flushed.dropped;
        report
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use crate::WebSocketServer;

    thread_local! {
        /// Subscribers a removal looked at, on this thread.
        pub(super) static EXAMINED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    use super::{INDEX_AFTER, Slot, Subs};
    use crate::runtime::testing::join;
    use std::sync::Arc;

    impl Slot for u32 {
        fn slot(&self) -> u32 {
            *self
        }
    }

    /// Members looked at by the removals `f` makes.
    fn examined(f: impl FnOnce()) -> usize {
        EXAMINED.with(|n| n.set(0));
        f();
        EXAMINED.with(|n| n.get())
    }

    /// `n` distinct members.
    fn crowd(n: u32) -> Vec<Arc<u32>> {
        (0..n).map(Arc::new).collect()
    }

    /// A list of `members`.
    fn list(members: Vec<Arc<u32>>) -> Subs<u32> {
        let mut m = Subs::Many(Vec::new());
        for c in members {
            m.push(c);
        }
        m
    }

    fn indexed(m: &Subs<u32>) -> bool {
        matches!(m, Subs::Indexed(_))
    }

    /// A member still in a topic when its slot is given to another (its
    /// leave was deferred), which joins too: the index's entry for the
    /// slot names the newer one, and each is still taken out, the other
    /// staying. Before, the older one was not found, and stayed for good.
    #[test]
    fn a_member_whose_slot_another_joined_with_is_still_taken_out() {
        let mut m = list(crowd(INDEX_AFTER as u32 + 100));
        // Deep removals make the index.
        for i in 0..10u32 {
            let member = Arc::clone(&m.as_slice()[i as usize]);
            m.remove(&member);
        }
        assert!(indexed(&m));
        let old = Arc::clone(&m.as_slice()[500]);
        // Another member with the same slot.
        let new = Arc::new(*old);
        m.push(Arc::clone(&new));
        let len = m.as_slice().len();
        assert!(m.remove(&old));
        assert_eq!(m.as_slice().len(), len - 1);
        assert!(
            !m.as_slice().iter().any(|c| Arc::ptr_eq(c, &old)),
            "the old one stayed"
        );
        assert!(m.as_slice().iter().any(|c| Arc::ptr_eq(c, &new)));
        // And the other way round: the newer one first.
        let old = Arc::clone(&m.as_slice()[300]);
        let new = Arc::new(*old);
        m.push(Arc::clone(&new));
        assert!(m.remove(&new));
        assert!(
            !m.as_slice().iter().any(|c| Arc::ptr_eq(c, &new)),
            "the new one stayed"
        );
        assert!(m.remove(&old));
        assert!(
            !m.as_slice().iter().any(|c| Arc::ptr_eq(c, &old)),
            "the old one stayed"
        );
        assert_eq!(m.as_slice().len(), len - 2);
    }

    /// The index, if kept, says where every member is, and nobody is in
    /// twice.
    fn check(m: &Subs<u32>) {
        let all = m.as_slice();
        let distinct: std::collections::HashSet<_> = all.iter().map(|c| c.slot()).collect();
        assert_eq!(distinct.len(), all.len(), "a member is in twice");
        if all.len() < INDEX_AFTER / 2 {
            assert!(!indexed(m), "a small list has no index");
        }
        if let Subs::Indexed(x) = m {
            assert_eq!(x.at.len(), x.list.len());
            for (i, c) in x.list.iter().enumerate() {
                assert_eq!(x.at.get(&c.slot()), Some(&super::pos(i)), "member {c}");
            }
        }
    }

    /// A client that subscribes to a big topic and leaves it, in a loop,
    /// costs one look per leave, not a walk of the whole list (before the
    /// search from the end: 100,001 looks here, about 100 µs under the
    /// topic's lock each).
    #[test]
    fn leaving_right_after_joining_a_big_topic_is_found_at_once() {
        let mut m = list(crowd(100_000));
        let churner = Arc::new(u32::MAX);
        for _ in 0..3 {
            m.push(Arc::clone(&churner));
            assert_eq!(examined(|| assert!(m.remove(&churner))), 1);
            assert_eq!(m.as_slice().len(), 100_000);
        }
        assert!(!indexed(&m), "no index for leaves found at once");
        check(&m);
    }

    /// Two clients taking turns: each leave moves the other (the last in)
    /// into the deep slot it left, and it joins again last. The first
    /// leave walks the list and makes the index; each after is one look.
    /// Without the index each leave walked about the whole list (200
    /// million looks here).
    #[test]
    fn two_clients_taking_turns_at_a_deep_slot_are_each_found_at_once() {
        let (a, b) = (Arc::new(u32::MAX), Arc::new(u32::MAX - 1));
        let mut m = Subs::One(Arc::clone(&a));
        for c in crowd(100_000) {
            m.push(c);
        }
        m.push(Arc::clone(&b));
        let mut looks = 0;
        for _ in 0..1000 {
            looks += examined(|| assert!(m.remove(&a)));
            m.push(Arc::clone(&a));
            looks += examined(|| assert!(m.remove(&b)));
            m.push(Arc::clone(&b));
        }
        assert_eq!(looks, 100_002 + 1999, "one walk, then one look a leave");
        assert!(indexed(&m));
        assert_eq!(m.as_slice().len(), 100_002);
        check(&m);
    }

    /// A crowd of old subscribers leaving in the order they came (each
    /// the deepest): one walk, then one look each while the list is big,
    /// and a walk of at most half the threshold each once it is small.
    /// Searching from the end only, it was about n²/2 looks (5 billion
    /// here).
    #[test]
    fn old_subscribers_leaving_together_are_each_found_quickly() {
        let all = crowd(100_000);
        let mut m = list(all.clone());
        let looks = examined(|| {
            for (i, c) in all.iter().enumerate() {
                assert_eq!(m.remove(c), i + 1 < all.len());
            }
        });
        assert!(m.as_slice().is_empty());
        let bound = 2 * 100_000 + (INDEX_AFTER / 2) * (INDEX_AFTER / 2);
        assert!(looks <= bound, "{looks} looks, over {bound}");
    }

    /// Joins and leaves in a pseudo-random order, across the threshold
    /// both ways (the index made, dropped and made again): the list always
    /// holds exactly who joined and did not leave, and the index where
    /// each is.
    #[test]
    fn members_stay_exact_across_the_index_threshold() {
        let pool = crowd(3 * INDEX_AFTER as u32);
        let (mut was_indexed, mut dropped, mut rebuilt) = (false, false, false);
        let mut model = std::collections::HashSet::new();
        let mut m = Subs::Many(Vec::new());
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for step in 0..45_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Mostly joins, then mostly leaves (down to a few, so that
            // the index is dropped), then mostly joins again.
            let joins = match step {
                0..15_000 => 70,
                15_000..30_000 => 10,
                _ => 70,
            };
            let join = (x % 100) < joins;
            let c = &pool[(x >> 8) as usize % pool.len()];
            if join && model.insert(**c) {
                m.push(Arc::clone(c));
            } else if !join && model.remove(&**c) {
                assert_eq!(m.remove(c), !model.is_empty());
            }
            let now = super::tests::indexed(&m);
            dropped |= was_indexed && !now;
            was_indexed |= now;
            rebuilt |= dropped && now;
            if step % 997 == 0 {
                check(&m);
            }
            assert_eq!(m.as_slice().len(), model.len());
        }
        check(&m);
        let mut left: Vec<u32> = m.as_slice().iter().map(|c| **c).collect();
        let mut want: Vec<u32> = model.into_iter().collect();
        left.sort_unstable();
        want.sort_unstable();
        assert_eq!(left, want);
        assert!(
            was_indexed && dropped && rebuilt,
            "the index was made {was_indexed}, dropped {dropped}, made again {rebuilt}"
        );
    }

    /// The topic named `name`, as a publish finds it.
    fn topic(server: &WebSocketServer, name: &str) -> std::sync::Arc<super::Topic<()>> {
        server
            .shared()
            .topics
            .by_name
            .read()
            .get(name)
            .map(|super::Named(t)| std::sync::Arc::clone(t))
            .unwrap()
    }

    /// Wait until `n` threads have let their shard go and wait for
    /// `topic`'s subscribers.
    fn wait_for_waiters(topic: &super::Topic<()>, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while topic.waiting.load(std::sync::atomic::Ordering::SeqCst) < n {
            assert!(
                std::time::Instant::now() < deadline,
                "{} of {n} threads came to wait for the topic's lock",
                topic.waiting.load(std::sync::atomic::Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// After a surge of topics, the table of names gives its memory back
    /// (it kept its peak size: about 19 MB after a million topics).
    #[test]
    fn the_names_table_shrinks_when_most_topics_are_gone() {
        let server = WebSocketServer::builder()
            .max_topics_per_client(3_000)
            .start("127.0.0.1:0")
            .unwrap();
        let (_s, a) = join(&server);
        let names: Vec<String> = (0..3_000).map(|i| format!("t{i}")).collect();
        for n in &names {
            assert!(a.subscribe(n).unwrap());
        }
        let topics = &server.shared().topics;
        let peak = topics.by_name.read().capacity();
        assert!(peak >= 3_000, "{peak}");
        for n in &names[10..] {
            assert!(a.unsubscribe(n));
        }
        let after = topics.by_name.read().capacity();
        assert!(after < 64, "{peak} then {after}");
        assert_eq!(server.stats().topics, 10);
        let mut map: std::collections::HashMap<u32, u32> = (0..10_000).map(|i| (i, i)).collect();
        for i in 10..10_000 {
            map.remove(&i);
            if let Some(n) = super::shrunk(map.len(), map.capacity()) {
                map.shrink_to(n);
            }
        }
        assert!(map.capacity() < 1024, "{}", map.capacity());
        assert_eq!(map.len(), 10);
    }

    /// A publish to a name no topic can have (longer than
    /// `max_topic_len`) does not wait for the names' lock, which it
    /// would hold while hashing up to a whole message's length.
    #[test]
    fn a_publish_to_an_over_long_name_does_not_take_the_names_lock() {
        let server = WebSocketServer::builder().start("127.0.0.1:0").unwrap();
        let long = "x".repeat(server.shared().config.max_topic_len + 1);
        let handle = server.handle();
        let names = server.shared().topics.by_name.write();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || tx.send(handle.publish(&long, "m")).unwrap());
        let report = rx.recv_timeout(Duration::from_secs(5));
        drop(names);
        let report = report.expect("the publish waited for the names' lock");
        assert_eq!(
            report.written + report.queued + report.dropped + report.closed,
            0
        );
    }

    /// The next event for `id`, skipping others.
    fn event_of(server: &WebSocketServer, id: crate::ClientId) -> crate::Event {
        loop {
            match server.recv_timeout(Duration::from_secs(5)) {
                Ok(e) if e.client().is_some_and(|c| c.id() == id) => return e,
                Ok(_) => {}
                Err(e) => panic!("no event for {id:?}: {e:?}"),
            }
        }
    }

    /// A client torn down while a publish holds its topics (a fan-out to
    /// many subscribers, with a compression each under context takeover,
    /// takes seconds) does not make its worker wait for it: the leave is
    /// done by whoever holds the topic next. Before, the teardown waited
    /// on the topic's lock, and with one worker nobody else was served.
    #[test]
    fn a_teardown_does_not_wait_for_a_publish_to_its_topics() {
        use std::io::Write;
        let server = WebSocketServer::builder()
            .workers(1)
            .start("127.0.0.1:0")
            .unwrap();
        let (sa, a) = join(&server);
        let (mut sb, b) = join(&server);
        let (_sc, c) = join(&server);
        assert!(a.subscribe("hot").unwrap());
        assert!(c.subscribe("hot").unwrap());
        assert!(a.subscribe("solo").unwrap());
        let topics = &server.shared().topics;
        let (hot, solo) = (topic(&server, "hot"), topic(&server, "solo"));
        // Publishes to both fan out, as far as the others can tell.
        let fan_out = hot.subs.lock();
        let held = topics.lock(&solo);
        drop(sa);
        match event_of(&server, a.id()) {
            crate::Event::Disconnect { .. } => {}
            other => panic!("{other:?}"),
        }
        // The only worker is free: another client is served.
        sb.write_all(&[0x81, 0x82, 0, 0, 0, 0, b'h', b'i']).unwrap();
        match event_of(&server, b.id()) {
            crate::Event::Message { message, .. } => assert_eq!(message.as_text(), Some("hi")),
            other => panic!("{other:?}"),
        }
        assert_eq!(server.stats().topics, 2);
        // Letting go of "solo" does its leave: its last subscriber is
        // gone, and so is the topic.
        drop(held);
        assert_eq!(server.stats().topics, 1);
        assert!(solo.dead.load(std::sync::atomic::Ordering::SeqCst));
        // The next to take "hot" does its leave first.
        drop(fan_out);
        assert_eq!(server.subscribers("hot"), 1);
        let report = server.publish("hot", "x");
        assert_eq!((report.written + report.queued, report.closed), (1, 0));
        assert!(topics.leavers.lock().is_empty());
    }

    /// A deferred leave may hold a client's connection last (its
    /// teardown over, its events consumed): its data's `Drop` then runs
    /// on a worker, guarded and reported, not on the thread that next
    /// takes the topic. Before, one that panicked unwound out of that
    /// thread's call (here `subscribers`; a teardown, a subscribe or a
    /// user's publish as well).
    #[test]
    fn a_deferred_leave_lets_go_of_the_client_on_a_worker() {
        let (server, reported) = crate::runtime::testing::bomb_server();
        let (sa, a) = join(&server);
        assert!(a.subscribe("hot").unwrap());
        let id = a.id();
        drop(a);
        let hot = server
            .shared()
            .topics
            .by_name
            .read()
            .get("hot")
            .map(|super::Named(t)| std::sync::Arc::clone(t))
            .unwrap();
        // A publish to "hot" fans out.
        let fan_out = hot.subs.lock();
        drop(sa);
        // Once its event is let go, the deferred leave holds the last.
        crate::runtime::testing::wait_gone(&server, id);
        drop(fan_out);
        let taken =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| server.subscribers("hot")));
        assert_eq!(taken.ok(), Some(0), "the drop panicked here");
        let report = reported.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(report.contains("client data dropped"), "{report}");
    }

    /// Many teardowns while publishes from several threads keep the
    /// topics busy: every leave is done by the time the last publish
    /// lets go, with nobody taking the topics after (a leave left behind
    /// would stay in `leavers`, its topic counted, for good).
    #[test]
    fn leaves_during_publishes_from_many_threads_are_all_done() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let server = WebSocketServer::builder()
            .workers(4)
            .start("127.0.0.1:0")
            .unwrap();
        let mut deferred = 0;
        for round in 0..20 {
            let stays = join(&server);
            assert!(stays.1.subscribe("kept").unwrap());
            let mut leaving = Vec::new();
            for _ in 0..40 {
                let (s, c) = join(&server);
                assert!(c.subscribe("kept").unwrap());
                assert!(c.subscribe("emptied").unwrap());
                leaving.push((s, c));
            }
            let stop = std::sync::Arc::new(AtomicBool::new(false));
            let publishers: Vec<_> = (0..3)
                .map(|_| {
                    let (handle, stop) = (server.handle(), std::sync::Arc::clone(&stop));
                    std::thread::spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            handle.publish("kept", "k");
                            handle.publish("emptied", "e");
                        }
                    })
                })
                .collect();
            let ids: std::collections::HashSet<_> = leaving.iter().map(|(_, c)| c.id()).collect();
            let (kept, emptied) = (topic(&server, "kept"), topic(&server, "emptied"));
            drop(leaving);
            let mut gone = 0;
            while gone < ids.len() {
                match server.recv_timeout(Duration::from_secs(10)) {
                    Ok(crate::Event::Disconnect { client, .. }) if ids.contains(&client.id()) => {
                        gone += 1
                    }
                    Ok(_) => {}
                    Err(e) => panic!("round {round}: {gone} of {} gone: {e:?}", ids.len()),
                }
            }
            stop.store(true, Ordering::Relaxed);
            for p in publishers {
                p.join().unwrap();
            }
            let topics = &server.shared().topics;
            assert!(topics.leavers.lock().is_empty(), "round {round}");
            deferred +=
                kept.deferred.load(Ordering::SeqCst) + emptied.deferred.load(Ordering::SeqCst);
            assert_eq!(kept.subs.lock().as_slice().len(), 1, "round {round}");
            assert!(
                topics.by_name.read().get("emptied").is_none(),
                "round {round}: an emptied topic stayed"
            );
            assert_eq!(server.stats().topics, 1, "round {round}");
            let stays_id = stays.1.id();
            drop(stays);
            match event_of(&server, stays_id) {
                crate::Event::Disconnect { .. } => {}
                other => panic!("{other:?}"),
            }
            assert_eq!(server.stats().topics, 0, "round {round}");
        }
        // Else this tested nothing.
        assert!(deferred > 0, "no leave found a topic busy");
        eprintln!("{deferred} of 1,600 leaves deferred");
    }

    /// A publish holds its topic's lock for its whole fan-out (to 10,000
    /// subscribers, with a compression each under context takeover). A
    /// subscribe to that topic waits for it, but must not hold the lock
    /// on the names of all topics meanwhile: every other topic's
    /// publishes, subscribes and leaves, and `stats()`, would wait too.
    #[test]
    fn joining_a_topic_mid_publish_does_not_stop_the_other_topics() {
        let server = WebSocketServer::builder()
            .workers(2)
            .start("127.0.0.1:0")
            .unwrap();
        let (_sa, a) = join(&server);
        let (_sb, b) = join(&server);
        let (_sc, c) = join(&server);
        assert!(a.subscribe("hot").unwrap());
        let hot = topic(&server, "hot");
        // A publish to "hot" in its fan-out, as far as the others can tell.
        let fan_out = hot.subs.lock();
        let joiner = std::thread::spawn(move || b.subscribe("hot").unwrap());
        // The joiner at the topic's lock, its shard let go; were it to
        // hold the names meanwhile, what follows would wait for it.
        wait_for_waiters(&hot, 1);
        let (done_tx, done_rx) = mpsc::channel();
        let handle = server.handle();
        let others = std::thread::spawn(move || {
            assert!(c.subscribe("cold").unwrap());
            let report = handle.publish("cold", "x");
            assert_eq!(report.written + report.queued, 1);
            assert_eq!(handle.subscribers("cold"), 1);
            assert!(c.unsubscribe("cold"));
            done_tx.send(()).unwrap();
        });
        let done = done_rx.recv_timeout(Duration::from_secs(5));
        drop(fan_out);
        assert!(
            done.is_ok(),
            "another topic waited for the publish to \"hot\""
        );
        others.join().unwrap();
        assert!(joiner.join().unwrap());
        assert_eq!(server.subscribers("hot"), 2);
    }

    /// Subscribes and leaves lock their client's shard of `by_client`
    /// (one of 64), which the shard's other clients need to subscribe,
    /// leave, list their topics and be torn down (on the pool). A client
    /// joining or leaving a topic in the middle of a long publish must
    /// not hold its shard while it waits for that publish.
    #[test]
    fn joining_or_leaving_a_busy_topic_does_not_stop_its_shard() {
        let server = WebSocketServer::builder()
            .workers(2)
            .start("127.0.0.1:0")
            .unwrap();
        let (_sa, a) = join(&server);
        let (_sb, b) = join(&server);
        let shard = |c: &crate::Client| c.id().as_u64() % super::CLIENT_SHARDS as u64;
        // Two more clients in `b`'s shard.
        let mut sockets = Vec::new();
        let mut beside = Vec::new();
        while beside.len() < 2 {
            let (s, c) = join(&server);
            if shard(&c) == shard(&b) {
                beside.push(c);
            }
            sockets.push(s);
            assert!(sockets.len() < 500, "no client in the same shard");
        }
        let (c, d) = (beside.remove(0), beside.remove(0));
        assert!(a.subscribe("hot").unwrap());
        assert!(d.subscribe("hot").unwrap());
        let hot = topic(&server, "hot");
        let fan_out = hot.subs.lock();
        let joiner = std::thread::spawn(move || b.subscribe("hot").unwrap());
        let d2 = d.clone();
        let leaver = std::thread::spawn(move || d2.unsubscribe("hot"));
        // Both at the topic's lock, their shard let go.
        wait_for_waiters(&hot, 2);
        let (done_tx, done_rx) = mpsc::channel();
        let others = std::thread::spawn(move || {
            assert!(c.subscribe("cold").unwrap());
            assert_eq!(c.topics(), vec!["cold".to_string()]);
            assert!(c.unsubscribe("cold"));
            done_tx.send(()).unwrap();
        });
        let done = done_rx.recv_timeout(Duration::from_secs(5));
        drop(fan_out);
        assert!(
            done.is_ok(),
            "a client waited for a publish to a topic it is not in"
        );
        others.join().unwrap();
        assert!(joiner.join().unwrap());
        assert!(leaver.join().unwrap());
        assert_eq!(server.subscribers("hot"), 2);
        assert!(d.topics().is_empty());
    }

    /// A subscriber whose socket fails as the publish writes to it is
    /// counted `closed`: every subscriber is in one of the report's
    /// counts.
    #[test]
    fn a_subscriber_whose_write_fails_is_counted_closed() {
        let server = WebSocketServer::builder()
            .workers(2)
            .start("127.0.0.1:0")
            .unwrap();
        let (_sa, a) = join(&server);
        assert!(a.subscribe("t").unwrap());
        let conn = server.shared().registry.get(a.id()).unwrap();
        // The handshake's job may still be ending after the Connect event
        // was sent; while it runs, a publish is corked for it to write
        // (counted `queued`). Wait until the connection is idle.
        let idle_by = std::time::Instant::now() + Duration::from_secs(5);
        while conn.io.lock().job_running {
            assert!(std::time::Instant::now() < idle_by, "the job never ended");
            std::thread::sleep(Duration::from_millis(1));
        }
        // The server's side can no longer write; nothing else knows yet.
        conn.stream.shutdown(std::net::Shutdown::Write).unwrap();
        let report = server.publish("t", "lost");
        assert_eq!(
            (report.written, report.queued, report.dropped, report.closed),
            (0, 0, 0, 1),
            "{report:?}"
        );
    }
}
