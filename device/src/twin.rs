//! Device and module twins: desired and reported properties with their
//! versions, and tags, kept in the store's `twins` table (one JSON document
//! per identity, keyed by the lower-cased identity name).
//!
//! Semantics as IoT Hub documents them: a patch merges into its section, a
//! `null` deletes a key, every accepted patch bumps that section's
//! `$version` by one. Property names may not be empty, start with `$`, or
//! hold `.` or spaces; a section is at most 32 KiB of JSON and 10 levels
//! deep. A rejected patch changes nothing.
//!
//! Owns: twin documents. Must not touch: the wire (the IoT Hub services
//! layer turns results into topics) or who may read which twin.

use edgehub_store::{Store, Table};
use serde_json::{Map, Value};

/// Largest desired or reported section, serialized (IoT Hub: 32 KiB).
pub const MAX_SECTION_BYTES: usize = 32 * 1024;
/// Deepest nesting of objects in a section (IoT Hub: 10 levels).
pub const MAX_DEPTH: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum TwinError {
    /// The patch is not acceptable (status 400).
    #[error("{0}")]
    Invalid(String),
    /// The section would grow past [`MAX_SECTION_BYTES`] (status 413).
    #[error("twin {section} properties would be {size} bytes, more than the {max}-byte limit")]
    TooLarge {
        section: &'static str,
        size: usize,
        max: usize,
    },
    #[error(transparent)]
    Store(#[from] edgehub_store::StoreError),
}

/// Reported properties to send up: the patch, and the snapshot of the
/// section to record once the parent acknowledged it.
pub type ReportedSync = (Value, Map<String, Value>);

/// One twin: the sections as IoT Hub shows them, each with its `$version`.
#[derive(Debug, Clone, PartialEq)]
pub struct Twin {
    pub desired: Map<String, Value>,
    pub reported: Map<String, Value>,
    pub tags: Map<String, Value>,
    /// Behind an upstream: the reported properties the parent last
    /// acknowledged (what still has to go up is the difference).
    pub reported_upstream: Option<Map<String, Value>>,
    /// The twin's own version: one more for every change of tags, desired
    /// or reported properties (IoT Hub's twin `version`).
    pub version: u64,
    /// When the desired / reported section last changed (unix ms).
    pub desired_updated: Option<u64>,
    pub reported_updated: Option<u64>,
}

impl Default for Twin {
    fn default() -> Twin {
        let section = || {
            let mut m = Map::new();
            m.insert("$version".into(), Value::from(1u64));
            m
        };
        Twin {
            desired: section(),
            reported: section(),
            tags: Map::new(),
            reported_upstream: None,
            version: 1,
            desired_updated: None,
            reported_updated: None,
        }
    }
}

fn version(section: &Map<String, Value>) -> u64 {
    section.get("$version").and_then(Value::as_u64).unwrap_or(1)
}

impl Twin {
    pub fn desired_version(&self) -> u64 {
        version(&self.desired)
    }

    pub fn reported_version(&self) -> u64 {
        version(&self.reported)
    }

    /// What a device reads with `$iothub/twin/GET`.
    pub fn device_view(&self) -> Value {
        serde_json::json!({ "desired": self.desired, "reported": self.reported })
    }

    /// IoT Hub's `etag` for the twin: changes whenever the twin does.
    pub fn etag(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(self.version.to_be_bytes())
    }

    fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "desired": self.desired, "reported": self.reported, "tags": self.tags,
            "reportedUpstream": self.reported_upstream, "version": self.version,
            "desiredUpdated": self.desired_updated, "reportedUpdated": self.reported_updated,
        }))
        .expect("twin serializes")
    }

    fn from_json(raw: &[u8]) -> Option<Twin> {
        let mut v: Map<String, Value> = serde_json::from_slice(raw).ok()?;
        let number = |k: &str| v.get(k).and_then(Value::as_u64);
        let (stored_version, desired_updated, reported_updated) = (
            number("version"),
            number("desiredUpdated"),
            number("reportedUpdated"),
        );
        let mut take = |k: &str| match v.remove(k) {
            Some(Value::Object(m)) => Some(m),
            _ => None,
        };
        let desired = take("desired")?;
        let reported = take("reported")?;
        Some(Twin {
            // Records written before the twin had its own version: at
            // least as many changes as the two sections counted.
            version: stored_version
                .unwrap_or_else(|| (version(&desired) + version(&reported)).saturating_sub(1)),
            desired,
            reported,
            tags: take("tags").unwrap_or_default(),
            reported_upstream: take("reportedUpstream"),
            desired_updated,
            reported_updated,
        })
    }
}

