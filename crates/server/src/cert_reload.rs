//! The server certificate, reloadable while serving: the TLS configs resolve the certificate
//! per handshake from here, so replacing the files (an operator's renewed certificate, or the
//! generated one re-issued) takes effect for new connections without touching open ones.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug)]
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// Modification times of the files last loaded.
    stamp: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Reads a PEM certificate chain and private key into a signing-ready key.
pub fn load(cert_pem: &Path, key_pem: &Path) -> Result<CertifiedKey, String> {
    let certs: Vec<CertificateDer<'static>> = {
        let data = std::fs::read(cert_pem).map_err(|e| format!("{}: {e}", cert_pem.display()))?;
        rustls_pemfile::certs(&mut data.as_slice())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}: {e}", cert_pem.display()))?
    };
    if certs.is_empty() {
        return Err(format!("{}: no certificate", cert_pem.display()));
    }
    let key: PrivateKeyDer<'static> = {
        let data = std::fs::read(key_pem).map_err(|e| format!("{}: {e}", key_pem.display()))?;
        rustls_pemfile::private_key(&mut data.as_slice())
            .map_err(|e| format!("{}: {e}", key_pem.display()))?
            .ok_or_else(|| format!("{}: no private key", key_pem.display()))?
    };
    let signing = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{}: {e}", key_pem.display()))?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match().map_err(|e| format!("{} does not match {}: {e}", key_pem.display(), cert_pem.display()))?;
    Ok(ck)
}

impl ReloadingCert {
    pub fn new(cert_path: &Path, key_path: &Path) -> Result<Arc<Self>, String> {
        let ck = load(cert_path, key_path)?;
        Ok(Arc::new(Self {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            current: RwLock::new(Arc::new(ck)),
            stamp: Mutex::new((modified(cert_path), modified(key_path))),
        }))
    }

    /// The names of `names` the certificate in use is not valid for (as a client checks it:
    /// DNS names case-insensitively, wildcards, IP addresses against IP entries).
    pub fn names_not_covered<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner()).clone();
        let leaf = current.cert.first().and_then(|c| webpki::EndEntityCert::try_from(c).ok());
        names
            .into_iter()
            .filter(|name| {
                let covered = match (&leaf, rustls::pki_types::ServerName::try_from(*name)) {
                    (Some(leaf), Ok(server_name)) => leaf.verify_is_valid_for_subject_name(&server_name).is_ok(),
                    _ => false,
                };
                !covered
            })
            .map(str::to_owned)
            .collect()
    }

    /// Loads the files again if either changed. A broken new pair is refused (and logged) and
    /// the current certificate stays in use.
    pub fn reload_if_changed(&self) -> bool {
        let now = (modified(&self.cert_path), modified(&self.key_path));
        let mut stamp = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
        if *stamp == now {
            return false;
        }
        match load(&self.cert_path, &self.key_path) {
            Ok(ck) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ck);
                *stamp = now;
                tracing::info!(cert = %self.cert_path.display(), "server certificate reloaded");
                true
            }
            Err(e) => {
                // Try again at the next check: the files may be mid-write.
                tracing::error!(error = %e, "server certificate not reloaded; keeping the current one");
                false
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

#[cfg(test)]
mod tests {
    use super::ReloadingCert;

    #[test]
    fn names_the_certificate_does_not_cover() {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".into(), "*.fleet.test".into()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        let rc = ReloadingCert::new(&c, &k).unwrap();
        let names = ["localhost", "LOCALHOST", "hub.fleet.test", "127.0.0.201", "a.b.fleet.test", "not a name"];
        assert_eq!(rc.names_not_covered(names), ["127.0.0.201", "a.b.fleet.test", "not a name"]);
    }
}
