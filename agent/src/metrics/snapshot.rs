//! What the metrics endpoint reads at scrape time: a plain copy of the
//! agent's state, taken under its lock and rendered without it.

use crate::datapath::CounterRow;

#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Per-CPU datapath counters, summed.
    pub counters: Vec<CounterRow>,
    pub allowlist_ipv4: usize,
    pub allowlist_ipv6: usize,
    pub attachments: Vec<AttachmentState>,
    /// Loaded programs and their kernel ids.
    pub programs: Vec<(String, u32)>,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// Unix time of the last reload attempt (0 if none).
    pub last_reload_unix: f64,
    /// Programs attached and maps loaded.
    pub ready: bool,
    /// Every name in the allowlist.
    pub dns: Vec<DnsNameSnapshot>,
    /// Every allowlist file, and whether it is in force as it is now
    /// (false: it is broken and its last good entries are).
    pub allowlist_files: Vec<(String, bool)>,
    pub relay: Option<RelaySnapshot>,
}

#[derive(Clone, Debug)]
pub struct DnsNameSnapshot {
    /// As written: `mail.example.com`, `mx:example.org`.
    pub name: String,
    pub failures: u64,
    pub addresses: usize,
    /// Infinite for a name that never resolved.
    pub last_success_age_secs: f64,
}

#[derive(Clone, Debug)]
pub struct AttachmentState {
    /// tc-ingress, tc-egress or cgroup.
    pub hook: String,
    /// Interface name or cgroup path.
    pub target: String,
    pub program: String,
    pub attached: bool,
}

#[derive(Clone, Debug)]
pub struct RelaySnapshot {
    pub stats: smtpgate_relay::StatsSnapshot,
    pub latency: smtpgate_relay::LatencySnapshot,
}
