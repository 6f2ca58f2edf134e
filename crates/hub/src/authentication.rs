//! Device authentication: who may open a hub connection, and until when.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use fleetgate_core::device::{AuthenticationType, DeviceStatus};
use fleetgate_core::keys::SymmetricKey;
use fleetgate_core::message::{AuthMethod, ConnectionAuth};
use fleetgate_core::sas::SasToken;
use fleetgate_core::time::Timestamp;
use fleetgate_core::x509::{Certificate, CertificateChain};
use fleetgate_store::StoreError;

use crate::sessions::CloseCount;
use crate::Hub;

/// A device that authenticated to a hub.
#[derive(Debug, Clone)]
pub struct HubDevice {
    pub hub: String,
    pub device_id: String,
    /// When the device was last active (ticks), shared with [`Hub::device_state`].
    last_activity: Arc<AtomicI64>,
    /// When the credentials the device connected with stop being accepted: its SAS token's
    /// expiry (plus the clock skew a CONNECT is allowed), its certificate's notAfter. The
    /// connection must not outlive them (Azure closes it; the SDKs reconnect with new ones).
    expires: Option<Timestamp>,
    /// The device's close requests before its identity was read: its session is refused if one
    /// came since (see [`Sessions::register`]).
    pub(crate) closes: CloseCount,
    /// How the connection authenticated and the identity's generation: stamped on every message
    /// it sends, as Azure does.
    pub(crate) connection: ConnectionAuth,
}

impl HubDevice {
    /// See the `expires` field; `None` only for devices made without credentials (tests).
    pub fn credentials_expire(&self) -> Option<Timestamp> {
        self.expires
    }

    /// Records activity: an atomic store, since it happens on every message.
    pub(crate) fn touch(&self, now: Timestamp) {
        self.last_activity.store(now.ticks(), Ordering::Relaxed);
    }
}

/// Why a hub CONNECT was refused (all map to CONNACK "not authorized").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectRefusal {
    UnknownHub,
    UnknownDevice,
    BadCredentials,
    Disabled,
}

/// What checking a device's CONNECT found: three ways, because the check can fail for two
/// reasons, and a store outage must not read as a wrong key (the SDKs give up on "not
/// authorized" for good, and retry "server unavailable").
#[derive(Debug, Clone)]
pub enum Authentication {
    Identified(HubDevice),
    Refused(ConnectRefusal),
    /// The store could not be read: nothing is known about the device; it should retry.
    CouldNotCheck,
}

