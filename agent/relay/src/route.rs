//! One delivery attempt of one message: where it goes (the smarthost, or
//! each recipient domain's MX hosts by preference), which next hop to try
//! after which failure, and what each recipient's outcome is. Every
//! decision is taken on a typed value (`MxRoute`, `LookupError`, `HopError`,
//! an SMTP reply code), never on an error text.
//!
//! The rules, as Postfix applies them:
//! - the next MX host (or the next address of the same host) is tried when
//!   one cannot be connected to, TLS with it fails, or it answers 4xx (or a
//!   5xx greeting) before any recipient was answered (`HopError::try_next`);
//! - a 5xx to RCPT bounces that recipient at once, a 4xx defers it; the
//!   others go on in the same transaction;
//! - a 5xx to MAIL, DATA or the data bounces the recipients it concerns;
//! - a message the next hop cannot take (SMTPUTF8, 8BITMIME) bounces;
//! - a null MX (RFC 7505) or a domain that does not exist (NXDOMAIN)
//!   bounces; no MX at all means the domain's own A/AAAA (implicit MX); a
//!   DNS failure (SERVFAIL, timeout) defers.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use crate::client::{HopError, HopTls, Message, Reply, Stage, Transport};
use crate::config::MxTls;
use crate::deliver::Deliverer;
use crate::lookup::{LookupError, MxRoute, ip_literal};
use crate::spool::QueueRecord;

/// Addresses tried per recipient domain and attempt, over all its MX hosts
/// (Postfix's smtp_mx_address_limit is 5): a domain with a dozen dead MX
/// hosts costs a bounded time per attempt; the rest wait for the retry.
const MAX_ADDRESSES: usize = 10;

/// Outcome for one recipient of one attempt. The text is what the queue
/// record and a bounce show; it carries an RFC 3463 status code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Delivered,
    Transient(String),
    Permanent(String),
}

impl Outcome {
    fn of(e: &HopError) -> Self {
        if e.is_permanent() {
            Self::Permanent(e.diagnostic())
        } else {
            Self::Transient(e.diagnostic())
        }
    }
}

impl Deliverer {
    /// Sends `rcpts` of `rec` wherever they go. Every 250 is journalled as
    /// it comes (`delivered`), before the next domain is tried.
    pub(crate) async fn send(
        &self,
        rec: &mut QueueRecord,
        rcpts: &[String],
        body: &[u8],
    ) -> BTreeMap<String, Outcome> {
        if let Some(t) = &self.upstream {
            let t = t.clone();
            return self.send_via(&[t], false, rec, rcpts, body).await;
        }
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
        let tls = match self.cfg.mx_tls {
            MxTls::Opportunistic => HopTls::Opportunistic,
            MxTls::Verify => HopTls::Verify,
        };
        let mx = |host: String| Transport {
            host,
            port: 25,
            tls: tls.clone(),
            credentials: None,
        };
        // user@[192.0.2.1]: that address, no DNS (RFC 5321 4.1.3).
        if let Some(ip) = ip_literal(domain).filter(|_| domain.starts_with('[')) {
            return self
                .send_via(&[mx(ip.to_string())], false, rec, rcpts, body)
                .await;
        }
        let route = match &self.resolver {
            Some(r) => r.mx(domain).await,
            None => return all(no_resolver()),
        };
        match route {
            Ok(MxRoute::NullMx) => all(Outcome::Permanent(format!(
                "556 5.1.10 domain {domain} accepts no mail (null MX, RFC 7505)"
            ))),
            Err(LookupError::NoSuchDomain { .. }) => all(Outcome::Permanent(format!(
                "550 5.1.2 domain {domain} does not exist (NXDOMAIN)"
            ))),
            Err(e) => all(Outcome::Transient(format!("451 4.4.3 {e}"))),
            Ok(MxRoute::Implicit) => {
                self.send_via(&[mx(domain.to_owned())], true, rec, rcpts, body)
                    .await
            }
            Ok(MxRoute::Hosts(hosts)) => {
                let hops: Vec<Transport> = hosts.into_iter().map(mx).collect();
                self.send_via(&hops, false, rec, rcpts, body).await
            }
        }
    }

    async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, LookupError> {
        if let Some(ip) = ip_literal(host) {
            return Ok(vec![ip]);
        }
        match &self.resolver {
            Some(r) => r.addresses(host).await,
            None => Err(LookupError::NoRecords {
                name: host.to_owned(),
                rtype: "A/AAAA (no resolver)",
            }),
        }
    }

