//! What the policy sources leave in the state directory: the last good
//! addresses of every name, and the last good entries of every allowlist
//! file. An agent that starts without DNS, or with a file broken since it
//! last ran, enforces exactly what it last knew: never more.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    policy::{DnsName, Item, Named},
    state::{StateError, write_atomically},
};

const FILE: &str = "sources.json";
const VERSION: u32 = 1;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stored {
    pub version: u32,
    #[serde(default)]
    pub names: BTreeMap<Named, StoredName>,
    #[serde(default)]
    pub files: BTreeMap<PathBuf, StoredFile>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredName {
    /// Each address, with the MX host it came from (for `mx:` names).
    pub addresses: BTreeMap<IpAddr, Option<DnsName>>,
    pub resolved_unix: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredFile {
    pub entries: Vec<(usize, Item)>,
    pub loaded_unix: f64,
}

#[derive(Clone, Debug)]
pub struct Store {
    path: PathBuf,
}

impl Store {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join(FILE),
        }
    }

    /// What was saved; nothing if nothing was. A file that cannot be read
    /// is reported and ignored: it only ever adds to the policy, so doing
    /// without it allows less, not more.
    pub fn load(&self) -> Result<Stored, String> {
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Stored {
                    version: VERSION,
                    ..Stored::default()
                });
            }
            Err(e) => return Err(format!("reading {}: {e}", self.path.display())),
        };
        let stored: Stored = serde_json::from_slice(&text)
            .map_err(|e| format!("{} is not a valid sources file: {e}", self.path.display()))?;
        if stored.version != VERSION {
            return Err(format!(
                "{} has version {}; this agent reads version {VERSION}",
                self.path.display(),
                stored.version
            ));
        }
        Ok(stored)
    }

    pub fn save(&self, stored: &Stored) -> Result<(), StateError> {
        let stored = Stored {
            version: VERSION,
            ..stored.clone()
        };
        let mut text = serde_json::to_vec_pretty(&stored).expect("sources serialise");
        text.push(b'\n');
        write_atomically(&self.path, &text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_files() {
        let dir = std::env::temp_dir().join(format!("smtpgate-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::new(&dir);
        assert_eq!(store.load().unwrap().names.len(), 0);
        let mut s = Stored::default();
        s.names.insert(
            "mx:example.org".parse().unwrap(),
            StoredName {
                addresses: BTreeMap::from([(
                    "192.0.2.7".parse().unwrap(),
                    Some("mx1.example.org".parse().unwrap()),
                )]),
                resolved_unix: 5.0,
            },
        );
        s.files.insert(
            "/etc/smtpgate/allow.d/a.txt".into(),
            StoredFile {
                entries: vec![(3, "mail.example.com".parse().unwrap())],
                loaded_unix: 6.0,
            },
        );
        store.save(&s).unwrap();
        let back = store.load().unwrap();
        assert_eq!(back.names, s.names);
        assert_eq!(back.files, s.files);
        std::fs::write(dir.join(FILE), b"{").unwrap();
        assert!(
            store
                .load()
                .unwrap_err()
                .contains("not a valid sources file")
        );
        std::fs::write(dir.join(FILE), br#"{"version": 7}"#).unwrap();
        assert!(store.load().unwrap_err().contains("version 7"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
