//! Deadlines: handshake timeouts, keepalive pings, idle and close timeouts.
//!
//! A deadline lives where its connection does: an open connection's in
//! `Conn::timer_at`, a parked handshake's in its `Pending`. The timers
//! themselves are only the earliest of them, which the poller sleeps
//! until; then it sweeps the registry for what is due and works out the
//! next earliest on the way (`Registry::sweep`). Nothing is booked per
//! connection beyond the deadline it already holds, so an idle connection
//! costs the timers nothing, as in uWebSockets' timeout sweep.
//!
//! Parked handshakes have an earliest of their own, and their sweep walks
//! only the registry's list of them (`Registry::sweep_handshakes`): a few
//! clients that keep half-sent requests going must not make the poller
//! walk every open connection each time one of them falls due.
//!
//! Deadlines are rounded up to a tick so that many connections fall due
//! together and an idle server sweeps a few times a second at most.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Deadline granularity in milliseconds.
pub(crate) const TICK_MS: u64 = 50;

/// No deadline.
const NONE: u64 = u64::MAX;

pub(crate) struct Timers {
    /// The earliest deadline booked since the last sweep began (server
    /// clock, ms), or `NONE`.
    earliest: AtomicU64,
    /// The same for handshakes waiting in the ready queue, which only the
    /// queue's own scan looks at (see `poller::take_overdue_handshakes`):
    /// a handshake a worker takes at once costs no sweep of the registry.
    queued: AtomicU64,
    /// The same for parked handshakes, which only their own sweep looks
    /// at (`Registry::sweep_handshakes`).
    parked: AtomicU64,
}

impl Timers {
    pub(crate) fn new() -> Timers {
        Timers {
            earliest: AtomicU64::new(NONE),
            queued: AtomicU64::new(NONE),
            parked: AtomicU64::new(NONE),
        }
    }

    /// Round a deadline up to the tick.
    pub(crate) fn round(at_ms: u64) -> u64 {
        Self::round_to(at_ms, TICK_MS)
    }

    /// The granularity of keepalive deadlines (pings, idle timeouts): a
    /// thirty-second of the shorter of the two, between one tick and one
    /// second (900 ms for the default 30 s ping). A ping goes out up to
    /// that much late; in exchange every client that fell due within it
    /// is pinged by the same batch, and their pongs come back together,
    /// so an idle server wakes less often.
    pub(crate) fn keepalive_tick(ping: Option<Duration>, idle: Option<Duration>) -> u64 {
        let shortest = [ping, idle]
            .into_iter()
            .flatten()
            .min()
            .map_or(0, crate::runtime::ms);
        (shortest / 32).clamp(TICK_MS, 1000) / TICK_MS * TICK_MS
    }

    /// Round a deadline up to a multiple of `tick_ms`.
    pub(crate) fn round_to(at_ms: u64, tick_ms: u64) -> u64 {
        at_ms.div_ceil(tick_ms) * tick_ms
    }

    /// A deadline at `at_ms` (already rounded) was stored where the sweep
    /// will find it. Returns true if it is now the earliest, so the poller
    /// must be woken to shorten its wait.
    ///
    /// The store must come before this call: a sweep resets the earliest
    /// before it reads the deadlines, so a deadline is either seen by the
    /// sweep or booked after its reset (both orders are `SeqCst`).
    pub(crate) fn book(&self, at_ms: u64) -> bool {
        at_ms < self.earliest.fetch_min(at_ms, Ordering::SeqCst)
    }

    /// `book` for a handshake waiting in the ready queue: only a scan of
    /// the queue is due at `at_ms`, not a sweep of the registry.
    pub(crate) fn book_queued(&self, at_ms: u64) -> bool {
        at_ms < self.queued.fetch_min(at_ms, Ordering::SeqCst)
    }

    /// `book` for a parked handshake: only a sweep of the parked
    /// handshakes is due at `at_ms`, not one of every slot.
    pub(crate) fn book_parked(&self, at_ms: u64) -> bool {
        at_ms < self.parked.fetch_min(at_ms, Ordering::SeqCst)
    }

