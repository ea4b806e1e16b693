//! How long opening the store takes with a backlog: fills a store with N
//! messages (256 B, one endpoint), closes it, then times `Store::open` and the
//! first batch a fresh reader gets.
//!
//! `cargo run --release -p edgehub-benches --example store_startup [dir] [N]`

use std::sync::Arc;
use std::time::Instant;

use edgehub_router::{Message, SystemProperty};
use edgehub_store::{Append, Durability, Store, StoreConfig, Target};

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| ".".into());
    let n: usize = args
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let path = std::path::Path::new(&dir).join(".store_startup");
    let _ = std::fs::remove_dir_all(&path);
    let mut cfg = StoreConfig::new(&path);
    cfg.durability = Durability::OsBuffered;
    cfg.min_free_disk_bytes = 0;
    {
        let store = Store::open(cfg.clone()).unwrap();
        let ep = store.endpoint("$upstream").unwrap();
        let msg = Arc::new(
            Message::new(vec![b'x'; 256]).with_system(SystemProperty::ConnectionDeviceId, "dev-17"),
        );
        let start = Instant::now();
        let mut left = n;
        while left > 0 {
            let k = left.min(1024);
            let items: Vec<Append> = (0..k)
                .map(|_| Append::new(msg.clone(), vec![Target::new(&ep, 10, 0)]))
                .collect();
            assert!(store.append_batch(&items).iter().all(|r| r.is_ok()));
            left -= k;
        }
        println!(
            "filled {n} messages in {:.2} s",
            start.elapsed().as_secs_f64()
        );
    }
    let start = Instant::now();
    let store = Store::open(cfg).unwrap();
    let opened = start.elapsed();
    let ep = store.endpoint("$upstream").unwrap();
    let mut reader = store.reader(ep).unwrap();
    let first = reader.try_next(256).unwrap();
    let ready = start.elapsed();
    assert_eq!(first.len(), 256);
    println!(
        "reopened with {n} stored ({} MiB counted): open {:.0} ms, first batch read {:.0} ms after start",
        store.live_bytes() >> 20,
        opened.as_secs_f64() * 1e3,
        ready.as_secs_f64() * 1e3
    );
    drop(reader);
    drop(store);
    let _ = std::fs::remove_dir_all(&path);
}
