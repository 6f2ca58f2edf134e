//! Device twins: tags, desired and reported properties, their versions, metadata and patch rules.
//!
//! Patches merge recursively; `null` removes a member. Azure's limits are enforced on every
//! write: keys up to 1 KB without `.`, `$`, space or control characters, string values up to
//! 4 KB, integers within ±2^52, objects nested up to 10 levels below a section, each section
//! (tags, desired, reported) up to 32 KB (tags 8 KB).
//!
//! Desired and reported properties carry Azure's `$metadata`: at every level, when the member
//! was last written (`$lastUpdated`) and, for desired properties, in which desired version
//! (`$lastUpdatedVersion`). Azure keeps it "at every level (not just the leaves)" so a removed
//! key still dates its parent; the stored tree mirrors the section and is rendered beside it.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::{AzureError, ErrorCode};
use crate::time::Timestamp;

pub const MAX_KEY_BYTES: usize = 1024;
pub const MAX_STRING_BYTES: usize = 4096;
/// How deep objects may nest below a section: Azure's documented example of the maximum is
/// `tags.one.two…ten` holding `{"property": "value"}`.
pub const MAX_DEPTH: usize = 10;
pub const MAX_SECTION_BYTES: usize = 32 * 1024;
/// Tags are smaller in Azure: 8 KB.
pub const MAX_TAGS_BYTES: usize = 8 * 1024;
/// The largest and smallest integers a twin may hold (Azure: 2^52 - 1 and -2^52).
pub const MAX_INTEGER: i64 = 4_503_599_627_370_495;
pub const MIN_INTEGER: i64 = -4_503_599_627_370_496;

const LAST_UPDATED: &str = "$lastUpdated";
const LAST_UPDATED_VERSION: &str = "$lastUpdatedVersion";
/// What a twin stored before metadata existed is dated with, until the hub gives it a date
/// (see [`Twin::date_undated`]).
const NEVER: &str = "0001-01-01T00:00:00Z";

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
    /// `$metadata` of the desired properties: a tree mirroring them, each node with
    /// `$lastUpdated` and `$lastUpdatedVersion`. Empty in twins stored before it existed.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub desired_metadata: Map<String, Value>,
    /// `$metadata` of the reported properties (`$lastUpdated` only).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub reported_metadata: Map<String, Value>,
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
            desired_metadata: Map::new(),
            reported_metadata: Map::new(),
        }
    }
}

fn invalid(msg: impl Into<String>) -> AzureError {
    AzureError::new(ErrorCode::BadRequest, msg)
}

fn check_key(k: &str) -> Result<(), AzureError> {
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

/// Checks the members of a section (or of a patch of one): names, values, and nesting, where
/// an object directly in the section is at level 1.
fn check_members(m: &Map<String, Value>, level: usize) -> Result<(), AzureError> {
    for (k, v) in m {
        check_key(k)?;
        check_value(v, level)?;
    }
    Ok(())
}

fn check_value(v: &Value, level: usize) -> Result<(), AzureError> {
    match v {
        Value::String(s) if s.len() > MAX_STRING_BYTES => {
            Err(invalid(format!("Twin string values may be at most {MAX_STRING_BYTES} bytes.")))
        }
        Value::Number(n) => {
            let in_range = match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => (MIN_INTEGER..=MAX_INTEGER).contains(&i),
                (None, Some(_)) => false,
                // A float, or an integer too large for 64 bits (which JSON parsing turns into
                // one): only whole values are limited.
                (None, None) => n.as_f64().is_some_and(|f| f.fract() != 0.0 || f.abs() <= MAX_INTEGER as f64),
            };
            if in_range {
                Ok(())
            } else {
                Err(invalid(format!("Twin integers must be between {MIN_INTEGER} and {MAX_INTEGER}.")))
            }
        }
        Value::Object(_) | Value::Array(_) if level > MAX_DEPTH => {
            Err(invalid(format!("Twin properties may nest at most {MAX_DEPTH} levels.")))
        }
        Value::Object(m) => check_members(m, level + 1),
        Value::Array(a) => a.iter().try_for_each(|v| check_value(v, level + 1)),
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

/// The merge patch that turns `old` into `new` (what a device that merges patches needs to
/// hear after a replace): removed members as `null`, changed ones as their new value.
fn merge_diff(old: &Map<String, Value>, new: &Map<String, Value>) -> Map<String, Value> {
    let mut patch = Map::new();
    for k in old.keys().filter(|k| !new.contains_key(*k)) {
        patch.insert(k.clone(), Value::Null);
    }
    for (k, v) in new {
        match (old.get(k), v) {
            (Some(o), n) if o == n => {}
            (Some(Value::Object(o)), Value::Object(n)) => {
                patch.insert(k.clone(), Value::Object(merge_diff(o, n)));
            }
            _ => {
                patch.insert(k.clone(), v.clone());
            }
        }
    }
    patch
}

/// Parses a device's reported-properties patch: a JSON object; `$`-prefixed members at the top
/// (e.g. a `$version` a client echoed) are ignored.
pub fn parse_patch(body: &[u8]) -> Result<Map<String, Value>, AzureError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| invalid(format!("Malformed twin patch JSON: {e}")))?;
    let Value::Object(mut m) = v else { return Err(invalid("A twin patch must be a JSON object.")) };
    m.retain(|k, _| !k.starts_with('$'));
    check_members(&m, 1)?;
    Ok(m)
}

