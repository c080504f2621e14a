//! The server and the connection whose job this thread runs, so that a
//! send from one of its closures uses the job's own `Arc`s instead of
//! making them from the client's `Weak`s. Made per message, each is an
//! atomic increment and decrement of a count (the server's, which every
//! worker writes, a cache line that moves between cores with each send;
//! the connection's, which the poller's hand-offs write): on a 32 B echo
//! the server's was two thirds of `Client::send`'s samples, about 3% of
//! the server's CPU; with the connection's gone too, the send path's own
//! samples fell from 4.5% to 3.4% of it.

// The only unsafe code of this module: a reference made from the address
// a job published (see `with_arcs`).
#![allow(unsafe_code)]

use std::cell::Cell;
use std::ptr;
use std::sync::{Arc, Weak};

/// A value lent: its address and that of its `Arc`.
type Lent = (*const (), *const ());

const NONE: Lent = (ptr::null(), ptr::null());

thread_local! {
    /// The values whose `Arc`s a job on this thread lends (the server's
    /// and the connection's), with the addresses of those `Arc`s; null
    /// when none.
    static CURRENT: Cell<[Lent; 2]> = const { Cell::new([NONE; 2]) };
}

fn lent_of<X>(arc: &Arc<X>) -> Lent {
    (
        Arc::as_ptr(arc).cast::<()>(),
        ptr::from_ref(arc).cast::<()>(),
    )
}

/// Runs `f` with `a` and `b` lent to [`with_arcs`] on this thread; what was
/// lent before comes back when `f` returns or unwinds. Both are borrowed
/// for the whole call, so they live, unmoved, for as long as they are
/// lent.
pub(crate) fn lend<X, Y, R>(a: &Arc<X>, b: &Arc<Y>, f: impl FnOnce() -> R) -> R {
    struct Restore([Lent; 2]);
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.set(self.0);
        }
    }
    let _restore = Restore(CURRENT.replace([lent_of(a), lent_of(b)]));
    f()
}

/// The address of the `Arc` lent on this thread for the value `weak`
/// names, if one is. (A `Weak`'s address is never null, a `Weak::new()`'s
/// is dangling, so a slot with nothing lent never matches.)
fn lent_for<X>(lent: &[Lent; 2], weak: &Weak<X>) -> Option<*const ()> {
    let wanted = weak.as_ptr().cast::<()>();
    lent.iter()
        .find(|(value, _)| ptr::eq(*value, wanted))
        .map(|&(_, arc)| arc)
}

/// `f` with the values `x` and `y` name (and `arg`): for each, the `Arc`
/// lent on this thread if one is that value's, with no count touched;
/// else an `Arc` made from its `Weak`. `Err(arg)` if either is gone.
pub(crate) fn with_arcs<X, Y, A, R>(
    x: &Weak<X>,
    y: &Weak<Y>,
    arg: A,
    f: impl FnOnce(&Arc<X>, &Arc<Y>, A) -> R,
) -> Result<R, A> {
    let lent = CURRENT.get();
    // The two look-ups are written out: one function for both, keeping
    // each made `Arc` in an `Option`, cost `Client::send` 10 instructions
    // a message more (1,902 against 1,892, `bench/instructions.sh`).
    let (made_x, made_y);
    // SAFETY (both): the address is that of an `Arc` lent by a `lend`
    // whose call is still running on this thread (the marks are restored
    // when it returns or unwinds), and which borrows that `Arc` for the
    // whole call: it is alive and unmoved, and `f` returns before that
    // call can. The `Arc`'s value is at the address the `Weak` points at,
    // an allocation a `Weak` keeps from being freed or reused while it
    // lives: it is the one value, of the `Weak`'s type, so the lent `Arc`
    // is an `Arc` of that type (whichever of the two was lent with it:
    // two live values have two addresses).
    let x = match lent_for(&lent, x) {
        Some(arc) => unsafe { &*arc.cast::<Arc<X>>() },
        None => match x.upgrade() {
            Some(arc) => {
                made_x = arc;
                &made_x
            }
            None => return Err(arg),
        },
    };
    let y = match lent_for(&lent, y) {
        Some(arc) => unsafe { &*arc.cast::<Arc<Y>>() },
        None => match y.upgrade() {
            Some(arc) => {
                made_y = arc;
                &made_y
            }
            None => return Err(arg),
        },
    };
    Ok(f(x, y, arg))
}

