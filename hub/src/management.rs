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
//! - `GET /api/identities`: every device with its keys and modules.
//! - `PUT /api/identities/{deviceId}` with `{"primaryKey"?, "secondaryKey"?,
//!   "modules": [{"moduleId", "primaryKey"?}]}` (keys generated when absent):
//!   creates or replaces a device; answers with its connection strings.
//! - `POST /api/identities` with `{"devices": [{"deviceId", …}, …]}`: the same
//!   in bulk (load tests provision thousands at once).
//! - `DELETE /api/identities/{deviceId}`.
//! - `POST /api/devices/{deviceId}/messages` with `{"body": "…"}` (or
//!   `"bodyBase64"`), optional `"properties": {…}`, `"messageId"`,
//!   `"correlationId"`, `"contentType"`, `"contentEncoding"`, `"ttlSecs"`
//!   (default 3600): a cloud-to-device message, stored, then delivered on
//!   `devices/{d}/messages/devicebound/…` once the device subscribes; removed
//!   on its PUBACK. Answers 202 once stored.
//!
//! `/api/*` needs `Authorization: Bearer <token>`; the token is
//! `--management-token`, else the one generated into `<data-dir>/management-token`.
//!
//! Owns: the HTTP surface. Must not touch: storage internals (it calls the
//! store's public API) or MQTT sessions.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::broker::Broker;
use crate::iothub::identity::{DeviceSpec, Identities, ModuleSpec, RegistryError};
use crate::pipeline::Pipeline;

