//! smtpgate's eBPF programs.
//!
//! - `smtpgate_tc_ingress` / `smtpgate_tc_egress`: TC classifiers for an
//!   Ethernet interface's ingress (the client-facing side, before NAT) or
//!   egress.
//! - `smtpgate_tc_ingress_l3` / `smtpgate_tc_egress_l3`: the same for devices
//!   without a link-layer header (tun, WireGuard, PPP, ipip, sit), whose
//!   packets start with the IP header.
//! - `smtpgate_cgroup`: cgroup/skb egress, for processes on the gateway host.
//! - `smtpgate_baseline`: passes everything; the benchmark's yardstick.
//!
//! Each program is a thin wrapper that returns what its verdict function
//! decided: the verdict is never computed and then thrown away.
#![no_std]
#![no_main]

mod redirect;
mod reject;
mod top;

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_RDONLY_PROG, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::generated::bpf_map_lookup_elem,
    macros::{cgroup_skb, cgroup_sock_addr, classifier, map},
    maps::{Array, PerCpuArray},
    programs::{SkBuffContext, SockAddrContext, TcContext},
};
use smtpgate_common::{
    Action, Config, Counter, Family, LOCAL_V4_ALLOWED, LOCAL_V6_ALLOWED, Mode, PORT_WORDS, Reason,
    Verdict,
    counters::{self, SLOTS},
    parse::{self, Bytes, Parsed, Quick, Smtp, Source},
    table::{self, Node},
};

// The settings maps are read-only for the programs (BPF_F_RDONLY_PROG): only
// the agent writes them, and the verifier refuses a program that would.

/// Runtime settings, written by the agent. Entry 0 only.
#[map(name = "SMTPGATE_CONFIG")]
static SMTPGATE_CONFIG: Array<Config> = Array::with_max_entries(1, BPF_F_RDONLY_PROG);

/// Bitmap of the TCP destination ports that count as SMTP.
#[map(name = "SMTPGATE_PORTS")]
static SMTPGATE_PORTS: Array<u64> = Array::with_max_entries(PORT_WORDS, BPF_F_RDONLY_PROG);

/// Two allowlist tables (see `smtpgate_common::table`). Mmapable so that the
/// agent writes a whole table with memcpy instead of one syscall per node.
/// The agent sets the real size at load time.
///
/// Not BPF_F_RDONLY_PROG like the other policy maps: this kernel refuses a
/// writable mmap of such a map (EACCES), and the agent writes the table
/// through one.
#[map(name = "SMTPGATE_ALLOW_NODES")]
static SMTPGATE_ALLOW_NODES: Array<Node> = Array::with_max_entries(2 * 1024, BPF_F_MMAPABLE);

#[map(name = "SMTPGATE_COUNTERS")]
static SMTPGATE_COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(SLOTS, 0);

/// What to do with a packet, before it is turned into a return code.
enum Decision {
    Untouched,
    Pass,
    /// Would have been denied; passes because `mode = "audit"`.
    Audited,
    Drop,
    Reject(Smtp),
    /// Counted by whoever carries it out: it may still fail (no relay).
    Redirect(Smtp),
}

#[inline(always)]
fn is_smtp_port(port: u16) -> bool {
    match SMTPGATE_PORTS.get(u32::from(port) / 64) {
        Some(word) => word & (1u64 << (port % 64)) != 0,
        None => false,
    }
}

#[inline(always)]
pub(crate) fn count(family: Family, verdict: Verdict, reason: Reason, syn: bool) {
    if let Some(c) = SMTPGATE_COUNTERS.get_ptr_mut(counters::index(family, verdict, reason)) {
        // SAFETY: per-CPU slot, and BPF programs are not preempted on a CPU
        // while they run, so nothing else writes it concurrently.
        unsafe {
            (*c).packets += 1;
            (*c).connections += u64::from(syn);
        }
    }
}

/// A connection attempt refused before any packet existed.
#[inline(always)]
fn count_attempt(family: Family, verdict: Verdict, reason: Reason) {
    if let Some(c) = SMTPGATE_COUNTERS.get_ptr_mut(counters::index(family, verdict, reason)) {
        // SAFETY: as in `count`.
        unsafe { (*c).connections += 1 };
    }
}

