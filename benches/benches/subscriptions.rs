//! Subscription matching with 10,000 filters: the broker's trie against a
//! linear scan with the same matching rule (the baseline a naive broker has).

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use edgehub_broker::subscriptions::{SubEntry, SubscriptionTree};
use edgehub_broker::topic;
use edgehub_codec::{QoS, SubscriptionOptions};

/// 10k filters shaped like a gateway's: per-device exact topics, per-device
/// wildcards, some fleet-wide wildcards.
fn filters() -> Vec<String> {
    let mut f = Vec::with_capacity(10_000);
    for d in 0..4_000 {
        f.push(format!("devices/dev-{d}/messages/devicebound/#"));
        f.push(format!("devices/dev-{d}/modules/m1/inputs/+"));
    }
    for d in 0..1_990 {
        f.push(format!("site/{}/line/{}/telemetry", d % 50, d));
    }
    for w in [
        "site/+/line/+/telemetry",
        "site/7/#",
        "$iothub/twin/res/#",
        "+/+/+/+/+",
        "#",
    ] {
        f.push(w.to_string());
    }
    for i in 0..5 {
        f.push(format!("alerts/{i}/+"));
    }
    f.truncate(10_000);
    f
}

fn bench(c: &mut Criterion) {
    let filters = filters();
    let mut tree = SubscriptionTree::default();
    let entry = SubEntry {
        options: SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            ..Default::default()
        },
        id: None,
    };
    for (i, f) in filters.iter().enumerate() {
        let client: Arc<str> = format!("client-{i}").into();
        tree.insert(&client, None, f, entry);
    }
    assert_eq!(tree.len(), 10_000);
    let topics = [
        "devices/dev-1234/messages/devicebound/%24.mid=1",
        "site/7/line/1207/telemetry",
        "unrelated/topic",
    ];
    let mut g = c.benchmark_group("match_10k_filters");
    g.bench_function("trie", |b| {
        b.iter(|| {
            let (mut direct, mut shared) = (0, 0);
            for t in topics {
                tree.for_each_match(t, |_, _| direct += 1, |_| shared += 1);
            }
            direct + shared
        })
    });
    g.bench_function("linear-scan", |b| {
        b.iter(|| {
            let mut n = 0;
            for t in topics {
                n += filters.iter().filter(|f| topic::matches(f, t)).count();
            }
            n
        })
    });
    g.finish();

    // The write side: what one SUBSCRIBE and one UNSUBSCRIBE cost with 10k
    // filters present, including taking a private copy of the snapshot.
    let mut g = c.benchmark_group("change_10k_filters");
    let newcomer: Arc<str> = "newcomer".into();
    g.bench_function("snapshot_clone_insert_remove", |b| {
        b.iter(|| {
            let mut next = tree.clone();
            next.insert(
                &newcomer,
                None,
                "devices/dev-77/messages/devicebound/#",
                entry,
            );
            next.remove(&newcomer, None, "devices/dev-77/messages/devicebound/#");
            next.len()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
