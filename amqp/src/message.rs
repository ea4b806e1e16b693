//! AMQP messages onto the shared message model, and back: the same fields
//! the MQTT head reads from a property bag, so a message routes the same
//! whichever head carried it.
//!
//! In: `properties` message-id, correlation-id, user-id, to, content-type,
//! content-encoding, absolute-expiry-time and creation-time; application
//! properties `iothub-message-schema`, `iothub-creation-time-utc` and
//! `iothub-outputname` become system properties, every other application
//! property a property of the message. The identity is stamped by the
//! device layer, never taken from the client.
//!
//! Out (cloud-to-device, module inputs): a Data body; message-id,
//! correlation-id, content type and encoding, `to`, user-id and expiry in
//! `properties`; the message's properties as application properties; the
//! IoT Hub annotations (enqueued time, delivery count, lock token, input
//! name, the sender's identity) as message annotations.

use bytes::Bytes;
use edgehub_router::{Message, SystemProperty};
use fe2o3_amqp::types::messaging::{
    message::Body, ApplicationProperties, Data, MessageAnnotations, MessageId, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Symbol, Timestamp, Value};

/// The AMQP message type heads exchange: any body section.
pub type AmqpMessage = fe2o3_amqp::types::messaging::Message<Body<Value>>;

fn uuid_text(b: &[u8; 16]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// A message or correlation id as text (UUIDs in their usual form).
pub fn id_text(id: &MessageId) -> String {
    match id {
        MessageId::String(s) => s.clone(),
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Uuid(u) => uuid_text(u.as_inner()),
        MessageId::Binary(b) => match <&[u8; 16]>::try_from(&b[..]) {
            Ok(u) => uuid_text(u),
            Err(_) => String::from_utf8_lossy(b).into_owned(),
        },
    }
}

fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// An application-property value as the string the message model keeps.
pub fn simple_text(v: &SimpleValue) -> Option<String> {
    Some(match v {
        SimpleValue::Null => return None,
        SimpleValue::Bool(b) => b.to_string(),
        SimpleValue::Ubyte(n) => n.to_string(),
        SimpleValue::Ushort(n) => n.to_string(),
        SimpleValue::Uint(n) => n.to_string(),
        SimpleValue::Ulong(n) => n.to_string(),
        SimpleValue::Byte(n) => n.to_string(),
        SimpleValue::Short(n) => n.to_string(),
        SimpleValue::Int(n) => n.to_string(),
        SimpleValue::Long(n) => n.to_string(),
        SimpleValue::Float(n) => n.to_string(),
        SimpleValue::Double(n) => n.to_string(),
        SimpleValue::Char(c) => c.to_string(),
        SimpleValue::Timestamp(t) => rfc3339(t.milliseconds()),
        SimpleValue::Uuid(u) => uuid_text(u.as_inner()),
        SimpleValue::Binary(b) => String::from_utf8_lossy(b).into_owned(),
        SimpleValue::String(s) => s.clone(),
        SimpleValue::Symbol(s) => s.0.clone(),
        other => format!("{other:?}"),
    })
}

/// The body bytes: Data sections joined; a binary or string value as is.
pub fn body_bytes(body: &Body<Value>) -> Bytes {
    match body {
        Body::Data(sections) => {
            let mut out = Vec::new();
            for Data(b) in sections.iter() {
                out.extend_from_slice(b);
            }
            Bytes::from(out)
        }
        Body::Value(v) => match &v.0 {
            Value::Binary(b) => Bytes::copy_from_slice(b),
            Value::String(s) => Bytes::from(s.clone().into_bytes()),
            Value::Null => Bytes::new(),
            other => Bytes::from(format!("{other:?}").into_bytes()),
        },
        _ => Bytes::new(),
    }
}

/// The message format of a batch: each Data section of the body is one
/// whole encoded message.
pub const BATCH_FORMAT: u32 = 0x8001_3700;

/// The messages of a batch's body.
pub fn batch(outer: &AmqpMessage) -> Result<Vec<AmqpMessage>, String> {
    use fe2o3_amqp::types::messaging::message::DecodeIntoMessage;
    let Body::Data(sections) = &outer.body else {
        return Err("a batch's body must be Data sections, one message each".into());
    };
    sections
        .iter()
        .map(|Data(b)| {
            <Body<Value> as DecodeIntoMessage>::decode_message_from_reader(
                serde_amqp::read::SliceReader::new(b),
            )
            .map_err(|e| format!("a batched message does not decode: {e}"))
        })
        .collect()
}

/// The body bytes of a message given up: a single Data section (what the
/// SDKs send) becomes the message body without a copy.
fn into_body_bytes(body: Body<Value>) -> Bytes {
    match body {
        Body::Data(sections) if sections.len() == 1 => {
            let Data(b) = sections.into_inner().pop().expect("one section");
            Bytes::from(b.into_vec())
        }
        other => body_bytes(&other),
    }
}

/// A telemetry message as a device sent it over AMQP.
pub fn telemetry(m: &AmqpMessage) -> Message {
    telemetry_with_body(m, body_bytes(&m.body))
}

/// [`telemetry`] of a message the caller gives up (its body is moved).
pub fn into_telemetry(mut m: AmqpMessage) -> Message {
    let body = into_body_bytes(std::mem::replace(&mut m.body, Body::Empty));
    telemetry_with_body(&m, body)
}

fn telemetry_with_body(m: &AmqpMessage, body: Bytes) -> Message {
    let mut msg = Message::new(body);
    if let Some(p) = &m.properties {
        if let Some(id) = &p.message_id {
            msg.set_system(SystemProperty::MessageId, &id_text(id));
        }
        if let Some(id) = &p.correlation_id {
            msg.set_system(SystemProperty::CorrelationId, &id_text(id));
        }
        if let Some(u) = &p.user_id {
            msg.set_system(SystemProperty::UserId, &String::from_utf8_lossy(u));
        }
        if let Some(to) = &p.to {
            msg.set_system(SystemProperty::To, to);
        }
        if let Some(ct) = &p.content_type {
            msg.set_system(SystemProperty::ContentType, &ct.0);
        }
        if let Some(ce) = &p.content_encoding {
            msg.set_system(SystemProperty::ContentEncoding, &ce.0);
        }
        if let Some(t) = &p.absolute_expiry_time {
            msg.set_system(SystemProperty::ExpiryTimeUtc, &rfc3339(t.milliseconds()));
        }
        if let Some(t) = &p.creation_time {
            msg.set_system(SystemProperty::CreationTime, &rfc3339(t.milliseconds()));
        }
    }
    if let Some(ap) = &m.application_properties {
        for (k, v) in ap.0.iter() {
            let Some(v) = simple_text(v) else { continue };
            match k.to_ascii_lowercase().as_str() {
                "iothub-message-schema" => msg.set_system(SystemProperty::MessageSchema, &v),
                "iothub-creation-time-utc" => msg.set_system(SystemProperty::CreationTime, &v),
                "iothub-outputname" => msg.set_system(SystemProperty::OutputName, &v),
                // Only the hub stamps identities.
                "iothub-connection-device-id" | "iothub-connection-module-id" => {}
                _ => msg.set_property(k, &v),
            }
        }
    }
    if let Some(Value::String(s)) = annotation(m, "iothub-interface-id") {
        msg.set_system(SystemProperty::InterfaceId, s);
    }
    msg
}

/// A stored message as telemetry to a parent (IoT Hub or another hub):
/// what [`telemetry`] reads, written back, so the parent's message model
/// gets the same fields. The identity is not written: the parent stamps it
/// from the link the message arrives on.
pub fn upstream(msg: &Message) -> AmqpMessage {
    let text = |p: SystemProperty| msg.system(p).map(|v| v.to_string());
    let properties = Properties {
        message_id: text(SystemProperty::MessageId).map(MessageId::String),
        user_id: text(SystemProperty::UserId).map(|u| Binary::from(u.into_bytes())),
        to: text(SystemProperty::To),
        correlation_id: text(SystemProperty::CorrelationId).map(MessageId::String),
        content_type: text(SystemProperty::ContentType).map(Symbol::from),
        content_encoding: text(SystemProperty::ContentEncoding).map(Symbol::from),
        absolute_expiry_time: text(SystemProperty::ExpiryTimeUtc)
            .and_then(|t| millis(&t))
            .map(Timestamp::from_milliseconds),
        ..Default::default()
    };
    let mut app = ApplicationProperties::builder();
    for (k, v) in &msg.properties {
        app = app.insert(k.to_string(), SimpleValue::String(v.to_string()));
    }
    for (key, p) in [
        ("iothub-message-schema", SystemProperty::MessageSchema),
        ("iothub-creation-time-utc", SystemProperty::CreationTime),
        ("iothub-outputname", SystemProperty::OutputName),
    ] {
        if let Some(v) = text(p) {
            app = app.insert(key.to_owned(), SimpleValue::String(v));
        }
    }
    let mut ann = MessageAnnotations::builder();
    if let Some(i) = text(SystemProperty::InterfaceId) {
        ann = ann.insert(Symbol::from("iothub-interface-id"), Value::String(i));
    }
    with_data(properties, app.build(), ann.build(), &msg.body)
}

/// A message with these sections and `body` as one Data section.
fn with_data(
    properties: Properties,
    app: ApplicationProperties,
    ann: MessageAnnotations,
    body: &[u8],
) -> AmqpMessage {
    fe2o3_amqp::types::messaging::Message::builder()
        .properties(properties)
        .application_properties(app)
        .message_annotations(ann)
        .body(Body::Data(vec![Data(Binary::from(body.to_vec()))].into()))
        .build()
}

/// Milliseconds since the epoch of an RFC 3339 time.
fn millis(t: &str) -> Option<i64> {
    time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|dt| (dt.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// A message annotation by name (symbol keys).
pub fn annotation<'a>(m: &'a AmqpMessage, key: &str) -> Option<&'a Value> {
    use fe2o3_amqp::types::messaging::annotations::OwnedKey;
    m.message_annotations
        .as_ref()?
        .0
        .iter()
        .find_map(|(k, v)| match k {
            OwnedKey::Symbol(s) if s.0.eq_ignore_ascii_case(key) => Some(v),
            _ => None,
        })
}

/// An application property as text, by name (any case).
pub fn property(m: &AmqpMessage, key: &str) -> Option<String> {
    m.application_properties
        .as_ref()?
        .0
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .and_then(|(_, v)| simple_text(v))
}

/// A reply or push on a twin or methods link: a Data body, the
/// correlation id of the request it answers (if any), annotations and
/// application properties as given.
pub fn reply(
    correlation: Option<MessageId>,
    annotations: Vec<(&str, Value)>,
    properties: Vec<(&str, SimpleValue)>,
    body: &[u8],
) -> AmqpMessage {
    let mut ann = MessageAnnotations::builder();
    for (k, v) in annotations {
        ann = ann.insert(Symbol::from(k), v);
    }
    let mut app = ApplicationProperties::builder();
    for (k, v) in properties {
        app = app.insert(k.to_owned(), v);
    }
    fe2o3_amqp::types::messaging::Message::builder()
        .properties(Properties {
            correlation_id: correlation,
            ..Default::default()
        })
        .message_annotations(ann.build())
        .application_properties(app.build())
        .body(Body::Data(vec![Data(Binary::from(body.to_vec()))].into()))
        .build()
}

/// What the hub adds to a message it delivers.
pub struct Outgoing<'a> {
    pub lock_token: Option<[u8; 16]>,
    pub delivery_count: Option<u32>,
    pub input_name: Option<&'a str>,
    pub to: Option<String>,
}

