//! The event channel of the main-loop style, bounded in bytes.
//!
//! Every event carries a charge: its payload plus a fixed cost. A
//! message's charge counts against its connection (flow control pauses
//! reading a connection whose queue plus unconsumed messages reach high
//! water, and a peer's close is answered once they are consumed), and
//! every event's against the server-wide budget (over it, connections
//! that would dispatch more messages pause and wait here, and the
//! acceptor waits).
//! [`Events`](crate::Events) gives a charge back when the main loop asks
//! for the next event, so the event being handled still counts while its
//! reply is sent; a read's messages, once the loop asks past the last of
//! them (or those handled hold 4 KiB, or a 64th of the budget), together.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak, mpsc};

use parking_lot::{Mutex, RwLock};

use crate::client::Client;
use crate::event::Event;
use crate::runtime::Shared;
use crate::runtime::conn::Conn;
use crate::runtime::flow::Marks;

/// What an event costs besides its payload: the event itself, the
/// client handle it carries, the channel's slot. At least what a reply of
/// the same payload costs in the client's queue (its header and two
/// pieces, see `flow::CHUNK_COST`): a main loop that answers the events a
/// paused client holds, one reply each, never makes the client hold more
/// than when it paused, so its replies stay under the hard limit. (A
/// message is charged as the reply it may become: with compression that
/// can grow it, more than its length, see `Conn::payload_bound`.)
pub(crate) const EVENT_COST: usize = 2 * crate::runtime::flow::CHUNK_COST + 16;

/// What a `Disconnect` costs besides [`EVENT_COST`] and its reason: the
/// connection's record, which its client handle keeps (120 B, 144 B as
/// malloc gives it with its reference counts), the reason's own
/// allocation, and the handle's data beyond the five words `EVENT_COST`
/// counts of it (the user's `T`, which it keeps too).
fn gone_cost<T>() -> usize {
    (std::mem::size_of::<Conn<T>>() + 16 + 8).next_multiple_of(16)
        + 16
        + crate::client::handle_size::<T>().saturating_sub(40)
}

/// An event and the bytes it was charged.
pub(crate) struct Envelope<T> {
    pub(crate) event: Event<T>,
    pub(crate) charge: usize,
}

/// What goes through the channel: one event, or a connection's messages
/// from one read, in order (one send and at most one wake of the main
/// loop for them all).
pub(crate) enum Batch<T> {
    One(Envelope<T>),
    Many(Vec<Envelope<T>>),
}

/// Most messages a job stages before it sends them on.
pub(crate) const BATCH: usize = 64;

/// The slots a batch's list starts with, at its second message, when this
/// thread's last list was shorter (a `Vec` of events grows from four).
/// `BATCH` is a power of two: a list made for the longest is never grown.
const LIST_START: usize = 4;

