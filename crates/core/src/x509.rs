//! X.509 attestation: certificates as Azure's API carries them (PEM or base64 DER), the
//! `X509CertificateInfo` the server reports for them, and the checks a device's TLS client
//! certificate chain must pass before DPS or the hub trusts it.
//!
//! The TLS layer only proves that the device holds the leaf's private key (the handshake
//! signature); *which* certificates are trusted depends on the enrollment or hub identity the
//! device claims, so that decision is made here, per request, with no I/O:
//! - [`check_leaf`]: the leaf alone — well-formed, inside its validity dates, usable for client
//!   authentication (`digitalSignature` when key usage is present, `clientAuth` when extended key
//!   usage is present), a chain no longer than [`MAX_CHAIN_CERTIFICATES`].
//! - [`match_thumbprint`]: a pinned leaf (individual enrollments, `selfSigned` hub identities).
//! - [`verify_chain`]: a chain leading to one of an enrollment's CA certificates (root or
//!   intermediate), with every signature, validity period, CA constraint and key usage on the path
//!   checked by webpki (the verifier rustls itself uses).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, UnixTime};
use serde::{Deserialize, Serialize};
use sha1::Digest as _;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::time::Timestamp;

/// The most certificates a device may present (leaf plus CAs). Azure does not publish its
/// limit; five covers a leaf under two intermediates and a root with room to spare, and bounds
/// the path building work an unauthenticated client can cause.
pub const MAX_CHAIN_CERTIFICATES: usize = 5;
/// The most certificates the TLS layer takes at all: a longer chain is refused (with a 401, and
/// logged) by DPS and the hub, not dropped in the handshake; beyond this it is abuse.
pub const MAX_PRESENTED_CERTIFICATES: usize = 2 * MAX_CHAIN_CERTIFICATES;
/// The largest certificate accepted, in DER bytes (RSA-4096 certificates are about 1.5 KB).
pub const MAX_CERTIFICATE_BYTES: usize = 16 * 1024;

/// The certificate chain a device presented in its TLS handshake, leaf first, as DER.
#[derive(Clone, PartialEq, Eq)]
pub struct CertificateChain(Arc<[Vec<u8>]>);

impl CertificateChain {
    /// `None` when the device presented no certificate.
    pub fn new(certificates: Vec<Vec<u8>>) -> Option<Self> {
        (!certificates.is_empty()).then(|| Self(certificates.into()))
    }

    pub fn leaf(&self) -> &[u8] {
        &self.0[0]
    }

    /// Every certificate, leaf first.
    pub fn certificates(&self) -> &[Vec<u8>] {
        &self.0
    }
}

impl fmt::Debug for CertificateChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CertificateChain({} certificates)", self.0.len())
    }
}

/// Why a certificate given to the service API is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertificateError {
    #[error("the certificate is neither PEM nor base64-encoded DER")]
    Encoding,
    #[error("the certificate is larger than {MAX_CERTIFICATE_BYTES} bytes")]
    TooLarge,
    #[error("the certificate is not a valid X.509 certificate: {0}")]
    Malformed(String),
}

/// One parsed, well-formed X.509 certificate.
#[derive(Clone, PartialEq, Eq)]
pub struct Certificate {
    der: Vec<u8>,
}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Certificate({})", self.sha256_thumbprint())
    }
}

const PEM_BEGIN: &str = "-----BEGIN CERTIFICATE-----";
const PEM_END: &str = "-----END CERTIFICATE-----";

impl Certificate {
    /// A DER certificate; it must parse completely (no trailing bytes).
    pub fn from_der(der: &[u8]) -> Result<Self, CertificateError> {
        if der.len() > MAX_CERTIFICATE_BYTES {
            return Err(CertificateError::TooLarge);
        }
        match X509Certificate::from_der(der) {
            Ok(([], _)) => Ok(Self { der: der.to_vec() }),
            Ok(_) => Err(CertificateError::Malformed("trailing data after the certificate".into())),
            Err(e) => Err(CertificateError::Malformed(e.to_string())),
        }
    }