/// A stored message as delivered to a device or module over AMQP.
pub fn outgoing(msg: &Message, extra: Outgoing<'_>) -> AmqpMessage {
    let text = |p: SystemProperty| msg.system(p).map(|v| v.to_string());
    let properties = Properties {
        message_id: text(SystemProperty::MessageId).map(MessageId::String),
        user_id: text(SystemProperty::UserId).map(|u| Binary::from(u.into_bytes())),
        to: extra.to.or_else(|| text(SystemProperty::To)),
        correlation_id: text(SystemProperty::CorrelationId).map(MessageId::String),
        content_type: text(SystemProperty::ContentType).map(Symbol::from),
        content_encoding: text(SystemProperty::ContentEncoding).map(Symbol::from),
        ..Default::default()
    };
    let mut app = ApplicationProperties::builder();
    for (k, v) in &msg.properties {
        app = app.insert(k.to_string(), SimpleValue::String(v.to_string()));
    }
    let mut ann = MessageAnnotations::builder();
    if let Some(ms) = text(SystemProperty::EnqueuedTime).and_then(|t| millis(&t)) {
        ann = ann.insert(
            Symbol::from("iothub-enqueuedtime"),
            Value::Timestamp(Timestamp::from_milliseconds(ms)),
        );
    }
    if let Some(n) = extra.delivery_count {
        ann = ann.insert(Symbol::from("iothub-deliverycount"), Value::Uint(n));
    }
    if let Some(lock) = extra.lock_token {
        ann = ann.insert(
            Symbol::from("x-opt-lock-token"),
            Value::String(uuid_text(&lock)),
        );
    }
    if let Some(i) = extra.input_name {
        ann = ann.insert(
            Symbol::from("x-opt-input-name"),
            Value::String(i.to_owned()),
        );
    }
    if let Some(d) = text(SystemProperty::ConnectionDeviceId) {
        ann = ann.insert(
            Symbol::from("iothub-connection-device-id"),
            Value::String(d),
        );
    }
    if let Some(m) = text(SystemProperty::ConnectionModuleId) {
        ann = ann.insert(
            Symbol::from("iothub-connection-module-id"),
            Value::String(m),
        );
    }
    with_data(properties, app.build(), ann.build(), &msg.body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_properties_land_where_the_mqtt_property_bag_puts_them() {
        let m: AmqpMessage = fe2o3_amqp::types::messaging::Message::builder()
            .properties(Properties {
                message_id: Some(MessageId::String("m-1".into())),
                correlation_id: Some(MessageId::String("c-1".into())),
                content_type: Some(Symbol::from("application/json")),
                content_encoding: Some(Symbol::from("utf-8")),
                ..Default::default()
            })
            .application_properties(
                ApplicationProperties::builder()
                    .insert("site".to_owned(), SimpleValue::String("north".into()))
                    .insert("count".to_owned(), SimpleValue::Int(3))
                    .insert(
                        "iothub-outputname".to_owned(),
                        SimpleValue::String("out1".into()),
                    )
                    .insert(
                        "iothub-connection-device-id".to_owned(),
                        SimpleValue::String("forged".into()),
                    )
                    .build(),
            )
            .body(Body::Data(
                vec![Data(Binary::from(b"{\"t\":1}".to_vec()))].into(),
            ))
            .build();
        let msg = telemetry(&m);
        assert_eq!(&msg.body[..], b"{\"t\":1}");
        let owned = into_telemetry(m.clone());
        assert_eq!(owned.body, msg.body);
        assert_eq!(owned.properties, msg.properties);
        let sys = |p| msg.system(p).map(|v| v.to_string());
        assert_eq!(sys(SystemProperty::MessageId).as_deref(), Some("m-1"));
        assert_eq!(sys(SystemProperty::CorrelationId).as_deref(), Some("c-1"));
        assert_eq!(
            sys(SystemProperty::ContentType).as_deref(),
            Some("application/json")
        );
        assert_eq!(
            sys(SystemProperty::ContentEncoding).as_deref(),
            Some("utf-8")
        );
        assert_eq!(sys(SystemProperty::OutputName).as_deref(), Some("out1"));
        assert_eq!(sys(SystemProperty::ConnectionDeviceId), None);
        assert_eq!(msg.property("site").map(|v| &**v), Some("north"));
        assert_eq!(msg.property("count").map(|v| &**v), Some("3"));
        assert!(msg.property("iothub-connection-device-id").is_none());
    }

    #[test]
    fn upstream_telemetry_reads_back_as_the_same_message() {
        let msg = Message::new(Bytes::from_static(b"{\"t\":2}"))
            .with_property("site", "north")
            .with_property("iothub-like", "kept")
            .with_system(SystemProperty::MessageId, "m-7")
            .with_system(SystemProperty::CorrelationId, "c-7")
            .with_system(SystemProperty::UserId, "u")
            .with_system(SystemProperty::To, "/devices/d1/messages/events")
            .with_system(SystemProperty::ContentType, "application/json")
            .with_system(SystemProperty::ContentEncoding, "utf-8")
            .with_system(SystemProperty::ExpiryTimeUtc, "2026-12-02T01:02:03Z")
            .with_system(SystemProperty::CreationTime, "2026-12-01T00:00:00Z")
            .with_system(SystemProperty::MessageSchema, "s1")
            .with_system(SystemProperty::OutputName, "out1")
            .with_system(SystemProperty::InterfaceId, "dtmi:x;1")
            .with_system(SystemProperty::ConnectionDeviceId, "d1");
        let back = telemetry(&upstream(&msg));
        assert_eq!(back.body, msg.body);
        assert_eq!(back.properties, msg.properties);
        for p in SystemProperty::ALL {
            let want = match p {
                // The parent stamps the identity from the link.
                SystemProperty::ConnectionDeviceId => None,
                _ => msg.system(p).map(|v| v.to_string()),
            };
            assert_eq!(back.system(p).map(|v| v.to_string()), want, "{p:?}");
        }
    }

    #[test]
    fn uuid_ids_read_in_their_usual_form() {
        let raw = [
            0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
            0xcd, 0xef,
        ];
        assert_eq!(
            id_text(&MessageId::Binary(Binary::from(raw.to_vec()))),
            "12345678-9abc-def0-0123-456789abcdef"
        );
    }

    #[test]
    fn outgoing_messages_carry_the_iot_hub_annotations() {
        let msg = Message::new(Bytes::from_static(b"hi"))
            .with_property("k", "v")
            .with_system(SystemProperty::MessageId, "id-9")
            .with_system(SystemProperty::EnqueuedTime, "2026-12-02T01:02:03Z");
        let out = outgoing(
            &msg,
            Outgoing {
                lock_token: Some([7; 16]),
                delivery_count: Some(2),
                input_name: None,
                to: Some("/devices/d1".into()),
            },
        );
        assert_eq!(body_bytes(&out.body), Bytes::from_static(b"hi"));
        let p = out.properties.as_ref().unwrap();
        assert_eq!(p.to.as_deref(), Some("/devices/d1"));
        assert_eq!(p.message_id, Some(MessageId::String("id-9".into())));
        let ann = format!("{:?}", out.message_annotations);
        assert!(
            ann.contains("iothub-deliverycount") && ann.contains("x-opt-lock-token"),
            "{ann}"
        );
        assert!(ann.contains("iothub-enqueuedtime"), "{ann}");
        let app = out.application_properties.as_ref().unwrap();
        assert_eq!(app.0.get("k"), Some(&SimpleValue::String("v".into())));
    }
}