thread_local! {
    /// How many messages this thread's last list held (see
    /// `Staged::stage`).
    static LAST_LIST: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// A batch's list with this many slots to spare, or more, is fitted to
/// its events before it is sent (see `Staged::send`).
const SLACK_SLOTS: usize = 4;

/// The capacity [`Staged::send`] leaves a list of `k` events in: fitted
/// to them if it has `SLACK_SLOTS` or more to spare.
fn sent_capacity(k: usize, capacity: usize) -> usize {
    if capacity - k >= SLACK_SLOTS {
        k
    } else {
        capacity
    }
}

/// The most a payload's allocation takes beyond its length (a 1-byte
/// payload's 32 B chunk).
const PAYLOAD_SLACK: usize = crate::proto::assemble::heap_step(1) - 1;

/// What a batch of `k` messages, in a list of `capacity`, holds beyond
/// what [`EVENT_COST`] and their payloads charge them: its channel slot,
/// and its list, which holds each event where a lone one's slot would
/// (with the most a payload's allocation takes beyond its length, 31 B).
/// Charged on the batch's last message, given back when the main loop
/// takes it (the list is let go of then). On 64-bit targets, in a list of
/// four: 238 B for two messages, 125 for three, 12 for four; in a list of
/// eight, 251 B for five (the most), 138 for six, 25 for seven; nothing for
/// five or more in a list fitted to them (one with `SLACK_SLOTS` to spare
/// is fitted).
fn batch_extra<T>(k: usize, capacity: usize) -> usize {
    let slot = std::mem::size_of::<Batch<T>>() + std::mem::size_of::<usize>();
    let list = crate::proto::assemble::heap_step(capacity * std::mem::size_of::<Envelope<T>>());
    (slot + list + k * PAYLOAD_SLACK).saturating_sub(k * EVENT_COST)
}

pub(crate) struct EventQueue<T> {
    /// Taken (dropped) at the end of shutdown, which ends the user's
    /// event iterator.
    tx: RwLock<Option<mpsc::Sender<Batch<T>>>>,
    /// Bytes charged for events not yet consumed.
    bytes: AtomicUsize,
    budget: usize,
    /// Messages come here (no `on_message` closure): the main-loop style.
    /// In the closure style nothing does unless `queue_unhandled`: an
    /// event kind without a closure is not produced, so an unread channel
    /// cannot grow.
    main_loop: bool,
    queue_unhandled: bool,
    /// Connections paused because the budget was exceeded.
    starved: Mutex<Vec<Weak<Conn<T>>>>,
    any_starved: AtomicBool,
}

impl<T: Send + Sync + 'static> EventQueue<T> {
    pub(crate) fn new(
        budget: usize,
        main_loop: bool,
        queue_unhandled: bool,
    ) -> (EventQueue<T>, mpsc::Receiver<Batch<T>>) {
        let (tx, rx) = mpsc::channel();
        let queue = EventQueue {
            tx: RwLock::new(Some(tx)),
            bytes: AtomicUsize::new(0),
            budget,
            main_loop,
            queue_unhandled,
            starved: Mutex::new(Vec::new()),
            any_starved: AtomicBool::new(false),
        };
        (queue, rx)
    }

    /// Bytes of events waiting now.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Whether the main loop is over its budget, counting `staged` bytes
    /// a job has staged and not charged yet: connections stop dispatching
    /// messages.
    pub(crate) fn over_budget_with(&self, staged: usize) -> bool {
        self.main_loop && self.bytes.load(Ordering::SeqCst).saturating_add(staged) >= self.budget
    }

    /// Whether a connection must stop reading and wait for the channel:
    /// it is over its budget with `staged`, or connections wait for it
    /// (starved) and it is not back to half yet. That wait is for
    /// everyone: a connection that came under its own low water meanwhile
    /// does not read on past the starved ones, which would otherwise wait
    /// for as long as others kept the channel between half and full.
    pub(crate) fn must_wait(&self, staged: usize) -> bool {
        self.over_budget_with(staged)
            || self.main_loop
                && self.any_starved.load(Ordering::SeqCst)
                && self.bytes.load(Ordering::SeqCst) > self.budget / 2
    }

    /// Whether the main loop is twice over its budget, which messages
    /// alone cannot make it (they stop at the budget): connects and
    /// disconnects of a churning server pile up in a channel nobody
    /// reads. The acceptor waits then, so memory stays bounded.
    pub(crate) fn far_over_budget(&self) -> bool {
        self.main_loop && self.bytes.load(Ordering::Relaxed) >= self.budget.saturating_mul(2)
    }

    /// Queue `event` about `conn`, charged to both. In the closure style
    /// the event is dropped (its kind has no closure, and nobody reads the
    /// channel) unless the user asked for such events.
    pub(crate) fn push(&self, marks: &Marks, conn: &Conn<T>, event: Event<T>) {
        if !self.main_loop && !self.queue_unhandled {
            return;
        }
        let charge = EVENT_COST
            + match &event {
                Event::Message { message, .. } => conn.payload_bound(message.len()),
                // The client is gone, and its handle now keeps the
                // connection's record alive (its allocation, with the
                // reference counts, once the record itself is dropped):
                // a crowd coming and going held half as much again as
                // was charged. And the close's reason.
                Event::Disconnect { close, .. } => gone_cost::<T>() + close.reason.len(),
                _ => 0,
            };
        // Only messages count on their client (see `Events::hold`): what
        // a client holds is what the loop may answer, and a close waits
        // for the answers (`Conn::defer_close`), not for a `Connect`.
        let answered = matches!(event, Event::Message { .. });
        let guard = self.tx.read();
        let Some(tx) = guard.as_ref() else { return };
        if answered {
            let mut w = conn.io.lock();
            w.events += charge;
            conn.note_held(marks, &w);
        }
        self.bytes.fetch_add(charge, Ordering::Relaxed);
        if tx.send(Batch::One(Envelope { event, charge })).is_err() {
            // The receiver is gone with the server.
            self.bytes.fetch_sub(charge, Ordering::Relaxed);
            if answered {
                let mut w = conn.io.lock();
                w.events = w.events.saturating_sub(charge);
            }
        }
    }

    /// Give back `charge` of events that never reached the channel.
    fn refund(&self, conn: &Conn<T>, charge: usize) {
        self.bytes.fetch_sub(charge, Ordering::Relaxed);
        let mut w = conn.io.lock();
        w.events = w.events.saturating_sub(charge);
    }

    /// A batch for `conn`'s messages from one read (see [`Staged`]).
    pub(crate) fn staging<'a>(&'a self, marks: &'a Marks, conn: &'a Conn<T>) -> Staged<'a, T> {
        Staged {
            queue: self,
            marks,
            conn,
            first: None,
            list: Vec::new(),
            pending: 0,
        }
    }

    /// Queue an event about no connection (an error), charged to the
    /// budget alone; dropped in the closure style, as `push` does.
    pub(crate) fn push_unattached(&self, event: Event<T>) {
        if !self.main_loop && !self.queue_unhandled {
            return;
        }
        let guard = self.tx.read();
        let Some(tx) = guard.as_ref() else { return };
        self.bytes.fetch_add(EVENT_COST, Ordering::Relaxed);
        if tx
            .send(Batch::One(Envelope {
                event,
                charge: EVENT_COST,
            }))
            .is_err()
        {
            self.bytes.fetch_sub(EVENT_COST, Ordering::Relaxed);
        }
    }

    /// `conn` paused for the budget: it is resumed once the channel is
    /// back to half of it.
    pub(crate) fn starve(&self, shared: &Arc<Shared<T>>, conn: &Arc<Conn<T>>) {
        self.starved.lock().push(Arc::downgrade(conn));
        self.any_starved.store(true, Ordering::SeqCst);
        // The main loop may have made room since the check. The same test
        // as `consumed`'s (sequentially consistent with it: either that sees
        // the flag, or this sees its room). Not merely under the budget: a
        // read that crossed it between two of its messages finds that, and
        // would wake every starved connection at each crossing, most of them
        // to starve again at once.
        if self.bytes.load(Ordering::SeqCst) <= self.budget / 2 {
            self.wake(shared);
        }
    }

    fn wake(&self, shared: &Arc<Shared<T>>) {
        let list = {
            let mut starved = self.starved.lock();
            self.any_starved.store(false, Ordering::SeqCst);
            std::mem::take(&mut *starved)
        };
        for conn in list.iter().filter_map(Weak::upgrade) {
            conn.unstarve(shared);
            // One torn down meanwhile may be held by this alone: its drop,
            // with the user's `Drop` for its data, goes to a worker, guarded.
            crate::runtime::poller::let_go(shared, conn);
        }
    }

    /// The main loop is done with an event, or with several of one read's
    /// messages: give their charge back.
    pub(crate) fn consumed(
        &self,
        shared: &Arc<Shared<T>>,
        client: Option<&Client<T>>,
        charge: usize,
    ) {
        // Sequentially consistent with `starve`: either this sees the
        // flag, or `starve` sees the room made here.
        let left = self
            .bytes
            .fetch_sub(charge, Ordering::SeqCst)
            .saturating_sub(charge);
        if let Some(conn) = client.and_then(Client::conn) {
            conn.events_consumed(shared, charge);
        }
        if left <= self.budget / 2 && self.any_starved.load(Ordering::SeqCst) {
            self.wake(shared);
        }
    }

    /// End the stream (shutdown): the receiver sees the end once it has
    /// read what was sent.
    pub(crate) fn close(&self) {
        self.tx.write().take();
    }
}

