//! Which linked hub a device is assigned to.

use sha2::{Digest, Sha256};

use crate::enrollment::{AllocationPolicy, EnrollmentGroup};
use crate::error::{DpsError, ErrorCode};

/// Picks the hub for `registration_key` (the case-folded registration id).
///
/// * `iotHubHostName` set (static policy, or no policy with a hub named) → that hub;
/// * otherwise evenly weighted hashing over the group's `iotHubs` (or every linked hub): the same
///   device always lands on the same hub while the hub list is unchanged.
pub fn allocate(group: &EnrollmentGroup, linked_hubs: &[String], registration_key: &str) -> Result<String, DpsError> {
    let linked = |h: &str| linked_hubs.iter().find(|l| l.eq_ignore_ascii_case(h)).cloned();
    let policy = group.allocation_policy;
    if let (Some(hub), Some(AllocationPolicy::Static) | None) = (&group.iot_hub_host_name, policy) {
        return linked(hub).ok_or_else(|| {
            DpsError::new(
                ErrorCode::HubNotLinked,
                format!("IoT hub '{hub}' is not linked to this provisioning service."),
            )
        });
    }
    let mut candidates: Vec<String> = match &group.iot_hubs {
        Some(hubs) if !hubs.is_empty() => hubs.iter().filter_map(|h| linked(h)).collect(),
        _ => linked_hubs.to_vec(),
    };
    candidates.sort_by_key(|h| h.to_ascii_lowercase());
    candidates.dedup_by(|a, b| a.eq_ignore_ascii_case(b));
    if candidates.is_empty() {
        return Err(DpsError::new(ErrorCode::NoHubForAllocation, "No IoT hub was found for the allocation."));
    }
    let digest = Sha256::digest(registration_key.as_bytes());
    let n = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
    Ok(candidates[(n % candidates.len() as u64) as usize].clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(json: &str) -> EnrollmentGroup {
        EnrollmentGroup::from_request_body(json.as_bytes()).unwrap()
    }

    #[test]
    fn static_hub() {
        let g =
            group(r#"{"attestation":{"type":"symmetricKey"},"iotHubHostName":"HUB-B","allocationPolicy":"static"}"#);
        let hubs = vec!["hub-a".to_owned(), "hub-b".to_owned()];
        assert_eq!(allocate(&g, &hubs, "x").unwrap(), "hub-b");
        assert_eq!(allocate(&g, &["hub-a".to_owned()], "x").unwrap_err().code, ErrorCode::HubNotLinked);
    }

    #[test]
    fn hashed_is_stable_and_spreads() {
        let g = group(r#"{"attestation":{"type":"symmetricKey"}}"#);
        let hubs = vec!["a".to_owned(), "b".to_owned(), "c".to_owned()];
        let mut counts = std::collections::HashMap::new();
        for i in 0..300 {
            let k = format!("dev-{i}");
            let h = allocate(&g, &hubs, &k).unwrap();
            assert_eq!(h, allocate(&g, &hubs, &k).unwrap());
            *counts.entry(h).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 3);
        assert!(counts.values().all(|c| *c > 60), "{counts:?}");
    }

    #[test]
    fn no_hub() {
        let g = group(r#"{"attestation":{"type":"symmetricKey"}}"#);
        assert_eq!(allocate(&g, &[], "x").unwrap_err().code.code(), 400208);
    }
}
