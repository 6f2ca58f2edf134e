//! Shared access signature tokens: the MQTT CONNECT password and the HTTP `Authorization`
//! header (`fleetgate_core::sas`).
//!
//! Invariants: `SasToken::parse` never panics; a
//! token the fuzzer wrote never verifies under a key it cannot know (a verify with a random key
//! fails); a token built by `build_token` from fuzzed parts parses and verifies; resource scoping
//! is reflexive.

#![no_main]

use fleetgate_core::keys::SymmetricKey;
use fleetgate_core::sas::{build_token, resource_matches, SasError, SasToken};
use libfuzzer_sys::fuzz_target;

/// Drawn once per process: the fuzzer cannot learn it.
fn secret() -> &'static SymmetricKey {
    static KEY: std::sync::OnceLock<SymmetricKey> = std::sync::OnceLock::new();
    KEY.get_or_init(SymmetricKey::generate)
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };

    if let Ok(t) = SasToken::parse(text) {
        assert!(!t.signed_with(secret()));
        let r = t.resource.clone();
        assert!(resource_matches(&r, &r));
        for now in [0, t.expiry, i64::MIN, i64::MAX] {
            match t.verify(secret(), &r, now) {
                Err(SasError::Expired | SasError::WrongResource | SasError::BadSignature) => {}
                other => panic!("verify with an unknown key gave {other:?}"),
            }
        }
        let _ = t.check_expiry(i64::MAX);
    }

    // Build-then-parse with parts taken from the input: it must verify with the signing key.
    let mut parts = text.splitn(3, '\n');
    let (resource, name, rest) = (parts.next().unwrap_or(""), parts.next(), parts.next().unwrap_or(""));
    let expiry = i64::from(rest.len() as u32) * 97 + 1_700_000_000;
    let key = SymmetricKey::from_bytes(rest.as_bytes().to_vec());
    let built = build_token(&key, resource, expiry, name);
    let t = SasToken::parse(&built).unwrap_or_else(|e| panic!("our own token {built:?} does not parse: {e}"));
    assert_eq!(t.resource, resource);
    assert_eq!(t.expiry, expiry);
    assert_eq!(t.key_name.as_deref(), name.filter(|n| !n.is_empty()));
    t.verify(&key, resource, expiry).unwrap_or_else(|e| panic!("our own token {built:?} does not verify: {e}"));
});
