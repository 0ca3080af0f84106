//! The SMTP client side of delivery: one session with one address of a next
//! hop (the smarthost or an MX host), reporting what it said about each
//! recipient as typed results, never as text to be parsed.
//!
//! lettre speaks the protocol, command by command; the connection and the
//! transaction around it are ours:
//! - Every socket is made here, so it can carry the delivery mark
//!   (`Outbound::mark`) before connect(): the agent's datapath lets exactly
//!   those sockets out on port 25.
//! - RCPT is sent per recipient and each reply kept, so one refused
//!   recipient is bounced (5xx) or retried (4xx) on its own while the others
//!   are delivered in the same transaction (lettre's `send` gives up the
//!   whole transaction at the first refusal).
//! - `send` returns at the data's 250; QUIT goes out in the background.
//!   lettre's transport answers only after QUIT and its 221, all that time
//!   with the message still queued as undelivered, which widens the window
//!   in which a crash sends it twice (issue 12).
//! - lettre writes the message and its final `.` as two writes: on a socket
//!   without TCP_NODELAY the `.` waits in our kernel for the ACK of the
//!   first write, which the next hop delays (~40 ms here). A process killed
//!   meanwhile still has the kernel send that `.`, so the next hop accepts a
//!   message the relay never learns was accepted. Our sockets set
//!   TCP_NODELAY. (Measured against smtp-sink under the crash test's load:
//!   a delivery took 43-52 ms from attempt to 250, nearly all of it this
//!   stall; a client writing the same two pieces waited 41-44 ms for the
//!   250, one piece 0.0 ms.)

use std::collections::HashSet;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use lettre::transport::smtp::authentication::{Credentials, DEFAULT_MECHANISMS};
use lettre::transport::smtp::client::{AsyncSmtpConnection, AsyncTokioStream, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How to secure a hop.
#[derive(Clone)]
pub(crate) enum HopTls {
    None,
    /// MX, `mx_tls = "opportunistic"`: STARTTLS whenever offered. A
    /// certificate that does not verify: reconnect and use TLS without
    /// verifying it (encrypted, so a passive listener learns nothing; an
    /// active attacker could strip STARTTLS anyway, so refusing such a
    /// certificate would protect against no one). Any other TLS failure:
    /// reconnect in plaintext, as Postfix's `may` does.
    Opportunistic,
    /// MX, `mx_tls = "verify"`: STARTTLS with a certificate that verifies
    /// for the MX host name, or no delivery over this hop.
    Verify,
    /// Smarthost: STARTTLS with these parameters (its CA), or no delivery.
    Required(TlsParameters),
    /// Smarthost: TLS from the first byte (port 465).
    Implicit {
        connector: tokio_rustls::TlsConnector,
        name: rustls_pki_types::ServerName<'static>,
    },
}

/// What a session's TLS turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsUsed {
    None,
    Verified,
    /// Opportunistic TLS with a certificate that did not verify.
    Unverified,
}

/// One next hop and how to talk to it.
#[derive(Clone)]
pub(crate) struct Transport {
    /// The name the hop is known by: certificate checks and logs.
    pub host: String,
    pub port: u16,
    pub tls: HopTls,
    pub credentials: Option<Credentials>,
}

/// What every outbound connection of one relay shares.
pub(crate) struct Outbound {
    pub hello: ClientId,
    /// SO_MARK for every delivery socket (see `RelayConfig::delivery_mark`).
    pub mark: Option<u32>,
    /// For connect() and for each command's reply.
    pub timeout: Duration,
    /// Mark failures already logged: a missing CAP_NET_ADMIN fails every
    /// attempt the same way, and one log line says it.
    mark_errors_logged: Mutex<HashSet<String>>,
}

/// The SMTP step a session was at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// The greeting and our EHLO (lettre reads the one and sends the other
    /// in one call).
    Greeting,
    Starttls,
    Auth,
    Mail,
    Rcpt,
    Data,
    /// The message and its final `.`.
    Message,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Greeting => "greeting/EHLO",
            Self::Starttls => "STARTTLS",
            Self::Auth => "AUTH",
            Self::Mail => "MAIL FROM",
            Self::Rcpt => "RCPT TO",
            Self::Data => "DATA",
            Self::Message => "end of data",
        })
    }
}

/// A negative SMTP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    pub code: u16,
    /// The reply's text, lines joined (it starts with the enhanced status
    /// code when the server sends one).
    pub text: String,
}

impl Reply {
    pub(crate) fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
}

