//! ClientId -> connection, and poller key -> slot.
//!
//! Poller keys are a slab index plus a generation, so a readiness event
//! that arrives after its connection left cannot reach the connection that
//! reused the slot. A `ClientId` is the same pair with the whole 32-bit
//! generation, so finding a client by its id needs no map; a slot whose
//! generation is spent is never used again, so no id is ever reused.

use std::collections::{HashMap, hash_map};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::client::ClientId;
use crate::runtime::conn::Conn;
use crate::runtime::timer::Timers;

/// A handshake's deadline on the server clock, rounded up to the tick.
pub(crate) fn handshake_deadline_ms(started: Instant, deadline: Instant) -> u64 {
    // Rounded up to the millisecond (then to the tick): the clock it is
    // compared with counts whole milliseconds, so at that reading the
    // deadline has passed.
    let d = deadline.saturating_duration_since(started);
    let ms = d.as_millis() as u64 + u64::from(!d.subsec_nanos().is_multiple_of(1_000_000));
    Timers::round(ms)
}

const INDEX_BITS: u32 = if usize::BITS >= 64 { 32 } else { 20 };
const INDEX_MASK: usize = (1 << INDEX_BITS) - 1;
/// Slots a key can index: `max_connections` is held to it.
pub(crate) const MAX_SLOTS: usize = INDEX_MASK;
/// Poller keys carry the generation modulo this, below the top bit so
/// that no key can equal polling's own notification key (`usize::MAX`).
const KEY_GEN_LIMIT: u32 = 1 << (usize::BITS - INDEX_BITS - 1);

/// The poller key of slot `index` at `generation`.
fn key_of(index: usize, generation: u32) -> usize {
    index | (((generation % KEY_GEN_LIMIT) as usize) << INDEX_BITS)
}

/// The poller key of the slot and generation a client id names.
pub(crate) fn key_of_id(id: ClientId) -> usize {
    let id = id.as_u64();
    key_of((id as u32) as usize, (id >> 32) as u32)
}

/// A connection still in its opening handshake.
pub(crate) struct Pending {
    pub(crate) key: usize,
    pub(crate) stream: TcpStream,
    pub(crate) peer: SocketAddr,
    pub(crate) buf: Vec<u8>,
    /// Booked with the timers at every park (`book_handshake_deadline`).
    pub(crate) deadline: Instant,
    /// A plain HTTP answer being written (`out[sent..]` is left); the
    /// handshake deadline bounds it too.
    pub(crate) out: Vec<u8>,
    pub(crate) sent: usize,
    /// The socket is in the poller. A request that was in at accept time
    /// is read before the socket is ever registered.
    pub(crate) registered: bool,
    /// `buf` holds everything that had arrived when it was read (a short
    /// read, by the accept thread): the handshake job parses it before it
    /// reads again, and reads only if the request is not whole.
    pub(crate) read_dry: bool,
    /// How much of `buf` a parse has seen and found short of a whole
    /// head: the next parse waits for a line to end after it.
    pub(crate) parsed: usize,
    /// Bytes of empty lines skipped before the request line: not kept,
    /// but counted against `max_handshake_bytes`.
    pub(crate) skipped: usize,
    /// The client may send more after its request's head: the head
    /// announced a body, or bytes came after it. Set when a worker parses
    /// a whole request, before the answer clears `buf`.
    pub(crate) more: bool,
    /// The answer is out and our side shut: what the client still sends
    /// is read and dropped until it closes or `deadline` (a lingering
    /// close; see `handshake::finish_answer`). Nothing more is answered.
    pub(crate) lingering: bool,
}

/// A slot, with the generation that keys to it must carry: three kinds
/// and a generation in two words.
enum Entry<T> {
    Free(u32),
    /// `None` while a worker holds the handshake.
    Handshake(u32, Option<Box<Pending>>),
    Open(u32, Arc<Conn<T>>),
}

