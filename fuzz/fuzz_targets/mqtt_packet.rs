//! MQTT framing: the bytes a device sends on port 8883 (or inside WebSocket messages), through
//! rumqttc's `Packet::read` as `server::mqtt::Connection::read_packet` uses it, then every string
//! a packet carries through the DPS and hub vocabulary the sessions apply to it.
//!
//! Invariants:
//! - `Packet::read` never panics; `InsufficientBytes` leaves the buffer untouched (the
//!   connection relies on it to wait for more bytes).
//! - `Connection::read_packet` yields the same packets and the same end (clean EOF, truncated
//!   packet, protocol error) however the bytes are split across reads.
//! - A packet that parsed and re-encodes parses back to itself.

#![no_main]

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use fleetgate_server::mqtt::{Connection, ConnectionError};
use libfuzzer_sys::fuzz_target;
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::Error as CodecError;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The server's limits: 8 KB for the CONNECT, then the hub's (256 KB + 16 KB) for the rest.
const MAX_CONNECT: usize = 8 * 1024;
const MAX_PACKET: usize = 256 * 1024 + 16 * 1024;

/// A device that sends `data` in reads of at most `chunk` bytes, and a sink for our writes.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let n = self.chunk.min(self.data.len()).min(buf.remaining());
        let (head, tail) = self.data.split_at(n);
        buf.put_slice(head);
        self.data = tail;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Chunked<'_> {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Every I/O here is ready at once, so the future completes on its first poll.
fn now<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("an in-memory read never pends"),
    }
}

#[derive(Debug, PartialEq)]
enum End {
    Eof,
    Truncated,
    Protocol(String),
}

/// Parses the whole input the simple way: everything is already in the buffer.
fn parse_whole(data: &[u8]) -> (Vec<Packet>, End) {
    let mut buf = BytesMut::from(data);
    let mut packets = Vec::new();
    loop {
        if buf.is_empty() {
            return (packets, End::Eof);
        }
        let max = if packets.is_empty() { MAX_CONNECT } else { MAX_PACKET };
        let before = buf.clone();
        match Packet::read(&mut buf, max) {
            Ok(p) => packets.push(p),
            Err(CodecError::InsufficientBytes(_)) => {
                assert_eq!(buf, before, "InsufficientBytes consumed input");
                return (packets, End::Truncated);
            }
            Err(e) => return (packets, End::Protocol(format!("{e:?}"))),
        }
    }
}

/// Parses through the server's `Connection`, the input arriving `chunk` bytes at a time.
fn parse_connection(data: &[u8], chunk: usize) -> (Vec<Packet>, End) {
    let mut conn = Connection::new(Chunked { data, chunk }, MAX_CONNECT);
    let mut packets = Vec::new();
    loop {
        match now(conn.read_packet()) {
            Ok(Some(p)) => {
                packets.push(p);
                conn.set_max_packet(MAX_PACKET);
            }
            Ok(None) => return (packets, End::Eof),
            Err(ConnectionError::TruncatedPacket) => return (packets, End::Truncated),
            Err(ConnectionError::Protocol(e)) => return (packets, End::Protocol(format!("{e:?}"))),
            Err(ConnectionError::Io(e)) => panic!("in-memory stream failed: {e}"),
            // This connection has no shared budget and no packet deadline.
            Err(e @ (ConnectionError::OverBudget | ConnectionError::SlowPacket)) => panic!("unexpected limit: {e}"),
        }
    }
}

/// What the sessions do with the strings in a packet (see server/src/mqtt/*.rs).
fn vocabulary(p: &Packet) {
    use fleetgate_core::message::Properties;
    use fleetgate_core::sas::SasToken;
    match p {
        Packet::Connect(c) => {
            let _ = fleetgate_core::ids::RegistrationId::parse(&c.client_id);
            if let Some(login) = &c.login {
                let _ = fleetgate_dps::mqtt::DpsUsername::parse(&login.username);
                let _ = fleetgate_hub::mqtt::HubUsername::parse(&login.username);
                let _ = SasToken::parse(&login.password);
            }
        }
        Packet::Publish(p) => {
            let _ = fleetgate_dps::mqtt::parse_request_topic(&p.topic);
            let _ = fleetgate_dps::mqtt::register_payload(&p.payload);
            if let Ok(fleetgate_hub::mqtt::DeviceRequest::Telemetry { bag }) =
                fleetgate_hub::mqtt::parse_publish_topic(&p.topic, "dev-001")
            {
                let _ = Properties::from_bag(&bag);
            }
            let _ = fleetgate_core::twin::parse_patch(&p.payload);
        }
        Packet::Subscribe(s) => {
            for f in &s.filters {
                let _ = fleetgate_hub::mqtt::subscription(&f.path, "dev-001");
            }
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let (packets, end) = parse_whole(data);
    // Split points from the input itself, so the fuzzer can steer them: 1 byte, 2 bytes, ...
    let chunk = 1 + data.first().map_or(0, |b| usize::from(*b % 16));
    for c in [chunk, 4096] {
        let (via_conn, conn_end) = parse_connection(data, c);
        assert_eq!(via_conn, packets, "chunk {c}: different packets");
        assert_eq!(conn_end, end, "chunk {c}: different end");
    }
    for p in &packets {
        vocabulary(p);
        let mut out = BytesMut::new();
        if p.write(&mut out, usize::MAX).is_ok() {
            let again = Packet::read(&mut out, usize::MAX).expect("a packet we encoded parses");
            assert_eq!(&again, p, "re-encoded packet parses differently");
            assert!(out.is_empty(), "re-encoded packet has trailing bytes");
        }
    }
});
