//! Allowlist files (`allowlist_files`): reading them, and watching them with
//! inotify so that an edit applies within moments.
//!
//! The directories are watched, not the files: an editor that saves by
//! writing a new file and renaming it over the old one, and a Kubernetes
//! ConfigMap volume, which swaps a `..data` symlink to a new directory and
//! leaves the files themselves (`allow.txt -> ..data/allow.txt`) untouched,
//! both change a directory entry, never the watched file. A file that is a
//! symlink also gets its target's directory watched, so an edit made there
//! is seen too.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use glob::{MatchOptions, Pattern};
use tokio::sync::watch;
use tracing::{debug, error, warn};

use crate::{
    owner::AgentHandle,
    policy::{Item, parse_list},
};

/// One `allowlist_files` entry: a directory, and a shell pattern for the
/// names of the files in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilePattern {
    text: String,
    dir: PathBuf,
    name: Pattern,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatternError {
    #[error("must be an absolute path")]
    NotAbsolute,
    #[error("names no file")]
    NoFileName,
    #[error(
        "wildcards are allowed in the file name only (the directory is what is watched): {dir:?}"
    )]
    WildcardInDirectory { dir: String },
    #[error("bad pattern: {reason}")]
    Pattern { reason: String },
}

/// Characters that make a path component a pattern.
const WILDCARDS: [char; 3] = ['*', '?', '['];

/// `*` must not match the dot files a ConfigMap volume keeps next to the
/// real ones (`..data`, `..2026_01_01_00_00_00.123`), nor an editor's
/// swap files.
const OPTIONS: MatchOptions = MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: true,
};

impl FromStr for FilePattern {
    type Err = PatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let path = Path::new(s);
        if !path.is_absolute() {
            return Err(PatternError::NotAbsolute);
        }
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(PatternError::NoFileName);
        };
        if s.ends_with('/') {
            return Err(PatternError::NoFileName);
        }
        let dir_text = dir.to_string_lossy();
        if dir_text.contains(WILDCARDS) {
            return Err(PatternError::WildcardInDirectory {
                dir: dir_text.into_owned(),
            });
        }
        let name = name.to_str().ok_or(PatternError::Pattern {
            reason: "not UTF-8".into(),
        })?;
        let name = Pattern::new(name).map_err(|e| PatternError::Pattern {
            reason: e.to_string(),
        })?;
        Ok(Self {
            text: s.to_owned(),
            dir: dir.to_owned(),
            name,
        })
    }
}

impl fmt::Display for FilePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl serde::Serialize for FilePattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What one pass over every pattern found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// Every file the patterns match: its entries, or why they cannot be
    /// used.
    pub files: BTreeMap<PathBuf, Result<Vec<(usize, Item)>, String>>,
    /// Directories that could not be listed. The files known under them
    /// keep their last good entries: a directory that is briefly gone or
    /// unreadable says nothing about what it should hold.
    pub dir_errors: BTreeMap<PathBuf, String>,
    /// Directories to watch for the next change.
    pub watch: BTreeSet<PathBuf>,
}

/// Reads every file the patterns match, now.
#[must_use]
pub fn scan(patterns: &[FilePattern]) -> Scan {
    let mut out = Scan::default();
    for p in patterns {
        let entries = match std::fs::read_dir(&p.dir) {
            Ok(rd) => rd,
            Err(e) => {
                out.dir_errors.insert(
                    p.dir.clone(),
                    format!("cannot list {}: {e}", p.dir.display()),
                );
                // Watch the closest ancestor that is there, so that the
                // directory's creation is seen.
                if let Some(a) = p.dir.ancestors().skip(1).find(|a| a.is_dir()) {
                    out.watch.insert(a.to_owned());
                }
                continue;
            }
        };
        out.watch.insert(p.dir.clone());
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                continue;
            };
            if !p.name.matches_with(name, OPTIONS) {
                continue;
            }
            let path = entry.path();
            if out.files.contains_key(&path) {
                continue;
            }
            // Through symlinks: a ConfigMap's files are links into its
            // current data directory.
            match std::fs::metadata(&path) {
                Ok(m) if m.is_dir() => continue,
                Ok(_) => {}
                Err(e) => {
                    out.files.insert(path, Err(format!("cannot read it: {e}")));
                    continue;
                }
            }
            if let Some(dir) = std::fs::canonicalize(&path)
                .ok()
                .and_then(|c| c.parent().map(Path::to_owned))
            {
                out.watch.insert(dir);
            }
            out.files.insert(path.clone(), read(&path));
        }
    }
    out
}

fn read(path: &Path) -> Result<Vec<(usize, Item)>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        format!(
            "not UTF-8 text (first bad byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })?;
    parse_list(&text).map_err(|e| e.to_string())
}

