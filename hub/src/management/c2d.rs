//! Cloud-to-device messages: `/api/devices/{d}/messages` and IoT Hub's `/devices/{d}/messages/deviceBound`.

use super::*;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct C2dRequest {
    body: Option<String>,
    body_base64: Option<String>,
    #[serde(default)]
    properties: BTreeMap<String, String>,
    message_id: Option<String>,
    correlation_id: Option<String>,
    content_type: Option<String>,
    content_encoding: Option<String>,
    ttl_secs: Option<u64>,
}

use crate::endpoints::{C2dError, C2D_DEFAULT_TTL_SECS};

pub(super) async fn send_c2d(
    State(m): State<Arc<Management>>,
    UrlPath(device): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    use edgehub_router::SystemProperty as P;

    let req: C2dRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let Some(dev) = m
        .identities
        .registry()
        .device(&device)
        .map(|d| d.id.clone())
    else {
        return error(StatusCode::NOT_FOUND, format!("no device {device:?}"));
    };
    let payload = match (req.body, req.body_base64) {
        (Some(t), None) => bytes::Bytes::from(t),
        (None, Some(b)) => match base64::engine::general_purpose::STANDARD.decode(b) {
            Ok(v) => bytes::Bytes::from(v),
            Err(_) => return error(StatusCode::BAD_REQUEST, "bodyBase64 is not base64"),
        },
        (None, None) => bytes::Bytes::new(),
        (Some(_), Some(_)) => {
            return error(StatusCode::BAD_REQUEST, "give body or bodyBase64, not both")
        }
    };
    let mut msg = edgehub_router::Message::new(payload);
    for (k, v) in &req.properties {
        msg.set_property(k, v);
    }
    msg.set_system(P::To, &format!("/devices/{dev}/messages/deviceBound"));
    for (p, v) in [
        (P::MessageId, &req.message_id),
        (P::CorrelationId, &req.correlation_id),
        (P::ContentType, &req.content_type),
        (P::ContentEncoding, &req.content_encoding),
    ] {
        if let Some(v) = v {
            msg.set_system(p, v);
        }
    }
    let ttl = req.ttl_secs.unwrap_or(C2D_DEFAULT_TTL_SECS);
    match m.c2d.enqueue(&dev, msg, ttl).await {
        Ok(seq) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "seq": seq })),
        )
            .into_response(),
        Err(e @ C2dError::QueueFull(_)) => error_coded(
            StatusCode::FORBIDDEN,
            ErrorCode::DeviceMaximumQueueDepthExceeded,
            e.to_string(),
        ),
        Err(C2dError::Store(e)) if e.is_quota() => {
            error(StatusCode::INSUFFICIENT_STORAGE, e.to_string())
        }
        Err(e) => internal(e),
    }
}
