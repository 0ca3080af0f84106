//! Building the TCP RST that answers a rejected packet (RFC 9293, 3.10.7.1).
//!
//! Pure functions over header bytes, so the kernel program and the host's
//! unit tests run the same code. The RST goes back to the sender: addresses
//! and ports swapped, and
//! - if the offending segment had ACK set, `seq = its ack`, flags RST;
//! - otherwise `seq = 0`, `ack = its seq + its length`, flags RST|ACK,
//!   where SYN and FIN each count as one.

use crate::parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

pub const V4_LEN: usize = 20 + 20;
pub const V6_LEN: usize = 40 + 20;
const TTL: u8 = 64;

/// Whether a segment may be answered with a RST: never answer a RST.
#[inline(always)]
#[must_use]
pub fn answerable(flags: u8) -> bool {
    flags & TCP_RST == 0
}

/// The reply's TCP header, without its checksum.
#[inline(always)]
fn tcp_header(orig: &[u8; 20], payload: u32) -> [u8; 20] {
    let flags = orig[13];
    let seq = u32::from_be_bytes([orig[4], orig[5], orig[6], orig[7]]);
    let ack = u32::from_be_bytes([orig[8], orig[9], orig[10], orig[11]]);
    let (rseq, rack, rflags) = if flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        let len = payload + u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
        (0, seq.wrapping_add(len), TCP_RST | TCP_ACK)
    };
    let mut t = [0u8; 20];
    t[0..2].copy_from_slice(&orig[2..4]);
    t[2..4].copy_from_slice(&orig[0..2]);
    t[4..8].copy_from_slice(&rseq.to_be_bytes());
    t[8..12].copy_from_slice(&rack.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = rflags;
    t
}

/// Adds big-endian 16-bit words to a one's-complement running sum.
#[inline(always)]
fn sum16<const N: usize>(bytes: &[u8; N], mut acc: u32) -> u32 {
    let mut i = 0;
    while i + 1 < N {
        acc += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    acc
}

#[inline(always)]
fn fold(mut acc: u32) -> u16 {
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    !(acc as u16)
}

/// The reply's IPv4 and TCP headers, given the offending packet's IPv4
/// header (first 20 bytes) and TCP header (first 20 bytes).
#[inline(always)]
#[must_use]
pub fn v4(ip: &[u8; 20], tcp: &[u8; 20], payload: u32) -> [u8; V4_LEN] {
    let mut out = [0u8; V4_LEN];
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&(V4_LEN as u16).to_be_bytes());
    h[6] = 0x40; // don't fragment
    h[8] = TTL;
    h[9] = crate::parse::IPPROTO_TCP;
    h[12..16].copy_from_slice(&ip[16..20]);
    h[16..20].copy_from_slice(&ip[12..16]);
    let csum = fold(sum16(&h, 0));
    h[10..12].copy_from_slice(&csum.to_be_bytes());

    let mut t = tcp_header(tcp, payload);
    // Pseudo-header: source, destination, zero, protocol, TCP length.
    let mut acc = sum16(&[h[12], h[13], h[14], h[15], h[16], h[17], h[18], h[19]], 0);
    acc += u32::from(crate::parse::IPPROTO_TCP) + 20;
    let csum = fold(sum16(&t, acc));
    t[16..18].copy_from_slice(&csum.to_be_bytes());

    out[..20].copy_from_slice(&h);
    out[20..].copy_from_slice(&t);
    out
}

/// The reply's IPv6 and TCP headers, given the offending packet's fixed
/// IPv6 header and TCP header. Extension headers are not copied back.
#[inline(always)]
#[must_use]
pub fn v6(ip: &[u8; 40], tcp: &[u8; 20], payload: u32) -> [u8; V6_LEN] {
    let mut out = [0u8; V6_LEN];
    out[0] = 0x60;
    out[4..6].copy_from_slice(&20u16.to_be_bytes());
    out[6] = crate::parse::IPPROTO_TCP;
    out[7] = TTL;
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&ip[24..40]);
    dst.copy_from_slice(&ip[8..24]);
    out[8..24].copy_from_slice(&src);
    out[24..40].copy_from_slice(&dst);

    let mut t = tcp_header(tcp, payload);
    let mut acc = sum16(&src, 0);
    acc = sum16(&dst, acc);
    acc += 20 + u32::from(crate::parse::IPPROTO_TCP);
    let csum = fold(sum16(&t, acc));
    t[16..18].copy_from_slice(&csum.to_be_bytes());
    out[40..].copy_from_slice(&t);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header with a correct checksum sums to 0xffff.
    fn verifies(words: &[u8], seed: u32) -> bool {
        let mut acc = seed;
        for pair in words.chunks(2) {
            acc += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
        }
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc == 0xffff
    }

    fn syn(seq: u32) -> [u8; 20] {
        let mut t = [0u8; 20];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&25u16.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = TCP_SYN;
        t
    }

    #[test]
    fn v4_rst_answers_a_syn() {
        let mut ip = [0u8; 20];
        ip[12..16].copy_from_slice(&[192, 0, 2, 20]);
        ip[16..20].copy_from_slice(&[203, 0, 113, 25]);
        let out = v4(&ip, &syn(0xffff_ffff), 0);
        assert_eq!(&out[12..16], &[203, 0, 113, 25]);
        assert_eq!(&out[16..20], &[192, 0, 2, 20]);
        assert!(verifies(&out[..20], 0), "IPv4 header checksum");
        let t = &out[20..];
        assert_eq!(u16::from_be_bytes([t[0], t[1]]), 25);
        assert_eq!(u16::from_be_bytes([t[2], t[3]]), 40000);
        assert_eq!(
            u32::from_be_bytes([t[8], t[9], t[10], t[11]]),
            0,
            "ack wraps past 2^32"
        );
        assert_eq!(t[13], TCP_RST | TCP_ACK);
        let mut pseudo = 6 + 20;
        for pair in out[12..20].chunks(2) {
            pseudo += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
        }
        assert!(verifies(t, pseudo), "TCP checksum");
    }

    #[test]
    fn rst_to_an_ack_uses_its_ack_number() {
        let mut seg = syn(1000);
        seg[13] = TCP_ACK;
        seg[8..12].copy_from_slice(&777u32.to_be_bytes());
        let mut ip = [0u8; 40];
        ip[8] = 0x20;
        ip[24] = 0x20;
        let out = v6(&ip, &seg, 10);
        let t = &out[40..];
        assert_eq!(u32::from_be_bytes([t[4], t[5], t[6], t[7]]), 777);
        assert_eq!(t[13], TCP_RST);
        assert!(!answerable(TCP_RST | TCP_ACK));
        assert!(answerable(TCP_SYN));
    }

    #[test]
    fn v6_rst_checksum() {
        let mut ip = [0u8; 40];
        ip[8..24].copy_from_slice(&[0x20, 1, 0xd, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20]);
        ip[24..40].copy_from_slice(&[0x20, 1, 0xd, 0xb8, 0, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x25]);
        let out = v6(&ip, &syn(41), 0);
        let t = &out[40..];
        assert_eq!(u32::from_be_bytes([t[8], t[9], t[10], t[11]]), 42);
        let mut pseudo = 6 + 20;
        for pair in out[8..40].chunks(2) {
            pseudo += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
        }
        assert!(verifies(t, pseudo));
    }
}