// Two words on 64-bit targets (three 32-bit words elsewhere).
#[cfg(target_pointer_width = "64")]
const _: () = assert!(std::mem::size_of::<Entry<()>>() == 16);

impl<T> Entry<T> {
    fn generation(&self) -> u32 {
        match self {
            Entry::Free(g) | Entry::Handshake(g, _) | Entry::Open(g, _) => *g,
        }
    }
}

/// Slots are made a chunk at a time and never move: a vector of them
/// that doubled as connections came left its old buffer as a hole in the
/// heap and up to half of the new one unused.
const CHUNK: usize = 1024;

struct Slab<T> {
    chunks: Vec<Box<[Entry<T>]>>,
    /// Slots in use in each chunk, so that a sweep skips empty ones.
    live: Vec<u16>,
    /// Slots made so far (`chunks` hold this many, and the rest of the
    /// last chunk).
    made: usize,
    free: Vec<u32>,
    /// Slots where a handshake was parked, for `sweep_handshakes` to walk
    /// instead of every slot. Pushed at every park, not taken out when the
    /// handshake leaves: a sweep, or `park` once the list is twice the
    /// handshakes there are, drops what no longer holds a parked one.
    parked: Vec<u32>,
    /// Slots holding an open connection.
    open: usize,
    used: usize,
    per_ip: HashMap<IpAddr, u32>,
}

impl<T> Slab<T> {
    fn slot(&mut self, index: usize) -> Option<&mut Entry<T>> {
        if index >= self.made {
            return None;
        }
        self.chunks.get_mut(index / CHUNK)?.get_mut(index % CHUNK)
    }

    fn iter(&self) -> impl Iterator<Item = &Entry<T>> {
        self.chunks.iter().flat_map(|c| c.iter()).take(self.made)
    }
}

/// Expired handshakes one sweep takes; the rest wait for the next pass,
/// which comes at once (their deadlines are booked).
pub(crate) const EXPIRED_PER_SWEEP: usize = 256;

