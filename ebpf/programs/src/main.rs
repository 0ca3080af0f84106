//! smtpgate's eBPF programs.
//!
//! - `smtpgate_tc_ingress` / `smtpgate_tc_egress`: TC classifiers for an
//!   interface's ingress (the client-facing side, before NAT) or egress.
//! - `smtpgate_cgroup`: cgroup/skb egress, for processes on the gateway host.
//! - `smtpgate_baseline`: passes everything; the benchmark's yardstick.
//!
//! Each program is a thin wrapper that returns what its verdict function
//! decided: the verdict is never computed and then thrown away.
#![no_std]
#![no_main]

mod reject;

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::{cgroup_skb, classifier, map},
    maps::{Array, PerCpuArray},
    programs::{SkBuffContext, TcContext},
};
use smtpgate_common::{
    Action, Config, Counter, Family, Mode, PORT_WORDS, Reason, Verdict,
    counters::{self, SLOTS},
    parse::{self, Bytes, Parsed, Smtp, Source},
    table::{self, Node},
};

/// Runtime settings, written by the agent. Entry 0 only.
#[map(name = "SMTPGATE_CONFIG")]
static SMTPGATE_CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Bitmap of the TCP destination ports that count as SMTP.
#[map(name = "SMTPGATE_PORTS")]
static SMTPGATE_PORTS: Array<u64> = Array::with_max_entries(PORT_WORDS, 0);

/// Two allowlist tables (see `smtpgate_common::table`). Mmapable so that the
/// agent writes a whole table with memcpy instead of one syscall per node.
/// The agent sets the real size at load time.
#[map(name = "SMTPGATE_ALLOW_NODES")]
static SMTPGATE_ALLOW_NODES: Array<Node> = Array::with_max_entries(2 * 1024, BPF_F_MMAPABLE);

#[map(name = "SMTPGATE_COUNTERS")]
static SMTPGATE_COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(SLOTS, 0);

/// What to do with a packet, before it is turned into a return code.
enum Decision {
    Untouched,
    Pass,
    Drop,
    Reject(Smtp),
}

#[inline(always)]
fn is_smtp_port(port: u16) -> bool {
    match SMTPGATE_PORTS.get(u32::from(port) / 64) {
        Some(word) => word & (1u64 << (port % 64)) != 0,
        None => false,
    }
}

#[inline(always)]
fn count(family: Family, verdict: Verdict, reason: Reason, syn: bool) {
    if let Some(c) = SMTPGATE_COUNTERS.get_ptr_mut(counters::index(family, verdict, reason)) {
        // SAFETY: per-CPU slot, and BPF programs are not preempted on a CPU
        // while they run, so nothing else writes it concurrently.
        unsafe {
            (*c).packets += 1;
            (*c).connections += u64::from(syn);
        }
    }
}

#[inline(always)]
fn allowlisted(source: &Source, cfg: &Config) -> bool {
    let base = (cfg.active_table & 1) * cfg.nodes_per_table;
    let node = |i: u32| SMTPGATE_ALLOW_NODES.get(i);
    match source {
        Source::V4(a) => table::lookup(a, base, node),
        Source::V6(a) => table::lookup(a, base, node),
    }
}

/// The verdict for a parsed packet.
#[inline(always)]
fn decide(parsed: Parsed) -> Decision {
    // Without a config the agent has not finished loading: fail closed for
    // SMTP, and leave everything else alone.
    let cfg = SMTPGATE_CONFIG.get(0);
    let audit = matches!(cfg, Some(c) if c.mode == Mode::Audit as u32);
    match parsed {
        Parsed::Other => Decision::Untouched,
        Parsed::Pass(family, reason) => {
            count(family, Verdict::Passed, reason, false);
            Decision::Pass
        }
        Parsed::Deny(family, reason) => deny(family, reason, audit),
        // Headers cut short in a packet that has no more: nothing honest.
        Parsed::Truncated(family) => deny(family, Reason::Malformed, audit),
        Parsed::Smtp(smtp) => {
            let syn = smtp.is_syn();
            let family = smtp.family();
            let Some(cfg) = cfg else {
                count(family, Verdict::Dropped, Reason::NotAllowlisted, syn);
                return Decision::Drop;
            };
            if allowlisted(&smtp.source, cfg) {
                count(family, Verdict::Allowed, Reason::Allowlisted, syn);
                return Decision::Pass;
            }
            if audit {
                count(family, Verdict::Audited, Reason::NotAllowlisted, syn);
                return Decision::Pass;
            }
            if cfg.action == Action::Reject as u32 {
                count(family, Verdict::Rejected, Reason::NotAllowlisted, syn);
                Decision::Reject(smtp)
            } else {
                count(family, Verdict::Dropped, Reason::NotAllowlisted, syn);
                Decision::Drop
            }
        }
    }
}

