//! The upstream link over AMQP: one AMQPS connection to the parent carries
//! every downstream identity, each proven with a CBS `put-token` (edgeHub's
//! default: ten thousand devices behind a gateway are one connection
//! upstream, not ten thousand). Each identity has a session of its own on
//! that connection with its telemetry sender and, while the identity is
//! connected here, its C2D receiver and its twin and method link pairs; the
//! session ends when the identity leaves, so the parent sees it go. In chain
//! mode the token is this edge device's, and every link names the identity
//! it acts for in the `com.microsoft:auth-chain` link property.
//!
//! The guarantees are the MQTT link's: store order per identity with a
//! window in flight, a message leaves the store only once the parent
//! settled it Accepted, one backoff shared by all. A message the parent
//! rejects as malformed or too large is dropped with a warning (sending it
//! again would be refused again and hold back everything behind it); every
//! other rejection (disk budget, unauthorized, internal) keeps it stored
//! and retries.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use edgehub_amqp::message::{self as amqp_message, AmqpMessage};
use edgehub_router::SystemProperty;
use edgehub_store::Entry;
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::delivery::{DeliveryFut, Sendable};
use fe2o3_amqp::link::{DetachError, LinkStateError, SendError};
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::definitions::{self, AmqpError, ErrorCondition, Fields, LinkError};
use fe2o3_amqp::types::messaging::{message::Body, AmqpValue, MessageId, Outcome, Properties};
use fe2o3_amqp::types::primitives::{SimpleValue, Symbol, Value};
use fe2o3_amqp::{Receiver, Sender, Session};
use futures_util::stream::{FuturesOrdered, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::{
    credentials, local_retry, open_failed, CloudToEdge, Control, Credentials, LinkState, OpenError,
    Shared, CONNECT_TIMEOUT, IDLE_CLOSE, LOCAL_RETRY, TOKEN_TTL_SECS, WINDOW,
};

/// CBS requests waiting for the `$cbs` link.
const CBS_QUEUE: usize = 256;

/// A `put-token` for the CBS task, answered on `reply`.
struct PutToken {
    audience: String,
    token: String,
    reply: oneshot::Sender<Result<(), OpenError>>,
}

/// The connection every identity shares, opened on first use and again
/// after it dropped.
pub(super) struct Connection {
    sh: Arc<Shared>,
    live: tokio::sync::Mutex<Option<Arc<Live>>>,
}

struct Live {
    handle: tokio::sync::Mutex<ConnectionHandle<()>>,
    cbs: mpsc::Sender<PutToken>,
}

impl Live {
    /// The CBS task ends with the connection.
    fn alive(&self) -> bool {
        !self.cbs.is_closed() && self.handle.try_lock().map_or(true, |h| !h.is_closed())
    }

    async fn put_token(&self, c: &Credentials) -> Result<(), OpenError> {
        let (reply, answer) = oneshot::channel();
        let req = PutToken {
            audience: c.resource.clone(),
            token: c.token.clone(),
            reply,
        };
        let gone = || OpenError::Remote("the upstream AMQP connection closed".into());
        self.cbs.send(req).await.map_err(|_| gone())?;
        match tokio::time::timeout(CONNECT_TIMEOUT, answer).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(gone()),
            Err(_) => Err(OpenError::Remote("no answer to a CBS put-token".into())),
        }
    }

    async fn begin(&self) -> Result<SessionHandle<()>, OpenError> {
        let mut h = self.handle.lock().await;
        tokio::time::timeout(CONNECT_TIMEOUT, Session::begin(&mut h))
            .await
            .map_err(|_| OpenError::Remote("upstream AMQP session not begun in time".into()))?
            .map_err(|e| OpenError::Remote(format!("upstream AMQP session: {e}")))
    }
}

impl Connection {
    pub(super) fn new(sh: Arc<Shared>) -> Connection {
        Connection {
            sh,
            live: tokio::sync::Mutex::new(None),
        }
    }

