//! MQTT 5 properties: one struct for every packet, with the set of allowed
//! identifiers checked per packet kind at decode time.

use bytes::{BufMut, Bytes, BytesMut};

use crate::decode::{DecodeError, Reader};
use crate::types::Str;

/// Which packet (or the will) a property block belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ctx {
    Connect,
    Will,
    ConnAck,
    Publish,
    PubResp,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    Disconnect,
    Auth,
}

impl Ctx {
    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

const fn mask(ctxs: &[Ctx]) -> u16 {
    let mut m = 0;
    let mut i = 0;
    while i < ctxs.len() {
        m |= 1 << (ctxs[i] as u16);
        i += 1;
    }
    m
}

use Ctx::*;
const M_PUB_WILL: u16 = mask(&[Publish, Will]);
const M_SESSION_EXPIRY: u16 = mask(&[Connect, ConnAck, Disconnect]);
const M_AUTH: u16 = mask(&[Connect, ConnAck, Auth]);
const M_REASON_STRING: u16 = mask(&[ConnAck, PubResp, SubAck, UnsubAck, Disconnect, Auth]);
const M_CONNECT_CONNACK: u16 = mask(&[Connect, ConnAck]);
const M_ALL: u16 = u16::MAX;

/// All MQTT 5 properties. Absent ones are `None` / empty; MQTT 3.1.1 packets
/// always carry the default (empty) value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<Str>,
    pub response_topic: Option<Str>,
    pub correlation_data: Option<Bytes>,
    pub subscription_identifiers: Vec<u32>,
    pub session_expiry_interval: Option<u32>,
    pub assigned_client_identifier: Option<Str>,
    pub server_keep_alive: Option<u16>,
    pub authentication_method: Option<Str>,
    pub authentication_data: Option<Bytes>,
    pub request_problem_information: Option<u8>,
    pub will_delay_interval: Option<u32>,
    pub request_response_information: Option<u8>,
    pub response_information: Option<Str>,
    pub server_reference: Option<Str>,
    pub reason_string: Option<Str>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub topic_alias: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    pub user_properties: Vec<(Str, Str)>,
    pub maximum_packet_size: Option<u32>,
    pub wildcard_subscription_available: Option<u8>,
    pub subscription_identifier_available: Option<u8>,
    pub shared_subscription_available: Option<u8>,
}

/// The properties of one packet: nothing allocated when there are none (every
/// MQTT 3.1.1 packet, most MQTT 5 ones), so packets stay small to move around.
/// Reads see an empty [`Properties`]; the first write allocates.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Props(Option<Box<Properties>>);

/// Built at compile time: a `LazyLock` here cost a synchronisation check on
/// every property read of every packet.
static EMPTY: Properties = Properties {
    payload_format_indicator: None,
    message_expiry_interval: None,
    content_type: None,
    response_topic: None,
    correlation_data: None,
    subscription_identifiers: Vec::new(),
    session_expiry_interval: None,
    assigned_client_identifier: None,
    server_keep_alive: None,
    authentication_method: None,
    authentication_data: None,
    request_problem_information: None,
    will_delay_interval: None,
    request_response_information: None,
    response_information: None,
    server_reference: None,
    reason_string: None,
    receive_maximum: None,
    topic_alias_maximum: None,
    topic_alias: None,
    maximum_qos: None,
    retain_available: None,
    user_properties: Vec::new(),
    maximum_packet_size: None,
    wildcard_subscription_available: None,
    subscription_identifier_available: None,
    shared_subscription_available: None,
};

impl Props {
    pub fn is_empty(&self) -> bool {
        self.0.as_deref().is_none_or(Properties::is_empty)
    }

    /// Nothing allocated: no property was ever set.
    pub fn is_none(&self) -> bool {
        self.0.is_none()
    }
}

impl std::ops::Deref for Props {
    type Target = Properties;
    fn deref(&self) -> &Properties {
        self.0.as_deref().unwrap_or(&EMPTY)
    }
}

