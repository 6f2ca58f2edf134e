//! The IoT Hub device MQTT vocabulary: CONNECT usernames, the topics a device may use, and the
//! topics the hub sends on. Pure parsing and formatting.
//!
//! Rules from the SDKs: `?$rid=` first in every response query (C and C# parse it positionally);
//! nothing after the rid in a method request topic (C copies the rest into the rid); device-bound
//! topics end in `/` before the property bag (Node matches on it).

use fleetgate_core::topic::{request_id_ok, topic_name_ok};
use percent_encoding::percent_decode_str;

/// A hub CONNECT username: `{hubHostName}/{deviceId}/?api-version=...&DeviceClientType=...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubUsername {
    pub host_name: String,
    pub device_id: String,
    pub module_id: Option<String>,
    pub api_version: Option<String>,
}

impl HubUsername {
    /// The SDKs put the device id in the username as it is, not percent-encoded (Python's
    /// pipeline says so; C# and Node do the same), and a device id may hold `?`, `=`, `%`…
    /// (never `/`): the host ends at the first `/`, the id at the next, and the query is what
    /// follows `/?` after the id (or the module id).
    pub fn parse(username: &str) -> Option<Self> {
        let (host, rest) = username.split_once('/')?;
        let (device, rest) = rest.split_once('/').unwrap_or((rest, ""));
        let (module, query) = match rest.strip_prefix('?') {
            Some(query) => (None, query),
            None => {
                let (module, tail) = rest.split_once('/').unwrap_or((rest, ""));
                if !(tail.is_empty() || tail.starts_with('?')) {
                    return None;
                }
                ((!module.is_empty()).then(|| module.to_owned()), tail.strip_prefix('?').unwrap_or(""))
            }
        };
        if host.is_empty() || device.is_empty() || host.contains(char::is_whitespace) {
            return None;
        }
        let api_version = query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == "api-version").then(|| percent_decode_str(v).decode_utf8_lossy().into_owned())
        });
        Some(Self { host_name: host.to_owned(), device_id: device.to_owned(), module_id: module, api_version })
    }
}

/// Whether a topic's device segment names `device_id`. IoT Hub takes the id as it is (the Python
/// SDK stopped percent-encoding it in 2020 because the hub does not decode it); the
/// percent-encoded form older SDK versions sent is accepted too: it names the same device, the
/// one the connection authenticated as.
fn names_device(segment: &str, device_id: &str) -> bool {
    segment == device_id || percent_decode_str(segment).decode_utf8().is_ok_and(|d| d == device_id)
}

/// What a device's PUBLISH asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceRequest {
    /// Telemetry with the (still encoded) property bag that followed `messages/events/`.
    Telemetry {
        bag: String,
    },
    TwinGet {
        rid: String,
    },
    TwinPatchReported {
        rid: String,
    },
    MethodResponse {
        status: i32,
        rid: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicError {
    /// Not a topic a device may publish to.
    Unknown,
    /// Another device's topic: a topic-authorization violation.
    Forbidden,
    /// The right topic without a usable `$rid` (missing, or one that would change the response
    /// topic when echoed), a bad status, or a wildcard in the topic name.
    Malformed,
}

fn query_value(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (percent_decode_str(k).decode_utf8_lossy() == name)
            .then(|| percent_decode_str(v).decode_utf8_lossy().into_owned())
    })
}

/// The decoded `$rid`, refused unless it can be echoed into a response topic unchanged (a
/// `%23` would come back as a `#`, a `%2F` as a new topic level).
fn rid_of(query: &str) -> Result<String, TopicError> {
    query_value(query, "$rid").filter(|r| request_id_ok(r)).ok_or(TopicError::Malformed)
}

/// Parses a PUBLISH topic from the device connected as `device_id`.
pub fn parse_publish_topic(topic: &str, device_id: &str) -> Result<DeviceRequest, TopicError> {
    if !topic_name_ok(topic) {
        return Err(TopicError::Malformed);
    }
    if let Some(rest) = topic.strip_prefix("devices/") {
        let (id, rest) = rest.split_once('/').ok_or(TopicError::Unknown)?;
        let bag = match rest {
            "messages/events" | "messages/events/" => "",
            r => r.strip_prefix("messages/events/").ok_or(TopicError::Unknown)?,
        };
        if !names_device(id, device_id) {
            return Err(TopicError::Forbidden);
        }
        return Ok(DeviceRequest::Telemetry { bag: bag.to_owned() });
    }
    let (path, query) = topic.split_once('?').ok_or(TopicError::Unknown)?;
    let path = path.trim_end_matches('/');
    if path == "$iothub/twin/GET" {
        return Ok(DeviceRequest::TwinGet { rid: rid_of(query)? });
    }
    if path == "$iothub/twin/PATCH/properties/reported" {
        return Ok(DeviceRequest::TwinPatchReported { rid: rid_of(query)? });
    }
    if let Some(status) = path.strip_prefix("$iothub/methods/res/") {
        let status = status.parse::<i32>().map_err(|_| TopicError::Malformed)?;
        return Ok(DeviceRequest::MethodResponse { status, rid: rid_of(query)? });
    }
    Err(TopicError::Unknown)
}

