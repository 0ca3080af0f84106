//! DNS for delivery: one resolver per relay (hickory, with its cache), for
//! the MX records of recipient domains and the addresses of MX hosts and of
//! the smarthost. Answers come back typed, so that delivery decides on
//! "does not exist", "exists without an MX" and "try again later" without
//! reading error text.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::RData;

/// Per query and server; with two attempts a dead server costs 10 s, well
/// inside a delivery attempt's timeout.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
const QUERY_ATTEMPTS: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    #[error("reading the system's DNS configuration (/etc/resolv.conf): {source}")]
    System {
        #[source]
        source: NetError,
    },
    #[error("setting up the DNS resolver: {source}")]
    Build {
        #[source]
        source: NetError,
    },
    #[error("setting up the DNS resolver's TLS config: {message}")]
    Tls { message: String },
}

/// A resolver builder for `nameservers` (`ip:port`, UDP and TCP), or for the
/// system's /etc/resolv.conf when there are none: the one place the relay
/// and the agent's name sources make theirs.
///
/// It is given a TLS client config of its own. mail-auth's `ring` feature
/// switches hickory's DNS-over-TLS support on for the whole build, and
/// hickory then loads the system's CA certificates when it builds a
/// resolver: where there are none (a minimal container image), building
/// failed. Neither resolver speaks DNS over TLS, so no roots is the honest
/// config.
pub fn resolver_builder(
    nameservers: &[SocketAddr],
) -> Result<hickory_resolver::ResolverBuilder<TokioRuntimeProvider>, ResolverError> {
    let provider = TokioRuntimeProvider::default();
    let builder = if nameservers.is_empty() {
        TokioResolver::builder(provider).map_err(|source| ResolverError::System { source })?
    } else {
        let servers = nameservers
            .iter()
            .map(|ns| {
                let mut udp = ConnectionConfig::udp();
                udp.port = ns.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = ns.port();
                NameServerConfig::new(ns.ip(), true, vec![udp, tcp])
            })
            .collect();
        TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider)
    };
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ResolverError::Tls {
        message: e.to_string(),
    })?
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    Ok(builder.with_tls_config(tls))
}

/// Why a name could not be resolved.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum LookupError {
    /// NXDOMAIN: the name does not exist. Permanent for a recipient domain.
    #[error("{name}: no such domain (NXDOMAIN)")]
    NoSuchDomain { name: String },
    /// The name exists but has no record of that type (NOERROR, no answer).
    #[error("{name}: no {rtype} record")]
    NoRecords { name: String, rtype: &'static str },
    /// SERVFAIL, a timeout, no server reachable: try again later.
    #[error("{name}: {rtype} lookup failed: {source}")]
    Temporary {
        name: String,
        rtype: &'static str,
        #[source]
        source: NetError,
    },
}

/// Where mail for a domain goes, by its MX records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MxRoute {
    /// MX hosts in the order to try: by preference, equal preferences in
    /// random order (RFC 5321 5.1, so that they share the load).
    Hosts(Vec<String>),
    /// No MX record: the domain itself is the mail host (RFC 5321 5.1,
    /// "implicit MX").
    Implicit,
    /// Only the null MX ("0 .", RFC 7505): the domain accepts no mail.
    NullMx,
}

pub(crate) struct Resolver {
    inner: TokioResolver,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").finish_non_exhaustive()
    }
}

impl Resolver {
    /// `nameservers` empty: the system's resolv.conf (servers and options).
    /// Otherwise those servers, over UDP with TCP for truncated answers,
    /// tried in the order given.
    pub(crate) fn new(nameservers: &[SocketAddr]) -> Result<Self, ResolverError> {
        Self::with_limits(nameservers, QUERY_TIMEOUT, QUERY_ATTEMPTS)
    }

    fn with_limits(
        nameservers: &[SocketAddr],
        timeout: Duration,
        attempts: usize,
    ) -> Result<Self, ResolverError> {
        let mut builder = resolver_builder(nameservers)?;
        if !nameservers.is_empty() {
            let o = builder.options_mut();
            o.timeout = timeout;
            o.attempts = attempts;
            o.server_ordering_strategy =
                hickory_resolver::config::ServerOrderingStrategy::UserProvidedOrder;
        }
        let o: &mut ResolverOpts = builder.options_mut();
        // Both families, IPv4 first: a host whose IPv6 egress is broken
        // still delivers at once instead of after a connect timeout per MX.
        o.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        let inner = builder
            .build()
            .map_err(|source| ResolverError::Build { source })?;
        Ok(Self { inner })
    }

