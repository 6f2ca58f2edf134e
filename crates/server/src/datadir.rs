//! The data directory: everything `fleetgate serve` creates on first start and reuses after.
//!
//! ```text
//! DIR/fleetgate.db     SQLite: instance settings, hubs, enrollment groups, registrations, devices
//! DIR/ca.pem, ca.key   the self-signed CA devices trust (key 0600)
//! DIR/server.pem/.key  server certificate for the configured host names, signed by the CA (key 0600)
//! DIR/instance.json    what a user copies from the portal's Overview page (0600: has keys)
//! DIR/telemetry.db     SQLite: the audit trail
//! DIR/events/          the telemetry log (see fleetgate_store::event_log)
//! DIR/fleetgate.lock    held (advisory lock) by the server using the directory; names its pid
//! ```
//!
//! One server at a time: a second `serve` on a directory in use is refused before it changes
//! anything (it would otherwise reissue `server.pem` for its own host names, and the running
//! server would reload that certificate).
//!
//! Every file is owner-only (0600) and every directory 0700: the databases and keys are
//! secrets, and nothing in the directory is for another user.
//!
//! Once `instance.json` exists the directory is initialized, and a missing or emptied piece is
//! an error that stops the start, never a reason to create a new instance over the old one: a
//! new ID scope and CA would cut off every device that was provisioned or trusts the old CA,
//! while the old telemetry would still be served.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fleetgate_core::ids::IdScope;
use fleetgate_core::keys::SymmetricKey;
use fleetgate_core::policy::{default_dps_policies, default_hub_policies, AccessPolicy};
use fleetgate_store::{EventLogOptions, InstanceStore, LinkedHub, SqliteStore, Store, StoreError};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use serde::{Deserialize, Serialize};

use crate::config::ServerConfig;
pub use crate::dir_lock::DirLock;

/// The name of the DPS shared access policy with every right, as in Azure.
pub const DPS_OWNER_POLICY: &str = "provisioningserviceowner";
/// The name of a hub's shared access policy with every right, as in Azure.
pub const HUB_OWNER_POLICY: &str = "iothubowner";

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("data directory {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("data directory store: {0}")]
    Store(#[from] StoreError),
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("data directory is inconsistent: {0}")]
    Corrupt(String),
    /// An initialized data directory lost (or has an emptied) piece that cannot be made again
    /// without starting a different instance.
    #[error(
        "data directory {dir} holds an instance (instance.json exists), but {file} {problem}. \
         Refusing to start: a fresh one would be a new instance (new ID scope, new CA) that no \
         provisioned device trusts. Restore {file} from a backup (stop the server first; for \
         fleetgate.db restore its -wal too if the backup has one); to really start over, move the \
         whole data directory away."
    )]
    Damaged { dir: PathBuf, file: PathBuf, problem: String },
    /// Another process holds the data directory's lock.
    #[error(
        "data directory {dir} is in use by {holder}: one server at a time. Stop it first, or give \
         this server its own --data-dir"
    )]
    InUse { dir: PathBuf, holder: String },
    /// A hub name asked for on a later start that is not one of the instance's hubs.
    #[error(
        "--hub-hostname {wanted}: this data directory's hub is named {existing} (linked hubs: {all}). A \
         hub is named when it is created: devices provisioned here were told assignedHub {existing} \
         and connect to it by that name. Start with --hub-hostname {existing} (or without \
         --hub-hostname) to keep it, and list that name in --hostname so the certificate covers \
         it; to add {wanted} as another hub, run `fleetgate linked-hub create --hostname {wanted}`"
    )]
    HubName { wanted: String, existing: String, all: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataDirError + '_ {
    move |source| DataDirError::Io { path: path.to_owned(), source }
}

/// What `instance.json` holds and `fleetgate info` prints.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Instance {
    pub id_scope: String,
    pub global_device_endpoint: String,
    pub service_connection_string: String,
    pub ca_certificate: String,
    pub hubs: Vec<InstanceHub>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct InstanceHub {
    pub host_name: String,
    pub connection_string: String,
}

impl Instance {
    pub fn read(data_dir: &Path) -> Result<Self, DataDirError> {
        let path = data_dir.join("instance.json");
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        serde_json::from_str(&text).map_err(|e| DataDirError::Corrupt(format!("{}: {e}", path.display())))
    }

    /// The banner printed at start: the portal's Overview page, in a terminal.
    pub fn banner(&self) -> String {
        format!("Fleetgate is ready.\n{}", self.details())
    }

