//! A connection whose writes must make progress. A peer that stops reading (a "slow read": it
//! asks for answers and never takes them) fills the socket's buffers, and every write then waits
//! for it for good, holding the connection, its task and whatever it was sending. Here a write,
//! flush or shutdown that has made no progress for `timeout` fails with `TimedOut`, which ends
//! the connection like any other I/O error. Below TLS, so both listeners and every phase
//! (handshake, HTTP, MQTT, WebSocket) are covered by one rule.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

pub(crate) struct WriteDeadline<S> {
    inner: S,
    timeout: Duration,
    /// Allocated at the first write that has to wait, then reset and kept: most connections
    /// never wait to write, and those that do, do so again.
    stall: Option<Pin<Box<Sleep>>>,
    /// Whether `stall` is timing a wait now (false once a write got through).
    waiting: bool,
}

impl<S> WriteDeadline<S> {
    pub(crate) fn new(inner: S, timeout: Duration) -> Self {
        Self { inner, timeout, stall: None, waiting: false }
    }

    /// Passes on a write's outcome; a write that has to wait starts (or keeps) the stall timer,
    /// and fails once the timer has run out.
    fn guard<T>(&mut self, cx: &mut Context<'_>, outcome: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if outcome.is_ready() {
            self.waiting = false;
            return outcome;
        }
        let Some(deadline) = Instant::now().checked_add(self.timeout) else { return Poll::Pending };
        let stall = match &mut self.stall {
            Some(stall) => {
                if !self.waiting {
                    stall.as_mut().reset(deadline);
                }
                stall
            }
            None => self.stall.insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.waiting = true;
        if stall.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the peer stopped reading")));
        }
        Poll::Pending
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let outcome = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.guard(cx, outcome)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let outcome = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.guard(cx, outcome)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let outcome = Pin::new(&mut this.inner).poll_flush(cx);
        this.guard(cx, outcome)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let outcome = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.guard(cx, outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_write_the_peer_never_takes_fails_after_the_timeout() {
        let (a, _b) = tokio::io::duplex(1024);
        let mut w = WriteDeadline::new(a, Duration::from_millis(200));
        let started = Instant::now();
        let e = tokio::time::timeout(Duration::from_secs(10), w.write_all(&[0u8; 4096])).await.unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn a_slow_reader_that_keeps_reading_is_not_cut_off() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut w = WriteDeadline::new(a, Duration::from_secs(1));
        // The reader takes 1 KiB every 100 ms: each wait is far shorter than the timeout, their
        // sum longer.
        const TOTAL: usize = 24 * 1024;
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 1024];
            while got < TOTAL {
                tokio::time::sleep(Duration::from_millis(100)).await;
                got += b.read(&mut buf).await.unwrap();
            }
            got
        });
        w.write_all(&[0u8; TOTAL]).await.unwrap();
        w.flush().await.unwrap();
        assert_eq!(reader.await.unwrap(), TOTAL);
    }
}
