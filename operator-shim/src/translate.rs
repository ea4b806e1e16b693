//! `EdgeDeploymentSpec` → the Kubernetes objects that run it. Pure: no I/O.
//!
//! Per module: a ServiceAccount, a Deployment (1 replica, `Recreate`: a
//! module, the hub above all with its RocksDB, must never run twice), a
//! Service when `createOptions.HostConfig.PortBindings` binds ports, a
//! PersistentVolumeClaim per named volume. What createOptions asks for and
//! Kubernetes cannot give is listed per module (status and events), never
//! dropped silently. A manifest that cannot be translated as a whole
//! (colliding names, bad createOptions JSON, unknown status) is an error:
//! the reconciler then leaves the running objects alone.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, HTTPGetAction,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SecurityContext, Service, ServiceAccount,
    ServicePort, ServiceSpec, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

use crate::crd::{EdgeDeploymentSpec, ModuleSpec};
use crate::names;

/// Label on every object: which EdgeDeployment owns it (for pruning).
pub const LABEL_DEPLOYMENT: &str = "edgehub.io/edge-deployment";
/// Label on module objects: the module's Kubernetes name.
pub const LABEL_MODULE: &str = "edgehub.io/module";
/// Annotation with the module's IoT Edge name (labels cannot hold every name).
pub const ANNOTATION_MODULE: &str = "edgehub.io/module-name";
pub const MANAGED_BY: &str = "edgehub-operator";

/// The hub's module name in IoT Edge manifests.
pub const EDGE_HUB: &str = "edgeHub";
/// Where the hub module finds its routes (the `$edgeHub` desired properties).
pub const HUB_DEPLOYMENT_PATH: &str = "/etc/edgehub/deployment.json";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TranslateError {
    #[error("modules {0:?} and {1:?} both become Kubernetes name {2:?}; rename one")]
    Collision(String, String, String),
    #[error("module {0:?}: {1}")]
    Module(String, String),
}

/// Everything one EdgeDeployment should have in its namespace.
#[derive(Debug, Default)]
pub struct Plan {
    pub deployments: Vec<Deployment>,
    pub services: Vec<Service>,
    pub service_accounts: Vec<ServiceAccount>,
    pub claims: Vec<PersistentVolumeClaim>,
    pub config_maps: Vec<ConfigMap>,
    /// IoT Edge module name → (Kubernetes name, unsupported options).
    pub modules: BTreeMap<String, (String, Vec<String>)>,
}

/// Context that does not come from the spec.
pub struct Target<'a> {
    /// The EdgeDeployment's name (labels, object names of shared things).
    pub owner: &'a str,
    pub namespace: &'a str,
    /// The hub runs already, installed by other means (the Helm chart): the
    /// `edgeHub` module gets no objects (its status still comes from the
    /// `edgehub` Deployment).
    pub external_hub: bool,
}