/// Messages of one connection staged for the main loop by a job, sent
/// through the channel together. Their charges (as `EventQueue::push`
/// charges) go to the connection and the budget together too, just
/// before they are sent: the read gate counts what is staged meanwhile
/// (`pending`). Charged one by one, each message took the connection's
/// lock and wrote the budget's count, a line the main loop writes too.
/// Dropped, it sends what it holds, so that messages read and parsed
/// reach the main loop (and give their charges back there) even if the
/// job unwinds.
pub(crate) struct Staged<'a, T: Send + Sync + 'static> {
    queue: &'a EventQueue<T>,
    /// The server's marks: a charge that brings a client to half of high
    /// water has its read gate looked at again (see `Conn::note_held`).
    marks: &'a Marks,
    conn: &'a Conn<T>,
    /// A lone message, kept out of a list: a read that gives one message
    /// (the commonest, at a chat's pace) sends it without making and
    /// freeing a list. A second message moves it into `list`, which then
    /// holds them all.
    first: Option<Envelope<T>>,
    list: Vec<Envelope<T>>,
    /// The charges of `list`, not yet applied.
    pending: usize,
}

impl<T: Send + Sync + 'static> Staged<'_, T> {
    pub(crate) fn len(&self) -> usize {
        self.list.len() + usize::from(self.first.is_some())
    }