/// The property bag a telemetry message is taken with: the device's bag, plus what Azure adds
/// for MQTT (application properties, after the device's so they win over a device's own):
/// `mqtt-retain=true` when the PUBLISH had RETAIN set (IoT Hub keeps no retained messages and
/// passes them on marked so), and `iothub-MessageType=Will` for a Will message.
pub fn telemetry_bag(bag: &str, retain: bool, will: bool) -> std::borrow::Cow<'_, str> {
    if !retain && !will {
        return bag.into();
    }
    let mut out = bag.to_owned();
    for (on, property) in [(retain, "mqtt-retain=true"), (will, "iothub-MessageType=Will")] {
        if on {
            if !out.is_empty() {
                out.push('&');
            }
            out.push_str(property);
        }
    }
    out.into()
}

/// The property bag of a CONNECT's Will topic when it is the device's own telemetry topic, the
/// only Will IoT Hub forwards; `None` for any other topic (ignored, as IoT Hub does).
pub fn will_bag(topic: &str, device_id: &str) -> Option<String> {
    match parse_publish_topic(topic, device_id) {
        Ok(DeviceRequest::Telemetry { bag }) => Some(bag),
        _ => None,
    }
}

/// Which stream a subscription filter opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subscription {
    CloudToDevice,
    TwinResponses,
    DesiredPatches,
    Methods,
}

impl Subscription {
    /// A stable name, for persisting a device's session.
    pub fn name(self) -> &'static str {
        match self {
            Subscription::CloudToDevice => "c2d",
            Subscription::TwinResponses => "twin",
            Subscription::DesiredPatches => "desired",
            Subscription::Methods => "methods",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        [Subscription::CloudToDevice, Subscription::TwinResponses, Subscription::DesiredPatches, Subscription::Methods]
            .into_iter()
            .find(|x| x.name() == s)
    }
}

/// The documented filters only, and only the device's own C2D topic.
pub fn subscription(filter: &str, device_id: &str) -> Option<Subscription> {
    match filter {
        "$iothub/twin/res/#" => Some(Subscription::TwinResponses),
        "$iothub/twin/PATCH/properties/desired/#" => Some(Subscription::DesiredPatches),
        "$iothub/methods/POST/#" => Some(Subscription::Methods),
        f => {
            let rest = f.strip_prefix("devices/")?;
            let (id, tail) = rest.split_once('/')?;
            (names_device(id, device_id) && (tail == "messages/devicebound/#" || tail == "messages/devicebound/"))
                .then_some(Subscription::CloudToDevice)
        }
    }
}

pub fn twin_response_topic(status: u16, rid: &str, version: Option<u64>) -> String {
    match version {
        Some(v) => format!("$iothub/twin/res/{status}/?$rid={rid}&$version={v}"),
        None => format!("$iothub/twin/res/{status}/?$rid={rid}"),
    }
}

pub fn desired_patch_topic(version: u64) -> String {
    format!("$iothub/twin/PATCH/properties/desired/?$version={version}")
}

pub fn method_request_topic(method: &str, rid: &str) -> String {
    format!("$iothub/methods/POST/{}/?$rid={rid}", fleetgate_core::message::encode_component(method))
}

