//! What the CLI says when it cannot reach the service or cannot start: the cause, once, and
//! what to check.

mod common;

use common::{run, serve, stdout};

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fn stderr(o: &std::process::Output) -> String {
    assert!(!o.status.success(), "unexpectedly succeeded: {}", String::from_utf8_lossy(&o.stdout));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn request_errors_name_their_cause_and_what_to_check() {
    let empty = tempfile::tempdir().unwrap();
    let nowhere = empty.path().to_str().unwrap();
    let list = |conn: &str, extra: &[&str]| {
        let mut args = vec!["enrollment-group", "list", "--data-dir", nowhere, "--connection-string", conn];
        args.extend_from_slice(extra);
        run(&args)
    };

    let refused = format!("HostName=127.0.0.1:{};SharedAccessKeyName=p;SharedAccessKey={KEY}", closed_port());
    let err = stderr(&list(&refused, &[]));
    assert!(err.to_lowercase().contains("connection refused"), "{err}");
    assert!(err.contains("fleetgate serve"), "{err}");

    let err = stderr(&list(&format!("HostName=no-such-host.invalid;SharedAccessKeyName=p;SharedAccessKey={KEY}"), &[]));
    assert!(err.contains("dns error") || err.contains("lookup"), "{err}");
    assert!(err.contains("HostName"), "{err}");

    // The server's CA not given: the certificate is not trusted.
    let s = serve();
    let inst: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.dir.path().join("instance.json")).unwrap()).unwrap();
    let conn = inst["serviceConnectionString"].as_str().unwrap();
    let err = stderr(&list(conn, &[]));
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    assert!(err.contains("--ca-cert"), "{err}");
    // With it, the same request works.
    let ca = s.dir.path().join("ca.pem");
    stdout(&list(conn, &["--ca-cert", ca.to_str().unwrap()]));
}

#[test]
fn serve_prints_a_listen_failure_once() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let dir = tempfile::tempdir().unwrap();
    let o = run(&["serve", "--data-dir", dir.path().to_str().unwrap(), "--mqtt-port", "0", "--https-port", &port]);
    let err = stderr(&o);
    assert_eq!(err.matches("os error").count(), 1, "{err}");
    assert!(err.contains(&port), "{err}");
}

#[test]
fn info_says_whether_a_server_answers() {
    let mut s = serve();
    let d = s.dir().to_owned();
    let up = stdout(&run(&["info", "--data-dir", &d]));
    assert!(up.starts_with("Fleetgate is running"), "{up}");
    assert!(up.contains("ID scope:"), "{up}");
    s.server.terminate();
    let down = stdout(&run(&["info", "--data-dir", &d]));
    assert!(!down.contains("ready") && !down.starts_with("Fleetgate is running"), "{down}");
    assert!(down.contains("no server answers"), "{down}");
    assert!(down.contains("ID scope:"), "{down}");
}
