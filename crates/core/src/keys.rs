//! Symmetric keys: parsing, generation and the enrollment-group key derivation.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::AzureError;

type HmacSha256 = Hmac<Sha256>;

/// Bytes in a generated key. Azure's portal generates 64-byte keys for enrollment groups.
pub const GENERATED_KEY_BYTES: usize = 64;
/// Azure accepts user-supplied keys of 16 to 64 bytes (after base64 decoding).
pub const MIN_KEY_BYTES: usize = 16;
pub const MAX_KEY_BYTES: usize = 64;

/// A symmetric key: raw bytes, shown only as base64 and never in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct SymmetricKey(Vec<u8>);

impl std::fmt::Debug for SymmetricKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SymmetricKey(<redacted>)")
    }
}

impl SymmetricKey {
    /// Decodes any base64 key without checking its length (for keys we derived or stored).
    pub fn from_base64(s: &str) -> Result<Self, AzureError> {
        B64.decode(s.trim()).map(Self).map_err(|_| AzureError::bad_request("The key is not valid base64."))
    }

    /// Decodes a key a user supplied and checks Azure's 16..=64 byte rule.
    pub fn parse_user_key(s: &str) -> Result<Self, AzureError> {
        let k = Self::from_base64(s)?;
        if !(MIN_KEY_BYTES..=MAX_KEY_BYTES).contains(&k.0.len()) {
            return Err(AzureError::bad_request(format!(
                "A symmetric key must be between {MIN_KEY_BYTES} and {MAX_KEY_BYTES} bytes once base64-decoded."
            )));
        }
        Ok(k)
    }

    pub fn generate() -> Self {
        let mut bytes = vec![0u8; GENERATED_KEY_BYTES];
        rand::Rng::fill(&mut rand::thread_rng(), bytes.as_mut_slice());
        Self(bytes)
    }

    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn to_base64(&self) -> String {
        B64.encode(&self.0)
    }

    /// HMAC-SHA256 of `msg` under this key.
    pub fn hmac(&self, msg: &[u8]) -> [u8; 32] {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(msg);
        mac.finalize().into_bytes().into()
    }

    /// The key a device in an enrollment group uses: HMAC-SHA256 over the registration id's
    /// exact UTF-8 bytes, keyed with this (group) key.
    pub fn derive_device_key(&self, registration_id: &str) -> SymmetricKey {
        SymmetricKey(self.hmac(registration_id.as_bytes()).to_vec())
    }
}

/// `az iot dps enrollment-group compute-device-key`: base64 group key in, base64 device key out.
pub fn compute_device_key(group_key_b64: &str, registration_id: &str) -> Result<String, AzureError> {
    Ok(SymmetricKey::from_base64(group_key_b64)?.derive_device_key(registration_id).to_base64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn microsoft_published_vector() {
        let k = compute_device_key(
            "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==",
            "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6",
        )
        .unwrap();
        assert_eq!(k, "Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc=");
    }

    #[test]
    fn openssl_vectors_and_case_sensitivity() {
        // Computed with: echo -n ID | openssl sha256 -mac HMAC -macopt hexkey:000102..1f -binary | base64
        let group = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        assert_eq!(compute_device_key(group, "dev-001").unwrap(), "SV+2SImDP9Vx9XL3ACWx9N9ZFlb6ue3jKrTWmct/YVk=");
        assert_eq!(compute_device_key(group, "DEV-001").unwrap(), "+SqoroNDLb0K5J+ZQaqNSTp2B1TS7Lh3fBSsfnd+dPs=");
    }

    #[test]
    fn user_key_length_rules() {
        assert!(SymmetricKey::parse_user_key("AAECAwQFBgcICQoLDA0ODw==").is_ok()); // 16 bytes
        assert!(SymmetricKey::parse_user_key("AAECAwQFBgcICQoLDA0O").is_err()); // 15 bytes
        assert!(SymmetricKey::parse_user_key(&SymmetricKey(vec![1; 65]).to_base64()).is_err());
        assert!(SymmetricKey::parse_user_key("not base64!").is_err());
    }

    #[test]
    fn generated_keys_are_64_random_bytes() {
        let a = SymmetricKey::generate();
        let b = SymmetricKey::generate();
        assert_eq!(a.as_bytes().len(), 64);
        assert_ne!(a, b);
        assert!(!format!("{a:?}").contains(&a.to_base64()));
    }
}