/// Checks a patch: an object whose names IoT Hub allows, not too deep.
fn check_patch(patch: &Map<String, Value>, depth: usize, path: &str) -> Result<(), TwinError> {
    if depth > MAX_DEPTH {
        return Err(TwinError::Invalid(format!(
            "{path}: nested deeper than {MAX_DEPTH} levels"
        )));
    }
    for (k, v) in patch {
        if k.is_empty() || k.starts_with('$') || k.contains(['.', ' ']) {
            return Err(TwinError::Invalid(format!(
                "property name {k:?} at {path}: names may not be empty, start with '$', or contain '.' or ' '"
            )));
        }
        if let Value::Object(inner) = v {
            check_patch(inner, depth + 1, &format!("{path}.{k}"))?;
        }
    }
    Ok(())
}

/// Merges `patch` into `target`: objects merge key by key, `null` deletes,
/// anything else replaces.
fn merge(target: &mut Map<String, Value>, patch: Map<String, Value>) {
    for (k, v) in patch {
        match v {
            Value::Null => {
                target.remove(&k);
            }
            Value::Object(p) => match target.get_mut(&k) {
                Some(Value::Object(t)) => merge(t, p),
                _ => {
                    let mut fresh = Map::new();
                    merge(&mut fresh, p);
                    target.insert(k, Value::Object(fresh));
                }
            },
            other => {
                target.insert(k, other);
            }
        }
    }
}

/// The patch that turns `old` into `new` (both without `$`-metadata):
/// changed values as they are in `new`, removed keys as `null`, objects
/// diffed key by key. Empty when they are equal.
pub fn diff(old: &Map<String, Value>, new: &Map<String, Value>) -> Map<String, Value> {
    let mut patch = Map::new();
    for (k, was) in old.iter().filter(|(k, _)| !k.starts_with('$')) {
        match new.get(k) {
            None => {
                patch.insert(k.clone(), Value::Null);
            }
            Some(Value::Object(n)) => {
                if let Value::Object(o) = was {
                    let d = diff(o, n);
                    if !d.is_empty() {
                        patch.insert(k.clone(), Value::Object(d));
                    }
                } else {
                    patch.insert(k.clone(), Value::Object(n.clone()));
                }
            }
            Some(v) if v != was => {
                patch.insert(k.clone(), v.clone());
            }
            Some(_) => {}
        }
    }
    for (k, v) in new.iter().filter(|(k, _)| !k.starts_with('$')) {
        if !old.contains_key(k) {
            patch.insert(k.clone(), v.clone());
        }
    }
    patch
}

/// Applies `patch` to one section (with its version bumped), or leaves the
/// section as it was and says why not.
fn apply(
    section: &mut Map<String, Value>,
    patch: Map<String, Value>,
    name: &'static str,
) -> Result<u64, TwinError> {
    check_patch(&patch, 1, name)?;
    let mut next = section.clone();
    merge(&mut next, patch);
    let v = version(section) + 1;
    next.insert("$version".into(), Value::from(v));
    let size = serde_json::to_vec(&next).map_or(0, |b| b.len());
    if size > MAX_SECTION_BYTES {
        return Err(TwinError::TooLarge {
            section: name,
            size,
            max: MAX_SECTION_BYTES,
        });
    }
    *section = next;
    Ok(v)
}

/// A patch as the caller sent it: must be a JSON object.
pub fn parse_patch(raw: &[u8]) -> Result<Map<String, Value>, TwinError> {
    match serde_json::from_slice(raw) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(TwinError::Invalid(
            "a twin patch must be a JSON object".into(),
        )),
        Err(e) => Err(TwinError::Invalid(format!(
            "a twin patch must be JSON: {e}"
        ))),
    }
}