/// Which section a service writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceSection {
    Tags,
    Desired,
}

/// Checks a service's tags or desired properties (a patch or a replacement). A name starting
/// with `$` is refused (400) wherever it is, as Azure refuses it, except the `$version` and
/// `$metadata` a desired section read from the hub carries at its top: the service SDKs send a
/// twin they read back whole, and those two are the hub's to set, so they are left out.
pub fn service_section(value: &Value, section: ServiceSection) -> Result<Map<String, Value>, AzureError> {
    let Value::Object(m) = value else {
        return Err(invalid("Twin tags and properties must be JSON objects."));
    };
    let mut m = m.clone();
    if section == ServiceSection::Desired {
        m.remove("$version");
        m.remove("$metadata");
    }
    check_members(&m, 1)?;
    Ok(m)
}

fn patched(
    section: &Map<String, Value>,
    patch: &Map<String, Value>,
    limit: usize,
    name: &str,
) -> Result<Map<String, Value>, AzureError> {
    let mut next = section.clone();
    merge(&mut next, patch);
    let size = serde_json::to_vec(&next).map(|b| b.len()).unwrap_or(usize::MAX);
    if size > limit {
        return Err(AzureError::new(
            ErrorCode::PayloadTooLarge,
            format!("Twin {name} properties would exceed {limit} bytes."),
        ));
    }
    Ok(next)
}

/// A metadata node: when, and (desired) in which version.
fn stamp_node(node: &mut Map<String, Value>, when: &str, version: Option<u64>) {
    node.insert(LAST_UPDATED.into(), json!(when));
    if let Some(v) = version {
        node.insert(LAST_UPDATED_VERSION.into(), json!(v));
    }
}

/// Dates every member `patch` writes (and the node holding them); removed members lose their
/// node, a value that replaces an object drops the object's nodes.
fn stamp(meta: &mut Map<String, Value>, patch: &Map<String, Value>, when: &str, version: Option<u64>) {
    stamp_node(meta, when, version);
    for (k, v) in patch {
        match v {
            Value::Null => {
                meta.remove(k);
            }
            Value::Object(p) => {
                let node = meta.entry(k.clone()).or_insert_with(|| Value::Object(Map::new()));
                if !node.is_object() {
                    *node = Value::Object(Map::new());
                }
                stamp(node.as_object_mut().expect("object"), p, when, version);
            }
            _ => {
                let mut node = Map::new();
                stamp_node(&mut node, when, version);
                meta.insert(k.clone(), Value::Object(node));
            }
        }
    }
}

/// The `$metadata` of `section` as Azure renders it: a node for the section and for every
/// member at every level, each dated from `meta` or, where `meta` has no node (twins stored
/// before metadata), from the nearest dated parent.
fn render_metadata(section: &Map<String, Value>, meta: &Map<String, Value>, inherited: &Map<String, Value>) -> Value {
    let mut out = Map::new();
    for k in [LAST_UPDATED, LAST_UPDATED_VERSION] {
        if let Some(v) = meta.get(k).or_else(|| inherited.get(k)) {
            out.insert(k.into(), v.clone());
        }
    }
    let dates = out.clone();
    let empty = Map::new();
    for (k, v) in section {
        let child_meta = meta.get(k).and_then(Value::as_object).unwrap_or(&empty);
        let child_section = v.as_object().unwrap_or(&empty);
        out.insert(k.clone(), render_metadata(child_section, child_meta, &dates));
    }
    Value::Object(out)
}