    /// The MX route of `domain` (an ASCII or UTF-8 domain name, no trailing
    /// dot).
    pub(crate) async fn mx(&self, domain: &str) -> Result<MxRoute, LookupError> {
        // Fully qualified: the search list must never turn example.com into
        // example.com.corp.internal.
        let fqdn = format!("{domain}.");
        match self.inner.mx_lookup(fqdn).await {
            Ok(l) => {
                let mut mx: Vec<(u16, u32, String)> = l
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(m) => Some((
                            m.preference,
                            random_u32(),
                            m.exchange.to_ascii().trim_end_matches('.').to_owned(),
                        )),
                        _ => None,
                    })
                    .collect();
                if mx.is_empty() {
                    // Answers of another type only (a CNAME chain to
                    // nothing): the same as no MX.
                    return Ok(MxRoute::Implicit);
                }
                // RFC 7505: "." is the null MX; a client never connects to
                // it. Published alone it means "no mail"; mixed with real
                // MX hosts (a misconfiguration) the real ones are used.
                mx.retain(|(_, _, h)| !h.is_empty());
                if mx.is_empty() {
                    return Ok(MxRoute::NullMx);
                }
                mx.sort();
                mx.dedup_by(|a, b| a.2.eq_ignore_ascii_case(&b.2));
                Ok(MxRoute::Hosts(mx.into_iter().map(|(_, _, h)| h).collect()))
            }
            Err(e) => match classify(domain, "MX", e) {
                LookupError::NoRecords { .. } => Ok(MxRoute::Implicit),
                e => Err(e),
            },
        }
    }

    /// A and AAAA of `host`, IPv4 first. An IP literal is returned as it is.
    pub(crate) async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, LookupError> {
        if let Some(ip) = ip_literal(host) {
            return Ok(vec![ip]);
        }
        let fqdn = format!("{}.", host.trim_end_matches('.'));
        match self.inner.lookup_ip(fqdn).await {
            Ok(l) => {
                let ips: Vec<IpAddr> = l.iter().collect();
                if ips.is_empty() {
                    return Err(LookupError::NoRecords {
                        name: host.to_owned(),
                        rtype: "A/AAAA",
                    });
                }
                Ok(ips)
            }
            Err(e) => Err(classify(host, "A/AAAA", e)),
        }
    }
}

/// `192.0.2.1`, `2001:db8::1`, or an RFC 5321 address literal as in
/// `user@[192.0.2.1]` and `user@[IPv6:2001:db8::1]`.
pub(crate) fn ip_literal(host: &str) -> Option<IpAddr> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .map_or(host, |h| {
            h.get(..5)
                .filter(|p| p.eq_ignore_ascii_case("IPv6:"))
                .map_or(h, |_| &h[5..])
        });
    bare.parse().ok()
}

fn classify(name: &str, rtype: &'static str, e: NetError) -> LookupError {
    use hickory_resolver::net::{DnsError, NoRecords};
    match &e {
        NetError::Dns(DnsError::NoRecordsFound(NoRecords {
            response_code: ResponseCode::NXDomain,
            ..
        })) => LookupError::NoSuchDomain {
            name: name.to_owned(),
        },
        NetError::Dns(DnsError::NoRecordsFound(NoRecords {
            response_code: ResponseCode::NoError,
            ..
        })) => LookupError::NoRecords {
            name: name.to_owned(),
            rtype,
        },
        _ => LookupError::Temporary {
            name: name.to_owned(),
            rtype,
            source: e,
        },
    }
}

fn random_u32() -> u32 {
    use argon2::password_hash::rand_core::{OsRng, RngCore};
    OsRng.next_u32()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_literals() {
        assert_eq!(ip_literal("192.0.2.1"), Some("192.0.2.1".parse().unwrap()));
        assert_eq!(
            ip_literal("[2001:db8::1]"),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(
            ip_literal("2001:db8::1"),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(
            ip_literal("[IPv6:2001:db8::1]"),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(
            ip_literal("[ipv6:2001:db8::2]"),
            Some("2001:db8::2".parse().unwrap())
        );
        assert_eq!(ip_literal("mx.example.test"), None);
        assert_eq!(ip_literal("[mx.example.test]"), None);
    }

    /// The answers that decide between bounce and retry, as hickory reports
    /// them.
    #[test]
    fn classification() {
        use hickory_resolver::net::{DnsError, NoRecords};
        use hickory_resolver::proto::op::Query;
        let no = |code| {
            NetError::Dns(DnsError::NoRecordsFound(NoRecords::new(
                Query::default(),
                code,
            )))
        };
        assert!(matches!(
            classify("d", "MX", no(ResponseCode::NXDomain)),
            LookupError::NoSuchDomain { .. }
        ));
        assert!(matches!(
            classify("d", "MX", no(ResponseCode::NoError)),
            LookupError::NoRecords { .. }
        ));
        for e in [
            NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail)),
            NetError::Dns(DnsError::ResponseCode(ResponseCode::Refused)),
            NetError::Timeout,
        ] {
            assert!(matches!(
                classify("d", "MX", e),
                LookupError::Temporary { .. }
            ));
        }
    }

    /// A resolver pointed at a port where nothing answers fails as
    /// "temporary", never as "does not exist": a dead DNS server must defer
    /// mail, not bounce it.
    #[tokio::test]
    async fn dead_server_is_temporary() {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let r = Resolver::with_limits(
            &[SocketAddr::from(([127, 0, 0, 1], port))],
            Duration::from_millis(300),
            1,
        )
        .unwrap();
        let e = r.mx("example.test").await.unwrap_err();
        assert!(matches!(e, LookupError::Temporary { .. }), "{e:?}");
        let e = r.addresses("mx.example.test").await.unwrap_err();
        assert!(matches!(e, LookupError::Temporary { .. }), "{e:?}");
        assert_eq!(
            r.addresses("198.51.100.7").await.unwrap(),
            vec!["198.51.100.7".parse::<IpAddr>().unwrap()]
        );
    }
}
