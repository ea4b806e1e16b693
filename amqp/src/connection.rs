//! One AMQP connection: SASL, then sessions and links, each link on its own
//! task. Which identities the connection may act for is decided per link
//! attach (IoT Hub's rule): the SASL PLAIN identity, the identities a CBS
//! `put-token` proved, or the device of the TLS client certificate.
//!
//! fe2o3 cannot refuse an attach; a link for an address this connection
//! may not use is accepted and closed at once with the error
//! (`amqp:unauthorized-access`, `amqp:not-found`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use edgehub_device::auth::Authenticated;
use edgehub_device::link::{Delivery, DeviceLink, LinkSink, Offer, Receipt};
use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, ListenerConnectionHandle,
    ListenerSessionHandle, SessionAcceptor,
};
use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::types::definitions::{self, AmqpError, LinkError};
use fe2o3_amqp::types::messaging::{message::Body, MessageId, Outcome};
use fe2o3_amqp::types::performatives::Attach;
use fe2o3_amqp::types::primitives::{SimpleValue, Value};
use fe2o3_amqp::{Receiver, Sender};
use futures_util::stream::{FuturesOrdered, StreamExt};
use futures_util::FutureExt;
use parking_lot::Mutex;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, info, warn};

use crate::address::Address;
use crate::message::{self, AmqpMessage};
use crate::sasl::HubSasl;
use crate::{cbs, AmqpHub};

const SASL_HEADER: [u8; 8] = *b"AMQP\x03\x01\x00\x00";
const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";

async fn stream_read_header<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut [u8; 8],
) -> std::io::Result<()> {
    tokio::io::AsyncReadExt::read_exact(s, buf)
        .await
        .map(|_| ())
}

/// Cloud-to-device and module-input deliveries waiting for their link.
const OUT_QUEUE: usize = 64;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn error(
    condition: impl Into<definitions::ErrorCondition>,
    why: impl Into<String>,
) -> definitions::Error {
    definitions::Error::new(condition, Some(why.into()), None)
}

