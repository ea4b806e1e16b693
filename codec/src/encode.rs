use bytes::{BufMut, BytesMut};

use crate::props::{varint_len, write_bin, write_varint, Props};
use crate::types::*;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The peer's Maximum Packet Size forbids this packet; nothing was written.
    #[error("packet of {size} bytes exceeds the peer's maximum of {max}")]
    PacketTooLarge { size: usize, max: usize },
    /// Remaining length over 268,435,455 bytes, or a field over 65,535 bytes.
    #[error("packet too large to encode in MQTT")]
    Unencodable,
}

const MAX_REMAINING: usize = 268_435_455;

/// (properties length, with its length prefix). Takes `Props` so MQTT 3.1.1
/// packets never touch the property block at all.
fn props_len(v5: bool, p: &Props) -> (usize, usize) {
    if !v5 || p.is_none() {
        return (0, usize::from(v5));
    }
    let l = p.encoded_len();
    (l, varint_len(l) + l)
}

fn str_fits(s: &[u8]) -> Result<(), EncodeError> {
    if s.len() > u16::MAX as usize {
        Err(EncodeError::Unencodable)
    } else {
        Ok(())
    }
}

/// Appends `packet` to `out` in `protocol`'s encoding and returns its size.
/// Fails without writing when it would exceed `max_size`.
pub fn encode(
    packet: &Packet,
    protocol: Protocol,
    out: &mut BytesMut,
    max_size: usize,
) -> Result<usize, EncodeError> {
    let v5 = protocol == Protocol::V5;
    if let Packet::Publish(p) = packet {
        return encode_publish(p, v5, out, max_size);
    }
    // Length of the packet's property block, computed once for both passes.
    let mut plen = 0;
    let mut pl = |v5: bool, p: &Props| {
        let (l, with_prefix) = props_len(v5, p);
        plen = l;
        with_prefix
    };
    // (first byte, remaining length) first, so each packet is written once.
    let (first, remaining) = match packet {
        Packet::Connect(c) => {
            let v5 = c.protocol == Protocol::V5;
            let mut n = 2 + 4 + 1 + 1 + 2 + pl(v5, &c.properties) + 2 + c.client_id.len();
            if let Some(w) = &c.will {
                str_fits(&w.payload)?;
                n += props_len(v5, &w.properties).1 + 2 + w.topic.len() + 2 + w.payload.len();
            }
            if let Some(u) = &c.username {
                n += 2 + u.len();
            }
            if let Some(p) = &c.password {
                str_fits(p)?;
                n += 2 + p.len();
            }
            (0x10, n)
        }
        Packet::ConnAck(c) => (0x20, 2 + pl(v5, &c.properties)),
        Packet::Publish(_) => unreachable!("handled by encode_publish"),
        Packet::PubAck(r) => (0x40, pub_resp_len(v5, r, &mut pl)),
        Packet::PubRec(r) => (0x50, pub_resp_len(v5, r, &mut pl)),
        Packet::PubRel(r) => (0x62, pub_resp_len(v5, r, &mut pl)),
        Packet::PubComp(r) => (0x70, pub_resp_len(v5, r, &mut pl)),
        Packet::Subscribe(s) => (
            0x82,
            2 + pl(v5, &s.properties) + s.filters.iter().map(|(f, _)| 3 + f.len()).sum::<usize>(),
        ),
        Packet::SubAck(s) => (0x90, 2 + pl(v5, &s.properties) + s.reasons.len()),
        Packet::Unsubscribe(u) => (
            0xA2,
            2 + pl(v5, &u.properties) + u.filters.iter().map(|f| 2 + f.len()).sum::<usize>(),
        ),
        Packet::UnsubAck(u) => (
            0xB0,
            if v5 {
                2 + pl(v5, &u.properties) + u.reasons.len()
            } else {
                2
            },
        ),
        Packet::PingReq => (0xC0, 0),
        Packet::PingResp => (0xD0, 0),
        Packet::Disconnect(d) => (0xE0, reason_props_len(v5, d.reason, &d.properties, &mut pl)),
        Packet::Auth(a) => (0xF0, reason_props_len(v5, a.reason, &a.properties, &mut pl)),
    };
    let size = write_header(first, remaining, max_size, out)?;
    let props = |p: &Props, out: &mut BytesMut| {
        if v5 {
            if p.is_none() {
                out.put_u8(0);
            } else {
                p.encode(plen, out)
            }
        }
    };
    match packet {
        Packet::Connect(c) => {
            let v5 = c.protocol == Protocol::V5;
            write_bin(b"MQTT", out);
            out.put_u8(c.protocol.level());
            let mut flags = u8::from(c.clean_start) << 1;
            if let Some(w) = &c.will {
                flags |= 0x04 | ((w.qos as u8) << 3) | (u8::from(w.retain) << 5);
            }
            if c.password.is_some() {
                flags |= 0x40;
            }
            if c.username.is_some() {
                flags |= 0x80;
            }
            out.put_u8(flags);
            out.put_u16(c.keep_alive);
            if v5 {
                c.properties.encode(plen, out);
            }
            write_bin(c.client_id.as_bytes(), out);
            if let Some(w) = &c.will {
                if v5 {
                    w.properties.encode(w.properties.encoded_len(), out);
                }
                write_bin(w.topic.as_bytes(), out);
                write_bin(&w.payload, out);
            }
            if let Some(u) = &c.username {
                write_bin(u.as_bytes(), out);
            }
            if let Some(p) = &c.password {
                write_bin(p, out);
            }
        }
        Packet::ConnAck(c) => {
            out.put_u8(u8::from(c.session_present));
            out.put_u8(c.code);
            props(&c.properties, out);
        }
        Packet::Publish(_) => unreachable!("handled by encode_publish"),
        Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) => {
            out.put_u16(r.packet_id);
            if v5 && !(r.reason == 0 && r.properties.is_empty()) {
                out.put_u8(r.reason);
                if !r.properties.is_empty() {
                    props(&r.properties, out);
                }
            }
        }
        Packet::Subscribe(s) => {
            out.put_u16(s.packet_id);
            props(&s.properties, out);
            for (f, o) in &s.filters {
                write_bin(f.as_bytes(), out);
                let mut b = o.qos as u8;
                if v5 {
                    b |= u8::from(o.no_local) << 2
                        | u8::from(o.retain_as_published) << 3
                        | (o.retain_handling & 3) << 4;
                }
                out.put_u8(b);
            }
        }
        Packet::SubAck(s) => {
            out.put_u16(s.packet_id);
            props(&s.properties, out);
            out.put_slice(&s.reasons);
        }
        Packet::Unsubscribe(u) => {
            out.put_u16(u.packet_id);
            props(&u.properties, out);
            for f in &u.filters {
                write_bin(f.as_bytes(), out);
            }
        }
        Packet::UnsubAck(u) => {
            out.put_u16(u.packet_id);
            if v5 {
                props(&u.properties, out);
                out.put_slice(&u.reasons);
            }
        }
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(Disconnect { reason, properties })
        | Packet::Auth(Auth { reason, properties }) => {
            if v5 && !(*reason == 0 && properties.is_empty()) {
                out.put_u8(*reason);
                if !properties.is_empty() {
                    props(properties, out);
                }
            }
        }
    }
    Ok(size)
}