impl Hub {
    /// Checks a device's CONNECT: its SAS token for `{hub}/devices/{id}` signed with one of the
    /// device's keys, or, for an X.509 identity, the client certificate chain of its TLS
    /// connection (see [`DeviceIdentity::check_certificate`]). Reasons are recorded, never sent;
    /// refusals are counted per `source` address (see [`fleetgate_store::AuditLog::refused`]).
    pub async fn authenticate(
        &self,
        host: &str,
        device_id: &str,
        password: Option<&str>,
        certificates: Option<&CertificateChain>,
        source: Option<std::net::IpAddr>,
    ) -> Authentication {
        let refuse_because = |r: ConnectRefusal, why: &str| {
            use fleetgate_core::audit::{AuditCategory, AuditEntry, Outcome};
            // Logged once, by the audit trail's mirror (`operation=connect`, with the reason).
            let reason = if why.is_empty() { format!("{r:?}") } else { format!("{r:?}: {why}") };
            self.audit.refused(
                source,
                AuditEntry::new(AuditCategory::DeviceOperations, "connect", device_id, Outcome::Failure)
                    .target(host)
                    .reason(reason),
            );
            Authentication::Refused(r)
        };
        let refuse = |r: ConnectRefusal| refuse_because(r, "");
        let could_not_check = |e: &dyn std::fmt::Display| {
            fleetgate_metrics::log_limited!(tracing::Level::WARN, hub = %host, error = %e, "device connection could not be checked (store failure)");
            Authentication::CouldNotCheck
        };
        // Before anything is read: a change committed after the reads below is then seen by
        // `connect_session`, which refuses the session.
        let closes = self.sessions.closes_before_auth(host, device_id);
        let hub = match self.hub_named(host).await {
            Ok(Some(h)) => h,
            Ok(None) => return refuse(ConnectRefusal::UnknownHub),
            Err(e) => return could_not_check(&e),
        };
        let device = match self.store.device(&hub.host_name, device_id).await {
            Ok(Some(d)) => d,
            Ok(None) => return refuse(ConnectRefusal::UnknownDevice),
            Err(e) => return could_not_check(&e),
        };
        if device.authentication_type == AuthenticationType::None {
            // Azure's `none`: the identity has no credentials of its own to connect with.
            return refuse_because(ConnectRefusal::BadCredentials, "the identity's authentication type is none");
        }
        if device.authentication_type != AuthenticationType::Sas {
            let fallback = if device.ca_certificates.is_empty() {
                match self.group_cas().await {
                    Ok(cas) => cas,
                    Err(e) => return could_not_check(&e),
                }
            } else {
                Vec::new()
            };
            if let Err(why) = device.check_certificate(certificates, &fallback, Timestamp::now().unix_seconds()) {
                return refuse_because(ConnectRefusal::BadCredentials, &format!("X.509: {why}"));
            }
            if device.status == DeviceStatus::Disabled {
                return refuse(ConnectRefusal::Disabled);
            }
            // The leaf was parsed and checked above; its notAfter is the session's end.
            let not_after = certificates
                .and_then(|c| Certificate::from_der(c.leaf()).ok())
                .map(|leaf| Timestamp::from_unix_seconds(leaf.validity().1.saturating_add(1)));
            let method = if device.authentication_type == AuthenticationType::CertificateAuthority {
                AuthMethod::X509Ca
            } else {
                AuthMethod::X509SelfSigned
            };
            let connection = ConnectionAuth { method, generation_id: device.generation_id };
            return Authentication::Identified(self.connected_device(
                hub.host_name,
                device.device_id,
                not_after,
                closes,
                connection,
            ));
        }
        let Some(token) = password.and_then(|p| SasToken::parse(p).ok()) else {
            return refuse(ConnectRefusal::BadCredentials);
        };
        let resource_ok = token.names_device(&hub.host_name, &device.device_id);
        let fresh = token.check_expiry(Timestamp::now().unix_seconds()).is_ok();
        let signed = [&device.primary_key, &device.secondary_key]
            .iter()
            .filter_map(|k| SymmetricKey::from_base64(k).ok())
            .filter(|k| !k.as_bytes().is_empty())
            .any(|k| token.signed_with(&k));
        if !(resource_ok && fresh && signed) {
            return refuse(ConnectRefusal::BadCredentials);
        }
        if device.status == DeviceStatus::Disabled {
            return refuse(ConnectRefusal::Disabled);
        }
        // The first second `check_expiry` refuses the token is when the connection ends: a
        // token accepted at CONNECT (skew included) keeps it open exactly as long as it would
        // still be accepted.
        let expires = token.accepted_until().saturating_add(1);
        let expires = Some(Timestamp::from_unix_seconds(expires));
        let connection = ConnectionAuth { method: AuthMethod::Sas, generation_id: device.generation_id };
        Authentication::Identified(self.connected_device(hub.host_name, device.device_id, expires, closes, connection))
    }

    /// The device a shared access policy with `DeviceConnect` acts for on a device route (a
    /// protocol gateway, as Azure allows): its identity must exist and be enabled.
    pub(crate) async fn acting_for(&self, hub: &str, device_id: &str) -> Result<HubDevice, fleetgate_core::AzureError> {
        let closes = self.sessions.closes_before_auth(hub, device_id);
        let device = self
            .store
            .device(hub, device_id)
            .await
            .map_err(crate::errors::store_err)?
            .ok_or_else(|| crate::errors::not_found(device_id))?;
        if device.status == DeviceStatus::Disabled {
            return Err(fleetgate_core::AzureError::unauthorized());
        }
        let connection = ConnectionAuth { method: AuthMethod::HubPolicy, generation_id: device.generation_id };
        Ok(self.connected_device(hub.to_owned(), device.device_id, None, closes, connection))
    }

    fn connected_device(
        &self,
        hub: String,
        device_id: String,
        expires: Option<Timestamp>,
        closes: CloseCount,
        connection: ConnectionAuth,
    ) -> HubDevice {
        let last_activity = self.activity_of(&hub, &device_id);
        HubDevice { hub, device_id, last_activity, expires, closes, connection }
    }

    /// The CA certificates a `certificateAuthority` identity created through the service API
    /// (with no CA certificates of its own) is checked against: those of the instance's X.509
    /// enrollment groups, the CAs this deployment has verified.
    async fn group_cas(&self) -> Result<Vec<Certificate>, StoreError> {
        let groups = self.store.groups().await?;
        Ok(groups
            .iter()
            .filter_map(|g| match g.settings.x509_trust() {
                Some(fleetgate_core::enrollment::X509Trust::CertificateAuthority(cas)) => Some(cas),
                _ => None,
            })
            .flatten()
            .flatten()
            .collect())
    }
}
