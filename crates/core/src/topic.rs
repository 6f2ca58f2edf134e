//! What a device may put in an MQTT topic name it publishes, shared by the DPS and hub
//! vocabularies: no wildcards in the topic, and request ids that can be echoed back verbatim.

/// Longest request id (`$rid`) accepted; the SDKs send UUIDs or small integers.
pub const MAX_REQUEST_ID_CHARS: usize = 128;

/// MQTT 3.1.1 (4.7.1): a PUBLISH topic name must not contain the wildcards `#` or `+`, nor
/// U+0000 (1.5.3). A client that sends one breaks the protocol; Azure's gateway closes the
/// connection.
pub fn topic_name_ok(topic: &str) -> bool {
    !topic.contains(['#', '+', '\0'])
}

/// A request id, as decoded from `?$rid=`, that can be echoed into a response topic without
/// changing what the topic means: 1 to [`MAX_REQUEST_ID_CHARS`] printable ASCII characters,
/// none of them a topic level separator, a wildcard or query syntax (`/ # + ? & = %`). Every SDK's
/// rids (UUIDs, integers) pass; anything else is a client trying to shape our topics.
pub fn request_id_ok(rid: &str) -> bool {
    !rid.is_empty()
        && rid.len() <= MAX_REQUEST_ID_CHARS
        && rid.bytes().all(|b| b.is_ascii_graphic() && !b"/#+?&=%".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_are_not_topic_names() {
        assert!(topic_name_ok("devices/d1/messages/events/a=%23&b=%2B"));
        for bad in ["devices/d1/messages/events/#", "devices/+/messages/events/", "$iothub/twin/GET/?$rid=1#", "a\0b"] {
            assert!(!topic_name_ok(bad), "{bad:?}");
        }
    }

    #[test]
    fn request_ids_of_the_sdks_pass_and_topic_syntax_does_not() {
        for ok in ["1", "65535", "6f1d3c0e-0b4e-4b7e-9b55-0d0d5c1e2f3a", "a.b_c~d:e$f"] {
            assert!(request_id_ok(ok), "{ok}");
        }
        let long = "x".repeat(MAX_REQUEST_ID_CHARS + 1);
        for bad in ["", "a#", "a/b", "a&b=c", "a+b", "a?b", "a%23", "a b", "é", "a\nb", long.as_str()] {
            assert!(!request_id_ok(bad), "{bad:?}");
        }
    }
}
