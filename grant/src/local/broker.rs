//! The server side of `grant.sock`: per-domain memfds, free refs and frames, pins (the
//! hypervisor's in-use accounting, across all connections), deferred revokes.

use std::collections::{BTreeSet, HashMap};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{
    parse_target, DomainMem, Msg, MAX_PINS_PER_CONN, OP_ALLOC, OP_CHECK, OP_FREE, OP_HELLO,
    OP_OPEN, OP_PIN, OP_UNPIN, PIN_COPY, PIN_MAP,
};
use crate::sys;
use crate::table::flags::{GTF_READING, GTF_WRITING};
use crate::table::Why;
use crate::{
    DomId, Error, GrantStatus, Result, FIRST_UNRESERVED_REF, MAX_COPY_OPS, MAX_PAGES_PER_CALL,
};

/// Geometry of every domain's grant memfd.
#[derive(Debug, Clone, Copy)]
pub struct BrokerConfig {
    /// Grant table entries per domain (Xen's default is 32 frames = 16384 v1 entries).
    pub grant_entries: u32,
    /// Shareable 4 KiB frames per domain (sparse: only frames in use take memory).
    pub frames: u32,
    /// Back each domain's memory with 2 MiB pages, as Xen backs a guest's: consecutive frames
    /// are then physically contiguous within each 2 MiB, so a backend's storage sees a large
    /// request over consecutive frames as a few long segments, not one per page (Linux merges
    /// machine-contiguous foreign pages in dom0 in the same way). The memory is an unlinked
    /// file in a private `huge=always` tmpfs, mounted nowhere, all allocated when the domain
    /// is created (`frames` × 4 KiB), and zeroed in place rather than punched out. Needs
    /// `CAP_SYS_ADMIN`; without it, creating a domain fails and says so.
    pub huge_pages: bool,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            grant_entries: 16384,
            frames: 16384,
            huge_pages: false,
        }
    }
}

/// How many mappings (and in-flight copies) hold one grant, over every connection: Xen's
/// active-entry pin count, split into read-only and writable pins.
#[derive(Debug, Default, Clone, Copy)]
struct PinCount {
    readers: u32,
    writers: u32,
}

/// One pin a connection holds: `(granting domid, its generation, gref, writable)`.
type PinKey = (DomId, u32, u32, bool);

/// The pins one connection holds (key -> how many times), and their total.
#[derive(Debug, Default)]
struct ConnPins {
    held: HashMap<PinKey, u32>,
    total: u32,
}

struct Domain {
    mem: DomainMem,
    /// gref -> pins of it, for every grant that is pinned at all.
    pins: HashMap<u32, PinCount>,
    free_refs: Vec<u32>,
    /// Handed out lowest first, so that a domain's grants of several pages at once get
    /// consecutive (ascending) frames whatever the order they were freed in.
    free_frames: BTreeSet<u32>,
    /// Zero freed frames by punching a hole (sparse memfd), or by writing zeros (huge pages).
    punch: bool,
    /// ref -> (connection, frame) of every grant handed out.
    owned: HashMap<u32, (u64, u32)>,
    /// (ref, frame) whose revoke waits for the peer to unmap.
    deferred: Vec<(u32, u32)>,
}

impl Domain {
    /// Ends `gref` if nobody uses it and recycles it and its (zeroed) frame. `false` if in use:
    /// pinned here (whatever the granter wrote into its flags), or its status bits still set.
    fn release(&mut self, gref: u32, frame: u32) -> bool {
        if self.pins.contains_key(&gref) || !self.mem.table.try_revoke(gref) {
            return false;
        }
        if let Some(off) = self.mem.frame_offset(frame) {
            if sys::zero_page(self.mem.fd.as_fd(), off, self.punch).is_ok() {
                self.free_frames.insert(frame);
            }
        }
        self.free_refs.push(gref);
        true
    }

    /// Validates `gref` for a map or copy by `mapper` and pins it, as Xen's `map_grant_ref`
    /// does: range, then type, domid and read-only together with setting `GTF_reading` (and
    /// `GTF_writing`) in one compare-and-swap, then the frame. Returns the frame's offset.
    fn pin(
        &mut self,
        gref: u32,
        mapper: DomId,
        writable: bool,
    ) -> std::result::Result<u64, PinFail> {
        if gref >= self.mem.table.entries() {
            return Err((GrantStatus::BadGntref, Why::RefOutOfRange));
        }
        let frame = self.mem.table.pin(gref, mapper, writable).map_err(|why| {
            let s = match why {
                Why::RefOutOfRange => GrantStatus::BadGntref,
                _ => GrantStatus::GeneralError,
            };
            (s, why)
        })?;
        let off = self.mem.frame_offset(frame);
        let c = self.pins.entry(gref).or_default();
        let slot = if writable {
            &mut c.writers
        } else {
            &mut c.readers
        };
        let counted = slot.checked_add(1).map(|n| *slot = n).is_some();
        let r = match off {
            Some(_) if !counted => Err((GrantStatus::NoSpace, Why::TooManyPins)),
            Some(off) => return Ok(off),
            None => Err((GrantStatus::BadPage, Why::FrameOutOfRange)),
        };
        if counted {
            // Undo the count; the bits go back to what the other pins justify.
            self.unpin(gref, writable);
        } else {
            self.settle(gref);
        }
        r
    }

