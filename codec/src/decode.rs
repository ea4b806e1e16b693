use bytes::{Buf, Bytes, BytesMut};

use crate::props::{Ctx, Properties, Props};
use crate::types::*;

/// Why a packet could not be decoded. The broker maps these to reason codes:
/// `Malformed` → 0x81, `Protocol` → 0x82, `PacketTooLarge` → 0x95,
/// `UnsupportedProtocolVersion` → CONNACK 0x01 / 0x84.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    PacketTooLarge { size: usize, max: usize },
    #[error("unsupported protocol version {0}")]
    UnsupportedProtocolVersion(u8),
    #[error("unknown protocol name")]
    InvalidProtocolName,
}

/// A cursor over one packet's frozen bytes; every accessor is bounds-checked.
pub(crate) struct Reader {
    buf: Bytes,
}

impl Reader {
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.buf.len() < n {
            Err(DecodeError::Malformed("packet shorter than its fields"))
        } else {
            Ok(())
        }
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }

    pub(crate) fn varint(&mut self) -> Result<u32, DecodeError> {
        let mut value: u32 = 0;
        for i in 0..4 {
            let b = self.u8()?;
            value |= ((b & 0x7F) as u32) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::Malformed(
            "variable byte integer longer than 4 bytes",
        ))
    }

    pub(crate) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u16()? as usize;
        self.need(len)?;
        Ok(self.buf.split_to(len))
    }

    pub(crate) fn str(&mut self) -> Result<Str, DecodeError> {
        let b = self.binary()?;
        Str::from_bytes(b).ok_or(DecodeError::Malformed("invalid UTF-8 string"))
    }

    pub(crate) fn sub(&mut self, len: usize) -> Result<Reader, DecodeError> {
        self.need(len)?;
        Ok(Reader {
            buf: self.buf.split_to(len),
        })
    }

    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }
}

/// Parses the fixed header: (first byte, remaining length, header length), or
/// `None` when more bytes are needed.
fn fixed_header(buf: &[u8]) -> Result<Option<(u8, usize, usize)>, DecodeError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut len: usize = 0;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= ((b & 0x7F) as usize) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((buf[0], len, 2 + i)));
        }
    }
    Err(DecodeError::Malformed(
        "remaining length longer than 4 bytes",
    ))
}

/// If `buf` starts with a CONNECT whose variable header is buffered, returns
/// its protocol, so the caller can answer a bad CONNECT in the client's version.
pub fn peek_connect_protocol(buf: &[u8]) -> Option<Protocol> {
    let (first, _, hlen) = fixed_header(buf).ok()??;
    if first >> 4 != 1 {
        return None;
    }
    let rest = buf.get(hlen..)?;
    let name_len = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]) as usize;
    match rest.get(2 + name_len)? {
        5 => Some(Protocol::V5),
        _ => Some(Protocol::V311),
    }
}

