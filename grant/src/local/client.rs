//! The client of `grant.sock`: what frontends and backends use on the local platform.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{
    pin_target, DomainMem, Msg, OP_ALLOC, OP_FREE, OP_HELLO, OP_OPEN, OP_PIN, OP_UNPIN, PIN_COPY,
    PIN_MAP,
};
use crate::sys::{self, Region};
use crate::table::Why;
use crate::{
    check_copy_range, Access, CopyKind, CopyOp, DomId, Error, GrantMap, GrantMemory, GrantRef,
    GrantShare, GrantStatus, Result, Revoke, SharedPages, VolatileSlice, MAX_COPY_OPS,
    MAX_PAGES_PER_CALL, PAGE_SIZE,
};

#[derive(Debug)]
struct Inner {
    domid: DomId,
    conn: Mutex<UnixStream>,
    own: DomainMem,
    /// The memfds of the domains we mapped from, each of the generation `OPEN` last gave.
    foreign: Mutex<HashMap<DomId, Arc<DomainMem>>>,
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

    /// The memfd of `domid` of generation `generation` (the one a `PIN` reply named), opened
    /// on first use; `GNTST_bad_domain` if the domain has been re-created or destroyed since.
    fn domain(
        &self,
        domid: DomId,
        generation: u32,
    ) -> std::result::Result<Arc<DomainMem>, GrantStatus> {
        if let Some(d) = lock(&self.foreign).get(&domid) {
            if d.generation == generation {
                return Ok(d.clone());
            }
        }
        let (rsp, fd) = self
            .call(&Msg::new(OP_OPEN, u32::from(domid), 0))
            .map_err(|_| GrantStatus::GeneralError)?;
        if rsp.code != 0 {
            lock(&self.foreign).remove(&domid);
            return Err(GrantStatus::BadDomain);
        }
        let (Some(fd), [current]) = (fd, rsp.payload.as_slice()) else {
            return Err(GrantStatus::GeneralError);
        };
        let d = Arc::new(
            DomainMem::open(fd, rsp.a, rsp.b, *current).map_err(|_| GrantStatus::GeneralError)?,
        );
        lock(&self.foreign).insert(domid, d.clone());
        if *current != generation {
            return Err(GrantStatus::BadDomain);
        }
        Ok(d)
    }

    /// Asks the broker to pin `entries` (`(domid, gref, writable)`) for us: one round trip.
    fn pin(
        &self,
        mode: u32,
        entries: impl Iterator<Item = (DomId, GrantRef, bool)>,
    ) -> Result<Msg> {
        let mut req = Msg::new(OP_PIN, mode, 0);
        for (domid, gref, w) in entries {
            req.payload.extend_from_slice(&[pin_target(domid, w), gref]);
        }
        Ok(self.call(&req)?.0)
    }

    /// Gives `pins` back to the broker: one round trip (nothing if there are none). Errors are
    /// ignored: if the connection is gone, the broker has dropped our pins already.
    fn unpin(&self, pins: &[Pin]) {
        if pins.is_empty() {
            return;
        }
        let mut req = Msg::new(OP_UNPIN, 0, 0);
        for p in pins {
            req.payload
                .extend_from_slice(&[pin_target(p.domid, p.writable), p.gref, p.generation]);
        }
        let _ = self.call(&req);
    }
}

/// One pin the broker holds for this connection.
#[derive(Debug, Clone, Copy)]
struct Pin {
    domid: DomId,
    gref: GrantRef,
    writable: bool,
    generation: u32,
}