/// What a message needs from the next hop that it does not offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Missing {
    /// Non-ASCII addresses need SMTPUTF8 (RFC 6531): no downgrade exists.
    SmtpUtf8Addresses,
    /// UTF-8 headers of a message submitted with SMTPUTF8.
    SmtpUtf8Headers,
    /// 8-bit data needs 8BITMIME (RFC 6152). We do not downgrade to 7 bit:
    /// re-encoding bodies would break signatures (DKIM) over them, and
    /// every MTA of this century offers 8BITMIME; one that does not gets a
    /// bounce saying why.
    EightBitMime,
}

/// Why a session ended before every recipient had an answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HopError {
    #[error(
        "setting SO_MARK {mark:#x} on the delivery socket: {source} (the relay needs \
         CAP_NET_ADMIN for it; without the mark the agent's datapath blocks port 25)"
    )]
    Mark {
        mark: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("connection to {host}[{addr}] failed: {source}")]
    Connect {
        host: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with {host}[{addr}] failed{}: {source}", if *.certificate { " (certificate)" } else { "" })]
    Tls {
        host: String,
        addr: SocketAddr,
        /// The certificate did not verify (as opposed to a handshake that
        /// failed for another reason).
        certificate: bool,
        #[source]
        source: BoxError,
    },
    #[error("{host}[{addr}] does not offer STARTTLS")]
    NoStarttls { host: String, addr: SocketAddr },
    #[error("host {host}[{addr}] said: {reply} (in reply to {stage})")]
    Reply {
        host: String,
        addr: SocketAddr,
        stage: Stage,
        reply: Reply,
    },
    /// The connection broke, timed out or spoke nonsense.
    #[error("session with {host}[{addr}] failed at {stage}: {source}")]
    Lost {
        host: String,
        addr: SocketAddr,
        stage: Stage,
        #[source]
        source: BoxError,
    },
    #[error("{host}[{addr}] lacks {missing:?}")]
    Unsupported {
        host: String,
        addr: SocketAddr,
        missing: Missing,
    },
}

impl HopError {
    /// Nothing was sent for any recipient and the next MX host (or the next
    /// address of this one) may do better: it cannot be reached, TLS failed,
    /// it is busy (4xx before any recipient) or greets with 5xx (Postfix's
    /// `smtp_skip_5xx_greeting`: a 5xx greeting speaks for that host, not
    /// for the domain).
    pub(crate) fn try_next(&self) -> bool {
        match self {
            Self::Mark { .. } | Self::Unsupported { .. } => false,
            Self::Connect { .. }
            | Self::Tls { .. }
            | Self::NoStarttls { .. }
            | Self::Lost { .. } => true,
            Self::Reply { stage, reply, .. } => match stage {
                Stage::Greeting | Stage::Starttls => true,
                // A smarthost refusing our credentials is our problem, and
                // the next address of it may have a working AUTH.
                Stage::Auth => true,
                _ => !reply.is_permanent(),
            },
        }
    }

    /// Whether the recipients fail for good (bounce now) when this was the
    /// last hop to try: a 5xx to our MAIL, or a message this hop cannot
    /// take. Everything else is retried later.
    pub(crate) fn is_permanent(&self) -> bool {
        match self {
            Self::Unsupported { .. } => true,
            Self::Reply { stage, reply, .. } => {
                reply.is_permanent() && matches!(stage, Stage::Mail | Stage::Data | Stage::Message)
            }
            _ => false,
        }
    }

    /// The text kept in the queue record and shown in a bounce. It carries
    /// an RFC 3463 status code (the DSN's Status: is taken from it).
    pub(crate) fn diagnostic(&self) -> String {
        match self {
            Self::Mark { .. } => format!("4.3.0 {self}"),
            Self::Connect { .. } => format!("4.4.1 {self}"),
            Self::Tls { .. } | Self::NoStarttls { .. } => format!("4.7.5 {self}"),
            Self::Reply { .. } => self.to_string(),
            Self::Lost { .. } => format!("4.4.2 {self}"),
            Self::Unsupported {
                host,
                addr,
                missing,
            } => match missing {
                Missing::SmtpUtf8Addresses => format!(
                    "553 5.6.7 {host}[{addr}] does not support SMTPUTF8, and the message has \
                     non-ASCII addresses (RFC 6531)"
                ),
                Missing::SmtpUtf8Headers => format!(
                    "554 5.6.9 {host}[{addr}] does not support SMTPUTF8, and the message has \
                     UTF-8 headers (RFC 6531)"
                ),
                Missing::EightBitMime => format!(
                    "554 5.6.3 {host}[{addr}] does not support 8BITMIME, and the message has \
                     8-bit data (the relay does not convert it)"
                ),
            },
        }
    }
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
pub(crate) fn implicit_tls(host: &str, extra: Option<&[u8]>) -> Result<HopTls, BoxError> {
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
    let name = crate::lookup::ip_literal(host).map_or_else(
        || rustls_pki_types::ServerName::try_from(host.to_owned()),
        |ip| Ok(rustls_pki_types::ServerName::IpAddress(ip.into())),
    )?;
    Ok(HopTls::Implicit {
        connector: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
        name,
    })
}

/// Whether a TLS failure is the certificate's: a `rustls::Error` about it
/// anywhere in the chain (lettre wraps tokio-rustls's `io::Error`, which
/// wraps rustls's error; `io::Error::source` skips the wrapped error, so
/// `get_ref` is needed to see it).
fn is_certificate_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        let rustls_err = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(r) = rustls_err {
            return matches!(
                r,
                rustls::Error::InvalidCertificate(_)
                    | rustls::Error::NoCertificatesPresented
                    | rustls::Error::UnsupportedNameType
            );
        }
        cur = e.source();
    }
    false
}