/// The twins of every identity, read and written through the store. Writes
/// are serialised, so concurrent patches of one twin never lose an update.
pub struct Twins {
    store: Store,
    write: parking_lot::Mutex<()>,
}

fn key(identity: &str) -> Vec<u8> {
    identity.to_lowercase().into_bytes()
}

impl Twins {
    pub fn new(store: Store) -> Twins {
        Twins {
            store,
            write: parking_lot::Mutex::new(()),
        }
    }

    /// The twin of `identity` (`device` or `device/module`); a fresh one
    /// (both versions 1, no properties) if it was never written.
    pub fn get(&self, identity: &str) -> Result<Twin, TwinError> {
        Ok(match self.store.get(Table::Twins, &key(identity))? {
            Some(raw) => Twin::from_json(&raw).ok_or_else(|| {
                TwinError::Invalid(format!("stored twin of {identity} is unreadable"))
            })?,
            None => Twin::default(),
        })
    }

    fn update(
        &self,
        identity: &str,
        change: impl FnOnce(&mut Twin) -> Result<(), TwinError>,
    ) -> Result<Twin, TwinError> {
        let _w = self.write.lock();
        let mut twin = self.get(identity)?;
        let before = twin.clone();
        change(&mut twin)?;
        let now = super::presence::unix_ms();
        let mut changed = twin.tags != before.tags;
        if twin.desired != before.desired {
            twin.desired_updated = Some(now);
            changed = true;
        }
        if twin.reported != before.reported {
            twin.reported_updated = Some(now);
            changed = true;
        }
        if changed {
            twin.version = before.version + 1;
        }
        self.store
            .put(Table::Twins, &key(identity), &twin.to_json())?;
        Ok(twin)
    }

    /// A device's reported-properties patch; the new reported `$version`.
    pub fn patch_reported(
        &self,
        identity: &str,
        patch: Map<String, Value>,
    ) -> Result<u64, TwinError> {
        let twin = self.update(identity, |t| {
            apply(&mut t.reported, patch, "reported").map(drop)
        })?;
        Ok(twin.reported_version())
    }

    /// The service side's patch: desired properties and/or tags. Returns the
    /// twin and, when desired properties changed, the patch to push to the
    /// device (with its new `$version`).
    pub fn patch_desired(
        &self,
        identity: &str,
        desired: Option<Map<String, Value>>,
        tags: Option<Map<String, Value>>,
    ) -> Result<(Twin, Option<Value>), TwinError> {
        let mut pushed = None;
        let twin = self.update(identity, |t| {
            if let Some(tags) = tags {
                check_patch(&tags, 1, "tags")?;
                merge(&mut t.tags, tags);
            }
            if let Some(d) = desired {
                let mut push = d.clone();
                let v = apply(&mut t.desired, d, "desired")?;
                push.insert("$version".into(), Value::from(v));
                pushed = Some(Value::Object(push));
            }
            Ok(())
        })?;
        Ok((twin, pushed))
    }

    /// Replaces the desired properties as a whole (a deployment does): the
    /// change is applied as the patch from the current to the new document,
    /// so the identity gets one ordinary desired-properties patch, removed
    /// keys as `null`. Nothing changes (no version bump) when they are equal.
    pub fn replace_desired(
        &self,
        identity: &str,
        desired: Map<String, Value>,
    ) -> Result<(Twin, Option<Value>), TwinError> {
        let current = self.get(identity)?;
        let patch = diff(&current.desired, &desired);
        if patch.is_empty() {
            return Ok((current, None));
        }
        self.patch_desired(identity, Some(patch), None)
    }

    /// The twin as the parent has it (its answer to a GET): the desired
    /// properties, with the parent's `$version`, replace ours; returns the
    /// patch to push to the identity (parent's version) when they changed,
    /// so a change made while the link was down still reaches the device.
    pub fn adopt_upstream_desired(
        &self,
        identity: &str,
        desired: Map<String, Value>,
    ) -> Result<Option<Value>, TwinError> {
        let mut push = None;
        self.update(identity, |t| {
            let mut patch = diff(&t.desired, &desired);
            if patch.is_empty() && version(&t.desired) == version(&desired) {
                return Ok(());
            }
            t.desired = desired;
            if !patch.is_empty() {
                patch.insert("$version".into(), Value::from(version(&t.desired)));
                push = Some(Value::Object(patch));
            }
            Ok(())
        })?;
        Ok(push)
    }

