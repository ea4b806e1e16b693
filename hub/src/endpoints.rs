//! Endpoint executors: deliver what the store holds for a module input
//! (`BrokeredEndpoint("/modules/<m>/inputs/<i>")`) to that module over its
//! MQTT session, several messages in flight, in order, and remove each from
//! the store only once the module acknowledged it (PUBACK). `$upstream` has
//! no executor until the upstream link exists: its queue is the outbox the
//! management API serves.
//!
//! Owns: the delivery window, redelivery and the store acknowledgement for
//! module endpoints. Must not touch: routing (done before the store) or the
//! wire (the module's connection task writes the PUBLISH).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use edgehub_codec::{Props, QoS, Str};
use edgehub_router::{Endpoint, Message, SystemProperty};
use edgehub_store::{EndpointHandle, Entry, Store};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

use edgehub_device::c2d::{Deliveries, LockToken};

use crate::broker::session::{Delivered, Message as BrokerMessage};
use crate::broker::Broker;

/// Messages handed to a module and not yet acknowledged, per endpoint.
pub const MODULE_WINDOW: usize = 16;
/// An unacknowledged delivery is offered again after this long (the module
/// may have dropped its session); duplicates are what at-least-once allows.
const REDELIVER_AFTER: Duration = Duration::from_secs(30);
/// How often a module that is not subscribed is looked for again.
const RETRY: Duration = Duration::from_millis(500);

/// `$upstream` or `BrokeredEndpoint("/modules/m/inputs/i")` back from the
/// store's endpoint name (its `Display` form).
pub fn parse_endpoint_name(name: &str) -> Option<Endpoint> {
    if name == "$upstream" {
        return Some(Endpoint::Upstream);
    }
    let path = name
        .strip_prefix("BrokeredEndpoint(\"/modules/")?
        .strip_suffix("\")")?;
    let (module, input) = path.split_once("/inputs/")?;
    Some(Endpoint::ModuleInput {
        module: module.into(),
        input: input.into(),
    })
}

const BAG: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn system_key(p: SystemProperty) -> Option<&'static str> {
    Some(match p {
        SystemProperty::MessageId => "$.mid",
        SystemProperty::CorrelationId => "$.cid",
        SystemProperty::UserId => "$.uid",
        SystemProperty::To => "$.to",
        SystemProperty::ContentType => "$.ct",
        SystemProperty::ContentEncoding => "$.ce",
        SystemProperty::ConnectionDeviceId => "$.cdid",
        SystemProperty::ConnectionModuleId => "$.cmid",
        SystemProperty::CreationTime => "$.ctime",
        SystemProperty::MessageSchema => "$.schema",
        SystemProperty::OutputName => "$.on",
        _ => return None,
    })
}

/// `devices/{d}/modules/{m}/inputs/{i}/{property bag}` as IoT Edge sends it.
pub fn input_topic(base: &str, msg: &Message) -> String {
    let mut t = String::with_capacity(base.len() + 64);
    t.push_str(base);
    let mut first = true;
    let mut pair = |t: &mut String, k: &str, v: &str| {
        if !first {
            t.push('&');
        }
        first = false;
        t.extend(utf8_percent_encode(k, BAG));
        t.push('=');
        t.extend(utf8_percent_encode(v, BAG));
    };
    for (k, v) in &msg.properties {
        pair(&mut t, k, v);
    }
    for p in SystemProperty::ALL {
        if let (Some(key), Some(v)) = (system_key(p), msg.system(p)) {
            pair(&mut t, key, v);
        }
    }
    t
}

/// Store endpoint name of a device's cloud-to-device queue.
pub fn c2d_endpoint_name(device: &str) -> String {
    format!("c2d:{device}")
}

/// Runs the executor of one module input until shutdown. Module inputs are
/// delivered until the module has them, however often that takes (as IoT
/// Edge does).
pub async fn run_module_endpoint(
    broker: Arc<Broker>,
    store: Store,
    handle: Arc<EndpointHandle>,
    device: String,
    module: String,
    input: String,
    shutdown: watch::Receiver<bool>,
) {
    let base = format!("devices/{device}/modules/{module}/inputs/{input}/");
    let target = SessionTarget {
        client: format!("{device}/{module}"),
        base,
        max_delivery_count: None,
        observed: None,
    };
    run_session_endpoint(broker, store, handle, target, shutdown).await
}

