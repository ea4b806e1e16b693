//! `/api/outbox`: read and acknowledge an endpoint's stored queue.

use super::*;

#[derive(Deserialize)]
pub(super) struct OutboxQuery {
    endpoint: Option<String>,
    max: Option<usize>,
}

#[derive(Serialize)]
pub(super) struct OutboxMessage {
    seq: u64,
    priority: u8,
    /// Milliseconds since the epoch; absent: never expires.
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at_ms: Option<u64>,
    /// The body, base64.
    body: String,
    properties: BTreeMap<String, String>,
    system_properties: BTreeMap<String, String>,
    /// Cloud-to-device queues: delivery attempts so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    delivery_count: Option<u32>,
}

pub(super) const MAX_OUTBOX_READ: usize = 10_000;

pub(super) async fn outbox(
    State(m): State<Arc<Management>>,
    Query(q): Query<OutboxQuery>,
) -> Response {
    let name = q.endpoint.as_deref().unwrap_or("$upstream");
    let max = q.max.unwrap_or(100).clamp(1, MAX_OUTBOX_READ);
    let Some(ep) = endpoint_named(&m, name) else {
        // Nothing was ever routed there.
        return Json(serde_json::json!({ "messages": [] })).into_response();
    };
    let store = m.pipeline.store().clone();
    let name = name.to_owned();
    let c2d = name.starts_with("c2d:").then(|| m.c2d.clone());
    blocking(
        move || store.peek(&ep, max),
        |entries| outbox_answer(&name, &entries, c2d.as_deref()),
        internal,
    )
    .await
}

pub(super) fn outbox_answer(
    name: &str,
    entries: &[edgehub_store::Entry],
    c2d: Option<&crate::endpoints::C2dExecutors>,
) -> Response {
    let b64 = base64::engine::general_purpose::STANDARD;
    let messages: Vec<OutboxMessage> = entries
        .iter()
        .map(|e| OutboxMessage {
            seq: e.seq,
            priority: e.priority,
            expires_at_ms: (e.expires_at_ms != 0).then_some(e.expires_at_ms),
            body: b64.encode(&e.message.body),
            properties: e
                .message
                .properties
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            system_properties: e
                .message
                .system_properties()
                .map(|(k, v)| (k.to_owned(), v.to_string()))
                .collect(),
            delivery_count: c2d.map(|c| c.delivery_count(e.seq)),
        })
        .collect();
    Json(serde_json::json!({ "endpoint": name, "messages": messages })).into_response()
}

#[derive(Deserialize)]
pub(super) struct AckBody {
    messages: Vec<AckItem>,
}

#[derive(Deserialize)]
pub(super) struct AckItem {
    seq: u64,
    priority: u8,
}

pub(super) async fn outbox_ack(
    State(m): State<Arc<Management>>,
    Query(q): Query<OutboxQuery>,
    body: axum::body::Bytes,
) -> Response {
    let ack: AckBody = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"messages\": [{{\"seq\": N, \"priority\": P}}]}}: {e}"),
            )
        }
    };
    if let Some(bad) = ack
        .messages
        .iter()
        .find(|a| a.priority > edgehub_store::LOWEST_PRIORITY)
    {
        return error(
            StatusCode::BAD_REQUEST,
            format!("priority {} out of range 0-10", bad.priority),
        );
    }
    let name = q.endpoint.as_deref().unwrap_or("$upstream");
    let Some(ep) = endpoint_named(&m, name) else {
        return error(StatusCode::NOT_FOUND, format!("no endpoint {name:?}"));
    };
    let store = m.pipeline.store().clone();
    let seqs: Vec<(u8, u64)> = ack.messages.iter().map(|a| (a.priority, a.seq)).collect();
    blocking(
        move || store.ack_seqs(&ep, &seqs),
        |n| Json(serde_json::json!({ "acknowledged": n })).into_response(),
        internal,
    )
    .await
}
