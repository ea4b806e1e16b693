//! Devices and modules in IoT Hub's service API shape (`/devices/…`).

use super::*;

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(super) struct SymmetricKeyJson {
    primary_key: Option<String>,
    secondary_key: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(super) struct ThumbprintJson {
    primary_thumbprint: Option<String>,
    secondary_thumbprint: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(super) struct AuthenticationJson {
    #[serde(rename = "type")]
    kind: Option<String>,
    symmetric_key: Option<SymmetricKeyJson>,
    x509_thumbprint: Option<ThumbprintJson>,
}

/// A device or module as IoT Hub's registry API takes it; fields we do not
/// keep (etag, status, …) are accepted and ignored.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(super) struct IotHubIdentityJson {
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
pub(super) struct CapabilitiesJson {
    #[serde(default)]
    iot_edge: bool,
}

pub(super) const SCOPE_PREFIX: &str = "ms-azure-iot-edge://";

/// The scope IoT Hub gives an edge device (we leave out its generation id).
pub(super) fn scope_of(edge_device: &str) -> String {
    format!("{SCOPE_PREFIX}{edge_device}")
}

/// The edge device a scope names: `ms-azure-iot-edge://{id}`, or IoT Hub's
/// `…{id}-{generation id}`; it must be registered as an edge device.
pub(super) fn device_of_scope(
    registry: &edgehub_device::identity::Registry,
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
pub(super) fn parse_scopes(
    req: &IotHubIdentityJson,
    registry: &edgehub_device::identity::Registry,
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
pub(super) fn parse_authentication(
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

pub(super) fn authentication_json(
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
pub(super) fn hosts(m: &Management) -> (String, String) {
    let host = m
        .identities
        .registry()
        .iothub_hostname
        .clone()
        .unwrap_or_else(|| m.gateway_hostname.clone());
    (host, m.gateway_hostname.clone())
}

/// What an SDK needs to reach this gateway as the device.
pub(super) fn device_connection_string(m: &Management, d: &DeviceSpec) -> String {
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

pub(super) fn module_connection_string(m: &Management, device: &str, ms: &ModuleSpec) -> String {
    let (host, gw) = hosts(m);
    format!(
        "HostName={host};DeviceId={device};ModuleId={};SharedAccessKey={};GatewayHostName={gw}",
        ms.module_id, ms.primary_key
    )
}

/// A device as IoT Hub's registry API shows it, plus (our addition) the
/// connection string that points an SDK at this gateway.
pub(super) fn iothub_device_json(m: &Management, d: &DeviceSpec) -> serde_json::Value {
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

pub(super) fn iothub_module_json(
    m: &Management,
    device: &str,
    ms: &ModuleSpec,
) -> serde_json::Value {
    serde_json::json!({
        "deviceId": device,
        "moduleId": ms.module_id,
        "authentication": authentication_json(&ms.primary_key, ms.secondary_key.as_deref(), None),
        "connectionString": module_connection_string(m, device, ms),
    })
}

pub(super) fn not_found(what: String) -> RegistryError {
    RegistryError::NotFound(what)
}

pub(super) async fn iothub_list_devices(State(m): State<Arc<Management>>) -> Response {
    let devices: Vec<_> = m
        .identities
        .registry()
        .specs()
        .iter()
        .map(|d| iothub_device_json(&m, d))
        .collect();
    Json(devices).into_response()
}

pub(super) async fn iothub_get_device(
    State(m): State<Arc<Management>>,
    UrlPath(device): UrlPath<String>,
) -> Response {
    match m.identities.registry().device(&device) {
        Some(d) => Json(iothub_device_json(&m, &d.spec())).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no device {device:?}")),
    }
}

/// Keys (primary, secondary) or X.509, as an identity authenticates.
pub(super) type Authentication = (String, Option<String>, Option<X509Spec>);

/// The `authentication` of a PUT device/module body, after checking that
/// the ids in the body (if any) are the URL's.
pub(super) fn parse_identity_body(
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
pub(super) async fn iothub_put_device(
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
                    edgehub_device::identity::add_system_modules(&mut spec);
                }
                Ok((Some(spec.clone()), spec))
            })
        },
        |spec| Json(iothub_device_json(&m, &spec)).into_response(),
        registry_error,
    )
    .await
}

pub(super) async fn iothub_list_modules(
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

pub(super) async fn iothub_get_module(
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

pub(super) async fn iothub_put_module(
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

pub(super) async fn iothub_delete_module(
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
            let _ = m2.devices.twins.remove(&removed);
            m2.devices.links.presence.forget(&removed);
            Ok::<_, RegistryError>(())
        },
        |()| StatusCode::NO_CONTENT.into_response(),
        registry_error,
    )
    .await
}
