//! edgehub-store: the durable store-and-forward log on RocksDB.
//!
//! Owns: every accepted message until each endpoint it was routed to has it
//! (one body per message, one queue per endpoint and priority, a durable
//! checkpoint per queue), time-to-live expiry, the disk budget, group commit,
//! and small tables for sessions, retained messages, twins, identities and run-time configuration.
//! Must not touch: the network, routing decisions (it stores what the router
//! decided), protocol encodings.
//!
//! Column families:
//! - `messages`: seq → [`record`] (body stored once whatever the fan-out)
//! - `queues`: endpoint | priority | seq → expiry (ms since epoch, 0 = never)
//! - `expiry`: expiry | endpoint | priority | seq → () (the sweeper's index)
//! - `checkpoints`: endpoint | priority → last seq removed in order
//! - `endpoints`: name → id
//! - `meta`: live byte count (a merge counter, so it commits with its batch)
//!   and the sequence high-water mark
//! - `sessions`, `retained`, `twins`, `identities`, `config`: see [`Table`].
//!
//! A message is acknowledged to its sender only after [`Store::append`]
//! returns, i.e. after its batch is in the WAL (synced with
//! [`Durability::Fsync`]). Removing entries (acknowledged by a destination,
//! or expired) does not sync: losing such a removal in a power cut only
//! causes a redelivery, which at-least-once allows.

mod keys;
mod reader;
mod record;
mod writer;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use edgehub_router::Message;
use parking_lot::Mutex;
use rocksdb::{
    BlockBasedOptions, ColumnFamily, ColumnFamilyDescriptor, Direction, IteratorMode,
    MergeOperands, Options, ReadOptions, WriteBatch, WriteOptions, DB,
};

pub use reader::EndpointReader;

use keys::PRIORITIES;

/// Lowest priority: schema 1.0 routes (router's `DEFAULT_PRIORITY`) and
/// anything above 9 land here, after every explicit 0-9.
pub const LOWEST_PRIORITY: u8 = 10;

/// Bytes charged per queue entry on top of the record, so a budget holds
/// for many tiny fanned-out messages too (keys, expiry index, overhead).
pub const ENTRY_OVERHEAD: u64 = 64;

/// The store's priority slot for a route priority (0 highest).
pub fn priority_slot(route_priority: u32) -> u8 {
    route_priority.min(LOWEST_PRIORITY as u32) as u8
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// WAL synced before a message is acknowledged: survives power loss.
    Fsync,
    /// WAL written to the OS before the acknowledgement but not synced:
    /// survives a crash of the process, not of the machine (what IoT Edge's
    /// edgeHub does).
    OsBuffered,
}

/// The store's clock. Manual clocks let tests expire messages without
/// waiting.
#[derive(Debug, Clone, Default)]
pub struct Clock(Option<Arc<AtomicU64>>);

impl Clock {
    pub fn system() -> Clock {
        Clock(None)
    }

    pub fn manual(start_ms: u64) -> Clock {
        Clock(Some(Arc::new(AtomicU64::new(start_ms))))
    }

    pub fn set(&self, ms: u64) {
        if let Some(c) = &self.0 {
            c.store(ms, Ordering::SeqCst);
        }
    }

    pub fn now_ms(&self) -> u64 {
        match &self.0 {
            Some(c) => c.load(Ordering::SeqCst),
            None => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        }
    }
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub path: PathBuf,
    pub durability: Durability,
    /// Budget for stored messages (records plus [`ENTRY_OVERHEAD`] per queue
    /// entry). `None`: only the free-disk floor applies.
    pub max_bytes: Option<u64>,
    /// New messages are refused while the file system has less free space.
    pub min_free_disk_bytes: u64,
    /// Per queue, how many recent entries are kept in memory for a reader
    /// that is caught up; beyond that the reader reads from RocksDB.
    pub live_cache_entries: usize,
    /// Most messages one group commit takes.
    pub max_batch: usize,
    pub clock: Clock,
}

