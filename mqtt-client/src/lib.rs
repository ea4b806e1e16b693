//! A small MQTT client on `edgehub-codec`, for edgehub's own outbound
//! connections: the upstream link (one connection per downstream identity
//! to IoT Hub or a parent edgehub) and `edgehub-loadtest`'s devices.
//!
//! It does the parts both need and nothing else: [`dial`] a byte stream
//! over a [`Transport`] (TCP, TLS, WebSocket over TLS, QUIC), [`Client::handshake`] (CONNECT, then the CONNACK with a typed
//! refusal), and [`Client::send`] / [`Client::flush`] / [`Client::recv`]
//! with one read and one write buffer, so a burst of packets costs one write
//! call. Packet ids, in-flight windows, keep-alive and retries are the
//! caller's: the upstream link and the load generator want different ones.
//! Why not rumqttc: both callers need packet-level control (their own
//! windows and acknowledgement order, PUBLISHes straight from stored
//! bytes) and the codec is already ours.
//!
//! Owns: the byte stream and framing of one outbound connection. Must not
//! touch: credentials (the caller builds CONNECT) or what packets mean.

use std::time::Duration;

use bytes::BytesMut;
use edgehub_codec::{decode, encode, Connect, Packet, Protocol};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// A byte stream an MQTT connection runs over (TCP, TLS, WebSocket, QUIC).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// AMQP libraries ask their byte streams to be `Debug`.
impl std::fmt::Debug for dyn Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Io")
    }
}

/// The step of opening a connection that can time out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    TcpConnect,
    TlsHandshake,
    WebSocketUpgrade,
    QuicHandshake,
    ConnAck,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::TcpConnect => "TCP connect",
            Step::TlsHandshake => "TLS handshake",
            Step::WebSocketUpgrade => "WebSocket upgrade",
            Step::QuicHandshake => "QUIC handshake",
            Step::ConnAck => "waiting for CONNACK",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0} timed out")]
    Timeout(Step),
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
    #[error("TLS handshake with {addr}: {source}")]
    Tls {
        addr: String,
        source: std::io::Error,
    },
    #[error("WebSocket upgrade at {addr}: {detail}")]
    WebSocket { addr: String, detail: String },
    #[error("QUIC connection to {addr}: {detail}")]
    Quic { addr: String, detail: String },
    /// The server answered CONNACK with a non-zero return / reason code.
    #[error("connection refused: {}", refusal(*.0))]
    Refused(u8),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("the server closed the connection")]
    Closed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn refusal(code: u8) -> String {
    let what = match code {
        1 => "unacceptable protocol version",
        2 => "identifier rejected",
        3 => "server unavailable",
        4 | 0x86 => "bad user name or password",
        5 | 0x87 => "not authorized",
        _ => "refused",
    };
    format!("{what} (code {code:#04x})")
}

impl ClientError {
    /// The server refused these credentials (not a network or server fault).
    pub fn is_auth_refusal(&self) -> bool {
        matches!(self, ClientError::Refused(4 | 5 | 0x86 | 0x87))
    }
}

/// How to reach a server.
pub enum Transport {
    Tcp,
    /// TLS, the certificate verified against the host name.
    Tls(tokio_rustls::TlsConnector),
    /// WebSocket over TLS, `GET path` offering `subprotocol` (`mqtt`, or
    /// `AMQPWSB10` for AMQP as IoT Hub serves it).
    Wss {
        tls: tokio_rustls::TlsConnector,
        path: String,
        subprotocol: &'static str,
    },
    /// QUIC (ALPN `mqtt`): one UDP socket for every connection dialled,
    /// opened at the first.
    Quic {
        tls: Box<rustls::ClientConfig>,
        endpoint: std::sync::OnceLock<edgehub_streams::quic::quinn::Endpoint>,
    },
}

impl Transport {
    pub fn quic(tls: rustls::ClientConfig) -> Transport {
        Transport::Quic {
            tls: Box::new(tls),
            endpoint: std::sync::OnceLock::new(),
        }
    }
}

