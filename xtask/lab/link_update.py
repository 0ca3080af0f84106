#!/usr/bin/python3
"""Gives a pinned BPF link another pinned program (BPF_LINK_UPDATE), the
way an agent adopting a link does: for tests that need a link holding the
wrong program, as an older agent could have left it.

Usage: link_update.py LINK_PIN PROGRAM_PIN
"""
import ctypes
import os
import struct
import sys

NR_BPF = {"x86_64": 321, "aarch64": 280}[os.uname().machine]
BPF_OBJ_GET = 7
BPF_LINK_UPDATE = 29
libc = ctypes.CDLL(None, use_errno=True)


def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, 128)
    ret = libc.syscall(NR_BPF, cmd, buf, 128)
    if ret < 0:
        err = ctypes.get_errno()
        sys.exit(f"bpf({cmd}): {os.strerror(err)}")
    return ret


def obj_get(path):
    name = ctypes.create_string_buffer(path.encode())
    return bpf(BPF_OBJ_GET, struct.pack("QII", ctypes.addressof(name), 0, 0))


link = obj_get(sys.argv[1])
prog = obj_get(sys.argv[2])
bpf(BPF_LINK_UPDATE, struct.pack("IIII", link, prog, 0, 0))
print("updated")
