//! A check of the frame layer on the bytes a client sends, before fe2o3
//! decodes them: protocol headers and frame headers are walked as they
//! pass, and a frame whose size is under the 8-byte header, over the limit,
//! or whose data offset points outside it ends the connection with an I/O
//! error. fe2o3's decoder panics on some of these (a size under 8 makes it
//! advance past its buffer); the connection task would die with a panic
//! instead of closing cleanly.

/// Where the walk is in the client's byte stream.
#[derive(Debug)]
pub struct FrameGuard {
    max_frame: u32,
    /// Bytes of the current header (protocol or frame) seen so far.
    head: [u8; 8],
    have: usize,
    /// Bytes of the current frame body still to pass.
    body_left: u64,
    /// Extended-header bytes still to skip before the body's first byte.
    ext_left: u64,
    /// The body's first byte is still to come: it must start a described
    /// type (every performative and SASL frame body is one).
    expect_described: bool,
    /// The last protocol header was AMQP's (not SASL's): frames are
    /// performatives, and a Close can answer a broken one.
    amqp: bool,
    /// The client's Open (the first frame after the AMQP header), read to
    /// check its idle timeout, which fe2o3 does not show.
    open: Open,
}

#[derive(Debug)]
enum Open {
    /// Not in the AMQP layer yet.
    Before,
    /// Collecting the first frame's body.
    Reading(Vec<u8>),
    Checked,
}

/// The shortest idle timeout a client may ask for (edgeHub's floor): a
/// client that must be heard from more often than every 5 s would have the
/// hub answer heartbeats all day.
pub const MIN_IDLE_TIMEOUT_MS: u32 = 5_000;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame size {0} is under the 8-byte frame header")]
    TooSmall(u32),
    #[error("frame size {size} is over the {max}-byte maximum")]
    TooLarge { size: u32, max: u32 },
    #[error("data offset {doff} words points outside a {size}-byte frame")]
    BadOffset { doff: u8, size: u32 },
    #[error("not an AMQP 1.0 protocol header: {0:?}")]
    BadProtocolHeader([u8; 8]),
    #[error("frame body starts with {0:#04x}, not a described type")]
    NotDescribed(u8),
    #[error("idle-time-out {0} ms is under the {MIN_IDLE_TIMEOUT_MS} ms this hub accepts")]
    IdleTimeoutTooShort(u32),
}

impl FrameGuard {
    pub fn new(max_frame: u32) -> FrameGuard {
        FrameGuard {
            max_frame,
            head: [0; 8],
            have: 0,
            body_left: 0,
            ext_left: 0,
            expect_described: false,
            amqp: false,
            open: Open::Before,
        }
    }

    /// Body bytes of the first AMQP frame; checks the Open once whole.
    fn read_open(&mut self, body: &[u8], last: bool) -> Result<(), FrameError> {
        let Open::Reading(buf) = &mut self.open else {
            return Ok(());
        };
        buf.extend_from_slice(body);
        if !last {
            return Ok(());
        }
        let open = serde_amqp::from_slice::<fe2o3_amqp::types::performatives::Open>(buf);
        self.open = Open::Checked;
        // Anything but a readable Open is fe2o3's to refuse.
        match open.ok().and_then(|o| o.idle_time_out) {
            Some(ms) if ms > 0 && ms < MIN_IDLE_TIMEOUT_MS => {
                Err(FrameError::IdleTimeoutTooShort(ms))
            }
            _ => Ok(()),
        }
    }

