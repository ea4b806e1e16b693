//! edgehub: an IoT Edge hub. This crate puts the others together and holds
//! the parts that touch the network (see ARCHITECTURE.md for the map):
//!
//! - [`config`]: command line and environment (`EDGEHUB_*`).
//! - [`tls`]: server TLS config; the development CA generated into the data dir.
//! - [`transport`]: listeners yielding TCP and TLS byte streams to protocol heads.
//! - [`connection`]: the MQTT head: one MQTT connection (CONNECT handling,
//!   packet dispatch, flow control, keep-alive, write batching) over the
//!   generic broker (`edgehub-broker`).
//! - [`amqp`]: the AMQP head (`edgehub-amqp`) on the AMQPS listener.
//! - [`iothub`]: IoT Hub over MQTT: CONNECT credentials into device-layer
//!   verdicts, topic authorization, telemetry topics and property bags,
//!   `$iothub/…` requests, the topics of device-layer deliveries.
//! - [`pipeline`]: telemetry → routes → store; PUBACK once durable.
//! - [`endpoints`]: executors delivering stored module inputs and
//!   cloud-to-device messages to the identity's device link.
//! - [`upstream`]: the `$upstream` executor forwarding to IoT Hub or a parent
//!   edgehub over MQTT (a connection per identity) or AMQP (one connection,
//!   a CBS token and a session per identity); [`relay`]: what comes down
//!   from it.
//! - [`management`]: the HTTP management API, one module per resource.
//! - [`routes_cli`]: `edgehub routes test|check` over the `edgehub-router` engine.
//! - [`server`]: wires it all and shuts down gracefully.
//!
//! IoT Hub semantics live in `edgehub-device`; the wire format in
//! `edgehub-codec`.

pub mod amqp;
pub mod config;
pub mod connection;
pub mod endpoints;
pub mod iothub;
pub mod management;
pub mod pipeline;
pub mod relay;
pub mod routes_cli;
pub mod server;
pub mod tls;
pub mod transport;
pub mod upstream;

pub use config::Config;
pub use server::Server;
