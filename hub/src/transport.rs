//! Transports: a listener accepts connections and yields byte streams —
//! plain TCP, TLS with the client certificate chain the peer presented,
//! WebSocket over either ([`WebSocketHead`] picks the head by
//! subprotocol), or a QUIC stream ([`QuicListener`]) — each handed to a
//! protocol head ([`Head`]) on its own task. The heads see
//! an [`Accepted`] stream and nothing of how it arrived, so a new
//! transport (WebSocket, QUIC) plugs in under every head, and a new head
//! (AMQP) takes streams from every transport.
//!
//! Owns: accepting, the TLS handshake and its timeout, counting live
//! connections for a graceful shutdown. Must not touch: any protocol.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

/// An accepted byte stream.
pub enum Stream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Over TCP or TLS, after the upgrade.
    Ws(Box<edgehub_streams::ws::ServerStream>),
    Quic(Box<edgehub_streams::quic::QuicStream>),
}

/// A stream and what the transport knows of its peer.
pub struct Accepted {
    pub stream: Stream,
    pub peer: SocketAddr,
    /// The TLS client certificate chain, leaf first, when one was presented.
    pub client_chain: Option<Vec<CertificateDer<'static>>>,
}

pub type BoxFuture = Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A protocol head: serves one accepted stream until it closes or the
/// server shuts down.
pub trait Head: Send + Sync + 'static {
    fn serve(self: Arc<Self>, accepted: Accepted, shutdown: watch::Receiver<bool>) -> BoxFuture;
}

/// Live connections, so shutdown can wait for them to close.
#[derive(Default)]
pub struct Tracker {
    live: AtomicUsize,
    idle: Notify,
}

struct Guard(Arc<Tracker>);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Tracker {
    /// Counts a connection live until the guard drops.
    fn enter(self: &Arc<Self>) -> Guard {
        self.live.fetch_add(1, Ordering::AcqRel);
        Guard(self.clone())
    }

    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// Resolves once no connection is live.
    pub async fn idle(&self) {
        loop {
            let idle = self.idle.notified();
            if self.live() == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// A bound listener: TCP, with TLS from the first byte when it has an
/// acceptor.
pub struct Listener {
    pub tcp: TcpListener,
    pub tls: Option<TlsAcceptor>,
    /// How long a TLS handshake may take.
    pub handshake_timeout: Duration,
}

impl Listener {
    /// Accepts until the task is aborted, each connection handed to
    /// `head` on its own task.
    pub async fn run(
        self,
        head: Arc<dyn Head>,
        shutdown: watch::Receiver<bool>,
        tracker: Arc<Tracker>,
    ) {
        loop {
            let (tcp, peer) = match self.tcp.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let guard = tracker.enter();
            let (head, shutdown, tls) = (head.clone(), shutdown.clone(), self.tls.clone());
            let timeout = self.handshake_timeout;
            tokio::spawn(async move {
                let _guard = guard;
                let _ = tcp.set_nodelay(true);
                let accepted = match tls {
                    None => Accepted {
                        stream: Stream::Tcp(tcp),
                        peer,
                        client_chain: None,
                    },
                    Some(acceptor) => match tls_handshake(acceptor, tcp, peer, timeout).await {
                        Some(a) => a,
                        None => return,
                    },
                };
                head.serve(accepted, shutdown).await;
            });
        }
    }
}

/// The WebSocket listener's head: answers the upgrade, then hands the
/// stream to the MQTT or the AMQP head as the subprotocol says.
pub struct WebSocketHead {
    pub mqtt: Arc<dyn Head>,
    pub amqp: Arc<dyn Head>,
    /// How long the upgrade request may take.
    pub timeout: Duration,
    /// Largest WebSocket message accepted (it may carry several packets).
    pub max_message: usize,
}

impl Head for WebSocketHead {
    fn serve(self: Arc<Self>, a: Accepted, shutdown: watch::Receiver<bool>) -> BoxFuture {
        use edgehub_streams::ws;
        Box::pin(async move {
            const HEADS: &[&str] = &[ws::MQTT, ws::AMQP];
            let peer = a.peer;
            let upgrade = ws::accept(a.stream, HEADS, self.max_message);
            let (stream, protocol) = match tokio::time::timeout(self.timeout, upgrade).await {
                Ok(Ok(x)) => x,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "WebSocket upgrade failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "no WebSocket upgrade within the connect timeout");
                    return;
                }
            };
            let head = if protocol == ws::MQTT {
                &self.mqtt
            } else {
                &self.amqp
            };
            let accepted = Accepted {
                stream: Stream::Ws(Box::new(stream)),
                peer,
                client_chain: a.client_chain,
            };
            head.clone().serve(accepted, shutdown).await;
        })
    }
}

/// MQTT over QUIC: each connection's first bidirectional stream goes to
/// the head.
pub struct QuicListener {
    pub endpoint: edgehub_streams::quic::quinn::Endpoint,
    /// How long the QUIC handshake and the first stream may take.
    pub handshake_timeout: Duration,
}

impl QuicListener {
    pub async fn run(
        self,
        head: Arc<dyn Head>,
        shutdown: watch::Receiver<bool>,
        tracker: Arc<Tracker>,
    ) {
        while let Some(incoming) = self.endpoint.accept().await {
            let guard = tracker.enter();
            let (head, shutdown) = (head.clone(), shutdown.clone());
            let timeout = self.handshake_timeout;
            tokio::spawn(async move {
                let _guard = guard;
                let peer = incoming.remote_address();
                let opened = tokio::time::timeout(timeout, async move {
                    let conn = incoming.await?;
                    let (send, recv) = conn.accept_bi().await?;
                    Ok::<_, edgehub_streams::quic::quinn::ConnectionError>((conn, send, recv))
                });
                let (conn, send, recv) = match opened.await {
                    Ok(Ok(x)) => x,
                    Ok(Err(e)) => {
                        debug!(%peer, error = %e, "QUIC connection failed before its first stream");
                        return;
                    }
                    Err(_) => {
                        debug!(%peer, "QUIC handshake or first stream timed out");
                        return;
                    }
                };
                let client_chain = edgehub_streams::quic::peer_certificates(&conn);
                let stream = edgehub_streams::quic::QuicStream::new(conn, send, recv);
                let accepted = Accepted {
                    stream: Stream::Quic(Box::new(stream)),
                    peer,
                    client_chain,
                };
                head.serve(accepted, shutdown).await;
            });
        }
    }
}

async fn tls_handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    timeout: Duration,
) -> Option<Accepted> {
    let stream = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            debug!(%peer, "TLS handshake timed out");
            return None;
        }
    };
    let client_chain = stream
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect());
    Some(Accepted {
        stream: Stream::Tls(Box::new(stream)),
        peer,
        client_chain,
    })
}

// An enum rather than a boxed trait object: the connection's reads and
// writes dispatch statically, one match per syscall.
macro_rules! each {
    ($stream:expr, $s:ident => $e:expr) => {
        match $stream {
            Stream::Tcp($s) => $e,
            Stream::Tls($s) => $e,
            Stream::Ws($s) => $e,
            Stream::Quic($s) => $e,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        each!(self, s => s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }
}
