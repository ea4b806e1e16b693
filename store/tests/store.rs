//! The store against a real RocksDB in a temporary directory.

use std::collections::BTreeMap;
use std::sync::Arc;

use edgehub_router::{Message, SystemProperty};
use edgehub_store::{
    Append, Clock, Durability, Store, StoreConfig, StoreError, Table, Target, ENTRY_OVERHEAD,
};

fn config(dir: &std::path::Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir.join("store"));
    c.min_free_disk_bytes = 0;
    c
}

fn msg(body: &str) -> Arc<Message> {
    Arc::new(
        Message::new(body.as_bytes().to_vec())
            .with_system(SystemProperty::ConnectionDeviceId, "dev1")
            .with_property("n", body),
    )
}

fn append(store: &Store, body: &str, targets: Vec<Target>) -> Result<u64, StoreError> {
    store
        .append_batch(&[Append::new(msg(body), targets)])
        .pop()
        .unwrap()
}

fn bodies(entries: &[edgehub_store::Entry]) -> Vec<String> {
    entries
        .iter()
        .map(|e| String::from_utf8(e.message.body.to_vec()).unwrap())
        .collect()
}

#[test]
fn body_lives_until_every_endpoint_has_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    let up = store.endpoint("$upstream").unwrap();
    let m = store.endpoint("module-a").unwrap();
    append(
        &store,
        "one",
        vec![Target::new(&up, 10, 0), Target::new(&m, 3, 0)],
    )
    .unwrap();
    append(&store, "two", vec![Target::new(&up, 10, 0)]).unwrap();
    assert!(store.live_bytes() > 0);

    let got = store.peek(&up, 10).unwrap();
    assert_eq!(bodies(&got), ["one", "two"]);
    assert_eq!(got[0].message.property("n").map(|v| &**v), Some("one"));
    assert_eq!(store.ack(&up, &got).unwrap(), 2);
    assert!(store.peek(&up, 10).unwrap().is_empty());
    assert_eq!(up.checkpoint(10), 2);

    // "one" is still held by the module's queue.
    let got = store.peek(&m, 10).unwrap();
    assert_eq!(bodies(&got), ["one"]);
    assert_eq!(
        got[0]
            .message
            .system(SystemProperty::ConnectionDeviceId)
            .map(|v| &**v),
        Some("dev1")
    );
    store.ack(&m, &got).unwrap();
    assert_eq!(store.live_bytes(), 0, "all bodies and entries released");
    // Acknowledging again is harmless and does not double-count.
    assert_eq!(store.ack(&m, &got).unwrap(), 0);
    assert_eq!(store.live_bytes(), 0);
}

#[test]
fn everything_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let first_seq;
    {
        let store = Store::open(config(dir.path())).unwrap();
        let up = store.endpoint("$upstream").unwrap();
        for i in 0..5 {
            append(&store, &format!("m{i}"), vec![Target::new(&up, 10, 0)]).unwrap();
        }
        let got = store.peek(&up, 2).unwrap();
        store.ack(&up, &got).unwrap();
        first_seq = got[0].seq;
        store.put(Table::Retained, b"a/b", b"retained").unwrap();
    }
    let store = Store::open(config(dir.path())).unwrap();
    let up = store.endpoint("$upstream").unwrap();
    assert_eq!(up.checkpoint(10), first_seq + 1);
    assert_eq!(bodies(&store.peek(&up, 10).unwrap()), ["m2", "m3", "m4"]);
    assert_eq!(
        store.get(Table::Retained, b"a/b").unwrap().as_deref(),
        Some(&b"retained"[..])
    );
    // Sequence numbers keep growing across restarts, even once all is acked.
    let got = store.peek(&up, 10).unwrap();
    store.ack(&up, &got).unwrap();
    drop(up);
    drop(store);
    let store = Store::open(config(dir.path())).unwrap();
    let up = store.endpoint("$upstream").unwrap();
    let seq = append(&store, "after", vec![Target::new(&up, 10, 0)]).unwrap();
    assert!(seq > got.last().unwrap().seq);
    assert_eq!(bodies(&store.peek(&up, 10).unwrap()), ["after"]);
    let rest = store.peek(&up, 10).unwrap();
    store.ack(&up, &rest).unwrap();
    assert_eq!(
        store.live_bytes(),
        0,
        "the byte count is durable and exact across reopens"
    );
}

