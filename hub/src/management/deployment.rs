//! `/deployment`: the IoT Edge deployment manifest in effect.

use super::*;

/// Where the deployment in effect is kept (the store's config table).
pub const DEPLOYMENT_KEY: &[u8] = b"deployment";

/// The deployment in effect: the manifest last PUT (or the `--routes` file).
pub(super) async fn get_deployment(State(m): State<Arc<Management>>) -> Response {
    let store = m.pipeline.store().clone();
    blocking(
        move || store.get(edgehub_store::Table::Config, DEPLOYMENT_KEY),
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
pub(super) async fn put_deployment(
    State(m): State<Arc<Management>>,
    body: axum::body::Bytes,
) -> Response {
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
            m2.pipeline
                .store()
                .put(edgehub_store::Table::Config, DEPLOYMENT_KEY, &raw)?;
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
            let (devices, key) = (m.devices.clone(), identity.clone());
            // On the twin worker, in order with the agent's own requests.
            let (tx, rx) = tokio::sync::oneshot::channel();
            m.devices.run_twin_job(move || {
                let r = devices.twins.replace_desired(&key, desired);
                if let Ok((_, Some(push))) = &r {
                    devices.push_desired(&key, push);
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