    /// The open connection, or a new one. One opening at a time, and only
    /// when the shared backoff allows: identities arriving together while
    /// the parent is away make one attempt, not one each.
    async fn get(&self) -> Result<Arc<Live>, OpenError> {
        let mut slot = self.live.lock().await;
        if let Some(l) = slot.as_ref().filter(|l| l.alive()) {
            return Ok(l.clone());
        }
        if let Some(old) = slot.take() {
            tokio::spawn(async move {
                let _ = old.handle.lock().await.close().await;
            });
        }
        self.sh.backoff.wait().await;
        let live = Arc::new(self.open().await?);
        *slot = Some(live.clone());
        Ok(live)
    }

    async fn open(&self) -> Result<Live, OpenError> {
        let cfg = &self.sh.cfg;
        let io = edgehub_mqtt_client::dial(&cfg.host, cfg.port, &cfg.transport, CONNECT_TIMEOUT)
            .await
            .map_err(|e| match e {
                edgehub_mqtt_client::ClientError::ServerName(_) => OpenError::Local(e.to_string()),
                e => OpenError::Remote(e.to_string()),
            })?;
        // SASL ANONYMOUS: every identity proves itself over CBS.
        let open = fe2o3_amqp::Connection::builder()
            .container_id(format!("edgehub-{:016x}", rand::random::<u64>()))
            .hostname(cfg.iothub_hostname.as_str())
            .sasl_profile(SaslProfile::Anonymous)
            .idle_time_out(240_000u32)
            .open_with_stream(io);
        let mut handle = tokio::time::timeout(CONNECT_TIMEOUT, open)
            .await
            .map_err(|_| OpenError::Remote("upstream AMQP open timed out".into()))?
            .map_err(|e| OpenError::Remote(format!("upstream AMQP open: {e}")))?;
        let remote = |what: &str, e: String| OpenError::Remote(format!("upstream {what}: {e}"));
        let mut session = Session::begin(&mut handle)
            .await
            .map_err(|e| remote("CBS session", e.to_string()))?;
        let sender = Sender::attach(&mut session, "cbs-requests", "$cbs")
            .await
            .map_err(|e| remote("$cbs sender", e.to_string()))?;
        let receiver = Receiver::builder()
            .name("cbs-replies")
            .source("$cbs")
            .target("cbs")
            .auto_accept(true)
            .attach(&mut session)
            .await
            .map_err(|e| remote("$cbs receiver", e.to_string()))?;
        let (cbs, requests) = mpsc::channel(CBS_QUEUE);
        let sh = self.sh.clone();
        tokio::spawn(async move {
            cbs_task(session, sender, receiver, requests).await;
            // Told at once, not at the next message, as the MQTT link is.
            sh.link(LinkState::Down, "the upstream AMQP connection closed");
        });
        debug!(upstream = %cfg.host, "upstream AMQP connection open");
        Ok(Live {
            handle: tokio::sync::Mutex::new(handle),
            cbs,
        })
    }
}