    /// A certificate as Azure's service API takes it: PEM (the first `CERTIFICATE` block) or
    /// the base64 of the DER bytes.
    pub fn parse(text: &str) -> Result<Self, CertificateError> {
        let text = text.trim();
        let b64: String = match text.find(PEM_BEGIN) {
            Some(start) => {
                let body = &text[start + PEM_BEGIN.len()..];
                let end = body.find(PEM_END).ok_or(CertificateError::Encoding)?;
                body[..end].split_whitespace().collect()
            }
            None => text.split_whitespace().collect(),
        };
        if b64.len() > MAX_CERTIFICATE_BYTES * 2 {
            return Err(CertificateError::TooLarge);
        }
        let der = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| CertificateError::Encoding)?;
        Self::from_der(&der)
    }

    pub fn der(&self) -> &[u8] {
        &self.der
    }

    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.der)
    }

    pub fn to_pem(&self) -> String {
        let b64 = self.to_base64();
        let mut out = String::from(PEM_BEGIN);
        out.push('\n');
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            out.push('\n');
        }
        out.push_str(PEM_END);
        out.push('\n');
        out
    }

    fn parsed(&self) -> X509Certificate<'_> {
        X509Certificate::from_der(&self.der).expect("checked when constructed").1
    }

    /// SHA-1 of the DER, upper-case hex: the thumbprint Azure shows (`sha1Thumbprint`).
    pub fn sha1_thumbprint(&self) -> String {
        hex_upper(&sha1::Sha1::digest(&self.der))
    }

    pub fn sha256_thumbprint(&self) -> String {
        hex_upper(&sha2::Sha256::digest(&self.der))
    }

    /// The subject's (first) common name.
    pub fn common_name(&self) -> Option<String> {
        let cert = self.parsed();
        let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_owned();
        Some(cn)
    }

    /// Whether the certificate may sign others (basic constraints `CA:TRUE`).
    pub fn is_ca(&self) -> bool {
        self.parsed().is_ca()
    }

    /// Validity period as Unix seconds (not before, not after).
    pub fn validity(&self) -> (i64, i64) {
        let cert = self.parsed();
        (cert.validity().not_before.timestamp(), cert.validity().not_after.timestamp())
    }

    /// Azure's `X509CertificateInfo`, which the server fills in for every certificate it stores.
    pub fn info(&self) -> CertificateInfo {
        let cert = self.parsed();
        let (not_before, not_after) = self.validity();
        CertificateInfo {
            subject_name: cert.subject().to_string(),
            sha1_thumbprint: self.sha1_thumbprint(),
            sha256_thumbprint: self.sha256_thumbprint(),
            issuer_name: cert.issuer().to_string(),
            not_before_utc: Timestamp::from_unix_seconds(not_before).to_azure_string(),
            not_after_utc: Timestamp::from_unix_seconds(not_after).to_azure_string(),
            serial_number: hex_upper(cert.raw_serial()),
            version: cert.version().0 + 1,
        }
    }
}

fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// Azure's `X509CertificateInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateInfo {
    pub subject_name: String,
    pub sha1_thumbprint: String,
    pub sha256_thumbprint: String,
    pub issuer_name: String,
    pub not_before_utc: String,
    pub not_after_utc: String,
    pub serial_number: String,
    pub version: u32,
}

/// Why a device's certificate is not accepted. Logged; the device only ever sees "unauthorized".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertificateRefusal {
    #[error("no client certificate was presented")]
    NoCertificate,
    #[error("the device presented {0} certificates; at most {MAX_CHAIN_CERTIFICATES} are accepted")]
    ChainTooLong(usize),
    #[error("malformed client certificate: {0}")]
    Malformed(String),
    #[error("the certificate's common name {found:?} is not {expected:?}")]
    CommonNameMismatch { expected: String, found: Option<String> },
    #[error("a certificate in the chain is not valid yet")]
    NotYetValid,
    #[error("a certificate in the chain has expired")]
    Expired,
    #[error("the certificate may not be used for client authentication: {0}")]
    KeyUsage(&'static str),
    #[error("the certificate is not one of the enrolled certificates")]
    UnknownCertificate,
    #[error("the chain does not lead to a trusted CA: {0}")]
    UnknownCa(String),
    #[error("the trusted CA certificate has expired or is not valid yet")]
    CaNotValid,
}

