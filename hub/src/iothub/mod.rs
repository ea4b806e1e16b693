//! The IoT Hub device protocol over MQTT: how a CONNECT becomes an
//! identity (`auth`, the broker's authentication seam over the device
//! layer's credential verdicts), which topics an identity may use, the
//! telemetry topics and property bags (`telemetry`), the `$iothub/…`
//! request topics (`services`) and the topics each device-layer delivery
//! goes out on (`deliveries`).
//!
//! Owns: the mapping between MQTT topics and the device layer's
//! operations and deliveries. Must not touch: IoT Hub semantics (twins,
//! methods, settlement: `edgehub-device`) or message storage.

pub mod auth;
pub mod deliveries;
pub mod services;
pub mod telemetry;

pub use auth::IotHubAuth;

use std::sync::Arc;

/// What the MQTT head needs of the IoT Hub layer: the device layer's
/// operations, and the MQTT side of every identity's link.
pub struct IotHub {
    pub layer: Arc<edgehub_device::DeviceLayer>,
    pub deliveries: Arc<deliveries::MqttDeliveries>,
}