/// The connection's `$cbs` pair: requests out in order, answers matched to
/// them by correlation id. Ends when either link fails (the connection
/// dropped); the waiting callers then see it closed.
async fn cbs_task(
    mut session: SessionHandle<()>,
    mut sender: Sender,
    mut receiver: Receiver,
    mut requests: mpsc::Receiver<PutToken>,
) {
    let mut waiting: HashMap<String, oneshot::Sender<Result<(), OpenError>>> = HashMap::new();
    let mut next = 0u64;
    loop {
        tokio::select! {
            req = requests.recv() => {
                let Some(req) = req else { break };
                next += 1;
                let id = format!("put-token-{next}");
                let m: AmqpMessage = fe2o3_amqp::types::messaging::Message::builder()
                    .properties(Properties {
                        message_id: Some(MessageId::String(id.clone())),
                        reply_to: Some("cbs".into()),
                        ..Default::default()
                    })
                    .application_properties(
                        fe2o3_amqp::types::messaging::ApplicationProperties::builder()
                            .insert("operation".to_owned(), SimpleValue::String("put-token".into()))
                            .insert(
                                "type".to_owned(),
                                SimpleValue::String("azure-devices.net:sastoken".into()),
                            )
                            .insert("name".to_owned(), SimpleValue::String(req.audience))
                            .build(),
                    )
                    .body(Body::Value(AmqpValue(Value::String(req.token))))
                    .build();
                if let Err(e) = sender.send(m).await {
                    debug!(error = %e, "CBS request not sent; the connection is gone");
                    break;
                }
                waiting.insert(id, req.reply);
            }
            d = receiver.recv::<Body<Value>>() => {
                let Ok(d) = d else { break };
                let m = d.message();
                let Some(id) = m.properties.as_ref().and_then(|p| p.correlation_id.as_ref()) else {
                    continue;
                };
                let Some(reply) = waiting.remove(&amqp_message::id_text(id)) else { continue };
                let status = amqp_message::property(m, "status-code")
                    .and_then(|s| s.parse::<i32>().ok())
                    .unwrap_or(0);
                let description = amqp_message::property(m, "status-description").unwrap_or_default();
                let answer = match status {
                    200..=299 => Ok(()),
                    401 | 403 | 404 => Err(OpenError::Refused(format!(
                        "upstream refused the token: {status} {description}"
                    ))),
                    _ => Err(OpenError::Remote(format!(
                        "upstream CBS answered {status} {description}"
                    ))),
                };
                let _ = reply.send(answer);
            }
        }
    }
    let _ = session.end().await;
}

/// The address under which `identity` sends telemetry (device) or output
/// (module).
fn base_address(identity: &str) -> String {
    match identity.split_once('/') {
        Some((d, m)) => format!("/devices/{d}/modules/{m}"),
        None => format!("/devices/{identity}"),
    }
}

/// One identity's session on the shared connection.
struct IdentitySession {
    session: SessionHandle<()>,
    events: Sender,
    /// Link properties: the auth chain in chain mode.
    properties: Option<Fields>,
    live: Arc<Live>,
}

impl IdentitySession {
    async fn open(sh: &Shared, conn: &Connection, identity: &str) -> Result<Self, OpenError> {
        let credentials = credentials(sh, identity)?;
        let live = conn.get().await?;
        live.put_token(&credentials).await?;
        let mut session = live.begin().await?;
        let properties = credentials.chain.as_ref().map(|c| {
            let mut f = Fields::new();
            f.insert(
                Symbol::from("com.microsoft:auth-chain"),
                Value::String(c.clone()),
            );
            f
        });
        let mut b = Sender::builder()
            .name(format!("{identity}-events"))
            .target(format!("{}/messages/events", base_address(identity)));
        if let Some(p) = &properties {
            b = b.properties(p.clone());
        }
        let events = tokio::time::timeout(CONNECT_TIMEOUT, b.attach(&mut session))
            .await
            .map_err(|_| OpenError::Remote("upstream telemetry link not attached in time".into()))?
            .map_err(|e| OpenError::Remote(format!("upstream telemetry link: {e}")))?;
        Ok(IdentitySession {
            session,
            events,
            properties,
            live,
        })
    }

    /// Properties of a twin or methods pair: the chain and the channel
    /// correlation id that pairs the two links.
    fn pair_properties(&self, channel: &str) -> Fields {
        let mut f = self.properties.clone().unwrap_or_default();
        f.insert(
            Symbol::from("com.microsoft:channel-correlation-id"),
            Value::String(format!("{channel}:{:032x}", rand::random::<u128>())),
        );
        f
    }

    async fn receiver(
        &mut self,
        name: String,
        source: String,
        properties: Option<Fields>,
        auto_accept: bool,
    ) -> Result<Receiver, String> {
        let mut b = Receiver::builder()
            .name(name)
            .source(source)
            .target("edgehub")
            .auto_accept(auto_accept);
        if let Some(p) = properties {
            b = b.properties(p);
        }
        tokio::time::timeout(CONNECT_TIMEOUT, b.attach(&mut self.session))
            .await
            .map_err(|_| "receiver not attached in time".to_owned())?
            .map_err(|e| e.to_string())
    }

