//! The servers under test, each a child process on loopback: `fleetgate serve` on a data
//! directory, Mosquitto with a generated configuration (TLS listener, password file,
//! persistence on or off), and the bench's own bare-TLS endpoint. Stopped on drop.

use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use fleetgate_core::keys::SymmetricKey;
use serde_json::{json, Value};

use crate::util::{cpu_seconds, free_port, memory_kib};

/// A server child process.
pub struct Server {
    pub name: &'static str,
    child: Child,
    pub pid: u32,
    pub port: u16,
    /// When the process was spawned.
    pub spawned: Instant,
    log: PathBuf,
}

impl Server {
    fn spawn(name: &'static str, mut cmd: Command, port: u16, log: &Path) -> anyhow::Result<Server> {
        let out = File::options().create(true).append(true).open(log).with_context(|| log.display().to_string())?;
        let err = out.try_clone()?;
        // SAFETY: prctl is async-signal-safe; the closure touches nothing else. The server dies
        // with the bench (even when the bench is killed), so no server outlives a run.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                Ok(())
            });
        }
        let spawned = Instant::now();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Server { name, pid: child.id(), child, port, spawned, log: log.to_owned() })
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Waits until the port accepts TCP connections; fails if the process exits first.
    pub async fn wait_listening(&mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            self.check_running()?;
            if tokio::net::TcpStream::connect(self.addr()).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} did not listen on {} within {limit:?}; log: {}", self.name, self.addr(), self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}); log {}: {}", self.name, self.log.display(), self.log_tail());
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }

    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_seconds(self.pid)
    }

    /// (VmRSS, VmHWM) in KiB.
    pub fn memory_kib(&self) -> anyhow::Result<(u64, u64)> {
        memory_kib(self.pid)
    }

    /// SIGTERM, then SIGKILL after five seconds.
    pub async fn stop(mut self) {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fleetgate

/// What devices need to know about a Fleetgate instance, and the bench's enrollment group.
#[derive(Clone)]
pub struct FleetgateInstance {
    pub data_dir: PathBuf,
    pub id_scope: String,
    pub ca_pem: Vec<u8>,
    pub hub_host_name: String,
    pub group_key: SymmetricKey,
}

pub const GROUP_ID: &str = "bench";

/// Environment variable: a command to run the Fleetgate server under, for profiling (e.g.
/// `valgrind --tool=massif --massif-out-file=/tmp/massif.out`). It must keep the server in the
/// same process, since CPU and memory are read from the child's pid.
pub const WRAPPER_ENV: &str = "FLEETGATE_BENCH_SERVER_WRAPPER";

pub fn spawn_fleetgate(bin: &Path, data_dir: &Path, log: &Path) -> anyhow::Result<Server> {
    let (mqtt, https) = (free_port()?, free_port()?);
    let wrapper = std::env::var(WRAPPER_ENV).unwrap_or_default();
    let mut words = wrapper.split_whitespace();
    let mut cmd = match words.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(words).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.arg("serve").arg("--data-dir").arg(data_dir).args([
        "--listen",
        "127.0.0.1",
        "--mqtt-port",
        &mqtt.to_string(),
        "--https-port",
        &https.to_string(),
        // The bench holds tens of thousands of connections from a few loopback addresses.
        "--max-connections-per-source",
        "0",
    ]);
    Server::spawn("fleetgate", cmd, mqtt, log)
}

/// Creates the bench's enrollment group (fresh keys) through the service API of a running
/// server on a new data directory.
pub async fn create_group(data_dir: &Path) -> anyhow::Result<FleetgateInstance> {
    // The server writes instance.json just after binding its ports.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (inst, ca_pem) = loop {
        match read_instance(data_dir) {
            Ok(x) => break x,
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(e) => return Err(e),
        }
    };
    let conn: fleetgate_client::ConnectionString = inst["serviceConnectionString"]
        .as_str()
        .unwrap_or_default()
        .parse()
        .map_err(|e: String| anyhow!("instance.json: {e}"))?;
    let client = fleetgate_client::DpsServiceClient::new(conn, Some(&ca_pem))?;
    let (primary, secondary) = (SymmetricKey::generate(), SymmetricKey::generate());
    let group = json!({
        "enrollmentGroupId": GROUP_ID,
        "attestation": {"type": "symmetricKey", "symmetricKey": {
            "primaryKey": primary.to_base64(), "secondaryKey": secondary.to_base64()}},
        "provisioningStatus": "enabled",
    });
    client.raw().put_enrollment_group(&group, None).await.map_err(|e| anyhow!("creating the enrollment group: {e}"))?;
    std::fs::write(data_dir.join("bench-group-key"), primary.to_base64())?;
    instance(data_dir)
}