pub struct Management {
    pub c2d: Arc<crate::endpoints::C2dExecutors>,
    pub pipeline: Arc<Pipeline>,
    pub broker: Arc<Broker>,
    pub identities: Arc<Identities>,
    /// What devices put in `GatewayHostName` to reach us.
    pub gateway_hostname: String,
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
    let api = Router::new()
        .route("/api/outbox", get(outbox))
        .route("/api/outbox/ack", post(outbox_ack))
        .route("/api/identities", get(list_identities).post(put_identities))
        .route("/api/devices/{device}/messages", post(send_c2d))
        .route(
            "/api/identities/{device}",
            put(put_identity).delete(delete_identity),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            m.clone(),
            require_token,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ready\n" }))
        .route("/metrics", get(metrics))
        .merge(api)
        .with_state(m)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

/// Every `/api` route: the bearer token, or 401 with what is wrong.
async fn require_token(
    State(m): State<Arc<Management>>,
    headers: HeaderMap,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if constant_time_eq(t.as_bytes(), m.token.as_bytes()) => next.run(req).await,
        Some(_) => error(StatusCode::UNAUTHORIZED, "wrong management token"),
        None => error(
            StatusCode::UNAUTHORIZED,
            "missing Authorization: Bearer <management token>",
        ),
    }
}

/// Runs a store or registry call off the async workers and turns its
/// outcome into the answer.
async fn blocking<T: Send + 'static, E: Send + 'static>(
    call: impl FnOnce() -> Result<T, E> + Send + 'static,
    ok: impl FnOnce(T) -> Response,
    err: impl FnOnce(E) -> Response,
) -> Response {
    match tokio::task::spawn_blocking(call).await {
        Ok(Ok(v)) => ok(v),
        Ok(Err(e)) => err(e),
        Err(e) => internal(e),
    }
}

fn internal(e: impl std::fmt::Display) -> Response {
    error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// An endpoint's queue by its name, if anything was ever routed there.
fn endpoint_named(m: &Management, name: &str) -> Option<Arc<edgehub_store::EndpointHandle>> {
    m.pipeline
        .store()
        .endpoints()
        .into_iter()
        .find(|e| e.name() == name)
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

async fn outbox(State(m): State<Arc<Management>>, Query(q): Query<OutboxQuery>) -> Response {
    let name = q.endpoint.as_deref().unwrap_or("$upstream");
    let max = q.max.unwrap_or(100).clamp(1, MAX_OUTBOX_READ);
    let Some(ep) = endpoint_named(&m, name) else {
        // Nothing was ever routed there.
        return Json(serde_json::json!({ "messages": [] })).into_response();
    };
    let store = m.pipeline.store().clone();
    let name = name.to_owned();
    blocking(
        move || store.peek(&ep, max),
        |entries| outbox_answer(&name, &entries),
        internal,
    )
    .await
}

fn outbox_answer(name: &str, entries: &[edgehub_store::Entry]) -> Response {
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

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DeviceRequest {
    device_id: Option<String>,
    primary_key: Option<String>,
    secondary_key: Option<String>,
    #[serde(default)]
    modules: Vec<ModuleRequest>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ModuleRequest {
    module_id: String,
    primary_key: Option<String>,
    secondary_key: Option<String>,
}

#[derive(Deserialize)]
struct BulkRequest {
    devices: Vec<DeviceRequest>,
}

fn new_key() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn spec_from(device_id: String, r: DeviceRequest) -> DeviceSpec {
    DeviceSpec {
        device_id,
        primary_key: r.primary_key.unwrap_or_else(new_key),
        secondary_key: r.secondary_key,
        modules: r
            .modules
            .into_iter()
            .map(|m| ModuleSpec {
                module_id: m.module_id,
                primary_key: m.primary_key.unwrap_or_else(new_key),
                secondary_key: m.secondary_key,
            })
            .collect(),
    }
}

/// The device (or module) as the SDKs take it, pointed at this gateway.
fn with_connection_strings(m: &Management, spec: &DeviceSpec) -> serde_json::Value {
    let host = m
        .identities
        .registry()
        .iothub_hostname
        .clone()
        .unwrap_or_else(|| m.gateway_hostname.clone());
    let gw = &m.gateway_hostname;
    let mut v = serde_json::to_value(spec).expect("spec serializes");
    v["connectionString"] = format!(
        "HostName={host};DeviceId={};SharedAccessKey={};GatewayHostName={gw}",
        spec.device_id, spec.primary_key
    )
    .into();
    if let Some(mods) = v["modules"].as_array_mut() {
        for (mv, ms) in mods.iter_mut().zip(&spec.modules) {
            mv["connectionString"] = format!(
                "HostName={host};DeviceId={};ModuleId={};SharedAccessKey={};GatewayHostName={gw}",
                spec.device_id, ms.module_id, ms.primary_key
            )
            .into();
        }
    }
    v
}

fn registry_error(e: RegistryError) -> Response {
    match e {
        RegistryError::Invalid(m) => error(StatusCode::BAD_REQUEST, m),
        RegistryError::Store(e) => internal(e),
    }
}

async fn list_identities(State(m): State<Arc<Management>>) -> Response {
    let devices: Vec<_> = m
        .identities
        .registry()
        .specs()
        .iter()
        .map(|s| with_connection_strings(&m, s))
        .collect();
    Json(serde_json::json!({ "devices": devices })).into_response()
}

/// An empty body means all defaults.
fn parse_json<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

async fn put_identity(
    State(m): State<Arc<Management>>,
    UrlPath(device): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    let req: DeviceRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    if req.device_id.as_deref().is_some_and(|d| d != device) {
        return error(
            StatusCode::BAD_REQUEST,
            "deviceId in the body differs from the URL",
        );
    }
    let spec = spec_from(device, req);
    let (m2, s2) = (m.clone(), spec.clone());
    blocking(
        move || m2.identities.put(s2),
        |()| Json(with_connection_strings(&m, &spec)).into_response(),
        registry_error,
    )
    .await
}

async fn put_identities(State(m): State<Arc<Management>>, body: axum::body::Bytes) -> Response {
    let req: BulkRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"devices\": [{{\"deviceId\": …}}]}}: {e}"),
            )
        }
    };
    let mut specs = Vec::with_capacity(req.devices.len());
    for (i, mut d) in req.devices.into_iter().enumerate() {
        let Some(id) = d.device_id.take() else {
            return error(
                StatusCode::BAD_REQUEST,
                format!("devices[{i}] has no deviceId"),
            );
        };
        specs.push(spec_from(id, d));
    }
    let (m2, s2) = (m.clone(), specs.clone());
    blocking(
        move || s2.into_iter().try_for_each(|s| m2.identities.put(s)),
        |()| {
            let devices: Vec<_> = specs
                .iter()
                .map(|s| with_connection_strings(&m, s))
                .collect();
            Json(serde_json::json!({ "devices": devices })).into_response()
        },
        registry_error,
    )
    .await
}

async fn delete_identity(
    State(m): State<Arc<Management>>,
    UrlPath(device): UrlPath<String>,
) -> Response {
    let (m2, d2) = (m.clone(), device.clone());
    blocking(
        move || m2.identities.delete(&d2),
        |found| match found {
            true => StatusCode::NO_CONTENT.into_response(),
            false => error(StatusCode::NOT_FOUND, format!("no device {device:?}")),
        },
        registry_error,
    )
    .await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct C2dRequest {
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

/// IoT Hub's default time-to-live for cloud-to-device messages.
const C2D_DEFAULT_TTL_SECS: u64 = 3600;

async fn send_c2d(
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
    let handle = match m.c2d.ensure(&dev) {
        Ok(h) => h,
        Err(e) => return internal(e),
    };
    let store = m.pipeline.store();
    let ttl = req.ttl_secs.unwrap_or(C2D_DEFAULT_TTL_SECS);
    let expires_at_ms = if ttl == 0 {
        0
    } else {
        store.now_ms() + ttl * 1000
    };
    let target = edgehub_store::Target::new(&handle, 0, expires_at_ms);
    let append = edgehub_store::Append::new(Arc::new(msg), vec![target]);
    match store.append(append).await {
        Ok(seq) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "seq": seq })),
        )
            .into_response(),
        Err(e) if e.is_quota() => error(StatusCode::INSUFFICIENT_STORAGE, e.to_string()),
        Err(e) => internal(e),
    }
}