/// The stream as fe2o3 reads it (it wants `Debug`), with the protocol
/// header already read put back in front.
struct Io<S> {
    head: Vec<u8>,
    inner: S,
    peer: SocketAddr,
    guard: crate::guard::FrameGuard,
    /// What this side wrote: nothing of the AMQP layer yet, its protocol
    /// header, or more (fe2o3 sends its Open without waiting for the
    /// client's), so a refusal knows whether an Open must precede its Close.
    wrote: Wrote,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wrote {
    Nothing,
    Header,
    Open,
}

impl<S> std::fmt::Debug for Io<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Io")
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Io<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let me = &mut *self;
        let before = buf.filled().len();
        if !me.head.is_empty() {
            let n = me.head.len().min(buf.remaining());
            buf.put_slice(&me.head[..n]);
            me.head.drain(..n);
        } else {
            match std::pin::Pin::new(&mut me.inner).poll_read(cx, buf) {
                std::task::Poll::Ready(Ok(())) => {}
                other => return other,
            }
        }
        match me.guard.check(&buf.filled()[before..]) {
            Ok(()) => std::task::Poll::Ready(Ok(())),
            Err(e) => {
                info!(peer = %me.peer, error = %e, "AMQP input refused; closing");
                if me.guard.in_amqp_layer() {
                    // Best effort, before the connection drops: the frame
                    // is small and a TLS write is buffered.
                    let close = crate::guard::refusal(&e, me.wrote == Wrote::Open);
                    let mut inner = std::pin::Pin::new(&mut me.inner);
                    if let std::task::Poll::Ready(Ok(_)) = inner.as_mut().poll_write(cx, &close) {
                        let _ = inner.poll_flush(cx);
                    }
                }
                std::task::Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Io<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let me = &mut *self;
        let r = std::pin::Pin::new(&mut me.inner).poll_write(cx, buf);
        if let (std::task::Poll::Ready(Ok(n)), false) = (&r, me.wrote == Wrote::Open) {
            let written = &buf[..*n];
            match written.windows(8).position(|w| w == AMQP_HEADER) {
                Some(at) if at + 8 < written.len() => me.wrote = Wrote::Open,
                Some(_) => me.wrote = Wrote::Header,
                None if me.wrote == Wrote::Header && !written.is_empty() => me.wrote = Wrote::Open,
                None => {}
            }
        }
        r
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// One identity's presence on this connection: its device link and the
/// queues of the links that deliver to it.
struct IdentityLinks {
    _link: Mutex<Option<DeviceLink>>,
    c2d: Mutex<Option<mpsc::Sender<Delivery>>>,
    inputs: Mutex<Option<mpsc::Sender<Delivery>>>,
    /// Twin answers and desired-property pushes out.
    twin: Mutex<Option<mpsc::Sender<AmqpMessage>>>,
    /// The client asked for desired-property pushes (PUT on the twin link).
    desired: std::sync::atomic::AtomicBool,
    /// Method requests out.
    methods: Mutex<Option<mpsc::Sender<AmqpMessage>>>,
    /// Told when another link (another connection, another head) took
    /// the identity over: its links here close.
    taken_over: Notify,
    /// When the credential behind this identity runs out (unix seconds);
    /// a renewed CBS token moves it.
    valid_until: watch::Sender<u64>,
    /// Links of this identity open on the connection.
    open: std::sync::atomic::AtomicUsize,
}

impl IdentityLinks {
    /// Resolves once this identity's links must close, with the error
    /// they close with: taken over, or the credential expired.
    async fn ended(&self) -> definitions::Error {
        let mut until = self.valid_until.subscribe();
        let expired = async move {
            loop {
                let at = *until.borrow_and_update();
                let now = now();
                if at <= now {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(at - now)) => {}
                    changed = until.changed() => {
                        if changed.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                }
            }
        };
        tokio::select! {
            _ = self.taken_over.notified() => error(LinkError::Stolen, "the identity connected elsewhere"),
            _ = expired => error(
                AmqpError::UnauthorizedAccess,
                "the identity's token expired; put a new one on $cbs",
            ),
        }
    }
}

struct Sink(Arc<IdentityLinks>);

/// Queues `m` on a twin or methods link.
fn offer(queue: &Mutex<Option<mpsc::Sender<AmqpMessage>>>, m: AmqpMessage) -> Offer {
    let Some(q) = queue.lock().clone() else {
        return Offer::NotListening;
    };
    match q.try_send(m) {
        Ok(()) => Offer::Sent,
        Err(mpsc::error::TrySendError::Full(_)) => Offer::Full,
        Err(mpsc::error::TrySendError::Closed(_)) => Offer::NotListening,
    }
}

/// A twin answer as IoT Hub sends it over AMQP: the request's
/// correlation id, the `status` (and `version`) annotations.
pub(crate) fn twin_answer(
    request: String,
    status: u16,
    version: Option<u64>,
    body: &[u8],
) -> AmqpMessage {
    let mut ann = vec![("status", Value::Int(status as i32))];
    if let Some(v) = version {
        ann.push(("version", Value::Long(v as i64)));
    }
    message::reply(Some(MessageId::String(request)), ann, Vec::new(), body)
}

impl LinkSink for Sink {
    fn deliver(&self, _identity: &str, d: Delivery) -> Offer {
        let queue = match d {
            Delivery::CloudToDevice { .. } => self.0.c2d.lock().clone(),
            Delivery::ModuleInput { .. } => self.0.inputs.lock().clone(),
            Delivery::TwinAnswer {
                request,
                status,
                version,
                body,
            } => return offer(&self.0.twin, twin_answer(request, status, version, &body)),
            Delivery::DesiredPatch { version, patch } => {
                if !self.0.desired.load(std::sync::atomic::Ordering::Acquire) {
                    return Offer::NotListening;
                }
                let m = message::reply(
                    None,
                    vec![("version", Value::Long(version as i64))],
                    Vec::new(),
                    &patch,
                );
                return offer(&self.0.twin, m);
            }
            Delivery::MethodRequest {
                method,
                request_id,
                payload,
            } => {
                let m = message::reply(
                    Some(MessageId::String(format!("{request_id:x}"))),
                    Vec::new(),
                    vec![("IoThub-methodname", SimpleValue::String(method))],
                    &payload,
                );
                return offer(&self.0.methods, m);
            }
        };
        let Some(q) = queue else {
            if let Some(r) = d.receipt() {
                r.cancel();
            }
            return Offer::NotListening;
        };
        let (d, offer) = match q.try_send(d) {
            Ok(()) => return Offer::Sent,
            Err(mpsc::error::TrySendError::Full(d)) => (d, Offer::Full),
            Err(mpsc::error::TrySendError::Closed(d)) => (d, Offer::NotListening),
        };
        if let Some(r) = d.receipt() {
            r.cancel();
        }
        offer
    }

    fn taken_over(&self) {
        self.0.taken_over.notify_waiters();
    }
}

/// What the links of one connection share.
pub(crate) struct ConnState {
    pub hub: Arc<AmqpHub>,
    pub peer: SocketAddr,
    client_chain: Option<Vec<CertificateDer<'static>>>,
    /// Lower-cased identity → what proved it.
    granted: Mutex<HashMap<String, Authenticated>>,
    identities: Mutex<HashMap<String, Arc<IdentityLinks>>>,
    /// Lower-cased identity → the SAS token CBS proved it with: a link
    /// whose auth chain names that identity as the acting edge device is
    /// checked against it.
    tokens: Mutex<HashMap<String, String>>,
    /// Lower-cased leaf → lower-cased edge device whose token it rides on
    /// (granted through an auth chain): a renewed edge token extends them.
    chained: Mutex<HashMap<String, String>>,
    /// The `$cbs` sender link's queue, for put-token replies.
    pub cbs_replies: watch::Sender<Option<mpsc::Sender<AmqpMessage>>>,
}

impl ConnState {
    pub fn grant(&self, a: Authenticated) {
        let key = a.identity.to_lowercase();
        // The leaves acting through this identity last as long as it does.
        let riders: Vec<String> = self
            .chained
            .lock()
            .iter()
            .filter(|(_, actor)| **actor == key)
            .map(|(leaf, _)| leaf.clone())
            .collect();
        let mut granted = self.granted.lock();
        let identities = self.identities.lock();
        for k in riders.iter().chain(std::iter::once(&key)) {
            // A renewed token extends the links already open.
            if let Some(links) = identities.get(k) {
                links.valid_until.send_replace(a.valid_until);
            }
            if let Some(g) = granted.get_mut(k) {
                g.valid_until = a.valid_until;
            }
        }
        granted.insert(key, a);
    }

    pub fn keep_token(&self, identity: &str, token: String) {
        self.tokens.lock().insert(identity.to_lowercase(), token);
    }

    /// The identity (as registered) this connection may act for under
    /// `claimed` (an auth chain, when the link carries one), or why not.
    fn authorize(&self, claimed: &str, chain: Option<&str>) -> Result<Arc<str>, String> {
        if let Some(a) = self.granted.lock().get(&claimed.to_lowercase()) {
            if a.valid_until < now() {
                return Err(format!("the token for {claimed} has expired"));
            }
            return Ok(a.identity.clone());
        }
        if let Some(chain) = chain {
            let Some(leaf) = edgehub_device::auth::split_identity(claimed) else {
                return Err(format!("{claimed:?} is not an identity"));
            };
            let actor = chain.split(';').nth(1).unwrap_or_default().to_lowercase();
            let token = self.tokens.lock().get(&actor).cloned();
            return match self.hub.auth.chain(leaf, chain, token.as_deref()) {
                Ok(a) => {
                    let id = a.identity.clone();
                    self.chained.lock().insert(id.to_lowercase(), actor);
                    self.grant(a);
                    Ok(id)
                }
                Err(e) => Err(e.0),
            };
        }
        if let (Some(chain), None) = (&self.client_chain, claimed.split_once('/')) {
            return match self.hub.auth.x509(claimed, chain) {
                Ok(a) => {
                    let id = a.identity.clone();
                    self.grant(a);
                    Ok(id)
                }
                Err(e) => Err(e.0),
            };
        }
        Err(format!(
            "this connection has not authenticated {claimed} (SASL PLAIN, a CBS put-token or a client certificate)"
        ))
    }

    /// The identity's entry for one more open link, attaching its device
    /// link on first use: the identity is connected from its first link
    /// until its last one closes (IoT Hub's rule; a gateway's multiplexed
    /// connection carries identities that come and go).
    fn open_link(self: &Arc<Self>, identity: &Arc<str>) -> OpenLink {
        let valid_until = self
            .granted
            .lock()
            .get(&identity.to_lowercase())
            .map_or(u64::MAX, |a| a.valid_until);
        let mut ids = self.identities.lock();
        if let Some(l) = ids.get(&identity.to_lowercase()) {
            l.open.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            return OpenLink {
                state: self.clone(),
                links: l.clone(),
            };
        }
        let links = Arc::new(IdentityLinks {
            _link: Mutex::new(None),
            c2d: Mutex::new(None),
            inputs: Mutex::new(None),
            twin: Mutex::new(None),
            desired: Default::default(),
            methods: Mutex::new(None),
            taken_over: Notify::new(),
            valid_until: watch::channel(valid_until).0,
            open: 1.into(),
        });
        ids.insert(identity.to_lowercase(), links.clone());
        // Attached under the table's lock: a last link closing meanwhile
        // cannot detach an entry whose device link is not in place yet.
        let link = self
            .hub
            .layer
            .links
            .attach(identity.clone(), Arc::new(Sink(links.clone())));
        *links._link.lock() = Some(link);
        drop(ids);
        OpenLink {
            state: self.clone(),
            links,
        }
    }
}

/// One open link of an identity; the last one to go takes the identity's
/// device link with it (the identity is then not connected here).
struct OpenLink {
    state: Arc<ConnState>,
    links: Arc<IdentityLinks>,
}

impl Drop for OpenLink {
    fn drop(&mut self) {
        if self
            .links
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            != 1
        {
            return;
        }
        let mut ids = self.state.identities.lock();
        // Still the last one under the lock (no attach raced in)?
        if self.links.open.load(std::sync::atomic::Ordering::Acquire) != 0 {
            return;
        }
        ids.retain(|_, l| !Arc::ptr_eq(l, &self.links));
        let link = self.links._link.lock().take();
        drop(ids);
        drop(link);
    }
}

/// Serves one AMQP connection until it closes or the hub shuts down.
pub async fn serve<S>(
    hub: Arc<AmqpHub>,
    mut stream: S,
    peer: SocketAddr,
    client_chain: Option<Vec<CertificateDer<'static>>>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    // SASL is optional, as at IoT Hub: the Node SDK skips it and proves
    // its identity over CBS. The protocol header says which.
    let mut header = [0u8; 8];
    let read = tokio::time::timeout(
        hub.open_timeout,
        stream_read_header(&mut stream, &mut header),
    );
    let sasl_header = match read.await {
        Ok(Ok(())) if header == SASL_HEADER => true,
        Ok(Ok(())) if header == AMQP_HEADER => false,
        Ok(Ok(())) => {
            info!(%peer, header = ?header, "not an AMQP 1.0 protocol header; closing");
            // Tell the client what is spoken here, as the spec asks.
            let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, &SASL_HEADER).await;
            return;
        }
        _ => {
            debug!(%peer, "no AMQP protocol header; closing");
            return;
        }
    };
    let io = Io {
        head: header.to_vec(),
        inner: stream,
        peer,
        // SASL frames and the frames of an open connection both stay
        // within the frame size this side announces.
        guard: crate::guard::FrameGuard::new(hub.max_frame_size),
        wrote: Wrote::Nothing,
    };
    let container = format!("DeviceGateway_{:032x}", rand::random::<u128>());
    let sasl = HubSasl::new(hub.auth.clone(), peer);
    let verdict = sasl.verdict.clone();
    let accepted = if sasl_header {
        let acceptor = ConnectionAcceptor::builder()
            .container_id(container)
            .max_frame_size(hub.max_frame_size)
            .idle_time_out(240_000u32)
            .sasl_acceptor(sasl)
            .build();
        tokio::select! {
            c = tokio::time::timeout(hub.open_timeout, acceptor.accept(io)) => c,
            _ = shutdown.changed() => return,
        }
    } else {
        let acceptor = ConnectionAcceptor::builder()
            .container_id(container)
            .max_frame_size(hub.max_frame_size)
            .idle_time_out(240_000u32)
            .build();
        tokio::select! {
            c = tokio::time::timeout(hub.open_timeout, acceptor.accept(io)) => c,
            _ = shutdown.changed() => return,
        }
    };
    let mut conn: ListenerConnectionHandle = match accepted {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            info!(%peer, error = %e, "AMQP connection refused");
            return;
        }
        Err(_) => {
            info!(%peer, "AMQP connection not opened within the open timeout; closing");
            return;
        }
    };
    let state = Arc::new(ConnState {
        hub,
        peer,
        client_chain,
        granted: Mutex::default(),
        identities: Mutex::default(),
        tokens: Mutex::default(),
        chained: Mutex::default(),
        cbs_replies: watch::channel(None).0,
    });
    let plain = verdict.lock().identity.clone();
    if let Some(a) = plain {
        debug!(%peer, identity = %a.identity, "AMQP SASL PLAIN authenticated");
        state.grant(a);
    }
    let mut sessions = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            incoming = conn.next_incoming_session() => {
                let Some(incoming) = incoming else { break };
                match SessionAcceptor::new().accept_incoming_session(incoming, &mut conn).await {
                    Ok(session) => {
                        sessions.spawn(serve_session(state.clone(), session, shutdown.clone()));
                    }
                    Err(e) => {
                        debug!(%peer, error = %e, "AMQP session not begun");
                        break;
                    }
                }
            }
            _ = shutdown.changed() => break,
        }
    }
    sessions.abort_all();
    let _ = conn.close().await;
    // Each identity's device link goes with the connection (the link table
    // holds the sink, and the sink this entry: it would never drop itself).
    let identities: Vec<_> = state.identities.lock().drain().collect();
    for (_, links) in identities {
        links._link.lock().take();
    }
    debug!(%peer, "AMQP connection closed");
}

