//! Policy sources that change by themselves: names in the allowlist, whose
//! addresses follow DNS, and allowlist files, which follow their edits.
//!
//! The work that waits (DNS queries, inotify) runs in tokio tasks
//! ([`dns::run`], [`files::run`]) that send what they found to the agent's
//! owner thread as messages. The owner keeps the state here, the last good
//! of everything, and builds the allowlist from it exactly as a reload
//! does: a new table, swapped in whole.
//!
//! Failure rules, the same for both: what cannot be read now (a lookup
//! that times out, a file with a bad line, a directory that is gone) keeps
//! what was last read good, and says so in `status`, the metrics and the
//! log. What was never read good allows nothing. The last good state is
//! kept in the state directory ([`store`]), so a restart without DNS, or
//! with a file broken since, enforces what the last agent did.

pub mod dns;
pub mod files;
mod store;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{error, info, warn};

pub use files::{FilePattern, PatternError, Scan};
pub use store::{Store, Stored};

use crate::{
    config::{Config, ResolverConfig},
    policy::{Builder, DnsName, Item, Named, Origin, Prefix},
};
use store::{StoredFile, StoredName};

/// What the DNS task resolves, and with which settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsWanted {
    pub resolver: ResolverConfig,
    pub names: BTreeSet<Named>,
}

/// The DNS task's answer for one name.
#[derive(Clone, Debug)]
pub struct DnsAnswer {
    pub name: Named,
    pub result: Result<Resolved, String>,
    /// When the task asks again (Unix time).
    pub next_unix: f64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// Each address, with the MX host it came from (`mx:` names).
    pub addresses: BTreeMap<IpAddr, Option<DnsName>>,
    /// The shortest TTL among the records (or the negative-caching TTL of
    /// an empty answer).
    pub ttl_secs: u32,
}

/// One name, as `status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NameStatus {
    pub name: Named,
    /// Where the name is written: `config`, or `file:PATH:LINE`.
    pub listed_in: Vec<Origin>,
    /// What it allows now: the last good answer.
    pub addresses: Vec<IpAddr>,
    /// When that answer came (None: never, so it allows nothing).
    pub last_success_unix: Option<f64>,
    /// The addresses came from the state file: not resolved since start.
    pub restored: bool,
    pub ttl_secs: Option<u32>,
    pub next_unix: Option<f64>,
    /// Failed lookups since start.
    pub failures: u64,
    /// Why the last lookup failed, while it does.
    pub error: Option<String>,
    pub failing_since_unix: Option<f64>,
}