impl StoreConfig {
    pub fn new(path: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            path: path.into(),
            durability: Durability::Fsync,
            max_bytes: None,
            min_free_disk_bytes: 64 * 1024 * 1024,
            live_cache_entries: 4096,
            max_batch: 1024,
            clock: Clock::system(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store is full: {used} of {max} bytes in use (raise --store-max-bytes or let endpoints drain)")]
    QuotaExceeded { used: u64, max: u64 },
    #[error("free disk space is below the floor of {floor} bytes (--store-min-free-disk)")]
    DiskFloor { floor: u64 },
    #[error("message has no endpoint to be stored for")]
    NoTargets,
    #[error("endpoint {0} already has a reader")]
    ReaderBusy(String),
    #[error("store is shut down")]
    Closed,
    #[error("corrupt store record: {0}")]
    Corrupt(String),
    #[error("rocksdb: {0}")]
    Db(#[from] rocksdb::Error),
}

impl StoreError {
    /// A refusal because of the disk budget or floor: the sender should be
    /// told "quota exceeded", and nothing stored is affected.
    pub fn is_quota(&self) -> bool {
        matches!(
            self,
            StoreError::QuotaExceeded { .. } | StoreError::DiskFloor { .. }
        )
    }
}

/// One entry of a [`Table`].
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// Small keyed tables that live beside the message log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Sessions,
    Retained,
    Twins,
    Identities,
    /// Hub configuration set at run time (the deployment manifest).
    Config,
}

impl Table {
    fn cf(self) -> &'static str {
        match self {
            Table::Sessions => "sessions",
            Table::Retained => "retained",
            Table::Twins => "twins",
            Table::Identities => "identities",
            Table::Config => "config",
        }
    }
}

const CF_MESSAGES: &str = "messages";
const CF_QUEUES: &str = "queues";
const CF_EXPIRY: &str = "expiry";
const CF_CHECKPOINTS: &str = "checkpoints";
const CF_ENDPOINTS: &str = "endpoints";
const CF_META: &str = "meta";

/// One endpoint's queues: durable id, checkpoints, and the in-memory tail a
/// caught-up reader is fed from.
pub struct EndpointHandle {
    id: u32,
    name: String,
    checkpoints: [AtomicU64; PRIORITIES],
    /// Entries held per priority (counted at open, then kept up to date).
    queued: [AtomicI64; PRIORITIES],
    live: [Mutex<LiveQueue>; PRIORITIES],
    notify: tokio::sync::Notify,
    reader_taken: AtomicBool,
}

impl std::fmt::Debug for EndpointHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointHandle")
            .field("id", &self.id)
            .field("name", &self.name)
            .finish()
    }
}

impl EndpointHandle {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Entries held in the queue of `priority` (expired ones until swept).
    pub fn queue_length(&self, priority: u8) -> u64 {
        self.queued[priority as usize]
            .load(Ordering::Relaxed)
            .max(0) as u64
    }

    /// Last sequence number removed in order from the queue of `priority`.
    pub fn checkpoint(&self, priority: u8) -> u64 {
        self.checkpoints[priority as usize].load(Ordering::Acquire)
    }
}

/// Entries appended after `complete_from` (inclusive) are all here, in
/// sequence order, until a reader takes them; older ones are on disk only.
struct LiveQueue {
    entries: std::collections::VecDeque<Entry>,
    complete_from: u64,
}

/// One queue entry handed to a reader: the message and what acknowledging
/// it needs.
#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: u64,
    pub priority: u8,
    /// Milliseconds since the epoch; 0 = never.
    pub expires_at_ms: u64,
    pub message: Arc<Message>,
    targets: Arc<[(u32, u8)]>,
}

/// Where one message goes.
#[derive(Debug, Clone)]
pub struct Target {
    pub endpoint: Arc<EndpointHandle>,
    pub priority: u8,
    /// Milliseconds since the epoch; 0 = never.
    pub expires_at_ms: u64,
}

impl Target {
    pub fn new(endpoint: &Arc<EndpointHandle>, priority: u8, expires_at_ms: u64) -> Target {
        Target {
            endpoint: endpoint.clone(),
            priority,
            expires_at_ms,
        }
    }
}

/// A message ready to be committed: encoded by the caller's task, so the
/// single writer only batches.
pub struct Append {
    record: Vec<u8>,
    message: Arc<Message>,
    targets: Vec<Target>,
    target_ids: Arc<[(u32, u8)]>,
}

impl Append {
    pub fn new(message: Arc<Message>, targets: Vec<Target>) -> Append {
        let target_ids: Arc<[(u32, u8)]> = targets
            .iter()
            .map(|t| (t.endpoint.id, t.priority))
            .collect();
        Append {
            record: record::encode(&message, &target_ids),
            message,
            targets,
            target_ids,
        }
    }

