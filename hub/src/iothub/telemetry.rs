//! IoT Hub telemetry topics over MQTT into the shared message model:
//! `devices/{d}/messages/events/{property bag}` (device telemetry) and
//! `devices/{d}/modules/{m}/messages/events/{property bag}` (module output,
//! output name in `$.on`). The property bag is URL-encoded `k=v&k=v`; keys
//! starting with `$.` are system properties. The connection's identity is
//! stamped from authentication: a client's own `$.cdid`/`$.cmid` is never
//! trusted.

use bytes::Bytes;
use edgehub_router::{Message, SystemProperty};
use percent_encoding::percent_decode_str;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TelemetryError {
    #[error("topic {0:?} is not an IoT Hub telemetry topic")]
    NotTelemetry(String),
    #[error("topic names device {topic:?} but the connection is {identity:?}")]
    WrongIdentity { topic: String, identity: String },
    #[error("property bag: {0}")]
    BadPropertyBag(String),
}

/// System properties a client may set, by their `$.` key.
fn system_key(key: &str) -> Option<SystemProperty> {
    Some(match key {
        "$.mid" => SystemProperty::MessageId,
        "$.cid" => SystemProperty::CorrelationId,
        "$.uid" => SystemProperty::UserId,
        "$.to" => SystemProperty::To,
        "$.ct" => SystemProperty::ContentType,
        "$.ce" => SystemProperty::ContentEncoding,
        "$.exp" => SystemProperty::ExpiryTimeUtc,
        "$.schema" => SystemProperty::MessageSchema,
        "$.ctime" => SystemProperty::CreationTime,
        "$.on" => SystemProperty::OutputName,
        "$.ifid" => SystemProperty::InterfaceId,
        _ => return None,
    })
}

fn decode(s: &str) -> Result<String, TelemetryError> {
    // '+' is not a space in IoT Hub property bags; percent-escapes are.
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| TelemetryError::BadPropertyBag(format!("{s:?} is not UTF-8 once decoded")))
}

