//! `action = "reject"` at TC: turn the offending packet into a TCP RST and
//! send it back the way it came, so the client's connect fails at once.
//!
//! The packet is rewritten in place: on Ethernet, the addresses swapped
//! (VLAN tags in the data and in skb metadata are kept, so the RST goes back
//! on the same VLAN); network and TCP headers rebuilt by
//! `smtpgate_common::rst`; the tail cut off. A device without a link-layer
//! header (tun, WireGuard, PPP, ipip) has no addresses to swap: its packet
//! starts with the IP header, and skb->protocol, which names the family,
//! is right for the RST as it was for the packet it answers. Then it is
//! redirected:
//! - at ingress, out of the same interface, towards the client;
//! - at egress, into the same interface's ingress, from where the gateway
//!   routes it back to the client like any received packet.
//!
//! The kernel's redirect knows which devices carry no link-layer header
//! (`dev_is_mac_header_xmit`) and neither expects nor adds one there.
//!
//! Whatever goes wrong on the way, the packet is dropped: a failed reject is
//! still a denial.

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::generated::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use smtpgate_common::{
    parse::{Bytes, MAX_HEADER_BYTES, Smtp, Source},
    rst,
};

/// Moves the header offsets out of the way until a reject needs them.
///
/// Each path through the header parser leaves the offsets with a different
/// range, and the verifier would check everything after the parser once per
/// range (thousands of paths through the IPv6 extension headers: over its
/// limit). Parked in skb->cb, they come back as plain unknown numbers, so the
/// verdict code after the parser is verified a handful of times instead.
#[inline(always)]
pub fn stash_offsets(ctx: &TcContext, smtp: Smtp) -> Smtp {
    // SAFETY: cb is the skb's scratch area for TC programs; volatile so the
    // compiler cannot hand the precise values past the round trip.
    unsafe {
        let cb = &raw mut (*ctx.skb.skb).cb;
        core::ptr::write_volatile(&raw mut (*cb)[0], smtp.l3 as u32);
        core::ptr::write_volatile(&raw mut (*cb)[1], smtp.l4 as u32);
        core::ptr::write_volatile(&raw mut (*cb)[2], smtp.payload);
    }
    Smtp {
        l3: 0,
        l4: 0,
        payload: 0,
        ..smtp
    }
}

#[inline(always)]
pub(crate) fn unstash_offsets(ctx: &TcContext) -> (usize, usize, u32) {
    // SAFETY: as in `stash_offsets`.
    unsafe {
        let cb = &raw const (*ctx.skb.skb).cb;
        (
            core::ptr::read_volatile(&raw const (*cb)[0]) as usize,
            core::ptr::read_volatile(&raw const (*cb)[1]) as usize,
            core::ptr::read_volatile(&raw const (*cb)[2]),
        )
    }
}

/// Inlined for the reason `redirect::steer` is.
#[inline(always)]
pub fn answer<const INGRESS: bool, const ETHERNET: bool>(ctx: &TcContext, smtp: &Smtp) -> i32 {
    match try_answer::<INGRESS, ETHERNET>(ctx, smtp) {
        Some(()) => TC_ACT_REDIRECT as i32,
        None => TC_ACT_SHOT as i32,
    }
}

#[inline(always)]
fn try_answer<const INGRESS: bool, const ETHERNET: bool>(
    ctx: &TcContext,
    smtp: &Smtp,
) -> Option<()> {
    if !rst::answerable(smtp.flags) {
        return None;
    }
    let (l3, l4, payload) = unstash_offsets(ctx);
    // Bounded again for the verifier, which no longer knows where they came from.
    if l3 > MAX_HEADER_BYTES || l4 > MAX_HEADER_BYTES {
        return None;
    }
    let pkt = Bytes {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let macs = if ETHERNET {
        let macs = *pkt.at::<12>(0)?;
        let mut swapped = [0u8; 12];
        swapped[..6].copy_from_slice(&macs[6..]);
        swapped[6..].copy_from_slice(&macs[..6]);
        Some(swapped)
    } else {
        None
    };
    let tcp = *pkt.at::<20>(l4)?;
    match smtp.source {
        Source::V4(_) => {
            let ip = *pkt.at::<20>(l3)?;
            let reply = rst::v4(&ip, &tcp, payload);
            rewrite(ctx, l3, macs.as_ref(), &reply)?;
        }
        Source::V6(_) => {
            let ip = *pkt.at::<40>(l3)?;
            let reply = rst::v6(&ip, &tcp, payload);
            rewrite(ctx, l3, macs.as_ref(), &reply)?;
        }
    }
    // SAFETY: the context pointer is valid for the program's duration.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let flags = if INGRESS { 0 } else { u64::from(BPF_F_INGRESS) };
    // SAFETY: plain helper call; it only records where to send the packet.
    let ret = unsafe { bpf_redirect(ifindex, flags) };
    (ret == i64::from(TC_ACT_REDIRECT)).then_some(())
}

/// Cuts the packet to the link-layer header (if any) and the reply, and
/// writes both: `macs` are the swapped Ethernet addresses, or `None` on a
/// device without a link-layer header, where the reply starts at `l3` = 0.
#[inline(always)]
fn rewrite<const N: usize>(
    ctx: &TcContext,
    l3: usize,
    macs: Option<&[u8; 12]>,
    reply: &[u8; N],
) -> Option<()> {
    // SAFETY: the context pointer is valid; the helper checks the length.
    let ret = unsafe { bpf_skb_change_tail(ctx.skb.skb, (l3 + N) as u32, 0) };
    if ret != 0 {
        return None;
    }
    if let Some(macs) = macs {
        ctx.store(0, macs, 0).ok()?;
    }
    ctx.store(l3, reply, 0).ok()?;
    Some(())
}
