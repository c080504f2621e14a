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

/// Runs `f` with `arc` lent to [`with_arc`] on this thread; what was lent
/// before comes back when `f` returns or unwinds. `arc` is borrowed for
/// the whole call, so it lives, unmoved, for as long as it is lent.
pub(crate) fn lend<X, R>(arc: &Arc<X>, f: impl FnOnce() -> R) -> R {
    struct Restore((*const (), *const ()));
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.set(self.0);
        }
    }
    let lent = (
        Arc::as_ptr(arc).cast::<()>(),
        ptr::from_ref(arc).cast::<()>(),
    );
    let _restore = Restore(CURRENT.replace(lent));
    f()
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
        // SAFETY: `arc` is the address of an `Arc` lent by a `lend` whose
        // call is still running on this thread (the mark is restored when
        // it returns or unwinds), and which borrows that `Arc` for the
        // whole call: it is alive and unmoved, and `f` returns before that
        // call can. The `Arc`'s value is at `value`. `weak` points at
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

/// The address of the value lent on this thread, or null (for tests).
#[cfg(test)]
pub(crate) fn lent() -> *const () {
    CURRENT.get().0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server's closures run with its `Arc` lent (the send path's
    /// saving depends on it, and nothing else would show it lost), and a
    /// thread of the user's has nothing lent.
    #[test]
    fn the_servers_closures_run_with_its_arc_lent() {
        use std::io::Write;
        let (tx, rx) = std::sync::mpsc::channel::<usize>();
        let server = crate::WebSocketServer::builder()
            .on_message(move |_, _| {
                let _ = tx.send(lent() as usize);
            })
            .start("127.0.0.1:0")
            .unwrap();
        let mut s = std::net::TcpStream::connect(server.local_addr()).unwrap();
        crate::runtime::testing::upgrade(&mut s);
        // A masked text frame "hi" (mask zero).
        s.write_all(&[0x81, 0x82, 0, 0, 0, 0, b'h', b'i']).unwrap();
        let seen = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        assert_eq!(seen, Arc::as_ptr(server.shared()) as *const () as usize);
        assert!(lent().is_null());
    }

    #[test]
    fn a_lent_arc_is_used_without_touching_its_count() {
        let a = Arc::new(String::from("a"));
        let weak = Arc::downgrade(&a);
        let count = lend(&a, || {
            with_arc(&weak, (), |x, ()| {
                assert!(Arc::ptr_eq(x, &a));
                Arc::strong_count(x)
            })
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
        lend(&a, || {
            assert_eq!(
                with_arc(&weak_b, (), |x, ()| (**x, Arc::strong_count(x))),
                Ok((2, 2))
            );
        });
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
        lend(&a, || {
            lend(&b, || {
                assert_eq!(with_arc(&weak_b, (), |x, ()| Arc::strong_count(x)), Ok(1));
                assert_eq!(with_arc(&weak_a, (), |x, ()| Arc::strong_count(x)), Ok(2));
            });
            assert_eq!(with_arc(&weak_a, (), |x, ()| Arc::strong_count(x)), Ok(1));
            assert_eq!(with_arc(&weak_b, (), |x, ()| Arc::strong_count(x)), Ok(2));
            // Given back after an unwind too.
            let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                lend(&b, || panic!("inside"));
            }));
            assert!(unwound.is_err());
            assert_eq!(with_arc(&weak_a, (), |x, ()| Arc::strong_count(x)), Ok(1));
        });
        assert_eq!(with_arc(&weak_a, (), |x, ()| Arc::strong_count(x)), Ok(2));
    }

    #[test]
    fn another_thread_sees_nothing_lent() {
        let a = Arc::new(3u32);
        let weak = Arc::downgrade(&a);
        let count = lend(&a, || {
            std::thread::scope(|s| {
                s.spawn(|| with_arc(&weak, (), |x, ()| Arc::strong_count(x)))
                    .join()
                    .unwrap()
            })
        });
        assert_eq!(count, Ok(2));
    }
}
