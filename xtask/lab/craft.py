#!/usr/bin/python3
"""Crafts the packets a well-behaved stack never sends, with scapy.

Usage: craft.py KIND IFACE GW_MAC SRC DST COUNT [VLAN,VLAN,...] [reply]

Sends COUNT frames of KIND out of IFACE to GW_MAC, each a TCP packet from SRC
to DST port 25 (or, for "syn80", port 80), wrapped in the given 802.1Q tags:
  syn           a plain SYN
  syn80         a plain SYN to port 80
  syn587        a plain SYN to port 587
  spoofed       a SYN from a random address in 198.18.0.0/15 (SRC unused):
                a flood from spoofed sources
  tiny          IPv4 first fragment holding only 8 bytes of TCP (RFC 1858)
  overlap       IPv4 fragment at offset 8 bytes, overwriting TCP flags
  v6-tiny       IPv6 first fragment whose TCP header is in the next fragment
                (RFC 7112)
  v6-overlap    IPv6 fragment at offset 8 bytes
  v6-long       IPv6 with 9 destination-options headers before TCP
  mapped        IPv6 from the IPv4-mapped form of SRC (an IPv4 address)
  compat        IPv6 from the IPv4-compatible form of SRC (an IPv4 address)
Prints the number of frames sent. With "reply", sends one frame and prints
what came back within 2 s as JSON (null for nothing): TCP flags, the VLAN
tags it carried, whether its ack number answers our SYN, whether its IP and
TCP checksums are right.
"""
import json
import random
import sys

from scapy.all import (
    IP, TCP, Dot1Q, Ether, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, Raw, conf, get_if_hwaddr, sendp, srp1,
)

conf.verb = 0


def tcp(dport=25):
    return TCP(sport=random.randint(20000, 60000), dport=dport, flags="S", seq=random.randint(0, 2**31))


def packets(kind, src, dst):
    """The IP packets of one KIND (see above), from SRC to DST, without a
    link-layer header: lab/tun.py writes them to a tun device as they are."""
    ident = random.randint(1, 65535)
    if kind == "spoofed":
        n = random.randint(0, 2**17 - 1)
        return [IP(src=f"198.{18 + (n >> 16)}.{(n >> 8) & 255}.{n & 255}", dst=dst) / tcp()]
    if kind in ("syn", "syn80", "syn587"):
        ip = IPv6(src=src, dst=dst) if ":" in dst else IP(src=src, dst=dst)
        return [ip / tcp({"syn": 25, "syn80": 80, "syn587": 587}[kind])]
    if kind == "tiny":
        seg = bytes(tcp())
        return [IP(src=src, dst=dst, id=ident, flags="MF", frag=0, proto=6) / Raw(seg[:8])]
    if kind == "overlap":
        seg = bytes(tcp())
        return [IP(src=src, dst=dst, id=ident, flags="MF", frag=1, proto=6) / Raw(seg[8:16])]
    if kind == "v6-tiny":
        seg = bytes(tcp())
        # Fragment header, then a destination-options header, then only the
        # first 4 bytes of TCP: the ports are visible, the chain is not whole.
        return [
            IPv6(src=src, dst=dst)
            / IPv6ExtHdrFragment(nh=60, offset=0, m=1, id=ident)
            / IPv6ExtHdrDestOpt(nh=6)
            / Raw(seg[:4])
        ]
    if kind == "v6-overlap":
        seg = bytes(tcp())
        return [IPv6(src=src, dst=dst) / IPv6ExtHdrFragment(nh=6, offset=1, m=1, id=ident) / Raw(seg[8:16])]
    if kind == "v6-long":
        chain = IPv6(src=src, dst=dst)
        for _ in range(8):
            chain = chain / IPv6ExtHdrDestOpt(nh=60)
        chain = chain / IPv6ExtHdrDestOpt(nh=6)
        return [chain / tcp()]
    if kind in ("mapped", "compat"):
        prefix = "::ffff:" if kind == "mapped" else "::"
        return [IPv6(src=prefix + src, dst=dst) / tcp()]
    sys.exit(f"unknown kind {kind}")


def describe(sent, reply):
    if reply is None:
        return None
    tags = [l.vlan for l in reply.iterpayloads() if isinstance(l, Dot1Q)]
    tcp_in = reply.getlayer(TCP)
    syn = sent.getlayer(TCP)
    ip = reply.getlayer(IP) or reply.getlayer(IPv6)
    fixed = ip.__class__(bytes(ip))
    for layer in (fixed, fixed.getlayer(TCP)):
        if hasattr(layer, "chksum"):
            layer.chksum = None
    recomputed = ip.__class__(bytes(fixed))
    ok_ip = not isinstance(ip, IP) or recomputed.chksum == ip.chksum
    ok_tcp = recomputed.getlayer(TCP).chksum == tcp_in.chksum
    return {
        "flags": str(tcp_in.flags),
        "vlans": tags,
        "ack_ok": tcp_in.ack == (syn.seq + 1) % 2**32,
        "ports_ok": tcp_in.sport == syn.dport and tcp_in.dport == syn.sport,
        "csum_ok": bool(ok_ip and ok_tcp),
    }


def main():
    kind, iface, gw_mac, src, dst, count = sys.argv[1:7]
    vlans = [int(v) for v in sys.argv[7].split(",")] if len(sys.argv) > 7 and sys.argv[7] else []
    count = int(count)

    def build():
        frame = Ether(src=get_if_hwaddr(iface), dst=gw_mac)
        for vid in vlans:
            frame = frame / Dot1Q(vlan=vid)
        return [frame / p for p in packets(kind, src, dst)]

    if len(sys.argv) > 8 and sys.argv[8] == "reply":
        # scapy can miss a reply that beats its sniffer to the wire (a reject
        # answers in microseconds): a few fresh SYNs make that race harmless.
        for _ in range(3):
            frame = build()[0]
            reply = srp1(frame, iface=iface, timeout=2)
            if reply is not None:
                break
        print(json.dumps(describe(frame, reply)))
        return

    frames = []
    for _ in range(count):
        frames.extend(build())
    sendp(frames, iface=iface)
    print(len(frames))


if __name__ == "__main__":
    main()
