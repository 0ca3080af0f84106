//! DATA: read the message strictly, fix its header section, stream it to
//! the spool as it arrives, and answer 250 only once it is on disk.
//!
//! Only the header section (it must be complete before the Received header
//! can be written and From: checked, and is capped at `MAX_HEADER_SECTION`)
//! and small bodies (`spool::SPILL_AT`) are held in memory; larger bodies
//! go to a temp file in the spool through a small buffer, so a session
//! costs tens of KiB plus buffers whatever the message size (issue 12: 16 sessions holding 24 MiB of DATA each took the
//! agent from 199 to 926 MiB).

use tokio::io::{AsyncRead, AsyncWrite};

use std::time::Duration;

use tokio::time::Instant;

use super::{Deadline, Fill, Flow, Limit, Phase, Session, SessionError};
use crate::config::secs;
use crate::dataread::{DataReader, Feed, Verdict};
use crate::dkim::{KeySet, MessageSigner};
use crate::headers;
use crate::parse::Address;
use crate::reply::{Reply, canned};
use crate::spool::{
    IncomingBody, QueueRecord, RcptState, RecipientStatus, SpoolError, new_id, now_ms,
};
use crate::stats::RelayStats;

/// More Received headers than this means a mail loop (RFC 5321 6.3).
const MAX_HOPS: usize = 30;
/// Header sections above this are refused (Postfix's header_size_limit is
/// 100 KiB): it bounds what one session holds in memory.
pub(crate) const MAX_HEADER_SECTION: usize = 128 * 1024;

