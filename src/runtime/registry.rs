//! ClientId -> connection, and poller key -> slot.
//!
//! Poller keys are a slab index plus a generation, so a readiness event
//! that arrives after its connection left cannot reach the connection that
//! reused the slot.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::client::ClientId;
use crate::runtime::conn::Conn;

const INDEX_BITS: u32 = if usize::BITS >= 64 { 32 } else { 20 };
const INDEX_MASK: usize = (1 << INDEX_BITS) - 1;
/// Generations wrap below the top bit so no key can equal polling's own
/// notification key (`usize::MAX`).
const GEN_LIMIT: u32 = 1 << (usize::BITS - INDEX_BITS - 1);

/// A connection still in its opening handshake.
pub(crate) struct Pending {
    pub(crate) key: usize,
    pub(crate) stream: TcpStream,
    pub(crate) peer: SocketAddr,
    pub(crate) buf: Vec<u8>,
    pub(crate) deadline: Instant,
    /// The deadline is in the timer heap (booked once, at the first park).
    pub(crate) timer_booked: bool,
    /// A plain HTTP answer being written (`out[sent..]` is left); the
    /// handshake deadline bounds it too.
    pub(crate) out: Vec<u8>,
    pub(crate) sent: usize,
    /// The socket is in the poller. A request that was in at accept time
    /// is read before the socket is ever registered.
    pub(crate) registered: bool,
}

pub(crate) enum Slot<T> {
    Free,
    /// `None` while a worker holds the handshake.
    Handshake(Option<Box<Pending>>),
    Open(Arc<Conn<T>>),
}

struct Entry<T> {
    generation: u32,
    slot: Slot<T>,
}

struct Slab<T> {
    entries: Vec<Entry<T>>,
    free: Vec<u32>,
    by_id: HashMap<ClientId, usize>,
    used: usize,
    per_ip: HashMap<IpAddr, u32>,
}

pub(crate) struct Registry<T> {
    slab: Mutex<Slab<T>>,
    emptied: Condvar,
}

/// What a poller key points at right now.
pub(crate) enum Found<T> {
    Handshake(Box<Pending>),
    Open(Arc<Conn<T>>),
    Nothing,
}

impl<T> Registry<T> {
    pub(crate) fn new() -> Registry<T> {
        Registry {
            slab: Mutex::new(Slab {
                entries: Vec::new(),
                free: Vec::new(),
                by_id: HashMap::new(),
                used: 0,
                per_ip: HashMap::new(),
            }),
            emptied: Condvar::new(),
        }
    }

    /// Reserve a slot for a new handshake, or `None` over `max` in all or
    /// `per_ip` from this address.
    pub(crate) fn reserve(&self, max: usize, per_ip: usize, ip: IpAddr) -> Option<usize> {
        let mut s = self.slab.lock();
        if s.used >= max || s.per_ip.get(&ip).is_some_and(|n| *n as usize >= per_ip) {
            return None;
        }
        s.used += 1;
        *s.per_ip.entry(ip).or_insert(0) += 1;
        let index = match s.free.pop() {
            Some(i) => i as usize,
            None => {
                s.entries.push(Entry {
                    generation: 0,
                    slot: Slot::Free,
                });
                s.entries.len() - 1
            }
        };
        let e = &mut s.entries[index];
        e.slot = Slot::Handshake(None);
        Some(index | ((e.generation as usize) << INDEX_BITS))
    }

    fn entry(s: &mut Slab<T>, key: usize) -> Option<&mut Entry<T>> {
        let e = s.entries.get_mut(key & INDEX_MASK)?;
        (e.generation as usize == key >> INDEX_BITS).then_some(e)
    }

    /// Put a handshake back into its slot (it waits for more bytes), and
    /// re-arm its interest with `arm` while the slot is locked, so that the
    /// readiness event cannot look for it before it is back.
    pub(crate) fn park<R>(
        &self,
        pending: Box<Pending>,
        arm: impl FnOnce(&Pending) -> R,
    ) -> Option<R> {
        let mut s = self.slab.lock();
        let e = Self::entry(&mut s, pending.key)?;
        let armed = arm(&pending);
        e.slot = Slot::Handshake(Some(pending));
        Some(armed)
    }

    /// The handshake finished: the slot now holds the open connection.
    pub(crate) fn open(&self, key: usize, id: ClientId, conn: Arc<Conn<T>>) {
        let mut s = self.slab.lock();
        if let Some(e) = Self::entry(&mut s, key) {
            e.slot = Slot::Open(conn);
            s.by_id.insert(id, key);
        }
    }

