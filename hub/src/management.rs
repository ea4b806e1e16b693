//! The management API over HTTP (loopback or cluster-internal only).
//!
//! - `GET /healthz`, `GET /readyz`: liveness and readiness, no token.
//!   `/readyz` is 200 whenever devices can be served (the store absorbs an
//!   upstream outage, so a down link must not take the hub out of a
//!   Service) and says `{"ready": true, "upstream": {"state", "since",
//!   "reason"?}}` (`upstream` is `null` for a root hub).
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
//! In IoT Hub's service API shapes:
//! - `GET /devices`, `PUT/GET/DELETE /devices/{d}` with `authentication`
//!   (`sas` with `symmetricKey`, keys generated when absent; `selfSigned`
//!   with `x509Thumbprint`; `certificateAuthority`); a device's modules stay
//!   when it is replaced. `GET /devices/{d}/modules`,
//!   `PUT/GET/DELETE /devices/{d}/modules/{m}` (keys only). Answers carry a
//!   `connectionString` pointing at this gateway.
//! - `GET/PATCH /twins/{d}` and `/twins/{d}/modules/{m}`: PATCH merges
//!   `tags` and `properties.desired` (null deletes) and pushes the desired
//!   change to the identity.
//! - `POST /twins/{d}/methods`, `/twins/{d}/modules/{m}/methods` with
//!   `methodName`, `payload`, `responseTimeoutInSeconds` (5-300, default 30),
//!   `connectTimeoutInSeconds` → `{status, payload}`; 404 not connected,
//!   504 no answer in time.
//! - `POST /devices/{d}/messages/deviceBound`: as `/api/devices/{d}/messages`.
//! - `PUT /deployment`: an IoT Edge deployment manifest; its `$edgeHub`
//!   routes replace the running ones at once and are kept for restarts; its
//!   `$edgeAgent` desired properties become those of the edge device's
//!   (`--device-id`) `$edgeAgent` module twin, which the operator shim
//!   reads. Answers `{"routes": […], "edgeAgent": {"identity", "desiredVersion"}
//!   | null}`.
//!   `GET /deployment`: the manifest in effect.
//!
//! Everything but the probes and `/metrics` needs `Authorization: Bearer <token>`; the token is
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
use std::collections::HashMap;

use crate::broker::Broker;
use crate::iothub::error::ErrorCode;
use crate::iothub::identity::{DeviceSpec, Identities, ModuleSpec, RegistryError, X509Spec};
use crate::pipeline::Pipeline;

pub struct Management {
    pub c2d: Arc<crate::endpoints::C2dExecutors>,
    pub presence: Arc<crate::iothub::presence::Presence>,
    pub services: Arc<crate::iothub::services::Services>,
    /// The upstream link's state, when there is an upstream.
    pub upstream: Option<Arc<crate::upstream::UpstreamStatus>>,
    pub pipeline: Arc<Pipeline>,
    pub broker: Arc<Broker>,
    pub identities: Arc<Identities>,
    /// What devices put in `GatewayHostName` to reach us.
    pub gateway_hostname: String,
    /// `--device-id`: deployments' `$edgeAgent` part goes to its twin.
    pub edge_device: Option<String>,
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
        .route("/twins/{device}", get(get_twin).patch(patch_twin))
        .route(
            "/twins/{device}/modules/{module}",
            get(get_twin).patch(patch_twin),
        )
        .route("/twins/{device}/methods", post(invoke_method))
        .route(
            "/twins/{device}/modules/{module}/methods",
            post(invoke_method),
        )
        .route("/devices/{device}/messages/deviceBound", post(send_c2d))
        .route("/deployment", get(get_deployment).put(put_deployment))
        .route("/devices", get(iothub_list_devices))
        .route(
            "/devices/{device}",
            get(iothub_get_device)
                .put(iothub_put_device)
                .delete(delete_identity),
        )
        .route("/devices/{device}/modules", get(iothub_list_modules))
        .route(
            "/devices/{device}/modules/{module}",
            get(iothub_get_module)
                .put(iothub_put_module)
                .delete(iothub_delete_module),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            m.clone(),
            require_token,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(api)
        .with_state(m)
}

/// An error answer in IoT Hub's shape (`errorCode`, `trackingId`,
/// `message`, `timestampUtc`), with IoT Hub's most usual code for `status`.
/// `error` repeats the message for the API's earlier clients.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let message = message.into();
    // Every missing-module answer here says "no module …".
    let code = match status.as_u16() {
        404 if message.starts_with("no module") => ErrorCode::ModuleNotFound,
        s => ErrorCode::for_status(s),
    };
    error_coded(status, code, message)
}

