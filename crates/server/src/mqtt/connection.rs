//! MQTT 3.1.1 framing over any byte stream, using rumqttc's packet codec.
//!
//! Like mini-redis's `Connection`: a read buffer that is parsed only once a whole packet is in
//! it; a clean EOF between packets is `None`, EOF inside a packet is an error.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
    #[error("partial packets of all connections are at their memory budget")]
    OverBudget,
    #[error("a large packet did not arrive in time")]
    SlowPacket,
}

/// Bytes that packets still arriving hold, across all connections: without a bound, thousands of
/// connections each holding most of a large packet exhaust memory while sending nothing more.
/// Each connection's first [`KEEP_BYTES`] are not counted: every connection holds those anyway.
#[derive(Debug)]
pub struct PacketBudget {
    limit: usize,
    held: AtomicUsize,
}

impl PacketBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self { limit, held: AtomicUsize::new(0) })
    }

    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    fn try_take(&self, n: usize) -> bool {
        self.held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| h.checked_add(n).filter(|t| *t <= self.limit))
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        self.held.fetch_sub(n, Ordering::Relaxed);
    }
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
    budget: Arc<PacketBudget>,
    /// What `read_buf` holds of `budget`.
    charged: usize,
    /// Time allowed for a packet from when it outgrows [`KEEP_BYTES`] to its last byte.
    large_packet_timeout: Duration,
    /// When the packet being read outgrew [`KEEP_BYTES`].
    large_since: Option<tokio::time::Instant>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub fn new(stream: S, max_packet: usize) -> Self {
        // Small to start: most of a device's packets are small, and an idle connection should
        // cost little. Buffers grow for a large packet and are given back after it.
        Self {
            stream,
            read_buf: BytesMut::with_capacity(READ_CHUNK),
            write_buf: BytesMut::new(),
            max_packet,
            budget: PacketBudget::new(usize::MAX),
            charged: 0,
            large_packet_timeout: Duration::MAX,
            large_since: None,
        }
    }

    /// Bounds the packets still arriving: their memory by `budget` (shared by all connections),
    /// a large one's time by `timeout`.
    pub fn with_budget(mut self, budget: Arc<PacketBudget>, timeout: Duration) -> Self {
        self.budget.give_back(self.charged);
        self.charged = 0;
        self.budget = budget;
        self.large_packet_timeout = timeout;
        self
    }

    /// Brings what `read_buf` holds of the budget in line with its capacity; an error when the
    /// budget has no room for its growth.
    fn charge(&mut self) -> Result<(), ConnectionError> {
        let want = self.read_buf.capacity().saturating_sub(KEEP_BYTES);
        if want > self.charged {
            if !self.budget.try_take(want - self.charged) {
                return Err(ConnectionError::OverBudget);
            }
        } else {
            self.budget.give_back(self.charged - want);
        }
        self.charged = want;
        Ok(())
    }

    pub fn set_max_packet(&mut self, max_packet: usize) {
        self.max_packet = max_packet;
    }

    /// The next whole packet, or `None` on a clean EOF.
    pub async fn read_packet(&mut self) -> Result<Option<Packet>, ConnectionError> {
        loop {
            if !self.read_buf.is_empty() {
                match Packet::read(&mut self.read_buf, self.max_packet) {
                    Ok(p) => {
                        self.large_since = None;
                        return Ok(Some(p));
                    }
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
            self.charge()?;
            // A large packet has a deadline from when it became large: memory the budget lends
            // is not held for as long as a keep-alive allows.
            let deadline = if self.read_buf.len() > KEEP_BYTES {
                let since = *self.large_since.get_or_insert_with(tokio::time::Instant::now);
                since.checked_add(self.large_packet_timeout)
            } else {
                None
            };
            let read = self.stream.read_buf(&mut self.read_buf);
            let n = match deadline {
                Some(d) => tokio::time::timeout_at(d, read).await.map_err(|_| ConnectionError::SlowPacket)??,
                None => read.await?,
            };
            if n == 0 {
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

impl<S> Drop for Connection<S> {
    fn drop(&mut self) {
        self.budget.give_back(self.charged);
    }
}
