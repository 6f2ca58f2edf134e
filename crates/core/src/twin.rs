//! Device twins: tags, desired and reported properties, their versions, and patch rules.
//!
//! Patches merge recursively; `null` removes a member. Azure's limits are enforced on every
//! write: keys up to 1 KB without `.`, `$`, space or control characters, string values up to
//! 4 KB, nesting up to 10 levels, each section (tags, desired, reported) up to 32 KB.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::{DpsError, ErrorCode};

pub const MAX_KEY_BYTES: usize = 1024;
pub const MAX_STRING_BYTES: usize = 4096;
pub const MAX_DEPTH: usize = 10;
pub const MAX_SECTION_BYTES: usize = 32 * 1024;
/// Tags are smaller in Azure: 8 KB.
pub const MAX_TAGS_BYTES: usize = 8 * 1024;

/// The stored twin of one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Twin {
    pub tags: Map<String, Value>,
    pub desired: Map<String, Value>,
    pub desired_version: u64,
    pub reported: Map<String, Value>,
    pub reported_version: u64,
    /// Increases with every change to any section.
    pub version: u64,
}

impl Default for Twin {
    fn default() -> Self {
        Self {
            tags: Map::new(),
            desired: Map::new(),
            desired_version: 1,
            reported: Map::new(),
            reported_version: 1,
            version: 1,
        }
    }
}

fn invalid(msg: impl Into<String>) -> DpsError {
    DpsError::new(ErrorCode::BadRequest, msg)
}

fn check_key(k: &str) -> Result<(), DpsError> {
    if k.is_empty() || k.len() > MAX_KEY_BYTES {
        return Err(invalid("Twin property names must be 1 to 1024 bytes."));
    }
    if k.chars().any(|c| c == '.' || c == '$' || c == ' ' || c.is_control()) {
        return Err(invalid(format!(
            "Twin property name '{}' contains '.', '$', a space or a control character.",
            k.chars().take(64).collect::<String>()
        )));
    }
    Ok(())
}

fn check_value(v: &Value, depth: usize) -> Result<(), DpsError> {
    if depth > MAX_DEPTH {
        return Err(invalid(format!("Twin properties may nest at most {MAX_DEPTH} levels.")));
    }
    match v {
        Value::String(s) if s.len() > MAX_STRING_BYTES => {
            Err(invalid(format!("Twin string values may be at most {MAX_STRING_BYTES} bytes.")))
        }
        Value::Object(m) => {
            for (k, v) in m {
                check_key(k)?;
                check_value(v, depth + 1)?;
            }
            Ok(())
        }
        Value::Array(a) => a.iter().try_for_each(|v| check_value(v, depth + 1)),
        _ => Ok(()),
    }
}

/// Merges `patch` into `target`: objects merge member by member, `null` deletes, anything else
/// replaces.
fn merge(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (k, v) in patch {
        match v {
            Value::Null => {
                target.remove(k);
            }
            Value::Object(p) => {
                let entry = target.entry(k.clone()).or_insert_with(|| Value::Object(Map::new()));
                if !entry.is_object() {
                    *entry = Value::Object(Map::new());
                }
                merge(entry.as_object_mut().expect("object"), p);
            }
            other => {
                target.insert(k.clone(), other.clone());
            }
        }
    }
}

/// Parses a patch body: a JSON object; `$`-prefixed members (e.g. a `$version` a client echoed)
/// are ignored at the top level.
pub fn parse_patch(body: &[u8]) -> Result<Map<String, Value>, DpsError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| invalid(format!("Malformed twin patch JSON: {e}")))?;
    let Value::Object(mut m) = v else { return Err(invalid("A twin patch must be a JSON object.")) };
    m.retain(|k, _| !k.starts_with('$'));
    check_value(&Value::Object(m.clone()), 1)?;
    Ok(m)
}

fn patched(
    section: &Map<String, Value>,
    patch: &Map<String, Value>,
    limit: usize,
    name: &str,
) -> Result<Map<String, Value>, DpsError> {
    let mut next = section.clone();
    merge(&mut next, patch);
    let size = serde_json::to_vec(&next).map(|b| b.len()).unwrap_or(usize::MAX);
    if size > limit {
        return Err(DpsError::new(
            ErrorCode::PayloadTooLarge,
            format!("Twin {name} properties would exceed {limit} bytes."),
        ));
    }
    Ok(next)
}

impl Twin {
    /// The twin a device starts with: an enrollment's `initialTwin` (tags and desired).
    pub fn from_initial(initial: Option<&Value>) -> Result<Self, DpsError> {
        let mut t = Twin::default();
        if let Some(init) = initial {
            if let Some(tags) = init.get("tags").and_then(Value::as_object) {
                // Tag names follow the same rules as property names (as a service tags patch).
                let mut tags = tags.clone();
                tags.retain(|k, _| !k.starts_with('$'));
                check_value(&Value::Object(tags.clone()), 1)?;
                t.tags = patched(&Map::new(), &tags, MAX_TAGS_BYTES, "tag")?;
            }
            if let Some(d) = init.pointer("/properties/desired").and_then(Value::as_object) {
                let mut d = d.clone();
                d.retain(|k, _| !k.starts_with('$'));
                check_value(&Value::Object(d.clone()), 1)?;
                t.desired = patched(&Map::new(), &d, MAX_SECTION_BYTES, "desired")?;
            }
        }
        Ok(t)
    }

