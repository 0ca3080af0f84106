//! The agent's configuration: a TOML file, parsed strictly, then validated
//! into typed values.
//!
//! Load order: built-in defaults -> the file -> validation. Unknown keys are
//! errors (a typo must not silently turn a setting off), and so is every
//! value that would make the datapath do something other than what the admin
//! wrote.

use std::{collections::BTreeSet, fmt, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::{
    paths,
    policy::{Item, Named, Prefix},
    sources::FilePattern,
};

/// The config the agent runs with when given none: protect this host itself.
pub const DEFAULT_TOML: &str = include_str!("default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: {source}")]
    Parse {
        origin: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("allowlist entry {index} ({entry:?}): {source}")]
    Allowlist {
        index: usize,
        entry: String,
        #[source]
        source: crate::policy::ItemError,
    },
    #[error("allowlist entry {entry:?} is listed twice")]
    DuplicateEntry { entry: String },
    #[error("allowlist_files entry {index} ({pattern:?}): {reason}")]
    AllowlistFile {
        index: usize,
        pattern: String,
        reason: String,
    },
    #[error("[resolver] {reason}")]
    Resolver { reason: String },
    #[error("ports: {reason}")]
    Ports { reason: String },
    #[error("attach point {index}: {reason}")]
    Attach { index: usize, reason: String },
    #[error("[relay]: {0}")]
    Relay(#[source] smtpgate_relay::ConfigError),
    #[error("no [[attach]] points: smtpgate would enforce nothing")]
    NoAttachPoints,
    #[error("action = \"redirect\" needs the embedded relay: set [relay] enabled = true")]
    RedirectNeedsRelay,
    #[error(
        "action = \"redirect\" works at tc-ingress (the client-facing interface) and cgroup hooks, not at {point}"
    )]
    RedirectAtEgress { point: String },
    #[error(
        "action = \"redirect\" steers port 25 only, and ports = {ports:?} has no 25: nothing would be redirected (use \"reject\" or \"drop\")"
    )]
    RedirectWithoutPort25 { ports: Vec<u16> },
    #[error(
        "redirect_fallback = {fallback:?} applies only with action = \"redirect\" (it says what ports other than 25 get then); remove it, or set action = \"redirect\""
    )]
    FallbackWithoutRedirect { fallback: String },
    #[error(
        "[relay] intercept_listen = {addr}: the intercept listener binds loopback only (127.0.0.1 and ::1, so that nothing but redirected connections reaches it); give \"127.0.0.1:PORT\", or leave it out for a port the kernel picks"
    )]
    InterceptNotLoopback { addr: std::net::SocketAddr },
    #[error("[[exception]] {index}: {reason}")]
    Exception { index: usize, reason: String },
    #[error("[[exception]]: {0}")]
    Exceptions(#[from] crate::policy::ExceptionError),
    #[error("datapath.table_nodes = {value}: must be between {min} and {max}")]
    TableNodes { value: u32, min: u32, max: u32 },
    #[error("${var} = {value:?}: must be \"auto\", \"tcx\" or \"classic\"")]
    TcModeEnv { var: &'static str, value: String },
}

/// The file as written, before validation.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// `enforce` (default) or `audit`: count and log denials, let them through.
    #[serde(default)]
    pub mode: Mode,
    /// What non-allowlisted SMTP egress gets: `drop` or `reject` (default).
    #[serde(default)]
    pub action: Action,
    /// TCP destination ports that count as SMTP egress. Default: `[25]`.
    #[serde(default = "default_ports")]
    pub ports: Vec<u16>,
    /// With `action = "redirect"`: what denied connections to ports other
    /// than 25 get, `reject` (default) or `drop`. They cannot be redirected:
    /// 465 is TLS from the first byte and 587 ends in AUTH, so an intercept
    /// could only fail or collect a user's credentials for another server.
    #[serde(default)]
    pub redirect_fallback: Option<Fallback>,
    /// Source prefixes allowed to send SMTP egress: IPv4 or IPv6, with or
    /// without a prefix length (a bare address is a host); or a host name
    /// (its A and AAAA records), or `mx:` and a domain (its MX hosts'),
    /// re-resolved as their TTLs run out.
    #[serde(default)]
    pub allowlist: Vec<String>,
    /// Files with one allowlist entry (prefix or name) per line, watched
    /// and applied live: absolute paths, with shell wildcards in the file
    /// name (`/etc/smtpgate/allow.d/*.txt`).
    #[serde(default)]
    pub allowlist_files: Vec<String>,
    /// How names in the allowlist are resolved.
    #[serde(default)]
    pub resolver: ResolverFile,
    /// Where the programs attach.
    #[serde(default)]
    pub attach: Vec<AttachPoint>,
    /// Destinations any source may reach on the SMTP ports.
    #[serde(default)]
    pub exception: Vec<ExceptionFile>,
    #[serde(default)]
    pub datapath: Datapath,
    /// Where the agent keeps what it must remember: allowlist entries added
    /// with `smtpgate allow add`.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub control: Control,
    #[serde(default)]
    pub metrics: Metrics,
    /// The embedded submission relay (off by default).
    #[serde(default)]
    pub relay: smtpgate_relay::RelayConfig,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ResolverFile {
    /// DNS servers as "address" or "address:port" (UDP, and TCP for long
    /// answers). Default: the nameservers of /etc/resolv.conf, read at
    /// start and at each reload.
    #[serde(default)]
    pub nameservers: Vec<String>,
    /// A name is resolved again when its records' TTL runs out, but never
    /// sooner than this (a TTL of 0 must not become a query loop)...
    #[serde(default = "default_min_ttl")]
    pub min_ttl_secs: u64,
    /// ...and never later than this (a week-long TTL must not keep a moved
    /// mail server's old address). A failed lookup is retried after
    /// `min_ttl_secs`.
    #[serde(default = "default_max_ttl")]
    pub max_ttl_secs: u64,
    /// How long one query waits for an answer.
    #[serde(default = "default_dns_timeout")]
    pub timeout_secs: u64,
}

impl Default for ResolverFile {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            min_ttl_secs: default_min_ttl(),
            max_ttl_secs: default_max_ttl(),
            timeout_secs: default_dns_timeout(),
        }
    }
}