    /// The instance's details, one indented line each (the banner without its first line).
    pub fn details(&self) -> String {
        let mut s = format!(
            "  ID scope:                   {}\n  Global device endpoint:     {}\n  Service connection string:  {}\n  CA certificate:             {}\n",
            self.id_scope, self.global_device_endpoint, self.service_connection_string, self.ca_certificate
        );
        for h in &self.hubs {
            s.push_str(&format!("  Linked hub {}:  {}\n", h.host_name, h.connection_string));
        }
        s
    }
}

pub struct DataDir {
    pub path: PathBuf,
    pub store: Arc<SqliteStore>,
    pub id_scope: IdScope,
    hostnames: Vec<String>,
    /// The directory's lock, held for as long as the server runs.
    pub lock: DirLock,
}

/// Writes a file readable by its owner only (every file in the data directory is), replacing
/// it whole.
fn write_private(path: &Path, contents: &[u8]) -> Result<(), DataDirError> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("tmp");
    let mut f =
        fleetgate_store::disk::private_file().write(true).create(true).truncate(true).open(&tmp).map_err(io(&tmp))?;
    // A left-over temporary file keeps its old mode when opened: set it.
    f.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(io(&tmp))?;
    f.write_all(contents).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Makes every file under `dir` owner-only (0600) and every directory 0700: for a data
/// directory made before everything was created that way. Symbolic links are left alone.
fn tighten_modes(dir: &Path) -> Result<(), DataDirError> {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        let meta = std::fs::symlink_metadata(&path).map_err(io(&path))?;
        let wanted = if meta.is_dir() {
            tighten_modes(&path)?;
            0o700
        } else if meta.is_file() {
            0o600
        } else {
            continue;
        };
        if meta.permissions().mode() & 0o7777 != wanted {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(wanted)).map_err(io(&path))?;
        }
    }
    Ok(())
}

fn damaged(dir: &Path, file: &str, problem: &str) -> DataDirError {
    DataDirError::Damaged { dir: dir.to_owned(), file: dir.join(file), problem: problem.to_owned() }
}

/// The ID scope in the registry of an initialized data directory: an error naming the file when
/// the registry is missing, empty, unreadable or has none.
fn stored_id_scope(dir: &Path) -> Result<String, DataDirError> {
    let db = dir.join("fleetgate.db");
    match std::fs::metadata(&db) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(damaged(dir, "fleetgate.db", "is missing")),
        Err(e) => return Err(DataDirError::Io { path: db, source: e }),
        Ok(m) if m.len() == 0 => return Err(damaged(dir, "fleetgate.db", "is empty")),
        Ok(_) => {}
    }
    match SqliteStore::stored_id_scope(&db) {
        Err(e) => Err(damaged(dir, "fleetgate.db", &format!("cannot be read ({e})"))),
        Ok(None) => Err(damaged(
            dir,
            "fleetgate.db",
            "has no instance settings (no ID scope: it was replaced or emptied, or lost its -wal file with changes not yet saved into it)",
        )),
        Ok(Some(scope)) => Ok(scope),
    }
}

/// What shows that an instance was made here even without `instance.json`: the CA (made after
/// the ID scope is stored) or telemetry (the log is opened only once a start has finished).
/// Neither exists after a first start cut short before its ID scope was stored.
fn earlier_instance(dir: &Path) -> Option<&'static str> {
    if dir.join("ca.pem").exists() && dir.join("ca.key").exists() {
        return Some("the CA devices trust (ca.pem, ca.key)");
    }
    let has_segments = std::fs::read_dir(dir.join("events")).ok().is_some_and(|entries| {
        entries.filter_map(Result::ok).any(|e| e.file_name().to_string_lossy().ends_with(".events"))
    });
    has_segments.then_some("the telemetry log (events/)")
}

/// A data directory without `instance.json` that shows an earlier instance: its registry must
/// still have an ID scope.
fn check_registry_of_earlier_instance(dir: &Path, evidence: &str) -> Result<(), DataDirError> {
    match stored_id_scope(dir) {
        Err(DataDirError::Damaged { file, problem, .. }) => Err(DataDirError::Damaged {
            dir: dir.to_owned(),
            file,
            problem: format!(
                "{problem}, while {evidence} of an earlier instance exists (instance.json is missing too)"
            ),
        }),
        other => other.map(|_| ()),
    }
}