pub fn plan(spec: &EdgeDeploymentSpec, target: &Target) -> Result<Plan, TranslateError> {
    let mut plan = Plan::default();
    let mut taken: BTreeMap<String, String> = BTreeMap::new();
    let workloads: Vec<(&String, &ModuleSpec)> = spec
        .modules
        .iter()
        .filter(|(name, _)| !name.starts_with('$') && name.as_str() != "edgeAgent")
        .collect();
    for (name, _) in &workloads {
        let k8s = names::sanitize(name);
        if let Some(other) = taken.insert(k8s.clone(), (*name).clone()) {
            return Err(TranslateError::Collision(other, (*name).clone(), k8s));
        }
    }
    let hub_service = spec
        .modules
        .get(EDGE_HUB)
        .map(|_| names::sanitize(EDGE_HUB));
    let mut claims = BTreeSet::new();
    for (name, module) in workloads {
        let k8s = names::sanitize(name);
        if target.external_hub && name == EDGE_HUB {
            plan.modules.insert(name.clone(), (k8s, Vec::new()));
            continue;
        }
        let built = module_objects(name, &k8s, module, spec, target, hub_service.as_deref())
            .map_err(|why| TranslateError::Module(name.clone(), why))?;
        plan.service_accounts.push(built.service_account);
        plan.deployments.push(built.deployment);
        plan.services.extend(built.service);
        claims.extend(built.claims);
        plan.modules.insert(name.clone(), (k8s, built.unsupported));
    }
    for claim in claims {
        plan.claims.push(PersistentVolumeClaim {
            metadata: meta(&claim, target, None),
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                storage_class_name: spec.storage.storage_class_name.clone(),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".to_owned(),
                        Quantity(spec.storage.size.clone()),
                    )])),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    if let (Some(hub), Some(settings), false) = (&hub_service, &spec.edge_hub, target.external_hub)
    {
        let json =
            serde_json::to_string_pretty(&hub_deployment(settings)).expect("settings serialise");
        plan.config_maps.push(ConfigMap {
            metadata: meta(&format!("{hub}-deployment"), target, Some(hub)),
            data: Some(BTreeMap::from([("deployment.json".to_owned(), json)])),
            ..Default::default()
        });
    }
    Ok(plan)
}

/// The hub's deployment file: the EdgeDeployment's `edgeHub` settings with
/// what IoT Edge requires of `$edgeHub` filled in where the resource leaves
/// it out (schema 1.1, IoT Edge's default time-to-live of two hours).
fn hub_deployment(settings: &crate::crd::EdgeHubSettings) -> crate::crd::EdgeHubSettings {
    let mut s = settings.clone();
    s.schema_version.get_or_insert_with(|| "1.1".to_owned());
    let saf = s
        .store_and_forward_configuration
        .get_or_insert_with(Default::default);
    saf.time_to_live_secs.get_or_insert(7200);
    s
}

fn meta(name: &str, target: &Target, module: Option<&str>) -> ObjectMeta {
    let mut labels = BTreeMap::from([
        (
            "app.kubernetes.io/managed-by".to_owned(),
            MANAGED_BY.to_owned(),
        ),
        (
            LABEL_DEPLOYMENT.to_owned(),
            names::label_value(target.owner),
        ),
    ]);
    if let Some(m) = module {
        labels.insert(LABEL_MODULE.to_owned(), m.to_owned());
        labels.insert("app.kubernetes.io/name".to_owned(), m.to_owned());
    }
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(target.namespace.to_owned()),
        labels: Some(labels),
        ..Default::default()
    }
}

struct ModuleObjects {
    deployment: Deployment,
    service_account: ServiceAccount,
    service: Option<Service>,
    claims: Vec<String>,
    unsupported: Vec<String>,
}

/// The parts of Docker's create options that have a Kubernetes meaning.
#[derive(Default)]
struct CreateOptions {
    env: Vec<(String, String)>,
    cmd: Option<Vec<String>>,
    entrypoint: Option<Vec<String>>,
    working_dir: Option<String>,
    /// (container port, protocol) from ExposedPorts and PortBindings.
    container_ports: BTreeSet<(i32, String)>,
    /// (host port, container port, protocol).
    bindings: BTreeSet<(i32, i32, String)>,
    /// (volume name, mount path, read only).
    volumes: Vec<(String, String, bool)>,
    privileged: bool,
    memory: Option<i64>,
    nano_cpus: Option<i64>,
    unsupported: Vec<String>,
}

fn port_key(key: &str) -> Result<(i32, String), String> {
    let (port, proto) = key.split_once('/').unwrap_or((key, "tcp"));
    let port: i32 = port
        .parse()
        .ok()
        .filter(|p| (1..=65535).contains(p))
        .ok_or_else(|| format!("port {key:?} is not a port number"))?;
    let proto = match proto.to_ascii_lowercase().as_str() {
        "tcp" => "TCP",
        "udp" => "UDP",
        "sctp" => "SCTP",
        other => return Err(format!("port {key:?}: unknown protocol {other:?}")),
    };
    Ok((port, proto.to_owned()))
}

