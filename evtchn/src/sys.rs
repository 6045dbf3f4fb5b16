//! Thin, safe wrappers over the few Linux calls this crate needs: eventfd, epoll, poll and
//! `sendmsg`/`recvmsg` with `SCM_RIGHTS`.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Most fds one message carries.
pub(crate) const MAX_FDS: usize = 4;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_size(r: libc::ssize_t) -> io::Result<usize> {
    // A negative value is the only way `try_from` fails.
    usize::try_from(r).map_err(|_| io::Error::last_os_error())
}

/// A new non-blocking, close-on-exec eventfd with counter 0.
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; the result is checked before use.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds 1 to an eventfd's counter. A saturated counter (EAGAIN) already means "pending".
pub(crate) fn eventfd_signal(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one: u64 = 1;
    loop {
        // SAFETY: writes 8 bytes from a live u64 to an fd we borrow.
        let r = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        match cvt_size(r) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// Reads and resets an eventfd's counter; `false` if it was 0.
pub(crate) fn eventfd_drain(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut v: u64 = 0;
    loop {
        // SAFETY: reads at most 8 bytes into a live u64 from an fd we borrow.
        let r = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        match cvt_size(r) {
            Ok(_) => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

/// Waits until `fd` is readable or `timeout_ms` passed (-1: forever). `false` on timeout.
pub(crate) fn poll_readable(fd: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd, count 1.
    let n = cvt(unsafe { libc::poll(&mut p, 1, timeout_ms) })?;
    Ok(n > 0)
}

/// Waits until `a` or `b` is readable (or reports an error or a hang-up) or `timeout_ms` passed
/// (-1: forever); returns whether each is. A wait a signal interrupts returns as a timeout.
pub(crate) fn poll_either(
    a: BorrowedFd<'_>,
    b: BorrowedFd<'_>,
    timeout_ms: i32,
) -> io::Result<(bool, bool)> {
    let fd = |f: BorrowedFd<'_>| libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let mut p = [fd(a), fd(b)];
    // SAFETY: two live pollfds, count 2.
    match cvt(unsafe { libc::poll(p.as_mut_ptr(), 2, timeout_ms) }) {
        Ok(_) => Ok((p[0].revents != 0, p[1].revents != 0)),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok((false, false)),
        Err(e) => Err(e),
    }
}

/// Makes this thread's timed sleeps end within about `ns` of when they are due (the default
/// slack is 50 µs), for sleeps shorter than a wake-up is long. Best effort.
pub(crate) fn set_timer_slack(ns: u64) {
    // SAFETY: PR_SET_TIMERSLACK takes an integer argument and touches no memory of ours.
    let _ = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, ns as libc::c_ulong, 0, 0, 0) };
}

/// How many CPUs this machine has online (`sysconf(_SC_NPROCESSORS_ONLN)`), whatever this
/// thread's affinity; `None` if unknown.
pub(crate) fn online_cpus() -> Option<u64> {
    // SAFETY: sysconf takes an integer and touches no memory of ours.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    u64::try_from(n).ok().filter(|&n| n > 0)
}

/// An epoll instance.
#[derive(Debug)]
pub(crate) struct Epoll(OwnedFd);

impl Epoll {
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: no pointers; result checked.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `fd` was just returned by epoll_create1 and is owned by nobody else.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: data };
        // SAFETY: `ev` is a live epoll_event; the kernel validates both fds.
        cvt(unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut ev) })?;
        Ok(())
    }

    /// Watches `fd` for input once: after it fires it is disabled until [`Self::rearm`].
    pub(crate) fn add_oneshot(&self, fd: BorrowedFd<'_>, data: u64) -> io::Result<()> {
        let ev = (libc::EPOLLIN | libc::EPOLLONESHOT) as u32;
        self.ctl(libc::EPOLL_CTL_ADD, fd.as_raw_fd(), ev, data)
    }

    /// Re-enables a one-shot `fd`; fires at once if it is readable.
    pub(crate) fn rearm(&self, fd: BorrowedFd<'_>, data: u64) -> io::Result<()> {
        let ev = (libc::EPOLLIN | libc::EPOLLONESHOT) as u32;
        self.ctl(libc::EPOLL_CTL_MOD, fd.as_raw_fd(), ev, data)
    }

    pub(crate) fn delete(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd.as_raw_fd(), 0, 0)
    }

    /// Waits for events; returns the `data` of each fired fd through `f`.
    pub(crate) fn wait(&self, timeout_ms: i32, mut f: impl FnMut(u64)) -> io::Result<usize> {
        const N: usize = 64;
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; N];
        let n = loop {
            // SAFETY: `evs` holds N live epoll_events the kernel may fill.
            let r = unsafe {
                libc::epoll_wait(self.0.as_raw_fd(), evs.as_mut_ptr(), N as i32, timeout_ms)
            };
            match cvt(r) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        let n = usize::try_from(n).unwrap_or(0).min(N);
        for ev in &evs[..n] {
            let data = ev.u64;
            f(data);
        }
        Ok(n)
    }
}