/// Where the incoming message stands.
enum Stage<'k> {
    /// Still in the header section: kept in memory.
    Headers(Vec<u8>),
    /// Header section done; the rest goes to the spool (in memory while
    /// small, see `spool::SPILL_AT`), and through the DKIM signer when the
    /// signing domain has keys.
    Body(IncomingBody, Option<MessageSigner<'k>>),
    /// Refused already (header checks): read to the end, then say why.
    Refused(Reply),
    /// Could not write to the spool: read to the end, then 451.
    Failed(SpoolError),
}

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
        let id = new_id();
        let rcpts = self.txn.as_ref().expect("phase Rcpt").rcpts.clone();
        // The keys as they are now: a reload during this DATA applies to
        // the next message.
        let keys = self.shared.dkim.snapshot();
        let mut stage = Stage::Headers(Vec::new());
        let mut out = Vec::new();
        loop {
            received += self.rbuf.len() as u64;
            let fed = reader.feed_into(&self.rbuf, &mut out);
            let done = match fed {
                Feed::NeedMore => {
                    self.rbuf.clear();
                    false
                }
                Feed::Done { consumed } => {
                    // What follows the terminator is the next pipelined command.
                    self.rbuf.drain(..consumed);
                    true
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
            };
            stage = self.absorb(stage, &out, done, &id, &rcpts, &keys).await;
            out.clear();
            if done {
                break;
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
        let txn = self.txn.take().expect("phase Rcpt");
        let refusal = match (reader.verdict(), stage) {
            (Verdict::TooBig, _) => Err(Reply::new(
                552,
                "5.3.4",
                "Message size exceeds fixed maximum message size",
            )),
            (Verdict::LineTooLong, _) => Err(Reply::new(
                550,
                "5.6.0",
                "Message has lines longer than 998 characters",
            )),
            (Verdict::Ok, Stage::Refused(r)) => Err(r),
            (Verdict::Ok, Stage::Failed(e)) => {
                tracing::error!(error = %e, "spooling failed");
                Err(Reply::new(
                    451,
                    "4.3.0",
                    "Local error in processing, try again later",
                ))
            }
            (Verdict::Ok, Stage::Body(b, signer)) => signer
                .map(MessageSigner::finish)
                .transpose()
                .map(|sig| (b, sig))
                .map_err(|e| {
                    // Keys are test-signed when loaded, so this is a bug or
                    // a broken crypto library: the client retries rather
                    // than the mail leaving unsigned (and failing DMARC).
                    tracing::error!(error = %e, "DKIM signing failed");
                    Reply::new(451, "4.3.0", "Local error in processing, try again later")
                }),
            (Verdict::Ok, Stage::Headers(_)) => unreachable!("absorb ends the headers at the end"),
        };
        let (body, dkim_signature) = match refusal {
            Ok(b) => b,
            Err(r) => {
                // Dropping the stage removed any temp file.
                RelayStats::inc(&self.shared.stats.messages_rejected);
                self.reply(&r);
                return Ok(Flow::Continue);
            }
        };
        let signed = dkim_signature.is_some();

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
                    notified: false,
                })
                .collect(),
            created_unix_ms: now,
            next_attempt_unix_ms: now,
            attempts: 0,
            auth_user: Some(user.clone()),
            client: self.peer.ip().to_string(),
            is_dsn: false,
            size: body.len() + dkim_signature.as_ref().map_or(0, |s| s.len() as u64),
            smtputf8: txn.smtputf8,
            dkim_signature,
            delay_warned: false,
        };
        match self
            .shared
            .spool
            .commit_incoming(record.clone(), body)
            .await
        {
            Ok(()) => {
                self.shared.limits.rate.record(&user, nrcpt);
                RelayStats::inc(&self.shared.stats.messages_accepted);
                if signed {
                    RelayStats::inc(&self.shared.stats.messages_signed);
                }
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

    /// Takes the next unstuffed bytes of the message (`end`: there are no
    /// more) into the stage they belong to.
    async fn absorb<'k>(
        &mut self,
        stage: Stage<'k>,
        bytes: &[u8],
        end: bool,
        id: &str,
        rcpts: &[Address],
        keys: &'k KeySet,
    ) -> Stage<'k> {
        match stage {
            Stage::Headers(mut buf) => {
                buf.extend_from_slice(bytes);
                let found = if end {
                    Some(headers::header_end(&buf))
                } else {
                    headers::header_end_partial(&buf)
                };
                match found {
                    Some(e) if e.fields_len > MAX_HEADER_SECTION => {
                        Stage::Refused(too_big_headers())
                    }
                    Some(e) => self.start_body(&buf, e, id, rcpts, keys).await,
                    None if buf.len() > MAX_HEADER_SECTION => Stage::Refused(too_big_headers()),
                    None => Stage::Headers(buf),
                }
            }
            Stage::Body(mut b, mut signer) => {
                if let Some(s) = &mut signer {
                    s.write(bytes);
                }
                match b.write(&self.shared.spool, id, bytes).await {
                    Ok(()) => Stage::Body(b, signer),
                    Err(e) => Stage::Failed(e),
                }
            }
            done @ (Stage::Refused(_) | Stage::Failed(_)) => done,
        }
    }

    /// The header section is complete: check it, then open the spool file
    /// with the fixed header block and what has arrived of the body, and
    /// start signing if the signing domain has keys. The signer sees
    /// exactly the bytes the spool gets, after the header fixes (Received,
    /// Message-ID, Date), so the signature covers what is sent.
    async fn start_body<'k>(
        &mut self,
        buf: &[u8],
        end: headers::HeaderEnd,
        id: &str,
        rcpts: &[Address],
        keys: &'k KeySet,
    ) -> Stage<'k> {
        let section = &buf[..end.fields_len];
        if count_received(section) > MAX_HOPS {
            return Stage::Refused(Reply::new(
                554,
                "5.4.6",
                "Too many Received headers: mail loop?",
            ));
        }
        if let Some(r) = self.check_header_from(section) {
            return Stage::Refused(r);
        }
        let block = self.header_block(id, rcpts, section, end.blank_line);
        let mut signer = self
            .signing_domain(section)
            .and_then(|d| keys.signer_for(&d));
        let mut body = IncomingBody::new();
        for part in [&block[..], &buf[end.body_start()..]] {
            if let Some(s) = &mut signer {
                s.write(part);
            }
            if let Err(e) = body.write(&self.shared.spool, id, part).await {
                return Stage::Failed(e);
            }
        }
        Stage::Body(body, signer)
    }
}

fn too_big_headers() -> Reply {
    Reply::new(552, "5.3.4", "Message header section too large")
}

/// Counts Received: fields in the header section.
fn count_received(section: &[u8]) -> usize {
    crate::headers::fields(section)
        .iter()
        .filter(|f| f.is("Received"))
        .count()
}
