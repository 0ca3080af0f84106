//! `action = "redirect"` at TC ingress: steer a denied client's port-25
//! connection into the embedded relay instead of the Internet.
//!
//! - A SYN is assigned (bpf_sk_assign) to the relay's intercept listener,
//!   taken from the SOCKMAP the agent fills. The listener has IP_TRANSPARENT,
//!   so it accepts a connection to any address, and the accepted socket's
//!   local address is the original destination.
//! - Every packet of the flow is marked; policy routing turns the mark into
//!   local delivery (`local 0.0.0.0/0 dev lo`), where later packets find
//!   their established socket by the usual lookup.
//! - A later packet whose flow the relay does not own (established before
//!   the policy said redirect) is dropped: it would otherwise go out.
//!
//! No relay listener (agent down, relay stopped): the SYN is dropped and
//! counted as `relay_unavailable`. Redirect fails closed.

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, TC_ACT_OK, TC_ACT_SHOT, bpf_sock_tuple},
    helpers::generated::{bpf_map_lookup_elem, bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp},
    macros::map,
    maps::SockMap,
    programs::TcContext,
};
use smtpgate_common::{
    Family, REDIRECT_MARK, RELAY_V4, RELAY_V6, Reason, Verdict,
    parse::{Bytes, MAX_HEADER_BYTES, Smtp, Source},
};

use crate::{count, reject::unstash_offsets};

/// The relay's intercept listeners: IPv4 at `RELAY_V4`, IPv6 at `RELAY_V6`.
/// Two sockets, because each is bound to its family's loopback address
/// (127.0.0.1, ::1), where nothing from the network can reach it directly;
/// steering hands it connections to any address all the same.
#[map(name = "SMTPGATE_RELAY")]
static SMTPGATE_RELAY: SockMap = SockMap::with_max_entries(2, 0);

/// Inlined into each caller: called from two programs (the Ethernet and
/// the L3 ingress), LLVM would otherwise make it a BPF subprogram, whose
/// stack frame the verifier adds to the caller's, past its 512-byte limit.
#[inline(always)]
pub fn steer(ctx: &TcContext, smtp: &Smtp) -> i32 {
    let family = smtp.family();
    let syn = smtp.is_syn();
    let ok = if syn {
        assign_listener(ctx, family)
    } else {
        owned_by_relay(ctx, smtp)
    };
    if ok {
        ctx.set_mark(REDIRECT_MARK);
        count(family, Verdict::Redirected, Reason::NotAllowlisted, syn);
        TC_ACT_OK as i32
    } else if syn {
        count(family, Verdict::Dropped, Reason::RelayUnavailable, syn);
        TC_ACT_SHOT as i32
    } else {
        count(family, Verdict::Dropped, Reason::NotAllowlisted, syn);
        TC_ACT_SHOT as i32
    }
}

#[inline(always)]
fn assign_listener(ctx: &TcContext, family: Family) -> bool {
    let key: u32 = if family == Family::Ipv6 {
        RELAY_V6
    } else {
        RELAY_V4
    };
    let map = (&raw const SMTPGATE_RELAY).cast_mut().cast();
    // SAFETY: a SOCKMAP lookup returns a referenced socket or null; every
    // non-null one is released below.
    unsafe {
        let sk = bpf_map_lookup_elem(map, (&raw const key).cast());
        if sk.is_null() {
            return false;
        }
        let ret = bpf_sk_assign(ctx.skb.skb.cast(), sk, 0);
        bpf_sk_release(sk);
        ret == 0
    }
}

/// Whether the relay has a socket for this packet's flow (a request socket
/// during the handshake, then the accepted one).
#[inline(always)]
fn owned_by_relay(ctx: &TcContext, smtp: &Smtp) -> bool {
    let (l3, l4, _) = unstash_offsets(ctx);
    if l3 > MAX_HEADER_BYTES || l4 > MAX_HEADER_BYTES {
        return false;
    }
    let pkt = Bytes {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let Some(tcp) = pkt.at::<4>(l4) else {
        return false;
    };
    let (sport, dport) = (
        u16::from_ne_bytes([tcp[0], tcp[1]]),
        u16::from_ne_bytes([tcp[2], tcp[3]]),
    );
    // SAFETY: a zeroed tuple filled field by field from packet bytes.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = match smtp.source {
        Source::V4(_) => {
            let Some(ip) = pkt.at::<20>(l3) else {
                return false;
            };
            let t = unsafe { &mut tuple.__bindgen_anon_1.ipv4 };
            t.saddr = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
            t.daddr = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
            t.sport = sport;
            t.dport = dport;
            12
        }
        Source::V6(_) => {
            let Some(ip) = pkt.at::<40>(l3) else {
                return false;
            };
            let t = unsafe { &mut tuple.__bindgen_anon_1.ipv6 };
            for i in 0..4 {
                t.saddr[i] = u32::from_ne_bytes([
                    ip[8 + 4 * i],
                    ip[9 + 4 * i],
                    ip[10 + 4 * i],
                    ip[11 + 4 * i],
                ]);
                t.daddr[i] = u32::from_ne_bytes([
                    ip[24 + 4 * i],
                    ip[25 + 4 * i],
                    ip[26 + 4 * i],
                    ip[27 + 4 * i],
                ]);
            }
            t.sport = sport;
            t.dport = dport;
            36
        }
    };
    // SAFETY: the tuple lives on our stack for the call; the socket found,
    // if any, is released at once: we only want to know it exists.
    unsafe {
        let sk = bpf_skc_lookup_tcp(
            ctx.skb.skb.cast(),
            &mut tuple,
            size,
            BPF_F_CURRENT_NETNS as u64,
            0,
        );
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk.cast());
    }
    true
}
