//! The MQTT/TLS listener (port 8883): accepts connections, reads CONNECT, and hands the
//! connection to the DPS session or the hub session, told apart by the username. MQTT over
//! WebSockets (HTTPS port) enters at [`serve_stream`] and is served by the same sessions.

mod connection;
mod dps_session;
mod hub_session;

use std::net::IpAddr;
use std::sync::Arc;

use fleetgate_core::time::Timestamp;
use fleetgate_core::x509::CertificateChain;
use fleetgate_dps::mqtt::DpsUsername;
use fleetgate_dps::Provisioning;
use fleetgate_hub::mqtt::HubUsername;
use fleetgate_hub::Hub;
use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Packet};
use rumqttc::mqttbytes::{Error as CodecError, Protocol};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

pub use connection::{Connection, ConnectionError, PacketBudget};

use crate::config::Limits;
use crate::write_deadline::WriteDeadline;
use fleetgate_metrics::info_limited;

/// Largest CONNECT we read before we know who the client is.
const MAX_CONNECT_BYTES: usize = 8 * 1024;

#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    dps: Arc<Provisioning>,
    hub: Arc<Hub>,
    limits: Arc<Limits>,
    gate: Arc<crate::listener::Gate>,
    budget: Arc<PacketBudget>,
    shutdown: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(tls);
    crate::listener::accept_loop(listener, "mqtt", gate, shutdown.clone(), move |tcp, peer, permit| {
        let (acceptor, dps, hub, limits, budget, shutdown) =
            (acceptor.clone(), dps.clone(), hub.clone(), limits.clone(), budget.clone(), shutdown.clone());
        async move {
            let _permit = permit;
            if let Err(e) = handle(tcp, peer.ip(), acceptor, dps, hub, limits, budget, shutdown).await {
                tracing::debug!(%peer, error = %e, "mqtt connection ended with an error");
            }
        }
    })
    .await;
}

/// One connection from the MQTT port: TLS, then the MQTT conversation. The TLS handshake and the
/// CONNECT share one deadline, so a client that stalls anywhere before it has identified itself
/// is dropped.
#[allow(clippy::too_many_arguments)]
async fn handle(
    tcp: tokio::net::TcpStream,
    source: IpAddr,
    acceptor: TlsAcceptor,
    dps: Arc<Provisioning>,
    hub: Arc<Hub>,
    limits: Arc<Limits>,
    budget: Arc<PacketBudget>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ConnectionError> {
    let deadline = tokio::time::Instant::now() + limits.handshake_timeout;
    // Memory per idle connection is what a connection keeps for its life, so every phase's state
    // is boxed and freed when the phase ends, and the TLS stream (a rustls connection, 1.2 KB) is
    // boxed once so the futures that carry it stay small.
    let tls = Box::new(
        Box::pin(tokio::time::timeout_at(deadline, acceptor.accept(WriteDeadline::new(tcp, limits.write_timeout))))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))??,
    );
    // An X.509 device's chain: who it is is decided by the DPS or hub session.
    let peer = crate::tls::peer_certificates(tls.get_ref().1);
    Box::pin(serve_until(tls, deadline, peer, Some(source), dps, hub, limits, budget, shutdown)).await
}

/// Serves one MQTT connection over an already established byte stream (TLS on the MQTT port,
/// a WebSocket on the HTTPS port): reads CONNECT within the handshake deadline and hands the
/// connection to the DPS or the hub session. `peer` is the client certificate chain of the TLS
/// connection underneath, if the client presented one; `source` the client's address.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    peer: Option<CertificateChain>,
    source: Option<IpAddr>,
    dps: Arc<Provisioning>,
    hub: Arc<Hub>,
    limits: Arc<Limits>,
    budget: Arc<PacketBudget>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ConnectionError> {
    let deadline = tokio::time::Instant::now() + limits.handshake_timeout;
    serve_until(stream, deadline, peer, source, dps, hub, limits, budget, shutdown).await
}