/// How long events must stop before the files are read: a tool that
/// writes several files (or a ConfigMap swap: a directory, a symlink, a
/// rename) is read once, when it is done...
const QUIET: Duration = Duration::from_millis(100);
/// ...but a directory that never stops changing is still read this often.
const QUIET_MAX: Duration = Duration::from_secs(1);
/// A full read this often even without events: a safety net for what
/// inotify cannot see (a network filesystem changed by another host, an
/// overflowed event queue), not the way changes normally arrive.
const RESCAN_EVERY: Duration = Duration::from_secs(60);
/// Without inotify at all (its limits reached), the files are polled.
const POLL_EVERY: Duration = Duration::from_secs(2);

use inotify::{Inotify, WatchDescriptor, WatchMask};

/// Watches the files of `patterns` (the latest value: a reload changes
/// them) and sends every scan that differs from the last to the agent.
/// Runs until the agent stops.
pub async fn run(mut patterns: watch::Receiver<Vec<FilePattern>>, agent: AgentHandle) {
    let mut stream: Option<Events> = None;
    // Set once inotify failed: the files are polled from then on.
    let mut polling = false;
    let mut watched: HashMap<PathBuf, WatchDescriptor> = HashMap::new();
    let mut last: Option<Scan> = None;
    loop {
        let list = patterns.borrow_and_update().clone();
        // Only once there are files to watch: an agent without any needs
        // no inotify instance (and must not complain that it has none).
        if stream.is_none() && !polling && !list.is_empty() {
            match Inotify::init().and_then(|i| i.into_event_stream(vec![0u8; 8192])) {
                Ok(s) => stream = Some(s),
                Err(e) => {
                    error!(error = %e, every_secs = POLL_EVERY.as_secs(), "cannot use inotify for the allowlist files; polling them instead");
                    polling = true;
                }
            }
        }
        let empty = list.is_empty();
        let scan = match tokio::task::spawn_blocking(move || scan(&list)).await {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "reading the allowlist files");
                Scan::default()
            }
        };
        let mut added = false;
        if let Some(s) = &stream {
            added = update_watches(&s.watches(), &mut watched, &scan.watch);
        }
        if last.as_ref() != Some(&scan) {
            agent.files_scanned(scan.clone()).await;
            last = Some(scan);
        }
        // A directory watched only from now on may have changed between
        // the scan and the watch: read once more.
        if added {
            continue;
        }
        let timeout = if empty {
            // Nothing to read until a reload brings patterns.
            Duration::MAX
        } else if stream.is_some() {
            RESCAN_EVERY
        } else {
            POLL_EVERY
        };
        tokio::select! {
            event = next(&mut stream) => {
                match event {
                    Some(Ok(e)) => debug!(name = ?e.name, mask = ?e.mask, "allowlist directory changed"),
                    Some(Err(e)) => warn!(error = %e, "reading inotify events"),
                    None => {
                        error!("the inotify stream ended; polling the allowlist files instead");
                        stream = None;
                        polling = true;
                        watched.clear();
                    }
                }
                let deadline = tokio::time::Instant::now() + QUIET_MAX;
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(QUIET) => break,
                        () = tokio::time::sleep_until(deadline) => break,
                        e = next(&mut stream) => if e.is_none() { break },
                    }
                }
            }
            r = patterns.changed() => if r.is_err() { return },
            () = sleep(timeout) => {}
        }
    }
}

type Events = inotify::EventStream<Vec<u8>>;

