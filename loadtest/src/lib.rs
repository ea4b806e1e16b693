//! edgehub-loadtest: simulates many downstream devices publishing telemetry to
//! an MQTT broker (edgehub or any other, e.g. mosquitto, for side-by-side
//! runs) and measures connect rate, throughput and latency.
//!
//! Owns: the traffic shape (devices, ramp, QoS, payload, rate, in-flight
//! window, duration or count), measurement (HDR histograms of publish→ack and
//! publish→delivery latency, errors by kind) and the report. Must not touch
//! the hub's internals: it speaks MQTT over the wire only, with our own codec
//! so one process can drive thousands of connections cheaply.
//!
//! Every publish carries its send time (nanoseconds since the run started,
//! first 8 payload bytes) so subscribers in the same process can measure
//! publish→delivery latency on one clock.

pub mod iothub;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use edgehub_codec::{
    Connect, Disconnect, Packet, Props, Protocol, PubResp, Publish, QoS, Str, Subscribe,
    SubscriptionOptions,
};
use edgehub_mqtt_client::{dial, Client, ClientError, Step};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::sync::Mutex;
use tokio::sync::watch;

/// Where to send traffic: `mqtt://host:port`, `mqtts://host:port`, or
/// `amqps://host:port` (IoT Hub's AMQP endpoint; IoT Hub mode only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Target {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub amqp: bool,
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Target, String> {
        let (tls, amqp, rest) = if let Some(r) = s.strip_prefix("mqtts://") {
            (true, false, r)
        } else if let Some(r) = s.strip_prefix("mqtt://") {
            (false, false, r)
        } else if let Some(r) = s.strip_prefix("amqps://") {
            (true, true, r)
        } else {
            return Err(format!(
                "{s:?}: expected mqtt://host:port, mqtts://host:port or amqps://host:port"
            ));
        };
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?}: missing :port"))?;
        let port = port.parse().map_err(|_| format!("{s:?}: bad port"))?;
        Ok(Target {
            tls,
            host: host.trim_matches(['[', ']']).to_owned(),
            port,
            amqp,
        })
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}://{}:{}",
            match (self.amqp, self.tls) {
                (true, _) => "amqps",
                (false, true) => "mqtts",
                (false, false) => "mqtt",
            },
            self.host,
            self.port
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadConfig {
    pub target: Target,
    /// CA to trust for mqtts (e.g. edgehub's generated `ca.pem`).
    #[serde(skip)]
    pub ca: Option<PathBuf>,
    pub devices: usize,
    /// New connections per second.
    pub ramp_per_sec: f64,
    pub qos: u8,
    pub payload_bytes: usize,
    /// Messages per second per device; 0: as fast as the window allows.
    pub rate_per_device: f64,
    /// Unacknowledged QoS 1 publishes per device.
    pub inflight: usize,
    /// Stop publishing after this long (whichever of duration/count is first).
    pub duration: Option<Duration>,
    /// Stop after this many messages per device.
    pub count_per_device: Option<u64>,
    /// After publishing (or with a count of 0, instead of it), keep every
    /// connection open and idle until the duration ends: for "how many idle
    /// devices can the hub hold" runs.
    pub hold: bool,
    /// Subscriber connections on `<topic_prefix>/#` (publish→delivery latency).
    pub subscribers: usize,
    pub topic_prefix: String,
    pub client_prefix: String,
    pub mqtt5: bool,
    pub connect_timeout: Duration,
    /// Latencies of messages published this long after the start (the
    /// connection ramp included) are left out of the histograms: TLS
    /// handshakes of thousands of devices otherwise dominate the tail.
    /// Throughput counts every message.
    pub warmup: Duration,
    /// IoT Hub mode: device `i` is `identities[i]` (SAS token, IoT Hub
    /// username and telemetry topic). Empty: generic MQTT.
    #[serde(skip)]
    pub identities: Vec<iothub::DeviceIdentity>,
}

