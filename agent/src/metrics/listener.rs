//! The metrics listener, with the limits hyper leaves off when it has no
//! timer: a cap on open connections, and timeouts for clients that send a
//! request slowly or hold a connection idle.
//!
//! Without them, anything that can reach the port (on Kubernetes the
//! DaemonSet listens on 0.0.0.0) could hold sockets open until the agent
//! runs out of file descriptors, which the relay and the datapath need.
//! Connections over the cap wait in the kernel's backlog, not in the agent.

use std::{
    future::Future as _,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    /// From the first byte of a request to the end of its response.
    pub request: Duration,
    /// Between requests on a kept-alive connection. Longer than any sane
    /// scrape interval, so Prometheus keeps reusing its connection.
    pub idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 32,
            request: Duration::from_secs(10),
            idle: Duration::from_secs(120),
        }
    }
}

pub struct Limited {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    limits: Limits,
}

impl Limited {
    pub fn new(inner: TcpListener, limits: Limits) -> Self {
        Self {
            inner,
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
        }
    }
}

impl axum::serve::Listener for Limited {
    type Io = Guarded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let Ok(permit) = self.permits.clone().acquire_owned().await else {
            unreachable!("the semaphore is never closed");
        };
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => return (Guarded::new(stream, permit, self.limits), addr),
                // The peer gave up before we got to it: nothing to do.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                    ) => {}
                // EMFILE and friends: log, and give the process time to
                // close something rather than spin.
                Err(e) => {
                    tracing::error!(error = %e, "metrics listener: accept");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A connection that fails with `TimedOut` when it makes no progress in
/// time, and gives its slot back when dropped.
pub struct Guarded {
    stream: TcpStream,
    deadline: Pin<Box<Sleep>>,
    limits: Limits,
    _permit: OwnedSemaphorePermit,
}

impl Guarded {
    fn new(stream: TcpStream, permit: OwnedSemaphorePermit, limits: Limits) -> Self {
        Self {
            stream,
            // The first request is due at once.
            deadline: Box::pin(tokio::time::sleep(limits.request)),
            limits,
            _permit: permit,
        }
    }

    fn extend(&mut self, by: Duration) {
        self.deadline.as_mut().reset(Instant::now() + by);
    }

    /// For a pending read or write: has the deadline passed?
    fn expired(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                "metrics connection timed out",
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(r) => {
                // Bytes of a request: it must now be completed and answered
                // within the request timeout.
                if buf.filled().len() > before {
                    this.extend(this.limits.request);
                }
                Poll::Ready(r)
            }
            Poll::Pending => this.expired(cx).map(Err),
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.stream).poll_write(cx, data) {
            Poll::Ready(r) => {
                // A response went out: the connection is idle until the
                // next request.
                this.extend(this.limits.idle);
                Poll::Ready(r)
            }
            Poll::Pending => this.expired(cx).map(Err),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.stream).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                this.extend(this.limits.idle);
                Poll::Ready(r)
            }
            Poll::Pending => this.expired(cx).map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
