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
//! `subs`, a connection's `io`.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

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
    subs: Mutex<Subs<T>>,
}

/// A topic's subscribers: one inline (a user's own topic, say), or a list.
enum Subs<T> {
    One(Arc<Conn<T>>),
    Many(Vec<Arc<Conn<T>>>),
}

impl<T> Subs<T> {
    fn as_slice(&self) -> &[Arc<Conn<T>>] {
        match self {
            Subs::One(c) => std::slice::from_ref(c),
            Subs::Many(v) => v,
        }
    }

    fn push(&mut self, conn: Arc<Conn<T>>) {
        match self {
            Subs::Many(v) => {
                // Grown by an eighth rather than doubled: a slot here is
                // most of what a subscription costs, and a topic's list
                // seldom grows fast enough for the copies to matter.
                if v.len() == v.capacity() {
                    v.reserve_exact((v.len() / 8).max(1));
                }
                v.push(conn);
            }
            Subs::One(first) => {
                let first = Arc::clone(first);
                *self = Subs::Many(vec![first, conn]);
            }
        }
    }

    /// Take `conn` out; whether any subscriber is left.
    fn remove(&mut self, conn: &Arc<Conn<T>>) -> bool {
        let v = match self {
            Subs::One(c) if Arc::ptr_eq(c, conn) => {
                // Empty, for a publish that holds the topic already.
                *self = Subs::Many(Vec::new());
                return false;
            }
            Subs::One(_) => return true,
            Subs::Many(v) => v,
        };
        if let Some(i) = v.iter().position(|c| Arc::ptr_eq(c, conn)) {
            v.swap_remove(i);
        }
        if v.len() * 4 < v.capacity() {
            // Most have left: give the memory back.
            v.shrink_to(v.len() * 2);
        }
        match v.len() {
            0 => false,
            1 => {
                let last = v.pop().expect("one left");
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

/// A client's topics: most clients have one, kept inline; more are a
/// boxed slice of exactly their number.
enum Mine<T> {
    One(Arc<Topic<T>>),
    Many(Box<[Arc<Topic<T>>]>),
}

impl<T> Mine<T> {
    fn as_slice(&self) -> &[Arc<Topic<T>>] {
        match self {
            Mine::One(t) => std::slice::from_ref(t),
            Mine::Many(v) => v,
        }
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.as_slice().iter().position(|t| &*t.name == name)
    }

    fn push(&mut self, topic: Arc<Topic<T>>) {
        let mut all = self.as_slice().to_vec();
        all.push(topic);
        *self = Mine::Many(all.into_boxed_slice());
    }

    /// Take the `i`th out; `None` if it was the last.
    fn remove(self, i: usize) -> (Arc<Topic<T>>, Option<Mine<T>>) {
        match self {
            Mine::One(t) => (t, None),
            Mine::Many(v) => {
                let mut v = v.into_vec();
                let t = v.remove(i);
                let rest = if v.len() == 1 {
                    Mine::One(v.pop().expect("one left"))
                } else {
                    Mine::Many(v.into_boxed_slice())
                };
                (t, Some(rest))
            }
        }
    }
}

pub(crate) struct Topics<T> {
    by_name: RwLock<HashSet<Named<T>>>,
    /// The topics of each client that has any.
    by_client: Mutex<HashMap<ClientId, Mine<T>>>,
    /// Told when a topic gains its first subscriber or loses its last.
    bridge: Option<Arc<BridgeRt>>,
}

impl<T> Topics<T> {
    pub(crate) fn new(bridge: Option<Arc<BridgeRt>>) -> Self {
        Topics {
            by_name: RwLock::new(HashSet::new()),
            by_client: Mutex::new(HashMap::new()),
            bridge,
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
        let mut clients = self.by_client.lock();
        // Checked under `by_client`, which teardown takes after marking
        // the connection finished: a subscription either is seen by the
        // teardown's cleanup or never made.
        if conn.io.lock().finished {
            return Err(Error::Closed);
        }
        if let Some(mine) = clients.get(&id) {
            if mine.find(name).is_some() {
                return Ok(false);
            }
            if mine.as_slice().len() >= config.max_topics_per_client {
                return Err(Error::TopicLimit(
                    "client already in max_topics_per_client topics",
                ));
            }
        } else if config.max_topics_per_client == 0 {
            return Err(Error::TopicLimit(
                "client already in max_topics_per_client topics",
            ));
        }
        let topic = {
            let mut names = self.by_name.write();
            match names.get(name) {
                Some(Named(t)) => {
                    t.subs.lock().push(Arc::clone(conn));
                    Arc::clone(t)
                }
                None => {
                    if names.len() >= config.max_topics {
                        return Err(Error::TopicLimit("server already has max_topics topics"));
                    }
                    let t = Arc::new(Topic {
                        name: name.into(),
                        subs: Mutex::new(Subs::One(Arc::clone(conn))),
                    });
                    names.insert(Named(Arc::clone(&t)));
                    if let Some(bridge) = &self.bridge {
                        bridge.topic_changed(name, true);
                    }
                    t
                }
            }
        };
        match clients.get_mut(&id) {
            Some(mine) => mine.push(topic),
            None => {
                clients.insert(id, Mine::One(topic));
            }
        }
        Ok(true)
    }

    /// Unsubscribe `conn` from `name`: whether it was subscribed.
    pub(crate) fn unsubscribe(&self, conn: &Arc<Conn<T>>, name: &str) -> bool {
        let id = conn.client.id();
        let mut clients = self.by_client.lock();
        let Some(i) = clients.get(&id).and_then(|mine| mine.find(name)) else {
            return false;
        };
        let mine = clients.remove(&id).expect("found above");
        let (topic, rest) = mine.remove(i);
        if let Some(rest) = rest {
            clients.insert(id, rest);
        }
        self.leave(&topic, conn);
        true
    }

    /// Take `conn` out of `topic`, and the topic out of the server if it
    /// was the last subscriber.
    fn leave(&self, topic: &Arc<Topic<T>>, conn: &Arc<Conn<T>>) {
        let mut names = self.by_name.write();
        let left = topic.subs.lock().remove(conn);
        if !left
            && names
                .get(&*topic.name)
                .is_some_and(|Named(t)| Arc::ptr_eq(t, topic))
        {
            names.remove(&*topic.name);
            if let Some(bridge) = &self.bridge {
                bridge.topic_changed(&topic.name, false);
            }
        }
    }

    /// The connection is going: end all its subscriptions (before its
    /// `Disconnect` is emitted).
    pub(crate) fn remove_client(&self, conn: &Arc<Conn<T>>) {
        let mine = self.by_client.lock().remove(&conn.client.id());
        for topic in mine.iter().flat_map(Mine::as_slice) {
            self.leave(topic, conn);
        }
    }

    pub(crate) fn is_subscribed(&self, id: ClientId, name: &str) -> bool {
        self.by_client
            .lock()
            .get(&id)
            .is_some_and(|mine| mine.find(name).is_some())
    }

    /// The client's topics, in the order it subscribed.
    pub(crate) fn topics_of(&self, id: ClientId) -> Vec<String> {
        self.by_client
            .lock()
            .get(&id)
            .map_or_else(Vec::new, |mine| {
                mine.as_slice().iter().map(|t| t.name.to_string()).collect()
            })
    }

    pub(crate) fn subscribers(&self, name: &str) -> usize {
        let topic = self.by_name.read().get(name).map(|Named(t)| Arc::clone(t));
        topic.map_or(0, |t| t.subs.lock().as_slice().len())
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
        let Some(topic) = self.by_name.read().get(name).map(|Named(t)| Arc::clone(t)) else {
            if let Some((bridge, item)) = relayed {
                bridge.push(name, item);
            }
            return report;
        };
        let mut to_flush = Vec::new();
        {
            let subs = topic.subs.lock();
            let subs = subs.as_slice();
            let frames = Frames::new(shared, message, subs);
            for conn in subs.iter() {
                if except.is_some_and(|e| std::ptr::eq(e, &**conn)) {
                    continue;
                }
                match frames.queue(shared, conn) {
                    Ok(true) => to_flush.push(Arc::clone(conn)),
                    Ok(false) => report.queued += 1,
                    Err(Error::Backpressure { .. }) => report.dropped += 1,
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
        report
    }
}
