//! MQTT over QUIC as EMQX defines it: ALPN `mqtt`, TLS 1.3, UDP port
//! 14567 by default, the whole MQTT session on the first bidirectional
//! stream the client opens (single-stream mode).
//!
//! Transport settings are sized for MQTT rather than quinn's defaults
//! (100 + 100 streams with 1.25 MB windows, made for HTTP/3): an idle
//! device should cost about what an idle TLS connection costs. 0-RTT is
//! off (early data could be replayed: a replayed PUBLISH is a duplicate
//! message); the client's address may change (migration is on).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, RecvStream, SendStream, VarInt};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The QUIC implementation, for endpoints built from [`server_config`].
pub use quinn;

/// The ALPN token of MQTT over QUIC.
pub const ALPN: &[u8] = b"mqtt";
/// EMQX's port, which QUIC-capable MQTT clients default to.
pub const DEFAULT_PORT: u16 = 14567;

/// A connection with no traffic for this long is gone (the effective
/// value is the smaller of both ends' settings).
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// QUIC pings on a quiet connection, so a client with a shorter idle
/// timeout than its MQTT keep-alive is not cut off between PINGREQs.
const KEEP_ALIVE: Duration = Duration::from_secs(20);
/// Flow-control windows: one stream's worth is a few MQTT packets; the
/// connection's bounds what a peer may have in flight at once.
const STREAM_WINDOW: u32 = 64 * 1024;
const CONNECTION_WINDOW: u32 = 256 * 1024;
/// How long a closed stream waits for the peer to acknowledge what was
/// written last (a refusing CONNACK, a DISCONNECT) before the connection
/// is closed.
const LINGER: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    #[error("QUIC needs TLS 1.3: {0}")]
    Tls(String),
    #[error("QUIC endpoint: {0}")]
    Endpoint(#[from] io::Error),
    #[error("QUIC connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("QUIC connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
}

fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(1))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(u64::from(CONNECTION_WINDOW))
        .datagram_receive_buffer_size(None)
        .max_idle_timeout(Some(
            IDLE_TIMEOUT.try_into().expect("idle timeout fits a VarInt"),
        ))
        .keep_alive_interval(Some(KEEP_ALIVE));
    t
}

/// The server side of an endpoint from the hub's TLS settings (same
/// certificate, same optional client certificate).
pub fn server_config(mut tls: rustls::ServerConfig) -> Result<quinn::ServerConfig, QuicError> {
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| QuicError::Tls(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport())).migration(true);
    Ok(cfg)
}

/// A client endpoint on an ephemeral UDP port, dialling with `tls`.
pub fn client_endpoint(mut tls: rustls::ClientConfig) -> Result<quinn::Endpoint, QuicError> {
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.enable_early_data = false;
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| QuicError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport()));
    let bind: SocketAddr = ([0, 0, 0, 0], 0).into();
    let mut endpoint = quinn::Endpoint::client(bind)?;
    endpoint.set_default_client_config(cfg);
    Ok(endpoint)
}

/// Dials `addr` (TLS server name `server_name`) and opens the stream the
/// MQTT session runs on.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    server_name: &str,
) -> Result<QuicStream, QuicError> {
    let conn = endpoint.connect(addr, server_name)?.await?;
    let (send, recv) = conn.open_bi().await?;
    Ok(QuicStream::new(conn, send, recv))
}

/// The client certificate chain a QUIC peer presented, leaf first.
pub fn peer_certificates(conn: &Connection) -> Option<Vec<CertificateDer<'static>>> {
    conn.peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()
        .map(|c| *c)
}

/// One bidirectional QUIC stream as a byte stream. Holds its connection:
/// when the stream is dropped, what was written is given [`LINGER`] to be
/// acknowledged, then the connection closes.
pub struct QuicStream {
    conn: Connection,
    send: Option<SendStream>,
    recv: RecvStream,
}

impl QuicStream {
    pub fn new(conn: Connection, send: SendStream, recv: RecvStream) -> QuicStream {
        QuicStream {
            conn,
            send: Some(send),
            recv,
        }
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    fn send(&mut self) -> &mut SendStream {
        self.send.as_mut().expect("send stream present until drop")
    }
}

impl Drop for QuicStream {
    fn drop(&mut self) {
        let (Some(mut send), Ok(rt)) = (self.send.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let conn = self.conn.clone();
        rt.spawn(async move {
            let _ = send.finish();
            let _ = tokio::time::timeout(LINGER, send.stopped()).await;
            conn.close(VarInt::from_u32(0), b"");
        });
    }
}

impl AsyncRead for QuicStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        AsyncRead::poll_read(Pin::new(&mut self.get_mut().recv), cx, buf)
    }
}

impl AsyncWrite for QuicStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(self.get_mut().send()), cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(self.get_mut().send()), cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(self.get_mut().send()), cx)
    }
}