    /// Drops one pin of `gref`, clearing the status bits no pin justifies any more.
    fn unpin(&mut self, gref: u32, writable: bool) {
        if let Some(c) = self.pins.get_mut(&gref) {
            let slot = if writable {
                &mut c.writers
            } else {
                &mut c.readers
            };
            *slot = slot.saturating_sub(1);
            if c.readers == 0 && c.writers == 0 {
                self.pins.remove(&gref);
            }
        }
        self.settle(gref);
    }

    /// Clears `GTF_writing` if `gref` has no writable pin, and `GTF_reading` if it has no pin.
    fn settle(&self, gref: u32) {
        let c = self.pins.get(&gref).copied().unwrap_or_default();
        let mut clear = 0;
        if c.writers == 0 {
            clear |= GTF_WRITING;
            if c.readers == 0 {
                clear |= GTF_READING;
            }
        }
        if clear != 0 {
            self.mem.table.clear(gref, clear);
        }
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

type PinFail = (GrantStatus, Why);

struct State {
    cfg: BrokerConfig,
    /// The private tmpfs of huge-page guest memory, made at the first domain's creation.
    huge: Option<OwnedFd>,
    domains: HashMap<DomId, Domain>,
    /// Connection -> the pins it holds (only connections holding some).
    conns: HashMap<u64, ConnPins>,
    next_generation: u32,
    next_conn: u64,
    requests: u64,
}

impl State {
    /// Drops one pin `key` held by `conn`; `false` if `conn` does not hold it. A pin of a
    /// destroyed (or re-created) domain only goes from the connection's books.
    fn unpin(&mut self, conn: u64, key: PinKey) -> bool {
        let Some(cp) = self.conns.get_mut(&conn) else {
            return false;
        };
        let Some(n) = cp.held.get_mut(&key) else {
            return false;
        };
        *n -= 1;
        if *n == 0 {
            cp.held.remove(&key);
        }
        cp.total -= 1;
        if cp.total == 0 {
            self.conns.remove(&conn);
        }
        let (domid, generation, gref, writable) = key;
        if let Some(d) = self.domains.get_mut(&domid) {
            if d.mem.generation == generation {
                d.unpin(gref, writable);
            }
        }
        true
    }

    /// `PIN`: see the module docs.
    fn pin_request(&mut self, req: &Msg, mapper: DomId, conn: u64) -> Msg {
        let fail = |s: GrantStatus, index: usize, why: Why| {
            Msg::new(i32::from(s.raw()), index as u32, why.code())
        };
        let copy = match req.a {
            PIN_MAP => false,
            PIN_COPY => true,
            _ => return fail(GrantStatus::GeneralError, 0, Why::Malformed),
        };
        let n = req.payload.len() / 2;
        let max = if copy {
            MAX_COPY_OPS
        } else {
            MAX_PAGES_PER_CALL
        };
        if req.payload.len() % 2 != 0 || n == 0 || n > max {
            return fail(GrantStatus::GeneralError, 0, Why::Malformed);
        }
        let held = self.conns.get(&conn).map_or(0, |c| c.total);
        let mut done: Vec<PinKey> = Vec::with_capacity(n);
        let mut m = Msg::new(0, 0, 0);
        m.payload.reserve(n * if copy { 4 } else { 3 });
        for (index, e) in req.payload.chunks_exact(2).enumerate() {
            let gref = e[1];
            let r = match parse_target(e[0]) {
                None => Err((GrantStatus::GeneralError, Why::Malformed)),
                Some(_) if held as usize + done.len() >= MAX_PINS_PER_CONN as usize => {
                    Err((GrantStatus::NoSpace, Why::TooManyPins))
                }
                Some((domid, w)) => match self.domains.get_mut(&domid) {
                    None => Err((GrantStatus::BadDomain, Why::NoDomain)),
                    Some(d) => d
                        .pin(gref, mapper, w)
                        .map(|off| (off, (domid, d.mem.generation, gref, w))),
                },
            };
            match r {
                Ok((off, key)) => {
                    done.push(key);
                    if copy {
                        m.payload.push(0);
                    }
                    m.payload
                        .extend_from_slice(&[off as u32, (off >> 32) as u32, key.1]);
                }
                Err((s, _)) if copy => {
                    m.payload
                        .extend_from_slice(&[i32::from(s.raw()) as u32, 0, 0, 0]);
                }
                Err((s, why)) => {
                    for (domid, _, gref, w) in done {
                        if let Some(d) = self.domains.get_mut(&domid) {
                            d.unpin(gref, w);
                        }
                    }
                    return fail(s, index, why);
                }
            }
        }
        if !done.is_empty() {
            let cp = self.conns.entry(conn).or_default();
            cp.total += done.len() as u32;
            for key in done {
                *cp.held.entry(key).or_default() += 1;
            }
        }
        m
    }
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
                huge: None,
                domains: HashMap::new(),
                conns: HashMap::new(),
                next_generation: 1,
                next_conn: 1,
                requests: 0,
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
        let fd = if cfg.huge_pages {
            let dir = match st.huge.take() {
                Some(d) => d,
                None => sys::huge_tmpfs()?,
            };
            let fd = sys::tmpfile(dir.as_fd(), len);
            st.huge = Some(dir);
            fd?
        } else {
            let name = std::ffi::CString::new(format!("xenpv-grant-dom{domid}"))
                .map_err(|_| Error::Protocol("memfd name"))?;
            sys::memfd(&name, len)?
        };
        let generation = st.next_generation;
        st.next_generation = st.next_generation.wrapping_add(1).max(1);
        let mem = DomainMem::open(fd, cfg.grant_entries, cfg.frames, generation)?;
        st.domains.insert(
            domid,
            Domain {
                mem,
                pins: HashMap::new(),
                free_refs: (FIRST_UNRESERVED_REF..cfg.grant_entries).rev().collect(),
                free_frames: (0..cfg.frames).collect(),
                punch: !cfg.huge_pages,
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

    /// How many connections pin grant `gref` of `domid` read-only and writable, over all
    /// connections (for tests and diagnostics).
    pub fn pins(&self, domid: DomId, gref: u32) -> (u32, u32) {
        let st = self.lock();
        st.domains
            .get(&domid)
            .and_then(|d| d.pins.get(&gref))
            .map_or((0, 0), |c| (c.readers, c.writers))
    }

    /// How many requests the broker has answered (for tests: cheap paths must not ask).
    pub fn requests(&self) -> u64 {
        self.lock().requests
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

    /// Serves one client connection of domain `domid` until it closes. On close (the process
    /// exited or died), every pin the connection still holds is dropped, as gntdev unmaps when
    /// its process dies; then every grant it still held is revoked, or deferred while a peer
    /// maps it; then the deferred revokes of every domain are retried.
    pub fn serve(&self, stream: UnixStream, domid: DomId) -> Result<()> {
        let conn = {
            let mut st = self.lock();
            let c = st.next_conn;
            st.next_conn += 1;
            c
        };
        let r = self.serve_loop(&stream, domid, conn);
        let mut st = self.lock();
        if let Some(cp) = st.conns.remove(&conn) {
            for ((target, generation, gref, w), n) in cp.held {
                if let Some(d) = st.domains.get_mut(&target) {
                    if d.mem.generation == generation {
                        for _ in 0..n {
                            d.unpin(gref, w);
                        }
                    }
                }
            }
        }
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
        for d in st.domains.values_mut() {
            d.reap();
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
        st.requests += 1;
        for d in st.domains.values_mut() {
            d.reap();
        }
        match req.code {
            OP_PIN => (st.pin_request(req, domid, conn), None),
            OP_UNPIN => {
                let (mut unpinned, mut ignored) = (0u32, 0u32);
                let mut touched = Vec::new();
                for e in req.payload.chunks_exact(3) {
                    let ok = parse_target(e[0])
                        .is_some_and(|(target, w)| st.unpin(conn, (target, e[2], e[1], w)));
                    if ok {
                        unpinned += 1;
                        touched.push(e[0] as u16);
                    } else {
                        ignored += 1;
                    }
                }
                // The last unmap completes a deferred revoke now, as on Xen.
                touched.sort_unstable();
                touched.dedup();
                for t in touched {
                    if let Some(d) = st.domains.get_mut(&t) {
                        d.reap();
                    }
                }
                (Msg::new(0, unpinned, ignored), None)
            }
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
                    let (Some(r), Some(f)) = (d.free_refs.pop(), d.free_frames.pop_first()) else {
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