    /// Bytes this message counts against the budget.
    pub fn cost(&self) -> u64 {
        self.record.len() as u64 + ENTRY_OVERHEAD * self.targets.len() as u64
    }
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct StoreStats {
    pub appended: AtomicU64,
    pub delivered: AtomicU64,
    pub expired: AtomicU64,
}

pub(crate) struct Inner {
    db: DB,
    cfg: StoreConfig,
    /// Next sequence number; its lock also orders commits so live queues
    /// receive entries in sequence order.
    next_seq: Mutex<u64>,
    /// Serialises removals (acknowledgements and expiry), which read then
    /// write: two removers must not both think the other still holds a body.
    remove_lock: Mutex<()>,
    endpoints: Mutex<HashMap<String, Arc<EndpointHandle>>>,
    by_id: Mutex<HashMap<u32, Arc<EndpointHandle>>>,
    next_endpoint_id: Mutex<u32>,
    live_bytes: AtomicI64,
    disk_low: AtomicBool,
    pub(crate) stats: StoreStats,
}

/// A handle to the open store; cheap to clone. The group-commit writer and
/// expiry sweeper run on their own thread until the last handle is dropped.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
    writer: Arc<writer::Writer>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.cfg.path)
            .finish()
    }
}

fn add_merge(_key: &[u8], existing: Option<&[u8]>, operands: &MergeOperands) -> Option<Vec<u8>> {
    let read = |b: &[u8]| i64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
    let mut total = existing.map(read).unwrap_or(0);
    for op in operands {
        total = total.wrapping_add(read(op));
    }
    Some(total.to_le_bytes().to_vec())
}

