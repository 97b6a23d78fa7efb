//! `canopy-sys` is the project's single FFI shim.
//!
//! Every other Canopy crate is `#![forbid(unsafe_code)]`. The few operations
//! that cannot be written in safe Rust live here, so that the whole project has
//! exactly one place to audit for `unsafe`. Today that is one operation: taking
//! ownership of a file descriptor that a launcher left open for us (the fd
//! named by `PMI_FD`, passed by `mpiexec` or `canopy start`). Turning a bare
//! integer into an [`OwnedFd`] is `unsafe` because nothing in the type system
//! can prove the integer names an open descriptor that no one else owns; this
//! crate checks what can be checked and records what it has taken.
//!
//! [`set_tcp_maxrt`] sets libzmq's `ZMQ_TCP_MAXRT`, which the `zmq` crate
//! does not wrap: one `zmq_setsockopt` call with a pointer to an `int`.
//!
//! [`pmix`] is PMIx (`srun --mpi=pmix`): a small C shim over libpmix
//! (`csrc/pmix_shim.c`, built when libpmix's headers are installed) and
//! safe wrappers; without libpmix it builds and says how to get it.
//!
//! [`clear_cloexec`] is safe, but lives here too because it is the other half
//! of fd inheritance: the launcher uses it so that a child inherits its end of
//! a socketpair.
#![deny(unsafe_op_in_unsafe_fn)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};

const HOW_TO_START: &str = "start the broker from `canopy start` or a PMI launcher such as mpiexec";

/// Takes ownership of a descriptor inherited from the parent process.
///
/// `raw` must be at least 3 (0, 1 and 2 are stdio, never a launcher's
/// socket) and must be open. On success the descriptor gets `FD_CLOEXEC`, so
/// it is not leaked to processes we start in turn.
///
/// Contract (checked only in part): `raw` was inherited from the parent and
/// nothing else in this process owns it. Call this once per descriptor, early,
/// before the process opens files of its own; it cannot tell an inherited
/// descriptor from one that another part of this process already owns.
/// `canopy_pmi::PmiClient::from_env` enforces "once" for `PMI_FD`.
pub fn take_inherited_fd(raw: i32) -> io::Result<OwnedFd> {
    if raw < 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "file descriptor {raw} is standard input, output or error (or negative), \
                 not an inherited socket; {HOW_TO_START}"
            ),
        ));
    }
    let flags = fcntl(raw, FcntlArg::F_GETFD).map_err(|errno| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "file descriptor {raw} is not an open file descriptor ({errno}); {HOW_TO_START}"
            ),
        )
    })?;

    // SAFETY: `raw` is open (F_GETFD succeeded just above) and is not stdio.
    // The documented contract is that it was inherited from the parent and is
    // taken once, so no other owner exists in this process; from here on the
    // returned `OwnedFd` is its only owner and closes it exactly once.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };

    let mut flags = FdFlag::from_bits_truncate(flags);
    flags.insert(FdFlag::FD_CLOEXEC);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(flags)).map_err(|errno| {
        io::Error::other(
            format!("cannot set close-on-exec on file descriptor {raw} ({errno}); check the process's resource limits"),
        )
    })?;
    Ok(fd)
}

/// Clears `FD_CLOEXEC` on `fd`, so that a child started with `exec` inherits it.
///
/// The launcher calls this on the child's end of a socketpair just before
/// spawning the child (the Rust standard library creates every descriptor with
/// close-on-exec set).
pub fn clear_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    let flags = fcntl(raw, FcntlArg::F_GETFD).map_err(io::Error::from)?;
    let mut flags = FdFlag::from_bits_truncate(flags);
    flags.remove(FdFlag::FD_CLOEXEC);
    fcntl(raw, FcntlArg::F_SETFD(flags)).map_err(io::Error::from)?;
    Ok(())
}

