//! The cloud-managed path end to end: a real edgehub (`EDGEHUB_BIN`) gets
//! a deployment through `PUT /deployment`; the operator, connected to it as
//! `$edgeAgent` over MQTTS, writes the EdgeDeployment into the device
//! namespace of a real API server; the controller creates the objects; the
//! agent reports versions and module status back to the hub's twin.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{cluster, eventually, Scope};
use edgehub_operator::agent::{self, AgentConfig};
use edgehub_operator::crd::EdgeDeployment;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{json, Value};

struct Hub {
    child: Child,
    data: tempfile::TempDir,
    mqtts: u16,
    management: u16,
}

impl Hub {
    fn start() -> Option<Hub> {
        let Some(bin) = std::env::var_os("EDGEHUB_BIN").map(PathBuf::from) else {
            assert!(
                std::env::var_os("EDGEHUB_REQUIRE_CLUSTER").is_none(),
                "EDGEHUB_REQUIRE_CLUSTER is set but EDGEHUB_BIN (the edgehub binary) is not"
            );
            eprintln!("skipped: no EDGEHUB_BIN");
            return None;
        };
        let data = tempfile::tempdir().unwrap();
        let mut child = Command::new(bin)
            .args(["--data-dir"])
            .arg(data.path())
            .args([
                "--mqtts-listen",
                "127.0.0.1:0",
                "--management-listen",
                "127.0.0.1:0",
                "--store-min-free-disk",
                "0",
                "--hostname",
                "localhost",
                "--device-id",
                "edge1",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("edgehub starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut mqtts, mut management) = (0, 0);
        while mqtts == 0 || management == 0 {
            let line = lines.next().expect("edgehub prints its listeners").unwrap();
            let parts: Vec<&str> = line.split_whitespace().collect();
            if let ["listening", name, addr] = parts.as_slice() {
                let port = addr.rsplit(':').next().unwrap().parse().unwrap();
                match *name {
                    "mqtts" => mqtts = port,
                    "management" => management = port,
                    _ => {}
                }
            }
        }
        // Keep draining stdout so the hub never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Some(Hub {
            child,
            data,
            mqtts,
            management,
        })
    }

    fn api(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let token = std::fs::read_to_string(self.data.path().join("management-token")).unwrap();
        let req = ureq::request(
            method,
            &format!("http://127.0.0.1:{}{path}", self.management),
        )
        .set("Authorization", &format!("Bearer {}", token.trim()));
        let resp = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match resp {
            Ok(r) => r.into_json().unwrap_or(Value::Null),
            Err(ureq::Error::Status(code, r)) => {
                panic!("{method} {path}: {code} {}", r.into_string().unwrap())
            }
            Err(e) => panic!("{method} {path}: {e}"),
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn manifest(sensor_create: &str, with_sensor: bool) -> Value {
    let mut modules = json!({});
    if with_sensor {
        modules["sensor"] = json!({"version": "1.0", "type": "docker", "status": "running", "restartPolicy": "always",
            "settings": {"image": "sensor:1", "createOptions": sensor_create}});
    }
    json!({"modulesContent": {
        "$edgeAgent": {"properties.desired": {
            "schemaVersion": "1.1",
            "runtime": {"type": "docker", "settings": {}},
            "systemModules": {
                "edgeAgent": {"type": "docker", "settings": {"image": "edgehub-operator:dev"}},
                "edgeHub": {"type": "docker", "status": "running", "restartPolicy": "always",
                    "settings": {"image": "edgehub:dev",
                        "createOptions": "{\"HostConfig\":{\"PortBindings\":{\"8883/tcp\":[{\"HostPort\":\"8883\"}]}}}"}}
            },
            "modules": modules
        }},
        "$edgeHub": {"properties.desired": {
            "schemaVersion": "1.1",
            "routes": {"up": "FROM /messages/* INTO $upstream"},
            "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}
        }}
    }})
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_agent_twin_drives_the_cluster() {
    let Some(client) = cluster().await else {
        return;
    };
    let Some(hub) = Hub::start() else { return };
    let hub = std::sync::Arc::new(hub);
    let scope = Scope::new(client.clone(), "ops-agent").await;

    // The hub registered itself (--device-id) with its $edgeAgent module.
    let h = hub.clone();
    let module = blocking(move || h.api("GET", "/devices/edge1/modules/$edgeAgent", None)).await;
    let cs = module["connectionString"]
        .as_str()
        .expect("connection string")
        .to_owned();
    assert!(cs.contains("ModuleId=$edgeAgent"), "{cs}");

    let h = hub.clone();
    let put = blocking(move || {
        h.api(
            "PUT",
            "/deployment",
            Some(manifest("{\"Env\":[\"A=1\"]}", true)),
        )
    })
    .await;
    let v1 = put["edgeAgent"]["desiredVersion"]
        .as_u64()
        .expect("delivered to $edgeAgent");

    let cfg = AgentConfig::new(
        &format!("{cs};GatewayHostName=localhost"),
        Some(&hub.data.path().join("ca.pem")),
        hub.mqtts,
        Some(scope.ns.clone()),
    )
    .unwrap();
    let name = cfg.deployment_name();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent_task = tokio::spawn(agent::run(client.clone(), cfg, async move {
        let _ = stopped.await;
    }));

    // The EdgeDeployment appears and the controller creates the modules.
    let deployments: Api<Deployment> = scope.api();
    eventually(60, "edgehub and sensor Deployments", || async {
        let hub = deployments.get_opt("edgehub").await.ok()??;
        let sensor = deployments.get_opt("sensor").await.ok()??;
        Some((hub, sensor))
    })
    .await;
    let eds: Api<EdgeDeployment> = scope.api();
    let ed = eds.get(&name).await.unwrap();
    assert_eq!(ed.spec.device.device_id.as_deref(), Some("edge1"));
    assert!(!ed.spec.modules.contains_key("edgeAgent"));

    // The agent reports the version it applied and the modules' status.
    let twin = |h: std::sync::Arc<Hub>| async move {
        blocking(move || h.api("GET", "/twins/edge1/modules/$edgeAgent", None)).await
    };
    let reported = eventually(30, "reported v1 with module status", || {
        let h = hub.clone();
        async move {
            let t = twin(h).await;
            let r = t["properties"]["reported"].clone();
            (r["lastDesiredVersion"].as_u64() == Some(v1)
                && r["modules"]["sensor"]["runtimeStatus"].is_string())
            .then_some(r)
        }
    })
    .await;
    assert_eq!(reported["lastDesiredStatus"]["code"], 200);
    assert_eq!(
        reported["systemModules"]["edgeHub"]["runtimeStatus"],
        "unknown"
    );

    // A "kubelet" marks the hub ready → reported running.
    deployments
        .patch_status(
            "edgehub",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"replicas": 1, "readyReplicas": 1, "observedGeneration": 1}}),
            ),
        )
        .await
        .unwrap();
    eventually(30, "edgeHub reported running", || {
        let h = hub.clone();
        async move {
            let t = twin(h).await;
            (t["properties"]["reported"]["systemModules"]["edgeHub"]["runtimeStatus"] == "running")
                .then_some(())
        }
    })
    .await;

    // An undeployable manifest: 400 with the reason, the cluster untouched.
    let sensor_rv = deployments
        .get("sensor")
        .await
        .unwrap()
        .metadata
        .resource_version;
    let h = hub.clone();
    let put =
        blocking(move || h.api("PUT", "/deployment", Some(manifest("{\"Env\": [", true)))).await;
    let v2 = put["edgeAgent"]["desiredVersion"].as_u64().unwrap();
    assert!(v2 > v1);
    let reported = eventually(30, "reported 400", || {
        let h = hub.clone();
        async move {
            let r = twin(h).await["properties"]["reported"].clone();
            (r["lastDesiredVersion"].as_u64() == Some(v2)).then_some(r)
        }
    })
    .await;
    assert_eq!(reported["lastDesiredStatus"]["code"], 400);
    let why = reported["lastDesiredStatus"]["description"]
        .as_str()
        .unwrap();
    assert!(why.contains("sensor") && why.contains("not JSON"), "{why}");
    assert_eq!(
        deployments
            .get("sensor")
            .await
            .unwrap()
            .metadata
            .resource_version,
        sensor_rv
    );

    // The sensor removed from the deployment: its Deployment goes, and the
    // twin's reported modules lose it.
    let h = hub.clone();
    let put = blocking(move || h.api("PUT", "/deployment", Some(manifest("", false)))).await;
    let v3 = put["edgeAgent"]["desiredVersion"].as_u64().unwrap();
    eventually(60, "sensor removed", || async {
        deployments
            .get_opt("sensor")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    eventually(30, "reported v3 without the sensor", || {
        let h = hub.clone();
        async move {
            let r = twin(h).await["properties"]["reported"].clone();
            (r["lastDesiredVersion"].as_u64() == Some(v3)
                && r["lastDesiredStatus"]["code"] == 200
                && r["modules"].get("sensor").is_none())
            .then_some(())
        }
    })
    .await;

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), agent_task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    scope.end().await;
}
