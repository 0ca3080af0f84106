//! Header parsing: Ethernet and VLAN tags, IPv4, IPv6 extension headers, TCP.
//!
//! The parser answers one question: is this packet SMTP egress, and if so,
//! from which source? Anything it cannot answer for sure about a TCP packet
//! (fragments, truncated or over-long header chains) comes back as a denial
//! with its own [`Reason`], so an evasion trick never gets through by luck.
//! Everything that is certainly not SMTP comes back as [`Parsed::Other`].

use crate::{Family, MAX_IPV6_EXT_HEADERS, MAX_VLAN_DEPTH, Reason};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// Pre-standard QinQ outer tag, still emitted by some switches.
const ETH_P_QINQ1: u16 = 0x9100;

pub const IPPROTO_TCP: u8 = 6;
const IPV6_HLEN: usize = 40;
const TCP_HLEN: usize = 20;
/// Headers are only looked for in the first bytes of a packet; the TC
/// program pulls this much into the linear area when it must.
pub const MAX_HEADER_BYTES: usize = 512;

/// TCP flag bits (byte 13 of the header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The bytes of a packet the program may read directly.
#[derive(Clone, Copy)]
pub struct Bytes {
    pub start: usize,
    pub end: usize,
}

impl Bytes {
    /// A pointer to `N` bytes at `off`, or `None` past the linear data.
    #[inline(always)]
    pub fn at<const N: usize>(&self, off: usize) -> Option<&[u8; N]> {
        let p = self.start + off;
        if p + N > self.end {
            return None;
        }
        // SAFETY: the range was checked against the end of the packet data
        // just above, which is also what the verifier wants to see.
        Some(unsafe { &*(p as *const [u8; N]) })
    }

    #[inline(always)]
    fn be16(&self, off: usize) -> Option<u16> {
        self.at::<2>(off).map(|b| u16::from_be_bytes(*b))
    }
}

/// The source address of an SMTP packet, in network byte order.
#[derive(Clone, Copy)]
pub enum Source {
    V4([u8; 4]),
    V6([u8; 16]),
}

/// What a reject needs to answer an SMTP packet with a RST.
#[derive(Clone, Copy)]
pub struct Smtp {
    pub source: Source,
    /// Offset of the network header.
    pub l3: usize,
    /// Offset of the TCP header.
    pub l4: usize,
    /// TCP payload length, for the RST's acknowledgement number.
    pub payload: u32,
    pub flags: u8,
    /// TCP destination port: the verdict depends on it under redirect.
    pub dport: u16,
}