fn default_min_ttl() -> u64 {
    30
}

fn default_max_ttl() -> u64 {
    3600
}

fn default_dns_timeout() -> u64 {
    5
}

/// `[resolver]`, validated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ResolverConfig {
    /// None: /etc/resolv.conf's.
    pub nameservers: Option<Vec<std::net::SocketAddr>>,
    pub min_ttl: std::time::Duration,
    pub max_ttl: std::time::Duration,
    pub timeout: std::time::Duration,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        ResolverFile::default()
            .validate()
            .expect("the default [resolver] is valid")
    }
}

/// A day: the longest any bound may be.
const MAX_DNS_SECS: u64 = 86_400;

impl ResolverFile {
    fn validate(&self) -> Result<ResolverConfig, ConfigError> {
        let bad = |reason: String| ConfigError::Resolver { reason };
        let mut nameservers = Vec::new();
        for ns in &self.nameservers {
            let addr = ns
                .parse::<std::net::SocketAddr>()
                .or_else(|_| {
                    ns.parse::<std::net::IpAddr>()
                        .map(|ip| std::net::SocketAddr::new(ip, 53))
                })
                .map_err(|_| {
                    bad(format!(
                        "nameservers: {ns:?} is not an address or address:port (\"192.0.2.53\", \"[2001:db8::53]:53\")"
                    ))
                })?;
            if addr.port() == 0 {
                return Err(bad(format!("nameservers: {ns:?}: port 0")));
            }
            nameservers.push(addr);
        }
        if self.min_ttl_secs == 0 || self.min_ttl_secs > MAX_DNS_SECS {
            return Err(bad(format!(
                "min_ttl_secs = {}: must be 1 to {MAX_DNS_SECS}",
                self.min_ttl_secs
            )));
        }
        if self.max_ttl_secs < self.min_ttl_secs || self.max_ttl_secs > MAX_DNS_SECS {
            return Err(bad(format!(
                "max_ttl_secs = {}: must be between min_ttl_secs ({}) and {MAX_DNS_SECS}",
                self.max_ttl_secs, self.min_ttl_secs
            )));
        }
        if self.timeout_secs == 0 || self.timeout_secs > 60 {
            return Err(bad(format!(
                "timeout_secs = {}: must be 1 to 60",
                self.timeout_secs
            )));
        }
        Ok(ResolverConfig {
            nameservers: (!nameservers.is_empty()).then_some(nameservers),
            min_ttl: std::time::Duration::from_secs(self.min_ttl_secs),
            max_ttl: std::time::Duration::from_secs(self.max_ttl_secs),
            timeout: std::time::Duration::from_secs(self.timeout_secs),
        })
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Serve /metrics, /healthz and /readyz.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Where. Default: 127.0.0.1:9725 (loopback: a scraper elsewhere needs
    /// this changed deliberately).
    #[serde(default = "default_metrics_listen")]
    pub listen: std::net::SocketAddr,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: default_metrics_listen(),
        }
    }
}

