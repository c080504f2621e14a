//! The accept thread: blocks in `accept`, hands each socket to the pool
//! (through the ready queue, if its request is in) or to the poller.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::proto::handshake::Reject;
use crate::runtime::handshake::{
    abort_handshake, begins_head, book_handshake_deadline, book_queued_handshake_deadline,
    far_future,
};
use crate::runtime::poller::{Job, dispatch, register};
use crate::runtime::registry::{Found, Pending};
use crate::runtime::{Shared, Throttled};

/// Bytes the accept thread reads of a request that is already in: a
/// browser's upgrade request fits; a longer one is read on by the job.
const FIRST_READ: usize = 2048;

/// `listener_nodelay`: whether [`set_listener_nodelay`] set the option
/// on the listener.
pub(crate) fn run<T: Send + Sync + 'static>(
    shared: Arc<Shared<T>>,
    listener: TcpListener,
    listener_nodelay: bool,
) {
    let mut st = Accepting {
        handshakes: Vec::with_capacity(1),
        spare: Spare::open(),
        out_of_fds: Throttled::new(),
        panicked: Throttled::new(),
        reserved: None,
        first: Box::new([0; FIRST_READ]),
        nodelay: NoDelay::new(listener_nodelay),
    };
    loop {
        match catch_unwind(AssertUnwindSafe(|| accept_one(&shared, &listener, &mut st))) {
            Ok(true) => return,
            Ok(false) => {}
            Err(panic) => {
                // A bug here must not stop the server taking clients: it
                // is reported and the thread goes on.
                let message = crate::runtime::poller::panic_message(&*panic);
                // Reported from the pool, as below: not on this thread,
                // which shutdown joins; at most once every ten seconds.
                st.panicked.report(&shared, || {
                    Error::Internal(format!(
                        "the accept thread panicked ({message}) and went on"
                    ))
                });
                // The slot of the client being taken is freed (its socket
                // closed as the unwinding dropped it).
                for job in st.handshakes.drain(..) {
                    if let Job::Ready(Found::Handshake(p)) = job {
                        shared.registry.remove(p.key, p.peer.ip());
                    }
                }
                if let Some((key, ip)) = st.reserved.take() {
                    shared.registry.remove(key, ip);
                }
                if shared.stopping.load(Ordering::Acquire) {
                    return;
                }
                // Not a spin, should the panic come back every time.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// What the accept thread keeps from one client to the next.
struct Accepting<T> {
    handshakes: Vec<Job<T>>,
    spare: Spare,
    /// Reports of running out of file descriptors.
    out_of_fds: Throttled,
    /// Reports of a panic here.
    panicked: Throttled,
    /// The slot reserved for the client being taken, until it is handed
    /// on (or freed).
    reserved: Option<(usize, std::net::IpAddr)>,
    /// What a request's first read goes into, kept from one client to
    /// the next (a buffer on the stack was zeroed for each).
    first: Box<[u8; FIRST_READ]>,
    /// How each accepted socket is seen to have `TCP_NODELAY`.
    nodelay: NoDelay,
}

/// How the accept thread sees that each socket it accepts has
/// `TCP_NODELAY`: inherited from the listener ([`set_listener_nodelay`]),
/// a system call a client fewer, where the system copies it, or set on
/// each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NoDelay {
    /// The listener has it: the next `left` sockets are each checked (and
    /// set where it is missing); `seen` once one had it. A client the
    /// kernel connected before `start` set it lacks it, and so may one
    /// connected in that moment but queued after a later one: only the
    /// first few clients can be, and the first [`NODELAY_CHECKS`] are
    /// checked.
    Checking { left: u16, seen: bool },
    /// Checked: the system copies it. Nothing to do.
    Inherited,
    /// Set on each: the listener does not have it, or no socket checked
    /// showed it inherited.
    SetEach,
}

/// How many accepted sockets are checked for an inherited `TCP_NODELAY`
/// before it is trusted (or found not to be copied).
const NODELAY_CHECKS: u16 = 64;

impl NoDelay {
    fn new(listener_has_it: bool) -> NoDelay {
        if listener_has_it {
            NoDelay::Checking {
                left: NODELAY_CHECKS,
                seen: false,
            }
        } else {
            NoDelay::SetEach
        }
    }
}

impl<T> Accepting<T> {
    /// See that `stream`, just accepted, does not delay small writes.
    fn nodelay(&mut self, stream: &TcpStream) {
        match self.nodelay {
            NoDelay::Inherited => {}
            NoDelay::SetEach => {
                let _ = stream.set_nodelay(true);
            }
            NoDelay::Checking { left, seen } => {
                let inherited = stream.nodelay().unwrap_or(false);
                if !inherited {
                    let _ = stream.set_nodelay(true);
                }
                let seen = seen || inherited;
                self.nodelay = match left.saturating_sub(1) {
                    0 if seen => NoDelay::Inherited,
                    0 => NoDelay::SetEach,
                    left => NoDelay::Checking { left, seen },
                };
            }
        }
    }
}

/// How many clients may wait in the listen backlog to be accepted. The
/// standard library listens with 128, which a burst of clients overflows
/// (a crowd reconnecting after a restart, a load generator opening its
/// clients 256 at a time): Linux then drops their SYNs, and each waits
/// for its retransmission, a second or more (10,000 clients took 17 s to
/// open, against 3.3 s for uWebSockets, which listens with 512). The
/// kernel caps it at `net.core.somaxconn` (4,096 by default since Linux
/// 5.4).
pub(crate) const LISTEN_BACKLOG: i32 = 1024;

/// Listen on `listener` again, with [`LISTEN_BACKLOG`]: a second
/// `listen(2)` on a listening socket sets its backlog. Should it fail,
/// the first one's stands.
#[cfg(unix)]
#[allow(unsafe_code)]
pub(crate) fn widen_backlog(listener: &TcpListener) {
    use std::os::fd::AsRawFd;
    use std::os::raw::c_int;
    unsafe extern "C" {
        fn listen(fd: c_int, backlog: c_int) -> c_int;
    }
    // SAFETY: `listen(2)` reads two integers and touches no memory of
    // ours; the descriptor is the listener's, open while it is borrowed.
    let _ = unsafe { listen(listener.as_raw_fd(), LISTEN_BACKLOG) };
}

/// Elsewhere the standard library's backlog stands.
#[cfg(not(unix))]
pub(crate) fn widen_backlog(_: &TcpListener) {}

/// Apple's systems and the BSDs, whose socket options this file knows.
#[cfg(unix)]
const BSD_SYSTEM: bool = cfg!(any(
    target_os = "macos",
    target_os = "ios",
    target_os = "freebsd",
    target_os = "netbsd",
    target_os = "openbsd",
    target_os = "dragonfly"
));

/// Ask the kernel for a send buffer of `bytes` on `socket` (`SO_SNDBUF`;
/// see [`Builder::kernel_send_buffer`](crate::Builder::kernel_send_buffer)).
/// Set on the listener at `start` (where a value the kernel refuses is an
/// error), which every socket it accepts inherits (Linux and the BSDs
/// copy it, with the lock that stops the kernel resizing it, to each new
/// connection); and again on each accepted socket, since `bind` listens
/// before `start` can set it: a client whose connection the kernel
/// completed in that moment would keep the kernel's sizing.
#[cfg(unix)]
pub(crate) fn set_send_buffer(socket: &impl std::os::fd::AsRawFd, bytes: usize) -> io::Result<()> {
    use std::os::raw::c_int;
    // The constants of <sys/socket.h>: Linux's on most of its
    // architectures, the BSDs' (and macOS's), and MIPS and SPARC Linux's,
    // which took the BSD numbering.
    const LINUX: Option<(c_int, c_int)> = Some((1, 7));
    const BSD: Option<(c_int, c_int)> = Some((0xffff, 0x1001));
    let level_and_name = if cfg!(any(target_os = "linux", target_os = "android")) {
        if cfg!(any(
            target_arch = "mips",
            target_arch = "mips64",
            target_arch = "mips32r6",
            target_arch = "mips64r6",
            target_arch = "sparc",
            target_arch = "sparc64"
        )) {
            BSD
        } else {
            LINUX
        }
    } else if BSD_SYSTEM {
        BSD
    } else {
        None
    };
    let Some((level, name)) = level_and_name else {
        return Err(unsupported());
    };
    // At most 1 GiB (the builder's check), so it fits.
    set_int_option(
        socket,
        level,
        name,
        c_int::try_from(bytes).unwrap_or(c_int::MAX),
    )
}

/// Elsewhere the option is not known: `start` says so.
#[cfg(not(unix))]
pub(crate) fn set_send_buffer<S>(_: &S, _: usize) -> io::Result<()> {
    Err(unsupported())
}

/// Set `TCP_NODELAY` on the listener, which Linux (and macOS and the
/// BSDs) copy to every socket it accepts, so that the accept thread need
/// not set it on each (see [`NoDelay`], which checks that it was). True
/// if it was set; otherwise (an error, or another system) each socket is
/// set alone.
pub(crate) fn set_listener_nodelay(listener: &TcpListener) -> bool {
    #[cfg(unix)]
    if cfg!(any(target_os = "linux", target_os = "android")) || BSD_SYSTEM {
        // `IPPROTO_TCP` and `TCP_NODELAY` are 6 and 1 on these systems.
        return set_int_option(listener, 6, 1, 1).is_ok();
    }
    let _ = listener;
    false
}

/// `setsockopt(2)` with an integer value.
#[cfg(unix)]
#[allow(unsafe_code)]
fn set_int_option(
    socket: &impl std::os::fd::AsRawFd,
    level: std::os::raw::c_int,
    name: std::os::raw::c_int,
    value: std::os::raw::c_int,
) -> io::Result<()> {
    use std::os::raw::{c_int, c_void};
    unsafe extern "C" {
        fn setsockopt(
            fd: c_int,
            level: c_int,
            name: c_int,
            value: *const c_void,
            len: u32,
        ) -> c_int;
    }
    // SAFETY: `setsockopt(2)` reads `len` bytes at `value`, an integer of
    // ours that outlives the call, and writes nothing of ours; the
    // descriptor is the socket's, open while it is borrowed.
    let done = unsafe {
        setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<c_int>() as u32,
        )
    };
    if done == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn unsupported() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "kernel_send_buffer is not supported on this system",
    )
}

/// Take one client off the listen backlog and hand it on. True once
/// shutdown has stopped the thread.
fn accept_one<T: Send + Sync + 'static>(
    shared: &Arc<Shared<T>>,
    listener: &TcpListener,
    st: &mut Accepting<T>,
) -> bool {
    // A main loop far behind (its event channel twice over budget) is
    // not handed more clients: they wait in the listen backlog.
    while shared.events.far_over_budget() && !shared.stopping.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(1));
    }
    // Also here: the wake may have been taken as a client to refuse.
    if shared.stopping.load(Ordering::Acquire) {
        return true;
    }
    let accepted = accept_nonblocking(listener);
    if shared.stopping.load(Ordering::Acquire) {
        return true;
    }
    let (stream, peer) = match accepted {
        Ok(pair) => pair,
        Err(e) if is_out_of_fds(&e) => {
            // The process (or the system) has no file descriptor left
            // for the next client. Left in the backlog, it would wait
            // with no answer until someone leaves: spend the spare to
            // take it and answer `503`, then make the spare again.
            st.out_of_fds.report(shared, || Error::Io(e));
            if !refuse_with_spare(shared, listener, &mut st.spare) {
                // Nobody waiting (accept fails at once when out of
                // descriptors, backlog or not), or no spare to spend:
                // back off instead of spinning.
                std::thread::sleep(Duration::from_millis(20));
            }
            return false;
        }
        Err(e) => {
            // Out of memory, or a network error accept(2) passes on:
            // back off, unless it is one to retry at once.
            if e.kind() != io::ErrorKind::Interrupted
                && e.kind() != io::ErrorKind::ConnectionAborted
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            return false;
        }
    };
    st.nodelay(&stream);
    let config = &shared.config;
    if let Some(bytes) = config.kernel_send_buffer {
        // The listener's setting, which `start` checked: see
        // `set_send_buffer`.
        let _ = set_send_buffer(&stream, bytes);
    }
    let Some(key) = shared.registry.reserve(
        config.max_connections,
        config.max_connections_per_ip,
        peer.ip(),
    ) else {
        refuse_503(shared, &stream, "too many connections");
        return false;
    };
    st.reserved = Some((key, peer.ip()));
    #[cfg(test)]
    crate::runtime::poller::inject(shared, crate::runtime::poller::Site::Accepted);
    let deadline = Instant::now()
        .checked_add(shared.config.handshake_timeout)
        .unwrap_or_else(far_future);
    // If the request is already in, a worker takes it now, with the
    // bytes read here (the job reads again only if this read filled
    // its buffer, or the request is not whole); otherwise the poller
    // hands the socket over once it is, rather than a job reading
    // nothing.
    let first = &mut st.first[..];
    let (arrived, gone, buf) = match (&stream).read(first) {
        Ok(0) => (false, true, Vec::new()),
        Ok(n) => (true, false, first[..n].to_vec()),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => (false, false, Vec::new()),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => (false, false, Vec::new()),
        Err(_) => (false, true, Vec::new()),
    };
    let read_dry = arrived && buf.len() < FIRST_READ;
    let pending = Box::new(Pending {
        key,
        stream,
        peer,
        buf,
        deadline,
        out: Vec::new(),
        sent: 0,
        registered: !arrived && !gone,
        read_dry,
        parsed: 0,
        skipped: 0,
        more: false,
        lingering: false,
    });
    if gone {
        // Left (or reset) before sending a byte: nothing to answer.
        abort_handshake(shared, *pending, None);
        st.reserved = None;
        return false;
    }
    if arrived {
        // Not in the poller yet: the handshake job registers it, with
        // the interest its first wait needs (one system call, off this
        // thread). It joins the queue the poller's work goes to, so
        // that while the pool is busy a handshake wakes no thread.
        st.handshakes.push(Job::Ready(Found::Handshake(pending)));
        st.reserved = None;
        dispatch(shared, &mut st.handshakes);
        // It may wait in the queue (every worker busy, or blocked in a
        // closure, including pool jobs that are not drainers), where
        // the poller keeps its deadline. Booked after it is queued: a
        // scan that began meanwhile either sees this booking or finds
        // the handshake in the queue (and books the queue's earliest).
        book_queued_handshake_deadline(shared, deadline);
        return false;
    }
    // Registered while its slot is locked, so that the readiness
    // event cannot look for it before it is there.
    // Once in the poller it is the poller's (an event may hand it to a
    // worker at once): no longer this thread's to free.
    let reserved = &mut st.reserved;
    let registered = shared.registry.park(pending, |p| {
        let r = register(&shared.poller, &p.stream, polling::Event::readable(key));
        if r.is_ok() {
            *reserved = None;
        }
        r
    });
    if !matches!(registered, Some(Ok(()))) {
        if let Some(p) = shared.registry.take_expired_handshake(key, None) {
            abort_handshake(
                shared,
                *p,
                Some(&Reject::new(503).body("server cannot take more connections")),
            );
        }
        st.reserved = None;
        return false;
    }
    book_handshake_deadline(shared, deadline);
    false
}

