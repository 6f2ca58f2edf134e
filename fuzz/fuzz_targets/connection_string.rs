//! `HostName=...;SharedAccessKeyName=...;SharedAccessKey=...` connection strings, as the CLI
//! reads them from a flag or `FLEETGATE_CONNECTION_STRING` (`fleetgate_client::connection_string`).
//!
//! Invariants: never panics; a string that parses, written back in canonical form, parses to the
//! same host, policy name and key.

#![no_main]

use fleetgate_client::connection_string::ConnectionString;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(c) = text.parse::<ConnectionString>() else { return };
    assert!(!c.host_name.contains(';') && !c.key_name.contains(';'));
    let canonical =
        format!("HostName={};SharedAccessKeyName={};SharedAccessKey={}", c.host_name, c.key_name, c.key.to_base64());
    let again: ConnectionString =
        canonical.parse().unwrap_or_else(|e| panic!("{canonical:?} (from {text:?}) does not parse: {e}"));
    assert_eq!(again.host_name, c.host_name);
    assert_eq!(again.key_name, c.key_name);
    assert_eq!(again.key, c.key);
});
