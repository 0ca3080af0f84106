//! The registry and its collector: every scrape takes one [`Snapshot`] and
//! turns it into metric families.
//!
//! A custom `Collector` rather than `IntCounterVec`s: the datapath counters
//! live in the kernel's per-CPU maps (pinned, so they outlive an agent
//! restart), and the only correct counter value is the kernel's sum at
//! scrape time. Mirroring them into client-side counters would need deltas,
//! and a missed or doubled delta would be a permanent error. One snapshot
//! per scrape also keeps the families consistent with each other.

use std::collections::{BTreeMap, HashMap};

use prometheus::{
    Registry,
    core::{Collector, Desc},
    proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType},
};
use smtpgate_common::{Family, Reason, Verdict};

use super::{
    RelaySnapshot, Snapshot, SnapshotFn,
    names::{self, Def},
};

/// A registry with the snapshot collector and the process collector
/// (`process_start_time_seconds` and friends: restarts, memory, fds).
pub fn registry(source: SnapshotFn) -> prometheus::Result<Registry> {
    let registry = Registry::new();
    registry.register(Box::new(SnapshotCollector::new(source)?))?;
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    Ok(registry)
}

pub struct SnapshotCollector {
    source: SnapshotFn,
    descs: Vec<Desc>,
}

impl SnapshotCollector {
    pub fn new(source: SnapshotFn) -> prometheus::Result<Self> {
        let descs = names::AGENT
            .iter()
            .chain(names::RELAY)
            .map(|d| {
                Desc::new(
                    d.name.to_owned(),
                    d.help.to_owned(),
                    d.labels.iter().map(|l| (*l).to_owned()).collect(),
                    HashMap::new(),
                )
            })
            .collect::<prometheus::Result<_>>()?;
        Ok(Self { source, descs })
    }
}

impl Collector for SnapshotCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        families(&(self.source)())
    }
}

/// All families for one snapshot. Families without samples are left out
/// (the registry would prune them anyway).
#[must_use]
pub fn families(s: &Snapshot) -> Vec<MetricFamily> {
    let mut out = Vec::new();
    egress(s, &mut out);

    let allowlist = [s.allowlist_ipv4, s.allowlist_ipv6];
    out.push(family(
        names::ALLOWLIST_ENTRIES,
        names::ALLOWLIST_FAMILIES
            .iter()
            .zip(allowlist)
            .map(|(f, n)| (vec![(*f).to_owned()], n as f64)),
    ));

    // A label set must appear once per scrape, or Prometheus rejects the
    // whole scrape: merge duplicates (up only if all of them are).
    let mut attachments = BTreeMap::new();
    for a in &s.attachments {
        let up = attachments
            .entry(vec![a.hook.clone(), a.target.clone(), a.program.clone()])
            .or_insert(true);
        *up &= a.attached;
    }
    out.push(family(
        names::ATTACHMENT_UP,
        attachments
            .into_iter()
            .map(|(l, up)| (l, f64::from(u8::from(up)))),
    ));

    let programs: BTreeMap<_, _> = s
        .programs
        .iter()
        .map(|(name, id)| (vec![name.clone(), id.to_string()], 1.0))
        .collect();
    out.push(family(names::PROGRAM_INFO, programs));
    out.push(family(
        names::BUILD_INFO,
        [(vec![env!("CARGO_PKG_VERSION").to_owned()], 1.0)],
    ));
    out.push(family(
        names::CONFIG_RELOADS,
        names::RESULTS
            .iter()
            .zip([s.reloads_ok, s.reloads_failed])
            .map(|(r, n)| (vec![(*r).to_owned()], n as f64)),
    ));
    out.push(family(
        names::CONFIG_LAST_RELOAD,
        [(vec![], s.last_reload_unix)],
    ));
    out.push(family(
        names::READY,
        [(vec![], f64::from(u8::from(s.ready)))],
    ));
    out.push(family(
        names::DNS_FAILURES,
        s.dns
            .iter()
            .map(|n| (vec![n.name.clone()], n.failures as f64)),
    ));
    out.push(family(
        names::DNS_LAST_SUCCESS_AGE,
        s.dns
            .iter()
            .map(|n| (vec![n.name.clone()], n.last_success_age_secs)),
    ));
    out.push(family(
        names::DNS_ADDRESSES,
        s.dns
            .iter()
            .map(|n| (vec![n.name.clone()], n.addresses as f64)),
    ));
    out.push(family(
        names::ALLOWLIST_FILE_VALID,
        s.allowlist_files
            .iter()
            .map(|(p, ok)| (vec![p.clone()], f64::from(u8::from(*ok)))),
    ));

    if let Some(relay) = &s.relay {
        self::relay(relay, &mut out);
    }
    out.retain(|f| !f.get_metric().is_empty());
    out
}

