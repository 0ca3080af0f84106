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
    helpers::generated::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_map_lookup_elem, bpf_skb_cgroup_id,
    },
    macros::{cgroup_skb, cgroup_sock_addr, classifier, map},
    maps::{Array, LpmTrie, PerCpuArray, lpm_trie::Key as LpmKey},
    programs::{SkBuffContext, SockAddrContext, TcContext},
};
use reject::unstash_offsets;
use smtpgate_common::{
    Config, Counter, Family, LOCAL_V4_ALLOWED, LOCAL_V6_ALLOWED, PORT_WORDS, RELAY_MARK, Reason,
    Verdict,
    counters::{self, SLOTS},
    events::{Event, SourceKey},
    exceptions::{self, ExceptionKey, ExceptionPorts},
    parse::{self, Bytes, MAX_HEADER_BYTES, Parsed, Quick, Smtp, Source},
    table::{self, Node},
    verdict::{Standing, judge},
};
use top::Who;

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

/// Destinations any source may reach (see `smtpgate_common::exceptions`).
#[map(name = "SMTPGATE_EXCEPTIONS")]
static SMTPGATE_EXCEPTIONS: LpmTrie<ExceptionKey, ExceptionPorts> =
    LpmTrie::with_max_entries(exceptions::MAX_ENTRIES, 0);

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

/// Whether a packet or socket with this mark, in this cgroup, is the
/// relay's own (see `smtpgate_common::RELAY_MARK` for why both).
#[inline(always)]
fn is_relay(cfg: Option<&Config>, mark: u32, cgroup: impl FnOnce() -> u64) -> bool {
    match cfg {
        Some(c) => mark == RELAY_MARK && c.relay_cgroup != 0 && cgroup() == c.relay_cgroup,
        None => false,
    }
}

/// Where a source stands before the policy speaks. `excepted` asks the
/// destination exceptions, only when the allowlist said no and there are
/// exceptions at all.
#[inline(always)]
fn standing(
    cfg: Option<&Config>,
    source: &Source,
    relay: impl FnOnce() -> bool,
    excepted: impl FnOnce() -> bool,
) -> Standing {
    // `relay` is asked here, late, and not before the parse: a flag known
    // from the start doubles every path the verifier walks after it.
    match cfg {
        _ if relay() => Standing::Relay,
        Some(c) if allowlisted(source, c) => Standing::Allowlisted,
        Some(c) if c.exceptions != 0 && excepted() => Standing::Excepted,
        _ => Standing::NotAllowlisted,
    }
}

/// Whether the destination of the packet whose network header is at `l3`
/// is a destination exception for `dport`.
///
/// The key is filled straight from the packet: an address handed around as
/// an `Option` of an array made the compiler spill parts of registers,
/// which the verifier refuses.
#[inline(always)]
fn excepted_packet(pkt: &Bytes, v6: bool, l3: usize, dport: u16) -> bool {
    if l3 > MAX_HEADER_BYTES {
        return false;
    }
    let mut key = LpmKey::new(0, [0u8; 17]);
    if v6 {
        let Some(a) = pkt.at::<16>(l3 + 24) else {
            return false;
        };
        key.prefix_len = 8 + 128;
        key.data[0] = 6;
        key.data[1..17].copy_from_slice(a);
    } else {
        let Some(a) = pkt.at::<4>(l3 + 16) else {
            return false;
        };
        key.prefix_len = 8 + 32;
        key.data[0] = 4;
        key.data[1..5].copy_from_slice(a);
    }
    covers(&key, dport)
}

#[inline(always)]
fn covers(key: &LpmKey<ExceptionKey>, dport: u16) -> bool {
    match SMTPGATE_EXCEPTIONS.get(key) {
        Some(ports) => ports.covers(dport),
        None => false,
    }
}

/// [`excepted_packet`] for a connect(): `dst` as [`connect_dst`] gives it.
#[inline(always)]
fn excepted_connect(dst: &[u8; 16], v6: bool, dport: u16) -> bool {
    let mut key = LpmKey::new(0, [0u8; 17]);
    if v6 {
        key.prefix_len = 8 + 128;
        key.data[0] = 6;
        key.data[1..17].copy_from_slice(dst);
    } else {
        key.prefix_len = 8 + 32;
        key.data[0] = 4;
        key.data[1..5].copy_from_slice(&dst[..4]);
    }
    covers(&key, dport)
}

