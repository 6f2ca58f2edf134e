//! The DPS MQTT vocabulary: CONNECT usernames, request topics and response topics.
//!
//! Pure parsing and formatting; the server's MQTT session feeds it strings and sends what it
//! returns. Rules come from the official SDKs (see the wire-protocol notes): `$rid` first in the
//! response query, an integer `retry-after`, percent-encoded query values accepted.

use fleetgate_core::topic::{request_id_ok, topic_name_ok};
use percent_encoding::percent_decode_str;

/// The only topic filter a DPS client may subscribe to.
pub const RESPONSE_FILTER: &str = "$dps/registrations/res/#";

/// A parsed DPS CONNECT username: `{idScope}/registrations/{registrationId}/api-version=...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpsUsername {
    pub id_scope: String,
    pub registration_id: String,
    pub api_version: Option<String>,
}

impl DpsUsername {
    /// `None` when the username is not in the DPS form.
    pub fn parse(username: &str) -> Option<Self> {
        let mut parts = username.splitn(4, '/');
        let id_scope = parts.next()?.to_owned();
        if parts.next()? != "registrations" {
            return None;
        }
        let registration_id = parts.next()?.to_owned();
        let rest = parts.next().unwrap_or("");
        if id_scope.is_empty() || registration_id.is_empty() {
            return None;
        }
        let api_version = query_param(rest.trim_start_matches('?'), "api-version");
        Some(Self { id_scope, registration_id, api_version })
    }
}

/// A device's request on a DPS topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DpsRequest {
    Register { rid: String },
    OperationStatus { rid: String, operation_id: String },
}

/// Why a PUBLISH topic is not a DPS request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicError {
    /// Not a `$dps/registrations/...` request topic at all.
    Unknown,
    /// The right topic, but without a `$rid` (or an operation-status request without an id).
    MissingParameter(&'static str),
    /// A wildcard in the topic name, or a `$rid` that would change the response topic when
    /// echoed (a decoded `#`, `/`, `&`...).
    Malformed,
}

/// Parses `$dps/registrations/PUT/iotdps-register/?$rid={rid}` and
/// `$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={id}`.
pub fn parse_request_topic(topic: &str) -> Result<DpsRequest, TopicError> {
    if !topic_name_ok(topic) {
        return Err(TopicError::Malformed);
    }
    let (path, query) = topic.split_once('?').ok_or(TopicError::Unknown)?;
    let path = path.trim_end_matches('/');
    let rid = || match query_param(query, "$rid").filter(|r| !r.is_empty()) {
        None => Err(TopicError::MissingParameter("$rid")),
        Some(r) if !request_id_ok(&r) => Err(TopicError::Malformed),
        Some(r) => Ok(r),
    };
    if path.eq_ignore_ascii_case("$dps/registrations/PUT/iotdps-register") {
        Ok(DpsRequest::Register { rid: rid()? })
    } else if path.eq_ignore_ascii_case("$dps/registrations/GET/iotdps-get-operationstatus") {
        let operation_id = query_param(query, "operationId")
            .filter(|o| !o.is_empty())
            .ok_or(TopicError::MissingParameter("operationId"))?;
        Ok(DpsRequest::OperationStatus { rid: rid()?, operation_id })
    } else {
        Err(TopicError::Unknown)
    }
}

/// `$dps/registrations/res/{status}/?$rid={rid}[&retry-after={secs}]`; `$rid` always first.
pub fn response_topic(status: u16, rid: &str, retry_after: Option<u32>) -> String {
    let mut t = format!("$dps/registrations/res/{status}/?$rid={rid}");
    if let Some(secs) = retry_after {
        t.push_str(&format!("&retry-after={secs}"));
    }
    t
}

/// The optional custom `payload` of a register body. Bodies may be empty (C#), a single space
/// (Python/Node polls) or JSON with or without `registrationId`; the id itself always comes
/// from the connection, never from here.
pub fn register_payload(body: &[u8]) -> Result<Option<serde_json::Value>, String> {
    let text = std::str::from_utf8(body).map_err(|_| "request body is not UTF-8".to_owned())?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("request body is not valid JSON: {e}"))?;
    match v {
        serde_json::Value::Object(mut m) => Ok(m.remove("payload").filter(|p| !p.is_null())),
        _ => Err("request body must be a JSON object".to_owned()),
    }
}

