//! One device's DPS session over MQTT: CONNACK, SUBSCRIBE to the response filter, register and
//! operation-status requests, each answered on `$dps/registrations/res/...`.
//!
//! Order matters to the SDKs: SUBACK right after SUBSCRIBE and PUBACK for a request *before* its
//! response (C# fails otherwise); CONNACK never claims a stored session (C# aborts).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleetgate_core::sas::SasToken;
use fleetgate_core::throttle::retry_after_secs;
use fleetgate_core::time::Timestamp;
use fleetgate_core::x509::{Certificate, CertificateChain};
use fleetgate_core::{AzureError, ErrorCode};
use fleetgate_dps::answer::{self, Answer};
use fleetgate_dps::mqtt::{
    parse_request_topic, register_payload, response_topic, DpsRequest, DpsUsername, TopicError, RESPONSE_FILTER,
};
use fleetgate_dps::{DeviceAuth, Provisioning};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::QoS;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use super::{deadline_of, printable, Connection, ConnectionError};
use crate::config::Limits;
use fleetgate_metrics::info_limited;

/// Azure's cap on the keep-alive timeout (1.5 x keep-alive, at most 1767 s).
const MAX_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(1767);
/// How long a session whose credentials were refused stays open once its 401 answer is sent:
/// enough for the device to read it before the connection closes under it.
const REFUSED_GRACE: Duration = Duration::from_secs(1);

struct Session<S> {
    conn: Connection<S>,
    dps: Arc<Provisioning>,
    /// The device's authentication result, first decided at CONNECT and again before each
    /// request; a failure is reported on the request (as a 401 body the SDKs surface) rather
    /// than as a refused CONNACK. A check that could not be made is a 503, and a source turned
    /// away a 429: the SDKs retry both.
    auth: Result<DeviceAuth, AzureError>,
    /// The retry hint for `auth`'s error when it is not the usual one (a turned-away source is
    /// told when its backoff ends).
    auth_retry_after: Option<u32>,
    registration_id: String,
    /// The `api-version` of the CONNECT username, given to DPS with each request.
    api_version: Option<String>,
    /// What the device authenticated with, checked again before each request (see
    /// [`Session::authenticated`]).
    credentials: Credentials,
    next_packet_id: u16,
    /// Requests refused for their credentials (401). Only those count towards closing the
    /// session: a throttled (429) or otherwise refused request of an authenticated device is
    /// answered and the device told when to retry, on the same connection.
    failed_auth: u32,
    limits: Arc<Limits>,
    /// When a session that failed to authenticate is closed, whatever it sends: it may not stay
    /// open on PINGREQs, holding a connection it has no right to.
    close_at: Option<tokio::time::Instant>,
}

/// A DPS CONNECT's credentials and origin.
struct Credentials {
    id_scope: String,
    password: Option<String>,
    peer: Option<CertificateChain>,
    source: Option<IpAddr>,
}

