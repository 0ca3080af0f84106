//! Delivery: one lightweight tokio task per queued message sleeps until its
//! next attempt; a semaphore bounds how many attempts run at once. Each
//! attempt sends the pending recipients to the smarthost (or to each
//! domain's MX), records per-recipient results in the queue record
//! (rewritten atomically), and either finishes the message, bounces failed
//! recipients, or schedules a retry with exponential backoff and jitter.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::client::{HopError, HopTls, Transport};
use crate::config::{RelayConfig, UpstreamConfig, UpstreamTls, secs};
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
}

/// Outcome for one recipient of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Delivered,
    Transient(String),
    Permanent(String),
}

pub(crate) struct Deliverer {
    cfg: Arc<RelayConfig>,
    spool: Spool,
    stats: Arc<RelayStats>,
    slots: Semaphore,
    upstream: Option<Transport>,
    flush: watch::Sender<u64>,
    shutdown: watch::Receiver<bool>,
    /// Ids deleted through the running handle; their tasks stop.
    deleted: Mutex<HashSet<String>>,
    /// Ids with a live task, so a flush or reload never doubles one up.
    live: Mutex<HashSet<String>>,
    queued: mpsc::UnboundedSender<QueueRecord>,
}

fn build_upstream(cfg: &RelayConfig, u: &UpstreamConfig) -> Result<Transport, DeliverError> {
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
        hello: ClientId::Domain(cfg.hostname.clone()),
        credentials: None,
        timeout: secs(cfg.retry.attempt_timeout_secs),
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
        let upstream = cfg
            .upstream
            .as_ref()
            .map(|u| build_upstream(&cfg, u))
            .transpose()?;
        Ok(Arc::new(Self {
            slots: Semaphore::new(cfg.delivery_workers),
            cfg,
            spool,
            stats,
            upstream,
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
        // Whole: lettre sends from a slice. The buffer goes back to the OS
        // afterwards (`mem`), so memory is delivery_workers x message size
        // at most while sending, and not kept.
        let body = match crate::mem::read_returned_on_free(&self.spool.body_path(&rec.id)).await {
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
        let results = if let Some(t) = &self.upstream {
            self.send_group(
                t,
                rec,
                &pending,
                &body,
                secs(self.cfg.retry.attempt_timeout_secs),
            )
            .await
        } else {
            self.send_mx(rec, &pending, &body).await
        };
        rec.attempts += 1;
        let expired = now_ms().saturating_sub(rec.created_unix_ms)
            > secs(self.cfg.retry.max_lifetime_secs).as_millis() as u64;
        for r in rec
            .recipients
            .iter_mut()
            .filter(|r| r.state == RcptState::Pending)
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
        let failed: Vec<_> = rec
            .recipients
            .iter()
            .filter(|r| r.state == RcptState::Failed)
            .cloned()
            .collect();
        if rec.pending().next().is_some() {
            RelayStats::inc(&self.stats.deliveries_deferred);
            self.reschedule(rec).await;
            return false;
        }
        // Finished: bounce failures (never bounce a bounce), then drop it.
        if !failed.is_empty() && !rec.is_dsn && !rec.from.is_empty() {
            let refs: Vec<_> = failed.iter().collect();
            let (dsn, dsn_body) = crate::dsn::build_with_id(
                crate::dsn::bounce_id(&rec.id),
                &self.cfg.hostname,
                rec,
                &refs,
                crate::dsn::header_section(&body),
            );
            match self.spool.commit(dsn.clone(), dsn_body).await {
                Ok(()) => {
                    RelayStats::inc(&self.stats.messages_bounced);
                    RelayStats::inc(&self.stats.queue_length);
                    tracing::info!(id = rec.id, dsn = dsn.id, "bounce queued");
                    let _ = self.queued.send(dsn);
                }
                Err(e) => {
                    // Keep the original so the bounce is not lost.
                    tracing::error!(id = rec.id, error = %e, "could not queue bounce; keeping message");
                    self.reschedule(rec).await;
                    return false;
                }
            }
        } else if !failed.is_empty() {
            tracing::warn!(
                id = rec.id,
                "undeliverable bounce or null-sender message dropped"
            );
        }
        if failed.len() < rec.recipients.len() {
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
        let spool = self.spool.clone();
        let snapshot = rec.clone();
        match tokio::task::spawn_blocking(move || spool.rewrite(&snapshot)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(id = rec.id, error = %e, "rewriting queue record"),
            Err(e) => tracing::error!(id = rec.id, error = %e, "rewriting queue record"),
        }
    }

    async fn send_mx(
        &self,
        rec: &mut QueueRecord,
        rcpts: &[String],
        body: &[u8],
    ) -> BTreeMap<String, Outcome> {
        let mut by_domain: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for r in rcpts {
            let domain = r.rsplit_once('@').map_or("", |(_, d)| d).to_owned();
            by_domain.entry(domain).or_default().push(r.clone());
        }
        let mut out = BTreeMap::new();
        for (domain, group) in by_domain {
            let res = self.send_domain(&domain, rec, &group, body).await;
            out.extend(res);
        }
        out
    }

    async fn send_domain(
        &self,
        domain: &str,
        rec: &mut QueueRecord,
        rcpts: &[String],
        body: &[u8],
    ) -> BTreeMap<String, Outcome> {
        let all = |o: Outcome| rcpts.iter().map(|r| (r.clone(), o.clone())).collect();
        let hosts = match mx_hosts(domain).await {
            Ok(h) if h.is_empty() => {
                return all(Outcome::Permanent(format!(
                    "550 5.1.2 domain {domain} does not accept mail (null MX)"
                )));
            }
            Ok(h) => h,
            Err(e) => return all(e),
        };
        let timeout = secs(self.cfg.retry.attempt_timeout_secs);
        let mut last = Outcome::Transient(format!("451 4.4.1 no MX for {domain} reachable"));
        for host in hosts {
            // Opportunistic STARTTLS, as MTA-to-MTA SMTP does without
            // MTA-STS/DANE; the hostname is the MX name.
            let tls = match TlsParameters::new_rustls(host.clone()) {
                Ok(p) => HopTls::Opportunistic(p),
                Err(_) => HopTls::None,
            };
            let t = Transport {
                host: host.clone(),
                port: 25,
                tls,
                hello: ClientId::Domain(self.cfg.hostname.clone()),
                credentials: None,
                timeout,
            };
            let res = self.send_group(&t, rec, rcpts, body, timeout).await;
            // Try the next MX only when this one could not be talked to.
            let unreachable = res
                .values()
                .all(|o| matches!(o, Outcome::Transient(e) if e.starts_with("connection")));
            if !unreachable {
                return res;
            }
            last = res.into_values().next().unwrap_or(last);
        }
        all(last)
    }
}

/// MX hosts by preference; an empty list means a null MX. Falls back to the
/// domain itself (implicit MX, RFC 5321 5.1) when there is no MX record.
async fn mx_hosts(domain: &str) -> Result<Vec<String>, Outcome> {
    use hickory_resolver::proto::rr::RData;
    let resolver = hickory_resolver::TokioResolver::builder_tokio()
        .and_then(hickory_resolver::ResolverBuilder::build)
        .map_err(|e| Outcome::Transient(format!("451 4.4.3 resolver setup: {e}")))?;
    match resolver.mx_lookup(format!("{domain}.")).await {
        Ok(l) => {
            let mut mx: Vec<(u16, String)> = l
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::MX(m) => Some((
                        m.preference,
                        m.exchange.to_utf8().trim_end_matches('.').to_owned(),
                    )),
                    _ => None,
                })
                .collect();
            mx.sort();
            if mx.len() == 1 && mx[0].1.is_empty() {
                return Ok(vec![]);
            }
            Ok(mx.into_iter().map(|(_, h)| h).collect())
        }
        Err(e) if e.is_nx_domain() => Err(Outcome::Permanent(format!(
            "550 5.1.2 domain {domain} does not exist"
        ))),
        Err(e) if e.is_no_records_found() => Ok(vec![domain.to_owned()]),
        Err(e) => Err(Outcome::Transient(format!(
            "451 4.4.3 DNS lookup for {domain}: {e}"
        ))),
    }
}

fn classify(e: &HopError) -> Outcome {
    let e = match e {
        HopError::Connect { .. } => return Outcome::Transient(format!("connection: {e}")),
        HopError::Smtp(e) => e,
    };
    let text = e.to_string();
    if e.is_permanent() {
        Outcome::Permanent(text)
    } else if e.is_transient() || e.is_response() {
        Outcome::Transient(text)
    } else {
        // Connection refused, TLS failure, timeout: all worth retrying.
        Outcome::Transient(format!("connection: {text}"))
    }
}

impl Deliverer {
    /// The next hop answered 250 for `addrs`: record it durably before
    /// doing anything else, so a crash from here on cannot send them again.
    /// If that was the last recipient, the message is removed outright (its
    /// record's unlink is the commit point); otherwise "delivered" lines are
    /// appended to its journal. Either takes one syscall to survive a
    /// kill -9 (the fsyncs that follow are for power loss).
    async fn delivered(&self, rec: &mut QueueRecord, addrs: &[String]) {
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

    /// Sends one transaction for all `rcpts`, journalling each 250 as it
    /// comes (`delivered`). lettre reports one error per transaction, so
    /// when a multi-recipient send fails permanently we retry recipient by
    /// recipient to learn which ones are at fault.
    async fn send_group(
        &self,
        t: &Transport,
        rec: &mut QueueRecord,
        rcpts: &[String],
        body: &[u8],
        timeout: Duration,
    ) -> BTreeMap<String, Outcome> {
        let mut out = BTreeMap::new();
        let from = rec.from.clone();
        let sender = if from.is_empty() {
            None
        } else {
            match from.parse::<lettre::Address>() {
                Ok(a) => Some(a),
                Err(e) => {
                    return rcpts
                        .iter()
                        .map(|r| {
                            (
                                r.clone(),
                                Outcome::Permanent(format!("550 5.1.7 bad sender {from}: {e}")),
                            )
                        })
                        .collect();
                }
            }
        };
        let mut to = Vec::new();
        for r in rcpts {
            match r.parse::<lettre::Address>() {
                Ok(a) => to.push((r.clone(), a)),
                Err(e) => {
                    out.insert(
                        r.clone(),
                        Outcome::Permanent(format!("550 5.1.3 bad recipient {r}: {e}")),
                    );
                }
            }
        }
        if to.is_empty() {
            return out;
        }
        let res = send_one(
            t,
            sender.clone(),
            to.iter().map(|(_, a)| a.clone()).collect(),
            body,
            timeout,
        )
        .await;
        match res {
            Outcome::Permanent(_) if to.len() > 1 => {
                for (r, a) in to {
                    let o = send_one(t, sender.clone(), vec![a], body, timeout).await;
                    if o == Outcome::Delivered {
                        self.delivered(rec, std::slice::from_ref(&r)).await;
                    }
                    out.insert(r, o);
                }
            }
            o => {
                if o == Outcome::Delivered {
                    let addrs: Vec<String> = to.iter().map(|(r, _)| r.clone()).collect();
                    self.delivered(rec, &addrs).await;
                }
                for (r, _) in to {
                    out.insert(r, o.clone());
                }
            }
        }
        out
    }
}

async fn send_one(
    t: &Transport,
    from: Option<lettre::Address>,
    to: Vec<lettre::Address>,
    body: &[u8],
    timeout: Duration,
) -> Outcome {
    let env = match lettre::address::Envelope::new(from, to) {
        Ok(e) => e,
        Err(e) => return Outcome::Permanent(format!("550 5.1.3 envelope: {e}")),
    };
    // lettre always writes CRLF "." CRLF after the data; our spooled bodies
    // end with CRLF already, so drop it here or the recipient would get an
    // extra blank line and the message would not arrive byte-exact.
    let body = body.strip_suffix(b"\r\n").unwrap_or(body);
    let started = Instant::now();
    match tokio::time::timeout(timeout + Duration::from_secs(5), t.send(&env, body)).await {
        Ok(Ok(())) => {
            tracing::debug!(elapsed = ?started.elapsed(), "sent");
            Outcome::Delivered
        }
        Ok(Err(e)) => classify(&e),
        Err(_) => Outcome::Transient("connection: attempt timed out".into()),
    }
}