/// Whether Linux numbers `SOCK_NONBLOCK` and `SOCK_CLOEXEC` here as on
/// most of its architectures (MIPS, SPARC, Alpha and PA-RISC differ).
const GENERIC_SOCKET_FLAGS: bool = cfg!(all(
    any(target_os = "linux", target_os = "android"),
    any(
        target_arch = "x86",
        target_arch = "x86_64",
        target_arch = "arm",
        target_arch = "aarch64",
        target_arch = "riscv64",
        target_arch = "powerpc64",
        target_arch = "s390x",
        target_arch = "loongarch64"
    )
));

/// Take the next client off the listen backlog, its socket already
/// non-blocking: where [`GENERIC_SOCKET_FLAGS`], with `accept4(2)` and
/// `SOCK_NONBLOCK`, a system call a client fewer than the standard
/// library's `accept` (which passes `SOCK_CLOEXEC` alone) and an `ioctl`
/// after it; elsewhere those two.
fn accept_nonblocking(listener: &TcpListener) -> io::Result<(TcpStream, SocketAddr)> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if GENERIC_SOCKET_FLAGS {
        return accept4_nonblocking(listener);
    }
    let (stream, peer) = listener.accept()?;
    stream.set_nonblocking(true)?;
    Ok((stream, peer))
}