    async fn sender(
        &mut self,
        name: String,
        target: String,
        properties: Fields,
    ) -> Result<Sender, String> {
        let b = Sender::builder()
            .name(name)
            .target(target)
            .properties(properties);
        tokio::time::timeout(CONNECT_TIMEOUT, b.attach(&mut self.session))
            .await
            .map_err(|_| "sender not attached in time".to_owned())?
            .map_err(|e| e.to_string())
    }

    /// A twin or methods pair on `address`: the hub's requests in (settled
    /// on arrival), its answers out, paired by a channel correlation id.
    async fn pair(
        &mut self,
        identity: &str,
        channel: &str,
        address: String,
    ) -> Result<(Sender, Receiver), String> {
        let props = self.pair_properties(channel);
        let rx = self
            .receiver(
                format!("{identity}-{channel}-in"),
                address.clone(),
                Some(props.clone()),
                true,
            )
            .await
            .map_err(|e| format!("{channel} link: {e}"))?;
        let tx = self
            .sender(format!("{identity}-{channel}-out"), address, props)
            .await
            .map_err(|e| format!("{channel} link: {e}"))?;
        Ok((tx, rx))
    }

    /// Attaches the identity's cloud-to-edge links, each served by a task
    /// of `tasks`; the twin task also hears of local reported changes.
    async fn start_downlink(
        &mut self,
        identity: &str,
        relay: &Arc<dyn CloudToEdge>,
        tasks: &mut JoinSet<String>,
    ) -> Result<mpsc::UnboundedSender<()>, String> {
        let base = base_address(identity);
        if !identity.contains('/') {
            // Modules get no C2D messages.
            let c2d = self
                .receiver(
                    format!("{identity}-c2d"),
                    format!("{base}/messages/deviceBound"),
                    self.properties.clone(),
                    false,
                )
                .await
                .map_err(|e| format!("C2D link: {e}"))?;
            tasks.spawn(c2d_link(relay.clone(), identity.to_owned(), c2d));
        }
        let (twin_tx, twin_rx) = self.pair(identity, "twin", format!("{base}/twin")).await?;
        let (reported, reported_rx) = mpsc::unbounded_channel();
        tasks.spawn(twin_link(
            relay.clone(),
            identity.to_owned(),
            twin_tx,
            twin_rx,
            reported_rx,
        ));
        let (methods_tx, methods_rx) = self
            .pair(identity, "methods", format!("{base}/methods/deviceBound"))
            .await?;
        tasks.spawn(methods_link(
            relay.clone(),
            identity.to_owned(),
            methods_tx,
            methods_rx,
        ));
        Ok(reported)
    }

    /// Ends the session: the parent sees every link of the identity close.
    async fn end(mut self, tasks: &mut JoinSet<String>) {
        tasks.abort_all();
        drop(self.events);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.session.end()).await;
    }
}

/// What the parent's settlement of one telemetry transfer means.
enum Settled {
    Accepted,
    /// Refused for good (malformed, too large): sending it again cannot help.
    Dropped(String),
    /// Refused for now (disk budget, authorization, internal).
    Retry(String),
    /// The parent refused this identity (its links were detached as
    /// unauthorized).
    Refused(String),
    /// The link or connection broke.
    Broken(String),
}

fn condition_text(e: &definitions::Error) -> String {
    match &e.description {
        Some(d) => format!("{:?}: {d}", e.condition),
        None => format!("{:?}", e.condition),
    }
}

fn unauthorized(e: &definitions::Error) -> bool {
    matches!(
        e.condition,
        ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess)
    )
}

