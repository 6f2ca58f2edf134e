//! Identifiers and their rules: registration ids, enrollment group ids, ID scopes.

use std::fmt;

use crate::error::{AzureError, ErrorCode};

/// The longest registration id (and enrollment group id) Azure accepts.
pub const MAX_ID_LEN: usize = 128;

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':')
}

fn check_id(kind: &str, s: &str) -> Result<(), AzureError> {
    let invalid =
        |why: &str| AzureError::new(ErrorCode::InvalidId, format!("Invalid {kind} '{}': {why}.", printable(s)));
    if s.is_empty() {
        return Err(invalid("it is empty"));
    }
    if s.chars().count() > MAX_ID_LEN {
        return Err(invalid("it is longer than 128 characters"));
    }
    if let Some(c) = s.chars().find(|c| !is_id_char(*c)) {
        return Err(invalid(&format!("character {:?} is not allowed (use a-z A-Z 0-9 - . _ :)", c)));
    }
    let last = s.chars().last().expect("non-empty");
    if !(last.is_ascii_alphanumeric() || last == '-') {
        return Err(invalid("the last character must be alphanumeric or '-'"));
    }
    Ok(())
}

/// The symbols IoT Hub allows in a device id besides ASCII letters and digits (its registry's
/// documented rule; DPS registration ids are stricter, see [`RegistrationId::parse`]).
pub const DEVICE_ID_SYMBOLS: &str = "-.%_*?!(),:=@$'";

/// Checks a hub device id: 1 to 128 ASCII letters, digits and [`DEVICE_ID_SYMBOLS`]. Case is
/// kept and significant. Ids like `a%2Fb` or `a?b` are plain text here: the REST API carries
/// them percent-encoded in paths, and MQTT topics percent-encode them too (see the hub's mqtt
/// module).
pub fn check_device_id(s: &str) -> Result<(), AzureError> {
    let invalid =
        |why: &str| AzureError::new(ErrorCode::InvalidId, format!("Invalid device id '{}': {why}.", printable(s)));
    if s.is_empty() {
        return Err(invalid("it is empty"));
    }
    if s.chars().count() > MAX_ID_LEN {
        return Err(invalid("it is longer than 128 characters"));
    }
    if let Some(c) = s.chars().find(|c| !(c.is_ascii_alphanumeric() || DEVICE_ID_SYMBOLS.contains(*c))) {
        return Err(invalid(&format!(
            "character {c:?} is not allowed (use ASCII letters, digits and {DEVICE_ID_SYMBOLS})"
        )));
    }
    Ok(())
}

/// Cuts an untrusted id to something safe to echo in a message or a log line.
fn printable(s: &str) -> String {
    s.chars().take(MAX_ID_LEN + 8).map(|c| if c.is_control() { '?' } else { c }).collect()
}

/// A device's registration id, as the device sent it.
///
/// Azure treats registration ids as case-insensitive for lookup and uniqueness, but key
/// derivation uses the exact bytes, so the original spelling is kept and [`Self::key`] gives the
/// case-folded form for storage keys.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RegistrationId(String);

impl RegistrationId {
    /// Checks the tutorial's rules: up to 128 characters of `a-z A-Z 0-9 - . _ :`, the last one
    /// alphanumeric or `-`.
    pub fn parse(s: &str) -> Result<Self, AzureError> {
        check_id("registration id", s)?;
        Ok(Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The case-folded form used for lookup and uniqueness.
    pub fn key(&self) -> String {
        self.0.to_ascii_lowercase()
    }
}

impl fmt::Display for RegistrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RegistrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RegistrationId({})", self.0)
    }
}

/// An enrollment group id; same character rules as a registration id, case-insensitive.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct EnrollmentGroupId(String);

impl EnrollmentGroupId {
    pub fn parse(s: &str) -> Result<Self, AzureError> {
        check_id("enrollment group id", s)?;
        Ok(Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn key(&self) -> String {
        self.0.to_ascii_lowercase()
    }
}

impl fmt::Display for EnrollmentGroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A DPS instance's ID scope: `0ne` followed by eight uppercase hex digits, e.g. `0ne0004E52F`.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct IdScope(String);

impl IdScope {
    pub fn parse(s: &str) -> Result<Self, AzureError> {
        let ok = s.len() == 11
            && s.starts_with("0ne")
            && s[3..].chars().all(|c| c.is_ascii_digit() || ('A'..='F').contains(&c));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(AzureError::new(ErrorCode::InvalidId, format!("Invalid ID scope '{}'.", printable(s))))
        }
    }

    /// A fresh random scope, as a new DPS instance gets.
    pub fn generate() -> Self {
        Self(format!("0ne{:08X}", rand::random::<u32>()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Scopes are compared case-insensitively (devices copy them by hand).
    pub fn matches(&self, other: &str) -> bool {
        self.0.eq_ignore_ascii_case(other)
    }
}

impl fmt::Display for IdScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_tutorial_ids() {
        for ok in ["sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6", "a", "A.b_c:d-", "dev-001", &"x".repeat(128)] {
            RegistrationId::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn rejects_bad_ids() {
        for bad in ["", "dev 1", "dev/1", "dev_", "dev.", "dev:", "dév", &"x".repeat(129), "a\u{0}b", "a#b"] {
            let e = RegistrationId::parse(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidId, "{bad:?}");
            assert_eq!(e.status(), 400);
        }
    }

    #[test]
    fn device_ids_follow_the_hub_rules_not_the_registration_id_rules() {
        for ok in ["a", "dev.", "dev:", "a-b.c%d_e*f?g!h(i)j,k:l=m@n$o'p", "%24", &"x".repeat(128)] {
            check_device_id(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["", "a b", "a/b", "a#b", "a+b", "a&b", "dév", "a\u{0}b", "a\\b", &"x".repeat(129)] {
            let e = check_device_id(bad).unwrap_err();
            assert_eq!((e.code, e.status()), (ErrorCode::InvalidId, 400), "{bad:?}");
        }
        // What a registration id may not be, a device id may.
        assert!(RegistrationId::parse("dev.").is_err());
        assert!(RegistrationId::parse("a$b").is_err());
    }

    #[test]
    fn key_is_case_folded_but_spelling_kept() {
        let id = RegistrationId::parse("Dev-ABC").unwrap();
        assert_eq!(id.as_str(), "Dev-ABC");
        assert_eq!(id.key(), "dev-abc");
    }

    #[test]
    fn scope_format() {
        for _ in 0..100 {
            let s = IdScope::generate();
            IdScope::parse(s.as_str()).unwrap();
        }
        assert!(IdScope::parse("0ne0004E52F").is_ok());
        for bad in ["0ne0004e52f", "0ne0004E52", "1ne0004E52F", "0ne0004E52FF", "0ne0004G52F"] {
            assert!(IdScope::parse(bad).is_err(), "{bad}");
        }
        assert!(IdScope::parse("0ne0004E52F").unwrap().matches("0NE0004e52f"));
    }

    proptest! {
        #[test]
        fn valid_ids_round_trip(s in "[a-zA-Z0-9._:-]{0,127}[a-zA-Z0-9-]") {
            let id = RegistrationId::parse(&s).unwrap();
            prop_assert_eq!(id.as_str(), s.as_str());
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,200}") {
            let _ = RegistrationId::parse(&s);
            let _ = check_device_id(&s);
            let _ = IdScope::parse(&s);
        }
    }
}