impl Twin {
    /// The twin a device starts with: an enrollment's `initialTwin` (tags and desired).
    pub fn from_initial(initial: Option<&Value>) -> Result<Self, AzureError> {
        let mut t = Twin::default();
        if let Some(init) = initial {
            if let Some(tags) = init.get("tags").and_then(Value::as_object) {
                // Tag names follow the same rules as property names (as a service tags patch).
                let mut tags = tags.clone();
                tags.retain(|k, _| !k.starts_with('$'));
                check_members(&tags, 1)?;
                t.tags = patched(&Map::new(), &tags, MAX_TAGS_BYTES, "tag")?;
            }
            if let Some(d) = init.pointer("/properties/desired").and_then(Value::as_object) {
                let mut d = d.clone();
                d.retain(|k, _| !k.starts_with('$'));
                check_members(&d, 1)?;
                t.desired = patched(&Map::new(), &d, MAX_SECTION_BYTES, "desired")?;
            }
        }
        Ok(t)
    }

    /// Gives a twin without metadata (a new one, or one stored before metadata existed) its
    /// dates: everything in it as of `when` (the device's creation, when nothing better is
    /// known). A twin that has them is unchanged.
    pub fn date_undated(&mut self, when: &str) {
        if !self.desired_metadata.contains_key(LAST_UPDATED) {
            let version = self.desired_version;
            let desired = self.desired.clone();
            stamp(&mut self.desired_metadata, &desired, when, Some(version));
        }
        if !self.reported_metadata.contains_key(LAST_UPDATED) {
            let reported = self.reported.clone();
            stamp(&mut self.reported_metadata, &reported, when, None);
        }
    }

    /// Applies a device's reported-properties patch; returns the new reported version.
    pub fn patch_reported(&mut self, patch: &Map<String, Value>, now: Timestamp) -> Result<u64, AzureError> {
        self.reported = patched(&self.reported, patch, MAX_SECTION_BYTES, "reported")?;
        self.reported_version += 1;
        self.version += 1;
        stamp(&mut self.reported_metadata, patch, &now.to_azure_string(), None);
        Ok(self.reported_version)
    }

    /// Applies a service's desired-properties patch; returns the new desired version.
    pub fn patch_desired(&mut self, patch: &Map<String, Value>, now: Timestamp) -> Result<u64, AzureError> {
        self.desired = patched(&self.desired, patch, MAX_SECTION_BYTES, "desired")?;
        self.desired_version += 1;
        self.version += 1;
        stamp(&mut self.desired_metadata, patch, &now.to_azure_string(), Some(self.desired_version));
        Ok(self.desired_version)
    }

    pub fn patch_tags(&mut self, patch: &Map<String, Value>) -> Result<(), AzureError> {
        self.tags = patched(&self.tags, patch, MAX_TAGS_BYTES, "tag")?;
        self.version += 1;
        Ok(())
    }

    /// Replaces the tags and the desired properties (Azure's replace twin); returns the merge
    /// patch that brings a device's copy of the old desired properties to the new ones, and the
    /// new desired version. Everything written is dated `now`.
    pub fn replace(
        &mut self,
        tags: Map<String, Value>,
        desired: Map<String, Value>,
        now: Timestamp,
    ) -> Result<(Map<String, Value>, u64), AzureError> {
        let tags = patched(&Map::new(), &tags, MAX_TAGS_BYTES, "tag")?;
        let desired = patched(&Map::new(), &desired, MAX_SECTION_BYTES, "desired")?;
        let change = merge_diff(&self.desired, &desired);
        self.tags = tags;
        self.desired = desired;
        self.desired_version += 1;
        self.version += 1;
        self.desired_metadata = Map::new();
        let desired = self.desired.clone();
        stamp(&mut self.desired_metadata, &desired, &now.to_azure_string(), Some(self.desired_version));
        Ok((change, self.desired_version))
    }

    fn with_version(section: &Map<String, Value>, version: u64) -> Value {
        let mut m = section.clone();
        m.insert("$version".into(), json!(version));
        Value::Object(m)
    }

    /// A section as Azure shows it: its members, `$metadata` and `$version`.
    fn with_metadata(section: &Map<String, Value>, meta: &Map<String, Value>, version: u64) -> Value {
        let mut m = section.clone();
        let mut fallback = Map::new();
        fallback.insert(LAST_UPDATED.into(), json!(NEVER));
        m.insert("$metadata".into(), render_metadata(section, meta, &fallback));
        m.insert("$version".into(), json!(version));
        Value::Object(m)
    }

    /// The `properties` of a twin as Azure shows them, to a device and to a service alike.
    fn properties(&self) -> Value {
        json!({
            "desired": Self::with_metadata(&self.desired, &self.desired_metadata, self.desired_version),
            "reported": Self::with_metadata(&self.reported, &self.reported_metadata, self.reported_version),
        })
    }