/// The error the parent detached or closed a link with, if it gave one.
fn remote_error(e: &SendError) -> Option<&definitions::Error> {
    match e {
        SendError::Detached(DetachError::RemoteDetachedWithError(e))
        | SendError::LinkStateError(
            LinkStateError::RemoteDetachedWithError(e) | LinkStateError::RemoteClosedWithError(e),
        ) => Some(e),
        _ => None,
    }
}

fn settled(r: Result<Outcome, SendError>) -> Settled {
    match r {
        Ok(Outcome::Accepted(_)) => Settled::Accepted,
        Ok(Outcome::Rejected(r)) => match r.error {
            Some(e)
                if matches!(
                    e.condition,
                    ErrorCondition::LinkError(LinkError::MessageSizeExceeded)
                        | ErrorCondition::AmqpError(AmqpError::DecodeError)
                ) =>
            {
                Settled::Dropped(condition_text(&e))
            }
            Some(e) => Settled::Retry(condition_text(&e)),
            None => Settled::Retry("rejected without a reason".into()),
        },
        Ok(other) => Settled::Retry(format!("settled {other:?}")),
        Err(e) => match remote_error(&e) {
            Some(err) if unauthorized(err) => Settled::Refused(condition_text(err)),
            _ => Settled::Broken(e.to_string()),
        },
    }
}