/// The verdict for a parsed packet (`relay`: it comes from the relay's own
/// delivery socket).
///
/// Each arm returns on its own, rather than feeding one shared tail: paths
/// that stay apart are paths the verifier can prune.
#[inline(always)]
fn decide(
    parsed: Parsed,
    relay: impl FnOnce() -> bool,
    excepted: impl FnOnce(&Smtp) -> bool,
) -> Decision {
    // Without a config the agent has not finished loading: `judge` fails
    // closed for SMTP, and everything else is left alone.
    let cfg = SMTPGATE_CONFIG.get(0);
    match parsed {
        Parsed::Other => Decision::Untouched,
        Parsed::Pass(family, reason) => {
            count(family, Verdict::Passed, reason, false);
            Decision::Pass
        }
        Parsed::Deny(family, reason) => refuse(cfg, family, reason),
        // Headers cut short in a packet that has no more: nothing honest.
        Parsed::Truncated(family) => refuse(cfg, family, Reason::Malformed),
        Parsed::Smtp(smtp) => {
            let syn = smtp.is_syn();
            let family = smtp.family();
            let standing = standing(cfg, &smtp.source, relay, || excepted(&smtp));
            let (verdict, reason) = judge(cfg, smtp.dport, standing);
            match verdict {
                Verdict::Allowed | Verdict::Passed => {
                    count(family, verdict, reason, syn);
                    Decision::Pass
                }
                Verdict::Audited => {
                    count(family, verdict, reason, syn);
                    Decision::Audited
                }
                Verdict::Rejected => {
                    count(family, verdict, reason, syn);
                    Decision::Reject(smtp)
                }
                // Counted by whoever carries it out.
                Verdict::Redirected => Decision::Redirect(smtp),
                Verdict::Dropped => {
                    count(family, verdict, reason, syn);
                    Decision::Drop
                }
            }
        }
    }
}

/// A packet refused whatever the allowlist says (see `Standing::Refused`).
#[inline(always)]
fn refuse(cfg: Option<&Config>, family: Family, reason: Reason) -> Decision {
    let (verdict, reason) = judge(cfg, 0, Standing::Refused(reason));
    count(family, verdict, reason, false);
    if verdict == Verdict::Audited {
        Decision::Pass
    } else {
        Decision::Drop
    }
}