/// `accept4(2)` with `SOCK_NONBLOCK | SOCK_CLOEXEC`, as their generic
/// numbers are (called only where [`GENERIC_SOCKET_FLAGS`]).
#[cfg(any(target_os = "linux", target_os = "android"))]
#[allow(unsafe_code)]
fn accept4_nonblocking(listener: &TcpListener) -> io::Result<(TcpStream, SocketAddr)> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::raw::{c_int, c_void};
    unsafe extern "C" {
        fn accept4(fd: c_int, addr: *mut c_void, len: *mut u32, flags: c_int) -> c_int;
    }
    // `O_NONBLOCK` and `O_CLOEXEC` on these architectures.
    const SOCK_NONBLOCK: c_int = 0o4000;
    const SOCK_CLOEXEC: c_int = 0o2000000;
    // A `sockaddr_storage`: 128 bytes, aligned for any address.
    let mut addr = [0u64; 16];
    let mut len = std::mem::size_of_val(&addr) as u32;
    let fd = loop {
        // SAFETY: `accept4(2)` writes at most `len` bytes at `addr`, an
        // array of ours that outlives the call, and the length it wrote
        // to `len`; the descriptor is the listener's, open while it is
        // borrowed.
        let fd = unsafe {
            accept4(
                listener.as_raw_fd(),
                addr.as_mut_ptr().cast(),
                &raw mut len,
                SOCK_NONBLOCK | SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            break fd;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // SAFETY: a descriptor `accept4` just made, owned by nothing else.
    let stream = TcpStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut bytes = [0u8; 128];
    for (chunk, word) in bytes.chunks_exact_mut(8).zip(addr) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    let len = (len as usize).min(bytes.len());
    match peer_of(&bytes[..len]) {
        Some(peer) => Ok((stream, peer)),
        // Not an address of a TCP socket over IP: asked of the socket.
        None => {
            let peer = stream.peer_addr()?;
            Ok((stream, peer))
        }
    }
}

/// The address in a Linux `sockaddr_in` or `sockaddr_in6` of `len`
/// bytes (`sa`), as `accept4(2)` writes it: the family in the machine's
/// byte order, the port and IPv4 address in the network's.
#[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
fn peer_of(sa: &[u8]) -> Option<SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
    // AF_INET and AF_INET6 on Linux.
    const INET: u16 = 2;
    const INET6: u16 = 10;
    let family = u16::from_ne_bytes(sa.get(..2)?.try_into().ok()?);
    let port = u16::from_be_bytes(sa.get(2..4)?.try_into().ok()?);
    match family {
        // The whole structure, as the standard library asks: 16 bytes.
        INET if sa.len() >= 16 => {
            let ip: [u8; 4] = sa.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)))
        }
        INET6 if sa.len() >= 28 => {
            // As the standard library reads them: the flow label as it
            // lies, the scope in the machine's order.
            let flow = u32::from_ne_bytes(sa.get(4..8)?.try_into().ok()?);
            let ip: [u8; 16] = sa.get(8..24)?.try_into().ok()?;
            let scope = u32::from_ne_bytes(sa.get(24..28)?.try_into().ok()?);
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(ip),
                port,
                flow,
                scope,
            )))
        }
        _ => None,
    }
}