/// The instance of a data directory the bench set up before.
pub fn instance(data_dir: &Path) -> anyhow::Result<FleetgateInstance> {
    let (inst, ca_pem) = read_instance(data_dir)?;
    let key = std::fs::read_to_string(data_dir.join("bench-group-key")).context("the bench's group key")?;
    Ok(FleetgateInstance {
        data_dir: data_dir.to_owned(),
        id_scope: inst["idScope"].as_str().unwrap_or_default().to_owned(),
        ca_pem,
        hub_host_name: inst["hubs"][0]["hostName"].as_str().unwrap_or("localhost").to_owned(),
        group_key: SymmetricKey::from_base64(key.trim()).map_err(|e| anyhow!("group key: {}", e.message))?,
    })
}

fn read_instance(data_dir: &Path) -> anyhow::Result<(Value, Vec<u8>)> {
    let path = data_dir.join("instance.json");
    let inst: Value = serde_json::from_slice(&std::fs::read(&path).with_context(|| path.display().to_string())?)?;
    let ca_path = inst["caCertificate"].as_str().ok_or_else(|| anyhow!("instance.json without caCertificate"))?;
    let ca_pem = std::fs::read(ca_path).with_context(|| ca_path.to_owned())?;
    Ok((inst, ca_pem))
}

// ---------------------------------------------------------------------------------------------
// Mosquitto

/// Mosquitto's certificate, key, CA and password file, shared by every Mosquitto the bench starts.
pub struct MosquittoFiles {
    dir: PathBuf,
    pub ca_pem: Vec<u8>,
    cert: PathBuf,
    key: PathBuf,
    passwd: PathBuf,
    runs: usize,
}

/// Issues a P-256 certificate and writes a password file for `users` (hashed by
/// `mosquitto_passwd -U`, Mosquitto's own PBKDF2-SHA512).
pub fn prepare_mosquitto(
    dir: &Path,
    passwd_bin: &str,
    users: impl Iterator<Item = (String, String)>,
) -> anyhow::Result<MosquittoFiles> {
    std::fs::create_dir_all(dir)?;
    let pki = crate::tls::generate_pki()?;
    let (cert, key, passwd) = (dir.join("server.pem"), dir.join("server.key"), dir.join("passwd"));
    std::fs::write(&cert, &pki.cert_pem)?;
    std::fs::write(&key, &pki.key_pem)?;
    let mut f = std::io::BufWriter::new(File::create(&passwd)?);
    for (user, password) in users {
        writeln!(f, "{user}:{password}")?;
    }
    f.flush()?;
    drop(f);
    let status = Command::new(passwd_bin)
        .arg("-U")
        .arg(&passwd)
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("running {passwd_bin}"))?;
    if !status.success() {
        bail!("{passwd_bin} -U failed ({status})");
    }
    Ok(MosquittoFiles { dir: dir.to_owned(), ca_pem: pki.ca_pem.into_bytes(), cert, key, passwd, runs: 0 })
}

pub fn spawn_mosquitto(bin: &str, files: &mut MosquittoFiles, persistence: bool) -> anyhow::Result<Server> {
    files.runs += 1;
    let port = free_port()?;
    let run_dir = files.dir.join(format!("run-{}", files.runs));
    std::fs::create_dir_all(&run_dir)?;
    let mut conf = format!(
        "per_listener_settings false\n\
         allow_anonymous false\n\
         password_file {passwd}\n\
         listener {port} 127.0.0.1\n\
         certfile {cert}\n\
         keyfile {key}\n\
         set_tcp_nodelay true\n\
         persistence {persistence}\n\
         persistence_location {run}/\n\
         log_dest file {run}/mosquitto.log\n",
        passwd = files.passwd.display(),
        cert = files.cert.display(),
        key = files.key.display(),
        run = run_dir.display(),
    );
    if persistence {
        // Mosquitto never syncs per message: the nearest it gets is saving its database often.
        conf.push_str("autosave_interval 1\n");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // Started as root, Mosquitto would switch to the `mosquitto` user, which cannot read our
        // private temporary directory.
        conf.push_str("user root\n");
    }
    let conf_path = run_dir.join("mosquitto.conf");
    std::fs::write(&conf_path, conf)?;
    let mut cmd = Command::new(bin);
    cmd.arg("-c").arg(&conf_path);
    Server::spawn("mosquitto", cmd, port, &run_dir.join("stdout.log"))
}

/// Starts the bare-TLS endpoint (this binary's hidden `tls-server`) with a fresh P-256 certificate.
pub fn spawn_tls_server(dir: &Path) -> anyhow::Result<(Server, Vec<u8>)> {
    std::fs::create_dir_all(dir)?;
    let pki = crate::tls::generate_pki()?;
    let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&cert, &pki.cert_pem)?;
    std::fs::write(&key, &pki.key_pem)?;
    let port = free_port()?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("tls-server")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key);
    Ok((Server::spawn("tls-server", cmd, port, &dir.join("tls-server.log"))?, pki.ca_pem.into_bytes()))
}
