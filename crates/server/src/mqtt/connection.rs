//! MQTT 3.1.1 framing over any byte stream, using rumqttc's packet codec.
//!
//! Like mini-redis's `Connection`: a read buffer that is parsed only once a whole packet is in
//! it; a clean EOF between packets is `None`, EOF inside a packet is an error.

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::Error as CodecError;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed MQTT packet: {0:?}")]
    Protocol(CodecError),
    #[error("connection closed in the middle of a packet")]
    TruncatedPacket,
}

/// How much is read at a time.
const READ_CHUNK: usize = 1024;
/// Buffers larger than this (after a big packet) are released once empty: what an idle
/// connection holds is paid per connection.
const KEEP_BYTES: usize = 2 * READ_CHUNK;

pub struct Connection<S> {
    stream: S,
    read_buf: BytesMut,
    write_buf: BytesMut,
    max_packet: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub fn new(stream: S, max_packet: usize) -> Self {
        // Small to start: most of a device's packets are small, and an idle connection should
        // cost little. Buffers grow for a large packet and are given back after it.
        Self { stream, read_buf: BytesMut::with_capacity(READ_CHUNK), write_buf: BytesMut::new(), max_packet }
    }

    pub fn set_max_packet(&mut self, max_packet: usize) {
        self.max_packet = max_packet;
    }

    /// The next whole packet, or `None` on a clean EOF.
    pub async fn read_packet(&mut self) -> Result<Option<Packet>, ConnectionError> {
        loop {
            if !self.read_buf.is_empty() {
                match Packet::read(&mut self.read_buf, self.max_packet) {
                    Ok(p) => return Ok(Some(p)),
                    Err(CodecError::InsufficientBytes(_)) => {}
                    Err(e) => return Err(ConnectionError::Protocol(e)),
                }
            }
            if self.read_buf.is_empty() && self.read_buf.capacity() > KEEP_BYTES {
                self.read_buf = BytesMut::with_capacity(READ_CHUNK);
            }
            if self.read_buf.capacity() - self.read_buf.len() < READ_CHUNK / 2 {
                self.read_buf.reserve(READ_CHUNK);
            }
            if self.stream.read_buf(&mut self.read_buf).await? == 0 {
                return if self.read_buf.is_empty() { Ok(None) } else { Err(ConnectionError::TruncatedPacket) };
            }
        }
    }

    pub async fn write_packet(&mut self, packet: Packet) -> Result<(), ConnectionError> {
        self.queue_packet(packet)?;
        self.flush().await
    }

    /// Encodes a packet to be sent with the next [`Connection::flush`]: packets that answer one
    /// request together (a PUBACK and its response) then share one TLS record and one write.
    pub fn queue_packet(&mut self, packet: Packet) -> Result<(), ConnectionError> {
        packet.write(&mut self.write_buf, usize::MAX).map_err(ConnectionError::Protocol)?;
        Ok(())
    }

    /// Sends what is queued.
    pub async fn flush(&mut self) -> Result<(), ConnectionError> {
        if !self.write_buf.is_empty() {
            self.stream.write_all(&self.write_buf).await?;
            self.write_buf.clear();
        }
        self.stream.flush().await?;
        if self.write_buf.capacity() > KEEP_BYTES {
            self.write_buf = BytesMut::new();
        }
        Ok(())
    }

    pub async fn shutdown(&mut self) {
        let _ = self.stream.shutdown().await;
    }
}
