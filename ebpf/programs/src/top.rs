//! Remembers who was denied (for `smtpgate top`) and tells the agent, at
//! most once a second per source (for the log).

use aya_ebpf::{
    helpers::generated::bpf_ktime_get_ns,
    macros::map,
    maps::{LruHashMap, RingBuf},
    programs::TcContext,
};
use smtpgate_common::{
    Verdict,
    events::{EVENT_INTERVAL_NS, Event, SourceKey, SourceStats, TOP_ENTRIES},
    parse::{Bytes, MAX_HEADER_BYTES, Smtp, Source},
};

use crate::reject::unstash_offsets;

#[map(name = "SMTPGATE_TOP")]
static SMTPGATE_TOP: LruHashMap<SourceKey, SourceStats> =
    LruHashMap::with_max_entries(TOP_ENTRIES, 0);

#[map(name = "SMTPGATE_EVENTS")]
static SMTPGATE_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// A denied connection attempt (a SYN) from `smtp.source`.
#[inline(always)]
pub fn denied(ctx: &TcContext, smtp: &Smtp, verdict: Verdict) {
    let mut key = SourceKey {
        family: smtp.family() as u32,
        addr: [0; 16],
    };
    match smtp.source {
        Source::V4(a) => key.addr[..4].copy_from_slice(&a),
        Source::V6(a) => key.addr = a,
    }
    // CLOCK_MONOTONIC. The coarse clock would do for "last seen" and a
    // one-second rate limit and is a little cheaper, but its helper needs
    // Linux 5.11, and this program runs on 5.10 too.
    // SAFETY: a plain helper.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut emit = false;
    let mut suppressed = 0;
    match SMTPGATE_TOP.get_ptr_mut(&key) {
        Some(s) => {
            // SAFETY: a value in the map. Two CPUs may update the same source
            // at once; a lost increment in a ranking is harmless.
            unsafe {
                (*s).attempts += 1;
                (*s).last_seen_ns = now;
                (*s).verdict = verdict as u32;
                if now.wrapping_sub((*s).last_event_ns) >= EVENT_INTERVAL_NS {
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
            let stats = SourceStats {
                attempts: 1,
                last_seen_ns: now,
                last_event_ns: now,
                suppressed: 0,
                verdict: verdict as u32,
                _pad: 0,
            };
            let _ = SMTPGATE_TOP.insert(&key, &stats, 0);
            emit = true;
        }
    }
    if emit {
        event(ctx, smtp, key, verdict, suppressed);
    }
}

#[inline(always)]
fn event(ctx: &TcContext, smtp: &Smtp, key: SourceKey, verdict: Verdict, suppressed: u64) {
    let (l3, l4, _) = unstash_offsets(ctx);
    if l3 > MAX_HEADER_BYTES || l4 > MAX_HEADER_BYTES {
        return;
    }
    let pkt = Bytes {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let Some(tcp) = pkt.at::<4>(l4) else { return };
    let mut e = Event {
        family: key.family,
        verdict: verdict as u32,
        reason: smtpgate_common::Reason::NotAllowlisted as u32,
        sport: u16::from_be_bytes([tcp[0], tcp[1]]),
        dport: u16::from_be_bytes([tcp[2], tcp[3]]),
        src: key.addr,
        dst: [0; 16],
        suppressed,
    };
    match smtp.source {
        Source::V4(_) => {
            let Some(ip) = pkt.at::<20>(l3) else { return };
            e.dst[..4].copy_from_slice(&ip[16..20]);
        }
        Source::V6(_) => {
            let Some(ip) = pkt.at::<40>(l3) else { return };
            e.dst.copy_from_slice(&ip[24..40]);
        }
    }
    // A full ring (the agent is down) loses the event, never the verdict.
    let _ = SMTPGATE_EVENTS.output::<Event>(&e, 0);
}
