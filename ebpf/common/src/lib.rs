//! Types and names shared by smtpgate's eBPF programs and its agent.
//!
//! Everything here is read by both sides, so it is `#[repr(C)]`, built from
//! fixed-width integers only, and its size is asserted at compile time. The
//! names of maps and programs live here too, so a rename cannot leave the two
//! sides disagreeing.
#![no_std]

pub mod counters;
pub mod events;
pub mod exceptions;
pub mod parse;
pub mod rst;
pub mod table;
pub mod verdict;

pub use counters::{Counter, Family, Reason, Verdict};

/// Program names, as the ELF symbols the agent looks up.
pub mod programs {
    /// TC classifier for the client-facing interface's ingress.
    pub const TC_INGRESS: &str = "smtpgate_tc_ingress";
    /// TC classifier for an interface's egress (routed gateways).
    pub const TC_EGRESS: &str = "smtpgate_tc_egress";
    /// [`TC_INGRESS`] and [`TC_EGRESS`] for devices without a link-layer
    /// header (tun, WireGuard, PPP, ipip, ip6tnl, sit): their packets start
    /// with the IP header, and skb->protocol says which.
    pub const TC_INGRESS_L3: &str = "smtpgate_tc_ingress_l3";
    pub const TC_EGRESS_L3: &str = "smtpgate_tc_egress_l3";
    /// cgroup/skb egress program for processes on the gateway host itself.
    pub const CGROUP_EGRESS: &str = "smtpgate_cgroup";
    /// cgroup/connect4 and connect6: with `action = "reject"`, refuse a
    /// local process's connect() at once instead of letting it time out.
    pub const CGROUP_CONNECT4: &str = "smtpgate_connect4";
    pub const CGROUP_CONNECT6: &str = "smtpgate_connect6";
    /// A classifier that returns "pass" and does nothing else: the baseline
    /// the datapath benchmark compares against. The agent never attaches it.
    pub const TC_BASELINE: &str = "smtpgate_baseline";
    /// Every program in the object; a test holds the built object to it.
    pub const ALL: &[&str] = &[
        TC_INGRESS,
        TC_EGRESS,
        TC_INGRESS_L3,
        TC_EGRESS_L3,
        CGROUP_EGRESS,
        CGROUP_CONNECT4,
        CGROUP_CONNECT6,
        TC_BASELINE,
    ];
}

/// Map names, as the ELF symbols the agent looks up (and the pin file names).
pub mod maps {
    pub const CONFIG: &str = "SMTPGATE_CONFIG";
    pub const PORTS: &str = "SMTPGATE_PORTS";
    pub const ALLOW_NODES: &str = "SMTPGATE_ALLOW_NODES";
    pub const COUNTERS: &str = "SMTPGATE_COUNTERS";
    /// SOCKMAP of the relay's intercept listeners: IPv4 at [`RELAY_V4`],
    /// IPv6 at [`RELAY_V6`].
    pub const RELAY: &str = "SMTPGATE_RELAY";
    /// LRU hash: denied sources, for `smtpgate top`.
    pub const TOP: &str = "SMTPGATE_TOP";
    /// Ring buffer of denied connection attempts, for the log.
    pub const EVENTS: &str = "SMTPGATE_EVENTS";
    /// Per-CPU budget of events per second (see `events::EVENT_BUDGET`).
    pub const EVENT_BUDGET: &str = "SMTPGATE_EVENT_BUDGET";
    /// LPM trie of destination exceptions (see [`crate::exceptions`]).
    pub const EXCEPTIONS: &str = "SMTPGATE_EXCEPTIONS";
    /// Every map in the object; a test holds the built object to it.
    pub const ALL: &[&str] = &[
        CONFIG,
        PORTS,
        ALLOW_NODES,
        COUNTERS,
        RELAY,
        TOP,
        EVENTS,
        EVENT_BUDGET,
        EXCEPTIONS,
    ];
}

/// What happens to SMTP egress from a source that is not allowlisted.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Drop silently: the client retries until it times out.
    Drop = 0,
    /// Answer with a TCP RST (TC) or EPERM (cgroup) so the client fails fast.
    Reject = 1,
    /// Steer the connection into the embedded relay's intercept listener
    /// (bpf_sk_assign at TC ingress; a rewritten connect() at cgroup).
    Redirect = 2,
}

/// Whether denials are enforced or only counted.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Enforce = 0,
    /// Count what would be denied under [`Verdict::Audited`] and let it through.
    Audit = 1,
}