impl Store {
    /// Opens (or creates) the store and starts its writer thread. Work is
    /// independent of how many messages are stored: no scan at startup.
    pub fn open(cfg: StoreConfig) -> Result<Store, StoreError> {
        std::fs::create_dir_all(&cfg.path).map_err(|e| {
            StoreError::Corrupt(format!("cannot create {}: {e}", cfg.path.display()))
        })?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        // Bodies are usually small JSON; RocksDB is built without
        // compression libraries to keep the build short.
        opts.set_compression_type(rocksdb::DBCompressionType::None);
        opts.set_keep_log_file_num(4);
        let mut point = BlockBasedOptions::default();
        point.set_bloom_filter(10.0, false);
        let mut queue_opts = Options::default();
        queue_opts.set_block_based_table_factory(&point);
        let mut meta_opts = Options::default();
        meta_opts.set_merge_operator_associative("add_i64", add_merge);
        let plain = || Options::default();
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_MESSAGES, plain()),
            ColumnFamilyDescriptor::new(CF_QUEUES, queue_opts),
            ColumnFamilyDescriptor::new(CF_EXPIRY, plain()),
            ColumnFamilyDescriptor::new(CF_CHECKPOINTS, plain()),
            ColumnFamilyDescriptor::new(CF_ENDPOINTS, plain()),
            ColumnFamilyDescriptor::new(CF_META, meta_opts),
            ColumnFamilyDescriptor::new(Table::Sessions.cf(), plain()),
            ColumnFamilyDescriptor::new(Table::Retained.cf(), plain()),
            ColumnFamilyDescriptor::new(Table::Twins.cf(), plain()),
            ColumnFamilyDescriptor::new(Table::Identities.cf(), plain()),
            ColumnFamilyDescriptor::new(Table::Config.cf(), plain()),
        ];
        let db = DB::open_cf_descriptors(&opts, &cfg.path, cfs)?;

        let read_u64 = |v: Option<Vec<u8>>| {
            v.and_then(|b| b.try_into().ok().map(u64::from_le_bytes))
                .unwrap_or(0)
        };
        let meta = db.cf_handle(CF_META).expect("cf");
        let live_bytes = db
            .get_cf(meta, keys::META_LIVE_BYTES)?
            .and_then(|b| b.try_into().ok().map(i64::from_le_bytes))
            .unwrap_or(0);
        // The high-water mark survives even when every message was removed,
        // so new sequence numbers never fall below a checkpoint.
        let mut next_seq = read_u64(db.get_cf(meta, keys::META_NEXT_SEQ)?).max(1);
        let messages = db.cf_handle(CF_MESSAGES).expect("cf");
        if let Some(item) = db.iterator_cf(messages, IteratorMode::End).next() {
            let (k, _) = item?;
            let last = u64::from_be_bytes(
                (*k).try_into()
                    .map_err(|_| StoreError::Corrupt("message key".into()))?,
            );
            next_seq = next_seq.max(last + 1);
        }

        let mut endpoints = HashMap::new();
        let mut by_id = HashMap::new();
        let mut max_id = 0;
        let cps = db.cf_handle(CF_CHECKPOINTS).expect("cf");
        for item in db.iterator_cf(db.cf_handle(CF_ENDPOINTS).expect("cf"), IteratorMode::Start) {
            let (name, id) = item?;
            let id = u32::from_le_bytes(
                (*id)
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("endpoint id".into()))?,
            );
            let name = String::from_utf8_lossy(&name).into_owned();
            let h = Arc::new(new_handle(id, name.clone(), next_seq));
            for p in 0..PRIORITIES as u8 {
                let cp = read_u64(db.get_cf(cps, keys::checkpoint(id, p))?);
                h.checkpoints[p as usize].store(cp, Ordering::Release);
            }
            max_id = max_id.max(id);
            endpoints.insert(name, h.clone());
            by_id.insert(id, h);
        }
        // Queue lengths: one pass over the queue keys (no values needed
        // beyond the key; a million entries take a fraction of a second).
        for item in db.iterator_cf(db.cf_handle(CF_QUEUES).expect("cf"), IteratorMode::Start) {
            let (k, _) = item?;
            if k.len() != 13 {
                continue;
            }
            let ep = u32::from_be_bytes(k[..4].try_into().expect("4 bytes"));
            if let Some(q) = by_id
                .get(&ep)
                .and_then(|h: &Arc<EndpointHandle>| h.queued.get(k[4] as usize))
            {
                q.fetch_add(1, Ordering::Relaxed);
            }
        }

        let inner = Arc::new(Inner {
            db,
            cfg,
            next_seq: Mutex::new(next_seq),
            remove_lock: Mutex::new(()),
            endpoints: Mutex::new(endpoints),
            by_id: Mutex::new(by_id),
            next_endpoint_id: Mutex::new(max_id + 1),
            live_bytes: AtomicI64::new(live_bytes),
            disk_low: AtomicBool::new(false),
            stats: StoreStats::default(),
        });
        inner.check_disk();
        let writer = Arc::new(writer::Writer::start(inner.clone()));
        Ok(Store { inner, writer })
    }

    pub fn stats(&self) -> &StoreStats {
        &self.inner.stats
    }

    /// Bytes currently charged against the budget.
    pub fn live_bytes(&self) -> u64 {
        self.inner.live_bytes.load(Ordering::Relaxed).max(0) as u64
    }

    pub fn now_ms(&self) -> u64 {
        self.inner.cfg.clock.now_ms()
    }

    /// The endpoint called `name`, created (durably) on first use.
    pub fn endpoint(&self, name: &str) -> Result<Arc<EndpointHandle>, StoreError> {
        let inner = &self.inner;
        let mut eps = inner.endpoints.lock();
        if let Some(h) = eps.get(name) {
            return Ok(h.clone());
        }
        let mut next_id = inner.next_endpoint_id.lock();
        let id = *next_id;
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        inner.db.put_cf_opt(
            inner.cf(CF_ENDPOINTS),
            name.as_bytes(),
            id.to_le_bytes(),
            &wo,
        )?;
        *next_id += 1;
        // Under the sequence lock: a new endpoint's live queue must start
        // exactly where commits are.
        let next_seq = *inner.next_seq.lock();
        let h = Arc::new(new_handle(id, name.to_owned(), next_seq));
        eps.insert(name.to_owned(), h.clone());
        inner.by_id.lock().insert(id, h.clone());
        Ok(h)
    }

    /// Every endpoint the store knows, by name.
    pub fn endpoints(&self) -> Vec<Arc<EndpointHandle>> {
        let mut v: Vec<_> = self.inner.endpoints.lock().values().cloned().collect();
        v.sort_by_key(|h| h.id);
        v
    }

    /// Commits one message through the group-commit writer. Resolves once the
    /// message and its queue entries are durable (per [`Durability`]); only
    /// then may the sender be acknowledged.
    pub async fn append(&self, append: Append) -> Result<u64, StoreError> {
        self.writer
            .submit(append)?
            .await
            .map_err(|_| StoreError::Closed)?
    }

    /// Commits a batch in the caller's thread: what the writer does per
    /// group commit. Each message is accepted or refused on its own.
    pub fn append_batch(&self, items: &[Append]) -> Vec<Result<u64, StoreError>> {
        self.inner.append_batch(items)
    }

    /// Removes entries the destination has (acknowledged) and advances the
    /// checkpoints. Bodies no other endpoint holds are deleted. Entries
    /// already removed (expired meanwhile) are skipped.
    pub fn ack(&self, endpoint: &EndpointHandle, entries: &[Entry]) -> Result<usize, StoreError> {
        let inner = &self.inner;
        inner.remove_counted(&inner.stats.delivered, Removal::of(endpoint.id, entries))
    }

    /// Like [`Store::ack`] for a consumer that only kept `(priority, seq)`
    /// pairs (the management API's outbox).
    pub fn ack_seqs(
        &self,
        endpoint: &EndpointHandle,
        seqs: &[(u8, u64)],
    ) -> Result<usize, StoreError> {
        let removals = seqs.iter().map(|(prio, seq)| Removal {
            ep: endpoint.id,
            prio: *prio,
            seq: *seq,
            targets: None,
        });
        let inner = &self.inner;
        inner.remove_counted(&inner.stats.delivered, removals)
    }

    /// Up to `max` entries of `endpoint`, in priority then sequence order,
    /// read from disk without taking them: what a local consumer of the
    /// outbox sees. Expired entries are left out.
    pub fn peek(&self, endpoint: &EndpointHandle, max: usize) -> Result<Vec<Entry>, StoreError> {
        let now = self.now_ms();
        let mut out = Vec::new();
        for prio in 0..PRIORITIES as u8 {
            if out.len() >= max {
                break;
            }
            let from = endpoint.checkpoint(prio) + 1;
            let got = self
                .inner
                .read_queue(endpoint.id, prio, from, u64::MAX, max - out.len())?;
            out.extend(
                got.into_iter()
                    .filter(|e| !is_expired(e.expires_at_ms, now)),
            );
        }
        Ok(out)
    }

    /// Removes every expired entry now (the writer thread also does this
    /// about once a second). Returns how many were removed.
    pub fn sweep_expired(&self) -> Result<usize, StoreError> {
        self.inner.sweep_expired()
    }

    /// The reader for `endpoint`; at most one at a time. It starts at the
    /// checkpoints, so entries a previous reader took but did not
    /// acknowledge come again.
    pub fn reader(&self, endpoint: Arc<EndpointHandle>) -> Result<EndpointReader, StoreError> {
        if endpoint.reader_taken.swap(true, Ordering::AcqRel) {
            return Err(StoreError::ReaderBusy(endpoint.name.clone()));
        }
        {
            // The new reader starts from disk: empty the live tail under the
            // sequence lock so it is complete from the next commit on.
            let next = *self.inner.next_seq.lock();
            for q in &endpoint.live {
                let mut q = q.lock();
                q.entries.clear();
                q.complete_from = next;
            }
        }
        Ok(EndpointReader::new(self.clone(), endpoint))
    }

    pub fn put(&self, table: Table, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let inner = &self.inner;
        inner
            .db
            .put_cf_opt(inner.cf(table.cf()), key, value, &inner.write_opts())?;
        Ok(())
    }

    /// Like [`Store::put`] but without waiting for a sync, whatever the
    /// durability: survives a crash of the process, not a power cut. For
    /// updates made on a hot path under a lock (retained messages).
    pub fn put_buffered(&self, table: Table, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let inner = &self.inner;
        inner.db.put_cf(inner.cf(table.cf()), key, value)?;
        Ok(())
    }

    /// Like [`Store::delete`], without waiting for a sync.
    pub fn delete_buffered(&self, table: Table, key: &[u8]) -> Result<(), StoreError> {
        let inner = &self.inner;
        inner.db.delete_cf(inner.cf(table.cf()), key)?;
        Ok(())
    }

    pub fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.inner.db.get_cf(self.inner.cf(table.cf()), key)?)
    }

    pub fn delete(&self, table: Table, key: &[u8]) -> Result<(), StoreError> {
        let inner = &self.inner;
        inner
            .db
            .delete_cf_opt(inner.cf(table.cf()), key, &inner.write_opts())?;
        Ok(())
    }

    /// Every entry of `table`, in key order.
    pub fn scan(&self, table: Table) -> Result<Vec<KeyValue>, StoreError> {
        let inner = &self.inner;
        inner
            .db
            .iterator_cf(inner.cf(table.cf()), IteratorMode::Start)
            .map(|r| {
                r.map(|(k, v)| (k.into_vec(), v.into_vec()))
                    .map_err(Into::into)
            })
            .collect()
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.inner
    }
}

