//! The NBD engine: a disk served by an NBD export through `xenpv_nbd`'s pipelined client.
//!
//! Zero-copy: a read's data goes from the socket straight into the guest's mapped pages
//! (`readv` by the client's reader thread, [`Client::submit_read_into`]), and a write is sent
//! from them with its request header in one `writev` ([`Client::submit_write_from`]).
//!
//! A batch is pipelined: up to [`WINDOW`] NBD requests in flight, the oldest waited for before
//! the next is sent. All queues of a device share one connection; it is opened with room for
//! [`MAX_IN_FLIGHT`] requests so that several queues' windows never exhaust it (a full client
//! blocks `submit` until a reply is *consumed*, which only the submitting queue does).

use std::collections::VecDeque;
use std::io;

use xenpv_grant::VolatileSlice;
use xenpv_nbd::client::{Client, Handle};
use xenpv_nbd::uri::Uri;

use super::{check_range, read_only_mapping, total_len, Error, Op, Storage};

/// NBD requests one batch keeps in flight.
pub const WINDOW: usize = 32;
/// Requests in flight on the connection (all queues together); `WINDOW` × the most queues.
pub const MAX_IN_FLIGHT: usize = 16 * WINDOW;
/// Largest trim sent at once.
const TRIM_STEP: u64 = 1 << 30;

/// An NBD export as a disk.
#[derive(Debug)]
pub struct NbdStorage {
    client: Client,
    uri: String,
    read_only: bool,
}

/// One NBD request of a batch: which op it belongs to.
struct Part {
    op: usize,
    handle: Handle,
}

impl NbdStorage {
    /// Connects to `uri` (named `name` in errors). Read-only if `read_only` or if the
    /// server exports read-only. The size must be a multiple of `sector_size`.
    pub fn connect(
        name: &str,
        uri: &Uri,
        read_only: bool,
        sector_size: u32,
    ) -> Result<Self, Error> {
        let client = Client::connect_uri(uri, MAX_IN_FLIGHT).map_err(|source| Error::Nbd {
            uri: name.to_string(),
            source,
        })?;
        let size = client.size();
        if size % u64::from(sector_size) != 0 {
            return Err(Error::Unaligned {
                path: name.to_string(),
                size,
                sector_size,
            });
        }
        let read_only = read_only || client.info().read_only();
        Ok(Self {
            client,
            uri: name.to_string(),
            read_only,
        })
    }

    /// The client (for its export information).
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn max_payload(&self) -> u64 {
        u64::from(self.client.info().max_payload.max(4096))
    }

    /// The `(offset, length)` of each NBD request `op` takes (an empty read or write takes
    /// none; a flush one, with no range).
    fn chunks(&self, op: &Op<'_>) -> Vec<(u64, u64)> {
        match op {
            Op::Read { offset, bufs } | Op::Write { offset, bufs } => {
                let len = total_len(bufs);
                let step = self.max_payload();
                (0..len.div_ceil(step))
                    .map(|k| (offset + k * step, (len - k * step).min(step)))
                    .collect()
            }
            Op::Discard { offset, len } => (0..len.div_ceil(TRIM_STEP))
                .map(|k| (offset + k * TRIM_STEP, (len - k * TRIM_STEP).min(TRIM_STEP)))
                .collect(),
            Op::Flush => vec![(0, 0)],
        }
    }

