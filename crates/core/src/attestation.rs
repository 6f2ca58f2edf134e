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

/// Every group (with the key) whose derived key signed `token`, in the groups' order. More than
/// one only when groups share a key; [`prefer_group`] then picks one.
///
/// The registration id is used exactly as the device sent it: derivation is byte-exact.
pub fn find_groups<'a>(
    token: &SasToken,
    registration_id: &str,
    groups: &'a [EnrollmentGroup],
) -> Vec<(&'a EnrollmentGroup, KeySlot)> {
    groups
        .iter()
        .filter_map(|group| {
            [KeySlot::Primary, KeySlot::Secondary]
                .into_iter()
                .zip(group.keys())
                .find(|(_, key)| token.signed_with(&key.derive_device_key(registration_id)))
                .map(|(slot, _)| (group, slot))
        })
        .collect()
}

/// Of the matching groups, `preferred` (the group the device used last time) if it is one of
/// them, else the first.
pub fn prefer_group<'a>(
    matches: &[(&'a EnrollmentGroup, KeySlot)],
    preferred: Option<&str>,
) -> Option<(&'a EnrollmentGroup, KeySlot)> {
    let preferred = |g: &EnrollmentGroup| preferred.is_some_and(|p| g.enrollment_group_id.eq_ignore_ascii_case(p));
    matches.iter().find(|(g, _)| preferred(g)).or(matches.first()).copied()
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
            let found = find_groups(&tok, "dev-1", &groups);
            assert_eq!(found.len(), 1);
            assert_eq!((found[0].0.enrollment_group_id.as_str(), found[0].1), ("b", slot));
            // Derivation is byte-exact: another spelling of the id does not match.
            assert!(find_groups(&tok, "DEV-1", &groups).is_empty());
        }
        let stranger = SymmetricKey::generate();
        let tok = SasToken::parse(&build_token(&stranger, "s/registrations/dev-1", 9_999_999_999, None)).unwrap();
        assert!(find_groups(&tok, "dev-1", &groups).is_empty());
    }

    #[test]
    fn groups_sharing_a_key_all_match_and_the_previous_one_is_preferred() {
        let a = group("a");
        let mut b = group("b");
        b.settings = a.settings.clone();
        let groups = vec![a, b, group("c")];
        let dk = groups[0].keys()[1].derive_device_key("dev-1");
        let tok = SasToken::parse(&build_token(&dk, "s/registrations/dev-1", 9_999_999_999, None)).unwrap();
        let found = find_groups(&tok, "dev-1", &groups);
        let ids: Vec<_> = found.iter().map(|(g, s)| (g.enrollment_group_id.as_str(), *s)).collect();
        assert_eq!(ids, [("a", KeySlot::Secondary), ("b", KeySlot::Secondary)]);
        assert_eq!(prefer_group(&found, None).unwrap().0.enrollment_group_id, "a");
        assert_eq!(prefer_group(&found, Some("B")).unwrap().0.enrollment_group_id, "b");
        assert_eq!(prefer_group(&found, Some("c")).unwrap().0.enrollment_group_id, "a");
        assert!(prefer_group(&[], Some("a")).is_none());
    }
}
