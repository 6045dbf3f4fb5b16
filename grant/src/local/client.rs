//! The client of `grant.sock`: what frontends and backends use on the local platform.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{DomainMem, Msg, OP_ALLOC, OP_CHECK, OP_FREE, OP_HELLO, OP_OPEN};
use crate::sys::{self, Region};
use crate::table::flags::{GTF_READING, GTF_WRITING};
use crate::{
    check_copy_range, Access, CopyKind, CopyOp, DomId, Error, GrantMap, GrantMemory, GrantRef,
    GrantShare, GrantStatus, Result, Revoke, SharedPages, VolatileSlice, MAX_COPY_OPS,
    MAX_PAGES_PER_CALL, PAGE_SIZE,
};

#[derive(Debug, Default)]
struct PinCount {
    maps: u32,
    writers: u32,
}

#[derive(Debug)]
struct Inner {
    domid: DomId,
    conn: Mutex<UnixStream>,
    own: DomainMem,
    foreign: Mutex<HashMap<DomId, Arc<DomainMem>>>,
    /// Per-entry map counts of this process, keyed by (domid, generation, gref): the status
    /// bits are set on the first map and cleared when the last one goes.
    pins: Mutex<HashMap<(DomId, u32, GrantRef), PinCount>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The local platform's grant provider for one process of one domain: both the front side
/// ([`GrantShare`]) and the back side ([`GrantMap`]). Cheap to clone.
#[derive(Debug, Clone)]
pub struct LocalGrants {
    inner: Arc<Inner>,
}

impl LocalGrants {
    /// `ROOT/dom<D>/grant.sock`.
    pub fn socket_path(state_dir: &Path, domid: DomId) -> PathBuf {
        state_dir.join(format!("dom{domid}")).join("grant.sock")
    }

    /// Connects to the broker socket of this process's domain.
    pub fn connect(socket_path: impl AsRef<Path>) -> Result<Self> {
        let p = socket_path.as_ref();
        let s = UnixStream::connect(p).map_err(|source| Error::NoBroker {
            path: p.display().to_string(),
            source,
        })?;
        Self::from_stream(s)
    }