    fn precheck(&self, op: &Op<'_>) -> io::Result<()> {
        let size = self.client.size();
        match op {
            Op::Read { offset, bufs } => {
                if bufs.iter().any(|b| !b.is_writable()) {
                    return Err(read_only_mapping());
                }
                check_range(size, *offset, total_len(bufs))
            }
            Op::Write { offset, bufs } => {
                if self.read_only {
                    return Err(read_only_export());
                }
                check_range(size, *offset, total_len(bufs))
            }
            Op::Discard { offset, len } => {
                if !self.can_discard() {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        format!("{}: the export does not offer TRIM", self.uri),
                    ));
                }
                check_range(size, *offset, *len)
            }
            Op::Flush => Ok(()),
        }
    }

    /// Sends one chunk of `op`: bytes `[at, at + len)` of the disk.
    fn send_chunk(&self, op: &Op<'_>, at: u64, len: u64) -> io::Result<Handle> {
        let nbd = |e: xenpv_nbd::client::Error| io::Error::other(format!("{}: {e}", self.uri));
        let h = match op {
            Op::Read { offset, bufs } => {
                let iov = range_iovecs(bufs, at - offset, len)?;
                // SAFETY: the iovecs lie within the op's mapped, writable pages (`precheck`),
                // which `submit` borrows for its whole call; `submit` waits for every part it
                // sent before it returns, and the client writes nothing into a request's
                // memory after its wait returned. The pages are accessed only through raw
                // pointers (`VolatileSlice`), never through references.
                unsafe { self.client.submit_read_into(at, &iov) }
            }
            Op::Write { offset, bufs } => {
                let iov = range_iovecs(bufs, at - offset, len)?;
                // SAFETY: the iovecs lie within the op's mapped pages, borrowed for this call,
                // which sends them before it returns.
                unsafe { self.client.submit_write_from(at, &iov, false) }
            }
            Op::Discard { .. } => self.client.submit_trim(at, len as u32, false),
            Op::Flush => self.client.submit_flush(),
        };
        h.map_err(nbd)
    }

    /// Waits for `part` and records its outcome in `results`.
    fn complete(&self, part: Part, results: &mut [io::Result<()>]) {
        if let Err(e) = self.client.wait(part.handle) {
            if results[part.op].is_ok() {
                results[part.op] = Err(io::Error::other(format!("{}: {e}", self.uri)));
            }
        }
    }
}

fn read_only_export() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "write to a read-only NBD export",
    )
}

/// The iovecs of bytes `[pos, pos + len)` of `bufs` (taken in order).
fn range_iovecs(bufs: &[VolatileSlice<'_>], from: u64, len: u64) -> io::Result<Vec<libc::iovec>> {
    let mut out = Vec::new();
    let mut pos = from;
    let mut left = len;
    for b in bufs {
        if left == 0 {
            break;
        }
        let blen = b.len() as u64;
        if pos >= blen {
            pos -= blen;
            continue;
        }
        let n = (blen - pos).min(left);
        let piece = b
            .subslice(pos as usize, n as usize)
            .map_err(io::Error::other)?;
        out.push(libc::iovec {
            iov_base: piece.as_ptr().cast(),
            iov_len: piece.len(),
        });
        left -= n;
        pos = 0;
    }
    if left > 0 {
        return Err(io::Error::other(format!(
            "{len} bytes from {from} are beyond the request's buffers"
        )));
    }
    Ok(out)
}

impl Storage for NbdStorage {
    fn size(&self) -> u64 {
        self.client.size()
    }

    crate::storage::single_ops_via_submit!();

    fn can_discard(&self) -> bool {
        self.client.info().can_trim() && !self.read_only
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn engine(&self) -> &'static str {
        "nbd"
    }

    fn submit(&self, ops: &[Op<'_>]) -> Vec<io::Result<()>> {
        let mut results: Vec<io::Result<()>> = ops.iter().map(|op| self.precheck(op)).collect();
        let mut parts: VecDeque<Part> = VecDeque::new();
        for (i, op) in ops.iter().enumerate() {
            if results[i].is_err() {
                continue;
            }
            if matches!(op, Op::Flush) && !self.client.info().can_flush() {
                continue; // No write cache to flush: writes are durable when answered.
            }
            for (at, len) in self.chunks(op) {
                while parts.len() >= WINDOW {
                    if let Some(p) = parts.pop_front() {
                        self.complete(p, &mut results);
                    }
                }
                if results[i].is_err() {
                    break;
                }
                match self.send_chunk(op, at, len) {
                    Ok(handle) => parts.push_back(Part { op: i, handle }),
                    Err(e) => {
                        results[i] = Err(e);
                        break;
                    }
                }
            }
        }
        while let Some(p) = parts.pop_front() {
            self.complete(p, &mut results);
        }
        results
    }
}
