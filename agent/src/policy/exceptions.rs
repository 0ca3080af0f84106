//! Destination exceptions: destinations any source may reach on the SMTP
//! ports (`[[exception]]` in the config), such as the ISP's smarthost.
//!
//! The kernel looks them up in an LPM trie: the longest matching prefix
//! answers, alone. So a prefix nested in another must carry the outer one's
//! ports too, or a /32 excepted for 587 inside a /24 excepted for 25 would
//! lose 25. [`Exceptions::compile`] pushes them down.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use smtpgate_common::exceptions::{ExceptionPorts, MAX_ENTRIES, MAX_PORTS};

use super::Prefix;

/// One `[[exception]]` as configured.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Exception {
    pub destinations: Vec<Prefix>,
    /// Empty: every SMTP port.
    pub ports: BTreeSet<u16>,
    pub comment: Option<String>,
}

/// Ports an exception covers: every SMTP port, or these.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Ports {
    All,
    Some(BTreeSet<u16>),
}

impl Ports {
    fn union(&mut self, other: &Ports) {
        match (&mut *self, other) {
            (Ports::All, _) => {}
            (_, Ports::All) => *self = Ports::All,
            (Ports::Some(a), Ports::Some(b)) => a.extend(b),
        }
    }

    fn covers(&self, port: u16) -> bool {
        match self {
            Ports::All => true,
            Ports::Some(p) => p.contains(&port),
        }
    }
}

/// The compiled exceptions: one entry per distinct prefix, with the ports
/// the kernel must see for it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exceptions {
    entries: BTreeMap<Prefix, Ports>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExceptionError {
    #[error(
        "{prefix} is excepted for {count} ports in all (counting the prefixes it lies in); at most {MAX_PORTS} per destination"
    )]
    TooManyPorts { prefix: Prefix, count: usize },
    #[error("{count} exception prefixes; at most {MAX_ENTRIES}")]
    TooMany { count: usize },
}

impl Exceptions {
    pub fn compile(list: &[Exception]) -> Result<Self, ExceptionError> {
        let mut entries: BTreeMap<Prefix, Ports> = BTreeMap::new();
        for e in list {
            let ports = if e.ports.is_empty() {
                Ports::All
            } else {
                Ports::Some(e.ports.clone())
            };
            for d in &e.destinations {
                entries
                    .entry(*d)
                    .and_modify(|p| p.union(&ports))
                    .or_insert_with(|| ports.clone());
            }
        }
        // Push each prefix's ports into the prefixes nested in it. Few
        // entries, so the quadratic walk is fine (bounded by MAX_ENTRIES).
        if entries.len() > MAX_ENTRIES as usize {
            return Err(ExceptionError::TooMany {
                count: entries.len(),
            });
        }
        let snapshot: Vec<(Prefix, Ports)> = entries.iter().map(|(k, v)| (*k, v.clone())).collect();
        for (inner, ports) in &mut entries {
            for (outer, outer_ports) in &snapshot {
                if outer != inner
                    && outer.is_ipv4() == inner.is_ipv4()
                    && outer.prefix_len() < inner.prefix_len()
                    && outer.net().contains(&inner.net())
                {
                    ports.union(outer_ports);
                }
            }
        }
        for (prefix, ports) in &entries {
            if let Ports::Some(p) = ports
                && p.len() > MAX_PORTS
            {
                return Err(ExceptionError::TooManyPorts {
                    prefix: *prefix,
                    count: p.len(),
                });
            }
        }
        Ok(Self { entries })
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether a connection to `dst:port` is excepted: the longest matching
    /// prefix decides, as in the kernel's trie.
    #[must_use]
    pub fn covers(&self, dst: IpAddr, port: u16) -> bool {
        self.entries
            .iter()
            .filter(|(p, _)| p.contains(dst))
            .max_by_key(|(p, _)| p.prefix_len())
            .is_some_and(|(_, ports)| ports.covers(port))
    }

    /// What the kernel's map holds: each prefix with its ports (all zero
    /// for every SMTP port).
    pub fn kernel_entries(&self) -> impl Iterator<Item = (Prefix, ExceptionPorts)> + '_ {
        self.entries.iter().map(|(prefix, ports)| {
            let mut v = ExceptionPorts::default();
            if let Ports::Some(p) = ports {
                for (slot, port) in v.ports.iter_mut().zip(p) {
                    *slot = *port;
                }
            }
            (*prefix, v)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(dst: &[&str], ports: &[u16]) -> Exception {
        Exception {
            destinations: dst.iter().map(|d| d.parse().unwrap()).collect(),
            ports: ports.iter().copied().collect(),
            comment: None,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn nested_prefixes_keep_the_outer_ports() {
        let e = Exceptions::compile(&[
            ex(&["198.51.100.0/24"], &[25]),
            ex(&["198.51.100.7"], &[587]),
        ])
        .unwrap();
        assert!(e.covers(ip("198.51.100.7"), 25), "the /24's port");
        assert!(e.covers(ip("198.51.100.7"), 587));
        assert!(e.covers(ip("198.51.100.8"), 25));
        assert!(!e.covers(ip("198.51.100.8"), 587));
        assert!(!e.covers(ip("198.51.101.1"), 25));
        let kernel: Vec<_> = e.kernel_entries().collect();
        assert_eq!(kernel.len(), 2);
        assert_eq!(kernel[1].1.ports, [25, 587, 0, 0]);
    }

    #[test]
    fn no_ports_means_every_smtp_port() {
        let e = Exceptions::compile(&[ex(&["2001:db8:25::/48"], &[])]).unwrap();
        assert!(e.covers(ip("2001:db8:25::1"), 465));
        assert_eq!(
            e.kernel_entries().next().unwrap().1,
            ExceptionPorts::default()
        );
    }

    #[test]
    fn too_many_ports_is_an_error() {
        let err = Exceptions::compile(&[
            ex(&["192.0.2.0/24"], &[25, 465, 587]),
            ex(&["192.0.2.1"], &[2525, 26]),
        ])
        .unwrap_err();
        assert!(
            matches!(err, ExceptionError::TooManyPorts { count: 5, .. }),
            "{err}"
        );
    }
}
