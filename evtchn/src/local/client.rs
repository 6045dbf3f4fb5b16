//! The client of `evtchn.sock`: what drivers use on the local platform.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use super::wire::{self, BrokerError};
use crate::sys::{eventfd_drain, eventfd_signal, recv_with_fds, Epoll};
use crate::{timeout_ms, DomId, Error, EventChannel, Port, Result};

#[derive(Debug)]
struct Bound {
    own: OwnedFd,
    peer: OwnedFd,
}

/// One set of event-channel bindings on the local platform.
///
/// The pollable fd is an epoll fd over the bound ports' eventfds with `EPOLLONESHOT`: a port
/// that fired stays masked until [`EventChannel::unmask`]. `notify` is one `write(2)` to the
/// other end's eventfd. Ports are closed by the broker when this value (its connection) is
/// dropped, or when the process dies.
#[derive(Debug)]
pub struct LocalEvtchn {
    sock: Mutex<UnixStream>,
    epoll: Epoll,
    ports: RwLock<HashMap<Port, Bound>>,
}

impl LocalEvtchn {
    /// Connects to the broker socket of one domain (`ROOT/dom<D>/evtchn.sock`).
    pub fn connect(socket_path: impl AsRef<Path>) -> Result<Self> {
        let path = socket_path.as_ref();
        let s = UnixStream::connect(path).map_err(|source| Error::Connect {
            path: path.into(),
            source,
        })?;
        Self::from_stream(s)
    }

    /// Uses an already connected stream to the broker.
    pub fn from_stream(stream: UnixStream) -> Result<Self> {
        Ok(LocalEvtchn {
            sock: Mutex::new(stream),
            epoll: Epoll::new().map_err(|e| Error::io("epoll_create1", e))?,
            ports: RwLock::new(HashMap::new()),
        })
    }

    fn read_ports(&self) -> RwLockReadGuard<'_, HashMap<Port, Bound>> {
        self.ports.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_ports(&self) -> RwLockWriteGuard<'_, HashMap<Port, Bound>> {
        self.ports.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// One request/reply exchange; returns the value and the fds that came with it.
    fn call(&self, name: &'static str, op: u32, a: u32, b: u32) -> Result<(u32, Vec<OwnedFd>)> {
        let mut s = self.sock.lock().unwrap_or_else(PoisonError::into_inner);
        s.write_all(&wire::request(op, a, b))
            .map_err(|e| Error::Protocol(format!("{name}: cannot send to the broker: {e}")))?;
        let mut buf = [0u8; wire::REPLY_FRAME];
        let fds = recv_with_fds(s.as_fd(), &mut buf)
            .map_err(|e| Error::Protocol(format!("{name}: no reply from the broker: {e}")))?;
        if wire::word(&buf, 0) != wire::REPLY_BODY {
            return Err(Error::Protocol(format!(
                "{name}: reply frame of {} bytes",
                wire::word(&buf, 0)
            )));
        }
        match wire::word(&buf, 1) {
            0 => Ok((wire::word(&buf, 2), fds)),
            code => Err(Error::Broker {
                op: name,
                error: BrokerError::from_code(code),
            }),
        }
    }

    fn bind(&self, name: &'static str, op: u32, a: u32, b: u32) -> Result<Port> {
        let (port, fds) = self.call(name, op, a, b)?;
        let mut fds = fds.into_iter();
        let (Some(own), Some(peer), None) = (fds.next(), fds.next(), fds.next()) else {
            return Err(Error::Protocol(format!(
                "{name}: reply without exactly two fds"
            )));
        };
        let mut ports = self.write_ports();
        if ports.contains_key(&port) {
            return Err(Error::Protocol(format!(
                "{name}: port {port} given out twice"
            )));
        }
        self.epoll
            .add_oneshot(own.as_fd(), port.into())
            .map_err(|e| Error::io("epoll_ctl(ADD)", e))?;
        ports.insert(port, Bound { own, peer });
        Ok(port)
    }
}

impl EventChannel for LocalEvtchn {
    fn bind_unbound(&self, remote: DomId) -> Result<Port> {
        self.bind("alloc_unbound", wire::OP_ALLOC_UNBOUND, remote.into(), 0)
    }

    fn bind_interdomain(&self, remote: DomId, remote_port: Port) -> Result<Port> {
        self.bind(
            "bind_interdomain",
            wire::OP_BIND_INTERDOMAIN,
            remote.into(),
            remote_port,
        )
    }

    fn notify(&self, port: Port) -> Result<()> {
        let ports = self.read_ports();
        let b = ports.get(&port).ok_or(Error::NotBound { port })?;
        eventfd_signal(b.peer.as_fd()).map_err(|e| Error::io("notify (eventfd write)", e))
    }

    fn unbind(&self, port: Port) -> Result<()> {
        let b = self
            .write_ports()
            .remove(&port)
            .ok_or(Error::NotBound { port })?;
        // Removing it from the epoll set cannot fail for a registered fd; ignore to keep going.
        let _ = self.epoll.delete(b.own.as_fd());
        drop(b);
        self.call("unbind", wire::OP_UNBIND, port, 0).map(drop)
    }

    fn pending(&self, out: &mut Vec<Port>) -> Result<usize> {
        self.wait(out, Some(Duration::ZERO))
    }

    fn wait(&self, out: &mut Vec<Port>, timeout: Option<Duration>) -> Result<usize> {
        let mut fired = [0 as Port; 64];
        let mut n = 0usize;
        self.epoll
            .wait(timeout_ms(timeout), |data| {
                if let (Ok(p), Some(slot)) = (Port::try_from(data), fired.get_mut(n)) {
                    *slot = p;
                    n += 1;
                }
            })
            .map_err(|e| Error::io("epoll_wait", e))?;
        if n == 0 {
            return Ok(0);
        }
        let ports = self.read_ports();
        let mut added = 0;
        for &p in &fired[..n] {
            if let Some(b) = ports.get(&p) {
                // Reset the counter: every event up to now is this one delivery.
                eventfd_drain(b.own.as_fd()).map_err(|e| Error::io("eventfd read", e))?;
                out.push(p);
                added += 1;
            }
        }
        Ok(added)
    }

    fn unmask(&self, port: Port) -> Result<()> {
        let ports = self.read_ports();
        let b = ports.get(&port).ok_or(Error::NotBound { port })?;
        self.epoll
            .rearm(b.own.as_fd(), port.into())
            .map_err(|e| Error::io("epoll_ctl(MOD) to unmask", e))
    }
}

impl AsFd for LocalEvtchn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }
}

impl AsRawFd for LocalEvtchn {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_fd().as_raw_fd()
    }
}
