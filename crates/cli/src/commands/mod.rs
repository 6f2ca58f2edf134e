//! One file per verb group.

pub mod audit;
pub mod bulk;
pub mod cert;
pub mod enrollment_args;
pub mod enrollments;
pub mod events;
pub mod groups;
pub mod hub;
pub mod keys;
pub mod linked_hubs;
pub mod policies;
pub mod registrations;
pub mod serve;
pub mod simulate;

use anyhow::{anyhow, Context};
use fleetgate_client::{ConnectionString, Error, RawDpsClient};

use crate::Target;

/// A service API client for `target`: its connection string, or the local data directory's.
/// The raw client: the CLI prints Azure's JSON as the service sent it.
pub fn client(target: &Target) -> anyhow::Result<RawDpsClient> {
    let (conn, ca_default) = match &target.connection_string {
        Some(c) => (c.clone(), None),
        None => {
            let inst = fleetgate_server::Instance::read(&target.data_dir).with_context(|| {
                format!("no --connection-string given and no instance in {}", target.data_dir.display())
            })?;
            (inst.service_connection_string, Some(std::path::PathBuf::from(inst.ca_certificate)))
        }
    };
    let conn: ConnectionString = conn.parse().map_err(|e: String| anyhow!("invalid connection string: {e}"))?;
    let ca_path = target.ca_cert.clone().or(ca_default).or_else(|| {
        let p = target.data_dir.join("ca.pem");
        p.exists().then_some(p)
    });
    let ca = match ca_path {
        Some(p) => Some(std::fs::read(&p).with_context(|| format!("reading CA certificate {}", p.display()))?),
        None => None,
    };
    Ok(RawDpsClient::new(conn, ca.as_deref())?)
}

/// A service error as one readable line (Azure's errorCode and message when there is a body).
pub fn describe(e: Error) -> anyhow::Error {
    match e.api_error() {
        Some(fleetgate_client::ApiError { status, body, .. }) => {
            let code = body.get("errorCode").map(|c| c.to_string()).unwrap_or_default();
            let msg = body.get("message").and_then(|m| m.as_str()).unwrap_or("");
            anyhow!("service returned {status} {code}: {msg}")
        }
        None => {
            let t = e.detail();
            match transport_hint(&t) {
                Some(hint) => anyhow!("{t}\nhint: {hint}"),
                None => anyhow!("{t}"),
            }
        }
    }
}

/// What to check for a request that got no answer, from the words of its cause chain.
fn transport_hint(cause: &str) -> Option<&'static str> {
    let c = cause.to_ascii_lowercase();
    if c.contains("connection refused") {
        Some("nothing listens there: is `fleetgate serve` running, on the host and port of the connection string?")
    } else if c.contains("notvalidforname") || c.contains("not valid for name") {
        Some("the server's certificate does not name this host: connect by a name it carries, or add the name with `fleetgate serve --hostname`")
    } else if c.contains("certificate") || c.contains("unknownissuer") {
        Some("the server's certificate is not trusted: pass its CA with --ca-cert (a local instance's is ca.pem in its data directory)")
    } else if c.contains("dns error") || c.contains("lookup address") || c.contains("name or service not known") {
        Some("the host name does not resolve: check the HostName in the connection string")
    } else if c.contains("timed out") || c.contains("deadline has elapsed") {
        Some("no answer in time: is the host reachable, and is `fleetgate serve` running there?")
    } else {
        None
    }
}

pub use crate::output::print_result;
