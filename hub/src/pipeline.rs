//! From an accepted IoT Hub message to its durable queue entries: route it,
//! then hand it to the store's group-commit writer. It is the device
//! layer's telemetry sink; the head acknowledges the sender only when the
//! returned future resolves.
//!
//! Owns: the live route table, the endpoint → store queue mapping, message
//! counters. Must not touch: the wire (the connection decides what a result
//! means for PUBACK) or storage internals.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use edgehub_router::{Endpoint, Message, RouteTable, SharedRouteTable};
use edgehub_store::{priority_slot, Append, EndpointHandle, Store, StoreError, Target};

/// The route IoT Edge's portal puts in a new deployment; used when no
/// deployment was given, so a fresh hub keeps device telemetry for upstream.
pub const DEFAULT_ROUTE: &str = "FROM /messages/* INTO $upstream";

/// `storeAndForwardConfiguration.timeToLiveSecs` when a deployment sets none
/// (IoT Edge's default: two hours).
pub use edgehub_router::DEFAULT_TTL_SECS;

impl Metrics {
    /// Counts what became of a submitted message.
    pub(crate) fn record_outcome(&self, r: &Result<u64, StoreError>) {
        match r {
            Ok(_) => {}
            Err(e) if e.is_quota() => {
                self.refused_quota.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.store_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl edgehub_device::layer::TelemetrySink for Pipeline {
    fn submit(&self, msg: Message) -> Result<Option<edgehub_device::layer::Stored>, StoreError> {
        Ok(Pipeline::submit(self, msg)?.map(|f| Box::pin(f) as edgehub_device::layer::Stored))
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub received: AtomicU64,
    pub unrouted: AtomicU64,
    pub refused_quota: AtomicU64,
    pub store_errors: AtomicU64,
}

pub struct Pipeline {
    store: Store,
    routes: SharedRouteTable,
    endpoints: DashMap<Endpoint, Arc<EndpointHandle>>,
    pub metrics: Arc<Metrics>,
    /// Prefix of edge message ids: differs per process start, so ids stay
    /// unique across restarts without a stored counter.
    boot: u64,
    next_id: AtomicU64,
    /// Endpoints seen for the first time, for whoever starts executors.
    new_endpoints: tokio::sync::mpsc::UnboundedSender<NewEndpoint>,
    new_endpoints_rx: parking_lot::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<NewEndpoint>>>,
}

/// An endpoint a route used for the first time, with its store queue.
pub type NewEndpoint = (Endpoint, Arc<EndpointHandle>);

#[derive(Debug, thiserror::Error)]
pub enum RoutesFileError {
    #[error("cannot read routes file {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("routes file {path} is not JSON: {source}")]
    Json {
        path: std::path::PathBuf,
        source: serde_json::Error,
    },
    #[error("routes file {path}: {message}")]
    Invalid {
        path: std::path::PathBuf,
        message: String,
    },
}

/// The route table of a deployment file: a whole manifest (with
/// `modulesContent.$edgeHub`), or just the `$edgeHub` desired properties.
/// Without a file: [`DEFAULT_ROUTE`] with [`DEFAULT_TTL_SECS`].
pub fn load_routes(path: Option<&Path>) -> Result<RouteTable, RoutesFileError> {
    let Some(path) = path else {
        let mut t =
            RouteTable::new(vec![edgehub_router::Route::parse("default", DEFAULT_ROUTE)
                .expect("default route parses")]);
        t.default_ttl_secs = Some(DEFAULT_TTL_SECS);
        return Ok(t);
    };
    let text = std::fs::read_to_string(path).map_err(|source| RoutesFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| RoutesFileError::Json {
            path: path.to_owned(),
            source,
        })?;
    routes_from_deployment(&doc).map_err(|message| RoutesFileError::Invalid {
        path: path.to_owned(),
        message,
    })
}

/// The route table of a deployment manifest (or of `$edgeHub` desired
/// properties alone); every route error, positioned, joined by "; ".
pub fn routes_from_deployment(doc: &serde_json::Value) -> Result<RouteTable, String> {
    let desired = crate::routes_cli::edge_hub_desired(doc);
    let mut table = RouteTable::from_edge_hub_desired(desired).map_err(|errors| {
        errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    if table.default_ttl_secs.is_none() {
        table.default_ttl_secs = Some(DEFAULT_TTL_SECS);
    }
    Ok(table)
}

impl Pipeline {
    pub fn new(store: Store, routes: RouteTable) -> Pipeline {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        Pipeline {
            new_endpoints: tx,
            new_endpoints_rx: parking_lot::Mutex::new(Some(rx)),
            store,
            routes: SharedRouteTable::new(routes),
            endpoints: DashMap::new(),
            metrics: Arc::default(),
            boot: rand::random(),
            next_id: AtomicU64::new(0),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn routes(&self) -> &SharedRouteTable {
        &self.routes
    }

    /// The store queue of `endpoint`.
    pub fn endpoint(&self, endpoint: &Endpoint) -> Result<Arc<EndpointHandle>, StoreError> {
        if let Some(h) = self.endpoints.get(endpoint) {
            return Ok(h.clone());
        }
        let h = self.store.endpoint(&endpoint.to_string())?;
        if self.endpoints.insert(endpoint.clone(), h.clone()).is_none() {
            let _ = self.new_endpoints.send((endpoint.clone(), h.clone()));
        }
        Ok(h)
    }

    /// Endpoints as they are first used (once; `None` after the first call).
    pub fn take_new_endpoints(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<NewEndpoint>> {
        self.new_endpoints_rx.lock().take()
    }

    /// Routes `msg` and submits it for storage. `Ok(None)`: no route took
    /// it, so it is counted and dropped (as IoT Edge does). Otherwise the
    /// future resolves once the message is durable, or says why it was
    /// refused.
    pub fn submit(
        &self,
        mut msg: Message,
    ) -> Result<Option<impl Future<Output = Result<u64, StoreError>> + Send + 'static>, StoreError>
    {
        self.metrics.received.fetch_add(1, Ordering::Relaxed);
        let decisions = self.routes.load().route(&msg);
        if decisions.is_empty() {
            self.metrics.unrouted.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        msg.set_system_named("edgeMessageId", &format!("{:016x}{n:016x}", self.boot));
        let now = self.store.now_ms();
        let mut targets = Vec::with_capacity(decisions.len());
        for d in decisions {
            // 0 means "no expiry" to the store as in the deployment.
            let expires_at_ms = match d.time_to_live_secs {
                Some(0) | None => 0,
                Some(s) => now + s as u64 * 1000,
            };
            let endpoint = self.endpoint(&d.endpoint)?;
            targets.push(Target::new(
                &endpoint,
                priority_slot(d.priority),
                expires_at_ms,
            ));
        }
        let append = Append::new(Arc::new(msg), targets);
        let (store, metrics) = (self.store.clone(), self.metrics.clone());
        Ok(Some(async move {
            let r = store.append(append).await;
            metrics.record_outcome(&r);
            r
        }))
    }

    /// Prometheus text exposition of the message counters.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let m = &self.metrics;
        let s = self.store.stats();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut counter = |name: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        counter(
            "edgehub_messages_received_total",
            "IoT Hub messages received from devices and modules.",
            &[("", load(&m.received))],
        );
        counter(
            "edgehub_messages_stored_total",
            "Messages committed to the store.",
            &[("", load(&s.appended))],
        );
        counter(
            "edgehub_messages_delivered_total",
            "Queue entries removed because their endpoint acknowledged them.",
            &[("", load(&s.delivered))],
        );
        counter(
            "edgehub_messages_dropped_total",
            "Messages not kept, by reason.",
            &[
                ("{reason=\"no_route\"}", load(&m.unrouted)),
                ("{reason=\"ttl_expiry\"}", load(&s.expired)),
                ("{reason=\"quota_exceeded\"}", load(&m.refused_quota)),
                ("{reason=\"store_error\"}", load(&m.store_errors)),
            ],
        );
        let _ = writeln!(
            out,
            "# HELP edgehub_queue_length Messages waiting per endpoint and priority (10: schema 1.0 routes).\n# TYPE edgehub_queue_length gauge"
        );
        let mut session_messages = 0u64;
        for ep in self.store.endpoints() {
            if ep.name().starts_with("session:") {
                // One queue per persistent MQTT session: summed below, not
                // one series per client id.
                session_messages += (0..=edgehub_store::LOWEST_PRIORITY)
                    .map(|p| ep.queue_length(p))
                    .sum::<u64>();
                continue;
            }
            let name = ep.name().replace('\\', "\\\\").replace('"', "\\\"");
            for p in 0..=edgehub_store::LOWEST_PRIORITY {
                let n = ep.queue_length(p);
                // Queues never used stay out of the exposition.
                if n > 0 || ep.checkpoint(p) > 0 {
                    let _ = writeln!(
                        out,
                        "edgehub_queue_length{{endpoint=\"{name}\",priority=\"{p}\"}} {n}"
                    );
                }
            }
        }
        let _ = writeln!(
            out,
            "# HELP edgehub_session_queue_length Messages stored for persistent MQTT sessions, all sessions together.\n# TYPE edgehub_session_queue_length gauge\nedgehub_session_queue_length {session_messages}"
        );
        let _ = writeln!(
            out,
            "# HELP edgehub_store_bytes Bytes of messages held, as counted against --store-max-bytes.\n# TYPE edgehub_store_bytes gauge\nedgehub_store_bytes {}",
            self.store.live_bytes()
        );
    }
}

/// An identity's PUBLISH on its telemetry topic as the IoT Hub message
/// (property bag parsed; the device layer stamps identity and
/// `enqueuedTime` when it accepts it). IoT Hub keeps no retained messages;
/// a set retain flag becomes the application property `mqtt-retain=true`.
pub fn iothub_telemetry(
    identity: &str,
    topic: &str,
    payload: bytes::Bytes,
    retain: bool,
) -> Result<Message, crate::iothub::telemetry::TelemetryError> {
    let mut msg = crate::iothub::telemetry::parse_telemetry(identity, topic, payload)?;
    if retain {
        msg.set_property("mqtt-retain", "true");
    }
    Ok(msg)
}

/// IoT Hub wills: a device's will on its telemetry topic is sent as
/// telemetry (routed and stored like any message), marked with the
/// application property `iothub-MessageType=Will`, as IoT Hub does.
pub struct WillsAsTelemetry(pub Arc<edgehub_device::DeviceLayer>);

impl edgehub_broker::WillSink for WillsAsTelemetry {
    fn take(&self, w: &edgehub_broker::session::PendingWill) -> bool {
        if w.principal.anonymous {
            return false;
        }
        let parsed = iothub_telemetry(
            &w.principal.name,
            &w.will.topic,
            w.will.payload.clone(),
            w.will.retain,
        );
        let mut msg = match parsed {
            Err(crate::iothub::telemetry::TelemetryError::NotTelemetry(_)) => return false,
            Err(e) => {
                tracing::info!(identity = %w.principal.name, error = %e, "will not sent");
                return true;
            }
            Ok(m) => m,
        };
        msg.set_property("iothub-MessageType", "Will");
        let who = w.principal.name.clone();
        match self.0.send_telemetry(&who, msg) {
            Ok(Some(stored)) => {
                tokio::spawn(async move {
                    if let Err(e) = stored.await {
                        tracing::warn!(identity = %who, error = %e, "will not stored");
                    }
                });
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(identity = %who, error = %e, "will not stored"),
        }
        true
    }
}