impl LoadConfig {
    pub fn new(target: Target) -> LoadConfig {
        LoadConfig {
            target,
            ca: None,
            devices: 10,
            ramp_per_sec: 1000.0,
            qos: 1,
            payload_bytes: 256,
            rate_per_device: 0.0,
            inflight: 10,
            duration: Some(Duration::from_secs(10)),
            count_per_device: None,
            hold: false,
            subscribers: 0,
            topic_prefix: "loadtest".into(),
            client_prefix: "loadtest".into(),
            mqtt5: false,
            connect_timeout: Duration::from_secs(10),
            warmup: Duration::ZERO,
            identities: Vec::new(),
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Latency {
    fn from(h: &Histogram<u64>) -> Latency {
        Latency {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub target: String,
    pub config: Option<LoadConfig>,
    pub elapsed_secs: f64,
    pub connected: u64,
    pub connect_failures: u64,
    /// Connections per second over the ramp.
    pub connect_rate: f64,
    pub published: u64,
    pub acknowledged: u64,
    pub delivered: u64,
    pub published_per_sec: f64,
    pub acknowledged_per_sec: f64,
    pub ack_latency: Latency,
    pub delivery_latency: Latency,
    pub errors: BTreeMap<String, u64>,
    /// True when stopped early (Ctrl-C).
    pub interrupted: bool,
}

#[derive(Default)]
struct Counters {
    connected: AtomicU64,
    connect_failures: AtomicU64,
    published: AtomicU64,
    acknowledged: AtomicU64,
    delivered: AtomicU64,
}

struct Shared {
    cfg: LoadConfig,
    start: Instant,
    counters: Counters,
    ack_hist: Mutex<Histogram<u64>>,
    delivery_hist: Mutex<Histogram<u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
    transport: edgehub_mqtt_client::Transport,
    last_connect: Mutex<Option<Instant>>,
}

fn new_hist() -> Histogram<u64> {
    // 1 µs to 1 h, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

impl Shared {
    fn error(&self, kind: impl Into<String>) {
        *self.errors.lock().unwrap().entry(kind.into()).or_insert(0) += 1;
    }
}

/// Live counters for a progress display.
#[derive(Clone)]
pub struct Progress(Arc<Shared>);

impl Progress {
    pub fn line(&self) -> String {
        let c = &self.0.counters;
        let secs = self.0.start.elapsed().as_secs_f64().max(1e-9);
        let acked = c.acknowledged.load(Ordering::Relaxed);
        format!(
            "connected {} (failed {}), published {}, acked {} ({:.0}/s), delivered {}",
            c.connected.load(Ordering::Relaxed),
            c.connect_failures.load(Ordering::Relaxed),
            c.published.load(Ordering::Relaxed),
            acked,
            acked as f64 / secs,
            c.delivered.load(Ordering::Relaxed),
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading CA {path}: {detail}")]
    Ca { path: PathBuf, detail: String },
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{0}")]
    Config(String),
}

fn tls_connector(ca: &Option<PathBuf>) -> Result<tokio_rustls::TlsConnector, LoadError> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = ca {
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| LoadError::Ca {
                path: path.clone(),
                detail: e.to_string(),
            })?;
        for c in certs {
            roots.add(c).map_err(|e| LoadError::Ca {
                path: path.clone(),
                detail: e.to_string(),
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

/// One device's (or subscriber's) connection to the broker under test.
struct Conn {
    client: Client,
}

impl Conn {
    async fn open(
        sh: &Shared,
        client_id: &str,
        identity: Option<&iothub::DeviceIdentity>,
    ) -> Result<Conn, String> {
        let cfg = &sh.cfg;
        let io = dial(
            &cfg.target.host,
            cfg.target.port,
            &sh.transport,
            cfg.connect_timeout,
        )
        .await
        .map_err(short)?;
        let connect = Connect {
            protocol: if cfg.mqtt5 {
                Protocol::V5
            } else {
                Protocol::V311
            },
            clean_start: true,
            keep_alive: 60,
            properties: Props::default(),
            client_id: Str::from(client_id),
            will: None,
            username: identity.map(|i| Str::from(i.username())),
            password: identity.map(|i| Bytes::from(i.sas_token(3600))),
        };
        Client::handshake(io, connect, cfg.connect_timeout)
            .await
            .map(|client| Conn { client })
            .map_err(short)
    }

    fn send(&mut self, p: &Packet) {
        self.client.send(p)
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.client.flush().await
    }

    async fn recv(&mut self) -> Result<Packet, String> {
        self.client.recv().await.map_err(short)
    }
}

/// Error kinds as the report counts them: short, and the same for every
/// device that hit the same problem (no addresses or ports).
fn short(e: ClientError) -> String {
    match e {
        ClientError::Timeout(Step::TcpConnect) => "connect timeout".into(),
        ClientError::Timeout(Step::TlsHandshake) => "tls handshake timeout".into(),
        ClientError::Timeout(Step::ConnAck) => "connack timeout".into(),
        ClientError::Timeout(Step::WebSocketUpgrade) => "websocket upgrade timeout".into(),
        ClientError::Timeout(Step::QuicHandshake) => "quic handshake timeout".into(),
        ClientError::WebSocket { detail, .. } => format!("websocket: {detail}"),
        ClientError::Quic { detail, .. } => format!("quic: {detail}"),
        ClientError::Connect { source, .. } => format!("connect: {}", source.kind()),
        ClientError::ServerName(_) => "tls: invalid server name".into(),
        ClientError::Tls { source, .. } => format!("tls: {source}"),
        ClientError::Refused(code) => format!("connack refused (code {code:#04x})"),
        ClientError::Protocol(p) => format!("protocol: {p}"),
        ClientError::Closed => "closed by broker".into(),
        ClientError::Io(e) => format!("read: {}", e.kind()),
    }
}

async fn ramp_slot(sh: &Shared) {
    // Spaces connection attempts by 1/ramp across all devices.
    let gap = Duration::from_secs_f64(1.0 / sh.cfg.ramp_per_sec.max(0.001));
    let wait = {
        let mut last = sh.last_connect.lock().unwrap();
        let now = Instant::now();
        let next = match *last {
            Some(t) if t + gap > now => t + gap,
            _ => now,
        };
        *last = Some(next);
        next - now
    };
    tokio::time::sleep(wait).await;
}

async fn device(sh: Arc<Shared>, i: usize, mut stop: watch::Receiver<bool>) {
    ramp_slot(&sh).await;
    if *stop.borrow() {
        return;
    }
    let cfg = &sh.cfg;
    let identity = cfg.identities.get(i);
    let client_id = match identity {
        Some(id) => id.device_id.clone(),
        None => format!("{}-{i}", cfg.client_prefix),
    };
    let mut c = match Conn::open(&sh, &client_id, identity).await {
        Ok(c) => c,
        Err(e) => {
            sh.counters.connect_failures.fetch_add(1, Ordering::Relaxed);
            sh.error(e);
            return;
        }
    };
    sh.counters.connected.fetch_add(1, Ordering::Relaxed);
    let topic = Str::from(match identity {
        Some(id) => id.topic(),
        None => format!("{}/{}", cfg.topic_prefix, client_id),
    });
    let qos = if cfg.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let mut hist = new_hist();
    let measure_from = sh.start + cfg.warmup;
    let record = |hist: &mut Histogram<u64>, at: Instant| {
        if at >= measure_from {
            let _ = hist.record(at.elapsed().as_micros().max(1) as u64);
        }
    };
    let mut inflight: VecDeque<(u16, Instant)> = VecDeque::new();
    let mut next_id: u16 = 1;
    let mut sent: u64 = 0;
    let deadline = cfg.duration.map(|d| tokio::time::Instant::now() + d);
    let interval =
        (cfg.rate_per_device > 0.0).then(|| Duration::from_secs_f64(1.0 / cfg.rate_per_device));
    let mut next_send = tokio::time::Instant::now();
    let filler = vec![0x5Au8; cfg.payload_bytes.saturating_sub(8)];
    let window = if qos == QoS::AtMostOnce {
        64
    } else {
        cfg.inflight.max(1)
    };
    let mut failed = None;
    'run: loop {
        let done = *stop.borrow()
            || deadline.is_some_and(|d| tokio::time::Instant::now() >= d)
            || cfg.count_per_device.is_some_and(|n| sent >= n);
        if done {
            break;
        }
        // Fill the window (QoS 0: a batch), respecting the rate.
        let mut batch = 0;
        while (qos == QoS::AtMostOnce && batch < window)
            || (qos != QoS::AtMostOnce && inflight.len() < window)
        {
            if cfg.count_per_device.is_some_and(|n| sent >= n) {
                break;
            }
            if let Some(iv) = interval {
                if tokio::time::Instant::now() < next_send {
                    break;
                }
                next_send += iv;
            }
            let now = Instant::now();
            let stamp = (now - sh.start).as_nanos() as u64;
            let mut payload = Vec::with_capacity(cfg.payload_bytes.max(8));
            payload.extend_from_slice(&stamp.to_le_bytes());
            payload.extend_from_slice(&filler);
            let packet_id = if qos == QoS::AtMostOnce {
                0
            } else {
                let id = next_id;
                next_id = next_id.checked_add(1).unwrap_or(1);
                inflight.push_back((id, now));
                id
            };
            c.send(&Packet::Publish(Publish {
                qos,
                topic: topic.clone(),
                packet_id,
                payload: Bytes::from(payload),
                ..Default::default()
            }));
            sent += 1;
            batch += 1;
        }
        if batch > 0 {
            sh.counters
                .published
                .fetch_add(batch as u64, Ordering::Relaxed);
            if let Err(e) = c.flush().await {
                failed = Some(format!("write: {}", e.kind()));
                break;
            }
            if qos == QoS::AtMostOnce {
                sh.counters
                    .acknowledged
                    .fetch_add(batch as u64, Ordering::Relaxed);
                tokio::task::yield_now().await;
                continue;
            }
        }
        let wake = match interval {
            Some(_) => next_send,
            None => tokio::time::Instant::now() + Duration::from_secs(3600),
        };
        let wake = deadline.map_or(wake, |d| wake.min(d));
        tokio::select! {
            r = c.recv(), if !inflight.is_empty() => match r {
                Ok(Packet::PubAck(a)) => {
                    if let Some(pos) = inflight.iter().position(|(id, _)| *id == a.packet_id) {
                        let (_, at) = inflight.remove(pos).expect("present");
                        if a.reason >= 0x80 {
                            sh.error(format!("puback reason {:#04x}", a.reason));
                        } else {
                            record(&mut hist, at);
                            sh.counters.acknowledged.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => { failed = Some(e); break 'run; }
            },
            _ = tokio::time::sleep_until(wake) => {}
            _ = stop.changed() => {}
        }
    }
    if cfg.hold && failed.is_none() && !*stop.borrow() {
        // Idle until the end of the run; a PINGREQ every 30 s keeps the
        // broker's keep-alive (60 s here) satisfied.
        loop {
            let ping = tokio::time::Instant::now() + Duration::from_secs(30);
            let until = deadline.map_or(ping, |d| d.min(ping));
            tokio::select! {
                _ = tokio::time::sleep_until(until) => {}
                _ = stop.changed() => break,
                r = c.recv(), if inflight.is_empty() => match r {
                    Ok(_) => continue,
                    Err(e) => { failed = Some(e); break; }
                },
            }
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                break;
            }
            c.send(&Packet::PingReq);
            if let Err(e) = c.flush().await {
                failed = Some(format!("write: {}", e.kind()));
                break;
            }
        }
    }
    // Collect outstanding acknowledgements (bounded).
    let drain_until = tokio::time::Instant::now() + Duration::from_secs(5);
    while failed.is_none() && !inflight.is_empty() {
        match tokio::time::timeout_at(drain_until, c.recv()).await {
            Ok(Ok(Packet::PubAck(a))) => {
                if let Some(pos) = inflight.iter().position(|(id, _)| *id == a.packet_id) {
                    let (_, at) = inflight.remove(pos).expect("present");
                    record(&mut hist, at);
                    sh.counters.acknowledged.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => failed = Some(e),
            Err(_) => {
                sh.error("ack timeout at end of run");
                break;
            }
        }
    }
    if let Some(e) = failed {
        sh.error(e);
    }
    c.send(&Packet::Disconnect(Disconnect::default()));
    let _ = c.flush().await;
    sh.ack_hist.lock().unwrap().add(&hist).expect("same bounds");
}

/// Devices over AMQP: SASL PLAIN with the device's SAS token, one
/// telemetry sender link, `inflight` unsettled transfers in flight, each
/// acknowledged by its Accepted disposition.
mod amqp {
    use super::*;
    use fe2o3_amqp::connection::ConnectionHandle;
    use fe2o3_amqp::sasl_profile::SaslProfile;
    use fe2o3_amqp::types::messaging::{message::Body, Data, Outcome};
    use fe2o3_amqp::types::primitives::{Binary, Value};
    use fe2o3_amqp::{Connection, Sender, Session};
    use futures_util::stream::{FuturesUnordered, StreamExt};

    async fn open(
        sh: &Shared,
        id: &iothub::DeviceIdentity,
    ) -> Result<
        (
            ConnectionHandle<()>,
            fe2o3_amqp::session::SessionHandle<()>,
            Sender,
        ),
        String,
    > {
        let cfg = &sh.cfg;
        let io = edgehub_mqtt_client::dial(
            &cfg.target.host,
            cfg.target.port,
            &sh.transport,
            cfg.connect_timeout,
        )
        .await
        .map_err(|e| format!("dial: {e}"))?;
        let hub = id.host.split('.').next().unwrap_or_default();
        let open = Connection::builder()
            .container_id(id.device_id.clone())
            .hostname(cfg.target.host.as_str())
            .sasl_profile(SaslProfile::Plain {
                username: format!("{}@sas.{hub}", id.device_id),
                password: id.sas_token(3600),
            })
            .open_with_stream(io);
        let mut conn = tokio::time::timeout(cfg.connect_timeout, open)
            .await
            .map_err(|_| "amqp open: timeout".to_owned())?
            .map_err(|e| format!("amqp open: {e}"))?;
        let mut session = Session::begin(&mut conn)
            .await
            .map_err(|e| format!("amqp begin: {e}"))?;
        let address = format!("/devices/{}/messages/events", id.device_id);
        let sender = Sender::attach(&mut session, format!("{}-telemetry", id.device_id), address)
            .await
            .map_err(|e| format!("amqp attach: {e}"))?;
        Ok((conn, session, sender))
    }

    pub(super) async fn device(sh: Arc<Shared>, i: usize, mut stop: watch::Receiver<bool>) {
        ramp_slot(&sh).await;
        if *stop.borrow() {
            return;
        }
        let cfg = &sh.cfg;
        let Some(id) = cfg.identities.get(i) else {
            sh.error("amqps:// needs IoT Hub mode (--connection-strings or --provision)");
            return;
        };
        let (mut conn, mut session, mut sender) = match open(&sh, id).await {
            Ok(x) => x,
            Err(e) => {
                sh.counters.connect_failures.fetch_add(1, Ordering::Relaxed);
                sh.error(e);
                return;
            }
        };
        sh.counters.connected.fetch_add(1, Ordering::Relaxed);
        let mut hist = new_hist();
        let measure_from = sh.start + cfg.warmup;
        let deadline = cfg.duration.map(|d| tokio::time::Instant::now() + d);
        let filler = vec![0x5Au8; cfg.payload_bytes.saturating_sub(8)];
        let window = cfg.inflight.max(1);
        let mut inflight = FuturesUnordered::new();
        let mut sent: u64 = 0;
        loop {
            let done = *stop.borrow()
                || deadline.is_some_and(|d| tokio::time::Instant::now() >= d)
                || cfg.count_per_device.is_some_and(|n| sent >= n);
            while !done && inflight.len() < window {
                let now = Instant::now();
                let stamp = (now - sh.start).as_nanos() as u64;
                let mut payload = Vec::with_capacity(cfg.payload_bytes.max(8));
                payload.extend_from_slice(&stamp.to_le_bytes());
                payload.extend_from_slice(&filler);
                let msg = fe2o3_amqp::types::messaging::Message::builder()
                    .body(Body::<Value>::Data(
                        vec![Data(Binary::from(payload))].into(),
                    ))
                    .build();
                // A transfer waits for link credit, which a hub that went
                // away never gives: the run's end must not wait for it.
                let far = tokio::time::Instant::now() + Duration::from_secs(3600);
                let sent_or = tokio::select! {
                    r = sender.send_batchable(msg) => Some(r),
                    _ = tokio::time::sleep_until(deadline.unwrap_or(far)) => None,
                    _ = stop.changed() => None,
                };
                match sent_or {
                    Some(Ok(fut)) => inflight.push(async move { (now, fut.await) }),
                    Some(Err(e)) => {
                        sh.error(format!("amqp send: {e}"));
                        break;
                    }
                    None => break,
                }
                sent += 1;
                sh.counters.published.fetch_add(1, Ordering::Relaxed);
                if cfg.count_per_device.is_some_and(|n| sent >= n) {
                    break;
                }
            }
            if done && inflight.is_empty() {
                break;
            }
            let wake =
                deadline.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                Some((at, outcome)) = inflight.next() => match outcome {
                    Ok(Outcome::Accepted(_)) => {
                        if at >= measure_from {
                            let _ = hist.record(at.elapsed().as_micros().max(1) as u64);
                        }
                        sh.counters.acknowledged.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(other) => sh.error(format!("amqp outcome {other:?}")),
                    Err(e) => {
                        sh.error(format!("amqp settlement: {e}"));
                        break;
                    }
                },
                _ = tokio::time::sleep_until(wake), if !done => {}
                _ = stop.changed(), if !done => {}
                // Settlements still owed at the end: a hub that went away
                // never sends them.
                _ = tokio::time::sleep(Duration::from_secs(10)), if done => break,
            }
        }
        // Closing waits for the hub's answers, which a dead hub never sends.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = sender.close().await;
            let _ = session.end().await;
            let _ = conn.close().await;
        })
        .await;
        sh.ack_hist.lock().unwrap().add(&hist).expect("same bounds");
    }
}

async fn subscriber(
    sh: Arc<Shared>,
    i: usize,
    ready: tokio::sync::mpsc::Sender<()>,
    mut stop: watch::Receiver<bool>,
) {
    let cfg = &sh.cfg;
    let mut c = match Conn::open(&sh, &format!("{}-sub-{i}", cfg.client_prefix), None).await {
        Ok(c) => c,
        Err(e) => {
            sh.error(format!("subscriber: {e}"));
            drop(ready);
            return;
        }
    };
    let qos = if cfg.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    c.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        properties: Props::default(),
        filters: vec![(
            Str::from(format!("{}/#", cfg.topic_prefix)),
            SubscriptionOptions {
                qos,
                ..Default::default()
            },
        )],
    }));
    if c.flush().await.is_err() {
        return;
    }
    let mut hist = new_hist();
    let mut ready = Some(ready);
    loop {
        tokio::select! {
            r = c.recv() => match r {
                Ok(Packet::SubAck(_)) => { ready.take(); }
                Ok(Packet::Publish(p)) => {
                    if p.payload.len() >= 8 {
                        let stamp = u64::from_le_bytes(p.payload[..8].try_into().expect("8 bytes"));
                        let now = (Instant::now() - sh.start).as_nanos() as u64;
                        let _ = hist.record((now.saturating_sub(stamp) / 1000).max(1));
                    }
                    sh.counters.delivered.fetch_add(1, Ordering::Relaxed);
                    if p.qos == QoS::AtLeastOnce {
                        c.send(&Packet::PubAck(PubResp::new(p.packet_id, 0)));
                        if c.flush().await.is_err() { break; }
                    }
                }
                Ok(_) => {}
                Err(e) => { sh.error(format!("subscriber: {e}")); break; }
            },
            _ = stop.changed() => break,
        }
    }
    sh.delivery_hist
        .lock()
        .unwrap()
        .add(&hist)
        .expect("same bounds");
}

/// Runs the load until done or `interrupt` completes; returns the report
/// (partial when interrupted).
pub async fn run(
    cfg: LoadConfig,
    interrupt: impl std::future::Future<Output = ()>,
    progress: impl Fn(Progress) + Send + 'static,
) -> Result<Report, LoadError> {
    if !cfg.identities.is_empty() {
        if cfg.identities.len() < cfg.devices {
            return Err(LoadError::Config(format!(
                "{} devices but only {} connection strings: each device needs its own identity",
                cfg.devices,
                cfg.identities.len()
            )));
        }
        if cfg.subscribers > 0 {
            return Err(LoadError::Config(
                "subscribers need generic topics; IoT Hub mode has none (use the hub's outbox)"
                    .into(),
            ));
        }
    }
    let transport = if cfg.target.tls {
        edgehub_mqtt_client::Transport::Tls(tls_connector(&cfg.ca)?)
    } else {
        edgehub_mqtt_client::Transport::Tcp
    };
    let sh = Arc::new(Shared {
        cfg: cfg.clone(),
        start: Instant::now(),
        counters: Counters::default(),
        ack_hist: Mutex::new(new_hist()),
        delivery_hist: Mutex::new(new_hist()),
        errors: Mutex::new(BTreeMap::new()),
        transport,
        last_connect: Mutex::new(None),
    });
    progress(Progress(sh.clone()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (sub_stop_tx, sub_stop_rx) = watch::channel(false);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut subs = Vec::new();
    for i in 0..cfg.subscribers {
        subs.push(tokio::spawn(subscriber(
            sh.clone(),
            i,
            ready_tx.clone(),
            sub_stop_rx.clone(),
        )));
    }
    drop(ready_tx);
    // All subscribers have their SUBACK (or failed) once the channel closes.
    let _ = tokio::time::timeout(cfg.connect_timeout, ready_rx.recv()).await;
    let started = Instant::now();
    let mut devices = Vec::with_capacity(cfg.devices);
    for i in 0..cfg.devices {
        if cfg.target.amqp {
            devices.push(tokio::spawn(amqp::device(sh.clone(), i, stop_rx.clone())));
        } else {
            devices.push(tokio::spawn(device(sh.clone(), i, stop_rx.clone())));
        }
    }
    let all = async {
        for d in devices {
            let _ = d.await;
        }
    };
    tokio::pin!(all);
    let interrupted = tokio::select! {
        _ = &mut all => false,
        _ = interrupt => {
            let _ = stop_tx.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(10), &mut all).await;
            true
        }
    };
    let elapsed = started.elapsed().as_secs_f64();
    // Give subscribers a moment for messages still in flight, then stop them.
    let expect = sh.counters.acknowledged.load(Ordering::Relaxed) * cfg.subscribers as u64;
    let until = Instant::now() + Duration::from_secs(5);
    while cfg.subscribers > 0
        && sh.counters.delivered.load(Ordering::Relaxed) < expect
        && Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = sub_stop_tx.send(true);
    for s in subs {
        let _ = s.await;
    }
    let ack_latency = Latency::from(&sh.ack_hist.lock().unwrap());
    let delivery_latency = Latency::from(&sh.delivery_hist.lock().unwrap());
    let errors = sh.errors.lock().unwrap().clone();
    let c = &sh.counters;
    let connected = c.connected.load(Ordering::Relaxed);
    let last_connect = sh
        .last_connect
        .lock()
        .unwrap()
        .map(|t| (t - started).as_secs_f64())
        .unwrap_or(0.0);
    Ok(Report {
        target: cfg.target.to_string(),
        config: Some(cfg.clone()),
        elapsed_secs: elapsed,
        connected,
        connect_failures: c.connect_failures.load(Ordering::Relaxed),
        connect_rate: if last_connect > 0.0 {
            connected as f64 / last_connect
        } else {
            connected as f64
        },
        published: c.published.load(Ordering::Relaxed),
        acknowledged: c.acknowledged.load(Ordering::Relaxed),
        delivered: c.delivered.load(Ordering::Relaxed),
        published_per_sec: c.published.load(Ordering::Relaxed) as f64 / elapsed.max(1e-9),
        acknowledged_per_sec: c.acknowledged.load(Ordering::Relaxed) as f64 / elapsed.max(1e-9),
        ack_latency,
        delivery_latency,
        errors,
        interrupted,
    })
}

/// The human-readable summary; with two reports, side by side with ratios.
pub fn summary(reports: &[&Report]) -> String {
    let mut rows: Vec<(&str, Vec<String>)> = Vec::new();
    let f0 = |v: f64| format!("{v:.0}");
    let us = |v: u64| format!("{:.2} ms", v as f64 / 1000.0);
    let col = |get: &dyn Fn(&Report) -> String| reports.iter().map(|r| get(r)).collect::<Vec<_>>();
    rows.push(("target", col(&|r| r.target.clone())));
    rows.push((
        "connected / failed",
        col(&|r| format!("{} / {}", r.connected, r.connect_failures)),
    ));
    rows.push(("connect rate (/s)", col(&|r| f0(r.connect_rate))));
    rows.push(("published", col(&|r| r.published.to_string())));
    rows.push(("acknowledged", col(&|r| r.acknowledged.to_string())));
    rows.push(("acked msgs/s", col(&|r| f0(r.acknowledged_per_sec))));
    for (name, get) in [
        ("ack p50", (|l: &Latency| l.p50_us) as fn(&Latency) -> u64),
        ("ack p90", |l| l.p90_us),
        ("ack p99", |l| l.p99_us),
        ("ack p99.9", |l| l.p999_us),
        ("ack max", |l| l.max_us),
    ] {
        rows.push((name, col(&|r| us(get(&r.ack_latency)))));
    }
    if reports.iter().any(|r| r.delivered > 0) {
        rows.push(("delivered", col(&|r| r.delivered.to_string())));
        rows.push(("delivery p50", col(&|r| us(r.delivery_latency.p50_us))));
        rows.push(("delivery p99", col(&|r| us(r.delivery_latency.p99_us))));
    }
    rows.push((
        "errors",
        col(&|r| {
            if r.errors.is_empty() {
                "none".into()
            } else {
                r.errors
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            }
        }),
    ));
    if reports.len() == 2 {
        let ratio = |a: f64, b: f64| {
            if b > 0.0 {
                format!("{:.2}x", a / b)
            } else {
                "-".into()
            }
        };
        let (a, b) = (reports[0], reports[1]);
        rows.push((
            "throughput ratio (1st/2nd)",
            vec![
                ratio(a.acknowledged_per_sec, b.acknowledged_per_sec),
                String::new(),
            ],
        ));
        rows.push((
            "p99 ack ratio (1st/2nd)",
            vec![
                ratio(a.ack_latency.p99_us as f64, b.ack_latency.p99_us as f64),
                String::new(),
            ],
        ));
    }
    let w0 = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..reports.len())
        .map(|i| {
            rows.iter()
                .map(|(_, v)| v.get(i).map_or(0, |s| s.len()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (k, vals) in rows {
        out.push_str(&format!("{k:<w0$}"));
        for (i, v) in vals.iter().enumerate() {
            out.push_str(&format!("  {v:>w$}", w = widths[i]));
        }
        out.push('\n');
    }
    if reports.iter().any(|r| r.interrupted) {
        out.push_str("(interrupted: partial report)\n");
    }
    out
}

/// Resolves a target's first address (for a clear "unreachable" message).
pub async fn resolve(t: &Target) -> std::io::Result<SocketAddr> {
    tokio::net::lookup_host((t.host.as_str(), t.port))
        .await?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))
}
