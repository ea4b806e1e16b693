//! Telemetry as the hub accepts it from any head: the identity that sent
//! it is stamped from authentication (a client's own connection device or
//! module id is never trusted), with the hub's enqueued time, and a
//! module's message is a module output (its output name from the
//! message's `OutputName` property) for routes to match.

use edgehub_router::{Message, MessageSource, SystemProperty};

/// `enqueuedTime` as IoT Hub writes it (RFC 3339, UTC), now.
pub fn enqueued_time_now() -> String {
    let t = time::OffsetDateTime::from(std::time::SystemTime::now());
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// `msg` as sent by `identity` (`device` or `device/module`, as
/// authenticated) at `enqueued_time` (RFC 3339, the hub's clock).
pub fn accept(mut msg: Message, identity: &str, enqueued_time: &str) -> Message {
    let (device, module) = match identity.split_once('/') {
        Some((d, m)) => (d, Some(m)),
        None => (identity, None),
    };
    msg.set_system(SystemProperty::ConnectionDeviceId, device);
    match module {
        Some(m) => msg.set_system(SystemProperty::ConnectionModuleId, m),
        None => msg.clear_system(SystemProperty::ConnectionModuleId),
    }
    msg.set_system(SystemProperty::EnqueuedTime, enqueued_time);
    let source = match module {
        None => MessageSource::Telemetry,
        Some(m) => MessageSource::ModuleOutput {
            module: m.into(),
            output: msg
                .system(SystemProperty::OutputName)
                .cloned()
                .unwrap_or_else(|| "".into()),
        },
    };
    msg.with_source(source)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn the_authenticated_identity_is_stamped_whatever_the_client_said() {
        let mut m = Message::new(Bytes::from_static(b"x"));
        m.set_system(SystemProperty::ConnectionDeviceId, "someone-else");
        m.set_system(SystemProperty::ConnectionModuleId, "forged");
        let m = accept(m, "d1", "2026-12-02T00:00:00Z");
        assert_eq!(
            m.system(SystemProperty::ConnectionDeviceId).map(|s| &**s),
            Some("d1")
        );
        assert_eq!(m.system(SystemProperty::ConnectionModuleId), None);
        assert_eq!(m.source, Some(MessageSource::Telemetry));
        let mut m = Message::new(Bytes::from_static(b"x"));
        m.set_system(SystemProperty::OutputName, "out1");
        let m = accept(m, "edge/filter", "2026-12-02T00:00:00Z");
        assert_eq!(
            m.system(SystemProperty::ConnectionModuleId).map(|s| &**s),
            Some("filter")
        );
        assert_eq!(
            m.source,
            Some(MessageSource::ModuleOutput {
                module: "filter".into(),
                output: "out1".into()
            })
        );
    }
}