fn yes() -> bool {
    true
}

fn default_metrics_listen() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 9725))
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Control {
    /// The control socket the CLI talks to.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
}

impl Default for Control {
    fn default() -> Self {
        Self {
            socket: default_socket(),
        }
    }
}

fn default_socket() -> PathBuf {
    PathBuf::from(paths::CONTROL_SOCKET)
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Drop,
    #[default]
    Reject,
    Redirect,
}

/// One `[[exception]]` as written.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExceptionFile {
    /// Prefixes or addresses, IPv4 or IPv6.
    pub destinations: Vec<String>,
    /// Which of the SMTP `ports` it covers. Default: all of them.
    #[serde(default)]
    pub ports: Vec<u16>,
    #[serde(default)]
    pub comment: Option<String>,
}

/// What `redirect_fallback` may say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fallback {
    Drop,
    Reject,
}

impl From<Fallback> for Action {
    fn from(f: Fallback) -> Self {
        match f {
            Fallback::Drop => Action::Drop,
            Fallback::Reject => Action::Reject,
        }
    }
}

/// One attach point.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(tag = "hook", rename_all = "kebab-case", deny_unknown_fields)]
pub enum AttachPoint {
    /// Ingress of the client-facing interface: sees client addresses before
    /// NAT. The right choice for NAT gateways.
    TcIngress { interface: String },
    /// Egress of an interface: for routed gateways without NAT. Behind a
    /// masquerade it sees the gateway's address, not the client's.
    TcEgress { interface: String },
    /// Egress of every process in a cgroup v2 (and its descendants): for the
    /// gateway host's own processes. Without a path: the whole host (the
    /// root of the cgroup v2 hierarchy, wherever it is mounted).
    Cgroup {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<PathBuf>,
    },
}

impl fmt::Display for AttachPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttachPoint::TcIngress { interface } => write!(f, "tc-ingress:{interface}"),
            AttachPoint::TcEgress { interface } => write!(f, "tc-egress:{interface}"),
            AttachPoint::Cgroup { path: Some(path) } => write!(f, "cgroup:{}", path.display()),
            AttachPoint::Cgroup { path: None } => write!(f, "cgroup:<root>"),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Datapath {
    /// Nodes (1 KiB each) in each of the two allowlist tables. 0 (default)
    /// sizes them from the allowlist at start, with room to grow.
    #[serde(default)]
    pub table_nodes: u32,
    /// Where maps, programs and links are pinned in bpffs, so that
    /// enforcement outlives the agent.
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// What a `tc-*` attach point whose interface does not exist at start
    /// means: `fail` (default: the agent refuses to start, since a typo
    /// must not look like protection) or `wait` (the point is reported
    /// DOWN, and attached as soon as the interface appears: a `ppp0` that
    /// dials later). Interfaces that disappear while the agent runs are
    /// always waited for, and reported DOWN until they come back.
    #[serde(default)]
    pub missing_interface: MissingInterface,
    /// How `tc-*` attach points attach: `auto` (default: TCX links where
    /// the kernel has them, Linux 6.6+, classic clsact/cls_bpf filters
    /// otherwise), `tcx` (an error on a kernel without TCX) or `classic`.
    /// `$SMTPGATE_TC_MODE` overrides it.
    #[serde(default)]
    pub tc_mode: TcMode,
}