// What a session starts from: the connection, its CONNECT, who (username, certificate chain,
// address) and the shared state; grouping them would only move the list.
#[allow(clippy::too_many_arguments)]
pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    mut conn: Connection<S>,
    connect: Connect,
    user: DpsUsername,
    peer: Option<CertificateChain>,
    source: Option<IpAddr>,
    dps: Arc<Provisioning>,
    limits: Arc<Limits>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnectionError> {
    // The client id is the registration id in every SDK; a mismatch is a confused or hostile client.
    if !connect.client_id.is_empty() && !connect.client_id.eq_ignore_ascii_case(&user.registration_id) {
        info_limited!(registration_id = %printable(&user.registration_id), "refused DPS CONNECT: client id is not the registration id");
        conn.write_packet(Packet::ConnAck(ConnAck::new(ConnectReturnCode::BadClientId, false))).await?;
        return Ok(());
    }
    // The client id may be empty: the registration id names the client then.
    crate::listener::record_client_id(&user.registration_id);
    let password = connect.login.as_ref().map(|l| l.password.as_str()).filter(|p| !p.is_empty());
    // X.509 devices send no password: their TLS client certificate chain attests instead.
    // A source that failed authentication too often is not checked at all until its backoff
    // ends; its requests are answered 429 with the time left.
    let (auth, auth_retry_after) = match dps.audit().admit(source) {
        Ok(()) => {
            let checked = dps.authenticate(&user.id_scope, &user.registration_id, password, peer.as_ref(), source);
            (Box::pin(checked).await, None)
        }
        Err(wait) => (
            Err(AzureError::new(
                ErrorCode::Throttled,
                "Too many failed authentications from this address; retry later.",
            )),
            Some(retry_after_secs(wait)),
        ),
    };
    // An authenticated session ends when what it authenticated with would be refused, as a hub
    // session does: the SAS token's expiry (plus the skew a CONNECT allows), the certificate's
    // notAfter. A refused one is closed sooner (`Session::close_at`).
    let expires = auth.is_ok().then(|| credentials_expire(password, peer.as_ref())).flatten().map(deadline_of);
    conn.set_max_packet(limits.max_dps_packet_bytes);
    conn.write_packet(Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false))).await?;

    // Azure disconnects a client silent for 1.5x its keep-alive; keep-alive 0 (the C SDK) gets
    // the idle limit instead.
    let idle = match connect.keep_alive {
        0 => limits.idle_timeout,
        k => Duration::from_millis(u64::from(k) * 1500).min(MAX_KEEP_ALIVE_TIMEOUT),
    };
    let close_at = auth.is_err().then(|| tokio::time::Instant::now() + limits.unauthenticated_timeout);
    let mut session = Session {
        conn,
        dps,
        auth,
        auth_retry_after,
        registration_id: user.registration_id,
        api_version: user.api_version,
        credentials: Credentials { id_scope: user.id_scope, password: password.map(str::to_owned), peer, source },
        next_packet_id: 0,
        failed_auth: 0,
        limits,
        close_at,
    };
    loop {
        let close_at = session.close_at;
        let packet = tokio::select! {
            () = tokio::time::sleep_until(close_at.unwrap_or_else(tokio::time::Instant::now)), if close_at.is_some() => {
                tracing::debug!(registration_id = %printable(&session.registration_id), "closing a DPS session that failed to authenticate");
                break;
            }
            () = tokio::time::sleep_until(expires.unwrap_or_else(tokio::time::Instant::now)), if expires.is_some() => {
                tracing::info!(registration_id = %printable(&session.registration_id), "the device's credentials expired; closing");
                break;
            }
            r = tokio::time::timeout(idle, session.conn.read_packet()) => match r {
                Err(_) => {
                    tracing::debug!(registration_id = %printable(&session.registration_id), "DPS client idle past keep-alive");
                    break;
                }
                Ok(r) => r?,
            },
            _ = shutdown.changed() => break,
        };
        let Some(packet) = packet else { break };
        // The expiry may be due with packets still arriving (select! picks among ready branches
        // at random): no request is served once the credentials have expired.
        if expires.is_some_and(|e| tokio::time::Instant::now() >= e) {
            tracing::info!(registration_id = %printable(&session.registration_id), "the device's credentials expired; closing");
            break;
        }
        // Boxed: the session future then holds only what waiting for a packet needs.
        if !Box::pin(session.handle(packet)).await? {
            break;
        }
    }
    session.conn.shutdown().await;
    Ok(())
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Handles one packet; `false` ends the session.
    async fn handle(&mut self, packet: Packet) -> Result<bool, ConnectionError> {
        match packet {
            Packet::Subscribe(sub) => {
                // Only the documented filter is accepted; QoS 2 is granted as QoS 1.
                let codes = sub
                    .filters
                    .iter()
                    .map(|f| {
                        if f.path == RESPONSE_FILTER {
                            SubscribeReasonCode::Success(if f.qos == QoS::AtMostOnce {
                                QoS::AtMostOnce
                            } else {
                                QoS::AtLeastOnce
                            })
                        } else {
                            info_limited!(filter = %printable(&f.path), "refused DPS subscription");
                            SubscribeReasonCode::Failure
                        }
                    })
                    .collect();
                self.conn.write_packet(Packet::SubAck(SubAck::new(sub.pkid, codes))).await?;
                Ok(true)
            }
            Packet::Unsubscribe(u) => {
                self.conn.write_packet(Packet::UnsubAck(UnsubAck::new(u.pkid))).await?;
                Ok(true)
            }
            Packet::Publish(p) => self.on_publish(p).await,
            Packet::PingReq => {
                self.conn.write_packet(Packet::PingResp).await?;
                Ok(true)
            }
            // Acknowledgements of our responses: nothing is retained, so nothing to release.
            Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) => Ok(true),
            Packet::Disconnect => Ok(false),
            other => {
                info_limited!(packet = ?std::mem::discriminant(&other), "unexpected packet in DPS session; closing");
                Ok(false)
            }
        }
    }

    async fn on_publish(&mut self, p: Publish) -> Result<bool, ConnectionError> {
        if p.qos == QoS::ExactlyOnce {
            info_limited!("QoS 2 publish refused; closing");
            return Ok(false);
        }
        let request = match parse_request_topic(&p.topic) {
            Ok(r) => r,
            Err(TopicError::Unknown) => {
                // Azure closes the connection on a topic it does not serve.
                info_limited!(topic = %printable(&p.topic), "publish to an unknown DPS topic; closing");
                return Ok(false);
            }
            Err(TopicError::MissingParameter(name)) => {
                info_limited!(topic = %printable(&p.topic), parameter = name, "DPS request without a required parameter; closing");
                return Ok(false);
            }
            // A rid that cannot be echoed as it is, or a wildcard in the topic: a protocol
            // violation, answered as Azure answers one, by closing the connection.
            Err(TopicError::Malformed) => {
                tracing::info!(topic = %printable(&p.topic), "DPS request with a wildcard topic or an unusable $rid; closing");
                return Ok(false);
            }
        };
        // The PUBACK goes out with the response, ahead of it as the SDKs need: one TLS record
        // and one write instead of two.
        if p.qos == QoS::AtLeastOnce {
            self.conn.queue_packet(Packet::PubAck(PubAck::new(p.pkid)))?;
        }
        let (rid, status, retry_after, body) = match request {
            DpsRequest::Register { rid } => {
                let (status, retry, body) = self.register(&p.payload).await;
                (rid, status, retry, body)
            }
            DpsRequest::OperationStatus { rid, operation_id } => {
                let (status, retry, body) = self.operation_status(&operation_id).await;
                (rid, status, retry, body)
            }
        };
        if status == 401 {
            self.failed_auth += 1;
        }
        self.respond(status, &rid, retry_after, body).await?;
        if self.auth.is_err() {
            let grace = tokio::time::Instant::now() + REFUSED_GRACE;
            self.close_at = Some(self.close_at.map_or(grace, |at| at.min(grace)));
        }
        Ok(self.failed_auth < self.limits.max_failed_requests)
    }

    /// The answer to any request of a session whose CONNECT was not let in.
    fn auth_error(&self, e: &AzureError) -> (u16, Option<u32>, Value) {
        let (status, retry_after, body) = error(e);
        (status, self.auth_retry_after.or(retry_after), body)
    }

    /// The device's authentication for a request. Checked again each time, as DPS over HTTPS
    /// checks every request: a token's expiry is the signer's choice, so what ends a session
    /// opened with a withdrawn key or certificate (group keys replaced, enrollment deleted or
    /// given other credentials) is this check. A CONNECT refused or turned away stays so; one
    /// the store could not check is checked again.
    async fn authenticated(&mut self) -> Result<DeviceAuth, (u16, Option<u32>, Value)> {
        if let Err(e) = &self.auth {
            if e.status() != 503 {
                return Err(self.auth_error(e));
            }
        }
        let c = &self.credentials;
        let checked = self
            .dps
            .authenticate(&c.id_scope, &self.registration_id, c.password.as_deref(), c.peer.as_ref(), c.source)
            .await;
        match checked {
            Ok(a) => {
                self.auth = Ok(a.clone());
                Ok(a)
            }
            Err(e) => {
                let answer = error(&e);
                if e.status() != 503 {
                    // Withdrawn: every later request of this connection is refused without a check.
                    self.auth = Err(e);
                }
                Err(answer)
            }
        }
    }

    async fn register(&mut self, payload: &Bytes) -> (u16, Option<u32>, Value) {
        let mut auth = match self.authenticated().await {
            Ok(a) => a,
            Err(answer) => return answer,
        };
        auth.api_version = self.api_version.clone();
        let payload = match register_payload(payload) {
            Ok(p) => p,
            Err(why) => return error(&AzureError::bad_request(why)),
        };
        answered(answer::register(&self.dps, &auth, payload).await)
    }

    async fn operation_status(&mut self, operation_id: &str) -> (u16, Option<u32>, Value) {
        let auth = match self.authenticated().await {
            Ok(a) => a,
            Err(answer) => return answer,
        };
        answered(answer::operation_status(&self.dps, &auth, operation_id).await)
    }

    async fn respond(
        &mut self,
        status: u16,
        rid: &str,
        retry_after: Option<u32>,
        body: Value,
    ) -> Result<(), ConnectionError> {
        self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
        let mut publish = Publish::new(response_topic(status, rid, retry_after), QoS::AtLeastOnce, body.to_string());
        publish.pkid = self.next_packet_id;
        self.conn.write_packet(Packet::Publish(publish)).await
    }
}

/// When the credentials a device authenticated with stop being accepted: its SAS token's, or
/// else its client certificate's.
fn credentials_expire(password: Option<&str>, peer: Option<&CertificateChain>) -> Option<Timestamp> {
    let last_second = match password {
        Some(p) => SasToken::parse(p).ok()?.accepted_until(),
        None => Certificate::from_der(peer?.leaf()).ok()?.validity().1,
    };
    Some(Timestamp::from_unix_seconds(last_second.saturating_add(1)))
}

fn answered(a: Result<Answer, AzureError>) -> (u16, Option<u32>, Value) {
    match a {
        Ok(a) => (a.status, a.retry_after, a.body),
        Err(e) => error(&e),
    }
}

/// An error answer: status from the error, Azure's error body. 429 and 5xx carry a retry-after.
fn error(e: &AzureError) -> (u16, Option<u32>, Value) {
    (e.status(), answer::error_retry_after(e), e.to_body(&uuid::Uuid::new_v4().to_string(), Timestamp::now()))
}
