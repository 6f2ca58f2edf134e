//! Shared access signature tokens: parsing, checking and signing.
//!
//! The rule that works for every official SDK (see docs/wire-protocol notes): the HMAC covers
//! the `sr` field *exactly as sent* (each SDK encodes it differently: raw, upper- or lower-case
//! percent escapes), while a percent-decoded copy of `sr` is used to decide what the token is
//! for. Fields may come in any order, names are case-insensitive, and `skn` may be absent.

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use subtle::ConstantTimeEq;

use crate::keys::SymmetricKey;

/// Clock skew tolerated past a token's expiry, as Azure's own parser allows.
pub const MAX_CLOCK_SKEW_SECS: i64 = 300;

/// Everything but `A-Z a-z 0-9 - _ . ~` is escaped, as Python's `quote(s, safe="")` does.
pub const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// Why a token was refused. Callers answer all of these with the same 401: the reason is for logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    #[error("not a SharedAccessSignature token")]
    NotSas,
    #[error("malformed token field")]
    Malformed,
    #[error("token field {0} is missing")]
    Missing(&'static str),
    #[error("token field {0} appears twice")]
    Duplicate(&'static str),
    #[error("token expiry is not an integer")]
    BadExpiry,
    #[error("token expired")]
    Expired,
    #[error("token is for another resource")]
    WrongResource,
    #[error("signature does not match")]
    BadSignature,
}

/// A parsed (not yet verified) SAS token.
#[derive(Clone, PartialEq, Eq)]
pub struct SasToken {
    /// `sr` exactly as it appeared in the token; this is what was signed.
    sr_raw: String,
    /// `se` exactly as it appeared; also signed.
    se_raw: String,
    /// `sr` percent-decoded: the resource the token is for.
    pub resource: String,
    /// Expiry, seconds since the Unix epoch.
    pub expiry: i64,
    /// Percent-decoded base64 signature.
    signature: String,
    /// The policy (key) name, if any.
    pub key_name: Option<String>,
}

impl std::fmt::Debug for SasToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SasToken")
            .field("resource", &self.resource)
            .field("expiry", &self.expiry)
            .field("key_name", &self.key_name)
            .finish_non_exhaustive()
    }
}

fn decode(s: &str) -> Result<String, SasError> {
    percent_decode_str(s).decode_utf8().map(|c| c.into_owned()).map_err(|_| SasError::Malformed)
}

impl SasToken {
    pub fn parse(token: &str) -> Result<Self, SasError> {
        let mut parts = token.split_whitespace();
        let (Some(scheme), Some(fields), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(SasError::NotSas);
        };
        if !scheme.eq_ignore_ascii_case("SharedAccessSignature") {
            return Err(SasError::NotSas);
        }
        let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
        for pair in fields.split('&') {
            let (name, value) = pair.split_once('=').ok_or(SasError::Malformed)?;
            let slot = match name.to_ascii_lowercase().as_str() {
                "sr" => (&mut sr, "sr"),
                "sig" => (&mut sig, "sig"),
                "se" => (&mut se, "se"),
                "skn" => (&mut skn, "skn"),
                // Unknown fields are not signed and carry no meaning; Azure ignores them too.
                _ => continue,
            };
            if slot.0.is_some() {
                return Err(SasError::Duplicate(slot.1));
            }
            *slot.0 = Some(value);
        }
        let sr_raw = sr.ok_or(SasError::Missing("sr"))?.to_owned();
        let se_raw = se.ok_or(SasError::Missing("se"))?.to_owned();
        let signature = decode(sig.ok_or(SasError::Missing("sig"))?)?;
        let expiry = se_raw.parse::<i64>().map_err(|_| SasError::BadExpiry)?;
        let key_name = match skn {
            Some(v) => Some(decode(v)?).filter(|s| !s.is_empty()),
            None => None,
        };
        Ok(Self { resource: decode(&sr_raw)?, sr_raw, se_raw, expiry, signature, key_name })
    }

