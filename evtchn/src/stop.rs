//! A stop signal that a thread can sleep on together with its event channel.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::{sys, Error, Result};

/// A one-way flag that ends waits: once [`set`](Self::set) it stays set, and its fd stays
/// readable. A thread that blocks in [`EventChannel::wait_or_stop`](crate::EventChannel::wait_or_stop)
/// wakes as soon as it is set, so an idle driver thread needs no timeout to notice that it must
/// stop (and costs no wake-ups while idle). Share it with an `Arc`.
#[derive(Debug)]
pub struct StopSignal {
    set: AtomicBool,
    fd: OwnedFd,
}

impl StopSignal {
    /// A signal not set yet (it holds an eventfd).
    pub fn new() -> Result<Self> {
        Ok(Self {
            set: AtomicBool::new(false),
            fd: sys::eventfd().map_err(|e| Error::io("eventfd for a stop signal", e))?,
        })
    }

    /// Sets it: every wait on it ends, now and later.
    pub fn set(&self) {
        self.set.store(true, Ordering::SeqCst);
        // The flag is set first, so a waiter that polls after this sees the fd readable and one
        // that checks before polling sees the flag. The counter is never drained. An eventfd
        // write fails only on a full counter, which is then readable anyway.
        let _ = sys::eventfd_signal(self.fd.as_fd());
    }

    /// Whether it was set.
    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::SeqCst)
    }
}

impl AsFd for StopSignal {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
