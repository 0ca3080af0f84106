//! The allowlist model: which sources may send SMTP egress, where each entry
//! came from, and what a given source would get.
//!
//! The policy knows nothing of eBPF: it compiles to a [`Table`] that the
//! datapath copies into the kernel.

mod exceptions;
mod item;
mod prefix;
mod table;

use std::{collections::BTreeMap, fmt, net::IpAddr, path::PathBuf, str::FromStr};

use serde::Serialize;

pub use exceptions::{Exception, ExceptionError, Exceptions};
pub use item::{DnsName, Item, ItemError, ListError, Named, parse_list};
pub use prefix::{Prefix, PrefixError};
pub use table::{Table, TableFull};

/// Where an allowlist entry came from. On the wire and in `allow list` as
/// one string: `config`, `cli`, `file:/etc/smtpgate/allow.d/a.txt:3`,
/// `dns:mail.example.com`, `dns:mx:example.org via mx1.example.org`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Origin {
    /// The config file's `allowlist`.
    Config,
    /// A line of an allowlist file (`allowlist_files`).
    File { path: PathBuf, line: usize },
    /// `smtpgate allow add`, kept in the state directory.
    Cli,
    /// An address a name entry resolved to; `via` is the MX host for an
    /// `mx:` entry.
    Dns { name: Named, via: Option<DnsName> },
}

impl Origin {
    /// Which origin an entry listed by several is shown as: the declared
    /// ones first (their order is the variants' order), then addresses that
    /// came from DNS.
    fn rank(&self) -> u8 {
        match self {
            Origin::Config => 0,
            Origin::File { .. } => 1,
            Origin::Cli => 2,
            Origin::Dns { .. } => 3,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Config => f.write_str("config"),
            Origin::Cli => f.write_str("cli"),
            Origin::File { path, line } => write!(f, "file:{}:{line}", path.display()),
            Origin::Dns { name, via: None } => write!(f, "dns:{name}"),
            Origin::Dns {
                name,
                via: Some(host),
            } => write!(f, "dns:{name} via {host}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{text:?} is not an allowlist origin")]
pub struct OriginError {
    text: String,
}

impl FromStr for Origin {
    type Err = OriginError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || OriginError { text: s.to_owned() };
        match s {
            "config" => return Ok(Origin::Config),
            "cli" => return Ok(Origin::Cli),
            _ => {}
        }
        if let Some(rest) = s.strip_prefix("file:") {
            let (path, line) = rest.rsplit_once(':').ok_or_else(bad)?;
            return Ok(Origin::File {
                path: PathBuf::from(path),
                line: line.parse().map_err(|_| bad())?,
            });
        }
        let rest = s.strip_prefix("dns:").ok_or_else(bad)?;
        let (name, via) = match rest.split_once(" via ") {
            Some((n, v)) => (n, Some(v.parse().map_err(|_| bad())?)),
            None => (rest, None),
        };
        Ok(Origin::Dns {
            name: name.parse().map_err(|_| bad())?,
            via,
        })
    }
}

impl Serialize for Origin {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Origin {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Entry {
    pub prefix: Prefix,
    /// The origin it is listed under (see [`Origin::rank`]).
    pub origin: Origin,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// When a temporary entry leaves the allowlist (Unix time). Only for
    /// an entry whose origin is the CLI: another source keeps it allowed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_unix: Option<u64>,
    /// Every other source that lists the same prefix: it stays allowed
    /// while any of them does.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also: Vec<Origin>,
}

/// One CLI entry as the allowlist sees it: prefix, comment, expiry.
pub type CliItem<'a> = (&'a Prefix, Option<&'a String>, Option<u64>);

/// The allowlist: a set of prefixes, each with its origin.
#[derive(Clone, Debug, Default)]
pub struct Allowlist {
    entries: BTreeMap<Prefix, Entry>,
}

/// Builds an [`Allowlist`] from any number of sources; a prefix listed by
/// several is one entry with every origin.
#[derive(Default)]
pub struct Builder {
    entries: BTreeMap<Prefix, Entry>,
}

impl Builder {
    pub fn add(
        &mut self,
        prefix: Prefix,
        origin: Origin,
        comment: Option<String>,
        expires_unix: Option<u64>,
    ) {
        let Some(e) = self.entries.get_mut(&prefix) else {
            self.entries.insert(
                prefix,
                Entry {
                    prefix,
                    expires_unix: expires_unix.filter(|_| origin == Origin::Cli),
                    origin,
                    comment,
                    also: Vec::new(),
                },
            );
            return;
        };
        if e.origin == origin {
            return;
        }
        if e.comment.is_none() {
            e.comment = comment;
        }
        if origin.rank() < e.origin.rank() {
            // The expiry is shown only while the CLI is what allows it.
            e.expires_unix = expires_unix.filter(|_| origin == Origin::Cli);
            let was = std::mem::replace(&mut e.origin, origin);
            e.also.push(was);
        } else {
            e.also.push(origin);
        }
        e.also.sort();
        e.also.dedup();
    }

