//! Hub messages: MQTT topic property bags and the system properties they carry.
//!
//! A property bag is `key=value` pairs joined by `&`, percent-encoded. Every SDK encodes the `$`
//! of system keys as `%24` (so `%24.mid` and `$.mid` are the same key); a key without `=` has no
//! value, `key=` an empty one.

use std::collections::BTreeMap;

use percent_encoding::{percent_decode_str, utf8_percent_encode};

use crate::sas::URI_COMPONENT;

/// Most properties one message may carry (Azure's limit on application properties is 81 KB of
/// them in total; a count bound keeps the parser's work small too).
pub const MAX_PROPERTIES: usize = 128;

/// System property keys (after `$.`) and the names the hub's event stream reports them under.
pub const SYSTEM_PROPERTIES: &[(&str, &str)] = &[
    ("mid", "message-id"),
    ("cid", "correlation-id"),
    ("uid", "user-id"),
    ("ct", "content-type"),
    ("ce", "content-encoding"),
    ("exp", "absolute-expiry-time"),
    ("to", "to"),
    ("on", "iothub-outputname"),
    ("ifid", "iothub-interface-id"),
    ("sub", "dt-subject"),
    ("ctime", "iothub-creation-time-utc"),
    ("diagid", "iothub-diag-id"),
    ("diagctx", "iothub-diag-correlation-context"),
    ("schema", "dt-dataschema"),
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BagError {
    #[error("property bag has more than {MAX_PROPERTIES} properties")]
    TooMany,
    #[error("property bag has an empty key")]
    EmptyKey,
    #[error("property bag is not valid UTF-8 once percent-decoded")]
    NotUtf8,
    #[error("property bag has an unknown system property '$.{0}'")]
    UnknownSystemProperty(String),
}

/// A decoded property bag, split into system properties (keyed by their stream names, e.g.
/// `message-id`) and application properties (as sent).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Properties {
    pub system: BTreeMap<String, String>,
    pub application: BTreeMap<String, String>,
}

fn decode(s: &str) -> Result<String, BagError> {
    percent_decode_str(s).decode_utf8().map(|c| c.into_owned()).map_err(|_| BagError::NotUtf8)
}

/// Parses `k=v&k2&k3=` into ordered pairs; a key without `=` has value `None`.
pub fn parse_bag(bag: &str) -> Result<Vec<(String, Option<String>)>, BagError> {
    let mut out = Vec::new();
    for part in bag.split('&').filter(|p| !p.is_empty()) {
        if out.len() == MAX_PROPERTIES {
            return Err(BagError::TooMany);
        }
        let (k, v) = match part.split_once('=') {
            Some((k, v)) => (decode(k)?, Some(decode(v)?)),
            None => (decode(part)?, None),
        };
        if k.is_empty() {
            return Err(BagError::EmptyKey);
        }
        out.push((k, v));
    }
    Ok(out)
}

impl Properties {
    /// Decodes a device's telemetry property bag. Unknown `$.` keys are refused: they are either
    /// typos or attempts to set hub-owned properties.
    pub fn from_bag(bag: &str) -> Result<Self, BagError> {
        let mut p = Properties::default();
        for (k, v) in parse_bag(bag)? {
            let v = v.unwrap_or_default();
            if let Some(short) = k.strip_prefix("$.") {
                let name = SYSTEM_PROPERTIES
                    .iter()
                    .find(|(s, _)| *s == short)
                    .map(|(_, n)| *n)
                    .ok_or_else(|| BagError::UnknownSystemProperty(short.chars().take(32).collect()))?;
                p.system.insert(name.to_owned(), v);
            } else {
                p.application.insert(k, v);
            }
        }
        Ok(p)
    }

    /// Encodes for a device-bound topic: system keys as `%24.{short}` (the C SDK only recognizes
    /// that form), then application properties; everything percent-encoded.
    pub fn to_bag(&self) -> String {
        let enc = |s: &str| utf8_percent_encode(s, URI_COMPONENT).to_string();
        let mut parts = Vec::new();
        for (short, name) in SYSTEM_PROPERTIES {
            if let Some(v) = self.system.get(*name) {
                parts.push(format!("%24.{short}={}", enc(v)));
            }
        }
        for (k, v) in &self.application {
            parts.push(format!("{}={}", enc(k), enc(v)));
        }
        parts.join("&")
    }
}

