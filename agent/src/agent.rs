//! The running agent: the config it runs, the allowlist, the datapath.
//! Requests from the control socket are answered here; every change goes
//! config/CLI -> policy -> datapath, and is checked before anything is
//! changed, so a refused change leaves the running policy as it was.

use std::{
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use serde_json::Value;
use tracing::{error, info, warn};

use crate::{
    config::{Action, AttachPoint, Config, MissingInterface},
    control::protocol::{
        self as wire, AllowAddReply, AllowListReply, AllowRemoveReply, CheckReply, DetachReply,
        ErrorCode, QueueDeleteReply, QueueFlushReply, Request, Response, StatsReply, StatusReply,
        TopReply, TopRow,
    },
    datapath::{Datapath, DatapathError, Down, PinDir, expected_programs},
    metrics::{AttachmentState, RelaySnapshot, Snapshot},
    policy::{Allowlist, Origin, Prefix, Table},
    state::{CliEntry, State},
};

pub struct Agent {
    config: Config,
    /// The file the config came from; None for the built-in default.
    config_path: Option<PathBuf>,
    state: State,
    cli_entries: Vec<CliEntry>,
    allowlist: Allowlist,
    table_nodes: usize,
    datapath: Datapath,
    reloads_ok: u64,
    reloads_failed: u64,
    last_reload_unix: f64,
    /// Set once `detach` ran: the agent then has nothing left to do.
    detached: bool,
    /// The embedded relay, when `[relay] enabled`.
    relay: Option<smtpgate_relay::RelayHandle>,
    /// Every configured attach point and what the kernel last said of it.
    points: Vec<PointStatus>,
    /// cgroup ids of denied local processes, resolved for `top`.
    cgroup_names: crate::datapath::cgroups::Names,
    /// Denial events the kernel left out (its per-CPU budget), as last
    /// reported.
    unlogged_reported: u64,
    /// The destination exceptions, compiled, as the kernel holds them.
    exceptions: crate::policy::Exceptions,
    /// The event logger's inbox for a new datapath's ring buffer.
    events_tx: Option<tokio::sync::mpsc::UnboundedSender<aya::maps::RingBuf<aya::maps::MapData>>>,
}

/// Ring buffers of datapaths that replace the first (see `Agent::make_room`).
pub type EventRings = tokio::sync::mpsc::UnboundedReceiver<aya::maps::RingBuf<aya::maps::MapData>>;

/// One configured attach point, as last observed (see `check_attachments`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PointStatus {
    pub point: AttachPoint,
    /// `None` while it enforces.
    pub down: Option<DownSince>,
    /// How often it was attached again after going down.
    pub reattaches: u64,
    /// From the kernel's link event (or the check that found the point
    /// down) to the program being attached again, for the last reattach.
    pub last_reattach_gap_ms: Option<f64>,
    /// When it was last attached again (Unix time).
    pub last_reattach_unix: Option<f64>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DownSince {
    pub reason: String,
    pub since_unix: f64,
}

impl PointStatus {
    fn new(point: AttachPoint) -> Self {
        Self {
            point,
            down: None,
            reattaches: 0,
            last_reattach_gap_ms: None,
            last_reattach_unix: None,
        }
    }
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Loads the config the agent runs: the file, or the built-in default.
pub fn load_config(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(p) => Config::load(p)?,
        None => Config::default_config()?,
    })
}

