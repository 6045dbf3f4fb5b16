//! The NBD engine: a disk served by an NBD export through `xenpv_nbd`'s pipelined client.
//!
//! Data is copied between the NBD payload and the guest's pages with
//! [`VolatileSlice::read`]/[`VolatileSlice::write`]: the client reads a reply into its own
//! buffer, and a socket cannot `recv` straight into foreign memory without a client that
//! exposes scatter reads into caller buffers (and, for writes, `sendmsg` from the mapped pages).
//! That is one copy per byte; the NBD round trip dominates anyway.
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

/// One NBD request of a batch: which op it belongs to and, for a read, where its bytes go.
struct Part {
    op: usize,
    handle: Handle,
    /// Read: byte offset of this part within the op's buffers, and its length.
    read: Option<(u64, usize)>,
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

    /// Sends one chunk of `op`.
    fn send_chunk(&self, op: &Op<'_>, at: u64, len: u64) -> io::Result<Part> {
        let nbd = |e: xenpv_nbd::client::Error| io::Error::other(format!("{}: {e}", self.uri));
        match op {
            Op::Read { offset, .. } => {
                let h = self.client.submit_read(at, len as u32).map_err(nbd)?;
                Ok(Part {
                    op: 0,
                    handle: h,
                    read: Some((at - offset, len as usize)),
                })
            }
            Op::Write { offset, bufs } => {
                let mut data = vec![0u8; len as usize];
                gather(bufs, at - offset, &mut data)?;
                let h = self.client.submit_write(at, &data, false).map_err(nbd)?;
                Ok(Part {
                    op: 0,
                    handle: h,
                    read: None,
                })
            }
            Op::Discard { .. } => {
                let h = self
                    .client
                    .submit_trim(at, len as u32, false)
                    .map_err(nbd)?;
                Ok(Part {
                    op: 0,
                    handle: h,
                    read: None,
                })
            }
            Op::Flush => {
                let h = self.client.submit_flush().map_err(nbd)?;
                Ok(Part {
                    op: 0,
                    handle: h,
                    read: None,
                })
            }
        }
    }

    /// Waits for the oldest part and records its outcome in `results`.
    fn complete(&self, part: Part, ops: &[Op<'_>], results: &mut [io::Result<()>]) {
        let outcome = self.client.wait(part.handle);
        let r = match (outcome, part.read, &ops[part.op]) {
            (Err(e), _, _) => Err(io::Error::other(format!("{}: {e}", self.uri))),
            (Ok(data), Some((pos, len)), Op::Read { bufs, .. }) => {
                if data.len() != len {
                    Err(io::Error::other(format!(
                        "{}: short NBD read ({} of {len} bytes)",
                        self.uri,
                        data.len()
                    )))
                } else {
                    scatter(bufs, pos, &data)
                }
            }
            (Ok(_), _, _) => Ok(()),
        };
        if let Err(e) = r {
            if results[part.op].is_ok() {
                results[part.op] = Err(e);
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

/// Copies `out.len()` bytes starting `pos` bytes into `bufs` out of them.
fn gather(bufs: &[VolatileSlice<'_>], mut pos: u64, out: &mut [u8]) -> io::Result<()> {
    let mut done = 0usize;
    for b in bufs {
        let len = b.len() as u64;
        if pos >= len {
            pos -= len;
            continue;
        }
        let n = ((len - pos) as usize).min(out.len() - done);
        b.read(pos as usize, &mut out[done..done + n])
            .map_err(io::Error::other)?;
        done += n;
        pos = 0;
        if done == out.len() {
            break;
        }
    }
    Ok(())
}

/// Copies `data` into `bufs`, starting `pos` bytes into them.
fn scatter(bufs: &[VolatileSlice<'_>], mut pos: u64, data: &[u8]) -> io::Result<()> {
    let mut done = 0usize;
    for b in bufs {
        let len = b.len() as u64;
        if pos >= len {
            pos -= len;
            continue;
        }
        let n = ((len - pos) as usize).min(data.len() - done);
        b.write(pos as usize, &data[done..done + n])
            .map_err(io::Error::other)?;
        done += n;
        pos = 0;
        if done == data.len() {
            break;
        }
    }
    Ok(())
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
                        self.complete(p, ops, &mut results);
                    }
                }
                if results[i].is_err() {
                    break;
                }
                match self.send_chunk(op, at, len) {
                    Ok(mut p) => {
                        p.op = i;
                        parts.push_back(p);
                    }
                    Err(e) => {
                        results[i] = Err(e);
                        break;
                    }
                }
            }
        }
        while let Some(p) = parts.pop_front() {
            self.complete(p, ops, &mut results);
        }
        results
    }
}
