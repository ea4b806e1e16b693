//! The MQTT broker core: session table, subscription index, retained
//! messages, routing of published messages to sessions, wills and session
//! expiry. Transport-agnostic: the MQTT head's connection tasks call in.
//! See the README for what it owns.
//!
//! Owns: who is subscribed to what and what each session still has to
//! receive. Must not touch: sockets or the wire format (connection/codec), IoT
//! Hub semantics (the IoT Hub layer decides through the `auth` seam).

pub mod auth;
pub mod session;
pub mod subscriptions;
pub mod topic;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use edgehub_codec::{Props, Protocol, QoS, SubscriptionOptions, Will};
use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;

use crate::auth::{Authenticator, Authorizer};
use session::{Delivery, Message, PendingWill, Session};
use subscriptions::{SubEntry, SubscriptionTree};

/// Where retained messages are kept across restarts (the hub's store). Called
/// under the retained table's lock, so updates reach it in order; it must be
/// quick (no fsync wait).
pub trait RetainedStore: Send + Sync + 'static {
    fn save(&self, topic: &str, record: &[u8]);
    fn remove(&self, topic: &str);
}

/// Takes wills that are not MQTT messages for subscribers but something
/// else to the layer above (IoT Hub: telemetry). Returns whether it took it.
pub trait WillSink: Send + Sync + 'static {
    fn take(&self, will: &PendingWill) -> bool;
}

/// Where persistent sessions (expiry interval above zero) are kept across
/// restarts: their subscriptions and expiry. Called under the session's
/// lock, so records reach it in order; it must be quick.
pub trait SessionStore: Send + Sync + 'static {
    fn save(&self, client_id: &str, record: &[u8]);
    fn remove(&self, client_id: &str);
}

/// `1 | protocol | expiry u32 | disconnected_at u64 (unix s, 0 = connected)
/// | count u32 | (len u16, filter, qos, no_local, rap, rh, id u32)*`.
fn session_record(st: &session::SessionState, disconnected_at: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + st.subscriptions.len() * 32);
    out.push(1);
    out.push(match st.protocol {
        Protocol::V5 => 5,
        _ => 4,
    });
    out.extend_from_slice(&st.expiry_interval.to_be_bytes());
    out.extend_from_slice(&disconnected_at.to_be_bytes());
    out.extend_from_slice(&(st.subscriptions.len() as u32).to_be_bytes());
    for (filter, (o, id)) in &st.subscriptions {
        out.extend_from_slice(&(filter.len() as u16).to_be_bytes());
        out.extend_from_slice(filter.as_bytes());
        out.extend_from_slice(&[
            o.qos as u8,
            o.no_local as u8,
            o.retain_as_published as u8,
            o.retain_handling,
        ]);
        out.extend_from_slice(&id.unwrap_or(0).to_be_bytes());
    }
    out
}

type SavedSubscription = (String, SubscriptionOptions, Option<u32>);

/// (protocol, expiry, disconnected_at, subscriptions) or `None` if unreadable.
fn parse_session_record(raw: &[u8]) -> Option<(Protocol, u32, u64, Vec<SavedSubscription>)> {
    let mut r = raw;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (a, b) = (r.get(..n)?, r.get(n..)?);
        r = b;
        Some(a)
    };
    if take(1)? != [1] {
        return None;
    }
    let protocol = if take(1)?[0] == 5 {
        Protocol::V5
    } else {
        Protocol::V311
    };
    let expiry = u32::from_be_bytes(take(4)?.try_into().ok()?);
    let at = u64::from_be_bytes(take(8)?.try_into().ok()?);
    let n = u32::from_be_bytes(take(4)?.try_into().ok()?);
    let mut subs = Vec::new();
    for _ in 0..n {
        let len = u16::from_be_bytes(take(2)?.try_into().ok()?) as usize;
        let filter = std::str::from_utf8(take(len)?).ok()?.to_owned();
        let o = take(4)?;
        let options = SubscriptionOptions {
            qos: QoS::from_u8(o[0])?,
            no_local: o[1] != 0,
            retain_as_published: o[2] != 0,
            retain_handling: o[3],
        };
        let id = u32::from_be_bytes(take(4)?.try_into().ok()?);
        subs.push((filter, options, (id != 0).then_some(id)));
    }
    Some((protocol, expiry, at, subs))
}

