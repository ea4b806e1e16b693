//! Byte streams over WebSocket and QUIC, so the protocol heads (MQTT, AMQP)
//! and edgehub's own clients (upstream link, load generator) run over them
//! unchanged, exactly as over TCP or TLS.
//!
//! - [`ws`]: the IoT Hub flavour of RFC 6455 — the upgrade handshake with
//!   the subprotocol choosing the protocol head (`mqtt`, `AMQPWSB10`), and
//!   [`ws::WsStream`], which turns binary messages into a byte stream in
//!   either direction (the stream may be split across messages anywhere).
//! - [`quic`]: a QUIC bidirectional stream as a byte stream, and endpoint
//!   configuration sized for MQTT (ALPN `mqtt`, small windows, few streams).
//!
//! Owns: framing and handshakes of these transports. Must not touch: any
//! protocol carried on them, credentials, or listeners (the hub's
//! `transport` module accepts connections and hands streams to heads).

pub mod quic;
pub mod ws;
