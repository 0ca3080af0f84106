//! AUTH PLAIN and AUTH LOGIN (RFC 4954, RFC 4616), only over TLS.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Flow, Line, Login, Phase, Session, SessionError};
use crate::config::secs;
use crate::reply::{Reply, canned};
use crate::stats::RelayStats;

/// RFC 4954 4: AUTH lines may be up to 12288 octets.
const MAX_AUTH_LINE: usize = 12288;

enum Exchange {
    Creds {
        user: String,
        password: String,
    },
    /// Reply already queued (cancel, bad base64, I/O end).
    Aborted(Flow),
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub(super) async fn cmd_auth(
        &mut self,
        mechanism: &str,
        initial: Option<String>,
    ) -> Result<Flow, SessionError> {
        if !self.tls {
            self.reply(&canned::encryption_required());
            return Ok(Flow::Continue);
        }
        if self.phase() == Phase::Fresh {
            self.reply(&canned::bad_sequence("Send EHLO first"));
            return Ok(Flow::Continue);
        }
        if self.login.is_some() {
            self.reply(&canned::bad_sequence("Already authenticated"));
            return Ok(Flow::Continue);
        }
        if self.txn.is_some() {
            self.reply(&canned::bad_sequence(
                "AUTH not allowed during a mail transaction",
            ));
            return Ok(Flow::Continue);
        }
        if self.shared.limits.auth.client_locked(self.peer.ip()) {
            tracing::warn!(peer = %self.peer, "AUTH refused: client locked out");
            self.auth_delay().await;
            self.reply(&Reply::new(
                454,
                "4.7.0",
                "Too many authentication failures, try again later",
            ));
            return Ok(Flow::Continue);
        }
        let ex = match mechanism {
            "PLAIN" => self.exchange_plain(initial).await?,
            "LOGIN" => self.exchange_login(initial).await?,
            _ => {
                self.reply(&Reply::new(
                    504,
                    "5.5.4",
                    "Unrecognized authentication mechanism",
                ));
                return Ok(Flow::Continue);
            }
        };
        let (user, password) = match ex {
            Exchange::Creds { user, password } => (user, password),
            Exchange::Aborted(flow) => return Ok(flow),
        };
        if self.shared.limits.auth.user_locked(&user, self.peer.ip()) {
            // Same reply whether or not the user exists.
            tracing::warn!(peer = %self.peer, user, "AUTH refused: user locked out");
            self.auth_delay().await;
            self.reply(&Reply::new(
                454,
                "4.7.0",
                "Too many authentication failures, try again later",
            ));
            return Ok(Flow::Continue);
        }
        let users = self.shared.users.clone();
        let u = user.clone();
        // Hashing takes tens of milliseconds of CPU and ~19 MiB: off the
        // reactor, and never more than a few at once.
        let entry = match self
            .shared
            .verifier
            .run(move || users.authenticate(&u, &password))
            .await
        {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(peer = %self.peer, user, error = %e, "AUTH refused: verifier busy");
                self.reply(&Reply::new(
                    454,
                    "4.7.0",
                    "Too many logins at once, try again later",
                ));
                return Ok(Flow::Continue);
            }
        };
        match entry {
            Some(entry) => {
                if self.slot.as_ref().is_some_and(|s| !s.authenticated()) {
                    // A newcomer took the slot while the hash ran.
                    self.evicted_reply();
                    return Ok(Flow::Close);
                }
                tracing::info!(peer = %self.peer, user, "authenticated");
                self.shared
                    .limits
                    .auth
                    .record_success(&user, self.peer.ip());
                RelayStats::inc(&self.shared.stats.auth_successes);
                self.login = Some(Login { user, entry });
                self.reply(&Reply::new(235, "2.7.0", "Authentication successful"));
            }
            None => {
                tracing::warn!(peer = %self.peer, user, "authentication failed");
                self.shared
                    .limits
                    .auth
                    .record_failure(self.peer.ip(), &user);
                RelayStats::inc(&self.shared.stats.auth_failures);
                self.auth_delay().await;
                self.reply(&Reply::new(
                    535,
                    "5.7.8",
                    "Authentication credentials invalid",
                ));
            }
        }
        Ok(Flow::Continue)
    }

    async fn auth_delay(&mut self) {
        tokio::time::sleep(secs(self.cfg().limits.auth_failure_delay_secs)).await;
    }

    /// Sends a 334 challenge and reads the answer; None when the exchange
    /// ended (reply already queued).
    async fn challenge(
        &mut self,
        prompt: &'static str,
    ) -> Result<Result<Vec<u8>, Flow>, SessionError> {
        self.reply(&Reply::new(334, "", prompt));
        let line = match self.read_line(MAX_AUTH_LINE, false).await? {
            Line::Ok(l) => l,
            Line::Eof | Line::Shutdown => return Ok(Err(Flow::Close)),
            Line::Expired(limit) => {
                self.expired(limit);
                return Ok(Err(Flow::Close));
            }
            Line::Evicted => {
                self.evicted_reply();
                return Ok(Err(Flow::Close));
            }
            Line::TooLong | Line::BareLf => {
                self.reply(&Reply::new(
                    500,
                    "5.5.6",
                    "Authentication exchange line is too long or malformed",
                ));
                return Ok(Err(Flow::Continue));
            }
        };
        Ok(self.decode(&line))
    }

    fn decode(&mut self, line: &[u8]) -> Result<Vec<u8>, Flow> {
        if line == b"*" {
            self.reply(&Reply::new(501, "5.0.0", "Authentication cancelled"));
            return Err(Flow::Continue);
        }
        // "=" is the RFC 4954 empty initial response.
        if line == b"=" {
            return Ok(Vec::new());
        }
        B64.decode(line).map_err(|_| {
            self.reply(&Reply::new(501, "5.5.2", "Invalid base64"));
            Flow::Continue
        })
    }

    async fn exchange_plain(&mut self, initial: Option<String>) -> Result<Exchange, SessionError> {
        let raw = match initial {
            Some(i) => self.decode(i.as_bytes()),
            None => self.challenge("").await?,
        };
        let raw = match raw {
            Ok(r) => r,
            Err(f) => return Ok(Exchange::Aborted(f)),
        };
        // authzid NUL authcid NUL passwd
        let mut parts = raw.split(|&b| b == 0);
        let (Some(authz), Some(authc), Some(pass), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            self.reply(&Reply::new(501, "5.5.2", "Malformed PLAIN response"));
            return Ok(Exchange::Aborted(Flow::Continue));
        };
        let (Ok(user), Ok(password)) = (
            String::from_utf8(authc.to_vec()),
            String::from_utf8(pass.to_vec()),
        ) else {
            self.reply(&Reply::new(501, "5.5.2", "Credentials must be UTF-8"));
            return Ok(Exchange::Aborted(Flow::Continue));
        };
        // Acting for another identity is not supported; an empty authzid or
        // one equal to the login is.
        if !authz.is_empty() && authz != authc {
            self.reply(&Reply::new(
                535,
                "5.7.8",
                "Authorization identity must match the login",
            ));
            return Ok(Exchange::Aborted(Flow::Continue));
        }
        Ok(Exchange::Creds { user, password })
    }

    async fn exchange_login(&mut self, initial: Option<String>) -> Result<Exchange, SessionError> {
        let user = match initial {
            Some(i) => self.decode(i.as_bytes()),
            None => self.challenge("VXNlcm5hbWU6").await?,
        };
        let user = match user {
            Ok(u) => u,
            Err(f) => return Ok(Exchange::Aborted(f)),
        };
        let password = match self.challenge("UGFzc3dvcmQ6").await? {
            Ok(p) => p,
            Err(f) => return Ok(Exchange::Aborted(f)),
        };
        match (String::from_utf8(user), String::from_utf8(password)) {
            (Ok(user), Ok(password)) => Ok(Exchange::Creds { user, password }),
            _ => {
                self.reply(&Reply::new(501, "5.5.2", "Credentials must be UTF-8"));
                Ok(Exchange::Aborted(Flow::Continue))
            }
        }
    }
}
