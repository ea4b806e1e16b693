//! The IoT Hub device protocol on the gateway, first slice: identities, SAS
//! authentication of MQTT CONNECT, and per-identity topic authorization,
//! plugged into the broker through the `auth` seam.
//!
//! Owns: who a connection is (device or module), which IoT Hub topics it
//! may use, and turning its telemetry topics into the shared `Message`
//! (`telemetry`; the connection hands that to `pipeline`, which routes and
//! stores it). Must not touch: the wire (connection/codec) or message storage.
//! `twin` keeps twin documents, `methods` the direct-method calls in flight,
//! and `services` answers the `$iothub/…` request topics of a connection.

pub mod auth;
pub mod error;
pub mod identity;
pub mod methods;
pub mod presence;
pub mod sas;
pub mod services;
pub mod telemetry;
pub mod twin;
pub mod x509;

pub use auth::IotHubAuth;
pub use identity::{IdentityError, Registry};
