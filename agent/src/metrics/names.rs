//! Every metric the agent exports: name, type, help, labels. A declarative
//! table on purpose: the collector registers exactly these, the unit tests
//! check that a scrape shows exactly these, and `xtask/tests/metrics.rs`
//! reads [`RELAY_METRICS`] from this file to check the Grafana dashboard
//! (the relay's families only exist when the relay is enabled).

use prometheus::proto::MetricType;

pub struct Def {
    pub name: &'static str,
    pub kind: MetricType,
    pub help: &'static str,
    pub labels: &'static [&'static str],
}

const fn def(
    name: &'static str,
    kind: MetricType,
    help: &'static str,
    labels: &'static [&'static str],
) -> Def {
    Def {
        name,
        kind,
        help,
        labels,
    }
}

use MetricType::{COUNTER, GAUGE, HISTOGRAM};

pub const EGRESS_PACKETS: &str = "smtpgate_egress_packets_total";
pub const EGRESS_CONNECTIONS: &str = "smtpgate_egress_connections_total";
pub const ALLOWLIST_ENTRIES: &str = "smtpgate_allowlist_entries";
pub const ATTACHMENT_UP: &str = "smtpgate_attachment_up";
pub const PROGRAM_INFO: &str = "smtpgate_program_info";
pub const BUILD_INFO: &str = "smtpgate_build_info";
pub const CONFIG_RELOADS: &str = "smtpgate_config_reloads_total";
pub const CONFIG_LAST_RELOAD: &str = "smtpgate_config_last_reload_timestamp_seconds";
pub const READY: &str = "smtpgate_ready";
pub const DNS_FAILURES: &str = "smtpgate_dns_failures_total";
pub const DNS_LAST_SUCCESS_AGE: &str = "smtpgate_dns_last_success_age_seconds";
pub const DNS_ADDRESSES: &str = "smtpgate_dns_addresses";
pub const ALLOWLIST_FILE_VALID: &str = "smtpgate_allowlist_file_valid";

pub const RELAY_SESSIONS: &str = "smtpgate_relay_sessions_total";
pub const RELAY_SESSIONS_ACTIVE: &str = "smtpgate_relay_sessions_active";
pub const RELAY_SESSIONS_REFUSED: &str = "smtpgate_relay_sessions_refused_total";
pub const RELAY_SESSIONS_EVICTED: &str = "smtpgate_relay_sessions_evicted_total";
pub const RELAY_DKIM_SIGNED: &str = "smtpgate_relay_dkim_signed_messages_total";
pub const RELAY_DKIM_KEYS: &str = "smtpgate_relay_dkim_keys";
pub const RELAY_DELAY_WARNINGS: &str = "smtpgate_relay_delay_warnings_total";
pub const RELAY_AUTH: &str = "smtpgate_relay_auth_total";
pub const RELAY_MESSAGES: &str = "smtpgate_relay_messages_total";
pub const RELAY_RECIPIENTS_DELIVERED: &str = "smtpgate_relay_recipients_delivered_total";
pub const RELAY_QUEUE_LENGTH: &str = "smtpgate_relay_queue_length";
pub const RELAY_DELIVERY_DURATION: &str = "smtpgate_relay_delivery_duration_seconds";
pub const RELAY_SPOOL_COMMITS: &str = "smtpgate_relay_spool_commits_total";
pub const RELAY_SPOOL_COMMITTED: &str = "smtpgate_relay_spool_committed_messages_total";

/// Families present whenever the agent serves metrics.
pub const AGENT: &[Def] = &[
    def(
        EGRESS_PACKETS,
        COUNTER,
        "SMTP egress packets seen by the datapath, by address family, verdict and reason.",
        &["family", "verdict", "reason"],
    ),
    def(
        EGRESS_CONNECTIONS,
        COUNTER,
        "SMTP connection attempts (SYN without ACK, retransmits included) seen by the datapath, by address family, verdict and reason.",
        &["family", "verdict", "reason"],
    ),
    def(
        ALLOWLIST_ENTRIES,
        GAUGE,
        "Entries in the effective allowlist, by address family.",
        &["family"],
    ),
    def(
        ATTACHMENT_UP,
        GAUGE,
        "Whether a configured attach point has its program attached (1) or not (0).",
        &["hook", "target", "program"],
    ),
    def(
        PROGRAM_INFO,
        GAUGE,
        "Loaded eBPF programs and their kernel ids (always 1).",
        &["program", "id"],
    ),
    def(
        BUILD_INFO,
        GAUGE,
        "The agent's version (always 1).",
        &["version"],
    ),
    def(
        CONFIG_RELOADS,
        COUNTER,
        "Config reload attempts, by result.",
        &["result"],
    ),
    def(
        CONFIG_LAST_RELOAD,
        GAUGE,
        "Unix time of the last config reload attempt; 0 if there was none.",
        &[],
    ),
    def(
        READY,
        GAUGE,
        "Whether the agent enforces: programs attached and maps loaded (1) or not (0).",
        &[],
    ),
    def(
        DNS_FAILURES,
        COUNTER,
        "Failed DNS lookups of an allowlist name since the agent started; the name keeps its last good addresses meanwhile.",
        &["name"],
    ),
    def(
        DNS_LAST_SUCCESS_AGE,
        GAUGE,
        "Seconds since an allowlist name last resolved (+Inf: never, so it allows nothing).",
        &["name"],
    ),
    def(
        DNS_ADDRESSES,
        GAUGE,
        "Addresses an allowlist name allows now (its last good answer).",
        &["name"],
    ),
    def(
        ALLOWLIST_FILE_VALID,
        GAUGE,
        "Whether an allowlist file is in force as it is on disk (1), or is broken and its last good entries are (0).",
        &["path"],
    ),
];