/// What one device's cloud-to-device queue has been through, for the
/// management API and the metrics: delivery attempts of the messages it
/// holds, and how messages left it.
#[derive(Default)]
pub struct C2dObserved {
    /// Store sequence → delivery attempts so far (while it is queued).
    pub delivery_counts: dashmap::DashMap<u64, u32>,
}

/// How cloud-to-device messages left their queues, over all devices.
#[derive(Default)]
pub struct C2dOutcomes {
    pub completed: std::sync::atomic::AtomicU64,
    pub rejected: std::sync::atomic::AtomicU64,
    pub dead_lettered: std::sync::atomic::AtomicU64,
    pub expired: std::sync::atomic::AtomicU64,
}

impl C2dOutcomes {
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        use std::sync::atomic::Ordering::Relaxed;
        let _ = writeln!(
            out,
            "# HELP edgehub_c2d_messages_total Cloud-to-device messages that left their queue, by how.\n# TYPE edgehub_c2d_messages_total counter"
        );
        for (outcome, v) in [
            ("completed", &self.completed),
            ("rejected", &self.rejected),
            ("dead_lettered", &self.dead_lettered),
            ("expired", &self.expired),
        ] {
            let _ = writeln!(
                out,
                "edgehub_c2d_messages_total{{outcome=\"{outcome}\"}} {}",
                v.load(Relaxed)
            );
        }
    }
}

/// Runs the executor of one device's cloud-to-device queue until shutdown:
/// delivered on `devices/{d}/messages/devicebound/{property bag}`, settled
/// as IoT Hub settles them (see `edgehub_device::c2d`).
async fn run_c2d_endpoint(
    broker: Arc<Broker>,
    store: Store,
    handle: Arc<EndpointHandle>,
    device: String,
    settings: C2dSettings,
    shutdown: watch::Receiver<bool>,
) {
    let target = SessionTarget {
        base: format!("devices/{device}/messages/devicebound/"),
        client: device,
        max_delivery_count: Some(settings.max_delivery_count),
        observed: Some((settings.observed, settings.outcomes)),
    };
    run_session_endpoint(broker, store, handle, target, shutdown).await
}

/// Where and how a store queue is delivered over MQTT.
struct SessionTarget {
    /// The MQTT session (client id) it goes to.
    client: String,
    /// Topic prefix; each message's property bag follows.
    base: String,
    max_delivery_count: Option<u32>,
    observed: Option<(Arc<C2dObserved>, Arc<C2dOutcomes>)>,
}

