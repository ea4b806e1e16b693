//! The upstream link: the `$upstream` endpoint's executor, forwarding what
//! the store holds to Azure IoT Hub's MQTT endpoint or to a parent edgehub.
//!
//! Messages keep the identity they came from: each downstream device or
//! module gets its own MQTT connection upstream (as IoT Hub requires over
//! MQTT), authenticated with a SAS token signed with that identity's own key
//! from our registry. Per identity, messages go in store order with a window
//! of several PUBLISHes in flight; a message leaves the store only on the
//! upstream PUBACK. While the parent is unreachable or refuses, nothing is
//! lost: messages stay stored (bounded by the disk budget and their TTL) and
//! connection attempts back off exponentially with jitter, the delay shared
//! by every identity, so a failing parent never sees a reconnect storm.
//! Connections of identities that stay idle are closed.
//!
//! Cloud to edge: while a downstream identity is connected here, its
//! upstream connection stays open and subscribed to its C2D messages,
//! desired-property patches and direct methods, which are handed to the
//! local layers ([`CloudToEdge`]); on every (re)connect the twin is read
//! from upstream (our copy is the cache devices read, also while offline)
//! and the reported properties accepted locally meanwhile are sent up.
//!
//! Owns: upstream connections, their windows and backoff. Must not touch:
//! routing (done before the store) or downstream sessions.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use edgehub_codec::{Connect, Packet, Props, Protocol, Publish, QoS, Str};
use edgehub_mqtt_client::{dial, Client, ClientError};
use edgehub_router::{Message, SystemProperty};
use edgehub_store::{EndpointHandle, Entry, Store};
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use edgehub_device::identity::Identities;

pub type BoxFut<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// The local layers, for what comes down from the parent.
pub trait CloudToEdge: Send + Sync + 'static {
    /// A cloud-to-device message for `device`; resolves once durably queued
    /// (only then is it acknowledged upstream).
    fn c2d(&self, device: &str, msg: Message) -> BoxFut<Result<(), String>>;
    /// The desired properties as the parent has them (its answer to a GET).
    fn adopt_desired(&self, identity: &str, desired: serde_json::Map<String, serde_json::Value>);
    /// A desired-properties patch from the parent (with its `$version`).
    fn desired_patch(&self, identity: &str, patch: serde_json::Map<String, serde_json::Value>);
    /// A direct method call; resolves to the device's (status, payload).
    fn method(&self, identity: &str, name: &str, payload: Bytes) -> BoxFut<(i32, Bytes)>;
    /// The reported properties the parent has not acknowledged: the patch
    /// and the snapshot to record once it has.
    fn reported_to_sync(
        &self,
        identity: &str,
    ) -> BoxFut<
        Option<(
            serde_json::Value,
            serde_json::Map<String, serde_json::Value>,
        )>,
    >;
    fn reported_synced(&self, identity: &str, snapshot: serde_json::Map<String, serde_json::Value>);
}

/// What the layers below tell the link.
#[derive(Debug)]
pub enum UpstreamEvent {
    /// A client id connected (`true`) or left (`false`).
    Presence(String, bool),
    /// An identity's reported properties changed locally.
    Reported(String),
}

/// What an identity's worker is told besides its messages: on a channel of
/// its own, read even while the window is full, so a device arriving or
/// leaving is acted on during a long backlog drain too.
enum Control {
    Online(bool),
    Reported,
}

/// The two ways into an identity's worker.
struct WorkerTx {
    entries: mpsc::UnboundedSender<Entry>,
    control: mpsc::UnboundedSender<Control>,
}

