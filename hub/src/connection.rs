//! One MQTT network connection: reads and decodes packets, applies them to
//! the broker and its session, and writes responses and deliveries.
//!
//! A single task per connection selects over: socket readable, socket
//! writable (only while the write buffer holds bytes), deliveries queued for
//! its session, keep-alive deadline, takeover and server shutdown. Responses
//! and deliveries accumulate in one write buffer, so a burst of packets costs
//! one write syscall. Backpressure: deliveries are pulled from the session
//! only while the write buffer is under `TX_HIGH`; reading stops while it is
//! over `TX_PAUSE_READ` (a client that sends but never reads cannot grow it).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use edgehub_codec::{
    decode, encode, peek_connect_protocol, reason, ConnAck, Connect, DecodeError, Disconnect,
    EncodeError, Packet, Properties, Props, Protocol, PubResp, Publish, QoS, Str, SubAck,
    Subscribe, UnsubAck, Unsubscribe,
};
use futures_util::stream::{FuturesOrdered, StreamExt};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

use crate::iothub::services::Handled;
use crate::iothub::telemetry::TelemetryError;
use crate::iothub::IotHub;
use crate::pipeline::iothub_telemetry;
use edgehub_broker::auth::{AuthError, ConnectInfo, Principal};
use edgehub_broker::session::{Delivery, Message, OutState, Outgoing, PendingWill, Session};
use edgehub_broker::topic::{parse_shared, valid_filter, valid_topic_name};
use edgehub_broker::{forwarded_properties, Broker, Ending};
use edgehub_device::link::DeviceLink;
use edgehub_store::StoreError;

const TX_HIGH: usize = 64 * 1024;
const TX_PAUSE_READ: usize = 1024 * 1024;
/// How long a closing connection may take to flush its last packets.
const CLOSE_FLUSH: Duration = Duration::from_secs(2);
/// After a DISCONNECT with a reason: how long and how much of the client's
/// remaining input is read and dropped before the socket closes.
const CLOSE_DRAIN: Duration = Duration::from_secs(1);
const CLOSE_DRAIN_BYTES: usize = 1024 * 1024;

/// Why the main loop stopped.
struct Close {
    /// MQTT 5 DISCONNECT reason to send first, if any.
    reason: Option<u8>,
    ending: Ending,
    why: String,
}

impl Close {
    fn protocol(code: u8, why: impl Into<String>) -> Close {
        Close {
            reason: Some(code),
            ending: Ending::PublishWill,
            why: why.into(),
        }
    }
}

fn decode_close(e: &DecodeError) -> Close {
    let code = match e {
        DecodeError::Malformed(_) => reason::MALFORMED_PACKET,
        DecodeError::PacketTooLarge { .. } => reason::PACKET_TOO_LARGE,
        _ => reason::PROTOCOL_ERROR,
    };
    Close::protocol(code, e.to_string())
}

/// Serves one accepted connection (TLS already established) to its end.
/// The MQTT protocol head: serves MQTT 3.1.1 and 5.0 on any transport's
/// streams.
pub struct MqttHead {
    pub broker: Arc<Broker>,
    pub iothub: Option<Arc<IotHub>>,
}

impl crate::transport::Head for MqttHead {
    fn serve(
        self: Arc<Self>,
        a: crate::transport::Accepted,
        shutdown: watch::Receiver<bool>,
    ) -> crate::transport::BoxFuture {
        Box::pin(async move {
            serve(
                self.broker.clone(),
                self.iothub.clone(),
                a.stream,
                a.peer,
                a.client_chain,
                shutdown,
            )
            .await
        })
    }
}