/// Checks what every path requires of the leaf: a chain of acceptable length, a well-formed
/// leaf inside its validity dates, and key usages that allow TLS client authentication.
pub fn check_leaf(chain: &CertificateChain, now: i64) -> Result<Certificate, CertificateRefusal> {
    if chain.certificates().len() > MAX_CHAIN_CERTIFICATES {
        return Err(CertificateRefusal::ChainTooLong(chain.certificates().len()));
    }
    let leaf = Certificate::from_der(chain.leaf()).map_err(|e| CertificateRefusal::Malformed(e.to_string()))?;
    let (not_before, not_after) = leaf.validity();
    if now < not_before {
        return Err(CertificateRefusal::NotYetValid);
    }
    if now > not_after {
        return Err(CertificateRefusal::Expired);
    }
    let cert = leaf.parsed();
    match cert.key_usage() {
        Ok(Some(ku)) if !ku.value.digital_signature() => {
            return Err(CertificateRefusal::KeyUsage("key usage without digitalSignature"))
        }
        Ok(_) => {}
        Err(_) => return Err(CertificateRefusal::KeyUsage("malformed or duplicated key usage extension")),
    }
    match cert.extended_key_usage() {
        Ok(Some(eku)) if !(eku.value.client_auth || eku.value.any) => {
            return Err(CertificateRefusal::KeyUsage("extended key usage without clientAuth"))
        }
        Ok(_) => {}
        Err(_) => return Err(CertificateRefusal::KeyUsage("malformed or duplicated extended key usage extension")),
    }
    Ok(leaf)
}

/// Requires the leaf's common name to be exactly `expected` (the registration id at DPS, the
/// device id at the hub).
pub fn require_common_name(leaf: &Certificate, expected: &str) -> Result<(), CertificateRefusal> {
    match leaf.common_name() {
        Some(cn) if cn == expected => Ok(()),
        found => Err(CertificateRefusal::CommonNameMismatch { expected: expected.to_owned(), found }),
    }
}

/// The index of the thumbprint (SHA-1 or SHA-256 hex, any case, colons allowed) that names
/// `leaf`, if any.
pub fn match_thumbprint(leaf: &Certificate, thumbprints: &[Option<&str>]) -> Option<usize> {
    let (sha1, sha256) = (leaf.sha1_thumbprint(), leaf.sha256_thumbprint());
    thumbprints.iter().position(|t| {
        t.map(|t| t.replace(':', "")).is_some_and(|t| t.eq_ignore_ascii_case(&sha1) || t.eq_ignore_ascii_case(&sha256))
    })
}

/// A chain verified up to one of the trusted CAs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainMatch {
    /// Which of the given CAs the chain leads to.
    pub ca_index: usize,
    /// Certificates between the leaf and that CA: fewer means a more specific CA.
    pub intermediates: usize,
}

/// The signature algorithms accepted in device chains: ECDSA, Ed25519 and RSA (2048+ bits).
static ALGORITHMS: &[&dyn SignatureVerificationAlgorithm] = &[
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P256_SHA384,
    webpki::ring::ECDSA_P384_SHA256,
    webpki::ring::ECDSA_P384_SHA384,
    webpki::ring::ED25519,
    webpki::ring::RSA_PKCS1_2048_8192_SHA256,
    webpki::ring::RSA_PKCS1_2048_8192_SHA384,
    webpki::ring::RSA_PKCS1_2048_8192_SHA512,
    webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
    webpki::ring::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
    webpki::ring::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
];

