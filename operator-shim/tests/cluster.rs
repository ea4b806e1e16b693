//! The operator against a real kube-apiserver (+ etcd + controller-manager's
//! garbage collector), started by `scripts/k8s-test-cluster`.
//!
//! Needs `KUBECONFIG`. Without it the tests are skipped, unless
//! `EDGEHUB_REQUIRE_CLUSTER=1` (set by CI), where a missing cluster fails.
//! Each test works in its own namespace and deletes it at the end.

mod common;

use std::collections::BTreeMap;

use common::{cluster, eventually, Scope};
use edgehub_operator::crd::{EdgeDeployment, EdgeDeploymentSpec, ModuleSettings, ModuleSpec};
use edgehub_operator::reconcile;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Service, ServiceAccount};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use serde_json::json;

fn module(image: &str, create: &str) -> ModuleSpec {
    ModuleSpec {
        status: Some("running".into()),
        restart_policy: Some("always".into()),
        settings: ModuleSettings {
            image: image.into(),
            create_options: (!create.is_empty()).then(|| create.into()),
        },
        ..Default::default()
    }
}

fn base_spec() -> EdgeDeploymentSpec {
    let mut spec = EdgeDeploymentSpec::default();
    spec.device.device_id = Some("edge1".into());
    spec.device.iothub_hostname = Some("myhub.azure-devices.net".into());
    spec.modules.insert(
        "edgeHub".into(),
        module(
            "edgehub:test",
            r#"{"HostConfig":{"PortBindings":{"8883/tcp":[{"HostPort":"8883"}],"5671/tcp":[{"HostPort":"5671"}]},"Binds":["edgehub-data:/data"]}}"#,
        ),
    );
    spec.modules.insert(
        "sensor_1".into(),
        module(
            "sensor:1",
            r#"{"Env":["MODE=fast"],"HostConfig":{"CapAdd":["NET_ADMIN"]}}"#,
        ),
    );
    spec.edge_hub = Some(
        serde_json::from_value(json!({
            "schemaVersion": "1.1",
            "routes": {"up": "FROM /messages/* INTO $upstream"},
            "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}
        }))
        .unwrap(),
    );
    spec
}

async fn ready_condition(
    api: &Api<EdgeDeployment>,
    name: &str,
    generation: i64,
) -> Option<(String, String, String)> {
    let ed = api.get(name).await.ok()?;
    let status = ed.status?;
    let c = status
        .conditions
        .iter()
        .find(|c| c.condition_type == "Ready" && c.observed_generation == Some(generation))?;
    Some((
        c.status.clone(),
        c.reason.clone(),
        c.message.clone().unwrap_or_default(),
    ))
}

