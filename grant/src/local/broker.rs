//! The server side of `grant.sock`: per-domain memfds, free refs and frames, deferred revokes.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{DomainMem, Msg, OP_ALLOC, OP_CHECK, OP_FREE, OP_HELLO, OP_OPEN};
use crate::sys;
use crate::{DomId, Error, GrantStatus, Result, FIRST_UNRESERVED_REF, MAX_PAGES_PER_CALL};

/// Geometry of every domain's grant memfd.
#[derive(Debug, Clone, Copy)]
pub struct BrokerConfig {
    /// Grant table entries per domain (Xen's default is 32 frames = 16384 v1 entries).
    pub grant_entries: u32,
    /// Shareable 4 KiB frames per domain (sparse: only frames in use take memory).
    pub frames: u32,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            grant_entries: 16384,
            frames: 16384,
        }
    }
}

struct Domain {
    mem: DomainMem,
    free_refs: Vec<u32>,
    free_frames: Vec<u32>,
    /// ref -> (connection, frame) of every grant handed out.
    owned: HashMap<u32, (u64, u32)>,
    /// (ref, frame) whose revoke waits for the peer to unmap.
    deferred: Vec<(u32, u32)>,
}

impl Domain {
    /// Ends `gref` if nobody uses it and recycles it and its (zeroed) frame. `false` if in use.
    fn release(&mut self, gref: u32, frame: u32) -> bool {
        if !self.mem.table.try_revoke(gref) {
            return false;
        }
        if let Some(off) = self.mem.frame_offset(frame) {
            if sys::zero_page(self.mem.fd.as_fd(), off).is_ok() {
                self.free_frames.push(frame);
            }
        }
        self.free_refs.push(gref);
        true
    }

    fn reap(&mut self) {
        let pending = std::mem::take(&mut self.deferred);
        for (r, f) in pending {
            if !self.release(r, f) {
                self.deferred.push((r, f));
            }
        }
    }
}

struct State {
    cfg: BrokerConfig,
    domains: HashMap<DomId, Domain>,
    next_generation: u32,
    next_conn: u64,
}

/// The grant broker: the hypervisor's grant-table role on the local platform. Cheap to clone
/// (shared state); [`serve`](Self::serve) one connection per thread.
#[derive(Clone)]
pub struct Broker {
    state: Arc<Mutex<State>>,
}

impl core::fmt::Debug for Broker {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Broker").finish_non_exhaustive()
    }
}

impl Broker {
    /// A broker with no domains.
    pub fn new(cfg: BrokerConfig) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                cfg,
                domains: HashMap::new(),
                next_generation: 1,
                next_conn: 1,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated in a way that
        // matters more than refusing every later request would.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates domain `domid`'s memfd (an empty table and zero frames).
    pub fn create_domain(&self, domid: DomId) -> Result<()> {
        let mut st = self.lock();
        if st.domains.contains_key(&domid) {
            return Err(Error::DomainExists(domid));
        }
        let cfg = st.cfg;
        if cfg.grant_entries <= FIRST_UNRESERVED_REF {
            return Err(Error::Protocol("BrokerConfig::grant_entries must exceed 8"));
        }
        let tb = DomainMem::table_bytes(cfg.grant_entries);
        let len = tb + u64::from(cfg.frames) * crate::PAGE_SIZE as u64;
        let name = std::ffi::CString::new(format!("xenpv-grant-dom{domid}"))
            .map_err(|_| Error::Protocol("memfd name"))?;
        let fd = sys::memfd(&name, len)?;
        let generation = st.next_generation;
        st.next_generation = st.next_generation.wrapping_add(1).max(1);
        let mem = DomainMem::open(fd, cfg.grant_entries, cfg.frames, generation)?;
        st.domains.insert(
            domid,
            Domain {
                mem,
                free_refs: (FIRST_UNRESERVED_REF..cfg.grant_entries).rev().collect(),
                free_frames: (0..cfg.frames).rev().collect(),
                owned: HashMap::new(),
                deferred: Vec::new(),
            },
        );
        Ok(())
    }

    /// Destroys domain `domid`: drops its memfd. Mappings elsewhere stay valid memory; new maps
    /// of its grants fail with `GNTST_bad_domain`.
    pub fn destroy_domain(&self, domid: DomId) -> Result<()> {
        self.lock()
            .domains
            .remove(&domid)
            .map(|_| ())
            .ok_or(Error::NoSuchDomain(domid))
    }

