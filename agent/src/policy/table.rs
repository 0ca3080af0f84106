//! Compiles an allowlist into the datapath's table format (see
//! `smtpgate_common::table` for the layout and why).

use ipnet::IpNet;
use smtpgate_common::table::{self, ALLOW, DENY, FIRST_FREE, NODE_CELLS, Node, V4_ROOT, V6_ROOT};

use super::Prefix;

/// A compiled table, with node indices relative to its own start.
pub struct Table {
    nodes: Vec<Node>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "the allowlist needs {needed} table nodes but the datapath has room for {capacity}; raise datapath.table_nodes and restart"
)]
pub struct TableFull {
    pub needed: usize,
    pub capacity: usize,
}

impl Table {
    /// Builds the table for a set of prefixes.
    pub fn build<'a>(prefixes: impl IntoIterator<Item = &'a Prefix>) -> Table {
        let mut sorted: Vec<&Prefix> = prefixes.into_iter().collect();
        // Shorter prefixes first: a longer one under an already-allowed cell
        // then costs nothing, and no subtree is built only to be covered.
        sorted.sort_by_key(|p| p.prefix_len());
        let mut t = Table {
            nodes: vec![[DENY; NODE_CELLS]; FIRST_FREE as usize],
        };
        for p in sorted {
            match p.net() {
                IpNet::V4(n) => t.insert(V4_ROOT, &n.network().octets(), n.prefix_len()),
                IpNet::V6(n) => t.insert(V6_ROOT, &n.network().octets(), n.prefix_len()),
            }
        }
        t
    }

    fn insert(&mut self, root: u32, addr: &[u8], len: u8) {
        let len = usize::from(len);
        // The root is 256 nodes of 256 cells: 16 bits addressed directly.
        if len <= 8 {
            let span = 1usize << (8 - len);
            for b0 in usize::from(addr[0])..usize::from(addr[0]) + span {
                self.nodes[root as usize + b0] = [ALLOW; NODE_CELLS];
            }
            return;
        }
        let mut node = root as usize + usize::from(addr[0]);
        // Byte `depth` of the address selects the cell in `node`.
        for depth in 1..addr.len() {
            let covered_bits = 8 * (depth + 1);
            let cell = usize::from(addr[depth]);
            if len <= covered_bits {
                let span = 1usize << (covered_bits - len);
                for c in &mut self.nodes[node][cell..cell + span] {
                    *c = ALLOW;
                }
                return;
            }
            match self.nodes[node][cell] {
                ALLOW => return,
                DENY => {
                    let child = self.nodes.len();
                    self.nodes.push([DENY; NODE_CELLS]);
                    self.nodes[node][cell] = u32::try_from(child).expect("table index fits u32");
                    node = child;
                }
                child => node = child as usize,
            }
        }
    }

    /// Nodes used, the roots included.
    #[must_use]
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.nodes.len() == FIRST_FREE as usize && self.nodes.iter().flatten().all(|c| *c == DENY)
    }

    /// Answers as the kernel would, with the same lookup function.
    #[must_use]
    pub fn allows(&self, ip: std::net::IpAddr) -> bool {
        let node = |i: u32| self.nodes.get(i as usize);
        match ip {
            std::net::IpAddr::V4(a) => table::lookup(&a.octets(), 0, node),
            std::net::IpAddr::V6(a) => table::lookup(&a.octets(), 0, node),
        }
    }

    /// Copies the table into `dst`, a table region of the kernel map whose
    /// first node has index `base` in the whole map.
    pub fn write_to(&self, dst: &mut [Node], base: u32) -> Result<(), TableFull> {
        if self.nodes.len() > dst.len() {
            return Err(TableFull {
                needed: self.nodes.len(),
                capacity: dst.len(),
            });
        }
        for (out, node) in dst.iter_mut().zip(&self.nodes) {
            for (o, c) in out.iter_mut().zip(node) {
                *o = if *c == DENY || *c == ALLOW {
                    *c
                } else {
                    c + base
                };
            }
        }
        // Unused nodes are unreachable; they are left as they are.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn table(list: &[&str]) -> Table {
        let prefixes: Vec<Prefix> = list.iter().map(|s| s.parse().unwrap()).collect();
        Table::build(&prefixes)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn empty_table_denies_everything() {
        let t = table(&[]);
        assert!(t.is_empty());
        assert!(!t.allows(ip("192.0.2.1")));
        assert!(!t.allows(ip("::")));
    }

    #[test]
    fn every_prefix_length_matches_exactly_its_range() {
        for len in 0..=32u8 {
            let base = u32::from(std::net::Ipv4Addr::new(203, 0, 113, 77))
                & (u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0));
            let net = format!("{}/{len}", std::net::Ipv4Addr::from(base));
            let t = table(&[&net]);
            let size = 1u64 << (32 - len);
            let inside = [u64::from(base), u64::from(base) + size - 1];
            for a in inside {
                assert!(
                    t.allows(IpAddr::V4((a as u32).into())),
                    "{net} must allow {a}"
                );
            }
            if len > 0 {
                if base > 0 {
                    assert!(!t.allows(IpAddr::V4((base - 1).into())), "{net}: below");
                }
                let above = u64::from(base) + size;
                if above <= u64::from(u32::MAX) {
                    assert!(!t.allows(IpAddr::V4((above as u32).into())), "{net}: above");
                }
            }
        }
        for len in [0u8, 7, 8, 9, 16, 17, 32, 47, 48, 64, 100, 127, 128] {
            let addr: u128 = u128::from(std::net::Ipv6Addr::new(
                0x2001, 0xdb8, 0x1234, 0x5678, 9, 10, 11, 12,
            ));
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            let base = addr & mask;
            let net = format!("{}/{len}", std::net::Ipv6Addr::from(base));
            let t = table(&[&net]);
            assert!(t.allows(IpAddr::V6(base.into())), "{net}: first");
            assert!(t.allows(IpAddr::V6((base | !mask).into())), "{net}: last");
            if len > 0 {
                assert!(
                    !t.allows(IpAddr::V6(base.wrapping_sub(1).into())),
                    "{net}: below"
                );
                assert!(
                    !t.allows(IpAddr::V6((base | !mask).wrapping_add(1).into())),
                    "{net}: above"
                );
            }
            assert!(!t.allows(ip("192.0.2.1")), "{net} must not allow IPv4");
        }
    }

    #[test]
    fn union_semantics_and_order_independence() {
        let t = table(&[
            "198.51.100.7",
            "198.51.100.0/24",
            "198.51.0.0/16",
            "2001:db8::1",
            "2001:db8::/32",
        ]);
        // The covering /16 came first after sorting: no nodes were needed
        // below it, and everything under it is allowed.
        assert!(t.allows(ip("198.51.7.7")));
        assert!(t.allows(ip("2001:db8:ffff::1")));
        assert!(!t.allows(ip("198.52.0.1")));
        // The IPv6 /32 needs two nodes below the 16-bit root (bits 16-24 and
        // 24-32); nothing else needs any.
        assert_eq!(t.len(), FIRST_FREE as usize + 2);
    }

    #[test]
    fn lookup_agrees_with_a_linear_scan() {
        // Pseudo-random prefixes and probes, checked against Prefix::contains.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut prefixes = Vec::new();
        for _ in 0..400 {
            let r = next();
            let p = if r & 1 == 0 {
                let len = (r >> 8) as u8 % 33;
                let a = (next() as u32) & (192 << 24 | 0x00ff_ffff);
                ipnet::Ipv4Net::new(a.into(), len).unwrap().trunc().into()
            } else {
                let len = (r >> 8) as u8 % 129;
                let a = (u128::from(next()) << 64 | u128::from(next())) & !(0xffff_u128 << 112)
                    | (0x2001_u128 << 112);
                IpNet::from(ipnet::Ipv6Net::new(a.into(), len).unwrap().trunc())
            };
            if let Ok(p) = p.to_string().parse::<Prefix>() {
                prefixes.push(p);
            }
        }
        let t = Table::build(&prefixes);
        for _ in 0..20_000 {
            let r = next();
            let probe = if r & 1 == 0 {
                IpAddr::V4(((next() as u32) & (192 << 24 | 0x00ff_ffff)).into())
            } else {
                let a = (u128::from(next()) << 64 | u128::from(next())) & !(0xffff_u128 << 112)
                    | (0x2001_u128 << 112);
                IpAddr::V6(a.into())
            };
            let want = prefixes.iter().any(|p| p.contains(probe));
            assert_eq!(t.allows(probe), want, "{probe}");
        }
    }

    #[test]
    fn write_to_relocates_children_and_checks_room() {
        let t = table(&["192.0.2.10", "2001:db8::10"]);
        let mut region = vec![[DENY; NODE_CELLS]; t.len()];
        t.write_to(&mut region, 5000).unwrap();
        let child = region[(V4_ROOT + 192) as usize][0];
        assert!(child >= 5000 + FIRST_FREE, "child {child} not relocated");
        let mut small = vec![[DENY; NODE_CELLS]; t.len() - 1];
        assert_eq!(
            t.write_to(&mut small, 0),
            Err(TableFull {
                needed: t.len(),
                capacity: t.len() - 1
            })
        );
    }
}