    /// A desired-properties patch from the parent, carrying its `$version`.
    pub fn apply_upstream_desired_patch(
        &self,
        identity: &str,
        mut patch: Map<String, Value>,
    ) -> Result<Value, TwinError> {
        let v = patch.remove("$version").and_then(|v| v.as_u64());
        self.update(identity, |t| {
            let next = version(&t.desired) + 1;
            merge(&mut t.desired, patch.clone());
            t.desired
                .insert("$version".into(), Value::from(v.unwrap_or(next)));
            Ok(())
        })
        .map(|t| {
            patch.insert("$version".into(), t.desired["$version"].clone());
            Value::Object(patch)
        })
    }

    /// What of the reported properties the parent has not acknowledged yet
    /// (as one patch, removed keys as null), with the snapshot to record
    /// once it has. `None` when there is nothing to send.
    pub fn reported_to_sync(&self, identity: &str) -> Result<Option<ReportedSync>, TwinError> {
        let t = self.get(identity)?;
        let synced = t.reported_upstream.clone().unwrap_or_default();
        let patch = diff(&synced, &t.reported);
        Ok((!patch.is_empty()).then(|| (Value::Object(patch), t.reported.clone())))
    }

    /// The parent acknowledged the reported properties as in `snapshot`.
    pub fn reported_synced(
        &self,
        identity: &str,
        snapshot: Map<String, Value>,
    ) -> Result<(), TwinError> {
        self.update(identity, |t| {
            t.reported_upstream = Some(snapshot);
            Ok(())
        })
        .map(drop)
    }