/// One identity over the shared connection: forwards its messages in
/// order and, while the identity is connected here, relays what the parent
/// sends it.
pub(super) async fn identity_worker(
    sh: Arc<Shared>,
    conn: Arc<Connection>,
    identity: String,
    mut rx: mpsc::UnboundedReceiver<Entry>,
    mut control: mpsc::UnboundedReceiver<Control>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Not yet accepted upstream, oldest first; the first `sent` of them are
    // on the current session.
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
        let opened = tokio::select! {
            s = IdentitySession::open(&sh, &conn, &identity) => s,
            _ = shutdown.changed() => return,
        };
        let mut link = match opened {
            Ok(l) => {
                sh.backoff.succeeded();
                sh.link(LinkState::Up, "");
                debug!(identity, "upstream AMQP session open");
                l
            }
            Err(e) => {
                if !open_failed(&sh, &identity, e, &mut shutdown).await {
                    return;
                }
                continue;
            }
        };
        let mut down = JoinSet::new();
        let mut reported: Option<mpsc::UnboundedSender<()>> = None;
        if online {
            if let Some(relay) = &sh.relay {
                match link.start_downlink(&identity, relay, &mut down).await {
                    Ok(r) => reported = Some(r),
                    Err(e) => {
                        debug!(identity, error = %e, "upstream cloud-to-edge links failed");
                        sh.backoff.failed();
                        link.end(&mut down).await;
                        continue;
                    }
                }
            }
        }
        let mut inflight: FuturesOrdered<DeliveryFut<Result<Outcome, SendError>>> =
            FuturesOrdered::new();
        let mut sent = 0usize;
        let mut idle_since = tokio::time::Instant::now();
        let renew_every = Duration::from_secs(TOKEN_TTL_SECS / 2);
        let mut renew_at = tokio::time::Instant::now() + renew_every;
        // The identity left: its session ends once what is in flight is
        // settled (ending it sooner would send those again: duplicates).
        let mut leaving = false;
        loop {
            if leaving && inflight.is_empty() {
                link.end(&mut down).await;
                debug!(identity, "identity left; its upstream session ended");
                continue 'outer;
            }
            while !leaving && sent < pending.len() && inflight.len() < WINDOW {
                let m = amqp_message::upstream(&pending[sent].message);
                match link.events.send_batchable(m).await {
                    Ok(fut) => inflight.push_back(fut),
                    Err(e) => {
                        let why = match remote_error(&e) {
                            Some(err) if unauthorized(err) => {
                                warn!(identity, error = %condition_text(err), retry_in_s = LOCAL_RETRY.as_secs(),
                                    "the parent refused this identity; its messages stay stored");
                                link.end(&mut down).await;
                                if !local_retry(&mut shutdown).await {
                                    return;
                                }
                                continue 'outer;
                            }
                            _ => e.to_string(),
                        };
                        sh.backoff.failed();
                        sh.link(LinkState::Down, &why);
                        link.end(&mut down).await;
                        continue 'outer;
                    }
                }
                sent += 1;
            }
            let idle_deadline = idle_since + IDLE_CLOSE;
            tokio::select! {
                Some(r) = inflight.next() => match settled(r) {
                    Settled::Accepted => {
                        let e = pending.pop_front().expect("in flight implies pending");
                        sent -= 1;
                        let _ = sh.done.send(e);
                        if pending.is_empty() {
                            idle_since = tokio::time::Instant::now();
                        }
                    }
                    Settled::Dropped(why) => {
                        let e = pending.pop_front().expect("in flight implies pending");
                        sent -= 1;
                        let id = e.message.system(SystemProperty::MessageId).map(|v| v.to_string());
                        warn!(identity, message_id = ?id, reason = %why,
                            "the parent refused this message for good; dropped");
                        let _ = sh.done.send(e);
                    }
                    Settled::Retry(why) => {
                        warn!(identity, reason = %why, retry_in_s = LOCAL_RETRY.as_secs(),
                            "the parent did not take a message; it stays stored");
                        link.end(&mut down).await;
                        if !local_retry(&mut shutdown).await {
                            return;
                        }
                        continue 'outer;
                    }
                    Settled::Refused(why) => {
                        warn!(identity, error = %why, retry_in_s = LOCAL_RETRY.as_secs(),
                            "the parent refused this identity; its messages stay stored");
                        link.end(&mut down).await;
                        if !local_retry(&mut shutdown).await {
                            return;
                        }
                        continue 'outer;
                    }
                    Settled::Broken(why) => {
                        // Unsettled messages go again on the next session
                        // (at least once).
                        let delay = sh.backoff.failed();
                        sh.link(LinkState::Down, &why);
                        debug!(identity, error = %why, retry_in_ms = delay.as_millis() as u64, "upstream link lost");
                        link.end(&mut down).await;
                        continue 'outer;
                    }
                },
                e = rx.recv(), if sent == pending.len() => match e {
                    Some(e) => pending.push_back(e),
                    None => return,
                },
                Some(ended) = down.join_next(), if !down.is_empty() => {
                    let why = match ended {
                        Ok(why) => why,
                        Err(e) => e.to_string(),
                    };
                    let delay = sh.backoff.failed();
                    sh.link(LinkState::Down, &why);
                    debug!(identity, error = %why, retry_in_ms = delay.as_millis() as u64, "upstream cloud-to-edge link lost");
                    link.end(&mut down).await;
                    continue 'outer;
                }
                Some(c) = control.recv() => match c {
                    Control::Online(true) => {
                        online = true;
                        leaving = false;
                        if let (Some(relay), None) = (&sh.relay, &reported) {
                            match link.start_downlink(&identity, relay, &mut down).await {
                                Ok(r) => reported = Some(r),
                                Err(e) => {
                                    debug!(identity, error = %e, "upstream cloud-to-edge links failed");
                                    sh.backoff.failed();
                                    link.end(&mut down).await;
                                    continue 'outer;
                                }
                            }
                        }
                    }
                    Control::Online(false) => {
                        online = false;
                        // The parent must stop seeing the identity as here
                        // (a method to it must get 404 there).
                        leaving = reported.is_some();
                    }
                    Control::Reported => {
                        if let Some(r) = &reported {
                            let _ = r.send(());
                        }
                    }
                },
                _ = tokio::time::sleep_until(renew_at) => {
                    renew_at = tokio::time::Instant::now() + renew_every;
                    let renewed = match credentials(&sh, &identity) {
                        Ok(c) => link.live.put_token(&c).await,
                        Err(e) => Err(e),
                    };
                    if let Err(OpenError::Remote(e) | OpenError::Refused(e) | OpenError::Local(e)) = renewed {
                        debug!(identity, error = %e, "upstream token not renewed; reconnecting");
                        sh.backoff.failed();
                        link.end(&mut down).await;
                        continue 'outer;
                    }
                }
                _ = tokio::time::sleep_until(idle_deadline), if pending.is_empty() && !online => {
                    link.end(&mut down).await;
                    debug!(identity, "idle upstream session ended");
                    continue 'outer;
                }
                _ = shutdown.changed() => {
                    link.end(&mut down).await;
                    return;
                }
            }
        }
    }
}