async fn serve_session(
    state: Arc<ConnState>,
    mut session: ListenerSessionHandle,
    shutdown: watch::Receiver<bool>,
) {
    let acceptor = LinkAcceptor::builder()
        .max_message_size(state.hub.max_message_size)
        .build();
    let mut links = tokio::task::JoinSet::new();
    while let Some(attach) = session.next_incoming_attach().await {
        let address = link_address(&attach);
        let chain = auth_chain(&attach);
        let endpoint = match acceptor.accept_incoming_attach(attach, &mut session).await {
            Ok(e) => e,
            Err(e) => {
                debug!(peer = %state.peer, error = ?e, "AMQP link not attached");
                continue;
            }
        };
        links.spawn(serve_link(
            state.clone(),
            endpoint,
            (address, chain),
            shutdown.clone(),
        ));
    }
    links.abort_all();
    let _ = session.end().await;
}

/// The address the client names: the target of its sender, the source of
/// its receiver.
fn link_address(attach: &Attach) -> Option<String> {
    use fe2o3_amqp::types::definitions::Role;
    match attach.role {
        Role::Sender => attach.target.as_ref().and_then(|t| match t.as_ref() {
            fe2o3_amqp::types::messaging::TargetArchetype::Target(t) => t.address.clone(),
            #[allow(unreachable_patterns)]
            _ => None,
        }),
        Role::Receiver => attach.source.as_ref().and_then(|s| s.address.clone()),
    }
}

