//! Delivery: one lightweight tokio task per queued message sleeps until its
//! next attempt; a semaphore bounds how many attempts run at once. Each
//! attempt sends the pending recipients to the smarthost (or to each
//! domain's MX), records per-recipient results in the queue record
//! (rewritten atomically), and either finishes the message, bounces failed
//! recipients, or schedules a retry with exponential backoff and jitter.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::client::{HopTls, Outbound, Transport};
use crate::config::{RelayConfig, UpstreamConfig, UpstreamTls, secs};
use crate::lookup::{Resolver, ResolverError};
use crate::route::Outcome;
use crate::spool::{QueueRecord, RcptState, Spool, now_ms};
use crate::stats::RelayStats;

#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error("reading {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("upstream TLS setup: {source}")]
    Tls {
        #[source]
        source: lettre::transport::smtp::Error,
    },
    #[error("upstream TLS setup: {source}")]
    ImplicitTls {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Resolver(#[from] ResolverError),
}

pub(crate) struct Deliverer {
    pub(crate) cfg: Arc<RelayConfig>,
    spool: Spool,
    stats: Arc<RelayStats>,
    slots: Semaphore,
    pub(crate) upstream: Option<Transport>,
    /// `None` only when nothing needs DNS (a smarthost given by address)
    /// and the system's resolver configuration could not be read.
    pub(crate) resolver: Option<Resolver>,
    pub(crate) out: Outbound,
    flush: watch::Sender<u64>,
    shutdown: watch::Receiver<bool>,
    /// Ids deleted through the running handle; their tasks stop.
    deleted: Mutex<HashSet<String>>,
    /// Ids with a live task, so a flush or reload never doubles one up.
    live: Mutex<HashSet<String>>,
    queued: mpsc::UnboundedSender<QueueRecord>,
}

fn build_upstream(u: &UpstreamConfig) -> Result<Transport, DeliverError> {
    let ca = u
        .ca_file
        .as_ref()
        .map(|ca| {
            std::fs::read(ca).map_err(|source| DeliverError::Read {
                path: ca.clone(),
                source,
            })
        })
        .transpose()?;
    let tls = match u.tls {
        UpstreamTls::None => HopTls::None,
        UpstreamTls::Starttls => {
            let mut b = TlsParameters::builder(u.host.clone());
            if let Some(pem) = &ca {
                b = b.add_root_certificate(
                    Certificate::from_pem(pem).map_err(|source| DeliverError::Tls { source })?,
                );
            }
            HopTls::Required(
                b.build_rustls()
                    .map_err(|source| DeliverError::Tls { source })?,
            )
        }
        UpstreamTls::Implicit => crate::client::implicit_tls(&u.host, ca.as_deref())
            .map_err(|source| DeliverError::ImplicitTls { source })?,
    };
    let mut t = Transport {
        host: u.host.clone(),
        port: u.port,
        tls,
        credentials: None,
    };
    if let (Some(user), Some(pf)) = (&u.username, &u.password_file) {
        let text = std::fs::read_to_string(pf).map_err(|source| DeliverError::Read {
            path: pf.clone(),
            source,
        })?;
        let pw = text.lines().next().unwrap_or_default().to_owned();
        t.credentials = Some(Credentials::new(user.clone(), pw));
    }
    Ok(t)
}

impl Deliverer {
    pub(crate) fn new(
        cfg: Arc<RelayConfig>,
        spool: Spool,
        stats: Arc<RelayStats>,
        shutdown: watch::Receiver<bool>,
        queued: mpsc::UnboundedSender<QueueRecord>,
    ) -> Result<Arc<Self>, DeliverError> {
        let upstream = cfg.upstream.as_ref().map(build_upstream).transpose()?;
        // Built once: hickory's cache then serves every attempt (a new
        // resolver per lookup, as before, cached nothing).
        let needs_dns = upstream
            .as_ref()
            .is_none_or(|u| crate::lookup::ip_literal(&u.host).is_none());
        let resolver = match Resolver::new(&cfg.nameservers) {
            Ok(r) => Some(r),
            Err(e) if !needs_dns => {
                tracing::warn!(error = %e, "no DNS resolver; the smarthost is given by address, so none is needed");
                None
            }
            Err(e) => return Err(e.into()),
        };
        let out = Outbound::new(
            ClientId::Domain(cfg.hostname.clone()),
            cfg.delivery_mark,
            secs(cfg.retry.attempt_timeout_secs),
        );
        Ok(Arc::new(Self {
            slots: Semaphore::new(cfg.delivery_workers),
            cfg,
            spool,
            stats,
            upstream,
            resolver,
            out,
            flush: watch::channel(0).0,
            shutdown,
            deleted: Mutex::default(),
            live: Mutex::default(),
            queued,
        }))
    }

    /// Feeds new (and recovered) messages into their tasks until shutdown.
    pub(crate) async fn run(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<QueueRecord>) {
        let mut shutdown = self.shutdown.clone();
        loop {
            tokio::select! {
                rec = rx.recv() => match rec {
                    Some(rec) => self.spawn(rec),
                    None => return,
                },
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }

    fn spawn(self: &Arc<Self>, rec: QueueRecord) {
        if !self
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(rec.id.clone())
        {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let id = rec.id.clone();
            me.message_task(rec).await;
            me.live
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&id);
        });
    }

    /// Makes every waiting message try now.
    pub(crate) fn flush(&self) {
        self.flush.send_modify(|g| *g += 1);
    }

    /// Stops a message's task (if running) and removes it from the spool.
    pub(crate) fn delete(&self, id: &str) -> Result<(), crate::spool::SpoolError> {
        self.deleted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.to_owned());
        self.spool.remove(id)?;
        RelayStats::dec(&self.stats.queue_length);
        Ok(())
    }

    fn is_deleted(&self, id: &str) -> bool {
        self.deleted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(id)
    }

    async fn message_task(&self, mut rec: QueueRecord) {
        let mut flush = self.flush.subscribe();
        let mut shutdown = self.shutdown.clone();
        loop {
            let wait = Duration::from_millis(rec.next_attempt_unix_ms.saturating_sub(now_ms()));
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = flush.changed() => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            let Ok(_slot) = self.slots.acquire().await else {
                return;
            };
            if self.is_deleted(&rec.id) || *self.shutdown.borrow() {
                return;
            }
            if self.attempt(&mut rec).await {
                return;
            }
        }
    }

    /// One delivery attempt; true when the message is finished (delivered,
    /// bounced or dropped) and its task can end.
    async fn attempt(&self, rec: &mut QueueRecord) -> bool {
        // Whole, its DKIM signatures first: lettre sends from a slice. The buffer goes back to the OS
        // afterwards (`mem`), so memory is delivery_workers x message size
        // at most while sending, and not kept.
        let signature = rec.dkim_signature.as_deref().unwrap_or_default().as_bytes();
        let body = match crate::mem::read_returned_on_free(
            signature,
            &self.spool.body_path(&rec.id),
        )
        .await
        {
            Ok(b) => b,
            Err(_) if !self.spool.exists(&rec.id) => {
                // Deleted behind our back (offline `queue delete`): done.
                tracing::info!(id = rec.id, "message removed from the spool; dropping it");
                return true;
            }
            Err(e) => {
                tracing::error!(id = rec.id, error = %e, "queued body unreadable; will retry");
                self.reschedule(rec).await;
                return false;
            }
        };
        let pending: Vec<String> = rec.pending().map(|r| r.address.clone()).collect();
        let results = self.send(rec, &pending, &body).await;
        rec.attempts += 1;
        let expired = now_ms().saturating_sub(rec.created_unix_ms)
            > secs(self.cfg.retry.max_lifetime_secs).as_millis() as u64;
        // `delivered` already marked the 250s (journalled at once): count
        // every recipient this attempt was for, not just those still
        // pending.
        let tried: HashSet<&str> = pending.iter().map(String::as_str).collect();
        for r in rec
            .recipients
            .iter_mut()
            .filter(|r| tried.contains(r.address.as_str()))
        {
            r.attempts += 1;
            match results.get(&r.address) {
                Some(Outcome::Delivered) => {
                    r.state = RcptState::Delivered;
                    r.last_error = None;
                    RelayStats::inc(&self.stats.recipients_delivered);
                }
                Some(Outcome::Permanent(e)) => {
                    r.state = RcptState::Failed;
                    r.last_error = Some(e.clone());
                }
                Some(Outcome::Transient(e)) => {
                    r.last_error = Some(e.clone());
                    if expired {
                        r.state = RcptState::Failed;
                        // The leading code makes the DSN say 4.4.7 (expired).
                        r.last_error = Some(format!(
                            "4.4.7 delivery time expired after {} attempts; last error: {e}",
                            r.attempts
                        ));
                    }
                }
                None => {}
            }
        }
        for r in &rec.recipients {
            tracing::info!(id = rec.id, rcpt = r.address, state = ?r.state, error = r.last_error.as_deref().unwrap_or(""), "delivery attempt");
        }
        // Bounce what failed for good now, not when the rest is done: a
        // recipient refused with 5xx must not wait days for another that
        // is deferred (Postfix bounces at once too).
        self.notify_failures(rec, &body).await;
        self.warn_delayed(rec, &body).await;
        let unfinished = rec.pending().next().is_some()
            || rec
                .recipients
                .iter()
                .any(|r| r.state == RcptState::Failed && !r.notified);
        if unfinished {
            if rec.pending().next().is_some() {
                RelayStats::inc(&self.stats.deliveries_deferred);
            }
            self.reschedule(rec).await;
            return false;
        }
        if rec
            .recipients
            .iter()
            .any(|r| r.state == RcptState::Delivered)
        {
            RelayStats::inc(&self.stats.messages_delivered);
            let age = Duration::from_millis(now_ms().saturating_sub(rec.created_unix_ms));
            self.stats.observe_delivery_latency(age);
        }
        let spool = self.spool.clone();
        let id = rec.id.clone();
        match tokio::task::spawn_blocking(move || spool.remove(&id)).await {
            // NotFound: `delivered` removed it at the last 250 already.
            Ok(Ok(()) | Err(crate::spool::SpoolError::NotFound { .. })) => {
                RelayStats::dec(&self.stats.queue_length);
            }
            Ok(Err(e)) => tracing::error!(id = rec.id, error = %e, "removing delivered message"),
            Err(e) => tracing::error!(id = rec.id, error = %e, "removing delivered message"),
        }
        true
    }

    /// Queues one bounce for the failed recipients the sender has not been
    /// told about yet, and marks them told (the caller's rewrite or removal
    /// of the record makes that stick). Never bounces a bounce. If the
    /// bounce cannot be queued they stay untold, and the message stays
    /// queued so the next attempt tries again.
    async fn notify_failures(&self, rec: &mut QueueRecord, body: &[u8]) {
        let failed: Vec<_> = rec
            .recipients
            .iter()
            .filter(|r| r.state == RcptState::Failed && !r.notified)
            .cloned()
            .collect();
        if failed.is_empty() {
            return;
        }
        let mark = |rec: &mut QueueRecord| {
            for r in &mut rec.recipients {
                if r.state == RcptState::Failed {
                    r.notified = true;
                }
            }
        };
        if rec.is_dsn || rec.from.is_empty() {
            tracing::warn!(
                id = rec.id,
                "undeliverable bounce or null-sender message: failed recipients dropped"
            );
            mark(rec);
            return;
        }
        let refs: Vec<_> = failed.iter().collect();
        let addrs: Vec<&str> = failed.iter().map(|r| r.address.as_str()).collect();
        let (dsn, dsn_body) = crate::dsn::build_with_id(
            crate::dsn::bounce_id(&rec.id, &addrs),
            &self.cfg.hostname,
            rec,
            &refs,
            crate::dsn::header_section(body),
        );
        match self.spool.commit(dsn.clone(), dsn_body).await {
            Ok(()) => {
                RelayStats::inc(&self.stats.messages_bounced);
                RelayStats::inc(&self.stats.queue_length);
                tracing::info!(id = rec.id, dsn = dsn.id, recipients = ?addrs, "bounce queued");
                let _ = self.queued.send(dsn);
                mark(rec);
            }
            Err(e) => {
                // Keep the original so the bounce is not lost.
                tracing::error!(id = rec.id, error = %e, "could not queue bounce; keeping message");
            }
        }
    }

    /// Whether `rec` is still owed its delay warning.
    fn warning_due_at(&self, rec: &QueueRecord) -> Option<u64> {
        let after = self.cfg.retry.delay_warning_secs;
        // Nobody to tell for bounces and null-sender mail, and nothing to
        // warn about past the point where it would bounce anyway.
        (after > 0.0
            && !rec.delay_warned
            && !rec.is_dsn
            && !rec.from.is_empty()
            && after < self.cfg.retry.max_lifetime_secs)
            .then(|| rec.created_unix_ms + secs(after).as_millis() as u64)
    }

    /// Once per message, when it has waited `retry.delay_warning_secs` and
    /// recipients are still pending: an `Action: delayed` DSN to the sender
    /// naming them. Marked in the record (the caller's rewrite makes it
    /// stick); a warning that cannot be queued is tried again next attempt.
    async fn warn_delayed(&self, rec: &mut QueueRecord, body: &[u8]) {
        let Some(due) = self.warning_due_at(rec) else {
            return;
        };
        let waiting: Vec<_> = rec.pending().cloned().collect();
        if waiting.is_empty() || now_ms() < due {
            return;
        }
        let refs: Vec<_> = waiting.iter().collect();
        let until = std::time::UNIX_EPOCH
            + Duration::from_millis(rec.created_unix_ms)
            + secs(self.cfg.retry.max_lifetime_secs);
        let report = crate::dsn::Report::Delayed {
            waited: Duration::from_millis(now_ms().saturating_sub(rec.created_unix_ms)),
            until,
        };
        let (dsn, dsn_body) = crate::dsn::build_report(
            crate::dsn::delay_warning_id(&rec.id),
            report,
            &self.cfg.hostname,
            rec,
            &refs,
            crate::dsn::header_section(body),
        );
        match self.spool.commit(dsn.clone(), dsn_body).await {
            Ok(()) => {
                RelayStats::inc(&self.stats.delay_warnings);
                RelayStats::inc(&self.stats.queue_length);
                let addrs: Vec<&str> = waiting.iter().map(|r| r.address.as_str()).collect();
                tracing::info!(id = rec.id, dsn = dsn.id, recipients = ?addrs, "delay warning queued");
                let _ = self.queued.send(dsn);
                rec.delay_warned = true;
            }
            Err(e) => {
                tracing::error!(id = rec.id, error = %e, "could not queue delay warning; will retry");
            }
        }
    }

    async fn reschedule(&self, rec: &mut QueueRecord) {
        let r = &self.cfg.retry;
        let exp = r.initial_backoff_secs
            * 2f64.powi(
                i32::try_from(rec.attempts.saturating_sub(1))
                    .unwrap_or(30)
                    .min(30),
            );
        let base = exp.min(r.max_backoff_secs);
        // ±20% jitter so messages that failed together do not retry together.
        let jitter = 0.8 + 0.4 * crate::random::unit_f64();
        rec.next_attempt_unix_ms = now_ms() + secs(base * jitter).as_millis() as u64;
        // An attempt at the warning's time, so it is not up to a whole
        // backoff late (the attempt may deliver, and then none is due).
        // (Only ahead: a warning that could not be queued waits for the
        // next ordinary attempt rather than spinning.)
        if let Some(due) = self.warning_due_at(rec).filter(|d| *d > now_ms()) {
            rec.next_attempt_unix_ms = rec.next_attempt_unix_ms.min(due);
        }
        let spool = self.spool.clone();
        let snapshot = rec.clone();
        match tokio::task::spawn_blocking(move || spool.rewrite(&snapshot)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(id = rec.id, error = %e, "rewriting queue record"),
            Err(e) => tracing::error!(id = rec.id, error = %e, "rewriting queue record"),
        }
    }
}