impl std::ops::DerefMut for Props {
    fn deref_mut(&mut self) -> &mut Properties {
        self.0.get_or_insert_with(Default::default)
    }
}

impl From<Properties> for Props {
    fn from(p: Properties) -> Props {
        if p.is_empty() {
            Props(None)
        } else {
            Props(Some(Box::new(p)))
        }
    }
}

impl std::fmt::Debug for Props {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => f.write_str("{}"),
            Some(p) => p.fmt(f),
        }
    }
}

fn set_once<T>(slot: &mut Option<T>, v: T, name: &'static str) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::Protocol(name));
    }
    *slot = Some(v);
    Ok(())
}

fn bool_byte(v: u8, what: &'static str) -> Result<u8, DecodeError> {
    if v > 1 {
        return Err(DecodeError::Protocol(what));
    }
    Ok(v)
}

impl Properties {
    pub fn is_empty(&self) -> bool {
        *self == EMPTY
    }

    pub(crate) fn decode(r: &mut Reader, ctx: Ctx) -> Result<Props, DecodeError> {
        let len = r.varint()? as usize;
        if len == 0 {
            return Ok(Props::default());
        }
        let mut r = r.sub(len)?;
        // Filled in place on the heap: building it on the stack and boxing it
        // afterwards moved 400 bytes per packet.
        let mut p = Box::<Properties>::default();
        while r.remaining() > 0 {
            let id = r.varint()?;
            let allowed = match id {
                0x01..=0x03 | 0x08 | 0x09 => M_PUB_WILL,
                0x0B => mask(&[Publish, Subscribe]),
                0x11 => M_SESSION_EXPIRY,
                0x12 | 0x13 | 0x1A | 0x24 | 0x25 | 0x28..=0x2A => mask(&[ConnAck]),
                0x15 | 0x16 => M_AUTH,
                0x17 | 0x19 => mask(&[Connect]),
                0x18 => mask(&[Will]),
                0x1C => mask(&[ConnAck, Disconnect]),
                0x1F => M_REASON_STRING,
                0x21 | 0x22 | 0x27 => M_CONNECT_CONNACK,
                0x23 => mask(&[Publish]),
                0x26 => M_ALL,
                _ => return Err(DecodeError::Malformed("unknown property identifier")),
            };
            if allowed & ctx.bit() == 0 {
                return Err(DecodeError::Protocol("property not allowed in this packet"));
            }
            match id {
                0x01 => set_once(
                    &mut p.payload_format_indicator,
                    bool_byte(r.u8()?, "payload format indicator must be 0 or 1")?,
                    "duplicate payload format indicator",
                )?,
                0x02 => set_once(
                    &mut p.message_expiry_interval,
                    r.u32()?,
                    "duplicate message expiry interval",
                )?,
                0x03 => set_once(&mut p.content_type, r.str()?, "duplicate content type")?,
                0x08 => set_once(&mut p.response_topic, r.str()?, "duplicate response topic")?,
                0x09 => set_once(
                    &mut p.correlation_data,
                    r.binary()?,
                    "duplicate correlation data",
                )?,
                0x0B => {
                    let v = r.varint()?;
                    if v == 0 {
                        return Err(DecodeError::Protocol("subscription identifier 0"));
                    }
                    if ctx == Subscribe && !p.subscription_identifiers.is_empty() {
                        return Err(DecodeError::Protocol("duplicate subscription identifier"));
                    }
                    p.subscription_identifiers.push(v);
                }
                0x11 => set_once(
                    &mut p.session_expiry_interval,
                    r.u32()?,
                    "duplicate session expiry interval",
                )?,
                0x12 => set_once(
                    &mut p.assigned_client_identifier,
                    r.str()?,
                    "duplicate assigned client identifier",
                )?,
                0x13 => set_once(
                    &mut p.server_keep_alive,
                    r.u16()?,
                    "duplicate server keep alive",
                )?,
                0x15 => set_once(
                    &mut p.authentication_method,
                    r.str()?,
                    "duplicate authentication method",
                )?,
                0x16 => set_once(
                    &mut p.authentication_data,
                    r.binary()?,
                    "duplicate authentication data",
                )?,
                0x17 => set_once(
                    &mut p.request_problem_information,
                    bool_byte(r.u8()?, "request problem information must be 0 or 1")?,
                    "duplicate request problem information",
                )?,
                0x18 => set_once(
                    &mut p.will_delay_interval,
                    r.u32()?,
                    "duplicate will delay interval",
                )?,
                0x19 => set_once(
                    &mut p.request_response_information,
                    bool_byte(r.u8()?, "request response information must be 0 or 1")?,
                    "duplicate request response information",
                )?,
                0x1A => set_once(
                    &mut p.response_information,
                    r.str()?,
                    "duplicate response information",
                )?,
                0x1C => set_once(
                    &mut p.server_reference,
                    r.str()?,
                    "duplicate server reference",
                )?,
                0x1F => set_once(&mut p.reason_string, r.str()?, "duplicate reason string")?,
                0x21 => {
                    let v = r.u16()?;
                    if v == 0 {
                        return Err(DecodeError::Protocol("receive maximum 0"));
                    }
                    set_once(&mut p.receive_maximum, v, "duplicate receive maximum")?
                }
                0x22 => set_once(
                    &mut p.topic_alias_maximum,
                    r.u16()?,
                    "duplicate topic alias maximum",
                )?,
                0x23 => set_once(&mut p.topic_alias, r.u16()?, "duplicate topic alias")?,
                0x24 => set_once(
                    &mut p.maximum_qos,
                    bool_byte(r.u8()?, "maximum qos must be 0 or 1")?,
                    "duplicate maximum qos",
                )?,
                0x25 => set_once(
                    &mut p.retain_available,
                    bool_byte(r.u8()?, "retain available must be 0 or 1")?,
                    "duplicate retain available",
                )?,
                0x26 => {
                    let k = r.str()?;
                    let v = r.str()?;
                    p.user_properties.push((k, v));
                }
                0x27 => {
                    let v = r.u32()?;
                    if v == 0 {
                        return Err(DecodeError::Protocol("maximum packet size 0"));
                    }
                    set_once(
                        &mut p.maximum_packet_size,
                        v,
                        "duplicate maximum packet size",
                    )?
                }
                0x28 => set_once(
                    &mut p.wildcard_subscription_available,
                    bool_byte(r.u8()?, "wildcard subscription available must be 0 or 1")?,
                    "duplicate wildcard subscription available",
                )?,
                0x29 => set_once(
                    &mut p.subscription_identifier_available,
                    bool_byte(r.u8()?, "subscription identifier available must be 0 or 1")?,
                    "duplicate subscription identifier available",
                )?,
                0x2A => set_once(
                    &mut p.shared_subscription_available,
                    bool_byte(r.u8()?, "shared subscription available must be 0 or 1")?,
                    "duplicate shared subscription available",
                )?,
                _ => unreachable!("filtered above"),
            }
        }
        Ok(Props(Some(p)))
    }