    /// Applies a device's reported-properties patch; returns the new reported version.
    pub fn patch_reported(&mut self, patch: &Map<String, Value>) -> Result<u64, DpsError> {
        self.reported = patched(&self.reported, patch, MAX_SECTION_BYTES, "reported")?;
        self.reported_version += 1;
        self.version += 1;
        Ok(self.reported_version)
    }

    /// Applies a service's desired-properties patch; returns the new desired version.
    pub fn patch_desired(&mut self, patch: &Map<String, Value>) -> Result<u64, DpsError> {
        self.desired = patched(&self.desired, patch, MAX_SECTION_BYTES, "desired")?;
        self.desired_version += 1;
        self.version += 1;
        Ok(self.desired_version)
    }

    pub fn patch_tags(&mut self, patch: &Map<String, Value>) -> Result<(), DpsError> {
        self.tags = patched(&self.tags, patch, MAX_TAGS_BYTES, "tag")?;
        self.version += 1;
        Ok(())
    }

    fn with_version(section: &Map<String, Value>, version: u64) -> Value {
        let mut m = section.clone();
        m.insert("$version".into(), json!(version));
        Value::Object(m)
    }

    /// What a device's twin GET returns: only the properties, each section with `$version`.
    pub fn device_view(&self) -> Value {
        json!({
            "desired": Self::with_version(&self.desired, self.desired_version),
            "reported": Self::with_version(&self.reported, self.reported_version),
        })
    }

    /// The body of a desired-property notification: the patch plus the new `$version`.
    pub fn desired_notification(patch: &Map<String, Value>, version: u64) -> Value {
        Self::with_version(patch, version)
    }

    /// `tags` and `properties` as the service API's twin JSON holds them.
    pub fn service_sections(&self) -> (Value, Value) {
        (
            Value::Object(self.tags.clone()),
            json!({
                "desired": Self::with_version(&self.desired, self.desired_version),
                "reported": Self::with_version(&self.reported, self.reported_version),
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn initial_twin_then_patches_with_versions() {
        let mut t =
            Twin::from_initial(Some(&json!({"tags": {"site": "lab"}, "properties": {"desired": {"interval": 30}}})))
                .unwrap();
        assert_eq!(t.device_view(), json!({"desired": {"interval": 30, "$version": 1}, "reported": {"$version": 1}}));
        assert_eq!(t.patch_reported(&obj(json!({"fw": "1.0", "net": {"ip": "x", "mask": "y"}}))).unwrap(), 2);
        assert_eq!(t.patch_reported(&obj(json!({"fw": null, "net": {"mask": null}}))).unwrap(), 3);
        assert_eq!(t.reported, obj(json!({"net": {"ip": "x"}})));
        assert_eq!(t.patch_desired(&obj(json!({"interval": 60}))).unwrap(), 2);
        assert_eq!(
            Twin::desired_notification(&obj(json!({"interval": 60})), 2),
            json!({"interval": 60, "$version": 2})
        );
        assert_eq!(t.version, 4);
    }

    #[test]
    fn patch_parsing_and_limits() {
        assert_eq!(parse_patch(br#"{"a":1,"$version":3}"#).unwrap(), obj(json!({"a": 1})));
        for bad in [&b"{oops"[..], b"[1]", br#"{"a.b":1}"#, br#"{"a b":1}"#, br#"{"x":{"$y":1}}"#] {
            assert_eq!(parse_patch(bad).unwrap_err().status(), 400, "{}", String::from_utf8_lossy(bad));
        }
        let deep = (0..12).fold(json!(1), |v, i| json!({ format!("k{i}"): v }));
        assert!(parse_patch(deep.to_string().as_bytes()).is_err());
        let long = json!({"s": "x".repeat(5000)});
        assert!(parse_patch(long.to_string().as_bytes()).is_err());
        let mut t = Twin::default();
        let mut big = Map::new();
        for i in 0..40 {
            big.insert(format!("k{i}"), json!("y".repeat(1000)));
        }
        assert_eq!(t.patch_reported(&big).unwrap_err().status(), 413);
        assert_eq!(t.reported_version, 1, "a refused patch changes nothing");
    }

    #[test]
    fn initial_twin_tags_follow_the_property_name_rules() {
        // Found by fuzz/fuzz_targets/twin_patch.rs: an enrollment's or a webhook's initialTwin
        // stored tags that no tags patch could have written.
        for bad in [json!({"tags": {".ite": "lab"}}), json!({"tags": {"x": {"desire a": 30}}})] {
            assert_eq!(Twin::from_initial(Some(&bad)).unwrap_err().status(), 400, "{bad}");
        }
        let deep = (0..12).fold(json!(1), |v, i| json!({ format!("k{i}"): v }));
        assert!(Twin::from_initial(Some(&json!({ "tags": deep }))).is_err());
        // `$` members at the top are dropped, as in a patch.
        let t = Twin::from_initial(Some(&json!({"tags": {"site": "lab", "$version": 3}}))).unwrap();
        assert_eq!(t.tags, obj(json!({"site": "lab"})));
    }
}