/// A connection to `host:port` over `transport`, each step within
/// `timeout`.
pub async fn dial(
    host: &str,
    port: u16,
    transport: &Transport,
    timeout: Duration,
) -> Result<Box<dyn Io>, ClientError> {
    let addr = format!("{host}:{port}");
    if let Transport::Quic { tls, endpoint } = transport {
        return dial_quic(host, &addr, tls, endpoint, timeout).await;
    }
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(&addr))
        .await
        .map_err(|_| ClientError::Timeout(Step::TcpConnect))?
        .map_err(|source| ClientError::Connect {
            addr: addr.clone(),
            source,
        })?;
    // Small packets (PUBACKs, pings) must not wait for Nagle.
    let _ = tcp.set_nodelay(true);
    let tls = match transport {
        Transport::Tcp => return Ok(Box::new(tcp)),
        Transport::Tls(tls) | Transport::Wss { tls, .. } => tls,
        Transport::Quic { .. } => unreachable!("dialled above"),
    };
    let name = rustls_pki_types::ServerName::try_from(host.to_owned())
        .map_err(|_| ClientError::ServerName(host.to_owned()))?;
    let s = tokio::time::timeout(timeout, tls.connect(name, tcp))
        .await
        .map_err(|_| ClientError::Timeout(Step::TlsHandshake))?
        .map_err(|source| ClientError::Tls {
            addr: addr.clone(),
            source,
        })?;
    let Transport::Wss {
        path, subprotocol, ..
    } = transport
    else {
        return Ok(Box::new(s));
    };
    let url = format!("wss://{addr}{path}");
    let ws = tokio::time::timeout(timeout, edgehub_streams::ws::connect(s, &url, subprotocol))
        .await
        .map_err(|_| ClientError::Timeout(Step::WebSocketUpgrade))?
        .map_err(|e| ClientError::WebSocket {
            addr,
            detail: e.to_string(),
        })?;
    Ok(Box::new(ws))
}

async fn dial_quic(
    host: &str,
    addr: &str,
    tls: &rustls::ClientConfig,
    endpoint: &std::sync::OnceLock<edgehub_streams::quic::quinn::Endpoint>,
    timeout: Duration,
) -> Result<Box<dyn Io>, ClientError> {
    let quic_error = |detail: String| ClientError::Quic {
        addr: addr.to_owned(),
        detail,
    };
    let endpoint = match endpoint.get() {
        Some(e) => e,
        None => {
            let e = edgehub_streams::quic::client_endpoint((*tls).clone())
                .map_err(|e| quic_error(e.to_string()))?;
            endpoint.get_or_init(|| e)
        }
    };
    let remote = tokio::time::timeout(timeout, tokio::net::lookup_host(addr))
        .await
        .map_err(|_| ClientError::Timeout(Step::QuicHandshake))?
        .map_err(|source| ClientError::Connect {
            addr: addr.to_owned(),
            source,
        })?
        .next()
        .ok_or_else(|| quic_error("the host name resolves to no address".into()))?;
    let stream = tokio::time::timeout(
        timeout,
        edgehub_streams::quic::connect(endpoint, remote, host),
    )
    .await
    .map_err(|_| ClientError::Timeout(Step::QuicHandshake))?
    .map_err(|e| quic_error(e.to_string()))?;
    Ok(Box::new(stream))
}

/// One MQTT connection, after a successful CONNACK.
pub struct Client {
    io: Box<dyn Io>,
    rx: BytesMut,
    tx: BytesMut,
    protocol: Protocol,
}

