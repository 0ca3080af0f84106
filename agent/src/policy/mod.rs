//! The allowlist model: which sources may send SMTP egress, where each entry
//! came from, and what a given source would get.
//!
//! The policy knows nothing of eBPF: it compiles to a [`Table`] that the
//! datapath copies into the kernel.

mod exceptions;
mod prefix;
mod table;

use std::{collections::BTreeMap, net::IpAddr};

use serde::Serialize;

pub use exceptions::{Exception, ExceptionError, Exceptions};
pub use prefix::{Prefix, PrefixError};
pub use table::{Table, TableFull};

/// Where an allowlist entry came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// The config file's `allowlist`.
    Config,
    /// `smtpgate allow add`, kept in the state directory.
    Cli,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Entry {
    pub prefix: Prefix,
    pub origin: Origin,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// When a temporary entry leaves the allowlist (Unix time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_unix: Option<u64>,
}

/// One CLI entry as the allowlist sees it: prefix, comment, expiry.
pub type CliItem<'a> = (&'a Prefix, Option<&'a String>, Option<u64>);

/// The allowlist: a set of prefixes, each with its origin.
#[derive(Clone, Debug, Default)]
pub struct Allowlist {
    entries: BTreeMap<Prefix, Entry>,
}

impl Allowlist {
    pub fn from_config(prefixes: &[Prefix]) -> Self {
        Self::new(prefixes, std::iter::empty())
    }

    /// The config's prefixes and the CLI's entries. A prefix in both is
    /// listed once, as the config's: removing it from the CLI leaves it
    /// allowed.
    pub fn new<'a>(config: &[Prefix], cli: impl IntoIterator<Item = CliItem<'a>>) -> Self {
        let mut entries: BTreeMap<Prefix, Entry> = cli
            .into_iter()
            .map(|(p, c, expires_unix)| {
                (
                    *p,
                    Entry {
                        prefix: *p,
                        origin: Origin::Cli,
                        comment: c.cloned(),
                        expires_unix,
                    },
                )
            })
            .collect();
        for p in config {
            entries.insert(
                *p,
                Entry {
                    prefix: *p,
                    origin: Origin::Config,
                    comment: None,
                    expires_unix: None,
                },
            );
        }
        Self { entries }
    }

    #[must_use]
    pub fn get(&self, prefix: &Prefix) -> Option<&Entry> {
        self.entries.get(prefix)
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Counts of IPv4 and IPv6 entries.
    #[must_use]
    pub fn count_by_family(&self) -> (usize, usize) {
        let v4 = self.entries.keys().filter(|p| p.is_ipv4()).count();
        (v4, self.entries.len() - v4)
    }

    /// The most specific entry covering `ip`, if any.
    #[must_use]
    pub fn matching(&self, ip: IpAddr) -> Option<&Entry> {
        self.entries
            .values()
            .filter(|e| e.prefix.contains(ip))
            .max_by_key(|e| e.prefix.prefix_len())
    }

    /// The datapath table for this allowlist.
    #[must_use]
    pub fn compile(&self) -> Table {
        Table::build(self.entries.keys())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_picks_the_most_specific_entry() {
        let prefixes: Vec<Prefix> = ["198.51.100.0/24", "198.51.100.7", "2001:db8::/32"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let list = Allowlist::from_config(&prefixes);
        let m = list.matching("198.51.100.7".parse().unwrap()).unwrap();
        assert_eq!(m.prefix.to_string(), "198.51.100.7/32");
        let m = list.matching("198.51.100.8".parse().unwrap()).unwrap();
        assert_eq!(m.prefix.to_string(), "198.51.100.0/24");
        assert!(list.matching("192.0.2.1".parse().unwrap()).is_none());
        assert_eq!(list.count_by_family(), (2, 1));
    }
}