/// How TC programs are attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TcMode {
    #[default]
    Auto,
    /// TCX links (Linux 6.6+): pinned in bpffs, atomically updated.
    Tcx,
    /// A clsact qdisc and a direct-action cls_bpf filter (Linux 4.5+),
    /// which the kernel keeps until it is deleted: no pin needed.
    Classic,
}

impl TcMode {
    fn from_env_value(value: &str) -> Option<Self> {
        match value {
            "auto" => Some(Self::Auto),
            "tcx" => Some(Self::Tcx),
            "classic" => Some(Self::Classic),
            _ => None,
        }
    }
}

impl fmt::Display for TcMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TcMode::Auto => "auto",
            TcMode::Tcx => "tcx",
            TcMode::Classic => "classic",
        })
    }
}

/// The environment variable that overrides `datapath.tc_mode`: tests run
/// the same config in both modes with it, and an admin can try classic
/// mode without editing the file.
pub const TC_MODE_ENV: &str = "SMTPGATE_TC_MODE";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MissingInterface {
    #[default]
    Fail,
    Wait,
}

impl Default for Datapath {
    fn default() -> Self {
        Self {
            table_nodes: 0,
            pin_dir: default_pin_dir(),
            missing_interface: MissingInterface::default(),
            tc_mode: TcMode::default(),
        }
    }
}

fn default_pin_dir() -> PathBuf {
    PathBuf::from(paths::PIN_DIR)
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(paths::STATE_DIR)
}

fn default_ports() -> Vec<u16> {
    vec![25]
}

/// A validated configuration.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub mode: Mode,
    /// The action on port 25 (see `smtpgate_common::verdict`).
    pub action: Action,
    /// The action on the other SMTP ports: `action`, except under redirect.
    pub other_action: Action,
    pub ports: BTreeSet<u16>,
    /// The `allowlist` entries that are prefixes...
    pub allowlist: Vec<Prefix>,
    pub exceptions: Vec<crate::policy::Exception>,
    /// ...and those that are names.
    pub allowlist_names: Vec<Named>,
    pub allowlist_files: Vec<FilePattern>,
    pub resolver: ResolverConfig,
    pub attach: Vec<AttachPoint>,
    pub table_nodes: u32,
    pub pin_dir: PathBuf,
    pub missing_interface: MissingInterface,
    /// After `$SMTPGATE_TC_MODE`.
    pub tc_mode: TcMode,
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
    /// Where to serve metrics, if at all.
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub relay: smtpgate_relay::RelayConfig,
}

/// Upper bound on `table_nodes`: 2 tables of 4 GiB would not be a sane
/// amount of locked kernel memory for an allowlist.
pub const MAX_TABLE_NODES: u32 = 2 * 1024 * 1024;
/// Lower bound: the two roots take 512 nodes.
pub const MIN_TABLE_NODES: u32 = 1024;

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The built-in default config.
    pub fn default_config() -> Result<Self, ConfigError> {
        Self::parse(DEFAULT_TOML, "built-in default config")
    }

    /// Parses and validates config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        Self::parse_with_env(text, origin, |var| std::env::var(var).ok())
    }

    /// `parse`, with the environment overrides read through `env` (tests
    /// give it a fake environment).
    fn parse_with_env(
        text: &str,
        origin: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut file: File = toml::from_str(text).map_err(|source| ConfigError::Parse {
            origin: origin.to_owned(),
            source,
        })?;
        if let Some(value) = env(TC_MODE_ENV) {
            file.datapath.tc_mode =
                TcMode::from_env_value(&value).ok_or(ConfigError::TcModeEnv {
                    var: TC_MODE_ENV,
                    value,
                })?;
        }
        file.validate()
    }
}