fn new_handle(id: u32, name: String, next_seq: u64) -> EndpointHandle {
    EndpointHandle {
        id,
        name,
        checkpoints: std::array::from_fn(|_| AtomicU64::new(0)),
        queued: std::array::from_fn(|_| AtomicI64::new(0)),
        live: std::array::from_fn(|_| {
            Mutex::new(LiveQueue {
                entries: Default::default(),
                complete_from: next_seq,
            })
        }),
        notify: tokio::sync::Notify::new(),
        reader_taken: AtomicBool::new(false),
    }
}

fn is_expired(expires_at_ms: u64, now: u64) -> bool {
    expires_at_ms != 0 && expires_at_ms <= now
}

struct Removal {
    ep: u32,
    prio: u8,
    seq: u64,
    /// The message's targets when the caller knows them; read from the
    /// record otherwise.
    targets: Option<Arc<[(u32, u8)]>>,
}

impl Removal {
    /// Entries a reader handed out, from endpoint `ep`.
    fn of(ep: u32, entries: &[Entry]) -> impl Iterator<Item = Removal> + '_ {
        entries.iter().map(move |e| Removal {
            ep,
            prio: e.priority,
            seq: e.seq,
            targets: Some(e.targets.clone()),
        })
    }
}

impl Inner {
    fn cf(&self, name: &str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    fn write_opts(&self) -> WriteOptions {
        let mut wo = WriteOptions::default();
        wo.set_sync(self.cfg.durability == Durability::Fsync);
        wo
    }

    pub(crate) fn check_disk(&self) {
        let floor = self.cfg.min_free_disk_bytes;
        if floor == 0 {
            return;
        }
        if let Ok(st) = rustix::fs::statvfs(&self.cfg.path) {
            let free = st.f_bavail.saturating_mul(st.f_frsize);
            let low = free < floor;
            if low != self.disk_low.swap(low, Ordering::Relaxed) {
                if low {
                    tracing::warn!(
                        free,
                        floor,
                        "free disk below the floor: refusing new messages"
                    );
                } else {
                    tracing::info!(
                        free,
                        floor,
                        "free disk above the floor again: accepting messages"
                    );
                }
            }
        }
    }

    fn append_batch(&self, items: &[Append]) -> Vec<Result<u64, StoreError>> {
        let mut next_seq = self.next_seq.lock();
        let mut batch = WriteBatch::default();
        let mut results = Vec::with_capacity(items.len());
        let live = self.live_bytes.load(Ordering::Relaxed).max(0) as u64;
        let mut added = 0u64;
        let disk_low = self.disk_low.load(Ordering::Relaxed);
        let (messages, queues, expiry) =
            (self.cf(CF_MESSAGES), self.cf(CF_QUEUES), self.cf(CF_EXPIRY));
        for item in items {
            if item.targets.is_empty() {
                results.push(Err(StoreError::NoTargets));
                continue;
            }
            if disk_low {
                results.push(Err(StoreError::DiskFloor {
                    floor: self.cfg.min_free_disk_bytes,
                }));
                continue;
            }
            let cost = item.cost();
            if let Some(max) = self.cfg.max_bytes {
                if live + added + cost > max {
                    results.push(Err(StoreError::QuotaExceeded {
                        used: live + added,
                        max,
                    }));
                    continue;
                }
            }
            let seq = *next_seq;
            *next_seq += 1;
            batch.put_cf(messages, keys::seq(seq), &item.record);
            for t in &item.targets {
                let ep = t.endpoint.id;
                batch.put_cf(
                    queues,
                    keys::queue(ep, t.priority, seq),
                    t.expires_at_ms.to_le_bytes(),
                );
                if t.expires_at_ms != 0 {
                    batch.put_cf(
                        expiry,
                        keys::expiry(t.expires_at_ms, ep, t.priority, seq),
                        [],
                    );
                }
            }
            added += cost;
            results.push(Ok(seq));
        }
        if added == 0 {
            return results;
        }
        let meta = self.cf(CF_META);
        batch.merge_cf(meta, keys::META_LIVE_BYTES, (added as i64).to_le_bytes());
        batch.put_cf(meta, keys::META_NEXT_SEQ, next_seq.to_le_bytes());
        if let Err(e) = self.db.write_opt(batch, &self.write_opts()) {
            // Nothing of the batch is stored; the sequence numbers it used
            // stay unused, which readers do not mind.
            tracing::error!(error = %e, "group commit failed");
            let msg = e.to_string();
            return results
                .into_iter()
                .map(|r| r.and_then(|_| Err(StoreError::Corrupt(format!("write failed: {msg}")))))
                .collect();
        }
        self.live_bytes.fetch_add(added as i64, Ordering::Relaxed);
        let stored = results.iter().filter(|r| r.is_ok()).count() as u64;
        self.stats.appended.fetch_add(stored, Ordering::Relaxed);
        // Still under the sequence lock, so live queues get entries in order.
        for (item, r) in items.iter().zip(&results) {
            let Ok(seq) = r else { continue };
            for t in &item.targets {
                t.endpoint.queued[t.priority as usize].fetch_add(1, Ordering::Relaxed);
                t.endpoint.push_live(
                    Entry {
                        seq: *seq,
                        priority: t.priority,
                        expires_at_ms: t.expires_at_ms,
                        message: item.message.clone(),
                        targets: item.target_ids.clone(),
                    },
                    self.cfg.live_cache_entries,
                );
            }
        }
        drop(next_seq);
        // One wake-up per endpoint per batch, not per message.
        let mut woken: Vec<u32> = Vec::new();
        for t in items.iter().flat_map(|i| &i.targets) {
            if !woken.contains(&t.endpoint.id) {
                woken.push(t.endpoint.id);
                t.endpoint.notify.notify_one();
            }
        }
        results
    }

    /// Reads queue `(ep, prio)` from `from` (inclusive) below `until`.
    fn read_queue(
        &self,
        ep: u32,
        prio: u8,
        from: u64,
        until: u64,
        max: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(keys::queue(ep, prio, from).to_vec());
        ro.set_iterate_upper_bound(keys::queue(ep, prio, until).to_vec());
        let mut found: Vec<(u64, u64)> = Vec::new();
        for item in self.db.iterator_cf_opt(
            self.cf(CF_QUEUES),
            ro,
            IteratorMode::From(&keys::queue(ep, prio, from), Direction::Forward),
        ) {
            let (k, v) = item?;
            let expires = u64::from_le_bytes((*v).try_into().unwrap_or([0; 8]));
            found.push((keys::queue_seq(&k), expires));
            if found.len() >= max {
                break;
            }
        }
        let messages = self.cf(CF_MESSAGES);
        let record_keys: Vec<[u8; 8]> = found.iter().map(|(s, _)| keys::seq(*s)).collect();
        let records = self
            .db
            .batched_multi_get_cf(messages, record_keys.iter(), true);
        let mut out = Vec::with_capacity(found.len());
        for ((seq, expires), rec) in found.into_iter().zip(records) {
            // A record can vanish between the two reads when the sweeper
            // removed the entry meanwhile: then it is gone for us too.
            let Some(rec) = rec? else { continue };
            let (message, targets) = record::decode(Bytes::copy_from_slice(&rec))?;
            out.push(Entry {
                seq,
                priority: prio,
                expires_at_ms: expires,
                message: Arc::new(message),
                targets,
            });
        }
        Ok(out)
    }

    /// Removes queue entries (and bodies nobody else holds) in one batch,
    /// then moves the touched checkpoints up to just below each queue's
    /// first remaining entry.
    fn remove(&self, removals: impl Iterator<Item = Removal>) -> Result<usize, StoreError> {
        let _g = self.remove_lock.lock();
        let (messages, queues, expiry) =
            (self.cf(CF_MESSAGES), self.cf(CF_QUEUES), self.cf(CF_EXPIRY));
        let mut batch = WriteBatch::default();
        let mut gone: HashSet<(u32, u64)> = HashSet::new();
        let mut touched: BTreeMap<(u32, u8), u64> = BTreeMap::new();
        let mut removed_per_queue: HashMap<(u32, u8), i64> = HashMap::new();
        let mut freed = 0u64;
        let mut removed = 0;
        for r in removals {
            if gone.contains(&(r.ep, r.seq)) {
                continue;
            }
            let qk = keys::queue(r.ep, r.prio, r.seq);
            let Some(value) = self.db.get_pinned_cf(queues, qk)? else {
                continue;
            };
            let expires_at_ms = u64::from_le_bytes((*value).try_into().unwrap_or([0; 8]));
            batch.delete_cf(queues, qk);
            if expires_at_ms != 0 {
                batch.delete_cf(expiry, keys::expiry(expires_at_ms, r.ep, r.prio, r.seq));
            }
            gone.insert((r.ep, r.seq));
            *removed_per_queue.entry((r.ep, r.prio)).or_insert(0i64) += 1;
            let top = touched.entry((r.ep, r.prio)).or_insert(0);
            *top = (*top).max(r.seq);
            freed += ENTRY_OVERHEAD;
            removed += 1;
            let rec = self.db.get_pinned_cf(messages, keys::seq(r.seq))?;
            let Some(rec) = rec else { continue };
            let targets = match r.targets {
                Some(t) => t,
                None => record::targets(&rec)?,
            };
            let mut held_elsewhere = false;
            for (ep, prio) in targets.iter() {
                if *ep == r.ep || gone.contains(&(*ep, r.seq)) {
                    continue;
                }
                if self
                    .db
                    .get_pinned_cf(queues, keys::queue(*ep, *prio, r.seq))?
                    .is_some()
                {
                    held_elsewhere = true;
                    break;
                }
            }
            if !held_elsewhere {
                batch.delete_cf(messages, keys::seq(r.seq));
                freed += rec.len() as u64;
            }
        }
        if removed == 0 {
            return Ok(0);
        }
        batch.merge_cf(
            self.cf(CF_META),
            keys::META_LIVE_BYTES,
            (-(freed as i64)).to_le_bytes(),
        );
        // Unsynced: losing a removal only means a redelivery.
        self.db.write(batch)?;
        self.live_bytes.fetch_sub(freed as i64, Ordering::Relaxed);

        let mut cp_batch = WriteBatch::default();
        let by_id = self.by_id.lock();
        for (&(ep, prio), &n) in &removed_per_queue {
            if let Some(h) = by_id.get(&ep) {
                h.queued[prio as usize].fetch_sub(n, Ordering::Relaxed);
            }
        }
        for ((ep, prio), top) in touched {
            let Some(h) = by_id.get(&ep) else { continue };
            let old = h.checkpoint(prio);
            let first_left = self.first_seq(ep, prio, old + 1)?;
            let cp = match first_left {
                Some(s) => s - 1,
                None => top,
            };
            if cp > old {
                h.checkpoints[prio as usize].store(cp, Ordering::Release);
                cp_batch.put_cf(
                    self.cf(CF_CHECKPOINTS),
                    keys::checkpoint(ep, prio),
                    cp.to_le_bytes(),
                );
            }
        }
        drop(by_id);
        if !cp_batch.is_empty() {
            self.db.write(cp_batch)?;
        }
        Ok(removed)
    }

    fn first_seq(&self, ep: u32, prio: u8, from: u64) -> Result<Option<u64>, StoreError> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(keys::queue(ep, prio, from).to_vec());
        ro.set_iterate_upper_bound(keys::queue(ep, prio, u64::MAX).to_vec());
        let mut it = self.db.iterator_cf_opt(
            self.cf(CF_QUEUES),
            ro,
            IteratorMode::From(&keys::queue(ep, prio, from), Direction::Forward),
        );
        match it.next() {
            Some(item) => Ok(Some(keys::queue_seq(&item?.0))),
            None => Ok(None),
        }
    }