/// The reply of a failed lettre call, if the failure was a reply.
fn reply_of(e: &lettre::transport::smtp::Error) -> Option<Reply> {
    let code = e.status()?;
    let text = std::error::Error::source(e)
        .map(ToString::to_string)
        .unwrap_or_default();
    Some(Reply {
        code: u16::from(code),
        text,
    })
}

/// Makes a TCP socket, marks it, connects it.
pub(crate) async fn connect_tcp(
    addr: SocketAddr,
    mark: Option<u32>,
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(ConnectError::Io)?;
    if let Some(m) = mark {
        // Before connect(): the SYN must carry it, or the datapath drops it.
        socket2::SockRef::from(&sock)
            .set_mark(m)
            .map_err(ConnectError::Mark)?;
    }
    sock.set_nodelay(true).map_err(ConnectError::Io)?;
    match tokio::time::timeout(timeout, sock.connect(addr)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(ConnectError::Io(e)),
        Err(_) => Err(ConnectError::Io(std::io::ErrorKind::TimedOut.into())),
    }
}

#[derive(Debug)]
pub(crate) enum ConnectError {
    Mark(std::io::Error),
    Io(std::io::Error),
}

/// One message as the next hop will see it.
pub(crate) struct Message<'a> {
    pub from: Option<&'a lettre::Address>,
    pub rcpts: &'a [lettre::Address],
    /// Spooled bytes, ending in CRLF (which lettre's terminator adds again).
    pub body: &'a [u8],
    /// The submitter said SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
}

/// What one session got done. Every recipient has its RCPT answer; the
/// accepted ones share `data`'s.
#[derive(Debug)]
pub(crate) struct TxnReport {
    pub rcpt: Vec<Result<(), Reply>>,
    /// `None` when no recipient was accepted (no DATA was sent).
    pub data: Option<Result<(), HopError>>,
    pub tls: TlsUsed,
}

impl Outbound {
    pub(crate) fn new(hello: ClientId, mark: Option<u32>, timeout: Duration) -> Self {
        Self {
            hello,
            mark,
            timeout,
            mark_errors_logged: Mutex::default(),
        }
    }

    async fn connect(&self, host: &str, addr: SocketAddr) -> Result<TcpStream, HopError> {
        match connect_tcp(addr, self.mark, self.timeout).await {
            Ok(s) => Ok(s),
            Err(ConnectError::Mark(source)) => {
                let mark = self.mark.unwrap_or_default();
                let err = HopError::Mark { mark, source };
                let text = err.to_string();
                let first = self
                    .mark_errors_logged
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(text);
                if first {
                    tracing::error!(error = %err, "cannot mark delivery sockets; every delivery will be deferred");
                }
                Err(err)
            }
            Err(ConnectError::Io(source)) => Err(HopError::Connect {
                host: host.to_owned(),
                addr,
                source,
            }),
        }
    }

    /// Runs `fut` (one SMTP step) under the per-step timeout.
    async fn step<T>(
        &self,
        t: &Transport,
        addr: SocketAddr,
        stage: Stage,
        limit: Duration,
        fut: impl std::future::Future<Output = Result<T, lettre::transport::smtp::Error>>,
    ) -> Result<T, HopError> {
        match tokio::time::timeout(limit, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(match reply_of(&e) {
                Some(reply) => HopError::Reply {
                    host: t.host.clone(),
                    addr,
                    stage,
                    reply,
                },
                None => HopError::Lost {
                    host: t.host.clone(),
                    addr,
                    stage,
                    source: Box::new(e),
                },
            }),
            Err(_) => Err(HopError::Lost {
                host: t.host.clone(),
                addr,
                stage,
                source: Box::new(std::io::Error::from(std::io::ErrorKind::TimedOut)),
            }),
        }
    }

