//! `[relay]` configuration. The agent embeds [`RelayConfig`] in its own TOML
//! file; every field has a documented default so an empty `[relay]` table is
//! valid apart from what `validate()` insists on when `enabled = true`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("relay config: {field}: {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
}

fn invalid(field: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        problem: problem.into(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Run the relay at all. Default: false.
    pub enabled: bool,
    /// Name used in the greeting, EHLO reply, Received headers and DSNs,
    /// and as our EHLO name towards the next hop. Default: "localhost",
    /// which is only accepted with a smarthost: without one, `validate()`
    /// requires a dotted, fully qualified name (MX hosts judge us by it).
    pub hostname: String,
    /// Submission with STARTTLS (RFC 6409). Default: "[::]:587". Ignored when
    /// the agent hands in a pre-bound listener.
    pub submission_listen: Option<SocketAddr>,
    /// Submission over implicit TLS (RFC 8314). Default: "[::]:465".
    pub submissions_listen: Option<SocketAddr>,
    /// Listener for port-25 connections redirected by the datapath. Usually
    /// the agent passes the bound socket in instead. Default: none.
    pub intercept_listen: Option<SocketAddr>,
    /// Text of the 530 reply that intercepted unauthenticated senders get.
    pub intercept_message: String,
    /// PEM certificate chain. Default: "/etc/smtpgate/relay.crt".
    /// (The path defaults are `smtpgate_paths`: what the package creates.)
    pub tls_cert: PathBuf,
    /// PEM private key. Default: "/etc/smtpgate/relay.key".
    pub tls_key: PathBuf,
    /// Users file (see `users` module docs). Default: "/etc/smtpgate/users.toml".
    pub users_file: PathBuf,
    /// Spool directory. Default: "/var/lib/smtpgate/spool".
    pub spool_dir: PathBuf,
    /// DKIM private keys, `<domain>/<selector>.key` (managed with `smtpgate
    /// dkim`); re-read on reload. Missing or empty: nothing is signed.
    /// Default: "/etc/smtpgate/dkim".
    pub dkim_dir: PathBuf,
    /// Concurrent delivery attempts. Default: 8.
    pub delivery_workers: usize,
    /// Smarthost; without it mail goes straight to each recipient's MX.
    pub upstream: Option<UpstreamConfig>,
    /// DNS servers for MX and address lookups ("IP:port"; a bare IP means
    /// port 53), tried in order. Default: empty, which means the system's
    /// /etc/resolv.conf. One resolver (with its cache) serves the whole
    /// relay.
    #[serde(deserialize_with = "de_nameservers")]
    pub nameservers: Vec<SocketAddr>,
    /// TLS towards MX hosts (not the smarthost, see `upstream.tls`).
    /// Default: "opportunistic".
    pub mx_tls: MxTls,
    /// SO_MARK for every outbound delivery socket (smarthost and MX). Not a
    /// `[relay]` setting: the agent fills it in from its datapath, whose
    /// port-25 programs let exactly the sockets with this mark out (only
    /// CAP_NET_ADMIN or CAP_NET_RAW can set a mark, so an unprivileged
    /// process cannot forge it).
    /// `None` (the default, and the relay on its own): no mark.
    #[serde(skip)]
    pub delivery_mark: Option<u32>,
    pub limits: LimitsConfig,
    pub retry: RetryConfig,
}

/// How the relay secures connections to MX hosts.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MxTls {
    /// Postfix's `may`: STARTTLS whenever the MX offers it. A certificate
    /// that does not verify (self-signed, expired, wrong name) is logged
    /// and the message still goes out over TLS, unauthenticated; a
    /// handshake that fails for another reason falls back to plaintext.
    /// An MX without STARTTLS gets plaintext.
    #[default]
    Opportunistic,
    /// Postfix's `verify`: STARTTLS with a certificate that verifies
    /// against the web PKI and names the MX host, or no delivery to that
    /// MX (the next one is tried; with none left the message waits and is
    /// retried, as for any transient failure).
    Verify,
}