/// Whether `fd` has `FD_CLOEXEC` set. Useful for checks and tests.
pub fn is_cloexec(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFD).map_err(io::Error::from)?;
    Ok(FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::{AsFd, IntoRawFd};
    use std::os::unix::net::UnixStream;

    #[test]
    fn takes_back_a_leaked_socket_end_and_sets_cloexec() {
        let (mine, theirs) = UnixStream::pair().unwrap();
        clear_cloexec(theirs.as_fd()).unwrap();
        assert!(!is_cloexec(theirs.as_fd()).unwrap());
        let raw = theirs.into_raw_fd();

        let owned = take_inherited_fd(raw).unwrap();
        assert!(
            is_cloexec(owned.as_fd()).unwrap(),
            "taken fd must be close-on-exec"
        );
        let mut theirs = UnixStream::from(owned);
        theirs.write_all(b"ping\n").unwrap();
        let mut buf = [0u8; 5];
        let mut mine = mine;
        mine.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping\n");
        mine.write_all(b"pong").unwrap();
        let mut buf = [0u8; 4];
        theirs.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong");
    }

    #[test]
    fn closed_fd_is_an_error_that_says_what_to_do() {
        // Far above any fd limit, so never open (a freshly closed number could
        // be reused by a test running in parallel).
        let raw = 999_999;
        let err = take_inherited_fd(raw).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let msg = err.to_string();
        assert!(
            msg.contains(&format!(
                "file descriptor {raw} is not an open file descriptor"
            )),
            "{msg}"
        );
        assert!(msg.contains("canopy start"), "{msg}");
    }

    #[test]
    fn stdio_and_negative_fds_are_refused() {
        for raw in [-1, 0, 1, 2] {
            let err = take_inherited_fd(raw).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "fd {raw}");
            assert!(err.to_string().contains("mpiexec"), "{err}");
        }
    }

    #[test]
    fn clear_cloexec_round_trip() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(
            is_cloexec(a.as_fd()).unwrap(),
            "std creates fds close-on-exec"
        );
        clear_cloexec(a.as_fd()).unwrap();
        assert!(!is_cloexec(a.as_fd()).unwrap());
    }
}