/// A retained message as stored: its absolute expiry (unix seconds, 0 =
/// none) and the message as an MQTT 5 PUBLISH, so every property survives.
pub fn retained_record(msg: &Message) -> Vec<u8> {
    message_record(msg, true)
}

/// A message as the store keeps it (expiry as unix seconds, then the
/// PUBLISH encoded as MQTT 5 with all its properties); read back with
/// [`parse_message_record`].
pub fn message_record(msg: &Message, retain: bool) -> Vec<u8> {
    let now = Instant::now();
    let expiry = msg.expires_at.map_or(0, |t| {
        unix_now() + t.saturating_duration_since(now).as_secs().max(1)
    });
    let mut out = bytes::BytesMut::with_capacity(msg.payload.len() + msg.topic.len() + 32);
    out.extend_from_slice(&expiry.to_be_bytes());
    let p = edgehub_codec::Packet::Publish(edgehub_codec::Publish {
        dup: false,
        qos: msg.qos,
        retain,
        topic: msg.topic.clone(),
        packet_id: if msg.qos == QoS::AtMostOnce { 0 } else { 1 },
        properties: msg.properties.clone(),
        payload: msg.payload.clone(),
    });
    let _ = edgehub_codec::encode(&p, Protocol::V5, &mut out, usize::MAX);
    out.to_vec()
}

/// The inverse of [`retained_record`]; `None` when unreadable or expired.
pub fn parse_retained_record(raw: &[u8]) -> Option<Message> {
    parse_message_record(raw)
}

/// The inverse of [`message_record`]; `None` when unreadable or expired.
pub fn parse_message_record(raw: &[u8]) -> Option<Message> {
    let expiry = u64::from_be_bytes(raw.get(..8)?.try_into().ok()?);
    let now = unix_now();
    if expiry != 0 && expiry <= now {
        return None;
    }
    let mut buf = bytes::BytesMut::from(&raw[8..]);
    match edgehub_codec::decode(&mut buf, Protocol::V5, usize::MAX) {
        Ok(Some(edgehub_codec::Packet::Publish(p))) => Some(Message {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            properties: p.properties,
            expires_at: (expiry != 0).then(|| Instant::now() + Duration::from_secs(expiry - now)),
            origin: None,
            delivered: None,
        }),
        _ => None,
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Per-connection and per-session bounds, from the configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_packet_size: u32,
    pub max_inflight: u16,
    pub receive_maximum: u16,
    pub max_queued_messages: usize,
    pub topic_alias_maximum: u16,
    pub max_keep_alive: u16,
    pub connect_timeout: Duration,
}

/// Counters the metrics endpoint will expose.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections: AtomicU64,
    pub messages_received: AtomicU64,
    pub messages_sent: AtomicU64,
    /// Deliveries refused because a session's queue was full.
    pub messages_dropped_queue_full: AtomicU64,
    /// Deliveries dropped because they exceeded the receiver's maximum packet size.
    pub messages_dropped_too_large: AtomicU64,
    pub messages_expired: AtomicU64,
}

/// A session handed to a new connection.
pub struct Attached {
    pub session: Arc<Session>,
    pub session_present: bool,
    pub generation: u64,
    pub kick: Arc<Notify>,
}

/// Why a connection ended, for will and session handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// DISCONNECT with reason 0x00: the will is discarded.
    Normal,
    /// DISCONNECT 0x04, a lost connection, a protocol error, a keep-alive
    /// timeout or a takeover: the will is published.
    PublishWill,
    /// The hub is shutting down: sessions stay, wills are not published.
    ServerShutdown,
}

pub struct Broker {
    pub limits: Limits,
    pub authenticator: Arc<dyn Authenticator>,
    pub authorizer: Arc<dyn Authorizer>,
    pub stats: Stats,
    sessions: DashMap<Arc<str>, Arc<Session>>,
    /// Read-mostly snapshot: publishers load it without a lock.
    subscriptions: ArcSwap<SubscriptionTree>,
    /// Serialises changes to `subscriptions` (clone, change, swap).
    subscriptions_writer: Mutex<()>,
    retained: RwLock<HashMap<String, Arc<Message>>>,
    retained_store: std::sync::OnceLock<Arc<dyn RetainedStore>>,
    session_store: std::sync::OnceLock<Arc<dyn SessionStore>>,
    will_sink: std::sync::OnceLock<Arc<dyn WillSink>>,
    presence: std::sync::OnceLock<PresenceHook>,
    queue_store: std::sync::OnceLock<Arc<dyn SessionQueueStore>>,
}

