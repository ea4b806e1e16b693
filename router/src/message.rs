//! The message model shared by the workspace: what a device or module sent,
//! as the router, the store and the endpoints see it.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;

/// Where a message entered the hub; route sources match against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageSource {
    /// Device telemetry (`devices/{d}/messages/events`).
    Telemetry,
    /// A module's output (`devices/{d}/modules/{m}/messages/events`, `$.on`).
    ModuleOutput { module: Arc<str>, output: Arc<str> },
    /// A twin change notification.
    TwinChangeNotification,
}

/// System properties the query language knows by name (`$contentType`, …).
/// Kept as fields so compiled conditions read them without a name lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SystemProperty {
    MessageId,
    CorrelationId,
    UserId,
    To,
    ContentType,
    ContentEncoding,
    ConnectionDeviceId,
    ConnectionModuleId,
    ConnectionAuthMethod,
    OutputName,
    EnqueuedTime,
    CreationTime,
    MessageSchema,
    Ack,
    ExpiryTimeUtc,
    InterfaceId,
    DtDataschema,
    DtSubject,
}

impl SystemProperty {
    pub const ALL: [SystemProperty; 18] = [
        SystemProperty::MessageId,
        SystemProperty::CorrelationId,
        SystemProperty::UserId,
        SystemProperty::To,
        SystemProperty::ContentType,
        SystemProperty::ContentEncoding,
        SystemProperty::ConnectionDeviceId,
        SystemProperty::ConnectionModuleId,
        SystemProperty::ConnectionAuthMethod,
        SystemProperty::OutputName,
        SystemProperty::EnqueuedTime,
        SystemProperty::CreationTime,
        SystemProperty::MessageSchema,
        SystemProperty::Ack,
        SystemProperty::ExpiryTimeUtc,
        SystemProperty::InterfaceId,
        SystemProperty::DtDataschema,
        SystemProperty::DtSubject,
    ];

    /// The name used after `$` in conditions.
    pub fn name(self) -> &'static str {
        match self {
            SystemProperty::MessageId => "messageId",
            SystemProperty::CorrelationId => "correlationId",
            SystemProperty::UserId => "userId",
            SystemProperty::To => "to",
            SystemProperty::ContentType => "contentType",
            SystemProperty::ContentEncoding => "contentEncoding",
            SystemProperty::ConnectionDeviceId => "connectionDeviceId",
            SystemProperty::ConnectionModuleId => "connectionModuleId",
            SystemProperty::ConnectionAuthMethod => "connectionAuthMethod",
            SystemProperty::OutputName => "outputName",
            SystemProperty::EnqueuedTime => "enqueuedTime",
            SystemProperty::CreationTime => "creationTime",
            SystemProperty::MessageSchema => "messageSchema",
            SystemProperty::Ack => "ack",
            SystemProperty::ExpiryTimeUtc => "expiryTimeUtc",
            SystemProperty::InterfaceId => "interfaceId",
            SystemProperty::DtDataschema => "dt-dataschema",
            SystemProperty::DtSubject => "dt-subject",
        }
    }

    /// Case-insensitive, like every property name in the query language.
    pub fn from_name(name: &str) -> Option<SystemProperty> {
        SystemProperty::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(name))
    }
}

/// A message: body, application properties (always strings) and system
/// properties. The JSON body is parsed at most once, on first use by a
/// `$body` query, whatever the number of routes that look at it.
#[derive(Debug, Default)]
pub struct Message {
    pub body: Bytes,
    /// Application properties in arrival order. Few per message, so a linear
    /// scan beats hashing.
    pub properties: Vec<(Arc<str>, Arc<str>)>,
    system: [Option<Arc<str>>; SystemProperty::ALL.len()],
    /// System properties without a field (protocol heads may add their own).
    other_system: Vec<(Arc<str>, Arc<str>)>,
    pub source: Option<MessageSource>,
    body_json: OnceLock<Option<serde_json::Value>>,
}

impl Clone for Message {
    fn clone(&self) -> Message {
        Message {
            body: self.body.clone(),
            properties: self.properties.clone(),
            system: self.system.clone(),
            other_system: self.other_system.clone(),
            source: self.source.clone(),
            body_json: OnceLock::new(),
        }
    }
}