impl File {
    pub fn validate(self) -> Result<Config, ConfigError> {
        if self.action == Action::Redirect {
            if !self.relay.enabled {
                return Err(ConfigError::RedirectNeedsRelay);
            }
            if let Some(p) = self
                .attach
                .iter()
                .find(|p| matches!(p, AttachPoint::TcEgress { .. }))
            {
                return Err(ConfigError::RedirectAtEgress {
                    point: p.to_string(),
                });
            }
        }
        let ports = validate_ports(&self.ports)?;
        let other_action = other_action(self.action, self.redirect_fallback, &ports)?;
        if let Some(addr) = self.relay.intercept_listen
            && !addr.ip().is_loopback()
        {
            return Err(ConfigError::InterceptNotLoopback { addr });
        }
        if self.relay.enabled {
            self.relay.validate().map_err(ConfigError::Relay)?;
        }
        let mut seen = BTreeSet::new();
        let mut allowlist = Vec::with_capacity(self.allowlist.len());
        let mut allowlist_names = Vec::new();
        for (index, entry) in self.allowlist.iter().enumerate() {
            let item: Item = entry.parse().map_err(|source| ConfigError::Allowlist {
                index,
                entry: entry.clone(),
                source,
            })?;
            if !seen.insert(item.clone()) {
                return Err(ConfigError::DuplicateEntry {
                    entry: entry.clone(),
                });
            }
            match item {
                Item::Prefix(p) => allowlist.push(p),
                Item::Named(n) => allowlist_names.push(n),
            }
        }
        let exceptions = validate_exceptions(&self.exception, &ports)?;
        let mut allowlist_files: Vec<FilePattern> = Vec::new();
        for (index, pattern) in self.allowlist_files.iter().enumerate() {
            let p: FilePattern = pattern.parse().map_err(|e: crate::sources::PatternError| {
                ConfigError::AllowlistFile {
                    index,
                    pattern: pattern.clone(),
                    reason: e.to_string(),
                }
            })?;
            if allowlist_files.contains(&p) {
                return Err(ConfigError::AllowlistFile {
                    index,
                    pattern: pattern.clone(),
                    reason: "listed twice".into(),
                });
            }
            allowlist_files.push(p);
        }
        let resolver = self.resolver.validate()?;
        if self.attach.is_empty() {
            return Err(ConfigError::NoAttachPoints);
        }
        let mut attach = self.attach;
        for point in &mut attach {
            if let AttachPoint::Cgroup { path: path @ None } = point {
                *path = Some(cgroup2_root());
            }
        }
        for (index, point) in attach.iter().enumerate() {
            validate_attach(point).map_err(|reason| ConfigError::Attach { index, reason })?;
            if attach[..index].contains(point) {
                return Err(ConfigError::Attach {
                    index,
                    reason: format!("{point} is listed twice"),
                });
            }
        }
        let n = self.datapath.table_nodes;
        if n != 0 && !(MIN_TABLE_NODES..=MAX_TABLE_NODES).contains(&n) {
            return Err(ConfigError::TableNodes {
                value: n,
                min: MIN_TABLE_NODES,
                max: MAX_TABLE_NODES,
            });
        }
        Ok(Config {
            mode: self.mode,
            action: self.action,
            other_action,
            ports,
            allowlist,
            exceptions,
            allowlist_names,
            allowlist_files,
            resolver,
            attach,
            table_nodes: n,
            pin_dir: self.datapath.pin_dir,
            missing_interface: self.datapath.missing_interface,
            tc_mode: self.datapath.tc_mode,
            state_dir: self.state_dir,
            control_socket: self.control.socket,
            metrics_listen: self.metrics.enabled.then_some(self.metrics.listen),
            relay: self.relay,
        })
    }
}

fn validate_exceptions(
    list: &[ExceptionFile],
    smtp_ports: &BTreeSet<u16>,
) -> Result<Vec<crate::policy::Exception>, ConfigError> {
    let mut out = Vec::with_capacity(list.len());
    for (index, e) in list.iter().enumerate() {
        let err = |reason: String| ConfigError::Exception { index, reason };
        if e.destinations.is_empty() {
            return Err(err("destinations is empty: an exception for nothing".into()));
        }
        let mut destinations = Vec::with_capacity(e.destinations.len());
        for d in &e.destinations {
            destinations.push(
                d.parse::<Prefix>()
                    .map_err(|source| err(format!("{d:?}: {source}")))?,
            );
        }
        let mut ports = BTreeSet::new();
        for &p in &e.ports {
            if !smtp_ports.contains(&p) {
                return Err(err(format!(
                    "port {p} is not one of the SMTP ports ({smtp_ports:?}): nothing stops it, so there is nothing to except"
                )));
            }
            if !ports.insert(p) {
                return Err(err(format!("port {p} is listed twice")));
            }
        }
        out.push(crate::policy::Exception {
            destinations,
            ports,
            comment: e.comment.clone(),
        });
    }
    crate::policy::Exceptions::compile(&out)?;
    Ok(out)
}