    /// The earliest deadline, if any.
    pub(crate) fn next(&self) -> Option<u64> {
        let at = self
            .earliest
            .load(Ordering::SeqCst)
            .min(self.queued.load(Ordering::SeqCst))
            .min(self.parked.load(Ordering::SeqCst));
        Some(at).filter(|t| *t != NONE)
    }

    /// Whether a sweep is due at `now_ms`; if so, forget the earliest, for
    /// the sweep to book again every deadline it leaves in place.
    pub(crate) fn start_sweep(&self, now_ms: u64) -> bool {
        Self::start(&self.earliest, now_ms)
    }

    /// `start_sweep` for the ready queue's handshakes.
    pub(crate) fn start_queue_scan(&self, now_ms: u64) -> bool {
        Self::start(&self.queued, now_ms)
    }

    /// `start_sweep` for the parked handshakes.
    pub(crate) fn start_handshake_sweep(&self, now_ms: u64) -> bool {
        Self::start(&self.parked, now_ms)
    }

    fn start(earliest: &AtomicU64, now_ms: u64) -> bool {
        if earliest.load(Ordering::SeqCst) > now_ms {
            return false;
        }
        earliest.store(NONE, Ordering::SeqCst);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_earliest_until_a_sweep() {
        let t = Timers::new();
        assert_eq!(t.next(), None);
        assert!(!t.start_sweep(u64::MAX - 1), "nothing booked, nothing due");
        assert!(t.book(200));
        assert!(!t.book(300));
        assert!(t.book(100));
        assert_eq!(t.next(), Some(100));
        assert!(!t.start_sweep(99));
        assert!(t.start_sweep(100));
        assert_eq!(t.next(), None, "the sweep books what it leaves");
        assert!(t.book(300));
        assert_eq!(t.next(), Some(300));
        assert_eq!(Timers::round(1), TICK_MS);
        assert_eq!(Timers::round(TICK_MS), TICK_MS);
    }

    /// Handshakes waiting in the ready queue, and parked ones, each wake
    /// the loop for their own look, not for a sweep of every slot.
    #[test]
    fn handshakes_wake_the_loop_without_a_sweep_of_every_slot() {
        type Book = fn(&Timers, u64) -> bool;
        let kinds: [(&str, Book, Book); 2] = [
            ("queued", Timers::book_queued, Timers::start_queue_scan),
            ("parked", Timers::book_parked, Timers::start_handshake_sweep),
        ];
        for (kind, book, start) in kinds {
            let t = Timers::new();
            assert!(t.book(300));
            assert!(book(&t, 100), "{kind}");
            assert!(!book(&t, 200), "{kind}");
            assert_eq!(t.next(), Some(100), "{kind}: the loop wakes for either");
            assert!(!t.start_sweep(100), "{kind}: no sweep of every slot is due");
            for (other, _, other_start) in kinds {
                if other != kind {
                    assert!(!other_start(&t, 100), "{kind}: nor a look at the {other}");
                }
            }
            assert!(start(&t, 100), "{kind}");
            assert_eq!(t.next(), Some(300), "{kind}: the slots' deadline stays");
            assert!(!start(&t, 300), "{kind}: the look books what it leaves");
            assert!(t.start_sweep(300));
            assert_eq!(t.next(), None);
        }
    }

    #[test]
    fn keepalive_deadlines_are_coarser_but_bounded() {
        let s = Duration::from_secs;
        assert_eq!(Timers::keepalive_tick(Some(s(30)), Some(s(75))), 900);
        assert_eq!(Timers::keepalive_tick(None, Some(s(75))), 1000);
        assert_eq!(Timers::keepalive_tick(Some(s(600)), None), 1000);
        assert_eq!(
            Timers::keepalive_tick(Some(Duration::from_millis(100)), None),
            TICK_MS
        );
        assert_eq!(Timers::keepalive_tick(None, None), TICK_MS);
        assert_eq!(Timers::round_to(30_001, 900), 30_600);
    }
}
