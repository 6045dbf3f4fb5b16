//! The broker: the hypervisor's event-channel tables, for the local platform.
//!
//! One [`Broker`] serves every domain; `xenpv local` calls [`Broker::create_domain`] /
//! [`Broker::destroy_domain`] and runs [`Broker::serve`] on each connection accepted on
//! `ROOT/dom<D>/evtchn.sock` (the socket is the identity: every request is from domain `D`).
//!
//! Each port owns two eventfds for its whole life: `own` (its holder reads it) and `peer` (its
//! holder writes it to notify). When another port binds to it, the new port gets the same two
//! fds swapped. So each side learns the other's eventfd at bind time, once, with no later
//! message: the other end may come and go (a restarted backend) and the fds stay valid.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::wire::{self, BrokerError};
use crate::sys::{eventfd, send_with_fds};
use crate::{DomId, Port, DOMID_SELF};

/// Default limit of ports per domain (Xen's 2-level ABI has 4096 on 64-bit; each port costs
/// the broker two fds).
pub const DEFAULT_MAX_PORTS: u32 = 1024;

type ConnId = u64;

/// The state of a port, as [`Broker::port_status`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortStatus {
    /// Unbound, reserved for `remote` to bind.
    Unbound {
        /// The domain that may bind it.
        remote: DomId,
    },
    /// Connected to `remote_port` of `remote`.
    Interdomain {
        /// The other domain.
        remote: DomId,
        /// Its port.
        remote_port: Port,
    },
}

#[derive(Debug)]
struct PortEntry {
    owner: ConnId,
    own: Arc<OwnedFd>,
    peer: Arc<OwnedFd>,
    status: PortStatus,
}

#[derive(Debug, Default)]
struct Domain {
    ports: BTreeMap<Port, PortEntry>,
}

#[derive(Debug, Default)]
struct State {
    domains: HashMap<DomId, Domain>,
}

/// The event-channel broker: per-domain port tables behind one lock.
#[derive(Debug)]
pub struct Broker {
    state: Mutex<State>,
    max_ports: u32,
    next_conn: AtomicU64,
}

impl Default for Broker {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_PORTS)
    }
}

/// Fds to send with a successful bind: (own, peer).
type Fds = (Arc<OwnedFd>, Arc<OwnedFd>);