/// The addresses of the values lent on this thread, or nulls (for tests).
#[cfg(test)]
pub(crate) fn lent() -> [*const (); 2] {
    CURRENT.get().map(|(value, _)| value)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One value through [`with_arcs`] (with another, not lent, beside).
    fn with_arc<X, A, R>(weak: &Weak<X>, arg: A, f: impl FnOnce(&Arc<X>, A) -> R) -> Result<R, A> {
        let other = Arc::new(0u8);
        with_arcs(weak, &Arc::downgrade(&other), arg, |x, _, arg| f(x, arg))
    }

    /// The server's closures run with its `Arc` and their connection's
    /// lent (the send path's saving depends on it, and nothing else would
    /// show it lost), and a thread of the user's has nothing lent.
    #[test]
    fn the_servers_closures_run_with_its_arc_and_the_connections_lent() {
        use std::io::Write;
        let (tx, rx) = std::sync::mpsc::channel::<([usize; 2], usize)>();
        let server = crate::WebSocketServer::builder()
            .on_message(move |client, _| {
                let conn = client.conn().map_or(0, |c| Arc::as_ptr(&c) as usize);
                let _ = tx.send((lent().map(|v| v as usize), conn));
            })
            .start("127.0.0.1:0")
            .unwrap();
        let mut s = std::net::TcpStream::connect(server.local_addr()).unwrap();
        crate::runtime::testing::upgrade(&mut s);
        // A masked text frame "hi" (mask zero).
        s.write_all(&[0x81, 0x82, 0, 0, 0, 0, b'h', b'i']).unwrap();
        let (seen, conn) = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        assert_eq!(seen[0], Arc::as_ptr(server.shared()) as *const () as usize);
        assert_ne!(conn, 0);
        assert_eq!(seen[1], conn);
        assert!(lent().iter().all(|v| v.is_null()));
    }

    /// Both values looked up at once, in either order (as `Client::send`
    /// asks for the connection, lent second, then the server, lent first),
    /// and each alone in either place.
    #[test]
    fn both_lent_arcs_are_used_without_touching_their_counts() {
        let a = Arc::new(String::from("a"));
        let b = Arc::new(7u16);
        let (weak_a, weak_b) = (Arc::downgrade(&a), Arc::downgrade(&b));
        let counts = |x: &Arc<u16>, y: &Arc<String>, ()| {
            assert!(Arc::ptr_eq(x, &b) && Arc::ptr_eq(y, &a));
            (Arc::strong_count(x), Arc::strong_count(y))
        };
        lend(&a, &b, || {
            assert_eq!(with_arcs(&weak_b, &weak_a, (), counts), Ok((1, 1)));
            assert_eq!(
                with_arcs(&weak_a, &weak_b, (), |x, y, ()| counts(y, x, ())),
                Ok((1, 1))
            );
            assert_eq!(with_arc(&weak_a, (), |x, ()| Arc::strong_count(x)), Ok(1));
            assert_eq!(with_arc(&weak_b, (), |x, ()| Arc::strong_count(x)), Ok(1));
        });
        // Nothing lent: made from the `Weak`s, two of each.
        assert_eq!(with_arcs(&weak_b, &weak_a, (), counts), Ok((2, 2)));
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
        let c = Arc::new(3u64);
        lend(&a, &c, || {
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
        let (c, d) = (Arc::new(3u8), Arc::new(4u8));
        let (weak_a, weak_b) = (Arc::downgrade(&a), Arc::downgrade(&b));
        lend(&a, &c, || {
            lend(&b, &d, || {
                assert_eq!(with_arc(&weak_b, (), |x, ()| Arc::strong_count(x)), Ok(1));
                assert_eq!(with_arc(&weak_a, (), |x, ()| Arc::strong_count(x)), Ok(2));
            });
            assert_eq!(with_arc(&weak_a, (), |x, ()| Arc::strong_count(x)), Ok(1));
            assert_eq!(with_arc(&weak_b, (), |x, ()| Arc::strong_count(x)), Ok(2));
            // Given back after an unwind too.
            let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                lend(&b, &d, || panic!("inside"));
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
        let count = lend(&a, &a, || {
            std::thread::scope(|s| {
                s.spawn(|| with_arc(&weak, (), |x, ()| Arc::strong_count(x)))
                    .join()
                    .unwrap()
            })
        });
        assert_eq!(count, Ok(2));
    }
}
