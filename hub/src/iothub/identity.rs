//! Devices and modules with their symmetric keys. Ids compare
//! case-insensitively, as in edgeHub.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("reading identities file {path}: {detail}")]
    Read { path: String, detail: String },
    #[error("identities file {path}: {detail}")]
    Invalid { path: String, detail: String },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileSpec {
    iothub_hostname: Option<String>,
    devices: Vec<DeviceSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DeviceSpec {
    device_id: String,
    primary_key: String,
    secondary_key: Option<String>,
    #[serde(default)]
    modules: Vec<ModuleSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ModuleSpec {
    module_id: String,
    primary_key: String,
    secondary_key: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Keys {
    pub primary: String,
    pub secondary: Option<String>,
}

impl Keys {
    pub fn all(&self) -> Vec<&str> {
        std::iter::once(self.primary.as_str())
            .chain(self.secondary.as_deref())
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct Device {
    pub id: String,
    pub keys: Keys,
    pub modules: HashMap<String, (String, Keys)>,
}

/// The identity registry and the host names tokens may be issued for.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    pub iothub_hostname: Option<String>,
    devices: HashMap<String, Device>,
}

fn check_key(path: &str, who: &str, key: &str) -> Result<(), IdentityError> {
    use base64::Engine;
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(k) if !k.is_empty() => Ok(()),
        _ => Err(IdentityError::Invalid {
            path: path.into(),
            detail: format!("{who}: key is not base64"),
        }),
    }
}

impl Registry {
    /// Loads `{"iothubHostname": …, "devices": [{"deviceId", "primaryKey",
    /// "secondaryKey"?, "modules": [{"moduleId", "primaryKey", "secondaryKey"?}]}]}`.
    pub fn load(path: &Path) -> Result<Registry, IdentityError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| IdentityError::Read {
            path: p.clone(),
            detail: e.to_string(),
        })?;
        let spec: FileSpec = serde_json::from_str(&text).map_err(|e| IdentityError::Invalid {
            path: p.clone(),
            detail: e.to_string(),
        })?;
        let mut reg = Registry {
            iothub_hostname: spec.iothub_hostname,
            devices: HashMap::new(),
        };
        for d in spec.devices {
            check_key(&p, &d.device_id, &d.primary_key)?;
            let mut modules = HashMap::new();
            for m in d.modules {
                let who = format!("{}/{}", d.device_id, m.module_id);
                check_key(&p, &who, &m.primary_key)?;
                modules.insert(
                    m.module_id.to_lowercase(),
                    (
                        m.module_id,
                        Keys {
                            primary: m.primary_key,
                            secondary: m.secondary_key,
                        },
                    ),
                );
            }
            let key = d.device_id.to_lowercase();
            if reg.devices.contains_key(&key) {
                return Err(IdentityError::Invalid {
                    path: p,
                    detail: format!("device {} listed twice", d.device_id),
                });
            }
            reg.devices.insert(
                key,
                Device {
                    id: d.device_id,
                    keys: Keys {
                        primary: d.primary_key,
                        secondary: d.secondary_key,
                    },
                    modules,
                },
            );
        }
        Ok(reg)
    }

    /// The device a module named `module` belongs to, as (device id, module
    /// id) spelled as registered. Routes name modules without a device
    /// (`BrokeredEndpoint("/modules/m/inputs/i")`): they are the edge
    /// device's; with several candidates the first device id in order wins.
    pub fn module_owner(&self, module: &str) -> Option<(String, String)> {
        let mut owners: Vec<(String, String)> = self
            .devices
            .values()
            .filter_map(|d| {
                d.modules
                    .values()
                    .find(|(id, _)| id.eq_ignore_ascii_case(module))
                    .map(|(id, _)| (d.id.clone(), id.clone()))
            })
            .collect();
        owners.sort();
        owners.into_iter().next()
    }

    pub fn device(&self, id: &str) -> Option<&Device> {
        self.devices.get(&id.to_lowercase())
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }
}
