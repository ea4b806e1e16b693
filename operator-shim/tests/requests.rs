//! Request sequences of the reconciler against kube's mock service (no
//! server): what it sends, in which order, with which field manager. The
//! real-server behaviour (SSA merge, GC) is in `cluster.rs`.

use std::sync::Arc;

use edgehub_operator::crd::{EdgeDeployment, EdgeDeploymentSpec, ModuleSettings, ModuleSpec};
use edgehub_operator::reconcile;
use http::{Method, Request, Response};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};

fn edge_deployment(create_options: &str) -> EdgeDeployment {
    let mut spec = EdgeDeploymentSpec::default();
    spec.modules.insert(
        "sensor".into(),
        ModuleSpec {
            settings: ModuleSettings {
                image: "sensor:1".into(),
                create_options: Some(create_options.into()),
            },
            ..Default::default()
        },
    );
    let mut ed = EdgeDeployment::new("dep1", spec);
    ed.metadata.namespace = Some("ns1".into());
    ed.metadata.uid = Some("uid-1".into());
    ed.metadata.generation = Some(1);
    ed
}

fn respond(send: tower_test::mock::SendResponse<Response<Body>>, status: u16, body: Value) {
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap(),
    );
}

async fn body_json(req: Request<Body>) -> Value {
    let bytes = req.into_body().collect_bytes().await.unwrap();
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}

#[tokio::test]
async fn valid_spec_applies_then_prunes_then_writes_status() {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "ns1");
    let ctx = reconcile::Context::new(client, false);
    let server = tokio::spawn(async move {
        let mut seen = Vec::new();
        loop {
            let Some((req, send)) = handle.next_request().await else {
                break;
            };
            let (method, uri) = (req.method().clone(), req.uri().to_string());
            seen.push(format!("{method} {}", uri.split('?').next().unwrap()));
            match method {
                Method::PATCH if uri.contains("/status") => {
                    let body = body_json(req).await;
                    let ready = &body["status"]["conditions"][0];
                    assert_eq!(
                        (ready["type"].as_str(), ready["status"].as_str()),
                        (Some("Ready"), Some("True"))
                    );
                    respond(
                        send,
                        200,
                        serde_json::to_value(edge_deployment("{}")).unwrap(),
                    );
                    break;
                }
                Method::PATCH => {
                    assert!(uri.contains("fieldManager=edgehub-operator"), "{uri}");
                    assert!(uri.contains("force=true"), "{uri}");
                    let body = body_json(req).await;
                    let owner = &body["metadata"]["ownerReferences"][0];
                    assert_eq!(owner["uid"], "uid-1");
                    assert_eq!(owner["controller"], true);
                    respond(send, 200, body);
                }
                Method::GET => {
                    // Prune listing: one leftover of ours, one stranger's.
                    let kind = if uri.contains("/deployments") {
                        "Deployment"
                    } else {
                        "Object"
                    };
                    let item = |name: &str, uid: &str| {
                        json!({"metadata": {"name": name, "namespace": "ns1",
                        "ownerReferences": [{"apiVersion": "v1", "kind": "EdgeDeployment", "name": "dep1", "uid": uid}]}})
                    };
                    let items = if kind == "Deployment" {
                        vec![
                            item("old-module", "uid-1"),
                            item("other-owner", "uid-2"),
                            item("sensor", "uid-1"),
                        ]
                    } else {
                        vec![]
                    };
                    respond(
                        send,
                        200,
                        json!({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": items}),
                    );
                }
                Method::DELETE => {
                    assert!(
                        uri.contains("/deployments/old-module"),
                        "only our leftover is deleted: {uri}"
                    );
                    respond(
                        send,
                        200,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}),
                    );
                }
                Method::POST => respond(send, 201, body_json(req).await), // events
                other => panic!("unexpected {other} {uri}"),
            }
        }
        seen
    });
    reconcile::reconcile(Arc::new(edge_deployment("{}")), ctx)
        .await
        .unwrap();
    let seen = server.await.unwrap();
    let order: Vec<&str> = seen
        .iter()
        .map(String::as_str)
        .filter(|s| !s.contains("/events"))
        .collect();
    assert_eq!(
        order,
        [
            "GET /api/v1/namespaces/ns1/persistentvolumeclaims",
            "GET /api/v1/namespaces/ns1/configmaps",
            "PATCH /api/v1/namespaces/ns1/serviceaccounts/sensor",
            "GET /api/v1/namespaces/ns1/serviceaccounts",
            "PATCH /apis/apps/v1/namespaces/ns1/deployments/sensor",
            "GET /apis/apps/v1/namespaces/ns1/deployments",
            "DELETE /apis/apps/v1/namespaces/ns1/deployments/old-module",
            "GET /api/v1/namespaces/ns1/services",
            "PATCH /apis/microsoft.azure.devices.edge/v1/namespaces/ns1/edgedeployments/dep1/status",
        ]
    );
}

#[tokio::test]
async fn invalid_spec_writes_only_status_and_an_event() {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "ns1");
    let ctx = reconcile::Context::new(client, false);
    let server = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let (method, uri) = (req.method().clone(), req.uri().path().to_owned());
            seen.push(format!("{method} {uri}"));
            let body = body_json(req).await;
            if uri.ends_with("/status") {
                let ready = &body["status"]["conditions"][0];
                assert_eq!(ready["reason"], "InvalidManifest");
                assert!(ready["message"].as_str().unwrap().contains("not JSON"));
                respond(
                    send,
                    200,
                    serde_json::to_value(edge_deployment("{}")).unwrap(),
                );
                break;
            }
            respond(send, 201, body);
        }
        seen
    });
    reconcile::reconcile(Arc::new(edge_deployment("{oops")), ctx)
        .await
        .unwrap();
    let seen = server.await.unwrap();
    assert_eq!(
        seen,
        [
            "POST /apis/events.k8s.io/v1/namespaces/ns1/events",
            "PATCH /apis/microsoft.azure.devices.edge/v1/namespaces/ns1/edgedeployments/dep1/status",
        ],
        "nothing but the event and the status"
    );
}