impl Smtp {
    #[inline(always)]
    pub fn family(&self) -> Family {
        match self.source {
            Source::V4(_) => Family::Ipv4,
            Source::V6(_) => Family::Ipv6,
        }
    }

    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

pub enum Parsed {
    /// Not SMTP egress: the program leaves it alone.
    Other,
    /// SMTP egress whose verdict depends on the allowlist.
    Smtp(Smtp),
    /// A TCP packet whose port cannot be known, and which cannot carry a
    /// connection on its own: let through, counted.
    Pass(Family, Reason),
    /// Dropped whatever the allowlist says.
    Deny(Family, Reason),
    /// The headers run past the linear data. If the packet is longer, the
    /// caller pulls more into the linear area and parses again; if not, the
    /// packet is truncated and dropped as malformed.
    Truncated(Family),
}

/// Parses from the Ethernet header. `tag_in_meta` is set when the kernel has
/// already moved the outer VLAN tag into skb metadata: it counts towards the
/// depth limit though it is no longer in the data.
#[inline(always)]
pub fn ethernet(pkt: &Bytes, tag_in_meta: bool, ports: &impl Fn(u16) -> bool) -> Parsed {
    let mut depth = u32::from(tag_in_meta);
    let Some(mut proto) = pkt.be16(12) else {
        return Parsed::Other;
    };
    let mut off = ETH_HLEN;
    // One more round than the limit, so that the round after the last
    // allowed tag can see that another tag follows.
    for _ in 0..=MAX_VLAN_DEPTH {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD && proto != ETH_P_QINQ1 {
            break;
        }
        depth += 1;
        if depth > MAX_VLAN_DEPTH {
            return Parsed::Deny(Family::Other, Reason::VlanTooDeep);
        }
        let Some(next) = pkt.be16(off + 2) else {
            return Parsed::Truncated(Family::Other);
        };
        proto = next;
        off += 4;
    }
    match proto {
        ETH_P_IP => ipv4(pkt, off, ports),
        ETH_P_IPV6 => ipv6(pkt, off, ports),
        // Still a tag here means the loop ran out: deeper than the limit.
        ETH_P_8021Q | ETH_P_8021AD | ETH_P_QINQ1 => {
            Parsed::Deny(Family::Other, Reason::VlanTooDeep)
        }
        _ => Parsed::Other,
    }
}

/// What [`quick`] and [`quick_l3`] saw.
pub enum Quick {
    /// Not SMTP egress: the full parser says [`Parsed::Other`] too.
    Other,
    /// SMTP egress that the full parser returns as [`Parsed::Smtp`] with
    /// this source, these TCP flags and this destination port.
    Smtp(Source, u8, u16),
    /// Anything else: ask the full parser.
    Unsure,
}

/// A first look for the commonest packets by far: untagged IPv4 without
/// options and not a fragment, or IPv6 with TCP right after the fixed header.
///
/// It pays because the full parser does its VLAN, fragment, extension
/// header and offset bookkeeping for every packet, which costs about 20 ns
/// for non-SMTP traffic and more for SMTP (see BENCHMARKS.md); this reads
/// only what decides the answer. Every condition mirrors one in the full
/// parser ([`ethernet`] here, [`l3`] for [`quick_l3`]), and the
/// `quick_never_contradicts_the_parser` tests hold both to that.
#[inline(always)]
pub fn quick(pkt: &Bytes, ports: &impl Fn(u16) -> bool) -> Quick {
    let Some(proto) = pkt.be16(12) else {
        return Quick::Unsure;
    };
    if proto == ETH_P_IP || proto == ETH_P_IPV6 {
        quick_network(pkt, ETH_HLEN, proto, ports)
    } else if proto == ETH_P_8021Q || proto == ETH_P_8021AD || proto == ETH_P_QINQ1 {
        Quick::Unsure
    } else {
        Quick::Other
    }
}

/// [`quick`] for a device without a link-layer header: `ethertype` is
/// skb->protocol. A version nibble that disagrees with it is left to [`l3`],
/// which refuses what could be SMTP under either reading.
#[inline(always)]
pub fn quick_l3(pkt: &Bytes, ethertype: u16, ports: &impl Fn(u16) -> bool) -> Quick {
    // Two bytes, not one: a compiler turns `start + 1 > end` into
    // `start >= end`, from which the verifier learns no packet range.
    let Some(first) = pkt.at::<2>(0) else {
        return Quick::Unsure;
    };
    let version = first[0] >> 4;
    if (version == 4 && ethertype == ETH_P_IP) || (version == 6 && ethertype == ETH_P_IPV6) {
        quick_network(pkt, 0, ethertype, ports)
    } else if version == 4 || version == 6 {
        Quick::Unsure
    } else {
        // Neither IPv4 nor IPv6 by its own header: not IP to any reader.
        Quick::Other
    }
}

/// The quick look from the network header at `l3`, of an IPv4 or IPv6
/// packet as `proto` says.
#[inline(always)]
fn quick_network(pkt: &Bytes, l3: usize, proto: u16, ports: &impl Fn(u16) -> bool) -> Quick {
    // (TCP header offset, the IP length field, what of it is not TCP)
    let v4 = proto == ETH_P_IP;
    let (l4, len, ip_hlen) = if v4 {
        let Some(h) = pkt.at::<20>(l3) else {
            return Quick::Unsure;
        };
        if h[9] != IPPROTO_TCP {
            return Quick::Other;
        }
        // Version 4 and no options; MF clear and offset 0 (DF is free).
        if h[0] != 0x45 || h[6] & 0x3f != 0 || h[7] != 0 {
            return Quick::Unsure;
        }
        (l3 + 20, u16::from_be_bytes([h[2], h[3]]), 20)
    } else {
        let Some(h) = pkt.at::<IPV6_HLEN>(l3) else {
            return Quick::Unsure;
        };
        if h[0] >> 4 != 6 {
            return Quick::Other;
        }
        if h[6] != IPPROTO_TCP {
            return if is_extension_header(h[6]) {
                Quick::Unsure
            } else {
                Quick::Other
            };
        }
        // A source whose first byte is set is neither IPv4-mapped nor
        // IPv4-compatible (see `checked_v6_source`); ::/8 is left to the
        // full parser.
        if h[8] == 0 {
            return Quick::Unsure;
        }
        (l3 + IPV6_HLEN, u16::from_be_bytes([h[4], h[5]]), 0)
    };
    // The whole TCP header must be there, or the full parser says
    // "truncated" even for other ports.
    let Some(t) = pkt.at::<TCP_HLEN>(l4) else {
        return Quick::Unsure;
    };
    let dport = u16::from_be_bytes([t[2], t[3]]);
    if !ports(dport) {
        return Quick::Other;
    }
    // A zero length is how BIG TCP (IPv4) and jumbograms (IPv6) say
    // "more than 64 KiB": trust the packet data then, as the full parser does.
    let tcp_bytes = match usize::from(len) {
        0 => usize::MAX,
        len => len.saturating_sub(ip_hlen),
    };
    let doff = usize::from(t[12] >> 4) * 4;
    if doff < TCP_HLEN || tcp_bytes < TCP_HLEN || doff > tcp_bytes {
        return Quick::Unsure;
    }
    // Read the source only now: non-SMTP traffic never pays for it.
    let source = if v4 {
        match pkt.at::<4>(l3 + 12) {
            Some(a) => Source::V4(*a),
            None => return Quick::Unsure,
        }
    } else {
        match pkt.at::<16>(l3 + 8) {
            Some(a) => Source::V6(*a),
            None => return Quick::Unsure,
        }
    };
    Quick::Smtp(source, t[13], dport)
}

/// Parses from the network header (cgroup programs start here).
#[inline(always)]
pub fn network(pkt: &Bytes, ethertype: u16, ports: &impl Fn(u16) -> bool) -> Parsed {
    match ethertype {
        ETH_P_IP => ipv4(pkt, 0, ports),
        ETH_P_IPV6 => ipv6(pkt, 0, ports),
        _ => Parsed::Other,
    }
}

/// Parses a packet from a device without a link-layer header (tun,
/// WireGuard, PPP, ipip, ip6tnl, sit): the network header is at offset 0,
/// and `ethertype` is skb->protocol.
///
/// There the protocol travels beside the packet, not in it, and the two can
/// disagree (a packet socket may send IPv4 bytes as protocol IPv6). Whoever
/// reads the packet next goes by one or the other: PPP frames it by
/// skb->protocol, a tun reader without packet information (most VPNs) by the
/// version nibble. So the packet is parsed as its version nibble says, and
/// whatever under that reading could be TCP to an SMTP port is dropped as
/// malformed when skb->protocol says otherwise. Under skb->protocol's
/// reading such a packet carries nothing: IPv4 and IPv6 receivers drop a
/// header of the wrong version.
#[inline(always)]
pub fn l3(pkt: &Bytes, ethertype: u16, ports: &impl Fn(u16) -> bool) -> Parsed {
    // Two bytes, not one (see `quick_l3`). No IP packet is shorter.
    let Some(first) = pkt.at::<2>(0) else {
        // The caller pulls more into the linear area and asks again; a
        // packet that really is this short is dropped as malformed.
        return Parsed::Truncated(match ethertype {
            ETH_P_IP => Family::Ipv4,
            ETH_P_IPV6 => Family::Ipv6,
            _ => Family::Other,
        });
    };
    let by_version = match first[0] >> 4 {
        4 => ETH_P_IP,
        6 => ETH_P_IPV6,
        // Not IP to any reader: every IP receiver checks the version.
        _ => return Parsed::Other,
    };
    let parsed = network(pkt, by_version, ports);
    if by_version == ethertype {
        return parsed;
    }
    match parsed {
        Parsed::Smtp(s) => Parsed::Deny(s.family(), Reason::Malformed),
        Parsed::Pass(family, _) => Parsed::Deny(family, Reason::Malformed),
        other => other,
    }
}

#[inline(always)]
fn ipv4(pkt: &Bytes, l3: usize, ports: &impl Fn(u16) -> bool) -> Parsed {
    const F: Family = Family::Ipv4;
    let Some(h) = pkt.at::<20>(l3) else {
        return Parsed::Truncated(Family::Ipv4);
    };
    if h[9] != IPPROTO_TCP {
        return Parsed::Other;
    }
    let ihl = usize::from(h[0] & 0x0f) * 4;
    if h[0] >> 4 != 4 || ihl < 20 {
        return Parsed::Deny(F, Reason::Malformed);
    }
    let frag = u16::from_be_bytes([h[6], h[7]]);
    let offset = frag & 0x1fff;
    let more_fragments = frag & 0x2000 != 0;
    // RFC 1858: a fragment at offset 8 can rewrite the TCP flags of the first
    // one. No honest stack sends it.
    if offset == 1 {
        return Parsed::Deny(F, Reason::FragmentOverlap);
    }
    if offset > 1 {
        return Parsed::Pass(F, Reason::NonFirstFragment);
    }
    let source = Source::V4([h[12], h[13], h[14], h[15]]);
    let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
    let l4 = l3 + ihl;
    // Zero total length is how BIG TCP marks a GSO packet over 64 KiB.
    let tcp_bytes = if total == 0 {
        usize::MAX
    } else {
        total.saturating_sub(ihl)
    };
    if more_fragments && tcp_bytes < TCP_HLEN {
        return tiny_fragment(pkt, l4, tcp_bytes, ports);
    }
    tcp(pkt, source, l3, l4, tcp_bytes, ports, F)
}

/// A first fragment too short to hold the whole TCP header. If it shows a
/// destination port that is not SMTP, it is none of our business; otherwise
/// it is dropped.
#[inline(always)]
fn tiny_fragment(pkt: &Bytes, l4: usize, tcp_bytes: usize, ports: &impl Fn(u16) -> bool) -> Parsed {
    if tcp_bytes >= 4 {
        if let Some(dport) = pkt.be16(l4 + 2) {
            if !ports(dport) {
                return Parsed::Other;
            }
        }
    }
    Parsed::Deny(Family::Ipv4, Reason::TinyFragment)
}

#[inline(always)]
fn tcp(
    pkt: &Bytes,
    source: Source,
    l3: usize,
    l4: usize,
    tcp_bytes: usize,
    ports: &impl Fn(u16) -> bool,
    family: Family,
) -> Parsed {
    let Some(t) = pkt.at::<TCP_HLEN>(l4) else {
        return Parsed::Truncated(family);
    };
    let dport = u16::from_be_bytes([t[2], t[3]]);
    if !ports(dport) {
        return Parsed::Other;
    }
    let doff = usize::from(t[12] >> 4) * 4;
    if doff < TCP_HLEN || tcp_bytes < TCP_HLEN || doff > tcp_bytes {
        return Parsed::Deny(family, Reason::Malformed);
    }
    let payload = if tcp_bytes == usize::MAX {
        0
    } else {
        (tcp_bytes - doff) as u32
    };
    Parsed::Smtp(Smtp {
        source,
        l3,
        l4,
        payload,
        flags: t[13],
        dport,
    })
}

#[inline(always)]
fn ipv6(pkt: &Bytes, l3: usize, ports: &impl Fn(u16) -> bool) -> Parsed {
    const F: Family = Family::Ipv6;
    let Some(h) = pkt.at::<IPV6_HLEN>(l3) else {
        return Parsed::Truncated(Family::Ipv6);
    };
    if h[0] >> 4 != 6 {
        return Parsed::Other;
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    let payload_len = usize::from(u16::from_be_bytes([h[4], h[5]]));
    let mut next = h[6];
    let mut off = l3 + IPV6_HLEN;
    let mut first_fragment = false;
    let mut walked = 0;
    // One uniform loop body, so that the verifier's paths through it merge
    // instead of multiplying with each header.
    while next != IPPROTO_TCP {
        if !is_extension_header(next) {
            // ESP, no next header, ICMPv6, UDP, ...: not TCP we can see.
            return Parsed::Other;
        }
        if walked == MAX_IPV6_EXT_HEADERS {
            return Parsed::Deny(F, Reason::HeaderChainTooLong);
        }
        // Every extension header is at least 8 bytes long.
        let Some(e) = pkt.at::<8>(off) else {
            return incomplete(first_fragment);
        };
        let len = if next == 44 {
            let offset = u16::from_be_bytes([e[2], e[3]]) >> 3;
            if offset != 0 {
                return non_first_v6_fragment(e[0], offset);
            }
            first_fragment = true;
            8
        } else if next == 51 {
            // Authentication header: length in 4-octet units, minus 2.
            (usize::from(e[1]) + 2) * 4
        } else {
            // Length in 8-octet units, not counting the first 8.
            (usize::from(e[1]) + 1) * 8
        };
        next = e[0];
        off += len;
        if off > MAX_HEADER_BYTES {
            return incomplete(first_fragment);
        }
        walked += 1;
    }
    let Some(source) = checked_v6_source(src) else {
        return Parsed::Deny(F, Reason::MappedAddress);
    };
    let tcp_bytes = (l3 + IPV6_HLEN + payload_len).saturating_sub(off);
    // RFC 7112: the first fragment must hold the whole header chain,
    // including the TCP header.
    if first_fragment && (tcp_bytes < TCP_HLEN || pkt.at::<TCP_HLEN>(off).is_none()) {
        // Still let non-SMTP traffic be, when its port is visible.
        if let Some(dport) = pkt.be16(off + 2) {
            if tcp_bytes >= 4 && !ports(dport) {
                return Parsed::Other;
            }
        }
        return Parsed::Deny(F, Reason::IncompleteChain);
    }
    // A jumbogram (payload length 0 with a hop-by-hop option) or GSO packet:
    // trust the packet data for the TCP header.
    let tcp_bytes = if payload_len == 0 {
        usize::MAX
    } else {
        tcp_bytes
    };
    tcp(pkt, source, l3, off, tcp_bytes, ports, F)
}

/// Hop-by-hop, routing, fragment, destination options, AH, mobility, HIP,
/// shim6.
#[inline(always)]
fn is_extension_header(next: u8) -> bool {
    matches!(next, 0 | 43 | 44 | 51 | 60 | 135 | 139 | 140)
}

/// A non-first IPv6 fragment: only a TCP datagram's fragments are ours.
#[inline(always)]
fn non_first_v6_fragment(next: u8, offset: u16) -> Parsed {
    if next != IPPROTO_TCP {
        Parsed::Other
    } else if offset == 1 {
        Parsed::Deny(Family::Ipv6, Reason::FragmentOverlap)
    } else {
        Parsed::Pass(Family::Ipv6, Reason::NonFirstFragment)
    }
}

#[inline(always)]
fn incomplete(first_fragment: bool) -> Parsed {
    if first_fragment {
        Parsed::Deny(Family::Ipv6, Reason::IncompleteChain)
    } else {
        Parsed::Truncated(Family::Ipv6)
    }
}

/// IPv4-mapped (`::ffff:0:0/96`) and IPv4-compatible (`::/96`, except `::`
/// and `::1`) sources are refused: they never appear on the wire from an
/// honest host, and would let an IPv4 host dodge its IPv4 verdict.
#[inline(always)]
fn checked_v6_source(src: [u8; 16]) -> Option<Source> {
    if crate::verdict::is_disguised_v4(&src) {
        return None;
    }
    Some(Source::V6(src))
}

#[cfg(test)]
mod tests {
    //! The parser on raw packet bytes, built by hand below.
    extern crate std;
    use std::{vec, vec::Vec};

    use super::*;

    fn smtp_ports(p: u16) -> bool {
        p == 25 || p == 587
    }

    fn parse(frame: &[u8], tag_in_meta: bool) -> Parsed {
        let pkt = Bytes {
            start: frame.as_ptr() as usize,
            end: frame.as_ptr() as usize + frame.len(),
        };
        ethernet(&pkt, tag_in_meta, &smtp_ports)
    }

    fn eth(vlans: &[u16], ethertype: u16) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        for v in vlans {
            f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
            f.extend_from_slice(&v.to_be_bytes());
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        f
    }

    fn tcp(dport: u16, flags: u8) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t
    }

    fn ipv4(src: [u8; 4], frag: u16, payload: &[u8]) -> Vec<u8> {
        let mut h = vec![0x45, 0, 0, 0, 0, 1, 0, 0, 64, IPPROTO_TCP, 0, 0];
        let total = (20 + payload.len()) as u16;
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h[6..8].copy_from_slice(&frag.to_be_bytes());
        h.extend_from_slice(&src);
        h.extend_from_slice(&[203, 0, 113, 25]);
        h.extend_from_slice(payload);
        h
    }

    /// IPv6 with extension headers given as (type, bytes) after the fixed
    /// header; the last header's "next" is TCP.
    fn ipv6(src: [u8; 16], exts: &[(u8, Vec<u8>)], payload: &[u8]) -> Vec<u8> {
        let mut chain = Vec::new();
        for (i, (_, body)) in exts.iter().enumerate() {
            let mut b = body.clone();
            b[0] = exts.get(i + 1).map_or(IPPROTO_TCP, |(t, _)| *t);
            chain.extend_from_slice(&b);
        }
        chain.extend_from_slice(payload);
        let mut h = vec![0x60, 0, 0, 0];
        h.extend_from_slice(&(chain.len() as u16).to_be_bytes());
        h.push(exts.first().map_or(IPPROTO_TCP, |(t, _)| *t));
        h.push(64);
        h.extend_from_slice(&src);
        h.extend_from_slice(&[
            0x20, 0x01, 0x0d, 0xb8, 0, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x25,
        ]);
        h.extend_from_slice(&chain);
        h
    }

    fn dest_opts() -> (u8, Vec<u8>) {
        (60, vec![0, 0, 1, 4, 0, 0, 0, 0])
    }

    fn frag_hdr(offset: u16, more: bool) -> (u8, Vec<u8>) {
        let mut b = vec![0u8; 8];
        b[2..4].copy_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
        (44, b)
    }

    const V6_SRC: [u8; 16] = [
        0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20,
    ];

    fn frame(vlans: &[u16], l3: Vec<u8>, ethertype: u16) -> Vec<u8> {
        let mut f = eth(vlans, ethertype);
        f.extend_from_slice(&l3);
        f
    }

    fn deny_reason(p: Parsed) -> (Family, Reason) {
        match p {
            Parsed::Deny(f, r) => (f, r),
            _ => panic!("expected a denial"),
        }
    }

    #[test]
    fn ipv4_smtp_syn_is_recognised() {
        let f = frame(&[], ipv4([192, 0, 2, 20], 0, &tcp(25, TCP_SYN)), ETH_P_IP);
        let Parsed::Smtp(s) = parse(&f, false) else {
            panic!("not SMTP")
        };
        assert!(matches!(s.source, Source::V4([192, 0, 2, 20])));
        assert!(s.is_syn());
        assert_eq!((s.l3, s.l4, s.payload), (14, 34, 0));
        // Other ports, and other protocols, are left alone.
        let f = frame(&[], ipv4([192, 0, 2, 20], 0, &tcp(80, TCP_SYN)), ETH_P_IP);
        assert!(matches!(parse(&f, false), Parsed::Other));
        let mut udp = ipv4([192, 0, 2, 20], 0, &tcp(25, 0));
        udp[9] = 17;
        assert!(matches!(
            parse(&frame(&[], udp, ETH_P_IP), false),
            Parsed::Other
        ));
        assert!(matches!(parse(&eth(&[], 0x0806), false), Parsed::Other));
    }

    #[test]
    fn ipv4_options_are_skipped() {
        let mut l3 = ipv4([192, 0, 2, 20], 0, &[]);
        l3[0] = 0x46; // 24-byte header
        l3.extend_from_slice(&[1, 1, 1, 0]); // NOPs and end of options
        l3.extend_from_slice(&tcp(587, TCP_SYN));
        l3[2..4].copy_from_slice(&44u16.to_be_bytes());
        let Parsed::Smtp(s) = parse(&frame(&[], l3, ETH_P_IP), false) else {
            panic!()
        };
        assert_eq!(s.l4, 14 + 24);
    }

    #[test]
    fn vlan_tags_up_to_the_limit() {
        for tags in 0..=4usize {
            let vlans: Vec<u16> = (0..tags as u16).map(|i| 100 + i).collect();
            let f = frame(
                &vlans,
                ipv4([192, 0, 2, 20], 0, &tcp(25, TCP_SYN)),
                ETH_P_IP,
            );
            assert!(
                matches!(parse(&f, false), Parsed::Smtp(_)),
                "{tags} tags in data"
            );
        }
        let f = frame(
            &[1, 2, 3, 4, 5],
            ipv4([192, 0, 2, 20], 0, &tcp(25, TCP_SYN)),
            ETH_P_IP,
        );
        assert_eq!(
            deny_reason(parse(&f, false)),
            (Family::Other, Reason::VlanTooDeep)
        );
        // A tag already in skb metadata counts too.
        let f = frame(
            &[1, 2, 3, 4],
            ipv4([192, 0, 2, 20], 0, &tcp(25, TCP_SYN)),
            ETH_P_IP,
        );
        assert_eq!(
            deny_reason(parse(&f, true)),
            (Family::Other, Reason::VlanTooDeep)
        );
        let f = frame(
            &[1, 2, 3],
            ipv4([192, 0, 2, 20], 0, &tcp(25, TCP_SYN)),
            ETH_P_IP,
        );
        assert!(matches!(parse(&f, true), Parsed::Smtp(_)));
    }

    #[test]
    fn ipv4_fragments() {
        let seg = tcp(25, TCP_SYN);
        // First fragment with only 8 bytes of TCP: dropped as tiny.
        let f = frame(&[], ipv4([192, 0, 2, 20], 0x2000, &seg[..8]), ETH_P_IP);
        assert_eq!(
            deny_reason(parse(&f, false)),
            (Family::Ipv4, Reason::TinyFragment)
        );
        // ...unless its visible port is not SMTP.
        let other = tcp(80, TCP_SYN);
        let f = frame(&[], ipv4([192, 0, 2, 20], 0x2000, &other[..8]), ETH_P_IP);
        assert!(matches!(parse(&f, false), Parsed::Other));
        // Too short to show the port at all.
        let f = frame(&[], ipv4([192, 0, 2, 20], 0x2000, &seg[..2]), ETH_P_IP);
        assert_eq!(
            deny_reason(parse(&f, false)),
            (Family::Ipv4, Reason::TinyFragment)
        );
        // Offset 8 bytes: overlap of the TCP header.
        let f = frame(&[], ipv4([192, 0, 2, 20], 0x2001, &seg[8..16]), ETH_P_IP);
        assert_eq!(
            deny_reason(parse(&f, false)),
            (Family::Ipv4, Reason::FragmentOverlap)
        );
        // Later fragments pass, counted.
        let f = frame(&[], ipv4([192, 0, 2, 20], 0x0010, &[0; 16]), ETH_P_IP);
        assert!(matches!(
            parse(&f, false),
            Parsed::Pass(Family::Ipv4, Reason::NonFirstFragment)
        ));
        // A whole TCP header in the first fragment is judged normally.
        let f = frame(&[], ipv4([192, 0, 2, 20], 0x2000, &seg), ETH_P_IP);
        assert!(matches!(parse(&f, false), Parsed::Smtp(_)));
    }

    #[test]
    fn malformed_and_truncated() {
        let mut l3 = ipv4([192, 0, 2, 20], 0, &tcp(25, TCP_SYN));
        l3[0] = 0x44; // IHL 4
        assert_eq!(
            deny_reason(parse(&frame(&[], l3, ETH_P_IP), false)),
            (Family::Ipv4, Reason::Malformed)
        );
        let mut bad_doff = tcp(25, TCP_SYN);
        bad_doff[12] = 4 << 4;
        let f = frame(&[], ipv4([192, 0, 2, 20], 0, &bad_doff), ETH_P_IP);
        assert_eq!(
            deny_reason(parse(&f, false)),
            (Family::Ipv4, Reason::Malformed)
        );
        let f = frame(&[], ipv4([192, 0, 2, 20], 0, &tcp(25, TCP_SYN)), ETH_P_IP);
        assert!(matches!(
            parse(&f[..40], false),
            Parsed::Truncated(Family::Ipv4)
        ));
    }

    #[test]
    fn ipv6_extension_headers_are_walked() {
        let f = frame(&[], ipv6(V6_SRC, &[], &tcp(25, TCP_SYN)), ETH_P_IPV6);
        let Parsed::Smtp(s) = parse(&f, false) else {
            panic!()
        };
        assert!(matches!(s.source, Source::V6(a) if a == V6_SRC));
        let exts: Vec<_> = (0..8).map(|_| dest_opts()).collect();
        let f = frame(&[], ipv6(V6_SRC, &exts, &tcp(25, TCP_SYN)), ETH_P_IPV6);
        let Parsed::Smtp(s) = parse(&f, false) else {
            panic!("8 headers are allowed")
        };
        assert_eq!(s.l4, 14 + 40 + 64);
        let exts: Vec<_> = (0..9).map(|_| dest_opts()).collect();
        let f = frame(&[], ipv6(V6_SRC, &exts, &tcp(25, TCP_SYN)), ETH_P_IPV6);
        assert_eq!(
            deny_reason(parse(&f, false)),
            (Family::Ipv6, Reason::HeaderChainTooLong)
        );
        // A chain ending in something else than TCP is not ours.
        let mut udp = ipv6(V6_SRC, &[], &tcp(25, 0));
        udp[6] = 17;
        assert!(matches!(
            parse(&frame(&[], udp, ETH_P_IPV6), false),
            Parsed::Other
        ));
    }

    #[test]
    fn ipv6_fragments() {
        let seg = tcp(25, TCP_SYN);
        // RFC 7112: first fragment without the whole chain and TCP header.
        let f = frame(
            &[],
            ipv6(V6_SRC, &[frag_hdr(0, true), dest_opts()], &seg[..4]),
            ETH_P_IPV6,
        );
        assert_eq!(
            deny_reason(parse(&f, false)),
            (Family::Ipv6, Reason::IncompleteChain)
        );
        let f = frame(&[], ipv6(V6_SRC, &[frag_hdr(0, true)], &seg), ETH_P_IPV6);
        assert!(matches!(parse(&f, false), Parsed::Smtp(_)));
        let f = frame(
            &[],
            ipv6(V6_SRC, &[frag_hdr(1, true)], &seg[8..16]),
            ETH_P_IPV6,
        );
        assert_eq!(
            deny_reason(parse(&f, false)),
            (Family::Ipv6, Reason::FragmentOverlap)
        );
        let f = frame(
            &[],
            ipv6(V6_SRC, &[frag_hdr(4, false)], &[0; 8]),
            ETH_P_IPV6,
        );
        assert!(matches!(
            parse(&f, false),
            Parsed::Pass(Family::Ipv6, Reason::NonFirstFragment)
        ));
    }

    #[test]
    fn ipv4_mapped_and_compatible_sources_are_refused() {
        let mut mapped = [0u8; 16];
        mapped[10] = 0xff;
        mapped[11] = 0xff;
        mapped[12..].copy_from_slice(&[192, 0, 2, 10]);
        let f = frame(&[], ipv6(mapped, &[], &tcp(25, TCP_SYN)), ETH_P_IPV6);
        assert_eq!(
            deny_reason(parse(&f, false)),
            (Family::Ipv6, Reason::MappedAddress)
        );
        let mut compat = [0u8; 16];
        compat[12..].copy_from_slice(&[192, 0, 2, 10]);
        let f = frame(&[], ipv6(compat, &[], &tcp(25, TCP_SYN)), ETH_P_IPV6);
        assert_eq!(
            deny_reason(parse(&f, false)),
            (Family::Ipv6, Reason::MappedAddress)
        );
        let mut loopback = [0u8; 16];
        loopback[15] = 1;
        let f = frame(&[], ipv6(loopback, &[], &tcp(25, TCP_SYN)), ETH_P_IPV6);
        assert!(
            matches!(parse(&f, false), Parsed::Smtp(_)),
            "::1 is an ordinary source"
        );
    }

    fn quick_look(frame: &[u8]) -> Quick {
        let pkt = Bytes {
            start: frame.as_ptr() as usize,
            end: frame.as_ptr() as usize + frame.len(),
        };
        quick(&pkt, &smtp_ports)
    }

    fn same_source(a: &Source, b: &Source) -> bool {
        match (a, b) {
            (Source::V4(a), Source::V4(b)) => a == b,
            (Source::V6(a), Source::V6(b)) => a == b,
            _ => false,
        }
    }

    #[test]
    fn quick_takes_ordinary_traffic() {
        let v4 = frame(
            &[],
            ipv4([192, 0, 2, 20], 0x4000, &tcp(443, TCP_SYN)),
            ETH_P_IP,
        );
        let v6 = frame(&[], ipv6(V6_SRC, &[], &tcp(443, TCP_SYN)), ETH_P_IPV6);
        let mut udp = ipv4([192, 0, 2, 20], 0, &[0; 8]);
        udp[9] = 17;
        let udp = frame(&[], udp, ETH_P_IP);
        let arp = frame(&[], vec![0; 28], 0x0806);
        for f in [&v4, &v6, &udp, &arp] {
            assert!(matches!(quick_look(f), Quick::Other), "{f:02x?}");
        }
        let smtp4 = frame(&[], ipv4([192, 0, 2, 20], 0, &tcp(25, TCP_SYN)), ETH_P_IP);
        let Quick::Smtp(Source::V4(a), TCP_SYN, 25) = quick_look(&smtp4) else {
            panic!("IPv4 SMTP SYN not recognised");
        };
        assert_eq!(a, [192, 0, 2, 20]);
        let smtp6 = frame(&[], ipv6(V6_SRC, &[], &tcp(587, TCP_ACK)), ETH_P_IPV6);
        let Quick::Smtp(Source::V6(a), TCP_ACK, _) = quick_look(&smtp6) else {
            panic!("IPv6 SMTP not recognised");
        };
        assert_eq!(a, V6_SRC);
        // What it must leave to the full parser.
        let tagged = frame(&[7], ipv4([192, 0, 2, 20], 0, &tcp(443, TCP_SYN)), ETH_P_IP);
        let fragment = frame(&[], ipv4([192, 0, 2, 20], 0x2000, &tcp(25, 0)), ETH_P_IP);
        let options = {
            let mut h = ipv4([192, 0, 2, 20], 0, &[0; 24]);
            h[0] = 0x46;
            frame(&[], h, ETH_P_IP)
        };
        let chain = frame(&[], ipv6(V6_SRC, &[dest_opts()], &tcp(443, 0)), ETH_P_IPV6);
        let mut mapped = [0u8; 16];
        mapped[10..].copy_from_slice(&[0xff, 0xff, 192, 0, 2, 10]);
        let mapped = frame(&[], ipv6(mapped, &[], &tcp(443, 0)), ETH_P_IPV6);
        for f in [&tagged, &fragment, &options, &chain, &mapped] {
            assert!(matches!(quick_look(f), Quick::Unsure), "{f:02x?}");
        }
    }

    /// Feeds `each` packets near the interesting cases: the seeds with
    /// random bytes changed and random tails cut off.
    fn mutations(seeds: &[Vec<u8>], rounds: usize, mut each: impl FnMut(&[u8], u64)) {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..rounds {
            let mut f = seeds[round % seeds.len()].clone();
            for _ in 0..1 + next() % 3 {
                let i = (next() % f.len() as u64) as usize;
                // Mostly values the decisions rest on, sometimes any.
                f[i] = match next() % 4 {
                    0 => 0,
                    1 => [0x45, 0x46, 0x60, 0x06, 0x11, 0x2c, 0x3c, 0x20, 0x40, 0xff]
                        [(next() % 10) as usize],
                    _ => next() as u8,
                };
            }
            if next() % 8 == 0 {
                f.truncate((next() % f.len() as u64) as usize);
            }
            each(&f, next());
        }
    }

    /// Whether a quick answer agrees with the parser's: (other, smtp) tallies.
    fn tally(quick: &Quick, parsed: &Parsed, f: &[u8], other: &mut u32, smtp: &mut u32) {
        match (quick, parsed) {
            (Quick::Unsure, _) => {}
            (Quick::Other, Parsed::Other) => *other += 1,
            (Quick::Smtp(src, flags, dport), Parsed::Smtp(s))
                if same_source(src, &s.source) && *flags == s.flags && *dport == s.dport =>
            {
                *smtp += 1;
            }
            _ => panic!("the quick look contradicts the parser on {f:02x?}"),
        }
    }

    fn mapped_source() -> [u8; 16] {
        let mut mapped = [0u8; 16];
        mapped[10..].copy_from_slice(&[0xff, 0xff, 192, 0, 2, 10]);
        mapped
    }

    /// IP packets near the interesting cases, without a link-layer header.
    fn l3_seeds() -> Vec<(Vec<u8>, u16)> {
        vec![
            (ipv4([192, 0, 2, 20], 0, &tcp(443, TCP_SYN)), ETH_P_IP),
            (ipv4([192, 0, 2, 20], 0, &tcp(25, TCP_SYN)), ETH_P_IP),
            (ipv4([192, 0, 2, 20], 0x2000, &tcp(25, 0)[..8]), ETH_P_IP),
            (ipv6(V6_SRC, &[], &tcp(443, TCP_SYN)), ETH_P_IPV6),
            (ipv6(V6_SRC, &[], &tcp(25, TCP_SYN)), ETH_P_IPV6),
            (ipv6(mapped_source(), &[], &tcp(25, 0)), ETH_P_IPV6),
            (ipv6(V6_SRC, &[frag_hdr(0, true)], &tcp(25, 0)), ETH_P_IPV6),
        ]
    }

    /// The quick look may only answer where the full parser answers the
    /// same.
    #[test]
    fn quick_never_contradicts_the_parser() {
        let mut seeds: Vec<Vec<u8>> = l3_seeds()
            .into_iter()
            .map(|(p, ethertype)| frame(&[], p, ethertype))
            .collect();
        seeds.push(frame(&[7], ipv4([192, 0, 2, 20], 0, &tcp(25, 0)), ETH_P_IP));
        let (mut other, mut smtp) = (0, 0);
        mutations(&seeds, 200_000, |f, _| {
            for tag in [false, true] {
                tally(&quick_look(f), &parse(f, tag), f, &mut other, &mut smtp);
            }
        });
        assert!(
            other > 10_000 && smtp > 10_000,
            "hardly used: {other} {smtp}"
        );
    }

    /// The same on an L3 device, where skb->protocol comes from outside the
    /// packet: each mutated packet is judged under every protocol, the
    /// matching one, the other IP one and a non-IP one.
    #[test]
    fn quick_l3_never_contradicts_the_parser() {
        let seeds: Vec<Vec<u8>> = l3_seeds().into_iter().map(|(p, _)| p).collect();
        let (mut other, mut smtp) = (0, 0);
        mutations(&seeds, 200_000, |f, _| {
            for ethertype in [ETH_P_IP, ETH_P_IPV6, 0x8847] {
                tally(
                    &quick_l3_look(f, ethertype),
                    &parse_l3(f, ethertype),
                    f,
                    &mut other,
                    &mut smtp,
                );
            }
        });
        assert!(
            other > 10_000 && smtp > 10_000,
            "hardly used: {other} {smtp}"
        );
    }

    fn parse_l3(packet: &[u8], ethertype: u16) -> Parsed {
        let pkt = Bytes {
            start: packet.as_ptr() as usize,
            end: packet.as_ptr() as usize + packet.len(),
        };
        l3(&pkt, ethertype, &smtp_ports)
    }

    fn quick_l3_look(packet: &[u8], ethertype: u16) -> Quick {
        let pkt = Bytes {
            start: packet.as_ptr() as usize,
            end: packet.as_ptr() as usize + packet.len(),
        };
        quick_l3(&pkt, ethertype, &smtp_ports)
    }

    /// What a parse came to, comparable across header offsets.
    fn outcome(p: &Parsed) -> std::string::String {
        use std::format;
        match p {
            Parsed::Other => "other".into(),
            Parsed::Smtp(s) => {
                let src = match s.source {
                    Source::V4(a) => format!("{a:?}"),
                    Source::V6(a) => format!("{a:?}"),
                };
                format!("smtp {src} {} {}", s.payload, s.flags)
            }
            Parsed::Pass(f, r) => format!("pass {f:?} {r:?}"),
            Parsed::Deny(f, r) => format!("deny {f:?} {r:?}"),
            Parsed::Truncated(f) => format!("truncated {f:?}"),
        }
    }

    #[test]
    fn l3_packets_parse_from_offset_zero() {
        let Parsed::Smtp(s) = parse_l3(&ipv4([192, 0, 2, 20], 0, &tcp(25, TCP_SYN)), ETH_P_IP)
        else {
            panic!("IPv4 SMTP SYN not recognised");
        };
        assert!(matches!(s.source, Source::V4([192, 0, 2, 20])));
        assert_eq!((s.l3, s.l4), (0, 20));
        let Parsed::Smtp(s) = parse_l3(&ipv6(V6_SRC, &[], &tcp(25, TCP_SYN)), ETH_P_IPV6) else {
            panic!("IPv6 SMTP SYN not recognised");
        };
        assert_eq!((s.l3, s.l4), (0, 40));
        assert!(matches!(
            parse_l3(&ipv4([192, 0, 2, 20], 0, &tcp(80, TCP_SYN)), ETH_P_IP),
            Parsed::Other
        ));
        let Quick::Smtp(Source::V4(a), TCP_SYN, 25) =
            quick_l3_look(&ipv4([192, 0, 2, 20], 0, &tcp(25, TCP_SYN)), ETH_P_IP)
        else {
            panic!("the quick look missed an IPv4 SMTP SYN");
        };
        assert_eq!(a, [192, 0, 2, 20]);
        let Quick::Smtp(Source::V6(a), TCP_SYN, 587) =
            quick_l3_look(&ipv6(V6_SRC, &[], &tcp(587, TCP_SYN)), ETH_P_IPV6)
        else {
            panic!("the quick look missed an IPv6 SMTP SYN");
        };
        assert_eq!(a, V6_SRC);
        assert!(matches!(
            quick_l3_look(&ipv6(V6_SRC, &[], &tcp(443, TCP_SYN)), ETH_P_IPV6),
            Quick::Other
        ));
    }

    /// Every evasion class, and everything else, comes to the same verdict
    /// with or without an Ethernet header in front.
    #[test]
    fn l3_agrees_with_ethernet_on_the_same_packet() {
        let seg = tcp(25, TCP_SYN);
        let mut compat = [0u8; 16];
        compat[12..].copy_from_slice(&[192, 0, 2, 10]);
        let long: Vec<_> = (0..9).map(|_| dest_opts()).collect();
        let classes = [
            (
                ipv4([192, 0, 2, 20], 0x2000, &seg[..8]),
                ETH_P_IP,
                "deny Ipv4 TinyFragment",
            ),
            (
                ipv4([192, 0, 2, 20], 0x2001, &seg[8..16]),
                ETH_P_IP,
                "deny Ipv4 FragmentOverlap",
            ),
            (
                ipv4([192, 0, 2, 20], 0x0010, &[0; 16]),
                ETH_P_IP,
                "pass Ipv4 NonFirstFragment",
            ),
            (
                ipv6(V6_SRC, &[frag_hdr(0, true), dest_opts()], &seg[..4]),
                ETH_P_IPV6,
                "deny Ipv6 IncompleteChain",
            ),
            (
                ipv6(V6_SRC, &[frag_hdr(1, true)], &seg[8..16]),
                ETH_P_IPV6,
                "deny Ipv6 FragmentOverlap",
            ),
            (
                ipv6(V6_SRC, &long, &seg),
                ETH_P_IPV6,
                "deny Ipv6 HeaderChainTooLong",
            ),
            (
                ipv6(mapped_source(), &[], &seg),
                ETH_P_IPV6,
                "deny Ipv6 MappedAddress",
            ),
            (
                ipv6(compat, &[], &seg),
                ETH_P_IPV6,
                "deny Ipv6 MappedAddress",
            ),
        ];
        for (packet, ethertype, want) in &classes {
            let l3 = outcome(&parse_l3(packet, *ethertype));
            assert_eq!(&l3, want, "{packet:02x?}");
            assert_eq!(
                l3,
                outcome(&parse(&frame(&[], packet.clone(), *ethertype), false))
            );
        }
        // And on mutated packets whose version agrees with the protocol.
        let seeds: Vec<Vec<u8>> = l3_seeds().into_iter().map(|(p, _)| p).collect();
        let mut compared = 0;
        mutations(&seeds, 100_000, |p, _| {
            let ethertype = match p.first().map(|b| b >> 4) {
                Some(4) => ETH_P_IP,
                Some(6) => ETH_P_IPV6,
                _ => return,
            };
            let eth = frame(&[], p.to_vec(), ethertype);
            assert_eq!(
                outcome(&parse_l3(p, ethertype)),
                outcome(&parse(&eth, false)),
                "{p:02x?}"
            );
            compared += 1;
        });
        assert!(compared > 50_000, "{compared}");
    }

    #[test]
    fn l3_version_must_agree_with_skb_protocol() {
        let v4 = ipv4([192, 0, 2, 20], 0, &tcp(25, TCP_SYN));
        let v6 = ipv6(V6_SRC, &[], &tcp(25, TCP_SYN));
        // IPv4 bytes sent as IPv6 (or as anything else), and the reverse: a
        // tun reader would see SMTP, so they are refused.
        for ethertype in [ETH_P_IPV6, 0x8847, 0] {
            assert_eq!(
                deny_reason(parse_l3(&v4, ethertype)),
                (Family::Ipv4, Reason::Malformed),
                "{ethertype:#x}"
            );
            assert!(matches!(quick_l3_look(&v4, ethertype), Quick::Unsure));
        }
        for ethertype in [ETH_P_IP, 0x8847] {
            assert_eq!(
                deny_reason(parse_l3(&v6, ethertype)),
                (Family::Ipv6, Reason::Malformed),
                "{ethertype:#x}"
            );
        }
        // A later fragment under the wrong protocol is refused too; one
        // whose port is not SMTP under either reading is none of ours.
        let later = ipv4([192, 0, 2, 20], 0x0010, &[0; 16]);
        assert_eq!(
            deny_reason(parse_l3(&later, ETH_P_IPV6)),
            (Family::Ipv4, Reason::Malformed)
        );
        let web = ipv4([192, 0, 2, 20], 0, &tcp(80, TCP_SYN));
        assert!(matches!(parse_l3(&web, ETH_P_IPV6), Parsed::Other));
        // Not IP by its own header: nobody reads it as IP.
        let mut garbage = v4.clone();
        garbage[0] = 0x55;
        assert!(matches!(parse_l3(&garbage, ETH_P_IP), Parsed::Other));
        assert!(matches!(quick_l3_look(&garbage, ETH_P_IP), Quick::Other));
        // No data at all: pulled in and parsed again, or malformed.
        assert!(matches!(
            parse_l3(&[], ETH_P_IP),
            Parsed::Truncated(Family::Ipv4)
        ));
        assert!(matches!(
            parse_l3(&[0x45], 0x8847),
            Parsed::Truncated(Family::Other)
        ));
    }
}
