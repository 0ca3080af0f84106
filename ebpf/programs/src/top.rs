//! Remembers who was denied (for `smtpgate top`) and tells the agent (for
//! the log): at most once a second per source, and at most
//! [`EVENT_BUDGET`] times a second per CPU whatever the number of sources.
//!
//! Every program that denies a connection attempt ends up here, the TC
//! programs for forwarded traffic and the cgroup programs for the host's
//! own processes, so `top` sees whatever the counters count as denied.

use aya_ebpf::{
    helpers::generated::bpf_ktime_get_ns,
    macros::map,
    maps::{LruHashMap, PerCpuArray, RingBuf},
};
use smtpgate_common::{
    Verdict,
    events::{Budget, EVENT_BUDGET, EVENT_INTERVAL_NS, Event, SourceKey, SourceStats, TOP_ENTRIES},
};

#[map(name = "SMTPGATE_TOP")]
static SMTPGATE_TOP: LruHashMap<SourceKey, SourceStats> =
    LruHashMap::with_max_entries(TOP_ENTRIES, 0);

#[map(name = "SMTPGATE_EVENTS")]
static SMTPGATE_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

#[map(name = "SMTPGATE_EVENT_BUDGET")]
static SMTPGATE_EVENT_BUDGET: PerCpuArray<Budget> = PerCpuArray::with_max_entries(1, 0);

/// The process behind an attempt, where the hook can see it.
pub struct Who {
    pub pid: u32,
    pub comm: [u8; 16],
}

impl Who {
    pub const NOBODY: Who = Who {
        pid: 0,
        comm: [0; 16],
    };
}

/// A denied connection attempt by `key`. `fill` completes the event (ports,
/// destination) only if one goes out; it returns false if it cannot.
#[inline(always)]
pub fn denied(key: &SourceKey, verdict: Verdict, who: &Who, fill: impl FnOnce(&mut Event) -> bool) {
    // CLOCK_MONOTONIC. The coarse clock would do for "last seen" and a
    // one-second rate limit and is a little cheaper, but its helper needs
    // Linux 5.11, and this program runs on 5.10 too.
    // SAFETY: a plain helper.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut emit = false;
    let mut suppressed = 0;
    match SMTPGATE_TOP.get_ptr_mut(key) {
        Some(s) => {
            // SAFETY: a value in the map. Two CPUs may update the same source
            // at once; a lost increment in a ranking is harmless.
            unsafe {
                (*s).attempts += 1;
                (*s).last_seen_ns = now;
                (*s).verdict = verdict as u32;
                (*s).pid = who.pid;
                (*s).comm = who.comm;
                if now.wrapping_sub((*s).last_event_ns) >= EVENT_INTERVAL_NS && budget(now) {
                    emit = true;
                    suppressed = (*s).suppressed;
                    (*s).suppressed = 0;
                    (*s).last_event_ns = now;
                } else {
                    (*s).suppressed += 1;
                }
            }
        }
        None => {
            emit = budget(now);
            let stats = SourceStats {
                attempts: 1,
                last_seen_ns: now,
                // Not logged: as if its last event were long ago, so that
                // the next attempt is (and says how many were left out).
                last_event_ns: if emit { now } else { 0 },
                suppressed: u64::from(!emit),
                verdict: verdict as u32,
                pid: who.pid,
                comm: who.comm,
            };
            let _ = SMTPGATE_TOP.insert(key, &stats, 0);
        }
    }
    if !emit {
        return;
    }
    // A full ring (the agent is down) loses the event, never the verdict.
    let Some(mut entry) = SMTPGATE_EVENTS.reserve::<Event>(0) else {
        return;
    };
    let e = Event {
        cgroup: key.cgroup,
        suppressed,
        family: key.family,
        verdict: verdict as u32,
        reason: smtpgate_common::Reason::NotAllowlisted as u32,
        pid: who.pid,
        sport: 0,
        dport: 0,
        _pad: 0,
        src: key.addr,
        dst: [0; 16],
        comm: who.comm,
    };
    let slot = entry.write(e);
    if fill(slot) {
        entry.submit(0);
    } else {
        entry.discard(0);
    }
}

/// Takes one event from this CPU's budget for the current second.
#[inline(always)]
fn budget(now: u64) -> bool {
    let Some(b) = SMTPGATE_EVENT_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot; programs are not preempted while they run.
    unsafe {
        if now.wrapping_sub((*b).window_ns) >= 1_000_000_000 {
            (*b).window_ns = now;
            (*b).sent = 0;
        }
        if (*b).sent >= EVENT_BUDGET {
            (*b).unlogged = (*b).unlogged.saturating_add(1);
            return false;
        }
        (*b).sent += 1;
    }
    true
}
