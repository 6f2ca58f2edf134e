//! Which linked hub a device is assigned to: Azure's four allocation policies.

use sha2::{Digest, Sha256};

use crate::enrollment::{AllocationPolicy, CustomAllocationDefinition, EnrollmentSettings};
use crate::error::{AzureError, ErrorCode};

/// A linked hub as allocation sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubCandidate {
    pub host_name: String,
    /// Relative share under the evenly weighted (`hashed`) policy; 0 takes no devices.
    pub allocation_weight: u32,
    /// Whether the hub takes part when an enrollment does not list its own `iotHubs`.
    pub apply_allocation_policy: bool,
    /// Estimated latency from this instance to the hub, for `geoLatency` (see docs: Fleetgate has
    /// one location, so "lowest latency" means the lowest configured estimate).
    pub latency_ms: u32,
}

impl HubCandidate {
    pub fn new(host_name: impl Into<String>) -> Self {
        Self { host_name: host_name.into(), allocation_weight: 1, apply_allocation_policy: true, latency_ms: 0 }
    }
}

/// The decision: a hub, or "ask the webhook".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allocation {
    Hub(String),
    Custom(CustomAllocationDefinition),
}

fn hash(key: &str) -> u64 {
    let digest = Sha256::digest(key.as_bytes());
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

fn not_linked(hub: &str) -> AzureError {
    AzureError::new(ErrorCode::HubNotLinked, format!("IoT hub '{hub}' is not linked to this provisioning service."))
}

/// The hubs an enrollment may use: its own `iotHubs` (those still linked), else every linked hub
/// that applies allocation policies.
pub fn candidates<'a>(settings: &EnrollmentSettings, hubs: &'a [HubCandidate]) -> Vec<&'a HubCandidate> {
    let mut c: Vec<&HubCandidate> = match &settings.iot_hubs {
        Some(list) if !list.is_empty() => {
            hubs.iter().filter(|h| list.iter().any(|l| l.eq_ignore_ascii_case(&h.host_name))).collect()
        }
        _ => hubs.iter().filter(|h| h.apply_allocation_policy).collect(),
    };
    c.sort_by_key(|h| h.host_name.to_ascii_lowercase());
    c
}

/// Picks the hub for `registration_key` (the case-folded registration id). The same device lands
/// on the same hub while the hub list and weights are unchanged.
pub fn allocate(
    settings: &EnrollmentSettings,
    hubs: &[HubCandidate],
    registration_key: &str,
) -> Result<Allocation, AzureError> {
    let named = |h: &str| hubs.iter().find(|l| l.host_name.eq_ignore_ascii_case(h)).map(|l| l.host_name.clone());
    let policy = settings.allocation_policy.unwrap_or(match settings.iot_hub_host_name {
        Some(_) => AllocationPolicy::Static,
        None => AllocationPolicy::Hashed,
    });
    if policy == AllocationPolicy::Static {
        let hub = settings.iot_hub_host_name.as_deref().unwrap_or_default();
        return named(hub).map(Allocation::Hub).ok_or_else(|| not_linked(hub));
    }
    if policy == AllocationPolicy::Custom {
        let def = settings
            .custom_allocation_definition
            .clone()
            .ok_or_else(|| AzureError::bad_request("The custom allocation policy needs customAllocationDefinition."))?;
        return Ok(Allocation::Custom(def));
    }
    let pool = candidates(settings, hubs);
    let no_hub = || AzureError::new(ErrorCode::NoHubForAllocation, "No IoT hub was found for the allocation.");
    let pool: Vec<&HubCandidate> = match policy {
        AllocationPolicy::GeoLatency => {
            let best = pool.iter().map(|h| h.latency_ms).min().ok_or_else(no_hub)?;
            pool.into_iter().filter(|h| h.latency_ms == best).collect()
        }
        _ => pool,
    };
    // Weighted hashing: a point in [0, total weight) picks the hub whose range holds it.
    let total: u64 = pool.iter().map(|h| u64::from(h.allocation_weight)).sum();
    let weight_of =
        |h: &HubCandidate| if policy == AllocationPolicy::GeoLatency { 1 } else { u64::from(h.allocation_weight) };
    let total = if policy == AllocationPolicy::GeoLatency { pool.len() as u64 } else { total };
    if total == 0 {
        return Err(no_hub());
    }
    let mut point = hash(registration_key) % total;
    for h in &pool {
        let w = weight_of(h);
        if point < w {
            return Ok(Allocation::Hub(h.host_name.clone()));
        }
        point -= w;
    }
    Err(no_hub())
}

