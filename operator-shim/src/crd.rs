//! The `EdgeDeployment` custom resource: an IoT Edge deployment manifest in
//! Kubernetes clothes.
//!
//! Group and version are IoT Edge's own (`microsoft.azure.devices.edge/v1`,
//! kind `EdgeDeployment`), so people leaving IoT Edge's Kubernetes mode keep
//! their names. The module entries keep the `$edgeAgent` desired-property
//! shape (`settings.image`, `settings.createOptions` as a JSON string, `env`
//! as `{NAME: {value}}`, `status`, `restartPolicy`, `imagePullPolicy`), so a
//! manifest's `modules` and `systemModules` paste in unchanged.
//!
//! The CRD YAML in `deploy/` is generated from these types
//! (`edgehub-operator crd`); a test fails when the committed copy drifts.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "microsoft.azure.devices.edge";
pub const VERSION: &str = "v1";

/// The desired edge workload of one edge device: its modules (the hub,
/// `edgeHub`, among them) and the hub's routes.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "microsoft.azure.devices.edge",
    version = "v1",
    kind = "EdgeDeployment",
    namespaced,
    status = "EdgeDeploymentStatus",
    shortname = "edgedep",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct EdgeDeploymentSpec {
    /// The edge device these modules belong to (sets the `IOTEDGE_*`
    /// environment of every module).
    #[serde(default)]
    pub device: DeviceSettings,
    /// Modules by IoT Edge module name (`$edgeAgent` desired `modules` and
    /// `systemModules.edgeHub`). `$`-prefixed and `edgeAgent` entries are not
    /// workloads and are skipped.
    #[serde(default)]
    pub modules: BTreeMap<String, ModuleSpec>,
    /// The `$edgeHub` desired properties (routes, store and forward). When
    /// present they reach the `edgeHub` module as its deployment file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge_hub: Option<EdgeHubSettings>,
    /// How ports bound in `createOptions.HostConfig.PortBindings` are exposed.
    #[serde(default)]
    pub service_type: ServiceType,
    /// Claims made for named volumes.
    #[serde(default)]
    pub storage: StorageSettings,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeviceSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iothub_hostname: Option<String>,
    /// What modules put in `GatewayHostName`; defaults to the hub module's
    /// Service name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_hostname: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModuleSpec {
    /// Only `docker` (the only type IoT Edge has).
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub module_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// `running` (default) or `stopped` (the Deployment is scaled to 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// `always` (default), `on-unhealthy`, `on-failure`, `never`. Pods of a
    /// Deployment always restart, so the last two are reported unsupported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_policy: Option<String>,
    /// `on-create` (default: IfNotPresent) or `never` (Never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_order: Option<u32>,
    pub settings: ModuleSettings,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, EnvValue>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModuleSettings {
    pub image: String,
    /// Docker create options as a JSON string, as in the manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_options: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
pub struct EnvValue {
    pub value: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EdgeHubSettings {
    /// `$edgeHub` schema version; "1.1" when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_version: Option<String>,
    /// Route name → route text, or (schema 1.2) `{route, priority?,
    /// timeToLiveSecs?}`; checked by the hub itself.
    #[serde(default)]
    #[schemars(schema_with = "routes_schema")]
    pub routes: BTreeMap<String, serde_json::Value>,
    /// `timeToLiveSecs` is 7200 (IoT Edge's default) when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_and_forward_configuration: Option<StoreAndForward>,
}

fn routes_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    // A route is a string or an object; structural schemas cannot say
    // "either", so values are kept as they are and validated by the hub.
    schemars::json_schema!({
        "type": "object",
        "additionalProperties": { "x-kubernetes-preserve-unknown-fields": true }
    })
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StoreAndForward {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_to_live_secs: Option<u64>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    LoadBalancer,
    NodePort,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::LoadBalancer => "LoadBalancer",
            ServiceType::NodePort => "NodePort",
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StorageSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Requested size of each volume claim, e.g. `1Gi`.
    #[serde(default = "default_volume_size")]
    pub size: String,
}

impl Default for StorageSettings {
    fn default() -> Self {
        StorageSettings {
            storage_class_name: None,
            size: default_volume_size(),
        }
    }
}

fn default_volume_size() -> String {
    "1Gi".to_owned()
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EdgeDeploymentStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Per module (IoT Edge name): its Kubernetes name, runtime status and
    /// what of its createOptions could not be honoured.
    #[serde(default)]
    pub modules: BTreeMap<String, ModuleStatus>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub condition_type: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    // Optional, never "": a 1.20 API server takes an empty string here for
    // null and refuses it ("must be of type string").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModuleStatus {
    /// The name of its Deployment (and Service, ServiceAccount).
    pub name: String,
    /// `running`, `stopped`, `backoff` (not ready yet) or `unknown`, as
    /// IoT Edge reports `runtimeStatus`.
    pub runtime_status: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unsupported: Vec<String>,
}

/// The CRD as YAML, as applied by the chart.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let mut out = String::from(
        "# Generated by `edgehub-operator crd` from operator-shim/src/crd.rs; do not edit.\n",
    );
    out.push_str(&serde_yaml::to_string(&EdgeDeployment::crd()).expect("CRD serialises"));
    out
}
