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

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgehub_codec::{Props, QoS, Str};
use edgehub_router::{Endpoint, Message, SystemProperty};
use edgehub_store::{EndpointHandle, Entry, Store};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

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

/// Runs the executor of one module input until shutdown.
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
    run_session_endpoint(
        broker,
        store,
        handle,
        format!("{device}/{module}"),
        base,
        shutdown,
    )
    .await
}

/// Runs the executor of one device's cloud-to-device queue until shutdown:
/// delivered on `devices/{d}/messages/devicebound/{property bag}`.
pub async fn run_c2d_endpoint(
    broker: Arc<Broker>,
    store: Store,
    handle: Arc<EndpointHandle>,
    device: String,
    shutdown: watch::Receiver<bool>,
) {
    let base = format!("devices/{device}/messages/devicebound/");
    run_session_endpoint(broker, store, handle, device, base, shutdown).await
}

/// Delivers a store queue to the MQTT session `client` on topics under
/// `base` (plus each message's property bag).
async fn run_session_endpoint(
    broker: Arc<Broker>,
    store: Store,
    handle: Arc<EndpointHandle>,
    client: String,
    base: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let name = handle.name().to_owned();
    let mut reader = match store.reader(handle) {
        Ok(r) => r,
        Err(e) => {
            warn!(endpoint = %name, error = %e, "endpoint executor not started");
            return;
        }
    };
    let waker = Arc::new(Notify::new());
    // Read from the store, not yet accepted by the module's session.
    let mut waiting: VecDeque<Entry> = VecDeque::new();
    let mut inflight: VecDeque<(Entry, Arc<Delivered>, Instant)> = VecDeque::new();
    let mut absent_logged = false;
    info!(endpoint = %name, client = %client, "endpoint executor started");
    loop {
        // Acknowledged deliveries leave the store (any order; the store
        // keeps the checkpoint right).
        let mut done = Vec::new();
        inflight.retain(|(e, d, _)| {
            if d.is_set() {
                done.push(e.clone());
                false
            } else {
                true
            }
        });
        if !done.is_empty() {
            if let Err(e) = reader.ack(&done) {
                warn!(endpoint = %name, error = %e, "acknowledging delivered messages failed; they will be delivered again");
            }
        }
        // Deliveries unacknowledged for too long go again, in order.
        if inflight
            .front()
            .is_some_and(|(_, _, at)| at.elapsed() >= REDELIVER_AFTER)
        {
            debug!(endpoint = %name, count = inflight.len(), "redelivering unacknowledged messages");
            for (e, _, _) in inflight.drain(..).rev() {
                waiting.push_front(e);
            }
        }
        // Hand messages to the module's session while the window allows.
        let now_ms = store.now_ms();
        let mut blocked = false;
        while inflight.len() < MODULE_WINDOW {
            let Some(e) = waiting.front() else { break };
            if e.expires_at_ms != 0 && e.expires_at_ms <= now_ms {
                let e = waiting.pop_front().expect("front exists");
                let _ = reader.expire(&[e]);
                continue;
            }
            let delivered = Arc::new(Delivered::new(waker.clone()));
            let msg = Arc::new(BrokerMessage {
                topic: Str::from(input_topic(&base, &e.message)),
                payload: e.message.body.clone(),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: Props::default(),
                expires_at: None,
                origin: None,
                delivered: Some(delivered.clone()),
            });
            if broker.publish(msg) == 0 {
                // Not subscribed (or its queue is full): keep order, retry.
                if !absent_logged {
                    info!(endpoint = %name, client = %client, "destination not subscribed; messages stay stored");
                    absent_logged = true;
                }
                blocked = true;
                break;
            }
            absent_logged = false;
            let e = waiting.pop_front().expect("front exists");
            inflight.push_back((e, delivered, Instant::now()));
        }
        let room = MODULE_WINDOW.saturating_sub(waiting.len() + inflight.len());
        let tick = if blocked || !inflight.is_empty() {
            Some(if blocked { RETRY } else { REDELIVER_AFTER })
        } else {
            None
        };
        tokio::select! {
            batch = reader.next(room.max(1)), if room > 0 && !blocked => match batch {
                Ok(b) => waiting.extend(b),
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
}

impl C2dExecutors {
    pub fn new(broker: Arc<Broker>, store: Store, shutdown: watch::Receiver<bool>) -> C2dExecutors {
        C2dExecutors {
            broker,
            store,
            shutdown,
            started: Default::default(),
        }
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
