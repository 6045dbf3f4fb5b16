//! Serves a local xenstore: `xenstored ROOT DOMID...` binds `ROOT/dom<D>/xenstore.sock` for each
//! domain and runs until killed. For trying `XENSTORED_PATH=ROOT/dom0/xenstore.sock xenstore-ls`.

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let root = std::path::PathBuf::from(args.next().unwrap_or_else(|| "/tmp/xenpv-xs".into()));
    let server = xenpv_xenstore::Server::new();
    let mut listeners = Vec::new();
    let domids: Vec<u32> = args.filter_map(|a| a.parse().ok()).collect();
    for d in if domids.is_empty() { vec![0] } else { domids } {
        if d != 0 {
            let home = format!("/local/domain/{d}");
            let _ = server.mkdir(&home);
            let _ = server.set_perms(
                &home,
                &[xenpv_xenstore::Perm::new(d, xenpv_xenstore::Access::None)],
            );
            server.introduce_domain(d);
        }
        let path = root.join(format!("dom{d}")).join("xenstore.sock");
        listeners.push(server.bind(&path, d)?);
        println!("{}", path.display());
    }
    loop {
        std::thread::park();
    }
}