fn strings(v: &Value, what: &str) -> Result<Vec<String>, String> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| format!("{what} must be strings"))
            })
            .collect(),
        _ => Err(format!("{what} must be a string or a list of strings")),
    }
}

fn parse_create_options(text: &str) -> Result<CreateOptions, String> {
    let doc: Value =
        serde_json::from_str(text).map_err(|e| format!("createOptions is not JSON: {e}"))?;
    let obj = doc
        .as_object()
        .ok_or("createOptions must be a JSON object")?;
    let mut out = CreateOptions::default();
    for (key, value) in obj {
        match key.as_str() {
            "Env" => {
                for e in strings(value, "Env")? {
                    let (k, v) = e.split_once('=').unwrap_or((&e, ""));
                    out.env.push((k.to_owned(), v.to_owned()));
                }
            }
            "Cmd" => out.cmd = Some(strings(value, "Cmd")?),
            "Entrypoint" => out.entrypoint = Some(strings(value, "Entrypoint")?),
            "WorkingDir" => out.working_dir = value.as_str().map(str::to_owned),
            "ExposedPorts" => {
                for port in value
                    .as_object()
                    .ok_or("ExposedPorts must be an object")?
                    .keys()
                {
                    out.container_ports.insert(port_key(port)?);
                }
            }
            "Labels" => {} // pod labels are ours; Docker labels carry no behaviour
            "HostConfig" => host_config(value, &mut out)?,
            other => out.unsupported.push(other.to_owned()),
        }
    }
    Ok(out)
}

fn host_config(value: &Value, out: &mut CreateOptions) -> Result<(), String> {
    let hc = value.as_object().ok_or("HostConfig must be an object")?;
    for (key, value) in hc {
        match key.as_str() {
            "PortBindings" => {
                let b = value.as_object().ok_or("PortBindings must be an object")?;
                for (port, hosts) in b {
                    let (container, proto) = port_key(port)?;
                    out.container_ports.insert((container, proto.clone()));
                    let hosts = hosts.as_array().cloned().unwrap_or_default();
                    if hosts.is_empty() {
                        out.bindings.insert((container, container, proto.clone()));
                    }
                    for h in hosts {
                        let host = match h.get("HostPort") {
                            Some(Value::String(s)) if !s.is_empty() => s
                                .parse::<i32>()
                                .map_err(|_| format!("HostPort {s:?} is not a port number"))?,
                            Some(Value::Number(n)) => n.as_i64().unwrap_or(0) as i32,
                            _ => container,
                        };
                        if !(1..=65535).contains(&host) {
                            return Err(format!("HostPort {host} is not a port number"));
                        }
                        if h.get("HostIp")
                            .and_then(Value::as_str)
                            .is_some_and(|ip| !ip.is_empty())
                        {
                            out.unsupported
                                .push(format!("HostConfig.PortBindings.{port}.HostIp"));
                        }
                        out.bindings.insert((host, container, proto.clone()));
                    }
                }
            }
            "Binds" => {
                for bind in strings(value, "Binds")? {
                    let parts: Vec<&str> = bind.split(':').collect();
                    match parts.as_slice() {
                        [src, dst, rest @ ..] if !src.starts_with('/') && dst.starts_with('/') => {
                            let ro = rest.first().is_some_and(|o| o.split(',').any(|o| o == "ro"));
                            out.volumes.push((src.to_string(), dst.to_string(), ro));
                        }
                        _ => out.unsupported.push(format!(
                            "HostConfig.Binds {bind:?} (host paths do not exist on a cluster; use a named volume)"
                        )),
                    }
                }
            }
            "Mounts" => {
                for m in value.as_array().ok_or("Mounts must be a list")? {
                    let ty = m.get("Type").and_then(Value::as_str).unwrap_or("volume");
                    let (src, dst) = (
                        m.get("Source").and_then(Value::as_str),
                        m.get("Target").and_then(Value::as_str),
                    );
                    match (ty, src, dst) {
                        ("volume", Some(src), Some(dst)) if !src.is_empty() => {
                            let ro = m.get("ReadOnly").and_then(Value::as_bool).unwrap_or(false);
                            out.volumes.push((src.to_owned(), dst.to_owned(), ro));
                        }
                        _ => out.unsupported.push(format!(
                            "HostConfig.Mounts entry of type {ty:?} (only named volumes)"
                        )),
                    }
                }
            }
            "Privileged" => out.privileged = value.as_bool().unwrap_or(false),
            "Memory" => out.memory = value.as_i64().filter(|m| *m > 0),
            "NanoCpus" => out.nano_cpus = value.as_i64().filter(|c| *c > 0),
            "RestartPolicy" | "LogConfig" => {} // Kubernetes' own restart and logging apply
            other => out.unsupported.push(format!("HostConfig.{other}")),
        }
    }
    Ok(())
}

