//! edgehub: an IoT Edge hub.
//!
//! This crate holds the listeners, the MQTT protocol head and broker core, the
//! IoT Hub layer's first slices, the path from telemetry to the store, module
//! endpoint executors and the management API; later the upstream link.
//!
//! - [`config`]: command line and environment (`EDGEHUB_*`).
//! - [`tls`]: server TLS config; the development CA generated into the data dir.
//! - [`server`]: TCP and TLS listeners, one task per connection, graceful shutdown.
//! - [`connection`]: one MQTT connection: CONNECT handling, packet dispatch,
//!   flow control, keep-alive, write batching.
//! - [`broker`]: sessions, subscription trie, retained messages, routing,
//!   wills and session expiry. Knows no sockets.
//! - [`auth`]: the authentication/authorization seam the IoT Hub layer plugs into.
//! - [`iothub`]: IoT Hub identities, SAS authentication, per-identity topic authorization.
//! - [`pipeline`]: IoT Hub telemetry → routes → store; PUBACK once durable.
//! - [`endpoints`]: executors delivering stored messages to module inputs.
//! - [`management`]: the HTTP management API (outbox, metrics, health).
//! - [`upstream`]: the `$upstream` executor forwarding to IoT Hub or a parent edgehub.
//! - [`routes_cli`]: `edgehub routes test|check` over the `edgehub-router` engine.
//!
//! The wire format lives in the `edgehub-codec` crate.

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
pub mod upstream;

pub use config::Config;
pub use server::Server;