/// IoT Edge's nested scheme: a child edge hub acting for one of its
/// descendants names the chain (`leaf;child[;parent]`) on each link.
fn auth_chain(attach: &Attach) -> Option<String> {
    let value = attach
        .properties
        .as_ref()?
        .iter()
        .find(|(k, _)| k.0 == "com.microsoft:auth-chain")?
        .1;
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Symbol(s) => Some(s.0.clone()),
        _ => None,
    }
}

async fn refuse(endpoint: LinkEndpoint, e: definitions::Error) {
    match endpoint {
        LinkEndpoint::Sender(s) => {
            let _ = s.close_with_error(e).await;
        }
        LinkEndpoint::Receiver(r) => {
            let _ = r.close_with_error(e).await;
        }
    }
}

async fn serve_link(
    state: Arc<ConnState>,
    endpoint: LinkEndpoint,
    (address, chain): (Option<String>, Option<String>),
    shutdown: watch::Receiver<bool>,
) {
    let text = address.unwrap_or_default();
    let Some(address) = Address::parse(&text) else {
        info!(peer = %state.peer, address = %text, "AMQP link to an unknown address refused");
        return refuse(
            endpoint,
            error(AmqpError::NotFound, format!("no such address: {text:?}")),
        )
        .await;
    };
    if address == Address::Cbs {
        return match endpoint {
            LinkEndpoint::Receiver(r) => cbs::serve_requests(state, r).await,
            LinkEndpoint::Sender(s) => cbs::serve_replies(state, s).await,
        };
    }
    let claimed = address.identity().unwrap_or_default().to_owned();
    let identity = match state.authorize(&claimed, chain.as_deref()) {
        Ok(i) => i,
        Err(why) => {
            info!(peer = %state.peer, address = %text, reason = %why, "AMQP link refused");
            return refuse(endpoint, error(AmqpError::UnauthorizedAccess, why)).await;
        }
    };
    // Held while the link is served: the identity is connected as long as
    // one of its links is open.
    let open = state.open_link(&identity);
    let links = open.links.clone();
    match (address, endpoint) {
        (address @ Address::Events { .. }, LinkEndpoint::Receiver(r)) => {
            telemetry(
                state,
                identity,
                (text.as_str(), address),
                links,
                r,
                shutdown,
            )
            .await
        }
        (Address::Events { .. }, LinkEndpoint::Sender(s)) if identity.contains('/') => {
            deliveries(state, identity, links, s, Kind::Inputs, shutdown).await
        }
        (Address::DeviceBound { .. }, LinkEndpoint::Sender(s)) => {
            deliveries(state, identity, links, s, Kind::C2d, shutdown).await
        }
        (Address::Twin { .. }, LinkEndpoint::Receiver(r)) => {
            twin_requests(state, identity, links, r, shutdown).await
        }
        (Address::Twin { .. }, LinkEndpoint::Sender(s)) => {
            outbound(state, identity, links.clone(), s, Out::Twin, shutdown).await
        }
        (Address::Methods { .. }, LinkEndpoint::Receiver(r)) => {
            method_responses(state, identity, links, r, shutdown).await
        }
        (Address::Methods { .. }, LinkEndpoint::Sender(s)) => {
            outbound(state, identity, links.clone(), s, Out::Methods, shutdown).await
        }
        (_, endpoint) => {
            refuse(
                endpoint,
                error(
                    AmqpError::NotImplemented,
                    format!("{text:?} with this link role is not served over AMQP yet"),
                ),
            )
            .await
        }
    }
}

