//! X.509 certificates: as the service API takes them (PEM or base64 DER in enrollment and
//! device bodies) and as a device presents them in its TLS handshake (DER chain), through
//! `fleetgate_core::x509`.
//!
//! The input is tried as certificate text, as one DER certificate and as a TLS chain (DER
//! certificates back to back, split where each one's outer length says it ends).
//!
//! Invariants: never panics; a certificate that parses re-encodes (PEM and base64) to the same
//! DER; its info, thumbprints and validity are computable; leaf and chain checks never panic and
//! a chain never verifies up to a CA it was not issued by (a fixed CA the fuzzer cannot sign for).

#![no_main]

use fleetgate_core::x509::{check_leaf, match_thumbprint, verify_chain, Certificate, CertificateChain};
use libfuzzer_sys::fuzz_target;

/// 2027-01-15: inside the seed certificates' validity.
const NOW: i64 = 1_800_000_000;

/// A real CA (ECDSA P-256, CN=fuzz-root), whose key is not in this program.
const FIXED_CA: &str = include_str!("../x509/fuzz-root.pem");

fn exercise(cert: &Certificate) {
    assert_eq!(Certificate::parse(&cert.to_pem()).as_ref(), Ok(cert));
    assert_eq!(Certificate::parse(&cert.to_base64()).as_ref(), Ok(cert));
    let info = cert.info();
    assert_eq!(info.sha1_thumbprint.len(), 40);
    assert_eq!(info.sha256_thumbprint.len(), 64);
    assert_eq!(match_thumbprint(cert, &[None, Some(&info.sha1_thumbprint)]), Some(1));
    let (not_before, not_after) = cert.validity();
    let _ = (not_before, not_after, cert.common_name(), cert.is_ca());
}

/// Splits back-to-back DER elements by their outer tag-length header (at most 8; a length that
/// runs past the end takes the rest).
fn split_der(mut data: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while data.len() >= 2 && out.len() < 8 {
        let (header, len) = match data[1] {
            l @ 0..=0x7f => (2, usize::from(l)),
            l @ 0x81..=0x84 => {
                let n = usize::from(l & 0x7f);
                let Some(bytes) = data.get(2..2 + n) else { break };
                (2 + n, bytes.iter().fold(0usize, |a, b| (a << 8) | usize::from(*b)))
            }
            _ => (2, data.len()),
        };
        let end = header.saturating_add(len).min(data.len());
        out.push(data[..end].to_vec());
        data = &data[end..];
    }
    out
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(cert) = Certificate::parse(text) {
            exercise(&cert);
        }
    }
    if let Ok(cert) = Certificate::from_der(data) {
        exercise(&cert);
    }

    let Some(chain) = CertificateChain::new(split_der(data)) else { return };
    let _ = check_leaf(&chain, NOW);
    let ca = Certificate::parse(FIXED_CA).expect("the fixed CA parses");
    assert!(verify_chain(&chain, &[ca], NOW).is_err(), "a fuzzed chain verified up to a CA it cannot sign for");
    // Trusting the chain's own certificates (an enrollment that lists them as CAs).
    let own: Vec<Certificate> = chain.certificates().iter().filter_map(|d| Certificate::from_der(d).ok()).collect();
    let _ = verify_chain(&chain, &own, NOW);
});
