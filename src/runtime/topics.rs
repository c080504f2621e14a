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

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::client::ClientId;
use crate::error::{Error, Result};
use crate::message::Message;
use crate::runtime::Shared;
use crate::runtime::broadcast::Frames;
use crate::runtime::conn::Conn;
use crate::server::Broadcast;

pub(crate) struct Topic<T> {
    name: Box<str>,
    /// The subscribers; the lock also puts the topic's publishes in one
    /// order.
    subs: Mutex<Vec<Arc<Conn<T>>>>,
}

pub(crate) struct Topics<T> {
    by_name: RwLock<HashMap<Box<str>, Arc<Topic<T>>>>,
    /// The topics of each client that has any.
    by_client: Mutex<HashMap<ClientId, Vec<Arc<Topic<T>>>>>,
}

impl<T> Default for Topics<T> {
    fn default() -> Self {
        Topics {
            by_name: RwLock::new(HashMap::new()),
            by_client: Mutex::new(HashMap::new()),
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
        if let Some(list) = clients.get(&id) {
            if list.iter().any(|t| &*t.name == name) {
                return Ok(false);
            }
            if list.len() >= config.max_topics_per_client {
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
            let topic = match names.get(name) {
                Some(t) => Arc::clone(t),
                None => {
                    if names.len() >= config.max_topics {
                        return Err(Error::TopicLimit("server already has max_topics topics"));
                    }
                    let t = Arc::new(Topic {
                        name: name.into(),
                        subs: Mutex::new(Vec::new()),
                    });
                    names.insert(name.into(), Arc::clone(&t));
                    t
                }
            };
            topic.subs.lock().push(Arc::clone(conn));
            topic
        };
        clients.entry(id).or_default().push(topic);
        Ok(true)
    }

    /// Unsubscribe `conn` from `name`: whether it was subscribed.
    pub(crate) fn unsubscribe(&self, conn: &Arc<Conn<T>>, name: &str) -> bool {
        let id = conn.client.id();
        let mut clients = self.by_client.lock();
        let Some(list) = clients.get_mut(&id) else {
            return false;
        };
        let Some(i) = list.iter().position(|t| &*t.name == name) else {
            return false;
        };
        let topic = list.remove(i);
        if list.is_empty() {
            clients.remove(&id);
        }
        self.leave(&topic, conn);
        true
    }

    /// Take `conn` out of `topic`, and the topic out of the server if it
    /// was the last subscriber.
    fn leave(&self, topic: &Arc<Topic<T>>, conn: &Arc<Conn<T>>) {
        let mut names = self.by_name.write();
        let mut subs = topic.subs.lock();
        if let Some(i) = subs.iter().position(|c| Arc::ptr_eq(c, conn)) {
            subs.swap_remove(i);
        }
        if subs.is_empty()
            && names
                .get(&*topic.name)
                .is_some_and(|t| Arc::ptr_eq(t, topic))
        {
            names.remove(&*topic.name);
        }
    }

    /// The connection is going: end all its subscriptions (before its
    /// `Disconnect` is emitted).
    pub(crate) fn remove_client(&self, conn: &Arc<Conn<T>>) {
        let list = self.by_client.lock().remove(&conn.client.id());
        for topic in list.iter().flatten() {
            self.leave(topic, conn);
        }
    }

    pub(crate) fn is_subscribed(&self, id: ClientId, name: &str) -> bool {
        self.by_client
            .lock()
            .get(&id)
            .is_some_and(|list| list.iter().any(|t| &*t.name == name))
    }

    /// The client's topics, in the order it subscribed.
    pub(crate) fn topics_of(&self, id: ClientId) -> Vec<String> {
        self.by_client
            .lock()
            .get(&id)
            .map_or_else(Vec::new, |list| {
                list.iter().map(|t| t.name.to_string()).collect()
            })
    }

    pub(crate) fn subscribers(&self, name: &str) -> usize {
        let topic = self.by_name.read().get(name).cloned();
        topic.map_or(0, |t| t.subs.lock().len())
    }

    /// Topics that have subscribers now.
    pub(crate) fn count(&self) -> usize {
        self.by_name.read().len()
    }

    /// Publish `message` to every subscriber of `name` but `except`.
    pub(crate) fn publish(
        &self,
        shared: &Arc<Shared<T>>,
        name: &str,
        message: &Message,
        except: Option<&Conn<T>>,
    ) -> Broadcast {
        let mut report = Broadcast::default();
        let Some(topic) = self.by_name.read().get(name).cloned() else {
            return report;
        };
        let mut to_flush = Vec::new();
        {
            let subs = topic.subs.lock();
            let frames = Frames::new(shared, message, &subs);
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
        }
        let flushed = crate::runtime::broadcast::flush_all(shared, to_flush);
        report.written += flushed.written;
        report.queued += flushed.queued;
        report
    }
}
