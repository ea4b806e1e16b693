//! MQTT and AMQP over WebSocket, as IoT Hub serves them on
//! `wss://host:443/$iothub/websocket`.
//!
//! The server side answers the HTTP upgrade with hyper (it parses and
//! bounds the request; we only decide), picking the subprotocol the
//! client offered that names a protocol head. The path is not checked, as
//! at IoT Hub's edgeHub: SDKs differ in their query strings. No pings are
//! sent (some SDK stacks mishandle them; MQTT keep-alive and AMQP idle
//! timeouts already cover liveness); the peer's pings are answered.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use base64::Engine as _;
use bytes::{Buf, Bytes, BytesMut};
use futures_core::Stream as _;
use futures_sink::Sink;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_websockets::{CloseCode, Limits, Message, WebSocketStream};

/// The subprotocol of MQTT over WebSocket (every MQTT client).
pub const MQTT: &str = "mqtt";
/// The subprotocol IoT Hub's SDKs use for AMQP (not OASIS' `amqp`).
pub const AMQP: &str = "AMQPWSB10";
/// Where IoT Hub's SDKs connect.
pub const IOTHUB_PATH: &str = "/$iothub/websocket";

/// Bytes written are sent as one binary message per flush; past this
/// much unflushed data a message goes out anyway (back-pressure, bounded
/// memory).
const MAX_MESSAGE: usize = 64 * 1024;

/// The server's upgraded connection.
pub type ServerStream = WsStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Why an upgrade did not happen.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// Refused with this HTTP status and reason (sent to the client).
    #[error("upgrade refused ({status}): {reason}")]
    Refused { status: u16, reason: String },
    /// Not HTTP, or the connection failed or closed during the handshake.
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
}

type Decision = Result<(&'static str, hyper::upgrade::OnUpgrade), (u16, String)>;

/// Serves one HTTP/1.1 request on `io`: a WebSocket upgrade offering one of
/// `subprotocols` (matched case-insensitively, the client's first choice
/// that fits) is answered 101 and the stream returned with the chosen
/// subprotocol; anything else gets a 4xx with the reason as its body.
/// The caller bounds the time it may take.
pub async fn accept<S>(
    io: S,
    subprotocols: &'static [&'static str],
    max_message: usize,
) -> Result<(ServerStream, &'static str), AcceptError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let decision: Arc<Mutex<Option<Decision>>> = Arc::default();
    let service = {
        let decision = decision.clone();
        hyper::service::service_fn(move |mut req: Request<Incoming>| {
            let (response, d) = match upgrade_response(&req, subprotocols) {
                Ok((proto, response)) => (response, Ok((proto, hyper::upgrade::on(&mut req)))),
                Err((status, reason)) => (refusal(status, &reason), Err((status, reason))),
            };
            *decision.lock().expect("decision lock") = Some(d);
            std::future::ready(Ok::<_, std::convert::Infallible>(response))
        })
    };
    hyper::server::conn::http1::Builder::new()
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
        .await?;
    let decided = decision.lock().expect("decision lock").take();
    match decided {
        Some(Ok((proto, on))) => {
            let upgraded = on.await?;
            let ws = tokio_websockets::ServerBuilder::new()
                .limits(Limits::default().max_payload_len(Some(max_message)))
                .serve(TokioIo::new(upgraded));
            Ok((WsStream::new(ws), proto))
        }
        Some(Err((status, reason))) => Err(AcceptError::Refused { status, reason }),
        // The connection closed before a whole request arrived.
        None => Err(AcceptError::Refused {
            status: 400,
            reason: "no request".into(),
        }),
    }
}

type Refusal = (u16, String);

fn upgrade_response<B>(
    req: &Request<B>,
    subprotocols: &[&'static str],
) -> Result<(&'static str, Response<Full<Bytes>>), Refusal> {
    let h = req.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        h.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if req.method() != http::Method::GET {
        return Err((405, "a WebSocket upgrade is a GET".into()));
    }
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return Err((
            400,
            "only WebSocket upgrades are served here (Upgrade: websocket, Connection: Upgrade)"
                .into(),
        ));
    }
    if h.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return Err((426, "WebSocket version 13 is required".into()));
    }
    let Some(key) = h.get(header::SEC_WEBSOCKET_KEY) else {
        return Err((400, "Sec-WebSocket-Key missing".into()));
    };
    let offered: Vec<&str> = h
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    let Some(proto) = offered.iter().find_map(|o| {
        subprotocols
            .iter()
            .copied()
            .find(|p| p.eq_ignore_ascii_case(o))
    }) else {
        return Err((
            400,
            format!(
                "no supported subprotocol offered (offered: {:?}; supported: {})",
                offered,
                subprotocols.join(", ")
            ),
        ));
    };
    // Answer with the client's spelling: some clients compare exactly.
    let spelled = offered
        .iter()
        .find(|o| o.eq_ignore_ascii_case(proto))
        .copied()
        .unwrap_or(proto);
    let response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept_key(key.as_bytes()))
        .header(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_str(spelled).map_err(|_| (400, "bad subprotocol".to_owned()))?,
        )
        .body(Full::new(Bytes::new()))
        .expect("static response parts");
    Ok((proto, response))
}

