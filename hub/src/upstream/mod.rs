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

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use edgehub_router::{Message, SystemProperty};
use edgehub_store::{EndpointHandle, Entry, Store};
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use edgehub_device::identity::Identities;

mod amqp;
mod mqtt;

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
    #[error("--upstream {0:?}: expected mqtts://host:port, amqps://host:port, wss://host[:port][/path] or quic://host:port")]
    Url(String),
    #[error("--upstream {0:?} does not speak --upstream-protocol {1:?}; use mqtts:// or quic:// for MQTT, amqps:// for AMQP (wss:// carries either)")]
    Protocol(String, UpstreamProtocol),
    #[error("--upstream-ca {path}: {detail}")]
    Ca { path: String, detail: String },
    #[error("upstream TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// Where and how to reach the parent.
pub struct UpstreamConfig {
    pub host: String,
    pub port: u16,
    pub transport: edgehub_mqtt_client::Transport,
    /// The host name tokens and usernames name (the IoT Hub's, or the
    /// parent edgehub's `--hostname`).
    pub iothub_hostname: String,
    pub auth: UpstreamAuth,
    pub protocol: UpstreamProtocol,
}

/// What the link to the parent speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// One MQTT connection per downstream identity.
    Mqtt,
    /// One AMQP connection for all of them, a CBS token each.
    Amqp,
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
    /// `mqtts://host:port` (port 8883 when left out), `amqps://host:port`
    /// (5671), `quic://host:port` (MQTT over QUIC, 14567) or
    /// `wss://host:port/path` (443, path `/$iothub/websocket`: MQTT, or AMQP
    /// with `protocol` AMQP). The scheme also says the protocol unless
    /// `protocol` names one; the parent's certificate must chain to a CA in
    /// `ca` (PEM). Without `ca` no root is trusted, so every handshake fails
    /// with a clear "UnknownIssuer". `iothub_hostname` defaults to the URL's
    /// host.
    pub fn new(
        url: &str,
        protocol: Option<UpstreamProtocol>,
        ca: Option<&Path>,
        iothub_hostname: Option<&str>,
    ) -> Result<UpstreamConfig, UpstreamConfigError> {
        #[derive(PartialEq)]
        enum Scheme {
            Tls,
            Wss,
            Quic,
        }
        let bad_url = || UpstreamConfigError::Url(url.into());
        let (scheme, named, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
            (Scheme::Tls, Some(UpstreamProtocol::Mqtt), r)
        } else if let Some(r) = url.strip_prefix("amqps://") {
            (Scheme::Tls, Some(UpstreamProtocol::Amqp), r)
        } else if let Some(r) = url.strip_prefix("quic://") {
            (Scheme::Quic, Some(UpstreamProtocol::Mqtt), r)
        } else if let Some(r) = url.strip_prefix("wss://") {
            (Scheme::Wss, None, r)
        } else {
            return Err(bad_url());
        };
        let protocol = match (protocol, named) {
            (Some(p), Some(n)) if p != n => {
                return Err(UpstreamConfigError::Protocol(url.into(), p))
            }
            (p, n) => p.or(n).unwrap_or(UpstreamProtocol::Mqtt),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) if scheme == Scheme::Wss => (&rest[..i], &rest[i..]),
            Some(i) if rest[i..].trim_end_matches('/').is_empty() => (&rest[..i], ""),
            Some(_) => return Err(bad_url()),
            None => (rest, ""),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| bad_url())?),
            None => (
                authority,
                match (&scheme, protocol) {
                    (Scheme::Wss, _) => 443,
                    (Scheme::Quic, _) => edgehub_streams::quic::DEFAULT_PORT,
                    (Scheme::Tls, UpstreamProtocol::Mqtt) => 8883,
                    (Scheme::Tls, UpstreamProtocol::Amqp) => 5671,
                },
            ),
        };
        if host.is_empty() {
            return Err(bad_url());
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
        use edgehub_mqtt_client::Transport;
        let transport = match scheme {
            Scheme::Tls => Transport::Tls(tokio_rustls::TlsConnector::from(Arc::new(cfg))),
            Scheme::Quic => Transport::quic(cfg),
            Scheme::Wss => Transport::Wss {
                tls: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
                path: if path.is_empty() {
                    edgehub_streams::ws::IOTHUB_PATH.to_owned()
                } else {
                    path.to_owned()
                },
                subprotocol: match protocol {
                    UpstreamProtocol::Mqtt => edgehub_streams::ws::MQTT,
                    UpstreamProtocol::Amqp => edgehub_streams::ws::AMQP,
                },
            },
        };
        Ok(UpstreamConfig {
            host: host.to_owned(),
            port,
            transport,
            iothub_hostname: iothub_hostname.unwrap_or(host).to_owned(),
            auth: UpstreamAuth::Identity,
            protocol,
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
    // Over AMQP every identity shares one connection.
    let amqp = (shared.cfg.protocol == UpstreamProtocol::Amqp)
        .then(|| Arc::new(amqp::Connection::new(shared.clone())));
    let spawn = |identity: &str| {
        let (entries, entries_rx) = mpsc::unbounded_channel();
        let (control, control_rx) = mpsc::unbounded_channel();
        match &amqp {
            None => tokio::spawn(mqtt::identity_worker(
                shared.clone(),
                identity.to_owned(),
                entries_rx,
                control_rx,
                worker_shutdown.clone(),
            )),
            Some(conn) => tokio::spawn(amqp::identity_worker(
                shared.clone(),
                conn.clone(),
                identity.to_owned(),
                entries_rx,
                control_rx,
                worker_shutdown.clone(),
            )),
        };
        WorkerTx { entries, control }
    };
    let mut outstanding = 0usize;
    info!(upstream = %shared.cfg.host, port = shared.cfg.port, protocol = ?shared.cfg.protocol, "upstream executor started");
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

/// Waits out [`LOCAL_RETRY`]; `false` when the hub shuts down meanwhile.
async fn local_retry(shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(LOCAL_RETRY) => true,
        _ = shutdown.changed() => false,
    }
}

/// After an identity's link could not be opened: the shared backoff for
/// the parent's failures, a slow retry of its own for a refused identity
/// or one we cannot sign for. `false` when the hub shuts down meanwhile.
async fn open_failed(
    sh: &Shared,
    identity: &str,
    e: OpenError,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    match e {
        OpenError::Remote(e) => {
            let delay = sh.backoff.failed();
            sh.link(LinkState::Down, &e);
            tracing::debug!(identity, error = %e, retry_in_ms = delay.as_millis() as u64, "upstream connection failed");
            true
        }
        OpenError::Refused(e) => {
            if !sh.status.is_up() {
                sh.link(LinkState::Down, &e);
            }
            warn!(identity, error = %e, retry_in_s = LOCAL_RETRY.as_secs(),
                "the parent refused this identity; its messages stay stored");
            local_retry(shutdown).await
        }
        OpenError::Local(e) => {
            warn!(identity, error = %e, "cannot forward this identity's messages; they stay stored");
            local_retry(shutdown).await
        }
    }
}

/// What an identity's upstream connection authenticates with.
struct Credentials {
    /// The SAS token: the identity's own, or in chain mode this edge
    /// device's.
    token: String,
    /// The resource the token is for (its audience).
    resource: String,
    /// Chain mode: `identity;this-device[;parent]`.
    chain: Option<String>,
}

/// Signs a token for `identity`'s upstream connection with the key from
/// our registry (in chain mode: this edge device's key).
fn credentials(sh: &Shared, identity: &str) -> Result<Credentials, OpenError> {
    let cfg = &sh.cfg;
    let (device, module) = match identity.split_once('/') {
        Some((d, m)) => (d, Some(m)),
        None => (identity, None),
    };
    // Chain mode signs every connection as this edge device.
    let (device, module, chain) = match &cfg.auth {
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
    Ok(Credentials {
        token,
        resource,
        chain,
    })
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
        let c = UpstreamConfig::new("mqtts://parent.local:8884", None, None, None).unwrap();
        assert_eq!((c.host.as_str(), c.port), ("parent.local", 8884));
        assert_eq!(c.iothub_hostname, "parent.local");
        assert_eq!(c.protocol, UpstreamProtocol::Mqtt);
        let c =
            UpstreamConfig::new("mqtts://hub.azure-devices.net", None, None, Some("x")).unwrap();
        assert_eq!((c.port, c.iothub_hostname.as_str()), (8883, "x"));
        let c = UpstreamConfig::new("amqps://hub.azure-devices.net", None, None, None).unwrap();
        assert_eq!((c.port, c.protocol), (5671, UpstreamProtocol::Amqp));
        let c = UpstreamConfig::new("amqps://p:5672", Some(UpstreamProtocol::Amqp), None, None)
            .unwrap();
        assert_eq!(c.port, 5672);
        use edgehub_mqtt_client::Transport;
        let c = UpstreamConfig::new("quic://parent", None, None, None).unwrap();
        assert_eq!((c.port, c.protocol), (14567, UpstreamProtocol::Mqtt));
        assert!(matches!(c.transport, Transport::Quic { .. }));
        let c = UpstreamConfig::new("wss://hub.azure-devices.net", None, None, None).unwrap();
        assert_eq!((c.port, c.protocol), (443, UpstreamProtocol::Mqtt));
        assert!(
            matches!(&c.transport, Transport::Wss { path, subprotocol: "mqtt", .. } if path == "/$iothub/websocket")
        );
        let c = UpstreamConfig::new(
            "wss://proxy:8443/edge/ws",
            Some(UpstreamProtocol::Amqp),
            None,
            None,
        )
        .unwrap();
        assert_eq!((c.host.as_str(), c.port), ("proxy", 8443));
        assert!(
            matches!(&c.transport, Transport::Wss { path, subprotocol: "AMQPWSB10", .. } if path == "/edge/ws")
        );
        assert!(
            UpstreamConfig::new("quic://p:1", Some(UpstreamProtocol::Amqp), None, None).is_err(),
            "AMQP does not run over QUIC"
        );
        for bad in [
            "mqtts://a:1/some/path",
            "ws://a:1",
            "mqtt://a:1",
            "mqtts://:1",
            "mqtts://a:port",
            "a:1",
            "amqp://a:1",
        ] {
            assert!(UpstreamConfig::new(bad, None, None, None).is_err(), "{bad}");
        }
        let e = UpstreamConfig::new("mqtts://a:1", Some(UpstreamProtocol::Amqp), None, None)
            .err()
            .unwrap();
        assert!(e.to_string().contains("amqps://"), "{e}");
    }
}
