//! Bad input on raw sockets: each case is answered as the specification says,
//! the hub stays up, and other clients are not disturbed.

mod common;

use std::time::Duration;

use common::{Raw, TestHub};
use edgehub_codec::{
    reason, Packet, Properties, Props, Protocol, Publish, QoS, Subscribe, SubscriptionOptions,
};

async fn healthy_pair(hub: &TestHub) -> (Raw, Raw) {
    let mut sub = Raw::connected(hub.addr, "watcher", Protocol::V311, Properties::default()).await;
    sub.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        properties: Props::default(),
        filters: vec![("health".into(), SubscriptionOptions::default())],
    }))
    .await;
    assert!(matches!(sub.recv().await, Some(Packet::SubAck(_))));
    let publisher = Raw::connected(hub.addr, "prober", Protocol::V311, Properties::default()).await;
    (sub, publisher)
}

async fn still_healthy(sub: &mut Raw, publisher: &mut Raw, n: u8) {
    publisher
        .send(&Packet::Publish(Publish {
            topic: "health".into(),
            payload: vec![n].into(),
            ..Default::default()
        }))
        .await;
    match sub.recv().await {
        Some(Packet::Publish(p)) => assert_eq!(&p.payload[..], &[n]),
        other => panic!("watcher got {other:?}"),
    }
}

/// (bytes after a valid CONNECT, v5 DISCONNECT reason expected)
fn after_connect_cases() -> Vec<(&'static str, Vec<u8>, u8)> {
    vec![
        (
            "reserved packet type 0",
            vec![0x00, 0x00],
            reason::MALFORMED_PACKET,
        ),
        (
            "PUBLISH QoS 3",
            vec![0x36, 0x05, 0, 1, b't', 0, 1],
            reason::MALFORMED_PACKET,
        ),
        (
            "SUBSCRIBE bad flags",
            vec![0x80, 0x06, 0, 1, 0, 1, b'a', 0],
            reason::MALFORMED_PACKET,
        ),
        (
            "SUBSCRIBE no filters",
            vec![0x82, 0x03, 0, 1, 0],
            reason::PROTOCOL_ERROR,
        ),
        (
            "string past end",
            vec![0x30, 0x04, 0, 9, b't', 0],
            reason::MALFORMED_PACKET,
        ),
        (
            "invalid UTF-8 topic",
            vec![0x30, 0x05, 0, 2, 0xC3, 0x28, 0],
            reason::MALFORMED_PACKET,
        ),
        (
            "remaining length 5 bytes",
            vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
            reason::MALFORMED_PACKET,
        ),
        (
            "second CONNECT",
            vec![
                0x10, 0x0E, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 10, 0, 0, 1, b'x',
            ],
            reason::PROTOCOL_ERROR,
        ),
        (
            "server-only CONNACK",
            vec![0x20, 0x03, 0, 0, 0],
            reason::PROTOCOL_ERROR,
        ),
        (
            "unknown property",
            vec![0x30, 0x06, 0, 1, b't', 2, 0x7F, 0],
            reason::MALFORMED_PACKET,
        ),
        (
            "duplicate property",
            vec![0x30, 0x08, 0, 1, b't', 4, 0x01, 0, 0x01, 1],
            reason::PROTOCOL_ERROR,
        ),
        (
            "PUBLISH packet id 0",
            vec![0x32, 0x06, 0, 1, b't', 0, 0, 0],
            reason::MALFORMED_PACKET,
        ),
        (
            "AUTH without method",
            vec![0xF0, 0x00],
            reason::PROTOCOL_ERROR,
        ),
    ]
}

