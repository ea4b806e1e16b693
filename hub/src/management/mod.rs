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
//!   as IoT Hub settles it (see `edgehub_device::c2d`). Answers 202 once stored.
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

use crate::endpoints::C2D_MAX_QUEUED;
use crate::pipeline::Pipeline;
use edgehub_broker::Broker;
use edgehub_device::error::ErrorCode;
use edgehub_device::identity::{
    new_key, DeviceSpec, Identities, ModuleSpec, RegistryError, X509Spec,
};

mod c2d;
mod deployment;
mod devices;
mod health;
mod identities;
mod methods;
mod outbox;
mod twins;

pub use deployment::DEPLOYMENT_KEY;

use c2d::*;
use deployment::*;
use devices::*;
use health::*;
use identities::*;
use methods::*;
use outbox::*;
use twins::*;

pub struct Management {
    pub c2d: Arc<crate::endpoints::C2dExecutors>,
    pub devices: Arc<edgehub_device::DeviceLayer>,
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
    let mut body = edgehub_device::error::error_body(code, &message);
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

/// An empty body means all defaults.
fn parse_json<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| e.to_string())
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
