//! TLS for every listener: TLS 1.2 (the Python SDK pins it) and 1.3, modern AEAD suites only.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

pub fn server_config(cert_pem: &Path, key_pem: &Path) -> Result<Arc<ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = {
        let data = std::fs::read(cert_pem).map_err(|e| format!("{}: {e}", cert_pem.display()))?;
        rustls_pemfile::certs(&mut data.as_slice())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}: {e}", cert_pem.display()))?
    };
    let key: PrivateKeyDer<'static> = {
        let data = std::fs::read(key_pem).map_err(|e| format!("{}: {e}", key_pem.display()))?;
        rustls_pemfile::private_key(&mut data.as_slice())
            .map_err(|e| format!("{}: {e}", key_pem.display()))?
            .ok_or_else(|| format!("{}: no private key", key_pem.display()))?
    };
    // ring's defaults are ECDHE with AES-GCM / ChaCha20-Poly1305 only: no CBC, no RSA key exchange.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(config))
}
