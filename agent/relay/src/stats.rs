//! Counters the agent's metrics module reads at scrape time. Plain atomics on
//! purpose: the session code must not depend on a metrics library, and a
//! scrape must never block a session.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Upper bounds (seconds) of the delivery-latency histogram buckets; the last
/// bucket (+Inf) is implicit.
pub const LATENCY_BUCKETS_SECS: [f64; 12] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 600.0, 3600.0,
];

/// Group-commit counters: directory syncs done (batches), and the messages
/// they made durable; their ratio is the mean batch size.
#[derive(Debug, Default)]
pub struct CommitCounters {
    pub batches: AtomicU64,
    pub messages: AtomicU64,
}

pub type LatencyObserver = Arc<dyn Fn(Duration) + Send + Sync>;

#[derive(Default)]
pub struct RelayStats {
    pub sessions_total: AtomicU64,
    pub sessions_active: AtomicU64,
    /// Connections refused by the total or per-client session limits.
    pub sessions_refused: AtomicU64,
    /// Pre-AUTH sessions closed to make room for a newcomer.
    pub sessions_evicted: AtomicU64,
    pub auth_successes: AtomicU64,
    pub auth_failures: AtomicU64,
    pub messages_accepted: AtomicU64,
    pub messages_rejected: AtomicU64,
    /// Accepted messages that carry at least one DKIM signature.
    pub messages_signed: AtomicU64,
    /// DKIM keys signing now (gauge; set at start and on each reload).
    pub dkim_keys: AtomicU64,
    /// Recipient deliveries (a message to three recipients counts three).
    pub recipients_delivered: AtomicU64,
    pub messages_delivered: AtomicU64,
    /// Delivery attempts that ended in a retry.
    pub deliveries_deferred: AtomicU64,
    pub messages_bounced: AtomicU64,
    /// Delay warnings queued (one per message at most).
    pub delay_warnings: AtomicU64,
    pub queue_length: AtomicU64,
    /// Spool group commit: shared with the committer thread.
    pub spool_commits: Arc<CommitCounters>,
    latency: LatencyHistogram,
    observer: RwLock<Option<LatencyObserver>>,
}

impl std::fmt::Debug for RelayStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayStats")
            .field("snapshot", &self.snapshot())
            .finish()
    }
}

/// Fixed-bucket histogram; counts are cumulative per bucket at read time.
#[derive(Default)]
struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS_SECS.len() + 1],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LatencySnapshot {
    /// (upper bound in seconds, cumulative count); the last bound is +Inf.
    pub buckets: Vec<(f64, u64)>,
    pub sum_secs: f64,
    pub count: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub sessions_total: u64,
    pub sessions_active: u64,
    pub sessions_refused: u64,
    pub sessions_evicted: u64,
    pub auth_successes: u64,
    pub auth_failures: u64,
    pub messages_accepted: u64,
    pub messages_rejected: u64,
    pub messages_signed: u64,
    pub dkim_keys: u64,
    pub recipients_delivered: u64,
    pub messages_delivered: u64,
    pub deliveries_deferred: u64,
    pub messages_bounced: u64,
    pub delay_warnings: u64,
    pub queue_length: u64,
    /// Directory syncs of the spool (group-commit batches).
    pub spool_batches: u64,
    /// Messages made durable by those batches.
    pub spool_batched_messages: u64,
}

impl RelayStats {
    pub(crate) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }

    pub(crate) fn dec(c: &AtomicU64) {
        c.fetch_sub(1, Relaxed);
    }

    /// Registers a hook called with each delivery latency (queue entry to
    /// final delivery), e.g. to feed a Prometheus histogram with the agent's
    /// own buckets. Replaces any previous hook.
    pub fn set_latency_observer(&self, f: LatencyObserver) {
        *self
            .observer
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(f);
    }

    pub(crate) fn observe_delivery_latency(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let idx = LATENCY_BUCKETS_SECS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS_SECS.len());
        self.latency.buckets[idx].fetch_add(1, Relaxed);
        self.latency
            .sum_micros
            .fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Relaxed);
        self.latency.count.fetch_add(1, Relaxed);
        let hook = self
            .observer
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(hook) = hook {
            hook(d);
        }
    }

    pub fn latency(&self) -> LatencySnapshot {
        let mut acc = 0;
        let mut buckets = Vec::with_capacity(LATENCY_BUCKETS_SECS.len() + 1);
        for (i, b) in self.latency.buckets.iter().enumerate() {
            acc += b.load(Relaxed);
            buckets.push((
                LATENCY_BUCKETS_SECS
                    .get(i)
                    .copied()
                    .unwrap_or(f64::INFINITY),
                acc,
            ));
        }
        #[expect(
            clippy::cast_precision_loss,
            reason = "microsecond sums fit f64 well enough for a metric"
        )]
        let sum_secs = self.latency.sum_micros.load(Relaxed) as f64 / 1e6;
        LatencySnapshot {
            buckets,
            sum_secs,
            count: self.latency.count.load(Relaxed),
        }
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            sessions_total: self.sessions_total.load(Relaxed),
            sessions_active: self.sessions_active.load(Relaxed),
            sessions_refused: self.sessions_refused.load(Relaxed),
            sessions_evicted: self.sessions_evicted.load(Relaxed),
            auth_successes: self.auth_successes.load(Relaxed),
            auth_failures: self.auth_failures.load(Relaxed),
            messages_accepted: self.messages_accepted.load(Relaxed),
            messages_rejected: self.messages_rejected.load(Relaxed),
            messages_signed: self.messages_signed.load(Relaxed),
            dkim_keys: self.dkim_keys.load(Relaxed),
            recipients_delivered: self.recipients_delivered.load(Relaxed),
            messages_delivered: self.messages_delivered.load(Relaxed),
            deliveries_deferred: self.deliveries_deferred.load(Relaxed),
            messages_bounced: self.messages_bounced.load(Relaxed),
            delay_warnings: self.delay_warnings.load(Relaxed),
            queue_length: self.queue_length.load(Relaxed),
            spool_batches: self.spool_commits.batches.load(Relaxed),
            spool_batched_messages: self.spool_commits.messages.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn histogram_and_hook() {
        let s = RelayStats::default();
        let seen = Arc::new(AtomicUsize::new(0));
        let seen2 = seen.clone();
        s.set_latency_observer(Arc::new(move |_| {
            seen2.fetch_add(1, Relaxed);
        }));
        s.observe_delivery_latency(Duration::from_millis(3));
        s.observe_delivery_latency(Duration::from_secs(2));
        s.observe_delivery_latency(Duration::from_secs(99_999));
        let l = s.latency();
        assert_eq!(l.count, 3);
        assert_eq!(l.buckets[0], (0.01, 1));
        assert_eq!(l.buckets.last().unwrap().1, 3);
        assert_eq!(seen.load(Relaxed), 3);
    }
}
