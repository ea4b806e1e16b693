//! The management API over HTTP (loopback or cluster-internal only).
//!
//! - `GET /healthz`, `GET /readyz`: liveness and readiness, no token.
//! - `GET /metrics`: Prometheus text, no token (counters only, no secrets).
//! - `GET /api/outbox?endpoint=$upstream&max=100`: the oldest stored
//!   messages of an endpoint's queue (priority, then arrival order), without
//!   removing them. With no upstream link this is how a local consumer reads
//!   what devices sent upstream.
//! - `POST /api/outbox/ack?endpoint=$upstream` with
//!   `{"messages": [{"seq": 1, "priority": 10}, …]}`: removes them.
//!
//! `/api/*` needs `Authorization: Bearer <token>`; the token is
//! `--management-token`, else the one generated into `<data-dir>/management-token`.
//!
//! Owns: the HTTP surface. Must not touch: storage internals (it calls the
//! store's public API) or MQTT sessions.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::broker::Broker;
use crate::pipeline::Pipeline;

pub struct Management {
    pub pipeline: Arc<Pipeline>,
    pub broker: Arc<Broker>,
    pub token: String,
}

/// The token in `<data_dir>/management-token`, created (owner-only) on
/// first start.
pub fn ensure_token(data_dir: &Path) -> std::io::Result<String> {
    let path = data_dir.join("management-token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_owned();
        if !t.is_empty() {
            return Ok(t);
        }
    }
    let bytes: [u8; 32] = rand::random();
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    std::io::Write::write_all(&mut opts.open(&path)?, token.as_bytes())?;
    Ok(token)
}

pub fn router(m: Arc<Management>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ready\n" }))
        .route("/metrics", get(metrics))
        .route("/api/outbox", get(outbox))
        .route("/api/outbox/ack", post(outbox_ack))
        .with_state(m)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

/// `None` when the bearer token is right, else the 401 to send.
fn unauthorized(m: &Management, headers: &HeaderMap) -> Option<Response> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if constant_time_eq(t.as_bytes(), m.token.as_bytes()) => None,
        Some(_) => Some(error(StatusCode::UNAUTHORIZED, "wrong management token")),
        None => Some(error(
            StatusCode::UNAUTHORIZED,
            "missing Authorization: Bearer <management token>",
        )),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn metrics(State(m): State<Arc<Management>>) -> Response {
    let mut out = String::new();
    m.pipeline.render_metrics(&mut out);
    let s = &m.broker.stats;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    out.push_str(&format!(
        "# HELP edgehub_connections Open MQTT connections.\n# TYPE edgehub_connections gauge\nedgehub_connections {}\n",
        load(&s.connections)
    ));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

#[derive(Deserialize)]
struct OutboxQuery {
    endpoint: Option<String>,
    max: Option<usize>,
}

#[derive(Serialize)]
struct OutboxMessage {
    seq: u64,
    priority: u8,
    /// Milliseconds since the epoch; absent: never expires.
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at_ms: Option<u64>,
    /// The body, base64.
    body: String,
    properties: BTreeMap<String, String>,
    system_properties: BTreeMap<String, String>,
}

const MAX_OUTBOX_READ: usize = 10_000;

async fn outbox(
    State(m): State<Arc<Management>>,
    headers: HeaderMap,
    Query(q): Query<OutboxQuery>,
) -> Response {
    if let Some(r) = unauthorized(&m, &headers) {
        return r;
    }
    let name = q.endpoint.as_deref().unwrap_or("$upstream");
    let max = q.max.unwrap_or(100).clamp(1, MAX_OUTBOX_READ);
    let store = m.pipeline.store().clone();
    let Some(ep) = store.endpoints().into_iter().find(|e| e.name() == name) else {
        // Nothing was ever routed there.
        return Json(serde_json::json!({ "messages": [] })).into_response();
    };
    let entries = match tokio::task::spawn_blocking(move || store.peek(&ep, max)).await {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
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
        })
        .collect();
    Json(serde_json::json!({ "endpoint": name, "messages": messages })).into_response()
}

#[derive(Deserialize)]
struct AckBody {
    messages: Vec<AckItem>,
}

#[derive(Deserialize)]
struct AckItem {
    seq: u64,
    priority: u8,
}

async fn outbox_ack(
    State(m): State<Arc<Management>>,
    headers: HeaderMap,
    Query(q): Query<OutboxQuery>,
    body: axum::body::Bytes,
) -> Response {
    if let Some(r) = unauthorized(&m, &headers) {
        return r;
    }
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
    let name = q.endpoint.as_deref().unwrap_or("$upstream").to_owned();
    let store = m.pipeline.store().clone();
    let Some(ep) = store.endpoints().into_iter().find(|e| e.name() == name) else {
        return error(StatusCode::NOT_FOUND, format!("no endpoint {name:?}"));
    };
    let seqs: Vec<(u8, u64)> = ack.messages.iter().map(|a| (a.priority, a.seq)).collect();
    match tokio::task::spawn_blocking(move || store.ack_seqs(&ep, &seqs)).await {
        Ok(Ok(n)) => Json(serde_json::json!({ "acknowledged": n })).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
