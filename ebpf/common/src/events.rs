//! Who is trying to send: the per-source table behind `smtpgate top`, and
//! the events behind the "denied SMTP egress" log lines.

/// Key of [`crate::maps::TOP`]: a source address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SourceKey {
    /// A [`crate::Family`] as `u32`.
    pub family: u32,
    /// IPv4 in the first 4 bytes, the rest zero; or IPv6.
    pub addr: [u8; 16],
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
    pub _pad: u32,
}

/// One denied connection attempt, on [`crate::maps::EVENTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub family: u32,
    pub verdict: u32,
    pub reason: u32,
    pub sport: u16,
    pub dport: u16,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Attempts from this source since its previous event, not reported
    /// one by one (rate limit).
    pub suppressed: u64,
}

/// At most one event per source per this many nanoseconds: a spamming host
/// cannot flood the log (nor the ring buffer).
pub const EVENT_INTERVAL_NS: u64 = 1_000_000_000;
/// Sources `smtpgate top` remembers; the least recently seen go first.
pub const TOP_ENTRIES: u32 = 4096;

const _: () = assert!(core::mem::size_of::<SourceKey>() == 20);
const _: () = assert!(core::mem::size_of::<SourceStats>() == 40);
const _: () = assert!(core::mem::size_of::<Event>() == 56);

#[cfg(feature = "user")]
// SAFETY: repr(C), integers and byte arrays, no padding (sizes asserted).
unsafe impl aya::Pod for SourceKey {}
#[cfg(feature = "user")]
// SAFETY: as above; `_pad` makes the padding explicit.
unsafe impl aya::Pod for SourceStats {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for Event {}
