//! The hub put together: opens the store, the identity registry and the
//! routes, wires the broker, the device layer, the endpoint executors, the
//! upstream link and the management API, binds the listeners (see
//! `transport`) with their protocol heads, and shuts down gracefully:
//! every connection is told to close, and the hub waits briefly for them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::config::{Config, DurabilityArg};
use crate::pipeline::Pipeline;
use crate::tls;
use edgehub_broker::Broker;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create data dir {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Identities(#[from] edgehub_device::IdentityError),
    #[error("cannot open the message store in {path}: {source}")]
    Store {
        path: std::path::PathBuf,
        source: edgehub_store::StoreError,
    },
    #[error(transparent)]
    Routes(#[from] crate::pipeline::RoutesFileError),
    #[error("management token file: {0}")]
    Token(std::io::Error),
    #[error("identity registry: {0}")]
    Registry(String),
    #[error("{0}")]
    Config(String),
    #[error("the stored deployment no longer loads ({0}); PUT a new one or start with --routes")]
    StoredDeployment(String),
    #[error(transparent)]
    Upstream(#[from] crate::upstream::UpstreamConfigError),
    #[error(transparent)]
    TrustBundle(#[from] edgehub_device::x509::TrustBundleError),
}

pub struct Server {
    broker: Arc<Broker>,
    identities: Arc<edgehub_device::identity::Identities>,
    gateway_hostname: String,
    /// `--device-id`: this edge device (its `$edgeAgent` gets deployments).
    edge_device: Option<String>,
    pipeline: Arc<Pipeline>,
    iothub: Arc<crate::iothub::IotHub>,
    upstream: Option<Arc<crate::upstream::UpstreamConfig>>,
    upstream_status: Arc<crate::upstream::UpstreamStatus>,
    management: Option<TcpListener>,
    management_token: String,
    c2d_max_delivery_count: u32,
    mqtt: Option<TcpListener>,
    mqtts: Option<(TcpListener, TlsAcceptor)>,
    amqps: Option<(TcpListener, TlsAcceptor)>,
    wss: Option<(TcpListener, TlsAcceptor)>,
    ws: Option<TcpListener>,
    quic: Option<edgehub_streams::quic::quinn::Endpoint>,
    amqp: Arc<edgehub_amqp::AmqpHub>,
    shutdown: watch::Sender<bool>,
}

/// What the `$upstream` executor needs when it starts.
struct UpstreamLink {
    cfg: Arc<crate::upstream::UpstreamConfig>,
    status: Arc<crate::upstream::UpstreamStatus>,
    relay: Arc<dyn crate::upstream::CloudToEdge>,
    events: parking_lot::Mutex<
        Option<tokio::sync::mpsc::UnboundedReceiver<crate::upstream::UpstreamEvent>>,
    >,
}

/// Retained messages in the store's `retained` table (unsynced writes: a
/// retained update survives a crash of edgehub, not a power cut).
struct StoreRetained(edgehub_store::Store);

impl edgehub_broker::RetainedStore for StoreRetained {
    fn save(&self, topic: &str, record: &[u8]) {
        if let Err(e) =
            self.0
                .put_buffered(edgehub_store::Table::Retained, topic.as_bytes(), record)
        {
            warn!(topic, error = %e, "retained message not persisted");
        }
    }

    fn remove(&self, topic: &str) {
        if let Err(e) = self
            .0
            .delete_buffered(edgehub_store::Table::Retained, topic.as_bytes())
        {
            warn!(topic, error = %e, "retained message removal not persisted");
        }
    }
}

/// Persistent sessions in the store's `sessions` table (unsynced writes,
/// like retained messages).
struct StoreTable(edgehub_store::Store, edgehub_store::Table);

impl edgehub_broker::SessionStore for StoreTable {
    fn save(&self, client_id: &str, record: &[u8]) {
        if let Err(e) = self.0.put_buffered(self.1, client_id.as_bytes(), record) {
            warn!(client = client_id, error = %e, "session not persisted");
        }
    }

    fn remove(&self, client_id: &str) {
        if let Err(e) = self.0.delete_buffered(self.1, client_id.as_bytes()) {
            warn!(client = client_id, error = %e, "session removal not persisted");
        }
    }
}

/// Messages for persistent sessions in the store: one queue per session
/// (`session:{client id}`), each message's record stored once whatever the
/// fan-out, committed by the store's group commit with its durability
/// (`--durability`), like telemetry. A record goes when the subscriber has
/// the message, or with its session.
struct StoreSessionQueues {
    store: edgehub_store::Store,
    /// Refusals count with the telemetry pipeline's.
    metrics: Arc<crate::pipeline::Metrics>,
    handles: dashmap::DashMap<String, Arc<edgehub_store::EndpointHandle>>,
}

impl StoreSessionQueues {
    fn handle(
        &self,
        session: &str,
    ) -> Result<Arc<edgehub_store::EndpointHandle>, edgehub_store::StoreError> {
        if let Some(h) = self.handles.get(session) {
            return Ok(h.clone());
        }
        let h = self.store.endpoint(&format!("session:{session}"))?;
        self.handles.insert(session.to_owned(), h.clone());
        Ok(h)
    }

    fn records(&self, session: &str) -> Vec<edgehub_store::Entry> {
        match self
            .handle(session)
            .and_then(|h| self.store.peek(&h, usize::MAX))
        {
            Ok(entries) => entries,
            Err(e) => {
                warn!(client = session, error = %e, "queued messages of a session not readable");
                Vec::new()
            }
        }
    }
}

impl edgehub_broker::SessionQueueStore for StoreSessionQueues {
    fn append(
        &self,
        msg: &edgehub_broker::session::Message,
        sessions: &[Arc<str>],
    ) -> edgehub_broker::BoxFuture<Result<u64, edgehub_broker::QueueStoreError>> {
        let expires_at_ms = msg.expires_at.map_or(0, |t| {
            let left = t.saturating_duration_since(std::time::Instant::now());
            self.store.now_ms() + (left.as_millis() as u64).max(1)
        });
        let targets: Result<Vec<_>, _> = sessions
            .iter()
            .map(|s| {
                self.handle(s)
                    .map(|h| edgehub_store::Target::new(&h, 0, expires_at_ms))
            })
            .collect();
        let record = edgehub_broker::message_record(msg, msg.retain);
        let (store, metrics) = (self.store.clone(), self.metrics.clone());
        Box::pin(async move {
            let message = edgehub_router::Message::new(bytes::Bytes::from(record));
            let r = match targets {
                Ok(t) => {
                    store
                        .append(edgehub_store::Append::new(Arc::new(message), t))
                        .await
                }
                Err(e) => Err(e),
            };
            metrics.record_outcome(&r);
            r.map_err(|e| edgehub_broker::QueueStoreError(Box::new(e)))
        })
    }

    fn ack(&self, session: &str, token: u64) {
        if let Err(e) = self
            .handle(session)
            .and_then(|h| self.store.ack_seqs(&h, &[(0, token)]))
        {
            warn!(client = session, error = %e, "delivered message not removed from the store");
        }
    }

    fn load(&self, session: &str) -> Vec<(u64, edgehub_broker::session::Message)> {
        self.records(session)
            .into_iter()
            .filter_map(|e| {
                edgehub_broker::parse_message_record(&e.message.body).map(|m| (e.seq, m))
            })
            .collect()
    }

    fn forget(&self, session: &str) {
        let entries = self.records(session);
        if entries.is_empty() {
            return;
        }
        if let Err(e) = self
            .handle(session)
            .and_then(|h| self.store.ack(&h, &entries))
        {
            warn!(client = session, error = %e, "queued messages of an ended session not removed");
        }
    }
}

impl Server {
    /// Prepares the data dir and TLS material and binds the listeners.
    pub async fn bind(config: &Config) -> Result<Server, ServerError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| ServerError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let (cert, key) = match (&config.tls_cert, &config.tls_key) {
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            _ => {
                let pki = tls::ensure_dev_pki(&config.data_dir, &config.hostname())?;
                (pki.server_cert, pki.server_key)
            }
        };
        let tls_config = tls::server_config(&cert, &key)?;
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { addr, source })
        };
        let mqtts = (
            bind(config.mqtts_listen).await?,
            TlsAcceptor::from(tls_config.clone()),
        );
        let amqps = (
            bind(config.amqps_listen).await?,
            TlsAcceptor::from(tls_config.clone()),
        );
        let wss = match config.wss_listen.0 {
            None => None,
            Some(addr) => match TcpListener::bind(addr).await {
                Ok(l) => Some((l, TlsAcceptor::from(tls_config.clone()))),
                // Devices' SDKs dial 443 and nothing else, so the default
                // stays; where it cannot be had the rest still serves.
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    warn!(
                        %addr,
                        "MQTT/AMQP over WebSocket is off: no permission to bind {addr} \
                         (run as root, grant it with `setcap cap_net_bind_service=+ep` on \
                         the edgehub binary, or choose a port with --wss-listen)"
                    );
                    None
                }
                Err(source) => return Err(ServerError::Bind { addr, source }),
            },
        };
        let ws = match config.ws_listen {
            Some(a) => Some(bind(a).await?),
            None => None,
        };
        let quic = match config.quic_listen.0 {
            None => None,
            Some(addr) => {
                let cfg = edgehub_streams::quic::server_config((*tls_config).clone())
                    .map_err(|e| ServerError::Config(e.to_string()))?;
                Some(
                    edgehub_streams::quic::quinn::Endpoint::server(cfg, addr)
                        .map_err(|source| ServerError::Bind { addr, source })?,
                )
            }
        };
        let mqtt = match config.mqtt_listen {
            Some(a) => Some(bind(a).await?),
            None => None,
        };
        let management = bind(config.management_listen).await?;
        let management_token = match &config.management_token {
            Some(t) => t.clone(),
            None => {
                crate::management::ensure_token(&config.data_dir).map_err(ServerError::Token)?
            }
        };
        let mut routes = crate::pipeline::load_routes(config.routes.as_deref())?;
        let mut store_cfg = edgehub_store::StoreConfig::new(config.data_dir.join("store"));
        store_cfg.durability = match config.durability {
            DurabilityArg::Fsync => edgehub_store::Durability::Fsync,
            DurabilityArg::OsBuffered => edgehub_store::Durability::OsBuffered,
        };
        store_cfg.max_bytes = config.store_max_bytes;
        store_cfg.min_free_disk_bytes = config.store_min_free_disk;
        let store_path = store_cfg.path.clone();
        let store = tokio::task::spawn_blocking(move || edgehub_store::Store::open(store_cfg))
            .await
            .expect("store open task")
            .map_err(|source| ServerError::Store {
                path: store_path,
                source,
            })?;
        info!(
            durability = ?config.durability,
            max_bytes = ?config.store_max_bytes,
            stored_bytes = store.live_bytes(),
            "store open"
        );
        let retained = store
            .scan(edgehub_store::Table::Retained)
            .map_err(|source| ServerError::Store {
                path: config.data_dir.join("store"),
                source,
            })?;
        // The deployment: a --routes file is configuration and wins (and is
        // kept as the current deployment); otherwise the last one PUT
        // through the management API; otherwise the default route.
        let store_err = |source| ServerError::Store {
            path: config.data_dir.join("store"),
            source,
        };
        match &config.routes {
            Some(path) => {
                let text = std::fs::read(path).unwrap_or_default();
                store
                    .put(
                        edgehub_store::Table::Config,
                        crate::management::DEPLOYMENT_KEY,
                        &text,
                    )
                    .map_err(store_err)?;
            }
            None => {
                if let Some(raw) = store
                    .get(
                        edgehub_store::Table::Config,
                        crate::management::DEPLOYMENT_KEY,
                    )
                    .map_err(store_err)?
                {
                    let doc: serde_json::Value = serde_json::from_slice(&raw)
                        .map_err(|e| ServerError::StoredDeployment(e.to_string()))?;
                    routes = crate::pipeline::routes_from_deployment(&doc)
                        .map_err(ServerError::StoredDeployment)?;
                    info!("deployment restored from the store");
                }
            }
        }
        info!(routes = routes.routes().len(), "routes loaded");
        let retained_store = Arc::new(StoreRetained(store.clone()));
        let seed = match &config.identities {
            Some(path) => Some(edgehub_device::Registry::load(path)?),
            None => None,
        };
        let identities = Arc::new(
            edgehub_device::identity::Identities::open(store.clone(), seed)
                .map_err(|e| ServerError::Registry(e.to_string()))?,
        );
        let pipeline = Arc::new(Pipeline::new(store, routes));
        let edge = config.edge_device().map_err(ServerError::Config)?;
        if let Some(e) = &edge {
            edgehub_device::identity::ensure_edge_device(&identities, &e.id, e.key.as_deref())
                .map_err(|e| ServerError::Registry(e.to_string()))?;
        }
        let edge_id = edge.as_ref().map(|e| e.id.clone());
        let devices = identities.registry().len();
        info!(devices, "IoT Hub identities loaded");
        if config.allow_anonymous {
            warn!(
                "--allow-anonymous: clients without credentials may connect; while no identity exists they may use any topic, otherwise only non-IoT Hub topics"
            );
        }
        let mut auth = crate::iothub::IotHubAuth::new(
            identities.clone(),
            &config.hostname(),
            config.allow_anonymous,
        )
        .with_own_device(edge_id.clone());
        if let Some(path) = &config.trust_bundle {
            auth = auth.with_trust_bundle(edgehub_device::x509::TrustBundle::load(path)?);
        }
        let auth = Arc::new(auth);
        let broker = Broker::new(config.broker_limits(), auth.clone(), auth);
        let retained: Vec<(String, Vec<u8>)> = retained
            .into_iter()
            .filter_map(|(k, v)| String::from_utf8(k).ok().map(|k| (k, v)))
            .collect();
        broker.persist_retained(retained_store, retained);
        let sessions: Vec<(String, Vec<u8>)> = pipeline
            .store()
            .scan(edgehub_store::Table::Sessions)
            .map_err(|source| ServerError::Store {
                path: config.data_dir.join("store"),
                source,
            })?
            .into_iter()
            .filter_map(|(k, v)| String::from_utf8(k).ok().map(|k| (k, v)))
            .collect();
        broker.set_session_queue_store(Arc::new(StoreSessionQueues {
            store: pipeline.store().clone(),
            metrics: pipeline.metrics.clone(),
            handles: Default::default(),
        }));
        broker.persist_sessions(
            Arc::new(StoreTable(
                pipeline.store().clone(),
                edgehub_store::Table::Sessions,
            )),
            sessions,
        );
        // Queues of sessions that no longer exist (expired while the hub
        // was down, or the crash fell between the two writes).
        for h in pipeline.store().endpoints() {
            if let Some(client) = h.name().strip_prefix("session:") {
                if !broker.has_session(client) {
                    let entries = pipeline.store().peek(&h, usize::MAX).unwrap_or_default();
                    let _ = pipeline.store().ack(&h, &entries);
                }
            }
        }
        if broker.session_count() > 0 {
            info!(
                count = broker.session_count(),
                "persistent sessions restored (offline)"
            );
        }
        if broker.retained_count() > 0 {
            info!(
                count = broker.retained_count(),
                "retained messages restored"
            );
        }
        let twins = Arc::new(edgehub_device::twin::Twins::new(pipeline.store().clone()));
        let devices = edgehub_device::DeviceLayer::new(twins);
        devices.set_telemetry_sink(pipeline.clone());
        broker.set_will_sink(Arc::new(crate::pipeline::WillsAsTelemetry(devices.clone())));
        let deliveries = crate::iothub::deliveries::MqttDeliveries::new(broker.clone());
        devices.links.set_fallback(deliveries.clone());
        let mut verdicts =
            edgehub_device::auth::Authentication::new(identities.clone(), &config.hostname())
                .with_own_device(edge_id.clone());
        if let Some(path) = &config.trust_bundle {
            verdicts = verdicts.with_trust_bundle(edgehub_device::x509::TrustBundle::load(path)?);
        }
        let amqp = Arc::new(edgehub_amqp::AmqpHub::new(
            devices.clone(),
            Arc::new(verdicts),
        ));
        let iothub = Arc::new(crate::iothub::IotHub {
            layer: devices,
            deliveries,
        });
        let upstream = match &config.upstream {
            Some(url) => {
                let auth = match config.upstream_auth {
                    crate::config::UpstreamAuthArg::Identity => {
                        crate::upstream::UpstreamAuth::Identity
                    }
                    crate::config::UpstreamAuthArg::Chain => {
                        let Some(e) = edge.as_ref().filter(|e| e.key.is_some()) else {
                            return Err(ServerError::Config(
                                "--upstream-auth chain signs with this edge device's key: give --connection-string".into(),
                            ));
                        };
                        crate::upstream::UpstreamAuth::Chain {
                            device: e.id.clone(),
                            parent: config.parent_device_id.clone(),
                        }
                    }
                };
                let hostname = config
                    .iothub_hostname
                    .clone()
                    .or_else(|| edge.as_ref().and_then(|e| e.iothub_hostname.clone()));
                Some(Arc::new(
                    crate::upstream::UpstreamConfig::new(
                        url,
                        config.upstream_protocol.map(|p| match p {
                            crate::config::UpstreamProtocolArg::Mqtt => {
                                crate::upstream::UpstreamProtocol::Mqtt
                            }
                            crate::config::UpstreamProtocolArg::Amqp => {
                                crate::upstream::UpstreamProtocol::Amqp
                            }
                        }),
                        config.upstream_ca.as_deref(),
                        hostname.as_deref(),
                    )?
                    .with_auth(auth),
                ))
            }
            None => None,
        };
        Ok(Server {
            broker,
            iothub,
            upstream,
            upstream_status: Arc::default(),
            identities,
            gateway_hostname: config.hostname(),
            edge_device: edge_id.clone(),
            pipeline,
            management: Some(management),
            management_token,
            c2d_max_delivery_count: config.c2d_max_delivery_count,
            mqtt,
            mqtts: Some(mqtts),
            amqps: Some(amqps),
            wss,
            ws,
            quic,
            amqp,
            shutdown: watch::channel(false).0,
        })
    }

    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    pub fn pipeline(&self) -> &Arc<Pipeline> {
        &self.pipeline
    }

    pub fn management_addr(&self) -> Option<SocketAddr> {
        self.management.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn mqtt_addr(&self) -> Option<SocketAddr> {
        self.mqtt.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn amqps_addr(&self) -> Option<SocketAddr> {
        self.amqps.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Every bound listener by name (`mqtt`, `mqtts`, `management`,
    /// `amqps`, `wss`, `ws`, `quic`) with its address.
    pub fn listen_addrs(&self) -> Vec<(&'static str, SocketAddr)> {
        [
            ("mqtt", self.mqtt_addr()),
            ("mqtts", self.mqtts_addr()),
            ("management", self.management_addr()),
            ("amqps", self.amqps_addr()),
            ("wss", self.wss_addr()),
            ("ws", self.ws_addr()),
            ("quic", self.quic_addr()),
        ]
        .into_iter()
        .filter_map(|(name, a)| Some((name, a?)))
        .collect()
    }

    pub fn wss_addr(&self) -> Option<SocketAddr> {
        self.wss.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    pub fn ws_addr(&self) -> Option<SocketAddr> {
        self.ws.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.quic.as_ref().and_then(|e| e.local_addr().ok())
    }

    pub fn mqtts_addr(&self) -> Option<SocketAddr> {
        self.mqtts.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Serves until `stop` completes, then closes every connection (MQTT 5
    /// clients get DISCONNECT 0x8B) and waits up to five seconds for them.
    pub async fn run(mut self, stop: impl std::future::Future<Output = ()>) {
        let tracker = Arc::new(crate::transport::Tracker::default());
        let mut accept_tasks = Vec::new();
        let c2d = Arc::new(crate::endpoints::C2dExecutors::new(
            self.iothub.layer.links.clone(),
            self.pipeline.store().clone(),
            self.shutdown.subscribe(),
            self.c2d_max_delivery_count,
        ));
        c2d.resume();
        // Presence (the device layer keeps it for twins); with an upstream,
        // also what keeps the identities' cloud connections open.
        let mut upstream_events = self
            .upstream
            .is_some()
            .then(tokio::sync::mpsc::unbounded_channel::<crate::upstream::UpstreamEvent>);
        if let Some((tx, _)) = &upstream_events {
            let tx = tx.clone();
            self.iothub
                .layer
                .links
                .set_presence_hook(Box::new(move |id, online| {
                    let _ = tx.send(crate::upstream::UpstreamEvent::Presence(
                        id.to_owned(),
                        online,
                    ));
                }));
        }
        if let Some(l) = self.management.take() {
            let app = crate::management::router(Arc::new(crate::management::Management {
                c2d: c2d.clone(),
                devices: self.iothub.layer.clone(),
                upstream: self
                    .upstream
                    .is_some()
                    .then(|| self.upstream_status.clone()),
                pipeline: self.pipeline.clone(),
                broker: self.broker.clone(),
                identities: self.identities.clone(),
                gateway_hostname: self.gateway_hostname.clone(),
                edge_device: self.edge_device.clone(),
                token: self.management_token.clone(),
            }));
            accept_tasks.push(tokio::spawn(async move {
                if let Err(e) = axum::serve(l, app).await {
                    warn!(error = %e, "management API stopped");
                }
            }));
        }
        // Cloud to edge: presence and reported-property changes reach the
        // upstream link, which hands what comes down to the relay.
        let upstream = self.upstream.clone().map(|cfg| {
            use crate::upstream::UpstreamEvent;
            let (tx, rx) = upstream_events.take().expect("one upstream link");
            let tx2 = tx.clone();
            self.iothub.layer.set_reported_hook(Box::new(move |id| {
                let _ = tx2.send(UpstreamEvent::Reported(id.to_owned()));
            }));
            let relay: Arc<dyn crate::upstream::CloudToEdge> = Arc::new(crate::relay::Relay {
                devices: self.iothub.layer.clone(),
                c2d: c2d.clone(),
            });
            UpstreamLink {
                cfg,
                status: self.upstream_status.clone(),
                relay,
                events: parking_lot::Mutex::new(Some(rx)),
            }
        });
        let has_upstream = upstream.is_some();
        if let Some(rx) = self.pipeline.take_new_endpoints() {
            accept_tasks.push(tokio::spawn(supervise_endpoints(
                self.iothub.layer.links.clone(),
                self.pipeline.clone(),
                self.identities.clone(),
                upstream,
                rx,
                self.shutdown.subscribe(),
            )));
        }
        if has_upstream {
            // Started now, not with the first message: devices that only
            // listen (C2D, methods, desired properties) need the link too.
            if let Err(e) = self.pipeline.endpoint(&edgehub_router::Endpoint::Upstream) {
                warn!(error = %e, "upstream queue not opened");
            }
        }
        let mqtt_head: Arc<dyn crate::transport::Head> = Arc::new(crate::connection::MqttHead {
            broker: self.broker.clone(),
            iothub: Some(self.iothub.clone()),
        });
        let handshake_timeout = self.broker.limits.connect_timeout;
        let amqp_head: Arc<dyn crate::transport::Head> =
            Arc::new(crate::amqp::AmqpHead(self.amqp.clone()));
        let ws_head: Arc<dyn crate::transport::Head> = Arc::new(crate::transport::WebSocketHead {
            mqtt: mqtt_head.clone(),
            amqp: amqp_head.clone(),
            timeout: handshake_timeout,
            // A message may gather several packets.
            max_message: (self.broker.limits.max_packet_size as usize)
                .saturating_mul(4)
                .max(1 << 20),
        });
        let listeners = [
            self.mqtt.take().map(|t| (t, None, &mqtt_head)),
            self.mqtts.take().map(|(t, a)| (t, Some(a), &mqtt_head)),
            self.amqps.take().map(|(t, a)| (t, Some(a), &amqp_head)),
            self.wss.take().map(|(t, a)| (t, Some(a), &ws_head)),
            self.ws.take().map(|t| (t, None, &ws_head)),
        ];
        for (tcp, tls, head) in listeners.into_iter().flatten() {
            let listener = crate::transport::Listener {
                tcp,
                tls,
                handshake_timeout,
            };
            accept_tasks.push(tokio::spawn(listener.run(
                head.clone(),
                self.shutdown.subscribe(),
                tracker.clone(),
            )));
        }
        let quic = self.quic.take();
        if let Some(endpoint) = quic.clone() {
            let listener = crate::transport::QuicListener {
                endpoint,
                handshake_timeout,
            };
            accept_tasks.push(tokio::spawn(listener.run(
                mqtt_head.clone(),
                self.shutdown.subscribe(),
                tracker.clone(),
            )));
        }
        stop.await;
        info!("shutting down");
        let _ = self.shutdown.send(true);
        for t in accept_tasks {
            t.abort();
        }
        let wait = tracker.idle();
        if tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .is_err()
        {
            warn!(
                open = tracker.live(),
                "connections still open after 5 s; exiting anyway"
            );
        }
        if let Some(endpoint) = quic {
            // Closed QUIC streams linger until the peer has their last
            // bytes; then the close itself has to reach the peers.
            let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
            endpoint.close(0u32.into(), b"shutting down");
        }
    }
}

/// Starts an executor for every module endpoint: those already in the store
/// (a backlog from before a restart) and each new one as routes first use it.
async fn supervise_endpoints(
    links: Arc<edgehub_device::link::Links>,
    pipeline: Arc<Pipeline>,
    identities: Arc<edgehub_device::identity::Identities>,
    upstream: Option<UpstreamLink>,
    mut new: tokio::sync::mpsc::UnboundedReceiver<crate::pipeline::NewEndpoint>,
    shutdown: watch::Receiver<bool>,
) {
    use edgehub_router::Endpoint;
    let start = |ep: Endpoint, handle: Arc<edgehub_store::EndpointHandle>| {
        let (module, input) = match ep {
            Endpoint::ModuleInput { module, input } => (module, input),
            Endpoint::Upstream => {
                // Without an upstream the queue is the outbox.
                if let Some(link) = &upstream {
                    let events = link
                        .events
                        .lock()
                        .take()
                        .unwrap_or_else(|| tokio::sync::mpsc::unbounded_channel().1);
                    tokio::spawn(crate::upstream::run(
                        pipeline.store().clone(),
                        handle,
                        identities.clone(),
                        link.cfg.clone(),
                        link.status.clone(),
                        Some(link.relay.clone()),
                        events,
                        shutdown.clone(),
                    ));
                }
                return;
            }
        };
        match identities.registry().module_owner(&module) {
            Some((device, module)) => {
                tokio::spawn(crate::endpoints::run_module_endpoint(
                    links.clone(),
                    pipeline.store().clone(),
                    handle,
                    device,
                    module,
                    input.to_string(),
                    shutdown.clone(),
                ));
            }
            None => {
                warn!(
                    endpoint = handle.name(),
                    "no registered identity has module {module:?}: its messages stay stored until it exists or they expire"
                );
                // Identities can be added at run time: look again.
                let (links, store, identities, mut shutdown) = (
                    links.clone(),
                    pipeline.store().clone(),
                    identities.clone(),
                    shutdown.clone(),
                );
                tokio::spawn(async move {
                    let owner = loop {
                        if let Some(o) = identities.registry().module_owner(&module) {
                            break o;
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                            _ = shutdown.changed() => return,
                        }
                    };
                    crate::endpoints::run_module_endpoint(
                        links,
                        store,
                        handle,
                        owner.0,
                        owner.1,
                        input.to_string(),
                        shutdown,
                    )
                    .await;
                });
            }
        }
    };
    for handle in pipeline.store().endpoints() {
        if let Some(ep) = crate::endpoints::parse_endpoint_name(handle.name()) {
            // Announced through `new` like any endpoint seen for the first time.
            let _ = pipeline.endpoint(&ep);
        }
    }
    let mut started: std::collections::HashSet<String> = Default::default();
    while let Some((ep, handle)) = new.recv().await {
        if started.insert(handle.name().to_owned()) {
            start(ep, handle);
        }
    }
}
