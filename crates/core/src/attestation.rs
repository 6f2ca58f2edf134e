//! Symmetric-key attestation through enrollment groups.
//!
//! A device in a group never says which group it belongs to: it signs its SAS token with a key
//! derived from one of the group's keys. So every candidate group's primary and secondary keys
//! are tried, each derived for this registration id and checked against the token.

use crate::enrollment::EnrollmentGroup;
use crate::keys::SymmetricKey;
use crate::sas::SasToken;

/// Which of a group's keys the device's key was derived from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySlot {
    Primary,
    Secondary,
}

/// The group (and key) whose derived key signed `token`, trying `preferred` first (the group the
/// device used last time) and then the others in order. Returns `None` when no key matches.
///
/// The registration id is used exactly as the device sent it: derivation is byte-exact.
pub fn find_group<'a>(
    token: &SasToken,
    registration_id: &str,
    groups: &'a [EnrollmentGroup],
    preferred: Option<&str>,
) -> Option<(&'a EnrollmentGroup, KeySlot)> {
    let ordered = groups
        .iter()
        .filter(|g| preferred.is_some_and(|p| g.enrollment_group_id.eq_ignore_ascii_case(p)))
        .chain(groups.iter().filter(|g| !preferred.is_some_and(|p| g.enrollment_group_id.eq_ignore_ascii_case(p))));
    for group in ordered {
        for (slot, key) in [KeySlot::Primary, KeySlot::Secondary].into_iter().zip(group.keys()) {
            if token.signed_with(&key.derive_device_key(registration_id)) {
                return Some((group, slot));
            }
        }
    }
    None
}

/// The derived (primary, secondary) device keys a device registered through `group` gets in the
/// hub's registry: either one authenticates it there.
pub fn derived_device_keys(group: &EnrollmentGroup, registration_id: &str) -> Vec<SymmetricKey> {
    group.keys().iter().map(|k| k.derive_device_key(registration_id)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sas::build_token;
    use crate::time::Timestamp;

    fn group(id: &str) -> EnrollmentGroup {
        EnrollmentGroup::from_request_body(br#"{"attestation":{"type":"symmetricKey"}}"#)
            .unwrap()
            .prepare_upsert(id, None, &[], Timestamp::from_unix_seconds(0))
            .unwrap()
    }

    #[test]
    fn finds_group_by_primary_or_secondary_derived_key() {
        let groups = vec![group("a"), group("b")];
        let keys = groups[1].keys();
        for (i, slot) in [KeySlot::Primary, KeySlot::Secondary].into_iter().enumerate() {
            let dk = keys[i].derive_device_key("dev-1");
            let tok = SasToken::parse(&build_token(&dk, "s/registrations/dev-1", 9_999_999_999, None)).unwrap();
            let (g, s) = find_group(&tok, "dev-1", &groups, None).unwrap();
            assert_eq!((g.enrollment_group_id.as_str(), s), ("b", slot));
            assert_eq!(find_group(&tok, "dev-1", &groups, Some("B")).unwrap().0.enrollment_group_id, "b");
            // Derivation is byte-exact: another spelling of the id does not match.
            assert!(find_group(&tok, "DEV-1", &groups, None).is_none());
        }
        let stranger = SymmetricKey::generate();
        let tok = SasToken::parse(&build_token(&stranger, "s/registrations/dev-1", 9_999_999_999, None)).unwrap();
        assert!(find_group(&tok, "dev-1", &groups, None).is_none());
    }
}
