#!/usr/bin/python3
"""The far end of a tunnel, for the lab: an L3 device whose traffic a test
controls completely.

Usage: tun.py NAME CONTROL_SOCKET LOG [answer]

Opens /dev/net/tun as NAME with IFF_TUN | IFF_NO_PI (no link-layer header,
no packet information: what WireGuard and most VPNs look like to the
kernel), prints "ready", and then:

- logs every packet the kernel sends out of NAME to LOG, one JSON object a
  line: {"v", "src", "dst", "proto", "frag", and for TCP "sport", "dport",
  "flags"}; "frag" is true for any fragment;
- with "answer", answers a SYN with a SYN-ACK and a FIN with a RST, as a
  host beyond the tunnel that accepts every connection would, so that a
  client's connect() through the gateway completes;
- serves one JSON request per connection on the Unix socket CONTROL_SOCKET:
    {"op": "send", "kind": K, "src": S, "dst": D, "count": N}
        writes N packets of kind K (see craft.py) into NAME, as if they came
        out of the tunnel; answers {"sent": n};
    {"op": "reply", "kind": K, "src": S, "dst": D}
        writes one and answers with what came back out of NAME for it within
        2 s, as craft.py describes it, or null.
"""
import fcntl
import json
import os
import random
import socket
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from scapy.all import IP, TCP, IPv6, IPv6ExtHdrFragment, conf  # noqa: E402

from craft import describe, packets  # noqa: E402

conf.verb = 0
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000

name, control, log_path = sys.argv[1:4]
answer = len(sys.argv) > 4 and sys.argv[4] == "answer"

fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))

received = []
cond = threading.Condition()


def decode(data):
    version = data[0] >> 4 if data else 0
    if version == 4:
        return IP(data)
    if version == 6:
        return IPv6(data)
    return None


def summary(pkt):
    ip = pkt.getlayer(IP) or pkt.getlayer(IPv6)
    out = {"v": 4 if isinstance(ip, IP) else 6, "src": ip.src, "dst": ip.dst}
    if isinstance(ip, IP):
        out["proto"] = ip.proto
        out["frag"] = bool(ip.frag or ip.flags.MF)
    else:
        frag = pkt.getlayer(IPv6ExtHdrFragment)
        out["proto"] = ip.nh
        out["frag"] = frag is not None
    t = pkt.getlayer(TCP)
    if t is not None and not out["frag"]:
        out.update(sport=t.sport, dport=t.dport, flags=str(t.flags))
    return out


def respond(pkt):
    """The far host's side of a connection: accept it, then reset it when
    the client closes, so nothing lingers to be retransmitted."""
    t = pkt.getlayer(TCP)
    if t is None or pkt.getlayer(IPv6ExtHdrFragment) is not None:
        return
    ip = pkt.getlayer(IP) or pkt.getlayer(IPv6)
    back = IP(src=ip.dst, dst=ip.src) if isinstance(ip, IP) else IPv6(src=ip.dst, dst=ip.src)
    if t.flags == "S":
        seg = TCP(sport=t.dport, dport=t.sport, flags="SA", seq=random.randint(0, 2**31), ack=t.seq + 1)
    elif t.flags.F:
        seg = TCP(sport=t.dport, dport=t.sport, flags="R", seq=t.ack)
    else:
        return
    os.write(fd, bytes(back / seg))


def reader():
    with open(log_path, "a") as log:
        while True:
            data = os.read(fd, 65536)
            try:
                pkt = decode(data)
                if pkt is None:
                    log.write(json.dumps({"v": data[0] >> 4 if data else None}) + "\n")
                    log.flush()
                    continue
                log.write(json.dumps(summary(pkt)) + "\n")
                log.flush()
            except Exception as e:  # a packet scapy cannot take is still logged
                log.write(json.dumps({"error": str(e)}) + "\n")
                log.flush()
                continue
            with cond:
                received.append(pkt)
                cond.notify_all()
            if answer:
                respond(pkt)


def reply_to(sent, timeout=2.0):
    """The first packet out of the tunnel that answers `sent`'s ports."""
    syn = sent.getlayer(TCP)
    dst = (sent.getlayer(IP) or sent.getlayer(IPv6)).dst
    deadline = time.monotonic() + timeout
    with cond:
        start = len(received)
        os.write(fd, bytes(sent))
        while True:
            for pkt in received[start:]:
                t = pkt.getlayer(TCP)
                ip = pkt.getlayer(IP) or pkt.getlayer(IPv6)
                if t is not None and ip.src == dst and t.sport == syn.dport and t.dport == syn.sport:
                    return pkt
            start = len(received)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            cond.wait(left)


def handle(req):
    if req["op"] == "send":
        sent = 0
        for _ in range(int(req["count"])):
            for pkt in packets(req["kind"], req["src"], req["dst"]):
                os.write(fd, bytes(pkt))
                sent += 1
        return {"sent": sent}
    if req["op"] == "reply":
        sent = packets(req["kind"], req["src"], req["dst"])[0]
        return describe(sent, reply_to(sent))
    return {"error": f"unknown op {req['op']}"}


threading.Thread(target=reader, daemon=True).start()
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
if os.path.exists(control):
    os.unlink(control)
server.bind(control)
server.listen(4)
print("ready", flush=True)
while True:
    conn, _ = server.accept()
    with conn:
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = conn.recv(4096)
            if not chunk:
                break
            buf += chunk
        try:
            out = handle(json.loads(buf))
        except Exception as e:
            out = {"error": repr(e)}
        conn.sendall((json.dumps(out) + "\n").encode())