    /// Walks `bytes`, the next ones the client sent.
    pub fn check(&mut self, mut bytes: &[u8]) -> Result<(), FrameError> {
        while !bytes.is_empty() {
            if self.body_left > 0 && self.ext_left == 0 && self.expect_described {
                self.expect_described = false;
                if bytes[0] != 0x00 {
                    return Err(FrameError::NotDescribed(bytes[0]));
                }
            }
            if self.body_left > 0 {
                let limit = if self.ext_left > 0 {
                    self.ext_left
                } else {
                    self.body_left
                };
                let n = (limit.min(bytes.len() as u64)) as usize;
                let in_body = self.ext_left == 0;
                self.ext_left -= (n as u64).min(self.ext_left);
                self.body_left -= n as u64;
                if in_body {
                    self.read_open(&bytes[..n], self.body_left == 0)?;
                }
                bytes = &bytes[n..];
                continue;
            }
            let n = (8 - self.have).min(bytes.len());
            self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have < 8 {
                break;
            }
            self.have = 0;
            if &self.head[..4] == b"AMQP" {
                if !matches!(self.head[4..], [0, 1, 0, 0] | [3, 1, 0, 0]) {
                    return Err(FrameError::BadProtocolHeader(self.head));
                }
                self.amqp = self.head[4] == 0;
                if self.amqp && matches!(self.open, Open::Before) {
                    self.open = Open::Reading(Vec::new());
                }
                continue;
            }
            let size = u32::from_be_bytes([self.head[0], self.head[1], self.head[2], self.head[3]]);
            let doff = self.head[4];
            if size < 8 {
                return Err(FrameError::TooSmall(size));
            }
            if size > self.max_frame {
                return Err(FrameError::TooLarge {
                    size,
                    max: self.max_frame,
                });
            }
            if doff < 2 || doff as u32 * 4 > size {
                return Err(FrameError::BadOffset { doff, size });
            }
            self.body_left = size as u64 - 8;
            self.ext_left = doff as u64 * 4 - 8;
            self.expect_described = size > doff as u32 * 4;
            if !self.expect_described {
                // An empty frame (a heartbeat) is not the Open.
                continue;
            }
        }
        Ok(())
    }
}

impl FrameGuard {
    /// Whether the stream is in the AMQP layer (past an AMQP protocol
    /// header), where a Close performative can carry the error.
    pub fn in_amqp_layer(&self) -> bool {
        self.amqp
    }
}

fn frame(body: Vec<u8>) -> Vec<u8> {
    let mut frame = ((body.len() + 8) as u32).to_be_bytes().to_vec();
    frame.extend([2, 0, 0, 0]);
    frame.extend(body);
    frame
}

/// A Close frame (channel 0) with `amqp:decode-error` and `description`.
pub fn decode_error_close(description: &str) -> Vec<u8> {
    close_with(
        fe2o3_amqp::types::definitions::AmqpError::DecodeError,
        description,
    )
}

fn close_with(condition: fe2o3_amqp::types::definitions::AmqpError, description: &str) -> Vec<u8> {
    use fe2o3_amqp::types::definitions::Error;
    use fe2o3_amqp::types::performatives::Close;
    let close = Close {
        error: Some(Error::new(condition, Some(description.to_owned()), None)),
    };
    frame(serde_amqp::to_vec(&close).unwrap_or_default())
}

