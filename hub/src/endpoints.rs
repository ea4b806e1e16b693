//! Endpoint executors: deliver what the store holds for a module input
//! (`BrokeredEndpoint("/modules/<m>/inputs/<i>")`) or a device's
//! cloud-to-device queue to that identity's device link, several messages
//! in flight, in order, and remove each from the store only once its head
//! reported it completed (MQTT: PUBACK). `$upstream` has its own executor
//! (`upstream`); without an upstream its queue is the outbox the
//! management API serves.
//!
//! Owns: the delivery window, redelivery and the store acknowledgement for
//! these endpoints. Must not touch: routing (done before the store) or the
//! wire (the identity's head turns each delivery into its frames).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use edgehub_router::{Endpoint, Message};
use edgehub_store::{EndpointHandle, Entry, Store};
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

use edgehub_device::c2d::{Deliveries, LockToken};
use edgehub_device::link::{Delivery, Links, Offer, Receipt, Settled};

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

/// Store endpoint name of a device's cloud-to-device queue.
pub fn c2d_endpoint_name(device: &str) -> String {
    format!("c2d:{device}")
}

/// Runs the executor of one module input until shutdown. Module inputs are
/// delivered until the module has them, however often that takes (as IoT
/// Edge does).
pub async fn run_module_endpoint(
    links: Arc<Links>,
    store: Store,
    handle: Arc<EndpointHandle>,
    device: String,
    module: String,
    input: String,
    shutdown: watch::Receiver<bool>,
) {
    let target = LinkTarget {
        identity: format!("{device}/{module}"),
        input: Some(input.into()),
        max_delivery_count: None,
        observed: None,
    };
    run_link_endpoint(links, store, handle, target, shutdown).await
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

/// Runs the executor of one device's cloud-to-device queue until shutdown,
/// settled as IoT Hub settles them (see `edgehub_device::c2d`).
async fn run_c2d_endpoint(
    links: Arc<Links>,
    store: Store,
    handle: Arc<EndpointHandle>,
    device: String,
    settings: C2dSettings,
    shutdown: watch::Receiver<bool>,
) {
    let target = LinkTarget {
        identity: device,
        input: None,
        max_delivery_count: Some(settings.max_delivery_count),
        observed: Some((settings.observed, settings.outcomes)),
    };
    run_link_endpoint(links, store, handle, target, shutdown).await
}

/// Which identity a store queue is delivered to, and how.
struct LinkTarget {
    /// `device` (cloud-to-device) or `device/module` (module input).
    identity: String,
    /// The module input; `None`: cloud-to-device.
    input: Option<Arc<str>>,
    max_delivery_count: Option<u32>,
    observed: Option<(Arc<C2dObserved>, Arc<C2dOutcomes>)>,
}

/// Delivers a store queue to one identity's link. Every delivery is locked
/// in the device layer's [`Deliveries`] until the head completes it (it
/// leaves the store), rejects it (it leaves the store, counted), abandons
/// or loses it (offered again with its count one higher) or holds it
/// longer than [`REDELIVER_AFTER`] (offered again, not counted as a failed
/// delivery).
async fn run_link_endpoint(
    links: Arc<Links>,
    store: Store,
    handle: Arc<EndpointHandle>,
    target: LinkTarget,
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
    let client = &target.identity;
    let waker = Arc::new(Notify::new());
    let mut deliveries: Deliveries<Entry> = Deliveries::new(target.max_delivery_count);
    // Read order: the device layer puts abandoned messages back by it.
    let mut order = 0u64;
    let mut sent: HashMap<LockToken, Arc<Receipt>> = HashMap::new();
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
        let (mut done, mut rejected) = (Vec::new(), Vec::new());
        let mut lost = 0usize;
        sent.retain(|lock, r| match r.state() {
            Settled::Pending => true,
            Settled::Completed => {
                if let Ok(e) = deliveries.complete(*lock) {
                    done.push(e);
                }
                false
            }
            Settled::Rejected => {
                if let Ok(e) = deliveries.reject(*lock) {
                    rejected.push(e);
                }
                false
            }
            Settled::Abandoned | Settled::Lost => {
                lost += 1;
                let _ = deliveries.abandon(*lock);
                false
            }
            // Discarded by the head: the lock stays until it runs out.
            Settled::Cancelled => true,
        });
        if lost > 0 {
            debug!(endpoint = %name, count = lost, "deliveries abandoned or lost with their link; offering them again");
        }
        for (settled, pick) in [
            (
                &done,
                (|o| &o.completed) as fn(&C2dOutcomes) -> &std::sync::atomic::AtomicU64,
            ),
            (&rejected, |o| &o.rejected),
        ] {
            if settled.is_empty() {
                continue;
            }
            for e in settled {
                count(e.seq, None);
                outcome(pick);
            }
            if let Err(e) = reader.ack(settled) {
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
            sent.retain(|lock, r| {
                let held = deliveries.is_locked(*lock);
                if !held {
                    r.cancel();
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
            let w = waker.clone();
            let receipt = Arc::new(Receipt::new(move || w.notify_one()));
            let message = e.message.clone();
            let delivery = match &target.input {
                Some(input) => Delivery::ModuleInput {
                    input: input.clone(),
                    message,
                    receipt: receipt.clone(),
                },
                None => Delivery::CloudToDevice {
                    message,
                    lock,
                    delivery_count: n,
                    receipt: receipt.clone(),
                },
            };
            if !matches!(links.deliver(client, delivery), Offer::Sent | Offer::Held) {
                // Not listening (or its queue is full): keep order, retry;
                // the attempt does not count.
                receipt.cancel();
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
            sent.insert(lock, receipt);
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
    links: Arc<Links>,
    store: Store,
    shutdown: watch::Receiver<bool>,
    started: parking_lot::Mutex<std::collections::HashSet<String>>,
    pub settings: C2dSettings,
}

impl C2dExecutors {
    pub fn new(
        links: Arc<Links>,
        store: Store,
        shutdown: watch::Receiver<bool>,
        max_delivery_count: u32,
    ) -> C2dExecutors {
        C2dExecutors {
            links,
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
                self.links.clone(),
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
