//! `/twins/{d}[/modules/{m}]/methods`: invoke a direct method.

use super::*;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct MethodRequest {
    method_name: String,
    #[serde(default)]
    payload: serde_json::Value,
    response_timeout_in_seconds: Option<u64>,
    connect_timeout_in_seconds: Option<u64>,
}

/// `{"methodName", "payload", "responseTimeoutInSeconds"?,
/// "connectTimeoutInSeconds"?}` → `{"status", "payload"}` as the identity
/// answered; 404 when it is not connected, 504 when it stays silent.
pub(super) async fn invoke_method(
    State(m): State<Arc<Management>>,
    UrlPath(path): UrlPath<HashMap<String, String>>,
    body: axum::body::Bytes,
) -> Response {
    use edgehub_device::methods::{DEFAULT_TIMEOUT_SECS, MAX_TIMEOUT_SECS};
    let expected = r#"{"methodName": …, "payload": …}"#;
    let (device, module, req) = match identity_request::<MethodRequest>(&m, &path, &body, expected)
    {
        Ok(x) => x,
        Err((status, why)) => return error(status, why),
    };
    let payload = bytes::Bytes::from(req.payload.to_string());
    let response_timeout = req
        .response_timeout_in_seconds
        .unwrap_or(DEFAULT_TIMEOUT_SECS);
    let connect_timeout = req.connect_timeout_in_seconds.unwrap_or(0);
    if connect_timeout > MAX_TIMEOUT_SECS {
        return error(
            StatusCode::BAD_REQUEST,
            format!("connectTimeoutInSeconds must be 0-{MAX_TIMEOUT_SECS}"),
        );
    }
    let key = session_key(&device, module.as_deref());
    let r = m
        .devices
        .methods
        .invoke(
            &key,
            &req.method_name,
            payload,
            std::time::Duration::from_secs(response_timeout),
            std::time::Duration::from_secs(connect_timeout),
        )
        .await;
    match r {
        Ok(answer) => {
            let payload = serde_json::from_slice::<serde_json::Value>(&answer.payload)
                .unwrap_or_else(|_| String::from_utf8_lossy(&answer.payload).into_owned().into());
            Json(serde_json::json!({ "status": answer.status, "payload": payload })).into_response()
        }
        Err(e) => error_coded(
            StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            e.code(),
            e.to_string(),
        ),
    }
}