/// Percent-encodes one value as Python's `quote(safe="")` does.
pub fn encode_component(s: &str) -> String {
    utf8_percent_encode(s, URI_COMPONENT).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_bag_from_wire_examples() {
        // F2 of wire-examples.md, verified against the Python SDK's encoder.
        let p = Properties::from_bag("%24.mid=m%201&%24.ct=application%2Fjson&%24.ce=utf-8&temp%20alert=a%2Fb%26c&x=1")
            .unwrap();
        assert_eq!(p.system["message-id"], "m 1");
        assert_eq!(p.system["content-type"], "application/json");
        assert_eq!(p.system["content-encoding"], "utf-8");
        assert_eq!(p.application["temp alert"], "a/b&c");
        assert_eq!(p.application["x"], "1");
    }

    #[test]
    fn raw_dollar_keys_and_value_forms() {
        let bag = parse_bag("$.ct=application%2Fjson&flag&empty=&a+b=c+d").unwrap();
        assert_eq!(bag[0], ("$.ct".into(), Some("application/json".into())));
        assert_eq!(bag[1], ("flag".into(), None));
        assert_eq!(bag[2], ("empty".into(), Some(String::new())));
        // `+` is a literal plus, not a space.
        assert_eq!(bag[3], ("a+b".into(), Some("c+d".into())));
    }

    #[test]
    fn refusals() {
        assert_eq!(Properties::from_bag("%24.bogus=1"), Err(BagError::UnknownSystemProperty("bogus".into())));
        assert_eq!(parse_bag("=1"), Err(BagError::EmptyKey));
        assert_eq!(parse_bag("a=%ff"), Err(BagError::NotUtf8));
        let many = (0..200).map(|i| format!("k{i}=v")).collect::<Vec<_>>().join("&");
        assert_eq!(parse_bag(&many), Err(BagError::TooMany));
    }

    #[test]
    fn device_bound_encoding_round_trips() {
        let mut p = Properties::default();
        p.system.insert("message-id".into(), "c2d 42".into());
        p.system.insert("content-type".into(), "text/plain".into());
        p.application.insert("priority".into(), "a&b=c".into());
        let bag = p.to_bag();
        assert_eq!(bag, "%24.mid=c2d%2042&%24.ct=text%2Fplain&priority=a%26b%3Dc");
        assert_eq!(Properties::from_bag(&bag).unwrap(), p);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,200}") {
            let _ = Properties::from_bag(&s);
        }

        #[test]
        fn application_properties_round_trip(k in "[a-zA-Z0-9 /&=%]{1,12}", v in "\\PC{0,20}") {
            let mut p = Properties::default();
            p.application.insert(k, v);
            proptest::prop_assert_eq!(Properties::from_bag(&p.to_bag()).unwrap(), p);
        }
    }
}

/// A device-to-cloud message as the hub stores it: appended once, read by position.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TelemetryEvent {
    /// Position in the hub's stream (assigned at append; 0 before).
    pub seq: u64,
    pub hub: String,
    pub device_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_id: Option<String>,
    pub enqueued_time: String,
    pub properties: Properties,
    #[serde(with = "body_b64")]
    pub body: Vec<u8>,
}

/// A cloud-to-device message waiting for (or in) delivery.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct C2dMessage {
    /// Unique per message; also the `message-id` system property when the sender set none.
    pub id: String,
    pub hub: String,
    pub device_id: String,
    pub enqueued_time: String,
    /// Unix seconds after which the message is dropped undelivered.
    pub expiry: i64,
    pub properties: Properties,
    #[serde(with = "body_b64")]
    pub body: Vec<u8>,
}

mod body_b64 {
    use base64::Engine;
    pub fn serialize<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b))
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s: String = serde::Deserialize::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}
