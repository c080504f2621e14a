//! The server whose job this thread runs, so that a send from one of its
//! closures uses the job's own `Arc` of the server instead of making one
//! from the client's `Weak`. Made per message, that one is an atomic
//! increment and decrement of a count every worker writes (a cache line
//! that moves between cores with each send): on a 32 B echo it was two
//! thirds of `Client::send`'s samples, about 3% of the server's CPU.

// The only unsafe code of this module: a reference made from the address
// a job published (see `with_arc`).
#![allow(unsafe_code)]

use std::cell::Cell;
use std::ptr;
use std::sync::{Arc, Weak};

thread_local! {
    /// The address of the value whose `Arc` a job on this thread lends,
    /// and of that `Arc`; both null when none.
    static CURRENT: Cell<(*const (), *const ())> = const { Cell::new((ptr::null(), ptr::null())) };
}

/// Lends `arc` to [`with_arc`] on this thread until dropped; what it
/// replaced comes back then. Made by a job from an `Arc` that outlives
/// the guard (the job's own, on its caller's stack), and dropped before
/// it.
pub(crate) struct Current {
    before: (*const (), *const ()),
}

impl Current {
    pub(crate) fn enter<X>(arc: &Arc<X>) -> Current {
        let lent = (
            Arc::as_ptr(arc).cast::<()>(),
            ptr::from_ref(arc).cast::<()>(),
        );
        Current {
            before: CURRENT.replace(lent),
        }
    }
}

impl Drop for Current {
    fn drop(&mut self) {
        CURRENT.set(self.before);
    }
}

/// `f` with the value `weak` names (and `arg`): the `Arc` lent on this
/// thread if it is that value's, with no count touched; else an `Arc` made
/// from `weak`. `Err(arg)` if the value is gone.
pub(crate) fn with_arc<X, A, R>(
    weak: &Weak<X>,
    arg: A,
    f: impl FnOnce(&Arc<X>, A) -> R,
) -> Result<R, A> {
    let (value, arc) = CURRENT.get();
    if !value.is_null() && ptr::eq(value, weak.as_ptr().cast::<()>()) {
        // SAFETY: `arc` is the address of an `Arc` lent on this thread by
        // a `Current` that is still alive, since the mark is restored when
        // it drops; the `Arc` outlives that guard and does not move while
        // it lives, and `f` returns before anything on this thread can
        // drop the guard. The `Arc`'s value is at `value`. `weak` points at
        // the same allocation, which a `Weak` keeps from being freed or
        // reused while it lives: it is the one value, of type `X`, so the
        // lent `Arc` is an `Arc<X>`.
        let lent = unsafe { &*arc.cast::<Arc<X>>() };
        return Ok(f(lent, arg));
    }
    match weak.upgrade() {
        Some(arc) => Ok(f(&arc, arg)),
        None => Err(arg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lent_arc_is_used_without_touching_its_count() {
        let a = Arc::new(String::from("a"));
        let weak = Arc::downgrade(&a);
        let _lent = Current::enter(&a);
        let count = with_arc(&weak, (), |x, ()| {
            assert!(Arc::ptr_eq(x, &a));
            Arc::strong_count(x)
        });
        // Made from the `Weak`, there would be two.
        assert_eq!(count, Ok(1));
    }

    #[test]
    fn another_value_or_none_lent_is_reached_through_its_weak() {
        let a = Arc::new(1u64);
        let b = Arc::new(2u64);
        let weak_b = Arc::downgrade(&b);
        assert_eq!(
            with_arc(&weak_b, (), |x, ()| (**x, Arc::strong_count(x))),
            Ok((2, 2))
        );
        let lent = Current::enter(&a);
        assert_eq!(
            with_arc(&weak_b, (), |x, ()| (**x, Arc::strong_count(x))),
            Ok((2, 2))
        );
        drop(lent);
        let weak_a = Arc::downgrade(&a);
        assert_eq!(with_arc(&weak_a, (), |x, ()| Arc::strong_count(x)), Ok(2));
        drop(a);
        assert_eq!(with_arc(&weak_a, (), |x, ()| **x), Err(()));
    }

    #[test]
    fn a_nested_lend_gives_back_the_outer_one() {
        let a = Arc::new(1u8);
        let b = Arc::new(2u8);
        let (weak_a, weak_b) = (Arc::downgrade(&a), Arc::downgrade(&b));
        let _outer = Current::enter(&a);
        {
            let _inner = Current::enter(&b);
            assert_eq!(with_arc(&weak_b, (), |x, ()| Arc::strong_count(x)), Ok(1));
            assert_eq!(with_arc(&weak_a, (), |x, ()| Arc::strong_count(x)), Ok(2));
        }
        assert_eq!(with_arc(&weak_a, (), |x, ()| Arc::strong_count(x)), Ok(1));
        assert_eq!(with_arc(&weak_b, (), |x, ()| Arc::strong_count(x)), Ok(2));
    }

    #[test]
    fn another_thread_sees_nothing_lent() {
        let a = Arc::new(3u32);
        let weak = Arc::downgrade(&a);
        let _lent = Current::enter(&a);
        let count = std::thread::scope(|s| {
            s.spawn(|| with_arc(&weak, (), |x, ()| Arc::strong_count(x)))
                .join()
                .unwrap()
        });
        assert_eq!(count, Ok(2));
    }
}