#[tokio::test]
async fn malformed_packets_get_the_specified_reason_then_close() {
    let hub = TestHub::start(|_| {}).await;
    let (mut sub, mut publisher) = healthy_pair(&hub).await;
    for (i, (name, bytes, code)) in after_connect_cases().into_iter().enumerate() {
        let mut c = Raw::connected(
            hub.addr,
            &format!("bad-{i}"),
            Protocol::V5,
            Properties::default(),
        )
        .await;
        c.send_raw(&bytes).await;
        match c.recv().await {
            Some(Packet::Disconnect(d)) => assert_eq!(d.reason, code, "{name}"),
            other => panic!("{name}: expected DISCONNECT, got {other:?}"),
        }
        assert!(c.closed().await, "{name}: connection left open");
        still_healthy(&mut sub, &mut publisher, i as u8).await;
    }
    // MQTT 3.1.1 has no DISCONNECT from the server: just closed.
    for (i, (name, bytes, _)) in after_connect_cases().into_iter().enumerate() {
        if name.contains("property") || name.contains("AUTH") {
            continue; // not malformed in 3.1.1 terms the same way; covered above
        }
        let mut c = Raw::connected(
            hub.addr,
            &format!("bad3-{i}"),
            Protocol::V311,
            Properties::default(),
        )
        .await;
        c.send_raw(&bytes).await;
        match c.recv_within(Duration::from_secs(10)).await {
            Ok(None) => {}
            other => panic!("{name}: expected close, got {other:?}"),
        }
    }
    still_healthy(&mut sub, &mut publisher, 200).await;
    hub.stop().await;
}

#[tokio::test]
async fn bad_first_packets_are_closed() {
    let hub = TestHub::start(|_| {}).await;
    let (mut sub, mut publisher) = healthy_pair(&hub).await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("PINGREQ first", vec![0xC0, 0x00]),
        (
            "truncated CONNECT then EOF",
            vec![0x10, 0x20, 0, 4, b'M', b'Q'],
        ),
        (
            "bad protocol name",
            vec![0x10, 0x0C, 0, 4, b'M', b'Q', b'X', b'X', 4, 2, 0, 10, 0, 0],
        ),
        (
            "reserved connect flag",
            vec![0x10, 0x0C, 0, 4, b'M', b'Q', b'T', b'T', 4, 3, 0, 10, 0, 0],
        ),
        ("zero-length", vec![]),
    ];
    for (name, bytes) in cases {
        let mut c = Raw::open(hub.addr, Protocol::V311).await;
        c.send_raw(&bytes).await;
        if name.starts_with("truncated") || name == "zero-length" {
            c.stream.shutdown().await.ok();
        }
        assert!(c.closed().await, "{name}: connection left open");
    }
    // A malformed MQTT 5 CONNECT gets CONNACK 0x81 before the close.
    let mut c = Raw::open(hub.addr, Protocol::V5).await;
    c.send_raw(
        &[
            0x10, 0x0F, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 10, 2, 0x7F, 0, 0, 1, b'x',
        ][..17],
    )
    .await;
    c.send_raw(b"x").await;
    match c.recv().await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code, reason::MALFORMED_PACKET),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    still_healthy(&mut sub, &mut publisher, 1).await;
    hub.stop().await;
}

#[tokio::test]
async fn oversized_packet_rejected_before_it_is_buffered() {
    let hub = TestHub::start(|c| c.max_packet_size = 4096).await;
    let mut c = Raw::connected(hub.addr, "big", Protocol::V5, Properties::default()).await;
    // Announce 100 MB; send only the header. The hub must not wait for the body.
    c.send_raw(&[0x30, 0x80, 0x80, 0x80, 0x30]).await;
    match c.recv().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, reason::PACKET_TOO_LARGE),
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    assert!(c.closed().await);
    hub.stop().await;
}

#[tokio::test]
async fn connect_timeout_closes_silent_sockets() {
    let hub = TestHub::start(|c| c.connect_timeout = 1).await;
    let mut c = Raw::open(hub.addr, Protocol::V311).await;
    assert!(c.closed().await);
    hub.stop().await;
}

#[tokio::test]
async fn qos2_publish_from_v3_client_is_accepted() {
    // Sanity: a valid packet after the bad-input cases above works at QoS 2.
    let hub = TestHub::start(|_| {}).await;
    let mut c = Raw::connected(hub.addr, "ok", Protocol::V311, Properties::default()).await;
    c.send(&Packet::Publish(Publish {
        qos: QoS::ExactlyOnce,
        packet_id: 3,
        topic: "x".into(),
        ..Default::default()
    }))
    .await;
    assert!(matches!(c.recv().await, Some(Packet::PubRec(r)) if r.packet_id == 3));
    hub.stop().await;
}

use tokio::io::AsyncWriteExt;