    /// Length of the encoded property block, without its own length prefix.
    pub fn encoded_len(&self) -> usize {
        let s = |v: &Option<Str>| v.as_ref().map_or(0, |s| 3 + s.len());
        let b = |v: &Option<Bytes>| v.as_ref().map_or(0, |s| 3 + s.len());
        let n = |v: &Option<u8>| v.map_or(0, |_| 2);
        let w = |v: &Option<u16>| v.map_or(0, |_| 3);
        let d = |v: &Option<u32>| v.map_or(0, |_| 5);
        n(&self.payload_format_indicator)
            + d(&self.message_expiry_interval)
            + s(&self.content_type)
            + s(&self.response_topic)
            + b(&self.correlation_data)
            + self
                .subscription_identifiers
                .iter()
                .map(|v| 1 + varint_len(*v as usize))
                .sum::<usize>()
            + d(&self.session_expiry_interval)
            + s(&self.assigned_client_identifier)
            + w(&self.server_keep_alive)
            + s(&self.authentication_method)
            + b(&self.authentication_data)
            + n(&self.request_problem_information)
            + d(&self.will_delay_interval)
            + n(&self.request_response_information)
            + s(&self.response_information)
            + s(&self.server_reference)
            + s(&self.reason_string)
            + w(&self.receive_maximum)
            + w(&self.topic_alias_maximum)
            + w(&self.topic_alias)
            + n(&self.maximum_qos)
            + n(&self.retain_available)
            + self
                .user_properties
                .iter()
                .map(|(k, v)| 5 + k.len() + v.len())
                .sum::<usize>()
            + d(&self.maximum_packet_size)
            + n(&self.wildcard_subscription_available)
            + n(&self.subscription_identifier_available)
            + n(&self.shared_subscription_available)
    }