/// Families present only when the relay is enabled (all of them, from the
/// start, at zero).
pub const RELAY: &[Def] = &[
    def(
        RELAY_SESSIONS,
        COUNTER,
        "Relay SMTP sessions accepted.",
        &[],
    ),
    def(
        RELAY_SESSIONS_ACTIVE,
        GAUGE,
        "Relay SMTP sessions open now.",
        &[],
    ),
    def(
        RELAY_SESSIONS_REFUSED,
        COUNTER,
        "Relay connections refused by the total or per-client session limits.",
        &[],
    ),
    def(
        RELAY_SESSIONS_EVICTED,
        COUNTER,
        "Unauthenticated relay sessions closed to make room for a newcomer (a flood of idle or slow connections evicts its own).",
        &[],
    ),
    def(
        RELAY_DKIM_SIGNED,
        COUNTER,
        "Messages the relay accepted with at least one DKIM signature.",
        &[],
    ),
    def(
        RELAY_DKIM_KEYS,
        GAUGE,
        "DKIM keys the relay signs with (after the last start or reload).",
        &[],
    ),
    def(
        RELAY_DELAY_WARNINGS,
        COUNTER,
        "Delay warnings (RFC 3464 Action: delayed) queued to senders, at most one per message.",
        &[],
    ),
    def(
        RELAY_AUTH,
        COUNTER,
        "Relay AUTH attempts, by result.",
        &["result"],
    ),
    def(
        RELAY_MESSAGES,
        COUNTER,
        "Relay messages by outcome: accepted or rejected at DATA, delivered, bounced; deferred counts delivery attempts that ended in a retry.",
        &["outcome"],
    ),
    def(
        RELAY_RECIPIENTS_DELIVERED,
        COUNTER,
        "Relay recipient deliveries (a message to three recipients counts three).",
        &[],
    ),
    def(
        RELAY_QUEUE_LENGTH,
        GAUGE,
        "Messages in the relay's queue (spooled, not yet delivered or bounced).",
        &[],
    ),
    def(
        RELAY_DELIVERY_DURATION,
        HISTOGRAM,
        "Time from queue entry to final delivery of a relay message.",
        &[],
    ),
    def(
        RELAY_SPOOL_COMMITS,
        COUNTER,
        "Spool directory syncs (group-commit batches).",
        &[],
    ),
    def(
        RELAY_SPOOL_COMMITTED,
        COUNTER,
        "Messages made durable by spool group commits.",
        &[],
    ),
];

/// The relay's family names, as a plain list (read by the dashboard test in
/// xtask; keep one quoted name per line).
pub const RELAY_METRICS: &[&str] = &[
    "smtpgate_relay_sessions_total",
    "smtpgate_relay_sessions_active",
    "smtpgate_relay_sessions_refused_total",
    "smtpgate_relay_sessions_evicted_total",
    "smtpgate_relay_dkim_signed_messages_total",
    "smtpgate_relay_dkim_keys",
    "smtpgate_relay_delay_warnings_total",
    "smtpgate_relay_auth_total",
    "smtpgate_relay_messages_total",
    "smtpgate_relay_recipients_delivered_total",
    "smtpgate_relay_queue_length",
    "smtpgate_relay_delivery_duration_seconds",
    "smtpgate_relay_spool_commits_total",
    "smtpgate_relay_spool_committed_messages_total",
];

/// `result` label values of [`CONFIG_RELOADS`] and [`RELAY_AUTH`].
pub const RESULTS: [&str; 2] = ["success", "failure"];

/// Allowlist families (the datapath's `other` has no allowlist).
pub const ALLOWLIST_FAMILIES: [&str; 2] = ["ipv4", "ipv6"];
