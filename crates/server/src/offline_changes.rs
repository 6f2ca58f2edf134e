//! Changes to a data directory made from the command line (`linked-hub create/delete`,
//! `policy renew-key`), beside or without a running server: each takes the directory's lock
//! when no server holds it, rewrites `instance.json`, and checkpoints before the command exits.

use std::path::Path;

use fleetgate_core::keys::SymmetricKey;
use fleetgate_core::policy::AccessPolicy;
use fleetgate_store::{LinkedHub, SqliteStore, Store};

use crate::datadir::{
    ensure_hub_policies, hub_policies, write_instance, DataDirError, DirLock, Instance, InstanceHub, DPS_POLICIES,
};

/// `instance.json` rewritten after a change made outside a running server (a new hub, a renewed
/// key), keeping the endpoint and HTTPS port it was last started with.
pub(crate) async fn rewrite_instance(data_dir: &Path, store: &dyn Store) -> Result<Instance, DataDirError> {
    let instance = Instance::read(data_dir)?;
    let host = instance.service_connection_string.split(';').find_map(|p| p.strip_prefix("HostName=")).unwrap_or("");
    let port = host.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).unwrap_or(443);
    write_instance(data_dir, store, &instance.id_scope, &instance.global_device_endpoint, port).await
}

/// After a change made from the command line: copies it into `fleetgate.db` itself, as a
/// stopping server does, since the command exits without waiting for SQLite to (a backup of the
/// `.db` alone would miss it). The change is committed either way: a checkpoint that a running
/// server's reader kept from finishing leaves it in the `-wal`, where that server's own stop
/// checkpoints it.
pub async fn checkpoint_offline_change(store: &SqliteStore) {
    if let Err(e) = store.checkpoint().await {
        tracing::warn!(error = %e, "the change is committed but still in the -wal until the server stops");
    }
}

/// Which of a policy's keys to renew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Primary,
    Secondary,
}

/// The policies of the DPS instance (`hub: None`) or of a hub, from the data directory.
pub async fn list_policies(data_dir: &Path, hub: Option<&str>) -> Result<Vec<AccessPolicy>, DataDirError> {
    Instance::read(data_dir)?;
    let store = SqliteStore::open(&data_dir.join("fleetgate.db"))?;
    let owner = hub.map(hub_policies).unwrap_or_else(|| DPS_POLICIES.to_owned());
    Ok(store.policies(&owner).await?)
}

/// Replaces one key of a policy with a fresh one (`fleetgate policy renew-key`). Tokens signed
/// with the old key stop working at once; `instance.json` follows.
pub async fn renew_policy_key(
    data_dir: &Path,
    hub: Option<&str>,
    name: &str,
    which: KeyKind,
) -> Result<AccessPolicy, DataDirError> {
    Instance::read(data_dir)?;
    let _lock = DirLock::for_offline_change(data_dir, "fleetgate policy renew-key")?;
    let store = SqliteStore::open(&data_dir.join("fleetgate.db"))?;
    let owner = hub.map(hub_policies).unwrap_or_else(|| DPS_POLICIES.to_owned());
    let mut policies = store.policies(&owner).await?;
    let policy = policies
        .iter_mut()
        .find(|p| p.key_name.eq_ignore_ascii_case(name))
        .ok_or_else(|| DataDirError::Corrupt(format!("no policy named '{name}'")))?;
    let fresh = SymmetricKey::generate().to_base64();
    match which {
        KeyKind::Primary => policy.primary_key = fresh,
        KeyKind::Secondary => policy.secondary_key = fresh,
    }
    let renewed = policy.clone();
    store.set_policies(&owner, &policies).await?;
    rewrite_instance(data_dir, &store).await?;
    checkpoint_offline_change(&store).await;
    tracing::info!(policy = %renewed.key_name, ?which, "policy key renewed");
    Ok(renewed)
}

/// Links a new hub to the instance in `data_dir` (CLI `fleetgate hub create`): stored with a
/// fresh `iothubowner` key and listed in `instance.json`. A running server sees it at once (hubs
/// are read from the store per request).
pub async fn add_hub(data_dir: &Path, host_name: &str) -> Result<InstanceHub, DataDirError> {
    let host_name = host_name.trim();
    if host_name.is_empty() || host_name.contains(|c: char| c.is_whitespace() || c == '/' || c == ';') {
        return Err(DataDirError::Corrupt(format!("'{host_name}' is not a valid host name")));
    }
    Instance::read(data_dir)?;
    let _lock = DirLock::for_offline_change(data_dir, "fleetgate linked-hub create")?;
    let store = SqliteStore::open(&data_dir.join("fleetgate.db"))?;
    if store.hubs().await?.iter().any(|h| h.host_name.eq_ignore_ascii_case(host_name)) {
        return Err(DataDirError::Corrupt(format!("hub '{host_name}' already exists")));
    }
    let hub = LinkedHub::new(host_name, SymmetricKey::generate().to_base64());
    store.add_hub(&hub).await?;
    ensure_hub_policies(&store, &hub).await?;
    let instance = rewrite_instance(data_dir, &store).await?;
    checkpoint_offline_change(&store).await;
    instance
        .hubs
        .into_iter()
        .find(|h| h.host_name.eq_ignore_ascii_case(host_name))
        .ok_or_else(|| DataDirError::Corrupt("the new hub is missing from instance.json".into()))
}

/// Unlinks a hub from the instance in `data_dir` (CLI `fleetgate linked-hub delete`): only one
/// without device identities, and never the last; `instance.json` follows. A running server
/// stops serving it at once.
pub async fn remove_hub(data_dir: &Path, host_name: &str) -> Result<(), DataDirError> {
    use fleetgate_store::HubRemoval;
    Instance::read(data_dir)?;
    let _lock = DirLock::for_offline_change(data_dir, "fleetgate linked-hub delete")?;
    let store = SqliteStore::open(&data_dir.join("fleetgate.db"))?;
    let refused = |why: String| Err(DataDirError::Corrupt(why));
    match store.remove_hub(host_name).await? {
        HubRemoval::Removed => {}
        HubRemoval::NoSuchHub => return refused(format!("no linked hub named '{host_name}'")),
        HubRemoval::LastHub => {
            return refused(format!(
                "'{host_name}' is the instance's only hub; link the one to keep first (`fleetgate linked-hub create`)"
            ))
        }
        HubRemoval::HasDevices(n) => {
            return refused(format!(
                "hub '{host_name}' has {n} device identities; delete them first (`fleetgate hub device-identity \
                 delete --hub-name {host_name}`) and provision the devices again, so DPS assigns them another hub"
            ))
        }
    }
    rewrite_instance(data_dir, &store).await?;
    checkpoint_offline_change(&store).await;
    tracing::info!(hub = %host_name, "hub unlinked");
    Ok(())
}
