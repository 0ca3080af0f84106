//! This host's own addresses and clock, as the cgroup connect hooks and
//! `top` need them: the system calls, in one place.

use super::*;

/// Whether any of this host's addresses, per family, is allowlisted.
pub(super) fn local_verdicts(allowlist: &Allowlist) -> (bool, bool) {
    let addrs = local_addresses();
    let any = |v4: bool| {
        addrs
            .iter()
            .any(|a| a.is_ipv4() == v4 && allowlist.matching(*a).is_some())
    };
    (any(true), any(false))
}

/// The addresses an unbound socket may get as its source when it connects
/// to a non-loopback destination: all of this network namespace's, except
/// loopback and IPv6 link-local ones.
pub(super) fn local_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| {
            let sa = a.address?;
            if let Some(v4) = sa.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .filter(|a| match a {
            IpAddr::V4(v4) => !v4.is_loopback(),
            IpAddr::V6(v6) => !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80,
        })
        .collect()
}

/// CLOCK_MONOTONIC, which bpf_ktime_get_ns reads.
pub(super) fn monotonic_ns() -> u64 {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_MONOTONIC).map_or(0, |ts| {
        ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
    })
}
