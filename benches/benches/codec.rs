//! Codec hot path: PUBLISH decode and encode, edgehub-codec side by side with
//! `mqttbytes` (the crate named at the outset) on the same bytes.

use bytes::{Bytes, BytesMut};
use criterion::{
    criterion_group, criterion_main, measurement::WallTime, BatchSize, BenchmarkGroup, BenchmarkId,
    Criterion, Throughput,
};
use edgehub_codec::{decode, encode, Packet, Properties, Protocol, Publish, QoS, Str};

fn publish(payload: usize, v5: bool) -> Publish {
    Publish {
        qos: QoS::AtLeastOnce,
        packet_id: 7,
        topic: Str::from("devices/sensor-0042/messages/events/temperature"),
        payload: Bytes::from(vec![0xAB; payload]),
        properties: if v5 {
            Properties {
                content_type: Some(Str::from("application/json")),
                user_properties: vec![(Str::from("k"), Str::from("v"))],
                ..Default::default()
            }
            .into()
        } else {
            Default::default()
        },
        ..Default::default()
    }
}

/// A read buffer holding 64 back-to-back copies of `p`, as after one socket read.
fn batch_of(p: &Packet, proto: Protocol) -> BytesMut {
    let mut wire = BytesMut::new();
    encode(p, proto, &mut wire, usize::MAX).unwrap();
    let mut batch = BytesMut::new();
    for _ in 0..64 {
        batch.extend_from_slice(&wire);
    }
    batch
}

/// Times `decode_all` over a fresh copy of `batch`; the copy is setup, not
/// timed, for every codec alike. `decode_all` returns the PUBLISHes decoded.
fn decode_bench(
    g: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    size: usize,
    batch: &BytesMut,
    decode_all: impl Fn(&mut BytesMut) -> usize,
) {
    g.bench_with_input(BenchmarkId::new(name, size), batch, |b, batch| {
        b.iter_batched(
            || batch.clone(),
            |mut buf| assert_eq!(decode_all(&mut buf), 64),
            BatchSize::SmallInput,
        )
    });
}

fn bench_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_publish");
    g.throughput(Throughput::Elements(64));
    for size in [256usize, 4096] {
        let batch = batch_of(&Packet::Publish(publish(size, false)), Protocol::V311);
        decode_bench(&mut g, "edgehub-v311", size, &batch, |buf| {
            let mut n = 0;
            while let Some(p) = decode(buf, Protocol::V311, usize::MAX).unwrap() {
                n += matches!(p, Packet::Publish(_)) as usize;
            }
            n
        });
        decode_bench(&mut g, "mqttbytes-v4", size, &batch, |buf| {
            let mut n = 0;
            while let Ok(p) = mqttbytes::v4::read(buf, usize::MAX) {
                n += matches!(p, mqttbytes::v4::Packet::Publish(_)) as usize;
            }
            n
        });
        let batch5 = batch_of(&Packet::Publish(publish(size, true)), Protocol::V5);
        decode_bench(&mut g, "edgehub-v5", size, &batch5, |buf| {
            let mut n = 0;
            while let Some(p) = decode(buf, Protocol::V5, usize::MAX).unwrap() {
                n += matches!(p, Packet::Publish(_)) as usize;
            }
            n
        });
        decode_bench(&mut g, "mqttbytes-v5", size, &batch5, |buf| {
            let mut n = 0;
            while let Ok(p) = mqttbytes::v5::read(buf, usize::MAX) {
                n += matches!(p, mqttbytes::v5::Packet::Publish(_)) as usize;
            }
            n
        });
    }
    g.finish();
}

fn bench_encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode_publish");
    for size in [256usize, 4096] {
        g.throughput(Throughput::Elements(64));
        let p = Packet::Publish(publish(size, false));
        g.bench_with_input(BenchmarkId::new("edgehub-v311", size), &p, |b, p| {
            let mut out = BytesMut::with_capacity(64 * (size + 64));
            b.iter(|| {
                out.clear();
                for _ in 0..64 {
                    encode(p, Protocol::V311, &mut out, usize::MAX).unwrap();
                }
            })
        });
        let reference = mqttbytes::v4::Publish {
            dup: false,
            qos: mqttbytes::QoS::AtLeastOnce,
            retain: false,
            topic: "devices/sensor-0042/messages/events/temperature".into(),
            pkid: 7,
            payload: Bytes::from(vec![0xAB; size]),
        };
        g.bench_with_input(
            BenchmarkId::new("mqttbytes-v4", size),
            &reference,
            |b, p| {
                let mut out = BytesMut::with_capacity(64 * (size + 64));
                b.iter(|| {
                    out.clear();
                    for _ in 0..64 {
                        p.write(&mut out).unwrap();
                    }
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench_decode, bench_encode);
criterion_main!(benches);
