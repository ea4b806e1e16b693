//! IoT Edge deployment manifests → `EdgeDeploymentSpec`.
//!
//! Accepts what IoT Hub holds and what `az iot edge set-modules` takes: a
//! whole manifest (`{"modulesContent": {"$edgeAgent": …, "$edgeHub": …}}`,
//! or `content.modulesContent`), or just the `$edgeAgent` desired
//! properties (what the `$edgeAgent` module twin receives). Values keep the
//! manifest's looseness: `createOptions` may be an object or a string and
//! may be split over `createOptions01…`, env values may be numbers.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::crd::{EdgeDeploymentSpec, EdgeHubSettings, EnvValue, ModuleSettings, ModuleSpec};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ManifestError {
    #[error("{0}")]
    Invalid(String),
}

fn invalid(s: impl Into<String>) -> ManifestError {
    ManifestError::Invalid(s.into())
}

/// The `$edgeAgent` and `$edgeHub` desired properties of a manifest, in
/// whichever of the accepted shapes it came.
pub fn split(doc: &Value) -> (Option<&Value>, Option<&Value>) {
    let content = doc
        .get("content")
        .and_then(|c| c.get("modulesContent"))
        .or_else(|| doc.get("modulesContent"));
    match content {
        Some(c) => (
            c.get("$edgeAgent")
                .and_then(|a| a.get("properties.desired")),
            c.get("$edgeHub").and_then(|h| h.get("properties.desired")),
        ),
        // Bare `$edgeAgent` desired properties (the module twin's view).
        None => (Some(doc), None),
    }
}

/// A manifest (any accepted shape) as the spec of an EdgeDeployment.
pub fn spec_from_manifest(doc: &Value) -> Result<EdgeDeploymentSpec, ManifestError> {
    let (agent, hub) = split(doc);
    let agent = agent.ok_or_else(|| invalid("manifest has no $edgeAgent desired properties"))?;
    let mut spec = spec_from_edge_agent(agent)?;
    if let Some(hub) = hub {
        spec.edge_hub = Some(
            serde_json::from_value::<EdgeHubSettings>(hub.clone())
                .map_err(|e| invalid(format!("$edgeHub desired properties: {e}")))?,
        );
    }
    Ok(spec)
}

/// `$edgeAgent` desired properties → spec: `systemModules.edgeHub` and every
/// entry of `modules` (edgeAgent itself is this operator, so it is skipped).
pub fn spec_from_edge_agent(desired: &Value) -> Result<EdgeDeploymentSpec, ManifestError> {
    let desired = desired
        .as_object()
        .ok_or_else(|| invalid("$edgeAgent desired properties must be an object"))?;
    let mut modules = BTreeMap::new();
    if let Some(system) = desired.get("systemModules") {
        let system = system
            .as_object()
            .ok_or_else(|| invalid("systemModules must be an object"))?;
        if let Some(hub) = system.get("edgeHub") {
            modules.insert("edgeHub".to_owned(), module("edgeHub", hub)?);
        }
    }
    if let Some(user) = desired.get("modules") {
        let user = user
            .as_object()
            .ok_or_else(|| invalid("modules must be an object"))?;
        for (name, m) in user {
            if modules.contains_key(name) {
                return Err(invalid(format!(
                    "module {name:?} is both a system module and a module"
                )));
            }
            modules.insert(name.clone(), module(name, m)?);
        }
    }
    Ok(EdgeDeploymentSpec {
        modules,
        ..Default::default()
    })
}

fn module(name: &str, m: &Value) -> Result<ModuleSpec, ManifestError> {
    let at = |what: &str| invalid(format!("module {name:?}: {what}"));
    let obj = m.as_object().ok_or_else(|| at("must be an object"))?;
    let text = |key: &str| -> Result<Option<String>, ManifestError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(at(&format!("{key} must be a string"))),
        }
    };
    let settings = obj
        .get("settings")
        .and_then(Value::as_object)
        .ok_or_else(|| at("settings with an image are required"))?;
    let image = settings
        .get("image")
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| at("settings.image is required"))?;
    let env = match obj.get("env") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Object(env)) => env
            .iter()
            .map(|(k, v)| {
                let value = match v.get("value") {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Number(n)) => n.to_string(),
                    Some(Value::Bool(b)) => b.to_string(),
                    _ => return Err(at(&format!("env {k:?} needs a value"))),
                };
                Ok((k.clone(), EnvValue { value }))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(at("env must be an object")),
    };
    Ok(ModuleSpec {
        module_type: text("type")?,
        version: text("version")?,
        status: text("status")?,
        restart_policy: text("restartPolicy")?,
        image_pull_policy: text("imagePullPolicy")?,
        startup_order: obj
            .get("startupOrder")
            .and_then(Value::as_u64)
            .map(|n| n as u32),
        settings: ModuleSettings {
            image: image.to_owned(),
            create_options: create_options(settings).map_err(|e| at(&e))?,
        },
        env,
    })
}

