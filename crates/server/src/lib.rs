//! The Fleetgate server: initializes the data directory, then serves the device endpoints (MQTT
//! over TLS) and the HTTPS endpoint (service APIs) from one process.
//!
//! Dependency direction: listeners → protocol sessions → [`fleetgate_dps::Provisioning`] →
//! store. Nothing here decides a DPS outcome; it only translates.
#![forbid(unsafe_code)]

pub mod cert_reload;
pub mod config;
pub mod datadir;
mod dir_lock;
pub mod fd_limit;
pub mod https;
mod listener;
pub mod mqtt;
pub mod readiness;
pub mod tls;
pub mod websocket;
mod write_deadline;

use std::net::SocketAddr;
use std::sync::Arc;

use fleetgate_dps::{IdentityChanges, Provisioning, ProvisioningConfig};
use fleetgate_hub::Hub;
use fleetgate_store::{InstanceStore, Store};
use tokio::sync::watch;

pub use config::{Limits, ServerConfig};
pub use datadir::{DataDir, Instance};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    DataDir(#[from] datadir::DataDirError),
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// The OS error is in the message, and deliberately not a `source`: a chain printer
    /// (anyhow's `{:#}`) would print it a second time.
    #[error("cannot listen on {addr}: {error}")]
    Bind { addr: SocketAddr, error: std::io::Error },
}

/// A started server: where it listens, what it is, and how to stop it.
pub struct RunningServer {
    pub mqtt_addr: SocketAddr,
    pub https_addr: SocketAddr,
    /// The plain-HTTP `/metrics` listener, when one was asked for.
    pub metrics_addr: Option<SocketAddr>,
    pub instance: Instance,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// What a finished server flushes and checkpoints (see [`RunningServer::wait`]).
    dps: Arc<Provisioning>,
    hub: Arc<Hub>,
    store: Arc<fleetgate_store::SqliteStore>,
    /// The data directory's lock: released once the server has finished (see `wait`).
    lock: datadir::DirLock,
}

impl RunningServer {
    /// Stops accepting connections and waits for the listeners to finish (see
    /// [`RunningServer::wait`]).
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        self.wait().await;
    }

    /// Resolves when a shutdown has been requested elsewhere (never, for a server we own), once
    /// the listeners have finished (their connections closed, or the grace expired), the audit
    /// entries recorded so far are stored, and the registry's and audit trail's WALs are
    /// checkpointed into `fleetgate.db` and `telemetry.db`: a stopped server's data directory
    /// holds everything in the `.db` files, so a backup of those alone (a common mistake) or a
    /// lost `-wal` loses nothing.
    pub async fn wait(self) {
        let _lock = self.lock;
        for t in self.tasks {
            let _ = t.await;
        }
        self.dps.audit().flush().await;
        self.hub.audit().flush().await;
        match self.store.checkpoint().await {
            Ok(()) => tracing::info!("registry and audit trail checkpointed into their .db files"),
            // Nothing is lost (the WAL is replayed on the next start), but the .db alone is not
            // a complete copy, which is what an operator needs to know before a backup.
            Err(e) => tracing::warn!(error = %e,
                "the WAL could not be checkpointed at shutdown: keep each .db together with its -wal (back up both)"),
        }
    }

    pub fn shutdown_signal(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }
}

/// DPS's changes to hub identities, delivered to the hub: a connection opened with credentials
/// that re-provisioning replaced, or on a hub the device was moved away from, is closed.
struct HubSessions(Arc<Hub>);

impl IdentityChanges for HubSessions {
    fn credentials_revoked(&self, hub: &str, device_id: &str) {
        self.0.close_session(hub, device_id);
    }
}

/// Reloads the server certificate when its files change (checked every `every`) or on SIGHUP.
async fn watch_certificate(
    cert: Arc<cert_reload::ReloadingCert>,
    every: std::time::Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<()>();
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = hangup => tracing::info!("SIGHUP: checking the server certificate"),
            _ = shutdown.changed() => return,
        }
        cert.reload_if_changed();
    }
}