/// `tokio::time::sleep`, where `Duration::MAX` is forever (tokio's would
/// overflow the deadline).
async fn sleep(d: Duration) {
    if d == Duration::MAX {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(d).await;
}

async fn next(stream: &mut Option<Events>) -> Option<std::io::Result<inotify::EventOwned>> {
    use futures_util::StreamExt as _;
    match stream {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// Watches exactly `want`; returns whether a directory was added.
fn update_watches(
    watches: &inotify::Watches,
    watched: &mut HashMap<PathBuf, WatchDescriptor>,
    want: &BTreeSet<PathBuf>,
) -> bool {
    let mut watches = watches.clone();
    let mask = WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::ATTRIB
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::ONLYDIR;
    let mut added = false;
    let mut now: HashMap<PathBuf, WatchDescriptor> = HashMap::new();
    for dir in want {
        // Added again every time: a directory deleted and made again is a
        // new inode, and the kernel dropped the old watch with the old one.
        match watches.add(dir, mask) {
            Ok(wd) => {
                if watched.get(dir) != Some(&wd) {
                    added = true;
                }
                now.insert(dir.clone(), wd);
            }
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "cannot watch an allowlist directory; its changes are seen at the next full read")
            }
        }
    }
    for (dir, wd) in watched.drain() {
        // Two paths for one directory share a descriptor: keep it while
        // either is wanted.
        if !now.contains_key(&dir) && !now.values().any(|w| *w == wd) {
            let _ = watches.remove(wd);
        }
    }
    *watched = now;
    added
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("smtpgate-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn patterns_are_absolute_with_wildcards_in_the_name_only() {
        let p: FilePattern = "/etc/smtpgate/allow.d/*.txt".parse().unwrap();
        assert_eq!(p.dir, Path::new("/etc/smtpgate/allow.d"));
        assert_eq!(p.to_string(), "/etc/smtpgate/allow.d/*.txt");
        assert!("/etc/smtpgate/allow.txt".parse::<FilePattern>().is_ok());
        assert_eq!(
            "allow.d/*.txt".parse::<FilePattern>(),
            Err(PatternError::NotAbsolute)
        );
        assert!(matches!(
            "/etc/*/allow.txt".parse::<FilePattern>(),
            Err(PatternError::WildcardInDirectory { .. })
        ));
        assert!(matches!(
            "/etc/smtpgate/[.txt".parse::<FilePattern>(),
            Err(PatternError::Pattern { .. })
        ));
        assert_eq!("/".parse::<FilePattern>(), Err(PatternError::NoFileName));
        assert_eq!(
            "/etc/smtpgate/".parse::<FilePattern>(),
            Err(PatternError::NoFileName)
        );
    }

    #[test]
    fn scan_reads_matching_files_and_says_what_is_wrong() {
        let d = dir("scan");
        std::fs::write(d.join("a.txt"), "192.0.2.7\nmail.example.com # mx\n").unwrap();
        std::fs::write(d.join("b.txt"), "192.0.2.300\n").unwrap();
        std::fs::write(d.join("c.conf"), "not matched\n").unwrap();
        std::fs::write(d.join(".hidden.txt"), "not matched either\n").unwrap();
        std::fs::create_dir(d.join("sub.txt")).unwrap();
        std::fs::write(d.join("latin1.txt"), b"192.0.2.8 # caf\xe9\n").unwrap();
        std::os::unix::fs::symlink(d.join("nowhere"), d.join("dangling.txt")).unwrap();
        let pattern: FilePattern = format!("{}/*.txt", d.display()).parse().unwrap();
        let missing: FilePattern = format!("{}/missing/*.txt", d.display()).parse().unwrap();
        let s = scan(&[pattern, missing]);
        let names: Vec<String> = s
            .files
            .keys()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a.txt", "b.txt", "dangling.txt", "latin1.txt"]);
        let a = s.files[&d.join("a.txt")].as_ref().unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!((a[1].0, a[1].1.to_string()), (2, "mail.example.com".into()));
        let b = s.files[&d.join("b.txt")].as_ref().unwrap_err();
        assert!(b.starts_with("line 1: \"192.0.2.300\""), "{b}");
        let l = s.files[&d.join("latin1.txt")].as_ref().unwrap_err();
        assert!(l.contains("not UTF-8"), "{l}");
        let g = s.files[&d.join("dangling.txt")].as_ref().unwrap_err();
        assert!(g.contains("cannot read"), "{g}");
        assert!(s.dir_errors[&d.join("missing")].contains("cannot list"));
        // The missing directory's parent is watched, for its creation.
        assert!(s.watch.contains(&d), "{:?}", s.watch);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_configmap_volume_is_read_through_its_symlinks() {
        // What the kubelet makes: ..<timestamp>/allow.txt, ..data -> it,
        // allow.txt -> ..data/allow.txt.
        let d = dir("configmap");
        std::fs::create_dir(d.join("..2026_01_01")).unwrap();
        std::fs::write(d.join("..2026_01_01/allow.txt"), "192.0.2.7\n").unwrap();
        std::os::unix::fs::symlink("..2026_01_01", d.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/allow.txt", d.join("allow.txt")).unwrap();
        let pattern: FilePattern = format!("{}/*", d.display()).parse().unwrap();
        let s = scan(std::slice::from_ref(&pattern));
        assert_eq!(s.files.len(), 1, "{:?}", s.files);
        let items = s.files[&d.join("allow.txt")].as_ref().unwrap();
        assert_eq!(items[0].1.to_string(), "192.0.2.7/32");
        // The data directory is watched as well as the volume.
        assert!(s.watch.contains(&d.join("..2026_01_01")), "{:?}", s.watch);
        // The swap: a new data directory, a new ..data, the old one gone.
        std::fs::create_dir(d.join("..2026_01_02")).unwrap();
        std::fs::write(d.join("..2026_01_02/allow.txt"), "192.0.2.8\n").unwrap();
        std::os::unix::fs::symlink("..2026_01_02", d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        std::fs::remove_dir_all(d.join("..2026_01_01")).unwrap();
        let s = scan(&[pattern]);
        let items = s.files[&d.join("allow.txt")].as_ref().unwrap();
        assert_eq!(items[0].1.to_string(), "192.0.2.8/32");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
