//! MAIL and RCPT. Never an open relay: both need an authenticated session on
//! every listener, and the sender must belong to the authenticated user.

use tokio::io::{AsyncRead, AsyncWrite};

use super::{Flow, ListenerKind, Phase, Session, Txn};
use crate::parse::{Address, MailParams};
use crate::reply::{Reply, canned};

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// The refusal for MAIL/RCPT without AUTH; on the intercept listener it
    /// tells the user where to submit instead.
    fn auth_refusal(&self) -> Reply {
        if self.kind == ListenerKind::Intercept {
            Reply::new(530, "5.7.0", self.cfg().intercept_message.clone())
        } else {
            canned::auth_required()
        }
    }

    pub(super) fn cmd_mail(&mut self, from: Option<Address>, params: &MailParams) -> Flow {
        let r = self.check_mail(from, params);
        self.reply(&r);
        Flow::Continue
    }

    fn check_mail(&mut self, from: Option<Address>, params: &MailParams) -> Reply {
        match self.phase() {
            Phase::Fresh => return canned::bad_sequence("Send EHLO/HELO first"),
            Phase::Mail | Phase::Rcpt => return canned::bad_sequence("Nested MAIL command"),
            Phase::Greeted => {}
        }
        let Some(login) = &self.login else {
            tracing::info!(peer = %self.peer, listener = ?self.kind, "MAIL without AUTH refused");
            return self.auth_refusal();
        };
        let Some(from) = from else {
            // Bounces come from MTAs, not from submitting users.
            return Reply::new(550, "5.7.1", "Null sender not allowed for submission");
        };
        if !from.is_ascii() && !params.smtputf8 {
            return Reply::new(553, "5.6.7", "Non-ASCII address needs SMTPUTF8");
        }
        if !login.entry.may_send_as(&from) {
            tracing::warn!(peer = %self.peer, user = login.user, from = %from, "sender login mismatch");
            return Reply::new(
                553,
                "5.7.1",
                format!("Sender address rejected: not owned by user {}", login.user),
            );
        }
        if params
            .size
            .is_some_and(|s| s > self.cfg().limits.max_message_bytes as u64)
        {
            return Reply::new(
                552,
                "5.3.4",
                "Message size exceeds fixed maximum message size",
            );
        }
        if let Err(e) = self.shared.limits.rate.check(&login.user, 0) {
            tracing::warn!(peer = %self.peer, error = %e, "rate limited");
            return Reply::new(450, "4.7.1", "Sending rate limit exceeded, try again later");
        }
        // BODY=8BITMIME needs nothing from us: we relay bytes as received and
        // never downgrade.
        self.txn = Some(Txn {
            from,
            rcpts: Vec::new(),
            smtputf8: params.smtputf8,
        });
        Reply::new(250, "2.1.0", "Sender ok")
    }

    pub(super) fn cmd_rcpt(&mut self, to: Address) -> Flow {
        let r = self.check_rcpt(to);
        self.reply(&r);
        Flow::Continue
    }

    fn check_rcpt(&mut self, to: Address) -> Reply {
        if self.login.is_none() {
            // Checked before the sequence so an unauthenticated client
            // always learns that AUTH is the problem.
            return self.auth_refusal();
        }
        let max = self.cfg().limits.max_recipients;
        let Some(txn) = &self.txn else {
            return canned::bad_sequence("Need MAIL before RCPT");
        };
        if !to.is_ascii() && !txn.smtputf8 {
            return Reply::new(553, "5.6.7", "Non-ASCII address needs SMTPUTF8");
        }
        if txn.rcpts.contains(&to) {
            return Reply::new(250, "2.1.5", "Recipient ok (duplicate)");
        }
        if txn.rcpts.len() >= max {
            return Reply::new(452, "4.5.3", "Too many recipients");
        }
        let n = u32::try_from(txn.rcpts.len() + 1).unwrap_or(u32::MAX);
        let user = &self.login.as_ref().expect("checked above").user;
        if let Err(e) = self.shared.limits.rate.check(user, n) {
            tracing::warn!(peer = %self.peer, error = %e, "rate limited");
            return Reply::new(450, "4.7.1", "Sending rate limit exceeded, try again later");
        }
        self.txn.as_mut().expect("checked above").rcpts.push(to);
        Reply::new(250, "2.1.5", "Recipient ok")
    }
}
