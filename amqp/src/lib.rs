//! The AMQP 1.0 protocol head: IoT Hub's AMQP endpoint (AMQPS on 5671)
//! mapped onto the device layer, as the MQTT head maps MQTT.
//!
//! Owns: SASL (`PLAIN` with a SAS token, `ANONYMOUS` and `MSSBCBS` followed
//! by CBS), the `$cbs` token exchange, link addresses and who may attach
//! them, and the translation between AMQP messages, dispositions and the
//! device layer's operations and deliveries: telemetry and module output
//! (accepted once stored), cloud-to-device messages (Accepted completes,
//! Rejected rejects, Released and Modified abandon), module inputs, twin
//! requests and desired-property pushes, direct methods.
//! Must not touch: IoT Hub semantics (`edgehub-device`), sockets or TLS
//! (the hub's transports hand it a byte stream), storage.
//!
//! Built on `fe2o3-amqp`'s acceptor: it carries the AMQP connection,
//! session and link state machines; what it lacks is worked around here
//! (its SASL hook is synchronous and returns no identity, so each
//! connection has its own acceptor writing the verdict into a shared slot;
//! it cannot refuse an attach, so a refused link is accepted and closed at
//! once with the error).

pub mod address;
mod cbs;
mod connection;
pub mod guard;
pub mod message;
pub mod sasl;

use std::sync::Arc;

use edgehub_device::auth::Authentication;
use edgehub_device::DeviceLayer;

pub use cbs::audience_identity;
pub use connection::serve;

/// IoT Hub's message size limit.
pub const MAX_MESSAGE_SIZE: u64 = 256 * 1024;
/// The frame size Microsoft's AMQP stack uses.
pub const MAX_FRAME_SIZE: u32 = 64 * 1024;

/// What the AMQP head serves with.
pub struct AmqpHub {
    pub layer: Arc<DeviceLayer>,
    pub auth: Arc<Authentication>,
    pub max_message_size: u64,
    pub max_frame_size: u32,
    /// How long a client may take from its first byte to an open
    /// connection (protocol header, SASL, Open).
    pub open_timeout: std::time::Duration,
}

impl AmqpHub {
    pub fn new(layer: Arc<DeviceLayer>, auth: Arc<Authentication>) -> AmqpHub {
        AmqpHub {
            layer,
            auth,
            max_message_size: MAX_MESSAGE_SIZE,
            max_frame_size: MAX_FRAME_SIZE,
            open_timeout: std::time::Duration::from_secs(10),
        }
    }
}
