//! MQTT over WebSockets on the HTTPS port, as the SDKs' `websockets` options use it: an upgrade
//! at `/$iothub/websocket` (Python, Node, C) or at `/` (C#, Java), subprotocol `mqtt` or `MQTT`
//! (C) echoed exactly as offered. After the upgrade the connection is served by the very same
//! MQTT code as the MQTT port ([`crate::mqtt::serve_stream`]), through [`WsStream`], which turns
//! binary WebSocket messages into a byte stream: an MQTT packet may span several messages and
//! one message may hold several packets, so message boundaries mean nothing.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::{Buf, Bytes};
use fleetgate_core::x509::CertificateChain;
use fleetgate_core::{AzureError, ErrorCode};
use fleetgate_dps::Provisioning;
use fleetgate_hub::Hub;
use fleetgate_rest::ApiError;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tracing::Instrument;

use crate::config::Limits;
use fleetgate_metrics::info_limited;

/// The WebSocket subprotocols MQTT clients offer; whichever was offered is echoed.
pub const SUBPROTOCOLS: [&str; 2] = ["mqtt", "MQTT"];
/// Paths of the upgrade: Python, Node and C use the first, C# and Java the root.
pub const PATHS: [&str; 2] = ["/$iothub/websocket", "/"];

/// The HTTPS connection's slot under the listener's connection cap, shared by the requests of
/// that connection; an upgraded WebSocket keeps it until the MQTT session ends.
#[derive(Clone)]
pub(crate) struct ConnectionPermit(#[allow(dead_code)] pub(crate) Arc<crate::listener::Admission>);

#[derive(Clone)]
struct WsState {
    dps: Arc<Provisioning>,
    hub: Arc<Hub>,
    limits: Arc<Limits>,
    budget: Arc<crate::mqtt::PacketBudget>,
    shutdown: watch::Receiver<bool>,
}

/// The upgrade routes, to be merged into the HTTPS app.
pub(crate) fn router(
    dps: Arc<Provisioning>,
    hub: Arc<Hub>,
    limits: Arc<Limits>,
    budget: Arc<crate::mqtt::PacketBudget>,
    shutdown: watch::Receiver<bool>,
) -> Router {
    let mut r = Router::new();
    for path in PATHS {
        r = r.route(path, get(upgrade));
    }
    r.method_not_allowed_fallback(|| async {
        ApiError(AzureError::new(ErrorCode::MethodNotAllowed, "Method not allowed."))
    })
    .with_state(WsState { dps, hub, limits, budget, shutdown })
}

/// The largest WebSocket message (and frame) accepted: one MQTT packet of the largest kind either
/// session accepts, with room for a few small packets sharing its message. The MQTT codec still
/// enforces each session's own packet limit.
fn max_message_bytes(limits: &Limits, hub: &Hub) -> usize {
    limits.max_dps_packet_bytes.max(hub.config().max_message_bytes + 16 * 1024) + 16 * 1024
}

fn bad_request(message: impl Into<String>) -> Response {
    ApiError(AzureError::new(ErrorCode::BadRequest, message)).into_response()
}

async fn upgrade(
    State(st): State<WsState>,
    permit: Option<Extension<ConnectionPermit>>,
    peer: Option<Extension<CertificateChain>>,
    source: Option<Extension<fleetgate_rest::ClientAddr>>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(r) => {
            tracing::debug!(reason = %r.body_text(), "refused WebSocket upgrade");
            return bad_request(format!("This endpoint serves MQTT over WebSockets only: {}", r.body_text()));
        }
    };
    let ws = ws.protocols(SUBPROTOCOLS);
    if ws.selected_protocol().is_none() {
        info_limited!("refused WebSocket upgrade: the client did not offer the mqtt subprotocol");
        return bad_request("MQTT over WebSockets requires the WebSocket subprotocol 'mqtt'.");
    }
    let max = max_message_bytes(&st.limits, &st.hub);
    // The upgraded connection runs in a task of its own, outside the HTTPS connection's span.
    let span = crate::listener::connection_span("wss", source.as_ref().map(|Extension(a)| a.0));
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_failed_upgrade(|e| tracing::debug!(error = %e, "WebSocket upgrade failed"))
        .on_upgrade(move |socket| {
            async move {
                let _permit = permit;
                // The HTTPS connection's client certificate chain, if the device presented one.
                let peer = peer.map(|Extension(c)| c);
                let source = source.map(|Extension(a)| a.0.ip());
                let stream = WsStream::new(socket);
                if let Err(e) =
                    crate::mqtt::serve_stream(stream, peer, source, st.dps, st.hub, st.limits, st.budget, st.shutdown)
                        .await
                {
                    tracing::debug!(error = %e, "MQTT over WebSocket ended with an error");
                }
            }
            .instrument(span)
        })
}

