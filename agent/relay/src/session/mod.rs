//! One SMTP session: an explicit state, bytes in and replies out, generic over
//! the transport so whole dialogues run in memory in tests. Verbs live in
//! their own files; this file owns the I/O, the state and the dispatch.

mod auth;
mod data;
mod ehlo;
mod hygiene;
mod mail;
mod misc;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

use crate::config::{RelayConfig, secs};
use crate::limits::{ConnGuard, Limits};
use crate::parse::{self, Command, MAX_COMMAND_LINE, ParseError};
use crate::reply::{Reply, canned};
use crate::spool::{QueueRecord, Spool};
use crate::stats::RelayStats;
use crate::tls::TlsStore;
use crate::users::{UserDb, UserEntry};
use crate::verifier::Verifier;

/// Which listener accepted the connection; decides TLS start and the wording
/// of refusals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// Port 587: plaintext, STARTTLS offered.
    Submission,
    /// Port 465: TLS done before the session starts.
    Submissions,
    /// Port-25 connections redirected by the datapath: like 587, but
    /// unauthenticated MAIL/RCPT get the configured intercept message.
    Intercept,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake: {source}")]
    Handshake {
        #[source]
        source: std::io::Error,
    },
}

/// The TLS parameters a session negotiated, for its Received header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// "TLSv1.3", "TLSv1.2".
    pub version: String,
    /// IANA-style suite name as rustls spells it, e.g. "TLS13_AES_256_GCM_SHA384".
    pub cipher: String,
}

impl TlsInfo {
    pub fn of(conn: &rustls::ServerConnection) -> Option<Self> {
        let version = match conn.protocol_version()? {
            rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".to_owned(),
            rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".to_owned(),
            other => format!("{other:?}"),
        };
        let suite = conn.negotiated_cipher_suite()?.suite();
        let cipher = suite
            .as_str()
            .map_or_else(|| format!("{suite:?}"), str::to_owned);
        Some(Self { version, cipher })
    }
}

/// What every session shares: configuration, credentials, limits, spool.
pub struct Shared {
    pub config: Arc<RelayConfig>,
    pub tls: Arc<TlsStore>,
    /// DKIM keys by signing domain (reloadable).
    pub dkim: Arc<crate::dkim::DkimStore>,
    pub users: Arc<UserDb>,
    pub limits: Limits,
    /// Bounds concurrent password verifications.
    pub verifier: Arc<Verifier>,
    pub stats: Arc<RelayStats>,
    pub spool: Spool,
    /// New messages for the delivery side, sent after they are on disk.
    pub queued: mpsc::UnboundedSender<QueueRecord>,
    pub shutdown: watch::Receiver<bool>,
}

enum Stream<S> {
    Plain(S),
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
    /// Only while the handshake owns the stream.
    Upgrading,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Stream<S> {
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(s) => s.read(buf).await,
            Self::Tls(s) => s.read(buf).await,
            Self::Upgrading => Err(std::io::Error::other("stream lost in TLS upgrade")),
        }
    }

    async fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Self::Plain(s) => {
                s.write_all(buf).await?;
                s.flush().await
            }
            Self::Tls(s) => {
                s.write_all(buf).await?;
                s.flush().await
            }
            Self::Upgrading => Err(std::io::Error::other("stream lost in TLS upgrade")),
        }
    }

    async fn shutdown(&mut self) {
        let _ = match self {
            Self::Plain(s) => s.shutdown().await,
            Self::Tls(s) => s.shutdown().await,
            Self::Upgrading => Ok(()),
        };
    }
}

/// Which limit a read ran into; decides the 421's wording.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    /// The per-command-line deadline (or the DATA chunk timeout).
    Idle,
    /// DATA as a whole (`data_timeout_secs` plus the minimum rate).
    DataRate,
    /// Not authenticated within `preauth_timeout_secs`.
    PreAuth,
    /// `session_lifetime_secs`.
    Lifetime,
}

impl Limit {
    pub(crate) fn reply(self) -> Reply {
        match self {
            Self::Idle => canned::timeout(),
            Self::DataRate => Reply::new(421, "4.4.2", "Message data too slow, closing connection"),
            Self::PreAuth => Reply::new(
                421,
                "4.7.0",
                "Authentication not completed in time, closing connection",
            ),
            Self::Lifetime => Reply::new(
                421,
                "4.4.2",
                "Session time limit reached, closing connection",
            ),
        }
    }
}

/// A point in time a read must finish by, and the limit it comes from.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    pub at: Instant,
    pub limit: Limit,
}

impl Deadline {
    pub(crate) fn min(self, other: Self) -> Self {
        if other.at < self.at { other } else { self }
    }
}

