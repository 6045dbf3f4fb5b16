//! A listening Unix socket served on threads, whose connections can be cut.

use std::collections::HashMap;
use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

/// What serves one accepted connection (on its own thread).
pub(crate) type Handler = Arc<dyn Fn(UnixStream) + Send + Sync>;

type Conns = Arc<Mutex<HashMap<u64, UnixStream>>>;

/// A socket at `path` whose connections each run [`Handler`] on a thread. Dropping it stops
/// accepting, shuts every open connection down and removes the socket file.
pub(crate) struct SockServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    conns: Conns,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for SockServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SockServer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SockServer {
    /// Binds `path` (replacing a stale socket file) and serves it; `name` names the threads.
    pub(crate) fn bind(path: &Path, name: &str, handler: Handler) -> io::Result<SockServer> {
        if std::fs::symlink_metadata(path).is_ok() {
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Conns = Arc::default();
        let (stop2, conns2, name2) = (stop.clone(), conns.clone(), name.to_owned());
        let thread = std::thread::Builder::new()
            .name(format!("{name}-accept"))
            .spawn(move || accept_loop(&listener, &stop2, &conns2, &name2, &handler))?;
        Ok(SockServer {
            path: path.to_path_buf(),
            stop,
            conns,
            thread: Some(thread),
        })
    }

    /// Shuts down every open connection (their handlers see end-of-file or an error).
    pub(crate) fn cut_connections(&self) {
        for c in lock(&self.conns).values() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn accept_loop(
    listener: &UnixListener,
    stop: &AtomicBool,
    conns: &Conns,
    name: &str,
    handler: &Handler,
) {
    let mut next = 0u64;
    for s in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let s = match s {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("{name}: accept failed: {e}");
                // EMFILE and friends: do not spin.
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
        };
        next += 1;
        let id = next;
        match s.try_clone() {
            Ok(c) => {
                lock(conns).insert(id, c);
            }
            Err(e) => {
                tracing::warn!("{name}: cannot track a connection: {e}");
                continue;
            }
        }
        let (h, conns2) = (handler.clone(), conns.clone());
        let spawned = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                h(s);
                lock(&conns2).remove(&id);
            });
        if let Err(e) = spawned {
            tracing::warn!("{name}: cannot start a connection thread: {e}");
            lock(conns).remove(&id);
        }
    }
}

impl Drop for SockServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop; if the socket file is gone it cannot be woken, so leave the
        // thread parked in accept rather than hang.
        let woke = UnixStream::connect(&self.path).is_ok();
        if let Some(t) = self.thread.take() {
            if woke {
                let _ = t.join();
            }
        }
        self.cut_connections();
        let _ = std::fs::remove_file(&self.path);
    }
}