/// `nameservers` entries as "IP:port" or a bare IP (port 53), with an error
/// that says which entry is wrong and what is expected.
fn de_nameservers<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    let raw = Vec::<String>::deserialize(d)?;
    raw.iter()
        .map(|s| {
            s.parse::<SocketAddr>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "nameservers: {s:?} is not an IP address with an optional port, \
                         e.g. \"192.0.2.53\", \"127.0.0.1:5353\" or \"[2001:db8::53]:53\" \
                         (a host name cannot be used: it would need a resolver to find the resolver)"
                    ))
                })
        })
        .collect()
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            hostname: "localhost".into(),
            submission_listen: Some("[::]:587".parse().expect("literal")),
            submissions_listen: Some("[::]:465".parse().expect("literal")),
            intercept_listen: None,
            intercept_message: "Direct port 25 delivery is not allowed from this host; submit mail on port 587 (STARTTLS) or 465 (TLS) with your credentials".into(),
            tls_cert: smtpgate_paths::RELAY_TLS_CERT.into(),
            tls_key: smtpgate_paths::RELAY_TLS_KEY.into(),
            users_file: smtpgate_paths::RELAY_USERS_FILE.into(),
            spool_dir: smtpgate_paths::RELAY_SPOOL_DIR.into(),
            dkim_dir: smtpgate_paths::RELAY_DKIM_DIR.into(),
            delivery_workers: 8,
            upstream: None,
            nameservers: Vec::new(),
            mx_tls: MxTls::default(),
            delivery_mark: None,
            limits: LimitsConfig::default(),
            retry: RetryConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamTls {
    /// Plain SMTP: only for a smarthost on loopback or a trusted link.
    None,
    /// STARTTLS required; delivery fails (and retries) without it.
    Starttls,
    /// TLS from the first byte (port 465).
    Implicit,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub host: String,
    /// Default: 587.
    #[serde(default = "default_upstream_port")]
    pub port: u16,
    /// Default: "starttls".
    #[serde(default = "default_upstream_tls")]
    pub tls: UpstreamTls,
    /// AUTH to the smarthost; needs `password_file` too.
    #[serde(default)]
    pub username: Option<String>,
    /// File whose first line is the password (kept out of the main config).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Extra PEM CA to trust (besides the built-in web PKI roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_upstream_port() -> u16 {
    587
}
fn default_upstream_tls() -> UpstreamTls {
    UpstreamTls::Starttls
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Default: 26214400 (25 MiB). Advertised in EHLO SIZE.
    pub max_message_bytes: usize,
    /// Default: 100.
    pub max_recipients: usize,
    /// Sessions in total across listeners. Default: 200.
    pub max_sessions: usize,
    /// Sessions per client network (an IPv4 address or an IPv6 /64).
    /// Default: 20.
    pub max_sessions_per_client: usize,
    /// Sessions on the intercept listener (port-25 connections the datapath
    /// redirected), a pool of their own: `max_sessions` and
    /// `max_sessions_per_client` count only 587 and 465, so a flood of
    /// redirected bots cannot take the slots of users submitting there.
    /// `preauth_sessions_percent` applies to this pool too. Default: 100
    /// (a host that redirects more than that at once is a spam source, not
    /// a user).
    pub intercept_max_sessions: usize,
    /// Intercept sessions per client network. Default: 10 (one infected
    /// host cannot hold the whole intercept pool).
    pub intercept_max_sessions_per_client: usize,
    /// Share of `max_sessions` (percent) that may be unauthenticated at
    /// once; the rest is kept for authenticated users. When it is full a
    /// newcomer evicts a pre-AUTH session of the network holding the most.
    /// Default: 50.
    pub preauth_sessions_percent: u32,
    /// Time from connecting to a successful AUTH (the TLS handshake on 465
    /// included); then 421 and disconnect. Default: 60.
    pub preauth_timeout_secs: f64,
    /// Total lifetime of any session. Default: 3600.
    pub session_lifetime_secs: f64,
    /// Errors (4xx/5xx replies) before 421 and disconnect. Default: 10.
    pub max_errors: u32,
    /// NOOP, RSET, VRFY, EXPN, HELP, EHLO and HELO allowed between two
    /// accepted messages (Postfix's smtpd_junk_command_limit); then 421
    /// and disconnect. Default: 20.
    pub max_junk_commands: u32,
    /// Deadline for each whole command line, however it trickles in (RFC
    /// 5321 says 5 minutes). Default: 300.
    pub command_timeout_secs: f64,
    /// Wait for each chunk of DATA (RFC 5321: 3 minutes), and the grace
    /// period of the minimum data rate. Default: 180.
    pub data_timeout_secs: f64,
    /// DATA must finish within `data_timeout_secs` plus one second per this
    /// many bytes received, so one byte every few seconds cannot hold a
    /// session. 0 disables the rate (the per-chunk timeout stays).
    /// Default: 1024.
    pub data_min_bytes_per_sec: u64,
    /// Added to every failed AUTH, to slow guessing. Default: 1.0.
    pub auth_failure_delay_secs: f64,
    /// Failures per (user, client network) before that user is locked out
    /// from that network (not from others). Default: 5.
    pub auth_max_failures: u32,
    /// Failures per client network, any users, before the whole network is
    /// locked out of AUTH. Default: 20.
    pub auth_max_failures_per_client: u32,
    /// Lockout length, also the window failures are counted in. Default: 900.
    pub auth_lockout_secs: f64,
    /// Password verifications running at once (argon2id takes ~19 MiB and
    /// ~30 ms each); the rest wait. Default: 4.
    pub auth_concurrency: usize,
    /// How long an AUTH waits for a verification slot before 454 4.7.0.
    /// Default: 10.
    pub auth_queue_timeout_secs: f64,
    /// Per user, sliding hour. 0 disables. Default: 200.
    pub messages_per_hour: u32,
    /// Per user, sliding hour. 0 disables. Default: 1000.
    pub recipients_per_hour: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 25 * 1024 * 1024,
            max_recipients: 100,
            max_sessions: 200,
            max_sessions_per_client: 20,
            intercept_max_sessions: 100,
            intercept_max_sessions_per_client: 10,
            preauth_sessions_percent: 50,
            preauth_timeout_secs: 60.0,
            session_lifetime_secs: 3600.0,
            max_errors: 10,
            max_junk_commands: 20,
            command_timeout_secs: 300.0,
            data_timeout_secs: 180.0,
            data_min_bytes_per_sec: 1024,
            auth_failure_delay_secs: 1.0,
            auth_max_failures: 5,
            auth_max_failures_per_client: 20,
            auth_lockout_secs: 900.0,
            auth_concurrency: 4,
            auth_queue_timeout_secs: 10.0,
            messages_per_hour: 200,
            recipients_per_hour: 1000,
        }
    }
}