/// PUBLISHes in flight per upstream connection.
pub const WINDOW: usize = 16;
/// Messages handed to identity workers and not yet acknowledged upstream:
/// bounds memory whatever the backlog.
const OUTSTANDING: usize = 2048;
/// An identity's connection closes after this long without messages.
const IDLE_CLOSE: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Lifetime of the tokens we sign for upstream connections.
const TOKEN_TTL_SECS: u64 = 3600;
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Retry delay for an identity we cannot forward (no key, unregistered).
const LOCAL_RETRY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum UpstreamConfigError {
    #[error("--upstream {0:?}: expected mqtts://host:port")]
    Url(String),
    #[error("--upstream-ca {path}: {detail}")]
    Ca { path: String, detail: String },
    #[error("upstream TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// Where and how to reach the parent.
pub struct UpstreamConfig {
    pub host: String,
    pub port: u16,
    tls: tokio_rustls::TlsConnector,
    /// The host name tokens and usernames name (the IoT Hub's, or the
    /// parent edgehub's `--hostname`).
    pub iothub_hostname: String,
    pub auth: UpstreamAuth,
}

/// How each identity's upstream connection authenticates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamAuth {
    /// A token signed with the identity's own key (Azure IoT Hub's way; the
    /// parent must know every key).
    Identity,
    /// IoT Edge's nested scheme: `auth-chain=leaf;device[;parent]` in the
    /// username and a token of this edge `device` (its own key), so the
    /// parent needs no leaf keys, only the leaves registered under us.
    Chain {
        device: String,
        parent: Option<String>,
    },
}

impl UpstreamConfig {
    /// `mqtts://host:port` (port 8883 when left out); the parent's
    /// certificate must chain to a CA in `ca` (PEM). Without `ca` no root is
    /// trusted, so every handshake fails with a clear "UnknownIssuer".
    /// `iothub_hostname` defaults to the URL's host.
    pub fn new(
        url: &str,
        ca: Option<&Path>,
        iothub_hostname: Option<&str>,
    ) -> Result<UpstreamConfig, UpstreamConfigError> {
        let rest = url
            .strip_prefix("mqtts://")
            .ok_or_else(|| UpstreamConfigError::Url(url.into()))?
            .trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse()
                    .map_err(|_| UpstreamConfigError::Url(url.into()))?,
            ),
            None => (rest, 8883),
        };
        if host.is_empty() {
            return Err(UpstreamConfigError::Url(url.into()));
        }
        let mut roots = rustls::RootCertStore::empty();
        if let Some(path) = ca {
            use rustls_pki_types::pem::PemObject;
            let bad = |detail: String| UpstreamConfigError::Ca {
                path: path.display().to_string(),
                detail,
            };
            for c in rustls_pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| bad(e.to_string()))?
            {
                roots
                    .add(c.map_err(|e| bad(e.to_string()))?)
                    .map_err(|e| bad(e.to_string()))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(UpstreamConfig {
            host: host.to_owned(),
            port,
            tls: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
            iothub_hostname: iothub_hostname.unwrap_or(host).to_owned(),
            auth: UpstreamAuth::Identity,
        })
    }

    pub fn with_auth(mut self, auth: UpstreamAuth) -> UpstreamConfig {
        self.auth = auth;
        self
    }
}

/// Reconnect pacing shared by every identity: one failure delays them all.
struct Backoff {
    state: Mutex<(Duration, tokio::time::Instant)>,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            state: Mutex::new((Duration::ZERO, tokio::time::Instant::now())),
        }
    }

    async fn wait(&self) {
        let until = self.state.lock().1;
        tokio::time::sleep_until(until).await;
    }

    /// A connection attempt failed: the next one waits longer (doubling,
    /// with ±25 % jitter, at most [`BACKOFF_MAX`]). Returns the new delay.
    fn failed(&self) -> Duration {
        let mut s = self.state.lock();
        let base = (s.0 * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
        let delay = base.mul_f64(0.75 + rand::random::<f64>() * 0.5);
        let until = tokio::time::Instant::now() + delay;
        s.0 = base;
        if until > s.1 {
            s.1 = until;
        }
        delay
    }

    fn succeeded(&self) {
        self.state.lock().0 = Duration::ZERO;
    }
}

/// State worth a log line, once per change rather than per retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// No connection attempted yet (nothing to send).
    Unknown,
    Up,
    Down,
}

/// The link as `/readyz` and `/metrics` show it.
#[derive(Debug)]
pub struct UpstreamStatus {
    inner: Mutex<StatusInner>,
}

#[derive(Debug)]
struct StatusInner {
    state: LinkState,
    since: std::time::SystemTime,
    reason: String,
    offline_count: u64,
    /// Completed offline periods; the current one is added when read.
    offline_secs: f64,
    offline_since: Option<std::time::Instant>,
}

