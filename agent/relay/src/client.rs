//! The SMTP client side of delivery: one transaction to one next hop.
//!
//! lettre speaks the protocol; the connection around it is ours, for two
//! reasons that both shrink the window in which a crash makes the restart
//! send a message again (issue 12):
//! - lettre's transport answers only after QUIT and its 221 (and with a
//!   next hop that stalls after the 250, only after the whole timeout),
//!   all that time with the message still queued as undelivered. Here
//!   `send` returns at the data's 250; QUIT goes out in the background.
//! - lettre writes the message and its final `.` as two writes on a socket
//!   without TCP_NODELAY: the `.` waits in our kernel for the ACK of the
//!   first write, which the next hop delays (~40 ms here). A process killed
//!   meanwhile still has the kernel send that `.`, so the next hop accepts
//!   a message the relay never learns was accepted. Our sockets set
//!   TCP_NODELAY. (Measured against smtp-sink under the crash test's load:
//!   a delivery took 43-52 ms from attempt to 250, nearly all of it this
//!   stall; a client writing the same two pieces waited 41-44 ms for the
//!   250, one piece 0.0 ms. In the same test time, 43-70 messages now reach
//!   the sink before the kill where 16 did.)

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use lettre::transport::smtp::authentication::{Credentials, DEFAULT_MECHANISMS};
use lettre::transport::smtp::client::{AsyncSmtpConnection, AsyncTokioStream, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// How to secure a hop.
#[derive(Clone)]
pub(crate) enum HopTls {
    None,
    /// STARTTLS if offered (MX delivery without MTA-STS/DANE).
    Opportunistic(TlsParameters),
    /// STARTTLS or fail.
    Required(TlsParameters),
    /// TLS from the first byte (port 465).
    Implicit {
        connector: tokio_rustls::TlsConnector,
        name: rustls_pki_types::ServerName<'static>,
    },
}

/// One next hop and how to talk to it.
#[derive(Clone)]
pub(crate) struct Transport {
    pub host: String,
    pub port: u16,
    pub tls: HopTls,
    pub hello: ClientId,
    pub credentials: Option<Credentials>,
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum HopError {
    /// TCP or implicit TLS could not be set up: worth the next MX.
    #[error("connecting to {host}:{port}: {source}")]
    Connect {
        host: String,
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Smtp(#[from] lettre::transport::smtp::Error),
}

/// A TLS stream lettre can drive (it wants its own stream trait).
#[derive(Debug)]
struct TlsHop(tokio_rustls::client::TlsStream<TcpStream>);

impl AsyncRead for TlsHop {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsHop {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl AsyncTokioStream for TlsHop {
    fn peer_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.get_ref().0.peer_addr()
    }
}

/// The client TLS config for an implicit-TLS hop: the web PKI roots, plus
/// `extra` (PEM) if given.
pub(crate) fn implicit_tls(
    host: &str,
    extra: Option<&[u8]>,
) -> Result<HopTls, Box<dyn std::error::Error + Send + Sync>> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = extra {
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(pem) {
            roots.add(c?)?;
        }
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(HopTls::Implicit {
        connector: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
        name: rustls_pki_types::ServerName::try_from(host.to_owned())?,
    })
}

impl Transport {
    async fn connect(&self) -> Result<Box<dyn AsyncTokioStream>, HopError> {
        let err = |source| HopError::Connect {
            host: self.host.clone(),
            port: self.port,
            source,
        };
        let mut last = None;
        for addr in tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(err)?
        {
            match tokio::time::timeout(self.timeout, TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => {
                    tcp.set_nodelay(true).map_err(err)?;
                    return Ok(match &self.tls {
                        HopTls::Implicit { connector, name } => Box::new(TlsHop(
                            connector.connect(name.clone(), tcp).await.map_err(err)?,
                        )),
                        _ => Box::new(tcp),
                    });
                }
                Ok(Err(e)) => last = Some(e),
                Err(_) => last = Some(std::io::ErrorKind::TimedOut.into()),
            }
        }
        Err(err(last.unwrap_or_else(|| {
            std::io::Error::other("name resolves to no address")
        })))
    }

    /// Connects, secures, authenticates and sends one transaction; Ok once
    /// the next hop has answered the data with 2xx.
    pub(crate) async fn send(
        &self,
        env: &lettre::address::Envelope,
        body: &[u8],
    ) -> Result<(), HopError> {
        let stream = self.connect().await?;
        let mut conn = AsyncSmtpConnection::connect_with_transport(stream, &self.hello).await?;
        match &self.tls {
            HopTls::Opportunistic(p) if conn.can_starttls() => {
                conn.starttls(p.clone(), &self.hello).await?;
            }
            HopTls::Required(p) => conn.starttls(p.clone(), &self.hello).await?,
            _ => {}
        }
        if let Some(c) = &self.credentials {
            conn.auth(DEFAULT_MECHANISMS, c).await?;
        }
        let sent = conn.send(env, body).await;
        // QUIT (and its 221) matters to nobody once the data is answered;
        // bounded, so a next hop that never answers cannot pile tasks up.
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), conn.abort()).await;
        });
        sent.map(|_| ()).map_err(HopError::from)
    }
}
