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
    /// Name used in the greeting, EHLO reply, Received headers and DSNs.
    /// Default: "localhost" (set it: remote servers judge us by it).
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
    /// Concurrent delivery attempts. Default: 8.
    pub delivery_workers: usize,
    /// Smarthost; without it mail goes straight to each recipient's MX.
    pub upstream: Option<UpstreamConfig>,
    pub limits: LimitsConfig,
    pub retry: RetryConfig,
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
            delivery_workers: 8,
            upstream: None,
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
        (self.max_sessions * self.preauth_sessions_percent as usize / 100).max(1)
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
    /// Per-attempt SMTP timeout. Default: 120.
    pub attempt_timeout_secs: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            initial_backoff_secs: 60.0,
            max_backoff_secs: 3600.0,
            max_lifetime_secs: 432_000.0,
            bounce_lifetime_secs: 432_000.0,
            attempt_timeout_secs: 120.0,
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
    }
}