/// What one read brought.
pub(crate) enum Fill {
    Data,
    Eof,
    Shutdown,
    /// A newcomer took this pre-AUTH session's slot.
    Evicted,
    Expired(Limit),
}

/// Result of reading one line.
enum Line {
    Ok(Vec<u8>),
    /// Over the limit; the rest of the line up to LF was discarded.
    TooLong,
    /// Ended in LF without CR.
    BareLf,
    Eof,
    Expired(Limit),
    Evicted,
    Shutdown,
}

/// Whether the session goes on after a command.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Flow {
    Continue,
    Close,
}

/// An open mail transaction (after MAIL).
#[derive(Debug)]
pub(crate) struct Txn {
    pub from: parse::Address,
    pub rcpts: Vec<parse::Address>,
    pub smtputf8: bool,
}

/// Authenticated identity.
#[derive(Debug)]
pub(crate) struct Login {
    pub user: String,
    pub entry: UserEntry,
}

/// Protocol phase. Transitions: Fresh -(EHLO/HELO)-> Greeted -(MAIL)-> Mail
/// -(RCPT)-> Rcpt -(DATA done, RSET)-> Greeted. STARTTLS goes back to Fresh;
/// AUTH keeps the phase but sets `login`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Fresh,
    Greeted,
    Mail,
    Rcpt,
}

pub struct Session<S> {
    stream: Stream<S>,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    shared: Arc<Shared>,
    kind: ListenerKind,
    peer: SocketAddr,
    local: SocketAddr,
    tls: bool,
    tls_info: Option<TlsInfo>,
    helo: Option<String>,
    esmtp: bool,
    login: Option<Login>,
    txn: Option<Txn>,
    errors: u32,
    /// Junk commands since the last accepted message.
    junk: u32,
    started: Instant,
    /// The session's slot in the connection limiter (none in unit tests
    /// that build sessions directly).
    slot: Option<ConnGuard>,
    evicted: Option<Arc<Notify>>,
    shutdown: watch::Receiver<bool>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// `tls` says whether `stream` is already encrypted (port 465).
    pub fn new(
        stream: S,
        shared: Arc<Shared>,
        kind: ListenerKind,
        peer: SocketAddr,
        local: SocketAddr,
        tls: bool,
    ) -> Self {
        let shutdown = shared.shutdown.clone();
        Self {
            stream: Stream::Plain(stream),
            rbuf: Vec::with_capacity(1024),
            wbuf: Vec::with_capacity(1024),
            shared,
            kind,
            peer,
            local,
            tls,
            tls_info: None,
            helo: None,
            esmtp: false,
            login: None,
            txn: None,
            errors: 0,
            junk: 0,
            started: Instant::now(),
            slot: None,
            evicted: None,
            shutdown,
        }
    }

    /// Ties the session to its connection-limiter slot: it can then be
    /// evicted while unauthenticated, leaves the pre-AUTH share at AUTH,
    /// and its time limits count from when the connection was accepted.
    #[must_use]
    pub fn with_slot(mut self, slot: ConnGuard) -> Self {
        self.started = Instant::from_std(slot.since());
        self.evicted = Some(slot.evicted());
        self.slot = Some(slot);
        self
    }

    /// The TLS parameters of a stream that was encrypted before the session
    /// started (port 465), for the Received header.
    #[must_use]
    pub fn with_tls_info(mut self, info: Option<TlsInfo>) -> Self {
        self.tls_info = info;
        self
    }

    pub(crate) fn phase(&self) -> Phase {
        match (&self.helo, &self.txn) {
            (None, _) => Phase::Fresh,
            (Some(_), None) => Phase::Greeted,
            (Some(_), Some(t)) if t.rcpts.is_empty() => Phase::Mail,
            (Some(_), Some(_)) => Phase::Rcpt,
        }
    }

    fn cfg(&self) -> &RelayConfig {
        &self.shared.config
    }

    /// Queues a reply; it is written when we next wait for input. Counts
    /// errors towards the per-session limit.
    pub(crate) fn reply(&mut self, r: &Reply) {
        if r.is_error() {
            self.errors += 1;
        }
        self.wbuf.extend_from_slice(&r.to_bytes());
    }

    /// The session's own limits: its lifetime and, until AUTH, the
    /// pre-AUTH deadline.
    pub(crate) fn session_deadline(&self) -> Deadline {
        let l = &self.cfg().limits;
        let life = Deadline {
            at: self.started + secs(l.session_lifetime_secs),
            limit: Limit::Lifetime,
        };
        if self.login.is_some() {
            life
        } else {
            life.min(Deadline {
                at: self.started + secs(l.preauth_timeout_secs),
                limit: Limit::PreAuth,
            })
        }
    }