/// The device id as it is: IoT Hub does not percent-encode it in topics, and the SDKs match
/// C2D topics on the unencoded id (Python 2.14: `"devices/{id}/messages/devicebound" in topic`).
pub fn c2d_topic(device_id: &str, bag: &str) -> String {
    format!("devices/{device_id}/messages/devicebound/{bag}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_of_every_sdk() {
        let py = HubUsername::parse("myhub.azure-devices.net/dev-001/?api-version=2019-10-01&DeviceClientType=azure-iot-device-iothub-py%2F2.14.0").unwrap();
        assert_eq!((py.host_name.as_str(), py.device_id.as_str()), ("myhub.azure-devices.net", "dev-001"));
        assert_eq!(py.api_version.as_deref(), Some("2019-10-01"));
        let node = HubUsername::parse(
            "h/dev/?api-version=2021-04-12&model-id=dtmi:com:example:Thermostat;1&DeviceClientType=x",
        )
        .unwrap();
        assert_eq!(node.device_id, "dev");
        let module = HubUsername::parse("h/dev/mod/?api-version=2020-09-30").unwrap();
        assert_eq!(module.module_id.as_deref(), Some("mod"));
        for bad in ["", "h", "h/", "/dev/?x", "h//?x", "a/b/c/d/?x"] {
            assert!(HubUsername::parse(bad).is_none(), "{bad}");
        }
    }

    /// Issue 14 item 1: device ids hold `?`, `=`, `%`, `$`… and the SDKs send them unencoded in
    /// the username and in topics (older Python versions percent-encoded them in topics).
    #[test]
    fn device_ids_with_symbols_in_usernames_and_topics() {
        for id in ["a?b", "?x", "a=b&c", "a%41", "$x", "a'b(c)!*,:@.-_"] {
            let u = HubUsername::parse(&format!("h/{id}/?api-version=2019-10-01&DeviceClientType=py")).unwrap();
            assert_eq!((u.device_id.as_str(), u.module_id.as_deref()), (id, None), "{id}");
            assert_eq!(u.api_version.as_deref(), Some("2019-10-01"));
            assert_eq!(HubUsername::parse(&format!("h/{id}")).unwrap().device_id, id);
            let encoded = percent_encoding::utf8_percent_encode(id, fleetgate_core::sas::URI_COMPONENT).to_string();
            for seg in [encoded.as_str(), id] {
                assert_eq!(
                    parse_publish_topic(&format!("devices/{seg}/messages/events/a=1"), id),
                    Ok(DeviceRequest::Telemetry { bag: "a=1".into() }),
                    "{seg}"
                );
                assert_eq!(
                    subscription(&format!("devices/{seg}/messages/devicebound/#"), id),
                    Some(Subscription::CloudToDevice)
                );
            }
            assert_eq!(c2d_topic(id, ""), format!("devices/{id}/messages/devicebound/"));
            assert_eq!(
                parse_publish_topic(&format!("devices/{encoded}x/messages/events/"), id),
                Err(TopicError::Forbidden)
            );
        }
        let m = HubUsername::parse("h/a?b/m=1/?api-version=x").unwrap();
        assert_eq!((m.device_id.as_str(), m.module_id.as_deref()), ("a?b", Some("m=1")));
        assert_eq!(
            parse_publish_topic("devices/a%2541/messages/events/", "a%41"),
            Ok(DeviceRequest::Telemetry { bag: String::new() })
        );
        assert_eq!(
            parse_publish_topic("devices/a%41/messages/events/", "aA"),
            Ok(DeviceRequest::Telemetry { bag: String::new() })
        );
    }

    #[test]
    fn device_topics() {
        assert_eq!(
            parse_publish_topic("devices/d1/messages/events/%24.mid=1&a=b", "d1"),
            Ok(DeviceRequest::Telemetry { bag: "%24.mid=1&a=b".into() })
        );
        assert_eq!(
            parse_publish_topic("devices/d1/messages/events/", "d1"),
            Ok(DeviceRequest::Telemetry { bag: String::new() })
        );
        assert_eq!(
            parse_publish_topic("devices/d1/messages/events", "d1"),
            Ok(DeviceRequest::Telemetry { bag: String::new() })
        );
        assert_eq!(parse_publish_topic("devices/d2/messages/events/", "d1"), Err(TopicError::Forbidden));
        assert_eq!(parse_publish_topic("devices/D1/messages/events/", "d1"), Err(TopicError::Forbidden));
        assert_eq!(
            parse_publish_topic("$iothub/twin/GET/?$rid=8c", "d1"),
            Ok(DeviceRequest::TwinGet { rid: "8c".into() })
        );
        assert_eq!(
            parse_publish_topic("$iothub/twin/PATCH/properties/reported/?$rid=11", "d1"),
            Ok(DeviceRequest::TwinPatchReported { rid: "11".into() })
        );
        assert_eq!(
            parse_publish_topic("$iothub/methods/res/200/?$rid=1", "d1"),
            Ok(DeviceRequest::MethodResponse { status: 200, rid: "1".into() })
        );
        assert_eq!(parse_publish_topic("$iothub/twin/GET/", "d1"), Err(TopicError::Unknown));
        assert_eq!(parse_publish_topic("$iothub/twin/GET/?x=1", "d1"), Err(TopicError::Malformed));
        assert_eq!(parse_publish_topic("$iothub/methods/res/abc/?$rid=1", "d1"), Err(TopicError::Malformed));
        assert_eq!(
            parse_publish_topic("$dps/registrations/PUT/iotdps-register/?$rid=1", "d1"),
            Err(TopicError::Unknown)
        );
        assert_eq!(parse_publish_topic("devices/d1/messages/devicebound/", "d1"), Err(TopicError::Unknown));
    }

    #[test]
    fn rids_that_would_reshape_the_response_topic_and_wildcards_are_refused() {
        for rid in ["%23", "a%2Fb", "a%26%24version%3D1", "%2B", "a%3Fb", "a%25", "a%20b", ""] {
            for topic in [
                format!("$iothub/twin/GET/?$rid={rid}"),
                format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}"),
                format!("$iothub/methods/res/200/?$rid={rid}"),
            ] {
                assert_eq!(parse_publish_topic(&topic, "d1"), Err(TopicError::Malformed), "{topic}");
            }
        }
        for topic in [
            "devices/d1/messages/events/#",
            "devices/d1/messages/events/a=+",
            "devices/d1/messages/events/+/x",
            "$iothub/twin/GET/?$rid=1#",
            "$iothub/methods/res/200/?$rid=+",
        ] {
            assert_eq!(parse_publish_topic(topic, "d1"), Err(TopicError::Malformed), "{topic}");
        }
        // Percent-encoded property values are fine: they are decoded into the message, never echoed.
        assert!(parse_publish_topic("devices/d1/messages/events/a=%23%2B%2F", "d1").is_ok());
        assert_eq!(
            parse_publish_topic("$iothub/twin/GET/?$rid=6f1d3c0e-0b4e-4b7e-9b55-0d0d5c1e2f3a", "d1"),
            Ok(DeviceRequest::TwinGet { rid: "6f1d3c0e-0b4e-4b7e-9b55-0d0d5c1e2f3a".into() })
        );
    }

    /// Issue 14 items 15 and 16: what Azure adds to MQTT telemetry.
    #[test]
    fn retain_and_will_add_their_application_properties() {
        assert_eq!(telemetry_bag("a=1", false, false), "a=1");
        assert_eq!(telemetry_bag("", true, false), "mqtt-retain=true");
        assert_eq!(telemetry_bag("a=1", true, false), "a=1&mqtt-retain=true");
        assert_eq!(telemetry_bag("", false, true), "iothub-MessageType=Will");
        assert_eq!(telemetry_bag("%24.mid=1", true, true), "%24.mid=1&mqtt-retain=true&iothub-MessageType=Will");
        // The hub's value wins over one the device set itself.
        let p = fleetgate_core::message::Properties::from_bag(&telemetry_bag("mqtt-retain=no", true, false)).unwrap();
        assert_eq!(p.application["mqtt-retain"], "true");
        assert_eq!(will_bag("devices/d1/messages/events/", "d1").as_deref(), Some(""));
        assert_eq!(will_bag("devices/d1/messages/events/a=b", "d1").as_deref(), Some("a=b"));
        for other in
            ["devices/d2/messages/events/", "status/d1", "$iothub/twin/GET/?$rid=1", "devices/d1/messages/events/#"]
        {
            assert_eq!(will_bag(other, "d1"), None, "{other}");
        }
    }

    #[test]
    fn subscriptions() {
        assert_eq!(subscription("devices/d1/messages/devicebound/#", "d1"), Some(Subscription::CloudToDevice));
        assert_eq!(subscription("devices/d2/messages/devicebound/#", "d1"), None);
        assert_eq!(subscription("$iothub/twin/res/#", "d1"), Some(Subscription::TwinResponses));
        assert_eq!(subscription("$iothub/methods/POST/#", "d1"), Some(Subscription::Methods));
        assert_eq!(subscription("#", "d1"), None);
        assert_eq!(subscription("devices/+/messages/devicebound/#", "d1"), None);
    }

    #[test]
    fn outgoing_topics() {
        assert_eq!(twin_response_topic(204, "11", Some(8)), "$iothub/twin/res/204/?$rid=11&$version=8");
        assert_eq!(twin_response_topic(200, "8c", None), "$iothub/twin/res/200/?$rid=8c");
        assert_eq!(desired_patch_topic(5), "$iothub/twin/PATCH/properties/desired/?$version=5");
        assert_eq!(method_request_topic("reboot", "1"), "$iothub/methods/POST/reboot/?$rid=1");
        assert_eq!(c2d_topic("d1", "%24.mid=1"), "devices/d1/messages/devicebound/%24.mid=1");
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,200}", d in "[a-z0-9-]{1,10}") {
            let _ = HubUsername::parse(&s);
            let _ = parse_publish_topic(&s, &d);
            let _ = subscription(&s, &d);
        }
    }
}
