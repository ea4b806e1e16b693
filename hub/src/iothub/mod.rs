//! The IoT Hub device protocol on the gateway, first slice: identities, SAS
//! authentication of MQTT CONNECT, and per-identity topic authorization,
//! plugged into the broker through the `auth` seam.
//!
//! Owns: who a connection is (device or module), which IoT Hub topics it
//! may use, and turning its telemetry topics into the shared `Message`
//! (`telemetry`; the connection hands that to `pipeline`, which routes and
//! stores it). Must not touch: the wire (connection/codec) or message storage.
//! Not yet here (issue 3): identities in the store and the management API
//! (they come from a JSON file for now), X.509, C2D, twins, methods.

pub mod auth;
pub mod identity;
pub mod sas;
pub mod telemetry;

pub use auth::IotHubAuth;
pub use identity::{IdentityError, Registry};
