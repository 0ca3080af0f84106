//! Destination exceptions: destinations every source may reach on the SMTP
//! ports (an ISP's smarthost, a hosted mail service's inbound connector),
//! whatever the allowlist says of the source.
//!
//! An LPM trie, unlike the allowlist's table: exceptions are few (tens), so
//! the kernel's trie is small and fast enough, and it is consulted only for
//! SMTP packets the allowlist denied, and not at all while there are none
//! ([`crate::Config::exceptions`]).

/// Key data of [`crate::maps::EXCEPTIONS`]: the family (4 or 6), then the
/// address (IPv4 in the first 4 bytes). The trie's prefix length counts the
/// family byte: 8 + the address prefix length.
pub type ExceptionKey = [u8; 17];

/// At most this many ports per exception.
pub const MAX_PORTS: usize = 4;

/// Most exception entries (prefixes) the map holds.
pub const MAX_ENTRIES: u32 = 4096;

/// Value of [`crate::maps::EXCEPTIONS`]: the destination ports it covers;
/// all zero for every SMTP port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExceptionPorts {
    pub ports: [u16; MAX_PORTS],
}

impl ExceptionPorts {
    /// Whether a connection to `dport` is covered.
    #[inline(always)]
    #[must_use]
    pub fn covers(&self, dport: u16) -> bool {
        let p = self.ports;
        (p[0] == 0 && p[1] == 0 && p[2] == 0 && p[3] == 0)
            || p[0] == dport
            || p[1] == dport
            || p[2] == dport
            || p[3] == dport
    }
}

/// The key data for an address of `family` (4 or 6).
#[inline(always)]
#[must_use]
pub fn key_data(family: u8, addr: &[u8]) -> ExceptionKey {
    let mut k = [0u8; 17];
    k[0] = family;
    let n = if addr.len() > 16 { 16 } else { addr.len() };
    let mut i = 0;
    while i < n {
        k[1 + i] = addr[i];
        i += 1;
    }
    k
}

const _: () = assert!(core::mem::size_of::<ExceptionPorts>() == 8);

#[cfg(feature = "user")]
// SAFETY: repr(C), u16s only, no padding (size asserted).
unsafe impl aya::Pod for ExceptionPorts {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_ports_cover_all() {
        let all = ExceptionPorts::default();
        assert!(all.covers(25) && all.covers(587));
        let some = ExceptionPorts {
            ports: [25, 0, 0, 0],
        };
        assert!(some.covers(25));
        assert!(!some.covers(587));
    }

    #[test]
    fn key_layout() {
        let k = key_data(4, &[192, 0, 2, 1]);
        assert_eq!(&k[..5], &[4, 192, 0, 2, 1]);
        assert!(k[5..].iter().all(|b| *b == 0));
    }
}
