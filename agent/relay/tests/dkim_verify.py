#!/usr/bin/python3
"""Independent DKIM verifier for tests/dkim.rs: dkimpy (Debian's
python3-dkim), asking the given DNS server (the test's dnsmasq, which
publishes the records `smtpgate dkim generate` printed) for the keys.

usage: dkim_verify.py MESSAGE DNS_IP DNS_PORT

Prints one JSON line per DKIM-Signature: {"d":..., "s":..., "a":..., "h":...,
"ok": true|false}. Exits 0 only when the message has at least one signature
and every one verifies; 1 otherwise; 2 on bad usage.
"""

import json
import sys

import dkim
import dns.resolver


def main():
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    path, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with open(path, "rb") as f:
        message = f.read()

    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [ip]
    resolver.port = port

    def dnsfunc(name, timeout=5):
        if isinstance(name, bytes):
            name = name.decode()
        answer = resolver.resolve(name, "TXT", lifetime=timeout)
        # A TXT record longer than 255 octets arrives as several strings.
        return b"".join(answer[0].strings)

    d = dkim.DKIM(message)
    sigs = [v for (k, v) in d.headers if k.lower() == b"dkim-signature"]
    if not sigs:
        print(json.dumps({"error": "no DKIM-Signature"}))
        return 1
    all_ok = True
    for idx in range(len(sigs)):
        try:
            ok = bool(d.verify(idx=idx, dnsfunc=dnsfunc))
            why = ""
        except dkim.DKIMException as e:
            ok, why = False, str(e)
        tags = dkim.util.parse_tag_value(b"".join(sigs[idx].split()))
        print(
            json.dumps(
                {
                    "d": tags.get(b"d", b"").decode(),
                    "s": tags.get(b"s", b"").decode(),
                    "a": tags.get(b"a", b"").decode(),
                    "h": tags.get(b"h", b"").decode(),
                    "ok": ok,
                    "why": why,
                }
            )
        )
        all_ok = all_ok and ok
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