impl std::os::fd::AsFd for Epoll {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// Sends all of `bytes` on a stream socket, the `fds` riding with the first byte.
pub(crate) fn send_with_fds(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many fds"));
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let payload = raw.len() * size_of::<RawFd>();
    // Enough for CMSG_SPACE(MAX_FDS * 4), aligned for cmsghdr.
    let mut cbuf = [0u64; 8];
    let mut sent = 0;
    while sent < bytes.len() {
        let rest = &bytes[sent..];
        let mut iov = libc::iovec {
            iov_base: rest.as_ptr() as *mut libc::c_void,
            iov_len: rest.len(),
        };
        // SAFETY: an all-zero msghdr is a valid empty message.
        let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if sent == 0 && !raw.is_empty() {
            // SAFETY: CMSG_SPACE/CMSG_LEN only compute sizes.
            let (space, len) = unsafe {
                (
                    libc::CMSG_SPACE(payload as u32),
                    libc::CMSG_LEN(payload as u32),
                )
            };
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            // SAFETY: msg_control points at `cbuf` (64 bytes ≥ CMSG_SPACE(16)), so the first
            // header and its data lie inside it; we write exactly `payload` bytes of fds.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = len as _;
                std::ptr::copy_nonoverlapping(
                    raw.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(c),
                    payload,
                );
            }
        }
        // SAFETY: `msg` points at live iovec/control buffers for the duration of the call.
        let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        match cvt_size(r) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Receives exactly `buf.len()` bytes from a stream socket, collecting any fds that came with
/// them (at most [`MAX_FDS`]; more, or a truncated control message, is an error). EOF before the
/// first byte is `UnexpectedEof`.
pub(crate) fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Vec<OwnedFd>> {
    let mut fds = Vec::new();
    let mut got = 0;
    while got < buf.len() {
        let rest = &mut buf[got..];
        let mut iov = libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        };
        let mut cbuf = [0u64; 8];
        // SAFETY: an all-zero msghdr is a valid empty message.
        let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
        // SAFETY: `msg` points at live buffers of the sizes given.
        let r = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        let n = match cvt_size(r) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        // Take ownership of every fd received first, so that none leaks on an error below.
        // SAFETY: CMSG_FIRSTHDR/NXTHDR walk the control buffer the kernel filled, bounded by
        // msg_controllen; each SCM_RIGHTS payload holds (cmsg_len - CMSG_LEN(0)) / 4 fds that
        // are now ours.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data_len =
                        ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                    let count = data_len / size_of::<RawFd>();
                    let p = libc::CMSG_DATA(c).cast::<RawFd>();
                    for i in 0..count {
                        let fd = std::ptr::read_unaligned(p.add(i));
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() > MAX_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "too many fds in a message",
            ));
        }
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    Ok(fds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn eventfd_counts_and_drains() {
        let e = eventfd().unwrap();
        assert!(!eventfd_drain(e.as_fd()).unwrap());
        eventfd_signal(e.as_fd()).unwrap();
        eventfd_signal(e.as_fd()).unwrap();
        assert!(eventfd_drain(e.as_fd()).unwrap());
        assert!(!eventfd_drain(e.as_fd()).unwrap());
    }

    #[test]
    fn poll_either_says_which_fd_is_readable() {
        let (a, b) = (eventfd().unwrap(), eventfd().unwrap());
        assert_eq!(
            poll_either(a.as_fd(), b.as_fd(), 0).unwrap(),
            (false, false)
        );
        eventfd_signal(b.as_fd()).unwrap();
        assert_eq!(
            poll_either(a.as_fd(), b.as_fd(), -1).unwrap(),
            (false, true)
        );
        eventfd_signal(a.as_fd()).unwrap();
        assert_eq!(poll_either(a.as_fd(), b.as_fd(), -1).unwrap(), (true, true));
    }

    #[test]
    fn fds_cross_a_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let e1 = eventfd().unwrap();
        let e2 = eventfd().unwrap();
        send_with_fds(a.as_fd(), b"hello", &[e1.as_fd(), e2.as_fd()]).unwrap();
        let mut buf = [0u8; 5];
        let fds = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(fds.len(), 2);
        eventfd_signal(fds[0].as_fd()).unwrap();
        assert!(eventfd_drain(e1.as_fd()).unwrap());
        assert!(!eventfd_drain(e2.as_fd()).unwrap());
        drop(a);
        assert_eq!(
            recv_with_fds(b.as_fd(), &mut buf).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn oneshot_epoll_holds_until_rearmed() {
        let ep = Epoll::new().unwrap();
        let e = eventfd().unwrap();
        ep.add_oneshot(e.as_fd(), 7).unwrap();
        eventfd_signal(e.as_fd()).unwrap();
        let mut seen = Vec::new();
        ep.wait(0, |d| seen.push(d)).unwrap();
        assert_eq!(seen, [7]);
        assert_eq!(ep.wait(0, |_| ()).unwrap(), 0, "still readable but masked");
        ep.rearm(e.as_fd(), 7).unwrap();
        assert_eq!(ep.wait(0, |_| ()).unwrap(), 1);
    }
}