/// Sets `ZMQ_TCP_MAXRT` on `sock`: how long (milliseconds) TCP may
/// retransmit unacknowledged data before the connection is dropped (0: the
/// kernel default, about 15 minutes). Must be set before connect or bind.
pub fn set_tcp_maxrt(sock: &mut zmq::Socket, ms: i32) -> Result<(), zmq::Error> {
    let ptr = sock.as_mut_ptr();
    let value: std::os::raw::c_int = ms;
    // SAFETY: `ptr` is a live socket owned by `sock`, borrowed mutably for the
    // call; the option value is a plain C int on our stack whose exact size
    // is passed, and libzmq copies it before returning.
    let rc = unsafe {
        zmq_sys::zmq_setsockopt(
            ptr,
            zmq_sys::ZMQ_TCP_MAXRT as std::os::raw::c_int,
            (&value as *const std::os::raw::c_int).cast(),
            std::mem::size_of::<std::os::raw::c_int>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        // SAFETY: zmq_errno only reads libzmq's thread-local errno.
        Err(zmq::Error::from_raw(unsafe { zmq_sys::zmq_errno() }))
    }
}

/// Reads `ZMQ_TCP_MAXRT` back from `sock` (milliseconds).
pub fn tcp_maxrt(sock: &mut zmq::Socket) -> Result<i32, zmq::Error> {
    let ptr = sock.as_mut_ptr();
    let mut value: std::os::raw::c_int = -1;
    let mut len = std::mem::size_of::<std::os::raw::c_int>();
    // SAFETY: as in `set_tcp_maxrt`; libzmq writes at most `len` bytes into
    // our int and stores the size it wrote into `len`.
    let rc = unsafe {
        zmq_sys::zmq_getsockopt(
            ptr,
            zmq_sys::ZMQ_TCP_MAXRT as std::os::raw::c_int,
            (&mut value as *mut std::os::raw::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 && len == std::mem::size_of::<std::os::raw::c_int>() {
        Ok(value)
    } else {
        // SAFETY: zmq_errno only reads libzmq's thread-local errno.
        Err(zmq::Error::from_raw(unsafe { zmq_sys::zmq_errno() }))
    }
}

/// Stops `sock`'s monitor (`zmq_socket_monitor` with no endpoint): libzmq
/// closes its end of the monitor pair at once, so no later event is sent.
///
/// Call it before dropping the PAIR socket that receives the events.
/// libzmq sends monitor events with a blocking send from its I/O thread:
/// an event raised after the receiving end has gone (a connection closing
/// as its socket is torn down, say) blocks that thread for good, and every
/// socket of the context stops connecting, sending and receiving.
pub fn stop_monitor(sock: &mut zmq::Socket) -> Result<(), zmq::Error> {
    let ptr = sock.as_mut_ptr();
    // SAFETY: `ptr` is a live socket owned by `sock`, borrowed mutably for
    // the call; a null endpoint is libzmq's documented way to stop a
    // monitor, and libzmq keeps no pointer we pass.
    let rc = unsafe { zmq_sys::zmq_socket_monitor(ptr, std::ptr::null(), 0) };
    if rc == 0 {
        Ok(())
    } else {
        // SAFETY: zmq_errno only reads libzmq's thread-local errno.
        Err(zmq::Error::from_raw(unsafe { zmq_sys::zmq_errno() }))
    }
}

#[cfg(test)]
mod zmq_tests {
    #[test]
    fn tcp_maxrt_is_set_and_read_back_by_libzmq() {
        let ctx = zmq::Context::new();
        let mut s = ctx.socket(zmq::DEALER).unwrap();
        assert_eq!(super::tcp_maxrt(&mut s), Ok(0), "libzmq's default");
        super::set_tcp_maxrt(&mut s, 4_500).unwrap();
        assert_eq!(super::tcp_maxrt(&mut s), Ok(4_500));
        // libzmq rejects a negative value: the error comes back, no panic.
        assert_eq!(super::set_tcp_maxrt(&mut s, -1), Err(zmq::Error::EINVAL));
    }

    /// A ROUTER listening on a free loopback port, and its endpoint.
    fn listening(ctx: &zmq::Context) -> (zmq::Socket, String) {
        let router = ctx.socket(zmq::ROUTER).unwrap();
        router.set_linger(0).unwrap();
        router.bind("tcp://127.0.0.1:*").unwrap();
        let ep = router.get_last_endpoint().unwrap().unwrap();
        (router, ep)
    }

    /// A router and a dealer on `ctx` that exchange one message within
    /// `wait`: whether libzmq's I/O thread still works.
    fn context_works(ctx: &zmq::Context, wait: i32) -> bool {
        let (router, ep) = listening(ctx);
        let dealer = ctx.socket(zmq::DEALER).unwrap();
        dealer.set_linger(0).unwrap();
        dealer.connect(&ep).unwrap();
        dealer.send("ping", zmq::DONTWAIT).unwrap();
        router.set_rcvtimeo(wait).unwrap();
        router.recv_multipart(0).is_ok()
    }

    #[test]
    fn a_stopped_monitor_sends_nothing_once_its_receiver_is_gone() {
        let ctx = zmq::Context::new();
        assert!(context_works(&ctx, 5_000));
        // A dealer connected to a router, its disconnections monitored.
        let (router, ep) = listening(&ctx);
        let mut dealer = ctx.socket(zmq::DEALER).unwrap();
        dealer.set_linger(0).unwrap();
        dealer
            .monitor(
                "inproc://stop-monitor-test",
                zmq::SocketEvent::DISCONNECTED as i32,
            )
            .unwrap();
        let monitor = ctx.socket(zmq::PAIR).unwrap();
        monitor.connect("inproc://stop-monitor-test").unwrap();
        dealer.connect(&ep).unwrap();
        dealer.send("hello", zmq::DONTWAIT).unwrap();
        router.set_rcvtimeo(5_000).unwrap();
        router.recv_multipart(0).expect("the dealer connected");
        // Stop the monitor, drop its receiver, then make the connection
        // close: the disconnection must not be sent to the gone receiver.
        super::stop_monitor(&mut dealer).unwrap();
        drop(monitor);
        std::thread::sleep(std::time::Duration::from_millis(100));
        drop(router);
        std::thread::sleep(std::time::Duration::from_millis(300));
        let works = context_works(&ctx, 5_000);
        if !works {
            // Its I/O thread is blocked: dropping the context would hang.
            std::mem::forget(dealer);
            std::mem::forget(ctx);
            panic!("libzmq's I/O thread blocked on a monitor event");
        }
    }
}

pub mod pmix;
