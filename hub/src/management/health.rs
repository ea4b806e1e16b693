//! `/healthz`, `/readyz` and `/metrics`: no token.

use super::*;

pub(super) async fn readyz(State(m): State<Arc<Management>>) -> Response {
    let upstream = m.upstream.as_ref().map(|u| u.to_json());
    Json(serde_json::json!({ "ready": true, "upstream": upstream })).into_response()
}

pub(super) async fn metrics(State(m): State<Arc<Management>>) -> Response {
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
