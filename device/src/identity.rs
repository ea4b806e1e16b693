//! Devices and modules with their symmetric keys. Ids compare
//! case-insensitively, as in edgeHub.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

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

/// A device as the identities file, the store and the management API spell it.
/// It authenticates with symmetric keys (`primaryKey`, `secondaryKey`) or,
/// when `x509` is set, with a TLS client certificate (then it has no keys).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeviceSpec {
    pub device_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub primary_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509: Option<X509Spec>,
    #[serde(default)]
    pub modules: Vec<ModuleSpec>,
    /// An IoT Edge device (IoT Hub's `capabilities.iotEdge`): it may act
    /// for the devices registered under it (auth-chain connections).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub edge: bool,
    /// The edge device this one is registered under (IoT Hub's device
    /// scope): the only edge device that may act for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

/// How an X.509 device proves who it is, as IoT Hub's registry has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum X509Spec {
    /// The certificate's SHA-1 or SHA-256 thumbprint (hex) is one of these.
    #[serde(rename_all = "camelCase")]
    SelfSigned {
        primary_thumbprint: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secondary_thumbprint: Option<String>,
    },
    /// The certificate chains to the configured trust bundle and its
    /// subject CN is the device id.
    CertificateAuthority,
}

/// A thumbprint as people paste it (any case, optional `:`) → lower-case
/// hex of 40 (SHA-1) or 64 (SHA-256) digits.
pub fn normalize_thumbprint(t: &str) -> Result<String, String> {
    let hex: String = t
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if (hex.len() == 40 || hex.len() == 64) && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(hex)
    } else {
        Err(format!(
            "thumbprint {t:?} is not 40 (SHA-1) or 64 (SHA-256) hex digits"
        ))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModuleSpec {
    pub module_id: String,
    pub primary_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary_key: Option<String>,
}

/// The modules every edge device has in IoT Hub's registry.
pub const EDGE_SYSTEM_MODULES: [&str; 2] = ["$edgeAgent", "$edgeHub"];

/// A new random key, as IoT Hub generates them (32 bytes, base64).
pub fn new_key() -> String {
    use base64::Engine;
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Gives an edge device the system modules it lacks (keys generated), as
/// IoT Hub does for every edge device.
pub fn add_system_modules(spec: &mut DeviceSpec) {
    for m in EDGE_SYSTEM_MODULES {
        if !spec.modules.iter().any(|x| x.module_id == m) {
            spec.modules.push(ModuleSpec {
                module_id: m.to_owned(),
                primary_key: new_key(),
                secondary_key: Some(new_key()),
            });
        }
    }
}

/// Registers this edge device (`--device-id`) with its system modules when
/// they are missing (keys generated), marked as an edge device. `key` (from
/// `--connection-string`) becomes its primary key; other keys stay.
pub fn ensure_edge_device(
    identities: &Identities,
    device_id: &str,
    own_key: Option<&str>,
) -> Result<(), RegistryError> {
    identities.modify(device_id, |current| {
        let mut spec = current.clone().unwrap_or_else(|| DeviceSpec {
            device_id: device_id.to_owned(),
            primary_key: new_key(),
            secondary_key: Some(new_key()),
            x509: None,
            modules: Vec::new(),
            edge: true,
            parent: None,
        });
        spec.edge = true;
        if let Some(k) = own_key {
            if spec.x509.is_none() {
                spec.primary_key = k.to_owned();
            }
        }
        add_system_modules(&mut spec);
        let changed = current.as_ref() != Some(&spec);
        if changed {
            tracing::info!(
                device = device_id,
                "edge device registered with $edgeAgent and $edgeHub"
            );
        }
        Ok((changed.then_some(spec), ()))
    })
}

/// Ids as IoT Hub allows them: up to 128 characters of ASCII letters, digits
/// and `-.%_*?!(),:=@$'` (no `/`, which would break topics).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.%_*?!(),:=@$'".contains(&b))
}

#[derive(Debug, Clone)]
pub struct Keys {
    pub primary: String,
    pub secondary: Option<String>,
}

impl Keys {
    /// The keys a token may be signed with (none for an X.509 device).
    pub fn all(&self) -> Vec<&str> {
        std::iter::once(self.primary.as_str())
            .chain(self.secondary.as_deref())
            .filter(|k| !k.is_empty())
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct Device {
    pub id: String,
    pub keys: Keys,
    pub x509: Option<X509Spec>,
    pub modules: HashMap<String, (String, Keys)>,
    pub edge: bool,
    pub parent: Option<String>,
}

impl Device {
    pub fn spec(&self) -> DeviceSpec {
        let mut modules: Vec<ModuleSpec> = self
            .modules
            .values()
            .map(|(id, k)| ModuleSpec {
                module_id: id.clone(),
                primary_key: k.primary.clone(),
                secondary_key: k.secondary.clone(),
            })
            .collect();
        modules.sort_by(|a, b| a.module_id.cmp(&b.module_id));
        DeviceSpec {
            device_id: self.id.clone(),
            primary_key: self.keys.primary.clone(),
            secondary_key: self.keys.secondary.clone(),
            x509: self.x509.clone(),
            modules,
            edge: self.edge,
            parent: self.parent.clone(),
        }
    }
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
            let key = d.device_id.to_lowercase();
            if reg.devices.contains_key(&key) {
                return Err(IdentityError::Invalid {
                    path: p,
                    detail: format!("device {} listed twice", d.device_id),
                });
            }
            reg.insert(d).map_err(|detail| IdentityError::Invalid {
                path: p.clone(),
                detail,
            })?;
        }
        Ok(reg)
    }

    /// Adds or replaces a device (with its modules) after checking it.
    pub fn insert(&mut self, d: DeviceSpec) -> Result<(), String> {
        let p = "";
        let bad = |e: IdentityError| match e {
            IdentityError::Invalid { detail, .. } | IdentityError::Read { detail, .. } => detail,
        };
        if !valid_id(&d.device_id) {
            return Err(format!("invalid device id {:?}", d.device_id));
        }
        {
            let x509 = match d.x509 {
                None => {
                    check_key(p, &d.device_id, &d.primary_key).map_err(bad)?;
                    if let Some(k) = &d.secondary_key {
                        check_key(p, &d.device_id, k).map_err(bad)?;
                    }
                    None
                }
                Some(_) if !d.primary_key.is_empty() || d.secondary_key.is_some() => {
                    return Err(format!(
                        "device {}: authenticates with keys or with X.509, not both",
                        d.device_id
                    ));
                }
                Some(X509Spec::SelfSigned {
                    primary_thumbprint,
                    secondary_thumbprint,
                }) => Some(X509Spec::SelfSigned {
                    primary_thumbprint: normalize_thumbprint(&primary_thumbprint)?,
                    secondary_thumbprint: secondary_thumbprint
                        .as_deref()
                        .map(normalize_thumbprint)
                        .transpose()?,
                }),
                Some(X509Spec::CertificateAuthority) => Some(X509Spec::CertificateAuthority),
            };
            let mut modules = HashMap::new();
            for m in d.modules {
                let who = format!("{}/{}", d.device_id, m.module_id);
                if !valid_id(&m.module_id) {
                    return Err(format!("invalid module id {who:?}"));
                }
                check_key(p, &who, &m.primary_key).map_err(bad)?;
                if let Some(k) = &m.secondary_key {
                    check_key(p, &who, k).map_err(bad)?;
                }
                if modules.contains_key(&m.module_id.to_lowercase()) {
                    return Err(format!("module {who} listed twice"));
                }
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
            self.devices.insert(
                d.device_id.to_lowercase(),
                Device {
                    id: d.device_id,
                    keys: Keys {
                        primary: d.primary_key,
                        secondary: d.secondary_key,
                    },
                    x509,
                    modules,
                    edge: d.edge,
                    parent: d.parent,
                },
            );
        }
        Ok(())
    }

    pub fn remove(&mut self, device_id: &str) -> bool {
        self.devices.remove(&device_id.to_lowercase()).is_some()
    }

    /// Every device, by id, in the form the management API returns.
    pub fn specs(&self) -> Vec<DeviceSpec> {
        let mut v: Vec<DeviceSpec> = self.devices.values().map(Device::spec).collect();
        v.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        v
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

    /// Whether a session key (`device` or `device/module`) names a
    /// registered identity.
    pub fn knows_session(&self, key: &str) -> bool {
        let (d, m) = match key.split_once('/') {
            Some((d, m)) => (d, Some(m)),
            None => (key, None),
        };
        self.device(d).is_some_and(|dev| match m {
            None => true,
            Some(m) => dev.modules.contains_key(&m.to_lowercase()),
        })
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }
}

/// The live registry: kept in the store's `identities` table (one JSON
/// [`DeviceSpec`] per device), read by every CONNECT as a snapshot, changed
/// through the management API (or seeded from `--identities`).
pub struct Identities {
    current: arc_swap::ArcSwap<Registry>,
    store: Option<edgehub_store::Store>,
    /// Writers take turns: store write, then swap.
    write: parking_lot::Mutex<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] edgehub_store::StoreError),
}

impl Identities {
    /// In memory only (tests, or a hub without a store).
    pub fn fixed(registry: Registry) -> Identities {
        Identities {
            current: arc_swap::ArcSwap::from_pointee(registry),
            store: None,
            write: parking_lot::Mutex::new(()),
        }
    }

    /// The identities kept in `store`, then every device of `seed` (the
    /// `--identities` file) written over them: the file is configuration,
    /// devices added through the management API stay as well.
    pub fn open(
        store: edgehub_store::Store,
        seed: Option<Registry>,
    ) -> Result<Identities, RegistryError> {
        let mut reg = Registry::default();
        for (key, value) in store.scan(edgehub_store::Table::Identities)? {
            let spec: DeviceSpec = serde_json::from_slice(&value).map_err(|e| {
                RegistryError::Invalid(format!(
                    "stored identity {:?} unreadable: {e}",
                    String::from_utf8_lossy(&key)
                ))
            })?;
            reg.insert(spec).map_err(RegistryError::Invalid)?;
        }
        if let Some(seed) = seed {
            reg.iothub_hostname = seed.iothub_hostname.clone();
            for spec in seed.specs() {
                store.put(
                    edgehub_store::Table::Identities,
                    spec.device_id.to_lowercase().as_bytes(),
                    &serde_json::to_vec(&spec).expect("spec serializes"),
                )?;
                reg.insert(spec).map_err(RegistryError::Invalid)?;
            }
        }
        Ok(Identities {
            current: arc_swap::ArcSwap::from_pointee(reg),
            store: Some(store),
            write: parking_lot::Mutex::new(()),
        })
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.current.load_full()
    }

    /// Adds or replaces a device; durable before it returns.
    pub fn put(&self, spec: DeviceSpec) -> Result<(), RegistryError> {
        self.modify(&spec.device_id.clone(), |_| Ok((Some(spec), ())))
    }

    /// Changes one device under the writers' lock: `change` gets the device
    /// as it is (if registered) and returns what it should become, or `None`
    /// to leave the registry as it is.
    pub fn modify<T>(
        &self,
        device_id: &str,
        change: impl FnOnce(Option<DeviceSpec>) -> Result<(Option<DeviceSpec>, T), RegistryError>,
    ) -> Result<T, RegistryError> {
        let _w = self.write.lock();
        let current = self.current.load().device(device_id).map(Device::spec);
        let (next_spec, out) = change(current)?;
        let Some(spec) = next_spec else {
            return Ok(out);
        };
        let mut next = Registry::clone(&self.current.load());
        next.insert(spec.clone()).map_err(RegistryError::Invalid)?;
        if let Some(store) = &self.store {
            store.put(
                edgehub_store::Table::Identities,
                spec.device_id.to_lowercase().as_bytes(),
                &serde_json::to_vec(&spec).expect("spec serializes"),
            )?;
        }
        self.current.store(Arc::new(next));
        Ok(out)
    }

    /// Removes a device and its modules; `false` when there was none.
    pub fn delete(&self, device_id: &str) -> Result<bool, RegistryError> {
        let _w = self.write.lock();
        let mut next = Registry::clone(&self.current.load());
        if !next.remove(device_id) {
            return Ok(false);
        }
        if let Some(store) = &self.store {
            store.delete(
                edgehub_store::Table::Identities,
                device_id.to_lowercase().as_bytes(),
            )?;
        }
        self.current.store(Arc::new(next));
        Ok(true)
    }
}
