//! What both listeners do the same way: accept until shutdown, one task per connection, then wait
//! for them to finish. Both listeners share one [`Gate`]: at most `max_connections` at once (more
//! wait in the kernel's backlog) and at most `max_connections_per_source` from one address.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

/// How long a shutdown waits for in-flight work (registrations, appends, open sessions closing).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The admission rules of both listeners: file descriptors are a per-process resource, so the
/// cap is too.
pub(crate) struct Gate {
    permits: Arc<Semaphore>,
    total: usize,
    /// 0: no cap per source.
    per_source: usize,
    /// Whether loopback clients are capped too (normally not: see [`source_key`]).
    cap_loopback: bool,
    /// Open connections per source key ([`source_key`]); an entry goes when its count is 0. The
    /// lock is held for a map update only, never across an await.
    sources: Mutex<HashMap<IpAddr, usize>>,
}

impl Gate {
    pub(crate) fn new(total: usize, per_source: usize, cap_loopback: bool) -> Arc<Self> {
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(total)),
            total,
            per_source,
            cap_loopback,
            sources: Mutex::default(),
        })
    }

    /// Counts a connection from `peer` against its source's cap; `None` when the source is at it.
    fn admit_source(self: &Arc<Self>, peer: IpAddr) -> Option<Option<SourceSlot>> {
        let Some(key) = source_key(peer, self.cap_loopback).filter(|_| self.per_source > 0) else {
            return Some(None);
        };
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let open = sources.entry(key).or_insert(0);
        if *open >= self.per_source {
            return None;
        }
        *open += 1;
        Some(Some(SourceSlot { gate: self.clone(), key }))
    }

    fn release_source(&self, key: IpAddr) {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(open) = sources.get_mut(&key) {
            *open -= 1;
            if *open == 0 {
                sources.remove(&key);
            }
        }
    }
}

/// What a per-source cap counts `peer` as: IPv4 addresses one by one, IPv6 by /64 (one host,
/// or one attacker, usually holds a whole /64). `None` for loopback unless `cap_loopback`: local
/// clients (and a local TCP proxy, which makes every device look like one client) are not capped.
pub(crate) fn source_key(peer: IpAddr, cap_loopback: bool) -> Option<IpAddr> {
    let peer = peer.to_canonical();
    if peer.is_loopback() && !cap_loopback {
        return None;
    }
    Some(match peer {
        IpAddr::V4(_) => peer,
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
    })
}

/// A connection's place under its source's cap.
struct SourceSlot {
    gate: Arc<Gate>,
    key: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        self.gate.release_source(self.key);
    }
}

/// What an accepted connection holds until it ends: its place under the connection caps and in
/// the open-connections gauge.
pub(crate) struct Admission {
    _permit: OwnedSemaphorePermit,
    _source: Option<SourceSlot>,
    _counted: fleetgate_metrics::ConnectionGuard,
}

pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    name: &'static str,
    gate: Arc<Gate>,
    mut shutdown: watch::Receiver<bool>,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, Admission) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let permit = tokio::select! {
            p = gate.permits.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = shutdown.changed() => break,
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly instead of spinning.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        // Over its source's cap: closed at once, before any TLS work is spent on it.
        let Some(source) = gate.admit_source(peer.ip()) else {
            tracing::debug!(listener = name, %peer, "refused a connection: its source address is at its cap");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let admission =
            Admission { _permit: permit, _source: source, _counted: fleetgate_metrics::METRICS.connection(name) };
        // Spawned as it is (instrumenting wraps it, it does not store it twice), inside the
        // connection's span so every line it logs tells which connection it is about.
        tokio::spawn(handle(tcp, peer, admission).instrument(connection_span(name, Some(peer))));
    }
    drain(&gate, name).await;
}

/// The span a connection's work runs in: each line logged inside it carries the client's address,
/// the protocol and, once [`record_client_id`] has named it, the client. A root span, so an
/// upgraded WebSocket's span is not nested in (and does not repeat) its HTTPS connection's.
pub(crate) fn connection_span(protocol: &'static str, peer: Option<SocketAddr>) -> tracing::Span {
    tracing::info_span!(
        parent: None,
        "connection",
        remote_addr = peer.map(tracing::field::display),
        protocol,
        client_id = tracing::field::Empty
    )
}

/// Names the client in the current connection's span. The id is the client's own, unchecked
/// before authentication: bounded and stripped of control characters, like any untrusted text
/// that reaches the logs.
pub(crate) fn record_client_id(id: &str) {
    let id: String = id.chars().take(128).map(|c| if c.is_control() { '?' } else { c }).collect();
    tracing::Span::current().record("client_id", tracing::field::display(id));
}

/// After a listener stops accepting: waits until every admitted connection has finished (each
/// holds one of the gate's permits), at most [`SHUTDOWN_GRACE`].
async fn drain(gate: &Gate, listener: &str) {
    let all = u32::try_from(gate.total).unwrap_or(u32::MAX);
    match tokio::time::timeout(SHUTDOWN_GRACE, gate.permits.acquire_many(all)).await {
        Ok(_) => tracing::info!(listener, "all connections closed"),
        Err(_) => tracing::warn!(
            listener,
            in_flight = gate.total - gate.permits.available_permits(),
            "shutdown grace expired; closing the rest"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_addresses_and_ipv6_prefixes() {
        let v4: IpAddr = "203.0.113.7".parse().unwrap();
        assert_eq!(source_key(v4, false), Some(v4));
        // An IPv4 client on a dual-stack socket counts as its IPv4 address.
        assert_eq!(source_key("::ffff:203.0.113.7".parse().unwrap(), false), Some(v4));
        let key = |s: &str| source_key(s.parse().unwrap(), false);
        let a = key("2001:db8:1:2:aaaa::1");
        assert_eq!(a, key("2001:db8:1:2:ffff:1:2:3"));
        assert_eq!(a, Some("2001:db8:1:2::".parse().unwrap()));
        assert_ne!(a, key("2001:db8:1:3::1"));
        for local in ["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"] {
            assert_eq!(key(local), None, "{local}");
            assert!(source_key(local.parse().unwrap(), true).is_some(), "{local} when loopback is capped");
        }
    }

    #[test]
    fn a_source_at_its_cap_is_refused_until_one_closes() {
        let gate = Gate::new(100, 2, false);
        let peer: IpAddr = "198.51.100.1".parse().unwrap();
        let a = gate.admit_source(peer).unwrap();
        let b = gate.admit_source(peer).unwrap();
        assert!(gate.admit_source(peer).is_none());
        // Another source is not affected; loopback is never capped.
        assert!(gate.admit_source("198.51.100.2".parse().unwrap()).unwrap().is_some());
        for _ in 0..5 {
            assert!(gate.admit_source("127.0.0.1".parse().unwrap()).unwrap().is_none());
        }
        drop(a);
        let c = gate.admit_source(peer).unwrap();
        drop((b, c));
        assert!(gate.sources.lock().unwrap().is_empty(), "closed sources are forgotten");
    }

    #[test]
    fn no_cap_per_source_when_zero() {
        let gate = Gate::new(100, 0, true);
        let peer: IpAddr = "198.51.100.1".parse().unwrap();
        for _ in 0..10 {
            assert!(gate.admit_source(peer).unwrap().is_none());
        }
    }
}