fn error_coded(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Response {
    let message = message.into();
    let mut body = crate::iothub::error::error_body(code, &message);
    body["error"] = message.into();
    (status, Json(body)).into_response()
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

async fn readyz(State(m): State<Arc<Management>>) -> Response {
    let upstream = m.upstream.as_ref().map(|u| u.to_json());
    Json(serde_json::json!({ "ready": true, "upstream": upstream })).into_response()
}

async fn metrics(State(m): State<Arc<Management>>) -> Response {
    let mut out = String::new();
    m.pipeline.render_metrics(&mut out);
    if let Some(u) = &m.upstream {
        u.render_metrics(&mut out);
    }
    m.c2d.settings.outcomes.render_metrics(&mut out);
    let s = &m.broker.stats;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    out.push_str(&format!(
        "# HELP edgehub_connected_clients Open MQTT connections.\n# TYPE edgehub_connected_clients gauge\nedgehub_connected_clients {}\n",
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
    /// Cloud-to-device queues: delivery attempts so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    delivery_count: Option<u32>,
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
    let c2d = name.starts_with("c2d:").then(|| m.c2d.clone());
    blocking(
        move || store.peek(&ep, max),
        |entries| outbox_answer(&name, &entries, c2d.as_deref()),
        internal,
    )
    .await
}

fn outbox_answer(
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
    x509: Option<X509Spec>,
    #[serde(default)]
    modules: Vec<ModuleRequest>,
    /// An IoT Edge device (may act for the devices under it).
    #[serde(default)]
    edge: bool,
    /// The edge device this one is registered under.
    parent: Option<String>,
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

use crate::iothub::identity::new_key;

fn spec_from(device_id: String, r: DeviceRequest) -> DeviceSpec {
    // An X.509 device has no keys; a key device gets one if none is given.
    let primary_key = match (&r.x509, r.primary_key) {
        (_, Some(k)) => k,
        (Some(_), None) => String::new(),
        (None, None) => new_key(),
    };
    DeviceSpec {
        device_id,
        primary_key,
        secondary_key: r.secondary_key,
        x509: r.x509,
        modules: r
            .modules
            .into_iter()
            .map(|m| ModuleSpec {
                module_id: m.module_id,
                primary_key: m.primary_key.unwrap_or_else(new_key),
                secondary_key: m.secondary_key,
            })
            .collect(),
        edge: r.edge,
        parent: r.parent,
    }
}

/// The device (or module) as the SDKs take it, pointed at this gateway.
fn with_connection_strings(m: &Management, spec: &DeviceSpec) -> serde_json::Value {
    let mut v = serde_json::to_value(spec).expect("spec serializes");
    v["connectionString"] = device_connection_string(m, spec).into();
    if let Some(mods) = v["modules"].as_array_mut() {
        for (mv, ms) in mods.iter_mut().zip(&spec.modules) {
            mv["connectionString"] = module_connection_string(m, &spec.device_id, ms).into();
        }
    }
    v
}

fn registry_error(e: RegistryError) -> Response {
    match e {
        RegistryError::Invalid(m) => error(StatusCode::BAD_REQUEST, m),
        RegistryError::NotFound(m) => error(StatusCode::NOT_FOUND, m),
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
    delete_device(m, device).await
}

/// Removes a device and its modules from the registry, closes their
/// connections (ending their sessions) and forgets their twins.
async fn delete_device(m: Arc<Management>, device: String) -> Response {
    let Some(spec) = m.identities.registry().device(&device).map(|d| d.spec()) else {
        return error(StatusCode::NOT_FOUND, format!("no device {device:?}"));
    };
    let m2 = m.clone();
    blocking(
        move || {
            m2.identities.delete(&spec.device_id)?;
            let identities = std::iter::once(spec.device_id.clone()).chain(
                spec.modules
                    .iter()
                    .map(|ms| session_key(&spec.device_id, Some(&ms.module_id))),
            );
            for identity in identities {
                m2.broker.revoke(&identity);
                let _ = m2.services.twins.remove(&identity);
                m2.presence.forget(&identity);
            }
            // Its cloud-to-device messages have nobody to go to any more
            // (the queue is bounded, so one read takes them all).
            let c2d = crate::endpoints::c2d_endpoint_name(&spec.device_id);
            if let Some(h) = endpoint_named(&m2, &c2d) {
                let store = m2.pipeline.store();
                store.ack(&h, &store.peek(&h, 2 * C2D_MAX_QUEUED)?)?;
            }
            Ok::<_, RegistryError>(())
        },
        |()| StatusCode::NO_CONTENT.into_response(),
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

use crate::endpoints::{C2dError, C2D_DEFAULT_TTL_SECS, C2D_MAX_QUEUED};

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

/// `{device}` or `{device}/modules/{module}` from the URL, resolved to the
/// identity's session key as registered (`Dev1` or `Dev1/filter`), or 404.
fn registered_identity(
    m: &Management,
    path: &HashMap<String, String>,
) -> Result<(String, Option<String>), ApiError> {
    let device = path.get("device").map(String::as_str).unwrap_or_default();
    let reg = m.identities.registry();
    let Some(dev) = reg.device(device) else {
        return Err((StatusCode::NOT_FOUND, format!("no device {device:?}")));
    };
    match path.get("module") {
        None => Ok((dev.id.clone(), None)),
        Some(module) => match dev.modules.get(&module.to_lowercase()) {
            Some((mid, _)) => Ok((dev.id.clone(), Some(mid.clone()))),
            None => Err((
                StatusCode::NOT_FOUND,
                format!("no module {module:?} on device {:?}", dev.id),
            )),
        },
    }
}

/// A refusal before any work: status and message (answered by [`error`]).
type ApiError = (StatusCode, String);

/// The registered identity named in the URL and the JSON body of a request
/// about it; 404 or 400 (saying what was `expected`) otherwise.
fn identity_request<T: serde::de::DeserializeOwned>(
    m: &Management,
    path: &HashMap<String, String>,
    body: &[u8],
    expected: &str,
) -> Result<(String, Option<String>, T), ApiError> {
    let (device, module) = registered_identity(m, path)?;
    let req = serde_json::from_slice(body)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("expected {expected}: {e}")))?;
    Ok((device, module, req))
}

fn session_key(device: &str, module: Option<&str>) -> String {
    match module {
        Some(m) => format!("{device}/{m}"),
        None => device.to_owned(),
    }
}

/// A twin as IoT Hub's service API shows it: identity, `etag`, `version`,
/// `status`, `connectionState`, `lastActivityTime`, authentication, tags,
/// and each properties section with its `$version` and `$metadata`
/// (`$lastUpdated` for the section; per-property times are not kept).
fn twin_json(
    m: &Management,
    device: &str,
    module: Option<&str>,
    t: &crate::iothub::twin::Twin,
) -> Response {
    use crate::iothub::identity::X509Spec;
    use crate::iothub::presence::NEVER;
    let (state, last_activity) = m.presence.state(&session_key(device, module));
    let reg = m.identities.registry();
    let dev = reg.device(device);
    let (auth, thumbs) = match (module, dev.and_then(|d| d.x509.as_ref())) {
        (
            None,
            Some(X509Spec::SelfSigned {
                primary_thumbprint,
                secondary_thumbprint,
            }),
        ) => (
            "selfSigned",
            (
                Some(primary_thumbprint.clone()),
                secondary_thumbprint.clone(),
            ),
        ),
        (None, Some(X509Spec::CertificateAuthority)) => ("certificateAuthority", (None, None)),
        _ => ("sas", (None, None)),
    };
    let section = |s: &serde_json::Map<String, serde_json::Value>,
                   updated: Option<u64>,
                   desired: bool| {
        let mut s = s.clone();
        let version = s.get("$version").cloned().unwrap_or(1.into());
        let mut meta = serde_json::json!({
            "$lastUpdated": updated.map_or_else(|| NEVER.to_owned(), crate::iothub::presence::rfc3339_ms),
        });
        if desired {
            meta["$lastUpdatedVersion"] = version;
        }
        s.insert("$metadata".into(), meta);
        s
    };
    let mut v = serde_json::json!({
        "deviceId": device,
        "etag": t.etag(),
        "version": t.version,
        "status": "enabled",
        "statusUpdateTime": NEVER,
        "connectionState": state,
        "lastActivityTime": last_activity,
        "authenticationType": auth,
        "x509Thumbprint": { "primaryThumbprint": thumbs.0, "secondaryThumbprint": thumbs.1 },
        "tags": t.tags,
        "properties": {
            "desired": section(&t.desired, t.desired_updated, true),
            "reported": section(&t.reported, t.reported_updated, false),
        },
    });
    match module {
        Some(mid) => v["moduleId"] = mid.into(),
        None => v["capabilities"] = serde_json::json!({ "iotEdge": dev.is_some_and(|d| d.edge) }),
    }
    Json(v).into_response()
}

fn twin_error(e: crate::iothub::twin::TwinError) -> Response {
    use crate::iothub::twin::TwinError;
    match e {
        TwinError::Invalid(_) => error(StatusCode::BAD_REQUEST, e.to_string()),
        TwinError::TooLarge { .. } => error(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
        TwinError::Store(_) => internal(e),
    }
}

async fn get_twin(
    State(m): State<Arc<Management>>,
    UrlPath(path): UrlPath<HashMap<String, String>>,
) -> Response {
    let (device, module) = match registered_identity(&m, &path) {
        Ok(x) => x,
        Err((status, why)) => return error(status, why),
    };
    let key = session_key(&device, module.as_deref());
    let twins = m.services.twins.clone();
    blocking(
        move || twins.get(&key),
        move |t| twin_json(&m, &device, module.as_deref(), &t),
        twin_error,
    )
    .await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TwinPatchRequest {
    tags: Option<serde_json::Map<String, serde_json::Value>>,
    properties: Option<TwinPatchProperties>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TwinPatchProperties {
    desired: Option<serde_json::Map<String, serde_json::Value>>,
    reported: Option<serde_json::Value>,
}

/// `{"tags": {…}, "properties": {"desired": {…}}}`: merged into the twin;
/// the desired change is pushed to the identity if it is connected.
async fn patch_twin(
    State(m): State<Arc<Management>>,
    UrlPath(path): UrlPath<HashMap<String, String>>,
    body: axum::body::Bytes,
) -> Response {
    let expected = r#"{"tags": {…}, "properties": {"desired": {…}}}"#;
    let (device, module, req) =
        match identity_request::<TwinPatchRequest>(&m, &path, &body, expected) {
            Ok(x) => x,
            Err((status, why)) => return error(status, why),
        };
    let (desired, reported) = match req.properties {
        Some(p) => (p.desired, p.reported),
        None => (None, None),
    };
    if reported.is_some() {
        return error(
            StatusCode::BAD_REQUEST,
            "reported properties are written by the device, not through the service API",
        );
    }
    let key = session_key(&device, module.as_deref());
    let (services, tags) = (m.services.clone(), req.tags);
    // On the twin worker, in order with the devices' own twin requests.
    let (tx, rx) = tokio::sync::oneshot::channel();
    m.services.run_twin_job(move || {
        let r = services.twins.patch_desired(&key, desired, tags);
        if let Ok((_, Some(push))) = &r {
            services.push_desired(&key, push);
        }
        let _ = tx.send(r);
    });
    match rx.await {
        Ok(Ok((t, _))) => twin_json(&m, &device, module.as_deref(), &t),
        Ok(Err(e)) => twin_error(e),
        Err(e) => internal(e),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MethodRequest {
    method_name: String,
    #[serde(default)]
    payload: serde_json::Value,
    response_timeout_in_seconds: Option<u64>,
    connect_timeout_in_seconds: Option<u64>,
}

/// `{"methodName", "payload", "responseTimeoutInSeconds"?,
/// "connectTimeoutInSeconds"?}` → `{"status", "payload"}` as the identity
/// answered; 404 when it is not connected, 504 when it stays silent.
async fn invoke_method(
    State(m): State<Arc<Management>>,
    UrlPath(path): UrlPath<HashMap<String, String>>,
    body: axum::body::Bytes,
) -> Response {
    use crate::iothub::methods::{DEFAULT_TIMEOUT_SECS, MAX_TIMEOUT_SECS};
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
        .services
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

// ---- Identities in IoT Hub's service API shape ----------------------------

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct SymmetricKeyJson {
    primary_key: Option<String>,
    secondary_key: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ThumbprintJson {
    primary_thumbprint: Option<String>,
    secondary_thumbprint: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct AuthenticationJson {
    #[serde(rename = "type")]
    kind: Option<String>,
    symmetric_key: Option<SymmetricKeyJson>,
    x509_thumbprint: Option<ThumbprintJson>,
}

/// A device or module as IoT Hub's registry API takes it; fields we do not
/// keep (etag, status, …) are accepted and ignored.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct IotHubIdentityJson {
    device_id: Option<String>,
    module_id: Option<String>,
    authentication: Option<AuthenticationJson>,
    capabilities: Option<CapabilitiesJson>,
    /// A leaf: its parent edge's scope. An edge device: its own scope.
    device_scope: Option<String>,
    /// An edge device: its parent edge's scope.
    parent_scopes: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct CapabilitiesJson {
    #[serde(default)]
    iot_edge: bool,
}

const SCOPE_PREFIX: &str = "ms-azure-iot-edge://";

/// The scope IoT Hub gives an edge device (we leave out its generation id).
fn scope_of(edge_device: &str) -> String {
    format!("{SCOPE_PREFIX}{edge_device}")
}

/// The edge device a scope names: `ms-azure-iot-edge://{id}`, or IoT Hub's
/// `…{id}-{generation id}`; it must be registered as an edge device.
fn device_of_scope(
    registry: &crate::iothub::identity::Registry,
    scope: &str,
) -> Result<String, String> {
    let rest = scope
        .strip_prefix(SCOPE_PREFIX)
        .ok_or_else(|| format!("scope {scope:?} does not start with {SCOPE_PREFIX}"))?;
    let candidates = std::iter::once(rest).chain(
        rest.rsplit_once('-')
            .filter(|(_, g)| !g.is_empty() && g.bytes().all(|b| b.is_ascii_digit()))
            .map(|(id, _)| id),
    );
    for id in candidates {
        if let Some(d) = registry.device(id) {
            if d.edge {
                return Ok(d.id.clone());
            }
            return Err(format!(
                "scope {scope:?} names {id:?}, which is not an edge device"
            ));
        }
    }
    Err(format!("scope {scope:?} names no registered edge device"))
}

/// (edge, parent) from an IoT Hub identity body.
fn parse_scopes(
    req: &IotHubIdentityJson,
    registry: &crate::iothub::identity::Registry,
) -> Result<(bool, Option<String>), String> {
    let edge = req.capabilities.as_ref().is_some_and(|c| c.iot_edge);
    let parent_scope = if edge {
        req.parent_scopes.as_ref().and_then(|p| p.first())
    } else {
        req.device_scope.as_ref()
    };
    let parent = parent_scope
        .filter(|s| !s.is_empty())
        .map(|s| device_of_scope(registry, s))
        .transpose()?;
    Ok((edge, parent))
}

/// (primary key, secondary key, X.509) from an `authentication` object;
/// keys are generated when a SAS identity gives none.
fn parse_authentication(
    a: Option<AuthenticationJson>,
    module: bool,
) -> Result<Authentication, String> {
    let a = a.unwrap_or_default();
    let kind = a.kind.as_deref().unwrap_or("sas");
    match kind {
        "sas" => {
            let k = a.symmetric_key.unwrap_or_default();
            let primary = k
                .primary_key
                .filter(|k| !k.is_empty())
                .unwrap_or_else(new_key);
            let secondary = Some(
                k.secondary_key
                    .filter(|k| !k.is_empty())
                    .unwrap_or_else(new_key),
            );
            Ok((primary, secondary, None))
        }
        "selfSigned" | "certificateAuthority" if module => {
            Err("modules authenticate with symmetric keys only (as in IoT Edge)".into())
        }
        "selfSigned" => {
            let t = a.x509_thumbprint.unwrap_or_default();
            let Some(primary_thumbprint) = t.primary_thumbprint.filter(|t| !t.is_empty()) else {
                return Err(
                    "selfSigned authentication needs x509Thumbprint.primaryThumbprint".into(),
                );
            };
            Ok((
                String::new(),
                None,
                Some(X509Spec::SelfSigned {
                    primary_thumbprint,
                    secondary_thumbprint: t.secondary_thumbprint.filter(|t| !t.is_empty()),
                }),
            ))
        }
        "certificateAuthority" => Ok((String::new(), None, Some(X509Spec::CertificateAuthority))),
        other => Err(format!(
            "authentication type {other:?} is not one of sas, selfSigned, certificateAuthority"
        )),
    }
}

fn authentication_json(
    primary: &str,
    secondary: Option<&str>,
    x509: Option<&X509Spec>,
) -> serde_json::Value {
    match x509 {
        None => serde_json::json!({
            "type": "sas",
            "symmetricKey": { "primaryKey": primary, "secondaryKey": secondary },
            "x509Thumbprint": { "primaryThumbprint": null, "secondaryThumbprint": null },
        }),
        Some(X509Spec::SelfSigned {
            primary_thumbprint,
            secondary_thumbprint,
        }) => serde_json::json!({
            "type": "selfSigned",
            "symmetricKey": { "primaryKey": null, "secondaryKey": null },
            "x509Thumbprint": { "primaryThumbprint": primary_thumbprint, "secondaryThumbprint": secondary_thumbprint },
        }),
        Some(X509Spec::CertificateAuthority) => serde_json::json!({
            "type": "certificateAuthority",
            "symmetricKey": { "primaryKey": null, "secondaryKey": null },
            "x509Thumbprint": { "primaryThumbprint": null, "secondaryThumbprint": null },
        }),
    }
}

/// The host names for connection strings: (HostName, GatewayHostName).
fn hosts(m: &Management) -> (String, String) {
    let host = m
        .identities
        .registry()
        .iothub_hostname
        .clone()
        .unwrap_or_else(|| m.gateway_hostname.clone());
    (host, m.gateway_hostname.clone())
}

/// What an SDK needs to reach this gateway as the device.
fn device_connection_string(m: &Management, d: &DeviceSpec) -> String {
    let (host, gw) = hosts(m);
    if d.x509.is_some() {
        format!(
            "HostName={host};DeviceId={};x509=true;GatewayHostName={gw}",
            d.device_id
        )
    } else {
        format!(
            "HostName={host};DeviceId={};SharedAccessKey={};GatewayHostName={gw}",
            d.device_id, d.primary_key
        )
    }
}

fn module_connection_string(m: &Management, device: &str, ms: &ModuleSpec) -> String {
    let (host, gw) = hosts(m);
    format!(
        "HostName={host};DeviceId={device};ModuleId={};SharedAccessKey={};GatewayHostName={gw}",
        ms.module_id, ms.primary_key
    )
}

/// A device as IoT Hub's registry API shows it, plus (our addition) the
/// connection string that points an SDK at this gateway.
fn iothub_device_json(m: &Management, d: &DeviceSpec) -> serde_json::Value {
    let device_scope = if d.edge {
        Some(scope_of(&d.device_id))
    } else {
        d.parent.as_deref().map(scope_of)
    };
    let parent_scopes: Vec<String> = match (d.edge, &d.parent) {
        (true, Some(p)) => vec![scope_of(p)],
        _ => Vec::new(),
    };
    serde_json::json!({
        "deviceId": d.device_id,
        "status": "enabled",
        "capabilities": {"iotEdge": d.edge},
        "deviceScope": device_scope,
        "parentScopes": parent_scopes,
        "authentication": authentication_json(&d.primary_key, d.secondary_key.as_deref(), d.x509.as_ref()),
        "connectionString": device_connection_string(m, d),
    })
}

fn iothub_module_json(m: &Management, device: &str, ms: &ModuleSpec) -> serde_json::Value {
    serde_json::json!({
        "deviceId": device,
        "moduleId": ms.module_id,
        "authentication": authentication_json(&ms.primary_key, ms.secondary_key.as_deref(), None),
        "connectionString": module_connection_string(m, device, ms),
    })
}

fn not_found(what: String) -> RegistryError {
    RegistryError::NotFound(what)
}

async fn iothub_list_devices(State(m): State<Arc<Management>>) -> Response {
    let devices: Vec<_> = m
        .identities
        .registry()
        .specs()
        .iter()
        .map(|d| iothub_device_json(&m, d))
        .collect();
    Json(devices).into_response()
}

async fn iothub_get_device(
    State(m): State<Arc<Management>>,
    UrlPath(device): UrlPath<String>,
) -> Response {
    match m.identities.registry().device(&device) {
        Some(d) => Json(iothub_device_json(&m, &d.spec())).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no device {device:?}")),
    }
}

/// Keys (primary, secondary) or X.509, as an identity authenticates.
type Authentication = (String, Option<String>, Option<X509Spec>);

/// The `authentication` of a PUT device/module body, after checking that
/// the ids in the body (if any) are the URL's.
fn parse_identity_body(
    body: &[u8],
    device: &str,
    module: Option<&str>,
) -> Result<Authentication, ApiError> {
    let req: IotHubIdentityJson = parse_json(body).map_err(|e| (StatusCode::BAD_REQUEST, e))?;
    if req
        .device_id
        .as_deref()
        .is_some_and(|d| !d.eq_ignore_ascii_case(device))
    {
        return Err((
            StatusCode::BAD_REQUEST,
            "deviceId in the body differs from the URL".into(),
        ));
    }
    if let (Some(m), Some(b)) = (module, req.module_id.as_deref()) {
        if !b.eq_ignore_ascii_case(m) {
            return Err((
                StatusCode::BAD_REQUEST,
                "moduleId in the body differs from the URL".into(),
            ));
        }
    }
    parse_authentication(req.authentication, module.is_some())
        .map_err(|e| (StatusCode::BAD_REQUEST, e))
}

/// Creates or replaces a device's identity; its modules stay.
async fn iothub_put_device(
    State(m): State<Arc<Management>>,
    UrlPath(device): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    let (primary_key, secondary_key, x509) = match parse_identity_body(&body, &device, None) {
        Ok(a) => a,
        Err((status, why)) => return error(status, why),
    };
    let scopes = parse_json::<IotHubIdentityJson>(&body)
        .and_then(|req| parse_scopes(&req, &m.identities.registry()));
    let (edge, parent) = match scopes {
        Ok(x) => x,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    let m2 = m.clone();
    blocking(
        move || {
            m2.identities.modify(&device, |current| {
                let spec = DeviceSpec {
                    device_id: current
                        .as_ref()
                        .map_or(device.clone(), |c| c.device_id.clone()),
                    primary_key,
                    secondary_key,
                    x509,
                    modules: current.map(|c| c.modules).unwrap_or_default(),
                    edge,
                    parent,
                };
                let mut spec = spec;
                if edge {
                    crate::iothub::identity::add_system_modules(&mut spec);
                }
                Ok((Some(spec.clone()), spec))
            })
        },
        |spec| Json(iothub_device_json(&m, &spec)).into_response(),
        registry_error,
    )
    .await
}

async fn iothub_list_modules(
    State(m): State<Arc<Management>>,
    UrlPath(device): UrlPath<String>,
) -> Response {
    match m.identities.registry().device(&device) {
        Some(d) => {
            let spec = d.spec();
            let v: Vec<_> = spec
                .modules
                .iter()
                .map(|ms| iothub_module_json(&m, &spec.device_id, ms))
                .collect();
            Json(v).into_response()
        }
        None => error(StatusCode::NOT_FOUND, format!("no device {device:?}")),
    }
}

async fn iothub_get_module(
    State(m): State<Arc<Management>>,
    UrlPath((device, module)): UrlPath<(String, String)>,
) -> Response {
    let Some(d) = m.identities.registry().device(&device).map(|d| d.spec()) else {
        return error(StatusCode::NOT_FOUND, format!("no device {device:?}"));
    };
    match d
        .modules
        .iter()
        .find(|ms| ms.module_id.eq_ignore_ascii_case(&module))
    {
        Some(ms) => Json(iothub_module_json(&m, &d.device_id, ms)).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("no module {module:?} on device {:?}", d.device_id),
        ),
    }
}

async fn iothub_put_module(
    State(m): State<Arc<Management>>,
    UrlPath((device, module)): UrlPath<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    let (primary_key, secondary_key, _) = match parse_identity_body(&body, &device, Some(&module)) {
        Ok(a) => a,
        Err((status, why)) => return error(status, why),
    };
    let m2 = m.clone();
    blocking(
        move || {
            m2.identities.modify(&device, |current| {
                let Some(mut spec) = current else {
                    return Err(not_found(format!("no device {device:?}")));
                };
                let ms = ModuleSpec {
                    module_id: spec
                        .modules
                        .iter()
                        .find(|x| x.module_id.eq_ignore_ascii_case(&module))
                        .map_or(module.clone(), |x| x.module_id.clone()),
                    primary_key,
                    secondary_key,
                };
                spec.modules
                    .retain(|x| !x.module_id.eq_ignore_ascii_case(&module));
                spec.modules.push(ms.clone());
                let device_id = spec.device_id.clone();
                Ok((Some(spec), (device_id, ms)))
            })
        },
        |(device_id, ms)| Json(iothub_module_json(&m, &device_id, &ms)).into_response(),
        registry_error,
    )
    .await
}

async fn iothub_delete_module(
    State(m): State<Arc<Management>>,
    UrlPath((device, module)): UrlPath<(String, String)>,
) -> Response {
    let m2 = m.clone();
    blocking(
        move || {
            let removed = m2.identities.modify(&device, |current| {
                let Some(mut spec) = current else {
                    return Err(not_found(format!("no device {device:?}")));
                };
                let Some(ms) = spec
                    .modules
                    .iter()
                    .find(|x| x.module_id.eq_ignore_ascii_case(&module))
                    .cloned()
                else {
                    return Err(not_found(format!(
                        "no module {module:?} on device {device:?}"
                    )));
                };
                spec.modules.retain(|x| x.module_id != ms.module_id);
                let key = session_key(&spec.device_id, Some(&ms.module_id));
                Ok((Some(spec), key))
            })?;
            m2.broker.revoke(&removed);
            let _ = m2.services.twins.remove(&removed);
            m2.presence.forget(&removed);
            Ok::<_, RegistryError>(())
        },
        |()| StatusCode::NO_CONTENT.into_response(),
        registry_error,
    )
    .await
}

// ---- Deployment --------------------------------------------------------------

/// The deployment in effect: the manifest last PUT (or the `--routes` file).
async fn get_deployment(State(m): State<Arc<Management>>) -> Response {
    let store = m.pipeline.store().clone();
    blocking(
        move || store.get(edgehub_store::Table::Config, crate::server::DEPLOYMENT_KEY),
        |raw| match raw.and_then(|r| serde_json::from_slice::<serde_json::Value>(&r).ok()) {
            Some(doc) => Json(doc).into_response(),
            None => error(
                StatusCode::NOT_FOUND,
                format!(
                    "no deployment yet; the default route {:?} is in effect",
                    crate::pipeline::DEFAULT_ROUTE
                ),
            ),
        },
        internal,
    )
    .await
}

/// An IoT Edge deployment manifest (`modulesContent` with `$edgeHub`
/// desired properties): its routes replace the running ones at once (no
/// connection is dropped) and it is kept for restarts. An invalid manifest
/// is refused with every error, positioned, and changes nothing.
async fn put_deployment(State(m): State<Arc<Management>>, body: axum::body::Bytes) -> Response {
    let doc: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(d) => d,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("deployment is not JSON: {e}"),
            )
        }
    };
    let table = match crate::pipeline::routes_from_deployment(&doc) {
        Ok(t) => t,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let routes: Vec<_> = table
        .routes()
        .iter()
        .map(|r| serde_json::json!({ "name": r.name, "route": r.text }))
        .collect();
    let agent_desired = match doc
        .get("modulesContent")
        .and_then(|c| c.get("$edgeAgent"))
        .and_then(|a| a.get("properties.desired"))
    {
        None => None,
        Some(serde_json::Value::Object(d)) => Some(d.clone()),
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "modulesContent.$edgeAgent.properties.desired must be an object",
            )
        }
    };
    let (m2, raw) = (m.clone(), body.to_vec());
    let stored = blocking(
        move || {
            m2.pipeline.store().put(
                edgehub_store::Table::Config,
                crate::server::DEPLOYMENT_KEY,
                &raw,
            )?;
            m2.pipeline.routes().replace(table);
            Ok::<_, edgehub_store::StoreError>(())
        },
        |()| StatusCode::OK.into_response(),
        internal,
    )
    .await;
    if stored.status() != StatusCode::OK {
        return stored;
    }
    tracing::info!(routes = routes.len(), "deployment applied");
    let agent = match (agent_desired, &m.edge_device) {
        (Some(desired), Some(device)) => {
            let identity = session_key(device, Some("$edgeAgent"));
            let (services, key) = (m.services.clone(), identity.clone());
            // On the twin worker, in order with the agent's own requests.
            let (tx, rx) = tokio::sync::oneshot::channel();
            m.services.run_twin_job(move || {
                let r = services.twins.replace_desired(&key, desired);
                if let Ok((_, Some(push))) = &r {
                    services.push_desired(&key, push);
                }
                let _ = tx.send(r);
            });
            match rx.await {
                Ok(Ok((t, _))) => serde_json::json!({
                    "identity": identity,
                    "desiredVersion": t.desired_version(),
                }),
                Ok(Err(e)) => return twin_error(e),
                Err(e) => return internal(e),
            }
        }
        (Some(_), None) => {
            tracing::warn!("deployment has $edgeAgent desired properties but the hub has no --device-id: not delivered");
            serde_json::Value::Null
        }
        (None, _) => serde_json::Value::Null,
    };
    Json(serde_json::json!({ "routes": routes, "edgeAgent": agent })).into_response()
}
