//! `/twins/{d}[/modules/{m}]`: read a twin, patch its tags and desired properties.

use super::*;

/// A twin as IoT Hub's service API shows it: identity, `etag`, `version`,
/// `status`, `connectionState`, `lastActivityTime`, authentication, tags,
/// and each properties section with its `$version` and `$metadata`
/// (`$lastUpdated` for the section; per-property times are not kept).
pub(super) fn twin_json(
    m: &Management,
    device: &str,
    module: Option<&str>,
    t: &edgehub_device::twin::Twin,
) -> Response {
    use edgehub_device::identity::X509Spec;
    use edgehub_device::presence::NEVER;
    let (state, last_activity) = m.devices.links.presence.state(&session_key(device, module));
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
            "$lastUpdated": updated.map_or_else(|| NEVER.to_owned(), edgehub_device::presence::rfc3339_ms),
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

pub(super) fn twin_error(e: edgehub_device::twin::TwinError) -> Response {
    use edgehub_device::twin::TwinError;
    match e {
        TwinError::Invalid(_) => error(StatusCode::BAD_REQUEST, e.to_string()),
        TwinError::TooLarge { .. } => error(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
        TwinError::Store(_) => internal(e),
    }
}

pub(super) async fn get_twin(
    State(m): State<Arc<Management>>,
    UrlPath(path): UrlPath<HashMap<String, String>>,
) -> Response {
    let (device, module) = match registered_identity(&m, &path) {
        Ok(x) => x,
        Err((status, why)) => return error(status, why),
    };
    let key = session_key(&device, module.as_deref());
    let twins = m.devices.twins.clone();
    blocking(
        move || twins.get(&key),
        move |t| twin_json(&m, &device, module.as_deref(), &t),
        twin_error,
    )
    .await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct TwinPatchRequest {
    tags: Option<serde_json::Map<String, serde_json::Value>>,
    properties: Option<TwinPatchProperties>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TwinPatchProperties {
    desired: Option<serde_json::Map<String, serde_json::Value>>,
    reported: Option<serde_json::Value>,
}

/// `{"tags": {…}, "properties": {"desired": {…}}}`: merged into the twin;
/// the desired change is pushed to the identity if it is connected.
pub(super) async fn patch_twin(
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
    let (devices, tags) = (m.devices.clone(), req.tags);
    // On the twin worker, in order with the devices' own twin requests.
    let (tx, rx) = tokio::sync::oneshot::channel();
    m.devices.run_twin_job(move || {
        let r = devices.twins.patch_desired(&key, desired, tags);
        if let Ok((_, Some(push))) = &r {
            devices.push_desired(&key, push);
        }
        let _ = tx.send(r);
    });
    match rx.await {
        Ok(Ok((t, _))) => twin_json(&m, &device, module.as_deref(), &t),
        Ok(Err(e)) => twin_error(e),
        Err(e) => internal(e),
    }
}
