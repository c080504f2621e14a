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
        at_ms.div_ceil(TICK_MS) * TICK_MS
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
}