/// C2D messages for a device: acknowledged to the parent (Accepted) only
/// once queued here; released (the parent delivers it again) otherwise.
async fn c2d_link(relay: Arc<dyn CloudToEdge>, identity: String, mut receiver: Receiver) -> String {
    loop {
        let d = match receiver.recv::<Body<Value>>().await {
            Ok(d) => d,
            Err(e) => return format!("C2D link: {e}"),
        };
        let mut msg = amqp_message::telemetry(d.message());
        if msg.system(SystemProperty::To).is_none() {
            msg.set_system(
                SystemProperty::To,
                &format!("/devices/{identity}/messages/deviceBound"),
            );
        }
        let settled = match relay.c2d(&identity, msg).await {
            Ok(()) => receiver.accept(&d).await,
            Err(e) => {
                warn!(identity, error = %e, "cloud-to-device message not queued here; left with the parent");
                // Not at once again: whatever refused it needs a moment.
                tokio::time::sleep(Duration::from_secs(1)).await;
                receiver.release(&d).await
            }
        };
        if let Err(e) = settled {
            return format!("C2D settlement: {e}");
        }
    }
}

/// A twin request on the twin sender link.
fn twin_request(
    operation: &str,
    resource: Option<&str>,
    rid: &str,
    body: &[u8],
) -> Sendable<Body<Value>> {
    let mut ann = vec![("operation", Value::String(operation.to_owned()))];
    if let Some(r) = resource {
        ann.push(("resource", Value::String(r.to_owned())));
    }
    let m = amqp_message::reply(
        Some(MessageId::String(rid.to_owned())),
        ann,
        Vec::new(),
        body,
    );
    Sendable::builder().message(m).settled(true).build()
}