impl LimitsConfig {
    /// `preauth_sessions_percent` of `max_sessions`, at least 1.
    pub fn max_preauth_sessions(&self) -> usize {
        self.preauth_share(self.max_sessions)
    }

    /// `preauth_sessions_percent` of `intercept_max_sessions`, at least 1.
    pub fn intercept_max_preauth_sessions(&self) -> usize {
        self.preauth_share(self.intercept_max_sessions)
    }

    fn preauth_share(&self, total: usize) -> usize {
        (total * self.preauth_sessions_percent as usize / 100).max(1)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// First retry delay. Default: 60.
    pub initial_backoff_secs: f64,
    /// Cap for the doubling delay. Default: 3600.
    pub max_backoff_secs: f64,
    /// Give up and bounce after this long in the queue. Default: 432000 (5 days).
    pub max_lifetime_secs: f64,
    /// Lifetime of the bounces we generate (Postfix's
    /// bounce_queue_lifetime): kept separate so a short message lifetime
    /// does not also throw away the notice telling the sender about it.
    /// Default: 432000.
    pub bounce_lifetime_secs: f64,
    /// Timeout for connecting to a next hop and for each of its replies;
    /// the message data gets one more second per 16 KiB. Default: 120.
    pub attempt_timeout_secs: f64,
    /// A message still undelivered this long after it was queued gets one
    /// warning DSN (RFC 3464 `Action: delayed`) to its sender, naming the
    /// recipients still waiting, once per message. 0 turns warnings off.
    /// Default: 14400 (4 h). Postfix has the same setting
    /// (delay_warning_time) but off by default; sendmail warns after 4 h,
    /// and a sender whose mail sits for days should hear about it before
    /// the bounce.
    pub delay_warning_secs: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            initial_backoff_secs: 60.0,
            max_backoff_secs: 3600.0,
            max_lifetime_secs: 432_000.0,
            bounce_lifetime_secs: 432_000.0,
            attempt_timeout_secs: 120.0,
            delay_warning_secs: 4.0 * 3600.0,
        }
    }
}

pub(crate) fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