/// Verifies that the presented chain (leaf first; the other certificates are candidate
/// intermediates, in any order) leads to one of `cas`, root or intermediate: every signature,
/// validity period, CA constraint and `clientAuth` extended key usage (where present) on the
/// path. A CA outside its own validity period is not trusted. When several CAs verify, the most
/// specific one (fewest certificates between it and the leaf) wins.
pub fn verify_chain(chain: &CertificateChain, cas: &[Certificate], now: i64) -> Result<ChainMatch, CertificateRefusal> {
    let leaf_der = CertificateDer::from(chain.leaf());
    let leaf =
        webpki::EndEntityCert::try_from(&leaf_der).map_err(|e| CertificateRefusal::Malformed(format!("{e:?}")))?;
    let intermediates: Vec<CertificateDer<'_>> =
        chain.certificates()[1..].iter().map(|d| CertificateDer::from(d.as_slice())).collect();
    let time = UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(now).unwrap_or(0)));
    let mut best: Option<ChainMatch> = None;
    let mut refusal = CertificateRefusal::UnknownCa("no trusted CA".into());
    for (ca_index, ca) in cas.iter().enumerate() {
        let (not_before, not_after) = ca.validity();
        if now < not_before || now > not_after {
            refusal = CertificateRefusal::CaNotValid;
            continue;
        }
        let ca_der = CertificateDer::from(ca.der());
        let Ok(anchor) = webpki::anchor_from_trusted_cert(&ca_der) else { continue };
        let anchors = [anchor];
        match leaf.verify_for_usage(
            ALGORITHMS,
            &anchors,
            &intermediates,
            time,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        ) {
            Ok(path) => {
                let found = ChainMatch { ca_index, intermediates: path.intermediate_certificates().count() };
                if best.is_none_or(|b| found.intermediates < b.intermediates) {
                    best = Some(found);
                }
            }
            Err(e) => {
                let mapped = map_webpki_error(&e);
                // An unknown issuer is the expected answer from every other CA: keep a more
                // telling reason if one CA gave it.
                if !matches!(mapped, CertificateRefusal::UnknownCa(_))
                    || matches!(refusal, CertificateRefusal::UnknownCa(_))
                {
                    refusal = mapped;
                }
            }
        }
    }
    best.ok_or(refusal)
}

