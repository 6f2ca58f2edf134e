//! Running the `fleetgate` binary and a `fleetgate serve` child on random ports.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_fleetgate");

/// Runs the binary with no Fleetgate settings inherited from the environment.
pub fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("FLEETGATE_CONNECTION_STRING")
        .env_remove("FLEETGATE_HUB_CONNECTION_STRING")
        .env_remove("FLEETGATE_DATA_DIR")
        .env_remove("FLEETGATE_GROUP_KEY")
        .env_remove("FLEETGATE_MQTT_PORT")
        .output()
        .unwrap()
}

/// Stdout of a run that must have succeeded.
/// Polls `f` until it holds; panics naming `what` if it does not within 15 s (a generous bound:
/// the outcome is asserted, not the timing).
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "{what}: not reached within 15 s");
        // Backoff between polls.
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout.clone()).unwrap()
}

pub fn json(o: &Output) -> serde_json::Value {
    serde_json::from_str(&stdout(o)).expect("JSON output")
}

/// A server on its own temporary data directory (stopped before the directory is removed).
pub struct Served {
    pub server: Server,
    pub dir: tempfile::TempDir,
    pub mqtt_port: u16,
}

impl Served {
    pub fn dir(&self) -> &str {
        self.dir.path().to_str().unwrap()
    }
}

/// Starts a server on random ports in a fresh data directory; returns once its banner names
/// them.
pub fn serve() -> Served {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let mqtt_port = server.mqtt_port;
    Served { server, dir, mqtt_port }
}

/// A `fleetgate serve` child on a data directory the caller owns, so it can be killed and started
/// again on the same directory (each start gets new random ports).
pub struct Server {
    pub child: Child,
    pub mqtt_port: u16,
    pub https_port: u16,
}

impl Server {
    /// Starts `fleetgate serve` on `dir` (created on first use); returns once the banner names
    /// both ports.
    pub fn start(dir: &std::path::Path) -> Server {
        Self::start_with(dir, &[])
    }

    /// As [`Server::start`], with more `serve` flags.
    pub fn start_with(dir: &std::path::Path, extra: &[&str]) -> Server {
        let mut child = Command::new(BIN)
            .args(["serve", "--data-dir", dir.to_str().unwrap(), "--mqtt-port", "0", "--https-port", "0"])
            // A small free-space reserve: the tests must not depend on how full the disk is.
            .args(["--disk-reserve-bytes", "64M"])
            .args(extra)
            .env_remove("FLEETGATE_DATA_DIR")
            .env_remove("FLEETGATE_MQTT_PORT")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        // Keeps draining stdout so the server never blocks on it.
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(rest) = line.trim().strip_prefix("MQTT/TLS on ") {
                    let port = |addr: &str| addr.trim().rsplit(':').next().unwrap_or_default().parse::<u16>().ok();
                    let (mqtt, https) = rest.split_once(", HTTPS on ").unwrap_or((rest, ""));
                    let _ = tx.send((port(mqtt), port(https)));
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok((Some(mqtt_port), Some(https_port))) => Server { child, mqtt_port, https_port },
            other => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("no server banner with both ports: {other:?}");
            }
        }
    }

    /// SIGTERM (a clean stop, as a service manager asks for one); waits for the exit (at most a
    /// minute) and returns its status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success(), "kill -TERM {pid}");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "serve did not stop within a minute of SIGTERM");
            // Backoff between polls.
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL (no graceful shutdown), and reaps the process.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
