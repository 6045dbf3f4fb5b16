//! A bounded persistent-mapping cache (blkback's persistent grants, netback's staging grants).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use smallvec::SmallVec;

use crate::{Access, DomId, GrantMap, GrantMemory, GrantRef, Result};

/// How many mappings [`Mappings`] holds without a heap allocation: those of a 16 KiB request,
/// so that mapping the small requests that make up random I/O through the cache allocates
/// nothing. A larger inline list costs more in copying than it saves (blkback serving 4 KiB
/// reads, callgrind: 438k instructions with room for 8, 406k for 4, 519k on the heap).
pub const INLINE_MAPPINGS: usize = 4;

/// The mappings of several grants, in order ([`MapCache::get_all`]): inline up to
/// [`INLINE_MAPPINGS`], on the heap beyond.
pub type Mappings<M> = SmallVec<[Arc<M>; INLINE_MAPPINGS]>;

/// A multiplicative hasher for the (domid, gref) key: one multiply, no SipHash rounds (the key
/// is chosen by the peer, but the table is bounded by the cache's capacity, so a collision
/// attack can at worst make that small table slow).
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 ^= self.0 >> 29;
    }
}

/// A bound on the mappings that several [`MapCache`]s keep together: all the devices and queues
/// of one daemon. Each cache is bounded by its own capacity; the budget bounds their sum, so that
/// many peers, each within its bounds, cannot together exhaust what the process may map (every
/// cached mapping is a memory mapping of its own, and Linux refuses a process more than
/// `vm.max_map_count` of them: 65530 by default, 31 queues of 2112). A cache that finds the
/// budget spent serves its misses uncached, as when its own capacity is spent.
///
/// The caches sharing a budget share it fairly when it runs out: each is entitled to an equal
/// part ([`share`](Self::share)). While the budget is spent, a cache holding more than its part
/// unmaps one of its idle mappings at each lookup, for a cache below its part to take; and a
/// cache at or above its part takes from the budget only while more is left than one mapping
/// per cache, which stays for those below theirs. A cache that goes idle above its part keeps it
/// until its mappings are swept ([`MapCache::sweep`]).
///
/// Clones share the budget.
#[derive(Clone)]
pub struct MapBudget {
    total: usize,
    left: Arc<AtomicUsize>,
    /// The caches sharing it.
    caches: Arc<AtomicUsize>,
}

impl core::fmt::Debug for MapBudget {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MapBudget")
            .field("total", &self.total)
            .field("in_use", &self.in_use())
            .finish()
    }
}