/// Checks a custom webhook's answer: the hub it names must be one the enrollment may use.
pub fn check_custom_choice(
    settings: &EnrollmentSettings,
    hubs: &[HubCandidate],
    chosen: &str,
) -> Result<String, AzureError> {
    let allowed = match &settings.iot_hubs {
        Some(list) if !list.is_empty() => candidates(settings, hubs),
        _ => hubs.iter().collect(),
    };
    allowed.iter().find(|h| h.host_name.eq_ignore_ascii_case(chosen)).map(|h| h.host_name.clone()).ok_or_else(|| {
        AzureError::new(
            ErrorCode::HubNotLinked,
            format!(
                "The allocation webhook chose IoT hub '{}', which is not linked to this enrollment.",
                chosen.chars().take(256).collect::<String>()
            ),
        )
    })
}

/// What a custom allocation webhook decided.
#[derive(Debug, Clone, PartialEq)]
pub struct CustomAllocationResult {
    pub iot_hub_host_name: String,
    pub initial_twin: Option<serde_json::Value>,
    pub payload: Option<serde_json::Value>,
}

/// The body DPS POSTs to a custom allocation webhook (Azure's `AllocationRequest`).
/// `enrollment` is `("enrollmentGroup" | "individualEnrollment", its JSON without keys)`.
pub fn custom_allocation_request(
    enrollment: (&str, serde_json::Value),
    registration_id: &str,
    current: Option<(&str, &str)>,
    device_payload: Option<&serde_json::Value>,
    linked_hubs: &[String],
) -> serde_json::Value {
    let mut ctx = serde_json::json!({ "registrationId": registration_id, "symmetricKey": {} });
    if let Some((hub, device)) = current {
        ctx["currentIotHubHostName"] = hub.into();
        ctx["currentDeviceId"] = device.into();
    }
    if let Some(p) = device_payload {
        ctx["payload"] = p.clone();
    }
    let mut body = serde_json::json!({ "deviceRuntimeContext": ctx, "linkedHubs": linked_hubs });
    body[enrollment.0] = enrollment.1;
    body
}

