//! The `$iothub/…` request topics of an authenticated device or module,
//! mapped onto the device layer's operations: twin GET, reported-properties
//! PATCH and direct-method answers. The answers come back as deliveries
//! (see `deliveries`).
//!
//! Owns: the request topics and their `$rid`. Must not touch: twin or
//! method semantics (`edgehub_device::DeviceLayer`), telemetry (the
//! pipeline's) or authorization (done before).

use std::sync::Arc;

use bytes::Bytes;
use edgehub_device::{query_value, DeviceLayer};
use tracing::debug;

/// Whether a publish was one of ours.
#[derive(Debug, PartialEq, Eq)]
pub enum Handled {
    Yes,
    /// Not an `$iothub/` request topic we serve (the caller refuses it).
    Unknown,
}

/// A publish of `identity` (its session key) on an `$iothub/` topic.
pub fn on_publish(
    layer: &Arc<DeviceLayer>,
    identity: &Arc<str>,
    topic: &str,
    payload: Bytes,
) -> Handled {
    if topic.starts_with("$iothub/methods/res/") {
        let answered = parse_method_response(topic)
            .is_some_and(|(status, rid)| layer.method_response(identity, rid, status, payload));
        if !answered {
            debug!(identity = %identity, topic, "method answer for no waiting call; ignored");
        }
        return Handled::Yes;
    }
    let (op, query) = match topic.split_once("/?") {
        Some((op, q)) => (op, q),
        None => (topic, ""),
    };
    let rid = query_value(query, "$rid").unwrap_or_default().to_owned();
    match op {
        "$iothub/twin/GET" => layer.twin_get(identity, rid),
        "$iothub/twin/PATCH/properties/reported" => layer.patch_reported(identity, rid, payload),
        _ => return Handled::Unknown,
    }
    Handled::Yes
}

/// `$iothub/methods/res/{status}/?$rid={rid}` → (status, rid); the request
/// ids the hub hands out are hexadecimal.
fn parse_method_response(topic: &str) -> Option<(i32, u64)> {
    let rest = topic.strip_prefix("$iothub/methods/res/")?;
    let (status, query) = rest.split_once("/?")?;
    let status = status.parse().ok()?;
    let rid = query_value(query, "$rid")?;
    Some((status, u64::from_str_radix(rid, 16).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_response_topics_parse() {
        assert_eq!(
            parse_method_response("$iothub/methods/res/200/?$rid=1f"),
            Some((200, 0x1f))
        );
        assert_eq!(
            parse_method_response("$iothub/methods/res/-1/?$rid=2&x=y"),
            Some((-1, 2))
        );
        assert_eq!(parse_method_response("$iothub/methods/res/200/"), None);
        assert_eq!(
            parse_method_response("$iothub/methods/res/ok/?$rid=1"),
            None
        );
    }
}
