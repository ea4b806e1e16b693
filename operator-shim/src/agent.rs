//! The cloud-managed path: this operator is the device's `$edgeAgent`.
//!
//! It connects to the hub over MQTTS as module `$edgeAgent` (SAS token from
//! its module key, as IoT Edge's agent does), reads its module twin, and
//! turns the desired properties (the `$edgeAgent` part of the deployment the
//! hub got through `PUT /deployment` or from upstream) into an
//! EdgeDeployment in the device namespace, which the controller reconciles.
//! It reports back as IoT Edge's agent does: `lastDesiredVersion`,
//! `lastDesiredStatus` (200, or 400 with the reason when the manifest cannot
//! be deployed, in which case nothing in the cluster changes), and the
//! `runtimeStatus` of every module (`systemModules.edgeHub`, `modules.*`),
//! refreshed from the EdgeDeployment's status.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use hmac::{Hmac, Mac};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, Patch, PatchParams};
use kube::Client;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use serde_json::{json, Map, Value};
use sha2::Sha256;

use crate::crd::{EdgeDeployment, EdgeDeploymentSpec};
use crate::{manifest, names, translate};

pub const AGENT_FIELD_MANAGER: &str = "edgehub-operator-agent";
const TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("connection string: {0}")]
    ConnectionString(String),
    #[error("reading CA {0}: {1}")]
    Ca(String, std::io::Error),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub iothub_hostname: String,
    pub device_id: String,
    pub module_id: String,
    key: String,
    /// Where the hub is (`GatewayHostName`, else the IoT Hub host).
    pub gateway: String,
    pub port: u16,
    ca_pem: Option<Vec<u8>>,
    pub namespace: String,
    /// The namespace was not given: it is `msiot-<hub>-<device>` and the
    /// agent creates it (needs cluster rights; with a namespace given, a
    /// namespaced Role is enough).
    create_namespace: bool,
}

impl AgentConfig {
    pub fn new(
        connection_string: &str,
        ca: Option<&Path>,
        port: u16,
        namespace: Option<String>,
    ) -> Result<AgentConfig, AgentError> {
        let mut parts = BTreeMap::new();
        for kv in connection_string
            .split(';')
            .filter(|s| !s.trim().is_empty())
        {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| AgentError::ConnectionString(format!("{kv:?} is not Key=Value")))?;
            parts.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
        let need = |k: &str, name: &str| {
            parts
                .get(k)
                .cloned()
                .ok_or_else(|| AgentError::ConnectionString(format!("{name} is missing")))
        };
        let iothub_hostname = need("hostname", "HostName")?;
        let device_id = need("deviceid", "DeviceId")?;
        let module_id = parts
            .get("moduleid")
            .cloned()
            .unwrap_or_else(|| "$edgeAgent".into());
        let key = need("sharedaccesskey", "SharedAccessKey")?;
        base64::engine::general_purpose::STANDARD
            .decode(&key)
            .map_err(|_| AgentError::ConnectionString("SharedAccessKey is not base64".into()))?;
        let gateway = parts
            .get("gatewayhostname")
            .cloned()
            .unwrap_or_else(|| iothub_hostname.clone());
        let ca_pem = ca
            .map(|p| std::fs::read(p).map_err(|e| AgentError::Ca(p.display().to_string(), e)))
            .transpose()?;
        let create_namespace = namespace.is_none();
        let namespace = namespace.unwrap_or_else(|| device_namespace(&iothub_hostname, &device_id));
        Ok(AgentConfig {
            iothub_hostname,
            device_id,
            module_id,
            key,
            gateway,
            port,
            ca_pem,
            namespace,
            create_namespace,
        })
    }

    /// The EdgeDeployment the agent writes (one per device).
    pub fn deployment_name(&self) -> String {
        names::sanitize(&self.device_id)
    }
}

/// `msiot-<hub>-<device>`, as IoT Edge's Kubernetes mode named it, made a
/// valid namespace name.
pub fn device_namespace(iothub_hostname: &str, device_id: &str) -> String {
    let hub = iothub_hostname.split('.').next().unwrap_or(iothub_hostname);
    names::sanitize(&format!("msiot-{hub}-{device_id}"))
}