impl Default for UpstreamStatus {
    fn default() -> UpstreamStatus {
        UpstreamStatus {
            inner: Mutex::new(StatusInner {
                state: LinkState::Unknown,
                since: std::time::SystemTime::now(),
                reason: String::new(),
                offline_count: 0,
                offline_secs: 0.0,
                offline_since: None,
            }),
        }
    }
}

impl UpstreamStatus {
    fn is_up(&self) -> bool {
        self.inner.lock().state == LinkState::Up
    }

    /// Records a change; `false` when the state was already `to`.
    fn set(&self, to: LinkState, reason: &str) -> bool {
        let mut s = self.inner.lock();
        if s.state == to {
            return false;
        }
        s.state = to;
        s.since = std::time::SystemTime::now();
        s.reason = reason.to_owned();
        match to {
            LinkState::Down => {
                s.offline_count += 1;
                s.offline_since = Some(std::time::Instant::now());
            }
            _ => {
                if let Some(at) = s.offline_since.take() {
                    s.offline_secs += at.elapsed().as_secs_f64();
                }
            }
        }
        true
    }

    /// `{"state", "since", "reason"?}` for `/readyz`.
    pub fn to_json(&self) -> serde_json::Value {
        let s = self.inner.lock();
        let since = time::OffsetDateTime::from(s.since)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let state = match s.state {
            LinkState::Unknown => "idle",
            LinkState::Up => "up",
            LinkState::Down => "down",
        };
        let mut v = serde_json::json!({ "state": state, "since": since });
        if s.state == LinkState::Down {
            v["reason"] = s.reason.clone().into();
        }
        v
    }

    /// `edgehub_offline_count_total` and `edgehub_offline_duration_seconds`.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let s = self.inner.lock();
        let current = s.offline_since.map_or(0.0, |at| at.elapsed().as_secs_f64());
        let _ = writeln!(
            out,
            "# HELP edgehub_offline_count_total Times the upstream link went down.\n# TYPE edgehub_offline_count_total counter\nedgehub_offline_count_total {}\n# HELP edgehub_offline_duration_seconds Time spent with the upstream link down.\n# TYPE edgehub_offline_duration_seconds counter\nedgehub_offline_duration_seconds {:.3}",
            s.offline_count,
            s.offline_secs + current
        );
    }
}

struct Shared {
    cfg: Arc<UpstreamConfig>,
    identities: Arc<Identities>,
    relay: Option<Arc<dyn CloudToEdge>>,
    backoff: Backoff,
    status: Arc<UpstreamStatus>,
    done: mpsc::UnboundedSender<Entry>,
}

impl Shared {
    fn link(&self, to: LinkState, detail: &str) {
        if self.status.set(to, detail) {
            match to {
                LinkState::Up => info!(upstream = %self.cfg.host, "upstream link up"),
                _ => warn!(upstream = %self.cfg.host, reason = detail,
                    "upstream link down; messages stay stored until it returns"),
            }
        }
    }
}

