//! The local platform in-process, a disk image attached to domain 1, our blkback on a thread.
#![allow(dead_code)]

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use xenpv_blkfront::{BlkFront, Options, Platform};
use xenpv_evtchn::local::LocalEvtchn;
use xenpv_grant::local::LocalGrants;
use xenpv_xenstore::Client;

pub type Front = BlkFront<LocalGrants, LocalEvtchn>;

pub struct Env {
    pub daemon: xenpv_local::Daemon,
    pub root: PathBuf,
    pub img: PathBuf,
    pub dom0: Client,
    pub fe: String,
    pub be: String,
    pub _dir: tempfile::TempDir,
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn env(size: usize) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("xenpv");
    let daemon = xenpv_local::Daemon::start(xenpv_local::Config {
        state_dir: Some(root.clone()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(daemon.create_domain(Some(1), Some("guest1")).unwrap(), 1);
    let img = dir.path().join("disk.img");
    std::fs::write(&img, pattern(1, size)).unwrap();
    let dom0 = Client::connect_local(&root, 0).unwrap();
    let nodes = xenpv::toolstack::attach_disk(
        &dom0,
        1,
        &format!("vdev=xvda,access=rw,target={}", img.display()),
    )
    .unwrap();
    Env {
        daemon,
        root,
        img,
        dom0,
        fe: nodes.frontend_path,
        be: nodes.backend_path,
        _dir: dir,
    }
}

pub fn backend_platform(root: &Path) -> xenpv_blkback::device::Platform<LocalGrants, LocalEvtchn> {
    let ev = root.join("dom0/evtchn.sock");
    xenpv_blkback::device::Platform {
        xs: Client::connect_local(root, 0).unwrap(),
        grants: Arc::new(LocalGrants::connect(root.join("dom0/grant.sock")).unwrap()),
        open_evtchn: Arc::new(move || LocalEvtchn::connect(&ev)),
    }
}

/// Runs our blkback for the device on a thread (until the device is unplugged).
pub fn start_backend(env: &Env, cfg: xenpv_blkback::device::Config) -> std::thread::JoinHandle<()> {
    let p = backend_platform(&env.root);
    let be = env.be.clone();
    std::thread::spawn(move || {
        if let Err(e) = xenpv_blkback::device::serve(&p, &be, &cfg) {
            eprintln!("backend: {e}");
        }
    })
}

pub fn front_platform(root: &Path) -> Platform<LocalGrants, LocalEvtchn> {
    let ev = root.join("dom1/evtchn.sock");
    Platform {
        xs: Client::connect_local(root, 1).unwrap(),
        grants: Arc::new(LocalGrants::connect(root.join("dom1/grant.sock")).unwrap()),
        open_evtchn: Arc::new(move || LocalEvtchn::connect(&ev)),
    }
}

pub fn connect(env: &Env, opts: Options) -> Front {
    BlkFront::connect(front_platform(&env.root), &env.fe, opts).unwrap()
}

pub fn read_image(img: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(img).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0; len];
    f.read_exact(&mut buf).unwrap();
    buf
}