/// Finds `name` in an `&`-separated query and percent-decodes its value (also an HTTPS request's
/// query).
pub(crate) fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode_str(k).decode_utf8_lossy();
        (k == name).then(|| percent_decode_str(v).decode_utf8_lossy().into_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_of_every_sdk() {
        let py = "0ne00000001/registrations/dev-001/api-version=2019-03-31&ClientVersion=azure-iot-device-provisioning-py%2F2.14.0%283.11.7%3BLinux%206.1.0%3Bx86_64%29";
        let u = DpsUsername::parse(py).unwrap();
        assert_eq!((u.id_scope.as_str(), u.registration_id.as_str()), ("0ne00000001", "dev-001"));
        assert_eq!(u.api_version.as_deref(), Some("2019-03-31"));
        let c = DpsUsername::parse("0ne00000001/registrations/dev-001/api-version=2021-06-01&ClientVersion=1.15.0")
            .unwrap();
        assert_eq!(c.api_version.as_deref(), Some("2021-06-01"));
        assert!(DpsUsername::parse("0ne00000001/registrations/dev-001").is_some());
        for bad in [
            "",
            "localhost/dev-001/?api-version=2019-10-01",
            "0ne00000001/devices/dev-001/x",
            "/registrations/x/",
            "0ne/registrations//x",
        ] {
            assert!(DpsUsername::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn request_topics() {
        assert_eq!(
            parse_request_topic("$dps/registrations/PUT/iotdps-register/?$rid=6f1d3c0e-0b4e"),
            Ok(DpsRequest::Register { rid: "6f1d3c0e-0b4e".into() })
        );
        // Python percent-encodes the rid and operation id.
        assert_eq!(
            parse_request_topic(
                "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=a%2Db&operationId=5.0123.abc%3Ad"
            ),
            Ok(DpsRequest::OperationStatus { rid: "a-b".into(), operation_id: "5.0123.abc:d".into() })
        );
        assert_eq!(
            parse_request_topic("$dps/registrations/PUT/iotdps-register/?$rid=3"),
            Ok(DpsRequest::Register { rid: "3".into() })
        );
        assert_eq!(
            parse_request_topic("$dps/registrations/PUT/iotdps-register/?x=1"),
            Err(TopicError::MissingParameter("$rid"))
        );
        assert_eq!(
            parse_request_topic("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1"),
            Err(TopicError::MissingParameter("operationId"))
        );
        for bad in [
            "",
            "devices/x/messages/events/",
            "$dps/registrations/PUT/other/?$rid=1",
            "$dps/registrations/res/200/?$rid=1",
        ] {
            assert_eq!(parse_request_topic(bad), Err(TopicError::Unknown), "{bad}");
        }
    }

    #[test]
    fn rids_that_would_reshape_the_response_topic_and_wildcards_are_refused() {
        for rid in ["%23", "a%2Fb", "a%26retry-after%3D0", "%2B", "a%3Fb", "a%25"] {
            assert_eq!(
                parse_request_topic(&format!("$dps/registrations/PUT/iotdps-register/?$rid={rid}")),
                Err(TopicError::Malformed),
                "{rid}"
            );
        }
        for topic in [
            "$dps/registrations/PUT/iotdps-register/?$rid=1#",
            "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1&operationId=+",
            "$dps/registrations/PUT/+/?$rid=1",
        ] {
            assert_eq!(parse_request_topic(topic), Err(TopicError::Malformed), "{topic}");
        }
    }

    #[test]
    fn response_topics_put_rid_first() {
        assert_eq!(response_topic(200, "1", None), "$dps/registrations/res/200/?$rid=1");
        assert_eq!(response_topic(202, "ab", Some(3)), "$dps/registrations/res/202/?$rid=ab&retry-after=3");
    }

    #[test]
    fn register_bodies() {
        assert_eq!(register_payload(b""), Ok(None));
        assert_eq!(register_payload(b" "), Ok(None));
        assert_eq!(register_payload(br#"{"payload": null, "registrationId": "dev-001"}"#), Ok(None));
        assert_eq!(register_payload(br#"{"registrationId":"dev-001"}"#), Ok(None));
        assert_eq!(register_payload(br#"{"payload":{"model":"x1"}}"#), Ok(Some(serde_json::json!({"model":"x1"}))));
        assert!(register_payload(b"{oops").is_err());
        assert!(register_payload(b"[1]").is_err());
        assert!(register_payload(&[0xff, 0xfe]).is_err());
    }

    proptest::proptest! {
        /// Untrusted strings never panic the parsers (and parsed rids round-trip into topics).
        #[test]
        fn parsers_never_panic(s in "\\PC{0,300}", bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = DpsUsername::parse(&s);
            if let Ok(DpsRequest::Register { rid }) = parse_request_topic(&s) {
                proptest::prop_assert!(response_topic(200, &rid, None).contains(&rid));
                proptest::prop_assert!(fleetgate_core::topic::request_id_ok(&rid));
            }
            let _ = register_payload(&bytes);
            let _ = register_payload(s.as_bytes());
        }

        #[test]
        fn topic_shaped_inputs_never_panic(rid in "[ -~]{0,40}", op in "[ -~]{0,40}") {
            let _ = parse_request_topic(&format!("$dps/registrations/PUT/iotdps-register/?$rid={rid}"));
            let _ = parse_request_topic(&format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={op}"));
        }
    }
}
