#!/usr/bin/python3
"""Applies a unit file's SystemCallFilter= the way systemd would, then execs a
command under it, so deploy/tests/sandbox-test.sh can test the unit's syscall
allow list where systemd is not PID 1.

    seccomp-exec.py --resolve UNIT > ALLOWED      # as root, once
    seccomp-exec.py --allowed ALLOWED -- CMD...   # last step before the agent

--resolve expands the groups (@system-service, ...) with `systemd-analyze
syscall-filter`, applies allow (`A B`) and deny (`~A B`) lines in order, and
prints one syscall per line, plus `family:` lines for RestrictAddressFamilies=
and `mdwe` for MemoryDenyWriteExecute=yes. The filter refuses everything else
with EPERM (the unit's SystemCallErrorNumber=) and, like
SystemCallArchitectures=native, only allows the native ABI. socket() is then
allowed only for the listed families, and mmap/mprotect/pkey_mprotect only
without write+execute / execute, which is how systemd implements those two
settings too. Needs python3-seccomp (Debian) for the second form.
"""

import os
import re
import subprocess
import sys


def expand(name: str, seen: set[str]) -> set[str]:
    if not name.startswith("@"):
        return {name}
    if name in seen:
        return set()
    seen.add(name)
    out = subprocess.run(["systemd-analyze", "syscall-filter", name],
                         capture_output=True, text=True, check=True).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        calls |= expand(item, seen)
    return calls


def resolve(unit: str) -> list[str]:
    allowed: set[str] | None = None
    extra: list[str] = []
    for line in open(unit):
        m = re.match(r"\s*RestrictAddressFamilies=(.*)", line)
        if m:
            extra += [f"family:{f}" for f in m.group(1).split()]
        if re.match(r"\s*MemoryDenyWriteExecute=(yes|true|1)\s*$", line):
            extra.append("mdwe")
        m = re.match(r"\s*SystemCallFilter=(.*)", line)
        if not m:
            continue
        value = m.group(1).strip()
        deny = value.startswith("~")
        items = value.lstrip("~").split()
        calls: set[str] = set()
        for item in items:
            calls |= expand(item, set())
        if deny:
            if allowed is not None:
                allowed -= calls
        else:
            allowed = calls if allowed is None else allowed | calls
    if allowed is None:
        sys.exit(f"{unit}: no SystemCallFilter= allow list")
    return sorted(allowed) + extra


def load_and_exec(allowed_file: str, cmd: list[str]) -> None:
    import errno

    import seccomp

    import socket

    f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))
    items = open(allowed_file).read().split()
    families = [getattr(socket, i.split(":", 1)[1]) for i in items if i.startswith("family:")]
    mdwe = "mdwe" in items
    conditional = set()
    if families:
        conditional.add("socket")
        for fam in families:
            f.add_rule(seccomp.ALLOW, "socket", seccomp.Arg(0, seccomp.EQ, int(fam)))
    if mdwe:
        w, x = 0x2, 0x4  # PROT_WRITE, PROT_EXEC
        conditional |= {"mmap", "mprotect", "pkey_mprotect"}
        for value in (0, w, x):
            f.add_rule(seccomp.ALLOW, "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, w | x, value))
        f.add_rule(seccomp.ALLOW, "mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, x, 0))
        f.add_rule(seccomp.ALLOW, "pkey_mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, x, 0))
    for name in items:
        if ":" in name or name == "mdwe" or name in conditional:
            continue
        try:
            f.add_rule(seccomp.ALLOW, name)
        except (RuntimeError, ValueError):
            pass  # not a syscall on this architecture
    f.load()
    os.execvp(cmd[0], cmd)


def main() -> None:
    args = sys.argv[1:]
    if len(args) == 2 and args[0] == "--resolve":
        print("\n".join(resolve(args[1])))
    elif len(args) >= 4 and args[0] == "--allowed" and args[2] == "--":
        load_and_exec(args[1], args[3:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
