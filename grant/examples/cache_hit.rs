//! Micro numbers (not a benchmark harness): the cost of a `MapCache` hit and of a map + unmap
//! on the local platform, with an in-process broker. Run with
//! `cargo run --release -p xenpv-grant --example cache_hit`.

use std::os::unix::net::UnixStream;
use std::time::Instant;

use xenpv_grant::local::{Broker, BrokerConfig, LocalGrants};
use xenpv_grant::{Access, GrantMap, GrantShare, MapCache, SharedPages};

fn client(b: &Broker, domid: u16) -> LocalGrants {
    let (a, s) = UnixStream::pair().expect("socketpair");
    let b = b.clone();
    std::thread::spawn(move || b.serve(s, domid));
    LocalGrants::from_stream(a).expect("hello")
}

fn main() {
    let b = Broker::new(BrokerConfig::default());
    b.create_domain(1).expect("dom1");
    b.create_domain(2).expect("dom2");
    let (front, back) = (client(&b, 1), client(&b, 2));
    let s = front.share(2, 64, Access::Writable).expect("share");
    let mut cache = MapCache::new(back.clone(), 64);
    for &g in s.grefs() {
        cache.get(1, g, Access::Writable).expect("map");
    }
    let n = 2_000_000u32;
    let t = Instant::now();
    for i in 0..n {
        let g = s.grefs()[(i % 64) as usize];
        let m = cache.get(1, g, Access::Writable).expect("hit");
        std::hint::black_box(&m);
    }
    let hit = t.elapsed() / n;
    let t = Instant::now();
    let k = 2000u32;
    for i in 0..k {
        let g = s.grefs()[(i % 64) as usize];
        let m = back.map_domain(1, &[g], Access::Writable).expect("map");
        std::hint::black_box(&m);
    }
    let map = t.elapsed() / k;
    println!("MapCache hit (incl. Arc clone+drop): {hit:?}; uncached map+unmap: {map:?}");
    println!("stats: {:?}", cache.stats());
}
