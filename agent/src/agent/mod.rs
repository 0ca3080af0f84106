//! The running agent: the config it runs, the allowlist, the datapath.
//! Requests from the control socket are answered here; every change goes
//! config/CLI -> policy -> datapath, and is checked before anything is
//! changed, so a refused change leaves the running policy as it was.

mod handlers;
mod health;
mod host;
mod snapshot;

use host::{local_verdicts, monotonic_ns};

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
    metrics::{AttachmentState, DnsNameSnapshot, RelaySnapshot, Snapshot},
    policy::{Allowlist, Builder, Origin, Prefix, Table},
    sources::{self, DnsAnswer, Scan, Sources, Store},
    state::{CliEntry, State},
};

pub struct Agent {
    config: Config,
    /// The file the config came from; None for the built-in default.
    config_path: Option<PathBuf>,
    state: State,
    cli_entries: Vec<CliEntry>,
    /// Names and allowlist files, with their last good state.
    sources: Sources,
    sources_store: Store,
    sources_tx: sources::Senders,
    /// For `run` to hand to the tasks that keep the sources current.
    sources_rx: Option<sources::Watches>,
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
        // The files as they are, names with the addresses the last agent
        // resolved: the first table already holds both, so a restart
        // never drops an entry that a source still lists.
        let sources_store = Store::new(&config.state_dir);
        let stored = sources_store.load().unwrap_or_else(|e| {
            error!(error = %e, "ignoring the sources' saved state: names allow nothing until they resolve, broken files nothing until fixed");
            sources::Stored::default()
        });
        let sources = Sources::new(
            &config,
            stored,
            sources::files::scan(&config.allowlist_files),
            now_unix(),
        );
        let (sources_tx, sources_rx) = sources.channels();
        let allowlist = allowlist_of(&config, &cli_entries, &sources);
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
        // Names and files no longer configured leave the saved state.
        sources.save(&sources_store);
        Ok(Self {
            config,
            config_path,
            state,
            cli_entries,
            sources,
            sources_store,
            sources_tx,
            sources_rx: Some(sources_rx),
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

    /// What the source tasks watch (see `sources::spawn`); once.
    pub fn take_source_watches(&mut self) -> Option<sources::Watches> {
        self.sources_rx.take()
    }

    /// A DNS answer for a name in the allowlist.
    pub fn apply_dns(&mut self, answer: DnsAnswer) {
        if !self.detached && self.sources.apply_dns(answer, now_unix()) {
            self.install_sources();
        }
    }

    /// The allowlist files, as the watcher read them.
    pub fn apply_files(&mut self, scan: Scan) {
        if !self.detached && self.sources.apply_scan(scan, now_unix()) {
            self.sources_tx.update(&self.sources);
            self.install_sources();
        }
    }

    /// Installs the allowlist after a source changed, as a reload would:
    /// a whole new table, or, if it cannot be, the old one stays and the
    /// sources' status says why until a later change fits.
    fn install_sources(&mut self) {
        let allowlist = allowlist_of(&self.config, &self.cli_entries, &self.sources);
        let table = allowlist.compile();
        // Grown live if the new list needs more room, as for a reload.
        let result = self
            .make_room(&table)
            .and_then(|()| self.datapath.install(&table).map_err(anyhow::Error::new));
        match result {
            Ok(()) => {
                let (v4, v6) = allowlist.count_by_family();
                info!(
                    ipv4 = v4,
                    ipv6 = v6,
                    nodes = table.len(),
                    "allowlist updated from its sources"
                );
                self.allowlist = allowlist;
                self.table_nodes = table.len();
                self.sources.install_error = None;
                self.sources.save(&self.sources_store);
                if let Err(e) = self.refresh_local_addresses() {
                    warn!(error = %e, "refreshing local addresses");
                }
            }
            Err(e) => {
                let e = format!("{e:#}");
                error!(error = %e, "the allowlist's sources changed but the new table cannot be installed; the running policy is unchanged");
                self.sources.install_error = Some(e);
            }
        }
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
        // The files are read now, so the reply says what they hold; a
        // broken one keeps its last good entries, as it would live.
        let mut sources = self.sources.clone();
        sources.set_config(
            &config,
            sources::files::scan(&config.allowlist_files),
            now_unix(),
        );
        let allowlist = allowlist_of(&config, &self.cli_entries, &sources);
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
        sources.install_error = None;
        self.sources = sources;
        self.sources.save(&self.sources_store);
        self.sources_tx.update(&self.sources);
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
        apply_settings(&mut next, &self.config, &self.allowlist, &current)?;
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
        let allowlist = allowlist_of(&self.config, &entries, &self.sources);
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

    /// The datapath's ring buffer of denied attempts (see `events`), and
    /// where the ring of each datapath that replaces this one will come.
    pub fn take_events(&mut self) -> Option<(aya::maps::RingBuf<aya::maps::MapData>, EventRings)> {
        let ring = self.datapath.take_events()?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.events_tx = Some(tx);
        Some((ring, rx))
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

fn origin_name(o: &Origin) -> String {
    match o {
        Origin::Config => "config file".into(),
        Origin::Cli => "CLI (smtpgate allow add)".into(),
        other => other.to_string(),
    }
}

/// The allowlist of every source: the config's prefixes, the CLI's
/// entries, the files' prefixes and the addresses the names resolve to.
fn allowlist_of(config: &Config, cli: &[CliEntry], sources: &Sources) -> Allowlist {
    let mut b = Builder::default();
    for p in &config.allowlist {
        b.add(*p, Origin::Config, None, None);
    }
    for e in cli {
        b.add(e.prefix, Origin::Cli, e.comment.clone(), e.expires);
    }
    sources.contribute(&mut b);
    b.build()
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
