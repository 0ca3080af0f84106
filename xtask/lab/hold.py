#!/usr/bin/python3
"""Opens connections and holds them, idle, until killed: a crowd of bots.

Usage: hold.py COUNT DST PORT SRC[,SRC...]

Connects COUNT times to DST:PORT, from the sources in turn, reads what the
server says first (a banner, or nothing), prints "held N" (the connections
that are still open) and then sleeps, sending nothing.
"""
import socket
import sys
import time

count, dst, port, sources = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4].split(",")
family = socket.AF_INET6 if ":" in dst else socket.AF_INET
held = []
for i in range(count):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.bind((sources[i % len(sources)], 0))
        s.connect((dst, port))
        held.append(s)
    except OSError:
        s.close()
time.sleep(1)
alive = 0
for s in held:
    s.setblocking(False)
    try:
        data = s.recv(4096, socket.MSG_PEEK)
        # b"" is a close; a banner (or a 421) is data.
        if data and not data.startswith(b"421"):
            alive += 1
    except BlockingIOError:
        alive += 1
    except OSError:
        pass
print(f"held {alive}", flush=True)
while True:
    time.sleep(3600)