/// Where QoS 1/2 messages for persistent sessions are kept (the hub's
/// store), so an acknowledged publish survives a crash while its subscriber
/// is away or has not acknowledged it yet: recorded before the publisher's
/// PUBACK, removed once the subscriber's PUBACK/PUBCOMP arrives.
pub trait SessionQueueStore: Send + Sync + 'static {
    /// Records `msg` for each of `sessions` (durably, group-committed);
    /// resolves with the token every session's record goes by.
    fn append(
        &self,
        msg: &Message,
        sessions: &[Arc<str>],
    ) -> BoxFuture<Result<u64, QueueStoreError>>;
    /// The subscriber of `session` has the message of `token`.
    fn ack(&self, session: &str, token: u64);
    /// What `session` still has to receive, oldest first (after a restart).
    fn load(&self, session: &str) -> Vec<(u64, Message)>;
    /// The session ended: its records go.
    fn forget(&self, session: &str);
}

/// Why a session queue store could not record a message; the store's own
/// error, boxed (the broker only passes it back to the publisher's head).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct QueueStoreError(pub Box<dyn std::error::Error + Send + Sync>);

pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// Told when a client id gets a connection (`true`) and when its
/// connection ends without a successor (`false`). Must be quick.
pub type PresenceHook = Box<dyn Fn(&str, bool) + Send + Sync>;

impl Broker {
    pub fn new(
        limits: Limits,
        authenticator: Arc<dyn Authenticator>,
        authorizer: Arc<dyn Authorizer>,
    ) -> Arc<Broker> {
        Arc::new(Broker {
            limits,
            authenticator,
            authorizer,
            stats: Stats::default(),
            sessions: DashMap::new(),
            subscriptions: ArcSwap::from_pointee(SubscriptionTree::default()),
            subscriptions_writer: Mutex::new(()),
            retained: RwLock::new(HashMap::new()),
            retained_store: std::sync::OnceLock::new(),
            session_store: std::sync::OnceLock::new(),
            will_sink: std::sync::OnceLock::new(),
            presence: std::sync::OnceLock::new(),
            queue_store: std::sync::OnceLock::new(),
        })
    }

    /// Keeps QoS 1/2 deliveries to persistent sessions in `store` from now
    /// on (set once, before [`Broker::persist_sessions`], which reloads them).
    pub fn set_session_queue_store(&self, store: Arc<dyn SessionQueueStore>) {
        let _ = self.queue_store.set(store);
    }

    /// The subscriber of `session` has the delivery recorded as `token`.
    pub fn session_acked(&self, session: &str, token: u64) {
        if let Some(q) = self.queue_store.get() {
            q.ack(session, token);
        }
    }

    /// Calls `hook` on every connect and final disconnect from now on (set
    /// once; the upstream link keeps identities' cloud connections open
    /// while they are here).
    pub fn set_presence_hook(&self, hook: PresenceHook) {
        let _ = self.presence.set(hook);
    }

