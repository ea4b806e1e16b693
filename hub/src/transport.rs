//! Transports: a listener accepts connections and yields byte streams —
//! plain TCP, or TLS with the client certificate chain the peer presented —
//! each handed to a protocol head ([`Head`]) on its own task. The heads see
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
            tracker.live.fetch_add(1, Ordering::AcqRel);
            let guard = Guard(tracker.clone());
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
impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