/// What answers `e` before the connection drops: for a refused Open, a
/// Close with `amqp:invalid-field`, after the hub's own Open unless it
/// `opened` already (a Close may only follow an Open); for a broken frame, a
/// Close with `amqp:decode-error`.
pub fn refusal(e: &FrameError, opened: bool) -> Vec<u8> {
    use fe2o3_amqp::types::definitions::AmqpError;
    match e {
        FrameError::IdleTimeoutTooShort(_) if opened => {
            close_with(AmqpError::InvalidField, &e.to_string())
        }
        FrameError::IdleTimeoutTooShort(_) => {
            let open = fe2o3_amqp::types::performatives::Open {
                container_id: "edgehub".into(),
                hostname: None,
                max_frame_size: Default::default(),
                channel_max: Default::default(),
                idle_time_out: None,
                outgoing_locales: None,
                incoming_locales: None,
                offered_capabilities: None,
                desired_capabilities: None,
                properties: None,
            };
            let mut out = frame(serde_amqp::to_vec(&open).unwrap_or_default());
            out.extend(close_with(AmqpError::InvalidField, &e.to_string()));
            out
        }
        e => decode_error_close(&e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame whose body (if any) starts a described type.
    fn frame(size: u32, doff: u8) -> Vec<u8> {
        let mut f = size.to_be_bytes().to_vec();
        f.extend([doff, 0, 0, 0]);
        f.resize((doff as usize * 4).max(8), 0xee);
        if (f.len() as u32) < size {
            f.push(0x00);
        }
        f.resize(size.max(8) as usize, 0x40);
        f
    }

    #[test]
    fn headers_and_frames_pass_in_any_split() {
        let mut stream = b"AMQP\x03\x01\x00\x00".to_vec();
        stream.extend(frame(20, 2));
        stream.extend(b"AMQP\x00\x01\x00\x00");
        stream.extend(frame(8, 2)); // an empty (heartbeat) frame
        stream.extend(frame(100, 3));
        for chunk in [1, 3, 7, 64] {
            let mut g = FrameGuard::new(1024);
            for part in stream.chunks(chunk) {
                g.check(part).unwrap();
            }
        }
    }

    #[test]
    fn the_decode_error_close_is_a_well_formed_frame() {
        let f = decode_error_close("frame size 4 is under the 8-byte frame header");
        let mut g = FrameGuard::new(1024);
        g.check(b"AMQP\x00\x01\x00\x00").unwrap();
        g.check(&f).unwrap();
        assert!(g.in_amqp_layer());
        let text = String::from_utf8_lossy(&f);
        assert!(
            text.contains("amqp:decode-error") && text.contains("frame size 4"),
            "{text}"
        );
    }

    fn open_frame(idle_time_out: Option<u32>) -> Vec<u8> {
        let open = fe2o3_amqp::types::performatives::Open {
            container_id: "client".into(),
            hostname: Some("hub".into()),
            max_frame_size: Default::default(),
            channel_max: Default::default(),
            idle_time_out,
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        super::frame(serde_amqp::to_vec(&open).unwrap())
    }

    #[test]
    fn an_idle_timeout_under_five_seconds_is_refused_in_any_split() {
        for (idle, refused) in [
            (Some(1_000), true),
            (Some(4_999), true),
            (Some(5_000), false),
            (Some(240_000), false),
            (Some(0), false),
            (None, false),
        ] {
            let mut stream = b"AMQP\x00\x01\x00\x00".to_vec();
            stream.extend(frame(8, 2)); // a heartbeat before the Open
            stream.extend(open_frame(idle));
            stream.extend(open_frame(Some(1))); // only the first Open counts
            for chunk in [1, 5, 4096] {
                let mut g = FrameGuard::new(4096);
                let r: Result<Vec<()>, _> = stream.chunks(chunk).map(|p| g.check(p)).collect();
                match r {
                    Err(FrameError::IdleTimeoutTooShort(ms)) => {
                        assert!(refused, "{idle:?}");
                        assert_eq!(Some(ms), idle);
                    }
                    Ok(_) => assert!(!refused, "{idle:?} in chunks of {chunk}"),
                    Err(e) => panic!("{e}"),
                }
            }
        }
    }

    #[test]
    fn a_refused_open_is_answered_with_open_then_close() {
        let out = refusal(&FrameError::IdleTimeoutTooShort(1000), false);
        let mut g = FrameGuard::new(4096);
        g.check(b"AMQP\x00\x01\x00\x00").unwrap();
        g.check(&out).unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.contains("edgehub") && text.contains("amqp:invalid-field"),
            "{text}"
        );
        // After the hub's Open went out, the Close alone.
        let close = refusal(&FrameError::IdleTimeoutTooShort(1000), true);
        assert!(out.ends_with(&close) && close.len() < out.len());
    }

    #[test]
    fn malformed_frames_are_caught() {
        let check = |bytes: &[u8]| FrameGuard::new(1024).check(bytes);
        let mut s = b"AMQP\x00\x01\x00\x00".to_vec();
        s.extend(4u32.to_be_bytes());
        s.extend([2, 0, 0, 0]);
        assert_eq!(check(&s), Err(FrameError::TooSmall(4)));
        assert_eq!(
            check(&frame(4096, 2)[..8]),
            Err(FrameError::TooLarge {
                size: 4096,
                max: 1024
            })
        );
        assert_eq!(
            check(&frame(16, 1)[..8]),
            Err(FrameError::BadOffset { doff: 1, size: 16 })
        );
        assert_eq!(
            check(&frame(16, 5)[..8]),
            Err(FrameError::BadOffset { doff: 5, size: 16 })
        );
        assert!(matches!(
            check(b"AMQP\x01\x00\x00\x00"),
            Err(FrameError::BadProtocolHeader(_))
        ));
        let mut garbage = 16u32.to_be_bytes().to_vec();
        garbage.extend([2, 0, 0, 0]);
        garbage.extend([0xff; 8]);
        assert_eq!(check(&garbage), Err(FrameError::NotDescribed(0xff)));
        // An extended header is skipped before the body is looked at.
        let mut ext = 20u32.to_be_bytes().to_vec();
        ext.extend([3, 0, 0, 0, 0xee, 0xee, 0xee, 0xee, 0x00, 0x53, 0x10, 0x45]);
        assert_eq!(check(&ext), Ok(()));
    }
}
