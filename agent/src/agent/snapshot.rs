//! The state the metrics endpoint renders.

use super::*;

impl Agent {
    /// The state the metrics endpoint renders.
    pub fn snapshot(&self) -> Snapshot {
        let (v4, v6) = self.allowlist.count_by_family();
        let attachments = self
            .points
            .iter()
            .flat_map(|p| {
                let (hook, target) = match &p.point {
                    AttachPoint::TcIngress { interface } => ("tc-ingress", interface.clone()),
                    AttachPoint::TcEgress { interface } => ("tc-egress", interface.clone()),
                    AttachPoint::Cgroup { path } => (
                        "cgroup",
                        path.as_ref()
                            .map_or_else(String::new, |p| p.display().to_string()),
                    ),
                };
                // The programs really attached there, or, for a point that
                // never came up, the ones it would run.
                let mut programs: Vec<&'static str> = self
                    .datapath
                    .attachments()
                    .iter()
                    .filter(|a| a.point == p.point)
                    .map(|a| a.program)
                    .collect();
                if programs.is_empty() {
                    programs = expected_programs(&p.point).to_vec();
                }
                let up = p.down.is_none();
                programs.into_iter().map(move |program| AttachmentState {
                    hook: hook.to_owned(),
                    target: target.clone(),
                    program: program.to_owned(),
                    attached: up,
                })
            })
            .collect();
        Snapshot {
            counters: self.datapath.counters().unwrap_or_default(),
            allowlist_ipv4: v4,
            allowlist_ipv6: v6,
            attachments,
            programs: self.datapath.program_ids(),
            reloads_ok: self.reloads_ok,
            reloads_failed: self.reloads_failed,
            last_reload_unix: self.last_reload_unix,
            ready: !self.detached && self.all_up(),
            dns: self
                .sources
                .status()
                .names
                .into_iter()
                .map(|n| DnsNameSnapshot {
                    name: n.name.to_string(),
                    failures: n.failures,
                    addresses: n.addresses.len(),
                    last_success_age_secs: n
                        .last_success_unix
                        .map_or(f64::INFINITY, |t| (now_unix() - t).max(0.0)),
                })
                .collect(),
            allowlist_files: self
                .sources
                .status()
                .files
                .into_iter()
                .map(|f| (f.path.display().to_string(), f.error.is_none()))
                .collect(),
            relay: self.relay.as_ref().map(|r| {
                let stats = r.stats();
                RelaySnapshot {
                    stats: stats.snapshot(),
                    latency: stats.latency(),
                }
            }),
        }
    }
}