impl Agent {
    /// Loads (or adopts) the datapath, writes the whole policy into it, then
    /// attaches and reconciles with what an earlier agent left pinned.
    pub fn start(config: Config, config_path: Option<PathBuf>) -> anyhow::Result<Self> {
        let state = State::new(&config.state_dir);
        let mut cli_entries = state.load()?;
        // Entries that expired while no agent ran leave before anything is
        // enforced, and the file says so too.
        let now = now_unix() as u64;
        if cli_entries.iter().any(|e| e.expired(now)) {
            for e in cli_entries.iter().filter(|e| e.expired(now)) {
                info!(prefix = %e.prefix, "allowlist entry expired while the agent was down");
            }
            cli_entries.retain(|e| !e.expired(now));
            state.save(&cli_entries)?;
        }
        let allowlist = allowlist_of(&config, &cli_entries);
        let table = allowlist.compile();
        let mut datapath = Datapath::load(
            PinDir::new(&config.pin_dir),
            config.table_nodes,
            table.len(),
        )
        .context("loading the datapath")?;
        if datapath.adopted() {
            info!(pin_dir = %config.pin_dir.display(), "adopted the pinned datapath of an earlier agent");
        }
        datapath
            .set_tc_mode(config.tc_mode)
            .context("choosing how TC programs attach")?;
        // The whole policy is in the maps before the first attach (or the
        // first program swap), so no program ever runs a half-written one.
        apply_settings(&mut datapath, &config, &allowlist, &table)?;
        if config.relay.enabled {
            // Before any attach: the relay's deliveries must pass from the
            // first moment the cgroup hook blocks everyone else.
            let root = crate::config::cgroup2_root();
            match crate::datapath::cgroups::own_id(&root) {
                Ok(id) => datapath.set_relay_cgroup(id)?,
                Err(e) => {
                    error!(error = %e, "cannot find the agent's own cgroup: the relay's own port-25 deliveries will be denied like any other process's");
                    datapath.set_relay_cgroup(0)?;
                }
            }
        } else {
            datapath.set_relay_cgroup(0)?;
        }
        if config.action == Action::Redirect {
            crate::datapath::redirect::install_routing()?;
        }
        let mut points = Vec::new();
        for point in &config.attach {
            points.push(attach_or_wait(
                &mut datapath,
                point,
                config.missing_interface,
            )?);
        }
        datapath.reconcile()?;
        let (v4, v6) = allowlist.count_by_family();
        info!(
            ipv4 = v4,
            ipv6 = v6,
            nodes = table.len(),
            capacity = datapath.table_capacity(),
            "allowlist installed"
        );
        let config_exceptions = config.exceptions.clone();
        Ok(Self {
            config,
            config_path,
            state,
            cli_entries,
            allowlist,
            table_nodes: table.len(),
            datapath,
            reloads_ok: 0,
            reloads_failed: 0,
            last_reload_unix: 0.0,
            detached: false,
            relay: None,
            points,
            cgroup_names: crate::datapath::cgroups::Names::new(crate::config::cgroup2_root()),
            events_tx: None,
            unlogged_reported: 0,
            exceptions: crate::policy::Exceptions::compile(&config_exceptions)?,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn detached(&self) -> bool {
        self.detached
    }

    /// Hands the relay's intercept listeners to the datapath (redirect).
    pub fn set_relay_listeners(
        &mut self,
        listeners: &crate::datapath::redirect::InterceptListeners,
    ) -> Result<(), DatapathError> {
        self.datapath.set_relay_listeners(listeners)
    }

    /// Lets the relay's delivery sockets (marked, in cgroup `id`) out.
    pub fn set_relay_cgroup(&mut self, id: u64) -> Result<(), DatapathError> {
        self.datapath.set_relay_cgroup(id)
    }

    pub fn set_relay(&mut self, relay: smtpgate_relay::RelayHandle) {
        self.relay = Some(relay);
    }

    pub fn take_relay(&mut self) -> Option<smtpgate_relay::RelayHandle> {
        self.relay.take()
    }

    fn relay(&self) -> anyhow::Result<&smtpgate_relay::RelayHandle> {
        self.relay.as_ref().ok_or_else(|| {
            coded(
                ErrorCode::NotFound,
                anyhow::anyhow!("the relay is not running (set [relay] enabled = true)"),
            )
        })
    }

    /// Re-reads this host's addresses for the cgroup connect hooks; they
    /// change (DHCP, SLAAC, an admin) and the allowlist does not know.
    pub fn refresh_local_addresses(&mut self) -> Result<(), DatapathError> {
        let (v4, v6) = local_verdicts(&self.allowlist);
        self.datapath.set_local_allowed(v4, v6)
    }

    /// Asks the kernel whether every attach point still enforces, and
    /// attaches again what went away and is back: an interface deleted and
    /// created again, a link unpinned by hand, a cgroup recreated. `event`
    /// is when the link event that prompted the check arrived (None for the
    /// periodic check), for the reattach gap.
    pub fn check_attachments(&mut self, event: Option<Instant>) {
        if self.detached {
            return;
        }
        for i in 0..self.points.len() {
            let point = self.points[i].point.clone();
            let mut result = self.datapath.observe(&point);
            let mut repaired = None;
            if let Err(down) = &result {
                self.mark_down(i, down);
                if down.repairable() {
                    result = match self.datapath.repair(&point, down) {
                        Ok(()) => {
                            repaired = Some(event.map_or(Duration::ZERO, |t| t.elapsed()));
                            self.datapath.observe(&point)
                        }
                        Err(e) => Err(Down::AttachFailed {
                            error: format!("{:#}", anyhow::Error::new(e)),
                        }),
                    };
                }
            }
            match result {
                Ok(()) => self.mark_up(i, repaired),
                Err(down) => self.mark_down(i, &down),
            }
        }
    }

    /// Records (and logs, once per reason) that point `i` does not enforce.
    fn mark_down(&mut self, i: usize, down: &Down) {
        let status = &mut self.points[i];
        let reason = down.to_string();
        if status.down.as_ref().is_some_and(|d| d.reason == reason) {
            return;
        }
        error!(point = %status.point, %reason, "attach point DOWN: SMTP egress through it is not filtered");
        let since_unix = status.down.as_ref().map_or_else(now_unix, |d| d.since_unix);
        status.down = Some(DownSince { reason, since_unix });
    }

    /// Records that point `i` enforces; `repaired` is the gap from the link
    /// event when this check attached it again.
    fn mark_up(&mut self, i: usize, repaired: Option<Duration>) {
        let status = &mut self.points[i];
        let Some(was) = status.down.take() else {
            return;
        };
        status.reattaches += 1;
        status.last_reattach_unix = Some(now_unix());
        status.last_reattach_gap_ms = repaired.map(|g| g.as_secs_f64() * 1e3);
        let gap_ms = status
            .last_reattach_gap_ms
            .map_or_else(|| "?".to_owned(), |g| format!("{g:.1}"));
        warn!(
            point = %status.point,
            down_for_ms = format!("{:.1}", (now_unix() - was.since_unix) * 1e3),
            gap_ms,
            "attach point UP again: attached after it came back"
        );
    }

    /// Removes the CLI entries whose time is up (`allow add --expires`).
    /// Called every second by the main loop, so an entry leaves within a
    /// second of its expiry.
    pub fn expire_entries(&mut self) {
        if self.detached {
            return;
        }
        let now = now_unix() as u64;
        if !self.cli_entries.iter().any(|e| e.expired(now)) {
            return;
        }
        let (gone, kept): (Vec<_>, Vec<_>) = self
            .cli_entries
            .iter()
            .cloned()
            .partition(|e| e.expired(now));
        match self.set_cli_entries(kept) {
            Ok(()) => {
                for e in gone {
                    info!(prefix = %e.prefix, comment = ?e.comment, "allowlist entry expired");
                }
            }
            // Nothing changed: the entry is still allowed, and that must be
            // loud. The next second tries again.
            Err(e) => {
                error!(error = %format!("{e:#}"), "removing expired allowlist entries failed")
            }
        }
    }

    /// Whether every configured attach point enforces, as last observed.
    fn all_up(&self) -> bool {
        !self.points.is_empty() && self.points.iter().all(|p| p.down.is_none())
    }

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

    /// SIGHUP and `smtpgate reload`: re-reads the config. A config that
    /// does not load, or does not fit, changes nothing.
    pub fn reload(&mut self) -> anyhow::Result<StatusReply> {
        // Every reload path comes through here, so systemd hears of each.
        crate::notify::reloading();
        let result = self.reload_inner();
        crate::notify::ready("enforcing");
        result
    }

    fn reload_inner(&mut self) -> anyhow::Result<StatusReply> {
        self.last_reload_unix = now_unix();
        if let Some(relay) = &self.relay {
            // New certificate and key; on error the old ones stay.
            if let Err(e) = relay.reload_tls() {
                warn!(error = %e, "relay TLS reload failed; keeping the old certificate");
            }
            // New or removed DKIM keys; on error the old keys keep signing.
            if let Err(e) = relay.reload_dkim() {
                warn!(error = %e, "relay DKIM key reload failed; keeping the old keys");
            }
        }
        match self.try_reload() {
            Ok(v) => {
                self.reloads_ok += 1;
                info!("config reloaded");
                Ok(v)
            }
            Err(e) => {
                self.reloads_failed += 1;
                warn!(error = %format!("{e:#}"), "reload refused; the running policy is unchanged");
                Err(coded(
                    ErrorCode::Refused,
                    e.context("reload refused; the running policy is unchanged"),
                ))
            }
        }
    }

    fn try_reload(&mut self) -> anyhow::Result<StatusReply> {
        let config = load_config(self.config_path.as_deref())?;
        if config.pin_dir != self.config.pin_dir || config.state_dir != self.config.state_dir {
            bail!("datapath.pin_dir and state_dir cannot change while running; restart the agent");
        }
        if config.tc_mode != self.config.tc_mode {
            bail!("datapath.tc_mode cannot change while running; restart the agent");
        }
        if config.control_socket != self.config.control_socket
            || config.metrics_listen != self.config.metrics_listen
        {
            bail!(
                "control.socket and metrics.listen cannot change while running; restart the agent"
            );
        }
        if serde_json::to_value(&config.relay)? != serde_json::to_value(&self.config.relay)? {
            bail!(
                "[relay] settings change only when the agent restarts (its certificate is reloaded now)"
            );
        }
        // Everything that can fail is checked before anything changes.
        for point in &config.attach {
            check_attach_point(point, config.missing_interface)?;
        }
        let allowlist = allowlist_of(&config, &self.cli_entries);
        let table = allowlist.compile();
        self.make_room(&table)?;
        if (config.action == Action::Redirect) != (self.config.action == Action::Redirect) {
            bail!(
                "action = \"redirect\" is switched on or off only when the agent restarts (the relay's intercept listener is bound at start)"
            );
        }
        if config.action == Action::Redirect && self.relay.is_none() {
            bail!(
                "action = \"redirect\" needs the relay, which starts only with the agent: restart it"
            );
        }
        if config.action == Action::Redirect {
            crate::datapath::redirect::install_routing()?;
        }
        apply_settings(&mut self.datapath, &config, &allowlist, &table)?;
        let removed: Vec<AttachPoint> = self
            .config
            .attach
            .iter()
            .filter(|p| !config.attach.contains(p))
            .cloned()
            .collect();
        for point in config
            .attach
            .iter()
            .filter(|p| !self.config.attach.contains(p))
        {
            let status = attach_or_wait(&mut self.datapath, point, config.missing_interface)?;
            self.points.push(status);
        }
        for point in &removed {
            self.datapath.forget(point);
        }
        self.points.retain(|p| config.attach.contains(&p.point));
        self.datapath.reconcile()?;
        self.table_nodes = table.len();
        self.allowlist = allowlist;
        self.exceptions = crate::policy::Exceptions::compile(&config.exceptions)?;
        self.config = config;
        Ok(self.status())
    }

    /// Makes sure the datapath's tables can hold `table`, growing them
    /// live if they cannot: a successor datapath with bigger maps takes over
    /// every attach point, holding the policy enforced now, so the change
    /// that needed the room is applied after, like any other.
    fn make_room(&mut self, table: &Table) -> anyhow::Result<()> {
        let capacity = self.datapath.table_capacity();
        if table.len() <= capacity {
            return Ok(());
        }
        let configured = self.config.table_nodes;
        if configured != 0 {
            bail!(
                "the allowlist needs {} table nodes, and datapath.table_nodes = {configured} fixes the tables at that: raise it (or set 0 to size them by need) and restart",
                table.len()
            );
        }
        let max = crate::config::MAX_TABLE_NODES as usize;
        if table.len() > max {
            bail!(
                "the allowlist needs {} table nodes, more than the {max} a table may have",
                table.len()
            );
        }
        let started = Instant::now();
        let mut next = self
            .datapath
            .successor(table.len())
            .context("loading a datapath with bigger tables")?;
        // The policy of now, in the new maps, before any program swap.
        let current = self.allowlist.compile();
        next.install(&current)?;
        for p in &self.points {
            match &p.down {
                None => next
                    .attach(&p.point)
                    .with_context(|| format!("moving {} to the bigger tables", p.point))?,
                Some(_) => next.preload(&p.point)?,
            }
        }
        next.reconcile()?;
        let old = std::mem::replace(&mut self.datapath, next);
        self.datapath.absorb(&old);
        if let (Some(tx), Some(ring)) = (&self.events_tx, self.datapath.take_events()) {
            let _ = tx.send(ring);
        }
        drop(old);
        info!(
            from = capacity,
            to = self.datapath.table_capacity(),
            needed = table.len(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "allowlist tables grown live"
        );
        Ok(())
    }

    /// Installs the allowlist for a new set of CLI entries, persisting them
    /// first: an entry is never enforced without being saved, and a change
    /// that cannot be enforced is not saved.
    fn set_cli_entries(&mut self, entries: Vec<CliEntry>) -> anyhow::Result<()> {
        let allowlist = allowlist_of(&self.config, &entries);
        let table = allowlist.compile();
        self.make_room(&table)?;
        self.state.save(&entries)?;
        if let Err(e) = self.datapath.install(&table) {
            // Put the saved state back as it was; the kernel still has the
            // old table (install flips only once the new one is complete).
            let _ = self.state.save(&self.cli_entries);
            return Err(e.into());
        }
        self.cli_entries = entries;
        self.table_nodes = table.len();
        self.allowlist = allowlist;
        self.refresh_local_addresses()?;
        Ok(())
    }

    fn allow_add(
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
        if let Some(e) = self.allowlist.get(&prefix) {
            return Err(coded(
                ErrorCode::Conflict,
                anyhow::anyhow!(
                    "{prefix} is already allowlisted (from the {})",
                    origin_name(e.origin)
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

    fn allow_remove(&mut self, prefix: &str) -> anyhow::Result<AllowRemoveReply> {
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
        })
    }

    fn detach(&mut self) -> anyhow::Result<DetachReply> {
        let classic_filters_removed = self.datapath.detach_all()?;
        self.detached = true;
        warn!(pin_dir = %self.config.pin_dir.display(), "detached: smtpgate no longer enforces anything");
        Ok(DetachReply {
            detached: self.config.pin_dir.clone(),
            pins_removed: true,
            classic_filters_removed,
        })
    }

    fn status(&self) -> StatusReply {
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

    fn top(&mut self, limit: usize) -> TopReply {
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

    /// Says in the log how many denial events the kernel left out since it
    /// last said so (a flood past the per-CPU budget). Every attempt is in
    /// the counters and `top` all the same.
    pub fn report_unlogged(&mut self) {
        let total = self.datapath.unlogged_events();
        if total > self.unlogged_reported {
            warn!(
                target: "smtpgate::denied",
                unlogged = total - self.unlogged_reported,
                "denial events left out: more than the per-CPU budget per second (all are counted; see smtpgate stats and top)"
            );
        }
        // Also when it went down: a successor datapath starts from zero.
        self.unlogged_reported = total;
    }

    /// The datapath's ring buffer of denied attempts (see `events`), and
    /// where the ring of each datapath that replaces this one will come.
    pub fn take_events(&mut self) -> Option<(aya::maps::RingBuf<aya::maps::MapData>, EventRings)> {
        let ring = self.datapath.take_events()?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.events_tx = Some(tx);
        Some((ring, rx))
    }

    fn stats(&self) -> anyhow::Result<StatsReply> {
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
    fn check(&self, ip: IpAddr, port: u16, to: Option<IpAddr>) -> CheckReply {
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
                origin: Some(e.origin),
                ..reply
            },
            _ => reply,
        }
    }

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

/// An error with the code the control socket sends with it.
#[derive(Debug)]
struct Coded(ErrorCode, anyhow::Error);

impl std::fmt::Display for Coded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.1)
    }
}

impl std::error::Error for Coded {}

fn coded(code: ErrorCode, e: anyhow::Error) -> anyhow::Error {
    anyhow::Error::new(Coded(code, e))
}

/// A typed reply, as the JSON the wire carries.
fn reply<T: serde::Serialize>(t: T) -> anyhow::Result<Value> {
    serde_json::to_value(t).context("encoding the reply")
}

fn origin_name(o: Origin) -> &'static str {
    match o {
        Origin::Config => "config file",
        Origin::Cli => "CLI (smtpgate allow add)",
    }
}

fn allowlist_of(config: &Config, cli: &[CliEntry]) -> Allowlist {
    Allowlist::new(
        &config.allowlist,
        cli.iter()
            .map(|e| (&e.prefix, e.comment.as_ref(), e.expires)),
    )
}

/// Writes ports, mode, action, the host's own verdicts and the table.
fn apply_settings(
    dp: &mut Datapath,
    config: &Config,
    allowlist: &Allowlist,
    table: &Table,
) -> anyhow::Result<()> {
    dp.set_ports(&config.ports)?;
    dp.set_action(config.mode, config.action, config.other_action)?;
    let exceptions = crate::policy::Exceptions::compile(&config.exceptions)?;
    dp.set_exceptions(exceptions.kernel_entries())?;
    dp.install(table)?;
    let (v4, v6) = local_verdicts(allowlist);
    dp.set_local_allowed(v4, v6)?;
    Ok(())
}

/// Attaches one point at start or reload. An interface that is not there
/// is fatal, or with `missing_interface = "wait"` a point that starts DOWN
/// and is attached by `check_attachments` when the interface appears.
fn attach_or_wait(
    datapath: &mut Datapath,
    point: &AttachPoint,
    missing: MissingInterface,
) -> anyhow::Result<PointStatus> {
    let mut status = PointStatus::new(point.clone());
    match datapath.attach(point) {
        Ok(()) => {}
        Err(DatapathError::NoInterface { name }) if missing == MissingInterface::Wait => {
            datapath.preload(point)?;
            let reason = Down::NoInterface { name }.to_string();
            error!(%point, %reason, "attach point DOWN: waiting for the interface; SMTP egress through it is not filtered until then");
            status.down = Some(DownSince {
                reason,
                since_unix: now_unix(),
            });
        }
        Err(e @ DatapathError::NoInterface { .. }) => {
            return Err(anyhow::Error::new(e).context(format!(
                "attaching to {point} (with [datapath] missing_interface = \"wait\" the agent starts and attaches it when it appears)"
            )));
        }
        Err(e) => return Err(anyhow::Error::new(e).context(format!("attaching to {point}"))),
    }
    Ok(status)
}

/// What can be checked about an attach point without attaching.
fn check_attach_point(point: &AttachPoint, missing: MissingInterface) -> anyhow::Result<()> {
    match point {
        AttachPoint::TcIngress { interface } | AttachPoint::TcEgress { interface } => {
            if nix::net::if_::if_nametoindex(interface.as_str()).is_err()
                && missing == MissingInterface::Fail
            {
                bail!(
                    "{point}: interface {interface:?} not found (with [datapath] missing_interface = \"wait\" the agent attaches it when it appears)"
                );
            }
        }
        AttachPoint::Cgroup { path } => {
            let path = path.clone().unwrap_or_else(crate::config::cgroup2_root);
            if !path.is_dir() {
                bail!("{point}: {} is not a cgroup directory", path.display());
            }
        }
    }
    Ok(())
}

/// Whether any of this host's addresses, per family, is allowlisted.
fn local_verdicts(allowlist: &Allowlist) -> (bool, bool) {
    let addrs = local_addresses();
    let any = |v4: bool| {
        addrs
            .iter()
            .any(|a| a.is_ipv4() == v4 && allowlist.matching(*a).is_some())
    };
    (any(true), any(false))
}

/// The addresses an unbound socket may get as its source when it connects
/// to a non-loopback destination: all of this network namespace's, except
/// loopback and IPv6 link-local ones.
fn local_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| {
            let sa = a.address?;
            if let Some(v4) = sa.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .filter(|a| match a {
            IpAddr::V4(v4) => !v4.is_loopback(),
            IpAddr::V6(v6) => !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80,
        })
        .collect()
}

/// CLOCK_MONOTONIC, which bpf_ktime_get_ns reads.
fn monotonic_ns() -> u64 {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_MONOTONIC).map_or(0, |ts| {
        ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
    })
}
