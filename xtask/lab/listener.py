#!/usr/bin/python3
"""The lab's "internet" host: TCP listeners that log every connection.

Usage: listener.py LOG PORT [PORT ...]

Each accepted connection appends "PORT PEER_ADDRESS" to LOG. On port 25 it
speaks just enough SMTP for a client to finish a transaction (banner, 250 to
commands, DATA until CRLF.CRLF); on other ports it closes at once.
"""
import asyncio
import socket
import sys

LOG = sys.argv[1]
PORTS = [int(p) for p in sys.argv[2:]]


def log(port, peer):
    host = peer[0]
    if host.startswith("::ffff:"):
        host = host[7:]
    with open(LOG, "a") as f:
        f.write(f"{port} {host}\n")
        f.flush()


async def smtp(reader, writer):
    writer.write(b"220 inet.lab ESMTP lab listener\r\n")
    in_data = False
    while True:
        line = await reader.readline()
        if not line:
            break
        if in_data:
            if line == b".\r\n":
                in_data = False
                writer.write(b"250 2.0.0 queued\r\n")
            continue
        verb = line[:4].upper()
        if verb == b"QUIT":
            writer.write(b"221 2.0.0 bye\r\n")
            break
        if verb == b"DATA":
            in_data = True
            writer.write(b"354 go ahead\r\n")
        elif verb in (b"EHLO", b"HELO"):
            writer.write(b"250 inet.lab\r\n")
        else:
            writer.write(b"250 2.0.0 ok\r\n")
        await writer.drain()
    await writer.drain()
    writer.close()


def handler(port):
    async def handle(reader, writer):
        log(port, writer.get_extra_info("peername"))
        if port == 25:
            await smtp(reader, writer)
        else:
            writer.close()
    return handle


async def main():
    servers = []
    for port in PORTS:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        servers.append(await asyncio.start_server(handler(port), sock=sock))
    print("listening", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


asyncio.run(main())