async fn resource_versions(scope: &Scope) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for d in scope
        .api::<Deployment>()
        .list(&Default::default())
        .await
        .unwrap()
    {
        out.insert(
            format!("deploy/{}", d.name_any()),
            d.resource_version().unwrap(),
        );
    }
    for s in scope
        .api::<Service>()
        .list(&Default::default())
        .await
        .unwrap()
    {
        out.insert(
            format!("svc/{}", s.name_any()),
            s.resource_version().unwrap(),
        );
    }
    for s in scope
        .api::<ServiceAccount>()
        .list(&Default::default())
        .await
        .unwrap()
    {
        if s.name_any() != "default" {
            out.insert(
                format!("sa/{}", s.name_any()),
                s.resource_version().unwrap(),
            );
        }
    }
    for c in scope
        .api::<PersistentVolumeClaim>()
        .list(&Default::default())
        .await
        .unwrap()
    {
        out.insert(
            format!("pvc/{}", c.name_any()),
            c.resource_version().unwrap(),
        );
    }
    for c in scope
        .api::<ConfigMap>()
        .list(&Default::default())
        .await
        .unwrap()
    {
        if c.name_any() != "kube-root-ca.crt" {
            out.insert(
                format!("cm/{}", c.name_any()),
                c.resource_version().unwrap(),
            );
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_change_remove_and_bad_manifest() {
    let Some(client) = cluster().await else {
        return;
    };
    let scope = Scope::new(client, "ops-apply").await;
    let eds = scope.api::<EdgeDeployment>();
    let ed = eds
        .create(
            &PostParams::default(),
            &EdgeDeployment::new("dep1", base_spec()),
        )
        .await
        .unwrap();
    let generation = ed.metadata.generation.unwrap();
    let (status, reason, _) = eventually(30, "Ready condition", || {
        ready_condition(&eds, "dep1", generation)
    })
    .await;
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Applied"));

    // The hub: Recreate, one replica, its routes, data volume, owner reference.
    let hub = scope.api::<Deployment>().get("edgehub").await.unwrap();
    let spec = hub.spec.clone().unwrap();
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(spec.strategy.unwrap().type_.as_deref(), Some("Recreate"));
    let owner = &hub.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("EdgeDeployment", "dep1", Some(true))
    );
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("edgehub"));
    let env: BTreeMap<_, _> = pod.containers[0]
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.as_str(), e.value.clone().unwrap_or_default()))
        .collect();
    assert_eq!(env["IOTEDGE_DEVICEID"], "edge1");
    assert_eq!(env["IOTEDGE_IOTHUBHOSTNAME"], "myhub.azure-devices.net");
    assert_eq!(env["EDGEHUB_ROUTES"], "/etc/edgehub/deployment.json");
    let svc = scope.api::<Service>().get("edgehub").await.unwrap();
    let mut ports: Vec<_> = svc
        .spec
        .unwrap()
        .ports
        .unwrap()
        .into_iter()
        .map(|p| (p.port, p.protocol.unwrap()))
        .collect();
    ports.sort();
    assert_eq!(ports, [(5671, "TCP".to_owned()), (8883, "TCP".to_owned())]);
    let pvc = scope
        .api::<PersistentVolumeClaim>()
        .get("edgehub-data")
        .await
        .unwrap();
    assert_eq!(pvc.owner_references()[0].name, "dep1");
    let cm = scope
        .api::<ConfigMap>()
        .get("edgehub-deployment")
        .await
        .unwrap();
    let routes: serde_json::Value =
        serde_json::from_str(&cm.data.unwrap()["deployment.json"]).unwrap();
    assert_eq!(routes["routes"]["up"], "FROM /messages/* INTO $upstream");

    // The sensor: a sanitised name that cannot collide, its env, no
    // Service (no port bindings), unsupported options reported.
    let ed = eds.get("dep1").await.unwrap();
    let st = ed.status.unwrap();
    let sensor = &st.modules["sensor_1"];
    assert!(sensor.name.starts_with("sensor-1-"), "{}", sensor.name);
    assert_eq!(sensor.unsupported, ["HostConfig.CapAdd"]);
    assert_eq!(sensor.runtime_status, "unknown"); // no kubelet here
    let unsupported = st
        .conditions
        .iter()
        .find(|c| c.condition_type == "UnsupportedOptions")
        .unwrap();
    assert_eq!(unsupported.status, "True");
    assert!(scope
        .api::<Service>()
        .get_opt(&sensor.name)
        .await
        .unwrap()
        .is_none());
    let sensor_name = sensor.name.clone();

    // An event says what was ignored.
    let events: Api<k8s_openapi::api::events::v1::Event> = scope.api();
    eventually(10, "UnsupportedCreateOptions event", || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items
            .iter()
            .find(|e| e.reason.as_deref() == Some("UnsupportedCreateOptions"))
            .map(|e| assert!(e.note.as_deref().unwrap_or("").contains("CapAdd")))
    })
    .await;

    // A second pass changes nothing.
    let before = resource_versions(&scope).await;
    assert_eq!(before.len(), 7, "{before:?}"); // 2 deploy, 1 svc, 2 sa, 1 pvc, 1 cm
    let ctx = reconcile::Context::new(scope.client.clone(), false);
    reconcile::reconcile(
        std::sync::Arc::new(eds.get("dep1").await.unwrap()),
        ctx.clone(),
    )
    .await
    .unwrap();
    assert_eq!(
        resource_versions(&scope).await,
        before,
        "a second pass must be a no-op"
    );

    // Status as a (fake) kubelet would leave it → runtimeStatus running.
    scope
        .api::<Deployment>()
        .patch_status(
            &sensor_name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"replicas": 1, "readyReplicas": 1, "observedGeneration": 1}}),
            ),
        )
        .await
        .unwrap();
    eventually(30, "sensor running", || async {
        let ed = eds.get("dep1").await.ok()?;
        (ed.status?.modules["sensor_1"].runtime_status == "running").then_some(())
    })
    .await;

    // Change one module: only its objects change.
    let before = resource_versions(&scope).await;
    let mut spec = base_spec();
    spec.modules.get_mut("sensor_1").unwrap().settings.image = "sensor:2".into();
    let ed = eds
        .patch(
            "dep1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": spec})),
        )
        .await
        .unwrap();
    let generation = ed.metadata.generation.unwrap();
    eventually(30, "generation 2 applied", || {
        ready_condition(&eds, "dep1", generation)
    })
    .await;
    let after = resource_versions(&scope).await;
    let changed: Vec<_> = after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(v))
        .map(|(k, _)| k.clone())
        .collect();
    assert_eq!(changed, [format!("deploy/{sensor_name}")]);
    let image = scope
        .api::<Deployment>()
        .get(&sensor_name)
        .await
        .unwrap()
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .containers[0]
        .image
        .clone();
    assert_eq!(image.as_deref(), Some("sensor:2"));

    // A bad manifest: Ready=False with the reason, nothing touched.
    let before = resource_versions(&scope).await;
    let mut bad = spec.clone();
    bad.modules
        .get_mut("sensor_1")
        .unwrap()
        .settings
        .create_options = Some("{\"HostConfig\": ".into());
    bad.modules.insert("Sensor2".into(), module("x", ""));
    let ed = eds
        .patch(
            "dep1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": bad})),
        )
        .await
        .unwrap();
    let generation = ed.metadata.generation.unwrap();
    let (status, reason, message) = eventually(30, "InvalidManifest", || {
        ready_condition(&eds, "dep1", generation)
    })
    .await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "InvalidManifest")
    );
    assert!(
        message.contains("sensor_1") && message.contains("not JSON"),
        "{message}"
    );
    assert_eq!(
        resource_versions(&scope).await,
        before,
        "an invalid manifest must not touch objects"
    );

    // Colliding names are refused the same way.
    let mut collide = spec.clone();
    collide.modules.insert("EdgeHub".into(), module("x", ""));
    let ed = eds
        .patch(
            "dep1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": collide})),
        )
        .await
        .unwrap();
    let generation = ed.metadata.generation.unwrap();
    let (_, reason, message) = eventually(30, "collision", || {
        ready_condition(&eds, "dep1", generation)
    })
    .await;
    assert_eq!(reason, "InvalidManifest");
    assert!(
        message.contains("both become Kubernetes name \"edgehub\""),
        "{message}"
    );

    // Remove the sensor: its Deployment and ServiceAccount go, the hub stays.
    let mut spec = base_spec();
    spec.modules.remove("sensor_1");
    // Merge patch: a removed map key must be sent as null.
    let mut body = json!({"spec": spec});
    body["spec"]["modules"]["sensor_1"] = serde_json::Value::Null;
    body["spec"]["modules"]["EdgeHub"] = serde_json::Value::Null;
    body["spec"]["modules"]["Sensor2"] = serde_json::Value::Null;
    let ed = eds
        .patch("dep1", &PatchParams::default(), &Patch::Merge(body))
        .await
        .unwrap();
    let generation = ed.metadata.generation.unwrap();
    eventually(30, "removal applied", || {
        ready_condition(&eds, "dep1", generation)
    })
    .await;
    assert!(scope
        .api::<Deployment>()
        .get_opt(&sensor_name)
        .await
        .unwrap()
        .is_none());
    assert!(scope
        .api::<ServiceAccount>()
        .get_opt(&sensor_name)
        .await
        .unwrap()
        .is_none());
    assert!(scope
        .api::<Deployment>()
        .get_opt("edgehub")
        .await
        .unwrap()
        .is_some());
    let st = eds.get("dep1").await.unwrap().status.unwrap();
    assert_eq!(st.modules.keys().collect::<Vec<_>>(), ["edgeHub"]);

    // Delete the EdgeDeployment: the garbage collector removes the rest
    // (it may first need its 30 s discovery resync to learn the new CRD).
    eds.delete("dep1", &DeleteParams::background())
        .await
        .unwrap();
    eventually(120, "garbage collection", || async {
        let left = resource_versions(&scope).await;
        left.is_empty().then_some(())
    })
    .await;
    scope.end().await;
}
