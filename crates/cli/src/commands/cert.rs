//! `fleetgate cert ...`: a test CA, intermediates and device certificates for trying X.509
//! attestation locally (what Azure's `certGen.sh` scripts do), made with rcgen. Not for
//! production PKI: keys are written unencrypted (mode 0600).
//!
//! Every verb writes a directory with `cert.pem` and `key.pem`. A CA directory's `cert.pem` is
//! its own certificate (upload it as the enrollment group's signing certificate); an
//! intermediate's directory also has `chain.pem` (itself, then the CAs above it up to, not
//! including, the root). A device's `cert.pem` is its certificate followed by its CA's chain:
//! what the device presents in the TLS handshake.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;
use fleetgate_core::ids::RegistrationId;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SerialNumber,
};

// The variants are the CLI's verbs (create-ca, create-device, ...), as `az` spells them.
#[allow(clippy::enum_variant_names)]
#[derive(Subcommand)]
pub enum CertCommand {
    /// Create a self-signed root CA (ECDSA P-256): OUT/cert.pem and OUT/key.pem.
    CreateCa {
        /// Directory to write to (created if missing; existing certificates are not replaced).
        #[arg(long)]
        out: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "Fleetgate Test Root CA")]
        cn: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Create an intermediate CA signed by the CA in --ca.
    CreateIntermediate {
        /// Directory of the issuing CA (from create-ca or create-intermediate).
        #[arg(long)]
        ca: PathBuf,
        /// Directory to write to (created if missing; existing certificates are not replaced).
        #[arg(long)]
        out: PathBuf,
        /// The intermediate CA's common name.
        #[arg(long, default_value = "Fleetgate Test Intermediate CA")]
        cn: String,
        /// Validity in days.
        #[arg(long, default_value_t = 1825)]
        days: u32,
    },
    /// Create a device certificate signed by the CA in --ca, with the registration id as its
    /// common name; OUT/cert.pem holds the chain the device presents.
    CreateDevice {
        /// Directory of the issuing CA (from create-ca or create-intermediate).
        #[arg(long)]
        ca: PathBuf,
        /// The registration id (and hub device id): the certificate's common name.
        #[arg(long)]
        registration_id: String,
        /// Directory to write to (created if missing; existing certificates are not replaced).
        #[arg(long)]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Create a self-signed device certificate, for an individual enrollment (pinned by thumbprint).
    CreateSelfSigned {
        /// The registration id (and hub device id): the certificate's common name.
        #[arg(long)]
        registration_id: String,
        /// Directory to write to (created if missing; existing certificates are not replaced).
        #[arg(long)]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

pub fn run(cmd: CertCommand) -> anyhow::Result<()> {
    match cmd {
        CertCommand::CreateCa { out, cn, days } => {
            let key = KeyPair::generate()?;
            let cert = ca_params(&cn, days)?.self_signed(&key)?;
            write(&out, &cert.pem(), None, &key)?;
        }
        CertCommand::CreateIntermediate { ca, out, cn, days } => {
            let issuer = Issuer::load(&ca)?;
            let key = KeyPair::generate()?;
            let cert = ca_params(&cn, days)?.signed_by(&key, &issuer.cert, &issuer.key)?;
            let chain = format!("{}{}", cert.pem(), issuer.chain);
            write(&out, &cert.pem(), Some(&chain), &key)?;
        }
        CertCommand::CreateDevice { ca, registration_id, out, days } => {
            let issuer = Issuer::load(&ca)?;
            let key = KeyPair::generate()?;
            let cert = device_params(&registration_id, days)?.signed_by(&key, &issuer.cert, &issuer.key)?;
            write(&out, &format!("{}{}", cert.pem(), issuer.chain), None, &key)?;
        }
        CertCommand::CreateSelfSigned { registration_id, out, days } => {
            let key = KeyPair::generate()?;
            let cert = device_params(&registration_id, days)?.self_signed(&key)?;
            write(&out, &cert.pem(), None, &key)?;
        }
    }
    Ok(())
}

fn base_params(cn: &str, days: u32) -> anyhow::Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, cn);
    let now = time::OffsetDateTime::now_utc();
    // An hour of slack for devices whose clocks run a little behind.
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(i64::from(days));
    p.serial_number = Some(SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
    Ok(p)
}

fn ca_params(cn: &str, days: u32) -> anyhow::Result<CertificateParams> {
    let mut p = base_params(cn, days)?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(p)
}

fn device_params(registration_id: &str, days: u32) -> anyhow::Result<CertificateParams> {
    RegistrationId::parse(registration_id).map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let mut p = base_params(registration_id, days)?;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    Ok(p)
}

/// A CA directory read back: its certificate (rebuilt from its parameters, to sign with), key
/// and the chain devices below it must present.
struct Issuer {
    cert: rcgen::Certificate,
    key: KeyPair,
    chain: String,
}

impl Issuer {
    fn load(dir: &Path) -> anyhow::Result<Self> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
        };
        let (cert_pem, key_pem) = (read("cert.pem")?, read("key.pem")?);
        let key = KeyPair::from_pem(&key_pem).context("key.pem is not a private key rcgen can use")?;
        let params = CertificateParams::from_ca_cert_pem(&cert_pem).context("cert.pem is not a CA certificate")?;
        if !matches!(params.is_ca, IsCa::Ca(_)) {
            bail!("{} is not a CA certificate", dir.join("cert.pem").display());
        }
        // Only the issuer's name and key matter for signing; the certificate itself is not reissued.
        let cert = params.self_signed(&key)?;
        // A root is not sent by devices; an intermediate's chain is.
        let chain = read("chain.pem").unwrap_or_default();
        Ok(Self { cert, key, chain })
    }
}

fn write(dir: &Path, cert_pem: &str, chain_pem: Option<&str>, key: &KeyPair) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cert_path = dir.join("cert.pem");
    if cert_path.exists() {
        bail!("{} exists; choose another --out directory", cert_path.display());
    }
    write_file(&dir.join("key.pem"), &key.serialize_pem(), true)?;
    write_file(&cert_path, cert_pem, false)?;
    if let Some(chain) = chain_pem {
        write_file(&dir.join("chain.pem"), chain, false)?;
    }
    outln!("{}", cert_path.display());
    Ok(())
}

fn write_file(path: &Path, content: &str, secret: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let _ = secret;
    let mut f = opts.open(path).with_context(|| format!("writing {}", path.display()))?;
    f.write_all(content.as_bytes()).with_context(|| format!("writing {}", path.display()))
}
