//! The IoT Hub device layer: what a device or module may do and receive,
//! whichever protocol head carried it. See the README for what it owns.
//!
//! - [`identity`], [`sas`], [`x509`]: who an identity is and the verdicts
//!   on the credentials it presents (SAS tokens, certificate chains).
//! - [`link`]: the live link of each identity, [`link::Delivery`] out to
//!   its head, presence.
//! - [`layer`]: the operations a head calls for an identity (twin GET,
//!   reported patch, method answer) and desired-property pushes.
//! - [`twin`]: twin documents; [`methods`]: direct-method calls in flight.
//! - [`c2d`]: cloud-to-device settlement (lock tokens, delivery counts,
//!   dead-lettering).
//! - [`telemetry`]: stamping accepted telemetry with its identity.
//! - [`error`]: IoT Hub's error bodies; [`presence`]: connection state.

pub mod auth;
pub mod c2d;
pub mod error;
pub mod identity;
pub mod layer;
pub mod link;
pub mod methods;
pub mod presence;
pub mod sas;
pub mod telemetry;
pub mod twin;
pub mod x509;

pub use identity::{IdentityError, Registry};
pub use layer::DeviceLayer;

/// The value of `key` in a `k=v&k=v` query.
pub fn query_value<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}