#[test]
fn reader_serves_strict_priority_then_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    let ep = store.endpoint("module-a").unwrap();
    append(&store, "low1", vec![Target::new(&ep, 10, 0)]).unwrap();
    append(&store, "mid", vec![Target::new(&ep, 5, 0)]).unwrap();
    append(&store, "low2", vec![Target::new(&ep, 10, 0)]).unwrap();
    append(&store, "high", vec![Target::new(&ep, 0, 0)]).unwrap();
    let mut r = store.reader(ep.clone()).unwrap();
    assert!(matches!(
        store.reader(ep.clone()),
        Err(StoreError::ReaderBusy(_))
    ));
    let mut seen = Vec::new();
    loop {
        let b = r.try_next(10).unwrap();
        if b.is_empty() {
            break;
        }
        seen.extend(bodies(&b));
        r.ack(&b).unwrap();
    }
    assert_eq!(seen, ["high", "mid", "low1", "low2"]);
}

#[test]
fn reader_falls_back_to_disk_when_the_live_tail_overflows_and_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.live_cache_entries = 4;
    {
        let store = Store::open(cfg.clone()).unwrap();
        let ep = store.endpoint("$upstream").unwrap();
        let mut r = store.reader(ep.clone()).unwrap();
        for i in 0..10 {
            append(&store, &format!("m{i}"), vec![Target::new(&ep, 10, 0)]).unwrap();
        }
        let b = r.try_next(3).unwrap();
        assert_eq!(
            bodies(&b),
            ["m0", "m1", "m2"],
            "read from disk: the tail overflowed"
        );
        r.ack(&b).unwrap();
        let b = r.try_next(100).unwrap();
        assert_eq!(
            bodies(&b),
            ["m3", "m4", "m5"],
            "disk up to where the tail is complete"
        );
        let b2 = r.try_next(100).unwrap();
        assert_eq!(
            bodies(&b2),
            ["m6", "m7", "m8", "m9"],
            "then the in-memory tail"
        );
        r.ack(&b2).unwrap(); // m3..m5 taken but never acknowledged
    }
    let store = Store::open(cfg).unwrap();
    let ep = store.endpoint("$upstream").unwrap();
    let mut r = store.reader(ep).unwrap();
    assert_eq!(bodies(&r.try_next(100).unwrap()), ["m3", "m4", "m5"]);
    assert!(r.try_next(100).unwrap().is_empty());
}