/// Python's `urllib.parse.quote(s, safe="")`, which the SDKs use for SAS.
const SAS_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn sas_token(cfg: &AgentConfig, expiry: u64) -> String {
    let resource = format!(
        "{}/devices/{}/modules/{}",
        cfg.iothub_hostname, cfg.device_id, cfg.module_id
    );
    let sr = utf8_percent_encode(&resource, SAS_ENCODE).to_string();
    let key = base64::engine::general_purpose::STANDARD
        .decode(&cfg.key)
        .expect("checked in AgentConfig::new");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("any key length");
    mac.update(format!("{sr}\n{expiry}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!(
        "SharedAccessSignature sr={sr}&sig={}&se={expiry}",
        utf8_percent_encode(&sig, SAS_ENCODE)
    )
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn connect(cfg: &AgentConfig) -> (AsyncClient, EventLoop) {
    let client_id = format!("{}/{}", cfg.device_id, cfg.module_id);
    let mut opts = MqttOptions::new(client_id, cfg.gateway.clone(), cfg.port);
    opts.set_credentials(
        format!(
            "{}/{}/{}/?api-version=2021-04-12",
            cfg.iothub_hostname, cfg.device_id, cfg.module_id
        ),
        sas_token(cfg, now_secs() + TOKEN_LIFETIME.as_secs()),
    );
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_clean_session(true);
    opts.set_max_packet_size(1024 * 1024, 1024 * 1024);
    let tls = match &cfg.ca_pem {
        Some(ca) => TlsConfiguration::Simple {
            ca: ca.clone(),
            alpn: None,
            client_auth: None,
        },
        None => TlsConfiguration::default(),
    };
    opts.set_transport(Transport::tls_with_config(tls));
    AsyncClient::new(opts, 16)
}

/// What the agent tells the twin about one desired version.
#[derive(Debug, PartialEq)]
pub struct DesiredOutcome {
    pub version: u64,
    pub code: u16,
    pub description: String,
}

/// Desired properties → the EdgeDeployment spec the agent writes, or why
/// they cannot be deployed (nothing is written then).
pub fn spec_for(cfg: &AgentConfig, desired: &Value) -> Result<EdgeDeploymentSpec, String> {
    let mut spec = manifest::spec_from_edge_agent(desired).map_err(|e| e.to_string())?;
    spec.device.device_id = Some(cfg.device_id.clone());
    spec.device.iothub_hostname = Some(cfg.iothub_hostname.clone());
    let name = cfg.deployment_name();
    translate::plan(
        &spec,
        &translate::Target {
            owner: &name,
            namespace: &cfg.namespace,
            external_hub: false,
        },
    )
    .map_err(|e| e.to_string())?;
    Ok(spec)
}

/// Writes the EdgeDeployment for `desired` (server-side apply under the
/// agent's own field manager, so a GitOps writer's fields are not taken).
pub async fn deploy(
    client: &Client,
    cfg: &AgentConfig,
    desired: &Value,
) -> Result<DesiredOutcome, AgentError> {
    let version = desired.get("$version").and_then(Value::as_u64).unwrap_or(0);
    let spec = match spec_for(cfg, desired) {
        Ok(s) => s,
        Err(why) => {
            tracing::warn!(version, %why, "desired properties cannot be deployed; cluster left as it is");
            return Ok(DesiredOutcome {
                version,
                code: 400,
                description: why,
            });
        }
    };
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if cfg.create_namespace && namespaces.get_opt(&cfg.namespace).await?.is_none() {
        let ns =
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": cfg.namespace}});
        namespaces
            .patch(
                &cfg.namespace,
                &PatchParams::apply(AGENT_FIELD_MANAGER),
                &Patch::Apply(&ns),
            )
            .await?;
    }
    let api: Api<EdgeDeployment> = Api::namespaced(client.clone(), &cfg.namespace);
    let ed = EdgeDeployment::new(&cfg.deployment_name(), spec);
    api.patch(
        &cfg.deployment_name(),
        &PatchParams::apply(AGENT_FIELD_MANAGER).force(),
        &Patch::Apply(&ed),
    )
    .await?;
    tracing::info!(version, namespace = %cfg.namespace, "deployment written");
    Ok(DesiredOutcome {
        version,
        code: 200,
        description: String::new(),
    })
}

/// The `modules` / `systemModules` part of the reported properties, from
/// the EdgeDeployment's status. Modules reported before and gone now are
/// set to null (removed from the twin).
pub fn module_report(ed: Option<&EdgeDeployment>, previously: &[String]) -> (Value, Vec<String>) {
    let mut modules = Map::new();
    let mut system = Map::new();
    system.insert(
        "edgeAgent".into(),
        json!({"runtimeStatus": "running", "type": "docker"}),
    );
    let mut now = Vec::new();
    if let Some(status) = ed.and_then(|e| e.status.as_ref()) {
        for (name, m) in &status.modules {
            let entry = json!({"runtimeStatus": m.runtime_status, "type": "docker"});
            if name == translate::EDGE_HUB {
                system.insert(name.clone(), entry);
            } else {
                modules.insert(name.clone(), entry);
                now.push(name.clone());
            }
        }
    }
    for gone in previously.iter().filter(|p| !now.contains(p)) {
        modules.insert(gone.clone(), Value::Null);
    }
    (json!({"systemModules": system, "modules": modules}), now)
}

/// Runs the agent until `shutdown` resolves; reconnects (fresh token) on
/// any connection error with a capped backoff.
pub async fn run(
    client: Client,
    cfg: AgentConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(500);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = session(&client, &cfg) => {
                match r {
                    Ok(()) => backoff = Duration::from_millis(500),
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "edgeAgent link down");
                        tokio::select! {
                            _ = &mut shutdown => return Ok(()),
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("MQTT: {0}")]
    Connection(#[from] rumqttc::ConnectionError),
    #[error("MQTT client: {0}")]
    Client(#[from] rumqttc::ClientError),
    #[error("{0}")]
    Agent(#[from] AgentError),
}

/// One MQTT session, until an error or the token's renewal time.
async fn session(client: &Client, cfg: &AgentConfig) -> Result<(), SessionError> {
    let (mqtt, mut events) = connect(cfg);
    let renew_at = tokio::time::Instant::now() + TOKEN_LIFETIME * 9 / 10;
    let mut rid: u64 = 0;
    let mut next_rid = || {
        rid += 1;
        rid.to_string()
    };
    let mut get_rid: Option<String> = None;
    let mut applied_version: Option<u64> = None;
    let mut reported_modules: Vec<String> = Vec::new();
    let mut last_report = Value::Null;
    let mut status_tick = tokio::time::interval(Duration::from_secs(2));
    let eds: Api<EdgeDeployment> = Api::namespaced(client.clone(), &cfg.namespace);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(renew_at) => {
                let _ = mqtt.disconnect().await;
                return Ok(());
            }
            _ = status_tick.tick(), if applied_version.is_some() => {
                let ed = eds.get_opt(&cfg.deployment_name()).await.map_err(AgentError::from)?;
                let (report, now) = module_report(ed.as_ref(), &reported_modules);
                if report != last_report {
                    mqtt.publish(format!("$iothub/twin/PATCH/properties/reported/?$rid={}", next_rid()),
                        QoS::AtMostOnce, false, report.to_string()).await?;
                    last_report = report;
                    reported_modules = now;
                }
            }
            ev = events.poll() => match ev? {
                Event::Incoming(Packet::ConnAck(_)) => {
                    tracing::info!(hub = %cfg.gateway, "connected to the hub as {}/{}", cfg.device_id, cfg.module_id);
                    mqtt.subscribe("$iothub/twin/res/#", QoS::AtMostOnce).await?;
                    mqtt.subscribe("$iothub/twin/PATCH/properties/desired/#", QoS::AtMostOnce).await?;
                    let r = next_rid();
                    mqtt.publish(format!("$iothub/twin/GET/?$rid={r}"), QoS::AtMostOnce, false, Vec::new()).await?;
                    get_rid = Some(r);
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let topic = p.topic.as_str();
                    if topic.starts_with("$iothub/twin/PATCH/properties/desired/") {
                        // Re-read the whole twin: patches may arrive out of
                        // order with the GET, the full document cannot.
                        let r = next_rid();
                        mqtt.publish(format!("$iothub/twin/GET/?$rid={r}"), QoS::AtMostOnce, false, Vec::new()).await?;
                        get_rid = Some(r);
                    } else if let Some(rest) = topic.strip_prefix("$iothub/twin/res/") {
                        let status = rest.split('/').next().unwrap_or("");
                        let this_rid = rest.split("$rid=").nth(1).map(|r| r.split('&').next().unwrap_or(r));
                        if this_rid.is_none() || this_rid != get_rid.as_deref() {
                            continue; // an answer to a reported-properties patch
                        }
                        if status != "200" {
                            tracing::warn!(status, "twin GET refused");
                            continue;
                        }
                        let twin: Value = match serde_json::from_slice(&p.payload) {
                            Ok(t) => t,
                            Err(e) => { tracing::warn!(error = %e, "twin is not JSON"); continue; }
                        };
                        let desired = twin.get("desired").cloned().unwrap_or(Value::Null);
                        let version = desired.get("$version").and_then(Value::as_u64);
                        if version.is_some() && version == applied_version {
                            continue;
                        }
                        let outcome = deploy(client, cfg, &desired).await?;
                        let report = json!({
                            "schemaVersion": "1.1",
                            "lastDesiredVersion": outcome.version,
                            "lastDesiredStatus": {"code": outcome.code, "description": outcome.description},
                        });
                        mqtt.publish(format!("$iothub/twin/PATCH/properties/reported/?$rid={}", next_rid()),
                            QoS::AtMostOnce, false, report.to_string()).await?;
                        applied_version = Some(outcome.version);
                    }
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

    fn cfg() -> AgentConfig {
        AgentConfig::new(
            &format!("HostName=myhub.azure-devices.net;DeviceId=edge1;ModuleId=$edgeAgent;SharedAccessKey={KEY};GatewayHostName=localhost"),
            None,
            8883,
            None,
        )
        .unwrap()
    }

    #[test]
    fn connection_string_and_namespace() {
        let c = cfg();
        assert_eq!(c.gateway, "localhost");
        assert_eq!(c.namespace, "msiot-myhub-edge1");
        assert_eq!(
            device_namespace("Hub.x", "My_Edge"),
            names::sanitize("msiot-Hub-My_Edge")
        );
        assert!(AgentConfig::new("HostName=h;DeviceId=d", None, 1, None).is_err());
        assert!(
            AgentConfig::new("HostName=h;DeviceId=d;SharedAccessKey=!!", None, 1, None).is_err()
        );
    }

    #[test]
    fn sas_token_known_answer() {
        // Same construction as the hub's sas::sign known-answer test, which
        // is checked against Python's hmac; here for a module resource.
        let t = sas_token(&cfg(), 1700000000);
        assert!(t.starts_with("SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fedge1%2Fmodules%2F%24edgeAgent&sig="), "{t}");
        assert!(t.ends_with("&se=1700000000"));
    }

    #[test]
    fn undeployable_desired_properties_are_refused_with_the_reason() {
        let desired = json!({"$version": 3, "modules": {"a": {"settings": {"image": "x", "createOptions": "{bad"}}}});
        let why = spec_for(&cfg(), &desired).unwrap_err();
        assert!(
            why.contains("module \"a\"") && why.contains("not JSON"),
            "{why}"
        );
        let ok = json!({"$version": 4, "modules": {"a": {"settings": {"image": "x"}}}});
        let spec = spec_for(&cfg(), &ok).unwrap();
        assert_eq!(spec.device.device_id.as_deref(), Some("edge1"));
    }

    #[test]
    fn report_nulls_removed_modules() {
        use crate::crd::{EdgeDeploymentStatus, ModuleStatus};
        let mut ed = EdgeDeployment::new("e", EdgeDeploymentSpec::default());
        ed.status = Some(EdgeDeploymentStatus {
            modules: BTreeMap::from([
                (
                    "edgeHub".into(),
                    ModuleStatus {
                        name: "edgehub".into(),
                        runtime_status: "running".into(),
                        unsupported: vec![],
                    },
                ),
                (
                    "b".into(),
                    ModuleStatus {
                        name: "b".into(),
                        runtime_status: "backoff".into(),
                        unsupported: vec![],
                    },
                ),
            ]),
            ..Default::default()
        });
        let (report, now) = module_report(Some(&ed), &["a".into(), "b".into()]);
        assert_eq!(now, ["b"]);
        assert_eq!(report["modules"]["a"], Value::Null);
        assert_eq!(report["modules"]["b"]["runtimeStatus"], "backoff");
        assert_eq!(
            report["systemModules"]["edgeHub"]["runtimeStatus"],
            "running"
        );
    }
}