/// The action for SMTP ports other than 25 (see `smtpgate_common::verdict`).
fn other_action(
    action: Action,
    fallback: Option<Fallback>,
    ports: &BTreeSet<u16>,
) -> Result<Action, ConfigError> {
    match (action, fallback) {
        (Action::Redirect, fallback) => {
            if !ports.contains(&smtpgate_common::verdict::REDIRECT_PORT) {
                return Err(ConfigError::RedirectWithoutPort25 {
                    ports: ports.iter().copied().collect(),
                });
            }
            Ok(fallback.map_or(Action::Reject, Action::from))
        }
        (action, None) => Ok(action),
        (_, Some(f)) => Err(ConfigError::FallbackWithoutRedirect {
            fallback: format!("{f:?}").to_lowercase(),
        }),
    }
}

fn validate_ports(ports: &[u16]) -> Result<BTreeSet<u16>, ConfigError> {
    if ports.is_empty() {
        return Err(ConfigError::Ports {
            reason: "empty: list at least one port (usually 25)".into(),
        });
    }
    let mut set = BTreeSet::new();
    for &p in ports {
        if p == 0 {
            return Err(ConfigError::Ports {
                reason: "0 is not a TCP port".into(),
            });
        }
        if !set.insert(p) {
            return Err(ConfigError::Ports {
                reason: format!("{p} is listed twice"),
            });
        }
    }
    Ok(set)
}

fn validate_attach(point: &AttachPoint) -> Result<(), String> {
    match point {
        AttachPoint::TcIngress { interface } | AttachPoint::TcEgress { interface } => {
            // IFNAMSIZ is 16 with the terminating NUL.
            if interface.is_empty() || interface.len() > 15 {
                return Err(format!(
                    "interface name {interface:?} must be 1 to 15 bytes"
                ));
            }
            if interface.contains(['/', ' ', '\0']) || interface == "." || interface == ".." {
                return Err(format!("{interface:?} is not a valid interface name"));
            }
            Ok(())
        }
        AttachPoint::Cgroup { path: None } => Ok(()),
        AttachPoint::Cgroup { path: Some(path) } => {
            if !path.is_absolute() {
                return Err(format!("cgroup path {} must be absolute", path.display()));
            }
            Ok(())
        }
    }
}