/// Checks that an initialized data directory (one with `instance.json`) still has what cannot
/// be made again: the registry with this instance's ID scope, and the CA.
fn check_initialized(dir: &Path) -> Result<(), DataDirError> {
    let instance = Instance::read(dir)?;
    match stored_id_scope(dir)? {
        scope if scope != instance.id_scope => {
            return Err(damaged(
                dir,
                "fleetgate.db",
                &format!("belongs to another instance (ID scope {scope}, instance.json says {})", instance.id_scope),
            ))
        }
        _ => {}
    }
    // The CA's certificate and key must both be there, not empty.
    for file in ["ca.pem", "ca.key"] {
        let path = dir.join(file);
        match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(damaged(dir, file, "is missing (the CA devices trust cannot be made again)"))
            }
            Err(e) => return Err(DataDirError::Io { path, source: e }),
            Ok(m) if m.len() == 0 => {
                return Err(damaged(dir, file, "is empty (the CA devices trust cannot be made again)"))
            }
            Ok(_) => {}
        }
    }
    Ok(())
}

fn cert_err(e: impl std::fmt::Display) -> DataDirError {
    DataDirError::Certificate(e.to_string())
}

/// A host name with the port added when it is not HTTPS's default, for connection strings.
fn with_port(host: &str, port: u16) -> String {
    let host = if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_owned() };
    if port == 443 {
        host
    } else {
        format!("{host}:{port}")
    }
}

impl DataDir {
    pub async fn open_or_init(config: &ServerConfig) -> Result<Self, DataDirError> {
        let path = config.data_dir.clone();
        std::fs::create_dir_all(&path).map_err(io(&path))?;
        let path = std::fs::canonicalize(&path).map_err(io(&path))?;
        fleetgate_store::disk::create_private_dir(&path).map_err(io(&path))?;
        // Before anything is read or written: a second server would change what the first uses.
        let lock = DirLock::acquire(&path, "fleetgate serve")?;
        // Before anything is opened: opening would create what is missing.
        if path.join("instance.json").exists() {
            check_initialized(&path)?;
        } else if let Some(evidence) = earlier_instance(&path) {
            // instance.json is gone too, but a registry without an ID scope next to a CA or
            // telemetry was emptied: not a first start cut short.
            check_registry_of_earlier_instance(&path, evidence)?;
        }
        // The database holds keys: SqliteStore creates it owner-only (and SQLite gives its
        // -wal/-shm the same mode).
        let db = path.join("fleetgate.db");
        let store = Arc::new(SqliteStore::open_with(&db, event_log_options(config, &path)?)?);

        let id_scope = match store.setting("id_scope").await? {
            Some(s) => IdScope::parse(&s).map_err(|e| DataDirError::Corrupt(e.to_string()))?,
            None => {
                let s = IdScope::generate();
                store.set_setting("id_scope", s.as_str()).await?;
                tracing::info!(id_scope = %s, "new DPS instance");
                s
            }
        };
        if store.policies(DPS_POLICIES).await?.is_empty() {
            let mut policies = default_dps_policies();
            // A data directory from before policies kept only the owner key: keep it valid.
            if let Some(k) = store.setting("policy.provisioningserviceowner").await? {
                policies[0].primary_key = k;
            }
            store.set_policies(DPS_POLICIES, &policies).await?;
        }
        let hubs = store.hubs().await?;
        if hubs.is_empty() {
            store.add_hub(&LinkedHub::new(config.hub_name(), SymmetricKey::generate().to_base64())).await?;
        } else if let Some(wanted) = &config.hub_hostname {
            // A hub is never renamed here: devices were told its name as their assignedHub.
            if !hubs.iter().any(|h| h.host_name.eq_ignore_ascii_case(wanted)) {
                return Err(DataDirError::HubName {
                    wanted: wanted.clone(),
                    existing: hubs[0].host_name.clone(),
                    all: hubs.iter().map(|h| h.host_name.as_str()).collect::<Vec<_>>().join(", "),
                });
            }
        }
        let hubs = store.hubs().await?;
        for hub in &hubs {
            ensure_hub_policies(store.as_ref(), hub).await?;
        }
        let dir = Self { path, store, id_scope, hostnames: config.hostnames.clone(), lock };
        dir.ensure_certificates().await?;
        tighten_modes(&dir.path)?;
        Ok(dir)
    }

    pub fn ca_cert_path(&self) -> PathBuf {
        self.path.join("ca.pem")
    }
    pub fn server_cert_path(&self) -> PathBuf {
        self.path.join("server.pem")
    }
    pub fn server_key_path(&self) -> PathBuf {
        self.path.join("server.key")
    }

