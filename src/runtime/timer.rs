//! Deadlines: handshake timeouts, keepalive pings, idle and close timeouts.
//!
//! One min-heap of `(when, key)` entries for the whole server, read by the
//! poller thread, which sleeps in `wait` until the earliest. Entries are
//! never removed early: when one fires, the connection's job works out what
//! is really due and books its next deadline. Deadlines are rounded up to
//! a tick so that many connections wake together and an idle server wakes
//! a few times a second at most.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use parking_lot::Mutex;

/// Deadline granularity in milliseconds.
pub(crate) const TICK_MS: u64 = 50;

pub(crate) struct Timers {
    heap: Mutex<BinaryHeap<Reverse<(u64, usize)>>>,
}

impl Timers {
    pub(crate) fn new() -> Timers {
        Timers {
            heap: Mutex::new(BinaryHeap::new()),
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

    /// Book `key` at `at_ms` (already rounded). Returns true if it is now
    /// the earliest entry, so the poller must be woken to shorten its wait.
    pub(crate) fn add(&self, at_ms: u64, key: usize) -> bool {
        let mut h = self.heap.lock();
        let earliest = h.peek().is_none_or(|Reverse((t, _))| at_ms < *t);
        h.push(Reverse((at_ms, key)));
        earliest
    }

    /// The earliest deadline.
    pub(crate) fn next(&self) -> Option<u64> {
        self.heap.lock().peek().map(|Reverse((t, _))| *t)
    }

    /// Pop every entry due at `now_ms` into `out`.
    pub(crate) fn expired(&self, now_ms: u64, out: &mut Vec<(u64, usize)>) {
        let mut h = self.heap.lock();
        while let Some(Reverse((t, key))) = h.peek().copied() {
            if t > now_ms {
                break;
            }
            h.pop();
            out.push((t, key));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pops_in_order_and_reports_earliest() {
        let t = Timers::new();
        assert!(t.add(200, 1));
        assert!(!t.add(300, 2));
        assert!(t.add(100, 3));
        assert_eq!(t.next(), Some(100));
        let mut out = Vec::new();
        t.expired(250, &mut out);
        assert_eq!(out, vec![(100, 3), (200, 1)]);
        assert_eq!(t.next(), Some(300));
        assert_eq!(Timers::round(1), TICK_MS);
        assert_eq!(Timers::round(TICK_MS), TICK_MS);
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