    /// Take what a readiness event points at. A parked handshake leaves its
    /// slot (the worker owns it until it parks it again).
    pub(crate) fn take_ready(&self, keys: impl Iterator<Item = usize>, out: &mut Vec<Found<T>>) {
        let mut s = self.slab.lock();
        for key in keys {
            let found = match Self::entry(&mut s, key) {
                Some(Entry {
                    slot: slot @ Slot::Handshake(Some(_)),
                    ..
                }) => match std::mem::replace(slot, Slot::Handshake(None)) {
                    Slot::Handshake(Some(p)) => Found::Handshake(p),
                    _ => Found::Nothing,
                },
                Some(Entry {
                    slot: Slot::Open(c),
                    ..
                }) => Found::Open(Arc::clone(c)),
                _ => Found::Nothing,
            };
            out.push(found);
        }
    }

    /// The connection behind `key`, if open.
    pub(crate) fn get_key(&self, key: usize) -> Option<Arc<Conn<T>>> {
        let mut s = self.slab.lock();
        match Self::entry(&mut s, key) {
            Some(Entry {
                slot: Slot::Open(c),
                ..
            }) => Some(Arc::clone(c)),
            _ => None,
        }
    }

    /// A parked handshake whose deadline has passed, taken out of its slot.
    pub(crate) fn take_expired_handshake(&self, key: usize, now: Instant) -> Option<Box<Pending>> {
        let mut s = self.slab.lock();
        let e = Self::entry(&mut s, key)?;
        match &e.slot {
            Slot::Handshake(Some(p)) if p.deadline <= now => {}
            _ => return None,
        }
        match std::mem::replace(&mut e.slot, Slot::Handshake(None)) {
            Slot::Handshake(Some(p)) => Some(p),
            _ => None,
        }
    }

    /// The open connection with this id.
    pub(crate) fn get(&self, id: ClientId) -> Option<Arc<Conn<T>>> {
        let mut s = self.slab.lock();
        let key = *s.by_id.get(&id)?;
        match Self::entry(&mut s, key) {
            Some(Entry {
                slot: Slot::Open(c),
                ..
            }) => Some(Arc::clone(c)),
            _ => None,
        }
    }

    /// Free a slot (handshake failed or connection finished).
    pub(crate) fn remove(&self, key: usize, id: Option<ClientId>, ip: IpAddr) {
        let mut s = self.slab.lock();
        let Some(e) = Self::entry(&mut s, key) else {
            return;
        };
        e.slot = Slot::Free;
        e.generation = (e.generation + 1) % GEN_LIMIT;
        s.free.push((key & INDEX_MASK) as u32);
        s.used -= 1;
        if let Some(id) = id {
            s.by_id.remove(&id);
        }
        if let Some(n) = s.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                s.per_ip.remove(&ip);
            }
        }
        if s.used == 0 {
            self.emptied.notify_all();
        }
    }

    /// Every open connection.
    pub(crate) fn snapshot(&self) -> Vec<Arc<Conn<T>>> {
        let s = self.slab.lock();
        let mut out = Vec::with_capacity(s.by_id.len());
        out.extend(s.entries.iter().filter_map(|e| match &e.slot {
            Slot::Open(c) => Some(Arc::clone(c)),
            _ => None,
        }));
        out
    }

    /// Keys of every parked handshake.
    pub(crate) fn handshake_keys(&self) -> Vec<usize> {
        let s = self.slab.lock();
        s.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e.slot, Slot::Handshake(_)))
            .map(|(i, e)| i | ((e.generation as usize) << INDEX_BITS))
            .collect()
    }

    /// Open connections.
    pub(crate) fn open_count(&self) -> usize {
        self.slab.lock().by_id.len()
    }

    /// Wait until no slot is in use, or `timeout` passes. True if empty.
    pub(crate) fn wait_empty(&self, timeout: Duration) -> bool {
        // A timeout too long for the clock is as good as none.
        let deadline = Instant::now()
            .checked_add(timeout)
            .unwrap_or_else(crate::runtime::handshake::far_future);
        let mut s = self.slab.lock();
        while s.used > 0 {
            if self.emptied.wait_until(&mut s, deadline).timed_out() {
                return s.used == 0;
            }
        }
        true
    }
}
