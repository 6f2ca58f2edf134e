//! A real Fleetgate server on loopback (port 0, temp data dir) for the client's tests, and the
//! service clients and device options that reach it.
#![allow(dead_code)]

use std::time::Duration;

use fleetgate_client::{
    ConnectionString, DpsServiceClient, EnrollmentGroup, HubServiceClient, RegisterOptions, SymmetricKey,
};
use fleetgate_server::{RunningServer, ServerConfig};
use serde_json::Value;

pub struct Server {
    pub running: RunningServer,
    pub dir: tempfile::TempDir,
}

/// The free-space reserve test servers keep (as the server's own tests do): the tests must not
/// depend on how full this machine's disk is.
const TEST_DISK_RESERVE: u64 = 64 << 20;

pub fn config(dir: &std::path::Path) -> ServerConfig {
    let mut c = ServerConfig::new(dir.to_path_buf());
    c.mqtt_port = 0;
    c.https_port = 0;
    c.disk_reserve_bytes = Some(TEST_DISK_RESERVE);
    c
}

impl Server {
    pub async fn start(immediate_assignment: bool) -> Self {
        Self::start_with(|c| c.immediate_assignment = immediate_assignment).await
    }

    pub async fn start_with(f: impl FnOnce(&mut ServerConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        f(&mut c);
        let running = fleetgate_server::start(c).await.unwrap();
        Self { running, dir }
    }

    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join("ca.pem")).unwrap()
    }

    pub fn ca_path(&self) -> String {
        self.dir.path().join("ca.pem").to_str().unwrap().to_owned()
    }

    pub fn connection_string(&self) -> ConnectionString {
        self.running.instance.service_connection_string.parse().unwrap()
    }

    pub fn service(&self) -> DpsServiceClient {
        DpsServiceClient::new(self.connection_string(), Some(&self.ca_pem())).unwrap()
    }

    pub fn hub_service(&self) -> HubServiceClient {
        let c: ConnectionString = self.running.instance.hubs[0].connection_string.parse().unwrap();
        HubServiceClient::new(c, Some(&self.ca_pem())).unwrap()
    }

    /// Creates a symmetric-key group (with `extra` members) and returns its primary key.
    pub async fn group(&self, id: &str, extra: Value) -> SymmetricKey {
        let mut g = EnrollmentGroup::symmetric_key(id);
        g.provisioning_status = None;
        g.extra = extra.as_object().unwrap().clone();
        if let Some(Value::String(status)) = g.extra.remove("provisioningStatus") {
            g.provisioning_status = Some(status);
        }
        self.service().put_enrollment_group(&g, None).await.unwrap();
        let keys = self.service().enrollment_group_attestation(id).await.unwrap();
        SymmetricKey::from_base64(keys.symmetric_key.unwrap().primary_key.as_deref().unwrap()).unwrap()
    }

    /// Options for `reg`, connecting to 127.0.0.1 and verifying the certificate as `localhost`.
    pub fn options(&self, reg: &str, key: SymmetricKey) -> RegisterOptions {
        let mut o = RegisterOptions::new("127.0.0.1", self.ca_pem(), &self.running.instance.id_scope, reg, key);
        o.port = self.running.mqtt_addr.port();
        o.server_name = Some("localhost".into());
        o.timeout = Duration::from_secs(20);
        o
    }
}