impl MapBudget {
    /// A budget of `total` cached mappings.
    pub fn new(total: usize) -> Self {
        Self {
            total,
            left: Arc::new(AtomicUsize::new(total)),
            caches: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// No bound beyond each cache's capacity.
    pub fn unlimited() -> Self {
        Self::new(usize::MAX)
    }

    /// Half of what this process may map (`/proc/sys/vm/max_map_count`, 65530 when it cannot be
    /// read), leaving the other half to mappings made per request, rings and libraries.
    pub fn half_of_max_map_count() -> Self {
        Self::new(max_map_count() / 2)
    }

    /// The bound.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Mappings held against the budget now.
    pub fn in_use(&self) -> usize {
        self.total.saturating_sub(self.left.load(Ordering::Relaxed))
    }

    /// The caches sharing it now.
    pub fn caches(&self) -> usize {
        self.caches.load(Ordering::Relaxed)
    }

    /// The part of the budget each of its caches is entitled to: the total divided by the
    /// caches sharing it.
    pub fn share(&self) -> usize {
        self.total / self.caches().max(1)
    }

    /// What is left.
    fn left(&self) -> usize {
        self.left.load(Ordering::Relaxed)
    }

    /// How many more mappings a cache holding `held` may take now: up to its part from all
    /// that is left; beyond its part, only from what is left past one mapping per cache.
    fn may_take(&self, held: usize) -> usize {
        let left = self.left();
        let below = self.share().saturating_sub(held).min(left);
        below + (left - below).saturating_sub(self.caches())
    }

    /// Whether a cache holding `held` should give one mapping back: the budget is spent and it
    /// holds more than its part.
    fn over(&self, held: usize) -> bool {
        self.left() == 0 && held > self.share()
    }

    /// Takes one mapping's share, if any is left.
    fn take(&self) -> bool {
        self.left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Gives `n` shares back.
    fn give(&self, n: usize) {
        if n > 0 {
            self.left.fetch_add(n, Ordering::AcqRel);
        }
    }
}

/// `vm.max_map_count`: how many memory mappings Linux lets one process have.
pub fn max_map_count() -> usize {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(65530)
}

struct Slot<M> {
    key: u64,
    mapping: Arc<M>,
    referenced: bool,
    /// Used since the last [`MapCache::sweep`].
    used: bool,
}

/// Hit, miss and eviction counters of a [`MapCache`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups served from the cache.
    pub hits: u64,
    /// Lookups that mapped the grant.
    pub misses: u64,
    /// Mappings evicted to make room.
    pub evictions: u64,
    /// Mappings handed out uncached because every cached one was in use.
    pub uncached: u64,
}

/// A bounded cache of single-page grant mappings keyed by `(domid, gref)`, with clock
/// (second-chance) eviction. A hit is a hash lookup and an `Arc` clone.
///
/// The cache never holds more than `capacity` mappings, nor more than its [`MapBudget`] (shared
/// with other caches) has left. A mapping handed out stays valid while the caller holds it, even
/// if evicted meanwhile; mappings in use are not evicted, and when all are in use (or the budget
/// is spent and none is idle) a miss is served with an uncached mapping (dropped by its user). Call
/// [`clear`](Self::clear) or [`forget_domain`](Self::forget_domain) on disconnect (XSA-371).
pub struct MapCache<G: GrantMap> {
    grants: G,
    capacity: usize,
    budget: MapBudget,
    index: HashMap<u64, usize, BuildHasherDefault<KeyHasher>>,
    slots: Vec<Slot<G::Mapping>>,
    hand: usize,
    stats: CacheStats,
}

impl<G: GrantMap> core::fmt::Debug for MapCache<G> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MapCache")
            .field("capacity", &self.capacity)
            .field("len", &self.slots.len())
            .field("budget", &self.budget)
            .field("stats", &self.stats)
            .finish()
    }
}

fn key(domid: DomId, gref: GrantRef) -> u64 {
    (u64::from(domid) << 32) | u64::from(gref)
}

impl<G: GrantMap> MapCache<G> {
    /// A cache of at most `capacity` mappings (at least 1) made through `grants`, with no
    /// budget shared with other caches.
    pub fn new(grants: G, capacity: usize) -> Self {
        Self::with_budget(grants, capacity, MapBudget::unlimited())
    }

    /// A cache of at most `capacity` mappings (at least 1) made through `grants`, and of no more
    /// than `budget` has left.
    pub fn with_budget(grants: G, capacity: usize, budget: MapBudget) -> Self {
        let capacity = capacity.max(1);
        budget.caches.fetch_add(1, Ordering::AcqRel);
        let mut index = HashMap::default();
        index.reserve(capacity);
        Self {
            grants,
            capacity,
            budget,
            index,
            slots: Vec::with_capacity(capacity),
            hand: 0,
            stats: CacheStats::default(),
        }
    }

    /// The provider used to map.
    pub fn grants(&self) -> &G {
        &self.grants
    }

    /// Cached mappings (never more than [`capacity`](Self::capacity)).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The bound.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The counters.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Whether `(domid, gref)` is cached.
    pub fn contains(&self, domid: DomId, gref: GrantRef) -> bool {
        self.index.contains_key(&key(domid, gref))
    }