impl Message {
    pub fn new(body: impl Into<Bytes>) -> Message {
        Message {
            body: body.into(),
            ..Default::default()
        }
    }

    pub fn with_property(mut self, name: &str, value: &str) -> Message {
        self.set_property(name, value);
        self
    }

    pub fn with_system(mut self, p: SystemProperty, value: &str) -> Message {
        self.set_system(p, value);
        self
    }

    pub fn with_source(mut self, source: MessageSource) -> Message {
        self.source = Some(source);
        self
    }

    pub fn set_property(&mut self, name: &str, value: &str) {
        match self
            .properties
            .iter_mut()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
        {
            Some(slot) => slot.1 = value.into(),
            None => self.properties.push((name.into(), value.into())),
        }
    }

    /// Property names compare case-insensitively, as in IoT Hub (`KEY1`
    /// finds `key1`).
    pub fn property(&self, name: &str) -> Option<&Arc<str>> {
        self.properties
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// Sets a system property by name: a known one goes to its field, any
    /// other is kept by name.
    pub fn set_system_named(&mut self, name: &str, value: &str) {
        match SystemProperty::from_name(name) {
            Some(p) => self.set_system(p, value),
            None => match self
                .other_system
                .iter_mut()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
            {
                Some(slot) => slot.1 = value.into(),
                None => self.other_system.push((name.into(), value.into())),
            },
        }
    }

    /// A system property that has no field, by name (case-insensitive).
    pub fn other_system(&self, name: &str) -> Option<&Arc<str>> {
        self.other_system
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    pub fn set_system(&mut self, p: SystemProperty, value: &str) {
        self.system[p as usize] = Some(value.into());
    }

    pub fn clear_system(&mut self, p: SystemProperty) {
        self.system[p as usize] = None;
    }

    pub fn system(&self, p: SystemProperty) -> Option<&Arc<str>> {
        self.system[p as usize].as_ref()
    }

    /// Every system property that is set, by name (fields first, then the
    /// named extras), so a message can be written out and read back with
    /// [`Message::set_system_named`].
    pub fn system_properties(&self) -> impl Iterator<Item = (&str, &Arc<str>)> {
        SystemProperty::ALL
            .iter()
            .filter_map(|p| self.system(*p).map(|v| (p.name(), v)))
            .chain(self.other_system.iter().map(|(k, v)| (&**k, v)))
    }

    /// The body as JSON when the content type is `application/json` and the
    /// encoding UTF-8, -16 or -32 (as IoT Hub requires for `$body` queries);
    /// `None` otherwise or when the body does not parse.
    pub fn body_json(&self) -> Option<&serde_json::Value> {
        self.body_json
            .get_or_init(|| {
                let ct = self.system(SystemProperty::ContentType)?;
                if !ct.eq_ignore_ascii_case("application/json") {
                    return None;
                }
                let enc = self.system(SystemProperty::ContentEncoding)?;
                let text = decode_text(&self.body, enc)?;
                serde_json::from_str(&text).ok()
            })
            .as_ref()
    }
}

fn decode_text(body: &[u8], encoding: &str) -> Option<String> {
    // Exactly the names IoT Edge knows (any case); others leave `$body`
    // undefined, as there.
    let enc = encoding.to_ascii_lowercase();
    match enc.as_str() {
        "utf-8" => std::str::from_utf8(body)
            .ok()
            .map(|s| s.trim_start_matches('\u{feff}').to_owned()),
        "utf-16" => {
            if !body.len().is_multiple_of(2) {
                return None;
            }
            let units: Vec<u16> = body
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units)
                .ok()
                .map(|s| s.trim_start_matches('\u{feff}').to_owned())
        }
        "utf-32" => {
            if !body.len().is_multiple_of(4) {
                return None;
            }
            body.chunks_exact(4)
                .map(|c| char::from_u32(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect::<Option<String>>()
                .map(|s| s.trim_start_matches('\u{feff}').to_owned())
        }
        _ => None,
    }
}
