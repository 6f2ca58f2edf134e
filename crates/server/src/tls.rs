//! TLS for every listener: TLS 1.2 (the Python SDK pins it) and 1.3, modern AEAD suites only.
//!
//! Client certificates are requested but optional: SAS devices send none, X.509 devices send
//! their chain. The handshake only proves that the client holds the leaf's private key (rustls
//! checks its signature over the handshake); *whether* the chain is trusted depends on the
//! enrollment or hub identity the device then claims, so that is decided by DPS and the hub
//! (`fleetgate_core::x509`), not here. The chain reaches them through [`peer_certificates`].

use std::sync::Arc;

use fleetgate_core::x509::{CertificateChain, MAX_CERTIFICATE_BYTES, MAX_PRESENTED_CERTIFICATES};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};

/// The TLS configuration of every listener, with the server certificate resolved per handshake
/// from `cert` (so it can be replaced while serving).
pub fn server_config(cert: Arc<crate::cert_reload::ReloadingCert>) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(crypto_provider());
    let verifier = Arc::new(DeviceCertificates { algorithms: provider.signature_verification_algorithms });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    prefer_own_suite_order(&mut config);
    Ok(Arc::new(config))
}

/// The listeners' crypto: ring's suites (ECDHE with AES-GCM or ChaCha20-Poly1305 only: no CBC,
/// no RSA key exchange), the AES-128-GCM ones first.
///
/// Why AES-128 first: its suites hash with SHA-256, which CPUs with SHA extensions run in
/// hardware, while TLS 1.3's AES-256 suite hashes with SHA-384, which has no such instructions:
/// in a provisioning storm SHA-512's block function was ~4% of the server's CPU (perf; every
/// device, SDK and this client list AES-256 first). TLS_AES_128_GCM_SHA256 is the suite every
/// TLS 1.3 implementation must support (RFC 8446 §9.1).
pub fn crypto_provider() -> rustls::crypto::CryptoProvider {
    use rustls::CipherSuite::*;
    let mut provider = rustls::crypto::ring::default_provider();
    let aes_128 =
        [TLS13_AES_128_GCM_SHA256, TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256];
    // Stable: the others keep ring's order.
    provider.cipher_suites.sort_by_key(|s| !aes_128.contains(&s.suite()));
    provider
}

/// Choose by the server's suite order (see [`crypto_provider`]), not the client's.
pub fn prefer_own_suite_order(config: &mut ServerConfig) {
    config.ignore_client_order = true;
}

/// The client certificate chain of an established TLS connection, if the client sent one.
pub fn peer_certificates(conn: &rustls::ServerConnection) -> Option<CertificateChain> {
    CertificateChain::new(conn.peer_certificates()?.iter().map(|c| c.as_ref().to_vec()).collect())
}

/// Optional client authentication that accepts any well-formed chain of bounded size: trust is
/// decided per device after CONNECT (see the module comment). Handshake signatures are verified
/// as usual, so a client that presents a certificate holds its key.
#[derive(Debug)]
struct DeviceCertificates {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for DeviceCertificates {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    /// No hints: a client then sends whatever certificate it has.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let bad = || rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding);
        if intermediates.len() + 1 > MAX_PRESENTED_CERTIFICATES
            || std::iter::once(end_entity).chain(intermediates).any(|c| c.len() > MAX_CERTIFICATE_BYTES)
        {
            return Err(bad());
        }
        // The leaf must at least parse: its key verifies the handshake signature.
        webpki::EndEntityCert::try_from(end_entity).map_err(|_| bad())?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