    /// What is staged and not charged yet, with what its list will be
    /// charged as a batch (see [`batch_extra`]): what the read gate counts.
    pub(crate) fn pending(&self) -> usize {
        let (k, capacity) = (self.list.len(), self.list.capacity());
        if k < 2 {
            // At most one message, outside any list.
            return self.pending;
        }
        self.pending + batch_extra::<T>(k, sent_capacity(k, capacity))
    }

    /// Keep `message` for [`Staged::send`], which charges it.
    pub(crate) fn stage(&mut self, message: crate::message::Message) {
        let charge = EVENT_COST + self.conn.payload_bound(message.len());
        self.pending += charge;
        let envelope = Envelope {
            event: Event::Message {
                client: self.conn.client.clone(),
                message,
            },
            charge,
        };
        if self.list.is_empty() {
            match self.first.take() {
                None => {
                    self.first = Some(envelope);
                    return;
                }
                Some(first) => {
                    // Room for as many as this thread's last list held, to
                    // the power of two a list grown from four would have
                    // reached: a steady stream's reads give lists of one
                    // length, each then made once, not grown; and a list
                    // sent unfitted has a length growth could have given
                    // it, so that the most a batch's list is charged
                    // beyond its events stays what `batch_extra` says. (A
                    // list made longer than growth would have made it is
                    // fitted: it has four slots or more to spare.)
                    let hint = LAST_LIST.get().next_power_of_two().clamp(LIST_START, BATCH);
                    self.list.reserve_exact(hint);
                    self.list.push(first);
                }
            }
        }
        self.list.push(envelope);
    }