    /// Uses an already connected broker stream.
    pub fn from_stream(stream: UnixStream) -> Result<Self> {
        Msg::new(OP_HELLO, 0, 0).send(&stream, None)?;
        let (rsp, fd) =
            Msg::recv(&stream)?.ok_or(Error::Protocol("broker closed the connection"))?;
        let domid = DomId::try_from(rsp.a).map_err(|_| Error::Protocol("bad domid in HELLO"))?;
        if rsp.code != 0 {
            return Err(Error::Broker {
                what: "HELLO",
                domid,
                status: rsp.status(),
            });
        }
        let (Some(fd), [frames, generation]) = (fd, rsp.payload.as_slice()) else {
            return Err(Error::Protocol("HELLO without memfd or geometry"));
        };
        let own = DomainMem::open(fd, rsp.b, *frames, *generation)?;
        Ok(Self {
            inner: Arc::new(Inner {
                domid,
                conn: Mutex::new(stream),
                own,
                foreign: Mutex::new(HashMap::new()),
                pins: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// This process's domain.
    pub fn domid(&self) -> DomId {
        self.inner.domid
    }

    /// Writes entry `gref` of our own grant table raw, as any (possibly hostile) guest can
    /// write its table: for fault injection in tests. Returns `false` if `gref` is outside the
    /// table.
    pub fn write_own_entry(&self, gref: GrantRef, entry: crate::GrantEntryV1) -> bool {
        self.inner.own.table.write_raw(gref, entry)
    }

    /// The flags of entry `gref` of our own grant table (diagnostics and tests).
    pub fn own_flags(&self, gref: GrantRef) -> Option<u16> {
        self.inner.own.table.flags(gref)
    }
}

impl Inner {
    fn call(&self, req: &Msg) -> Result<(Msg, Option<std::os::fd::OwnedFd>)> {
        let c = lock(&self.conn);
        req.send(&*c, None)?;
        Msg::recv(&*c)?.ok_or(Error::Protocol("broker closed the connection"))
    }

    /// The current memfd of `domid`, or `GNTST_bad_domain`.
    fn domain(&self, domid: DomId) -> std::result::Result<Arc<DomainMem>, GrantStatus> {
        let (rsp, _) = self
            .call(&Msg::new(OP_CHECK, u32::from(domid), 0))
            .map_err(|_| GrantStatus::GeneralError)?;
        if rsp.code != 0 {
            lock(&self.foreign).remove(&domid);
            return Err(GrantStatus::BadDomain);
        }
        if let Some(d) = lock(&self.foreign).get(&domid) {
            if d.generation == rsp.a {
                return Ok(d.clone());
            }
        }
        let (rsp, fd) = self
            .call(&Msg::new(OP_OPEN, u32::from(domid), 0))
            .map_err(|_| GrantStatus::GeneralError)?;
        if rsp.code != 0 {
            return Err(GrantStatus::BadDomain);
        }
        let (Some(fd), [generation]) = (fd, rsp.payload.as_slice()) else {
            return Err(GrantStatus::GeneralError);
        };
        let d = Arc::new(
            DomainMem::open(fd, rsp.a, rsp.b, *generation)
                .map_err(|_| GrantStatus::GeneralError)?,
        );
        lock(&self.foreign).insert(domid, d.clone());
        Ok(d)
    }

    /// Validates and pins `gref` of `dom` for us; returns the frame's file offset.
    fn pin(
        &self,
        dom: &DomainMem,
        domid: DomId,
        gref: GrantRef,
        writable: bool,
    ) -> std::result::Result<u64, (GrantStatus, &'static str)> {
        if gref >= dom.table.entries() {
            return Err((
                GrantStatus::BadGntref,
                "grant ref outside the granting domain's table",
            ));
        }
        let mut pins = lock(&self.pins);
        let frame = dom
            .table
            .pin(gref, self.domid, writable)
            .map_err(|why| (GrantStatus::GeneralError, why))?;
        let c = pins.entry((domid, dom.generation, gref)).or_default();
        c.maps += 1;
        if writable {
            c.writers += 1;
        }
        drop(pins);
        match dom.frame_offset(frame) {
            Some(off) => Ok(off),
            None => {
                self.unpin(dom, domid, gref, writable);
                Err((
                    GrantStatus::BadPage,
                    "the entry names a frame outside the granting domain's memory",
                ))
            }
        }
    }

    fn unpin(&self, dom: &DomainMem, domid: DomId, gref: GrantRef, writable: bool) {
        let mut pins = lock(&self.pins);
        let key = (domid, dom.generation, gref);
        let Some(c) = pins.get_mut(&key) else { return };
        c.maps = c.maps.saturating_sub(1);
        let mut clear = 0;
        if writable {
            c.writers = c.writers.saturating_sub(1);
            if c.writers == 0 {
                clear |= GTF_WRITING;
            }
        }
        if c.maps == 0 {
            clear |= GTF_READING | GTF_WRITING;
            pins.remove(&key);
        }
        if clear != 0 {
            dom.table.clear(gref, clear);
        }
    }
}

fn check_count(what: &'static str, n: usize, max: usize) -> Result<()> {
    if n == 0 || n > max {
        return Err(Error::BadCount {
            what,
            count: n,
            max,
        });
    }
    Ok(())
}

struct Pinned {
    dom: Arc<DomainMem>,
    domid: DomId,
    gref: GrantRef,
}

/// A contiguous mapping of foreign grants on the local platform; unmapped on drop.
pub struct LocalMapping {
    region: Option<Region>,
    access: Access,
    pins: Vec<Pinned>,
    client: Arc<Inner>,
}

impl core::fmt::Debug for LocalMapping {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("LocalMapping")
            .field("pages", &self.pins.len())
            .field("access", &self.access)
            .finish()
    }
}

impl LocalMapping {
    fn region(&self) -> &Region {
        // The region is only taken in `drop`.
        self.region.as_ref().expect("region present until drop")
    }
}

impl Drop for LocalMapping {
    fn drop(&mut self) {
        // Unmap first, then let the granter see the grants released.
        drop(self.region.take());
        let w = self.access.is_writable();
        for p in self.pins.drain(..) {
            self.client.unpin(&p.dom, p.domid, p.gref, w);
        }
    }
}

// SAFETY: the region is mapped for its whole length (every page MAP_FIXED onto a frame) until
// drop, page-aligned, and only reached through volatile accesses and atomics.
unsafe impl xenpv_ring::RingMemory for LocalMapping {
    fn as_ptr(&self) -> NonNull<u8> {
        self.region().ptr()
    }
    fn len(&self) -> usize {
        self.region().len()
    }
}

impl GrantMemory for LocalMapping {
    fn volatile(&self) -> VolatileSlice<'_> {
        let r = self.region();
        // SAFETY: the region is mapped (readable, and writable if Writable) while `self` lives;
        // nothing holds references into it.
        unsafe { VolatileSlice::new(r.ptr(), r.len(), self.access.is_writable()) }
    }
    fn access(&self) -> Access {
        self.access
    }
}

impl GrantMap for LocalGrants {
    type Mapping = LocalMapping;

    fn map(&self, refs: &[(DomId, GrantRef)], access: Access) -> Result<LocalMapping> {
        check_count("grant refs to map", refs.len(), MAX_PAGES_PER_CALL)?;
        let region = Region::reserve(refs.len())?;
        let mut m = LocalMapping {
            region: Some(region),
            access,
            pins: Vec::with_capacity(refs.len()),
            client: self.inner.clone(),
        };
        let w = access.is_writable();
        let mut doms: HashMap<DomId, Arc<DomainMem>> = HashMap::new();
        for (index, &(domid, gref)) in refs.iter().enumerate() {
            let fail = |status, reason| Error::Map {
                index,
                domid,
                gref,
                status,
                reason,
            };
            let dom = match doms.get(&domid) {
                Some(d) => d.clone(),
                None => {
                    let d = self
                        .inner
                        .domain(domid)
                        .map_err(|s| fail(s, "no such domain (destroyed, or never created)"))?;
                    doms.insert(domid, d.clone());
                    d
                }
            };
            // On error `m` is dropped: it unmaps and unpins what succeeded.
            let off = self
                .inner
                .pin(&dom, domid, gref, w)
                .map_err(|(s, why)| fail(s, why))?;
            m.pins.push(Pinned {
                dom: dom.clone(),
                domid,
                gref,
            });
            m.region()
                .map_page(index, dom.fd.as_raw_fd(), off, w)
                .map_err(|_| fail(GrantStatus::GeneralError, "mmap of the frame failed"))?;
        }
        Ok(m)
    }

    fn copy(&self, ops: &mut [CopyOp<'_>]) -> Result<()> {
        if ops.len() > MAX_COPY_OPS {
            return Err(Error::BadCount {
                what: "grant copy operations",
                count: ops.len(),
                max: MAX_COPY_OPS,
            });
        }
        let mut doms: HashMap<DomId, std::result::Result<Arc<DomainMem>, GrantStatus>> =
            HashMap::new();
        for op in ops.iter_mut() {
            let (r, len) = op.foreign();
            op.status = if len == 0 {
                // As Xen since XSA-448: a zero-length copy is a no-op, nothing is validated.
                GrantStatus::Okay
            } else {
                match check_copy_range(r, len) {
                    GrantStatus::Okay => {
                        let dom = doms
                            .entry(r.domid)
                            .or_insert_with(|| self.inner.domain(r.domid))
                            .clone();
                        match dom {
                            Ok(dom) => self.copy_one(&dom, r.domid, r.gref, r.offset, &mut op.kind),
                            Err(s) => s,
                        }
                    }
                    s => s,
                }
            };
        }
        Ok(())
    }
}

impl LocalGrants {
    fn copy_one(
        &self,
        dom: &DomainMem,
        domid: DomId,
        gref: GrantRef,
        offset: u16,
        kind: &mut CopyKind<'_>,
    ) -> GrantStatus {
        let writable = matches!(kind, CopyKind::ToForeign { .. });
        let off = match self.inner.pin(dom, domid, gref, writable) {
            Ok(off) => off + u64::from(offset),
            Err((s, _)) => return s,
        };
        let r = match kind {
            CopyKind::FromForeign { dst, .. } => sys::pread_all(dom.fd.as_fd(), dst, off),
            CopyKind::ToForeign { src, .. } => sys::pwrite_all(dom.fd.as_fd(), src, off),
        };
        self.inner.unpin(dom, domid, gref, writable);
        match r {
            Ok(()) => GrantStatus::Okay,
            Err(_) => GrantStatus::GeneralError,
        }
    }
}

/// Pages this process shares with another domain on the local platform. Dropping it revokes
/// (deferred while the peer maps them), like [`GrantShare::revoke`].
pub struct LocalShared {
    region: Option<Region>,
    grefs: Vec<GrantRef>,
    frames: Vec<u32>,
    domid: DomId,
    peer_access: Access,
    client: Arc<Inner>,
    done: bool,
}

impl core::fmt::Debug for LocalShared {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("LocalShared")
            .field("grefs", &self.grefs)
            .field("domid", &self.domid)
            .field("peer_access", &self.peer_access)
            .finish()
    }
}

impl LocalShared {
    /// What the peer may do with the pages.
    pub fn peer_access(&self) -> Access {
        self.peer_access
    }

    fn region(&self) -> &Region {
        self.region.as_ref().expect("region present until revoke")
    }

    /// Ends the grants (see [`GrantShare::revoke`]).
    pub fn revoke(mut self) -> Result<Revoke> {
        self.do_revoke()
    }

    fn do_revoke(&mut self) -> Result<Revoke> {
        if self.done {
            return Ok(Revoke::Revoked);
        }
        self.done = true;
        let region = self.region.take();
        let in_use = self
            .grefs
            .iter()
            .filter(|&&r| !self.client.own.table.try_revoke(r))
            .count();
        // Our own view can go in any case; the frames stay allocated until released.
        drop(region);
        let mut req = Msg::new(OP_FREE, 0, 0);
        for (r, f) in self.grefs.iter().zip(&self.frames) {
            req.payload.extend_from_slice(&[*r, *f]);
        }
        let (rsp, _) = self.client.call(&req)?;
        if rsp.code != 0 {
            return Err(Error::Broker {
                what: "FREE",
                domid: self.client.domid,
                status: rsp.status(),
            });
        }
        Ok(if in_use == 0 {
            Revoke::Revoked
        } else {
            Revoke::Deferred { in_use }
        })
    }
}

impl Drop for LocalShared {
    fn drop(&mut self) {
        let _ = self.do_revoke();
    }
}

// SAFETY: the region is mapped read-write for its whole length until revoke (which consumes the
// value), page-aligned, and only reached through volatile accesses and atomics.
unsafe impl xenpv_ring::RingMemory for LocalShared {
    fn as_ptr(&self) -> NonNull<u8> {
        self.region().ptr()
    }
    fn len(&self) -> usize {
        self.region().len()
    }
}

impl GrantMemory for LocalShared {
    fn volatile(&self) -> VolatileSlice<'_> {
        let r = self.region();
        // SAFETY: the region is mapped read-write while `self` lives; no references into it.
        unsafe { VolatileSlice::new(r.ptr(), r.len(), true) }
    }
    fn access(&self) -> Access {
        Access::Writable
    }
}

impl SharedPages for LocalShared {
    fn grefs(&self) -> &[GrantRef] {
        &self.grefs
    }
    fn domid(&self) -> DomId {
        self.domid
    }
}

impl GrantShare for LocalGrants {
    type Shared = LocalShared;

    fn share(&self, domid: DomId, count: usize, access: Access) -> Result<LocalShared> {
        check_count("pages to share", count, MAX_PAGES_PER_CALL)?;
        let (rsp, _) = self.inner.call(&Msg::new(OP_ALLOC, count as u32, 0))?;
        match rsp.status() {
            GrantStatus::Okay => {}
            GrantStatus::NoSpace => return Err(Error::NoSpace { count }),
            status => {
                return Err(Error::Broker {
                    what: "ALLOC",
                    domid: self.inner.domid,
                    status,
                })
            }
        }
        let own = &self.inner.own;
        let mut s = LocalShared {
            region: None,
            grefs: Vec::with_capacity(count),
            frames: Vec::with_capacity(count),
            domid,
            peer_access: access,
            client: self.inner.clone(),
            done: false,
        };
        for p in rsp.payload.chunks_exact(2) {
            s.grefs.push(p[0]);
            s.frames.push(p[1]);
        }
        // From here on, dropping `s` gives everything back to the broker.
        if s.grefs.len() != count
            || s.grefs.iter().any(|&r| r >= own.table.entries())
            || s.frames.iter().any(|&f| f >= own.frames)
        {
            s.grefs.clear();
            s.frames.clear();
            return Err(Error::Protocol(
                "ALLOC answered refs or frames out of range",
            ));
        }
        let region = Region::reserve(count)?;
        for (i, &f) in s.frames.iter().enumerate() {
            let off = own
                .frame_offset(f)
                .ok_or(Error::Protocol("frame out of range"))?;
            region.map_page(i, own.fd.as_raw_fd(), off, true)?;
        }
        s.region = Some(region);
        // XSA-403: the broker hands out zero frames; make sure nothing else was ever in them.
        s.volatile().fill(0, count * PAGE_SIZE, 0)?;
        for (&r, &f) in s.grefs.iter().zip(&s.frames) {
            own.table.grant(r, domid, f, access == Access::ReadOnly);
        }
        Ok(s)
    }

    fn revoke(&self, shared: LocalShared) -> Result<Revoke> {
        shared.revoke()
    }
}
