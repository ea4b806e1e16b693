use bytes::{Bytes, BytesMut};

use crate::*;

fn roundtrip(p: Packet, proto: Protocol) {
    let mut buf = BytesMut::new();
    let n = encode(&p, proto, &mut buf, usize::MAX).unwrap();
    assert_eq!(n, buf.len(), "size reported for {}", p.name());
    // Feeding one byte at a time must yield nothing until the packet is whole.
    let full = buf.clone();
    let mut partial = BytesMut::new();
    for (i, b) in full.iter().enumerate() {
        partial.extend_from_slice(&[*b]);
        let got = decode(&mut partial, proto, usize::MAX).unwrap();
        if i + 1 < full.len() {
            assert!(got.is_none(), "{} decoded early", p.name());
        } else {
            assert_eq!(got.as_ref(), Some(&p));
        }
    }
    assert!(partial.is_empty());
}

fn s(v: &str) -> Str {
    Str::from(v)
}

fn rich_props() -> Properties {
    Properties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(60),
        content_type: Some(s("application/json")),
        response_topic: Some(s("reply/to")),
        correlation_data: Some(Bytes::from_static(b"\x00\x01")),
        subscription_identifiers: vec![1, 200_000],
        topic_alias: Some(3),
        user_properties: vec![(s("k"), s("v")), (s("k"), s("v2"))],
        ..Default::default()
    }
}

#[test]
fn every_packet_roundtrips_in_both_versions() {
    for proto in [Protocol::V311, Protocol::V5] {
        let v5 = proto == Protocol::V5;
        let p = |props: Properties| -> Props {
            if v5 {
                props.into()
            } else {
                Props::default()
            }
        };
        let connect = Connect {
            protocol: proto,
            clean_start: true,
            keep_alive: 30,
            properties: p(Properties {
                session_expiry_interval: Some(100),
                receive_maximum: Some(10),
                maximum_packet_size: Some(1024),
                topic_alias_maximum: Some(5),
                request_problem_information: Some(0),
                ..Default::default()
            }),
            client_id: s("dev1"),
            will: Some(Will {
                topic: s("will/t"),
                payload: Bytes::from_static(b"bye"),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: p(Properties {
                    will_delay_interval: Some(5),
                    ..Default::default()
                }),
            }),
            username: Some(s("user")),
            password: Some(Bytes::from_static(b"pw")),
        };
        roundtrip(Packet::Connect(Box::new(connect)), proto);
        roundtrip(
            Packet::ConnAck(ConnAck {
                session_present: true,
                code: 0,
                properties: p(Properties {
                    assigned_client_identifier: Some(s("auto-1")),
                    server_keep_alive: Some(10),
                    retain_available: Some(1),
                    ..Default::default()
                }),
            }),
            proto,
        );
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            roundtrip(
                Packet::Publish(Publish {
                    dup: qos != QoS::AtMostOnce,
                    qos,
                    retain: true,
                    topic: s("a/b/c"),
                    packet_id: if qos == QoS::AtMostOnce { 0 } else { 7 },
                    properties: p(rich_props()),
                    payload: Bytes::from(vec![7u8; 300]),
                }),
                proto,
            );
        }
        let resp = PubResp {
            packet_id: 9,
            reason: if v5 {
                reason::NO_MATCHING_SUBSCRIBERS
            } else {
                0
            },
            properties: p(Properties {
                reason_string: Some(s("why")),
                ..Default::default()
            }),
        };
        roundtrip(Packet::PubAck(resp.clone()), proto);
        roundtrip(Packet::PubRec(resp.clone()), proto);
        roundtrip(Packet::PubRel(resp.clone()), proto);
        roundtrip(Packet::PubComp(PubResp::new(9, 0)), proto);
        roundtrip(
            Packet::Subscribe(Subscribe {
                packet_id: 3,
                properties: p(Properties {
                    subscription_identifiers: vec![42],
                    ..Default::default()
                }),
                filters: vec![
                    (
                        s("a/+/c"),
                        SubscriptionOptions {
                            qos: QoS::ExactlyOnce,
                            no_local: v5,
                            retain_as_published: v5,
                            retain_handling: if v5 { 2 } else { 0 },
                        },
                    ),
                    (s("#"), SubscriptionOptions::default()),
                ],
            }),
            proto,
        );
        roundtrip(
            Packet::SubAck(SubAck {
                packet_id: 3,
                properties: Props::default(),
                reasons: vec![2, 0x80],
            }),
            proto,
        );
        roundtrip(
            Packet::Unsubscribe(Unsubscribe {
                packet_id: 4,
                properties: Props::default(),
                filters: vec![s("a/+/c")],
            }),
            proto,
        );
        roundtrip(
            Packet::UnsubAck(UnsubAck {
                packet_id: 4,
                properties: Props::default(),
                reasons: if v5 { vec![0, 0x11] } else { vec![] },
            }),
            proto,
        );
        roundtrip(Packet::PingReq, proto);
        roundtrip(Packet::PingResp, proto);
        roundtrip(
            Packet::Disconnect(Disconnect {
                reason: if v5 { reason::DISCONNECT_WITH_WILL } else { 0 },
                properties: p(Properties {
                    session_expiry_interval: Some(0),
                    ..Default::default()
                }),
            }),
            proto,
        );
    }
    roundtrip(
        Packet::Auth(Auth {
            reason: reason::CONTINUE_AUTHENTICATION,
            properties: Properties {
                authentication_method: Some(s("SCRAM")),
                ..Default::default()
            }
            .into(),
        }),
        Protocol::V5,
    );
}