    /// Forgets the twin (its identity was deleted).
    pub fn remove(&self, identity: &str) -> Result<(), TwinError> {
        let _w = self.write.lock();
        self.store.delete(Table::Twins, &key(identity))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    fn open(dir: &std::path::Path) -> Twins {
        Twins::new(Store::open(edgehub_store::StoreConfig::new(dir)).unwrap())
    }

    #[test]
    fn patches_merge_delete_and_bump_versions_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let twins = open(dir.path());
            let t = twins.get("Dev1").unwrap();
            assert_eq!((t.desired_version(), t.reported_version()), (1, 1));
            let v = twins
                .patch_reported(
                    "Dev1",
                    obj(json!({"fw": "1.0", "net": {"ip": "x", "up": true}})),
                )
                .unwrap();
            assert_eq!(v, 2);
            let v = twins
                .patch_reported("dev1", obj(json!({"net": {"ip": null, "mtu": 1500}})))
                .unwrap();
            assert_eq!(v, 3);
            let (_, pushed) = twins
                .patch_desired(
                    "dev1",
                    Some(obj(json!({"rate": 5}))),
                    Some(obj(json!({"site": "a"}))),
                )
                .unwrap();
            assert_eq!(pushed, Some(json!({"rate": 5, "$version": 2})));
            // Tags alone change no desired version and push nothing.
            let (t, pushed) = twins
                .patch_desired("dev1", None, Some(obj(json!({"floor": 3}))))
                .unwrap();
            assert_eq!(pushed, None);
            assert_eq!(t.desired_version(), 2);
        }
        let twins = open(dir.path());
        let t = twins.get("DEV1").unwrap();
        assert_eq!(
            Value::Object(t.reported),
            json!({"fw": "1.0", "net": {"up": true, "mtu": 1500}, "$version": 3})
        );
        assert_eq!(Value::Object(t.desired), json!({"rate": 5, "$version": 2}));
        assert_eq!(Value::Object(t.tags), json!({"site": "a", "floor": 3}));
        // Module twins are their own.
        assert_eq!(twins.get("dev1/mod").unwrap(), Twin::default());
    }

    #[test]
    fn replacing_desired_sends_the_difference_and_removes_what_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let twins = open(dir.path());
        let first = obj(
            json!({"modules": {"a": {"image": "a:1"}, "b": {"image": "b:1"}}, "schemaVersion": "1.1"}),
        );
        let (t, push) = twins
            .replace_desired("d/$edgeAgent", first.clone())
            .unwrap();
        assert_eq!(t.desired_version(), 2);
        assert_eq!(push.unwrap()["modules"]["b"]["image"], "b:1");
        let (t, push) = twins.replace_desired("d/$edgeAgent", first).unwrap();
        assert!(push.is_none(), "same document: no patch");
        assert_eq!(t.desired_version(), 2);
        let second = obj(json!({"modules": {"a": {"image": "a:2"}}, "schemaVersion": "1.1"}));
        let (t, push) = twins.replace_desired("d/$edgeAgent", second).unwrap();
        assert_eq!(
            push.unwrap(),
            json!({"modules": {"a": {"image": "a:2"}, "b": null}, "$version": 3})
        );
        assert_eq!(
            t.desired,
            obj(json!({"modules": {"a": {"image": "a:2"}}, "schemaVersion": "1.1", "$version": 3}))
        );
    }

    #[test]
    fn upstream_sync_adopts_desired_and_sends_reported_differences() {
        let dir = tempfile::tempdir().unwrap();
        let twins = open(dir.path());
        twins
            .patch_reported("d", obj(json!({"a": 1, "b": 2})))
            .unwrap();
        let (patch, snap) = twins.reported_to_sync("d").unwrap().unwrap();
        assert_eq!(patch, json!({"a": 1, "b": 2}));
        twins.reported_synced("d", snap).unwrap();
        assert!(twins.reported_to_sync("d").unwrap().is_none());
        twins
            .patch_reported("d", obj(json!({"a": null, "c": 3})))
            .unwrap();
        let (patch, _) = twins.reported_to_sync("d").unwrap().unwrap();
        assert_eq!(patch, json!({"a": null, "c": 3}));

        let up = obj(json!({"x": 1, "$version": 7}));
        let push = twins.adopt_upstream_desired("d", up.clone()).unwrap();
        assert_eq!(push, Some(json!({"x": 1, "$version": 7})));
        assert_eq!(twins.adopt_upstream_desired("d", up).unwrap(), None);
        let push = twins
            .apply_upstream_desired_patch("d", obj(json!({"y": 2, "$version": 8})))
            .unwrap();
        assert_eq!(push, json!({"y": 2, "$version": 8}));
        let t = twins.get("d").unwrap();
        assert_eq!(t.desired, obj(json!({"x": 1, "y": 2, "$version": 8})));
        // Survives a reopen with the sync state.
        drop(twins);
        let twins = open(dir.path());
        assert_eq!(twins.get("d").unwrap().desired_version(), 8);
        assert_eq!(
            twins.reported_to_sync("d").unwrap().unwrap().0,
            json!({"a": null, "c": 3})
        );
    }

    #[test]
    fn bad_patches_are_refused_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let twins = open(dir.path());
        twins.patch_reported("d", obj(json!({"a": 1}))).unwrap();
        for (patch, why) in [
            (json!({"$version": 7}), "start with '$'"),
            (json!({"a.b": 1}), "contain '.'"),
            (json!({"x": {"": 1}}), "may not be empty"),
        ] {
            let e = twins.patch_reported("d", obj(patch)).unwrap_err();
            assert!(e.to_string().contains(why), "{e}");
        }
        let mut deep = json!(1);
        for _ in 0..11 {
            deep = json!({ "n": deep });
        }
        assert!(twins
            .patch_reported("d", obj(deep))
            .unwrap_err()
            .to_string()
            .contains("deeper than 10"));
        let big = "x".repeat(MAX_SECTION_BYTES);
        assert!(matches!(
            twins.patch_reported("d", obj(json!({ "big": big }))),
            Err(TwinError::TooLarge { .. })
        ));
        assert!(parse_patch(b"[1]").is_err());
        assert!(parse_patch(b"{not json").is_err());
        let t = twins.get("d").unwrap();
        assert_eq!(Value::Object(t.reported), json!({"a": 1, "$version": 2}));
    }
}