    /// Removes the expired prefix of the expiry index, in chunks.
    fn sweep_expired(&self) -> Result<usize, StoreError> {
        let now = self.cfg.clock.now_ms();
        let mut total = 0;
        loop {
            let mut ro = ReadOptions::default();
            ro.set_iterate_upper_bound(keys::expiry(now + 1, 0, 0, 0).to_vec());
            let mut found = Vec::new();
            for item in self
                .db
                .iterator_cf_opt(self.cf(CF_EXPIRY), ro, IteratorMode::Start)
            {
                let (k, _) = item?;
                let (at, ep, prio, seq) = keys::parse_expiry(&k)
                    .ok_or_else(|| StoreError::Corrupt("expiry key".into()))?;
                found.push((
                    at,
                    Removal {
                        ep,
                        prio,
                        seq,
                        targets: None,
                    },
                ));
                if found.len() >= 4096 {
                    break;
                }
            }
            if found.is_empty() {
                break;
            }
            let n_found = found.len();
            // Stale index entries (queue entry gone) are cleaned up too.
            let stale: Vec<_> = found
                .iter()
                .map(|(at, r)| keys::expiry(*at, r.ep, r.prio, r.seq))
                .collect();
            let n = self.remove(found.into_iter().map(|(_, r)| r))?;
            let mut b = WriteBatch::default();
            for k in stale {
                b.delete_cf(self.cf(CF_EXPIRY), k);
            }
            self.db.write(b)?;
            total += n;
            if n_found < 4096 {
                break;
            }
        }
        if total > 0 {
            self.stats
                .expired
                .fetch_add(total as u64, Ordering::Relaxed);
            tracing::info!(count = total, "removed expired messages (ttl_expiry)");
        }
        Ok(total)
    }

    /// Removes entries a reader found expired; counted as expiry.
    pub(crate) fn expire_entries(&self, ep: u32, entries: &[Entry]) -> Result<usize, StoreError> {
        self.remove_counted(&self.stats.expired, Removal::of(ep, entries))
    }

    /// [`Inner::remove`], adding how many went to `counter`.
    fn remove_counted(
        &self,
        counter: &AtomicU64,
        removals: impl Iterator<Item = Removal>,
    ) -> Result<usize, StoreError> {
        let n = self.remove(removals)?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl EndpointHandle {
    fn push_live(&self, e: Entry, cap: usize) {
        let mut q = self.live[e.priority as usize].lock();
        if e.seq < q.complete_from {
            return;
        }
        q.entries.push_back(e);
        while q.entries.len() > cap {
            // Overflow: the reader will read these from disk.
            let dropped = q.entries.pop_front().expect("non-empty");
            q.complete_from = dropped.seq + 1;
        }
    }
}
