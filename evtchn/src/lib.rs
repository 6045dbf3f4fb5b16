//! Xen event channels behind one small trait, with two providers.
//!
//! * [`EventChannel`] is the platform seam (DESIGN.md §3): bind an unbound port for a remote
//!   domain, bind to a remote domain's port, notify, unbind, read the ports that fired, and
//!   unmask a port **after** draining its ring (the lateeoi discipline of XSA-332/391).
//!   The channel is an fd ([`AsFd`]) that becomes readable when a port fired, for epoll loops.
//! * [`xen::XenEvtchn`] drives Linux's `/dev/xen/evtchn`.
//! * [`local::LocalEvtchn`] is the local platform's client: eventfds brokered by
//!   [`local::Broker`] over a per-domain Unix socket (`docs/local-platform.md`).
//! * [`spin_then_wait`] polls for pending ports for a bounded spin budget before blocking, since
//!   a cross-core wake-up costs tens of microseconds; [`spin_until`] polls shared memory (a
//!   ring index) instead, which lets a driver leave its peer's notifications unarmed while it
//!   polls; [`HybridPoll`] learns how long waits last and does not poll while
//!   [`cpu_contended`] says that threads are waiting for CPUs.
//!
//! Semantics shared by both providers (those of `/dev/xen/evtchn`):
//! * a port that fired is reported once by [`EventChannel::pending`] and stays masked until
//!   [`EventChannel::unmask`]; events sent meanwhile are coalesced and delivered after the unmask;
//! * spurious events are possible: a driver re-checks its ring, never trusts an event alone.
#![deny(missing_docs)]

mod error;
pub mod local;
mod pressure;
mod spin;
mod stop;
mod sys;
pub mod xen;

use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

pub use error::{Error, Result};
pub use pressure::cpu_contended;
pub use spin::{precise_sleep, spin_then_wait, spin_until, HybridPoll, SpinBudget, Woken};
pub use stop::StopSignal;

/// An event-channel port (`evtchn_port_t`): a small integer, per domain.
pub type Port = u32;
/// A domain id (`domid_t`).
pub type DomId = u16;

/// Xen's `DOMID_SELF`, accepted wherever a remote domain id is asked for on Xen.
pub const DOMID_SELF: DomId = 0x7ff0;

/// One set of event-channel bindings: the platform seam every driver uses.
///
/// All methods take `&self`, so that a queue thread can wait while another notifies; providers
/// are `Send + Sync`.
pub trait EventChannel: AsFd + AsRawFd + Send + Sync {
    /// Allocates a port that `remote` may bind to (`EVTCHNOP_alloc_unbound`); the frontend side.
    fn bind_unbound(&self, remote: DomId) -> Result<Port>;

    /// Binds a new local port to `remote_port` of `remote`, which must be unbound and reserved
    /// for this domain (`EVTCHNOP_bind_interdomain`); the backend side.
    fn bind_interdomain(&self, remote: DomId, remote_port: Port) -> Result<Port>;

    /// Sends an event to the other end of `port` (`EVTCHNOP_send`).
    fn notify(&self, port: Port) -> Result<()>;

    /// Closes `port` (`EVTCHNOP_close`); the peer's end returns to unbound.
    fn unbind(&self, port: Port) -> Result<()>;

    /// Appends the ports that fired to `out` without blocking; returns how many were added.
    /// Each reported port is masked until [`unmask`](Self::unmask).
    fn pending(&self, out: &mut Vec<Port>) -> Result<usize>;

    /// Like [`pending`](Self::pending), but blocks until at least one port fired or `timeout`
    /// passed (`None`: forever). Returns 0 on timeout.
    fn wait(&self, out: &mut Vec<Port>, timeout: Option<Duration>) -> Result<usize>;

    /// Like [`wait`](Self::wait), but also returns, with nothing added, as soon as `stop` is set
    /// (at once if it already is). Blocks in one `poll` on both fds, then reads what fired with
    /// [`pending`](Self::pending).
    fn wait_or_stop(
        &self,
        out: &mut Vec<Port>,
        timeout: Option<Duration>,
        stop: &StopSignal,
    ) -> Result<usize> {
        if stop.is_set() {
            return Ok(0);
        }
        let (fired, _) = sys::poll_either(self.as_fd(), stop.as_fd(), timeout_ms(timeout))
            .map_err(|e| Error::io("poll the event channel", e))?;
        if fired {
            self.pending(out)
        } else {
            Ok(0)
        }
    }

    /// Unmasks `port`. Call it only after the ring behind it has been drained and finally checked
    /// (lateeoi): an event sent while masked is then delivered.
    fn unmask(&self, port: Port) -> Result<()>;
}

/// Milliseconds for `poll`/`epoll_wait`: `None` is -1 (forever); rounds up and saturates.
pub(crate) fn timeout_ms(timeout: Option<Duration>) -> i32 {
    match timeout {
        None => -1,
        Some(d) => {
            let ms = d.as_nanos().div_ceil(1_000_000);
            i32::try_from(ms).unwrap_or(i32::MAX)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_round_up_and_saturate() {
        assert_eq!(timeout_ms(None), -1);
        assert_eq!(timeout_ms(Some(Duration::ZERO)), 0);
        assert_eq!(timeout_ms(Some(Duration::from_nanos(1))), 1);
        assert_eq!(timeout_ms(Some(Duration::from_millis(7))), 7);
        assert_eq!(timeout_ms(Some(Duration::from_secs(u64::MAX))), i32::MAX);
    }
}
