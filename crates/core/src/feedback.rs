//! Cloud-to-device delivery feedback, as IoT Hub makes it: a message sent with `iothub-ack`
//! `positive` gets a record when the device completes it, `negative` when it is rejected,
//! expires, exceeds the delivery count or is purged, `full` in every case; `none` (the default)
//! never. The service reads the records in batches from `/messages/serviceBound/feedback`.

use crate::message::C2dMessage;

/// The `iothub-ack` of a cloud-to-device message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckMode {
    #[default]
    None,
    Positive,
    Negative,
    Full,
}

impl AckMode {
    /// The header's value, as Azure spells it (case-insensitive); `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Some(Self::None),
            "positive" => Some(Self::Positive),
            "negative" => Some(Self::Negative),
            "full" => Some(Self::Full),
            _ => None,
        }
    }

    fn wants(self, outcome: Outcome) -> bool {
        match self {
            Self::None => false,
            Self::Positive => outcome == Outcome::Success,
            Self::Negative => outcome != Outcome::Success,
            Self::Full => true,
        }
    }
}

/// How a cloud-to-device message left the queue: Azure's feedback `statusCode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Outcome {
    /// The device completed it.
    Success,
    /// Its time to live passed before the device completed it.
    Expired,
    /// It was delivered (locked) the maximum number of times without being completed.
    DeliveryCountExceeded,
    /// The device rejected it.
    Rejected,
    /// The service purged the device's queue.
    Purged,
}

impl Outcome {
    /// The record's `description`.
    pub fn description(self) -> &'static str {
        match self {
            Self::Success => "Success",
            Self::Expired => "Message expired",
            Self::DeliveryCountExceeded => "Message delivery count exceeded",
            Self::Rejected => "Message rejected",
            Self::Purged => "Message purged",
        }
    }
}

/// One feedback record, in Azure's JSON shape.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FeedbackRecord {
    /// The message's `message-id` (the sender's, or the one the hub gave it).
    pub original_message_id: String,
    pub device_generation_id: String,
    pub device_id: String,
    /// When the outcome happened.
    pub enqueued_time_utc: String,
    pub status_code: Outcome,
    pub description: String,
}

/// The record `message` leaving the queue with `outcome` at `now` (an Azure timestamp) makes,
/// if its `iothub-ack` asks for one.
pub fn record(message: &C2dMessage, outcome: Outcome, now: &str) -> Option<FeedbackRecord> {
    if !message.ack.wants(outcome) {
        return None;
    }
    Some(FeedbackRecord {
        original_message_id: message.properties.system.get("message-id").cloned().unwrap_or_else(|| message.id.clone()),
        device_generation_id: message.device_generation_id.clone(),
        device_id: message.device_id.clone(),
        enqueued_time_utc: now.to_owned(),
        status_code: outcome,
        description: outcome.description().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(ack: AckMode) -> C2dMessage {
        let mut m = C2dMessage {
            id: "id-1".into(),
            hub: "h".into(),
            device_id: "d".into(),
            ack,
            device_generation_id: "g".into(),
            ..Default::default()
        };
        m.properties.system.insert("message-id".into(), "mine".into());
        m
    }

    #[test]
    fn each_mode_asks_for_the_outcomes_azure_documents() {
        use Outcome::*;
        let all = [Success, Expired, DeliveryCountExceeded, Rejected, Purged];
        let made = |ack| all.iter().filter(|o| record(&message(ack), **o, "t").is_some()).count();
        assert_eq!(made(AckMode::None), 0);
        assert_eq!(made(AckMode::Full), 5);
        assert!(record(&message(AckMode::Positive), Success, "t").is_some());
        assert_eq!(made(AckMode::Positive), 1);
        assert!(record(&message(AckMode::Negative), Success, "t").is_none());
        assert_eq!(made(AckMode::Negative), 4);
    }

    #[test]
    fn record_has_azures_fields() {
        let r = record(&message(AckMode::Full), Outcome::Rejected, "2026-01-01T00:00:00Z").unwrap();
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["originalMessageId"], "mine");
        assert_eq!(v["deviceGenerationId"], "g");
        assert_eq!(v["deviceId"], "d");
        assert_eq!(v["enqueuedTimeUtc"], "2026-01-01T00:00:00Z");
        assert_eq!(v["statusCode"], "Rejected");
        assert_eq!(v["description"], "Message rejected");
    }

    #[test]
    fn ack_values_parse_case_insensitively() {
        assert_eq!(AckMode::parse("FULL"), Some(AckMode::Full));
        assert_eq!(AckMode::parse("bogus"), None);
    }
}