/// Telemetry or module output: each transfer settles Accepted only once it
/// is stored, Rejected with the reason otherwise.
async fn telemetry(
    state: Arc<ConnState>,
    identity: Arc<str>,
    // The link's address as the client wrote it, and as read.
    (text, address): (&str, Address),
    links: Arc<IdentityLinks>,
    mut receiver: Receiver,
    mut shutdown: watch::Receiver<bool>,
) {
    let max = state.hub.max_message_size as usize;
    // Transfers waiting for the store, in the order they came: a group
    // commit completes many at once, and consecutive ones are then settled
    // with one disposition for the range, not one frame per message.
    let mut storing: FuturesOrdered<Storing> = FuturesOrdered::new();
    let mut accepted: Vec<DeliveryInfo> = Vec::new();
    // Made once: a fresh one per transfer would cost a timer and miss a
    // takeover told between two transfers.
    let ended = links.ended();
    tokio::pin!(ended);
    loop {
        let delivery = tokio::select! {
            biased;
            Some(first) = storing.next(), if !storing.is_empty() => {
                let mut done = vec![first];
                while let Some(Some(next)) = storing.next().now_or_never() {
                    done.push(next);
                }
                for (info, result) in done {
                    match result {
                        Ok(()) => accepted.push(info),
                        Err(e) => {
                            settle_accepted(&receiver, &mut accepted).await;
                            let _ = receiver.reject(info, store_error(&e)).await;
                        }
                    }
                }
                settle_accepted(&receiver, &mut accepted).await;
                continue;
            }
            d = receiver.recv::<Body<Value>>() => match d {
                Ok(d) => d,
                Err(e) => {
                    debug!(peer = %state.peer, identity = %identity, error = %e, "AMQP telemetry link ended");
                    return;
                }
            },
            e = &mut ended => {
                let _ = receiver.close_with_error(e).await;
                return;
            }
            _ = shutdown.changed() => return,
        };
        let info = DeliveryInfo::from(&delivery);
        let batch = delivery.message_format().as_ref() == Some(&message::BATCH_FORMAT);
        let parts = if batch {
            match message::batch(delivery.message()) {
                Ok(parts) => parts.into_iter().map(message::into_telemetry).collect(),
                Err(why) => {
                    let _ = receiver
                        .reject(info, error(AmqpError::DecodeError, why))
                        .await;
                    continue;
                }
            }
        } else {
            vec![message::into_telemetry(delivery.into_message())]
        };
        let mut stored = Vec::with_capacity(parts.len());
        let mut refused = None;
        for mut msg in parts {
            // The SDKs put the link's own address in `to`: it says nothing
            // the link does not, and over MQTT the same message has no `to`.
            if msg
                .system(edgehub_router::SystemProperty::To)
                // Compared as text first: parsing allocates, per message.
                .is_some_and(|to| {
                    to.eq_ignore_ascii_case(text) || Address::parse(to).as_ref() == Some(&address)
                })
            {
                msg.clear_system(edgehub_router::SystemProperty::To);
            }
            if msg.body.len() > max {
                refused = Some(error(
                    LinkError::MessageSizeExceeded,
                    format!(
                        "message of {} bytes is over the {max}-byte limit",
                        msg.body.len()
                    ),
                ));
                break;
            }
            match state.hub.layer.send_telemetry(&identity, msg) {
                Ok(Some(s)) => stored.push(s),
                // No route took it: accepted (the sender did nothing wrong).
                Ok(None) => {}
                Err(e) => {
                    refused = Some(store_error(&e));
                    break;
                }
            }
        }
        if let Some(e) = refused {
            let _ = receiver.reject(info, e).await;
            continue;
        }
        // Accepted once every message of the transfer is stored (at once
        // when no route took any), in its turn.
        storing.push_back(Box::pin(async move {
            let mut failure = None;
            for s in stored {
                if let Err(e) = s.await {
                    failure.get_or_insert(e);
                }
            }
            (info, failure.map_or(Ok(()), Err))
        }));
    }
}

