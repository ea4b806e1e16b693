//! The same encode+decode loop for edgehub-codec or mqttbytes, for counting
//! instructions under callgrind (repeatable on a shared, noisy machine):
//!
//! valgrind --tool=callgrind target/release/examples/codec_instructions edgehub
//! valgrind --tool=callgrind target/release/examples/codec_instructions mqttbytes
//! (and `edgehub-v5` / `mqttbytes-v5`: MQTT 5 with a content type and a user property)

use bytes::{Bytes, BytesMut};

const ROUNDS: usize = 20_000;
const TOPIC: &str = "devices/sensor-0042/messages/events/temperature";

/// Per round: encode 64 packets into one buffer, copy it (as a read buffer),
/// decode them all back. Returns a checksum so nothing is optimised away.
fn rounds(
    mut encode_one: impl FnMut(&mut BytesMut) -> usize,
    mut decode_all: impl FnMut(&mut BytesMut) -> usize,
) -> usize {
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut n = 0;
    for _ in 0..ROUNDS {
        out.clear();
        for _ in 0..64 {
            n += encode_one(&mut out);
        }
        let mut buf = out.clone();
        n += decode_all(&mut buf);
    }
    n
}

fn edgehub(v5: bool) -> usize {
    use edgehub_codec::{decode, encode, Packet, Properties, Protocol, Publish, QoS, Str};
    let proto = if v5 { Protocol::V5 } else { Protocol::V311 };
    let p = Packet::Publish(Publish {
        qos: QoS::AtLeastOnce,
        packet_id: 7,
        topic: Str::from(TOPIC),
        payload: Bytes::from(vec![0xAB; 256]),
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
    });
    rounds(
        |out| encode(&p, proto, out, usize::MAX).unwrap(),
        |buf| {
            let mut n = 0;
            while let Some(p) = decode(buf, proto, usize::MAX).unwrap() {
                n += matches!(p, Packet::Publish(_)) as usize;
            }
            n
        },
    )
}

fn mqttbytes_v4() -> usize {
    use mqttbytes::v4::{read, Packet, Publish};
    let p = Publish {
        dup: false,
        qos: mqttbytes::QoS::AtLeastOnce,
        retain: false,
        topic: TOPIC.into(),
        pkid: 7,
        payload: Bytes::from(vec![0xAB; 256]),
    };
    rounds(
        |out| p.write(out).unwrap(),
        |buf| {
            let mut n = 0;
            while let Ok(p) = read(buf, usize::MAX) {
                n += matches!(p, Packet::Publish(_)) as usize;
            }
            n
        },
    )
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
    rounds(
        |out| p.write(out).unwrap(),
        |buf| {
            let mut n = 0;
            while let Ok(p) = read(buf, usize::MAX) {
                n += matches!(p, Packet::Publish(_)) as usize;
            }
            n
        },
    )
}

fn main() {
    let n = match std::env::args().nth(1).as_deref() {
        Some("edgehub") => edgehub(false),
        Some("mqttbytes") => mqttbytes_v4(),
        Some("edgehub-v5") => edgehub(true),
        Some("mqttbytes-v5") => mqttbytes_v5(),
        _ => {
            eprintln!("usage: codec_instructions edgehub|mqttbytes|edgehub-v5|mqttbytes-v5");
            std::process::exit(2)
        }
    };
    println!("{n}");
}
