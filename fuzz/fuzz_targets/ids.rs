//! Registration ids, enrollment group ids and ID scopes (`fleetgate_core::ids`): they arrive in
//! MQTT client ids and usernames, HTTP paths and JSON bodies.
//!
//! Invariants: a parsed id is the input unchanged, re-validates, is 1..=128 characters of
//! `a-z A-Z 0-9 - . _ :` ending in an alphanumeric or `-`; its case-folded key re-validates; the
//! same rules hold for group ids; a parsed scope is `0ne` + 8 upper-case hex digits and matches
//! itself in any case.

#![no_main]

use fleetgate_core::ids::{EnrollmentGroupId, IdScope, RegistrationId, MAX_ID_LEN};
use libfuzzer_sys::fuzz_target;

fn well_formed(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':'))
        && s.chars().last().is_some_and(|c| c.is_ascii_alphanumeric() || c == '-')
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let s = text.as_ref();

    let reg = RegistrationId::parse(s);
    assert_eq!(reg.is_ok(), well_formed(s), "{s:?}");
    if let Ok(id) = &reg {
        assert_eq!(id.as_str(), s);
        assert_eq!(RegistrationId::parse(id.as_str()).as_ref().ok(), Some(id));
        let key = id.key();
        assert!(key.eq_ignore_ascii_case(s));
        assert_eq!(RegistrationId::parse(&key).map(|k| k.key()).ok(), Some(key));
    } else if let Err(e) = &reg {
        assert_eq!(e.status(), 400);
        assert!(e.message.chars().count() < 400, "unbounded error message");
        assert!(!e.message.chars().any(char::is_control), "control character echoed");
    }

    let group = EnrollmentGroupId::parse(s);
    assert_eq!(group.is_ok(), reg.is_ok());
    if let Ok(g) = group {
        assert_eq!(g.as_str(), s);
        assert_eq!(g.key(), s.to_ascii_lowercase());
    }

    if let Ok(scope) = IdScope::parse(s) {
        assert_eq!(scope.as_str(), s);
        assert!(s.len() == 11 && s.starts_with("0ne"));
        assert!(s[3..].chars().all(|c| matches!(c, '0'..='9' | 'A'..='F')));
        assert!(scope.matches(&s.to_ascii_lowercase()));
        if s.to_ascii_lowercase() != s {
            assert!(IdScope::parse(&s.to_ascii_lowercase()).is_err());
        }
    }
});