    /// The last Unix second [`SasToken::check_expiry`] accepts the token in: its expiry plus
    /// [`MAX_CLOCK_SKEW_SECS`]. A connection opened with the token must not outlive it.
    pub fn accepted_until(&self) -> i64 {
        self.expiry.saturating_add(MAX_CLOCK_SKEW_SECS)
    }

    /// Checks expiry against `now` (Unix seconds), allowing [`MAX_CLOCK_SKEW_SECS`].
    pub fn check_expiry(&self, now: i64) -> Result<(), SasError> {
        if self.accepted_until() < now {
            Err(SasError::Expired)
        } else {
            Ok(())
        }
    }

    /// True when the signature was made with `key`. Constant time in the signature bytes.
    pub fn signed_with(&self, key: &SymmetricKey) -> bool {
        let expected = sign(key, &self.sr_raw, &self.se_raw);
        expected.as_bytes().ct_eq(self.signature.as_bytes()).into()
    }

    /// Whether the token is for device `device_id` of `hub`: its `sr` names
    /// `{hub}/devices/{device_id}`, the host compared case-insensitively and the (case-sensitive)
    /// id exactly. The SDKs write a device id with symbols (`%`, `$`, `?`…) three ways: Python
    /// percent-encodes the whole `sr` once, C# encodes the id inside it first and then the whole
    /// `sr` again, and some send `sr` raw; the id is taken as it stands after the one decoding
    /// of `sr`, after a second, or from the raw `sr`. Which form it was does not widen access:
    /// every form names the same device, and the signature must still be made with its key.
    pub fn names_device(&self, hub: &str, device_id: &str) -> bool {
        let prefix = format!("{hub}/devices/");
        [self.resource.as_str(), self.sr_raw.as_str()].into_iter().any(|sr| {
            let sr = sr.trim_end_matches('/');
            let Some(head) = sr.get(..prefix.len()) else { return false };
            if !head.eq_ignore_ascii_case(&prefix) {
                return false;
            }
            let id = &sr[prefix.len()..];
            id == device_id || percent_decode_str(id).decode_utf8().is_ok_and(|d| d == device_id)
        })
    }

    /// Expiry, resource and signature in one call.
    pub fn verify(&self, key: &SymmetricKey, expected_resource: &str, now: i64) -> Result<(), SasError> {
        self.check_expiry(now)?;
        if !resource_matches(&self.resource, expected_resource) {
            return Err(SasError::WrongResource);
        }
        if !self.signed_with(key) {
            return Err(SasError::BadSignature);
        }
        Ok(())
    }
}

/// `resource` (decoded `sr`) grants access to `expected` when it is the same path, compared
/// case-insensitively (host names and registration ids are case-insensitive), or a prefix of it
/// ending at a `/` boundary, as Azure's scoping of policy tokens works.
pub fn resource_matches(resource: &str, expected: &str) -> bool {
    let r = resource.trim_end_matches('/').to_ascii_lowercase();
    let e = expected.trim_end_matches('/').to_ascii_lowercase();
    e == r || (e.starts_with(&r) && e.as_bytes().get(r.len()) == Some(&b'/'))
}

/// base64(HMAC-SHA256(key, "{sr}\n{se}")).
pub fn sign(key: &SymmetricKey, sr: &str, se: &str) -> String {
    use base64::Engine;
    let msg = format!("{sr}\n{se}");
    base64::engine::general_purpose::STANDARD.encode(key.hmac(msg.as_bytes()))
}