    /// What a device's twin GET returns: only the properties, each section with `$metadata`
    /// and `$version`.
    pub fn device_view(&self) -> Value {
        self.properties()
    }

    /// The body of a desired-property notification: the patch plus the new `$version`.
    pub fn desired_notification(patch: &Map<String, Value>, version: u64) -> Value {
        Self::with_version(patch, version)
    }

    /// `tags` and `properties` as the service API's twin JSON holds them.
    pub fn service_sections(&self) -> (Value, Value) {
        (Value::Object(self.tags.clone()), self.properties())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    /// A moment `n` seconds into 2024.
    fn at(n: i64) -> Timestamp {
        Timestamp::from_unix_seconds(1_704_067_200 + n)
    }

    fn nested(levels: usize, leaf: Value) -> Value {
        let names = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven"];
        names[..levels].iter().rev().fold(leaf, |v, k| json!({ *k: v }))
    }

    #[test]
    fn initial_twin_then_patches_with_versions() {
        let mut t =
            Twin::from_initial(Some(&json!({"tags": {"site": "lab"}, "properties": {"desired": {"interval": 30}}})))
                .unwrap();
        let view = t.device_view();
        assert_eq!((&view["desired"]["interval"], &view["desired"]["$version"]), (&json!(30), &json!(1)));
        assert_eq!(view["reported"]["$version"], 1);
        assert_eq!(t.patch_reported(&obj(json!({"fw": "1.0", "net": {"ip": "x", "mask": "y"}})), at(1)).unwrap(), 2);
        assert_eq!(t.patch_reported(&obj(json!({"fw": null, "net": {"mask": null}})), at(2)).unwrap(), 3);
        assert_eq!(t.reported, obj(json!({"net": {"ip": "x"}})));
        assert_eq!(t.patch_desired(&obj(json!({"interval": 60})), at(3)).unwrap(), 2);
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
        assert_eq!(t.patch_reported(&big, at(1)).unwrap_err().status(), 413);
        assert_eq!(t.reported_version, 1, "a refused patch changes nothing");
    }

    #[test]
    fn azure_documented_maximum_depth_is_accepted_and_one_more_level_refused() {
        // The documentation's own example: tags.one.two…ten.{"property":"value"}.
        let deepest = nested(10, json!({"property": "value"}));
        for section in [ServiceSection::Tags, ServiceSection::Desired] {
            service_section(&deepest, section).unwrap();
            let e = service_section(&nested(11, json!({"property": "value"})), section).unwrap_err();
            assert_eq!((e.code, e.status()), (ErrorCode::BadRequest, 400));
        }
        parse_patch(deepest.to_string().as_bytes()).unwrap();
        assert!(parse_patch(nested(11, json!({"p": 1})).to_string().as_bytes()).is_err());
        assert!(parse_patch(nested(10, json!({"p": [1]})).to_string().as_bytes()).is_err(), "an array is a level");
        let mut t = Twin::default();
        t.patch_desired(&obj(deepest), at(1)).unwrap();
    }

    #[test]
    fn integers_beyond_two_to_the_52_are_refused() {
        for ok in ["4503599627370495", "-4503599627370496", "0", "1.5", "-2.5e-3", "4503599627370495.0"] {
            let body = format!(r#"{{"n":{ok}}}"#);
            parse_patch(body.as_bytes()).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["4503599627370496", "-4503599627370497", "18446744073709551615", "99999999999999999999999", "1e20"]
        {
            let body = format!(r#"{{"n":{{"deep":[{bad}]}}}}"#);
            let e = parse_patch(body.as_bytes()).unwrap_err();
            assert_eq!(e.status(), 400, "{bad}");
            let v: Value = serde_json::from_str(&format!(r#"{{"n":{bad}}}"#)).unwrap();
            assert!(service_section(&v, ServiceSection::Tags).is_err(), "{bad}");
        }
    }

    #[test]
    fn dollar_names_are_refused_in_tags_and_desired_except_what_a_read_twin_carries() {
        for bad in [json!({"$x": 1}), json!({"a": {"$b": 1}}), json!({"$version": 1})] {
            let e = service_section(&bad, ServiceSection::Tags).unwrap_err();
            assert_eq!((e.code, e.status()), (ErrorCode::BadRequest, 400), "{bad}");
        }
        for bad in [json!({"$x": 1}), json!({"a": {"$b": 1}}), json!({"a": {"$version": 1}})] {
            assert_eq!(service_section(&bad, ServiceSection::Desired).unwrap_err().status(), 400, "{bad}");
        }
        let read_back = json!({"a": 1, "$version": 4, "$metadata": {"$lastUpdated": "x"}});
        assert_eq!(service_section(&read_back, ServiceSection::Desired).unwrap(), obj(json!({"a": 1})));
    }

    #[test]
    fn metadata_dates_every_level_and_desired_versions() {
        let mut t = Twin::default();
        t.date_undated(&at(0).to_azure_string());
        t.patch_desired(&obj(json!({"telemetry": {"every": "5m", "to": "x"}, "mode": "eco"})), at(1)).unwrap();
        t.patch_desired(&obj(json!({"telemetry": {"every": "1m"}})), at(2)).unwrap();
        t.patch_reported(&obj(json!({"fw": {"version": "1.0"}, "gone": 1})), at(3)).unwrap();
        t.patch_reported(&obj(json!({"gone": null})), at(4)).unwrap();
        let (t0, t1, t2, t3, t4) = (
            at(0).to_azure_string(),
            at(1).to_azure_string(),
            at(2).to_azure_string(),
            at(3).to_azure_string(),
            at(4).to_azure_string(),
        );
        let view = t.device_view();
        assert_eq!(
            view["desired"]["$metadata"],
            json!({
                "$lastUpdated": t2, "$lastUpdatedVersion": 3,
                "telemetry": {
                    "$lastUpdated": t2, "$lastUpdatedVersion": 3,
                    "every": {"$lastUpdated": t2, "$lastUpdatedVersion": 3},
                    "to": {"$lastUpdated": t1, "$lastUpdatedVersion": 2},
                },
                "mode": {"$lastUpdated": t1, "$lastUpdatedVersion": 2},
            })
        );
        assert_eq!(view["desired"]["$version"], 3);
        assert_eq!(
            view["reported"]["$metadata"],
            json!({"$lastUpdated": t4, "fw": {"$lastUpdated": t3, "version": {"$lastUpdated": t3}}})
        );
        assert_eq!(t.service_sections().1, view, "the service sees the same properties");
        // Replacing an object with a value drops its nodes.
        t.patch_desired(&obj(json!({"telemetry": "off"})), at(5)).unwrap();
        assert_eq!(
            t.device_view()["desired"]["$metadata"]["telemetry"],
            json!({"$lastUpdated": at(5).to_azure_string(), "$lastUpdatedVersion": 4})
        );
        // A twin stored before metadata is dated as of when the hub says, at every level.
        let mut old: Twin = serde_json::from_value(json!({"tags": {}, "desired": {"a": {"b": 1}}, "desiredVersion": 7,
            "reported": {}, "reportedVersion": 2, "version": 9}))
        .unwrap();
        old.date_undated(&t0);
        assert_eq!(
            old.device_view()["desired"]["$metadata"],
            json!({"$lastUpdated": t0, "$lastUpdatedVersion": 7, "a": {"$lastUpdated": t0, "$lastUpdatedVersion": 7, "b": {"$lastUpdated": t0, "$lastUpdatedVersion": 7}}})
        );
    }

    #[test]
    fn replace_sets_tags_and_desired_and_says_what_changed_for_the_device() {
        let mut t = Twin::default();
        t.patch_tags(&obj(json!({"site": "lab", "old": 1}))).unwrap();
        t.patch_desired(&obj(json!({"a": {"x": 1, "y": 2}, "b": 1, "c": 1})), at(1)).unwrap();
        t.patch_reported(&obj(json!({"r": 1})), at(1)).unwrap();
        let (change, version) =
            t.replace(obj(json!({"site": "field"})), obj(json!({"a": {"x": 1}, "b": 2})), at(2)).unwrap();
        assert_eq!(version, 3);
        assert_eq!(change, obj(json!({"a": {"y": null}, "b": 2, "c": null})));
        assert_eq!(
            (t.tags.clone(), t.desired.clone()),
            (obj(json!({"site": "field"})), obj(json!({"a": {"x": 1}, "b": 2})))
        );
        assert_eq!(t.reported, obj(json!({"r": 1})), "reported properties are the device's");
        let meta = &t.device_view()["desired"]["$metadata"];
        assert_eq!(meta["a"]["x"]["$lastUpdatedVersion"], 3);
        assert!(meta.get("c").is_none());
        let mut big = Map::new();
        for i in 0..10 {
            big.insert(format!("k{i}"), json!("y".repeat(1000)));
        }
        assert_eq!(t.replace(big, Map::new(), at(3)).unwrap_err().status(), 413, "tags over 8 KB");
        assert_eq!(t.desired_version, 3, "a refused replace changes nothing");
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
