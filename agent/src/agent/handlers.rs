//! The control socket's requests, one method each: what `smtpgate
//! status`, `check`, `top`, `allow ...` and `detach` get.

use super::*;

impl Agent {
    pub fn handle(&mut self, request: Request) -> Response {
        if self.detached && !matches!(request, Request::Status) {
            return Response::Error {
                code: ErrorCode::Detached,
                message: "the agent has detached and is stopping".into(),
            };
        }
        let result = match request {
            Request::Status => reply(self.status()),
            Request::Stats => self.stats().and_then(reply),
            Request::Check { ip, port, to } => reply(self.check(ip, port, to)),
            Request::AllowAdd {
                prefix,
                comment,
                expires_unix,
            } => self
                .allow_add(&prefix, comment, expires_unix)
                .and_then(reply),
            Request::AllowRemove { prefix } => self.allow_remove(&prefix).and_then(reply),
            Request::AllowList => reply(AllowListReply {
                entries: self.allowlist.entries().cloned().collect(),
            }),
            Request::Reload => self.reload().and_then(reply),
            Request::Detach => self.detach().and_then(reply),
            Request::Top { limit } => reply(self.top(limit)),
            Request::QueueFlush => self.relay().and_then(|r| {
                r.flush();
                reply(QueueFlushReply { flushed: true })
            }),
            Request::QueueDelete { id } => self
                .relay()
                .and_then(|r| {
                    r.delete(&id)
                        .with_context(|| format!("deleting {id}"))
                        .map_err(|e| coded(ErrorCode::NotFound, e))
                })
                .and_then(|()| reply(QueueDeleteReply { deleted: id })),
        };
        match result {
            Ok(data) => Response::Ok { data },
            Err(e) => Response::Error {
                code: e
                    .downcast_ref::<Coded>()
                    .map_or(ErrorCode::Internal, |c| c.0),
                message: format!("{e:#}"),
            },
        }
    }

    pub(super) fn allow_add(
        &mut self,
        prefix: &str,
        comment: Option<String>,
        expires: Option<u64>,
    ) -> anyhow::Result<AllowAddReply> {
        let prefix: Prefix = prefix
            .parse()
            .with_context(|| format!("{prefix:?}"))
            .map_err(|e| coded(ErrorCode::BadRequest, e))?;
        if expires.is_some_and(|t| t as f64 <= now_unix()) {
            return Err(coded(
                ErrorCode::BadRequest,
                anyhow::anyhow!("{prefix}: the expiry time is in the past"),
            ));
        }
        // Already listed by the config or the CLI: nothing to add. An entry
        // from a file or from DNS can be added, since those change by
        // themselves (pinning a host whose name is about to move).
        if let Some(o) = self.allowlist.get(&prefix).and_then(|e| {
            std::iter::once(&e.origin)
                .chain(&e.also)
                .find(|o| matches!(o, Origin::Config | Origin::Cli))
        }) {
            return Err(coded(
                ErrorCode::Conflict,
                anyhow::anyhow!(
                    "{prefix} is already allowlisted (from the {})",
                    origin_name(o)
                ),
            ));
        }
        let mut entries = self.cli_entries.clone();
        entries.push(CliEntry {
            prefix,
            comment,
            added: now_unix() as u64,
            expires,
        });
        self.set_cli_entries(entries)
            .map_err(|e| coded(ErrorCode::Refused, e))?;
        info!(%prefix, expires_unix = ?expires, "allowlist entry added");
        Ok(AllowAddReply {
            added: prefix,
            expires_unix: expires,
        })
    }

    pub(super) fn allow_remove(&mut self, prefix: &str) -> anyhow::Result<AllowRemoveReply> {
        let prefix: Prefix = prefix
            .parse()
            .with_context(|| format!("{prefix:?}"))
            .map_err(|e| coded(ErrorCode::BadRequest, e))?;
        let in_config = self.config.allowlist.contains(&prefix);
        let mut entries = self.cli_entries.clone();
        let before = entries.len();
        entries.retain(|e| e.prefix != prefix);
        if entries.len() == before {
            if in_config {
                return Err(coded(
                    ErrorCode::Refused,
                    anyhow::anyhow!(
                        "{prefix} comes from the config file: remove it there, then `smtpgate reload`"
                    ),
                ));
            }
            if let Some(e) = self.allowlist.get(&prefix) {
                let how = match &e.origin {
                    Origin::File { .. } => "remove it from that file (applied live)",
                    _ => "it is an address that name resolves to",
                };
                return Err(coded(
                    ErrorCode::Refused,
                    anyhow::anyhow!("{prefix} comes from {}: {how}", e.origin),
                ));
            }
            return Err(coded(
                ErrorCode::NotFound,
                anyhow::anyhow!("{prefix} is not in the allowlist"),
            ));
        }
        self.set_cli_entries(entries)
            .map_err(|e| coded(ErrorCode::Refused, e))?;
        info!(%prefix, "allowlist entry removed");
        Ok(AllowRemoveReply {
            removed: prefix,
            still_allowed_by_config: in_config,
            still_allowed_by: self
                .allowlist
                .get(&prefix)
                .map(|e| std::iter::once(&e.origin).chain(&e.also).cloned().collect())
                .unwrap_or_default(),
        })
    }

    pub(super) fn detach(&mut self) -> anyhow::Result<DetachReply> {
        let classic_filters_removed = self.datapath.detach_all()?;
        self.detached = true;
        warn!(pin_dir = %self.config.pin_dir.display(), "detached: smtpgate no longer enforces anything");
        Ok(DetachReply {
            detached: self.config.pin_dir.clone(),
            pins_removed: true,
            classic_filters_removed,
        })
    }