/// `(offset, generation)` of `PIN` reply entry `e` (`[offset_lo, offset_hi, generation]`).
fn pin_reply(e: &[u32]) -> (u64, u32) {
    (u64::from(e[0]) | u64::from(e[1]) << 32, e[2])
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

/// A contiguous mapping of foreign grants on the local platform; unmapped on drop.
pub struct LocalMapping {
    region: Option<Region>,
    access: Access,
    /// What the broker pinned for this mapping (all of it, or nothing).
    pins: Vec<Pin>,
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
        self.client.unpin(&self.pins);
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

/// Consecutive frames of one domain's memory, mapped by consecutive pages of a mapping.
struct Run {
    /// Index of its first page in the mapping.
    first: usize,
    count: usize,
    dom: Arc<DomainMem>,
    /// Offset of its first frame in the domain's memory.
    offset: u64,
    /// Its first grant, named in an error.
    domid: DomId,
    gref: GrantRef,
}

impl Run {
    fn map(&self, m: &LocalMapping, writable: bool) -> Result<()> {
        m.region()
            .map_pages(
                self.first,
                self.count,
                self.dom.fd.as_raw_fd(),
                self.offset,
                writable,
            )
            .map_err(|_| Error::Map {
                index: self.first,
                domid: self.domid,
                gref: self.gref,
                status: GrantStatus::GeneralError,
                reason: "mmap of the frame failed",
            })
    }
}

impl GrantMap for LocalGrants {
    type Mapping = LocalMapping;

    fn map(&self, refs: &[(DomId, GrantRef)], access: Access) -> Result<LocalMapping> {
        check_count("grant refs to map", refs.len(), MAX_PAGES_PER_CALL)?;
        let region = Region::reserve(refs.len())?;
        let w = access.is_writable();
        // One round trip: the broker validates and pins every ref, or none.
        let rsp = self
            .inner
            .pin(PIN_MAP, refs.iter().map(|&(d, g)| (d, g, w)))?;
        if rsp.code != 0 {
            let index = rsp.a as usize;
            let &(domid, gref) = refs.get(index).ok_or(Error::Protocol(
                "PIN failed at an index outside the request",
            ))?;
            return Err(Error::Map {
                index,
                domid,
                gref,
                status: rsp.status(),
                reason: Why::text(rsp.b),
            });
        }
        if rsp.payload.len() != 3 * refs.len() {
            return Err(Error::Protocol("PIN reply of the wrong length"));
        }
        let m = LocalMapping {
            region: Some(region),
            access,
            pins: refs
                .iter()
                .zip(rsp.payload.chunks_exact(3))
                .map(|(&(domid, gref), e)| Pin {
                    domid,
                    gref,
                    writable: w,
                    generation: pin_reply(e).1,
                })
                .collect(),
            client: self.inner.clone(),
        };
        // From here on, an error drops `m`: it unmaps and unpins everything. Frames that
        // follow each other in one domain's memory (a frontend's pages allocated together)
        // are mapped in one `mmap` per run.
        let mut run: Option<Run> = None;
        for (index, (&(domid, gref), e)) in refs.iter().zip(rsp.payload.chunks_exact(3)).enumerate()
        {
            let fail = |status, reason| Error::Map {
                index,
                domid,
                gref,
                status,
                reason,
            };
            let (off, generation) = pin_reply(e);
            let dom = self
                .inner
                .domain(domid, generation)
                .map_err(|s| fail(s, Why::text(Why::NoDomain.code())))?;
            if !dom.is_frame_offset(off) {
                return Err(Error::Protocol("PIN answered an offset outside the domain"));
            }
            if let Some(r) = &mut run {
                if Arc::ptr_eq(&r.dom, &dom)
                    && r.offset.checked_add((r.count * PAGE_SIZE) as u64) == Some(off)
                {
                    r.count += 1;
                    continue;
                }
            }
            if let Some(r) = run.replace(Run {
                first: index,
                count: 1,
                dom,
                offset: off,
                domid,
                gref,
            }) {
                r.map(&m, w)?;
            }
        }
        if let Some(r) = run {
            r.map(&m, w)?;
        }
        Ok(m)
    }

    /// One `PIN` (copy mode) for the distinct `(domid, gref, writable)` of the batch, the copies
    /// with `pread`/`pwrite` on the memfds, one `UNPIN`: the grants are pinned (`GTF_reading` /
    /// `GTF_writing` set, counted in the broker) for the whole batch, as Xen pins each for the
    /// length of its copy, so a revoke in between is deferred rather than racing the copy.
    fn copy(&self, ops: &mut [CopyOp<'_>]) -> Result<()> {
        if ops.len() > MAX_COPY_OPS {
            return Err(Error::BadCount {
                what: "grant copy operations",
                count: ops.len(),
                max: MAX_COPY_OPS,
            });
        }
        let mut index: HashMap<(DomId, GrantRef, bool), usize> = HashMap::new();
        let mut entries: Vec<(DomId, GrantRef, bool)> = Vec::new();
        let mut which: Vec<Option<usize>> = Vec::with_capacity(ops.len());
        for op in ops.iter_mut() {
            let (r, len) = op.foreign();
            let writable = matches!(op.kind, CopyKind::ToForeign { .. });
            // As Xen since XSA-448: a zero-length copy is a no-op, nothing is validated.
            op.status = if len == 0 {
                GrantStatus::Okay
            } else {
                check_copy_range(r, len)
            };
            which.push((len != 0 && op.status == GrantStatus::Okay).then(|| {
                let key = (r.domid, r.gref, writable);
                *index.entry(key).or_insert_with(|| {
                    entries.push(key);
                    entries.len() - 1
                })
            }));
        }
        if entries.is_empty() {
            return Ok(());
        }
        let rsp = self.inner.pin(PIN_COPY, entries.iter().copied())?;
        if rsp.code != 0 || rsp.payload.len() != 4 * entries.len() {
            return Err(Error::Protocol("bad reply to a copy-mode PIN"));
        }
        let mut held = Vec::new();
        let mut doms: HashMap<(DomId, u32), std::result::Result<Arc<DomainMem>, GrantStatus>> =
            HashMap::new();
        let pinned: Vec<std::result::Result<(Arc<DomainMem>, u64), GrantStatus>> = entries
            .iter()
            .zip(rsp.payload.chunks_exact(4))
            .map(|(&(domid, gref, writable), e)| {
                let status = GrantStatus::from_raw(i16::try_from(e[0] as i32).unwrap_or(-1));
                if status != GrantStatus::Okay {
                    return Err(status);
                }
                let (off, generation) = pin_reply(&e[1..]);
                held.push(Pin {
                    domid,
                    gref,
                    writable,
                    generation,
                });
                let dom = doms
                    .entry((domid, generation))
                    .or_insert_with(|| self.inner.domain(domid, generation))
                    .clone()?;
                if !dom.is_frame_offset(off) {
                    return Err(GrantStatus::GeneralError);
                }
                Ok((dom, off))
            })
            .collect();
        for (op, w) in ops.iter_mut().zip(which) {
            let Some(i) = w else { continue };
            op.status = match &pinned[i] {
                Err(s) => *s,
                Ok((dom, off)) => {
                    let off = off + u64::from(op.foreign().0.offset);
                    let r = match &mut op.kind {
                        CopyKind::FromForeign { dst, .. } => {
                            sys::pread_all(dom.fd.as_fd(), dst, off)
                        }
                        CopyKind::ToForeign { src, .. } => {
                            sys::pwrite_all(dom.fd.as_fd(), src, off)
                        }
                    };
                    match r {
                        Ok(()) => GrantStatus::Okay,
                        Err(_) => GrantStatus::GeneralError,
                    }
                }
            };
        }
        self.inner.unpin(&held);
        Ok(())
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
        // The region is only taken in `do_revoke`, which consumes or drops `self`: no caller can
        // reach this afterwards. Not peer-controlled.
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