/// Count and answer `503` to a client the server cannot take now, with
/// a `Retry-After` of a second.
fn refuse_503<T>(shared: &Shared<T>, stream: &TcpStream, why: &'static str) {
    shared.counters.refused(503);
    refuse(
        stream,
        &Reject::new(503).header("Retry-After", "1").body(why),
    );
}

/// Answer a client refused before any handshake. Best effort: the socket
/// is non-blocking and the answer small. One bounded read of what has come
/// first, since input left unread at close makes the kernel reset the
/// connection, which can destroy the answer before the client reads it. A
/// `HEAD` in that read gets the answer's head alone (one still on its way
/// is not waited for: it gets the body too).
fn refuse(mut stream: &TcpStream, reject: &Reject) {
    let mut sink = [0u8; FIRST_READ];
    let n = stream.read(&mut sink).unwrap_or(0);
    let _ = stream.write(&reject.to_response_for(begins_head(&sink[..n])));
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// Whether `accept` failed for want of a file descriptor (EMFILE, ENFILE).
fn is_out_of_fds(e: &io::Error) -> bool {
    // Both numbers are the same on Linux, the BSDs and macOS.
    cfg!(unix) && matches!(e.raw_os_error(), Some(23 | 24))
}

/// A file descriptor held in reserve, so that out of descriptors the
/// accept thread can still take a client off the backlog to refuse it
/// (Unix; elsewhere `accept` does not fail this way).
struct Spare(Option<std::fs::File>);

impl Spare {
    fn open() -> Spare {
        Spare(if cfg!(unix) {
            std::fs::File::open("/dev/null").ok()
        } else {
            None
        })
    }
}

/// Free the spare, take one waiting client with it and answer `503`, then
/// take the spare back. False if no client was waiting or there was no
/// spare to spend. Never waits: shutdown's wake must reach the blocking
/// `accept` of the loop, which looks at `stopping`.
fn refuse_with_spare<T>(shared: &Shared<T>, listener: &TcpListener, spare: &mut Spare) -> bool {
    if spare.0.take().is_none() {
        *spare = Spare::open();
        return false;
    }
    let taken = listener
        .set_nonblocking(true)
        .and_then(|()| listener.accept());
    if listener.set_nonblocking(false).is_err() {
        // Left non-blocking, the loop would spin: back off each time.
        std::thread::sleep(Duration::from_millis(20));
    }
    let Ok((stream, _)) = taken else {
        *spare = Spare::open();
        return false;
    };
    // Shutdown's wake, or a client past it, is only closed: the loop ends.
    if !shared.stopping.load(Ordering::Acquire) && stream.set_nonblocking(true).is_ok() {
        refuse_503(shared, &stream, "server out of file descriptors");
    }
    // Closed first: its descriptor is the one the spare takes back.
    drop(stream);
    *spare = Spare::open();
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

    /// A client connected to `listener`, and the server's side of it.
    fn accept_from(listener: &TcpListener) -> (TcpStream, TcpStream, SocketAddr) {
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = accept_nonblocking(listener).unwrap();
        (client, server, peer)
    }

    /// The descriptor's flags (`F_GETFD`) and its file's (`F_GETFL`), as
    /// `fcntl(2)` reads them.
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    fn fcntl_flags(socket: &TcpStream) -> (i32, i32) {
        use std::os::fd::AsRawFd;
        use std::os::raw::c_int;
        unsafe extern "C" {
            fn fcntl(fd: c_int, cmd: c_int, ...) -> c_int;
        }
        const F_GETFD: c_int = 1;
        const F_GETFL: c_int = 3;
        // SAFETY: both commands only read the descriptor's flags; the
        // descriptor is the socket's, open while it is borrowed.
        unsafe {
            (
                fcntl(socket.as_raw_fd(), F_GETFD),
                fcntl(socket.as_raw_fd(), F_GETFL),
            )
        }
    }

    #[test]
    fn an_accepted_socket_is_non_blocking_and_knows_its_peer() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (mut client, mut server, peer) = accept_from(&listener);
        assert_eq!(peer, client.local_addr().unwrap(), "the client's address");
        #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
        const {
            assert!(GENERIC_SOCKET_FLAGS, "taken with accept4 here")
        };
        #[cfg(target_os = "linux")]
        {
            let (fd, fl) = fcntl_flags(&server);
            assert_eq!(fd & 1, 1, "close-on-exec (FD_CLOEXEC): {fd:#x}");
            assert_eq!(fl & 0o4000, 0o4000, "non-blocking (O_NONBLOCK): {fl:#o}");
        }
        // Nothing sent yet: a non-blocking read says so at once. (Should
        // it block, the client's bytes end it 2 s later, and the test
        // fails rather than hangs.)
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(2));
            client.write_all(b"hi").unwrap();
            client.shutdown(std::net::Shutdown::Write).unwrap();
            client
        });
        let mut buf = [0u8; 8];
        let began = Instant::now();
        let first = server.read(&mut buf);
        assert!(
            matches!(&first, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "a read with nothing come: {first:?} after {:?}",
            began.elapsed()
        );
        let _client = writer.join().unwrap();
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match server.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "the client's bytes came");
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, b"hi");
    }

    #[test]
    fn an_ipv6_peer_is_read_whole() {
        // Skipped where the machine has no IPv6 loopback.
        let Ok(listener) = TcpListener::bind("[::1]:0") else {
            return;
        };
        let (client, _server, peer) = accept_from(&listener);
        assert_eq!(peer, client.local_addr().unwrap());
        assert!(peer.is_ipv6());
    }

    #[test]
    fn addresses_are_decoded_as_linux_lays_them_out() {
        let mut v4 = [0u8; 16];
        v4[..2].copy_from_slice(&2u16.to_ne_bytes());
        v4[2..4].copy_from_slice(&443u16.to_be_bytes());
        v4[4..8].copy_from_slice(&[10, 1, 2, 3]);
        assert_eq!(
            peer_of(&v4),
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::new(10, 1, 2, 3),
                443
            )))
        );
        let mut v6 = [0u8; 28];
        v6[..2].copy_from_slice(&10u16.to_ne_bytes());
        v6[2..4].copy_from_slice(&8080u16.to_be_bytes());
        v6[4..8].copy_from_slice(&7u32.to_ne_bytes());
        let ip = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
        v6[8..24].copy_from_slice(&ip.octets());
        v6[24..28].copy_from_slice(&3u32.to_ne_bytes());
        assert_eq!(
            peer_of(&v6),
            Some(SocketAddr::V6(SocketAddrV6::new(ip, 8080, 7, 3)))
        );
        // Cut short, or of another family: not guessed at.
        assert_eq!(peer_of(&v4[..15]), None);
        assert_eq!(peer_of(&v6[..27]), None);
        let mut unix = v4;
        unix[..2].copy_from_slice(&1u16.to_ne_bytes());
        assert_eq!(peer_of(&unix), None);
    }

    fn accepting(listener_nodelay: bool) -> Accepting<()> {
        Accepting {
            handshakes: Vec::new(),
            spare: Spare(None),
            out_of_fds: Throttled::new(),
            panicked: Throttled::new(),
            reserved: None,
            first: Box::new([0; FIRST_READ]),
            nodelay: NoDelay::new(listener_nodelay),
        }
    }

    #[test]
    fn nodelay_is_set_on_each_socket_unless_seen_inherited() {
        // A listener without the option: each socket is set alone.
        let plain = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut st = accepting(false);
        for _ in 0..2 {
            let (_client, server, _) = accept_from(&plain);
            assert!(!server.nodelay().unwrap(), "not inherited");
            st.nodelay(&server);
            assert!(server.nodelay().unwrap(), "set alone");
            assert_eq!(st.nodelay, NoDelay::SetEach);
        }
        // Taken to have it where it does not (a system that does not copy
        // it): every socket checked is set, and after the checks each is
        // set without one.
        let mut st = accepting(true);
        for _ in 0..NODELAY_CHECKS {
            assert!(matches!(st.nodelay, NoDelay::Checking { seen: false, .. }));
            let (_client, server, _) = accept_from(&plain);
            st.nodelay(&server);
            assert!(server.nodelay().unwrap(), "set where it was missing");
        }
        assert_eq!(st.nodelay, NoDelay::SetEach);
        let (_client, server, _) = accept_from(&plain);
        st.nodelay(&server);
        assert!(server.nodelay().unwrap());
        // With it on the listener: Linux copies it, and once the checks
        // are done nothing more is asked of the system.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut st = accepting(set_listener_nodelay(&listener));
        for _ in 0..NODELAY_CHECKS {
            let (_client, server, _) = accept_from(&listener);
            st.nodelay(&server);
            assert!(server.nodelay().unwrap());
        }
        if cfg!(target_os = "linux") {
            assert_eq!(st.nodelay, NoDelay::Inherited, "Linux copies it");
            let (_client, server, _) = accept_from(&listener);
            st.nodelay(&server);
            assert!(server.nodelay().unwrap(), "inherited, not set");
        }
    }
}
