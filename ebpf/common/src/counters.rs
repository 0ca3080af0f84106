//! The per-CPU counter layout.
//!
//! [`crate::maps::COUNTERS`] is a per-CPU array of [`Counter`], indexed by
//! [`index`]. Every (family, verdict, reason) combination has its own slot,
//! so the kernel side never needs a lock or an atomic, and userspace sums the
//! CPUs at read time. Packets and connection attempts share a slot so that a
//! packet costs one map lookup.

/// Address family of the counted packet.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Ipv4 = 0,
    Ipv6 = 1,
    /// The network layer could not be reached (e.g. a VLAN stack too deep).
    Other = 2,
}

/// What the datapath did with an SMTP egress packet.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed = 0,
    Dropped = 1,
    Rejected = 2,
    Redirected = 3,
    /// Would have been denied, let through because `mode = "audit"`.
    Audited = 4,
    /// Let through because the port cannot be known and the packet cannot
    /// carry a connection on its own (a non-first fragment).
    Passed = 5,
}

/// Why the datapath reached its verdict.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The source is in the allowlist.
    Allowlisted = 0,
    /// The source is not in the allowlist.
    NotAllowlisted = 1,
    /// IPv4 first fragment too short to hold the TCP header (RFC 1858).
    TinyFragment = 2,
    /// IPv4/IPv6 fragment at offset 8 of a TCP datagram, which could rewrite
    /// the TCP header of the first fragment (RFC 1858, RFC 5722).
    FragmentOverlap = 3,
    /// IPv6 first fragment without the whole header chain and TCP header
    /// (RFC 7112).
    IncompleteChain = 4,
    /// More IPv6 extension headers than [`crate::MAX_IPV6_EXT_HEADERS`].
    HeaderChainTooLong = 5,
    /// More VLAN tags than [`crate::MAX_VLAN_DEPTH`].
    VlanTooDeep = 6,
    /// IPv6 source is IPv4-mapped (`::ffff:0:0/96`) or IPv4-compatible
    /// (`::/96`): never legitimate on the wire, and a way to dodge an IPv4
    /// allowlist decision.
    MappedAddress = 7,
    /// A TCP packet whose headers are truncated or inconsistent.
    Malformed = 8,
    /// A non-first fragment of a TCP datagram: its port is unknown, and the
    /// first fragment got the verdict.
    NonFirstFragment = 9,
    /// `action = "redirect"`, but the relay's listener is not there (agent
    /// down, relay stopped): the connection is dropped, never let through.
    RelayUnavailable = 10,
    /// A delivery socket of the agent's own relay (see
    /// [`crate::RELAY_MARK`]).
    RelayDelivery = 11,
    /// The destination is a destination exception (see
    /// [`crate::exceptions`]): any source may reach it.
    DestinationException = 12,
}

/// One counter slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    /// Connection attempts: packets with SYN set and ACK clear.
    pub connections: u64,
}

const _: () = assert!(core::mem::size_of::<Counter>() == 16);

#[cfg(feature = "user")]
// SAFETY: `Counter` is `repr(C)`, has no padding and only integer fields.
unsafe impl aya::Pod for Counter {}

pub const FAMILIES: u32 = 3;
pub const VERDICTS: u32 = 6;
pub const REASONS: u32 = 13;

/// Number of slots in [`crate::maps::COUNTERS`].
pub const SLOTS: u32 = FAMILIES * VERDICTS * REASONS;

/// The slot of one combination.
#[inline(always)]
#[must_use]
pub const fn index(family: Family, verdict: Verdict, reason: Reason) -> u32 {
    (family as u32 * VERDICTS + verdict as u32) * REASONS + reason as u32
}

impl Family {
    pub const ALL: [Family; FAMILIES as usize] = [Family::Ipv4, Family::Ipv6, Family::Other];

    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
            Family::Other => "other",
        }
    }
}

impl Verdict {
    pub const ALL: [Verdict; VERDICTS as usize] = [
        Verdict::Allowed,
        Verdict::Dropped,
        Verdict::Rejected,
        Verdict::Redirected,
        Verdict::Audited,
        Verdict::Passed,
    ];

    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Dropped => "dropped",
            Verdict::Rejected => "rejected",
            Verdict::Redirected => "redirected",
            Verdict::Audited => "audited",
            Verdict::Passed => "passed",
        }
    }
}

impl Reason {
    pub const ALL: [Reason; REASONS as usize] = [
        Reason::Allowlisted,
        Reason::NotAllowlisted,
        Reason::TinyFragment,
        Reason::FragmentOverlap,
        Reason::IncompleteChain,
        Reason::HeaderChainTooLong,
        Reason::VlanTooDeep,
        Reason::MappedAddress,
        Reason::Malformed,
        Reason::NonFirstFragment,
        Reason::RelayUnavailable,
        Reason::RelayDelivery,
        Reason::DestinationException,
    ];

    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Allowlisted => "allowlisted",
            Reason::NotAllowlisted => "not_allowlisted",
            Reason::TinyFragment => "tiny_fragment",
            Reason::FragmentOverlap => "fragment_overlap",
            Reason::IncompleteChain => "incomplete_chain",
            Reason::HeaderChainTooLong => "header_chain_too_long",
            Reason::VlanTooDeep => "vlan_too_deep",
            Reason::MappedAddress => "mapped_address",
            Reason::Malformed => "malformed",
            Reason::NonFirstFragment => "non_first_fragment",
            Reason::RelayUnavailable => "relay_unavailable",
            Reason::RelayDelivery => "relay_delivery",
            Reason::DestinationException => "destination_exception",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_combination_has_its_own_slot() {
        let mut seen = [false; SLOTS as usize];
        for f in Family::ALL {
            for v in Verdict::ALL {
                for r in Reason::ALL {
                    let i = index(f, v, r) as usize;
                    assert!(!seen[i], "slot {i} used twice");
                    seen[i] = true;
                }
            }
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn all_lists_match_discriminants() {
        for (i, v) in Verdict::ALL.iter().enumerate() {
            assert_eq!(*v as usize, i);
        }
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        for (i, f) in Family::ALL.iter().enumerate() {
            assert_eq!(*f as usize, i);
        }
    }
}