pub async fn serve<S>(
    broker: Arc<Broker>,
    iothub: Option<Arc<IotHub>>,
    stream: S,
    peer: SocketAddr,
    peer_certificates: Option<Vec<CertificateDer<'static>>>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut rx = BytesMut::with_capacity(4096);
    let max_in = broker.limits.max_packet_size as usize;
    let first = tokio::select! {
        r = tokio::time::timeout(broker.limits.connect_timeout, read_connect(&mut rd, &mut rx, max_in)) => r,
        _ = shutdown.changed() => return,
    };
    let connect = match first {
        Err(_) => {
            debug!(%peer, "no CONNECT within the connect timeout; closing");
            return;
        }
        Ok(Err(FirstPacketError::Closed)) => return,
        Ok(Err(FirstPacketError::NotConnect(name))) => {
            debug!(%peer, packet = name, "first packet is not CONNECT; closing");
            return;
        }
        Ok(Err(FirstPacketError::Decode(e, proto))) => {
            debug!(%peer, error = %e, "bad CONNECT; closing");
            let code = match (&e, proto) {
                (DecodeError::UnsupportedProtocolVersion(_), _) => {
                    Some((Protocol::V311, reason::v3::UNACCEPTABLE_PROTOCOL_VERSION))
                }
                (DecodeError::InvalidProtocolName, _) => None,
                (_, Some(Protocol::V5)) => Some((Protocol::V5, decode_close(&e).reason.unwrap())),
                _ => None,
            };
            if let Some((proto, code)) = code {
                let mut tx = BytesMut::new();
                let ack = Packet::ConnAck(ConnAck {
                    code,
                    ..Default::default()
                });
                let _ = encode(&ack, proto, &mut tx, usize::MAX);
                let _ = tokio::time::timeout(CLOSE_FLUSH, wr.write_all(&tx)).await;
            }
            let _ = wr.shutdown().await;
            return;
        }
        Ok(Ok(c)) => c,
    };
    let Some(mut conn) = Connection::accept(
        broker,
        iothub,
        *connect,
        peer,
        peer_certificates.as_deref(),
        &mut wr,
    )
    .await
    else {
        let _ = wr.shutdown().await;
        return;
    };
    conn.broker
        .stats
        .connections
        .fetch_add(1, Ordering::Relaxed);
    let close = conn.run(&mut rd, &mut wr, rx, &mut shutdown).await;
    conn.broker
        .stats
        .connections
        .fetch_sub(1, Ordering::Relaxed);
    let told = close.reason.is_some();
    conn.finish(close, &mut wr).await;
    if told {
        // The client may still be sending (say, the rest of an oversized
        // PUBLISH). Closing with its bytes unread in our receive buffer makes
        // the kernel reset the connection, and the client then loses the
        // DISCONNECT that says why. Read and drop for a moment instead.
        let mut sink = vec![0u8; 16 * 1024];
        let mut left = CLOSE_DRAIN_BYTES;
        let _ = tokio::time::timeout(CLOSE_DRAIN, async {
            while left > 0 {
                match rd.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        })
        .await;
    }
}

enum FirstPacketError {
    Closed,
    NotConnect(&'static str),
    Decode(DecodeError, Option<Protocol>),
}

async fn read_connect<R: AsyncRead + Unpin>(
    rd: &mut R,
    rx: &mut BytesMut,
    max: usize,
) -> Result<Box<Connect>, FirstPacketError> {
    loop {
        // Anything but CONNECT is refused on its first byte, without waiting
        // for the rest of a packet that may never come (or is not MQTT at all).
        if rx.first().is_some_and(|b| *b != 0x10) {
            return Err(FirstPacketError::NotConnect("non-CONNECT packet"));
        }
        let proto = peek_connect_protocol(rx);
        match decode(rx, Protocol::V311, max) {
            Ok(Some(Packet::Connect(c))) => return Ok(c),
            Ok(Some(p)) => return Err(FirstPacketError::NotConnect(p.name())),
            Err(e) => return Err(FirstPacketError::Decode(e, proto)),
            Ok(None) => {}
        }
        match rd.read_buf(rx).await {
            Ok(0) | Err(_) => return Err(FirstPacketError::Closed),
            Ok(_) => {}
        }
    }
}

/// A publish whose PUBACK waits: telemetry on its way to the store, a
/// generic publish being recorded for persistent sessions, or one already
/// done that must be acknowledged in order after those.
struct PendingPublish {
    packet_id: u16,
    qos: QoS,
    state: Pending,
}

enum Pending {
    Done(Option<Result<u64, StoreError>>),
    Stored(edgehub_device::layer::Stored),
    Recorded(edgehub_broker::BoxFuture<Result<(), edgehub_broker::QueueStoreError>>),
}

impl PendingPublish {
    fn done(packet_id: u16, qos: QoS, r: Result<u64, StoreError>) -> PendingPublish {
        PendingPublish {
            packet_id,
            qos,
            state: Pending::Done(Some(r)),
        }
    }
}

impl std::future::Future for PendingPublish {
    type Output = (u16, QoS, Result<u64, StoreError>);

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let me = self.get_mut();
        let r = match &mut me.state {
            Pending::Done(r) => r.take().expect("polled after completion"),
            Pending::Stored(f) => match f.as_mut().poll(cx) {
                Poll::Ready(r) => r,
                Poll::Pending => return Poll::Pending,
            },
            Pending::Recorded(f) => match f.as_mut().poll(cx) {
                Poll::Ready(r) => r.map(|()| 0).map_err(store_error),
                Poll::Pending => return Poll::Pending,
            },
        };
        Poll::Ready((me.packet_id, me.qos, r))
    }
}

struct Connection {
    broker: Arc<Broker>,
    /// Twin and method requests of IoT Hub identities.
    iothub: Option<Arc<IotHub>>,
    /// An IoT Hub identity's device link: held (detached on drop) while
    /// this connection lives.
    _link: Option<DeviceLink>,
    /// Telemetry awaiting its commit, in arrival order: PUBACKs go out in
    /// the order the PUBLISHes came, while several commits are in flight.
    pending: FuturesOrdered<PendingPublish>,
    protocol: Protocol,
    peer: SocketAddr,
    client_id: Arc<str>,
    principal: Principal,
    session: Arc<Session>,
    generation: u64,
    kick: Arc<Notify>,
    will: Option<PendingWill>,
    /// Session expiry asked for in CONNECT (MQTT 5: zero may not become non-zero).
    connect_expiry: u32,
    keep_alive: Option<Duration>,
    last_read: Instant,
    /// Outgoing QoS 1/2 window: min(our limit, the client's Receive Maximum).
    out_window: usize,
    client_max_packet: usize,
    client_alias_max: u16,
    out_aliases: HashMap<Str, u16>,
    in_aliases: HashMap<u16, Str>,
    /// MQTT 5 Request Problem Information: reason strings allowed beyond
    /// CONNACK, PUBLISH and DISCONNECT.
    problem_info: bool,
    tx: BytesMut,
}

impl Connection {
    /// Authenticates, attaches the session and writes CONNACK. `None` when
    /// the connection was refused (CONNACK with the reason already written).
    async fn accept<W: AsyncWrite + Unpin>(
        broker: Arc<Broker>,
        iothub: Option<Arc<IotHub>>,
        c: Connect,
        peer: SocketAddr,
        certs: Option<&[CertificateDer<'static>]>,
        wr: &mut W,
    ) -> Option<Connection> {
        let v5 = c.protocol == Protocol::V5;
        let refuse = |code5: u8, code3: u8, why: &str| {
            let mut tx = BytesMut::new();
            let mut ack = ConnAck {
                code: if v5 { code5 } else { code3 },
                ..Default::default()
            };
            if v5 && c.properties.request_problem_information != Some(0) {
                ack.properties.reason_string = Some(Str::from(why));
            }
            let _ = encode(&Packet::ConnAck(ack), c.protocol, &mut tx, usize::MAX);
            tx
        };
        let mut refusal: Option<(BytesMut, String)> = None;
        if c.properties.authentication_method.is_some() {
            refusal = Some((
                refuse(
                    reason::BAD_AUTHENTICATION_METHOD,
                    reason::v3::NOT_AUTHORIZED,
                    "enhanced authentication is not supported",
                ),
                "enhanced authentication requested".into(),
            ));
        }
        if c.client_id.is_empty() && !v5 && !c.clean_start {
            refusal = Some((
                refuse(0, reason::v3::IDENTIFIER_REJECTED, ""),
                "empty client id without clean session".into(),
            ));
        }
        if let Some(w) = &c.will {
            if !valid_topic_name(&w.topic) {
                refusal = Some((
                    refuse(
                        reason::TOPIC_NAME_INVALID,
                        reason::v3::NOT_AUTHORIZED,
                        "invalid will topic",
                    ),
                    format!("invalid will topic {:?}", w.topic.as_str()),
                ));
            }
        }
        let mut assigned = None;
        let client_id: Arc<str> = if c.client_id.is_empty() {
            let id = format!("auto-{:016x}", rand::random::<u64>());
            if v5 {
                assigned = Some(Str::from(id.as_str()));
            }
            id.into()
        } else {
            c.client_id.as_str().into()
        };
        let principal = if refusal.is_none() {
            let info = ConnectInfo {
                protocol: c.protocol,
                client_id: &client_id,
                username: c.username.as_deref(),
                password: c.password.as_deref(),
                peer,
                peer_certificates: certs,
            };
            match broker.authenticator.authenticate(&info) {
                Ok(p) => Some(p),
                Err(e) => {
                    let (c5, c3) = match &e {
                        AuthError::NotAuthorized(_) => {
                            (reason::NOT_AUTHORIZED, reason::v3::NOT_AUTHORIZED)
                        }
                        AuthError::BadCredentials(_) => (
                            reason::BAD_USER_NAME_OR_PASSWORD,
                            reason::v3::BAD_USER_NAME_OR_PASSWORD,
                        ),
                        AuthError::Unavailable(_) => {
                            (reason::SERVER_UNAVAILABLE, reason::v3::SERVER_UNAVAILABLE)
                        }
                    };
                    let public = match &e {
                        AuthError::NotAuthorized(_) => "not authorized",
                        AuthError::BadCredentials(_) => "bad user name or password",
                        AuthError::Unavailable(_) => "server unavailable",
                    };
                    refusal = Some((refuse(c5, c3, public), e.to_string()));
                    None
                }
            }
        } else {
            None
        };
        if let (Some(p), Some(w)) = (&principal, &c.will) {
            if !broker.authorizer.may_publish(p, &w.topic) {
                refusal = Some((
                    refuse(
                        reason::NOT_AUTHORIZED,
                        reason::v3::NOT_AUTHORIZED,
                        "not authorized to publish to the will topic",
                    ),
                    format!("will topic {:?} not authorized", w.topic.as_str()),
                ));
            }
        }
        if let Some((tx, why)) = refusal {
            info!(%peer, client = %client_id, reason = %why, "connection refused");
            let _ = tokio::time::timeout(CLOSE_FLUSH, async {
                wr.write_all(&tx).await?;
                wr.flush().await
            })
            .await;
            return None;
        }
        let principal = principal.expect("set when not refused");
        // An IoT Hub identity's session is keyed by its name as registered,
        // whatever the case of its client id: "Dev1" and "dev1" are one
        // device (the second connection takes over), and replies addressed
        // to the identity find its session.
        let client_id = if principal.anonymous {
            client_id
        } else {
            principal.name.clone()
        };

        let limits = &broker.limits;
        let mut keep_alive = c.keep_alive;
        let mut server_keep_alive = None;
        if v5
            && limits.max_keep_alive > 0
            && (keep_alive == 0 || keep_alive > limits.max_keep_alive)
        {
            keep_alive = limits.max_keep_alive;
            server_keep_alive = Some(keep_alive);
        }
        let expiry = if v5 {
            c.properties.session_expiry_interval.unwrap_or(0)
        } else if c.clean_start {
            0
        } else {
            u32::MAX
        };
        let attached = broker.attach(client_id.clone(), c.clean_start, c.protocol, expiry);
        let mut ack = ConnAck {
            session_present: attached.session_present,
            code: reason::SUCCESS,
            properties: Props::default(),
        };
        if v5 {
            let p = &mut ack.properties;
            p.receive_maximum = Some(limits.receive_maximum);
            p.maximum_packet_size = Some(limits.max_packet_size);
            p.topic_alias_maximum = Some(limits.topic_alias_maximum);
            p.assigned_client_identifier = assigned;
            p.server_keep_alive = server_keep_alive;
        }
        let will = c.will.map(|will| PendingWill {
            will,
            principal: principal.clone(),
        });
        debug!(%peer, client = %client_id, protocol = ?c.protocol, clean_start = c.clean_start,
            session_present = attached.session_present, keep_alive, "client connected");
        let (principal_anonymous, link_identity, link_kick) = (
            principal.anonymous,
            client_id.clone(),
            attached.kick.clone(),
        );
        let mut conn = Connection {
            protocol: c.protocol,
            peer,
            client_id,
            principal,
            session: attached.session,
            generation: attached.generation,
            kick: attached.kick,
            will,
            connect_expiry: expiry,
            keep_alive: (keep_alive > 0).then(|| Duration::from_millis(keep_alive as u64 * 1500)),
            last_read: Instant::now(),
            out_window: limits
                .max_inflight
                .min(c.properties.receive_maximum.unwrap_or(u16::MAX))
                as usize,
            client_max_packet: c.properties.maximum_packet_size.unwrap_or(u32::MAX) as usize,
            client_alias_max: c.properties.topic_alias_maximum.unwrap_or(0),
            out_aliases: HashMap::new(),
            in_aliases: HashMap::new(),
            problem_info: c.properties.request_problem_information != Some(0),
            tx: BytesMut::with_capacity(8192),
            broker,
            _link: match &iothub {
                Some(h) if !principal_anonymous => Some(h.layer.links.attach(
                    link_identity,
                    Arc::new(crate::iothub::deliveries::MqttLink::new(
                        h.deliveries.clone(),
                        link_kick,
                    )),
                )),
                _ => None,
            },
            iothub,
            pending: FuturesOrdered::new(),
        };
        conn.send(Packet::ConnAck(ack));
        conn.resend_inflight();
        Some(conn)
    }

    async fn run<R, W>(
        &mut self,
        rd: &mut R,
        wr: &mut W,
        mut rx: BytesMut,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Close
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let max_in = self.broker.limits.max_packet_size as usize;
        // Commits in flight per connection before it stops reading; MQTT 5
        // clients are told the same number as Receive Maximum.
        let max_pending = self.broker.limits.receive_maximum.max(1) as usize;
        let kick = self.kick.clone();
        let session = self.session.clone();
        // Packets that arrived together with CONNECT.
        if let Err(c) = self.drain(&mut rx, max_in) {
            return c;
        }
        let mut unflushed = false;
        loop {
            self.fill_from_session();
            let deadline = self
                .keep_alive
                .map(|ka| tokio::time::Instant::from_std(self.last_read + ka));
            let credentials_expire = self.principal.valid_until.map(|until| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                tokio::time::Instant::now() + Duration::from_secs(until.saturating_sub(now))
            });
            tokio::select! {
                _ = kick.notified() => {
                    if session.revoked.load(Ordering::Acquire) {
                        return Close {
                            reason: Some(reason::NOT_AUTHORIZED),
                            ending: Ending::Normal,
                            why: "identity deleted from the registry".into(),
                        };
                    }
                    return Close {
                        reason: Some(reason::SESSION_TAKEN_OVER),
                        ending: Ending::PublishWill,
                        why: "session taken over by a new connection".into(),
                    };
                }
                _ = shutdown.changed() => {
                    return Close {
                        reason: Some(reason::SERVER_SHUTTING_DOWN),
                        ending: Ending::ServerShutdown,
                        why: "server shutting down".into(),
                    };
                }
                r = rd.read_buf(&mut rx), if self.tx.len() < TX_PAUSE_READ && self.pending.len() < max_pending => {
                    match r {
                        Ok(0) => return Close { reason: None, ending: Ending::PublishWill, why: "connection closed by client without DISCONNECT".into() },
                        Err(e) => return Close { reason: None, ending: Ending::PublishWill, why: format!("read error: {e}") },
                        Ok(_) => {
                            self.last_read = Instant::now();
                            if let Err(c) = self.drain(&mut rx, max_in) {
                                return c;
                            }
                        }
                    }
                }
                // Once a batch is written out it is flushed: transports that
                // gather writes (WebSocket messages) send it then; TCP and
                // TLS have nothing left to do.
                r = write_or_flush(wr, &mut self.tx), if !self.tx.is_empty() || unflushed => {
                    match r {
                        Err(e) => return Close { reason: None, ending: Ending::PublishWill, why: format!("write error: {e}") },
                        Ok(wrote) => unflushed = wrote,
                    }
                }
                _ = session.wake.notified() => {}
                Some((packet_id, qos, r)) = self.pending.next(), if !self.pending.is_empty() => {
                    if let Err(c) = self.on_stored(packet_id, qos, r) {
                        return c;
                    }
                }
                _ = sleep_until_opt(deadline) => {
                    return Close {
                        reason: Some(reason::KEEP_ALIVE_TIMEOUT),
                        ending: Ending::PublishWill,
                        why: "keep-alive timeout".into(),
                    };
                }
                _ = sleep_until_opt(credentials_expire) => {
                    // The client reconnects with a fresh token (the SDKs renew
                    // theirs before expiry); until then it is not authorized.
                    return Close {
                        reason: Some(reason::NOT_AUTHORIZED),
                        ending: Ending::PublishWill,
                        why: "SAS token expired".into(),
                    };
                }
            }
        }
    }

    /// Decodes and handles every whole packet in `rx`.
    fn drain(&mut self, rx: &mut BytesMut, max_in: usize) -> Result<(), Close> {
        loop {
            match decode(rx, self.protocol, max_in) {
                Ok(Some(p)) => self.handle(p)?,
                Ok(None) => return Ok(()),
                Err(e) => return Err(decode_close(&e)),
            }
        }
    }

    async fn finish<W: AsyncWrite + Unpin>(mut self, close: Close, wr: &mut W) {
        debug!(peer = %self.peer, client = %self.client_id, reason = %close.why, "connection closing");
        // The session goes offline before the socket closes, so a client that
        // sees the close knows its session no longer takes QoS 0 messages.
        self.broker.detach(
            &self.session,
            self.generation,
            close.ending,
            self.will.take(),
        );
        if let (Some(code), Protocol::V5) = (close.reason, self.protocol) {
            // The reason string tells the user why (and paho 2.1 only reads the
            // reason code of a DISCONNECT longer than two bytes).
            self.send(Packet::Disconnect(Disconnect {
                reason: code,
                properties: Properties {
                    reason_string: Some(Str::from(close.why.as_str())),
                    ..Default::default()
                }
                .into(),
            }));
        }
        if !self.tx.is_empty() {
            let _ = tokio::time::timeout(CLOSE_FLUSH, wr.write_all(&self.tx)).await;
        }
        let _ = tokio::time::timeout(CLOSE_FLUSH, wr.shutdown()).await;
    }

    /// Encodes a control packet within the client's maximum packet size,
    /// dropping optional properties (reason strings, user properties) first
    /// when they would make it too large (MQTT 5.0 3.1.2.25).
    fn send(&mut self, mut p: Packet) {
        // CONNACK and DISCONNECT may always carry a reason string (3.1.2.11.7).
        if !self.problem_info && !matches!(p, Packet::ConnAck(_) | Packet::Disconnect(_)) {
            strip_problem_info(&mut p);
        }
        match encode(&p, self.protocol, &mut self.tx, self.client_max_packet) {
            Ok(_) => {}
            Err(_) => {
                strip_problem_info(&mut p);
                if let Err(e) = encode(&p, self.protocol, &mut self.tx, self.client_max_packet) {
                    debug!(client = %self.client_id, packet = p.name(), error = %e, "cannot send packet");
                }
            }
        }
    }

    fn reason_props(&self, why: &str) -> Props {
        let mut p = Props::default();
        if self.protocol == Protocol::V5 && self.problem_info {
            p.reason_string = Some(Str::from(why));
        }
        p
    }

    /// The last acknowledgement of an outgoing message (PUBACK for QoS 1,
    /// PUBCOMP for QoS 2) frees its packet id and window slot. Acks for ids
    /// not in that state are ignored (a late duplicate after a resend).
    fn complete(&self, packet_id: u16, expected: OutState) {
        let mut st = self.session.state.lock();
        if st.generation == self.generation
            && st
                .inflight
                .get(&packet_id)
                .is_some_and(|o| o.state == expected)
        {
            if let Some(o) = st.inflight.remove(&packet_id) {
                if let Some(d) = &o.delivery.message.delivered {
                    d.acknowledged();
                }
                if let Some(token) = o.delivery.stored {
                    self.broker.session_acked(&self.client_id, token);
                }
            }
            self.broker
                .stats
                .messages_sent
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    fn handle(&mut self, p: Packet) -> Result<(), Close> {
        let v5 = self.protocol == Protocol::V5;
        match p {
            Packet::Publish(p) => self.on_publish(p),
            Packet::PubAck(r) => {
                self.complete(r.packet_id, OutState::AwaitPubAck);
                Ok(())
            }
            Packet::PubRec(r) => {
                let mut st = self.session.state.lock();
                if st.generation != self.generation {
                    return Ok(());
                }
                if v5 && r.reason >= 0x80 {
                    // The client refused the message: the exchange ends here.
                    st.inflight.remove(&r.packet_id);
                    return Ok(());
                }
                let known = match st.inflight.get_mut(&r.packet_id) {
                    Some(o) if o.state != OutState::AwaitPubAck => {
                        o.state = OutState::AwaitPubComp;
                        true
                    }
                    _ => false,
                };
                drop(st);
                let code = if known || !v5 {
                    reason::SUCCESS
                } else {
                    reason::PACKET_IDENTIFIER_NOT_FOUND
                };
                self.send(Packet::PubRel(PubResp::new(r.packet_id, code)));
                Ok(())
            }
            Packet::PubComp(r) => {
                self.complete(r.packet_id, OutState::AwaitPubComp);
                Ok(())
            }
            Packet::PubRel(r) => {
                let known = {
                    let mut st = self.session.state.lock();
                    st.generation == self.generation && st.incoming_qos2.remove(&r.packet_id)
                };
                let code = if known || !v5 {
                    reason::SUCCESS
                } else {
                    reason::PACKET_IDENTIFIER_NOT_FOUND
                };
                self.send(Packet::PubComp(PubResp::new(r.packet_id, code)));
                Ok(())
            }
            Packet::Subscribe(s) => self.on_subscribe(s),
            Packet::Unsubscribe(u) => self.on_unsubscribe(u),
            Packet::PingReq => {
                self.send(Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect(d) => {
                if let Some(e) = d.properties.session_expiry_interval {
                    if self.connect_expiry == 0 && e != 0 {
                        return Err(Close::protocol(
                            reason::PROTOCOL_ERROR,
                            "DISCONNECT sets a session expiry after CONNECT set none",
                        ));
                    }
                    let mut st = self.session.state.lock();
                    if st.generation == self.generation {
                        st.expiry_interval = e;
                    }
                }
                Err(Close {
                    reason: None,
                    ending: if d.reason == reason::DISCONNECT_WITH_WILL {
                        Ending::PublishWill
                    } else {
                        Ending::Normal
                    },
                    why: format!("client sent DISCONNECT (reason 0x{:02x})", d.reason),
                })
            }
            Packet::Connect(_) => Err(Close::protocol(reason::PROTOCOL_ERROR, "second CONNECT")),
            Packet::Auth(_) => Err(Close::protocol(
                reason::PROTOCOL_ERROR,
                "AUTH without enhanced authentication",
            )),
            other => Err(Close::protocol(
                reason::PROTOCOL_ERROR,
                format!("{} is a server-to-client packet", other.name()),
            )),
        }
    }

    fn on_publish(&mut self, p: Publish) -> Result<(), Close> {
        let v5 = self.protocol == Protocol::V5;
        let Publish {
            qos,
            retain,
            mut topic,
            packet_id,
            properties,
            payload,
            ..
        } = p;
        if v5 && !properties.subscription_identifiers.is_empty() {
            // MQTT-3.3.4-6: only the server puts them on a PUBLISH.
            return Err(Close::protocol(
                reason::PROTOCOL_ERROR,
                "a PUBLISH from a client must not carry a Subscription Identifier",
            ));
        }
        if let (true, Some(alias)) = (v5, properties.topic_alias) {
            if alias == 0 || alias > self.broker.limits.topic_alias_maximum {
                return Err(Close::protocol(
                    reason::TOPIC_ALIAS_INVALID,
                    format!("topic alias {alias} out of range"),
                ));
            }
            if topic.is_empty() {
                topic = self.in_aliases.get(&alias).cloned().ok_or_else(|| {
                    Close::protocol(
                        reason::PROTOCOL_ERROR,
                        format!("topic alias {alias} used before it was set"),
                    )
                })?;
            } else {
                self.in_aliases.insert(alias, topic.clone());
            }
        }
        if !valid_topic_name(&topic) {
            return Err(Close::protocol(
                reason::TOPIC_NAME_INVALID,
                format!("invalid topic name {:?}", topic.as_str()),
            ));
        }
        if qos == QoS::ExactlyOnce {
            let st = self.session.state.lock();
            if st.incoming_qos2.contains(&packet_id) {
                // A retransmission of a message we already accepted: answer
                // again, route nothing (exactly once).
                drop(st);
                self.send(Packet::PubRec(PubResp::new(packet_id, reason::SUCCESS)));
                return Ok(());
            }
            if st.incoming_qos2.len() >= self.broker.limits.receive_maximum as usize {
                return Err(Close::protocol(
                    reason::RECEIVE_MAXIMUM_EXCEEDED,
                    "more QoS 2 messages in flight than Receive Maximum",
                ));
            }
        }
        let refuse = |code: u8| -> Option<Packet> {
            let r = PubResp::new(packet_id, code);
            match qos {
                QoS::AtMostOnce => None,
                QoS::AtLeastOnce => Some(Packet::PubAck(r)),
                QoS::ExactlyOnce => Some(Packet::PubRec(r)),
            }
        };
        if !self.broker.authorizer.may_publish(&self.principal, &topic) {
            if !v5 {
                return Err(Close::protocol(
                    reason::NOT_AUTHORIZED,
                    format!("not authorized to publish to {:?}", topic.as_str()),
                ));
            }
            debug!(client = %self.client_id, topic = %topic, "publish not authorized");
            if let Some(mut r) = refuse(reason::NOT_AUTHORIZED) {
                set_reason_props(&mut r, self.reason_props("not authorized"));
                self.send(r);
            }
            return Ok(());
        }
        if v5
            && properties.payload_format_indicator == Some(1)
            && std::str::from_utf8(&payload).is_err()
        {
            if let Some(mut r) = refuse(reason::PAYLOAD_FORMAT_INVALID) {
                set_reason_props(&mut r, self.reason_props("payload is not UTF-8"));
                self.send(r);
            }
            return Ok(());
        }
        if !self.principal.anonymous && topic.starts_with("$iothub/") {
            return self.on_iothub_request(qos, packet_id, &topic, payload);
        }
        if !self.principal.anonymous {
            if let Some(iothub) = self.iothub.clone() {
                let identity = self.principal.name.clone();
                match iothub_telemetry(&identity, &topic, payload.clone(), retain) {
                    Err(TelemetryError::NotTelemetry(_)) => {}
                    parsed => return self.on_telemetry(&iothub, qos, packet_id, parsed),
                }
            }
        }
        let (properties, expiry) = forwarded_properties(properties);
        let msg = Arc::new(Message {
            topic,
            payload,
            qos,
            retain,
            properties,
            expires_at: expiry.map(|s| Instant::now() + Duration::from_secs(s as u64)),
            origin: Some(self.client_id.clone()),
            delivered: None,
        });
        let (queued, durable) = self.broker.publish_durable(msg);
        let code = if queued == 0 && v5 {
            reason::NO_MATCHING_SUBSCRIBERS
        } else {
            reason::SUCCESS
        };
        if durable.is_some() || (qos != QoS::AtMostOnce && !self.pending.is_empty()) {
            // Acknowledged once recorded for the persistent sessions it goes
            // to, and in order with the publishes still waiting to be.
            let fut = match durable {
                Some(f) => PendingPublish {
                    packet_id,
                    qos,
                    state: Pending::Recorded(f),
                },
                None => PendingPublish::done(packet_id, qos, Ok(0)),
            };
            self.pending.push_back(fut);
            return Ok(());
        }
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.send(Packet::PubAck(PubResp::new(packet_id, code))),
            QoS::ExactlyOnce => {
                {
                    let mut st = self.session.state.lock();
                    if st.generation == self.generation {
                        st.incoming_qos2.insert(packet_id);
                    }
                }
                self.send(Packet::PubRec(PubResp::new(packet_id, code)));
            }
        }
        Ok(())
    }

    /// A twin request or method answer of an IoT Hub identity: acknowledged
    /// at once, answered on the identity's own session.
    fn on_iothub_request(
        &mut self,
        qos: QoS,
        packet_id: u16,
        topic: &str,
        payload: bytes::Bytes,
    ) -> Result<(), Close> {
        if qos == QoS::ExactlyOnce {
            return Err(Close::protocol(
                reason::QOS_NOT_SUPPORTED,
                "IoT Hub topics do not support QoS 2; use QoS 0 or 1",
            ));
        }
        let handled = match &self.iothub {
            Some(h) => {
                crate::iothub::services::on_publish(&h.layer, &self.principal.name, topic, payload)
            }
            None => Handled::Unknown,
        };
        if handled == Handled::Unknown {
            return Err(Close::protocol(
                reason::TOPIC_NAME_INVALID,
                format!("{topic:?} is not an IoT Hub request topic this gateway serves"),
            ));
        }
        if qos == QoS::AtLeastOnce {
            self.send(Packet::PubAck(PubResp::new(packet_id, reason::SUCCESS)));
        }
        Ok(())
    }

    /// IoT Hub telemetry: routed and stored, acknowledged once durable.
    fn on_telemetry(
        &mut self,
        iothub: &IotHub,
        qos: QoS,
        packet_id: u16,
        parsed: Result<edgehub_router::Message, TelemetryError>,
    ) -> Result<(), Close> {
        if qos == QoS::ExactlyOnce {
            // As IoT Hub: QoS 2 is not supported and closes the connection.
            return Err(Close::protocol(
                reason::QOS_NOT_SUPPORTED,
                "IoT Hub telemetry does not support QoS 2; use QoS 0 or 1",
            ));
        }
        let msg = match parsed {
            Ok(m) => m,
            Err(e) => {
                if self.protocol != Protocol::V5 {
                    return Err(Close::protocol(reason::TOPIC_NAME_INVALID, e.to_string()));
                }
                debug!(client = %self.client_id, error = %e, "telemetry refused");
                if qos == QoS::AtLeastOnce {
                    let mut r = Packet::PubAck(PubResp::new(packet_id, reason::TOPIC_NAME_INVALID));
                    set_reason_props(&mut r, self.reason_props(&e.to_string()));
                    self.send(r);
                }
                return Ok(());
            }
        };
        let fut = match iothub.layer.send_telemetry(&self.principal.name, msg) {
            Ok(Some(stored)) => PendingPublish {
                packet_id,
                qos,
                state: Pending::Stored(stored),
            },
            // No route took it: counted and dropped, yet acknowledged (the
            // sender did nothing wrong), in order with the others.
            Ok(None) => PendingPublish::done(packet_id, qos, Ok(0)),
            Err(e) => PendingPublish::done(packet_id, qos, Err(e)),
        };
        self.pending.push_back(fut);
        Ok(())
    }

    /// A telemetry commit finished: acknowledge, or tell the sender why not.
    fn on_stored(
        &mut self,
        packet_id: u16,
        qos: QoS,
        r: Result<u64, StoreError>,
    ) -> Result<(), Close> {
        match r {
            Ok(_) => {
                match qos {
                    QoS::AtMostOnce => {}
                    QoS::AtLeastOnce => {
                        self.send(Packet::PubAck(PubResp::new(packet_id, reason::SUCCESS)))
                    }
                    QoS::ExactlyOnce => {
                        {
                            let mut st = self.session.state.lock();
                            if st.generation == self.generation {
                                st.incoming_qos2.insert(packet_id);
                            }
                        }
                        self.send(Packet::PubRec(PubResp::new(packet_id, reason::SUCCESS)));
                    }
                }
                Ok(())
            }
            Err(e) => {
                let why = format!("message not accepted: {e}");
                warn!(client = %self.client_id, "{why}");
                if self.protocol != Protocol::V5 {
                    // MQTT 3.1.1 has no negative PUBACK: closing is the only
                    // way to tell the sender it was not stored.
                    return Err(Close {
                        reason: None,
                        ending: Ending::PublishWill,
                        why,
                    });
                }
                if qos != QoS::AtMostOnce {
                    let code = if e.is_quota() {
                        reason::QUOTA_EXCEEDED
                    } else {
                        reason::UNSPECIFIED_ERROR
                    };
                    let resp = PubResp::new(packet_id, code);
                    let mut r = if qos == QoS::AtLeastOnce {
                        Packet::PubAck(resp)
                    } else {
                        Packet::PubRec(resp)
                    };
                    set_reason_props(&mut r, self.reason_props(&why));
                    self.send(r);
                }
                Ok(())
            }
        }
    }

    fn on_subscribe(&mut self, s: Subscribe) -> Result<(), Close> {
        let v5 = self.protocol == Protocol::V5;
        let sub_id = s.properties.subscription_identifiers.first().copied();
        let mut reasons = Vec::with_capacity(s.filters.len());
        let mut retained = Vec::new();
        for (filter, opts) in &s.filters {
            let shared = parse_shared(filter);
            let valid = match shared {
                Err(_) => false,
                Ok(None) => valid_filter(filter),
                Ok(Some(_)) => true,
            };
            if !valid {
                reasons.push(if v5 {
                    reason::TOPIC_FILTER_INVALID
                } else {
                    reason::v3::SUBACK_FAILURE
                });
                continue;
            }
            let shared = shared.ok().flatten();
            if v5 && shared.is_some() && opts.no_local {
                return Err(Close::protocol(
                    reason::PROTOCOL_ERROR,
                    "no-local set on a shared subscription",
                ));
            }
            // A shared subscription reaches what its inner filter matches:
            // that is what must be authorized, never the `$share/…` form.
            let reaches: &str = match shared {
                Some((_, inner)) => inner,
                None => filter,
            };
            if !self
                .broker
                .authorizer
                .may_subscribe(&self.principal, reaches)
            {
                debug!(client = %self.client_id, filter = %filter, "subscribe not authorized");
                reasons.push(if v5 {
                    reason::NOT_AUTHORIZED
                } else {
                    reason::v3::SUBACK_FAILURE
                });
                continue;
            }
            let Some(existed) =
                self.broker
                    .subscribe(&self.session, self.generation, filter, *opts, sub_id)
            else {
                return Err(Close {
                    reason: Some(reason::SESSION_TAKEN_OVER),
                    ending: Ending::PublishWill,
                    why: "session taken over".into(),
                });
            };
            reasons.push(opts.qos as u8);
            let send_retained = shared.is_none()
                && match opts.retain_handling {
                    0 => true,
                    1 => !existed,
                    _ => false,
                };
            if send_retained {
                for m in self.broker.retained_matching(filter) {
                    retained.push(Delivery {
                        qos: m.qos.min(opts.qos),
                        message: m,
                        retain: true,
                        subscription_ids: sub_id.into_iter().collect(),
                        stored: None,
                    });
                }
            }
        }
        self.send(Packet::SubAck(SubAck {
            packet_id: s.packet_id,
            properties: Props::default(),
            reasons,
        }));
        for d in retained {
            self.session
                .enqueue(d, self.broker.limits.max_queued_messages);
        }
        Ok(())
    }

    fn on_unsubscribe(&mut self, u: Unsubscribe) -> Result<(), Close> {
        let mut reasons = Vec::with_capacity(u.filters.len());
        for f in &u.filters {
            let existed = self
                .broker
                .unsubscribe(&self.session, self.generation, f)
                .unwrap_or(false);
            reasons.push(if existed {
                reason::SUCCESS
            } else {
                reason::NO_SUBSCRIPTION_EXISTED
            });
        }
        self.send(Packet::UnsubAck(UnsubAck {
            packet_id: u.packet_id,
            properties: Props::default(),
            reasons,
        }));
        Ok(())
    }

    /// After a session resumes: unacknowledged PUBLISHes again with DUP set,
    /// PUBRELs again for those already received (MQTT 5.0 4.4).
    fn resend_inflight(&mut self) {
        let session = self.session.clone();
        let st = session.state.lock();
        let pending: Vec<(u16, OutState, Delivery)> = st
            .inflight
            .iter()
            .map(|(id, o)| (*id, o.state, o.delivery.clone()))
            .collect();
        drop(st);
        for (id, state, d) in pending {
            match state {
                OutState::AwaitPubComp => {
                    self.send(Packet::PubRel(PubResp::new(id, reason::SUCCESS)));
                }
                _ => {
                    let _ = self.encode_delivery(&d, id, true);
                }
            }
        }
    }

    /// Moves queued deliveries into the write buffer while the in-flight
    /// window and the buffer allow.
    fn fill_from_session(&mut self) {
        if self.tx.len() >= TX_HIGH {
            return;
        }
        let session = self.session.clone();
        let mut st = session.state.lock();
        if st.generation != self.generation {
            return;
        }
        let now = Instant::now();
        while self.tx.len() < TX_HIGH {
            let Some(front) = st.queue.front() else {
                break;
            };
            if front.qos != QoS::AtMostOnce && st.inflight.len() >= self.out_window {
                break;
            }
            let d = st.queue.pop_front().expect("front exists");
            if d.message.expired(now) {
                self.broker
                    .stats
                    .messages_expired
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(token) = d.stored {
                    self.broker.session_acked(&self.client_id, token);
                }
                continue;
            }
            let packet_id = if d.qos == QoS::AtMostOnce {
                0
            } else {
                match st.allocate_packet_id() {
                    Some(id) => id,
                    None => {
                        st.queue.push_front(d);
                        break;
                    }
                }
            };
            match self.encode_delivery(&d, packet_id, false) {
                Ok(()) => {
                    if d.qos == QoS::AtMostOnce {
                        if let Some(done) = &d.message.delivered {
                            done.acknowledged();
                        }
                        self.broker
                            .stats
                            .messages_sent
                            .fetch_add(1, Ordering::Relaxed);
                    } else {
                        let state = if d.qos == QoS::AtLeastOnce {
                            OutState::AwaitPubAck
                        } else {
                            OutState::AwaitPubRec
                        };
                        st.inflight
                            .insert(packet_id, Outgoing { delivery: d, state });
                    }
                }
                Err(EncodeError::PacketTooLarge { size, max }) => {
                    // MQTT 5.0 3.1.2.25: discard, as if delivered.
                    debug!(client = %self.client_id, size, max,
                        "message larger than the client's maximum packet size; discarded");
                    if let Some(token) = d.stored {
                        self.broker.session_acked(&self.client_id, token);
                    }
                    // An endpoint executor's message stays stored and is
                    // offered again after its lock duration (a smaller
                    // packet limit may come with the next connection);
                    // reporting it lost would offer it again at once.
                    if let Some(done) = &d.message.delivered {
                        done.discarded();
                    }
                    self.broker
                        .stats
                        .messages_dropped_too_large
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => debug!(client = %self.client_id, error = %e, "message not encodable"),
            }
        }
    }

    fn encode_delivery(
        &mut self,
        d: &Delivery,
        packet_id: u16,
        dup: bool,
    ) -> Result<(), EncodeError> {
        let m = &d.message;
        let mut topic = m.topic.clone();
        let mut properties = Props::default();
        let mut new_alias = None;
        if self.protocol == Protocol::V5 {
            properties = m.properties.clone();
            if !d.subscription_ids.is_empty() {
                properties.subscription_identifiers = d.subscription_ids.clone();
            }
            if let Some(at) = m.expires_at {
                let left = at.saturating_duration_since(Instant::now());
                properties.message_expiry_interval = Some(left.as_secs().max(1) as u32);
            }
            if self.client_alias_max > 0 {
                if let Some(a) = self.out_aliases.get(&topic) {
                    properties.topic_alias = Some(*a);
                    topic = Str::default();
                } else if self.out_aliases.len() < self.client_alias_max as usize {
                    let a = self.out_aliases.len() as u16 + 1;
                    properties.topic_alias = Some(a);
                    new_alias = Some(a);
                }
            }
        }
        let p = Packet::Publish(Publish {
            dup,
            qos: d.qos,
            retain: d.retain,
            topic,
            packet_id,
            properties,
            payload: m.payload.clone(),
        });
        encode(&p, self.protocol, &mut self.tx, self.client_max_packet)?;
        if let Some(a) = new_alias {
            self.out_aliases.insert(m.topic.clone(), a);
        }
        Ok(())
    }
}

fn strip_problem_info(p: &mut Packet) {
    let props = match p {
        Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) => {
            &mut r.properties
        }
        Packet::SubAck(s) => &mut s.properties,
        Packet::UnsubAck(u) => &mut u.properties,
        Packet::Disconnect(d) => &mut d.properties,
        Packet::ConnAck(c) => &mut c.properties,
        _ => return,
    };
    props.reason_string = None;
    props.user_properties.clear();
}

fn set_reason_props(p: &mut Packet, props: Props) {
    if let Packet::PubAck(r) | Packet::PubRec(r) = p {
        r.properties = props;
    }
}

/// The store's error back from the broker's boxed one (the hub's session
/// queue store produces nothing else).
fn store_error(e: edgehub_broker::QueueStoreError) -> StoreError {
    match e.0.downcast::<StoreError>() {
        Ok(e) => *e,
        Err(other) => StoreError::Corrupt(other.to_string()),
    }
}

/// Writes what `tx` holds, or flushes once it is empty; true when it wrote.
async fn write_or_flush<W: AsyncWrite + Unpin>(
    wr: &mut W,
    tx: &mut BytesMut,
) -> std::io::Result<bool> {
    if tx.is_empty() {
        wr.flush().await?;
        return Ok(false);
    }
    wr.write_buf(tx).await?;
    Ok(true)
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