/// Decodes one packet from the front of `buf`.
///
/// Returns `Ok(None)` while the packet is incomplete (nothing is consumed).
/// A packet whose announced size exceeds `max_size` fails as soon as its
/// fixed header is read, before its body arrives. `protocol` is the
/// connection's version; a CONNECT carries its own.
pub fn decode(
    buf: &mut BytesMut,
    protocol: Protocol,
    max_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let Some((first, remaining, hlen)) = fixed_header(buf)? else {
        return Ok(None);
    };
    let size = hlen + remaining;
    if size > max_size {
        return Err(DecodeError::PacketTooLarge {
            size,
            max: max_size,
        });
    }
    if buf.len() < size {
        return Ok(None);
    }
    let mut frame = buf.split_to(size).freeze();
    frame.advance(hlen);
    let mut r = Reader { buf: frame };
    let flags = first & 0x0F;
    let kind = first >> 4;
    let v5 = protocol == Protocol::V5;
    let fixed_flags = |want: u8| {
        if flags != want {
            Err(DecodeError::Malformed("invalid fixed header flags"))
        } else {
            Ok(())
        }
    };
    let packet = match kind {
        1 => {
            fixed_flags(0)?;
            Packet::Connect(Box::new(decode_connect(&mut r)?))
        }
        2 => {
            fixed_flags(0)?;
            let ack_flags = r.u8()?;
            if ack_flags & 0xFE != 0 {
                return Err(DecodeError::Malformed("reserved CONNACK flags set"));
            }
            let code = r.u8()?;
            let properties = if v5 {
                Properties::decode(&mut r, Ctx::ConnAck)?
            } else {
                Props::default()
            };
            Packet::ConnAck(ConnAck {
                session_present: ack_flags & 1 == 1,
                code,
                properties,
            })
        }
        3 => Packet::Publish(decode_publish(&mut r, flags, v5)?),
        4 => {
            fixed_flags(0)?;
            Packet::PubAck(decode_pub_resp(&mut r, v5)?)
        }
        5 => {
            fixed_flags(0)?;
            Packet::PubRec(decode_pub_resp(&mut r, v5)?)
        }
        6 => {
            fixed_flags(2)?;
            Packet::PubRel(decode_pub_resp(&mut r, v5)?)
        }
        7 => {
            fixed_flags(0)?;
            Packet::PubComp(decode_pub_resp(&mut r, v5)?)
        }
        8 => {
            fixed_flags(2)?;
            Packet::Subscribe(decode_subscribe(&mut r, v5)?)
        }
        9 => {
            fixed_flags(0)?;
            let packet_id = r.u16()?;
            let properties = if v5 {
                Properties::decode(&mut r, Ctx::SubAck)?
            } else {
                Props::default()
            };
            let reasons = r.rest().to_vec();
            Packet::SubAck(SubAck {
                packet_id,
                properties,
                reasons,
            })
        }
        10 => {
            fixed_flags(2)?;
            let packet_id = nonzero_id(r.u16()?)?;
            let properties = if v5 {
                Properties::decode(&mut r, Ctx::Unsubscribe)?
            } else {
                Props::default()
            };
            let mut filters = Vec::new();
            while r.remaining() > 0 {
                filters.push(r.str()?);
            }
            if filters.is_empty() {
                return Err(DecodeError::Protocol("UNSUBSCRIBE without topic filters"));
            }
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                properties,
                filters,
            })
        }
        11 => {
            fixed_flags(0)?;
            let packet_id = r.u16()?;
            let (properties, reasons) = if v5 {
                let p = Properties::decode(&mut r, Ctx::UnsubAck)?;
                (p, r.rest().to_vec())
            } else {
                (Props::default(), Vec::new())
            };
            Packet::UnsubAck(UnsubAck {
                packet_id,
                properties,
                reasons,
            })
        }
        12 => {
            fixed_flags(0)?;
            Packet::PingReq
        }
        13 => {
            fixed_flags(0)?;
            Packet::PingResp
        }
        14 => {
            fixed_flags(0)?;
            let (reason, properties) = reason_and_props(&mut r, v5, Ctx::Disconnect)?;
            Packet::Disconnect(Disconnect { reason, properties })
        }
        15 if v5 => {
            fixed_flags(0)?;
            let (reason, properties) = reason_and_props(&mut r, v5, Ctx::Auth)?;
            Packet::Auth(Auth { reason, properties })
        }
        _ => return Err(DecodeError::Malformed("reserved packet type")),
    };
    if r.remaining() != 0 {
        return Err(DecodeError::Malformed("trailing bytes after packet"));
    }
    Ok(Some(packet))
}

fn nonzero_id(id: u16) -> Result<u16, DecodeError> {
    if id == 0 {
        Err(DecodeError::Malformed("packet identifier 0"))
    } else {
        Ok(id)
    }
}

fn reason_and_props(r: &mut Reader, v5: bool, ctx: Ctx) -> Result<(u8, Props), DecodeError> {
    if !v5 || r.remaining() == 0 {
        return Ok((0, Props::default()));
    }
    let reason = r.u8()?;
    let props = if r.remaining() > 0 {
        Properties::decode(r, ctx)?
    } else {
        Props::default()
    };
    Ok((reason, props))
}

