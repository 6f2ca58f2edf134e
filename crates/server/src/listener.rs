//! What both listeners do the same way: accept until shutdown, at most `max` connections at once
//! (more wait in the kernel's backlog), one task each, then wait for them to finish.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

/// How long a shutdown waits for in-flight work (registrations, appends, open sessions closing).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What an accepted connection holds until it ends: its place under the connection limit and
/// in the open-connections gauge.
pub(crate) struct Admission {
    _permit: OwnedSemaphorePermit,
    _counted: fleetgate_metrics::ConnectionGuard,
}

pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    name: &'static str,
    max: usize,
    mut shutdown: watch::Receiver<bool>,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, Admission) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(max));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
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
        let _ = tcp.set_nodelay(true);
        let admission = Admission { _permit: permit, _counted: fleetgate_metrics::METRICS.connection(name) };
        // Spawned as it is: wrapping it in another async block would store it twice.
        tokio::spawn(handle(tcp, peer, admission));
    }
    drain(&permits, max, name).await;
}

/// After a listener stops accepting: waits until every connection it admitted has finished (each
/// holds one of `total` permits), at most [`SHUTDOWN_GRACE`].
async fn drain(permits: &Semaphore, total: usize, listener: &str) {
    let all = u32::try_from(total).unwrap_or(u32::MAX);
    match tokio::time::timeout(SHUTDOWN_GRACE, permits.acquire_many(all)).await {
        Ok(_) => tracing::info!(listener, "all connections closed"),
        Err(_) => tracing::warn!(
            listener,
            in_flight = total - permits.available_permits(),
            "shutdown grace expired; closing the rest"
        ),
    }
}