impl Deliverer {
    /// The next hop answered 250 for `addrs`: record it durably before
    /// doing anything else, so a crash from here on cannot send them again.
    /// If that was the last recipient, the message is removed outright (its
    /// record's unlink is the commit point); otherwise "delivered" lines are
    /// appended to its journal. Either takes one syscall to survive a
    /// kill -9 (the fsyncs that follow are for power loss).
    pub(crate) async fn delivered(&self, rec: &mut QueueRecord, addrs: &[String]) {
        for r in rec
            .recipients
            .iter_mut()
            .filter(|r| addrs.contains(&r.address))
        {
            r.state = RcptState::Delivered;
            r.last_error = None;
        }
        let all = rec
            .recipients
            .iter()
            .all(|r| r.state == RcptState::Delivered);
        // The syscall that makes the delivery survive a kill -9 runs right
        // here, on the reactor thread: a quick unlink or a short append,
        // and a hop to the blocking pool first was measurably part of the
        // window. The fsyncs (for power loss) go to the blocking pool.
        let spool = self.spool.clone();
        let id = rec.id.clone();
        let res = if all {
            match spool.unlink_record(&id) {
                Ok(()) => tokio::task::spawn_blocking(move || spool.remove_rest(&id))
                    .await
                    .unwrap_or(Ok(())),
                Err(e) => Err(e),
            }
        } else {
            match spool.journal_append(&id, addrs) {
                Ok(pending) => tokio::task::spawn_blocking(move || pending.sync())
                    .await
                    .unwrap_or(Ok(())),
                Err(e) => Err(e),
            }
        };
        match res {
            // Deleted meanwhile (`queue delete`): nothing left to record.
            Ok(()) | Err(crate::spool::SpoolError::NotFound { .. }) => {}
            Err(e) => tracing::error!(id = rec.id, error = %e, "recording delivery"),
        }
    }
}