/// Management API port inside the hub's pod (probes, metrics).
pub const HUB_MANAGEMENT_PORT: i32 = 8080;
pub const HUB_MQTTS_PORT: i32 = 8883;
pub const HUB_AMQPS_PORT: i32 = 5671;

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(HUB_MANAGEMENT_PORT),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

/// What the hub module needs whatever its createOptions say: its data on a
/// claim (RocksDB; `Recreate` keeps it to one writer), MQTTS exposed, the
/// management API reachable for probes, its identity.
fn hub_defaults(
    opts: &mut CreateOptions,
    env: &mut BTreeMap<String, String>,
    spec: &EdgeDeploymentSpec,
    k8s: &str,
    target: &Target,
) {
    if !opts.volumes.iter().any(|(_, dst, _)| dst == "/data") {
        opts.volumes
            .push(("edgehub-data".into(), "/data".into(), false));
    }
    opts.container_ports
        .insert((HUB_MANAGEMENT_PORT, "TCP".into()));
    // Devices dial these whatever the manifest binds (the SDKs know no
    // other ports), so the hub's Service always has them.
    for port in [HUB_MQTTS_PORT, HUB_AMQPS_PORT] {
        opts.container_ports.insert((port, "TCP".into()));
        if !opts.bindings.iter().any(|(_, c, _)| *c == port) {
            opts.bindings.insert((port, port, "TCP".into()));
        }
    }
    let gateway = spec
        .device
        .gateway_hostname
        .clone()
        .unwrap_or_else(|| format!("{k8s}.{}.svc", target.namespace));
    for (k, v) in [
        ("EDGEHUB_DATA_DIR", "/data".to_owned()),
        ("EDGEHUB_MQTTS_LISTEN", format!("0.0.0.0:{HUB_MQTTS_PORT}")),
        ("EDGEHUB_AMQPS_LISTEN", format!("0.0.0.0:{HUB_AMQPS_PORT}")),
        (
            "EDGEHUB_MANAGEMENT_LISTEN",
            format!("0.0.0.0:{HUB_MANAGEMENT_PORT}"),
        ),
        ("EDGEHUB_HOSTNAME", gateway),
    ] {
        // The manifest's own env may override these.
        env.entry(k.into()).or_insert(v);
    }
    if let Some(d) = &spec.device.device_id {
        env.entry("EDGEHUB_DEVICE_ID".into())
            .or_insert_with(|| d.clone());
    }
}