#[test]
fn publish_payload_is_a_view_of_the_read_buffer() {
    let mut buf = BytesMut::new();
    let p = Packet::Publish(Publish {
        topic: s("t"),
        payload: Bytes::from(vec![1u8; 1000]),
        ..Default::default()
    });
    encode(&p, Protocol::V311, &mut buf, usize::MAX).unwrap();
    let base = buf.as_ptr() as usize;
    let Some(Packet::Publish(got)) = decode(&mut buf, Protocol::V311, usize::MAX).unwrap() else {
        panic!("not a publish")
    };
    let at = got.payload.as_ptr() as usize;
    assert!(at > base && at < base + 1010, "payload was copied");
}

fn decode_err(bytes: &[u8], proto: Protocol) -> DecodeError {
    let mut buf = BytesMut::from(bytes);
    decode(&mut buf, proto, 1 << 20).expect_err("must fail")
}

#[test]
fn malformed_inputs_are_rejected_with_specific_errors() {
    use DecodeError::Protocol as ProtocolErr;
    use DecodeError::{InvalidProtocolName, Malformed, UnsupportedProtocolVersion};
    // Remaining length with five continuation bytes.
    assert!(matches!(
        decode_err(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], Protocol::V311),
        Malformed(_)
    ));
    // Reserved packet type 0 and 15 (v3).
    assert!(matches!(
        decode_err(&[0x00, 0x00], Protocol::V311),
        Malformed(_)
    ));
    assert!(matches!(
        decode_err(&[0xF0, 0x00], Protocol::V311),
        Malformed(_)
    ));
    // PUBLISH QoS 3.
    assert!(matches!(
        decode_err(&[0x36, 0x05, 0, 1, b't', 0, 1], Protocol::V311),
        Malformed(_)
    ));
    // SUBSCRIBE with wrong fixed header flags.
    assert!(matches!(
        decode_err(&[0x80, 0x06, 0, 1, 0, 1, b'a', 0], Protocol::V311),
        Malformed(_)
    ));
    // SUBSCRIBE without filters.
    assert!(matches!(
        decode_err(&[0x82, 0x02, 0, 1], Protocol::V311),
        ProtocolErr(_)
    ));
    // Topic length beyond the packet.
    assert!(matches!(
        decode_err(&[0x30, 0x03, 0, 9, b't'], Protocol::V311),
        Malformed(_)
    ));
    // Invalid UTF-8 and embedded NUL in topic.
    assert!(matches!(
        decode_err(&[0x30, 0x04, 0, 2, 0xC3, 0x28], Protocol::V311),
        Malformed(_)
    ));
    assert!(matches!(
        decode_err(&[0x30, 0x04, 0, 2, b'a', 0], Protocol::V311),
        Malformed(_)
    ));
    // QoS 1 PUBLISH with packet id 0.
    assert!(matches!(
        decode_err(&[0x32, 0x05, 0, 1, b't', 0, 0], Protocol::V311),
        Malformed(_)
    ));
    // CONNECT with reserved flag, with an unknown protocol level, with a bad name.
    let mut connect = vec![
        0x10, 0x0C, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x01, 0, 10, 0, 0,
    ];
    assert!(matches!(decode_err(&connect, Protocol::V311), Malformed(_)));
    connect[8] = 6;
    connect[9] = 0x02;
    assert_eq!(
        decode_err(&connect, Protocol::V311),
        UnsupportedProtocolVersion(6)
    );
    connect[4] = b'X';
    assert_eq!(decode_err(&connect, Protocol::V311), InvalidProtocolName);
    // v5 PUBLISH with a CONNECT-only property, with a duplicate property.
    assert!(matches!(
        decode_err(&[0x30, 0x07, 0, 1, b't', 2, 0x21, 0, 1], Protocol::V5),
        ProtocolErr(_)
    ));
    assert!(matches!(
        decode_err(&[0x30, 0x08, 0, 1, b't', 4, 0x01, 0, 0x01, 1], Protocol::V5),
        ProtocolErr(_)
    ));
    // Unknown property id.
    assert!(matches!(
        decode_err(&[0x30, 0x06, 0, 1, b't', 2, 0x7F, 0], Protocol::V5),
        Malformed(_)
    ));
    // Trailing bytes after PINGREQ body.
    assert!(matches!(
        decode_err(&[0xC0, 0x01, 0], Protocol::V311),
        Malformed(_)
    ));
}