/// The one entry of the [`maps::CONFIG`] array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Which half of [`maps::ALLOW_NODES`] holds the live allowlist (0 or 1).
    /// Userspace builds a new table in the other half and flips this word, so
    /// a packet sees the old table or the new one, never a mix.
    pub active_table: u32,
    /// Number of nodes in each half of [`maps::ALLOW_NODES`].
    pub nodes_per_table: u32,
    /// An [`Action`] as `u32`.
    pub action: u32,
    /// A [`Mode`] as `u32`.
    pub mode: u32,
    /// Whether any of this host's own addresses is allowlisted, per family
    /// ([`LOCAL_V4_ALLOWED`], [`LOCAL_V6_ALLOWED`]). The cgroup connect
    /// hooks use it to refuse connect() at once for unbound sockets, whose
    /// source address is not chosen yet.
    pub local_allowed: u32,
    /// The relay's intercept port, for the cgroup connect hooks' redirect
    /// (0: no relay, redirects fail closed).
    pub relay_port: u32,
    /// The [`Action`] for SMTP ports other than
    /// [`verdict::REDIRECT_PORT`]: the same as `action`, except under
    /// redirect, which only port 25 can take.
    pub other_action: u32,
    /// Entries in [`maps::EXCEPTIONS`]; 0 spares denied packets the lookup.
    pub exceptions: u32,
    /// The agent's cgroup id (cgroup v2 inode number), 0 without a relay.
    /// A socket is the relay's own only if it carries [`RELAY_MARK`] *and*
    /// belongs to this cgroup (see [`verdict::Standing::Relay`]).
    pub relay_cgroup: u64,
}

impl Config {
    /// Everything zero: no relay, drop, enforce, table 0 of 0 nodes.
    pub const ZERO: Self = Self {
        active_table: 0,
        nodes_per_table: 0,
        action: 0,
        mode: 0,
        local_allowed: 0,
        relay_port: 0,
        other_action: 0,
        exceptions: 0,
        relay_cgroup: 0,
    };
}

/// The mark on packets steered into the relay, which policy routing
/// (`ip rule add fwmark` .. `lookup` [`REDIRECT_TABLE`]) delivers locally.
pub const REDIRECT_MARK: u32 = 0x0534_7001;
/// The routing table with `local 0.0.0.0/0 dev lo` (and `::/0`).
pub const REDIRECT_TABLE: u32 = 25_225;

/// SO_MARK on the embedded relay's delivery sockets, which (with the
/// agent's cgroup) lets them out on port 25 where every other process of
/// the host is stopped.
///
/// Why a mark: setting SO_MARK needs CAP_NET_ADMIN (or, since Linux 5.17,
/// CAP_NET_RAW) in the socket's network
/// namespace, so no unprivileged process can forge it, and the kernel copies
/// it to every packet of the socket, where the cgroup and TC programs read
/// it for the price of one load. A container granted CAP_NET_ADMIN in a
/// namespace of its own could set it too, which is why the programs also
/// require the agent's own cgroup ([`Config::relay_cgroup`]). Distinct from
/// [`REDIRECT_MARK`], so the redirect routing rule never matches it.
pub const RELAY_MARK: u32 = 0x0534_7002;

/// Index of the IPv4 intercept listener in [`maps::RELAY`]; IPv6 is at 1.
pub const RELAY_V4: u32 = 0;
pub const RELAY_V6: u32 = 1;

pub const LOCAL_V4_ALLOWED: u32 = 1;
pub const LOCAL_V6_ALLOWED: u32 = 2;

const _: () = assert!(core::mem::size_of::<Config>() == 40);

#[cfg(feature = "user")]
// SAFETY: `Config` is `repr(C)`, has no padding and only integer fields.
unsafe impl aya::Pod for Config {}

/// Entries in [`maps::PORTS`]: a bitmap of the 65536 TCP destination ports,
/// one bit per port, 64 ports per `u64` word. A bitmap makes "is this port
/// SMTP?" one array read, which is what keeps non-SMTP traffic as cheap as
/// a program that does nothing.
pub const PORT_WORDS: u32 = 65536 / 64;

/// Maximum number of VLAN tags (802.1Q / 802.1ad) the parser walks, counting
/// a tag the kernel has already moved into skb metadata. Deeper stacks are
/// dropped under [`Reason::VlanTooDeep`].
pub const MAX_VLAN_DEPTH: u32 = 4;

/// Maximum number of IPv6 extension headers the parser walks. Longer chains
/// are dropped under [`Reason::HeaderChainTooLong`]. Real traffic uses a few
/// at most.
pub const MAX_IPV6_EXT_HEADERS: u32 = 8;
