//! Names in the allowlist, kept resolved: one tokio task per name, each
//! asking again when its records' TTL runs out (clamped to
//! `[resolver] min_ttl_secs..max_ttl_secs`) and sending every answer to
//! the agent's owner, which swaps the table when the addresses change.
//!
//! One resolver serves every name. Its cache is off: each name is asked
//! for exactly when its TTL ends, and a cached answer then would only be
//! the old one with a TTL of zero.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use hickory_resolver::{
    TokioResolver,
    config::ResolveHosts,
    net::{DnsError, NetError},
    proto::rr::{RData, RecordType},
};
use tokio::sync::{Mutex, watch};

use super::{DnsAnswer, DnsWanted, Resolved};
use crate::{
    config::ResolverConfig,
    owner::AgentHandle,
    policy::{DnsName, Named, Prefix},
};

/// Runs until the agent stops: keeps one task per wanted name, and starts
/// them all again when the resolver settings change (a reload).
pub async fn run(mut wanted: watch::Receiver<DnsWanted>, agent: AgentHandle) {
    let mut tasks: HashMap<Named, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut settings: Option<ResolverConfig> = None;
    let mut resolver = Arc::new(Shared::new(ResolverConfig::default()));
    loop {
        let w = wanted.borrow_and_update().clone();
        if settings.as_ref() != Some(&w.resolver) {
            for (_, t) in tasks.drain() {
                t.abort();
            }
            resolver = Arc::new(Shared::new(w.resolver.clone()));
            settings = Some(w.resolver.clone());
        }
        tasks.retain(|name, task| {
            let keep = w.names.contains(name);
            if !keep {
                task.abort();
            }
            keep
        });
        for name in &w.names {
            tasks.entry(name.clone()).or_insert_with(|| {
                tokio::spawn(keep_resolved(name.clone(), resolver.clone(), agent.clone()))
            });
        }
        if wanted.changed().await.is_err() {
            for (_, t) in tasks.drain() {
                t.abort();
            }
            return;
        }
    }
}

async fn keep_resolved(name: Named, shared: Arc<Shared>, agent: AgentHandle) {
    loop {
        let result = match shared.resolver().await {
            Ok(r) => resolve(&r, &name).await,
            Err(e) => Err(e),
        };
        let wait = match &result {
            Ok(r) => clamp(r.ttl_secs, &shared.settings),
            Err(_) => shared.settings.min_ttl,
        };
        let next_unix = now_unix() + wait.as_secs_f64();
        agent
            .dns_answer(DnsAnswer {
                name: name.clone(),
                result,
                next_unix,
            })
            .await;
        tokio::time::sleep(wait).await;
    }
}

/// The TTL, within the configured bounds.
#[must_use]
pub fn clamp(ttl_secs: u32, s: &ResolverConfig) -> Duration {
    Duration::from_secs(u64::from(ttl_secs)).clamp(s.min_ttl, s.max_ttl)
}

/// The resolver for one set of settings, built on first use: building it
/// reads /etc/resolv.conf, which may be missing at one moment and there
/// the next (a container's, a DHCP client's), so a failure is retried at
/// the next lookup instead of being final.
struct Shared {
    settings: ResolverConfig,
    resolver: Mutex<Option<TokioResolver>>,
}

impl Shared {
    fn new(settings: ResolverConfig) -> Self {
        Self {
            settings,
            resolver: Mutex::new(None),
        }
    }

    async fn resolver(&self) -> Result<TokioResolver, String> {
        let mut r = self.resolver.lock().await;
        if let Some(r) = r.as_ref() {
            return Ok(r.clone());
        }
        let built = build(&self.settings)?;
        *r = Some(built.clone());
        Ok(built)
    }
}

fn build(s: &ResolverConfig) -> Result<TokioResolver, String> {
    let servers = s.nameservers.clone().unwrap_or_default();
    let mut builder = smtpgate_relay::resolver_builder(&servers).map_err(|e| e.to_string())?;
    let o = builder.options_mut();
    o.timeout = s.timeout;
    o.attempts = 2;
    o.cache_size = 0;
    // DNS only: the allowlist follows what the name's zone says, with its
    // TTLs, and an /etc/hosts line would never expire.
    o.use_hosts_file = ResolveHosts::Never;
    // Both families are asked for explicitly (A and AAAA).
    o.ndots = 0;
    builder
        .build()
        .map_err(|e| format!("setting up the resolver: {e}"))
}

/// One answer for `name`: its addresses and the TTL to ask again at. Any
/// failed query fails the whole answer, so that the last good addresses
/// stay rather than a partial set.
pub async fn resolve(r: &TokioResolver, name: &Named) -> Result<Resolved, String> {
    match name {
        Named::Host(host) => {
            let (addrs, ttl) = host_addresses(r, host).await?;
            Ok(Resolved {
                addresses: addrs.into_iter().map(|a| (a, None)).collect(),
                ttl_secs: ttl,
            })
        }
        Named::Mx(domain) => mx_addresses(r, domain).await,
    }
}