#[test]
fn oversized_packet_fails_on_header_and_encode_respects_limit() {
    let mut buf = BytesMut::from(&[0x30u8, 0xFF, 0xFF, 0x03][..]);
    assert!(matches!(
        decode(&mut buf, Protocol::V311, 1024),
        Err(DecodeError::PacketTooLarge { .. })
    ));
    let p = Packet::Publish(Publish {
        topic: s("t"),
        payload: Bytes::from(vec![0u8; 2000]),
        ..Default::default()
    });
    let mut out = BytesMut::new();
    assert!(matches!(
        encode(&p, Protocol::V5, &mut out, 1000),
        Err(EncodeError::PacketTooLarge { .. })
    ));
    assert!(out.is_empty());
}

#[test]
fn peek_finds_connect_version() {
    let c = Connect {
        protocol: Protocol::V5,
        clean_start: true,
        keep_alive: 0,
        properties: Props::default(),
        client_id: s("x"),
        will: None,
        username: None,
        password: None,
    };
    let mut buf = BytesMut::new();
    encode(
        &Packet::Connect(Box::new(c)),
        Protocol::V5,
        &mut buf,
        usize::MAX,
    )
    .unwrap();
    assert_eq!(peek_connect_protocol(&buf), Some(Protocol::V5));
    assert_eq!(peek_connect_protocol(&[0x30, 0]), None);
}

#[test]
fn print_sizes() {
    eprintln!(
        "Packet {} Publish {} Properties {} Str {}",
        std::mem::size_of::<Packet>(),
        std::mem::size_of::<Publish>(),
        std::mem::size_of::<Properties>(),
        std::mem::size_of::<Str>()
    );
}