    /// The mapping of one grant: from the cache, or mapped now (and cached). A cached read-only
    /// mapping asked for [`Access::Writable`] is mapped again writable.
    pub fn get(&mut self, domid: DomId, gref: GrantRef, access: Access) -> Result<Arc<G::Mapping>> {
        self.give_way();
        self.get_one(domid, gref, access)
    }

    /// [`get`](Self::get) without giving way.
    fn get_one(&mut self, domid: DomId, gref: GrantRef, access: Access) -> Result<Arc<G::Mapping>> {
        if let Some(m) = self.lookup(domid, gref, access) {
            return Ok(m);
        }
        let k = key(domid, gref);
        if let Some(&i) = self.index.get(&k) {
            // Cached read-only, wanted writable. Upgrade: map writable, replace in place.
            let m = Arc::new(self.grants.map(&[(domid, gref)], access)?);
            self.stats.misses += 1;
            let s = &mut self.slots[i];
            s.mapping = m.clone();
            s.referenced = true;
            s.used = true;
            return Ok(m);
        }
        let m = Arc::new(self.grants.map(&[(domid, gref)], access)?);
        self.stats.misses += 1;
        if self.slots.len() < self.capacity
            && self.budget.may_take(self.slots.len()) > 0
            && self.budget.take()
        {
            self.index.insert(k, self.slots.len());
            self.slots.push(Slot {
                key: k,
                mapping: m.clone(),
                referenced: true,
                used: true,
            });
            return Ok(m);
        }
        match self.victim() {
            Some(i) => {
                self.stats.evictions += 1;
                let old = std::mem::replace(
                    &mut self.slots[i],
                    Slot {
                        key: k,
                        mapping: m.clone(),
                        referenced: true,
                        used: true,
                    },
                );
                self.index.remove(&old.key);
                self.index.insert(k, i);
            }
            None => self.stats.uncached += 1,
        }
        Ok(m)
    }

    /// The cached mapping of one grant, if there is one good for `access` (a hit); maps
    /// nothing.
    fn lookup(&mut self, domid: DomId, gref: GrantRef, access: Access) -> Option<Arc<G::Mapping>> {
        let &i = self.index.get(&key(domid, gref))?;
        let s = &mut self.slots[i];
        if access.is_writable() && !s.mapping.access().is_writable() {
            return None;
        }
        s.referenced = true;
        s.used = true;
        self.stats.hits += 1;
        Some(s.mapping.clone())
    }

    /// The mappings of several grants (a request's pages), one per grant, through the cache
    /// as [`get`](Self::get) does, or `None` when the misses among them could not all be
    /// cached: more misses than free slots and slots not in use. The caller then maps the
    /// grants together in one call, uncached (one broker round trip or one ioctl for the
    /// request, rather than one per page when a peer's working set outgrows the cache);
    /// nothing was mapped or evicted, and they count as [`uncached`](CacheStats::uncached).
    pub fn get_all<I>(
        &mut self,
        domid: DomId,
        grefs: I,
        access: Access,
    ) -> Result<Option<Mappings<G::Mapping>>>
    where
        I: IntoIterator<Item = GrantRef>,
        I::IntoIter: Clone,
    {
        self.give_way();
        let grefs = grefs.into_iter();
        // Every grant cached (a peer's working set within the cache, the steady state): the
        // hits go straight into the list returned.
        let mut hits = Mappings::new();
        let mut rest = grefs.clone();
        loop {
            let Some(g) = rest.next() else {
                return Ok(Some(hits));
            };
            match self.lookup(domid, g, access) {
                Some(m) => hits.push(m),
                None => break,
            }
        }
        // Some missed: each grant looked up once all the same, the hits held (in use, so
        // that `room` does not count them as evictable) while the room is counted.
        let mut got: SmallVec<[Option<Arc<G::Mapping>>; INLINE_MAPPINGS]> =
            hits.into_iter().map(Some).collect();
        got.push(None);
        got.extend(rest.map(|g| self.lookup(domid, g, access)));
        let misses = got.iter().filter(|m| m.is_none()).count();
        // `room` scans the slots: only when something missed, not on every all-hit request.
        if misses > self.room() {
            self.stats.uncached += misses as u64;
            return Ok(None);
        }
        got.into_iter()
            .zip(grefs)
            .map(|(m, g)| match m {
                Some(m) => Ok(m),
                None => self.get_one(domid, g, access),
            })
            .collect::<Result<Mappings<_>>>()
            .map(Some)
    }