/// What the byte stream needs to know about a WebSocket message.
pub(crate) enum Frame {
    Binary(Bytes),
    Text,
    /// Ping or pong: answered by the WebSocket layer itself; carries no MQTT bytes.
    Control,
    Close,
}

/// A WebSocket message type the byte stream can carry MQTT in.
pub(crate) trait WsMessage: Sized {
    fn binary(data: Bytes) -> Self;
    fn close() -> Self;
    fn frame(self) -> Frame;
}

impl WsMessage for Message {
    fn binary(data: Bytes) -> Self {
        Message::Binary(data)
    }
    fn close() -> Self {
        Message::Close(None)
    }
    fn frame(self) -> Frame {
        match self {
            Message::Binary(b) => Frame::Binary(b),
            Message::Text(_) => Frame::Text,
            Message::Ping(_) | Message::Pong(_) => Frame::Control,
            Message::Close(_) => Frame::Close,
        }
    }
}

/// A WebSocket as a byte stream: reads are the concatenated payloads of binary messages (a close
/// message or the end of the socket is EOF; a text message is an error, MQTT is binary), each
/// write is sent as one binary message, and shutdown sends a close message.
pub(crate) struct WsStream<T> {
    inner: T,
    /// The unread rest of the last binary message.
    pending: Bytes,
    eof: bool,
    close_sent: bool,
}

impl<T> WsStream<T> {
    pub(crate) fn new(inner: T) -> Self {
        Self { inner, pending: Bytes::new(), eof: false, close_sent: false }
    }
}

fn io_error<E: Into<Box<dyn std::error::Error + Send + Sync>>>(e: E) -> io::Error {
    io::Error::other(e)
}

impl<T, M, E> AsyncRead for WsStream<T>
where
    T: Stream<Item = Result<M, E>> + Sink<M, Error = E> + Unpin,
    M: WsMessage,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(self.inner.poll_next_unpin(cx)) {
                None => self.eof = true,
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                Some(Ok(m)) => match m.frame() {
                    Frame::Binary(b) => self.pending = b,
                    Frame::Control => {}
                    Frame::Close => self.eof = true,
                    Frame::Text => {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "text WebSocket message: MQTT is carried in binary messages",
                        )))
                    }
                },
            }
        }
    }
}