fn map_webpki_error(e: &webpki::Error) -> CertificateRefusal {
    use webpki::Error as E;
    match e {
        E::CertExpired { .. } => CertificateRefusal::Expired,
        E::CertNotValidYet { .. } => CertificateRefusal::NotYetValid,
        E::RequiredEkuNotFoundContext(_) => {
            CertificateRefusal::KeyUsage("extended key usage without clientAuth on the path")
        }
        E::CaUsedAsEndEntity => CertificateRefusal::KeyUsage("a CA certificate cannot be a device certificate"),
        E::MaximumPathDepthExceeded | E::PathLenConstraintViolated => {
            CertificateRefusal::UnknownCa("the path is longer than the CAs allow".into())
        }
        E::UnknownIssuer => CertificateRefusal::UnknownCa("unknown issuer".into()),
        E::InvalidSignatureForPublicKey => CertificateRefusal::UnknownCa(
            "the signature does not verify with the CA's key (another CA of the same name?)".into(),
        ),
        other => CertificateRefusal::UnknownCa(format!("{other:?}")),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use fleetgate_testkit::pki;
    pub use fleetgate_testkit::pki::{params, Issued};
    use rcgen::{ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose};

    /// A test certificate as this crate reads it.
    pub trait AsCertificate {
        fn certificate(&self) -> Certificate;
    }

    impl AsCertificate for Issued {
        fn certificate(&self) -> Certificate {
            Certificate::from_der(self.der()).unwrap()
        }
    }

    pub fn ca(cn: &str) -> Issued {
        pki::root(cn)
    }

    pub fn issue(cn: &str, ca: bool, issuer: &Issued, days: (i64, i64)) -> Issued {
        pki::issue(params(cn, ca, days), issuer)
    }

    pub fn leaf(cn: &str, issuer: &Issued) -> Issued {
        pki::device(cn, issuer)
    }

    pub fn chain(certs: &[&Issued]) -> CertificateChain {
        CertificateChain::new(certs.iter().map(|c| c.der().to_vec()).collect()).unwrap()
    }

    fn now() -> i64 {
        Timestamp::now().unix_seconds()
    }

    #[test]
    fn parses_pem_and_base64_der_and_fills_info() {
        let root = ca("Fleetgate Test Root");
        let from_pem = Certificate::parse(&root.pem()).unwrap();
        let from_b64 = Certificate::parse(&from_pem.to_base64()).unwrap();
        assert_eq!(from_pem, from_b64);
        assert_eq!(Certificate::parse(&from_pem.to_pem()).unwrap(), from_pem);
        let info = from_pem.info();
        assert_eq!(info.subject_name, "CN=Fleetgate Test Root");
        assert_eq!(info.issuer_name, "CN=Fleetgate Test Root");
        assert_eq!(info.sha1_thumbprint.len(), 40);
        assert_eq!(info.sha256_thumbprint.len(), 64);
        assert_eq!(info.version, 3);
        assert!(info.not_after_utc.ends_with('Z'));
        assert!(from_pem.is_ca());
        assert_eq!(from_pem.common_name().as_deref(), Some("Fleetgate Test Root"));
        for bad in ["", "not base64!", "aGVsbG8=", "-----BEGIN CERTIFICATE-----\naGVsbG8=\n"] {
            assert!(Certificate::parse(bad).is_err(), "{bad:?}");
        }
        let mut trailing = from_pem.der().to_vec();
        trailing.push(0);
        assert!(Certificate::from_der(&trailing).is_err());
    }

    #[test]
    fn a_chain_through_an_intermediate_leads_to_the_root_or_the_intermediate() {
        let root = ca("root");
        let inter = issue("intermediate", true, &root, (-1, 365));
        let dev = leaf("dev-1", &inter);
        let presented = chain(&[&dev, &inter]);
        assert_eq!(check_leaf(&presented, now()).unwrap().common_name().as_deref(), Some("dev-1"));
        let m = verify_chain(&presented, &[root.certificate()], now()).unwrap();
        assert_eq!(m, ChainMatch { ca_index: 0, intermediates: 1 });
        // The intermediate itself as the trusted CA: the more specific match wins.
        let m = verify_chain(&presented, &[root.certificate(), inter.certificate()], now()).unwrap();
        assert_eq!(m, ChainMatch { ca_index: 1, intermediates: 0 });
        // Without the intermediate in the chain the root cannot be reached.
        let alone = chain(&[&dev]);
        assert!(matches!(verify_chain(&alone, &[root.certificate()], now()), Err(CertificateRefusal::UnknownCa(_))));
        // Another CA with the same name does not verify the signature.
        let impostor = ca("root");
        assert!(verify_chain(&presented, &[impostor.certificate()], now()).is_err());
    }

    #[test]
    fn refusals() {
        let root = ca("root");
        let now = now();
        let expired = issue("dev", false, &root, (-30, -1));
        assert_eq!(check_leaf(&chain(&[&expired]), now).unwrap_err(), CertificateRefusal::Expired);
        assert_eq!(
            verify_chain(&chain(&[&expired]), &[root.certificate()], now).unwrap_err(),
            CertificateRefusal::Expired
        );
        let future = issue("dev", false, &root, (2, 30));
        assert_eq!(check_leaf(&chain(&[&future]), now).unwrap_err(), CertificateRefusal::NotYetValid);

        let ok = leaf("dev-1", &root);
        let l = check_leaf(&chain(&[&ok]), now).unwrap();
        assert!(require_common_name(&l, "dev-1").is_ok());
        assert!(matches!(
            require_common_name(&l, "dev-2"),
            Err(CertificateRefusal::CommonNameMismatch { found: Some(_), .. })
        ));
        assert!(require_common_name(&l, "DEV-1").is_err());

        let long = chain(&[&ok, &root, &root, &root, &root, &root]);
        assert_eq!(check_leaf(&long, now).unwrap_err(), CertificateRefusal::ChainTooLong(6));

        // A CA certificate is not a device certificate.
        let sub = issue("dev-ca", true, &root, (-1, 30));
        assert!(matches!(
            verify_chain(&chain(&[&sub]), &[root.certificate()], now),
            Err(CertificateRefusal::KeyUsage(_))
        ));

        // Key usage without digitalSignature, extended key usage without clientAuth.
        let key = KeyPair::generate().unwrap();
        let mut p = params("dev", false, (-1, 30));
        p.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
        let cert = p.signed_by(&key, &root.cert, &root.key).unwrap();
        let c = CertificateChain::new(vec![cert.der().to_vec()]).unwrap();
        assert!(matches!(check_leaf(&c, now), Err(CertificateRefusal::KeyUsage(_))));
        let mut p = params("dev", false, (-1, 30));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = p.signed_by(&key, &root.cert, &root.key).unwrap();
        let c = CertificateChain::new(vec![cert.der().to_vec()]).unwrap();
        assert!(matches!(check_leaf(&c, now), Err(CertificateRefusal::KeyUsage(_))));
        assert!(matches!(verify_chain(&c, &[root.certificate()], now), Err(CertificateRefusal::KeyUsage(_))));

        // An expired CA is not trusted.
        let old = pki::self_signed(params("old", true, (-30, -1)));
        let d = issue("dev", false, &old, (-1, 30));
        assert_eq!(verify_chain(&chain(&[&d]), &[old.certificate()], now).unwrap_err(), CertificateRefusal::CaNotValid);
    }

    proptest::proptest! {
        /// Certificates come from service API bodies and TLS peers: no input may panic a parser.
        #[test]
        fn parsers_never_panic(text in ".{0,300}", der in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = Certificate::parse(&text);
            let _ = Certificate::parse(&format!("{PEM_BEGIN}\n{text}\n{PEM_END}"));
            let _ = Certificate::from_der(&der);
            if let Some(chain) = CertificateChain::new(vec![der.clone(), der]) {
                let _ = check_leaf(&chain, 0);
                let _ = verify_chain(&chain, &[], 0);
            }
        }

        /// A real certificate with bytes changed: still no panic, and never trusted by accident.
        #[test]
        fn mutated_certificates_never_panic(at in 0usize..2000, byte in proptest::num::u8::ANY) {
            static CA: std::sync::OnceLock<(Vec<u8>, Vec<u8>)> = std::sync::OnceLock::new();
            let (ca_der, leaf_der) = CA.get_or_init(|| {
                let ca = ca("root");
                (ca.cert.der().to_vec(), leaf("dev", &ca).cert.der().to_vec())
            });
            let mut der = leaf_der.clone();
            let i = at % der.len();
            proptest::prop_assume!(der[i] != byte);
            der[i] = byte;
            let now = Timestamp::now().unix_seconds();
            if let Ok(c) = Certificate::from_der(&der) {
                let _ = (c.info(), c.common_name(), c.is_ca());
            }
            let chain = CertificateChain::new(vec![der]).unwrap();
            let _ = check_leaf(&chain, now);
            let ca = Certificate::from_der(ca_der).unwrap();
            // Any change to the signed part breaks the signature; a change to the signature itself
            // too (DER-level changes that leave both intact do not exist for ECDSA here).
            proptest::prop_assert!(verify_chain(&chain, &[ca], now).is_err());
        }
    }

    #[test]
    fn thumbprints_match_sha1_or_sha256_in_any_case() {
        let root = ca("root");
        let dev = leaf("dev", &root).certificate();
        let other = leaf("dev", &root).certificate();
        let sha1 = dev.sha1_thumbprint().to_lowercase();
        let sha256 = dev.sha256_thumbprint();
        assert_eq!(match_thumbprint(&dev, &[Some(&other.sha256_thumbprint()), Some(&sha1)]), Some(1));
        assert_eq!(match_thumbprint(&dev, &[Some(&sha256), None]), Some(0));
        assert_eq!(match_thumbprint(&dev, &[None, Some(&other.sha1_thumbprint())]), None);
    }
}
