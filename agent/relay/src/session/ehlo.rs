//! EHLO, HELO and STARTTLS.

use tokio::io::{AsyncRead, AsyncWrite};

use super::{Flow, ListenerKind, Phase, Session, SessionError, Stream};
use crate::reply::{Reply, canned};

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub(super) fn cmd_helo(&mut self, domain: String, esmtp: bool) -> Flow {
        // RFC 5321 4.1.4: EHLO/HELO mid-transaction acts as RSET.
        self.txn = None;
        self.esmtp = esmtp;
        let host = self.cfg().hostname.clone();
        self.helo = Some(domain);
        if !esmtp {
            self.reply(&Reply::new(250, "", host));
            return Flow::Continue;
        }
        let mut lines: Vec<std::borrow::Cow<'static, str>> = vec![
            host.into(),
            format!("SIZE {}", self.cfg().limits.max_message_bytes).into(),
            "PIPELINING".into(),
            "8BITMIME".into(),
            "SMTPUTF8".into(),
            "ENHANCEDSTATUSCODES".into(),
        ];
        if !self.tls {
            lines.push("STARTTLS".into());
        } else {
            // Only over TLS: offering AUTH in plaintext invites clients to
            // send passwords in the clear.
            lines.push("AUTH PLAIN LOGIN".into());
        }
        self.reply(&Reply::multi(250, "", lines));
        Flow::Continue
    }

    pub(super) async fn cmd_starttls(&mut self) -> Result<Flow, SessionError> {
        if self.tls {
            self.reply(&canned::bad_sequence("TLS already active"));
            return Ok(Flow::Continue);
        }
        if self.phase() != Phase::Greeted {
            self.reply(&canned::bad_sequence(
                "STARTTLS only after EHLO and outside a transaction",
            ));
            return Ok(Flow::Continue);
        }
        self.reply(&Reply::new(220, "2.0.0", "Ready to start TLS"));
        self.flush().await?;
        // CVE-2011-0411 class: anything the client pipelined after STARTTLS
        // was sent in plaintext and must not be executed inside TLS.
        if !self.rbuf.is_empty() {
            tracing::info!(peer = %self.peer, bytes = self.rbuf.len(), "discarding plaintext pipelined after STARTTLS");
            self.rbuf.clear();
        }
        let Stream::Plain(raw) = std::mem::replace(&mut self.stream, Stream::Upgrading) else {
            unreachable!("tls flag false implies plain stream")
        };
        let acceptor = self.shared.tls.acceptor();
        let deadline = self.command_deadline().at;
        let tls = tokio::time::timeout_at(deadline, acceptor.accept(raw))
            .await
            .map_err(|_| SessionError::Handshake {
                source: std::io::ErrorKind::TimedOut.into(),
            })?
            .map_err(|source| SessionError::Handshake { source })?;
        self.tls_info = super::TlsInfo::of(tls.get_ref().1);
        self.stream = Stream::Tls(Box::new(tls));
        self.tls = true;
        // RFC 3207 4.2: forget everything learnt before TLS.
        self.helo = None;
        self.esmtp = false;
        self.txn = None;
        self.login = None;
        debug_assert!(matches!(
            self.kind,
            ListenerKind::Submission | ListenerKind::Intercept
        ));
        Ok(Flow::Continue)
    }
}