#[inline(always)]
fn allowlisted(source: &Source, cfg: &Config) -> bool {
    let base = (cfg.active_table & 1) * cfg.nodes_per_table;
    // `Array::get` takes the index by value and so copies it to the stack;
    // the helper takes any pointer the verifier can check, a table cell
    // included (see `table::lookup_by_ref`).
    let map = (&raw const SMTPGATE_ALLOW_NODES).cast_mut().cast();
    let node = |i: &u32| {
        // SAFETY: an array map lookup with a 4-byte key, which returns a
        // pointer to a whole node or null.
        unsafe {
            bpf_map_lookup_elem(map, (&raw const *i).cast())
                .cast::<Node>()
                .as_ref()
        }
    };
    match source {
        Source::V4(a) => table::lookup_by_ref(a, base, node),
        Source::V6(a) => table::lookup_by_ref(a, base, node),
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
                return Decision::Audited;
            }
            if cfg.action == Action::Reject as u32 {
                count(family, Verdict::Rejected, Reason::NotAllowlisted, syn);
                Decision::Reject(smtp)
            } else if cfg.action == Action::Redirect as u32 {
                Decision::Redirect(smtp)
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

/// `decide` for SMTP that `parse::quick` vouched for, down to the same
/// counters, for every outcome but a reject: that needs the header offsets,
/// and `None` sends it to the full parser (and the table is read twice,
/// for a packet that is about to be answered with a RST anyway).
#[inline(always)]
fn quick_verdict(source: &Source, flags: u8) -> Option<i32> {
    // No config: the full path fails closed.
    let cfg = SMTPGATE_CONFIG.get(0)?;
    let syn = flags & (parse::TCP_SYN | parse::TCP_ACK) == parse::TCP_SYN;
    let family = match source {
        Source::V4(_) => Family::Ipv4,
        Source::V6(_) => Family::Ipv6,
    };
    if allowlisted(source, cfg) {
        count(family, Verdict::Allowed, Reason::Allowlisted, syn);
        Some(TC_ACT_UNSPEC)
    } else if syn {
        // A denied connection attempt: the full path records who and where
        // (`smtpgate top`, the log).
        None
    } else if cfg.mode == Mode::Audit as u32 {
        count(family, Verdict::Audited, Reason::NotAllowlisted, syn);
        Some(TC_ACT_UNSPEC)
    } else if cfg.action == Action::Reject as u32 || cfg.action == Action::Redirect as u32 {
        None
    } else {
        count(family, Verdict::Dropped, Reason::NotAllowlisted, syn);
        Some(TC_ACT_SHOT as i32)
    }
}

#[inline(always)]
fn tc_bytes(ctx: &TcContext) -> Bytes {
    Bytes {
        start: ctx.data(),
        end: ctx.data_end(),
    }
}

/// skb->protocol, in host order: on a device without a link-layer header,
/// the only word on what the packet is besides the packet itself.
#[inline(always)]
fn skb_protocol(ctx: &TcContext) -> u16 {
    // SAFETY: the context pointer is valid for the program's duration.
    u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16)
}

/// The full parser, from an Ethernet header or (`ETHERNET = false`) from the
/// IP header at offset 0.
#[inline(always)]
fn parse_headers<const ETHERNET: bool>(ctx: &TcContext) -> Parsed {
    if ETHERNET {
        // SAFETY: the context pointer is valid for the program's duration.
        let tag_in_meta = unsafe { (*ctx.skb.skb).vlan_present } != 0;
        parse::ethernet(&tc_bytes(ctx), tag_in_meta, &is_smtp_port)
    } else {
        parse::l3(&tc_bytes(ctx), skb_protocol(ctx), &is_smtp_port)
    }
}

/// Parses a TC packet, pulling non-linear data in once if the headers are
/// not all in the linear area.
#[inline(always)]
fn tc_parse<const ETHERNET: bool>(ctx: &TcContext) -> Parsed {
    let parsed = parse_headers::<ETHERNET>(ctx);
    if let Parsed::Truncated(_) = parsed {
        let linear = (ctx.data_end() - ctx.data()) as u32;
        if ctx.len() > linear {
            // Anything whose headers do not fit stays truncated, and dropped.
            let max = parse::MAX_HEADER_BYTES as u32;
            let want = if ctx.len() < max { ctx.len() } else { max };
            if ctx.pull_data(want).is_ok() {
                return parse_headers::<ETHERNET>(ctx);
            }
        }
    }
    parsed
}

/// The verdict for one packet at a TC hook: `INGRESS` for the direction
/// (where a RST goes, whether steering is possible), `ETHERNET` for whether
/// the packet starts with an Ethernet header or with the IP header.
#[inline(always)]
fn tc_verdict<const INGRESS: bool, const ETHERNET: bool>(ctx: &TcContext) -> i32 {
    // Nearly all traffic is plain: judge it without the full parser (see
    // `parse::quick`).
    let quick = if ETHERNET {
        parse::quick(&tc_bytes(ctx), &is_smtp_port)
    } else {
        parse::quick_l3(&tc_bytes(ctx), skb_protocol(ctx), &is_smtp_port)
    };
    match quick {
        Quick::Other => return TC_ACT_UNSPEC,
        Quick::Smtp(source, flags) => {
            if let Some(verdict) = quick_verdict(&source, flags) {
                return verdict;
            }
        }
        Quick::Unsure => {}
    }
    let parsed = match tc_parse::<ETHERNET>(ctx) {
        Parsed::Smtp(smtp) => Parsed::Smtp(reject::stash_offsets(ctx, smtp)),
        other => other,
    };
    let smtp = match &parsed {
        Parsed::Smtp(s) if s.is_syn() => Some(*s),
        _ => None,
    };
    let decision = decide(parsed);
    if let Some(smtp) = smtp {
        let verdict = match &decision {
            Decision::Reject(_) => Some(Verdict::Rejected),
            Decision::Redirect(_) => Some(Verdict::Redirected),
            Decision::Drop => Some(Verdict::Dropped),
            // Audit lets denied attempts through: still worth knowing.
            Decision::Audited => Some(Verdict::Audited),
            _ => None,
        };
        if let Some(v) = verdict {
            top::denied(ctx, &smtp, v);
        }
    }
    match decision {
        Decision::Untouched | Decision::Pass | Decision::Audited => TC_ACT_UNSPEC,
        Decision::Drop => TC_ACT_SHOT as i32,
        Decision::Reject(smtp) => reject::answer::<INGRESS, ETHERNET>(ctx, &smtp),
        // Steering works only where the packet is received: at egress the
        // config refuses redirect, and a packet that gets here anyway is
        // dropped, never let out.
        Decision::Redirect(smtp) if INGRESS => redirect::steer(ctx, &smtp),
        Decision::Redirect(smtp) => {
            count(
                smtp.family(),
                Verdict::Dropped,
                Reason::RelayUnavailable,
                smtp.is_syn(),
            );
            TC_ACT_SHOT as i32
        }
    }
}

/// Attach to the client-facing interface's ingress: sees clients' own
/// addresses, before any NAT.
#[classifier]
pub fn smtpgate_tc_ingress(ctx: TcContext) -> i32 {
    tc_verdict::<true, true>(&ctx)
}

/// Attach to an interface's egress, on routed gateways without NAT.
#[classifier]
pub fn smtpgate_tc_egress(ctx: TcContext) -> i32 {
    tc_verdict::<false, true>(&ctx)
}

/// `smtpgate_tc_ingress` for a device without a link-layer header.
#[classifier]
pub fn smtpgate_tc_ingress_l3(ctx: TcContext) -> i32 {
    tc_verdict::<true, false>(&ctx)
}

/// `smtpgate_tc_egress` for a device without a link-layer header.
#[classifier]
pub fn smtpgate_tc_egress_l3(ctx: TcContext) -> i32 {
    tc_verdict::<false, false>(&ctx)
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
        Decision::Untouched | Decision::Pass | Decision::Audited => CGROUP_ALLOW,
        Decision::Drop => CGROUP_DROP_QUIET,
        Decision::Reject(_) => CGROUP_DENY,
        // The connect hooks steer denied connections to the relay before
        // any packet exists. A SYN that still gets here (its source was
        // picked after the hook could judge it) has nowhere to go but out:
        // it is dropped.
        Decision::Redirect(smtp) => {
            count(
                smtp.family(),
                Verdict::Dropped,
                Reason::NotAllowlisted,
                smtp.is_syn(),
            );
            CGROUP_DROP_QUIET
        }
    }
}

