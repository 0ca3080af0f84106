//! The evasion classes: packets crafted to slip a port-25 connection past a
//! classifier (lab/craft.py builds them), with the reason each must be
//! dropped under. Shared by the Ethernet and the L3-device tests.

/// One class, from given sources to given destinations.
pub struct Class {
    /// craft.py's name for it.
    pub kind: &'static str,
    pub src: String,
    pub dst: String,
    /// The source address the packets carry on the wire, as the lab's
    /// counters know it.
    pub seen_as: String,
    pub family: &'static str,
    pub reason: &'static str,
}

/// Where a battery of evasion packets comes from and goes to.
pub struct Ends<'a> {
    pub denied_v4: &'a str,
    pub denied_v6: &'a str,
    /// An allowlisted IPv4 host whose IPv6 forms (mapped, compatible) must
    /// not inherit its verdict.
    pub allowed_v4: &'a str,
    pub dst_v4: &'a str,
    pub dst_v6: &'a str,
}

/// Every class, each counted under its own reason.
pub fn classes(e: &Ends<'_>) -> Vec<Class> {
    let c = |kind, src: &str, dst: &str, seen_as: String, family, reason| Class {
        kind,
        src: src.to_owned(),
        dst: dst.to_owned(),
        seen_as,
        family,
        reason,
    };
    let (d4, d6) = (e.denied_v4, e.denied_v6);
    vec![
        c("tiny", d4, e.dst_v4, d4.to_owned(), "ipv4", "tiny_fragment"),
        c(
            "overlap",
            d4,
            e.dst_v4,
            d4.to_owned(),
            "ipv4",
            "fragment_overlap",
        ),
        c(
            "v6-tiny",
            d6,
            e.dst_v6,
            d6.to_owned(),
            "ipv6",
            "incomplete_chain",
        ),
        c(
            "v6-overlap",
            d6,
            e.dst_v6,
            d6.to_owned(),
            "ipv6",
            "fragment_overlap",
        ),
        c(
            "v6-long",
            d6,
            e.dst_v6,
            d6.to_owned(),
            "ipv6",
            "header_chain_too_long",
        ),
        // From the IPv6 forms of an allowlisted IPv4 host: a way to dodge the
        // IPv4 verdict, never legitimate on the wire.
        c(
            "mapped",
            e.allowed_v4,
            e.dst_v6,
            format!("::ffff:{}", e.allowed_v4),
            "ipv6",
            "mapped_address",
        ),
        c(
            "compat",
            e.allowed_v4,
            e.dst_v6,
            format!("::{}", e.allowed_v4),
            "ipv6",
            "mapped_address",
        ),
    ]
}

/// The classes that cross a plain Linux router untouched: all but the
/// IPv4-mapped source, which Linux itself drops on receipt.
pub const FORWARDED_BY_LINUX: [&str; 6] = [
    "tiny",
    "overlap",
    "v6-tiny",
    "v6-overlap",
    "v6-long",
    "compat",
];