    /// Writes the length prefix and the properties.
    pub(crate) fn encode(&self, len: usize, out: &mut BytesMut) {
        write_varint(len, out);
        fn s(out: &mut BytesMut, id: u8, v: &Option<Str>) {
            if let Some(v) = v {
                out.put_u8(id);
                write_bin(v.as_bytes(), out);
            }
        }
        fn b(out: &mut BytesMut, id: u8, v: &Option<Bytes>) {
            if let Some(v) = v {
                out.put_u8(id);
                write_bin(v, out);
            }
        }
        fn n(out: &mut BytesMut, id: u8, v: Option<u8>) {
            if let Some(v) = v {
                out.put_u8(id);
                out.put_u8(v);
            }
        }
        fn w(out: &mut BytesMut, id: u8, v: Option<u16>) {
            if let Some(v) = v {
                out.put_u8(id);
                out.put_u16(v);
            }
        }
        fn d(out: &mut BytesMut, id: u8, v: Option<u32>) {
            if let Some(v) = v {
                out.put_u8(id);
                out.put_u32(v);
            }
        }
        n(out, 0x01, self.payload_format_indicator);
        d(out, 0x02, self.message_expiry_interval);
        s(out, 0x03, &self.content_type);
        s(out, 0x08, &self.response_topic);
        b(out, 0x09, &self.correlation_data);
        for id in &self.subscription_identifiers {
            out.put_u8(0x0B);
            write_varint(*id as usize, out);
        }
        d(out, 0x11, self.session_expiry_interval);
        s(out, 0x12, &self.assigned_client_identifier);
        w(out, 0x13, self.server_keep_alive);
        s(out, 0x15, &self.authentication_method);
        b(out, 0x16, &self.authentication_data);
        n(out, 0x17, self.request_problem_information);
        d(out, 0x18, self.will_delay_interval);
        n(out, 0x19, self.request_response_information);
        s(out, 0x1A, &self.response_information);
        s(out, 0x1C, &self.server_reference);
        s(out, 0x1F, &self.reason_string);
        w(out, 0x21, self.receive_maximum);
        w(out, 0x22, self.topic_alias_maximum);
        w(out, 0x23, self.topic_alias);
        n(out, 0x24, self.maximum_qos);
        n(out, 0x25, self.retain_available);
        for (k, v) in &self.user_properties {
            out.put_u8(0x26);
            write_bin(k.as_bytes(), out);
            write_bin(v.as_bytes(), out);
        }
        d(out, 0x27, self.maximum_packet_size);
        n(out, 0x28, self.wildcard_subscription_available);
        n(out, 0x29, self.subscription_identifier_available);
        n(out, 0x2A, self.shared_subscription_available);
    }
}

pub(crate) fn varint_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

pub(crate) fn write_varint(mut v: usize, out: &mut BytesMut) {
    loop {
        let mut byte = (v % 128) as u8;
        v /= 128;
        if v > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if v == 0 {
            break;
        }
    }
}

pub(crate) fn write_bin(b: &[u8], out: &mut BytesMut) {
    out.put_u16(b.len() as u16);
    out.put_slice(b);
}