/// Checks the limits, reserves the whole packet and writes its fixed header;
/// returns the packet's size. Nothing is written when a limit is exceeded.
fn write_header(
    first: u8,
    remaining: usize,
    max_size: usize,
    out: &mut BytesMut,
) -> Result<usize, EncodeError> {
    if remaining > MAX_REMAINING {
        return Err(EncodeError::Unencodable);
    }
    let size = 1 + varint_len(remaining) + remaining;
    if size > max_size {
        return Err(EncodeError::PacketTooLarge {
            size,
            max: max_size,
        });
    }
    out.reserve(size);
    out.put_u8(first);
    write_varint(remaining, out);
    Ok(size)
}

/// PUBLISH is written for every delivery: a straight-line path without the
/// generic two-pass match (about 70 instructions less per packet).
fn encode_publish(
    p: &Publish,
    v5: bool,
    out: &mut BytesMut,
    max_size: usize,
) -> Result<usize, EncodeError> {
    let topic = p.topic.as_bytes();
    str_fits(topic)?;
    let with_id = p.qos != QoS::AtMostOnce;
    let (plen, pfull) = props_len(v5, &p.properties);
    let remaining = 2 + topic.len() + if with_id { 2 } else { 0 } + pfull + p.payload.len();
    let first = 0x30 | (u8::from(p.dup) << 3) | ((p.qos as u8) << 1) | u8::from(p.retain);
    let size = write_header(first, remaining, max_size, out)?;
    write_bin(topic, out);
    if with_id {
        out.put_u16(p.packet_id);
    }
    if v5 {
        if p.properties.is_none() {
            out.put_u8(0);
        } else {
            p.properties.encode(plen, out);
        }
    }
    out.put_slice(&p.payload);
    Ok(size)
}

fn pub_resp_len(v5: bool, r: &PubResp, pl: &mut impl FnMut(bool, &Props) -> usize) -> usize {
    if !v5 || (r.reason == 0 && r.properties.is_empty()) {
        2
    } else if r.properties.is_empty() {
        3
    } else {
        3 + pl(v5, &r.properties)
    }
}

fn reason_props_len(
    v5: bool,
    reason: u8,
    p: &Props,
    pl: &mut impl FnMut(bool, &Props) -> usize,
) -> usize {
    if !v5 || (reason == 0 && p.is_empty()) {
        0
    } else if p.is_empty() {
        1
    } else {
        1 + pl(v5, p)
    }
}