    #[must_use]
    pub fn build(self) -> Allowlist {
        Allowlist {
            entries: self.entries,
        }
    }
}

impl Allowlist {
    pub fn from_config(prefixes: &[Prefix]) -> Self {
        Self::new(prefixes, std::iter::empty())
    }

    /// The config's prefixes and the CLI's entries. A prefix in both is
    /// listed once, as the config's: removing it from the CLI leaves it
    /// allowed.
    pub fn new<'a>(config: &[Prefix], cli: impl IntoIterator<Item = CliItem<'a>>) -> Self {
        let mut b = Builder::default();
        for p in config {
            b.add(*p, Origin::Config, None, None);
        }
        for (p, c, expires_unix) in cli {
            b.add(*p, Origin::Cli, c.cloned(), expires_unix);
        }
        b.build()
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

    #[test]
    fn a_prefix_from_several_sources_is_one_entry_with_every_origin() {
        let p: Prefix = "192.0.2.7".parse().unwrap();
        let dns = Origin::Dns {
            name: "mx:example.org".parse().unwrap(),
            via: Some("mx1.example.org".parse().unwrap()),
        };
        let file = Origin::File {
            path: "/etc/smtpgate/allow.d/a.txt".into(),
            line: 3,
        };
        let mut b = Builder::default();
        b.add(p, dns.clone(), None, None);
        b.add(p, Origin::Cli, Some("migration".into()), Some(99));
        let list = b.build();
        let e = list.get(&p).unwrap();
        // The CLI entry is what is shown, with its expiry: DNS may drop it.
        assert_eq!(e.origin, Origin::Cli);
        assert_eq!(e.expires_unix, Some(99));
        assert_eq!(e.comment.as_deref(), Some("migration"));
        assert_eq!(e.also, vec![dns.clone()]);

        let mut b = Builder::default();
        b.add(p, Origin::Cli, None, Some(99));
        b.add(p, dns.clone(), None, None);
        b.add(p, file.clone(), None, None);
        b.add(p, file.clone(), None, None);
        let list = b.build();
        let e = list.get(&p).unwrap();
        // The file keeps it allowed past the CLI entry's expiry.
        assert_eq!((&e.origin, e.expires_unix), (&file, None));
        assert_eq!(e.also, vec![Origin::Cli, dns]);
    }

    #[test]
    fn origins_read_back_as_written() {
        for text in [
            "config",
            "cli",
            "file:/etc/smtpgate/allow.d/a:b.txt:12",
            "dns:mail.example.com",
            "dns:mx:example.org via mx1.example.org",
        ] {
            let o: Origin = text.parse().unwrap();
            assert_eq!(o.to_string(), text);
            let json = serde_json::to_string(&o).unwrap();
            assert_eq!(serde_json::from_str::<Origin>(&json).unwrap(), o);
        }
        assert!("dns:".parse::<Origin>().is_err());
        assert!("file:/x".parse::<Origin>().is_err());
        assert!("kernel".parse::<Origin>().is_err());
    }
}