    /// Creates the CA on first start; (re)issues the server certificate when the host names
    /// changed or it is missing or close to expiry. The CA is never replaced once made: devices
    /// trust it.
    async fn ensure_certificates(&self) -> Result<(), DataDirError> {
        let (ca_pem, ca_key_pem) = (self.path.join("ca.pem"), self.path.join("ca.key"));
        if !ca_pem.exists() || !ca_key_pem.exists() {
            let key = KeyPair::generate().map_err(cert_err)?;
            let mut p = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, format!("Fleetgate CA {}", self.id_scope));
            dn.push(DnType::OrganizationName, "Fleetgate");
            p.distinguished_name = dn;
            p.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
            p.key_usages =
                vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
            let now = time::OffsetDateTime::now_utc();
            p.not_before = now - time::Duration::days(1);
            p.not_after = now + time::Duration::days(3650);
            let cert = p.self_signed(&key).map_err(cert_err)?;
            write_private(&ca_key_pem, key.serialize_pem().as_bytes())?;
            write_private(&ca_pem, cert.pem().as_bytes())?;
            let _ = std::fs::remove_file(self.server_cert_path());
        }

        let wanted = self.hostnames.join(",");
        let recorded = self.store.setting("server_cert_hostnames").await?;
        let fresh = self.server_cert_path().exists()
            && self.server_key_path().exists()
            && recorded.as_deref() == Some(wanted.as_str())
            && !self.server_cert_expiring()?;
        if fresh {
            return Ok(());
        }
        let ca_key =
            KeyPair::from_pem(&std::fs::read_to_string(&ca_key_pem).map_err(io(&ca_key_pem))?).map_err(cert_err)?;
        let ca_params = CertificateParams::from_ca_cert_pem(&std::fs::read_to_string(&ca_pem).map_err(io(&ca_pem))?)
            .map_err(cert_err)?;
        let ca = ca_params.self_signed(&ca_key).map_err(cert_err)?;

        let key = KeyPair::generate().map_err(cert_err)?; // ECDSA P-256
        let mut p = CertificateParams::new(self.hostnames.clone()).map_err(cert_err)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, self.hostnames.first().cloned().unwrap_or_else(|| "localhost".into()));
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::days(1);
        p.not_after = now + time::Duration::days(397);
        let cert = p.signed_by(&key, &ca, &ca_key).map_err(cert_err)?;
        write_private(&self.server_key_path(), key.serialize_pem().as_bytes())?;
        write_private(&self.server_cert_path(), cert.pem().as_bytes())?;
        self.store.set_setting("server_cert_hostnames", &wanted).await?;
        tracing::info!(hostnames = %wanted, "issued server certificate");
        Ok(())
    }

    fn server_cert_expiring(&self) -> Result<bool, DataDirError> {
        let path = self.server_cert_path();
        let pem = std::fs::read_to_string(&path).map_err(io(&path))?;
        // from_ca_cert_pem parses any certificate's validity; the name is rcgen's.
        match CertificateParams::from_ca_cert_pem(&pem) {
            Ok(p) => Ok(p.not_after < time::OffsetDateTime::now_utc() + time::Duration::days(30)),
            Err(_) => Ok(true),
        }
    }

    /// Writes `instance.json` for this start (ports can change between starts) and returns it.
    pub async fn write_instance_file(&self, https_port: u16) -> Result<Instance, DataDirError> {
        let endpoint = self.hostnames.first().cloned().unwrap_or_else(|| "localhost".into());
        write_instance(&self.path, self.store.as_ref(), &self.id_scope.to_string(), &endpoint, https_port).await
    }
}

/// The telemetry log's retention, size cap and the free-space reserve: the configured ones, or
/// defaults derived from the data directory's filesystem now (see `fleetgate_store::disk`).
fn event_log_options(config: &ServerConfig, dir: &Path) -> Result<EventLogOptions, DataDirError> {
    use fleetgate_store::disk;
    let space = disk::space(dir).map_err(io(dir))?;
    let reserve = config.disk_reserve_bytes.unwrap_or_else(|| disk::default_reserve(space));
    let events = dir.join("events");
    let cap = match config.event_retention_bytes {
        Some(cap) => cap,
        None => disk::default_event_cap(space, reserve, disk::dir_bytes(&events).map_err(io(&events))?),
    };
    tracing::info!(
        event_retention_bytes = cap,
        derived = config.event_retention_bytes.is_none(),
        disk_reserve_bytes = reserve,
        free_bytes = space.free,
        "telemetry is kept up to {cap} bytes (oldest dropped first); telemetry is refused below {reserve} bytes free, registry changes below {} bytes free",
        reserve / 2
    );
    if space.free < reserve {
        tracing::error!(dir = %dir.display(), free_bytes = space.free, reserve_bytes = reserve,
            "the data directory's filesystem is already below the free-space reserve: telemetry will be refused until space is freed (or --disk-reserve-bytes is lowered)");
    }
    Ok(EventLogOptions {
        retention: config.event_retention,
        max_bytes: Some(cap),
        reserve_bytes: reserve,
        ..EventLogOptions::default()
    })
}

