//! The disk as an NBD export: every NBD request becomes an asynchronous blkfront operation, so
//! that a client's queue depth reaches the ring (fio at iodepth 32 is not serialised).

use std::sync::Arc;

use xenpv_evtchn::EventChannel;
use xenpv_grant::{GrantShare, SharedPages};
use xenpv_nbd::{AsyncBlockExport, Command, Completion, Errno, ExportFlags, Request};

use crate::{BlkFront, Error, Op};

/// An [`AsyncBlockExport`] over a [`BlkFront`]. FUA is a write followed by a flush.
pub struct NbdExport<G: GrantShare, E> {
    dev: Arc<BlkFront<G, E>>,
}

impl<G: GrantShare, E> NbdExport<G, E> {
    /// Exports `dev`.
    pub fn new(dev: Arc<BlkFront<G, E>>) -> Self {
        Self { dev }
    }
}

impl<G, E> AsyncBlockExport for NbdExport<G, E>
where
    G: GrantShare + Send + Sync + 'static,
    G::Shared: SharedPages + Send + Sync + 'static,
    E: EventChannel + 'static,
{
    /// The disk's size now. The NBD server asks at each connection's handshake, so a
    /// connection made after an online resize sees the new size. NBD cannot tell a connected
    /// client that the size changed: a connection keeps the size it was given, and the server
    /// refuses its requests beyond that size even after the disk grew (reconnect to use the
    /// new space); after a shrink, its requests beyond the new end fail (`ENOSPC` for writes,
    /// as the NBD spec asks for writes past the end, `EINVAL` otherwise).
    fn size(&self) -> u64 {
        self.dev.size()
    }

    fn flags(&self) -> ExportFlags {
        let info = self.dev.info();
        ExportFlags {
            read_only: info.read_only,
            flush: true,
            fua: true,
            trim: info.discard && !info.read_only,
            write_zeroes: false,
            multi_conn: true,
            rotational: false,
        }
    }

    fn submit(&self, req: Request, done: Completion) {
        let offset = req.offset;
        let op = match req.command {
            Command::Read => Op::Read {
                offset,
                len: req.length as usize,
            },
            Command::Write => Op::Write {
                offset,
                data: req.data,
            },
            Command::Flush => Op::Flush,
            Command::Trim => Op::Discard {
                offset,
                len: u64::from(req.length),
            },
            _ => return done.fail(Errno::EINVAL),
        };
        let write = req.command == Command::Write;
        let fua = req.fua && write;
        let dev = self.dev.clone();
        self.dev.submit(
            op,
            Box::new(move |r| match r {
                Ok(_) if fua => dev.submit(
                    Op::Flush,
                    Box::new(move |r| done.complete(r.map(|_| Vec::new()).map_err(|e| e.to_io()))),
                ),
                Ok(data) => done.complete(Ok(data)),
                Err(e) => {
                    tracing::debug!("NBD request failed: {e}");
                    done.complete(Err(match e {
                        // Past the end of a disk that shrank under the connection.
                        Error::OutOfRange { .. } if write => {
                            std::io::Error::from_raw_os_error(libc::ENOSPC)
                        }
                        e => e.to_io(),
                    }))
                }
            }),
        );
    }
}