fn refusal(status: u16, reason: &str) -> Response<Full<Bytes>> {
    let mut body = reason.to_owned();
    body.push('\n');
    let mut r = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(header::CONNECTION, "close");
    if status == 426 {
        r = r.header(header::SEC_WEBSOCKET_VERSION, "13");
    }
    r.body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}

/// RFC 6455 §4.2.2: base64(SHA-1(key ‖ GUID)).
pub fn accept_key(key: &[u8]) -> String {
    use sha1::Digest;
    let mut sha = sha1::Sha1::new();
    sha.update(key);
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("bad WebSocket URL {0:?}")]
    Url(String),
    #[error("WebSocket upgrade: {0}")]
    Upgrade(#[from] tokio_websockets::Error),
    #[error("the server chose subprotocol {chosen:?}, not {wanted:?}")]
    Subprotocol { wanted: String, chosen: String },
}

/// The client side: upgrades `io` (already TLS when the URL is `wss://`)
/// with `GET url`, offering `subprotocol`, and checks the server chose it.
pub async fn connect<S>(io: S, url: &str, subprotocol: &str) -> Result<WsStream<S>, ConnectError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let value =
        HeaderValue::from_str(subprotocol).map_err(|_| ConnectError::Url(url.to_owned()))?;
    let builder = tokio_websockets::ClientBuilder::new()
        .uri(url)
        .map_err(|_| ConnectError::Url(url.to_owned()))?
        .add_header(header::SEC_WEBSOCKET_PROTOCOL, value)?;
    let (ws, response) = builder.connect_on(io).await?;
    let chosen = response
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !chosen.eq_ignore_ascii_case(subprotocol) {
        return Err(ConnectError::Subprotocol {
            wanted: subprotocol.to_owned(),
            chosen: chosen.to_owned(),
        });
    }
    Ok(WsStream::new(ws))
}

/// A WebSocket connection as a byte stream: reads yield the payloads of
/// binary messages back to back; writes are gathered and sent as one
/// binary message per flush.
pub struct WsStream<S> {
    ws: WebSocketStream<S>,
    /// The unread rest of the last binary message.
    read: Bytes,
    /// Written since the last flush.
    write: BytesMut,
    eof: bool,
    peer_closed: bool,
    close_sent: bool,
}

impl<S> WsStream<S> {
    fn new(ws: WebSocketStream<S>) -> Self {
        WsStream {
            ws,
            read: Bytes::new(),
            write: BytesMut::new(),
            eof: false,
            peer_closed: false,
            close_sent: false,
        }
    }
}

fn ws_error(e: tokio_websockets::Error) -> io::Error {
    match e {
        tokio_websockets::Error::Io(e) => e,
        e => io::Error::new(io::ErrorKind::InvalidData, e),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    /// Hands the gathered writes to the WebSocket as one message.
    fn poll_send_gathered(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write.is_empty() {
            ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(ws_error)?;
            let payload = self.write.split().freeze();
            Pin::new(&mut self.ws)
                .start_send(Message::binary(payload))
                .map_err(ws_error)?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.read.is_empty() {
                let n = this.read.len().min(buf.remaining());
                buf.put_slice(&this.read[..n]);
                this.read.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                None => this.eof = true,
                // The peer closed: failing to acknowledge is no error.
                Some(Err(_)) if this.peer_closed => this.eof = true,
                Some(Err(e)) => return Poll::Ready(Err(ws_error(e))),
                Some(Ok(m)) if m.is_binary() => this.read = m.into_payload().into(),
                // Polling on after a Close sends the acknowledgement and
                // then ends the stream.
                Some(Ok(m)) if m.is_close() => this.peer_closed = true,
                Some(Ok(m)) if m.is_text() => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text WebSocket message: MQTT and AMQP travel in binary messages",
                    )))
                }
                // Pings are answered by the WebSocket layer; pongs need nothing.
                Some(Ok(_)) => {}
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write.len() >= MAX_MESSAGE {
            ready!(this.poll_send_gathered(cx))?;
        }
        this.write.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write.len() >= MAX_MESSAGE {
            ready!(this.poll_send_gathered(cx))?;
        }
        let mut n = 0;
        for b in bufs {
            this.write.extend_from_slice(b);
            n += b.len();
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_gathered(cx))?;
        Pin::new(&mut this.ws).poll_flush(cx).map_err(ws_error)
    }

    /// Sends a Close and shuts the transport down without waiting for the
    /// peer's Close (the WebSocket layer's own close would read on until it
    /// comes: an unresponsive peer would hold the connection forever).
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_gathered(cx))?;
        if !this.close_sent {
            ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(ws_error)?;
            Pin::new(&mut this.ws)
                .start_send(Message::close(Some(CloseCode::NORMAL_CLOSURE), ""))
                .map_err(ws_error)?;
            this.close_sent = true;
        }
        ready!(Pin::new(&mut this.ws).poll_flush(cx)).map_err(ws_error)?;
        Pin::new(this.ws.get_mut()).poll_shutdown(cx)
    }
}