/// A transfer's messages on their way into the store.
type Storing = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = (DeliveryInfo, Result<(), edgehub_store::StoreError>)>
            + Send,
    >,
>;

/// Settles `accepted` (consecutive deliveries as ranges) and empties it.
async fn settle_accepted(receiver: &Receiver, accepted: &mut Vec<DeliveryInfo>) {
    if accepted.is_empty() {
        return;
    }
    if let Err(e) = receiver.accept_all(accepted.drain(..)).await {
        debug!(error = %e, "telemetry settlement not sent");
    }
}

fn store_error(e: &edgehub_store::StoreError) -> definitions::Error {
    if e.is_quota() {
        error(AmqpError::ResourceLimitExceeded, e.to_string())
    } else {
        error(AmqpError::InternalError, e.to_string())
    }
}

/// The next message for a sender link, or why the link ends: `Some` error
/// to close it with (taken over, token expired), `None` to close it quietly
/// (its queue replaced, the hub shutting down).
async fn next_out<T>(
    rx: &mut mpsc::Receiver<T>,
    end: std::pin::Pin<&mut impl std::future::Future<Output = definitions::Error>>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<T, Option<definitions::Error>> {
    tokio::select! {
        m = rx.recv() => m.ok_or(None),
        e = end => Err(Some(e)),
        _ = shutdown.changed() => Err(None),
    }
}

/// Frees a link's queue slot, unless a newer link took it already.
fn release<T>(slot: &Mutex<Option<mpsc::Sender<T>>>, tx: &mpsc::Sender<T>) {
    let mut g = slot.lock();
    if g.as_ref().is_some_and(|t| t.same_channel(tx)) {
        *g = None;
    }
}

async fn close_sender(sender: Sender, ended: Option<definitions::Error>) {
    match ended {
        Some(e) => {
            let _ = sender.close_with_error(e).await;
        }
        None => {
            let _ = sender.close().await;
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Out {
    Twin,
    Methods,
}

/// Twin answers and desired pushes, or method requests, out on a sender
/// link, pre-settled: a lost one is not redelivered (the device reads its
/// whole twin again; a method caller gets its timeout), as over MQTT.
async fn outbound(
    state: Arc<ConnState>,
    identity: Arc<str>,
    links: Arc<IdentityLinks>,
    mut sender: Sender,
    kind: Out,
    mut shutdown: watch::Receiver<bool>,
) {
    let (tx, mut rx) = mpsc::channel::<AmqpMessage>(OUT_QUEUE);
    let slot = match kind {
        Out::Twin => &links.twin,
        Out::Methods => &links.methods,
    };
    *slot.lock() = Some(tx.clone());
    debug!(peer = %state.peer, identity = %identity, ?kind, "AMQP link attached");
    let end = links.ended();
    tokio::pin!(end);
    let ended = loop {
        let m = match next_out(&mut rx, end.as_mut(), &mut shutdown).await {
            Ok(m) => m,
            Err(e) => break e,
        };
        let m = fe2o3_amqp::link::delivery::Sendable::builder()
            .message(m)
            .settled(true)
            .build();
        if let Err(e) = sender.send(m).await {
            debug!(peer = %state.peer, identity = %identity, error = %e, "AMQP {kind:?} message not sent");
            break None;
        }
    };
    release(slot, &tx);
    if kind == Out::Twin {
        links
            .desired
            .store(false, std::sync::atomic::Ordering::Release);
    }
    close_sender(sender, ended).await;
}

/// Twin requests: `operation` GET, PATCH (`resource` `/properties/reported`),
/// PUT and DELETE (`/notifications/twin/properties/desired`: desired-property
/// pushes on and off), answered on the twin sender link under the request's
/// correlation id.
async fn twin_requests(
    state: Arc<ConnState>,
    identity: Arc<str>,
    links: Arc<IdentityLinks>,
    mut receiver: Receiver,
    mut shutdown: watch::Receiver<bool>,
) {
    let text = |v: Option<&Value>| match v {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Symbol(s)) => Some(s.0.clone()),
        _ => None,
    };
    let end = links.ended();
    tokio::pin!(end);
    loop {
        let d = tokio::select! {
            d = receiver.recv::<Body<Value>>() => match d { Ok(d) => d, Err(_) => return },
            e = &mut end => {
                let _ = receiver.close_with_error(e).await;
                return;
            }
            _ = shutdown.changed() => return,
        };
        let info = DeliveryInfo::from(&d);
        let m = d.message();
        let corr = m
            .properties
            .as_ref()
            .and_then(|p| p.correlation_id.as_ref())
            .map(message::id_text)
            .unwrap_or_default();
        let op = text(message::annotation(m, "operation")).unwrap_or_default();
        let resource = text(message::annotation(m, "resource")).unwrap_or_default();
        let desired_resource =
            resource.eq_ignore_ascii_case("/notifications/twin/properties/desired");
        let layer = &state.hub.layer;
        match op.to_ascii_uppercase().as_str() {
            "GET" => layer.twin_get(&identity, corr),
            "PATCH" if resource.eq_ignore_ascii_case("/properties/reported") => {
                layer.patch_reported(&identity, corr, message::body_bytes(&m.body))
            }
            "PUT" | "DELETE" if desired_resource => {
                links.desired.store(
                    op.eq_ignore_ascii_case("PUT"),
                    std::sync::atomic::Ordering::Release,
                );
                offer(&links.twin, twin_answer(corr, 200, None, b""));
            }
            _ => {
                let body = edgehub_device::error::error_body(
                    edgehub_device::error::ErrorCode::ArgumentInvalid,
                    &format!("twin operation {op:?} on {resource:?} is not supported"),
                )
                .to_string();
                offer(&links.twin, twin_answer(corr, 400, None, body.as_bytes()));
            }
        }
        let _ = receiver.accept(info).await;
    }
}

/// Method answers: the request's correlation id, `IoThub-status`, the payload.
async fn method_responses(
    state: Arc<ConnState>,
    identity: Arc<str>,
    links: Arc<IdentityLinks>,
    mut receiver: Receiver,
    mut shutdown: watch::Receiver<bool>,
) {
    let end = links.ended();
    tokio::pin!(end);
    loop {
        let d = tokio::select! {
            d = receiver.recv::<Body<Value>>() => match d { Ok(d) => d, Err(_) => return },
            e = &mut end => {
                let _ = receiver.close_with_error(e).await;
                return;
            }
            _ = shutdown.changed() => return,
        };
        let info = DeliveryInfo::from(&d);
        let m = d.message();
        let rid = m
            .properties
            .as_ref()
            .and_then(|p| p.correlation_id.as_ref())
            .map(message::id_text)
            .and_then(|c| u64::from_str_radix(&c, 16).ok());
        let status = message::property(m, "IoThub-status").and_then(|s| s.parse::<i32>().ok());
        match (rid, status) {
            (Some(rid), Some(status)) => {
                let payload = message::body_bytes(&m.body);
                if !state
                    .hub
                    .layer
                    .method_response(&identity, rid, status, payload)
                {
                    debug!(peer = %state.peer, identity = %identity, "method answer for no waiting call; ignored");
                }
                let _ = receiver.accept(info).await;
            }
            _ => {
                let e = error(
                    AmqpError::InvalidField,
                    "a method answer needs the request's correlation-id and an IoThub-status property",
                );
                let _ = receiver.reject(info, e).await;
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    C2d,
    Inputs,
}

/// Cloud-to-device messages or module inputs out on a sender link, one at
/// a time; the client's disposition settles each: Accepted completes,
/// Rejected rejects, Released and Modified abandon (offered again, its
/// delivery count one higher).
async fn deliveries(
    state: Arc<ConnState>,
    identity: Arc<str>,
    links: Arc<IdentityLinks>,
    mut sender: Sender,
    kind: Kind,
    mut shutdown: watch::Receiver<bool>,
) {
    let (tx, mut rx) = mpsc::channel::<Delivery>(OUT_QUEUE);
    let slot = match kind {
        Kind::C2d => &links.c2d,
        Kind::Inputs => &links.inputs,
    };
    // A newer link of the same kind replaces this one.
    *slot.lock() = Some(tx.clone());
    debug!(peer = %state.peer, identity = %identity, ?kind, "AMQP delivery link attached");
    let end = links.ended();
    tokio::pin!(end);
    let ended = loop {
        let d = match next_out(&mut rx, end.as_mut(), &mut shutdown).await {
            Ok(d) => d,
            Err(e) => break e,
        };
        let (amqp, receipt) = match d {
            Delivery::CloudToDevice {
                message,
                lock,
                delivery_count,
                receipt,
            } => {
                let mut token = [0u8; 16];
                token[8..].copy_from_slice(&lock.0.to_be_bytes());
                let device = identity.split('/').next().unwrap_or_default();
                let m = message::outgoing(
                    &message,
                    message::Outgoing {
                        lock_token: Some(token),
                        delivery_count: Some(delivery_count.saturating_sub(1)),
                        input_name: None,
                        to: Some(format!("/devices/{device}")),
                    },
                );
                (m, receipt)
            }
            Delivery::ModuleInput {
                input,
                message,
                receipt,
            } => {
                let m = message::outgoing(
                    &message,
                    message::Outgoing {
                        lock_token: None,
                        delivery_count: None,
                        input_name: Some(&input),
                        to: None,
                    },
                );
                (m, receipt)
            }
            _ => continue,
        };
        match sender.send(amqp).await {
            Ok(outcome) => settle(&receipt, outcome),
            Err(e) => {
                receipt.lost();
                debug!(peer = %state.peer, identity = %identity, error = %e, "AMQP delivery not sent");
                break None;
            }
        }
    };
    // What is still queued goes to the next link.
    release(slot, &tx);
    drop(tx);
    rx.close();
    while let Ok(d) = rx.try_recv() {
        if let Some(r) = d.receipt() {
            r.lost();
        }
    }
    close_sender(sender, ended).await;
}

fn settle(receipt: &Receipt, outcome: Outcome) {
    match outcome {
        Outcome::Accepted(_) => receipt.complete(),
        Outcome::Rejected(_) => receipt.reject(),
        Outcome::Released(_) | Outcome::Modified(_) => receipt.abandon(),
        #[allow(unreachable_patterns)]
        _ => {
            warn!("unknown AMQP outcome; abandoning");
            receipt.abandon()
        }
    }
}