impl RelayConfig {
    /// Parses a standalone `[relay]`-less TOML table (the agent usually
    /// deserialises the struct as part of its own config instead).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text).map_err(|e| invalid("toml", e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what serde cannot. Paths are not opened here: the agent may
    /// validate before the files exist (e.g. in `--check` mode).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.hostname.is_empty() || self.hostname.contains(char::is_whitespace) {
            return Err(invalid(
                "hostname",
                "must be a non-empty name without spaces",
            ));
        }
        if self.enabled && self.upstream.is_none() && !is_public_fqdn(&self.hostname) {
            return Err(invalid(
                "hostname",
                format!(
                    "{:?} is not a fully qualified domain name. Without [relay.upstream] the relay \
                     delivers to each recipient's MX itself, and MX hosts judge it by this EHLO \
                     name: set this host's public name (e.g. \"mail.example.com\", with matching \
                     A/AAAA and PTR records), or configure a smarthost in [relay.upstream]",
                    self.hostname
                ),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for ns in &self.nameservers {
            let ip = ns.ip();
            let problem = if ns.port() == 0 {
                Some("port 0 is not a DNS server's port")
            } else if ip.is_unspecified() {
                Some("an unspecified address (0.0.0.0 or ::) names no server")
            } else if ip.is_multicast() || ip == std::net::Ipv4Addr::BROADCAST {
                Some("a multicast or broadcast address names no single server")
            } else if !seen.insert(*ns) {
                Some("listed twice")
            } else {
                None
            };
            if let Some(p) = problem {
                return Err(invalid("nameservers", format!("{ns}: {p}")));
            }
        }
        if self.intercept_message.contains(['\r', '\n']) {
            return Err(invalid("intercept_message", "must be a single line"));
        }
        if self.delivery_workers == 0 {
            return Err(invalid("delivery_workers", "must be at least 1"));
        }
        let l = &self.limits;
        for (field, v) in [
            ("limits.max_message_bytes", l.max_message_bytes),
            ("limits.max_recipients", l.max_recipients),
            ("limits.max_sessions", l.max_sessions),
            ("limits.max_sessions_per_client", l.max_sessions_per_client),
            ("limits.intercept_max_sessions", l.intercept_max_sessions),
            (
                "limits.intercept_max_sessions_per_client",
                l.intercept_max_sessions_per_client,
            ),
            ("limits.auth_concurrency", l.auth_concurrency),
            ("limits.max_junk_commands", l.max_junk_commands as usize),
            ("limits.auth_max_failures", l.auth_max_failures as usize),
            (
                "limits.auth_max_failures_per_client",
                l.auth_max_failures_per_client as usize,
            ),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        if !(1..=100).contains(&l.preauth_sessions_percent) {
            return Err(invalid(
                "limits.preauth_sessions_percent",
                "must be between 1 and 100",
            ));
        }
        if l.max_sessions_per_client > l.max_sessions {
            return Err(invalid(
                "limits.max_sessions_per_client",
                "cannot exceed limits.max_sessions",
            ));
        }
        if l.intercept_max_sessions_per_client > l.intercept_max_sessions {
            return Err(invalid(
                "limits.intercept_max_sessions_per_client",
                "cannot exceed limits.intercept_max_sessions",
            ));
        }
        for (field, v) in [
            ("limits.command_timeout_secs", l.command_timeout_secs),
            ("limits.data_timeout_secs", l.data_timeout_secs),
            ("limits.auth_lockout_secs", l.auth_lockout_secs),
            ("limits.preauth_timeout_secs", l.preauth_timeout_secs),
            ("limits.session_lifetime_secs", l.session_lifetime_secs),
            ("limits.auth_queue_timeout_secs", l.auth_queue_timeout_secs),
            (
                "retry.initial_backoff_secs",
                self.retry.initial_backoff_secs,
            ),
            ("retry.max_backoff_secs", self.retry.max_backoff_secs),
            ("retry.max_lifetime_secs", self.retry.max_lifetime_secs),
            (
                "retry.bounce_lifetime_secs",
                self.retry.bounce_lifetime_secs,
            ),
            (
                "retry.attempt_timeout_secs",
                self.retry.attempt_timeout_secs,
            ),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(invalid(field, "must be a positive number of seconds"));
            }
        }
        if !(l.auth_failure_delay_secs.is_finite() && l.auth_failure_delay_secs >= 0.0) {
            return Err(invalid(
                "limits.auth_failure_delay_secs",
                "must be zero or more seconds",
            ));
        }
        if !(self.retry.delay_warning_secs.is_finite() && self.retry.delay_warning_secs >= 0.0) {
            return Err(invalid(
                "retry.delay_warning_secs",
                "must be zero (off) or more seconds",
            ));
        }
        if self.retry.max_backoff_secs < self.retry.initial_backoff_secs {
            return Err(invalid(
                "retry.max_backoff_secs",
                "cannot be below retry.initial_backoff_secs",
            ));
        }
        if let Some(u) = &self.upstream {
            if u.host.is_empty() {
                return Err(invalid("upstream.host", "must not be empty"));
            }
            if u.port == 0 {
                return Err(invalid("upstream.port", "must not be 0"));
            }
            if u.username.is_some() != u.password_file.is_some() {
                return Err(invalid(
                    "upstream.username",
                    "username and password_file go together",
                ));
            }
        }
        Ok(())
    }
}

/// Whether `name` can stand as our EHLO name before MX hosts: a dotted,
/// fully qualified host name (RFC 5321 4.1.4 wants the primary host name).
/// Letters, digits and hyphens, labels of 1 to 63 characters not starting
/// or ending with a hyphen, at most 253 in all, at least two labels, a top
/// label that is not all digits (so an IPv4 address is not a name), and not
/// a name that only means this host ("localhost", "*.localhost",
/// "*.localdomain"), which receivers reject or score as spam.
pub(crate) fn is_public_fqdn(name: &str) -> bool {
    let labels: Vec<&str> = name.split('.').collect();
    let lower = name.to_ascii_lowercase();
    name.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(|l| {
            (1..=63).contains(&l.len())
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
        && !labels
            .last()
            .is_some_and(|t| t.bytes().all(|b| b.is_ascii_digit()))
        && !(lower.ends_with(".localhost") || lower.ends_with(".localdomain"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_table_gives_defaults() {
        assert_eq!(RelayConfig::from_toml("").unwrap(), RelayConfig::default());
    }

    #[test]
    fn full_example_parses() {
        let cfg = RelayConfig::from_toml(
            r#"
            enabled = true
            hostname = "relay.example"
            submission_listen = "127.0.0.1:587"
            intercept_listen = "127.0.0.1:2525"
            [upstream]
            host = "smarthost.example"
            port = 465
            tls = "implicit"
            username = "u"
            password_file = "/etc/smtpgate/upstream.pass"
            [limits]
            max_recipients = 5
            messages_per_hour = 10
            [retry]
            initial_backoff_secs = 1
            max_lifetime_secs = 30
            "#,
        )
        .unwrap();
        assert_eq!(cfg.upstream.unwrap().tls, UpstreamTls::Implicit);
        assert_eq!(cfg.limits.max_recipients, 5);
        assert!((cfg.retry.initial_backoff_secs - 1.0).abs() < f64::EPSILON);
    }

    #[test]
    fn unknown_and_invalid_fields_are_errors() {
        assert!(RelayConfig::from_toml("nope = 1").is_err());
        assert!(RelayConfig::from_toml("[limits]\nmax_recipients = 0").is_err());
        assert!(RelayConfig::from_toml("[limits]\npreauth_sessions_percent = 0").is_err());
        assert!(RelayConfig::from_toml("[limits]\npreauth_sessions_percent = 101").is_err());
        assert!(RelayConfig::from_toml("[limits]\nauth_concurrency = 0").is_err());
        assert!(RelayConfig::from_toml("[limits]\nsession_lifetime_secs = 0").is_err());
        assert_eq!(
            RelayConfig::default().limits.max_preauth_sessions(),
            100,
            "half of 200 by default"
        );
        assert!(RelayConfig::from_toml("hostname = \"\"").is_err());
        assert!(RelayConfig::from_toml("[upstream]\nhost = \"h\"\nusername = \"u\"").is_err());
        assert!(
            RelayConfig::from_toml("[retry]\ninitial_backoff_secs = 10\nmax_backoff_secs = 1")
                .is_err()
        );
        assert!(err("[retry]\ndelay_warning_secs = -1").contains("zero (off) or more"));
        // 0 turns warnings off; the default is 4 h.
        let off = RelayConfig::from_toml("[retry]\ndelay_warning_secs = 0").unwrap();
        assert!(off.retry.delay_warning_secs == 0.0);
        assert!((RelayConfig::default().retry.delay_warning_secs - 14_400.0).abs() < f64::EPSILON);
        let keys = RelayConfig::from_toml("dkim_dir = \"/srv/dkim\"").unwrap();
        assert_eq!(keys.dkim_dir, PathBuf::from("/srv/dkim"));
    }

    fn err(text: &str) -> String {
        RelayConfig::from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn direct_delivery_needs_a_real_ehlo_name() {
        let direct = |h: &str| format!("enabled = true\nhostname = \"{h}\"\n");
        for bad in [
            "localhost",
            "relay",
            "LOCALHOST",
            "mail.localdomain",
            "a.localhost",
            "192.0.2.1",
            "-mx.example.com",
            "mx-.example.com",
            "mx..example.com",
            "mx.example.com.",
            "mx_1.example.com",
            "[192.0.2.1]",
        ] {
            let e = err(&direct(bad));
            assert!(
                e.contains("hostname") && e.contains("fully qualified") && e.contains(bad),
                "{bad}: {e}"
            );
        }
        let long = format!("{}.example.com", "a".repeat(64));
        assert!(err(&direct(&long)).contains("fully qualified"));
        for good in [
            "mail.example.com",
            "relay.test",
            "MX-1.Example.ORG",
            "a.b.c.example",
        ] {
            RelayConfig::from_toml(&direct(good)).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        // With a smarthost the smarthost judges us, not the MX hosts; and a
        // disabled relay (the shipped default) validates as it is.
        RelayConfig::from_toml("enabled = true\n[upstream]\nhost = \"smarthost.example\"\n")
            .unwrap();
        RelayConfig::from_toml("enabled = false\nhostname = \"localhost\"\n").unwrap();
        assert_eq!(RelayConfig::default().hostname, "localhost");
    }

    #[test]
    fn nameservers_parse_and_bad_entries_say_why() {
        let c = RelayConfig::from_toml(
            "nameservers = [\"127.0.0.1:5353\", \"192.0.2.53\", \"[2001:db8::53]:53\", \"2001:db8::54\"]",
        )
        .unwrap();
        let want: Vec<SocketAddr> = [
            "127.0.0.1:5353",
            "192.0.2.53:53",
            "[2001:db8::53]:53",
            "[2001:db8::54]:53",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        assert_eq!(c.nameservers, want);
        assert!(RelayConfig::default().nameservers.is_empty());
        for (text, needle) in [
            (
                "nameservers = [\"dns.example\"]",
                "\"dns.example\" is not an IP address",
            ),
            (
                "nameservers = [\"127.0.0.1:99999\"]",
                "\"127.0.0.1:99999\" is not an IP address",
            ),
            ("nameservers = [\"\"]", "\"\" is not an IP address"),
            ("nameservers = [\"127.0.0.1:0\"]", "port 0"),
            ("nameservers = [\"0.0.0.0\"]", "unspecified"),
            ("nameservers = [\"[::]:53\"]", "unspecified"),
            ("nameservers = [\"255.255.255.255\"]", "broadcast"),
            (
                "nameservers = [\"192.0.2.1\", \"192.0.2.1:53\"]",
                "listed twice",
            ),
            ("nameservers = \"192.0.2.1\"", "nameservers"),
        ] {
            let e = err(text);
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn mx_tls_and_intercept_limits() {
        assert_eq!(RelayConfig::default().mx_tls, MxTls::Opportunistic);
        assert_eq!(
            RelayConfig::from_toml("mx_tls = \"verify\"")
                .unwrap()
                .mx_tls,
            MxTls::Verify
        );
        assert!(err("mx_tls = \"dane\"").contains("mx_tls"));
        // The mark is the agent's to set, never the file's.
        assert!(err("delivery_mark = 1").contains("delivery_mark"));
        assert_eq!(RelayConfig::default().delivery_mark, None);
        let l = LimitsConfig::default();
        assert_eq!(
            (
                l.intercept_max_sessions,
                l.intercept_max_sessions_per_client
            ),
            (100, 10)
        );
        assert_eq!(l.intercept_max_preauth_sessions(), 50);
        assert!(
            err("[limits]\nintercept_max_sessions = 0").contains("limits.intercept_max_sessions")
        );
        assert!(
            err("[limits]\nintercept_max_sessions = 5\nintercept_max_sessions_per_client = 6")
                .contains("cannot exceed limits.intercept_max_sessions")
        );
    }
}