#[test]
fn expired_messages_are_never_delivered_and_are_swept() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    let clock = Clock::manual(1_000_000);
    cfg.clock = clock.clone();
    let store = Store::open(cfg).unwrap();
    let a = store.endpoint("a").unwrap();
    let b = store.endpoint("b").unwrap();
    append(
        &store,
        "short",
        vec![
            Target::new(&a, 10, 1_001_000),
            Target::new(&b, 10, 1_005_000),
        ],
    )
    .unwrap();
    append(&store, "forever", vec![Target::new(&a, 10, 0)]).unwrap();
    clock.set(1_002_000);
    // The reader skips (and removes) what expired, even before a sweep.
    let mut r = store.reader(a.clone()).unwrap();
    assert_eq!(bodies(&r.try_next(10).unwrap()), ["forever"]);
    assert_eq!(
        store
            .stats()
            .expired
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(bodies(&store.peek(&b, 10).unwrap()), ["short"]);
    clock.set(1_005_000);
    assert!(
        store.peek(&b, 10).unwrap().is_empty(),
        "peek hides expired entries"
    );
    assert_eq!(store.sweep_expired().unwrap(), 1);
    assert_eq!(
        store
            .stats()
            .expired
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    assert_eq!(store.sweep_expired().unwrap(), 0);
    let forever = store.peek(&a, 10).unwrap();
    store.ack(&a, &forever).unwrap();
    assert_eq!(store.live_bytes(), 0);
}

#[test]
fn budget_refuses_new_messages_and_recovers_after_draining() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.max_bytes = Some(2_000);
    let store = Store::open(cfg).unwrap();
    let ep = store.endpoint("$upstream").unwrap();
    let body = "x".repeat(300);
    let mut accepted = 0;
    let err = loop {
        match append(&store, &body, vec![Target::new(&ep, 10, 0)]) {
            Ok(_) => accepted += 1,
            Err(e) => break e,
        }
    };
    assert!(err.is_quota(), "{err}");
    assert!(err.to_string().contains("--store-max-bytes"));
    assert!(
        accepted >= 2 && store.live_bytes() <= 2_000,
        "{accepted} {}",
        store.live_bytes()
    );
    // Nothing stored was harmed by the refusal.
    assert_eq!(store.peek(&ep, 100).unwrap().len(), accepted);
    let got = store.peek(&ep, 100).unwrap();
    store.ack(&ep, &got[..1]).unwrap();
    append(&store, &body, vec![Target::new(&ep, 10, 0)]).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_are_group_committed_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.durability = Durability::OsBuffered;
    let store = Store::open(cfg).unwrap();
    let ep = store.endpoint("$upstream").unwrap();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let store = store.clone();
        let ep = ep.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..200 {
                let a = Append::new(msg(&format!("t{t}-{i}")), vec![Target::new(&ep, 10, 0)]);
                seqs.push(store.append(a).await.unwrap());
            }
            seqs
        }));
    }
    let mut reader = store.reader(ep.clone()).unwrap();
    let mut all = Vec::new();
    for t in tasks {
        let seqs = t.await.unwrap();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "per-sender order");
        all.extend(seqs);
    }
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 1600);
    let mut got = Vec::new();
    while got.len() < 1600 {
        let b = tokio::time::timeout(std::time::Duration::from_secs(10), reader.next(500))
            .await
            .expect("reader wakes up")
            .unwrap();
        reader.ack(&b).unwrap();
        got.extend(b.iter().map(|e| e.seq));
    }
    assert_eq!(
        got, all,
        "reader sees every message once, in sequence order"
    );
}

