//! Who is trying to send: the per-source table behind `smtpgate top`, and
//! the events behind the "denied SMTP egress" log lines.

/// Key of [`crate::maps::TOP`]: who tried. For traffic a gateway forwards
/// (the TC programs) that is a source address. For the gateway's own
/// processes (the cgroup programs) the address alone would lump every
/// process of the host together, so their cgroup is part of the key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SourceKey {
    /// The cgroup id (cgroup v2 inode number) of a local process; 0 for
    /// forwarded traffic.
    pub cgroup: u64,
    /// IPv4 in the first 4 bytes, the rest zero; or IPv6. All zero for a
    /// local socket whose source address was not chosen yet.
    pub addr: [u8; 16],
    /// A [`crate::Family`] as `u32`.
    pub family: u32,
    pub _pad: u32,
}

/// Value of [`crate::maps::TOP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceStats {
    /// Denied connection attempts (SYNs).
    pub attempts: u64,
    /// bpf_ktime_get_ns (CLOCK_MONOTONIC) of the last one.
    pub last_seen_ns: u64,
    /// When the last event for this source went out.
    pub last_event_ns: u64,
    /// Attempts since then that got no event of their own.
    pub suppressed: u64,
    /// The last verdict, a [`crate::Verdict`] as `u32`.
    pub verdict: u32,
    /// The process (thread group id) behind the last attempt, where the hook
    /// runs in its context (cgroup connect); 0 where it cannot know.
    pub pid: u32,
    /// Its command name (NUL-padded), where `pid` is known.
    pub comm: [u8; 16],
}

/// One denied connection attempt, on [`crate::maps::EVENTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// As in [`SourceKey::cgroup`].
    pub cgroup: u64,
    /// Attempts from this source since its previous event, not reported
    /// one by one (rate limit).
    pub suppressed: u64,
    pub family: u32,
    pub verdict: u32,
    pub reason: u32,
    /// As in [`SourceStats::pid`].
    pub pid: u32,
    pub sport: u16,
    pub dport: u16,
    pub _pad: u32,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub comm: [u8; 16],
}

/// Value of [`crate::maps::EVENT_BUDGET`], per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Budget {
    /// Start of the current one-second window.
    pub window_ns: u64,
    /// Events sent in it.
    pub sent: u32,
    /// Events left out in all (the agent reports the growth).
    pub unlogged: u32,
}

/// At most one event per source per this many nanoseconds: a spamming host
/// cannot flood the log (nor the ring buffer).
pub const EVENT_INTERVAL_NS: u64 = 1_000_000_000;
/// Sources `smtpgate top` remembers; the least recently seen go first.
pub const TOP_ENTRIES: u32 = 4096;
/// Events each CPU may send per second, whatever the number of sources.
///
/// The per-source limit alone does not bound the total: a flood of SYNs
/// from 50 000 spoofed sources made the agent log 80 % of them (issue 15).
/// What is left out is counted ([`Budget::unlogged`]), and `top` and the
/// counters still see every attempt.
pub const EVENT_BUDGET: u32 = 50;

const _: () = assert!(core::mem::size_of::<SourceKey>() == 32);
const _: () = assert!(core::mem::size_of::<SourceStats>() == 56);
const _: () = assert!(core::mem::size_of::<Event>() == 88);
const _: () = assert!(core::mem::size_of::<Budget>() == 16);

#[cfg(feature = "user")]
// SAFETY: repr(C), integers and byte arrays, no padding (sizes asserted).
unsafe impl aya::Pod for SourceKey {}
#[cfg(feature = "user")]
// SAFETY: as above; `_pad` makes the padding explicit.
unsafe impl aya::Pod for SourceStats {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for Event {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for Budget {}
