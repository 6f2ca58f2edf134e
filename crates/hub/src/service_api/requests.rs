//! Azure's request bodies of the hub service API, parsed into the hub's types.

use fleetgate_core::device::{DeviceCredentials, DeviceStatus};
use fleetgate_core::keys::SymmetricKey;
use fleetgate_core::twin::{service_section, ServiceSection};
use fleetgate_core::AzureError;
use serde_json::Value;

use crate::registry::DeviceSpec;
use crate::twins::{TwinChange, TwinReplacement};

/// Azure's limit on `statusReason`.
const MAX_STATUS_REASON: usize = 128;

/// Azure's `Device` body of `PUT /devices/{id}`: status and credentials (everything else in it
/// is the hub's to decide).
pub fn device_spec(body: &[u8], device_id: &str) -> Result<DeviceSpec, AzureError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| AzureError::bad_request(format!("Malformed device JSON: {e}")))?;
    if let Some(id) = v.get("deviceId").and_then(Value::as_str) {
        if id != device_id {
            return Err(AzureError::bad_request("deviceId in the body does not match the path."));
        }
    }
    let status: DeviceStatus = match v.get("status") {
        None | Some(Value::Null) => DeviceStatus::Enabled,
        Some(s) => serde_json::from_value(s.clone())
            .map_err(|_| AzureError::bad_request("status must be enabled or disabled."))?,
    };
    let status_reason = match v.get("statusReason") {
        None | Some(Value::Null) => None,
        Some(Value::String(r)) if r.chars().count() <= MAX_STATUS_REASON => Some(r.clone()),
        Some(_) => return Err(AzureError::bad_request("statusReason must be a string of at most 128 characters.")),
    };
    let key = |name: &str| -> Result<Option<SymmetricKey>, AzureError> {
        match v
            .pointer(&format!("/authentication/symmetricKey/{name}"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
        {
            Some(k) => Ok(Some(SymmetricKey::parse_user_key(k)?)),
            None => Ok(None),
        }
    };
    Ok(DeviceSpec {
        status,
        status_reason,
        keys: [key("primaryKey")?, key("secondaryKey")?],
        credentials: other_credentials(&v)?,
    })
}

/// The tags and desired properties of a twin body (each `None` when absent or `null`), and
/// whether it holds reported properties.
fn twin_sections(body: &[u8]) -> Result<(TwinChange, bool), AzureError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| AzureError::bad_request(format!("Malformed twin JSON: {e}")))?;
    let section = |value: Option<&Value>, which| match value {
        None | Some(Value::Null) => Ok(None),
        Some(s) => service_section(s, which).map(Some),
    };
    let tags = section(v.get("tags"), ServiceSection::Tags)?;
    let desired = section(v.pointer("/properties/desired"), ServiceSection::Desired)?;
    Ok((TwinChange { tags, desired }, v.pointer("/properties/reported").is_some()))
}

/// Azure's twin patch body: `tags` and/or `properties.desired`.
pub fn twin_change(body: &[u8]) -> Result<TwinChange, AzureError> {
    let (change, reported) = twin_sections(body)?;
    if reported {
        return Err(AzureError::bad_request("Reported properties are written by the device only."));
    }
    Ok(change)
}

/// Azure's replace-twin body: the whole twin, of which the tags and the desired properties are
/// taken (a section left out or `null` becomes empty). The service SDKs send back a twin they
/// read, so its reported properties and read-only members are there and are ignored.
pub fn twin_replacement(body: &[u8]) -> Result<TwinReplacement, AzureError> {
    let (TwinChange { tags, desired }, _) = twin_sections(body)?;
    Ok(TwinReplacement { tags: tags.unwrap_or_default(), desired: desired.unwrap_or_default() })
}

/// The credentials of a service API device body other than SAS keys (`authentication.type`
/// `selfSigned` with `x509Thumbprint`, `certificateAuthority`, or `none`); `None` for SAS.
fn other_credentials(v: &Value) -> Result<Option<DeviceCredentials>, AzureError> {
    let kind = v.pointer("/authentication/type").and_then(Value::as_str).unwrap_or("sas");
    if kind.eq_ignore_ascii_case("sas") {
        return Ok(None);
    }
    if kind.eq_ignore_ascii_case("none") {
        return Ok(Some(DeviceCredentials::None));
    }
    if kind.eq_ignore_ascii_case("certificateAuthority") {
        return Ok(Some(DeviceCredentials::CertificateAuthority(Vec::new())));
    }
    if !kind.eq_ignore_ascii_case("selfSigned") {
        return Err(AzureError::bad_request(
            "authentication.type must be sas, selfSigned, certificateAuthority or none.",
        ));
    }
    let thumbprint = |name: &str| -> Result<Option<String>, AzureError> {
        let Some(t) = v
            .pointer(&format!("/authentication/x509Thumbprint/{name}"))
            .and_then(Value::as_str)
            .map(|t| t.replace(':', ""))
            .filter(|t| !t.is_empty())
        else {
            return Ok(None);
        };
        if !(t.len() == 40 || t.len() == 64) || !t.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(AzureError::bad_request(format!("{name} must be a SHA-1 or SHA-256 thumbprint in hex.")));
        }
        Ok(Some(t.to_ascii_uppercase()))
    };
    let (primary, secondary) = (thumbprint("primaryThumbprint")?, thumbprint("secondaryThumbprint")?);
    if primary.is_none() && secondary.is_none() {
        return Err(AzureError::bad_request("A selfSigned device needs x509Thumbprint.primaryThumbprint."));
    }
    Ok(Some(DeviceCredentials::SelfSigned { primary, secondary }))
}
