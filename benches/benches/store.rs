//! Store: group-commit append (batch sizes 1/64/1024, 256 B and 4 KiB
//! bodies) with the write-ahead log synced (`fsync`, the default) and
//! unsynced (`os-buffered`), and read-back of a backlog from disk (what an
//! endpoint does after a restart). Throughput is per message. The physical
//! limit for `fsync` is the disk's sync rate: `cargo run --release -p
//! edgehub-benches --example fsync_rate` measures it on the same disk.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edgehub_router::{Message, MessageSource, SystemProperty};
use edgehub_store::{Append, Durability, EndpointHandle, Store, StoreConfig, Target};

fn message(size: usize) -> Arc<Message> {
    Arc::new(
        Message::new(vec![b'x'; size])
            .with_property("site", "north")
            .with_system(SystemProperty::ConnectionDeviceId, "dev-17")
            .with_system(SystemProperty::EnqueuedTime, "2026-11-26T20:00:00Z")
            .with_system(SystemProperty::MessageId, "0123456789abcdef")
            .with_source(MessageSource::Telemetry),
    )
}

/// `n` copies of `msg` for `$upstream` at the lowest priority, no expiry.
fn appends(msg: &Arc<Message>, ep: &Arc<EndpointHandle>, n: usize) -> Vec<Append> {
    (0..n)
        .map(|_| Append::new(msg.clone(), vec![Target::new(ep, 10, 0)]))
        .collect()
}

fn open(dir: &std::path::Path, durability: Durability) -> Store {
    let mut cfg = StoreConfig::new(dir.join("store"));
    cfg.durability = durability;
    cfg.min_free_disk_bytes = 0;
    Store::open(cfg).unwrap()
}

fn append(c: &mut Criterion) {
    for (durability, label, batches) in [
        (
            Durability::OsBuffered,
            "os-buffered",
            &[1usize, 64, 1024][..],
        ),
        (Durability::Fsync, "fsync", &[1, 64, 1024][..]),
    ] {
        let mut g = c.benchmark_group(format!("store_append_{label}"));
        g.sample_size(10).measurement_time(Duration::from_secs(3));
        for size in [256usize, 4096] {
            for &batch in batches {
                let dir = tempfile::tempdir().unwrap();
                let store = open(dir.path(), durability);
                let ep = store.endpoint("$upstream").unwrap();
                let msg = message(size);
                g.throughput(Throughput::Elements(batch as u64));
                g.bench_function(BenchmarkId::new(format!("{size}B"), batch), |b| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            // Encoding happens on the connection's task in the
                            // hub, so it is timed too.
                            let start = Instant::now();
                            let items = appends(&msg, &ep, batch);
                            let r = store.append_batch(&items);
                            total += start.elapsed();
                            assert!(r.iter().all(|r| r.is_ok()));
                        }
                        total
                    })
                });
            }
        }
        g.finish();
    }
}

fn read_back(c: &mut Criterion) {
    let mut g = c.benchmark_group("store_read_back");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    for size in [256usize, 4096] {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Durability::OsBuffered);
        let ep = store.endpoint("$upstream").unwrap();
        let msg = message(size);
        const N: usize = 20_000;
        for _ in 0..N / 1000 {
            store.append_batch(&appends(&msg, &ep, 1000));
        }
        g.throughput(Throughput::Elements(N as u64));
        g.bench_function(
            BenchmarkId::new("backlog_from_disk", format!("{size}B")),
            |b| {
                b.iter(|| {
                    // A fresh reader starts at the checkpoint and reads RocksDB.
                    let mut r = store.reader(ep.clone()).unwrap();
                    let mut n = 0;
                    loop {
                        let batch = r.try_next(256).unwrap();
                        if batch.is_empty() {
                            break;
                        }
                        n += batch.len();
                    }
                    assert_eq!(n, N);
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, append, read_back);
criterion_main!(benches);