pub(crate) struct Registry<T> {
    slab: Mutex<Slab<T>>,
    emptied: Condvar,
    /// Held by whoever has the parked list out of the slab to walk it (a
    /// sweep, or a compaction), so that one walk never misses what
    /// another has out; taken before the slab's lock, never inside it.
    walking: Mutex<()>,
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
                chunks: Vec::new(),
                live: Vec::new(),
                made: 0,
                free: Vec::new(),
                parked: Vec::new(),
                open: 0,
                used: 0,
                per_ip: HashMap::new(),
            }),
            emptied: Condvar::new(),
            walking: Mutex::new(()),
        }
    }

    /// Reserve a slot for a new handshake, or `None` over `max` in all or
    /// `per_ip` from this address.
    pub(crate) fn reserve(&self, max: usize, per_ip: usize, ip: IpAddr) -> Option<usize> {
        let ip = per_ip_key(ip);
        let mut s = self.slab.lock();
        if s.used >= max {
            return None;
        }
        // With no limit an address is not counted (and `remove` finds the
        // map empty, so that neither hashes the address); with one, it is
        // looked up once.
        if per_ip != usize::MAX {
            match s.per_ip.entry(ip) {
                hash_map::Entry::Occupied(n) if *n.get() as usize >= per_ip => return None,
                hash_map::Entry::Occupied(mut n) => *n.get_mut() += 1,
                hash_map::Entry::Vacant(v) => {
                    v.insert(1);
                }
            }
        }
        s.used += 1;
        let index = match s.free.pop() {
            Some(i) => i as usize,
            None => {
                if s.made.is_multiple_of(CHUNK) {
                    s.chunks.push((0..CHUNK).map(|_| Entry::Free(0)).collect());
                    s.live.push(0);
                }
                s.made += 1;
                s.made - 1
            }
        };
        s.live[index / CHUNK] += 1;
        let e = s.slot(index).expect("made above");
        let generation = e.generation();
        *e = Entry::Handshake(generation, None);
        Some(key_of(index, generation))
    }

    fn entry(s: &mut Slab<T>, key: usize) -> Option<&mut Entry<T>> {
        let e = s.slot(key & INDEX_MASK)?;
        (key_of(key & INDEX_MASK, e.generation()) == key).then_some(e)
    }

    /// The id of the client in slot `key`'s handshake.
    pub(crate) fn client_id(&self, key: usize) -> ClientId {
        let mut s = self.slab.lock();
        let generation = Self::entry(&mut s, key).map_or(0, |e| e.generation());
        ClientId::new(u64::from(generation) << 32 | (key & INDEX_MASK) as u64)
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
        let index = (pending.key & INDEX_MASK) as u32;
        let e = Self::entry(&mut s, pending.key)?;
        let armed = arm(&pending);
        *e = Entry::Handshake(e.generation(), Some(pending));
        s.parked.push(index);
        // Slots in a handshake, parked or held: the list is cut back to
        // those parked once it is twice that (and 64 more), so it stays
        // within a few words a handshake however often each one parks.
        let handshakes = s.used - s.open;
        let long = s.parked.len() > 2 * handshakes + 64;
        drop(s);
        // Unless a walk is under way, which cuts it back itself.
        if long && let Some(_walk) = self.walking.try_lock() {
            self.walk_parked(|_| true);
        }
        Some(armed)
    }

    /// The handshake finished: the slot now holds the open connection.
    pub(crate) fn open(&self, key: usize, conn: Arc<Conn<T>>) {
        let mut s = self.slab.lock();
        if let Some(e) = Self::entry(&mut s, key) {
            *e = Entry::Open(e.generation(), conn);
            s.open += 1;
        }
    }

    /// Take what a readiness event points at. A parked handshake leaves its
    /// slot (the worker owns it until it parks it again).
    pub(crate) fn take_ready(&self, keys: impl Iterator<Item = usize>, out: &mut Vec<Found<T>>) {
        let mut s = self.slab.lock();
        for key in keys {
            let found = match Self::entry(&mut s, key) {
                Some(Entry::Handshake(_, pending @ Some(_))) => {
                    pending.take().map_or(Found::Nothing, Found::Handshake)
                }
                Some(Entry::Open(_, c)) => Found::Open(Arc::clone(c)),
                _ => Found::Nothing,
            };
            out.push(found);
        }
    }

    /// A parked handshake whose deadline has passed by `now` (any parked
    /// handshake, for `None`), taken out of its slot.
    pub(crate) fn take_expired_handshake(
        &self,
        key: usize,
        now: Option<Instant>,
    ) -> Option<Box<Pending>> {
        let mut s = self.slab.lock();
        match Self::entry(&mut s, key)? {
            Entry::Handshake(_, pending)
                if pending
                    .as_ref()
                    .is_some_and(|p| now.is_none_or(|now| p.deadline <= now)) =>
            {
                pending.take()
            }
            _ => None,
        }
    }

    /// The open connection with this id.
    pub(crate) fn get(&self, id: ClientId) -> Option<Arc<Conn<T>>> {
        let (generation, index) = ((id.as_u64() >> 32) as u32, id.as_u64() as u32);
        let mut s = self.slab.lock();
        match s.slot(index as usize) {
            Some(Entry::Open(g, c)) if *g == generation => Some(Arc::clone(c)),
            _ => None,
        }
    }

    /// Free a slot (handshake failed or connection finished).
    pub(crate) fn remove(&self, key: usize, ip: IpAddr) {
        let mut s = self.slab.lock();
        let Some(e) = Self::entry(&mut s, key) else {
            return;
        };
        if matches!(e, Entry::Free(_)) {
            // Freed already (a retired slot keeps its last generation).
            return;
        }
        let was_open = matches!(e, Entry::Open(..));
        match e.generation().checked_add(1) {
            Some(next) => {
                *e = Entry::Free(next);
                s.free.push((key & INDEX_MASK) as u32);
            }
            // Every id this slot can give has been given: it is retired
            // (16 B kept for every 4 billion connections through it).
            None => *e = Entry::Free(u32::MAX),
        }
        s.open -= usize::from(was_open);
        s.used -= 1;
        s.live[(key & INDEX_MASK) / CHUNK] -= 1;
        if !s.per_ip.is_empty()
            && let hash_map::Entry::Occupied(mut n) = s.per_ip.entry(per_ip_key(ip))
        {
            *n.get_mut() -= 1;
            if *n.get() == 0 {
                n.remove();
            }
        }
        if s.used == 0 {
            self.emptied.notify_all();
        }
    }

    /// Sweep for open connections' deadlines due at `now_ms` (server
    /// clock): those whose deadline has come go to `due`, their `timer_at`
    /// cleared. The earliest deadline left in place is booked again with
    /// `timers`. The slab is locked a chunk at a time, so that handshakes
    /// and readiness events wait for at most a chunk's worth, and chunks
    /// with nothing in use are skipped. Parked handshakes are
    /// `sweep_handshakes`' work.
    pub(crate) fn sweep(&self, now_ms: u64, timers: &Timers, due: &mut Vec<Arc<Conn<T>>>) {
        let mut earliest = u64::MAX;
        for chunk in 0.. {
            let mut s = self.slab.lock();
            if chunk >= s.chunks.len() {
                break;
            }
            if s.live[chunk] == 0 {
                continue;
            }
            for e in s.chunks[chunk].iter_mut() {
                match e {
                    Entry::Open(_, c) => {
                        let at = c.timer_at.load(Ordering::SeqCst);
                        if at == 0 {
                        } else if at > now_ms {
                            earliest = earliest.min(at);
                        } else if c
                            .timer_at
                            .compare_exchange(at, 0, Ordering::SeqCst, Ordering::SeqCst)
                            .is_ok()
                        {
                            due.push(Arc::clone(c));
                        }
                    }
                    Entry::Handshake(..) | Entry::Free(_) => {}
                }
            }
        }
        if earliest != u64::MAX {
            timers.book(earliest);
        }
    }

    /// Sweep the parked handshakes for those past their deadline at
    /// `now_ms`, taken out of their slots into `expired`; the earliest
    /// deadline of those left is booked again with `timers`. Only the
    /// list of slots where handshakes were parked is walked, not every
    /// slot. A handshake a worker holds is not in its slot: the worker
    /// books its deadline again when it parks it. (`expired` holds boxes:
    /// the poller keeps its capacity, a word an entry.) Returns how many
    /// slots it looked at.
    ///
    /// At most [`EXPIRED_PER_SWEEP`] expired handshakes are taken: the
    /// poller answers each `408` itself (some system calls each), and a
    /// crowd that came in one tick would otherwise hold readiness and
    /// every other timer for all of its answers at once.
    #[allow(clippy::vec_box)]
    pub(crate) fn sweep_handshakes(
        &self,
        now_ms: u64,
        started: Instant,
        timers: &Timers,
        expired: &mut Vec<Box<Pending>>,
    ) -> usize {
        let mut earliest = u64::MAX;
        let _walk = self.walking.lock();
        let looked = self.walk_parked(|pending| {
            let at = pending
                .as_ref()
                .map_or(0, |p| handshake_deadline_ms(started, p.deadline));
            if at <= now_ms && expired.len() < EXPIRED_PER_SWEEP {
                expired.extend(pending.take());
                false
            } else {
                // Later, or past the sweep's share: booked, so the next
                // pass (at once, if it is due) takes it.
                earliest = earliest.min(at);
                true
            }
        });
        if earliest != u64::MAX {
            timers.book_parked(earliest);
        }
        looked
    }

    /// Walk the parked list (the caller holds `walking`): each slot once,
    /// those still holding a parked handshake given to `keep`, which may
    /// take it out and says whether the slot stays listed. The list is
    /// sorted out of the slab's lock, and walked under it a chunk at a
    /// time, as `sweep` walks the slots: a crowd of parked handshakes
    /// holds accepts, parks and sends for a chunk's worth at most. Slots
    /// parked meanwhile were listed apart, and are kept after it. Returns
    /// how many slots it looked at.
    fn walk_parked(&self, mut keep: impl FnMut(&mut Option<Box<Pending>>) -> bool) -> usize {
        let mut list = std::mem::take(&mut self.slab.lock().parked);
        // A slot parked twice since the last walk is listed twice.
        list.sort_unstable();
        list.dedup();
        let mut kept = Vec::with_capacity(list.len());
        for part in list.chunks(CHUNK) {
            let mut s = self.slab.lock();
            for &i in part {
                if let Some(Entry::Handshake(_, pending @ Some(_))) = s.slot(i as usize)
                    && keep(pending)
                {
                    kept.push(i);
                }
            }
        }
        let mut s = self.slab.lock();
        kept.append(&mut s.parked);
        if kept.capacity() > 4 * kept.len() + 1024 {
            // After a crowd: not kept at its size.
            kept.shrink_to_fit();
        }
        s.parked = kept;
        list.len()
    }

    /// Every open connection.
    pub(crate) fn snapshot(&self) -> Vec<Arc<Conn<T>>> {
        let s = self.slab.lock();
        let mut out = Vec::with_capacity(s.open);
        out.extend(s.iter().filter_map(|e| match e {
            Entry::Open(_, c) => Some(Arc::clone(c)),
            _ => None,
        }));
        out
    }

    /// Keys of every parked handshake.
    pub(crate) fn handshake_keys(&self) -> Vec<usize> {
        let s = self.slab.lock();
        s.iter()
            .enumerate()
            .filter(|(_, e)| matches!(e, Entry::Handshake(..)))
            .map(|(i, e)| key_of(i, e.generation()))
            .collect()
    }

    /// Open connections.
    pub(crate) fn open_count(&self) -> usize {
        self.slab.lock().open
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

/// What `max_connections_per_ip` counts a client by: an IPv4 address
/// (also as a dual-stack socket reports it, mapped into IPv6), or an IPv6
/// address's /64, which one host or one home network is given whole (a
/// client would otherwise have as many addresses as it likes). Addresses
/// that stand for IPv4 clients of a translator or a tunnel (64:ff9b::/96,
/// RFC 6052; Teredo's 2001::/32, RFC 4380) count whole: each /64 of those
/// holds many unrelated clients.
pub(crate) fn per_ip_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let translated = bits >> 32 == 0x0064_ff9b_0000_0000_0000_0000;
            let teredo = bits >> 96 == 0x2001_0000;
            if translated || teredo {
                IpAddr::V6(v6)
            } else {
                IpAddr::V6((bits & !(u128::MAX >> 64)).into())
            }
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    /// The per-IP cap counts an IPv6 client by its /64, and an IPv4 one
    /// by its address, also when a dual-stack socket reports it mapped.
    #[test]
    fn the_per_ip_cap_counts_ipv6_by_its_64_and_ipv4_mapped_apart() {
        let r: Registry<()> = Registry::new();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let a = r.reserve(100, 2, ip("2001:db8:1:2::1")).unwrap();
        let b = r.reserve(100, 2, ip("2001:db8:1:2:ffff::9")).unwrap();
        assert_eq!(r.reserve(100, 2, ip("2001:db8:1:2::3")), None);
        // Another /64 has its own count.
        assert!(r.reserve(100, 2, ip("2001:db8:1:3::1")).is_some());
        // Given back by any address of the /64.
        r.remove(a, ip("2001:db8:1:2::1"));
        assert!(r.reserve(100, 2, ip("2001:db8:1:2::3")).is_some());
        let _ = b;
        // IPv4 clients of a dual-stack socket share no /64.
        for n in 1..=3 {
            let mapped = ip(&format!("::ffff:10.0.0.{n}"));
            assert!(r.reserve(100, 1, mapped).is_some(), "10.0.0.{n}");
        }
        assert_eq!(r.reserve(100, 1, ip("::ffff:10.0.0.1")), None);
        assert_eq!(r.reserve(100, 1, ip("10.0.0.1")), None);
        // Translated and Teredo clients count by their whole address.
        for prefix in ["64:ff9b::", "2001:0:4136:e378:8000:63bf:"] {
            for n in 1..=3 {
                let addr = ip(&format!("{prefix}a00:{n}"));
                assert!(r.reserve(100, 1, addr).is_some(), "{addr}");
            }
            assert_eq!(r.reserve(100, 1, ip(&format!("{prefix}a00:1"))), None);
        }
    }

    #[test]
    fn a_slot_whose_ids_are_spent_is_retired() {
        let r: Registry<()> = Registry::new();
        let first = r.reserve(10, 10, LOCAL).unwrap();
        assert_eq!(first & INDEX_MASK, 0);
        let id = r.client_id(first);
        assert_eq!(key_of_id(id), first, "an id gives its key back");
        r.remove(first, LOCAL);
        // Reused: a new generation, a new id, and the old key finds nothing.
        let second = r.reserve(10, 10, LOCAL).unwrap();
        assert_eq!(second & INDEX_MASK, 0);
        assert_ne!(second, first);
        assert_ne!(r.client_id(second), id);
        assert_eq!(key_of_id(r.client_id(second)), second);
        assert!(
            r.take_expired_handshake(first, Some(Instant::now()))
                .is_none()
        );
        r.remove(first, LOCAL);
        assert_eq!(r.slab.lock().used, 1, "a stale key freed nothing");
        // The slot's last generation: once freed, it is never handed out.
        if let Some(Entry::Handshake(g, _)) = r.slab.lock().slot(0) {
            *g = u32::MAX;
        }
        let last = key_of(0, u32::MAX);
        assert_eq!(r.client_id(last).as_u64(), u64::from(u32::MAX) << 32);
        assert_eq!(key_of_id(r.client_id(last)), last);
        r.remove(last, LOCAL);
        r.remove(last, LOCAL);
        assert_eq!(r.slab.lock().used, 0, "a retired slot is not freed twice");
        let next = r.reserve(10, 10, LOCAL).unwrap();
        assert_eq!(next & INDEX_MASK, 1, "slot 0 is retired");
        assert_eq!(r.slab.lock().used, 1);
        assert!(r.slab.lock().free.is_empty());
        assert_eq!(key_of_id(r.client_id(next)), next);
    }

    /// A connected socket, for slots that need one.
    fn socket() -> TcpStream {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let _ = l.accept().unwrap();
        s
    }

    fn pending(key: usize, deadline: Instant) -> Box<Pending> {
        let stream = socket();
        Box::new(Pending {
            key,
            peer: stream.peer_addr().unwrap(),
            stream,
            buf: Vec::new(),
            deadline,
            out: Vec::new(),
            sent: 0,
            registered: false,
            read_dry: false,
            parsed: 0,
            skipped: 0,
            more: false,
            lingering: false,
        })
    }

    fn conn(r: &Registry<()>, key: usize, timer_at: u64) -> Arc<Conn<()>> {
        let c = Arc::new(crate::runtime::conn::for_test(socket(), r.client_id(key)));
        c.timer_at.store(timer_at, Ordering::SeqCst);
        r.open(key, Arc::clone(&c));
        c
    }

    /// A sweep takes what is due, leaves the rest booked (the earliest of
    /// it), and finds slots past the first chunk; it leaves parked
    /// handshakes alone, whose own sweep takes those due, skips one a
    /// worker holds, and books their earliest apart.
    #[test]
    fn a_sweep_takes_what_is_due_and_books_the_earliest_left() {
        let r: Registry<()> = Registry::new();
        let started = Instant::now();
        let keys: Vec<usize> = (0..CHUNK + 5)
            .map(|_| r.reserve(usize::MAX, usize::MAX, LOCAL).unwrap())
            .collect();
        // Only the last five slots stay in use, all in the second chunk.
        for &k in &keys[..CHUNK] {
            r.remove(k, LOCAL);
        }
        let [due, later, stale, waiting, held] = keys[CHUNK..] else {
            unreachable!()
        };
        let c_due = conn(&r, due, 1_000);
        let c_later = conn(&r, later, 3_000);
        let ms = Duration::from_millis;
        r.park(pending(stale, started + ms(500)), |_| ()).unwrap();
        r.park(pending(waiting, started + ms(2_000)), |_| ())
            .unwrap();
        r.park(pending(held, started + ms(200)), |_| ()).unwrap();
        // A worker takes it, as for a readiness event.
        let mut found = Vec::new();
        r.take_ready([held].into_iter(), &mut found);
        assert!(matches!(found[..], [Found::Handshake(_)]));
        let timers = Timers::new();
        let mut taken = Vec::new();
        r.sweep(1_000, &timers, &mut taken);
        assert_eq!(taken.len(), 1);
        assert!(Arc::ptr_eq(&taken[0], &c_due));
        assert_eq!(c_due.timer_at.load(Ordering::SeqCst), 0, "taken");
        assert_eq!(c_later.timer_at.load(Ordering::SeqCst), 3_000, "left");
        assert_eq!(timers.next(), Some(3_000), "the open connection's");
        let mut expired = Vec::new();
        assert_eq!(
            r.sweep_handshakes(1_000, started, &timers, &mut expired),
            3,
            "the parked slots, and no other"
        );
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].key, stale);
        assert_eq!(timers.next(), Some(2_000), "the waiting handshake's");
        assert!(!timers.start_sweep(2_000), "no sweep of every slot");
        assert!(timers.start_handshake_sweep(2_000));
        // Nothing is taken twice; the list lost the slots left.
        let mut expired = Vec::new();
        assert_eq!(r.sweep_handshakes(2_000, started, &timers, &mut expired), 1);
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].key, waiting);
        assert_eq!(timers.next(), Some(3_000));
        assert_eq!(r.sweep_handshakes(3_000, started, &timers, &mut expired), 0);
    }

    /// A handshake parked over and over is looked at once a sweep, and
    /// the list stays within a few entries a handshake between sweeps,
    /// keeping every slot still parked.
    #[test]
    fn the_parked_list_stays_bounded_however_often_handshakes_park() {
        let r: Registry<()> = Registry::new();
        let started = Instant::now();
        let deadline = |k: usize| started + Duration::from_millis(1_000 + k as u64);
        let mut held: Vec<Box<Pending>> = (0..10)
            .map(|_| {
                let k = r.reserve(usize::MAX, usize::MAX, LOCAL).unwrap();
                pending(k, deadline(k & INDEX_MASK))
            })
            .collect();
        let keys: Vec<usize> = held.iter().map(|p| p.key).collect();
        for _ in 0..1_000 {
            for p in held.drain(..) {
                r.park(p, |_| ()).unwrap();
            }
            assert!(r.slab.lock().parked.len() <= 2 * keys.len() + 64 + 1);
            // Each taken by a worker, as for a readiness event, but one.
            let mut found = Vec::new();
            r.take_ready(keys[1..].iter().copied(), &mut found);
            held.extend(found.into_iter().map(|f| match f {
                Found::Handshake(p) => p,
                _ => panic!("a parked handshake was not found"),
            }));
            r.park(held.pop().unwrap(), |_| ()).unwrap();
        }
        // Listed many times since the last cut, each parked slot is
        // looked at once, and each of them is there.
        assert!(r.slab.lock().parked.len() > keys.len());
        let timers = Timers::new();
        let mut expired = Vec::new();
        let looked = r.sweep_handshakes(2_000, started, &timers, &mut expired);
        assert!(looked <= keys.len(), "each listed slot once: {looked}");
        let mut gone: Vec<usize> = expired.iter().map(|p| p.key).collect();
        gone.sort_unstable();
        assert_eq!(gone, [keys[0], keys[9]]);
        assert_eq!(r.slab.lock().parked.len(), 0);
    }

    /// Sweeps and cuts of the list while other threads park and take
    /// handshakes lose none of them: every handshake parked at the end is
    /// found by the last sweep.
    #[test]
    fn walks_of_the_parked_list_beside_parks_from_many_threads_lose_none() {
        let r: Registry<()> = Registry::new();
        let started = Instant::now();
        let later = started + Duration::from_millis(500);
        let timers = Timers::new();
        let parked: usize = std::thread::scope(|sc| {
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    sc.spawn(|| {
                        let mut held: Vec<Box<Pending>> = (0..8)
                            .map(|_| {
                                let k = r.reserve(usize::MAX, usize::MAX, LOCAL).unwrap();
                                pending(k, later)
                            })
                            .collect();
                        let keys: Vec<usize> = held.iter().map(|p| p.key).collect();
                        for _ in 0..3_000 {
                            for p in held.drain(..) {
                                r.park(p, |_| ()).unwrap();
                            }
                            let mut found = Vec::new();
                            r.take_ready(keys.iter().copied(), &mut found);
                            held.extend(found.into_iter().filter_map(|f| match f {
                                Found::Handshake(p) => Some(p),
                                _ => None,
                            }));
                        }
                        // The last parks, spread out, so that walks run
                        // meanwhile: none of them may be lost.
                        let n = held.len();
                        for p in held {
                            r.park(p, |_| ()).unwrap();
                            std::thread::sleep(Duration::from_micros(300));
                        }
                        n
                    })
                })
                .collect();
            let mut expired = Vec::new();
            while !threads.iter().all(|t| t.is_finished()) {
                // Nothing is due yet: every walk keeps what it finds.
                r.sweep_handshakes(0, started, &timers, &mut expired);
                assert!(expired.is_empty());
            }
            threads.into_iter().map(|t| t.join().unwrap()).sum()
        });
        assert_eq!(parked, 32, "every handshake was parked at the end");
        let mut expired = Vec::new();
        r.sweep_handshakes(1_000, started, &timers, &mut expired);
        assert_eq!(expired.len(), 32, "each parked handshake is found");
    }

    /// A crowd of handshakes expiring at once is answered a share per
    /// sweep, each sweep booking the rest as due, until none is left.
    #[test]
    fn a_sweep_takes_a_share_of_a_crowd_of_expired_handshakes() {
        let r: Registry<()> = Registry::new();
        let started = Instant::now();
        let crowd = EXPIRED_PER_SWEEP * 2 + 10;
        for _ in 0..crowd {
            let k = r.reserve(usize::MAX, usize::MAX, LOCAL).unwrap();
            r.park(pending(k, started + Duration::from_millis(500)), |_| ())
                .unwrap();
        }
        let timers = Timers::new();
        let mut expired = Vec::new();
        let mut sweeps = Vec::new();
        let mut total = 0;
        while total < crowd {
            assert!(timers.start_handshake_sweep(1_000) || sweeps.is_empty());
            r.sweep_handshakes(1_000, started, &timers, &mut expired);
            sweeps.push(expired.len());
            total += expired.len();
            expired.clear();
            assert!(sweeps.len() <= 3, "{sweeps:?}");
        }
        assert_eq!(
            sweeps,
            [EXPIRED_PER_SWEEP, EXPIRED_PER_SWEEP, 10],
            "handshakes per sweep"
        );
        assert_eq!(timers.next(), None, "nothing left to book");
    }
}
