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
//! Owns: upstream connections, their windows and backoff. Must not touch:
//! routing (done before the store) or downstream sessions.
//! Not yet: the nested-edge `auth-chain` mode, cloud-to-device traffic from
//! upstream (C2D, desired properties, methods), offline metrics (issue 6).

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use edgehub_codec::{decode, encode, Connect, Packet, Props, Protocol, Publish, QoS, Str};
use edgehub_router::{Message, SystemProperty};
use edgehub_store::{EndpointHandle, Entry, Store};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::iothub::identity::Identities;

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
pub async fn run(
    store: Store,
    handle: Arc<EndpointHandle>,
    identities: Arc<Identities>,
    cfg: Arc<UpstreamConfig>,
    status: Arc<UpstreamStatus>,
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
        backoff: Backoff::new(),
        status,
        done: done_tx,
    });
    let mut workers: HashMap<String, mpsc::UnboundedSender<Entry>> = HashMap::new();
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
                        let tx = workers.entry(identity.clone()).or_insert_with(|| {
                            let (tx, rx) = mpsc::unbounded_channel();
                            tokio::spawn(identity_worker(shared.clone(), identity.clone(), rx, shutdown.clone()));
                            tx
                        });
                        if let Err(mpsc::error::SendError(e)) = tx.send(e) {
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
            _ = shutdown.changed() => return,
        }
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
    crate::endpoints::input_topic(&base, m)
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct Link {
    io: Box<dyn Io>,
    rx: BytesMut,
    tx: BytesMut,
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
        let token = crate::iothub::sas::sign(&resource, &key, now + TOKEN_TTL_SECS)
            .map_err(|e| OpenError::Local(e.to_string()))?;
        let addr = format!("{}:{}", cfg.host, cfg.port);
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&addr))
            .await
            .map_err(|_| remote(format!("connecting to {addr} timed out")))?
            .map_err(|e| remote(format!("connecting to {addr}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let name = rustls_pki_types::ServerName::try_from(cfg.host.clone()).map_err(|_| {
            OpenError::Local(format!("{:?} is not a valid TLS server name", cfg.host))
        })?;
        let tls = tokio::time::timeout(CONNECT_TIMEOUT, cfg.tls.connect(name, tcp))
            .await
            .map_err(|_| remote("TLS handshake timed out".to_string()))?
            .map_err(|e| remote(format!("TLS handshake with {addr}: {e}")))?;
        let mut link = Link {
            io: Box::new(tls),
            rx: BytesMut::with_capacity(4096),
            tx: BytesMut::with_capacity(8192),
        };
        link.send(&Packet::Connect(Box::new(Connect {
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
        })));
        link.flush()
            .await
            .map_err(|e| remote(format!("write: {e}")))?;
        match tokio::time::timeout(CONNECT_TIMEOUT, link.recv()).await {
            Err(_) => Err(remote("no CONNACK in time".into())),
            Ok(Ok(Packet::ConnAck(a))) if a.code == 0 => Ok(link),
            Ok(Ok(Packet::ConnAck(a))) if a.code == 4 || a.code == 5 => {
                Err(OpenError::Refused(format!(
                    "upstream refused {identity}: {}",
                    if a.code == 4 {
                        "bad user name or password (code 4)"
                    } else {
                        "not authorized (code 5)"
                    }
                )))
            }
            Ok(Ok(Packet::ConnAck(a))) => Err(remote(format!(
                "upstream refused {identity}: code {}",
                a.code
            ))),
            Ok(Ok(p)) => Err(remote(format!("{} before CONNACK", p.name()))),
            Ok(Err(e)) => Err(remote(e)),
        }
    }

    fn send(&mut self, p: &Packet) {
        let _ = encode(p, Protocol::V311, &mut self.tx, usize::MAX);
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.tx.is_empty() {
            self.io.write_all(&self.tx).await?;
            self.tx.clear();
        }
        Ok(())
    }

    async fn recv(&mut self) -> Result<Packet, String> {
        loop {
            match decode(&mut self.rx, Protocol::V311, usize::MAX) {
                Ok(Some(p)) => return Ok(p),
                Ok(None) => {}
                Err(e) => return Err(format!("protocol error from upstream: {e}")),
            }
            match self.io.read_buf(&mut self.rx).await {
                Ok(0) => return Err("upstream closed the connection".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }
}

/// Forwards one identity's messages, in order, over its own connection.
async fn identity_worker(
    sh: Arc<Shared>,
    identity: String,
    mut rx: mpsc::UnboundedReceiver<Entry>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Not yet acknowledged upstream, oldest first; the first `sent` of
    // them are on the current connection.
    let mut pending: VecDeque<Entry> = VecDeque::new();
    'outer: loop {
        if pending.is_empty() {
            tokio::select! {
                e = rx.recv() => match e {
                    Some(e) => pending.push_back(e),
                    None => return,
                },
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
                    Ok(Packet::PingResp) => {}
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
                _ = tokio::time::sleep_until(ping_at) => {
                    link.send(&Packet::PingReq);
                    ping_at = tokio::time::Instant::now() + Duration::from_secs(30);
                }
                _ = tokio::time::sleep_until(idle_deadline), if pending.is_empty() => {
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
