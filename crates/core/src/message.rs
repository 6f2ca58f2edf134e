//! Hub messages: MQTT topic property bags and the system properties they carry.
//!
//! A property bag is `key=value` pairs joined by `&`, percent-encoded. Every SDK encodes the `$`
//! of system keys as `%24` (so `%24.mid` and `$.mid` are the same key); a key without `=` has no
//! value (Azure's `null`), `key=` an empty one (`""`): Azure documents the two as distinct.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

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
    /// Application properties sent without a value (`flag`, no `=`): Azure's `null`, which it
    /// keeps distinct from an empty value (`flag=`, in `application` as `""`). A key is in one
    /// of the two, never both. A separate set rather than `Option` values in `application`, so
    /// that code building properties from strings (C2D, the client) is unchanged.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub application_null: BTreeSet<String>,
}

fn decode(s: &str) -> Result<Cow<'_, str>, BagError> {
    percent_decode_str(s).decode_utf8().map_err(|_| BagError::NotUtf8)
}

/// The pairs of `k=v&k2&k3=`, decoded (borrowed unless percent-encoded); a key without `=` has
/// value `None`.
fn bag_pairs(bag: &str) -> impl Iterator<Item = Result<(Cow<'_, str>, Option<Cow<'_, str>>), BagError>> {
    bag.split('&').filter(|p| !p.is_empty()).enumerate().map(|(i, part)| {
        if i == MAX_PROPERTIES {
            return Err(BagError::TooMany);
        }
        let (k, v) = match part.split_once('=') {
            Some((k, v)) => (decode(k)?, Some(decode(v)?)),
            None => (decode(part)?, None),
        };
        if k.is_empty() {
            return Err(BagError::EmptyKey);
        }
        Ok((k, v))
    })
}

/// Parses `k=v&k2&k3=` into ordered pairs; a key without `=` has value `None`.
pub fn parse_bag(bag: &str) -> Result<Vec<(String, Option<String>)>, BagError> {
    bag_pairs(bag).map(|r| r.map(|(k, v)| (k.into_owned(), v.map(Cow::into_owned)))).collect()
}

/// The stream name of a system property's short key (after `$.`).
fn system_property_name(short: &str) -> Result<&'static str, BagError> {
    SYSTEM_PROPERTIES
        .iter()
        .find(|(s, _)| *s == short)
        .map(|(_, n)| *n)
        .ok_or_else(|| BagError::UnknownSystemProperty(short.chars().take(32).collect()))
}

/// Checks a device's telemetry property bag as [`Properties::from_bag`] would, without building
/// it: telemetry is stored with the bag as sent and decoded when read.
pub fn check_bag(bag: &str) -> Result<(), BagError> {
    for pair in bag_pairs(bag) {
        let (k, _) = pair?;
        if let Some(short) = k.strip_prefix("$.") {
            system_property_name(short)?;
        }
    }
    Ok(())
}

impl Properties {
    /// Decodes a device's telemetry property bag. Unknown `$.` keys are refused: they are either
    /// typos or attempts to set hub-owned properties.
    pub fn from_bag(bag: &str) -> Result<Self, BagError> {
        let mut p = Properties::default();
        for pair in bag_pairs(bag) {
            let (k, v) = pair?;
            if let Some(short) = k.strip_prefix("$.") {
                let v = v.map(Cow::into_owned).unwrap_or_default();
                p.system.insert(system_property_name(short)?.to_owned(), v);
            } else {
                p.set_application(k.into_owned(), v.map(Cow::into_owned));
            }
        }
        Ok(p)
    }

    /// Sets an application property: `None` is a property without a value (Azure's `null`).
    /// The last setting of a key wins, as in a bag that repeats one.
    pub fn set_application(&mut self, key: String, value: Option<String>) {
        match value {
            Some(v) => {
                self.application_null.remove(&key);
                self.application.insert(key, v);
            }
            None => {
                self.application.remove(&key);
                self.application_null.insert(key);
            }
        }
    }