    /// Keeps persistent sessions in `store` from now on, starting with the
    /// ones it held (each resumes offline, its expiry counted from when it
    /// was last disconnected; a session connected at a crash counts from now).
    pub fn persist_sessions(
        self: &Arc<Self>,
        store: Arc<dyn SessionStore>,
        saved: Vec<(String, Vec<u8>)>,
    ) {
        let now = unix_now();
        for (client_id, raw) in saved {
            let Some((protocol, expiry, at, subs)) = parse_session_record(&raw) else {
                tracing::warn!(client = %client_id, "stored session unreadable; dropped");
                store.remove(&client_id);
                continue;
            };
            let since = if at == 0 { now } else { at };
            let left = if expiry == u32::MAX {
                None
            } else {
                match (since + expiry as u64).checked_sub(now) {
                    Some(l) if l > 0 => Some(l),
                    _ => {
                        store.remove(&client_id);
                        if let Some(q) = self.queue_store.get() {
                            q.forget(&client_id);
                        }
                        continue;
                    }
                }
            };
            let id: Arc<str> = client_id.as_str().into();
            let session = Arc::new(Session::new(id.clone(), protocol, expiry));
            {
                let mut st = session.state.lock();
                for (filter, options, sid) in subs {
                    let (share, inner) = split_share(&filter);
                    self.update_subscriptions(|tree| {
                        tree.insert(&id, share, inner, SubEntry { options, id: sid })
                    });
                    st.subscriptions.insert(filter, (options, sid));
                }
                if let Some(q) = self.queue_store.get() {
                    let now = Instant::now();
                    for (token, msg) in q.load(&client_id) {
                        // QoS and retain as the subscriptions deliver them.
                        let matching = st
                            .subscriptions
                            .iter()
                            .filter(|(f, _)| topic::matches(split_share(f).1, &msg.topic));
                        let (mut qos, mut rap) = (None, false);
                        for (_, (o, _)) in matching {
                            qos = qos.max(Some(o.qos));
                            rap |= o.retain_as_published;
                        }
                        match qos {
                            Some(qos) if !msg.expired(now) => st.queue.push_back(Delivery {
                                qos: qos.min(msg.qos),
                                retain: msg.retain && rap,
                                message: Arc::new(msg),
                                subscription_ids: Vec::new(),
                                stored: Some(token),
                            }),
                            _ => q.ack(&client_id, token),
                        }
                    }
                    if !st.queue.is_empty() {
                        tracing::debug!(client = %client_id, queued = st.queue.len(), "queued messages restored");
                    }
                }
            }
            self.sessions.insert(id, session.clone());
            if let Some(left) = left {
                self.expire_later(session, 0, left);
            }
        }
        let _ = self.session_store.set(store);
    }

    /// Saves the record of a persistent session; clean sessions (expiry 0)
    /// have none, so their CONNECTs and SUBSCRIBEs cost no store write.
    fn save_session(&self, client_id: &str, st: &session::SessionState, disconnected_at: u64) {
        if let (Some(store), true) = (self.session_store.get(), st.expiry_interval != 0) {
            store.save(client_id, &session_record(st, disconnected_at));
        }
    }

