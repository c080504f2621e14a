//! The command line every peer server shares with `examples/echo`:
//! `NAME [ADDR] [echo|broadcast|pubsub] [--max-message-size BYTES]`,
//! and, for `pubsub`, the text protocol of `examples/pubsub` with a map of
//! rooms (the peers have no topics of their own).

use std::collections::HashMap;
use std::sync::Mutex;

/// What the server does with each message.
#[derive(Clone, Copy, PartialEq)]
pub enum Mode {
    /// Back to its sender.
    Echo,
    /// To every client, the sender included.
    Broadcast,
    /// Each text message is a command of `examples/pubsub`: `sub TOPIC`,
    /// `unsub TOPIC`, `pub TOPIC PAYLOAD`.
    Pubsub,
}

fn usage(name: &str, why: &str) -> ! {
    eprintln!("{why}\nusage: {name} [ADDR] [echo|broadcast|pubsub] [--max-message-size BYTES]");
    std::process::exit(2)
}

/// Parse the arguments: (address, mode, max message size). Exits with
/// status 2 and a usage line on bad input.
pub fn parse_args(name: &str, what: &str) -> (String, Mode, usize) {
    let (mut addr, mut mode, mut max) = ("127.0.0.1:13003".to_string(), Mode::Echo, 64 << 20);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "echo" => mode = Mode::Echo,
            "broadcast" => mode = Mode::Broadcast,
            "pubsub" => mode = Mode::Pubsub,
            "--max-message-size" => {
                let n = args.next().and_then(|v| v.parse().ok());
                max =
                    n.unwrap_or_else(|| usage(name, "--max-message-size needs a number of bytes"));
            }
            "-h" | "--help" => usage(name, what),
            a if a.starts_with('-') => usage(name, &format!("unknown option {a}")),
            a => addr = a.to_string(),
        }
    }
    (addr, mode, max)
}

/// One command of the pubsub protocol.
#[allow(dead_code)] // not every peer reads every field
pub enum Command<'a> {
    Sub(&'a str),
    Unsub(&'a str),
    /// (topic, payload)
    Pub(&'a str, &'a str),
    /// Anything else: the text of the `error: ` reply.
    Bad(&'static str),
}

/// Parse one text message exactly as `examples/pubsub` does.
pub fn parse_command(text: &str) -> Command<'_> {
    let (verb, rest) = text.split_once(' ').unwrap_or((text, ""));
    match verb {
        "sub" if !rest.is_empty() && !rest.contains(' ') => Command::Sub(rest),
        "unsub" if !rest.is_empty() && !rest.contains(' ') => Command::Unsub(rest),
        "pub" => match rest.split_once(' ') {
            Some((topic, payload)) if !topic.is_empty() => Command::Pub(topic, payload),
            _ => Command::Bad("error: pub TOPIC PAYLOAD"),
        },
        _ => Command::Bad("error: sub TOPIC, unsub TOPIC or pub TOPIC PAYLOAD"),
    }
}

/// The reply to a binary message in pubsub mode.
#[allow(dead_code)]
pub const NOT_TEXT: &str = "error: commands are text";

/// Rooms -> (client id -> the sender of its writer), behind one lock, as a
/// user of a library without topics would write it. The one lock also
/// gives every room one order of messages, as enjent's topics do.
pub struct Rooms<S> {
    rooms: Mutex<HashMap<Box<str>, HashMap<u64, S>>>,
}

impl<S> Default for Rooms<S> {
    fn default() -> Self {
        Rooms {
            rooms: Mutex::new(HashMap::new()),
        }
    }
}

#[allow(dead_code)]
impl<S: Clone> Rooms<S> {
    /// Add `id` to `topic`; true if it was new.
    pub fn subscribe(&self, topic: &str, id: u64, sender: &S) -> bool {
        let mut rooms = self.rooms.lock().unwrap();
        if let Some(room) = rooms.get_mut(topic) {
            return room.insert(id, sender.clone()).is_none();
        }
        rooms.insert(topic.into(), HashMap::from([(id, sender.clone())]));
        true
    }

    /// Remove `id` from `topic` (and the room once empty); true if it was in.
    pub fn unsubscribe(&self, topic: &str, id: u64) -> bool {
        let mut rooms = self.rooms.lock().unwrap();
        let Some(room) = rooms.get_mut(topic) else {
            return false;
        };
        let was = room.remove(&id).is_some();
        if room.is_empty() {
            rooms.remove(topic);
        }
        was
    }

    /// Call `send` for every member of `topic` but `from`.
    pub fn publish(&self, topic: &str, from: u64, mut send: impl FnMut(&S)) {
        if let Some(room) = self.rooms.lock().unwrap().get(topic) {
            for (_, s) in room.iter().filter(|(id, _)| **id != from) {
                send(s);
            }
        }
    }
}

/// The rooms one connection is in, so that it can leave them all when it
/// goes.
pub struct Membership {
    pub id: u64,
    pub topics: Vec<Box<str>>,
}

#[allow(dead_code)]
impl Membership {
    pub fn new(id: u64) -> Self {
        Membership {
            id,
            topics: Vec::new(),
        }
    }

    /// Carry out one command; returns the `error: ` reply to send back, if
    /// any. `publish` is called with (topic, payload) for `pub`.
    pub fn command<S: Clone>(
        &mut self,
        rooms: &Rooms<S>,
        me: &S,
        text: &str,
        publish: impl FnOnce(&str, &str),
    ) -> Option<&'static str> {
        match parse_command(text) {
            Command::Sub(topic) => {
                if rooms.subscribe(topic, self.id, me) {
                    self.topics.push(topic.into());
                }
                None
            }
            Command::Unsub(topic) => {
                if rooms.unsubscribe(topic, self.id) {
                    self.topics.retain(|t| &**t != topic);
                }
                None
            }
            Command::Pub(topic, payload) => {
                publish(topic, payload);
                None
            }
            Command::Bad(reply) => Some(reply),
        }
    }

    /// Leave every room (on disconnect).
    pub fn leave<S: Clone>(&mut self, rooms: &Rooms<S>) {
        for topic in self.topics.drain(..) {
            rooms.unsubscribe(&topic, self.id);
        }
    }
}