/// Initializes (or reopens) the data directory and starts every listener.
pub async fn start(config: ServerConfig) -> Result<RunningServer, StartError> {
    if config.tls_cert.is_some() != config.tls_key.is_some() {
        return Err(StartError::Tls("--tls-cert and --tls-key go together".into()));
    }
    // The listeners first: a start that cannot have its ports must not have changed the data
    // directory (a server already running on it would reload a certificate reissued for other
    // names). The data directory's lock then refuses a second server on other ports.
    let bind = |port: u16| SocketAddr::new(config.listen, port);
    let mqtt_listener = tokio::net::TcpListener::bind(bind(config.mqtt_port))
        .await
        .map_err(|error| StartError::Bind { addr: bind(config.mqtt_port), error })?;
    let https_listener = tokio::net::TcpListener::bind(bind(config.https_port))
        .await
        .map_err(|error| StartError::Bind { addr: bind(config.https_port), error })?;
    let mqtt_addr =
        mqtt_listener.local_addr().map_err(|error| StartError::Bind { addr: bind(config.mqtt_port), error })?;
    let https_addr =
        https_listener.local_addr().map_err(|error| StartError::Bind { addr: bind(config.https_port), error })?;

    let metrics_listener = match config.metrics_listen {
        Some(addr) => {
            Some(tokio::net::TcpListener::bind(addr).await.map_err(|error| StartError::Bind { addr, error })?)
        }
        None => None,
    };
    let metrics_addr = match &metrics_listener {
        Some(l) => Some(l.local_addr().map_err(|error| StartError::Bind { addr: bind(0), error })?),
        None => None,
    };

    let data = DataDir::open_or_init(&config).await?;
    // The operator's certificate if given, else the one generated in the data directory.
    let (cert_path, key_path) = match (&config.tls_cert, &config.tls_key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => (data.server_cert_path(), data.server_key_path()),
    };
    let cert = cert_reload::ReloadingCert::new(&cert_path, &key_path).map_err(StartError::Tls)?;
    let tls = tls::server_config(cert.clone()).map_err(StartError::Tls)?;
    // Devices dial their hub by the name DPS answers (assignedHub): one the certificate does not
    // carry fails their TLS handshake, which is worth saying before any device tries.
    let hubs = data.store.hubs().await.map_err(datadir::DataDirError::from)?;
    for name in cert.names_not_covered(hubs.iter().map(|h| h.host_name.as_str())) {
        tracing::warn!(hub = %name, certificate = %cert_path.display(),
            "hub {name} is not a name the server certificate is valid for: devices assigned to it will fail TLS when they connect to it. Add --hostname {name} (next to the names already given) or use a certificate that covers it");
    }
    let sqlite = data.store.clone();
    let store: Arc<dyn Store> = match &config.faults {
        Some(faults) => Arc::new(fleetgate_store::FaultyStore::new(sqlite.clone(), faults.clone())),
        None => sqlite.clone(),
    };
    // Hubs and policies are read on every registration, connect and service call: from memory,
    // since every change to them goes through this store (the service API is the only path).
    let store: Arc<dyn Store> = Arc::new(fleetgate_store::CachingStore::new(store));

    let instance = data.write_instance_file(https_addr.port()).await?;
    // One audit log for both services: a source's refusals are counted together, whichever
    // service (or protocol) refused them.
    let audit = fleetgate_store::AuditLog::start_with(store.clone(), config.audit.clone());
    let hub = Arc::new(Hub::with_audit(store.clone(), config.hub.clone(), audit.clone()));
    let dps = Provisioning::with_audit(
        store.clone(),
        ProvisioningConfig {
            id_scope: data.id_scope.clone(),
            service_host_names: config.hostnames.clone(),
            immediate_assignment: config.immediate_assignment,
            webhook_timeout: config.webhook_timeout,
            registration_rate: config.registration_rate,
        },
        Arc::new(HubSessions(hub.clone())),
        audit,
    );
    dps.watch_instance(Arc::new(datadir::InstanceFile {
        dir: data.path.clone(),
        store: store.clone(),
        id_scope: instance.id_scope.clone(),
        endpoint: instance.global_device_endpoint.clone(),
        https_port: https_addr.port(),
        writing: tokio::sync::Mutex::new(()),
    }));

    let (shutdown, rx) = watch::channel(false);
    let rx_reload = rx.clone();
    let mut limits = config.limits.clone();
    // Connections and the store share the process's file descriptors: the cap leaves the store
    // its share (see `fd_limit`).
    let nofile = fd_limit::raise_nofile_limit();
    limits.max_connections = fd_limit::connection_cap(limits.max_connections, nofile);
    tracing::info!(
        max_connections = limits.max_connections,
        configured = config.limits.max_connections,
        file_descriptor_limit = nofile,
        max_connections_per_source = limits.max_connections_per_source,
        "connection limits"
    );
    let limits = Arc::new(limits);
    let gate =
        listener::Gate::new(limits.max_connections, limits.max_connections_per_source, limits.cap_loopback_sources);
    let budget = mqtt::PacketBudget::new(limits.partial_packet_budget_bytes);
    let readiness = readiness::Readiness::start(store, hub.clone(), rx.clone());
    let mut tasks = vec![tokio::spawn(mqtt::serve(
        mqtt_listener,
        tls.clone(),
        dps.clone(),
        hub.clone(),
        limits.clone(),
        gate.clone(),
        budget.clone(),
        rx.clone(),
    ))];
    if let Some(listener) = metrics_listener {
        tasks.push(tokio::spawn(https::serve_metrics(listener, limits.clone(), gate.clone(), rx.clone())));
    }
    tasks.push(tokio::spawn(https::serve(
        https_listener,
        tls,
        dps.clone(),
        hub.clone(),
        readiness,
        limits,
        gate,
        budget,
        rx,
    )));
    tasks.push(tokio::spawn(watch_certificate(cert, config.cert_check_interval, rx_reload)));
    tracing::info!(%mqtt_addr, %https_addr, id_scope = %instance.id_scope, "fleetgate serving");
    let lock = data.lock;
    Ok(RunningServer { mqtt_addr, https_addr, metrics_addr, instance, shutdown, tasks, dps, hub, store: sqlite, lock })
}
