//! `fleetgate cert ...` and the X.509 options of `enrollment-group` / `enrollment`.

mod common;

use std::path::Path;
use std::process::Command;

use common::{json, run, serve, stdout};

fn cert(args: &[&str]) {
    let mut all = vec!["cert"];
    all.extend_from_slice(args);
    stdout(&run(&all));
}

fn p(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().unwrap().to_owned()
}

#[test]
fn cert_verbs_make_a_chain_openssl_verifies() {
    let t = tempfile::tempdir().unwrap();
    let (root, inter, dev, solo) =
        (t.path().join("root"), t.path().join("inter"), t.path().join("dev"), t.path().join("solo"));
    cert(&["create-ca", "--out", root.to_str().unwrap(), "--cn", "My Root"]);
    cert(&["create-intermediate", "--ca", root.to_str().unwrap(), "--out", inter.to_str().unwrap()]);
    cert(&[
        "create-device",
        "--ca",
        inter.to_str().unwrap(),
        "--registration-id",
        "dev-01",
        "--out",
        dev.to_str().unwrap(),
    ]);
    cert(&["create-self-signed", "--registration-id", "solo-01", "--out", solo.to_str().unwrap()]);

    // The device file holds its certificate and the intermediate: what it presents in TLS.
    let chain = std::fs::read_to_string(dev.join("cert.pem")).unwrap();
    assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
    let o = Command::new("openssl")
        .args(["verify", "-CAfile", &p(&root, "cert.pem"), "-untrusted", &p(&inter, "cert.pem"), &p(&dev, "cert.pem")])
        .output()
        .expect("openssl is needed for this check");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let text =
        Command::new("openssl").args(["x509", "-noout", "-subject", "-in", &p(&dev, "cert.pem")]).output().unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("CN = dev-01"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(dev.join("key.pem")).unwrap().permissions().mode() & 0o777, 0o600);
    }

    // An existing CA is never overwritten; a bad registration id is refused.
    assert!(!run(&["cert", "create-ca", "--out", root.to_str().unwrap()]).status.success());
    let bad = t.path().join("bad");
    assert!(!run(&[
        "cert",
        "create-device",
        "--ca",
        root.to_str().unwrap(),
        "--registration-id",
        "bad id",
        "--out",
        bad.to_str().unwrap()
    ])
    .status
    .success());
    // A device certificate cannot sign others.
    assert!(!run(&[
        "cert",
        "create-device",
        "--ca",
        dev.to_str().unwrap(),
        "--registration-id",
        "x",
        "--out",
        bad.to_str().unwrap()
    ])
    .status
    .success());
}

#[test]
fn enrollments_take_certificates_from_files() {
    let t = tempfile::tempdir().unwrap();
    let (root, root2, solo, solo2) =
        (t.path().join("root"), t.path().join("root2"), t.path().join("solo"), t.path().join("solo2"));
    cert(&["create-ca", "--out", root.to_str().unwrap()]);
    cert(&["create-ca", "--out", root2.to_str().unwrap(), "--cn", "Second Root"]);
    cert(&["create-self-signed", "--registration-id", "solo-01", "--out", solo.to_str().unwrap()]);
    cert(&["create-self-signed", "--registration-id", "solo-01", "--out", solo2.to_str().unwrap()]);
    let s = serve();
    let d = s.dir();

    let g = json(&run(&[
        "enrollment-group",
        "create",
        "--data-dir",
        d,
        "--group-id",
        "x509-grp",
        "--certificate-path",
        &p(&root, "cert.pem"),
    ]));
    assert_eq!(g["attestation"]["type"], "x509");
    let info = &g["attestation"]["x509"]["signingCertificates"]["primary"]["info"];
    assert_eq!(info["subjectName"], "CN=Fleetgate Test Root CA");
    // Adding a secondary CA keeps the primary.
    let g = json(&run(&[
        "enrollment-group",
        "update",
        "--data-dir",
        d,
        "--group-id",
        "x509-grp",
        "--secondary-certificate-path",
        &p(&root2, "cert.pem"),
    ]));
    let certs = &g["attestation"]["x509"]["signingCertificates"];
    assert_eq!(certs["primary"]["info"]["subjectName"], "CN=Fleetgate Test Root CA", "{g}");
    assert_eq!(certs["secondary"]["info"]["subjectName"], "CN=Second Root");
    // Keys make no sense here, and cannot be combined with certificates.
    assert!(!run(&["enrollment-group", "roll-keys", "--data-dir", d, "--group-id", "x509-grp"]).status.success());
    assert!(!run(&[
        "enrollment-group",
        "create",
        "--data-dir",
        d,
        "--group-id",
        "mixed",
        "--certificate-path",
        &p(&root, "cert.pem"),
        "--primary-key",
        "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
    ])
    .status
    .success());
    // A device certificate is not a CA: the service refuses it for a group.
    let o = run(&[
        "enrollment-group",
        "create",
        "--data-dir",
        d,
        "--group-id",
        "not-ca",
        "--certificate-path",
        &p(&solo, "cert.pem"),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("400"), "{}", String::from_utf8_lossy(&o.stderr));

    let e = json(&run(&[
        "enrollment",
        "create",
        "--data-dir",
        d,
        "--registration-id",
        "solo-01",
        "--certificate-path",
        &p(&solo, "cert.pem"),
        "--secondary-certificate-path",
        &p(&solo2, "cert.pem"),
    ]));
    let certs = &e["attestation"]["x509"]["clientCertificates"];
    assert_eq!(certs["primary"]["info"]["subjectName"], "CN=solo-01");
    assert_ne!(certs["primary"]["info"]["sha1Thumbprint"], certs["secondary"]["info"]["sha1Thumbprint"]);
    // Symmetric-key enrollments are unchanged.
    let k = json(&run(&["enrollment", "create", "--data-dir", d, "--registration-id", "sym-01"]));
    assert_eq!(k["attestation"]["type"], "symmetricKey");
}
