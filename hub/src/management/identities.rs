//! `/api/identities`: devices and modules with their keys, one at a time or in bulk.

use super::*;

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct DeviceRequest {
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
pub(super) struct ModuleRequest {
    module_id: String,
    primary_key: Option<String>,
    secondary_key: Option<String>,
}

#[derive(Deserialize)]
pub(super) struct BulkRequest {
    devices: Vec<DeviceRequest>,
}

pub(super) fn spec_from(device_id: String, r: DeviceRequest) -> DeviceSpec {
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
pub(super) fn with_connection_strings(m: &Management, spec: &DeviceSpec) -> serde_json::Value {
    let mut v = serde_json::to_value(spec).expect("spec serializes");
    v["connectionString"] = device_connection_string(m, spec).into();
    if let Some(mods) = v["modules"].as_array_mut() {
        for (mv, ms) in mods.iter_mut().zip(&spec.modules) {
            mv["connectionString"] = module_connection_string(m, &spec.device_id, ms).into();
        }
    }
    v
}

pub(super) fn registry_error(e: RegistryError) -> Response {
    match e {
        RegistryError::Invalid(m) => error(StatusCode::BAD_REQUEST, m),
        RegistryError::NotFound(m) => error(StatusCode::NOT_FOUND, m),
        RegistryError::Store(e) => internal(e),
    }
}

pub(super) async fn list_identities(State(m): State<Arc<Management>>) -> Response {
    let devices: Vec<_> = m
        .identities
        .registry()
        .specs()
        .iter()
        .map(|s| with_connection_strings(&m, s))
        .collect();
    Json(serde_json::json!({ "devices": devices })).into_response()
}

pub(super) async fn put_identity(
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

pub(super) async fn put_identities(
    State(m): State<Arc<Management>>,
    body: axum::body::Bytes,
) -> Response {
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

pub(super) async fn delete_identity(
    State(m): State<Arc<Management>>,
    UrlPath(device): UrlPath<String>,
) -> Response {
    delete_device(m, device).await
}

/// Removes a device and its modules from the registry, closes their
/// connections (ending their sessions) and forgets their twins.
pub(super) async fn delete_device(m: Arc<Management>, device: String) -> Response {
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
                let _ = m2.devices.twins.remove(&identity);
                m2.devices.links.presence.forget(&identity);
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
