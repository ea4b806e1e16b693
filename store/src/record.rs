//! The on-disk form of a stored message: written once per message, whatever
//! its fan-out, and read back after a restart or when a reader fell behind.
//!
//! Layout (version 1): `1 | source | targets | properties | system | body`,
//! strings as LEB128 length + UTF-8. The targets (endpoint id, priority) are
//! in the record so an acknowledgement can tell whether other endpoints
//! still hold the body without a separate reference-count table.

use std::sync::Arc;

use bytes::Bytes;
use edgehub_router::{Message, MessageSource};

use crate::StoreError;

const VERSION: u8 = 1;

/// (endpoint id, priority) of every queue a message was put in.
pub(crate) type Targets = Arc<[(u32, u8)]>;

/// Serialises `msg` for the given targets.
pub(crate) fn encode(msg: &Message, targets: &[(u32, u8)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.body.len() + 64 + 32 * msg.properties.len());
    out.push(VERSION);
    match &msg.source {
        None => out.push(0),
        Some(MessageSource::Telemetry) => out.push(1),
        Some(MessageSource::ModuleOutput { module, output }) => {
            out.push(2);
            put_str(&mut out, module);
            put_str(&mut out, output);
        }
        Some(MessageSource::TwinChangeNotification) => out.push(3),
    }
    put_len(&mut out, targets.len());
    for (ep, prio) in targets {
        out.extend_from_slice(&ep.to_le_bytes());
        out.push(*prio);
    }
    put_len(&mut out, msg.properties.len());
    for (k, v) in &msg.properties {
        put_str(&mut out, k);
        put_str(&mut out, v);
    }
    let system: Vec<_> = msg.system_properties().collect();
    put_len(&mut out, system.len());
    for (k, v) in system {
        put_str(&mut out, k);
        put_str(&mut out, v);
    }
    out.extend_from_slice(&msg.body);
    out
}

/// Reads a record back; the body is a view of `raw`, not a copy.
pub(crate) fn decode(raw: Bytes) -> Result<(Message, Targets), StoreError> {
    let mut r = Reader { buf: &raw, pos: 0 };
    if r.byte()? != VERSION {
        return Err(StoreError::Corrupt("unknown record version".into()));
    }
    let source = match r.byte()? {
        0 => None,
        1 => Some(MessageSource::Telemetry),
        2 => {
            let module: Arc<str> = r.str()?.into();
            let output: Arc<str> = r.str()?.into();
            Some(MessageSource::ModuleOutput { module, output })
        }
        3 => Some(MessageSource::TwinChangeNotification),
        _ => return Err(StoreError::Corrupt("unknown message source".into())),
    };
    let targets = r.targets()?;
    let mut msg = Message::default();
    for _ in 0..r.len()? {
        let k = r.str()?;
        let v = r.str()?;
        msg.properties.push((k.into(), v.into()));
    }
    for _ in 0..r.len()? {
        let k = r.str()?;
        let v = r.str()?;
        msg.set_system_named(k, v);
    }
    msg.source = source;
    let body_at = r.pos;
    msg.body = raw.slice(body_at..);
    Ok((msg, targets))
}

/// Only the targets, for deciding whether a body is still referenced.
pub(crate) fn targets(raw: &[u8]) -> Result<Targets, StoreError> {
    let mut r = Reader { buf: raw, pos: 0 };
    if r.byte()? != VERSION {
        return Err(StoreError::Corrupt("unknown record version".into()));
    }
    if r.byte()? == 2 {
        r.str()?;
        r.str()?;
    }
    r.targets()
}

fn put_len(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_len(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, StoreError> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or_else(|| StoreError::Corrupt("record truncated".into()))?;
        self.pos += 1;
        Ok(b)
    }

    fn len(&mut self) -> Result<usize, StoreError> {
        let mut n = 0usize;
        for shift in (0..35).step_by(7) {
            let b = self.byte()?;
            n |= ((b & 0x7f) as usize) << shift;
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(StoreError::Corrupt("length too long".into()))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| StoreError::Corrupt("record truncated".into()))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn str(&mut self) -> Result<&'a str, StoreError> {
        let n = self.len()?;
        std::str::from_utf8(self.take(n)?)
            .map_err(|_| StoreError::Corrupt("string is not UTF-8".into()))
    }

    fn targets(&mut self) -> Result<Targets, StoreError> {
        let n = self.len()?;
        let mut t = Vec::with_capacity(n);
        for _ in 0..n {
            let ep = self.take(4)?;
            let prio = self.byte()?;
            t.push((u32::from_le_bytes([ep[0], ep[1], ep[2], ep[3]]), prio));
        }
        Ok(t.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgehub_router::SystemProperty;

    #[test]
    fn round_trip_keeps_everything_the_router_reads() {
        let msg = Message::new(&b"{\"t\":21.5}"[..])
            .with_property("alert", "yes")
            .with_property("Ünïcode", "värde")
            .with_system(SystemProperty::ContentType, "application/json")
            .with_system(SystemProperty::ContentEncoding, "utf-8")
            .with_system(SystemProperty::ConnectionDeviceId, "dev1")
            .with_source(MessageSource::ModuleOutput {
                module: "filter".into(),
                output: "out1".into(),
            });
        let mut msg = msg;
        msg.set_system_named("x-custom", "1");
        let raw = encode(&msg, &[(3, 0), (7, 10)]);
        let (back, targets) = decode(Bytes::from(raw.clone())).unwrap();
        assert_eq!(&*targets, &[(3, 0), (7, 10)]);
        assert_eq!(&*super::targets(&raw).unwrap(), &[(3, 0), (7, 10)]);
        assert_eq!(back.body, msg.body);
        assert_eq!(back.properties, msg.properties);
        assert_eq!(back.source, msg.source);
        assert_eq!(
            back.system_properties().collect::<Vec<_>>(),
            msg.system_properties().collect::<Vec<_>>()
        );
        assert_eq!(back.body_json().unwrap()["t"], 21.5);
    }

    #[test]
    fn truncated_records_are_errors_not_panics() {
        let msg = Message::new(&b"abc"[..]).with_property("k", "v");
        let raw = encode(&msg, &[(1, 2)]);
        // Every prefix that cuts into the header must fail cleanly; cutting
        // only the body is indistinguishable from a shorter body.
        let header = raw.len() - 3;
        for cut in 0..header {
            assert!(
                decode(Bytes::copy_from_slice(&raw[..cut])).is_err(),
                "cut {cut}"
            );
        }
        let mut bad = raw.clone();
        bad[0] = 9;
        assert!(matches!(
            decode(Bytes::from(bad)),
            Err(StoreError::Corrupt(_))
        ));
    }
}
