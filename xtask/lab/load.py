#!/usr/bin/python3
"""Steady connection attempts, for tests that change things under traffic.

Usage: load.py SECONDS OUT PORT SRC:DST [SRC:DST ...]

Round-robins TCP connects from each SRC to DST:PORT (1 s timeout each,
about 50 attempts a second in all) for SECONDS, and appends one line per
attempt to OUT: "SRC RESULT MS START", RESULT being connected, refused,
timeout or error:<errno>, START the attempt's start as Unix time.
"""
import errno
import socket
import sys
import time

seconds, out, port = float(sys.argv[1]), sys.argv[2], int(sys.argv[3])
pairs = [p.rsplit(":", 1) if p.count(":") == 1 else p.split("/") for p in sys.argv[4:]]
deadline = time.monotonic() + seconds
with open(out, "a") as log:
    i = 0
    while time.monotonic() < deadline:
        src, dst = pairs[i % len(pairs)]
        i += 1
        fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(1.0)
        start = time.monotonic()
        wall = time.time()
        try:
            # Inside the try: while an interface is being recreated, the
            # source address may not exist for a moment (EADDRNOTAVAIL).
            s.bind((src, 0))
            s.connect((dst, port))
            result = "connected"
        except socket.timeout:
            result = "timeout"
        except ConnectionRefusedError:
            result = "refused"
        except OSError as e:
            result = "error:" + errno.errorcode.get(e.errno, str(e.errno))
        finally:
            s.close()
        log.write(f"{src} {result} {(time.monotonic() - start) * 1000:.1f} {wall:.6f}\n")
        log.flush()
        time.sleep(0.02)