    fn expire_later(self: &Arc<Self>, s: Arc<Session>, generation: u64, secs: u64) {
        let b = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            {
                let st = s.state.lock();
                if st.generation != generation || st.connected {
                    return;
                }
            }
            tracing::debug!(client = %s.client_id, "session expired");
            b.remove_session(&s, generation);
        });
    }

    /// Keeps retained messages in `store` from now on, starting with
    /// `saved` (what it held at startup; unreadable or expired ones are
    /// removed from it).
    pub fn persist_retained(&self, store: Arc<dyn RetainedStore>, saved: Vec<(String, Vec<u8>)>) {
        let mut r = self.retained.write();
        for (topic, raw) in saved {
            match parse_retained_record(&raw) {
                Some(m) => {
                    r.insert(topic, Arc::new(m));
                }
                None => store.remove(&topic),
            }
        }
        let _ = self.retained_store.set(store);
    }

    /// Hands wills to `sink` first from now on (set once).
    pub fn set_will_sink(&self, sink: Arc<dyn WillSink>) {
        let _ = self.will_sink.set(sink);
    }

    pub fn retained_count(&self) -> usize {
        self.retained.read().len()
    }

    pub fn has_session(&self, client_id: &str) -> bool {
        self.sessions.contains_key(client_id)
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Changes the subscription tree: writers take turns, readers keep using
    /// the snapshot they loaded until they load again.
    fn update_subscriptions<R>(&self, change: impl FnOnce(&mut SubscriptionTree) -> R) -> R {
        let _writer = self.subscriptions_writer.lock();
        let mut tree = SubscriptionTree::clone(&self.subscriptions.load());
        let result = change(&mut tree);
        self.subscriptions.store(Arc::new(tree));
        result
    }

    /// Binds a new connection to its session (MQTT 5.0 3.1.2.4, 3.1.4-3):
    /// an existing connection with this client id is kicked; clean start
    /// replaces the old session, otherwise it is resumed.
    pub fn attach(
        self: &Arc<Self>,
        client_id: Arc<str>,
        clean_start: bool,
        protocol: Protocol,
        expiry_interval: u32,
    ) -> Attached {
        let kick = Arc::new(Notify::new());
        let mut ended = None;
        let mut session_present = false;
        // Everything below happens under the table entry, so concurrent
        // CONNECTs with one client id are strictly ordered: each kicks exactly
        // its predecessor. Lock order: table entry → session state → trie writer.
        let activate = |session: &Arc<Session>| {
            let mut st = session.state.lock();
            st.generation += 1;
            st.connected = true;
            session.online.store(true, Ordering::Release);
            st.protocol = protocol;
            let was_persistent = st.expiry_interval != 0;
            st.expiry_interval = expiry_interval;
            session.revoked.store(false, Ordering::Release);
            // A new connection before the will delay passed cancels the will.
            st.will = None;
            *session.kick.lock() = Some(kick.clone());
            self.save_session(&session.client_id, &st, 0);
            if was_persistent && expiry_interval == 0 {
                // Resumed as a clean session: it no longer outlives us.
                if let Some(store) = self.session_store.get() {
                    store.remove(&session.client_id);
                }
            }
            st.generation
        };
        let (session, generation) = match self.sessions.entry(client_id.clone()) {
            Entry::Occupied(mut e) => {
                let old = e.get().clone();
                if let Some(k) = old.kick.lock().take() {
                    k.notify_one();
                }
                if clean_start {
                    let fresh = Arc::new(Session::new(client_id, protocol, expiry_interval));
                    e.insert(fresh.clone());
                    let g = activate(&fresh);
                    ended = Some(old);
                    (fresh, g)
                } else {
                    session_present = true;
                    let g = activate(&old);
                    (old, g)
                }
            }
            Entry::Vacant(v) => {
                let fresh = Arc::new(Session::new(client_id, protocol, expiry_interval));
                let g = activate(&fresh);
                v.insert(fresh.clone());
                (fresh, g)
            }
        };
        if let Some(old) = ended {
            self.end_session(&old);
            // Ending the old one removed the stored record they share.
            let st = session.state.lock();
            self.save_session(&session.client_id, &st, 0);
        }
        if let Some(hook) = self.presence.get() {
            hook(&session.client_id, true);
        }
        Attached {
            session,
            session_present,
            generation,
            kick,
        }
    }

    /// Called when a connection ends. `will` is the connection's will, if any.
    pub fn detach(
        self: &Arc<Self>,
        session: &Arc<Session>,
        generation: u64,
        ending: Ending,
        will: Option<PendingWill>,
    ) {
        let will = will.filter(|_| ending == Ending::PublishWill);
        let mut st = session.state.lock();
        if st.generation != generation {
            // Taken over: the new connection arrived before any will delay
            // could pass, so only an undelayed will goes out.
            drop(st);
            if let Some(w) = will {
                if will_delay(&w.will) == 0 {
                    self.publish_will(w);
                }
            }
            return;
        }
        st.connected = false;
        session.online.store(false, Ordering::Release);
        *session.kick.lock() = None;
        if let Some(hook) = self.presence.get() {
            hook(&session.client_id, false);
        }
        // A deleted identity's session ends with its connection.
        let expiry = if session.revoked.load(Ordering::Acquire) {
            0
        } else {
            st.expiry_interval
        };
        self.save_session(&session.client_id, &st, unix_now());
        let mut publish_now = None;
        if let Some(w) = will {
            let delay = will_delay(&w.will);
            if delay == 0 || expiry == 0 {
                publish_now = Some(w);
            } else {
                st.will = Some(w);
                let b = self.clone();
                let s = session.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(delay.min(expiry) as u64)).await;
                    let w = {
                        let mut st = s.state.lock();
                        if st.generation != generation || st.connected {
                            return;
                        }
                        st.will.take()
                    };
                    if let Some(w) = w {
                        b.publish_will(w);
                    }
                });
            }
        }
        drop(st);
        if let Some(w) = publish_now {
            self.publish_will(w);
        }
        if expiry == 0 {
            self.remove_session(session, generation);
        } else if expiry != u32::MAX {
            self.expire_later(session.clone(), generation, expiry as u64);
        }
    }

    /// Removes the session unless a newer connection attached to it since
    /// `generation` (checked under the table entry, as `attach` updates it).
    fn remove_session(&self, session: &Arc<Session>, generation: u64) {
        let removed = self
            .sessions
            .remove_if(&session.client_id, |_, v| {
                Arc::ptr_eq(v, session) && {
                    let st = v.state.lock();
                    st.generation == generation && !st.connected
                }
            })
            .is_some();
        if removed {
            self.end_session(session);
        }
    }

    /// The session is over: its subscriptions go and a pending will is published.
    fn end_session(&self, session: &Arc<Session>) {
        let (subs, will) = {
            let mut st = session.state.lock();
            // No connection task may act on this session any more.
            st.generation += 1;
            st.connected = false;
            session.online.store(false, Ordering::Release);
            let had_stored = st.queue.iter().any(|d| d.stored.is_some())
                || st.inflight.values().any(|o| o.delivery.stored.is_some());
            st.queue.clear();
            st.inflight.clear();
            if let Some(store) = self.session_store.get() {
                store.remove(&session.client_id);
            }
            if let (true, Some(q)) = (
                had_stored || st.expiry_interval != 0,
                self.queue_store.get(),
            ) {
                q.forget(&session.client_id);
            }
            (std::mem::take(&mut st.subscriptions), st.will.take())
        };
        if !subs.is_empty() {
            self.update_subscriptions(|tree| {
                for filter in subs.keys() {
                    let (share, inner) = split_share(filter);
                    tree.remove(&session.client_id, share, inner);
                }
            });
        }
        if let Some(w) = will {
            self.publish_will(w);
        }
    }

    fn publish_will(&self, w: PendingWill) {
        if !self.authorizer.may_publish(&w.principal, &w.will.topic) {
            tracing::debug!(principal = %w.principal.name, topic = %w.will.topic,
                "will not published: not authorized");
            return;
        }
        if self.will_sink.get().is_some_and(|s| s.take(&w)) {
            return;
        }
        let (mut properties, expiry) = forwarded_properties(w.will.properties);
        if !properties.is_empty() {
            properties.will_delay_interval = None;
        }
        let msg = Message {
            topic: w.will.topic,
            payload: w.will.payload,
            qos: w.will.qos,
            retain: w.will.retain,
            properties,
            expires_at: expiry.map(|s| Instant::now() + Duration::from_secs(s as u64)),
            origin: Some(w.principal.name.clone()),
            delivered: None,
        };
        self.publish(Arc::new(msg));
    }

    /// Accepts a published application message: updates the retained store
    /// and routes it to every matching session. Returns how many sessions it
    /// was queued for.
    pub fn publish(&self, msg: Arc<Message>) -> usize {
        let (queued, durable) = self.publish_durable(msg);
        if let Some(f) = durable {
            // Nobody waits to acknowledge (a will, a module input): the
            // deliveries follow once recorded.
            tokio::spawn(async move {
                if let Err(e) = f.await {
                    tracing::warn!(error = %e, "message for persistent sessions not recorded");
                }
            });
        }
        queued
    }

    /// As [`Broker::publish`]; QoS 1/2 deliveries to persistent sessions
    /// are recorded in the session queue store first and queued when the
    /// returned future resolves: acknowledge the publisher only then.
    pub fn publish_durable(
        &self,
        msg: Arc<Message>,
    ) -> (usize, Option<BoxFuture<Result<(), QueueStoreError>>>) {
        self.stats.messages_received.fetch_add(1, Ordering::Relaxed);
        if msg.retain {
            let mut r = self.retained.write();
            let store = self.retained_store.get();
            if msg.payload.is_empty() {
                if r.remove(msg.topic.as_str()).is_some() {
                    if let Some(s) = store {
                        s.remove(&msg.topic);
                    }
                }
            } else {
                r.insert(msg.topic.to_string(), msg.clone());
                if let Some(s) = store {
                    s.save(&msg.topic, &retained_record(&msg));
                }
            }
        }
        let mut deferred = Vec::new();
        let queued = self.route(&msg, &mut deferred);
        if deferred.is_empty() {
            return (queued, None);
        }
        let q = self
            .queue_store
            .get()
            .expect("deferred only with a queue store")
            .clone();
        let ids: Vec<Arc<str>> = deferred
            .iter()
            .map(|(s, _): &(Arc<Session>, Delivery)| s.client_id.clone())
            .collect();
        let append = q.append(&msg, &ids);
        let max = self.limits.max_queued_messages;
        let fut: BoxFuture<Result<(), QueueStoreError>> = Box::pin(async move {
            let token = append.await?;
            for (session, mut d) in deferred {
                d.stored = Some(token);
                if !session.enqueue(d, max) {
                    // Full (counted by the session): the record goes too.
                    q.ack(&session.client_id, token);
                }
            }
            Ok(())
        });
        (queued, Some(fut))
    }

    fn route(&self, msg: &Arc<Message>, deferred: &mut Vec<(Arc<Session>, Delivery)>) -> usize {
        let mut targets: Vec<Target> = Vec::new();
        let mut groups: Vec<(Vec<Target>, usize)> = Vec::new();
        {
            let tree = self.subscriptions.load();
            tree.for_each_match(
                &msg.topic,
                |client, e| {
                    if e.options.no_local && msg.origin.as_deref() == Some(&**client) {
                        return;
                    }
                    targets.push((client.clone(), *e));
                },
                |group| groups.push((group.members.to_vec(), group.start)),
            );
        }
        // Picking looks sessions up in the table; done after the snapshot is
        // released so the snapshot guard is held as briefly as possible.
        for (members, start) in &groups {
            if let Some(m) = self.pick_shared(members, *start) {
                targets.push(m);
            }
        }
        if targets.is_empty() {
            return 0;
        }
        // One delivery per session: highest QoS, every subscription id.
        targets.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut queued = 0;
        let mut i = 0;
        while i < targets.len() {
            let client = &targets[i].0;
            let mut qos = QoS::AtMostOnce;
            let mut rap = false;
            let mut ids = Vec::new();
            let mut j = i;
            while j < targets.len() && targets[j].0 == *client {
                let e = &targets[j].1;
                qos = qos.max(e.options.qos);
                rap |= e.options.retain_as_published;
                ids.extend(e.id);
                j += 1;
            }
            if let Some(s) = self.sessions.get(client).map(|s| s.clone()) {
                let d = Delivery {
                    message: msg.clone(),
                    qos: qos.min(msg.qos),
                    retain: msg.retain && rap,
                    subscription_ids: ids,
                    stored: None,
                };
                // A message an endpoint executor follows (module input,
                // cloud-to-device) is kept durable by that executor's own
                // store queue: recording it again would cost a second
                // commit and, since the session gets it only once that
                // commit resolves, could reorder its messages.
                let hold = self.queue_store.get().is_some()
                    && d.qos != QoS::AtMostOnce
                    && msg.delivered.is_none();
                match s.offer(d, self.limits.max_queued_messages, hold) {
                    session::Offer::Queued => queued += 1,
                    session::Offer::Persistent(d) => {
                        deferred.push((s, d));
                        queued += 1;
                    }
                    session::Offer::Dropped => {
                        self.stats
                            .messages_dropped_queue_full
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            i = j;
        }
        queued
    }

    /// Queues `msg` for one session only, as an IoT Hub reply or push to a
    /// single identity (twin responses, desired patches, method requests):
    /// those topics are the same for every device, so they must never go
    /// through the shared subscription index. Delivered only if the session
    /// subscribed to a matching filter; at the lower of the two QoS levels.
    pub fn deliver_to(&self, client_id: &str, msg: Arc<Message>) -> Targeted {
        let Some(session) = self.sessions.get(client_id).map(|s| s.clone()) else {
            return Targeted::NoSession;
        };
        let (qos, connected) = {
            let st = session.state.lock();
            let qos = st
                .subscriptions
                .iter()
                .filter(|(f, _)| topic::matches(f, &msg.topic))
                .map(|(_, (o, _))| o.qos)
                .max();
            (qos, st.connected)
        };
        let Some(qos) = qos else {
            return Targeted::NotSubscribed;
        };
        let d = Delivery {
            qos: qos.min(msg.qos),
            message: msg,
            retain: false,
            subscription_ids: Vec::new(),
            stored: None,
        };
        if session.enqueue(d, self.limits.max_queued_messages) {
            if connected {
                Targeted::Queued
            } else {
                Targeted::QueuedOffline
            }
        } else if connected {
            Targeted::QueueFull
        } else {
            Targeted::Offline
        }
    }

    /// Closes the connection of `client_id` because its identity was deleted
    /// (MQTT 5: DISCONNECT 0x87) and ends its session. Returns whether a
    /// session existed.
    pub fn revoke(&self, client_id: &str) -> bool {
        let Some(session) = self.sessions.get(client_id).map(|s| s.clone()) else {
            return false;
        };
        session.revoked.store(true, Ordering::Release);
        if let Some(k) = session.kick.lock().take() {
            k.notify_one();
        }
        // Offline: ends now. Connected: ends when its connection closes.
        let generation = session.state.lock().generation;
        self.remove_session(&session, generation);
        true
    }

    /// Whether the session `client_id` has a connection right now.
    pub fn is_connected(&self, client_id: &str) -> bool {
        self.sessions
            .get(client_id)
            .is_some_and(|s| s.online.load(Ordering::Acquire))
    }

    /// Round-robin over the group, preferring connected members.
    fn pick_shared(
        &self,
        members: &[(Arc<str>, SubEntry)],
        start: usize,
    ) -> Option<(Arc<str>, SubEntry)> {
        if members.is_empty() {
            return None;
        }
        let n = members.len();
        for k in 0..n {
            let m = &members[(start + k) % n];
            if let Some(s) = self.sessions.get(&m.0) {
                if s.online.load(Ordering::Acquire) {
                    return Some(m.clone());
                }
            }
        }
        Some(members[start % n].clone())
    }

    /// Adds a subscription for a session (still owned by `generation`).
    /// Returns `Some(existed)`, or `None` if the session was taken over.
    pub fn subscribe(
        &self,
        session: &Session,
        generation: u64,
        filter: &str,
        options: SubscriptionOptions,
        id: Option<u32>,
    ) -> Option<bool> {
        let mut st = session.state.lock();
        if st.generation != generation {
            return None;
        }
        let (share, inner) = split_share(filter);
        let existed = self.update_subscriptions(|tree| {
            tree.insert(&session.client_id, share, inner, SubEntry { options, id })
        });
        st.subscriptions.insert(filter.to_owned(), (options, id));
        self.save_session(&session.client_id, &st, 0);
        Some(existed)
    }

    /// Returns `Some(existed)`, or `None` if the session was taken over.
    pub fn unsubscribe(&self, session: &Session, generation: u64, filter: &str) -> Option<bool> {
        let mut st = session.state.lock();
        if st.generation != generation {
            return None;
        }
        if st.subscriptions.remove(filter).is_none() {
            return Some(false);
        }
        let (share, inner) = split_share(filter);
        self.update_subscriptions(|tree| tree.remove(&session.client_id, share, inner));
        self.save_session(&session.client_id, &st, 0);
        Some(true)
    }

    /// Retained messages matching a (non-shared) filter, unexpired.
    pub fn retained_matching(&self, filter: &str) -> Vec<Arc<Message>> {
        let now = Instant::now();
        self.retained
            .read()
            .values()
            .filter(|m| topic::matches(filter, &m.topic) && !m.expired(now))
            .cloned()
            .collect()
    }
}

/// What became of a message for one session ([`Broker::deliver_to`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Targeted {
    /// Queued for a connected session.
    Queued,
    /// Queued in a persistent session whose client is away.
    QueuedOffline,
    NoSession,
    NotSubscribed,
    /// The client is away and the session cannot keep it (QoS 0, or its
    /// queue is full).
    Offline,
    /// The session's queue is full.
    QueueFull,
}

/// A session (by client id) and the subscription that matched.
type Target = (Arc<str>, SubEntry);

/// The will delay of an MQTT 5 will; zero otherwise.
pub fn will_delay(w: &Will) -> u32 {
    w.properties.will_delay_interval.unwrap_or(0)
}

/// `$share/g/f` → (Some(g), f); anything else → (None, filter). Only called
/// with filters already validated.
fn split_share(filter: &str) -> (Option<&str>, &str) {
    match topic::parse_shared(filter) {
        Ok(Some((g, f))) => (Some(g), f),
        _ => (None, filter),
    }
}

/// Properties a message carries from publisher to subscriber.
pub fn forwarded_properties(mut p: Props) -> (Props, Option<u32>) {
    if p.is_empty() {
        return (p, None);
    }
    let expiry = p.message_expiry_interval.take();
    p.topic_alias = None;
    p.subscription_identifiers.clear();
    (p, expiry)
}
