//! An endpoint's reader: what an endpoint executor pulls from. Strict
//! priority (0 first), sequence order within a priority; fed from memory
//! while caught up, from RocksDB after a restart or when it fell behind.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::keys::PRIORITIES;
use crate::{is_expired, EndpointHandle, Entry, Store, StoreError};

pub struct EndpointReader {
    store: Store,
    endpoint: Arc<EndpointHandle>,
    /// Per priority, the next sequence number to hand out.
    cursor: [u64; PRIORITIES],
}

impl EndpointReader {
    pub(crate) fn new(store: Store, endpoint: Arc<EndpointHandle>) -> EndpointReader {
        let cursor = std::array::from_fn(|p| endpoint.checkpoint(p as u8) + 1);
        EndpointReader {
            store,
            endpoint,
            cursor,
        }
    }

    pub fn endpoint(&self) -> &Arc<EndpointHandle> {
        &self.endpoint
    }

    /// Up to `max` entries of the highest non-empty priority, without
    /// waiting. Expired entries are removed (counted) instead of returned.
    pub fn try_next(&mut self, max: usize) -> Result<Vec<Entry>, StoreError> {
        let max = max.max(1);
        let inner = self.store.inner();
        for prio in 0..PRIORITIES {
            loop {
                let cursor = self.cursor[prio];
                let from_memory = {
                    let mut q = self.endpoint.live[prio].lock();
                    while q.entries.front().is_some_and(|e| e.seq < cursor) {
                        q.entries.pop_front();
                    }
                    if cursor >= q.complete_from {
                        let n = max.min(q.entries.len());
                        Ok(q.entries.drain(..n).collect::<Vec<_>>())
                    } else {
                        Err(q.complete_from)
                    }
                };
                let batch = match from_memory {
                    Ok(b) => b,
                    Err(until) => {
                        let b =
                            inner.read_queue(self.endpoint.id, prio as u8, cursor, until, max)?;
                        if b.is_empty() {
                            self.cursor[prio] = until;
                            continue;
                        }
                        b
                    }
                };
                let Some(last) = batch.last() else { break };
                self.cursor[prio] = last.seq + 1;
                let now = self.store.now_ms();
                let (live, expired): (Vec<_>, Vec<_>) = batch
                    .into_iter()
                    .partition(|e| !is_expired(e.expires_at_ms, now));
                if !expired.is_empty() {
                    inner.expire_entries(self.endpoint.id, &expired)?;
                }
                if !live.is_empty() {
                    return Ok(live);
                }
            }
        }
        Ok(Vec::new())
    }

    /// Like [`EndpointReader::try_next`], but waits until there is something.
    pub async fn next(&mut self, max: usize) -> Result<Vec<Entry>, StoreError> {
        loop {
            let endpoint = self.endpoint.clone();
            let notified = endpoint.notify.notified();
            let batch = self.try_next(max)?;
            if !batch.is_empty() {
                return Ok(batch);
            }
            notified.await;
        }
    }

    /// These expired before they could be delivered: remove and count them.
    pub fn expire(&self, entries: &[Entry]) -> Result<usize, StoreError> {
        self.store.inner().expire_entries(self.endpoint.id, entries)
    }

    /// The destination has these: remove them and advance the checkpoints.
    pub fn ack(&self, entries: &[Entry]) -> Result<usize, StoreError> {
        self.store.ack(&self.endpoint, entries)
    }
}

impl Drop for EndpointReader {
    fn drop(&mut self) {
        self.endpoint.reader_taken.store(false, Ordering::Release);
    }
}
