//! The xenbus device state machine shared by the four drivers (pv-protocols §1.5, §2.7).
//!
//! Each end of a split device publishes its state in `<dir>/state` as a decimal
//! [`XenbusState`]. The functions here are idempotent: [`switch_state`] writes only on a change
//! and never recreates a device directory the toolstack removed (as Linux's
//! `xenbus_switch_state` does, in one transaction); [`wait_for_peer_state`] waits through a
//! watch, re-reading the node on every event (an event is only a hint).
//!
//! # Legal backend transitions
//! The shortest legal path from the current state to a target, as Linux netback's
//! `set_backend_state` walks it (see [`backend_next_step`]):
//!
//! | from \ to      | InitWait | Connected | Closing | Closed |
//! |----------------|----------|-----------|---------|--------|
//! | Initialising   | InitWait | InitWait  | InitWait| Closed |
//! | InitWait       | —        | Connected | Closing | Closing|
//! | Connected      | Closing  | —         | Closing | Closing|
//! | Closing        | Closed   | Closed    | —       | Closed |
//! | Closed         | InitWait | InitWait  | Closing | —      |
//!
//! So: Initialising → InitWait → Connected; Connected → Closing → Closed; Closed → InitWait on
//! reconnect. Frontends may skip states (a frontend may go to Initialised without waiting for
//! InitWait; netfront goes straight to Connected), so peers must tolerate skipped states.

use crate::client::{Client, XsOps};
use crate::error::{Error, Result};
use std::time::{Duration, Instant};

/// `enum xenbus_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum XenbusState {
    /// 0: no state (the node is missing or the device is gone).
    Unknown = 0,
    /// 1: the toolstack created the device.
    Initialising = 1,
    /// 2: the backend is ready for the frontend's parameters.
    InitWait = 2,
    /// 3: the frontend published its rings and event channels.
    Initialised = 3,
    /// 4: connected.
    Connected = 4,
    /// 5: tearing down.
    Closing = 5,
    /// 6: closed.
    Closed = 6,
    /// 7: reconfiguring (pciback/scsiback only).
    Reconfiguring = 7,
    /// 8: reconfigured (pciback/scsiback only).
    Reconfigured = 8,
}

impl XenbusState {
    /// The state for a number 0..=8.
    pub fn from_u32(v: u32) -> Option<Self> {
        use XenbusState::*;
        Some(match v {
            0 => Unknown,
            1 => Initialising,
            2 => InitWait,
            3 => Initialised,
            4 => Connected,
            5 => Closing,
            6 => Closed,
            7 => Reconfiguring,
            8 => Reconfigured,
            _ => return None,
        })
    }

    /// Parses a xenstore value (`"4"`, tolerating surrounding whitespace and a trailing NUL).
    pub fn parse(value: &[u8]) -> Option<Self> {
        let s = std::str::from_utf8(value).ok()?;
        let s = s.trim_end_matches('\0').trim();
        Self::from_u32(s.parse().ok()?)
    }

    /// The xenstore value (`"4"`).
    pub fn as_value(self) -> String {
        (self as u32).to_string()
    }
}

/// The next state on the shortest legal backend path from `from` to `to` (see the module
/// table); `None` if already there or if no legal path exists.
pub fn backend_next_step(from: XenbusState, to: XenbusState) -> Option<XenbusState> {
    use XenbusState::*;
    if from == to {
        return None;
    }
    match (from, to) {
        (Unknown | Initialising, Closed) => Some(Closed),
        (Unknown | Initialising, InitWait | Connected | Closing) => Some(InitWait),
        (InitWait, Connected) => Some(Connected),
        (InitWait, Closing | Closed) => Some(Closing),
        (Connected, InitWait | Closing | Closed) => Some(Closing),
        (Closing, InitWait | Connected | Closed) => Some(Closed),
        (Closed, InitWait | Connected) => Some(InitWait),
        (Closed, Closing) => Some(Closing),
        _ => None,
    }
}

/// The whole shortest legal backend path from `from` to `to`, excluding `from`.
pub fn backend_path(from: XenbusState, to: XenbusState) -> Result<Vec<XenbusState>> {
    let mut path = Vec::new();
    let mut cur = from;
    while cur != to {
        match backend_next_step(cur, to) {
            Some(next) if path.len() < 8 => {
                path.push(next);
                cur = next;
            }
            _ => return Err(Error::IllegalTransition { from, to }),
        }
    }
    Ok(path)
}

/// What [`switch_state`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switch {
    /// The state was written.
    Changed,
    /// The state already had that value; nothing was written.
    Unchanged,
    /// The device directory (or its `state` node) is gone: nothing was written, so that a
    /// removed device is not recreated.
    Gone,
}

fn state_path(dir: &str) -> String {
    format!("{}/state", dir.trim_end_matches('/'))
}

/// Reads `<dir>/state`; a missing node is [`XenbusState::Unknown`] (as Linux's
/// `xenbus_read_driver_state`).
pub fn read_state(h: &impl XsOps, dir: &str) -> Result<XenbusState> {
    let path = state_path(dir);
    match h.read_opt(&path)? {
        None => Ok(XenbusState::Unknown),
        Some(v) => XenbusState::parse(&v).ok_or_else(|| Error::BadState {
            value: String::from_utf8_lossy(&v).into_owned(),
            path,
        }),
    }
}