/// Reads a webhook's `AllocationResponse`. Member names are matched case-insensitively (Azure's
/// own documentation spells them two ways).
pub fn parse_custom_allocation_response(body: &[u8]) -> Result<CustomAllocationResult, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("the webhook's answer is not JSON: {e}"))?;
    let obj = v.as_object().ok_or("the webhook's answer is not a JSON object")?;
    let get = |name: &str| obj.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone());
    let hub = get("iotHubHostName")
        .and_then(|h| h.as_str().map(str::to_owned))
        .filter(|h| !h.is_empty())
        .ok_or("the webhook's answer has no iotHubHostName")?;
    Ok(CustomAllocationResult {
        iot_hub_host_name: hub,
        initial_twin: get("initialTwin").filter(|t| !t.is_null()),
        payload: get("payload").filter(|p| !p.is_null()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enrollment::EnrollmentGroup;

    fn settings(json: &str) -> EnrollmentSettings {
        EnrollmentGroup::from_request_body(json.as_bytes()).unwrap().settings
    }

    fn hubs(names: &[(&str, u32)]) -> Vec<HubCandidate> {
        names.iter().map(|(n, w)| HubCandidate { allocation_weight: *w, ..HubCandidate::new(*n) }).collect()
    }

    #[test]
    fn static_hub() {
        let s =
            settings(r#"{"attestation":{"type":"symmetricKey"},"iotHubHostName":"HUB-B","allocationPolicy":"static"}"#);
        assert_eq!(allocate(&s, &hubs(&[("hub-a", 1), ("hub-b", 1)]), "x").unwrap(), Allocation::Hub("hub-b".into()));
        assert_eq!(allocate(&s, &hubs(&[("hub-a", 1)]), "x").unwrap_err().code, ErrorCode::HubNotLinked);
        // A named hub without a policy means static.
        let s = settings(r#"{"attestation":{"type":"symmetricKey"},"iotHubHostName":"hub-a"}"#);
        assert_eq!(allocate(&s, &hubs(&[("hub-a", 1), ("hub-b", 1)]), "x").unwrap(), Allocation::Hub("hub-a".into()));
    }

    #[test]
    fn hashed_follows_weights_and_is_stable() {
        let s = settings(r#"{"attestation":{"type":"symmetricKey"},"allocationPolicy":"hashed"}"#);
        let hs = hubs(&[("a", 1), ("b", 1), ("c", 2)]);
        let mut counts = std::collections::HashMap::new();
        for i in 0..4000 {
            let k = format!("dev-{i}");
            let Allocation::Hub(h) = allocate(&s, &hs, &k).unwrap() else { panic!() };
            assert_eq!(allocate(&s, &hs, &k).unwrap(), Allocation::Hub(h.clone()));
            *counts.entry(h).or_insert(0u32) += 1;
        }
        for (h, expect) in [("a", 1000.0), ("b", 1000.0), ("c", 2000.0)] {
            let got = f64::from(counts[h]);
            assert!((got - expect).abs() / expect < 0.1, "{counts:?}");
        }
        // Weight 0 and applyAllocationPolicy=false take no devices.
        let mut hs = hubs(&[("a", 0), ("b", 1), ("c", 1)]);
        hs[2].apply_allocation_policy = false;
        for i in 0..100 {
            assert_eq!(allocate(&s, &hs, &format!("d{i}")).unwrap(), Allocation::Hub("b".into()));
        }
        // An enrollment's own iotHubs override applyAllocationPolicy.
        let s2 = settings(r#"{"attestation":{"type":"symmetricKey"},"iotHubs":["c"]}"#);
        assert_eq!(allocate(&s2, &hs, "x").unwrap(), Allocation::Hub("c".into()));
    }

    #[test]
    fn geo_latency_picks_the_nearest() {
        let s = settings(r#"{"attestation":{"type":"symmetricKey"},"allocationPolicy":"geoLatency"}"#);
        let mut hs = hubs(&[("far", 1), ("near", 1), ("mid", 1)]);
        hs[0].latency_ms = 120;
        hs[1].latency_ms = 5;
        hs[2].latency_ms = 40;
        for i in 0..50 {
            assert_eq!(allocate(&s, &hs, &format!("d{i}")).unwrap(), Allocation::Hub("near".into()));
        }
    }

    #[test]
    fn webhook_shapes() {
        let req = custom_allocation_request(
            ("enrollmentGroup", serde_json::json!({"enrollmentGroupId": "g"})),
            "dev-1",
            Some(("hub-a", "dev-1")),
            Some(&serde_json::json!({"model": "x1"})),
            &["hub-a".into(), "hub-b".into()],
        );
        assert_eq!(req["deviceRuntimeContext"]["registrationId"], "dev-1");
        assert_eq!(req["deviceRuntimeContext"]["currentIotHubHostName"], "hub-a");
        assert_eq!(req["deviceRuntimeContext"]["payload"]["model"], "x1");
        assert_eq!(req["linkedHubs"][1], "hub-b");
        assert_eq!(req["enrollmentGroup"]["enrollmentGroupId"], "g");
        let r = parse_custom_allocation_response(br#"{"iotHubHostname":"hub-b","payload":{"tier":"gold"}}"#).unwrap();
        assert_eq!(r.iot_hub_host_name, "hub-b");
        assert_eq!(r.payload, Some(serde_json::json!({"tier": "gold"})));
        for bad in [&b"nope"[..], b"[]", b"{}", br#"{"iotHubHostName":""}"#, br#"{"iotHubHostName":5}"#] {
            assert!(parse_custom_allocation_response(bad).is_err());
        }
    }

    #[test]
    fn custom_and_no_hub() {
        let s = settings(
            r#"{"attestation":{"type":"symmetricKey"},"allocationPolicy":"custom","customAllocationDefinition":{"webhookUrl":"http://x/y","apiVersion":"2021-10-01"}}"#,
        );
        assert!(matches!(allocate(&s, &hubs(&[("a", 1)]), "x").unwrap(), Allocation::Custom(_)));
        assert_eq!(check_custom_choice(&s, &hubs(&[("a", 1)]), "A").unwrap(), "a");
        assert_eq!(check_custom_choice(&s, &hubs(&[("a", 1)]), "evil").unwrap_err().code, ErrorCode::HubNotLinked);
        let s = settings(r#"{"attestation":{"type":"symmetricKey"}}"#);
        assert_eq!(allocate(&s, &[], "x").unwrap_err().code.code(), 400208);
    }
}