    /// The domains that exist.
    pub fn domains(&self) -> Vec<DomId> {
        let mut v: Vec<DomId> = self.lock().domains.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Retries every deferred revoke; returns how many are still waiting for their peer.
    pub fn reap(&self) -> usize {
        let mut st = self.lock();
        st.domains
            .values_mut()
            .map(|d| {
                d.reap();
                d.deferred.len()
            })
            .sum()
    }

    /// Whether grant `gref` of `domid` is handed out or waiting for a deferred revoke (for tests
    /// and diagnostics).
    pub fn is_allocated(&self, domid: DomId, gref: u32) -> bool {
        let st = self.lock();
        st.domains.get(&domid).is_some_and(|d| {
            d.owned.contains_key(&gref) || d.deferred.iter().any(|&(r, _)| r == gref)
        })
    }

    /// Accepts connections on `listener` for domain `domid`, serving each in its own thread,
    /// until accepting fails.
    pub fn spawn_listener(
        &self,
        listener: UnixListener,
        domid: DomId,
    ) -> std::thread::JoinHandle<()> {
        let broker = self.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { break };
                let b = broker.clone();
                std::thread::spawn(move || {
                    let _ = b.serve(conn, domid);
                });
            }
        })
    }

    /// Serves one client connection of domain `domid` until it closes. On close, every grant the
    /// connection still holds is revoked, or deferred while its peer maps it.
    pub fn serve(&self, stream: UnixStream, domid: DomId) -> Result<()> {
        let conn = {
            let mut st = self.lock();
            let c = st.next_conn;
            st.next_conn += 1;
            c
        };
        let r = self.serve_loop(&stream, domid, conn);
        let mut st = self.lock();
        if let Some(d) = st.domains.get_mut(&domid) {
            let mine: Vec<(u32, u32)> = d
                .owned
                .iter()
                .filter(|(_, &(c, _))| c == conn)
                .map(|(&r, &(_, f))| (r, f))
                .collect();
            for (r, f) in mine {
                d.owned.remove(&r);
                if !d.release(r, f) {
                    d.deferred.push((r, f));
                }
            }
        }
        r
    }

    fn serve_loop(&self, stream: &UnixStream, domid: DomId, conn: u64) -> Result<()> {
        while let Some((req, _)) = Msg::recv(stream)? {
            // Answer outside the lock: a client that does not read cannot stall the broker.
            let (rsp, fd) = self.handle(&req, domid, conn);
            rsp.send(stream, fd.as_ref().map(|f| f.as_fd()))?;
        }
        Ok(())
    }

    fn handle(&self, req: &Msg, domid: DomId, conn: u64) -> (Msg, Option<OwnedFd>) {
        let bad = |s: GrantStatus| (Msg::new(i32::from(s.raw()), 0, 0), None);
        let mut st = self.lock();
        for d in st.domains.values_mut() {
            d.reap();
        }
        match req.code {
            OP_HELLO | OP_OPEN => {
                let target = if req.code == OP_HELLO {
                    Some(domid)
                } else {
                    DomId::try_from(req.a).ok()
                };
                let Some(d) = target.and_then(|t| st.domains.get(&t)) else {
                    return bad(GrantStatus::BadDomain);
                };
                let Ok(fd) = d.mem.fd.try_clone() else {
                    return bad(GrantStatus::NoSpace);
                };
                let m = if req.code == OP_HELLO {
                    let mut m = Msg::new(0, u32::from(domid), d.mem.table.entries());
                    m.payload = vec![d.mem.frames, d.mem.generation];
                    m
                } else {
                    let mut m = Msg::new(0, d.mem.table.entries(), d.mem.frames);
                    m.payload = vec![d.mem.generation];
                    m
                };
                (m, Some(fd))
            }
            OP_CHECK => match DomId::try_from(req.a).ok().and_then(|t| st.domains.get(&t)) {
                Some(d) => (Msg::new(0, d.mem.generation, 0), None),
                None => bad(GrantStatus::BadDomain),
            },
            OP_ALLOC => {
                let Some(d) = st.domains.get_mut(&domid) else {
                    return bad(GrantStatus::BadDomain);
                };
                let n = req.a as usize;
                if n == 0 || n > MAX_PAGES_PER_CALL {
                    return bad(GrantStatus::GeneralError);
                }
                if d.free_refs.len() < n || d.free_frames.len() < n {
                    return bad(GrantStatus::NoSpace);
                }
                let mut m = Msg::new(0, 0, 0);
                for _ in 0..n {
                    let (Some(r), Some(f)) = (d.free_refs.pop(), d.free_frames.pop()) else {
                        break;
                    };
                    d.owned.insert(r, (conn, f));
                    m.payload.extend_from_slice(&[r, f]);
                }
                (m, None)
            }
            OP_FREE => {
                let Some(d) = st.domains.get_mut(&domid) else {
                    return bad(GrantStatus::BadDomain);
                };
                let (mut freed, mut deferred) = (0u32, 0u32);
                for pair in req.payload.chunks_exact(2) {
                    let r = pair[0];
                    // Only what this connection was given, with the frame it was given.
                    match d.owned.get(&r) {
                        Some(&(c, f)) if c == conn && f == pair[1] => {
                            d.owned.remove(&r);
                            if d.release(r, f) {
                                freed += 1;
                            } else {
                                d.deferred.push((r, f));
                                deferred += 1;
                            }
                        }
                        _ => {}
                    }
                }
                (Msg::new(0, freed, deferred), None)
            }
            _ => bad(GrantStatus::GeneralError),
        }
    }
}