/// Where the cgroup v2 hierarchy is mounted on this host, for the default
/// config: `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on
/// hybrid ones.
pub fn cgroup2_root() -> PathBuf {
    paths::cgroup2_mount().unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses with an empty environment: the tests must not depend on
    /// the caller's $SMTPGATE_TC_MODE.
    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse_with_env(text, "test", |_| None)
    }

    #[test]
    fn tc_mode_defaults_to_auto_and_the_environment_overrides_the_file() {
        assert_eq!(parse(ATTACH).unwrap().tc_mode, TcMode::Auto);
        let file = format!("{ATTACH}[datapath]\ntc_mode = \"classic\"\n");
        assert_eq!(parse(&file).unwrap().tc_mode, TcMode::Classic);
        let env = |v: &'static str| move |k: &str| (k == TC_MODE_ENV).then(|| v.to_owned());
        let c = Config::parse_with_env(&file, "test", env("tcx")).unwrap();
        assert_eq!(c.tc_mode, TcMode::Tcx);
        let c = Config::parse_with_env(ATTACH, "test", env("classic")).unwrap();
        assert_eq!(c.tc_mode, TcMode::Classic);
        let e = Config::parse_with_env(ATTACH, "test", env("netlink"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("SMTPGATE_TC_MODE") && e.contains("netlink"),
            "{e}"
        );
    }

    const ATTACH: &str = "[[attach]]\nhook = \"tc-ingress\"\ninterface = \"lan0\"\n";

    #[test]
    fn default_config_is_valid() {
        let c = Config::default_config().unwrap();
        assert_eq!(c.ports, BTreeSet::from([25]));
        assert_eq!(c.action, Action::Reject);
        assert!(matches!(c.attach[0], AttachPoint::Cgroup { .. }));
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(&format!("allowlist = [\"192.0.2.10\"]\n{ATTACH}")).unwrap();
        assert_eq!(c.mode, Mode::Enforce);
        assert_eq!(c.action, Action::Reject);
        assert_eq!(c.ports, BTreeSet::from([25]));
        assert_eq!(c.allowlist[0].to_string(), "192.0.2.10/32");
    }

    #[test]
    fn names_files_and_the_resolver() {
        let c = parse(&format!(
            "allowlist = [\"192.0.2.10\", \"Mail.Example.com\", \"mx:example.org\"]\nallowlist_files = [\"/etc/smtpgate/allow.d/*.txt\"]\n{ATTACH}[resolver]\nnameservers = [\"192.0.2.53\", \"[2001:db8::53]:5353\"]\nmin_ttl_secs = 5\n"
        ))
        .unwrap();
        assert_eq!(c.allowlist.len(), 1);
        let names: Vec<String> = c.allowlist_names.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["mail.example.com", "mx:example.org"]);
        assert_eq!(
            c.allowlist_files[0].to_string(),
            "/etc/smtpgate/allow.d/*.txt"
        );
        assert_eq!(
            c.resolver.nameservers,
            Some(vec![
                "192.0.2.53:53".parse().unwrap(),
                "[2001:db8::53]:5353".parse().unwrap()
            ])
        );
        assert_eq!(c.resolver.min_ttl.as_secs(), 5);
        assert_eq!(c.resolver.max_ttl.as_secs(), 3600);
        let d = parse(ATTACH).unwrap();
        assert_eq!(d.resolver, ResolverConfig::default());
        assert_eq!(d.resolver.nameservers, None);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = parse(&format!("alowlist = []\n{ATTACH}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `alowlist`"), "{e}");
        let e = parse("[[attach]]\nhook = \"tc-ingress\"\ninterface = \"x\"\nprio = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("prio"), "{e}");
    }

    #[test]
    fn redirect_takes_port_25_and_the_other_ports_fall_back() {
        let c = parse(&format!("ports = [25, 587]\n{ATTACH}")).unwrap();
        assert_eq!((c.action, c.other_action), (Action::Reject, Action::Reject));
        let c = parse(&format!("action = \"drop\"\nports = [25, 587]\n{ATTACH}")).unwrap();
        assert_eq!((c.action, c.other_action), (Action::Drop, Action::Drop));
        let ports = BTreeSet::from([25, 465, 587]);
        assert_eq!(
            other_action(Action::Redirect, None, &ports).unwrap(),
            Action::Reject
        );
        assert_eq!(
            other_action(Action::Redirect, Some(Fallback::Drop), &ports).unwrap(),
            Action::Drop
        );
        assert!(matches!(
            other_action(Action::Redirect, None, &BTreeSet::from([587])),
            Err(ConfigError::RedirectWithoutPort25 { .. })
        ));
        assert!(matches!(
            other_action(Action::Drop, Some(Fallback::Reject), &ports),
            Err(ConfigError::FallbackWithoutRedirect { .. })
        ));
    }

    #[test]
    fn bad_values_are_errors() {
        let cases = [
            (format!("mode = \"permissive\"\n{ATTACH}"), "permissive"),
            (format!("action = \"bounce\"\n{ATTACH}"), "bounce"),
            (format!("ports = []\n{ATTACH}"), "empty"),
            (format!("ports = [0]\n{ATTACH}"), "0 is not a TCP port"),
            (format!("ports = [25, 25]\n{ATTACH}"), "listed twice"),
            (format!("ports = [70000]\n{ATTACH}"), "70000"),
            (
                format!("allowlist = [\"192.0.2.1/24\"]\n{ATTACH}"),
                "host bits",
            ),
            (
                format!("allowlist = [\"192.0.2.300\"]\n{ATTACH}"),
                "192.0.2.300",
            ),
            (
                format!("allowlist = [\"::ffff:192.0.2.1\"]\n{ATTACH}"),
                "IPv4-mapped",
            ),
            (
                format!("allowlist = [\"10.0.0.0/8\", \"10.0.0.0/8\"]\n{ATTACH}"),
                "twice",
            ),
            (String::new(), "no [[attach]]"),
            (
                "[[attach]]\nhook = \"xdp\"\ninterface = \"x\"\n".to_owned(),
                "xdp",
            ),
            (
                "[[attach]]\nhook = \"tc-ingress\"\ninterface = \"a/b\"\n".to_owned(),
                "not a valid",
            ),
            (
                "[[attach]]\nhook = \"tc-ingress\"\ninterface = \"abcdefghijklmnopq\"\n".to_owned(),
                "1 to 15",
            ),
            (
                "[[attach]]\nhook = \"cgroup\"\npath = \"relative\"\n".to_owned(),
                "absolute",
            ),
            (format!("{ATTACH}{ATTACH}"), "listed twice"),
            (
                format!("action = \"redirect\"\n{ATTACH}"),
                "[relay] enabled = true",
            ),
            (
                format!("action = \"redirect\"\nports = [587]\n{ATTACH}[relay]\nenabled = true\n"),
                "steers port 25 only",
            ),
            (
                format!("redirect_fallback = \"drop\"\n{ATTACH}"),
                "applies only with action = \"redirect\"",
            ),
            (
                format!("{ATTACH}[relay]\nintercept_listen = \"0.0.0.0:10025\"\n"),
                "loopback only",
            ),
            (
                format!("{ATTACH}[[exception]]\ndestinations = []\n"),
                "an exception for nothing",
            ),
            (
                format!("{ATTACH}[[exception]]\ndestinations = [\"198.51.100.0/33\"]\n"),
                "198.51.100.0/33",
            ),
            (
                format!(
                    "{ATTACH}[[exception]]\ndestinations = [\"198.51.100.25\"]\nports = [587]\n"
                ),
                "not one of the SMTP ports",
            ),
            (
                format!("{ATTACH}[[exception]]\ndestinations = [\"198.51.100.25\"]\nport = 25\n"),
                "unknown field",
            ),
            (
                format!("[datapath]\ntable_nodes = 5\n{ATTACH}"),
                "table_nodes",
            ),
            (
                format!("allowlist = [\"mail_host.example.com\"]\n{ATTACH}"),
                "only letters, digits and hyphens",
            ),
            (
                format!("allowlist = [\"mailhost\"]\n{ATTACH}"),
                "single label",
            ),
            (
                format!("allowlist = [\"mx:example.org\", \"MX:Example.org.\"]\n{ATTACH}"),
                "twice",
            ),
            (
                format!("allowlist_files = [\"allow.d/*.txt\"]\n{ATTACH}"),
                "absolute",
            ),
            (
                format!("allowlist_files = [\"/etc/*/allow.txt\"]\n{ATTACH}"),
                "file name only",
            ),
            (
                format!("allowlist_files = [\"/etc/smtpgate/allow.d/[.txt\"]\n{ATTACH}"),
                "pattern",
            ),
            (
                format!("{ATTACH}[resolver]\nnameservers = [\"dns.example\"]\n"),
                "not an address",
            ),
            (
                format!("{ATTACH}[resolver]\nmin_ttl_secs = 0\n"),
                "min_ttl_secs = 0",
            ),
            (
                format!("{ATTACH}[resolver]\nmin_ttl_secs = 60\nmax_ttl_secs = 30\n"),
                "max_ttl_secs = 30",
            ),
            (
                format!("{ATTACH}[resolver]\nnameserver = [\"192.0.2.53\"]\n"),
                "nameserver",
            ),
            (
                format!("{ATTACH}[datapath]\ntc_mode = \"netlink\"\n"),
                "netlink",
            ),
        ];
        for (text, needle) in cases {
            let e = parse(&text).map(|_| ()).unwrap_err();
            let msg = format!(
                "{e}: {}",
                std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            );
            assert!(
                msg.contains(needle),
                "{text:?} gave {msg:?}, want {needle:?}"
            );
        }
    }
}