    /// Send what is staged, in order, as one item of the channel. If the
    /// server is gone, the charges are given back.
    pub(crate) fn send(&mut self) {
        let k = self.len();
        if k == 0 {
            return;
        }
        // What the list holds besides its events is charged on its last. A
        // list grown far past them is fitted first; one within a few slots
        // of them is charged as it is (fitting it costs a `realloc` a read,
        // which the main loop's echo showed).
        if k > 1 {
            LAST_LIST.set(k);
            if sent_capacity(k, self.list.capacity()) < self.list.capacity() {
                self.list.shrink_to_fit();
            }
            let extra = batch_extra::<T>(k, self.list.capacity());
            if let Some(last) = self.list.last_mut() {
                last.charge += extra;
                self.pending += extra;
            }
        }
        // Charged before the main loop can have them (and give their
        // charges back).
        let pending = std::mem::take(&mut self.pending);
        let mut w = self.conn.io.lock();
        w.events += pending;
        self.conn.note_held(self.marks, &w);
        drop(w);
        self.queue.bytes.fetch_add(pending, Ordering::Relaxed);
        let sent = match self.first.take() {
            Some(lone) => Batch::One(lone),
            None => Batch::Many(std::mem::take(&mut self.list)),
        };
        let guard = self.queue.tx.read();
        let refused = match guard.as_ref() {
            Some(tx) => tx.send(sent).err().map(|e| e.0),
            None => Some(sent),
        };
        let charge: usize = match refused {
            None => return,
            Some(Batch::One(e)) => e.charge,
            Some(Batch::Many(v)) => v.iter().map(|e| e.charge).sum(),
        };
        self.queue.refund(self.conn, charge);
    }
}

