//! Session state (MQTT 5.0 section 4.1): what outlives a network connection.
//! Owned by the broker's session table; a connection task drives it while
//! connected. All fields sit behind one mutex per session, held briefly by
//! publishers (enqueue) and by the owning connection (dequeue, acks).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use edgehub_codec::{Props, Protocol, QoS, Str, SubscriptionOptions, Will};

use crate::auth::Principal;
use parking_lot::Mutex;
use tokio::sync::Notify;

/// An application message as the broker holds it: shared by every session it
/// is delivered to, so fan-out to N subscribers never copies the payload.
#[derive(Debug)]
pub struct Message {
    pub topic: Str,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Forwarded MQTT 5 properties: payload format, content type, response
    /// topic, correlation data, user properties. Never topic alias or
    /// subscription identifiers (those are per hop).
    pub properties: Props,
    pub expires_at: Option<Instant>,
    /// Client id of the publishing session, for no-local.
    pub origin: Option<Arc<str>>,
    /// Set when a subscriber has it (PUBACK/PUBCOMP, or written for QoS 0):
    /// how an endpoint executor learns its message reached the module.
    pub delivered: Option<Arc<dyn DeliveryReceipt>>,
}

impl std::fmt::Debug for dyn DeliveryReceipt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeliveryReceipt")
    }
}

/// How whoever handed the broker a message learns what became of it at
/// its subscriber (an endpoint executor following a stored message): the
/// first report counts.
pub trait DeliveryReceipt: Send + Sync {
    /// The subscriber has it (PUBACK/PUBCOMP, or written for QoS 0).
    fn acknowledged(&self);
    /// It left its session unacknowledged (a clean session's client left,
    /// or the session was taken over): it may go to the next connection
    /// at once.
    fn lost(&self);
    /// The connection discarded it without sending it (larger than the
    /// client's maximum packet size): offer it again later, not at once.
    fn discarded(&self);
}

impl Drop for Message {
    fn drop(&mut self) {
        // Every holder is gone: a delivery nobody acknowledged was lost.
        if let Some(d) = &self.delivered {
            d.lost();
        }
    }
}

impl Message {
    pub fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }
}

/// One message on its way to one session.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub message: Arc<Message>,
    pub qos: QoS,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
    /// Its record in the durable session queue (persistent sessions, QoS
    /// 1/2): removed once the subscriber has the message.
    pub stored: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutState {
    /// QoS 1 sent, waiting for PUBACK.
    AwaitPubAck,
    /// QoS 2 sent, waiting for PUBREC.
    AwaitPubRec,
    /// PUBREL sent, waiting for PUBCOMP.
    AwaitPubComp,
}

#[derive(Debug)]
pub struct Outgoing {
    pub delivery: Delivery,
    pub state: OutState,
}

/// A will waiting to be published (MQTT 5 will delay, or session end).
#[derive(Debug, Clone)]
pub struct PendingWill {
    pub will: Will,
    pub principal: Principal,
}

#[derive(Debug)]
pub struct SessionState {
    pub protocol: Protocol,
    /// Filter as subscribed (including `$share/g/`) → options and identifier.
    pub subscriptions: HashMap<String, (SubscriptionOptions, Option<u32>)>,
    pub queue: VecDeque<Delivery>,
    pub inflight: BTreeMap<u16, Outgoing>,
    next_packet_id: u16,
    /// Incoming QoS 2 packet ids received (PUBREC sent) but not yet released.
    pub incoming_qos2: HashSet<u16>,
    /// Seconds the session outlives its connection; `u32::MAX` is forever.
    pub expiry_interval: u32,
    /// Bumped by every connection that attaches; a task holding an older
    /// number no longer owns the session.
    pub generation: u64,
    pub connected: bool,
    pub will: Option<PendingWill>,
    /// Messages refused because the queue was full.
    pub dropped: u64,
}

pub struct Session {
    pub client_id: Arc<str>,
    pub state: Mutex<SessionState>,
    /// Wakes the connection task when deliveries are queued.
    pub wake: Notify,
    /// Tells the current connection it was taken over or must close.
    pub kick: Mutex<Option<Arc<Notify>>>,
    /// Mirrors `SessionState::connected` for shared-subscription picking,
    /// which runs on every matching publish and should not take the mutex.
    pub online: AtomicBool,
    /// Set (with a kick) when the identity behind the session is no longer
    /// allowed in, so the connection closes as "not authorized".
    pub revoked: AtomicBool,
}

impl Session {
    pub fn new(client_id: Arc<str>, protocol: Protocol, expiry_interval: u32) -> Session {
        Session {
            client_id,
            state: Mutex::new(SessionState {
                protocol,
                subscriptions: HashMap::new(),
                queue: VecDeque::new(),
                inflight: BTreeMap::new(),
                next_packet_id: 1,
                incoming_qos2: HashSet::new(),
                expiry_interval,
                generation: 0,
                connected: false,
                will: None,
                dropped: 0,
            }),
            wake: Notify::new(),
            kick: Mutex::new(None),
            online: AtomicBool::new(false),
            revoked: AtomicBool::new(false),
        }
    }

    /// Queues a delivery. Offline sessions keep only QoS 1 and 2 (QoS 0 is
    /// "at most once": nobody is there to receive it). A full queue drops the
    /// new message and counts it. Returns whether it was queued.
    pub fn enqueue(&self, d: Delivery, max_queued: usize) -> bool {
        matches!(self.offer(d, max_queued, false), Offer::Queued)
    }

    /// As [`Session::enqueue`], but with `hold_persistent` a delivery to a
    /// session that outlives its connection is handed back instead, to be
    /// recorded in the store first (decided under the one lock `enqueue`
    /// takes anyway: this runs for every delivery of every publish).
    pub fn offer(&self, d: Delivery, max_queued: usize, hold_persistent: bool) -> Offer {
        let mut st = self.state.lock();
        if hold_persistent && st.expiry_interval != 0 {
            return Offer::Persistent(d);
        }
        if !st.connected && d.qos == QoS::AtMostOnce {
            return Offer::Dropped;
        }
        if st.queue.len() >= max_queued {
            st.dropped += 1;
            if st.dropped.is_power_of_two() {
                tracing::debug!(client = %self.client_id, dropped = st.dropped,
                    "session queue full; dropping new messages");
            }
            return Offer::Dropped;
        }
        st.queue.push_back(d);
        let connected = st.connected;
        drop(st);
        if connected {
            self.wake.notify_one();
        }
        Offer::Queued
    }
}

/// What became of a delivery offered to a session.
#[derive(Debug)]
pub enum Offer {
    Queued,
    /// Not queued: QoS 0 while offline, or the queue is full.
    Dropped,
    /// Handed back: the session is persistent and the delivery must be
    /// recorded before it is queued.
    Persistent(Delivery),
}

impl SessionState {
    /// Next packet id not in flight; `None` when all 65,535 are in use.
    pub fn allocate_packet_id(&mut self) -> Option<u16> {
        for _ in 0..u16::MAX {
            let id = self.next_packet_id;
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }
}