/// Sets `<dir>/state` to `state` if it differs, in a transaction that first checks the node
/// exists (so a device directory removed by the toolstack is not recreated).
pub fn switch_state(client: &Client, dir: &str, state: XenbusState) -> Result<Switch> {
    let path = state_path(dir);
    let r = client.transaction(|tx| {
        let Some(cur) = tx.read_opt(&path)? else {
            return Ok(Switch::Gone);
        };
        if XenbusState::parse(&cur) == Some(state) {
            return Ok(Switch::Unchanged);
        }
        tx.write_str(&path, &state.as_value())?;
        Ok(Switch::Changed)
    })?;
    tracing::debug!(path, ?state, result = ?r, "xenbus switch_state");
    Ok(r)
}

/// Waits until `pred` holds for the state at `<dir>/state` (a missing node reads as
/// [`XenbusState::Unknown`]), at most `timeout`. Returns the state that satisfied `pred`.
pub fn wait_for_peer_state(
    client: &Client,
    dir: &str,
    mut pred: impl FnMut(XenbusState) -> bool,
    timeout: Duration,
) -> Result<XenbusState> {
    let path = state_path(dir);
    let watch = client.watch_with_capacity(&path, 4)?;
    let deadline = Instant::now() + timeout;
    loop {
        let s = read_state(client, dir)?;
        if pred(s) {
            return Ok(s);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::Timeout {
                what: format!("a wanted state at {path} (now {s:?})"),
                timeout,
            });
        }
        match watch.next_timeout(deadline - now) {
            Ok(_) => {}
            Err(Error::Timeout { .. }) => {
                // One last read: the change may have landed with a dropped event.
                let s = read_state(client, dir)?;
                if pred(s) {
                    return Ok(s);
                }
                return Err(Error::Timeout {
                    what: format!("a wanted state at {path} (now {s:?})"),
                    timeout,
                });
            }
            Err(e) => return Err(e),
        }
    }
}

/// Tells a loop that follows xenstore nodes when to read them again: when one of its watches
/// fired (an event is only a hint to re-read), when a watch dropped events (its channel was
/// full), when the connection broke (the read then reports it), and at least every `recheck`.
/// A loop that wakes often for other reasons (its own flags, a watchdog) then sends xenstored
/// nothing while nothing changes, as Linux's drivers, which only follow watches, do.
#[derive(Debug)]
pub struct Changes<'a> {
    watches: Vec<&'a crate::Watch>,
    recheck: Duration,
    dropped: u64,
    last: Option<Instant>,
    fired: bool,
}

impl<'a> Changes<'a> {
    /// Follows `watches` ([`wait`](Self::wait) sleeps on the first), re-reading at least every
    /// `recheck`. The first [`due`](Self::due) is true.
    pub fn new(watches: &[&'a crate::Watch], recheck: Duration) -> Self {
        Self {
            watches: watches.to_vec(),
            recheck,
            dropped: 0,
            last: None,
            fired: false,
        }
    }

    /// Whether the nodes should be read now; if so, from now on the reading counts as done.
    pub fn due(&mut self) -> bool {
        let dropped = self.watches.iter().map(|w| w.dropped()).sum();
        let due = self.fired
            || dropped != self.dropped
            || self.last.map_or(true, |t| t.elapsed() >= self.recheck);
        if due {
            self.fired = false;
            self.dropped = dropped;
            self.last = Some(Instant::now());
        }
        due
    }

    /// Waits at most `timeout` for an event on the first watch, then takes the events waiting
    /// on every watch. With the connection gone it sleeps `timeout`, and the next
    /// [`due`](Self::due) is true (the caller's read then reports the loss).
    pub fn wait(&mut self, timeout: Duration) {
        let Some(first) = self.watches.first() else {
            std::thread::sleep(timeout);
            return;
        };
        match first.next_timeout(timeout) {
            Ok(_) => self.fired = true,
            Err(Error::Timeout { .. }) => {}
            Err(_) => {
                // The connection is gone: the channel no longer blocks. Keep the loop's pace
                // (its read will report the loss) rather than let it spin.
                self.fired = true;
                std::thread::sleep(timeout);
            }
        }
        for w in &self.watches {
            while w.events().try_recv().is_ok() {
                self.fired = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::XenbusState::*;
    use super::*;

    #[test]
    fn parse_states() {
        assert_eq!(XenbusState::parse(b"4"), Some(Connected));
        assert_eq!(XenbusState::parse(b"6\0"), Some(Closed));
        assert_eq!(XenbusState::parse(b"9"), None);
        assert_eq!(XenbusState::parse(b"x"), None);
        assert_eq!(Connected.as_value(), "4");
    }

    #[test]
    fn shortest_paths() {
        assert_eq!(
            backend_path(Initialising, Connected).unwrap(),
            vec![InitWait, Connected]
        );
        assert_eq!(
            backend_path(Connected, Closed).unwrap(),
            vec![Closing, Closed]
        );
        assert_eq!(
            backend_path(Closed, Connected).unwrap(),
            vec![InitWait, Connected]
        );
        assert_eq!(
            backend_path(Connected, InitWait).unwrap(),
            vec![Closing, Closed, InitWait]
        );
        assert_eq!(backend_path(Closing, Closing).unwrap(), vec![]);
        assert!(backend_path(Connected, Initialised).is_err());
        assert!(backend_path(Connected, Reconfiguring).is_err());
    }
}
