//! A local xenstore for tests: a server with one socket per domain under a fresh directory.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use xenpv_xenstore::{Access, Client, Listener, Perm, Quotas, Server};

pub struct Env {
    pub root: PathBuf,
    pub server: Server,
    listeners: Vec<Listener>,
}

impl Env {
    /// A server with sockets for dom0 and each of `domids`; each domain gets its home
    /// `/local/domain/<D>` owned by it (as `xenpv domain create` will do).
    pub fn new(domids: &[u32]) -> Env {
        Self::with_quotas(domids, Quotas::default())
    }

    pub fn with_quotas(domids: &[u32], quotas: Quotas) -> Env {
        static N: AtomicU32 = AtomicU32::new(0);
        let root = std::env::temp_dir().join(format!(
            "xenpv-xs-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&root);
        let server = Server::with_quotas(quotas);
        let mut listeners = vec![server.bind(sock(&root, 0), 0).expect("bind dom0 socket")];
        for &d in domids {
            let home = format!("/local/domain/{d}");
            server.mkdir(&home).expect("mkdir home");
            server
                .set_perms(&home, &[Perm::new(d, Access::None)])
                .expect("perms");
            server
                .write(&format!("{home}/domid"), d.to_string().as_bytes())
                .expect("domid");
            server.introduce_domain(d);
            listeners.push(server.bind(sock(&root, d), d).expect("bind domain socket"));
        }
        Env {
            root,
            server,
            listeners,
        }
    }

    pub fn sock(&self, domid: u32) -> PathBuf {
        sock(&self.root, domid)
    }

    pub fn client(&self, domid: u32) -> Client {
        Client::connect_local(&self.root, domid).expect("connect")
    }
}

fn sock(root: &Path, domid: u32) -> PathBuf {
    root.join(format!("dom{domid}")).join("xenstore.sock")
}

impl Drop for Env {
    fn drop(&mut self) {
        self.listeners.clear();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
