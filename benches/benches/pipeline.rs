//! End to end in one process, without sockets: a QoS 1 telemetry PUBLISH as
//! bytes → decoded → IoT Hub topic and property bag → routes → group commit
//! to RocksDB → PUBACK encoded, with `WINDOW` messages in flight as a
//! connection keeps them; then the `$upstream` executor's side: read back
//! and acknowledged (removed). Per message; `fsync` and `os-buffered`.
//! What this leaves out is the network and TLS, which the loadtest measures.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edgehub::pipeline::{load_routes, Pipeline};
use edgehub_codec::{decode, encode, Packet, Protocol, PubResp, Publish, QoS, Str};
use edgehub_device::telemetry::enqueued_time_now;
use edgehub_store::{Durability, Store, StoreConfig};
use futures_util::stream::{FuturesOrdered, StreamExt};

/// Commits in flight, as a connection with Receive Maximum 128 keeps them.
const WINDOW: usize = 128;

fn publish_bytes(n: usize, payload: usize) -> Vec<BytesMut> {
    (0..n)
        .map(|i| {
            let mut b = BytesMut::new();
            let p = Packet::Publish(Publish {
                qos: QoS::AtLeastOnce,
                topic: Str::from(format!(
                    "devices/dev-17/messages/events/%24.ct=application%2Fjson&site=north&n={i}"
                )),
                packet_id: (i % 65535) as u16 + 1,
                payload: Bytes::from(vec![b'x'; payload]),
                ..Default::default()
            });
            encode(&p, Protocol::V311, &mut b, usize::MAX).unwrap();
            b
        })
        .collect()
}

fn pipeline(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    for (durability, label) in [
        (Durability::OsBuffered, "os-buffered"),
        (Durability::Fsync, "fsync"),
    ] {
        let mut g = c.benchmark_group(format!("pipeline_{label}"));
        g.sample_size(10).measurement_time(Duration::from_secs(4));
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = StoreConfig::new(dir.path().join("store"));
        cfg.durability = durability;
        cfg.min_free_disk_bytes = 0;
        let store = Store::open(cfg).unwrap();
        let pipeline = Pipeline::new(store.clone(), load_routes(None).unwrap());
        let upstream = pipeline
            .endpoint(&edgehub_router::Endpoint::Upstream)
            .unwrap();
        let mut reader = store.reader(upstream).unwrap();
        const N: usize = 4096;
        g.throughput(Throughput::Elements(N as u64));
        g.bench_function(BenchmarkId::new("qos1_256B", N), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let packets = publish_bytes(N, 256);
                    let start = Instant::now();
                    rt.block_on(async {
                        let mut pending = FuturesOrdered::new();
                        let mut acks = BytesMut::with_capacity(N * 4);
                        for mut raw in packets {
                            let Some(Packet::Publish(p)) =
                                decode(&mut raw, Protocol::V311, usize::MAX).unwrap()
                            else {
                                unreachable!()
                            };
                            let msg = edgehub::iothub::telemetry::telemetry_message(
                                "dev-17",
                                &p.topic,
                                p.payload,
                                &enqueued_time_now(),
                            )
                            .unwrap();
                            let stored = pipeline.submit(msg).unwrap().unwrap();
                            let id = p.packet_id;
                            pending.push_back(async move { (id, stored.await) });
                            if pending.len() >= WINDOW {
                                let (id, r) = pending.next().await.unwrap();
                                r.unwrap();
                                let ack = Packet::PubAck(PubResp::new(id, 0));
                                encode(&ack, Protocol::V311, &mut acks, usize::MAX).unwrap();
                            }
                        }
                        while let Some((id, r)) = pending.next().await {
                            r.unwrap();
                            let ack = Packet::PubAck(PubResp::new(id, 0));
                            encode(&ack, Protocol::V311, &mut acks, usize::MAX).unwrap();
                        }
                        // The executor's side: read back and remove.
                        let mut left = N;
                        while left > 0 {
                            let batch = reader.next(left.min(1024)).await.unwrap();
                            left -= batch.len();
                            reader.ack(&batch).unwrap();
                        }
                    });
                    total += start.elapsed();
                }
                total
            })
        });
        g.finish();
    }
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
