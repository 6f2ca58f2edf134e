//! Certificates for tests (ECDSA P-256, rcgen's default), valid from a day ago unless said.

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};

/// A certificate and its key.
pub struct Issued {
    pub cert: rcgen::Certificate,
    pub key: KeyPair,
}

impl Issued {
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    pub fn der(&self) -> &[u8] {
        self.cert.der()
    }
}

/// A certificate's parameters: a CA (may sign certificates and CRLs) or a device (client
/// authentication), named `cn`, valid from `days.0` to `days.1` days from now.
pub fn params(cn: &str, ca: bool, days: (i64, i64)) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("no names to check");
    p.distinguished_name.push(DnType::CommonName, cn);
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now + time::Duration::days(days.0);
    p.not_after = now + time::Duration::days(days.1);
    if ca {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    } else {
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    p
}

fn key() -> KeyPair {
    KeyPair::generate().expect("key generation")
}

/// `p` signed by `issuer`, with a fresh key.
pub fn issue(p: CertificateParams, issuer: &Issued) -> Issued {
    let key = key();
    let cert = p.signed_by(&key, &issuer.cert, &issuer.key).expect("signing");
    Issued { cert, key }
}

/// `p` self-signed, with a fresh key.
pub fn self_signed(p: CertificateParams) -> Issued {
    let key = key();
    let cert = p.self_signed(&key).expect("signing");
    Issued { cert, key }
}

/// A root CA valid for a year.
pub fn root(cn: &str) -> Issued {
    self_signed(params(cn, true, (-1, 365)))
}

/// An intermediate CA valid for a year.
pub fn intermediate(cn: &str, issuer: &Issued) -> Issued {
    issue(params(cn, true, (-1, 365)), issuer)
}

/// A device certificate valid for 30 days.
pub fn device(cn: &str, issuer: &Issued) -> Issued {
    issue(params(cn, false, (-1, 30)), issuer)
}

/// A self-signed device certificate, as `openssl req -x509` makes for individual enrollments.
pub fn self_signed_device(cn: &str) -> Issued {
    self_signed(params(cn, false, (-1, 30)))
}

/// A server certificate for `names` (DNS names or IP addresses) signed by `issuer`.
pub fn server(names: &[&str], issuer: &Issued) -> Issued {
    let p = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).expect("server names");
    issue(p, issuer)
}

/// The PEM chain a device presents: its certificate, then the CAs above it.
pub fn chain_pem(certs: &[&Issued]) -> String {
    certs.iter().map(|c| c.pem()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_is_leaf_first_and_each_is_signed_by_the_next() {
        let root = root("Root");
        let mid = intermediate("Mid", &root);
        let dev = device("dev-1", &mid);
        let pem = chain_pem(&[&dev, &mid, &root]);
        assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 3);
        assert!(pem.starts_with(&dev.pem()));
        assert!(dev.key_pem().contains("PRIVATE KEY"));
    }
}