/// Keeps `instance.json` true while the server runs: the service API links and unlinks hubs and
/// renews keys (the only path that does), and tells this before it answers, so a caller that
/// then reads the file finds the change.
pub(crate) struct InstanceFile {
    pub dir: PathBuf,
    pub store: Arc<dyn Store>,
    pub id_scope: String,
    pub endpoint: String,
    pub https_port: u16,
    /// One rewrite at a time: concurrent changes would write the same temporary file.
    pub writing: tokio::sync::Mutex<()>,
}

impl fleetgate_dps::linked_hubs::InstanceChanges for InstanceFile {
    fn instance_changed(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let _one_at_a_time = self.writing.lock().await;
            let written =
                write_instance(&self.dir, self.store.as_ref(), &self.id_scope, &self.endpoint, self.https_port).await;
            if let Err(e) = written {
                // The change itself is committed; the file catches up at the next change or start.
                tracing::error!(error = %e, "instance.json could not be rewritten after a change");
            }
        })
    }
}

/// The policy owner key of the DPS instance's policies in the store.
pub const DPS_POLICIES: &str = "dps";

/// The policy owner key of a hub's policies in the store.
pub fn hub_policies(host_name: &str) -> String {
    format!("hub:{}", host_name.to_ascii_lowercase())
}

/// Gives a hub Azure's default policies once; `iothubowner` keeps the key the hub was created with.
pub(crate) async fn ensure_hub_policies(store: &dyn Store, hub: &LinkedHub) -> Result<(), DataDirError> {
    if store.policies(&hub_policies(&hub.host_name)).await?.is_empty() {
        let mut policies = default_hub_policies();
        policies[0].primary_key = hub.owner_key.clone();
        store.set_policies(&hub_policies(&hub.host_name), &policies).await?;
    }
    Ok(())
}

fn owner_key(policies: &[AccessPolicy], name: &str) -> Result<String, DataDirError> {
    policies
        .iter()
        .find(|p| p.key_name == name)
        .map(|p| p.primary_key.clone())
        .ok_or_else(|| DataDirError::Corrupt(format!("policy {name} is missing")))
}

/// Writes `instance.json` from the store: connection strings carry the owner policies' primary
/// keys and the HTTPS port when it is not 443.
pub(crate) async fn write_instance(
    dir: &Path,
    store: &dyn Store,
    id_scope: &str,
    endpoint: &str,
    https_port: u16,
) -> Result<Instance, DataDirError> {
    let dps_key = owner_key(&store.policies(DPS_POLICIES).await?, DPS_OWNER_POLICY)?;
    let mut hubs = Vec::new();
    for h in store.hubs().await? {
        let key = owner_key(&store.policies(&hub_policies(&h.host_name)).await?, HUB_OWNER_POLICY)?;
        hubs.push(InstanceHub {
            host_name: h.host_name.clone(),
            connection_string: format!(
                "HostName={};SharedAccessKeyName={HUB_OWNER_POLICY};SharedAccessKey={key}",
                with_port(&h.host_name, https_port)
            ),
        });
    }
    let instance = Instance {
        id_scope: id_scope.to_owned(),
        global_device_endpoint: endpoint.to_owned(),
        service_connection_string: format!(
            "HostName={};SharedAccessKeyName={DPS_OWNER_POLICY};SharedAccessKey={dps_key}",
            with_port(endpoint, https_port)
        ),
        ca_certificate: dir.join("ca.pem").display().to_string(),
        hubs,
    };
    let json = serde_json::to_vec_pretty(&instance).map_err(|e| DataDirError::Corrupt(e.to_string()))?;
    write_private(&dir.join("instance.json"), &json)?;
    Ok(instance)
}

#[cfg(test)]
mod tests {
    use super::with_port;

    #[test]
    fn ports_only_when_not_443() {
        assert_eq!(with_port("localhost", 443), "localhost");
        assert_eq!(with_port("localhost", 8443), "localhost:8443");
        assert_eq!(with_port("::1", 8443), "[::1]:8443");
    }
}