    /// STARTTLS with `params`; a failed handshake is told apart from a
    /// refused command.
    async fn starttls(
        &self,
        t: &Transport,
        addr: SocketAddr,
        conn: &mut AsyncSmtpConnection,
        params: TlsParameters,
    ) -> Result<(), HopError> {
        match tokio::time::timeout(self.timeout, conn.starttls(params, &self.hello)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(match reply_of(&e) {
                Some(reply) => HopError::Reply {
                    host: t.host.clone(),
                    addr,
                    stage: Stage::Starttls,
                    reply,
                },
                None => HopError::Tls {
                    host: t.host.clone(),
                    addr,
                    certificate: is_certificate_error(&e),
                    source: Box::new(e),
                },
            }),
            Err(_) => Err(HopError::Lost {
                host: t.host.clone(),
                addr,
                stage: Stage::Starttls,
                source: Box::new(std::io::Error::from(std::io::ErrorKind::TimedOut)),
            }),
        }
    }

    /// Connects to `addr`, secures the session as `t.tls` says, logs in if
    /// `t` has credentials and runs one transaction for `msg`. `Err` means
    /// no recipient got an answer (see `HopError::try_next`).
    pub(crate) async fn send(
        &self,
        t: &Transport,
        addr: SocketAddr,
        msg: &Message<'_>,
    ) -> Result<TxnReport, HopError> {
        let host = t.host.as_str();
        // Opportunistic TLS may take up to three connections: verified,
        // then unverified (bad certificate), then plaintext (TLS broken).
        let mut want = TlsUsed::Verified;
        loop {
            let tcp = self.connect(host, addr).await?;
            let stream: Box<dyn AsyncTokioStream> = match &t.tls {
                HopTls::Implicit { connector, name } => {
                    let tls =
                        tokio::time::timeout(self.timeout, connector.connect(name.clone(), tcp))
                            .await
                            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))
                            .and_then(|r| r)
                            .map_err(|e| HopError::Tls {
                                host: host.to_owned(),
                                addr,
                                certificate: is_certificate_error(&e),
                                source: Box::new(e),
                            })?;
                    Box::new(TlsHop(tls))
                }
                _ => Box::new(tcp),
            };
            let mut conn = self
                .step(
                    t,
                    addr,
                    Stage::Greeting,
                    self.timeout,
                    AsyncSmtpConnection::connect_with_transport(stream, &self.hello),
                )
                .await?;
            let used = match &t.tls {
                HopTls::None => TlsUsed::None,
                HopTls::Implicit { .. } => TlsUsed::Verified,
                HopTls::Required(p) => {
                    if !conn.can_starttls() {
                        abort(conn);
                        return Err(HopError::NoStarttls {
                            host: host.to_owned(),
                            addr,
                        });
                    }
                    self.starttls(t, addr, &mut conn, p.clone()).await?;
                    TlsUsed::Verified
                }
                HopTls::Verify => {
                    if !conn.can_starttls() {
                        abort(conn);
                        return Err(HopError::NoStarttls {
                            host: host.to_owned(),
                            addr,
                        });
                    }
                    let p = mx_tls_params(host, true).map_err(|source| HopError::Tls {
                        host: host.to_owned(),
                        addr,
                        certificate: false,
                        source,
                    })?;
                    self.starttls(t, addr, &mut conn, p).await?;
                    TlsUsed::Verified
                }
                HopTls::Opportunistic if want == TlsUsed::None || !conn.can_starttls() => {
                    TlsUsed::None
                }
                HopTls::Opportunistic => {
                    let verify = want == TlsUsed::Verified;
                    let res = match mx_tls_params(host, verify) {
                        Ok(p) => self.starttls(t, addr, &mut conn, p).await,
                        Err(source) => Err(HopError::Tls {
                            host: host.to_owned(),
                            addr,
                            certificate: false,
                            source,
                        }),
                    };
                    match res {
                        Ok(()) => want,
                        Err(e) => {
                            // lettre has closed the connection; the next
                            // one tries less.
                            want = match &e {
                                HopError::Tls {
                                    certificate: true, ..
                                } if verify => TlsUsed::Unverified,
                                _ => TlsUsed::None,
                            };
                            tracing::warn!(
                                host, %addr, error = %e,
                                fallback = if want == TlsUsed::Unverified { "TLS without certificate verification" } else { "plaintext" },
                                "opportunistic STARTTLS failed; reconnecting"
                            );
                            continue;
                        }
                    }
                }
            };
            if let Some(c) = &t.credentials {
                self.step(
                    t,
                    addr,
                    Stage::Auth,
                    self.timeout,
                    conn.auth(DEFAULT_MECHANISMS, c),
                )
                .await?;
            }
            return self.transaction(t, addr, conn, msg, used).await;
        }
    }

    async fn transaction(
        &self,
        t: &Transport,
        addr: SocketAddr,
        mut conn: AsyncSmtpConnection,
        msg: &Message<'_>,
        tls: TlsUsed,
    ) -> Result<TxnReport, HopError> {
        let info = conn.server_info();
        let ascii = |a: &lettre::Address| AsRef::<str>::as_ref(a).is_ascii();
        let utf8_addrs = msg.from.is_some_and(|a| !ascii(a)) || msg.rcpts.iter().any(|a| !ascii(a));
        let utf8_headers = msg.smtputf8 && !crate::dsn::header_section(msg.body).is_ascii();
        let has_utf8 = info.supports_feature(Extension::SmtpUtfEight);
        let eight_bit = !msg.body.is_ascii();
        let missing = if utf8_addrs && !has_utf8 {
            Some(Missing::SmtpUtf8Addresses)
        } else if utf8_headers && !has_utf8 {
            Some(Missing::SmtpUtf8Headers)
        } else if eight_bit && !info.supports_feature(Extension::EightBitMime) {
            Some(Missing::EightBitMime)
        } else {
            None
        };
        if let Some(missing) = missing {
            abort(conn);
            return Err(HopError::Unsupported {
                host: t.host.clone(),
                addr,
                missing,
            });
        }
        let mut params = Vec::new();
        // The submitter's SMTPUTF8 goes on whenever the hop understands it
        // (the message may be all ASCII; then the hop without it got it
        // above, as nothing needs it).
        if has_utf8 && (msg.smtputf8 || utf8_addrs) {
            params.push(MailParameter::SmtpUtfEight);
        }
        if eight_bit {
            params.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        self.step(
            t,
            addr,
            Stage::Mail,
            self.timeout,
            conn.command(Mail::new(msg.from.cloned(), params)),
        )
        .await?;
        let mut rcpt = Vec::with_capacity(msg.rcpts.len());
        for r in msg.rcpts {
            match self
                .step(
                    t,
                    addr,
                    Stage::Rcpt,
                    self.timeout,
                    conn.command(Rcpt::new(r.clone(), vec![])),
                )
                .await
            {
                Ok(_) => rcpt.push(Ok(())),
                Err(HopError::Reply { reply, .. }) => rcpt.push(Err(reply)),
                // Nothing was sent yet: to the caller this hop said nothing.
                Err(e) => return Err(e),
            }
        }
        if rcpt.iter().all(Result::is_err) {
            abort(conn);
            return Ok(TxnReport {
                rcpt,
                data: None,
                tls,
            });
        }
        let data = match self
            .step(t, addr, Stage::Data, self.timeout, conn.command(Data))
            .await
        {
            Ok(_) => {
                // lettre always writes CRLF "." CRLF after the data; our
                // spooled bodies end with CRLF already, so drop it here or
                // the recipient would get an extra blank line and the
                // message would not arrive byte-exact.
                let body = msg.body.strip_suffix(b"\r\n").unwrap_or(msg.body);
                // A 25 MiB message over a slow link takes its time: the
                // limit grows by a second per 16 KiB (Postfix times each
                // write instead; lettre gives us only the whole).
                let limit = self.timeout + Duration::from_secs(body.len() as u64 / 16_384);
                self.step(t, addr, Stage::Message, limit, conn.message(body))
                    .await
                    .map(|_| ())
            }
            Err(e) => Err(e),
        };
        abort(conn);
        Ok(TxnReport {
            rcpt,
            data: Some(data),
            tls,
        })
    }
}

/// STARTTLS parameters for an MX host: verified against the web PKI, or
/// (opportunistic fallback) accepting any certificate.
fn mx_tls_params(host: &str, verify: bool) -> Result<TlsParameters, BoxError> {
    let b = TlsParameters::builder(host.to_owned());
    let b = if verify {
        b
    } else {
        b.dangerous_accept_invalid_certs(true)
            .dangerous_accept_invalid_hostnames(true)
    };
    Ok(b.build_rustls()?)
}

/// QUIT (and its 221) matters to nobody once the data is answered; bounded,
/// so a next hop that never answers cannot pile tasks up.
fn abort(mut conn: AsyncSmtpConnection) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(10), conn.abort()).await;
    });
}

#[cfg(test)]
mod tests;