/// Random appends, acknowledgements, expiry and reopens against a model.
mod model {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Append {
            targets: Vec<(usize, u8, Option<u64>)>,
            len: usize,
        },
        Ack {
            ep: usize,
            n: usize,
            skip: usize,
        },
        Advance(u64),
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (prop::collection::btree_map(0usize..3, (prop_oneof![Just(0u8), Just(4), Just(10)], prop::option::of(1u64..50)), 1..=3), 0usize..300)
                .prop_map(|(t, len)| Op::Append { targets: t.into_iter().map(|(e, (p, ttl))| (e, p, ttl)).collect(), len }),
            3 => (0usize..3, 1usize..6, 0usize..3).prop_map(|(ep, n, skip)| Op::Ack { ep, n, skip }),
            1 => (1u64..30).prop_map(Op::Advance),
            1 => Just(Op::Reopen),
        ]
    }

    // seq -> (record len, endpoint -> (priority, expires_at))
    type Model = BTreeMap<u64, (u64, BTreeMap<usize, (u8, u64)>)>;

    fn expected(model: &Model, ep: usize, now: u64) -> Vec<u64> {
        let mut v: Vec<(u8, u64)> = model
            .iter()
            .filter_map(|(seq, (_, t))| t.get(&ep).map(|(p, exp)| (*p, *exp, *seq)))
            .filter(|(_, exp, _)| *exp == 0 || *exp > now)
            .map(|(p, _, s)| (p, s))
            .collect();
        v.sort();
        v.into_iter().map(|(_, s)| s).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn store_matches_model(ops in prop::collection::vec(op(), 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let clock = Clock::manual(1_000);
            let mut cfg = config(dir.path());
            cfg.clock = clock.clone();
            cfg.live_cache_entries = 3;
            let mut store = Store::open(cfg.clone()).unwrap();
            let names = ["$upstream", "a", "b"];
            let mut eps: Vec<_> = names.iter().map(|n| store.endpoint(n).unwrap()).collect();
            let mut model = Model::new();
            let mut now = 1_000u64;
            for op in ops {
                match op {
                    Op::Append { targets, len } => {
                        let a = Append::new(
                            Arc::new(Message::new(vec![b'x'; len])),
                            targets.iter().map(|(e, p, ttl)| Target::new(&eps[*e], *p, ttl.map(|t| now + t).unwrap_or(0))).collect(),
                        );
                        let rec = a.cost() - ENTRY_OVERHEAD * targets.len() as u64;
                        let seq = store.append_batch(&[a]).pop().unwrap().unwrap();
                        model.insert(seq, (rec, targets.iter().map(|(e, p, ttl)| (*e, (*p, ttl.map(|t| now + t).unwrap_or(0)))).collect()));
                    }
                    Op::Ack { ep, n, skip } => {
                        let got = store.peek(&eps[ep], n + skip).unwrap();
                        let acked: Vec<_> = got.into_iter().skip(skip).collect();
                        store.ack(&eps[ep], &acked).unwrap();
                        for e in &acked {
                            let entry = model.get_mut(&e.seq).unwrap();
                            entry.1.remove(&ep);
                        }
                    }
                    Op::Advance(d) => {
                        now += d;
                        clock.set(now);
                        store.sweep_expired().unwrap();
                        for (_, t) in model.values_mut() {
                            t.retain(|_, (_, exp)| *exp == 0 || *exp > now);
                        }
                    }
                    Op::Reopen => {
                        drop(eps);
                        drop(store);
                        store = Store::open(cfg.clone()).unwrap();
                        eps = names.iter().map(|n| store.endpoint(n).unwrap()).collect();
                    }
                }
                model.retain(|_, (_, t)| !t.is_empty());
                for (i, ep) in eps.iter().enumerate() {
                    let seqs: Vec<u64> = store.peek(ep, 10_000).unwrap().iter().map(|e| e.seq).collect();
                    prop_assert_eq!(seqs, expected(&model, i, now), "endpoint {}", names[i]);
                }
                // Entries past their expiry but not yet swept still count.
                let want: u64 = model.values().map(|(rec, t)| rec + ENTRY_OVERHEAD * t.len() as u64).sum();
                prop_assert_eq!(store.live_bytes(), want);
            }
            // A reader sees the same as peek, in the same order.
            let want = expected(&model, 0, now);
            let mut r = store.reader(eps[0].clone()).unwrap();
            let mut got = Vec::new();
            loop {
                let b = r.try_next(2).unwrap();
                if b.is_empty() { break; }
                got.extend(b.iter().map(|e| e.seq));
            }
            prop_assert_eq!(got, want);
        }
    }
}

#[test]
fn queue_lengths_follow_appends_and_removals_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(config(dir.path())).unwrap();
        let up = store.endpoint("$upstream").unwrap();
        let m = store.endpoint("module-a").unwrap();
        for i in 0..5 {
            let prio = if i < 2 { 0 } else { 10 };
            append(
                &store,
                &format!("m{i}"),
                vec![Target::new(&up, prio, 0), Target::new(&m, 3, 0)],
            )
            .unwrap();
        }
        assert_eq!((up.queue_length(0), up.queue_length(10)), (2, 3));
        assert_eq!(m.queue_length(3), 5);
        let first = store.peek(&up, 1).unwrap();
        store.ack(&up, &first).unwrap();
        store.ack(&up, &first).unwrap(); // twice: counted once
        assert_eq!((up.queue_length(0), up.queue_length(10)), (1, 3));
    }
    let store = Store::open(config(dir.path())).unwrap();
    let up = store.endpoint("$upstream").unwrap();
    let m = store.endpoint("module-a").unwrap();
    assert_eq!((up.queue_length(0), up.queue_length(10)), (1, 3));
    assert_eq!(m.queue_length(3), 5);
}