impl<T: Send + Sync + 'static> Drop for Staged<'_, T> {
    fn drop(&mut self) {
        self.send();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;

    /// The default configuration's marks, which the tests' batches note.
    static MARKS: std::sync::LazyLock<Marks> =
        std::sync::LazyLock::new(|| Marks::new(&crate::config::Config::default()));

    /// A main loop's queue (budget 1 MiB), its receiving end, and a
    /// connection to stage for, over a socket to the listener returned
    /// with them.
    fn queue_and_conn() -> (
        EventQueue<()>,
        mpsc::Receiver<Batch<()>>,
        Conn<()>,
        std::net::TcpListener,
    ) {
        let (queue, rx) = EventQueue::<()>::new(1 << 20, true, false);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let id = crate::runtime::registry::Registry::<()>::new().client_id(0);
        (queue, rx, crate::runtime::conn::for_test(stream, id), l)
    }

    /// A job that unwinds with messages staged (a bug of ours, caught by
    /// `service`) still sends them: they reach the main loop in order,
    /// charged, so that consuming them gives the charges back. Before,
    /// they were dropped, and their charges stayed on the budget for good.
    #[test]
    fn staged_messages_are_sent_when_the_job_unwinds() {
        let (queue, rx, conn, _listener) = queue_and_conn();
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut batch = queue.staging(&MARKS, &conn);
            batch.stage(Message::from(vec![1u8]));
            batch.stage(Message::from(vec![2u8, 2]));
            panic!("a bug while feeding");
        }));
        assert!(unwound.is_err());
        // As the README and the CHANGELOG give them.
        #[cfg(target_pointer_width = "64")]
        assert_eq!(
            [(2, 4), (3, 4), (4, 4), (5, 5), (2, 2), (5, 8)].map(|(k, c)| batch_extra::<()>(k, c)),
            [238, 125, 12, 0, 62, 251]
        );
        match rx.try_recv() {
            Ok(Batch::Many(list)) => {
                let charged = 2 * EVENT_COST + 3 + batch_extra::<()>(2, list.capacity());
                assert_eq!(queue.bytes(), charged);
                assert_eq!(conn.io.lock().events, charged);
                let sizes: Vec<usize> = list
                    .iter()
                    .map(|e| match &e.event {
                        Event::Message { message, .. } => message.len(),
                        _ => panic!("not a message"),
                    })
                    .collect();
                assert_eq!(sizes, [1, 2]);
                assert_eq!(list.iter().map(|e| e.charge).sum::<usize>(), charged);
            }
            _ => panic!("the staged messages were not sent"),
        }
    }

    /// A batch's list is charged as `send` leaves it, and the read gate
    /// (`pending`) counts that before it is sent: on a thread whose last
    /// list was short, two messages in a list of four and five in a list
    /// of eight, charged as such, and nine in a list of sixteen, fitted
    /// to nine and charged nothing more; after a list of eight, eight in
    /// a list made for eight (not grown); after a list of nine or five,
    /// lists made for sixteen or eight, fitted to what they hold. What a
    /// list is charged beyond its events stays under 251 B (see
    /// `batch_extra`): a list sent unfitted is as long as growth from four
    /// makes it.
    #[test]
    fn a_batch_is_charged_as_its_list_is_sent_and_the_gate_counts_that() {
        let (queue, rx, conn, _listener) = queue_and_conn();
        let cases = [
            (2, 0, 4),
            (5, 0, 8),
            (9, 0, 9),
            (8, 8, 8),
            (9, 9, 9),
            (5, 9, 5),
            (2, 5, 2),
            (7, 5, 8),
        ];
        for (k, last, capacity) in cases {
            LAST_LIST.set(last);
            let before = queue.bytes();
            let mut batch = queue.staging(&MARKS, &conn);
            for i in 0..k {
                batch.stage(Message::from(vec![i as u8]));
            }
            let gate = batch.pending();
            batch.send();
            drop(batch);
            let Ok(Batch::Many(list)) = rx.try_recv() else {
                panic!("no batch of {k}");
            };
            let charged: usize = list.iter().map(|e| e.charge).sum();
            assert_eq!(queue.bytes() - before, charged, "{k} messages");
            assert_eq!(gate, charged, "the gate's count of {k} messages");
            assert!(
                list.capacity() - k < SLACK_SLOTS,
                "{k} in a list of {}",
                list.capacity()
            );
            assert_eq!(
                charged,
                k * (EVENT_COST + 1) + batch_extra::<()>(k, list.capacity())
            );
            assert_eq!(list.capacity(), capacity, "{k} after a list of {last}");
            assert!(batch_extra::<()>(k, capacity) <= 251, "{k} in {capacity}");
            if k == 9 {
                assert_eq!(charged, 9 * (EVENT_COST + 1));
            }
            assert_eq!(LAST_LIST.get(), k);
            queue.refund(&conn, charged);
        }
        assert_eq!(queue.bytes(), 0);
    }

    /// Whatever the thread's last list held, a batch of any length up to
    /// `BATCH` is charged what the gate counted, and its list no more than
    /// 251 B beyond its events (the bound `event_queue_bytes` documents).
    #[test]
    fn every_batch_after_every_last_list_is_charged_within_the_bound() {
        let (queue, rx, conn, _listener) = queue_and_conn();
        let mut worst = 0;
        for last in 0..=BATCH {
            for k in 2..=BATCH {
                LAST_LIST.set(last);
                let mut batch = queue.staging(&MARKS, &conn);
                for _ in 0..k {
                    batch.stage(Message::from(vec![7u8]));
                }
                let gate = batch.pending();
                drop(batch);
                let Ok(Batch::Many(list)) = rx.try_recv() else {
                    panic!("no batch of {k} after {last}");
                };
                assert_eq!(list.len(), k);
                let charged: usize = list.iter().map(|e| e.charge).sum();
                assert_eq!(gate, charged, "{k} after a list of {last}");
                let extra = charged - k * (EVENT_COST + 1);
                assert!(
                    extra <= 251,
                    "{k} after {last}: {extra} B in {}",
                    list.capacity()
                );
                worst = worst.max(extra);
                queue.refund(&conn, charged);
            }
        }
        assert_eq!(worst, 251);
        assert_eq!(queue.bytes(), 0);
    }

    /// A read's lone message is sent as one event, charged as one (no
    /// list, so nothing for one), and the thread's last list length stays
    /// as it was.
    #[test]
    fn a_lone_message_is_sent_in_no_list() {
        let (queue, rx, conn, _listener) = queue_and_conn();
        LAST_LIST.set(7);
        let mut batch = queue.staging(&MARKS, &conn);
        batch.stage(Message::from(vec![1u8]));
        assert_eq!((batch.len(), batch.pending()), (1, EVENT_COST + 1));
        drop(batch);
        let Ok(Batch::One(e)) = rx.try_recv() else {
            panic!("the lone message was not sent alone");
        };
        assert_eq!(e.charge, EVENT_COST + 1);
        assert_eq!(queue.bytes(), EVENT_COST + 1);
        assert_eq!(conn.io.lock().events, EVENT_COST + 1);
        assert_eq!(LAST_LIST.get(), 7);
        queue.refund(&conn, e.charge);
        assert_eq!(queue.bytes(), 0);
    }

    /// While connections wait for the channel (starved at their read), no
    /// other reads past them until it is back to half: one paused for its
    /// own queue and resumed meanwhile, or one that just had nothing to
    /// read, starves too; and a read that crosses the budget wakes none of
    /// them. Before, a client under its own low water read on whenever the
    /// channel was under the budget (the starved could wait for as long as
    /// others kept it between half and full), and a read that crossed the
    /// budget between two of its messages woke every starved client, most
    /// of them to starve again at once. Nothing is lost either way.
    #[test]
    fn while_some_wait_for_the_channel_no_other_client_reads_past_them() {
        use std::io::Write;
        use std::time::{Duration, Instant};

        use crate::runtime::testing::{client_frame, join};
        use crate::{Error, WebSocketServer};

        let budget = 64 << 10;
        let server = WebSocketServer::builder()
            .workers(2)
            .ping_interval(None)
            .event_queue_bytes(budget)
            .start("127.0.0.1:0")
            .unwrap();
        let shared = std::sync::Arc::clone(server.shared());
        let mut waiting: Vec<_> = (0..20).map(|_| join(&server).0).collect();
        let (mut late, _late) = join(&server);
        let filler = || Event::Error {
            client: None,
            error: Error::Internal("filler".into()),
        };
        while shared.events.bytes() < budget {
            shared.events.push_unattached(filler());
        }
        let pauses = || shared.counters.snapshot().read_pauses;
        let wait_for = |what: &str, f: &dyn Fn() -> bool| {
            let t = Instant::now();
            while !f() {
                assert!(t.elapsed() < Duration::from_secs(10), "{what}");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        let before = pauses();
        for (i, s) in waiting.iter_mut().enumerate() {
            s.write_all(&client_frame(0x82, &[i as u8])).unwrap();
        }
        wait_for("the 20 did not starve", &|| pauses() == before + 20);
        // Under the budget, over half.
        while shared.events.bytes() > budget - 2_000 {
            assert!(matches!(
                server.recv_timeout(Duration::from_secs(5)),
                Ok(Event::Error { .. })
            ));
        }
        let charged = shared.events.bytes();
        let mut two = client_frame(0x82, &[100; 3000]);
        two.extend(client_frame(0x82, &[101; 3000]));
        late.write_all(&two).unwrap();
        wait_for("the late client read on", &|| pauses() > before + 20);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            pauses(),
            before + 21,
            "the starved were woken and starved again"
        );
        assert_eq!(
            shared.events.bytes(),
            charged,
            "a client read past the starved"
        );
        // Consumed, everything comes.
        let mut got = Vec::new();
        while got.len() < 22 {
            match server.recv_timeout(Duration::from_secs(5)) {
                Ok(Event::Message { message, .. }) => got.push(message.as_bytes()[0]),
                Ok(Event::Error { .. }) => {}
                other => panic!("{other:?}"),
            }
        }
        got.sort_unstable();
        let mut want: Vec<u8> = (0..20).collect();
        want.extend([100, 101]);
        assert_eq!(got, want);
    }

    /// A client with a small receive window (and a small send buffer on
    /// our side), 48 KiB queued to it unread (over low water, under high
    /// water), then starved at its read: the channel filled, it sent a
    /// message. Set up within a second (in tens of milliseconds here),
    /// inside the tests' idle timeouts.
    fn starved_with_some_queued(
        server: &crate::WebSocketServer,
        budget: usize,
    ) -> (std::net::TcpStream, Client) {
        use std::io::Write;
        use std::time::{Duration, Instant};

        let shared = server.shared();
        let began = Instant::now();
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        sock.connect(&server.local_addr().into()).unwrap();
        let mut s: std::net::TcpStream = sock.into();
        crate::runtime::testing::upgrade(&mut s);
        let client = match server.recv_timeout(Duration::from_secs(10)) {
            Ok(Event::Connect { client }) => client,
            other => panic!("{other:?}"),
        };
        let conn = client.conn().unwrap();
        socket2::SockRef::from(&conn.stream)
            .set_send_buffer_size(4096)
            .unwrap();
        let queued = || conn.io.lock().out.cost();
        while queued() < 48 << 10 {
            assert!(
                began.elapsed() < Duration::from_secs(5),
                "nothing stayed queued"
            );
            client.send(vec![0u8; 8 << 10]).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(queued() < 100 << 10, "{}", queued());
        while shared.events.bytes() < budget {
            shared.events.push_unattached(Event::Error {
                client: None,
                error: crate::Error::Internal("filler".into()),
            });
        }
        let pauses = shared.counters.snapshot().read_pauses;
        s.write_all(&crate::runtime::testing::client_frame(0x82, b"x"))
            .unwrap();
        while shared.counters.snapshot().read_pauses == pauses {
            assert!(
                began.elapsed() < Duration::from_secs(5),
                "it did not starve"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(conn.io.lock().starved());
        assert!(
            began.elapsed() < Duration::from_secs(1),
            "the setup took {:?}",
            began.elapsed()
        );
        (s, client)
    }

    /// A client starved at its read (the channel full) is not idle, even
    /// with a queue between low and high water that it does not read: the
    /// loop catching up resumes it (it resumes under high water). Judged
    /// by its socket, as one paused for its queue alone is, it was closed
    /// for idleness while it waited for the main loop.
    #[test]
    fn a_starved_client_with_some_queued_is_not_idle() {
        use std::time::Duration;

        let budget = 64 << 10;
        let server = crate::WebSocketServer::builder()
            .workers(2)
            .ping_interval(None)
            .idle_timeout(Some(Duration::from_secs(2)))
            .event_queue_bytes(budget)
            .start("127.0.0.1:0")
            .unwrap();
        let (_s, _client) = starved_with_some_queued(&server, budget);
        // It has sent nothing read since it connected; now it waits for
        // the loop, past its idle timeout.
        std::thread::sleep(Duration::from_millis(3500));
        let stats = server.stats();
        assert_eq!(stats.idle_timeouts, 0, "{stats:?}");
        // The loop catches up: its message comes.
        loop {
            match server.recv_timeout(Duration::from_secs(5)) {
                Ok(Event::Error { .. }) => {}
                Ok(Event::Message { message, .. }) => {
                    assert_eq!(message.as_bytes(), b"x");
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
    }

    /// But one that a thread waits on for room (the main loop in
    /// `send_timeout`, itself the reason the channel is not drained) is
    /// idle as its socket is stuck: the idle timeout ends the wait. Before,
    /// the wait lasted its whole timeout (forever with a long one).
    #[test]
    fn a_starved_client_the_main_loop_waits_on_is_closed_when_idle() {
        use std::time::{Duration, Instant};

        let budget = 64 << 10;
        let server = crate::WebSocketServer::builder()
            .workers(2)
            .ping_interval(None)
            .idle_timeout(Some(Duration::from_secs(1)))
            .close_timeout(Duration::from_secs(1))
            .event_queue_bytes(budget)
            .start("127.0.0.1:0")
            .unwrap();
        let (_s, client) = starved_with_some_queued(&server, budget);
        // Over the hard limit with what is queued: waits for room.
        let t = Instant::now();
        let sent = client.send_timeout(vec![0u8; 2 << 20], Duration::from_secs(20));
        let took = t.elapsed();
        assert!(
            took < Duration::from_secs(8),
            "the main loop waited {took:?}"
        );
        assert!(
            matches!(
                sent.as_ref().map_err(|e| e.error()),
                Err(crate::Error::Closed)
            ),
            "{:?}",
            sent.map_err(|e| e.error().to_string())
        );
        assert_eq!(server.stats().idle_timeouts, 1);
    }
}