impl Broker {
    /// A broker with no domains, allowing `max_ports` ports per domain (ports `1..=max_ports`;
    /// port 0 is never used, as on Xen).
    pub fn new(max_ports: u32) -> Self {
        Broker {
            state: Mutex::new(State::default()),
            max_ports,
            next_conn: AtomicU64::new(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers domain `domid` with an empty port table.
    pub fn create_domain(&self, domid: DomId) -> Result<(), BrokerError> {
        check_domid(domid)?;
        let mut st = self.lock();
        if st.domains.contains_key(&domid) {
            return Err(BrokerError::DomainExists);
        }
        st.domains.insert(domid, Domain::default());
        Ok(())
    }

    /// Removes domain `domid`: closes all its ports; their peers return to unbound, reserved
    /// for `domid` (as Xen leaves them). Its connections get [`BrokerError::NoSuchDomain`].
    pub fn destroy_domain(&self, domid: DomId) -> Result<(), BrokerError> {
        let mut st = self.lock();
        let dom = st.domains.remove(&domid).ok_or(BrokerError::NoSuchDomain)?;
        for (port, e) in dom.ports {
            release_peer(&mut st, domid, port, e.status);
        }
        Ok(())
    }

    /// Whether domain `domid` exists.
    pub fn has_domain(&self, domid: DomId) -> bool {
        self.lock().domains.contains_key(&domid)
    }

    /// The state of `port` of `domid`, if it exists.
    pub fn port_status(&self, domid: DomId, port: Port) -> Option<PortStatus> {
        let st = self.lock();
        st.domains.get(&domid)?.ports.get(&port).map(|e| e.status)
    }

    fn alloc_port(&self, dom: &Domain) -> Result<Port, BrokerError> {
        // Lowest free port ≥ 1; the table holds at most max_ports entries, so this scans at
        // most max_ports + 1 numbers.
        let mut want: Port = 1;
        for &p in dom.ports.keys() {
            if p != want {
                break;
            }
            want = want.checked_add(1).ok_or(BrokerError::TooManyPorts)?;
        }
        if want > self.max_ports {
            return Err(BrokerError::TooManyPorts);
        }
        Ok(want)
    }

    fn alloc_unbound(
        &self,
        domid: DomId,
        conn: ConnId,
        remote: DomId,
    ) -> Result<(Port, Fds), BrokerError> {
        let remote = if remote == DOMID_SELF { domid } else { remote };
        check_domid(remote)?;
        let mut st = self.lock();
        let dom = st
            .domains
            .get_mut(&domid)
            .ok_or(BrokerError::NoSuchDomain)?;
        let port = self.alloc_port(dom)?;
        let own = Arc::new(eventfd().map_err(|_| BrokerError::Resources)?);
        let peer = Arc::new(eventfd().map_err(|_| BrokerError::Resources)?);
        dom.ports.insert(
            port,
            PortEntry {
                owner: conn,
                own: own.clone(),
                peer: peer.clone(),
                status: PortStatus::Unbound { remote },
            },
        );
        Ok((port, (own, peer)))
    }

    fn bind_interdomain(
        &self,
        domid: DomId,
        conn: ConnId,
        remote: DomId,
        remote_port: Port,
    ) -> Result<(Port, Fds), BrokerError> {
        let remote = if remote == DOMID_SELF { domid } else { remote };
        check_domid(remote)?;
        let mut st = self.lock();
        if !st.domains.contains_key(&domid) {
            return Err(BrokerError::NoSuchDomain);
        }
        let rdom = st.domains.get(&remote).ok_or(BrokerError::NoSuchDomain)?;
        let rentry = rdom
            .ports
            .get(&remote_port)
            .ok_or(BrokerError::NoSuchPort)?;
        if rentry.status != (PortStatus::Unbound { remote: domid }) {
            return Err(BrokerError::NotReserved);
        }
        let (own, peer) = (rentry.peer.clone(), rentry.own.clone());
        let dom = st
            .domains
            .get_mut(&domid)
            .ok_or(BrokerError::NoSuchDomain)?;
        let port = self.alloc_port(dom)?;
        dom.ports.insert(
            port,
            PortEntry {
                owner: conn,
                own: own.clone(),
                peer: peer.clone(),
                status: PortStatus::Interdomain {
                    remote,
                    remote_port,
                },
            },
        );
        let rentry = st
            .domains
            .get_mut(&remote)
            .and_then(|d| d.ports.get_mut(&remote_port))
            .ok_or(BrokerError::NoSuchPort)?;
        rentry.status = PortStatus::Interdomain {
            remote: domid,
            remote_port: port,
        };
        Ok((port, (own, peer)))
    }

    fn unbind(&self, domid: DomId, conn: ConnId, port: Port) -> Result<(), BrokerError> {
        let mut st = self.lock();
        let dom = st
            .domains
            .get_mut(&domid)
            .ok_or(BrokerError::NoSuchDomain)?;
        let e = dom.ports.get(&port).ok_or(BrokerError::NoSuchPort)?;
        if e.owner != conn {
            return Err(BrokerError::NotOwner);
        }
        let status = e.status;
        dom.ports.remove(&port);
        release_peer(&mut st, domid, port, status);
        Ok(())
    }

    /// Closes every port bound through connection `conn` of `domid`.
    fn disconnect(&self, domid: DomId, conn: ConnId) {
        let mut st = self.lock();
        let Some(dom) = st.domains.get_mut(&domid) else {
            return;
        };
        let mine: Vec<(Port, PortStatus)> = dom
            .ports
            .iter()
            .filter(|(_, e)| e.owner == conn)
            .map(|(&p, e)| (p, e.status))
            .collect();
        for (p, _) in &mine {
            dom.ports.remove(p);
        }
        for (p, status) in mine {
            release_peer(&mut st, domid, p, status);
        }
    }

    /// Serves one connection of domain `domid` until the client hangs up or misbehaves; then
    /// closes every port it bound (their peers return to unbound, reserved for `domid`).
    ///
    /// Returns `Ok(())` when the client hung up, an error when the stream failed or the client
    /// sent a malformed frame (it was told so, then disconnected). Never panics on client input.
    pub fn serve(&self, mut stream: UnixStream, domid: DomId) -> io::Result<()> {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let r = self.serve_loop(&mut stream, domid, conn);
        self.disconnect(domid, conn);
        r
    }

    fn serve_loop(&self, stream: &mut UnixStream, domid: DomId, conn: ConnId) -> io::Result<()> {
        loop {
            let mut len = [0u8; 4];
            match stream.read_exact(&mut len) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
            if u32::from_le_bytes(len) != wire::REQUEST_BODY {
                // Best effort: the client may already be gone.
                let _ = stream.write_all(&wire::reply(BrokerError::BadFrame.code(), 0));
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "domain {domid}: request frame of {} bytes (expected {})",
                        u32::from_le_bytes(len),
                        wire::REQUEST_BODY
                    ),
                ));
            }
            let mut body = [0u8; wire::REQUEST_BODY as usize];
            stream.read_exact(&mut body)?;
            let (op, a, b) = (
                wire::word(&body, 0),
                wire::word(&body, 1),
                wire::word(&body, 2),
            );
            let result = match op {
                wire::OP_ALLOC_UNBOUND => {
                    domid_arg(a).and_then(|r| self.alloc_unbound(domid, conn, r).map(Some))
                }
                wire::OP_BIND_INTERDOMAIN => {
                    domid_arg(a).and_then(|r| self.bind_interdomain(domid, conn, r, b).map(Some))
                }
                wire::OP_UNBIND => self.unbind(domid, conn, a).map(|()| None),
                _ => Err(BrokerError::UnknownOp),
            };
            match result {
                Ok(Some((port, (own, peer)))) => {
                    let frame = wire::reply(0, port);
                    if let Err(e) =
                        send_with_fds(stream.as_fd(), &frame, &[own.as_fd(), peer.as_fd()])
                    {
                        // The client cannot hold a port it never received.
                        let _ = self.unbind(domid, conn, port);
                        return Err(e);
                    }
                }
                Ok(None) => stream.write_all(&wire::reply(0, 0))?,
                Err(e) => stream.write_all(&wire::reply(e.code(), 0))?,
            }
        }
    }
}

/// The other end of a closed port `(domid, port)` returns to unbound, reserved for `domid`.
fn release_peer(st: &mut State, domid: DomId, port: Port, status: PortStatus) {
    if let PortStatus::Interdomain {
        remote,
        remote_port,
    } = status
    {
        if let Some(re) = st
            .domains
            .get_mut(&remote)
            .and_then(|d| d.ports.get_mut(&remote_port))
        {
            if re.status
                == (PortStatus::Interdomain {
                    remote: domid,
                    remote_port: port,
                })
            {
                re.status = PortStatus::Unbound { remote: domid };
            }
        }
    }
}

fn check_domid(d: DomId) -> Result<(), BrokerError> {
    if d >= DOMID_SELF {
        Err(BrokerError::BadDomain)
    } else {
        Ok(())
    }
}

fn domid_arg(a: u32) -> Result<DomId, BrokerError> {
    DomId::try_from(a).map_err(|_| BrokerError::BadDomain)
}