    /// The deadline for one command line from now.
    pub(crate) fn command_deadline(&self) -> Deadline {
        Deadline {
            at: Instant::now() + secs(self.cfg().limits.command_timeout_secs),
            limit: Limit::Idle,
        }
        .min(self.session_deadline())
    }

    async fn flush(&mut self) -> Result<(), SessionError> {
        if !self.wbuf.is_empty() {
            let out = std::mem::take(&mut self.wbuf);
            // A client that never reads would otherwise hold the session
            // in a write once the socket buffers are full. A few seconds
            // past the session's own deadline, so its closing 421 still
            // gets a chance to go out.
            let now = Instant::now();
            let deadline = (now + secs(self.cfg().limits.command_timeout_secs))
                .min(self.session_deadline().at.max(now + Duration::from_secs(5)));
            match tokio::time::timeout_at(deadline, self.stream.write_all(&out)).await {
                Ok(r) => r.map_err(|source| SessionError::Io {
                    op: "writing reply",
                    source,
                })?,
                Err(_) => {
                    return Err(SessionError::Io {
                        op: "writing reply",
                        source: std::io::ErrorKind::TimedOut.into(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Reads more input into `rbuf`, by `deadline` at the latest.
    pub(crate) async fn fill(
        &mut self,
        deadline: Deadline,
        watch_shutdown: bool,
    ) -> Result<Fill, SessionError> {
        self.flush().await?;
        let mut chunk = [0u8; 8192];
        let read = tokio::time::timeout_at(deadline.at, self.stream.read(&mut chunk));
        let evicted = self.evicted.clone();
        let evict = async {
            match &evicted {
                Some(n) => n.notified().await,
                None => std::future::pending().await,
            }
        };
        let n = tokio::select! {
            r = read => r,
            _ = self.shutdown.wait_for(|s| *s), if watch_shutdown => return Ok(Fill::Shutdown),
            () = evict, if self.login.is_none() => return Ok(Fill::Evicted),
        };
        match n {
            Err(_) => Ok(Fill::Expired(deadline.limit)),
            Ok(Err(source)) => Err(SessionError::Io {
                op: "reading",
                source,
            }),
            Ok(Ok(0)) => Ok(Fill::Eof),
            Ok(Ok(n)) => {
                self.rbuf.extend_from_slice(&chunk[..n]);
                Ok(Fill::Data)
            }
        }
    }

    /// Reads one CRLF-terminated line of at most `max` octets (CRLF
    /// included). The whole line must arrive within the command deadline:
    /// trickling it in byte by byte does not extend it.
    async fn read_line(&mut self, max: usize, watch_shutdown: bool) -> Result<Line, SessionError> {
        let deadline = self.command_deadline();
        let mut discarding = false;
        loop {
            if let Some(i) = self.rbuf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.rbuf.drain(..=i).collect();
                if discarding || line.len() > max {
                    return Ok(Line::TooLong);
                }
                line.pop();
                if line.pop() != Some(b'\r') {
                    return Ok(Line::BareLf);
                }
                return Ok(Line::Ok(line));
            }
            if self.rbuf.len() >= max {
                // Never buffer an over-long line: drop it and remember to
                // refuse it once its end arrives.
                discarding = true;
                self.rbuf.clear();
            }
            match self.fill(deadline, watch_shutdown).await? {
                Fill::Data => {}
                Fill::Eof => return Ok(Line::Eof),
                Fill::Shutdown => return Ok(Line::Shutdown),
                Fill::Evicted => return Ok(Line::Evicted),
                Fill::Expired(l) => return Ok(Line::Expired(l)),
            }
        }
    }

    /// Counts a command that moves no mail; true when over the limit (the
    /// 421 is queued).
    pub(crate) fn junk_over_limit(&mut self) -> bool {
        self.junk += 1;
        if self.junk > self.cfg().limits.max_junk_commands {
            tracing::info!(peer = %self.peer, junk = self.junk, "closing session after too many commands without mail");
            self.wbuf.extend_from_slice(
                &Reply::new(
                    421,
                    "4.7.0",
                    "Too many commands without mail, closing connection",
                )
                .to_bytes(),
            );
            return true;
        }
        false
    }

    /// Queues the reply for a read that ended on a limit.
    pub(crate) fn expired(&mut self, limit: Limit) {
        tracing::info!(peer = %self.peer, limit = ?limit, "closing session on a time limit");
        self.reply(&limit.reply());
    }

    fn evicted_reply(&mut self) {
        tracing::info!(peer = %self.peer, "pre-AUTH session evicted for a newcomer");
        RelayStats::inc(&self.shared.stats.sessions_evicted);
        self.reply(&Reply::new(
            421,
            "4.7.0",
            "Too many unauthenticated connections, closing connection",
        ));
    }

    /// Runs the whole dialogue. Errors are I/O problems only: protocol
    /// problems are answered on the wire.
    pub async fn run(mut self) -> Result<(), SessionError> {
        RelayStats::inc(&self.shared.stats.sessions_total);
        RelayStats::inc(&self.shared.stats.sessions_active);
        let r = self.run_inner().await;
        RelayStats::dec(&self.shared.stats.sessions_active);
        let _ = self.flush().await;
        // A TLS close_notify is a write too: bounded like any other.
        let _ = tokio::time::timeout(
            secs(self.cfg().limits.command_timeout_secs.min(10.0)),
            self.stream.shutdown(),
        )
        .await;
        r
    }

    async fn run_inner(&mut self) -> Result<(), SessionError> {
        if self.kind == ListenerKind::Intercept {
            // The redirected socket's local address is where the client
            // meant to connect: worth logging, it names the bypass attempt.
            tracing::info!(peer = %self.peer, original_destination = %self.local, "intercepted port-25 session");
        }
        let greeting = Reply::new(220, "", format!("{} ESMTP smtpgate", self.cfg().hostname));
        self.reply(&greeting);
        loop {
            let line = match self.read_line(MAX_COMMAND_LINE, true).await? {
                Line::Ok(l) => l,
                Line::TooLong => {
                    self.reply(&canned::line_too_long());
                    if self.too_many_errors() {
                        return Ok(());
                    }
                    continue;
                }
                Line::BareLf => {
                    self.reply(&canned::bare_lf_command());
                    if self.too_many_errors() {
                        return Ok(());
                    }
                    continue;
                }
                Line::Eof => return Ok(()),
                Line::Expired(limit) => {
                    self.expired(limit);
                    return Ok(());
                }
                Line::Evicted => {
                    self.evicted_reply();
                    return Ok(());
                }
                Line::Shutdown => {
                    self.reply(&canned::shutting_down());
                    return Ok(());
                }
            };
            let flow = match parse::parse_command(&line) {
                Ok(cmd) => self.dispatch(cmd).await?,
                Err(e) => self.parse_error(&line, &e),
            };
            if flow == Flow::Close || self.too_many_errors() {
                return Ok(());
            }
        }
    }

    fn too_many_errors(&mut self) -> bool {
        if self.errors >= self.cfg().limits.max_errors {
            tracing::info!(peer = %self.peer, errors = self.errors, "closing session after repeated errors");
            // Not via reply(): this one must not count itself.
            self.wbuf
                .extend_from_slice(&canned::too_many_errors().to_bytes());
            return true;
        }
        false
    }

    fn parse_error(&mut self, line: &[u8], e: &ParseError) -> Flow {
        let verb = line.get(..4).map(<[u8]>::to_ascii_uppercase);
        let r = match e {
            ParseError::Http => {
                tracing::info!(peer = %self.peer, "HTTP request on SMTP port");
                self.reply(&canned::http_refused());
                return Flow::Close;
            }
            ParseError::Unknown => canned::unknown_command(),
            ParseError::Syntax { what } => canned::syntax(what),
            ParseError::UnsupportedParam { param } => {
                Reply::new(555, "5.5.4", format!("Unsupported parameter {param}"))
            }
            ParseError::Address { source } => {
                let enh = if verb.as_deref() == Some(b"MAIL") {
                    "5.1.7"
                } else {
                    "5.1.3"
                };
                Reply::new(553, enh, format!("Address rejected: {source}"))
            }
        };
        self.reply(&r);
        Flow::Continue
    }

    async fn dispatch(&mut self, cmd: Command) -> Result<Flow, SessionError> {
        // NOOP every minute kept a session open forever (issue 12).
        if matches!(
            cmd,
            Command::Ehlo(_)
                | Command::Helo(_)
                | Command::Rset
                | Command::Noop
                | Command::Vrfy
                | Command::Expn
                | Command::Help
        ) && self.junk_over_limit()
        {
            return Ok(Flow::Close);
        }
        Ok(match cmd {
            Command::Ehlo(d) => self.cmd_helo(d, true),
            Command::Helo(d) => self.cmd_helo(d, false),
            Command::StartTls => return self.cmd_starttls().await,
            Command::Auth { mechanism, initial } => {
                return self.cmd_auth(&mechanism, initial).await;
            }
            Command::Mail { from, params } => self.cmd_mail(from, &params),
            Command::Rcpt { to } => self.cmd_rcpt(to),
            Command::Data => return self.cmd_data().await,
            Command::Rset => self.cmd_rset(),
            Command::Noop => self.cmd_noop(),
            Command::Quit => self.cmd_quit(),
            Command::Vrfy => self.cmd_vrfy(),
            Command::Expn => self.cmd_expn(),
            Command::Help => self.cmd_help(),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests;
