//! The same encode+decode loop for edgehub-codec or mqttbytes, for counting
//! instructions under callgrind (repeatable on a shared, noisy machine):
//!
//! valgrind --tool=callgrind target/release/examples/codec_instructions edgehub
//! valgrind --tool=callgrind target/release/examples/codec_instructions mqttbytes
//! (and `edgehub-v5` / `mqttbytes-v5`: MQTT 5 with a content type and a user property)

use bytes::{Bytes, BytesMut};

const ROUNDS: usize = 20_000;
const TOPIC: &str = "devices/sensor-0042/messages/events/temperature";

fn edgehub() -> usize {
    use edgehub_codec::{decode, encode, Packet, Protocol, Publish, QoS, Str};
    let p = Packet::Publish(Publish {
        qos: QoS::AtLeastOnce,
        packet_id: 7,
        topic: Str::from(TOPIC),
        payload: Bytes::from(vec![0xAB; 256]),
        ..Default::default()
    });
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut n = 0;
    for _ in 0..ROUNDS {
        out.clear();
        for _ in 0..64 {
            n += encode(&p, Protocol::V311, &mut out, usize::MAX).unwrap();
        }
        let mut buf = out.clone();
        while let Some(p) = decode(&mut buf, Protocol::V311, usize::MAX).unwrap() {
            n += matches!(p, Packet::Publish(_)) as usize;
        }
    }
    n
}

fn mqttbytes() -> usize {
    use mqttbytes::v4::{read, Packet, Publish};
    let p = Publish {
        dup: false,
        qos: mqttbytes::QoS::AtLeastOnce,
        retain: false,
        topic: TOPIC.into(),
        pkid: 7,
        payload: Bytes::from(vec![0xAB; 256]),
    };
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut n = 0;
    for _ in 0..ROUNDS {
        out.clear();
        for _ in 0..64 {
            n += p.write(&mut out).unwrap();
        }
        let mut buf = out.clone();
        while let Ok(p) = read(&mut buf, usize::MAX) {
            n += matches!(p, Packet::Publish(_)) as usize;
        }
    }
    n
}

fn edgehub_v5() -> usize {
    use edgehub_codec::{decode, encode, Packet, Properties, Protocol, Publish, QoS, Str};
    let p = Packet::Publish(Publish {
        qos: QoS::AtLeastOnce,
        packet_id: 7,
        topic: Str::from(TOPIC),
        payload: Bytes::from(vec![0xAB; 256]),
        properties: Properties {
            content_type: Some(Str::from("application/json")),
            user_properties: vec![(Str::from("k"), Str::from("v"))],
            ..Default::default()
        }
        .into(),
        ..Default::default()
    });
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut n = 0;
    for _ in 0..ROUNDS {
        out.clear();
        for _ in 0..64 {
            n += encode(&p, Protocol::V5, &mut out, usize::MAX).unwrap();
        }
        let mut buf = out.clone();
        while let Some(p) = decode(&mut buf, Protocol::V5, usize::MAX).unwrap() {
            n += matches!(p, Packet::Publish(_)) as usize;
        }
    }
    n
}

fn mqttbytes_v5() -> usize {
    use mqttbytes::v5::{read, Packet, Publish, PublishProperties};
    let mut p = Publish::new(TOPIC, mqttbytes::QoS::AtLeastOnce, vec![0xAB; 256]);
    p.pkid = 7;
    p.properties = Some(PublishProperties {
        payload_format_indicator: None,
        message_expiry_interval: None,
        topic_alias: None,
        response_topic: None,
        correlation_data: None,
        user_properties: vec![("k".into(), "v".into())],
        subscription_identifiers: Vec::new(),
        content_type: Some("application/json".into()),
    });
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut n = 0;
    for _ in 0..ROUNDS {
        out.clear();
        for _ in 0..64 {
            n += p.write(&mut out).unwrap();
        }
        let mut buf = out.clone();
        while let Ok(p) = read(&mut buf, usize::MAX) {
            n += matches!(p, Packet::Publish(_)) as usize;
        }
    }
    n
}

fn main() {
    let n = match std::env::args().nth(1).as_deref() {
        Some("edgehub") => edgehub(),
        Some("mqttbytes") => mqttbytes(),
        Some("edgehub-v5") => edgehub_v5(),
        Some("mqttbytes-v5") => mqttbytes_v5(),
        _ => {
            eprintln!("usage: codec_instructions edgehub|mqttbytes|edgehub-v5|mqttbytes-v5");
            std::process::exit(2)
        }
    };
    println!("{n}");
}