/// The datapath counters, every known (family, verdict, reason) present.
///
/// An empty counter list means the agent could not read the map: then the
/// families are left out (the series go stale) rather than reported as
/// zeros, which `rate()` would take for a counter reset and, at the next
/// good scrape, for a jump by the whole count.
fn egress(s: &Snapshot, out: &mut Vec<MetricFamily>) {
    if s.counters.is_empty() {
        return;
    }
    let mut rows: BTreeMap<[&str; 3], (u64, u64)> = BTreeMap::new();
    for f in Family::ALL {
        for v in Verdict::ALL {
            for r in Reason::ALL {
                rows.insert([f.as_str(), v.as_str(), r.as_str()], (0, 0));
            }
        }
    }
    // Rows the lists above do not know yet still get through.
    for row in &s.counters {
        let e = rows
            .entry([row.family, row.verdict, row.reason])
            .or_default();
        e.0 += row.packets;
        e.1 += row.connections;
    }
    let labels = |k: &[&str; 3]| k.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    out.push(family(
        names::EGRESS_PACKETS,
        rows.iter().map(|(k, (p, _))| (labels(k), *p as f64)),
    ));
    out.push(family(
        names::EGRESS_CONNECTIONS,
        rows.iter().map(|(k, (_, c))| (labels(k), *c as f64)),
    ));
}

fn relay(r: &RelaySnapshot, out: &mut Vec<MetricFamily>) {
    let s = &r.stats;
    let one = |name: &'static str, v: u64| family(name, [(vec![], v as f64)]);
    out.push(one(names::RELAY_SESSIONS, s.sessions_total));
    out.push(one(names::RELAY_SESSIONS_ACTIVE, s.sessions_active));
    out.push(one(names::RELAY_SESSIONS_REFUSED, s.sessions_refused));
    out.push(one(names::RELAY_SESSIONS_EVICTED, s.sessions_evicted));
    out.push(one(names::RELAY_DKIM_SIGNED, s.messages_signed));
    out.push(one(names::RELAY_DKIM_KEYS, s.dkim_keys));
    out.push(one(names::RELAY_DELAY_WARNINGS, s.delay_warnings));
    out.push(family(
        names::RELAY_AUTH,
        names::RESULTS
            .iter()
            .zip([s.auth_successes, s.auth_failures])
            .map(|(r, n)| (vec![(*r).to_owned()], n as f64)),
    ));
    out.push(family(
        names::RELAY_MESSAGES,
        [
            ("accepted", s.messages_accepted),
            ("rejected", s.messages_rejected),
            ("delivered", s.messages_delivered),
            ("deferred", s.deliveries_deferred),
            ("bounced", s.messages_bounced),
        ]
        .map(|(o, n)| (vec![o.to_owned()], n as f64)),
    ));
    out.push(one(
        names::RELAY_RECIPIENTS_DELIVERED,
        s.recipients_delivered,
    ));
    out.push(one(names::RELAY_QUEUE_LENGTH, s.queue_length));
    out.push(one(names::RELAY_SPOOL_COMMITS, s.spool_batches));
    out.push(one(names::RELAY_SPOOL_COMMITTED, s.spool_batched_messages));

    // The snapshot's buckets end with +Inf; the encoder writes +Inf from
    // the sample count, so it is left out here. The count is read after the
    // buckets, so it can only be ahead of them: taking the larger keeps
    // +Inf >= every finite bucket, as the format requires.
    let l = &r.latency;
    let mut h = Histogram::default();
    let mut inf = 0;
    let mut buckets = Vec::new();
    for (bound, n) in &l.buckets {
        if bound.is_finite() {
            let mut b = Bucket::default();
            b.set_upper_bound(*bound);
            b.set_cumulative_count(*n);
            buckets.push(b);
        } else {
            inf = *n;
        }
    }
    h.set_bucket(buckets);
    h.set_sample_count(l.count.max(inf));
    h.set_sample_sum(l.sum_secs);
    let mut m = Metric::default();
    m.set_histogram(h);
    let mut mf = empty(def(names::RELAY_DELIVERY_DURATION));
    mf.set_metric(vec![m]);
    out.push(mf);
}

fn def(name: &str) -> &'static Def {
    names::AGENT
        .iter()
        .chain(names::RELAY)
        .find(|d| d.name == name)
        .unwrap_or_else(|| panic!("metric {name} is not in metrics::names"))
}

fn empty(def: &Def) -> MetricFamily {
    let mut mf = MetricFamily::default();
    mf.set_name(def.name.to_owned());
    mf.set_help(def.help.to_owned());
    mf.set_field_type(def.kind);
    mf
}

/// A counter or gauge family; label values in the order of the def's
/// label names.
fn family(name: &str, samples: impl IntoIterator<Item = (Vec<String>, f64)>) -> MetricFamily {
    let def = def(name);
    let mut mf = empty(def);
    let metrics = samples
        .into_iter()
        .map(|(values, v)| {
            assert_eq!(values.len(), def.labels.len(), "{name}: label count");
            let labels = def
                .labels
                .iter()
                .zip(values)
                .map(|(n, v)| {
                    let mut lp = LabelPair::default();
                    lp.set_name((*n).to_owned());
                    lp.set_value(v);
                    lp
                })
                .collect();
            let mut m = Metric::default();
            m.set_label(labels);
            match def.kind {
                MetricType::COUNTER => {
                    let mut c = Counter::default();
                    c.set_value(v);
                    m.set_counter(c);
                }
                _ => {
                    let mut g = Gauge::default();
                    g.set_value(v);
                    m.set_gauge(g);
                }
            }
            m
        })
        .collect();
    mf.set_metric(metrics);
    mf
}