/// Delivers a store queue to one MQTT session. Every delivery is locked in
/// the device layer's [`Deliveries`] until the session acknowledges it
/// (complete: it leaves the store), loses it (its session ended: abandoned,
/// offered to the next connection with its count one higher) or holds it
/// longer than [`REDELIVER_AFTER`] (offered again, not counted as a failed
/// delivery).
async fn run_session_endpoint(
    broker: Arc<Broker>,
    store: Store,
    handle: Arc<EndpointHandle>,
    target: SessionTarget,
    mut shutdown: watch::Receiver<bool>,
) {
    use edgehub_device::c2d::Action;
    use std::sync::atomic::Ordering::Relaxed;
    let name = handle.name().to_owned();
    let mut reader = match store.reader(handle) {
        Ok(r) => r,
        Err(e) => {
            warn!(endpoint = %name, error = %e, "endpoint executor not started");
            return;
        }
    };
    let client = &target.client;
    let waker = Arc::new(Notify::new());
    let mut deliveries: Deliveries<Entry> = Deliveries::new(target.max_delivery_count);
    // Read order: the device layer puts abandoned messages back by it.
    let mut order = 0u64;
    let mut sent: HashMap<LockToken, Arc<Delivered>> = HashMap::new();
    let mut absent_logged = false;
    let count = |seq: u64, n: Option<u32>| {
        if let Some((obs, _)) = &target.observed {
            match n {
                Some(n) => obs.delivery_counts.insert(seq, n),
                None => obs.delivery_counts.remove(&seq).map(|(_, v)| v),
            };
        }
    };
    let outcome = |pick: fn(&C2dOutcomes) -> &std::sync::atomic::AtomicU64| {
        if let Some((_, o)) = &target.observed {
            pick(o).fetch_add(1, Relaxed);
        }
    };
    info!(endpoint = %name, client = %client, "endpoint executor started");
    loop {
        // Settle what the session reported: acknowledged deliveries leave
        // the store (any order; the store keeps the checkpoint right), lost
        // ones go again.
        let mut done = Vec::new();
        let mut lost = 0usize;
        sent.retain(|lock, d| {
            if d.is_set() {
                if let Ok(e) = deliveries.complete(*lock) {
                    done.push(e);
                }
                false
            } else if d.is_released() {
                lost += 1;
                let _ = deliveries.abandon(*lock);
                false
            } else {
                true
            }
        });
        if lost > 0 {
            debug!(endpoint = %name, count = lost, "deliveries lost with their session; offering them again");
        }
        if !done.is_empty() {
            for e in &done {
                count(e.seq, None);
                outcome(|o| &o.completed);
            }
            if let Err(e) = reader.ack(&done) {
                warn!(endpoint = %name, error = %e, "acknowledging delivered messages failed; they will be delivered again");
            }
        }
        // Deliveries held too long go again, in order.
        let now_ms = store.now_ms();
        let timed_out = deliveries.expire_locks(now_ms, REDELIVER_AFTER.as_millis() as u64);
        if timed_out > 0 {
            debug!(endpoint = %name, count = timed_out, "redelivering unacknowledged messages");
            // Their locks ran out: a late acknowledgement of the old
            // delivery is ignored, the new one counts.
            sent.retain(|lock, d| {
                let held = deliveries.is_locked(*lock);
                if !held {
                    d.cancel();
                }
                held
            });
        }
        // Hand messages to the session while the window allows.
        let mut blocked = false;
        while deliveries.locked() < MODULE_WINDOW {
            let Some(action) = deliveries.poll(now_ms) else {
                break;
            };
            let (lock, n, e) = match action {
                Action::Expired(e) => {
                    count(e.seq, None);
                    outcome(|o| &o.expired);
                    let _ = reader.expire(&[e]);
                    continue;
                }
                Action::DeadLettered(e) => {
                    count(e.seq, None);
                    outcome(|o| &o.dead_lettered);
                    warn!(endpoint = %name, client = %client, seq = e.seq,
                          "message dead-lettered: delivered the maximum number of times without being completed");
                    let _ = reader.ack(&[e]);
                    continue;
                }
                Action::Deliver {
                    lock,
                    delivery_count,
                    message,
                } => (lock, delivery_count, message),
            };
            let delivered = Arc::new(Delivered::new(waker.clone()));
            let msg = Arc::new(BrokerMessage {
                topic: Str::from(input_topic(&target.base, &e.message)),
                payload: e.message.body.clone(),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: Props::default(),
                expires_at: None,
                origin: None,
                delivered: Some(delivered.clone()),
            });
            if broker.publish(msg.clone()) == 0 {
                // Not subscribed (or its queue is full): keep order, retry;
                // the attempt does not count.
                delivered.cancel();
                let _ = deliveries.retract(lock);
                if !absent_logged {
                    info!(endpoint = %name, client = %client, "destination not subscribed; messages stay stored");
                    absent_logged = true;
                }
                blocked = true;
                break;
            }
            absent_logged = false;
            count(e.seq, Some(n));
            sent.insert(lock, delivered);
        }
        let room = MODULE_WINDOW.saturating_sub(deliveries.len());
        let tick = if blocked {
            Some(RETRY)
        } else {
            deliveries.oldest_lock_ms().map(|at| {
                Duration::from_millis(
                    (at + REDELIVER_AFTER.as_millis() as u64).saturating_sub(now_ms),
                )
            })
        };
        tokio::select! {
            batch = reader.next(room.max(1)), if room > 0 && !blocked => match batch {
                Ok(b) => {
                    for e in b {
                        order += 1;
                        deliveries.push(order, e.expires_at_ms, e);
                    }
                }
                Err(e) => {
                    warn!(endpoint = %name, error = %e, "reading the store failed; retrying");
                    tokio::time::sleep(RETRY).await;
                }
            },
            _ = waker.notified() => {}
            _ = async { match tick { Some(t) => tokio::time::sleep(t).await, None => std::future::pending().await } } => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// How a hub settles cloud-to-device messages, shared by every device's
/// executor.
#[derive(Clone)]
pub struct C2dSettings {
    pub max_delivery_count: u32,
    pub observed: Arc<C2dObserved>,
    pub outcomes: Arc<C2dOutcomes>,
}

/// Cloud-to-device messages one device may have waiting (IoT Hub: 50).
pub const C2D_MAX_QUEUED: usize = 50;

/// IoT Hub's default time-to-live for cloud-to-device messages.
pub const C2D_DEFAULT_TTL_SECS: u64 = 3600;

#[derive(Debug, thiserror::Error)]
pub enum C2dError {
    #[error("DeviceMaximumQueueDepthExceeded: device {0:?} already has {C2D_MAX_QUEUED} cloud-to-device messages waiting")]
    QueueFull(String),
    #[error(transparent)]
    Store(#[from] edgehub_store::StoreError),
    #[error("{0}")]
    Internal(String),
}

/// Starts each device's cloud-to-device executor once, on the first message
/// for it (or at startup when its queue already holds some).
pub struct C2dExecutors {
    broker: Arc<Broker>,
    store: Store,
    shutdown: watch::Receiver<bool>,
    started: parking_lot::Mutex<std::collections::HashSet<String>>,
    pub settings: C2dSettings,
}

impl C2dExecutors {
    pub fn new(
        broker: Arc<Broker>,
        store: Store,
        shutdown: watch::Receiver<bool>,
        max_delivery_count: u32,
    ) -> C2dExecutors {
        C2dExecutors {
            broker,
            store,
            shutdown,
            started: Default::default(),
            settings: C2dSettings {
                max_delivery_count,
                observed: Arc::default(),
                outcomes: Arc::default(),
            },
        }
    }

    /// Delivery attempts so far of the queued message `seq` (0: never
    /// delivered).
    pub fn delivery_count(&self, seq: u64) -> u32 {
        self.settings
            .observed
            .delivery_counts
            .get(&seq)
            .map_or(0, |c| *c)
    }

    /// The queue of `device` (as registered), with its executor running.
    pub fn ensure(&self, device: &str) -> Result<Arc<EndpointHandle>, edgehub_store::StoreError> {
        let handle = self.store.endpoint(&c2d_endpoint_name(device))?;
        if self.started.lock().insert(device.to_owned()) {
            tokio::spawn(run_c2d_endpoint(
                self.broker.clone(),
                self.store.clone(),
                handle.clone(),
                device.to_owned(),
                self.settings.clone(),
                self.shutdown.clone(),
            ));
        }
        Ok(handle)
    }

    /// Queues a cloud-to-device message for `device` (as registered),
    /// durably; refused when the device already has
    /// [`C2D_MAX_QUEUED`] waiting (IoT Hub's bound: a device that never
    /// collects its messages cannot fill the disk with them).
    pub async fn enqueue(
        &self,
        device: &str,
        msg: Message,
        ttl_secs: u64,
    ) -> Result<u64, C2dError> {
        let handle = self.ensure(device)?;
        let (store, h) = (self.store.clone(), handle.clone());
        let queued = tokio::task::spawn_blocking(move || store.peek(&h, C2D_MAX_QUEUED + 1))
            .await
            .map_err(|e| C2dError::Internal(e.to_string()))??;
        if queued.len() >= C2D_MAX_QUEUED {
            return Err(C2dError::QueueFull(device.to_owned()));
        }
        let expires_at_ms = if ttl_secs == 0 {
            0
        } else {
            self.store.now_ms() + ttl_secs * 1000
        };
        let target = edgehub_store::Target::new(&handle, 0, expires_at_ms);
        let append = edgehub_store::Append::new(Arc::new(msg), vec![target]);
        Ok(self.store.append(append).await?)
    }

    /// Executors for every device queue the store already has.
    pub fn resume(&self) {
        for h in self.store.endpoints() {
            if let Some(device) = h.name().strip_prefix("c2d:") {
                if let Err(e) = self.ensure(device) {
                    warn!(device, error = %e, "cloud-to-device queue not resumed");
                }
            }
        }
    }
}
