//! DATA: read the message strictly, add a Received header, spool durably,
//! and answer 250 only once the message is on disk.

use tokio::io::{AsyncRead, AsyncWrite};

use std::time::Duration;

use tokio::time::Instant;

use super::{Deadline, Fill, Flow, Limit, Phase, Session, SessionError};
use crate::config::secs;
use crate::dataread::{DataReader, Feed, Verdict};
use crate::reply::{Reply, canned};
use crate::spool::{QueueRecord, RcptState, RecipientStatus, new_id, now_ms};
use crate::stats::RelayStats;

/// More Received headers than this means a mail loop (RFC 5321 6.3).
const MAX_HOPS: usize = 30;

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub(super) async fn cmd_data(&mut self) -> Result<Flow, SessionError> {
        if self.login.is_none() {
            self.reply(&canned::auth_required());
            return Ok(Flow::Continue);
        }
        match self.phase() {
            Phase::Rcpt => {}
            Phase::Mail => {
                self.reply(&canned::bad_sequence("Need RCPT before DATA"));
                return Ok(Flow::Continue);
            }
            Phase::Fresh | Phase::Greeted => {
                self.reply(&canned::bad_sequence("Need MAIL before DATA"));
                return Ok(Flow::Continue);
            }
        }
        let user = self.login.as_ref().expect("checked").user.clone();
        let nrcpt =
            u32::try_from(self.txn.as_ref().expect("phase Rcpt").rcpts.len()).unwrap_or(u32::MAX);
        // Other sessions of the same user may have sent since RCPT.
        if self.shared.limits.rate.check(&user, nrcpt).is_err() {
            self.txn = None;
            self.reply(&Reply::new(
                450,
                "4.7.1",
                "Sending rate limit exceeded, try again later",
            ));
            return Ok(Flow::Continue);
        }
        self.reply(&Reply::new(354, "", "End data with <CR><LF>.<CR><LF>"));

        let mut reader = DataReader::new(self.cfg().limits.max_message_bytes);
        let grace = secs(self.cfg().limits.data_timeout_secs);
        let rate = self.cfg().limits.data_min_bytes_per_sec;
        let started = Instant::now();
        let mut received: u64 = 0;
        loop {
            received += self.rbuf.len() as u64;
            match reader.feed(&self.rbuf) {
                Feed::NeedMore => self.rbuf.clear(),
                Feed::Done { consumed } => {
                    // What follows the terminator is the next pipelined command.
                    self.rbuf.drain(..consumed);
                    break;
                }
                Feed::BareNewline { .. } => {
                    tracing::warn!(peer = %self.peer, user, "bare CR/LF in DATA (SMTP smuggling attempt?); closing");
                    RelayStats::inc(&self.shared.stats.messages_rejected);
                    self.txn = None;
                    self.rbuf.clear();
                    self.reply(&Reply::new(
                        521,
                        "5.5.2",
                        "Bare CR or LF in message data is not allowed (SMTP smuggling protection); closing",
                    ));
                    return Ok(Flow::Close);
                }
            }
            // Idle at most `grace` per read, and the whole DATA within
            // `grace` plus what the minimum rate allows for the bytes so
            // far: one byte every 20 s kept DATA open past 420 s before.
            let mut deadline = Deadline {
                at: Instant::now() + grace,
                limit: Limit::Idle,
            }
            .min(self.session_deadline());
            if rate > 0 {
                deadline = deadline.min(Deadline {
                    at: started + grace + Duration::from_secs_f64(received as f64 / rate as f64),
                    limit: Limit::DataRate,
                });
            }
            match self.fill(deadline, false).await? {
                Fill::Data => {}
                Fill::Eof | Fill::Shutdown | Fill::Evicted => return Ok(Flow::Close),
                Fill::Expired(limit) => {
                    tracing::info!(peer = %self.peer, user, received, "DATA too slow");
                    self.txn = None;
                    self.expired(limit);
                    return Ok(Flow::Close);
                }
            }
        }
        let verdict = reader.verdict();
        let body = reader.into_body();
        let end = crate::headers::header_end(&body);
        let section = &body[..end.fields_len];
        let refusal = match verdict {
            Verdict::TooBig => Some(Reply::new(
                552,
                "5.3.4",
                "Message size exceeds fixed maximum message size",
            )),
            Verdict::LineTooLong => Some(Reply::new(
                550,
                "5.6.0",
                "Message has lines longer than 998 characters",
            )),
            Verdict::Ok if count_received(section) > MAX_HOPS => Some(Reply::new(
                554,
                "5.4.6",
                "Too many Received headers: mail loop?",
            )),
            Verdict::Ok => self.check_header_from(section),
        };
        let txn = self.txn.take().expect("phase Rcpt");
        if let Some(r) = refusal {
            RelayStats::inc(&self.shared.stats.messages_rejected);
            self.reply(&r);
            return Ok(Flow::Continue);
        }

        let id = new_id();
        let mut msg = self.header_block(&id, &txn.rcpts, section, end.blank_line);
        msg.extend_from_slice(&body[end.body_start()..]);
        let now = now_ms();
        let record = QueueRecord {
            id: id.clone(),
            from: txn.from.to_string(),
            recipients: txn
                .rcpts
                .iter()
                .map(|r| RecipientStatus {
                    address: r.to_string(),
                    state: RcptState::Pending,
                    attempts: 0,
                    last_error: None,
                })
                .collect(),
            created_unix_ms: now,
            next_attempt_unix_ms: now,
            attempts: 0,
            auth_user: Some(user.clone()),
            client: self.peer.ip().to_string(),
            is_dsn: false,
            size: msg.len() as u64,
        };
        match self.shared.spool.commit(record.clone(), msg).await {
            Ok(()) => {
                self.shared.limits.rate.record(&user, nrcpt);
                RelayStats::inc(&self.shared.stats.messages_accepted);
                self.junk = 0;
                RelayStats::inc(&self.shared.stats.queue_length);
                tracing::info!(peer = %self.peer, user, id, from = %txn.from, rcpts = txn.rcpts.len(), "queued");
                let _ = self.shared.queued.send(record);
                self.reply(&Reply::new(250, "2.0.0", format!("Ok: queued as {id}")));
            }
            Err(e) => {
                tracing::error!(error = %e, "spooling failed");
                RelayStats::inc(&self.shared.stats.messages_rejected);
                self.reply(&Reply::new(
                    451,
                    "4.3.0",
                    "Local error in processing, try again later",
                ));
            }
        }
        Ok(Flow::Continue)
    }
}

/// Counts Received: fields in the header section.
fn count_received(section: &[u8]) -> usize {
    crate::headers::fields(section)
        .iter()
        .filter(|f| f.is("Received"))
        .count()
}
