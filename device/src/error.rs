//! IoT Hub's error bodies: `{"errorCode": 400004, "trackingId": …,
//! "message": …, "timestampUtc": …}`. The SDKs decide failure from
//! `errorCode` (the Node SDK reads a twin answer without one as a success),
//! and tools written against IoT Hub read the six-digit code, so every error
//! answer on the twin, method and management paths has this shape.

use serde_json::{json, Value};

/// IoT Hub's six-digit error codes (the HTTP status is the first three digits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The body cannot be parsed or validated.
    ArgumentInvalid = 400004,
    IotHubUnauthorizedAccess = 401002,
    IotHubQuotaExceeded = 403002,
    DeviceMaximumQueueDepthExceeded = 403004,
    DeviceNotFound = 404001,
    ModuleNotFound = 404010,
    /// A direct method for an identity that is not connected or not subscribed.
    DeviceNotOnline = 404103,
    DeviceAlreadyExists = 409001,
    PreconditionFailed = 412001,
    MessageTooLarge = 413001,
    ServerError = 500001,
    ServiceUnavailable = 503001,
    /// A direct method the device did not answer in time.
    GatewayTimeout = 504101,
}

impl ErrorCode {
    /// The code IoT Hub gives most often for an HTTP status, for answers
    /// that have no more specific one.
    pub fn for_status(status: u16) -> ErrorCode {
        match status {
            401 => ErrorCode::IotHubUnauthorizedAccess,
            403 | 507 => ErrorCode::IotHubQuotaExceeded,
            404 => ErrorCode::DeviceNotFound,
            409 => ErrorCode::DeviceAlreadyExists,
            412 => ErrorCode::PreconditionFailed,
            413 => ErrorCode::MessageTooLarge,
            503 => ErrorCode::ServiceUnavailable,
            504 => ErrorCode::GatewayTimeout,
            s if (400..500).contains(&s) => ErrorCode::ArgumentInvalid,
            _ => ErrorCode::ServerError,
        }
    }
}

/// A tracking id in IoT Hub's form (32 hex digits, a GUID without dashes),
/// so a refusal can be found in the hub's log.
pub fn tracking_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The error body IoT Hub sends.
pub fn error_body(code: ErrorCode, message: &str) -> Value {
    json!({
        "errorCode": code as u32,
        "trackingId": tracking_id(),
        "message": message,
        "timestampUtc": super::presence::rfc3339_ms(super::presence::unix_ms()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_iot_hubs_shape() {
        let b = error_body(ErrorCode::ArgumentInvalid, "bad patch");
        assert_eq!(b["errorCode"], 400004);
        assert_eq!(b["message"], "bad patch");
        assert_eq!(b["trackingId"].as_str().unwrap().len(), 32);
        let ts = b["timestampUtc"].as_str().unwrap();
        assert!(
            ts.len() >= 20 && ts.as_bytes()[10] == b'T' && ts.ends_with('Z'),
            "{ts}"
        );
        assert_ne!(
            error_body(ErrorCode::ServerError, "x")["trackingId"],
            b["trackingId"]
        );
    }

    #[test]
    fn status_codes_map_to_iot_hub_codes() {
        for (status, code) in [
            (400, 400004),
            (401, 401002),
            (403, 403002),
            (404, 404001),
            (409, 409001),
            (413, 413001),
            (500, 500001),
            (504, 504101),
            (507, 403002),
        ] {
            assert_eq!(ErrorCode::for_status(status) as u32, code, "{status}");
        }
    }
}