/// One allowlist file, as `status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileStatus {
    pub path: PathBuf,
    /// Entries in force from it: the file's, or its last good ones.
    pub entries: usize,
    pub loaded_unix: Option<f64>,
    /// Why the file as it is now is not what is in force.
    pub error: Option<String>,
    pub error_since_unix: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SourcesStatus {
    pub names: Vec<NameStatus>,
    pub files: Vec<FileStatus>,
    /// The `allowlist_files` patterns.
    pub patterns: Vec<String>,
    /// Their directories that cannot be listed, and why.
    #[serde(default)]
    pub dir_errors: Vec<String>,
    /// Why the sources' last change could not be installed (the table was
    /// full, say): the running policy is the one before it.
    pub install_error: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
struct FileState {
    /// In force: the file's entries, or while it is broken its last good.
    good: Vec<(usize, Item)>,
    loaded_unix: Option<f64>,
    error: Option<(String, f64)>,
}

#[derive(Clone, Debug, PartialEq)]
struct NameState {
    addresses: BTreeMap<IpAddr, Option<DnsName>>,
    last_success_unix: Option<f64>,
    restored: bool,
    ttl_secs: Option<u32>,
    next_unix: Option<f64>,
    failures: u64,
    error: Option<(String, f64)>,
    listed_in: Vec<Origin>,
}

impl NameState {
    fn empty() -> Self {
        Self {
            addresses: BTreeMap::new(),
            last_success_unix: None,
            restored: false,
            ttl_secs: None,
            next_unix: None,
            failures: 0,
            error: None,
            listed_in: Vec::new(),
        }
    }
}

/// Everything the sources contribute, owned by the agent. Cloned to try a
/// change out (a reload) before it is committed.
#[derive(Clone, Debug)]
pub struct Sources {
    files: BTreeMap<PathBuf, FileState>,
    dir_errors: BTreeMap<PathBuf, String>,
    names: BTreeMap<Named, NameState>,
    /// The config's names, and its patterns and resolver settings.
    config_names: Vec<Named>,
    patterns: Vec<FilePattern>,
    resolver: ResolverConfig,
    /// Restored from the state file, for names not yet seen this run.
    restored: BTreeMap<Named, StoredName>,
    pub install_error: Option<String>,
}

/// The receiving ends the tasks watch; see [`spawn`].
pub struct Watches {
    pub dns: watch::Receiver<DnsWanted>,
    pub files: watch::Receiver<Vec<FilePattern>>,
}

/// The sending ends, kept by the agent.
pub struct Senders {
    dns: watch::Sender<DnsWanted>,
    files: watch::Sender<Vec<FilePattern>>,
}

impl Senders {
    /// Tells the tasks what `sources` needs now; a no-op when that is
    /// what they have.
    pub fn update(&self, sources: &Sources) {
        let wanted = sources.dns_wanted();
        self.dns.send_if_modified(|w| {
            let changed = *w != wanted;
            *w = wanted.clone();
            changed
        });
        let patterns = sources.patterns.clone();
        self.files.send_if_modified(|p| {
            let changed = *p != patterns;
            *p = patterns.clone();
            changed
        });
    }
}

impl Sources {
    /// The sources at start: `stored` is what the last agent left, `scan`
    /// the files as they are now.
    pub fn new(config: &Config, stored: Stored, scan: Scan, now: f64) -> Self {
        let files = stored
            .files
            .into_iter()
            .map(|(path, f)| {
                (
                    path,
                    FileState {
                        good: f.entries,
                        loaded_unix: Some(f.loaded_unix),
                        error: None,
                    },
                )
            })
            .collect();
        let mut s = Self {
            files,
            dir_errors: BTreeMap::new(),
            names: BTreeMap::new(),
            config_names: config.allowlist_names.clone(),
            patterns: config.allowlist_files.clone(),
            resolver: config.resolver.clone(),
            restored: stored.names,
            install_error: None,
        };
        s.apply_scan(scan, now);
        // Only what is listed at start is restored: a name added later
        // (a reload) is new, and allows nothing until it resolves.
        s.restored.clear();
        s
    }

    /// The channels for the tasks, primed with what is wanted now.
    #[must_use]
    pub fn channels(&self) -> (Senders, Watches) {
        let (dns, dns_rx) = watch::channel(self.dns_wanted());
        let (files, files_rx) = watch::channel(self.patterns.clone());
        (
            Senders { dns, files },
            Watches {
                dns: dns_rx,
                files: files_rx,
            },
        )
    }

    fn dns_wanted(&self) -> DnsWanted {
        DnsWanted {
            resolver: self.resolver.clone(),
            names: self.names.keys().cloned().collect(),
        }
    }

    /// A reload: the new config's names, patterns and resolver, and the
    /// files as the new patterns find them.
    pub fn set_config(&mut self, config: &Config, scan: Scan, now: f64) {
        self.config_names = config.allowlist_names.clone();
        self.patterns = config.allowlist_files.clone();
        self.resolver = config.resolver.clone();
        self.apply_scan(scan, now);
    }

    /// Merges a scan of the files; returns whether what is in force
    /// changed. Broken files keep their last good entries; files that are
    /// gone are gone, unless their directory could not be listed.
    pub fn apply_scan(&mut self, scan: Scan, now: f64) -> bool {
        let before = self.effective();
        let mut files = BTreeMap::new();
        for (path, result) in scan.files {
            let prev = self.files.remove(&path);
            let state = match (result, prev) {
                (Ok(good), prev) => {
                    let same = prev.as_ref().is_some_and(|p| p.good == good);
                    if let Some(p) = prev.as_ref().filter(|p| p.error.is_some()) {
                        info!(path = %path.display(), entries = good.len(), was = %p.error.as_ref().map_or("", |e| e.0.as_str()), "allowlist file is good again");
                    } else if !same {
                        info!(path = %path.display(), entries = good.len(), "allowlist file applied");
                    }
                    FileState {
                        loaded_unix: match prev {
                            Some(p) if same => p.loaded_unix,
                            _ => Some(now),
                        },
                        good,
                        error: None,
                    }
                }
                (Err(e), Some(p)) => {
                    if p.error.as_ref().is_none_or(|(was, _)| *was != e) {
                        error!(path = %path.display(), error = %e, kept = p.good.len(), "allowlist file refused; its last good entries stay in force");
                    }
                    let since = p.error.as_ref().map_or(now, |(_, t)| *t);
                    FileState {
                        error: Some((e, since)),
                        ..p
                    }
                }
                (Err(e), None) => {
                    error!(path = %path.display(), error = %e, "allowlist file refused; it has never been read good, so it allows nothing");
                    FileState {
                        good: Vec::new(),
                        loaded_unix: None,
                        error: Some((e, now)),
                    }
                }
            };
            files.insert(path, state);
        }
        for (path, p) in std::mem::take(&mut self.files) {
            let dir_error = path.parent().and_then(|d| scan.dir_errors.get(d)).cloned();
            match dir_error {
                Some(e) => {
                    if p.error.as_ref().is_none_or(|(was, _)| *was != e) {
                        error!(path = %path.display(), error = %e, "allowlist directory unreadable; the file's last good entries stay in force");
                    }
                    let since = p.error.as_ref().map_or(now, |(_, t)| *t);
                    files.insert(
                        path,
                        FileState {
                            error: Some((e, since)),
                            ..p
                        },
                    );
                }
                None => info!(path = %path.display(), "allowlist file gone; its entries leave"),
            }
        }
        for (dir, e) in &scan.dir_errors {
            if !self.dir_errors.contains_key(dir) {
                warn!(dir = %dir.display(), error = %e, "allowlist directory unreadable");
            }
        }
        self.files = files;
        self.dir_errors = scan.dir_errors;
        self.reconcile_names();
        self.effective() != before
    }

    /// Names are wanted while the config or a file in force lists them.
    fn reconcile_names(&mut self) {
        let mut listed: BTreeMap<Named, Vec<Origin>> = BTreeMap::new();
        for n in &self.config_names {
            listed.entry(n.clone()).or_default().push(Origin::Config);
        }
        for (path, f) in &self.files {
            for (line, item) in &f.good {
                if let Item::Named(n) = item {
                    listed.entry(n.clone()).or_default().push(Origin::File {
                        path: path.clone(),
                        line: *line,
                    });
                }
            }
        }
        let mut names = BTreeMap::new();
        for (name, listed_in) in listed {
            let mut state = self.names.remove(&name).unwrap_or_else(|| {
                // A name seen for the first time this run starts with what
                // the last agent knew of it, or with nothing.
                match self.restored.remove(&name) {
                    Some(s) => NameState {
                        addresses: s.addresses,
                        last_success_unix: Some(s.resolved_unix),
                        restored: true,
                        ..NameState::empty()
                    },
                    None => NameState::empty(),
                }
            });
            state.listed_in = listed_in;
            names.insert(name, state);
        }
        self.names = names;
    }

    /// Takes a DNS answer in; returns whether the addresses in force
    /// changed. A failure keeps the last good addresses.
    pub fn apply_dns(&mut self, answer: DnsAnswer, now: f64) -> bool {
        let Some(state) = self.names.get_mut(&answer.name) else {
            // An answer for a name no longer wanted (a reload raced it).
            return false;
        };
        let name = &answer.name;
        state.next_unix = Some(answer.next_unix);
        match answer.result {
            Ok(r) => {
                let changed = state.addresses != r.addresses;
                if let Some((e, since)) = state.error.take() {
                    info!(%name, failed_for_secs = format!("{:.0}", now - since), was = %e, "DNS lookup works again");
                }
                if changed {
                    let added: Vec<&IpAddr> = r
                        .addresses
                        .keys()
                        .filter(|a| !state.addresses.contains_key(a))
                        .collect();
                    let removed: Vec<&IpAddr> = state
                        .addresses
                        .keys()
                        .filter(|a| !r.addresses.contains_key(a))
                        .collect();
                    info!(%name, ?added, ?removed, ttl_secs = r.ttl_secs, "name's addresses changed");
                }
                if r.addresses.is_empty() && (changed || state.last_success_unix.is_none()) {
                    warn!(%name, "the name has no addresses in DNS: it allows nothing");
                }
                state.addresses = r.addresses;
                state.ttl_secs = Some(r.ttl_secs);
                state.last_success_unix = Some(now);
                state.restored = false;
                changed
            }
            Err(e) => {
                state.failures += 1;
                if state.error.as_ref().is_none_or(|(was, _)| *was != e) {
                    let retry_in_secs = format!("{:.0}", (answer.next_unix - now).max(0.0));
                    warn!(%name, error = %e, kept = state.addresses.len(), retry_in_secs, "DNS lookup failed; the last good addresses stay in force");
                }
                let since = state.error.as_ref().map_or(now, |(_, t)| *t);
                state.error = Some((e, since));
                false
            }
        }
    }

    /// Adds what the sources allow to an allowlist being built.
    pub fn contribute(&self, b: &mut Builder) {
        for (path, f) in &self.files {
            for (line, item) in &f.good {
                if let Item::Prefix(p) = item {
                    b.add(
                        *p,
                        Origin::File {
                            path: path.clone(),
                            line: *line,
                        },
                        None,
                        None,
                    );
                }
            }
        }
        for (name, state) in &self.names {
            for (ip, via) in &state.addresses {
                // The DNS task hands over host addresses only.
                if let Ok(p) = Prefix::host(*ip) {
                    b.add(
                        p,
                        Origin::Dns {
                            name: name.clone(),
                            via: via.clone(),
                        },
                        None,
                        None,
                    );
                }
            }
        }
    }

    /// What is in force, for change detection and the state file.
    fn effective(&self) -> Stored {
        Stored {
            version: 0,
            names: self
                .names
                .iter()
                .filter_map(|(n, s)| {
                    Some((
                        n.clone(),
                        StoredName {
                            addresses: s.addresses.clone(),
                            resolved_unix: s.last_success_unix?,
                        },
                    ))
                })
                .collect(),
            files: self
                .files
                .iter()
                .filter_map(|(p, f)| {
                    Some((
                        p.clone(),
                        StoredFile {
                            entries: f.good.clone(),
                            loaded_unix: f.loaded_unix?,
                        },
                    ))
                })
                .collect(),
        }
    }

    /// Saves the last good state (see [`store`]).
    pub fn save(&self, store: &Store) {
        if let Err(e) = store.save(&self.effective()) {
            // The policy in force is right; only a restart without DNS
            // would know less.
            error!(error = %format!("{:#}", anyhow::Error::new(e)), "saving the sources' last good state");
        }
    }

    #[must_use]
    pub fn status(&self) -> SourcesStatus {
        SourcesStatus {
            names: self
                .names
                .iter()
                .map(|(name, s)| NameStatus {
                    name: name.clone(),
                    listed_in: s.listed_in.clone(),
                    addresses: s.addresses.keys().copied().collect(),
                    last_success_unix: s.last_success_unix,
                    restored: s.restored,
                    ttl_secs: s.ttl_secs,
                    next_unix: s.next_unix,
                    failures: s.failures,
                    error: s.error.as_ref().map(|e| e.0.clone()),
                    failing_since_unix: s.error.as_ref().map(|e| e.1),
                })
                .collect(),
            files: self
                .files
                .iter()
                .map(|(path, f)| FileStatus {
                    path: path.clone(),
                    entries: f.good.len(),
                    loaded_unix: f.loaded_unix,
                    error: f.error.as_ref().map(|e| e.0.clone()),
                    error_since_unix: f.error.as_ref().map(|e| e.1),
                })
                .collect(),
            patterns: self.patterns.iter().map(ToString::to_string).collect(),
            dir_errors: self.dir_errors.values().cloned().collect(),
            install_error: self.install_error.clone(),
        }
    }

    /// Whether any source says something is wrong.
    #[must_use]
    pub fn degraded(&self) -> bool {
        self.install_error.is_some()
            || self.files.values().any(|f| f.error.is_some())
            || self.names.values().any(|n| n.error.is_some())
    }
}

/// Starts the DNS and file tasks on the current runtime.
pub fn spawn(watches: Watches, agent: crate::owner::AgentHandle) {
    tokio::spawn(dns::run(watches.dns, agent.clone()));
    tokio::spawn(files::run(watches.files, agent));
}

#[cfg(test)]
mod tests;