    /// Tries `hops` in order, each of their addresses in turn, until one
    /// answers for the recipients. `implicit`: the single hop is the
    /// recipient domain itself (no MX), so a name without addresses means
    /// the domain takes no mail.
    async fn send_via(
        &self,
        hops: &[Transport],
        implicit: bool,
        rec: &mut QueueRecord,
        rcpts: &[String],
        body: &[u8],
    ) -> BTreeMap<String, Outcome> {
        let mut out = BTreeMap::new();
        let from = if rec.from.is_empty() {
            None
        } else {
            match rec.from.parse::<lettre::Address>() {
                Ok(a) => Some(a),
                Err(e) => {
                    let o = Outcome::Permanent(format!("550 5.1.7 bad sender {}: {e}", rec.from));
                    return rcpts.iter().map(|r| (r.clone(), o.clone())).collect();
                }
            }
        };
        let mut names = Vec::new();
        let mut to = Vec::new();
        for r in rcpts {
            match r.parse::<lettre::Address>() {
                Ok(a) => {
                    names.push(r.clone());
                    to.push(a);
                }
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
        let msg = Message {
            from: from.as_ref(),
            rcpts: &to,
            body,
            smtputf8: rec.smtputf8,
        };
        let all = |out: &mut BTreeMap<String, Outcome>, o: Outcome| {
            for n in &names {
                out.insert(n.clone(), o.clone());
            }
        };
        let mut last = Outcome::Transient("451 4.4.1 no next hop could be reached".into());
        let mut tried = 0;
        for hop in hops {
            let ips = match self.addresses(&hop.host).await {
                Ok(ips) => ips,
                Err(LookupError::NoSuchDomain { .. } | LookupError::NoRecords { .. })
                    if implicit =>
                {
                    all(
                        &mut out,
                        Outcome::Permanent(format!(
                            "550 5.1.2 domain {} has neither MX nor address records",
                            hop.host
                        )),
                    );
                    return out;
                }
                Err(e) => {
                    // An MX host that does not resolve is a broken MX
                    // record, which its owner may fix: the next one, and
                    // a retry later.
                    tracing::info!(id = rec.id, host = hop.host, error = %e, "next hop does not resolve");
                    last = Outcome::Transient(format!("451 4.4.3 {e}"));
                    continue;
                }
            };
            for ip in ips {
                if tried == MAX_ADDRESSES {
                    all(&mut out, last);
                    return out;
                }
                tried += 1;
                let addr = SocketAddr::new(ip, hop.port);
                match self.out.send(hop, addr, &msg).await {
                    Ok(report) => {
                        tracing::info!(id = rec.id, host = hop.host, %addr, tls = ?report.tls, "next hop answered");
                        let mut delivered = Vec::new();
                        for ((name, rcpt), res) in names.iter().zip(&to).zip(&report.rcpt) {
                            let o = match (res, &report.data) {
                                (Err(reply), _) => refused(hop, addr, rcpt, reply),
                                (Ok(()), Some(Ok(()))) => {
                                    delivered.push(name.clone());
                                    Outcome::Delivered
                                }
                                (Ok(()), Some(Err(e))) => Outcome::of(e),
                                // Not produced by the client (DATA follows any
                                // accepted RCPT); deferred rather than assumed.
                                (Ok(()), None) => Outcome::Transient(format!(
                                    "4.4.2 {}[{addr}] accepted RCPT but the transaction \
                                     ended before DATA",
                                    hop.host
                                )),
                            };
                            out.insert(name.clone(), o);
                        }
                        if !delivered.is_empty() {
                            self.delivered(rec, &delivered).await;
                        }
                        return out;
                    }
                    Err(e) if e.try_next() => {
                        tracing::info!(id = rec.id, host = hop.host, %addr, error = %e, "next hop failed; trying the next");
                        last = Outcome::of(&e);
                    }
                    Err(e) => {
                        tracing::info!(id = rec.id, host = hop.host, %addr, error = %e, "next hop failed");
                        all(&mut out, Outcome::of(&e));
                        return out;
                    }
                }
            }
        }
        all(&mut out, last);
        out
    }
}

fn refused(hop: &Transport, addr: SocketAddr, rcpt: &lettre::Address, reply: &Reply) -> Outcome {
    let text = format!(
        "host {}[{addr}] said: {reply} (in reply to {} <{rcpt}>)",
        hop.host,
        Stage::Rcpt
    );
    if reply.is_permanent() {
        Outcome::Permanent(text)
    } else {
        Outcome::Transient(text)
    }
}

fn no_resolver() -> Outcome {
    Outcome::Transient(
        "451 4.4.3 no DNS resolver (the system's configuration could not be read at start)".into(),
    )
}
