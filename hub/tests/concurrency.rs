//! Many clients at once, driven by rumqttc (an independent Rust MQTT client),
//! plus flow-control cases that need byte-level control.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Raw, TestHub};
use edgehub_codec::{
    Packet, Properties, Props, Protocol, PubResp, Publish, QoS, Subscribe, SubscriptionOptions,
};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet as RPacket};

fn client(hub: &TestHub, id: &str) -> (AsyncClient, EventLoop) {
    let mut o = MqttOptions::new(id, hub.addr.ip().to_string(), hub.addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(20);
    AsyncClient::new(o, 1000)
}

/// Polls until CONNACK (and SUBACK when subscribing).
async fn wait_for(ev: &mut EventLoop, what: fn(&RPacket) -> bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(p) = ev.poll().await.expect("event loop error") {
                if what(&p) {
                    return;
                }
            }
        }
    })
    .await
    .expect("timed out waiting for the hub");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_publishers_many_subscribers_every_message_in_order() {
    const PUBLISHERS: usize = 20;
    const SUBSCRIBERS: usize = 5;
    const PER_PUBLISHER: usize = 200;
    let hub = TestHub::start(|c| c.max_queued_messages = 100_000).await;

    let mut sub_tasks = Vec::new();
    for s in 0..SUBSCRIBERS {
        let (c, mut ev) = client(&hub, &format!("sub-{s}"));
        c.subscribe("load/#", rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap();
        wait_for(&mut ev, |p| matches!(p, RPacket::SubAck(_))).await;
        sub_tasks.push(tokio::spawn(async move {
            let mut last: HashMap<String, usize> = HashMap::new();
            let mut count = 0;
            while count < PUBLISHERS * PER_PUBLISHER {
                match tokio::time::timeout(Duration::from_secs(30), ev.poll()).await {
                    Ok(Ok(Event::Incoming(RPacket::Publish(p)))) => {
                        let seq: usize = std::str::from_utf8(&p.payload).unwrap().parse().unwrap();
                        if let Some(prev) = last.insert(p.topic.clone(), seq) {
                            assert!(
                                seq > prev,
                                "out of order on {}: {seq} after {prev}",
                                p.topic
                            );
                        }
                        count += 1;
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => panic!("subscriber error: {e}"),
                    Err(_) => panic!("subscriber stalled at {count}"),
                }
            }
            drop(c);
            (count, last)
        }));
    }

    let mut pub_tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let (c, mut ev) = client(&hub, &format!("pub-{p}"));
        pub_tasks.push(tokio::spawn(async move {
            let sender = tokio::spawn({
                let c = c.clone();
                async move {
                    for i in 0..PER_PUBLISHER {
                        c.publish(
                            format!("load/{p}"),
                            rumqttc::QoS::AtLeastOnce,
                            false,
                            i.to_string(),
                        )
                        .await
                        .unwrap();
                    }
                }
            });
            let mut acked = 0;
            while acked < PER_PUBLISHER {
                match tokio::time::timeout(Duration::from_secs(30), ev.poll()).await {
                    Ok(Ok(Event::Incoming(RPacket::PubAck(_)))) => acked += 1,
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => panic!("publisher error: {e}"),
                    Err(_) => panic!("publisher stalled at {acked}"),
                }
            }
            sender.await.unwrap();
            acked
        }));
    }
    for t in pub_tasks {
        assert_eq!(t.await.unwrap(), PER_PUBLISHER);
    }
    for t in sub_tasks {
        let (count, last) = t.await.unwrap();
        assert_eq!(count, PUBLISHERS * PER_PUBLISHER);
        assert_eq!(last.len(), PUBLISHERS);
        assert!(last.values().all(|v| *v == PER_PUBLISHER - 1));
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_takeovers_leave_one_session() {
    let hub = TestHub::start(|_| {}).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let addr = hub.addr;
        tasks.push(tokio::spawn(async move {
            let mut r = Raw::open(addr, Protocol::V5).await;
            r.send(&common::connect_packet(
                "contested",
                Protocol::V5,
                Properties::default(),
            ))
            .await;
            let _ = r.recv_within(Duration::from_secs(10)).await;
            (i, r)
        }));
    }
    let mut conns = Vec::new();
    for t in tasks {
        conns.push(t.await.unwrap());
    }
    // Exactly one connection survives; every other one was told 0x8E and closed.
    let mut alive = 0;
    for (_, r) in conns.iter_mut() {
        match r.recv_within(Duration::from_millis(1500)).await {
            Err(()) => alive += 1,
            Ok(Some(Packet::Disconnect(d))) => {
                assert_eq!(d.reason, edgehub_codec::reason::SESSION_TAKEN_OVER)
            }
            Ok(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(alive, 1);
    // The survivor's socket is still open (held in `conns`), so its session stays.
    assert_eq!(hub.broker.session_count(), 1);
    drop(conns);
    hub.stop().await;
}

#[tokio::test]
async fn outgoing_topic_aliases() {
    let hub = TestHub::start(|_| {}).await;
    let props = Properties {
        topic_alias_maximum: Some(1),
        ..Default::default()
    };
    let mut sub = Raw::connected(hub.addr, "aliased", Protocol::V5, props).await;
    sub.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        properties: Props::default(),
        filters: vec![("al/#".into(), SubscriptionOptions::default())],
    }))
    .await;
    assert!(matches!(sub.recv().await, Some(Packet::SubAck(_))));
    let mut publisher = Raw::connected(hub.addr, "p", Protocol::V5, Properties::default()).await;
    for t in ["al/one", "al/one", "al/two", "al/one"] {
        publisher
            .send(&Packet::Publish(Publish {
                topic: t.into(),
                payload: t.as_bytes().to_vec().into(),
                ..Default::default()
            }))
            .await;
    }
    let mut got = Vec::new();
    for _ in 0..4 {
        match sub.recv().await {
            Some(Packet::Publish(p)) => got.push((p.topic.to_string(), p.properties.topic_alias)),
            other => panic!("{other:?}"),
        }
    }
    // First use sets alias 1 with the topic; then the alias alone; a second
    // topic exceeds the client's maximum of 1 and goes out in full.
    assert_eq!(
        got,
        vec![
            ("al/one".to_string(), Some(1)),
            (String::new(), Some(1)),
            ("al/two".to_string(), None),
            (String::new(), Some(1)),
        ]
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_reads_does_not_stall_others() {
    let hub = TestHub::start(|c| {
        c.max_queued_messages = 50;
        c.max_inflight = 10;
    })
    .await;
    let filter = || {
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            properties: Props::default(),
            filters: vec![(
                "flood".into(),
                SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    ..Default::default()
                },
            )],
        })
    };
    // The stuck subscriber subscribes and then never reads or acknowledges.
    let mut stuck = Raw::connected(hub.addr, "stuck", Protocol::V311, Properties::default()).await;
    stuck.send(&filter()).await;
    assert!(matches!(stuck.recv().await, Some(Packet::SubAck(_))));
    let mut healthy =
        Raw::connected(hub.addr, "healthy", Protocol::V311, Properties::default()).await;
    healthy.send(&filter()).await;
    assert!(matches!(healthy.recv().await, Some(Packet::SubAck(_))));
    let mut publisher =
        Raw::connected(hub.addr, "flooder", Protocol::V311, Properties::default()).await;
    let payload = bytes::Bytes::from(vec![b'x'; 8 * 1024]);
    const N: u16 = 2000;
    for i in 1..=N {
        publisher
            .send(&Packet::Publish(Publish {
                qos: QoS::AtLeastOnce,
                packet_id: i,
                topic: "flood".into(),
                payload: payload.clone(),
                ..Default::default()
            }))
            .await;
        // The healthy one keeps up and acknowledges.
        match healthy.recv().await {
            Some(Packet::Publish(p)) => {
                healthy
                    .send(&Packet::PubAck(PubResp::new(p.packet_id, 0)))
                    .await
            }
            other => panic!("healthy subscriber got {other:?}"),
        }
    }
    let mut acks = 0;
    while acks < N {
        match publisher.recv().await {
            Some(Packet::PubAck(_)) => acks += 1,
            other => panic!("publisher got {other:?}"),
        }
    }
    // The stuck session holds its window plus a bounded queue, nothing more.
    let dropped = hub
        .broker
        .stats
        .messages_dropped_queue_full
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(dropped, (N as u64) - 10 - 50);
    hub.stop().await;
}
