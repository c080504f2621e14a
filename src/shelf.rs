//! Shelves: memory that one thread lets go of, kept for another thread to
//! take. A main loop frees what the workers made for it (its messages'
//! buffers) and makes what the workers free (its replies' queues): glibc's
//! free of another thread's allocation, and the allocation that replaces
//! it, cost several times a thread's own. What such a thread would free
//! goes on a shelf instead, up to a bound, and a thread that would
//! allocate takes from it first. Counted nowhere; shared by the process's
//! servers, and kept after them.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// At most `most` items, the last put taken first.
pub(crate) struct Shelf<V> {
    items: parking_lot::Mutex<Vec<V>>,
    /// How many `items` holds: looked at without the lock, so that a
    /// taker finding it empty, or a giver finding it full, takes no lock.
    count: AtomicUsize,
    most: usize,
    /// The process's (a `static`): taken from only where [`takes_here`].
    process_wide: bool,
}

impl<V> Shelf<V> {
    /// A shelf for the process, shared by its servers' threads.
    pub(crate) const fn process_wide(most: usize) -> Self {
        Shelf {
            items: parking_lot::Mutex::new(Vec::new()),
            count: AtomicUsize::new(0),
            most,
            process_wide: true,
        }
    }

    /// A shelf of one test's own.
    #[cfg(test)]
    fn new(most: usize) -> Self {
        let mut shelf = Self::process_wide(most);
        shelf.process_wide = false;
        shelf
    }

    /// Keep `item`, if there is room; else it is dropped, after the lock
    /// is let go.
    pub(crate) fn put(&self, item: V) {
        if self.count.load(Relaxed) >= self.most {
            return;
        }
        let mut items = self.items.lock();
        if items.len() < self.most {
            items.push(item);
            self.count.store(items.len(), Relaxed);
        } else {
            drop(items);
            drop(item);
        }
    }

    /// The last item put, if any.
    pub(crate) fn take(&self) -> Option<V> {
        self.take_where(|_| true)
    }

    /// The last item put for which `good` holds, if any.
    pub(crate) fn take_where(&self, good: impl Fn(&V) -> bool) -> Option<V> {
        if self.process_wide && !takes_here() || self.count.load(Relaxed) == 0 {
            return None;
        }
        let mut items = self.items.lock();
        let at = items.iter().rposition(good)?;
        let item = items.remove(at);
        self.count.store(items.len(), Relaxed);
        Some(item)
    }
}

/// Whether this thread may take from the process's shelves: always, but
/// never in the library's unit tests. Their threads share the shelves, and a test
/// that counts on what a thread keeps of its own (its first queue's box,
/// its first gathered buffer's size) would take another's leftovers.
fn takes_here() -> bool {
    !cfg!(test)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shelf keeps what it has room for, gives the last put first, and
    /// a taker's condition passes over what does not meet it.
    #[test]
    fn a_shelf_keeps_at_most_its_bound_and_gives_what_is_asked() {
        let shelf = Shelf::new(4);
        assert_eq!(shelf.take(), None);
        for i in 0..=4 {
            shelf.put(i);
        }
        assert_eq!(shelf.count.load(Relaxed), 4, "more than its bound kept");
        assert_eq!(shelf.take_where(|&i| i < 2), Some(1));
        assert_eq!(shelf.take_where(|&i| i > 10), None);
        assert_eq!(shelf.take(), Some(3));
        assert_eq!(shelf.take(), Some(2));
        assert_eq!(shelf.take(), Some(0));
        assert_eq!(shelf.take(), None);
        assert_eq!(shelf.count.load(Relaxed), 0);
    }
}