    pub(super) fn status(&self) -> StatusReply {
        let (ipv4, ipv6) = self.allowlist.count_by_family();
        StatusReply {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            config: self
                .config_path
                .as_ref()
                .map_or("built-in default".to_owned(), |p| p.display().to_string()),
            mode: self.config.mode,
            action: self.config.action,
            ports: self.config.ports.iter().copied().collect(),
            attachments: self
                .datapath
                .attachments()
                .iter()
                .map(|a| wire::AttachmentReply {
                    point: a.point.clone(),
                    program: a.program.to_owned(),
                    link: a.link.clone(),
                    adopted: a.adopted,
                    mode: a.mode,
                })
                .collect(),
            attach_points: self.points.clone(),
            enforcing: !self.detached && self.all_up(),
            pin_dir: self.config.pin_dir.clone(),
            allowlist: wire::AllowlistSize {
                ipv4,
                ipv6,
                table_nodes: self.table_nodes,
                table_capacity: self.datapath.table_capacity(),
            },
            exceptions: self.exceptions.len(),
            reloads: wire::Reloads {
                ok: self.reloads_ok,
                failed: self.reloads_failed,
            },
            detached: self.detached,
            sources: self.sources.status(),
            relay: self.relay.as_ref().map(|r| {
                let a = r.addrs();
                let s = r.stats().snapshot();
                wire::RelayStatus {
                    submission: a.submission,
                    submissions: a.submissions,
                    intercept: a.intercept,
                    queue_length: s.queue_length,
                    sessions_active: s.sessions_active,
                    messages_accepted: s.messages_accepted,
                    messages_delivered: s.messages_delivered,
                }
            }),
        }
    }

    pub(super) fn top(&mut self, limit: usize) -> TopReply {
        let now_mono = monotonic_ns();
        let now = now_unix();
        let rows = self.datapath.top(limit);
        let sources = rows
            .into_iter()
            .map(|r| {
                let named = (r.cgroup != 0)
                    .then(|| self.cgroup_names.name(r.cgroup))
                    .flatten();
                TopRow {
                    source: r.source,
                    attempts: r.attempts,
                    last_seen_unix: now - (now_mono.saturating_sub(r.last_seen_ns)) as f64 / 1e9,
                    verdict: r.verdict.to_owned(),
                    // A local process whose cgroup is gone still says it was
                    // local.
                    cgroup: match (&named, r.cgroup) {
                        (Some(n), _) => Some(n.path.clone()),
                        (None, 0) => None,
                        (None, id) => Some(format!("(gone, id {id})")),
                    },
                    unit: named.and_then(|n| n.unit),
                    pid: (r.pid != 0).then_some(r.pid),
                    comm: r.comm,
                }
            })
            .collect();
        // The counters' view of the same, so that `top` can never say
        // "nothing denied" while `stats` counts denials it has no row for
        // (evasion packets, attempts the table forgot).
        let (mut connections, mut packets) = (0, 0);
        for c in self.datapath.counters().unwrap_or_default() {
            if matches!(c.verdict, "dropped" | "rejected" | "redirected" | "audited") {
                connections += c.connections;
                packets += c.packets;
            }
        }
        TopReply {
            sources,
            denied_connections: connections,
            denied_packets: packets,
        }
    }

    pub(super) fn stats(&self) -> anyhow::Result<StatsReply> {
        let counters = self
            .datapath
            .counters()?
            .into_iter()
            .map(|r| wire::CounterReply {
                family: r.family.to_owned(),
                verdict: r.verdict.to_owned(),
                reason: r.reason.to_owned(),
                packets: r.packets,
                connections: r.connections,
            })
            .collect();
        Ok(StatsReply { counters })
    }

    /// What a connection from `ip` to `port` would get, and why: the
    /// kernel's own verdict function (`smtpgate_common::verdict::judge`) on
    /// the settings last written to the kernel, so `check` and the counters
    /// cannot disagree.
    pub(super) fn check(&self, ip: IpAddr, port: u16, to: Option<IpAddr>) -> CheckReply {
        use smtpgate_common::verdict::{Standing, is_disguised_v4, judge};
        let answer = |verdict: &str, reason: &str| CheckReply {
            ip,
            port,
            verdict: verdict.to_owned(),
            reason: reason.to_owned(),
            entry: None,
            origin: None,
        };
        if !self.config.ports.contains(&port) {
            return answer(
                "untouched",
                &format!("port {port} is not an SMTP port here"),
            );
        }
        let entry = self.allowlist.matching(ip);
        let standing = match (ip, &entry) {
            (IpAddr::V6(v6), _) if is_disguised_v4(&v6.octets()) => {
                Standing::Refused(smtpgate_common::Reason::MappedAddress)
            }
            (_, Some(_)) => Standing::Allowlisted,
            // The kernel asks the exceptions of a destination of the
            // source's family only.
            (_, None)
                if to.is_some_and(|d| {
                    d.is_ipv4() == ip.is_ipv4() && self.exceptions.covers(d, port)
                }) =>
            {
                Standing::Excepted
            }
            (_, None) => Standing::NotAllowlisted,
        };
        let (verdict, reason) = judge(Some(self.datapath.settings()), port, standing);
        let reply = answer(verdict.as_str(), reason.as_str());
        match entry {
            Some(e) if standing == Standing::Allowlisted => CheckReply {
                entry: Some(e.prefix),
                origin: Some(e.origin.clone()),
                ..reply
            },
            _ => reply,
        }
    }
}