    /// The application properties in key order, `None` for one without a value.
    pub fn application_values(&self) -> impl Iterator<Item = (&str, Option<&str>)> {
        let mut all: Vec<(&str, Option<&str>)> = self
            .application
            .iter()
            .map(|(k, v)| (k.as_str(), Some(v.as_str())))
            .chain(self.application_null.iter().map(|k| (k.as_str(), None)))
            .collect();
        all.sort_unstable_by(|a, b| a.0.cmp(b.0));
        all.into_iter()
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
        // Azure's device-bound form: `key` for a property without a value, `key=` for an empty one.
        for (k, v) in self.application_values() {
            match v {
                Some(v) => parts.push(format!("{}={}", enc(k), enc(v))),
                None => parts.push(enc(k)),
            }
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

    /// Issue 14 item 18: Azure keeps `null` (`flag`, no `=`) distinct from `""` (`flag=`).
    #[test]
    fn a_property_without_a_value_is_null_not_empty() {
        let p = Properties::from_bag("flag&empty=&x=1").unwrap();
        assert_eq!(p.application_null.iter().collect::<Vec<_>>(), ["flag"]);
        assert_eq!(p.application.get("empty").map(String::as_str), Some(""));
        assert!(!p.application.contains_key("flag"));
        assert_eq!(p.application_values().collect::<Vec<_>>(), [("empty", Some("")), ("flag", None), ("x", Some("1"))]);
        // The device-bound encoding keeps the distinction (Azure's C2D table), and reads back.
        assert_eq!(p.to_bag(), "empty=&flag&x=1");
        assert_eq!(Properties::from_bag(&p.to_bag()).unwrap(), p);
        // The last setting of a repeated key wins, whichever form it has.
        let p = Properties::from_bag("k&k=v").unwrap();
        assert_eq!((p.application["k"].as_str(), p.application_null.len()), ("v", 0));
        let p = Properties::from_bag("k=v&k").unwrap();
        assert!(p.application.is_empty() && p.application_null.contains("k"));
        // Stored as JSON (C2D messages), the set is there only when used: older rows read.
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["application_null"], serde_json::json!(["k"]));
        let old: Properties = serde_json::from_str(r#"{"system":{},"application":{"a":"b"}}"#).unwrap();
        assert!(old.application_null.is_empty());
        assert!(!serde_json::to_string(&old).unwrap().contains("null"));
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

    #[test]
    fn check_bag_refuses_what_from_bag_refuses() {
        for bag in ["%24.bogus=1", "=1", "a=%ff", "%ff=1", "$.mid=1&&x&$.nope"] {
            assert!(check_bag(bag).is_err(), "{bag}");
        }
        assert_eq!(check_bag("%24.mid=m%201&%24.ct=application%2Fjson&temp%20alert=a%2Fb%26c&x"), Ok(()));
    }

    #[test]
    fn a_received_event_reads_back_decoded() {
        let received = ReceivedEvent {
            hub: "h.example".into(),
            device_id: "Dev-1".into(),
            enqueued_time: crate::time::Timestamp::from_unix_seconds(0),
            bag: "%24.mid=m%201&x=1".into(),
            connection: None,
            body: b"{}".to_vec(),
        };
        let e = TelemetryEvent::from_received(7, "h.example", received).unwrap();
        assert_eq!(
            (e.seq, e.device_id.as_str(), e.enqueued_time.as_str()),
            (7, "Dev-1", "1970-01-01T00:00:00.0000000Z")
        );
        assert_eq!(e.properties.system["message-id"], "m 1");
        assert_eq!(e.properties.application["x"], "1");
        assert_eq!(e.body, b"{}");
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,200}") {
            let _ = Properties::from_bag(&s);
        }

        #[test]
        fn check_bag_agrees_with_from_bag(s in "[a-z$.%0-9=&]{0,60}") {
            proptest::prop_assert_eq!(check_bag(&s).is_ok(), Properties::from_bag(&s).is_ok());
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
    /// How the sender's connection was authenticated; `None` for events stored before it was
    /// recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<ConnectionAuth>,
    #[serde(with = "body_b64")]
    pub body: Vec<u8>,
}

/// How the connection a device-to-cloud message came on was authenticated: what Azure reports
/// on every event as `iothub-connection-auth-method` and `iothub-connection-auth-generation-id`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionAuth {
    pub method: AuthMethod,
    /// The `generationId` of the device identity the connection authenticated as: it tells a
    /// device deleted and created again under the same id from the one before.
    pub generation_id: String,
}

/// The credential a device connection was authenticated with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AuthMethod {
    /// A SAS token signed with one of the device's keys.
    Sas,
    /// A client certificate matching the identity's thumbprint.
    X509SelfSigned,
    /// A client certificate chaining to a trusted CA.
    X509Ca,
    /// A SAS token of a hub shared access policy with `DeviceConnect`, acting for the device
    /// (a protocol gateway, over HTTPS).
    HubPolicy,
}

/// A device-to-cloud message as received, before it has a position: stored as it came (the
/// property bag as sent, already checked with [`check_bag`]) and decoded only when read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedEvent {
    pub hub: String,
    pub device_id: String,
    pub enqueued_time: crate::time::Timestamp,
    pub bag: String,
    /// How the sender's connection was authenticated (`None` for events stored before it was).
    pub connection: Option<ConnectionAuth>,
    pub body: Vec<u8>,
}

impl TelemetryEvent {
    /// The event a stored [`ReceivedEvent`] is read back as, at position `seq` of `hub`.
    pub fn from_received(seq: u64, hub: &str, received: ReceivedEvent) -> Result<Self, BagError> {
        Ok(TelemetryEvent {
            seq,
            hub: hub.to_owned(),
            device_id: received.device_id,
            module_id: None,
            enqueued_time: received.enqueued_time.to_azure_string(),
            properties: Properties::from_bag(&received.bag)?,
            connection: received.connection,
            body: received.body,
        })
    }
}

/// A cloud-to-device message waiting for (or in) delivery.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// What feedback the sender asked for (`iothub-ack`).
    #[serde(default)]
    pub ack: crate::feedback::AckMode,
    /// The device identity's generation when the message was sent (in its feedback records).
    #[serde(default)]
    pub device_generation_id: String,
    /// How many times it was handed out with a lock (the HTTPS receive); at the hub's maximum,
    /// the next delivery dead-letters it instead.
    #[serde(default)]
    pub delivery_count: u32,
    /// The lock (HTTPS receive's `ETag`) while a device holds the message, until `locked_until`
    /// (Unix seconds); it is invisible to other receives meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_token: Option<String>,
    #[serde(default)]
    pub locked_until: i64,
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