/// `decide` for SMTP that `parse::quick` vouched for, down to the same
/// counters, for every outcome but a reject: that needs the header offsets,
/// and `None` sends it to the full parser (and the table is read twice,
/// for a packet that is about to be answered with a RST anyway).
#[inline(always)]
fn quick_verdict(
    source: &Source,
    flags: u8,
    dport: u16,
    relay: impl FnOnce() -> bool,
    excepted: impl FnOnce() -> bool,
) -> Option<i32> {
    // No config: the full path fails closed.
    let cfg = SMTPGATE_CONFIG.get(0)?;
    let syn = flags & (parse::TCP_SYN | parse::TCP_ACK) == parse::TCP_SYN;
    let family = match source {
        Source::V4(_) => Family::Ipv4,
        Source::V6(_) => Family::Ipv6,
    };
    let standing = standing(Some(cfg), source, relay, excepted);
    let (verdict, reason) = judge(Some(cfg), dport, standing);
    match verdict {
        Verdict::Allowed => {}
        // A denied connection attempt: the full path records who and where
        // (`smtpgate top`, the log).
        _ if syn => return None,
        Verdict::Audited => {}
        Verdict::Dropped => {
            count(family, verdict, reason, syn);
            return Some(TC_ACT_SHOT as i32);
        }
        // A RST needs the header offsets; a redirect is counted by `steer`.
        _ => return None,
    }
    count(family, verdict, reason, syn);
    Some(TC_ACT_UNSPEC)
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
    if let Quick::Other = quick {
        return TC_ACT_UNSPEC;
    }
    // The relay's own delivery leaves through egress; nothing of it is seen
    // at ingress, where a mark could only have been set by this host.
    let relay = || !INGRESS && tc_is_relay(ctx);
    if let Quick::Smtp(source, flags, dport) = quick {
        // The quick look vouches for a plain header at the start.
        let l3 = if ETHERNET { parse::ETH_HLEN } else { 0 };
        let v6 = matches!(source, Source::V6(_));
        let excepted = || excepted_packet(&tc_bytes(ctx), v6, l3, dport);
        if let Some(verdict) = quick_verdict(&source, flags, dport, relay, excepted) {
            return verdict;
        }
    }
    let parsed = match tc_parse::<ETHERNET>(ctx) {
        Parsed::Smtp(smtp) => Parsed::Smtp(reject::stash_offsets(ctx, smtp)),
        other => other,
    };
    let smtp = match &parsed {
        Parsed::Smtp(s) if s.is_syn() => Some(*s),
        _ => None,
    };
    let decision = decide(parsed, relay, |smtp| {
        let (l3, _, _) = unstash_offsets(ctx);
        let v6 = matches!(smtp.source, Source::V6(_));
        excepted_packet(&tc_bytes(ctx), v6, l3, smtp.dport)
    });
    if let (Some(smtp), Some(v)) = (smtp, denied_as(&decision)) {
        let key = source_key(0, &smtp.source);
        top::denied(&key, v, &Who::NOBODY, |e| tc_event(ctx, &smtp, e));
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

/// The verdict a denied attempt is recorded under in `top`, if denied.
#[inline(always)]
fn denied_as(decision: &Decision) -> Option<Verdict> {
    match decision {
        Decision::Reject(_) => Some(Verdict::Rejected),
        Decision::Redirect(_) => Some(Verdict::Redirected),
        Decision::Drop => Some(Verdict::Dropped),
        // Audit lets denied attempts through: still worth knowing.
        Decision::Audited => Some(Verdict::Audited),
        _ => None,
    }
}

#[inline(always)]
fn source_key(cgroup: u64, source: &Source) -> SourceKey {
    let mut key = SourceKey {
        cgroup,
        addr: [0; 16],
        family: 0,
        _pad: 0,
    };
    match source {
        Source::V4(a) => {
            key.family = Family::Ipv4 as u32;
            key.addr[..4].copy_from_slice(a);
        }
        Source::V6(a) => {
            key.family = Family::Ipv6 as u32;
            key.addr = *a;
        }
    }
    key
}

/// Whether a TC packet comes from the relay's own delivery socket.
#[inline(always)]
fn tc_is_relay(ctx: &TcContext) -> bool {
    // SAFETY: the context pointer is valid for the program's duration.
    let mark = unsafe { (*ctx.skb.skb).mark };
    is_relay(SMTPGATE_CONFIG.get(0), mark, || {
        // SAFETY: a plain helper on our own skb; 0 for a forwarded packet,
        // which has no local socket.
        unsafe { bpf_skb_cgroup_id(ctx.skb.skb) }
    })
}

/// Ports and destination of a TC packet whose offsets were stashed.
#[inline(always)]
fn tc_event(ctx: &TcContext, smtp: &Smtp, e: &mut Event) -> bool {
    let (l3, l4, _) = unstash_offsets(ctx);
    packet_event(&tc_bytes(ctx), smtp, l3, l4, e)
}

/// Fills the ports and the destination of an event from the packet.
#[inline(always)]
fn packet_event(pkt: &Bytes, smtp: &Smtp, l3: usize, l4: usize, e: &mut Event) -> bool {
    if l3 > MAX_HEADER_BYTES || l4 > MAX_HEADER_BYTES {
        return false;
    }
    let Some(tcp) = pkt.at::<4>(l4) else {
        return false;
    };
    e.sport = u16::from_be_bytes([tcp[0], tcp[1]]);
    e.dport = u16::from_be_bytes([tcp[2], tcp[3]]);
    match smtp.source {
        Source::V4(_) => {
            let Some(ip) = pkt.at::<20>(l3) else {
                return false;
            };
            e.dst[..4].copy_from_slice(&ip[16..20]);
        }
        Source::V6(_) => {
            let Some(ip) = pkt.at::<40>(l3) else {
                return false;
            };
            e.dst.copy_from_slice(&ip[24..40]);
        }
    }
    true
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
    let (start, end, proto, mark) = unsafe {
        let skb = &*ctx.skb.skb;
        (
            skb.data as usize,
            skb.data_end as usize,
            u16::from_be(skb.protocol as u16),
            skb.mark,
        )
    };
    let pkt = Bytes { start, end };
    let parsed = parse::network(&pkt, proto, &is_smtp_port);
    let Parsed::Smtp(smtp) = parsed else {
        return cgroup_code(decide(parsed, || false, |_| false));
    };
    let cfg = SMTPGATE_CONFIG.get(0);
    // SAFETY: a plain helper on our own skb.
    let cgroup = || unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    let decision = decide(
        parsed,
        || is_relay(cfg, mark, cgroup),
        |s| excepted_packet(&pkt, matches!(s.source, Source::V6(_)), s.l3, s.dport),
    );
    // A denied SYN is recorded here only if the connect hook could not
    // judge it (the socket had no source address yet and one of this host's
    // could pass); otherwise the connect hook recorded it already, with the
    // process that tried. The hook does not know the pid here.
    let deferred = match (cfg, smtp.source) {
        (Some(c), Source::V4(_)) => c.local_allowed & LOCAL_V4_ALLOWED != 0,
        (Some(c), Source::V6(_)) => c.local_allowed & LOCAL_V6_ALLOWED != 0,
        (None, _) => true,
    };
    if smtp.is_syn() && deferred {
        if let Some(v) = cgroup_denied_as(&decision) {
            let key = source_key(cgroup(), &smtp.source);
            top::denied(&key, v, &Who::NOBODY, |e| {
                packet_event(&pkt, &smtp, smtp.l3, smtp.l4, e)
            });
        }
    }
    cgroup_code(decision)
}

/// What a denial at cgroup egress is: a redirect that reaches it can only
/// be dropped (see `cgroup_code`).
#[inline(always)]
fn cgroup_denied_as(decision: &Decision) -> Option<Verdict> {
    match decision {
        Decision::Redirect(_) => Some(Verdict::Dropped),
        other => denied_as(other),
    }
}

#[inline(always)]
fn cgroup_code(decision: Decision) -> i32 {
    match decision {
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

/// connect() from a process in the cgroup.
///
/// The SYN that follows is what the egress program judges, but this hook
/// runs in the process's own context, so it is where a denial can name the
/// process (pid, comm) for `top` and the log. It also acts where the egress
/// program cannot:
/// - reject: a denied SYN at cgroup egress leaves connect() waiting for its
///   timeout, so a connection certain to be denied fails here with EPERM;
/// - redirect: the connection is pointed at the relay's intercept listener
///   before any packet exists.
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
    if !is_smtp_port(port) {
        return ALLOW;
    }
    // No config yet: the egress program fails closed on the SYN.
    let Some(cfg) = SMTPGATE_CONFIG.get(0) else {
        return ALLOW;
    };
    // SAFETY: `sk` is always set for connect hooks.
    let sk = unsafe { &*sa.__bindgen_anon_1.sk };
    // SAFETY: a plain helper, in the calling process's context.
    if is_relay(Some(cfg), sk.mark, || unsafe {
        bpf_get_current_cgroup_id()
    }) {
        // Counted by the egress program, which sees the relay's SYN.
        return ALLOW;
    }
    let (dst4, dst6) = (sa.user_ip4, sa.user_ip6);
    // The socket's source so far, as plain words: an enum carried across
    // these branches made the compiler spill partial registers, which the
    // verifier refuses.
    let (family, local_flag, src4, src6) = if v6 {
        let v4_mapped = dst6[0] == 0 && dst6[1] == 0 && u32::from_be(dst6[2]) == 0xffff;
        let loopback = dst6[0] == 0 && dst6[1] == 0 && dst6[2] == 0 && u32::from_be(dst6[3]) == 1;
        if loopback || (v4_mapped && u32::from_be(dst6[3]) >> 24 == 127) {
            return ALLOW;
        }
        let words = sk.src_ip6;
        if v4_mapped {
            // A dual-stack socket: the SYN will be IPv4.
            (Family::Ipv4, LOCAL_V4_ALLOWED, words[3], [0u32; 4])
        } else {
            (Family::Ipv6, LOCAL_V6_ALLOWED, 0, words)
        }
    } else {
        if u32::from_be(dst4) >> 24 == 127 {
            return ALLOW;
        }
        (Family::Ipv4, LOCAL_V4_ALLOWED, sk.src_ip4, [0u32; 4])
    };
    let source = if family == Family::Ipv4 {
        Source::V4(src4.to_ne_bytes())
    } else {
        let mut a = [0u8; 16];
        for (i, w) in src6.iter().enumerate() {
            a[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        Source::V6(a)
    };
    let bound = if family == Family::Ipv4 {
        src4 != 0
    } else {
        src6 != [0; 4]
    };
    let standing = if bound {
        if allowlisted(&source, cfg) {
            Standing::Allowlisted
        } else {
            Standing::NotAllowlisted
        }
    } else if cfg.local_allowed & local_flag != 0 {
        // Unbound: the source is picked later, among this host's addresses.
        // Judge now only when none of them could pass; otherwise the egress
        // program decides on the real SYN.
        return ALLOW;
    } else {
        Standing::NotAllowlisted
    };
    if standing == Standing::NotAllowlisted && cfg.exceptions != 0 {
        let dst = connect_dst(dst4, dst6, v6, family == Family::Ipv4);
        if excepted_connect(&dst, family == Family::Ipv6, port) {
            // Counted by the egress program, which sees the SYN.
            return ALLOW;
        }
    }
    let (verdict, reason) = judge(Some(cfg), port, standing);
    if verdict == Verdict::Allowed {
        return ALLOW;
    }
    let relay_missing =
        verdict == Verdict::Redirected && (cfg.relay_port == 0 || cfg.relay_port > 0xffff);
    let recorded = if relay_missing {
        Verdict::Dropped
    } else {
        verdict
    };
    record_local(
        family,
        bound.then_some(&source),
        port,
        (v6, dst4, dst6),
        recorded,
    );
    match verdict {
        Verdict::Rejected => {
            count_attempt(family, verdict, reason);
            REFUSE
        }
        // No relay port: fail closed.
        Verdict::Redirected if relay_missing => {
            count_attempt(family, Verdict::Dropped, Reason::RelayUnavailable);
            REFUSE
        }
        Verdict::Redirected => {
            // Redirect: connect to the relay's intercept listener on
            // loopback instead.
            sa.user_port = u32::from((cfg.relay_port as u16).to_be());
            if v6 {
                let v4_mapped = sa.user_ip6[0] == 0
                    && sa.user_ip6[1] == 0
                    && u32::from_be(sa.user_ip6[2]) == 0xffff;
                sa.user_ip6 = if v4_mapped {
                    [0, 0, 0xffffu32.to_be(), 0x7f00_0001u32.to_be()]
                } else {
                    [0, 0, 0, 1u32.to_be()]
                };
            } else {
                sa.user_ip4 = 0x7f00_0001u32.to_be();
            }
            count_attempt(family, verdict, reason);
            ALLOW
        }
        // Drop and audit act on the SYN, where the egress program counts
        // them: a drop must look like one (a timeout), not like EPERM.
        _ => ALLOW,
    }
}

/// The destination of a connect() (IPv4 in the first 4 bytes); `mapped`:
/// an IPv4-mapped address on an IPv6 socket. Takes the words by value: the
/// verifier allows context fields to be read only at a constant offset from
/// the context pointer, not through a pointer into the context that the
/// compiler kept.
#[inline(always)]
fn connect_dst(ip4: u32, ip6: [u32; 4], v6: bool, mapped: bool) -> [u8; 16] {
    let mut a = [0u8; 16];
    if !v6 {
        a[..4].copy_from_slice(&ip4.to_ne_bytes());
    } else if mapped {
        a[..4].copy_from_slice(&ip6[3].to_ne_bytes());
    } else {
        for (i, w) in ip6.iter().enumerate() {
            a[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
    }
    a
}

/// A denied connect() for `top` and the log, with the process that made it.
#[inline(always)]
fn record_local(
    family: Family,
    bound: Option<&Source>,
    dport: u16,
    (v6, dst4, dst6): (bool, u32, [u32; 4]),
    verdict: Verdict,
) {
    // SAFETY: plain helpers, in the calling process's context.
    let (cgroup, tgid, comm) = unsafe {
        let mut comm = [0u8; 16];
        let _ = bpf_get_current_comm(comm.as_mut_ptr().cast(), 16);
        (
            bpf_get_current_cgroup_id(),
            (bpf_get_current_pid_tgid() >> 32) as u32,
            comm,
        )
    };
    let mut key = match bound {
        Some(source) => source_key(cgroup, source),
        None => SourceKey {
            cgroup,
            addr: [0; 16],
            family: 0,
            _pad: 0,
        },
    };
    key.family = family as u32;
    let who = Who { pid: tgid, comm };
    top::denied(&key, verdict, &who, |e| {
        e.dport = dport;
        e.dst = connect_dst(dst4, dst6, v6, family == Family::Ipv4);
        true
    });
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