#[allow(clippy::too_many_arguments)]
async fn serve_until<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    deadline: tokio::time::Instant,
    peer: Option<CertificateChain>,
    source: Option<IpAddr>,
    dps: Arc<Provisioning>,
    hub: Arc<Hub>,
    limits: Arc<Limits>,
    budget: Arc<PacketBudget>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ConnectionError> {
    // Every packet still arriving, from CONNECT on, draws on the shared budget.
    let conn = Connection::new(stream, MAX_CONNECT_BYTES).with_budget(budget, limits.partial_packet_timeout);
    // Reading CONNECT is a phase of its own, boxed and freed before the session starts.
    let Some((conn, connect, route)) = Box::pin(read_connect(conn, deadline)).await? else { return Ok(()) };
    // Boxed: the two sessions are different futures, and a connection should only pay for the
    // one it runs.
    match route {
        Route::Dps(user) => Box::pin(dps_session::run(conn, connect, user, peer, source, dps, limits, shutdown)).await,
        Route::Hub(user) => Box::pin(hub_session::run(conn, connect, user, peer, source, hub, limits, shutdown)).await,
    }
}

/// Which session a CONNECT's username asks for.
enum Route {
    Dps(DpsUsername),
    Hub(HubUsername),
}

/// Reads CONNECT within the handshake deadline and tells which session it is for. `None` when
/// the connection was refused (and answered) or closed.
async fn read_connect<S: AsyncRead + AsyncWrite + Unpin>(
    mut conn: Connection<S>,
    deadline: tokio::time::Instant,
) -> Result<Option<(Connection<S>, Connect, Route)>, ConnectionError> {
    let first = tokio::time::timeout_at(deadline, conn.read_packet())
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no CONNECT in time"))?;
    let connect = match first {
        // Azure IoT Hub and DPS speak MQTT 3.1.1 only.
        Ok(Some(Packet::Connect(c))) if c.protocol == Protocol::V4 => c,
        Ok(Some(Packet::Connect(_)))
        | Err(ConnectionError::Protocol(CodecError::InvalidProtocolLevel(_) | CodecError::InvalidProtocol)) => {
            info_limited!("refused MQTT CONNECT: protocol is not MQTT 3.1.1");
            conn.write_packet(Packet::ConnAck(ConnAck::new(ConnectReturnCode::RefusedProtocolVersion, false))).await?;
            return Ok(None);
        }
        Ok(Some(_)) | Ok(None) => return Ok(None), // MQTT: anything but CONNECT first closes the connection.
        Err(e) => return Err(e),
    };
    crate::listener::record_client_id(&connect.client_id);
    let username = connect.login.as_ref().map(|l| l.username.as_str()).unwrap_or_default();
    if let Some(user) = DpsUsername::parse(username) {
        return Ok(Some((conn, connect, Route::Dps(user))));
    }
    if let Some(user) = HubUsername::parse(username) {
        return Ok(Some((conn, connect, Route::Hub(user))));
    }
    info_limited!("refused MQTT CONNECT: neither a DPS nor a hub username");
    conn.write_packet(Packet::ConnAck(ConnAck::new(ConnectReturnCode::BadUserNamePassword, false))).await?;
    conn.shutdown().await;
    Ok(None)
}

/// When, on tokio's clock, a connection opened with credentials that stop being accepted at
/// `expires` (wall clock) must end.
pub(crate) fn deadline_of(expires: Timestamp) -> tokio::time::Instant {
    tokio::time::Instant::now() + time_left(expires, Timestamp::now())
}

/// How long from `now` until `expires` (zero once passed).
fn time_left(expires: Timestamp, now: Timestamp) -> std::time::Duration {
    let ticks = expires.ticks().saturating_sub(now.ticks()).max(0);
    std::time::Duration::from_nanos(u64::try_from(ticks).unwrap_or(0).saturating_mul(100))
}

/// Untrusted text bounded and stripped of control characters, for logs.
pub(crate) fn printable(s: &str) -> String {
    s.chars().take(160).map(|c| if c.is_control() { '?' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn time_left_until_expiry() {
        let now = Timestamp::from_unix_seconds(1_000);
        assert_eq!(time_left(Timestamp::from_unix_seconds(1_003), now), Duration::from_secs(3));
        assert_eq!(time_left(Timestamp::from_ticks(now.ticks() + 5), now), Duration::from_nanos(500));
        assert_eq!(time_left(Timestamp::from_unix_seconds(999), now), Duration::ZERO, "already expired");
    }
}