/// connect() from a process in the cgroup. The SYN that follows is what the
/// egress program judges; this hook exists only because the kernel cannot
/// answer that SYN: a denied SYN at cgroup egress leaves connect() waiting
/// for its timeout. With `action = "reject"`, a connection that is certain
/// to be denied fails here with EPERM instead.
#[inline(always)]
fn connect_verdict(ctx: &SockAddrContext, v6: bool) -> i32 {
    const ALLOW: i32 = 1;
    const REFUSE: i32 = 0;
    // SAFETY: the context pointer is valid for the program's duration.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != 1 /* SOCK_STREAM */ || (sa.protocol != 0 && sa.protocol != 6) {
        return ALLOW;
    }
    let port = u16::from_be(sa.user_port as u16);
    let Some(cfg) = SMTPGATE_CONFIG.get(0) else {
        return ALLOW;
    };
    let redirect = cfg.action == Action::Redirect as u32;
    if !is_smtp_port(port)
        || cfg.mode == Mode::Audit as u32
        || (cfg.action != Action::Reject as u32 && !redirect)
    {
        return ALLOW;
    }
    // SAFETY: `sk` is always set for connect hooks.
    let sk = unsafe { &*sa.__bindgen_anon_1.sk };
    let (family, bound, local_flag) = if v6 {
        let words = sk.src_ip6;
        let mut a = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            a[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        let dst = sa.user_ip6;
        let v4_mapped = dst[0] == 0 && dst[1] == 0 && u32::from_be(dst[2]) == 0xffff;
        let loopback = dst[0] == 0 && dst[1] == 0 && dst[2] == 0 && u32::from_be(dst[3]) == 1;
        if loopback || (v4_mapped && u32::from_be(dst[3]) >> 24 == 127) {
            return ALLOW;
        }
        if v4_mapped {
            // A dual-stack socket: the SYN will be IPv4.
            let src = [a[12], a[13], a[14], a[15]];
            let bound = if src == [0; 4] {
                None
            } else {
                Some(Source::V4(src))
            };
            (Family::Ipv4, bound, LOCAL_V4_ALLOWED)
        } else {
            let bound = if a == [0; 16] {
                None
            } else {
                Some(Source::V6(a))
            };
            (Family::Ipv6, bound, LOCAL_V6_ALLOWED)
        }
    } else {
        if u32::from_be(sa.user_ip4) >> 24 == 127 {
            return ALLOW;
        }
        let bound = if sk.src_ip4 == 0 {
            None
        } else {
            Some(Source::V4(sk.src_ip4.to_ne_bytes()))
        };
        (Family::Ipv4, bound, LOCAL_V4_ALLOWED)
    };
    let allowed = match bound {
        Some(source) => allowlisted(&source, cfg),
        // Unbound: the source is picked later, among this host's addresses.
        // Refuse only when none of them could pass; otherwise the egress
        // program decides on the real SYN.
        None => cfg.local_allowed & local_flag != 0,
    };
    if allowed {
        return ALLOW;
    }
    if !redirect {
        count_attempt(family, Verdict::Rejected, Reason::NotAllowlisted);
        return REFUSE;
    }
    // Redirect: connect to the relay's intercept listener on loopback
    // instead. No relay port: fail closed.
    if cfg.relay_port == 0 || cfg.relay_port > 0xffff {
        count_attempt(family, Verdict::Dropped, Reason::RelayUnavailable);
        return REFUSE;
    }
    sa.user_port = u32::from((cfg.relay_port as u16).to_be());
    if v6 {
        let v4_mapped =
            sa.user_ip6[0] == 0 && sa.user_ip6[1] == 0 && u32::from_be(sa.user_ip6[2]) == 0xffff;
        sa.user_ip6 = if v4_mapped {
            [0, 0, 0xffffu32.to_be(), 0x7f00_0001u32.to_be()]
        } else {
            [0, 0, 0, 1u32.to_be()]
        };
    } else {
        sa.user_ip4 = 0x7f00_0001u32.to_be();
    }
    count_attempt(family, Verdict::Redirected, Reason::NotAllowlisted);
    ALLOW
}

#[cgroup_sock_addr(connect4)]
pub fn smtpgate_connect4(ctx: SockAddrContext) -> i32 {
    connect_verdict(&ctx, false)
}

#[cgroup_sock_addr(connect6)]
pub fn smtpgate_connect6(ctx: SockAddrContext) -> i32 {
    connect_verdict(&ctx, true)
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