    /// How many more grants could be cached now: free slots, and slots whose mapping nobody
    /// holds (evictable).
    fn room(&self) -> usize {
        let idle = self
            .slots
            .iter()
            .filter(|s| Arc::strong_count(&s.mapping) == 1)
            .count();
        let free = self.capacity.saturating_sub(self.slots.len());
        free.min(self.budget.may_take(self.slots.len())) + idle
    }

    /// While the budget is spent and this cache holds more than its part of it: unmaps one
    /// idle mapping, for a cache below its part to take ([`MapBudget`]).
    fn give_way(&mut self) {
        if !self.budget.over(self.slots.len()) {
            return;
        }
        if let Some(i) = self.victim() {
            let k = self.slots[i].key;
            self.stats.evictions += 1;
            self.remove((k >> 32) as DomId, k as GrantRef);
        }
    }

    /// Clock: the first slot not in use whose second chance is spent.
    fn victim(&mut self) -> Option<usize> {
        let n = self.slots.len();
        for _ in 0..2 * n {
            let i = self.hand;
            self.hand = (self.hand + 1) % n;
            let s = &mut self.slots[i];
            if Arc::strong_count(&s.mapping) > 1 {
                continue;
            }
            if s.referenced {
                s.referenced = false;
                continue;
            }
            return Some(i);
        }
        None
    }

    /// Drops the cached mapping of `(domid, gref)`, if any (when the frontend revokes it).
    pub fn remove(&mut self, domid: DomId, gref: GrantRef) -> bool {
        let Some(i) = self.index.remove(&key(domid, gref)) else {
            return false;
        };
        self.slots.swap_remove(i);
        self.budget.give(1);
        if let Some(moved) = self.slots.get(i) {
            self.index.insert(moved.key, i);
        }
        if self.hand >= self.slots.len() {
            self.hand = 0;
        }
        true
    }

    /// Unmaps the cached mappings that nobody used since the previous sweep and nobody holds
    /// now, and starts a new period; returns how many went. Called every `t`, it unmaps a
    /// mapping left unused for between `t` and `2t`, as Linux's blkback unmaps persistent grants
    /// unused for `pgrant_timeout` (60 s): an idle peer then keeps no share of a
    /// [`MapBudget`], and a peer's working set that moved on does not stay mapped.
    pub fn sweep(&mut self) -> usize {
        let n = self.remove_where(|s| !s.used && Arc::strong_count(&s.mapping) == 1);
        for s in &mut self.slots {
            s.used = false;
        }
        n
    }

    /// Drops every cached mapping of `domid` (disconnect of that domain's device).
    pub fn forget_domain(&mut self, domid: DomId) {
        self.remove_where(|s| (s.key >> 32) as DomId == domid);
    }

    /// Drops the cached mappings whose slot matches `stale`; returns how many.
    fn remove_where(&mut self, stale: impl Fn(&Slot<G::Mapping>) -> bool) -> usize {
        let keys: Vec<u64> = self
            .slots
            .iter()
            .filter(|s| stale(s))
            .map(|s| s.key)
            .collect();
        for &k in &keys {
            self.remove((k >> 32) as DomId, k as GrantRef);
        }
        keys.len()
    }

    /// Drops every cached mapping.
    pub fn clear(&mut self) {
        self.budget.give(self.slots.len());
        self.slots.clear();
        self.index.clear();
        self.hand = 0;
    }
}

impl<G: GrantMap> Drop for MapCache<G> {
    fn drop(&mut self) {
        self.budget.give(self.slots.len());
        self.budget.caches.fetch_sub(1, Ordering::AcqRel);
    }
}