impl<T, M, E> AsyncWrite for WsStream<T>
where
    T: Stream<Item = Result<M, E>> + Sink<M, Error = E> + Unpin,
    M: WsMessage,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.close_sent {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "WebSocket is closing")));
        }
        ready!(self.inner.poll_ready_unpin(cx)).map_err(io_error)?;
        self.inner.start_send_unpin(M::binary(Bytes::copy_from_slice(buf))).map_err(io_error)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_flush_unpin(cx).map_err(io_error)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.close_sent {
            ready!(self.inner.poll_ready_unpin(cx)).map_err(io_error)?;
            self.inner.start_send_unpin(M::close()).map_err(io_error)?;
            self.close_sent = true;
        }
        self.inner.poll_close_unpin(cx).map_err(io_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::{Connection, ConnectionError};
    use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Login, Packet, Publish};
    use rumqttc::mqttbytes::QoS;
    use tokio::io::DuplexStream;
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::Message as TMessage;
    use tokio_tungstenite::WebSocketStream;

    impl WsMessage for TMessage {
        fn binary(data: Bytes) -> Self {
            TMessage::Binary(data)
        }
        fn close() -> Self {
            TMessage::Close(None)
        }
        fn frame(self) -> Frame {
            match self {
                TMessage::Binary(b) => Frame::Binary(b),
                TMessage::Text(_) => Frame::Text,
                TMessage::Close(_) => Frame::Close,
                _ => Frame::Control,
            }
        }
    }

    type Server = Connection<WsStream<WebSocketStream<DuplexStream>>>;

    /// A server-side MQTT connection over a WebSocket, and the raw client end of that socket.
    async fn pair() -> (Server, WebSocketStream<DuplexStream>) {
        let (a, b) = tokio::io::duplex(256 * 1024);
        let server = WebSocketStream::from_raw_socket(a, Role::Server, None).await;
        let client = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
        (Connection::new(WsStream::new(server), 64 * 1024), client)
    }

    fn bytes_of(p: Packet) -> Vec<u8> {
        let mut b = bytes::BytesMut::new();
        p.write(&mut b, usize::MAX).unwrap();
        b.to_vec()
    }

    fn connect_packet() -> Packet {
        let mut c = Connect::new("dev-1");
        c.login = Some(Login::new("0ne00000001/registrations/dev-1/api-version=2019-03-31", "sas"));
        Packet::Connect(c)
    }

    #[tokio::test]
    async fn a_packet_split_over_several_messages_is_read_whole() {
        let (mut server, mut client) = pair().await;
        let bytes = bytes_of(connect_packet());
        for chunk in [&bytes[..1], &bytes[1..5], &bytes[5..]] {
            client.send(TMessage::binary(chunk.to_vec())).await.unwrap();
        }
        match server.read_packet().await.unwrap() {
            Some(Packet::Connect(c)) => assert_eq!(c.client_id, "dev-1"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn packets_sharing_one_message_are_read_one_by_one() {
        let (mut server, mut client) = pair().await;
        let mut bytes = bytes_of(connect_packet());
        bytes.extend(bytes_of(Packet::PingReq));
        let mut p = Publish::new("devices/dev-1/messages/events/", QoS::AtLeastOnce, b"hello".to_vec());
        p.pkid = 3;
        bytes.extend(bytes_of(Packet::Publish(p)));
        // The last packet's tail comes in the next message, after a ping the WebSocket answers.
        let (first, rest) = bytes.split_at(bytes.len() - 2);
        client.send(TMessage::binary(first.to_vec())).await.unwrap();
        client.send(TMessage::Ping(Bytes::from_static(b"hi"))).await.unwrap();
        client.send(TMessage::binary(rest.to_vec())).await.unwrap();
        assert!(matches!(server.read_packet().await.unwrap(), Some(Packet::Connect(_))));
        assert!(matches!(server.read_packet().await.unwrap(), Some(Packet::PingReq)));
        match server.read_packet().await.unwrap() {
            Some(Packet::Publish(p)) => assert_eq!((p.pkid, &p.payload[..]), (3, &b"hello"[..])),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn each_written_packet_is_one_binary_message() {
        let (mut server, mut client) = pair().await;
        let connack = Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false));
        server.write_packet(connack.clone()).await.unwrap();
        server.write_packet(Packet::PingResp).await.unwrap();
        assert_eq!(client.next().await.unwrap().unwrap(), TMessage::binary(bytes_of(connack)));
        assert_eq!(client.next().await.unwrap().unwrap(), TMessage::binary(bytes_of(Packet::PingResp)));
    }

    #[tokio::test]
    async fn a_close_message_between_packets_is_a_clean_end() {
        let (mut server, mut client) = pair().await;
        client.send(TMessage::binary(bytes_of(Packet::PingReq))).await.unwrap();
        client.send(TMessage::Close(None)).await.unwrap();
        assert!(matches!(server.read_packet().await.unwrap(), Some(Packet::PingReq)));
        assert!(server.read_packet().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_close_message_inside_a_packet_is_a_truncated_packet() {
        let (mut server, mut client) = pair().await;
        let bytes = bytes_of(connect_packet());
        client.send(TMessage::binary(bytes[..4].to_vec())).await.unwrap();
        client.send(TMessage::Close(None)).await.unwrap();
        assert!(matches!(server.read_packet().await, Err(ConnectionError::TruncatedPacket)));
    }

    #[tokio::test]
    async fn the_socket_ending_without_a_close_message_is_eof() {
        let (mut server, client) = pair().await;
        drop(client);
        match server.read_packet().await {
            Ok(None) | Err(ConnectionError::Io(_)) => {}
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn text_messages_are_refused() {
        let (mut server, mut client) = pair().await;
        client.send(TMessage::text("{\"hello\":1}")).await.unwrap();
        match server.read_packet().await {
            Err(ConnectionError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::InvalidData),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn shutdown_sends_a_close_message() {
        let (mut server, mut client) = pair().await;
        server.write_packet(Packet::PingResp).await.unwrap();
        server.shutdown().await;
        assert!(matches!(client.next().await.unwrap().unwrap(), TMessage::Binary(_)));
        assert!(matches!(client.next().await.unwrap().unwrap(), TMessage::Close(_)));
    }
}
