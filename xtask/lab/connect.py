#!/usr/bin/python3
"""Opens one TCP connection and reports how it went, as JSON.

Usage: connect.py SRC DST PORT TIMEOUT_SECONDS

Prints {"result": "connected" | "refused" | "timeout" | "error:<errno>",
"ms": elapsed}. Always exits 0: the result is the answer.
"""
import errno
import json
import socket
import sys
import time

src, dst, port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
family = socket.AF_INET6 if ":" in dst else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
if src != "-":
    s.bind((src, 0))
s.settimeout(timeout)
start = time.monotonic()
try:
    s.connect((dst, port))
    result = "connected"
except socket.timeout:
    result = "timeout"
except ConnectionRefusedError:
    result = "refused"
except OSError as e:
    result = "error:" + errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps({"result": result, "ms": round((time.monotonic() - start) * 1000, 1)}))