fn module_objects(
    name: &str,
    k8s: &str,
    module: &ModuleSpec,
    spec: &EdgeDeploymentSpec,
    target: &Target,
    hub_service: Option<&str>,
) -> Result<ModuleObjects, String> {
    let mut opts = match &module.settings.create_options {
        Some(text) if !text.trim().is_empty() => parse_create_options(text)?,
        _ => CreateOptions::default(),
    };
    if let Some(t) = module.module_type.as_deref().filter(|t| *t != "docker") {
        return Err(format!("type {t:?} is not supported (only docker)"));
    }
    let replicas = match module.status.as_deref().unwrap_or("running") {
        "running" => 1,
        "stopped" => 0,
        other => return Err(format!("status {other:?} is neither running nor stopped")),
    };
    match module.restart_policy.as_deref().unwrap_or("always") {
        "always" | "on-unhealthy" => {}
        p @ ("on-failure" | "never") => opts.unsupported.push(format!(
            "restartPolicy {p:?} (pods of a Deployment always restart)"
        )),
        other => return Err(format!("restartPolicy {other:?} is not an IoT Edge policy")),
    }
    let pull = match module.image_pull_policy.as_deref().unwrap_or("on-create") {
        "on-create" => "IfNotPresent",
        "never" => "Never",
        other => {
            return Err(format!(
                "imagePullPolicy {other:?} is neither on-create nor never"
            ))
        }
    };

    // IoT Edge's module environment first, then createOptions.Env, then
    // `env` (the manifest's `env` wins over createOptions, as in IoT Edge).
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let device = &spec.device;
    if let Some(d) = &device.device_id {
        env.insert("IOTEDGE_DEVICEID".into(), d.clone());
    }
    if let Some(h) = &device.iothub_hostname {
        env.insert("IOTEDGE_IOTHUBHOSTNAME".into(), h.clone());
    }
    let gateway = device
        .gateway_hostname
        .clone()
        .or_else(|| hub_service.map(|svc| format!("{svc}.{}.svc", target.namespace)));
    if let (Some(g), false) = (gateway, name == EDGE_HUB) {
        env.insert("IOTEDGE_GATEWAYHOSTNAME".into(), g);
    }
    env.insert("IOTEDGE_MODULEID".into(), name.to_owned());
    env.insert("IOTEDGE_AUTHSCHEME".into(), "sasToken".into());
    for (k, v) in &opts.env {
        env.insert(k.clone(), v.clone());
    }
    for (k, v) in &module.env {
        env.insert(k.clone(), v.value.clone());
    }

    let is_hub = name == EDGE_HUB;
    if is_hub {
        hub_defaults(&mut opts, &mut env, spec, k8s, target);
    }

    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    let mut claims = Vec::new();
    let mut seen = BTreeSet::new();
    for (src, dst, ro) in &opts.volumes {
        let claim = names::sanitize(src);
        if seen.insert(claim.clone()) {
            volumes.push(Volume {
                name: claim.clone(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.clone(),
                    read_only: None,
                }),
                ..Default::default()
            });
        }
        mounts.push(VolumeMount {
            name: claim.clone(),
            mount_path: dst.clone(),
            read_only: ro.then_some(true),
            ..Default::default()
        });
        claims.push(claim);
    }
    if name == EDGE_HUB && spec.edge_hub.is_some() {
        let cm = format!("{k8s}-deployment");
        volumes.push(Volume {
            name: "edgehub-deployment".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: cm,
                ..Default::default()
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: "edgehub-deployment".into(),
            mount_path: "/etc/edgehub".into(),
            read_only: Some(true),
            ..Default::default()
        });
        env.insert("EDGEHUB_ROUTES".into(), HUB_DEPLOYMENT_PATH.into());
    }

    let mut limits = BTreeMap::new();
    if let Some(m) = opts.memory {
        limits.insert("memory".to_owned(), Quantity(m.to_string()));
    }
    if let Some(c) = opts.nano_cpus {
        limits.insert(
            "cpu".to_owned(),
            Quantity(format!("{}m", (c / 1_000_000).max(1))),
        );
    }
    let container = Container {
        name: k8s.to_owned(),
        image: Some(module.settings.image.clone()),
        image_pull_policy: Some(pull.to_owned()),
        command: opts.entrypoint.clone(),
        args: opts.cmd.clone(),
        working_dir: opts.working_dir.clone(),
        env: Some(
            env.into_iter()
                .map(|(name, value)| EnvVar {
                    name,
                    value: Some(value),
                    ..Default::default()
                })
                .collect(),
        ),
        ports: (!opts.container_ports.is_empty()).then(|| {
            opts.container_ports
                .iter()
                .map(|(port, proto)| ContainerPort {
                    container_port: *port,
                    // Always explicit: 1.20's server-side apply refuses a
                    // port list entry without its key field `protocol`.
                    protocol: Some(proto.clone()),
                    ..Default::default()
                })
                .collect()
        }),
        volume_mounts: (!mounts.is_empty()).then_some(mounts),
        readiness_probe: is_hub.then(|| probe("/readyz", 5, 3)),
        liveness_probe: is_hub.then(|| Probe {
            // Opening a large store takes seconds, not minutes.
            initial_delay_seconds: Some(10),
            ..probe("/healthz", 10, 6)
        }),
        security_context: opts.privileged.then(|| SecurityContext {
            privileged: Some(true),
            ..Default::default()
        }),
        resources: (!limits.is_empty()).then(|| ResourceRequirements {
            limits: Some(limits),
            ..Default::default()
        }),
        ..Default::default()
    };

    let mut deployment_meta = meta(k8s, target, Some(k8s));
    deployment_meta.annotations = Some(BTreeMap::from([(
        ANNOTATION_MODULE.to_owned(),
        name.to_owned(),
    )]));
    let selector = BTreeMap::from([(LABEL_MODULE.to_owned(), k8s.to_owned())]);
    let pod_labels = deployment_meta.labels.clone();
    let deployment = Deployment {
        metadata: deployment_meta,
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                ..Default::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("Recreate".into()),
                ..Default::default()
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: pod_labels,
                    annotations: Some(BTreeMap::from([(
                        ANNOTATION_MODULE.to_owned(),
                        name.to_owned(),
                    )])),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(k8s.to_owned()),
                    containers: vec![container],
                    volumes: (!volumes.is_empty()).then_some(volumes),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    };
    let service = (!opts.bindings.is_empty()).then(|| Service {
        metadata: meta(k8s, target, Some(k8s)),
        spec: Some(ServiceSpec {
            type_: Some(spec.service_type.as_str().to_owned()),
            selector: Some(selector),
            ports: Some(
                opts.bindings
                    .iter()
                    .map(|(host, container, proto)| ServicePort {
                        name: Some(format!("{}-{host}", proto.to_ascii_lowercase())),
                        port: *host,
                        target_port: Some(IntOrString::Int(*container)),
                        protocol: Some(proto.clone()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    });
    Ok(ModuleObjects {
        deployment,
        service_account: ServiceAccount {
            metadata: meta(k8s, target, Some(k8s)),
            ..Default::default()
        },
        service,
        claims,
        unsupported: opts.unsupported,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{EdgeHubSettings, ModuleSettings};

    const T: Target = Target {
        owner: "dep1",
        namespace: "msiot-hub-dev",
        external_hub: false,
    };

    fn module(image: &str, create: &str) -> ModuleSpec {
        ModuleSpec {
            settings: ModuleSettings {
                image: image.into(),
                create_options: Some(create.into()),
            },
            ..Default::default()
        }
    }

    fn spec(modules: &[(&str, ModuleSpec)]) -> EdgeDeploymentSpec {
        EdgeDeploymentSpec {
            modules: modules
                .iter()
                .map(|(n, m)| (n.to_string(), m.clone()))
                .collect(),
            ..Default::default()
        }
    }

    fn env_of(d: &Deployment) -> BTreeMap<String, String> {
        d.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone().unwrap()))
            .collect()
    }

    #[test]
    fn hub_module_gets_service_env_routes_and_volume() {
        let mut s = spec(&[(
            "edgeHub",
            module(
                "edgehub:dev",
                r#"{"HostConfig":{"PortBindings":{"8883/tcp":[{"HostPort":"8883"}],"443/tcp":[{"HostPort":"443"}]},
                    "Binds":["edgehub-data:/data"]}}"#,
            ),
        )]);
        s.device.device_id = Some("edge1".into());
        s.edge_hub = Some(EdgeHubSettings::default());
        let p = plan(&s, &T).unwrap();
        assert_eq!(p.modules["edgeHub"].0, "edgehub");
        let d = &p.deployments[0];
        let ds = d.spec.as_ref().unwrap();
        assert_eq!(ds.replicas, Some(1));
        assert_eq!(
            ds.strategy.as_ref().unwrap().type_.as_deref(),
            Some("Recreate")
        );
        let env = env_of(d);
        assert_eq!(env["IOTEDGE_DEVICEID"], "edge1");
        assert_eq!(env["IOTEDGE_MODULEID"], "edgeHub");
        assert_eq!(env["EDGEHUB_ROUTES"], HUB_DEPLOYMENT_PATH);
        assert!(!env.contains_key("IOTEDGE_GATEWAYHOSTNAME"));
        let svc = p.services[0].spec.as_ref().unwrap();
        let ports: Vec<_> = svc
            .ports
            .iter()
            .flatten()
            .map(|p| (p.port, p.target_port.clone(), p.protocol.clone()))
            .collect();
        assert_eq!(
            ports,
            [
                (443, Some(IntOrString::Int(443)), Some("TCP".into())),
                (5671, Some(IntOrString::Int(5671)), Some("TCP".into())),
                (8883, Some(IntOrString::Int(8883)), Some("TCP".into()))
            ]
        );
        assert_eq!(svc.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(p.claims[0].metadata.name.as_deref(), Some("edgehub-data"));
        assert_eq!(
            p.config_maps[0].metadata.name.as_deref(),
            Some("edgehub-deployment")
        );
        // What IoT Edge requires of $edgeHub is filled in when left out.
        let file: serde_json::Value =
            serde_json::from_str(&p.config_maps[0].data.as_ref().unwrap()["deployment.json"])
                .unwrap();
        assert_eq!(file["schemaVersion"], "1.1");
        assert_eq!(file["storeAndForwardConfiguration"]["timeToLiveSecs"], 7200);
        assert_eq!(p.service_accounts.len(), 1);
    }

    #[test]
    fn module_env_ports_and_unsupported_options() {
        let mut m = module(
            "sensor:1",
            r#"{"Env":["A=1","B=2"],"Cmd":["--fast"],"ExposedPorts":{"9000/udp":{}},
                "HostConfig":{"PortBindings":{"8080/tcp":[{"HostPort":"80"}]},"Binds":["/dev/ttyS0:/dev/ttyS0"],
                "CapAdd":["NET_ADMIN"],"Memory":134217728},"NetworkingConfig":{}}"#,
        );
        m.env
            .insert("B".into(), crate::crd::EnvValue { value: "3".into() });
        m.restart_policy = Some("never".into());
        let s = spec(&[("edgeHub", module("hub", "{}")), ("my_sensor", m)]);
        let p = plan(&s, &T).unwrap();
        let (k8s, unsupported) = &p.modules["my_sensor"];
        assert!(k8s.starts_with("my-sensor-"), "{k8s}");
        assert_eq!(
            unsupported
                .iter()
                .map(|u| u.split(' ').next().unwrap())
                .collect::<Vec<_>>(),
            [
                "HostConfig.Binds",
                "HostConfig.CapAdd",
                "NetworkingConfig",
                "restartPolicy"
            ]
        );
        let d = p
            .deployments
            .iter()
            .find(|d| d.metadata.name.as_deref() == Some(k8s))
            .unwrap();
        let env = env_of(d);
        assert_eq!((env["A"].as_str(), env["B"].as_str()), ("1", "3"));
        assert_eq!(env["IOTEDGE_GATEWAYHOSTNAME"], "edgehub.msiot-hub-dev.svc");
        let c = &d
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0];
        assert_eq!(c.args, Some(vec!["--fast".to_owned()]));
        assert_eq!(
            c.resources.as_ref().unwrap().limits.as_ref().unwrap()["memory"],
            Quantity("134217728".into())
        );
        let ports: Vec<_> = c
            .ports
            .iter()
            .flatten()
            .map(|p| (p.container_port, p.protocol.clone().unwrap()))
            .collect();
        assert_eq!(ports, [(8080, "TCP".to_owned()), (9000, "UDP".to_owned())]);
        let svc = p
            .services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(k8s))
            .unwrap();
        let port = &svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.port, port.target_port.clone()),
            (80, Some(IntOrString::Int(8080)))
        );
    }

    #[test]
    fn external_hub_gets_no_objects_but_stays_a_module() {
        let mut s = spec(&[("edgeHub", module("hub", "{}")), ("m", module("x", ""))]);
        s.edge_hub = Some(EdgeHubSettings::default());
        let t = Target {
            external_hub: true,
            ..T
        };
        let p = plan(&s, &t).unwrap();
        let names: Vec<_> = p
            .deployments
            .iter()
            .map(|d| d.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["m"]);
        assert!(p.claims.is_empty() && p.config_maps.is_empty() && p.services.is_empty());
        assert_eq!(p.modules["edgeHub"].0, "edgehub");
        let env = env_of(&p.deployments[0]);
        assert_eq!(env["IOTEDGE_GATEWAYHOSTNAME"], "edgehub.msiot-hub-dev.svc");
    }

    #[test]
    fn hub_without_options_still_gets_data_probes_and_mqtts() {
        let s = spec(&[("edgeHub", module("hub", ""))]);
        let p = plan(&s, &T).unwrap();
        let c = &p.deployments[0]
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0];
        assert_eq!(c.volume_mounts.as_ref().unwrap()[0].mount_path, "/data");
        assert_eq!(p.claims[0].metadata.name.as_deref(), Some("edgehub-data"));
        let probe = c
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(probe.path.as_deref(), Some("/readyz"));
        let env = env_of(&p.deployments[0]);
        assert_eq!(env["EDGEHUB_DATA_DIR"], "/data");
        assert_eq!(env["EDGEHUB_HOSTNAME"], "edgehub.msiot-hub-dev.svc");
        let ports: Vec<i32> = p.services[0]
            .spec
            .as_ref()
            .unwrap()
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| p.port)
            .collect();
        assert_eq!(ports, [HUB_AMQPS_PORT, HUB_MQTTS_PORT]);
        assert_eq!(env["EDGEHUB_AMQPS_LISTEN"], "0.0.0.0:5671");
    }

    #[test]
    fn stopped_module_scales_to_zero_and_agent_is_skipped() {
        let mut m = module("x", "");
        m.status = Some("stopped".into());
        let s = spec(&[("edgeAgent", module("agent", "")), ("m", m)]);
        let p = plan(&s, &T).unwrap();
        assert_eq!(p.deployments.len(), 1);
        assert_eq!(p.deployments[0].spec.as_ref().unwrap().replicas, Some(0));
        assert!(p.services.is_empty());
    }

    #[test]
    fn whole_manifest_errors_name_the_module() {
        let s = spec(&[("m", module("x", "{not json"))]);
        assert!(
            matches!(plan(&s, &T), Err(TranslateError::Module(m, why)) if m == "m" && why.contains("not JSON"))
        );
        let mut bad = module("x", "");
        bad.status = Some("paused".into());
        assert!(plan(&spec(&[("m", bad)]), &T).is_err());
        let s = spec(&[(
            "m",
            module("x", r#"{"HostConfig":{"PortBindings":{"http/tcp":[]}}}"#),
        )]);
        assert!(plan(&s, &T).is_err());
    }
}