/// A denial that does not depend on the allowlist (evasion, malformed).
/// These are dropped, never answered: a RST would tell a prober what we saw.
#[inline(always)]
fn deny(family: Family, reason: Reason, audit: bool) -> Decision {
    if audit {
        count(family, Verdict::Audited, reason, false);
        Decision::Pass
    } else {
        count(family, Verdict::Dropped, reason, false);
        Decision::Drop
    }
}

#[inline(always)]
fn tc_bytes(ctx: &TcContext) -> Bytes {
    Bytes {
        start: ctx.data(),
        end: ctx.data_end(),
    }
}

/// Parses a TC packet, pulling non-linear data in once if the headers are
/// not all in the linear area.
#[inline(always)]
fn tc_parse(ctx: &TcContext) -> Parsed {
    // SAFETY: the context pointer is valid for the program's duration.
    let tag_in_meta = unsafe { (*ctx.skb.skb).vlan_present } != 0;
    let parsed = parse::ethernet(&tc_bytes(ctx), tag_in_meta, &is_smtp_port);
    if let Parsed::Truncated(_) = parsed {
        let linear = (ctx.data_end() - ctx.data()) as u32;
        if ctx.len() > linear {
            // Anything whose headers do not fit stays truncated, and dropped.
            let max = parse::MAX_HEADER_BYTES as u32;
            let want = if ctx.len() < max { ctx.len() } else { max };
            if ctx.pull_data(want).is_ok() {
                return parse::ethernet(&tc_bytes(ctx), tag_in_meta, &is_smtp_port);
            }
        }
    }
    parsed
}

#[inline(always)]
fn tc_verdict<const INGRESS: bool>(ctx: &TcContext) -> i32 {
    let parsed = match tc_parse(ctx) {
        Parsed::Smtp(smtp) => Parsed::Smtp(reject::stash_offsets(ctx, smtp)),
        other => other,
    };
    match decide(parsed) {
        Decision::Untouched | Decision::Pass => TC_ACT_UNSPEC,
        Decision::Drop => TC_ACT_SHOT as i32,
        Decision::Reject(smtp) => reject::answer::<INGRESS>(ctx, &smtp),
    }
}

/// Attach to the client-facing interface's ingress: sees clients' own
/// addresses, before any NAT.
#[classifier]
pub fn smtpgate_tc_ingress(ctx: TcContext) -> i32 {
    tc_verdict::<true>(&ctx)
}

/// Attach to an interface's egress, on routed gateways without NAT.
#[classifier]
pub fn smtpgate_tc_egress(ctx: TcContext) -> i32 {
    tc_verdict::<false>(&ctx)
}

/// cgroup/skb egress return codes: bit 0 allows; bit 1 asks for congestion
/// notification, which makes TCP treat a drop as a transient loss.
const CGROUP_ALLOW: i32 = 1;
/// Denied: the stack sees EPERM for this packet.
const CGROUP_DENY: i32 = 0;
/// Denied quietly: TCP retransmits until it gives up, like a drop on the wire.
const CGROUP_DROP_QUIET: i32 = 2;

#[cgroup_skb(egress)]
pub fn smtpgate_cgroup(ctx: SkBuffContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's duration.
    let (start, end, proto) = unsafe {
        let skb = &*ctx.skb.skb;
        (
            skb.data as usize,
            skb.data_end as usize,
            u16::from_be(skb.protocol as u16),
        )
    };
    let parsed = parse::network(&Bytes { start, end }, proto, &is_smtp_port);
    match decide(parsed) {
        Decision::Untouched | Decision::Pass => CGROUP_ALLOW,
        Decision::Drop => CGROUP_DROP_QUIET,
        Decision::Reject(_) => CGROUP_DENY,
    }
}

#[classifier]
pub fn smtpgate_baseline(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