fn decode_connect(r: &mut Reader) -> Result<Connect, DecodeError> {
    let name = r.binary()?;
    let level = r.u8()?;
    let protocol = match (&name[..], level) {
        (b"MQTT", 4) => Protocol::V311,
        (b"MQTT", 5) => Protocol::V5,
        (b"MQTT", l) | (b"MQIsdp", l) => return Err(DecodeError::UnsupportedProtocolVersion(l)),
        _ => return Err(DecodeError::InvalidProtocolName),
    };
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::Malformed("reserved CONNECT flag set"));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let has_password = flags & 0x40 != 0;
    let has_username = flags & 0x80 != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(DecodeError::Malformed(
            "will QoS or retain set without will flag",
        ));
    }
    let will_qos = QoS::from_u8(will_qos).ok_or(DecodeError::Malformed("will QoS 3"))?;
    if protocol == Protocol::V311 && has_password && !has_username {
        return Err(DecodeError::Malformed(
            "password flag set without user name flag",
        ));
    }
    let keep_alive = r.u16()?;
    let v5 = protocol == Protocol::V5;
    let properties = if v5 {
        Properties::decode(r, Ctx::Connect)?
    } else {
        Props::default()
    };
    let client_id = r.str()?;
    let will = if will_flag {
        let properties = if v5 {
            Properties::decode(r, Ctx::Will)?
        } else {
            Props::default()
        };
        let topic = r.str()?;
        let payload = r.binary()?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if has_username { Some(r.str()?) } else { None };
    let password = if has_password {
        Some(r.binary()?)
    } else {
        None
    };
    Ok(Connect {
        protocol,
        clean_start,
        keep_alive,
        properties,
        client_id,
        will,
        username,
        password,
    })
}

fn decode_publish(r: &mut Reader, flags: u8, v5: bool) -> Result<Publish, DecodeError> {
    let qos = QoS::from_u8((flags >> 1) & 0x03).ok_or(DecodeError::Malformed("PUBLISH QoS 3"))?;
    let dup = flags & 0x08 != 0;
    if qos == QoS::AtMostOnce && dup {
        return Err(DecodeError::Malformed("DUP set on a QoS 0 PUBLISH"));
    }
    let retain = flags & 0x01 != 0;
    let topic = r.str()?;
    let packet_id = if qos == QoS::AtMostOnce {
        0
    } else {
        nonzero_id(r.u16()?)?
    };
    let properties = if v5 {
        Properties::decode(r, Ctx::Publish)?
    } else {
        Props::default()
    };
    Ok(Publish {
        dup,
        qos,
        retain,
        topic,
        packet_id,
        properties,
        payload: r.rest(),
    })
}

fn decode_pub_resp(r: &mut Reader, v5: bool) -> Result<PubResp, DecodeError> {
    let packet_id = nonzero_id(r.u16()?)?;
    let (reason, properties) = reason_and_props(r, v5, Ctx::PubResp)?;
    Ok(PubResp {
        packet_id,
        reason,
        properties,
    })
}

fn decode_subscribe(r: &mut Reader, v5: bool) -> Result<Subscribe, DecodeError> {
    let packet_id = nonzero_id(r.u16()?)?;
    let properties = if v5 {
        Properties::decode(r, Ctx::Subscribe)?
    } else {
        Props::default()
    };
    let mut filters = Vec::new();
    while r.remaining() > 0 {
        let filter = r.str()?;
        let opts = r.u8()?;
        let reserved = if v5 { 0xC0 } else { 0xFC };
        if opts & reserved != 0 {
            return Err(DecodeError::Malformed(
                "reserved subscription option bits set",
            ));
        }
        let qos = QoS::from_u8(opts & 0x03).ok_or(DecodeError::Malformed("subscription QoS 3"))?;
        let retain_handling = (opts >> 4) & 0x03;
        if retain_handling == 3 {
            return Err(DecodeError::Protocol("retain handling 3"));
        }
        filters.push((
            filter,
            SubscriptionOptions {
                qos,
                no_local: opts & 0x04 != 0,
                retain_as_published: opts & 0x08 != 0,
                retain_handling,
            },
        ));
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol("SUBSCRIBE without topic filters"));
    }
    Ok(Subscribe {
        packet_id,
        properties,
        filters,
    })
}