/// Sets the properties of a URL-encoded property bag (`k=v&$.mid=…`) on
/// `msg`; `$.cdid`/`$.cmid` are skipped (only the hub stamps identities).
///
/// Read as IoT Edge and the SDKs' `UrlEncodedDictionarySerializer` read it:
/// the bag ends at the first unencoded `/` (the Node SDK ends every bag with
/// one; an encoded `%2F` is part of a value), `k` and `k=` are a property
/// with an empty value, a repeated key keeps its last value, and an empty
/// key, a second `=` in one property, `&&` or a bag that ends in `&` are
/// refused.
pub fn apply_property_bag(msg: &mut Message, bag: &str) -> Result<(), TelemetryError> {
    let bad = |why: String| Err(TelemetryError::BadPropertyBag(why));
    let (bag, terminated) = match bag.find('/') {
        Some(i) => (&bag[..i], true),
        None => (bag, false),
    };
    if bag.is_empty() {
        return Ok(());
    }
    let mut pairs = bag.split('&').peekable();
    while let Some(pair) = pairs.next() {
        if pair.is_empty() {
            // "a=1&/" is complete (the '/' ends it); "a=1&" and "a&&b" are not.
            if pairs.peek().is_none() && terminated {
                break;
            }
            return bad(format!("empty property in {bag:?}"));
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if v.contains('=') {
            return bad(format!("unencoded '=' in the value of {pair:?}"));
        }
        let (k, v) = (decode(k)?, decode(v)?);
        if k.is_empty() {
            return bad(format!("empty key in {pair:?}"));
        }
        if k == "$.cdid" || k == "$.cmid" {
            continue; // set by the hub only
        }
        match system_key(&k) {
            Some(p) => msg.set_system(p, &v),
            None if k.starts_with("$.") => msg.set_system_named(&k[2..], &v),
            None => msg.set_property(&k, &v),
        }
    }
    Ok(())
}

/// The message of a telemetry publish by `identity` (`device` or
/// `device/module`, as authenticated) stamped as the device layer does
/// (`edgehub_device::telemetry::accept`) with `enqueued_time`.
pub fn telemetry_message(
    identity: &str,
    topic: &str,
    payload: Bytes,
    enqueued_time: &str,
) -> Result<Message, TelemetryError> {
    let msg = parse_telemetry(identity, topic, payload)?;
    Ok(edgehub_device::telemetry::accept(
        msg,
        identity,
        enqueued_time,
    ))
}

/// The message of a telemetry publish by `identity`, as the topic and its
/// property bag give it: refused when the topic names another identity.
/// The device layer stamps the identity when it accepts it.
pub fn parse_telemetry(
    identity: &str,
    topic: &str,
    payload: Bytes,
) -> Result<Message, TelemetryError> {
    let not = || TelemetryError::NotTelemetry(topic.to_owned());
    let rest = topic.strip_prefix("devices/").ok_or_else(not)?;
    let (device, rest) = rest.split_once('/').ok_or_else(not)?;
    let (module, bag) = if let Some(r) = rest.strip_prefix("modules/") {
        let (m, r) = r.split_once('/').ok_or_else(not)?;
        (Some(m), r.strip_prefix("messages/events").ok_or_else(not)?)
    } else {
        (None, rest.strip_prefix("messages/events").ok_or_else(not)?)
    };
    let bag = match bag {
        "" => "",
        b => b.strip_prefix('/').ok_or_else(not)?,
    };
    let (id_device, id_module) = match identity.split_once('/') {
        Some((d, m)) => (d, Some(m)),
        None => (identity, None),
    };
    let same_module = match (module, id_module) {
        (None, None) => true,
        (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
        _ => false,
    };
    if !device.eq_ignore_ascii_case(id_device) || !same_module {
        return Err(TelemetryError::WrongIdentity {
            topic: module.map_or_else(|| device.to_owned(), |m| format!("{device}/{m}")),
            identity: identity.to_owned(),
        });
    }
    let mut msg = Message::new(payload);
    apply_property_bag(&mut msg, bag)?;
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgehub_router::MessageSource;
    use edgehub_router::Route;

    const T: &str = "2026-11-26T20:00:00Z";

    #[test]
    fn device_telemetry_with_property_bag() {
        let m = telemetry_message(
            "dev1",
            "devices/dev1/messages/events/%24.ct=application%2Fjson&%24.ce=utf-8&%24.mid=m1&temp%20unit=C&alert",
            Bytes::from_static(br#"{"t": 31}"#),
            T,
        )
        .unwrap();
        assert_eq!(
            m.system(SystemProperty::ContentType).map(|s| &**s),
            Some("application/json")
        );
        assert_eq!(
            m.system(SystemProperty::MessageId).map(|s| &**s),
            Some("m1")
        );
        assert_eq!(m.property("temp unit").map(|s| &**s), Some("C"));
        assert_eq!(m.property("alert").map(|s| &**s), Some(""));
        assert_eq!(
            m.system(SystemProperty::ConnectionDeviceId).map(|s| &**s),
            Some("dev1")
        );
        assert_eq!(
            m.system(SystemProperty::EnqueuedTime).map(|s| &**s),
            Some(T)
        );
        assert_eq!(m.source, Some(MessageSource::Telemetry));
        // Routes see it as IoT Edge would.
        let r = Route::parse(
            "r",
            "FROM /messages/* WHERE $body.t > 30 AND $connectionDeviceId = 'dev1' INTO $upstream",
        )
        .unwrap();
        assert!(r.matches(&m));
    }

    #[test]
    fn module_output_and_untrusted_identity_properties() {
        let m = telemetry_message(
            "dev1/filter",
            "devices/dev1/modules/filter/messages/events/%24.on=alerts&%24.cdid=spoofed&%24.cmid=spoofed",
            Bytes::new(),
            T,
        )
        .unwrap();
        assert_eq!(
            m.system(SystemProperty::ConnectionDeviceId).map(|s| &**s),
            Some("dev1")
        );
        assert_eq!(
            m.system(SystemProperty::ConnectionModuleId).map(|s| &**s),
            Some("filter")
        );
        assert_eq!(
            m.source,
            Some(MessageSource::ModuleOutput {
                module: "filter".into(),
                output: "alerts".into()
            })
        );
        let r = Route::parse("r", "FROM /messages/modules/filter/outputs/alerts INTO BrokeredEndpoint(\"/modules/sink/inputs/in\")").unwrap();
        assert!(r.matches(&m));
        // No bag at all, with or without the trailing slash.
        telemetry_message("dev1", "devices/dev1/messages/events", Bytes::new(), T).unwrap();
        telemetry_message("dev1", "devices/dev1/messages/events/", Bytes::new(), T).unwrap();
    }

    #[test]
    fn foreign_and_malformed_topics_are_refused() {
        let e = |id: &str, t: &str| telemetry_message(id, t, Bytes::new(), T).unwrap_err();
        assert!(matches!(
            e("dev1", "devices/dev2/messages/events/"),
            TelemetryError::WrongIdentity { .. }
        ));
        assert!(matches!(
            e("dev1", "devices/dev1/modules/m/messages/events/"),
            TelemetryError::WrongIdentity { .. }
        ));
        assert!(matches!(
            e("dev1/m", "devices/dev1/messages/events/"),
            TelemetryError::WrongIdentity { .. }
        ));
        assert!(matches!(
            e("dev1", "devices/dev1/messages/devicebound/"),
            TelemetryError::NotTelemetry(_)
        ));
        assert!(matches!(
            e("dev1", "devices/dev1/messages/eventsX"),
            TelemetryError::NotTelemetry(_)
        ));
        assert!(matches!(
            e("dev1", "devices/dev1/messages/events/a=%FF"),
            TelemetryError::BadPropertyBag(_)
        ));
        assert!(matches!(
            e("dev1", "devices/dev1/messages/events/=v"),
            TelemetryError::BadPropertyBag(_)
        ));
    }

    fn bag(b: &str) -> Result<Message, TelemetryError> {
        let mut m = Message::new(Bytes::new());
        apply_property_bag(&mut m, b).map(|()| m)
    }

    fn prop<'a>(m: &'a Message, k: &str) -> Option<&'a str> {
        m.property(k).map(|s| &**s)
    }

    #[test]
    fn property_bag_ends_at_an_unencoded_slash() {
        // The Node SDK's sendOutputEvent ends the bag with '/'.
        let m = telemetry_message(
            "dev1/m",
            "devices/dev1/modules/m/messages/events/%24.on=out1/",
            Bytes::new(),
            T,
        )
        .unwrap();
        assert_eq!(
            m.source,
            Some(MessageSource::ModuleOutput {
                module: "m".into(),
                output: "out1".into()
            })
        );
        let m = bag("a=1&%24.ct=application%2Fjson/").unwrap();
        assert_eq!(prop(&m, "a"), Some("1"));
        assert_eq!(
            m.system(SystemProperty::ContentType).map(|s| &**s),
            Some("application/json")
        );
        // Whatever follows the terminating '/' is not read.
        let m = bag("a=1/b=2").unwrap();
        assert_eq!((prop(&m, "a"), prop(&m, "b")), (Some("1"), None));
        // A trailing '&' before the '/' is complete, as in the SDKs.
        assert_eq!(prop(&bag("a=1&/").unwrap(), "a"), Some("1"));
        // Only the slash ends it.
        assert!(bag("/a=1").unwrap().properties.is_empty());
    }

    #[test]
    fn property_bag_encoded_slash_empty_values_and_repeats() {
        let m = bag("path=a%2Fb&flag&empty=&k=1&k=2&sp%20ace=x%20y&plus=a+b").unwrap();
        assert_eq!(prop(&m, "path"), Some("a/b"));
        assert_eq!(prop(&m, "flag"), Some(""));
        assert_eq!(prop(&m, "empty"), Some(""));
        assert_eq!(prop(&m, "k"), Some("2"), "the last of a repeated key wins");
        assert_eq!(prop(&m, "sp ace"), Some("x y"));
        assert_eq!(prop(&m, "plus"), Some("a+b"), "'+' is not a space");
        assert!(bag("").unwrap().properties.is_empty());
    }

    #[test]
    fn property_bag_malformed_is_refused() {
        for b in [
            "=v", "a=1&&b=2", "&a=1", "a=1&", "a=b=c", "a==", "a=%FF", "%FF=1",
        ] {
            assert!(
                matches!(bag(b), Err(TelemetryError::BadPropertyBag(_))),
                "{b:?} must be refused"
            );
        }
    }
}