/// Builds a token the way the Python SDK does: `sr` percent-encoded, upper-case hex.
pub fn build_token(key: &SymmetricKey, resource: &str, expiry: i64, key_name: Option<&str>) -> String {
    let sr = utf8_percent_encode(resource, URI_COMPONENT).to_string();
    let se = expiry.to_string();
    let sig = utf8_percent_encode(&sign(key, &sr, &se), URI_COMPONENT).to_string();
    let mut t = format!("SharedAccessSignature sr={sr}&sig={sig}&se={se}");
    if let Some(n) = key_name {
        t.push_str("&skn=");
        t.push_str(&utf8_percent_encode(n, URI_COMPONENT).to_string());
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev_key() -> SymmetricKey {
        SymmetricKey::from_base64("SV+2SImDP9Vx9XL3ACWx9N9ZFlb6ue3jKrTWmct/YVk=").unwrap()
    }
    const NOW: i64 = 1_699_999_000;

    // Vectors A1-A7 of wire-examples.md, cross-checked against the SDKs' own token code.
    const A1: &str = "SharedAccessSignature sr=0ne00000001%2Fregistrations%2Fdev-001&sig=fN4FZ1Kio8sXHI9yXOBL8ZWQnYrB7aae8QoYjB83HDo%3D&se=1700000000";
    const A2: &str = "SharedAccessSignature sr=0ne00000001/registrations/dev-001&sig=1wVj2FTyuxx%2F6HVyW2mkJcCw793AL3dzjlNscKY39kU%3D&skn=registration&se=1700000000";
    const A3: &str = "SharedAccessSignature sr=0ne00000001%2fregistrations%2fdev-001&sig=Q7fh4WtS8mZopQTHyj4aCkTAjnAYfHIIUtXno7saUbU%3d&se=1700000000&skn=registration";
    const A4: &str = "SharedAccessSignature sr=0ne00000001/registrations/dev-001&sig=1wVj2FTyuxx%2F6HVyW2mkJcCw793AL3dzjlNscKY39kU%3D&se=1700000000&skn=";
    const A5: &str = "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fdev-001&sig=dH%2FBOMR1yoMPfNtctGZIUYUiSuahGqtr5h9gHwcq60Q%3D&se=1700000000";
    const A6: &str = "SharedAccessSignature sr=myhub.azure-devices.net/devices/dev-001&sig=vvGm%2bhOaoxBCwAMgc7JU600s12zw%2ftk6Ysl8V42qOYU%3d&se=1700000000";
    const A7: &str = "SharedAccessSignature sr=mydps.azure-devices-provisioning.net&sig=3XGoBpU8zs%2F7bx5bdhDa5AV0WaK5nfbAcOlMYP2RfNk%3D&skn=provisioningserviceowner&se=1700000000";

    #[test]
    fn every_sdk_style_dps_token_verifies() {
        for t in [A1, A2, A3, A4] {
            let tok = SasToken::parse(t).unwrap();
            assert_eq!(tok.resource, "0ne00000001/registrations/dev-001");
            tok.verify(&dev_key(), "0ne00000001/registrations/dev-001", NOW).unwrap_or_else(|e| panic!("{t}: {e}"));
        }
        assert_eq!(SasToken::parse(A2).unwrap().key_name.as_deref(), Some("registration"));
        assert_eq!(SasToken::parse(A4).unwrap().key_name, None);
    }

    #[test]
    fn a_device_id_with_symbols_is_named_as_every_sdk_encodes_it() {
        let (key, se) = (dev_key(), NOW + 10);
        let id = "a%b?c$d'e(f)";
        let python = build_token(&key, &format!("h.example/devices/{id}"), se, None);
        let once = utf8_percent_encode(id, URI_COMPONENT).to_string();
        let csharp = build_token(&key, &format!("h.example/devices/{once}"), se, None);
        let sr = format!("H.EXAMPLE/devices/{id}");
        let raw = format!("SharedAccessSignature sr={sr}&sig={}&se={se}", sign(&key, &sr, &se.to_string()));
        for t in [python, csharp, raw] {
            let tok = SasToken::parse(&t).unwrap();
            assert!(tok.names_device("h.example", id), "{t}");
            assert!(tok.signed_with(&key), "{t}");
            assert!(!tok.names_device("h.example", "a%b?c$d'E(f)"), "ids are case-sensitive: {t}");
            assert!(!tok.names_device("other.example", id), "{t}");
        }
        let plain = SasToken::parse(&build_token(&key, "h.example/devices/dev-1/", se, None)).unwrap();
        assert!(plain.names_device("h.example", "dev-1"));
        assert!(!plain.names_device("h.example", "dev-"));
        assert!(!SasToken::parse(&build_token(&key, "h.example/devices", se, None))
            .unwrap()
            .names_device("h.example", ""));
    }

    #[test]
    fn hub_and_service_tokens_verify() {
        for t in [A5, A6] {
            SasToken::parse(t).unwrap().verify(&dev_key(), "myhub.azure-devices.net/devices/dev-001", NOW).unwrap();
        }
        let policy = SymmetricKey::from_base64("ZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXp7fH1+f4CBgoM=").unwrap();
        let t = SasToken::parse(A7).unwrap();
        t.verify(&policy, "mydps.azure-devices-provisioning.net", NOW).unwrap();
        assert_eq!(t.key_name.as_deref(), Some("provisioningserviceowner"));
    }

    #[test]
    fn signing_the_decoded_sr_is_not_what_python_signed() {
        // A1 and A2 decode to the same resource but sign different strings.
        let a1 = SasToken::parse(A1).unwrap();
        let a2 = SasToken::parse(A2).unwrap();
        assert_eq!(a1.resource, a2.resource);
        assert_ne!(a1.signature, a2.signature);
    }

    #[test]
    fn refusals() {
        let tok = SasToken::parse(A1).unwrap();
        assert_eq!(tok.verify(&dev_key(), "0ne00000001/registrations/dev-002", NOW), Err(SasError::WrongResource));
        assert_eq!(tok.verify(&dev_key(), "0ne00000001/registrations/dev-001", 1_700_000_301), Err(SasError::Expired));
        // Within the skew it still works.
        tok.verify(&dev_key(), "0ne00000001/registrations/dev-001", 1_700_000_299).unwrap();
        let other = SymmetricKey::from_base64("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap();
        assert_eq!(tok.verify(&other, "0ne00000001/registrations/dev-001", NOW), Err(SasError::BadSignature));
        // Tampering with se breaks the signature.
        let t = SasToken::parse(&A1.replace("se=1700000000", "se=1800000000")).unwrap();
        assert_eq!(t.verify(&dev_key(), "0ne00000001/registrations/dev-001", NOW), Err(SasError::BadSignature));
    }

    #[test]
    fn malformed_tokens() {
        assert_eq!(SasToken::parse(""), Err(SasError::NotSas));
        assert_eq!(SasToken::parse("Bearer abc"), Err(SasError::NotSas));
        assert_eq!(SasToken::parse("SharedAccessSignature sr=a&sig=b"), Err(SasError::Missing("se")));
        assert_eq!(SasToken::parse("SharedAccessSignature sr=a&sig=b&se=x"), Err(SasError::BadExpiry));
        assert_eq!(SasToken::parse("SharedAccessSignature sr=a&sr=b&sig=b&se=1"), Err(SasError::Duplicate("sr")));
        assert_eq!(SasToken::parse("SharedAccessSignature sr=a&junk&se=1"), Err(SasError::Malformed));
        assert_eq!(SasToken::parse("SharedAccessSignature sr=%ff&sig=b&se=1"), Err(SasError::Malformed));
        assert_eq!(SasToken::parse("SharedAccessSignature sr=a b"), Err(SasError::NotSas));
    }

    #[test]
    fn build_round_trips_and_matches_python() {
        // Python's RenewableSasToken output for A1 is exactly what build_token makes.
        assert_eq!(build_token(&dev_key(), "0ne00000001/registrations/dev-001", 1_700_000_000, None), A1);
        let t = build_token(&dev_key(), "h/devices/d", 5_000_000_000, Some("iothubowner"));
        SasToken::parse(&t).unwrap().verify(&dev_key(), "h/devices/d", NOW).unwrap();
    }

    #[test]
    fn resource_scoping() {
        assert!(resource_matches("LocalHost", "localhost"));
        assert!(resource_matches("localhost/", "localhost"));
        assert!(resource_matches("localhost", "localhost/devices/x"));
        assert!(!resource_matches("localhost/dev", "localhost/devices/x"));
        assert!(!resource_matches("localhostx", "localhost"));
    }
}
