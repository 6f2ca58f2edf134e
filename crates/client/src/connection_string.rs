//! `HostName=...;SharedAccessKeyName=...;SharedAccessKey=...` connection strings.

use fleetgate_core::keys::SymmetricKey;

/// A service connection string: where the service is and the shared access policy to sign
/// with (Fleetgate's `serviceConnectionString` in `instance.json`, or a hub's). Parse it with
/// `str::parse`; `Debug` leaves the key out.
#[derive(Clone)]
pub struct ConnectionString {
    /// `HostName`: the service's host, with `:port` when not 443.
    pub host_name: String,
    /// `SharedAccessKeyName`: the policy (e.g. `provisioningserviceowner`, `iothubowner`).
    pub key_name: String,
    /// `SharedAccessKey`: the policy's key.
    pub key: SymmetricKey,
}

impl std::fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionString")
            .field("host_name", &self.host_name)
            .field("key_name", &self.key_name)
            .finish_non_exhaustive()
    }
}

impl std::str::FromStr for ConnectionString {
    type Err = String;

    /// Keys are matched case-insensitively; values split at the first `=` only (base64 padding).
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut host, mut name, mut key) = (None, None, None);
        for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| format!("connection string part '{part}' has no '='"))?;
            let slot = match k.to_ascii_lowercase().as_str() {
                "hostname" => &mut host,
                "sharedaccesskeyname" => &mut name,
                "sharedaccesskey" => &mut key,
                other => return Err(format!("unknown connection string key '{other}'")),
            };
            if slot.replace(v.to_owned()).is_some() {
                return Err(format!("connection string key '{k}' appears twice"));
            }
        }
        let key = key.ok_or("connection string has no SharedAccessKey")?;
        Ok(Self {
            host_name: host.ok_or("connection string has no HostName")?,
            key_name: name.ok_or("connection string has no SharedAccessKeyName")?,
            key: SymmetricKey::from_base64(&key).map_err(|e| e.message)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let c: ConnectionString = "HostName=localhost:8443;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=AAECAwQFBgcICQoLDA0ODw==".parse().unwrap();
        assert_eq!(c.host_name, "localhost:8443");
        assert_eq!(c.key_name, "provisioningserviceowner");
        assert_eq!(c.key.as_bytes().len(), 16);
        for bad in [
            "",
            "HostName=a",
            "HostName=a;SharedAccessKeyName=b",
            "HostName=a;HostName=b;SharedAccessKeyName=c;SharedAccessKey=AA==",
            "Foo=1",
        ] {
            assert!(bad.parse::<ConnectionString>().is_err(), "{bad}");
        }
    }
}
