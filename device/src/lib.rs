//! The IoT Hub device layer: semantics every protocol head shares. See the
//! README for what it owns; [`c2d`] is cloud-to-device settlement.

pub mod c2d;