/// What one query got: records (with the smallest TTL among them), or an
/// authoritative "none" (NXDOMAIN or no records of the type, with its
/// negative-caching TTL), or a failure.
enum Answer {
    Records(Vec<RData>, u32),
    None(Option<u32>),
}

async fn query(r: &TokioResolver, name: &DnsName, kind: RecordType) -> Result<Answer, String> {
    match r.lookup(name.fqdn(), kind).await {
        Ok(l) => {
            let ttl = l.answers().iter().map(|rec| rec.ttl).min().unwrap_or(0);
            let data = l.answers().iter().map(|rec| rec.data.clone()).collect();
            Ok(Answer::Records(data, ttl))
        }
        Err(NetError::Dns(DnsError::NoRecordsFound(nr))) => Ok(Answer::None(nr.negative_ttl)),
        Err(e) => Err(format!("{kind} {name}: {e}")),
    }
}

async fn host_addresses(r: &TokioResolver, host: &DnsName) -> Result<(Vec<IpAddr>, u32), String> {
    let (a, aaaa) = tokio::join!(
        query(r, host, RecordType::A),
        query(r, host, RecordType::AAAA)
    );
    let mut addrs = Vec::new();
    let mut ttl = u32::MAX;
    for answer in [a?, aaaa?] {
        match answer {
            Answer::Records(data, t) => {
                ttl = ttl.min(t);
                for d in data {
                    let ip = match d {
                        RData::A(a) => IpAddr::V4(a.0),
                        RData::AAAA(a) => IpAddr::V6(a.0),
                        // The CNAMEs on the way.
                        _ => continue,
                    };
                    // What the datapath cannot match (an IPv4-compatible
                    // address) is left out rather than failing the name.
                    if let Ok(p) = Prefix::host(ip) {
                        addrs.push(p.net().addr());
                    }
                }
            }
            // Without an SOA there is no negative TTL: the other family's
            // records, or the minimum, decide.
            Answer::None(t) => ttl = ttl.min(t.unwrap_or(u32::MAX)),
        }
    }
    addrs.sort();
    addrs.dedup();
    Ok((addrs, if ttl == u32::MAX { 0 } else { ttl }))
}

async fn mx_addresses(r: &TokioResolver, domain: &DnsName) -> Result<Resolved, String> {
    let (hosts, mx_ttl): (Vec<DnsName>, u32) = match query(r, domain, RecordType::MX).await? {
        Answer::Records(data, ttl) => {
            let mut hosts: Vec<(u16, String)> = data
                .into_iter()
                .filter_map(|d| match d {
                    RData::MX(m) => Some((m.preference, m.exchange.to_ascii())),
                    _ => None,
                })
                .collect();
            hosts.sort();
            // A null MX (RFC 7505, exchange "."): the domain takes no mail,
            // so it has no mail hosts to allow.
            let hosts = hosts
                .into_iter()
                .filter(|(_, h)| !h.trim_end_matches('.').is_empty())
                .map(|(_, h)| {
                    h.parse::<DnsName>()
                        .map_err(|e| format!("MX {domain}: exchange {h:?}: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            (hosts, ttl)
        }
        // No MX records: the domain itself is its mail host (RFC 5321
        // 5.1, the implicit MX), as every sending MTA treats it.
        Answer::None(ttl) => (vec![domain.clone()], ttl.unwrap_or(u32::MAX)),
    };
    let mut hosts = hosts;
    hosts.dedup();
    let answers = futures_util::future::join_all(hosts.iter().map(|h| host_addresses(r, h))).await;
    let mut addresses = BTreeMap::new();
    let mut ttl = mx_ttl;
    for (host, answer) in hosts.iter().zip(answers) {
        let (addrs, t) = answer.map_err(|e| format!("MX host of {domain}: {e}"))?;
        ttl = ttl.min(t);
        for a in addrs {
            addresses.entry(a).or_insert_with(|| Some(host.clone()));
        }
    }
    Ok(Resolved {
        addresses,
        ttl_secs: if ttl == u32::MAX { 0 } else { ttl },
    })
}

fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ttl_is_clamped() {
        let s = ResolverConfig {
            nameservers: None,
            min_ttl: Duration::from_secs(30),
            max_ttl: Duration::from_secs(3600),
            timeout: Duration::from_secs(5),
        };
        assert_eq!(clamp(0, &s), Duration::from_secs(30));
        assert_eq!(clamp(300, &s), Duration::from_secs(300));
        assert_eq!(clamp(u32::MAX, &s), Duration::from_secs(3600));
    }
}