/// The identity's twin at the parent: subscribes to desired-property
/// pushes, reads the twin (the parent's desired properties replace ours)
/// and sends the reported properties accepted here meanwhile, one patch at
/// a time, and again whenever told of a local change.
async fn twin_link(
    relay: Arc<dyn CloudToEdge>,
    identity: String,
    mut sender: Sender,
    mut receiver: Receiver,
    mut changed: mpsc::UnboundedReceiver<()>,
) -> String {
    let mut next = 0u64;
    let mut rid = |kind: char| {
        next += 1;
        format!("{kind}{next}")
    };
    let subscribe = rid('s');
    let get = rid('g');
    for (op, resource, id) in [
        (
            "PUT",
            Some("/notifications/twin/properties/desired"),
            &subscribe,
        ),
        ("GET", None, &get),
    ] {
        if let Err(e) = sender.send(twin_request(op, resource, id, b"")).await {
            return format!("twin request: {e}");
        }
    }
    let mut twin_get = Some(get);
    // Reported properties sent, waiting for the parent's answer.
    let mut reported: Option<(String, serde_json::Map<String, serde_json::Value>)> = None;
    let mut sync = true;
    loop {
        if sync && reported.is_none() {
            sync = false;
            if let Some((patch, snapshot)) = relay.reported_to_sync(&identity).await {
                let id = rid('r');
                let body = patch.to_string();
                let req = twin_request("PATCH", Some("/properties/reported"), &id, body.as_bytes());
                if let Err(e) = sender.send(req).await {
                    return format!("twin request: {e}");
                }
                reported = Some((id, snapshot));
            }
        }
        tokio::select! {
            d = receiver.recv::<Body<Value>>() => {
                let d = match d {
                    Ok(d) => d,
                    Err(e) => return format!("twin link: {e}"),
                };
                let m = d.message();
                let status = match amqp_message::annotation(m, "status") {
                    Some(Value::Int(s)) => *s,
                    Some(Value::Long(s)) => *s as i32,
                    _ => 200,
                };
                let ok = (200..300).contains(&status);
                let corr = m
                    .properties
                    .as_ref()
                    .and_then(|p| p.correlation_id.as_ref())
                    .map(amqp_message::id_text);
                let body = amqp_message::body_bytes(&m.body);
                match corr {
                    None => {
                        // A desired-properties push.
                        match serde_json::from_slice::<serde_json::Value>(&body) {
                            Ok(serde_json::Value::Object(mut patch)) => {
                                if let (false, Some(Value::Long(v))) =
                                    (patch.contains_key("$version"), amqp_message::annotation(m, "version"))
                                {
                                    patch.insert("$version".into(), (*v).into());
                                }
                                relay.desired_patch(&identity, patch);
                            }
                            _ => warn!(identity, "desired-properties patch from upstream is not a JSON object"),
                        }
                    }
                    Some(c) if twin_get.as_deref() == Some(c.as_str()) => {
                        twin_get = None;
                        let desired = serde_json::from_slice::<serde_json::Value>(&body)
                            .ok()
                            .and_then(|t| t.get("desired").cloned());
                        match desired {
                            Some(serde_json::Value::Object(d)) if ok => relay.adopt_desired(&identity, d),
                            _ => warn!(identity, status, "twin from upstream unreadable; the local copy stays"),
                        }
                    }
                    Some(c) if reported.as_ref().is_some_and(|(r, _)| *r == c) => {
                        let (_, snapshot) = reported.take().expect("checked");
                        if ok {
                            relay.reported_synced(&identity, snapshot);
                            // Changes made while this one was on its way.
                            sync = true;
                        } else {
                            warn!(identity, status, "parent refused reported properties; retried on the next change or connection");
                        }
                    }
                    Some(c) if c == subscribe && !ok => {
                        warn!(identity, status, "parent refused desired-property pushes");
                    }
                    Some(_) => {}
                }
            }
            c = changed.recv() => match c {
                Some(()) => sync = true,
                None => return "twin link closed".into(),
            },
        }
    }
}

/// Direct methods from the parent: each call goes to the local layers (and
/// on to the device); its answer goes back under the request's
/// correlation id.
async fn methods_link(
    relay: Arc<dyn CloudToEdge>,
    identity: String,
    mut sender: Sender,
    mut receiver: Receiver,
) -> String {
    let (answers_tx, mut answers) = mpsc::unbounded_channel::<(MessageId, i32, Bytes)>();
    loop {
        tokio::select! {
            d = receiver.recv::<Body<Value>>() => {
                let d = match d {
                    Ok(d) => d,
                    Err(e) => return format!("methods link: {e}"),
                };
                let m = d.message();
                let Some(corr) = m.properties.as_ref().and_then(|p| p.correlation_id.clone()) else {
                    warn!(identity, "method request from upstream without a correlation id; ignored");
                    continue;
                };
                let name = amqp_message::property(m, "IoThub-methodname").unwrap_or_default();
                let payload = amqp_message::body_bytes(&m.body);
                let (relay, answers, who) = (relay.clone(), answers_tx.clone(), identity.clone());
                tokio::spawn(async move {
                    let (status, body) = relay.method(&who, &name, payload).await;
                    let _ = answers.send((corr, status, body));
                });
            }
            Some((corr, status, body)) = answers.recv() => {
                let m = amqp_message::reply(
                    Some(corr),
                    Vec::new(),
                    vec![("IoThub-status", SimpleValue::Int(status))],
                    &body,
                );
                let m = Sendable::builder().message(m).settled(true).build();
                if let Err(e) = sender.send(m).await {
                    return format!("method answer: {e}");
                }
            }
        }
    }
}