/// `createOptions` as one JSON string: IoT Edge splits long ones over
/// `createOptions01`, `createOptions02`, … (concatenated in order), and
/// hand-written manifests often give an object.
fn create_options(settings: &Map<String, Value>) -> Result<Option<String>, String> {
    let mut text = match settings.get("createOptions") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s.clone(),
        Some(v @ Value::Object(_)) => v.to_string(),
        Some(_) => return Err("settings.createOptions must be a JSON string or object".into()),
    };
    for i in 1..100 {
        match settings.get(&format!("createOptions{i:02}")) {
            Some(Value::String(s)) => text.push_str(s),
            _ => break,
        }
    }
    Ok(Some(text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn manifest() -> Value {
        json!({"modulesContent": {
            "$edgeAgent": {"properties.desired": {
                "schemaVersion": "1.1",
                "runtime": {"type": "docker", "settings": {}},
                "systemModules": {
                    "edgeAgent": {"type": "docker", "settings": {"image": "mcr.microsoft.com/azureiotedge-agent:1.4"}},
                    "edgeHub": {"type": "docker", "status": "running", "restartPolicy": "always",
                        "settings": {"image": "edgehub:dev", "createOptions":
                            "{\"HostConfig\":{\"PortBindings\":{\"8883/tcp\":[{\"HostPort\":\"8883\"}]}}}"}}
                },
                "modules": {
                    "SimulatedTemperatureSensor": {"version": "1.0", "type": "docker", "status": "running",
                        "restartPolicy": "always",
                        "settings": {"image": "sensor:1", "createOptions": "{\"Env\":[\"A=",
                            "createOptions01": "1\"]}"},
                        "env": {"MessageCount": {"value": 500}, "Mode": {"value": "fast"}}}
                }
            }},
            "$edgeHub": {"properties.desired": {
                "schemaVersion": "1.1",
                "routes": {"up": "FROM /messages/* INTO $upstream"},
                "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}
            }}
        }})
    }

    #[test]
    fn whole_manifest_becomes_spec() {
        let spec = spec_from_manifest(&manifest()).unwrap();
        assert_eq!(
            spec.modules.keys().collect::<Vec<_>>(),
            ["SimulatedTemperatureSensor", "edgeHub"]
        );
        let sensor = &spec.modules["SimulatedTemperatureSensor"];
        assert_eq!(sensor.settings.image, "sensor:1");
        assert_eq!(
            sensor.settings.create_options.as_deref(),
            Some("{\"Env\":[\"A=1\"]}")
        );
        assert_eq!(sensor.env["MessageCount"].value, "500");
        let hub = spec.edge_hub.unwrap();
        assert_eq!(hub.routes["up"], json!("FROM /messages/* INTO $upstream"));
        assert_eq!(
            hub.store_and_forward_configuration
                .unwrap()
                .time_to_live_secs,
            Some(7200)
        );
    }

    #[test]
    fn edge_agent_desired_alone_is_accepted() {
        let doc = manifest();
        let agent = &doc["modulesContent"]["$edgeAgent"]["properties.desired"];
        let spec = spec_from_manifest(agent).unwrap();
        assert_eq!(spec.modules.len(), 2);
        assert!(spec.edge_hub.is_none());
    }

    #[test]
    fn bad_modules_are_refused_by_name() {
        let doc = json!({"modules": {"m1": {"settings": {}}}});
        assert_eq!(
            spec_from_manifest(&doc).unwrap_err().to_string(),
            "module \"m1\": settings.image is required"
        );
        let doc = json!({"modules": {"m1": {"settings": {"image": "x", "createOptions": 3}}}});
        assert!(spec_from_manifest(&doc)
            .unwrap_err()
            .to_string()
            .contains("createOptions must be"));
        let doc = json!({"modules": {"m1": {"settings": {"image": "x"}, "env": {"A": {}}}}});
        assert!(spec_from_manifest(&doc)
            .unwrap_err()
            .to_string()
            .contains("env \"A\" needs a value"));
        assert!(spec_from_manifest(&json!([])).is_err());
    }
}
