//! The Fleetgate server: initializes the data directory, then serves the device endpoints (MQTT
//! over TLS) and the HTTPS endpoint (service APIs) from one process.
//!
//! Dependency direction: listeners → protocol sessions → [`fleetgate_dps::Provisioning`] →
//! store. Nothing here decides a DPS outcome; it only translates.

pub mod cert_reload;
pub mod config;
pub mod datadir;
pub mod https;
mod listener;
pub mod mqtt;
pub mod tls;
pub mod websocket;

use std::net::SocketAddr;
use std::sync::Arc;

use fleetgate_dps::{Provisioning, ProvisioningConfig};
use fleetgate_hub::Hub;
use fleetgate_store::Store;
use tokio::sync::watch;

pub use config::{Limits, ServerConfig};
pub use datadir::{DataDir, Instance};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    DataDir(#[from] datadir::DataDirError),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// A started server: where it listens, what it is, and how to stop it.
pub struct RunningServer {
    pub mqtt_addr: SocketAddr,
    pub https_addr: SocketAddr,
    pub instance: Instance,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// What a finished server flushes and checkpoints (see [`RunningServer::wait`]).
    dps: Arc<Provisioning>,
    hub: Arc<Hub>,
    store: Arc<fleetgate_store::SqliteStore>,
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
    let data = DataDir::open_or_init(&config).await?;
    // The operator's certificate if given, else the one generated in the data directory.
    let (cert_path, key_path) = match (&config.tls_cert, &config.tls_key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        (None, None) => (data.server_cert_path(), data.server_key_path()),
        _ => return Err(StartError::Tls("--tls-cert and --tls-key go together".into())),
    };
    let cert = cert_reload::ReloadingCert::new(&cert_path, &key_path).map_err(StartError::Tls)?;
    let tls = tls::server_config(cert.clone()).map_err(StartError::Tls)?;
    let sqlite = data.store.clone();
    let store: Arc<dyn Store> = sqlite.clone();

    let bind = |port: u16| SocketAddr::new(config.listen, port);
    let mqtt_listener = tokio::net::TcpListener::bind(bind(config.mqtt_port))
        .await
        .map_err(|source| StartError::Bind { addr: bind(config.mqtt_port), source })?;
    let https_listener = tokio::net::TcpListener::bind(bind(config.https_port))
        .await
        .map_err(|source| StartError::Bind { addr: bind(config.https_port), source })?;
    let mqtt_addr =
        mqtt_listener.local_addr().map_err(|source| StartError::Bind { addr: bind(config.mqtt_port), source })?;
    let https_addr =
        https_listener.local_addr().map_err(|source| StartError::Bind { addr: bind(config.https_port), source })?;

    let instance = data.write_instance_file(https_addr.port()).await?;
    let dps = Provisioning::new(
        store,
        ProvisioningConfig {
            id_scope: data.id_scope.clone(),
            service_host_names: config.hostnames.clone(),
            immediate_assignment: config.immediate_assignment,
            webhook_timeout: config.webhook_timeout,
            registration_rate: config.registration_rate,
        },
    );

    let hub = Arc::new(Hub::new(data.store.clone(), config.hub.clone()));

    let (shutdown, rx) = watch::channel(false);
    let rx_reload = rx.clone();
    let limits = Arc::new(config.limits.clone());
    let mut tasks = vec![
        tokio::spawn(mqtt::serve(mqtt_listener, tls.clone(), dps.clone(), hub.clone(), limits.clone(), rx.clone())),
        tokio::spawn(https::serve(https_listener, tls, dps.clone(), hub.clone(), limits, rx)),
    ];
    tasks.push(tokio::spawn(watch_certificate(cert, config.cert_check_interval, rx_reload)));
    tracing::info!(%mqtt_addr, %https_addr, id_scope = %instance.id_scope, "fleetgate serving");
    Ok(RunningServer { mqtt_addr, https_addr, instance, shutdown, tasks, dps, hub, store: sqlite })
}
