//! Key layouts. Big-endian integers so RocksDB's byte order is numeric order:
//! a queue is one contiguous key range, read in sequence order by one seek.

pub(crate) const PRIORITIES: usize = 11;

pub(crate) fn seq(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// `endpoint | priority | seq`: one queue per endpoint and priority.
pub(crate) fn queue(ep: u32, prio: u8, seq: u64) -> [u8; 13] {
    let mut k = [0u8; 13];
    k[..4].copy_from_slice(&ep.to_be_bytes());
    k[4] = prio;
    k[5..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub(crate) fn queue_seq(key: &[u8]) -> u64 {
    u64::from_be_bytes(key[5..13].try_into().expect("queue key is 13 bytes"))
}

/// `expires_at_ms | endpoint | priority | seq`: the sweeper reads the
/// expired prefix of this index instead of scanning every queue.
pub(crate) fn expiry(at_ms: u64, ep: u32, prio: u8, seq: u64) -> [u8; 21] {
    let mut k = [0u8; 21];
    k[..8].copy_from_slice(&at_ms.to_be_bytes());
    k[8..].copy_from_slice(&queue(ep, prio, seq));
    k
}

pub(crate) fn parse_expiry(key: &[u8]) -> Option<(u64, u32, u8, u64)> {
    if key.len() != 21 {
        return None;
    }
    let at = u64::from_be_bytes(key[..8].try_into().ok()?);
    let ep = u32::from_be_bytes(key[8..12].try_into().ok()?);
    Some((at, ep, key[12], queue_seq(&key[8..])))
}

pub(crate) fn checkpoint(ep: u32, prio: u8) -> [u8; 5] {
    let mut k = [0u8; 5];
    k[..4].copy_from_slice(&ep.to_be_bytes());
    k[4] = prio;
    k
}

pub(crate) const META_LIVE_BYTES: &[u8] = b"live_bytes";
pub(crate) const META_NEXT_SEQ: &[u8] = b"next_seq";