/// Runs the `$upstream` executor until shutdown.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    store: Store,
    handle: Arc<EndpointHandle>,
    identities: Arc<Identities>,
    cfg: Arc<UpstreamConfig>,
    status: Arc<UpstreamStatus>,
    relay: Option<Arc<dyn CloudToEdge>>,
    mut events: mpsc::UnboundedReceiver<UpstreamEvent>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut reader = match store.reader(handle) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "upstream executor not started");
            return;
        }
    };
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Entry>();
    let shared = Arc::new(Shared {
        cfg,
        identities,
        relay,
        backoff: Backoff::new(),
        status,
        done: done_tx,
    });
    let mut workers: HashMap<String, WorkerTx> = HashMap::new();
    let worker_shutdown = shutdown.clone();
    let spawn = |identity: &str| {
        let (entries, entries_rx) = mpsc::unbounded_channel();
        let (control, control_rx) = mpsc::unbounded_channel();
        tokio::spawn(identity_worker(
            shared.clone(),
            identity.to_owned(),
            entries_rx,
            control_rx,
            worker_shutdown.clone(),
        ));
        WorkerTx { entries, control }
    };
    let mut outstanding = 0usize;
    info!(upstream = %shared.cfg.host, port = shared.cfg.port, "upstream executor started");
    loop {
        let room = OUTSTANDING - outstanding;
        tokio::select! {
            batch = reader.next(room.min(256)), if room > 0 => match batch {
                Ok(entries) => {
                    for e in entries {
                        let identity = identity_of(&e.message);
                        outstanding += 1;
                        let tx = workers.entry(identity.clone()).or_insert_with(|| spawn(&identity));
                        if let Err(mpsc::error::SendError(e)) = tx.entries.send(e) {
                            // The worker stopped (shutdown): nothing is lost,
                            // the entry stays stored.
                            drop(e);
                        }
                    }
                }
                Err(e) => {
                    warn!(error = %e, "reading the upstream queue failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
            Some(first) = done_rx.recv() => {
                let mut acked = vec![first];
                while let Ok(e) = done_rx.try_recv() {
                    acked.push(e);
                }
                outstanding -= acked.len();
                if let Err(e) = reader.ack(&acked) {
                    warn!(error = %e, "recording upstream acknowledgements failed; those messages will be sent again");
                }
            }
            Some(ev) = events.recv() => {
                let (client, work) = match ev {
                    UpstreamEvent::Presence(c, online) => (c, Control::Online(online)),
                    UpstreamEvent::Reported(c) => (c, Control::Reported),
                };
                // Only registered identities have a twin and cloud traffic
                // (anonymous development clients do not).
                if shared.relay.is_none() || !registered(&shared.identities, &client) {
                    continue;
                }
                let tx = workers.entry(client.clone()).or_insert_with(|| spawn(&client));
                let _ = tx.control.send(work);
            }
            _ = shutdown.changed() => return,
        }
    }
}

fn registered(identities: &Identities, identity: &str) -> bool {
    let reg = identities.registry();
    match identity.split_once('/') {
        None => reg.device(identity).is_some(),
        Some((d, m)) => reg
            .device(d)
            .is_some_and(|d| d.modules.contains_key(&m.to_lowercase())),
    }
}

/// `device` or `device/module` a stored message came from.
fn identity_of(m: &Message) -> String {
    let d = m
        .system(SystemProperty::ConnectionDeviceId)
        .map_or("", |d| &**d);
    match m.system(SystemProperty::ConnectionModuleId) {
        Some(module) => format!("{d}/{module}"),
        None => d.to_owned(),
    }
}

/// Telemetry or module-output topic of `identity` with the message's
/// property bag (system properties as `$.` keys).
fn upstream_topic(identity: &str, m: &Message) -> String {
    let base = match identity.split_once('/') {
        Some((d, module)) => format!("devices/{d}/modules/{module}/messages/events/"),
        None => format!("devices/{identity}/messages/events/"),
    };
    crate::iothub::deliveries::bag_topic(base, m)
}

/// One identity's connection to the parent.
struct Link {
    client: Client,
}

/// Why a connection could not be opened.
enum OpenError {
    /// Our side: the identity cannot be forwarded as things stand (no key,
    /// no longer registered). Retried slowly, without slowing the others.
    Local(String),
    /// The parent is unreachable or broke the connection: shared backoff.
    Remote(String),
    /// The parent answered and refused this identity (CONNACK 4/5): its
    /// own slow retry, so one identity the parent does not accept (say, a
    /// leaf not registered under us there) neither delays the others nor
    /// marks a link down that carries them.
    Refused(String),
}

impl Link {
    async fn open(sh: &Shared, identity: &str) -> Result<Link, OpenError> {
        let remote = OpenError::Remote;
        let cfg = &sh.cfg;
        let (device, module) = match identity.split_once('/') {
            Some((d, m)) => (d, Some(m)),
            None => (identity, None),
        };
        // Chain mode signs every connection as this edge device.
        let (signer_device, signer_module, chain) = match &cfg.auth {
            UpstreamAuth::Identity => (device, module, None),
            UpstreamAuth::Chain {
                device: own,
                parent,
            } => {
                let mut chain = format!("{identity};{own}");
                if let Some(p) = parent {
                    chain.push(';');
                    chain.push_str(p);
                }
                (own.as_str(), None, Some(chain))
            }
        };
        let (device, module) = (signer_device, signer_module);
        let key = {
            let reg = sh.identities.registry();
            let dev = reg
                .device(device)
                .ok_or_else(|| OpenError::Local(format!("{device} is not registered")))?;
            let keys = match module {
                None => dev.keys.all(),
                Some(m) => dev
                    .modules
                    .get(&m.to_lowercase())
                    .map(|(_, k)| k.all())
                    .unwrap_or_default(),
            };
            keys.first().map(|k| k.to_string()).ok_or_else(|| {
                OpenError::Local(format!(
                    "{identity} has no key to sign an upstream token with"
                ))
            })?
        };
        let resource = match module {
            Some(m) => format!("{}/devices/{device}/modules/{m}", cfg.iothub_hostname),
            None => format!("{}/devices/{device}", cfg.iothub_hostname),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let token = edgehub_device::sas::sign(&resource, &key, now + TOKEN_TTL_SECS)
            .map_err(|e| OpenError::Local(e.to_string()))?;
        let io = dial(&cfg.host, cfg.port, Some(&cfg.tls), CONNECT_TIMEOUT)
            .await
            .map_err(|e| match e {
                ClientError::ServerName(_) => OpenError::Local(e.to_string()),
                e => remote(e.to_string()),
            })?;
        let connect = Connect {
            protocol: Protocol::V311,
            clean_start: true,
            keep_alive: 60,
            properties: Props::default(),
            client_id: Str::from(identity),
            will: None,
            username: Some(Str::from(format!(
                "{}/{identity}/?api-version=2021-04-12&DeviceClientType=edgehub{}",
                cfg.iothub_hostname,
                chain.map_or(String::new(), |c| format!("&auth-chain={c}"))
            ))),
            password: Some(Bytes::from(token)),
        };
        match Client::handshake(io, connect, CONNECT_TIMEOUT).await {
            Ok(client) => Ok(Link { client }),
            Err(e) if e.is_auth_refusal() => Err(OpenError::Refused(format!(
                "upstream refused {identity}: {e}"
            ))),
            Err(e @ ClientError::Refused(_)) => {
                Err(remote(format!("upstream refused {identity}: {e}")))
            }
            Err(e) => Err(remote(e.to_string())),
        }
    }

    fn send(&mut self, p: &Packet) {
        self.client.send(p)
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.client.flush().await
    }

    async fn recv(&mut self) -> Result<Packet, String> {
        self.client.recv().await.map_err(|e| match e {
            ClientError::Closed => "upstream closed the connection".to_owned(),
            ClientError::Protocol(p) => format!("protocol error from upstream: {p}"),
            e => e.to_string(),
        })
    }
}

/// One identity's upstream connection: forwards its messages in order and,
/// while the identity is connected here, relays what the parent sends it.
async fn identity_worker(
    sh: Arc<Shared>,
    identity: String,
    mut rx: mpsc::UnboundedReceiver<Entry>,
    mut control: mpsc::UnboundedReceiver<Control>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Not yet acknowledged upstream, oldest first; the first `sent` of
    // them are on the current connection.
    let mut pending: VecDeque<Entry> = VecDeque::new();
    let mut online = false;
    'outer: loop {
        while pending.is_empty() && !online {
            tokio::select! {
                e = rx.recv() => match e {
                    Some(e) => pending.push_back(e),
                    None => return,
                },
                Some(c) = control.recv() => {
                    if let Control::Online(o) = c {
                        online = o;
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
        tokio::select! {
            _ = sh.backoff.wait() => {}
            _ = shutdown.changed() => return,
        }
        let mut link = match Link::open(&sh, &identity).await {
            Ok(l) => {
                sh.backoff.succeeded();
                sh.link(LinkState::Up, "");
                debug!(identity, "upstream connection open");
                l
            }
            Err(OpenError::Remote(e)) => {
                let delay = sh.backoff.failed();
                sh.link(LinkState::Down, &e);
                debug!(identity, error = %e, retry_in_ms = delay.as_millis() as u64, "upstream connection failed");
                continue;
            }
            Err(OpenError::Refused(e)) => {
                if !sh.status.is_up() {
                    sh.link(LinkState::Down, &e);
                }
                warn!(identity, error = %e, retry_in_s = LOCAL_RETRY.as_secs(),
                    "the parent refused this identity; its messages stay stored");
                tokio::select! {
                    _ = tokio::time::sleep(LOCAL_RETRY) => {}
                    _ = shutdown.changed() => return,
                }
                continue;
            }
            Err(OpenError::Local(e)) => {
                warn!(identity, error = %e, "cannot forward this identity's messages; they stay stored");
                tokio::select! {
                    _ = tokio::time::sleep(LOCAL_RETRY) => {}
                    _ = shutdown.changed() => return,
                }
                continue;
            }
        };
        let mut down = Downlink::new(&identity);
        if online {
            if let Some(relay) = &sh.relay {
                down.start(&mut link, relay.as_ref()).await;
            }
        }
        // Method answers come back from spawned calls.
        let (answers_tx, mut answers) = mpsc::unbounded_channel::<(i32, String, Bytes)>();
        // packet id → position is implicit: ids are handed out in order.
        let mut inflight: VecDeque<u16> = VecDeque::new();
        let mut next_id: u16 = 1;
        let mut sent = 0usize;
        let mut idle_since = tokio::time::Instant::now();
        let mut ping_at = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            while sent < pending.len() && inflight.len() < WINDOW {
                let e = &pending[sent];
                let id = next_id;
                next_id = next_id.checked_add(1).unwrap_or(1);
                link.send(&Packet::Publish(Publish {
                    qos: QoS::AtLeastOnce,
                    topic: Str::from(upstream_topic(&identity, &e.message)),
                    packet_id: id,
                    payload: e.message.body.clone(),
                    ..Default::default()
                }));
                inflight.push_back(id);
                sent += 1;
            }
            if let Err(e) = link.flush().await {
                sh.backoff.failed();
                sh.link(LinkState::Down, &e.to_string());
                continue 'outer;
            }
            let idle_deadline = idle_since + IDLE_CLOSE;
            tokio::select! {
                p = link.recv() => match p {
                    Ok(Packet::PubAck(a)) => {
                        if inflight.front() != Some(&a.packet_id) {
                            debug!(identity, packet_id = a.packet_id, "unexpected PUBACK; reconnecting");
                            continue 'outer;
                        }
                        inflight.pop_front();
                        let e = pending.pop_front().expect("in flight implies pending");
                        sent -= 1;
                        let _ = sh.done.send(e);
                        if pending.is_empty() {
                            idle_since = tokio::time::Instant::now();
                        }
                    }
                    Ok(Packet::Publish(p)) => {
                        if let Some(relay) = &sh.relay {
                            down.received(&mut link, relay, p, &answers_tx).await;
                        }
                    }
                    Ok(Packet::PingResp | Packet::SubAck(_)) => {}
                    Ok(p) => debug!(identity, packet = p.name(), "ignored from upstream"),
                    Err(e) => {
                        // Unacknowledged messages go again on the next
                        // connection (at least once).
                        let delay = sh.backoff.failed();
                        sh.link(LinkState::Down, &e);
                        debug!(identity, error = %e, retry_in_ms = delay.as_millis() as u64, "upstream connection lost");
                        continue 'outer;
                    }
                },
                e = rx.recv(), if sent == pending.len() => match e {
                    Some(e) => pending.push_back(e),
                    None => return,
                },
                Some(c) = control.recv() => match c {
                    Control::Online(true) => {
                        online = true;
                        if let (Some(relay), false) = (&sh.relay, down.subscribed) {
                            down.start(&mut link, relay.as_ref()).await;
                        }
                    }
                    Control::Online(false) => {
                        online = false;
                        if down.subscribed {
                            // The parent must stop seeing the identity as
                            // here (a method to it must get 404 there).
                            link.send(&Packet::Disconnect(Default::default()));
                            let _ = link.flush().await;
                            debug!(identity, "identity left; its upstream connection closed");
                            continue 'outer;
                        }
                    }
                    Control::Reported => {
                        if let (Some(relay), true) = (&sh.relay, down.subscribed) {
                            down.sync_reported(&mut link, relay.as_ref()).await;
                        }
                    }
                },
                Some((status, rid, payload)) = answers.recv() => {
                    link.send(&Packet::Publish(Publish {
                        qos: QoS::AtMostOnce,
                        topic: Str::from(format!("$iothub/methods/res/{status}/?$rid={rid}")),
                        payload,
                        ..Default::default()
                    }));
                }
                _ = tokio::time::sleep_until(ping_at) => {
                    link.send(&Packet::PingReq);
                    ping_at = tokio::time::Instant::now() + Duration::from_secs(30);
                }
                _ = tokio::time::sleep_until(idle_deadline), if pending.is_empty() && !online => {
                    link.send(&Packet::Disconnect(Default::default()));
                    let _ = link.flush().await;
                    debug!(identity, "idle upstream connection closed");
                    continue 'outer;
                }
                _ = shutdown.changed() => {
                    link.send(&Packet::Disconnect(Default::default()));
                    let _ = link.flush().await;
                    return;
                }
            }
        }
    }
}

/// The cloud-to-edge side of one identity's connection.
struct Downlink<'a> {
    identity: &'a str,
    subscribed: bool,
    next_rid: u64,
    /// Our twin GET waiting for its answer.
    twin_get: Option<String>,
    /// Reported properties sent up, waiting for the parent's 204.
    reported: Option<(String, serde_json::Map<String, serde_json::Value>)>,
}

impl<'a> Downlink<'a> {
    fn new(identity: &'a str) -> Downlink<'a> {
        Downlink {
            identity,
            subscribed: false,
            next_rid: 1,
            twin_get: None,
            reported: None,
        }
    }

    fn rid(&mut self, kind: char) -> String {
        self.next_rid += 1;
        format!("{kind}{}", self.next_rid)
    }

    /// Subscribes to the identity's cloud traffic, reads its twin and sends
    /// the reported properties accepted while the link was down.
    async fn start(&mut self, link: &mut Link, relay: &dyn CloudToEdge) {
        let mut filters = vec![
            "$iothub/methods/POST/#".to_owned(),
            "$iothub/twin/res/#".to_owned(),
            "$iothub/twin/PATCH/properties/desired/#".to_owned(),
        ];
        if !self.identity.contains('/') {
            // Modules get no C2D messages.
            filters.push(format!("devices/{}/messages/devicebound/#", self.identity));
        }
        link.send(&Packet::Subscribe(edgehub_codec::Subscribe {
            packet_id: u16::MAX, // apart from the PUBLISH ids, which count up from 1
            properties: Props::default(),
            filters: filters
                .into_iter()
                .map(|f| {
                    let o = edgehub_codec::SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        ..Default::default()
                    };
                    (Str::from(f), o)
                })
                .collect(),
        }));
        self.subscribed = true;
        let rid = self.rid('g');
        link.send(&Packet::Publish(Publish {
            qos: QoS::AtMostOnce,
            topic: Str::from(format!("$iothub/twin/GET/?$rid={rid}")),
            ..Default::default()
        }));
        self.twin_get = Some(rid);
        self.sync_reported(link, relay).await;
    }

    async fn sync_reported(&mut self, link: &mut Link, relay: &dyn CloudToEdge) {
        if self.reported.is_some() {
            return; // one at a time; the next goes when this one is answered
        }
        if let Some((patch, snapshot)) = relay.reported_to_sync(self.identity).await {
            let rid = self.rid('r');
            link.send(&Packet::Publish(Publish {
                qos: QoS::AtMostOnce,
                topic: Str::from(format!(
                    "$iothub/twin/PATCH/properties/reported/?$rid={rid}"
                )),
                payload: Bytes::from(patch.to_string()),
                ..Default::default()
            }));
            self.reported = Some((rid, snapshot));
        }
    }

    async fn received(
        &mut self,
        link: &mut Link,
        relay: &Arc<dyn CloudToEdge>,
        p: Publish,
        answers: &mpsc::UnboundedSender<(i32, String, Bytes)>,
    ) {
        let topic: &str = &p.topic;
        let identity = self.identity;
        let mut ack = p.qos != QoS::AtMostOnce;
        if let Some(bag) = topic
            .strip_prefix("devices/")
            .and_then(|r| r.split_once("/messages/devicebound"))
            .map(|(_, bag)| bag.trim_start_matches('/'))
        {
            let mut msg = Message::new(p.payload.clone());
            if let Err(e) = crate::iothub::telemetry::apply_property_bag(&mut msg, bag) {
                warn!(identity, error = %e, "cloud-to-device message with a bad property bag; dropped");
            } else {
                if msg.system(SystemProperty::To).is_none() {
                    msg.set_system(
                        SystemProperty::To,
                        &format!("/devices/{identity}/messages/deviceBound"),
                    );
                }
                if let Err(e) = relay.c2d(identity, msg).await {
                    // Not acknowledged: the parent keeps it and sends it again.
                    warn!(identity, error = %e, "cloud-to-device message not queued here; left with the parent");
                    ack = false;
                }
            }
        } else if let Some(rest) = topic.strip_prefix("$iothub/methods/POST/") {
            let (name, query) = rest.split_once("/?").unwrap_or((rest, ""));
            let rid = edgehub_device::query_value(query, "$rid")
                .unwrap_or_default()
                .to_owned();
            let (relay, answers, who, name) = (
                relay.clone(),
                answers.clone(),
                identity.to_owned(),
                name.to_owned(),
            );
            let payload = p.payload.clone();
            tokio::spawn(async move {
                let (status, body) = relay.method(&who, &name, payload).await;
                let _ = answers.send((status, rid, body));
            });
        } else if topic.starts_with("$iothub/twin/PATCH/properties/desired/") {
            match serde_json::from_slice::<serde_json::Value>(&p.payload) {
                Ok(serde_json::Value::Object(patch)) => relay.desired_patch(identity, patch),
                _ => warn!(
                    identity,
                    "desired-properties patch from upstream is not a JSON object"
                ),
            }
        } else if let Some(rest) = topic.strip_prefix("$iothub/twin/res/") {
            let (status, query) = rest.split_once("/?").unwrap_or((rest, ""));
            let rid = edgehub_device::query_value(query, "$rid").unwrap_or_default();
            let ok = status.starts_with('2');
            if self.twin_get.as_deref() == Some(rid) {
                self.twin_get = None;
                let desired = serde_json::from_slice::<serde_json::Value>(&p.payload)
                    .ok()
                    .and_then(|t| t.get("desired").cloned());
                match desired {
                    Some(serde_json::Value::Object(d)) if ok => relay.adopt_desired(identity, d),
                    _ => warn!(
                        identity,
                        status, "twin from upstream unreadable; the local copy stays"
                    ),
                }
            } else if self.reported.as_ref().is_some_and(|(r, _)| r == rid) {
                let (_, snapshot) = self.reported.take().expect("checked");
                if ok {
                    relay.reported_synced(identity, snapshot);
                    // Changes made while this one was on its way.
                    self.sync_reported(link, relay.as_ref()).await;
                } else {
                    warn!(identity, status, "parent refused reported properties; retried on the next change or connection");
                }
            }
        } else {
            debug!(identity, topic, "unexpected publish from upstream; ignored");
        }
        if ack {
            link.send(&Packet::PubAck(edgehub_codec::PubResp::new(p.packet_id, 0)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn backoff_doubles_with_jitter_up_to_the_cap_and_resets() {
        let b = Backoff::new();
        let mut last = Duration::ZERO;
        for _ in 0..12 {
            let d = b.failed();
            let base = b.state.lock().0;
            assert!(base >= BACKOFF_MIN && base <= BACKOFF_MAX);
            assert!(
                d >= base.mul_f64(0.75) && d <= base.mul_f64(1.25),
                "{d:?} around {base:?}"
            );
            assert!(base >= last);
            last = base;
        }
        assert_eq!(last, BACKOFF_MAX);
        b.succeeded();
        assert!(b.failed() <= BACKOFF_MIN.mul_f64(1.25));
    }

    #[test]
    fn upstream_urls() {
        let c = UpstreamConfig::new("mqtts://parent.local:8884", None, None).unwrap();
        assert_eq!((c.host.as_str(), c.port), ("parent.local", 8884));
        assert_eq!(c.iothub_hostname, "parent.local");
        let c = UpstreamConfig::new("mqtts://hub.azure-devices.net", None, Some("x")).unwrap();
        assert_eq!((c.port, c.iothub_hostname.as_str()), (8883, "x"));
        for bad in ["mqtt://a:1", "mqtts://:1", "mqtts://a:port", "a:1"] {
            assert!(UpstreamConfig::new(bad, None, None).is_err(), "{bad}");
        }
    }
}