impl Client {
    /// Sends `connect` over `io` and waits up to `timeout` for CONNACK.
    pub async fn handshake(
        io: Box<dyn Io>,
        connect: Connect,
        timeout: Duration,
    ) -> Result<Client, ClientError> {
        let mut c = Client {
            io,
            rx: BytesMut::with_capacity(8192),
            tx: BytesMut::with_capacity(8192),
            protocol: connect.protocol,
        };
        c.send(&Packet::Connect(Box::new(connect)));
        c.flush().await?;
        match tokio::time::timeout(timeout, c.recv()).await {
            Err(_) => Err(ClientError::Timeout(Step::ConnAck)),
            Ok(Ok(Packet::ConnAck(a))) if a.code == 0 => Ok(c),
            Ok(Ok(Packet::ConnAck(a))) => Err(ClientError::Refused(a.code)),
            Ok(Ok(p)) => Err(ClientError::Protocol(format!(
                "{} before CONNACK",
                p.name()
            ))),
            Ok(Err(e)) => Err(e),
        }
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Queues `p` in the write buffer (nothing is written until [`flush`](Self::flush)).
    pub fn send(&mut self, p: &Packet) {
        // Only an oversized packet fails to encode, and the server's limit
        // is the server's to enforce.
        let _ = encode(p, self.protocol, &mut self.tx, usize::MAX);
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        if !self.tx.is_empty() {
            self.io.write_all(&self.tx).await?;
            self.tx.clear();
            // WebSocket gathers writes into one message until flushed.
            self.io.flush().await?;
        }
        Ok(())
    }

    /// The next packet from the server.
    pub async fn recv(&mut self) -> Result<Packet, ClientError> {
        loop {
            match decode(&mut self.rx, self.protocol, usize::MAX) {
                Ok(Some(p)) => return Ok(p),
                Ok(None) => {}
                Err(e) => return Err(ClientError::Protocol(e.to_string())),
            }
            if self.io.read_buf(&mut self.rx).await? == 0 {
                return Err(ClientError::Closed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use edgehub_codec::{ConnAck, Props, PubResp, Publish, QoS, Str};
    use tokio::net::TcpListener;

    fn connect() -> Connect {
        Connect {
            protocol: Protocol::V311,
            clean_start: true,
            keep_alive: 30,
            properties: Props::default(),
            client_id: Str::from("dev1"),
            will: None,
            username: Some(Str::from("user")),
            password: Some(Bytes::from_static(b"secret")),
        }
    }

    /// A server on a real socket that answers CONNECT with `code`, then
    /// acknowledges every QoS 1 PUBLISH.
    async fn server(code: u8) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut rx = BytesMut::new();
            let mut tx = BytesMut::new();
            loop {
                while let Ok(Some(p)) = decode(&mut rx, Protocol::V311, usize::MAX) {
                    let answer = match p {
                        Packet::Connect(c) => {
                            assert_eq!(&*c.client_id, "dev1");
                            assert_eq!(c.password.as_deref(), Some(&b"secret"[..]));
                            Packet::ConnAck(ConnAck {
                                code,
                                ..Default::default()
                            })
                        }
                        Packet::Publish(p) => Packet::PubAck(PubResp::new(p.packet_id, 0)),
                        _ => continue,
                    };
                    encode(&answer, Protocol::V311, &mut tx, usize::MAX).unwrap();
                }
                s.write_all(&tx).await.unwrap();
                tx.clear();
                if s.read_buf(&mut rx).await.unwrap_or(0) == 0 {
                    return;
                }
            }
        });
        port
    }

    /// Dials the test server on `port` and sends CONNECT: the handshake's outcome.
    async fn handshake(port: u16) -> Result<Client, ClientError> {
        let t = Duration::from_secs(5);
        Client::handshake(
            dial("127.0.0.1", port, &Transport::Tcp, t).await?,
            connect(),
            t,
        )
        .await
    }

    #[tokio::test]
    async fn handshake_then_publish_and_ack() {
        let mut c = handshake(server(0).await).await.unwrap();
        for id in 1..=3u16 {
            c.send(&Packet::Publish(Publish {
                topic: Str::from("devices/dev1/messages/events/"),
                payload: Bytes::from_static(b"x"),
                qos: QoS::AtLeastOnce,
                retain: false,
                dup: false,
                packet_id: id,
                properties: Props::default(),
            }));
        }
        c.flush().await.unwrap();
        for id in 1..=3u16 {
            match c.recv().await.unwrap() {
                Packet::PubAck(a) => assert_eq!(a.packet_id, id),
                p => panic!("{} instead of PUBACK", p.name()),
            }
        }
    }

    #[tokio::test]
    async fn refusals_and_failures_are_typed() {
        let e = handshake(server(5).await).await.err().unwrap();
        assert!(e.is_auth_refusal(), "{e}");
        assert!(e.to_string().contains("not authorized"), "{e}");
        // Nobody listening: a connect error that names the address.
        let free = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);
        let e = dial("127.0.0.1", port, &Transport::Tcp, Duration::from_secs(5))
            .await
            .err()
            .unwrap();
        assert!(matches!(e, ClientError::Connect { .. }), "{e}");
        assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
        assert!(!e.is_auth_refusal());
    }

    #[tokio::test]
    async fn a_server_that_closes_is_closed_not_a_hang() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            drop(s);
        });
        let e = handshake(port).await.err().unwrap();
        assert!(matches!(e, ClientError::Closed | ClientError::Io(_)), "{e}");
    }
}
