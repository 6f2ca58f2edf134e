//! The audit trail: every attestation attempt and every service-side change, like Azure's
//! DeviceOperations and ServiceOperations logs. Entries never hold keys or tokens.

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AuditCategory {
    /// A device's attestation or registration (DPS) or connection (hub).
    DeviceOperations,
    /// A change through a service API (or the CLI's data-directory verbs).
    ServiceOperations,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    Success,
    Failure,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    /// Position in the trail (assigned when stored).
    #[serde(default)]
    pub seq: u64,
    pub time: String,
    pub category: AuditCategory,
    /// What was attempted, e.g. `attest`, `register`, `enrollmentGroup.write`.
    pub operation: String,
    /// Who: a registration id, device id or policy name.
    pub actor: String,
    /// What it was done to (a group id, registration id, device id), when not the actor itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    pub outcome: Outcome,
    /// Why it failed (or extra detail); never a secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The network address the attempt came from, when it came over the network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl AuditEntry {
    pub fn new(category: AuditCategory, operation: &str, actor: &str, outcome: Outcome) -> Self {
        Self {
            seq: 0,
            time: Timestamp::now().to_azure_string(),
            category,
            operation: operation.to_owned(),
            actor: actor.chars().take(256).collect(),
            target: None,
            outcome,
            reason: None,
            status: None,
            source: None,
        }
    }

    pub fn target(mut self, t: &str) -> Self {
        self.target = Some(t.chars().take(256).collect());
        self
    }

    pub fn reason(mut self, r: impl Into<String>) -> Self {
        self.reason = Some(r.into().chars().take(512).collect());
        self
    }

    pub fn status(mut self, s: u16) -> Self {
        self.status = Some(s);
        self
    }

    pub fn source(mut self, ip: std::net::IpAddr) -> Self {
        self.source = Some(ip.to_string());
        self
    }
}

/// Which entries a query wants.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Entries at or after this time. (Entry times are compared as Azure timestamp text, which
    /// orders them: fixed width, seven fraction digits, UTC.)
    pub since: Option<Timestamp>,
    /// Entries whose actor or target is this id (case-insensitive).
    pub id: Option<String>,
    pub outcome: Option<Outcome>,
    /// At most this many entries, the newest that match (0: all). Entries are returned oldest
    /// first either way.
    pub limit: usize,
}

impl AuditQuery {
    pub fn matches(&self, e: &AuditEntry) -> bool {
        self.since.is_none_or(|s| e.time >= s.to_azure_string())
            && self.id.as_deref().is_none_or(|id| {
                e.actor.eq_ignore_ascii_case(id) || e.target.as_deref().is_some_and(|t| t.eq_ignore_ascii_case(id))
            })
            && self.outcome.is_none_or(|o| o == e.outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries() {
        let e = AuditEntry::new(AuditCategory::DeviceOperations, "attest", "Dev-1", Outcome::Failure)
            .reason("signature does not match")
            .status(401);
        assert!(AuditQuery { id: Some("dev-1".into()), ..Default::default() }.matches(&e));
        assert!(!AuditQuery { id: Some("dev-2".into()), ..Default::default() }.matches(&e));
        assert!(AuditQuery { outcome: Some(Outcome::Failure), ..Default::default() }.matches(&e));
        assert!(AuditQuery { since: Timestamp::parse_azure("2000-01-01T00:00:00Z"), ..Default::default() }.matches(&e));
        assert!(!AuditQuery { since: Timestamp::parse_azure("9999-01-01T00:00:00Z"), ..Default::default() }.matches(&e));
        let long = AuditEntry::new(AuditCategory::ServiceOperations, "x", &"a".repeat(1000), Outcome::Success);
        assert_eq!(long.actor.len(), 256);
    }
}
