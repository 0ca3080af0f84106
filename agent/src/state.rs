//! What the agent remembers across restarts: allowlist entries added from
//! the CLI. Written atomically (temp file, fsync, rename, fsync of the
//! directory), so a crash leaves the old file or the new one, never a torn
//! one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::policy::Prefix;

const FILE: &str = "allowlist.json";
const VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid state file (fix or remove it; the agent will not guess)")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} has version {found}; this agent reads version {VERSION}")]
    Version { path: PathBuf, found: u32 },
}

/// An allowlist entry added with `smtpgate allow add`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CliEntry {
    pub prefix: Prefix,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// Unix time it was added.
    pub added: u64,
    /// Unix time it leaves the allowlist (`allow add --expires/--until`).
    /// Kept in the file, so an entry expires on time across restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
}

impl CliEntry {
    #[must_use]
    pub fn expired(&self, now_unix: u64) -> bool {
        self.expires.is_some_and(|t| t <= now_unix)
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    entries: Vec<CliEntry>,
}

pub struct State {
    dir: PathBuf,
}

impl State {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// The saved entries; none if nothing was ever saved.
    pub fn load(&self) -> Result<Vec<CliEntry>, StateError> {
        let path = self.path();
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(StateError::Io {
                    op: "reading",
                    path,
                    source,
                });
            }
        };
        let file: File = serde_json::from_slice(&text).map_err(|source| StateError::Corrupt {
            path: path.clone(),
            source,
        })?;
        if file.version != VERSION {
            return Err(StateError::Version {
                path,
                found: file.version,
            });
        }
        Ok(file.entries)
    }

    pub fn save(&self, entries: &[CliEntry]) -> Result<(), StateError> {
        let file = File {
            version: VERSION,
            entries: entries.to_vec(),
        };
        let mut text = serde_json::to_vec_pretty(&file).expect("state serialises");
        text.push(b'\n');
        write_atomically(&self.path(), &text)
    }
}

/// Writes `path` so that it holds either its old contents or `data`, even
/// across a crash or power loss (the relay's `safeio`, shared with the
/// spool and the users file). Mode 0644 less the umask, as before (the
/// unit's UMask=0077 makes it 0600).
pub fn write_atomically(path: &Path, data: &[u8]) -> Result<(), StateError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let io = |op, p: &Path| {
        let p = p.to_owned();
        move |source| StateError::Io {
            op,
            path: p,
            source,
        }
    };
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    smtpgate_relay::safeio::write_atomic(path, data, 0o644).map_err(io("writing", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let dir = std::env::temp_dir().join(format!("smtpgate-state-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let state = State::new(&dir);
        assert!(state.load().unwrap().is_empty());
        let e = CliEntry {
            expires: None,
            prefix: "192.0.2.7".parse().unwrap(),
            comment: Some("mx1".into()),
            added: 7,
        };
        state.save(std::slice::from_ref(&e)).unwrap();
        assert_eq!(state.load().unwrap(), vec![e]);
        std::fs::write(dir.join(FILE), b"{not json").unwrap();
        assert!(matches!(state.load(), Err(StateError::Corrupt { .. })));
        std::fs::write(dir.join(FILE), br#"{"version": 9, "entries": []}"#).unwrap();
        assert!(matches!(
            state.load(),
            Err(StateError::Version { found: 9, .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
