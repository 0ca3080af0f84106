#!/bin/bash
# Runs the agent the way deploy/systemd/smtpgate.service does, without systemd:
# as the smtpgate user with only the unit's AmbientCapabilities, no new
# privileges, /sys read-only except a bpffs, the cgroup tree read-only,
# /proc reduced to processes (ProcSubset=pid, ProtectProc=invisible), and the
# unit's SystemCallFilter=, RestrictAddressFamilies= and
# MemoryDenyWriteExecute= as a seccomp filter (seccomp-exec.py). Then it
# proves the agent enforces from inside that sandbox: a process in the
# attached cgroup gets its port-25 connect refused by the program, and the
# CLI reaches the control socket. Finally it drops each capability in turn
# and reports which ones the current agent really needs.
#
#   deploy/tests/sandbox-test.sh [path/to/smtpgate]
#
# Root only. Everything happens in private namespaces (network, mount, bpffs)
# plus one empty child cgroup that is removed at the end; nothing on the host
# is attached to. CI machines have no systemd as PID 1, so this is how the
# unit's privilege set gets tested there.
set -euo pipefail

fail() { echo "sandbox-test: FAIL: $*" >&2; exit 1; }
passed=0
ok() { passed=$((passed + 1)); echo "ok   $*"; }

[[ $EUID -eq 0 ]] || fail "must run as root"
root=$(cd "$(dirname "$0")/../.." && pwd)
unit=$root/deploy/systemd/smtpgate.service

if [[ -z ${SMTPGATE_SANDBOX_NS:-} ]]; then
    exec unshare --net --mount --propagation private env SMTPGATE_SANDBOX_NS=1 "$0" "$@"
fi

bin=${1:-}
if [[ -z $bin ]]; then
    target_dir=$(cd "$root" && cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
    bin=$target_dir/release/smtpgate
fi
[[ -x $bin ]] || fail "$bin not found: cargo build --release -p smtpgate"
if ! /usr/bin/python3 -c 'import seccomp' 2>/dev/null; then
    fail "python3-seccomp is missing (apt-get install python3-seccomp): the unit's syscall filter would go untested"
fi
getent passwd smtpgate >/dev/null || useradd --system --no-create-home --shell /usr/sbin/nologin smtpgate

# The unit's capabilities, read from the unit so the two cannot drift.
caps=$(sed -n 's/^AmbientCapabilities=//p' "$unit")
bounding=$(sed -n 's/^CapabilityBoundingSet=//p' "$unit")
[[ -n $caps && $caps == "$bounding" ]] || fail "unit: AmbientCapabilities ($caps) != CapabilityBoundingSet ($bounding)"
read -ra unit_caps <<<"$caps"
echo "sandbox-test: unit capabilities: ${unit_caps[*]}"

cg2=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/self/mounts)
[[ -n $cg2 ]] || fail "no cgroup v2 hierarchy mounted"
# No dot in the name: bpffs refuses dots in pin names.
cgroup=$cg2/smtpgate-sandbox-test-$$
agent_pid=
cleanup() {
    if [[ -n $agent_pid ]]; then kill "$agent_pid" 2>/dev/null || true; wait "$agent_pid" 2>/dev/null || true; fi
    rmdir "$cgroup" 2>/dev/null || true
}
trap cleanup EXIT

ip link set lo up
# A TC attach point (loopback is refused: it never carries traffic off the
# host): a veth pair in this test's own network namespace.
ip link add sg-lan type veth peer name sg-peer
ip link set sg-lan up
ip link set sg-peer up
# A local, non-loopback address to connect to: the connect hook lets loopback
# destinations through by design (a local MTA talking to itself).
ip addr add 192.0.2.1/32 dev lo
mount -t bpf bpf /sys/fs/bpf                # private: the host's pins are not here
install -d -o smtpgate -g smtpgate -m 0700 /sys/fs/bpf/smtpgate   # the unit's ExecStartPre=+
mount -t tmpfs -o mode=0755 tmpfs /run      # RuntimeDirectory=smtpgate, 0700
install -d -o smtpgate -g smtpgate -m 0700 /run/smtpgate
# On the private /run: gone with the namespace, and readable by smtpgate
# (some machines keep /tmp at 0700).
work=/run/sandbox-test
install -d -m 0755 "$work"
# The binary too: the agent runs as smtpgate, which cannot reach into a
# checkout under a 0700 /tmp (or a home directory).
install -m 0755 "$bin" "$work/smtpgate"
bin=$work/smtpgate
mkdir "$cgroup"
# The unit's syscall filter, resolved here (systemd-analyze) and applied by
# seccomp-exec.py as the last step before the agent, as systemd does.
install -m 0755 "$root/deploy/tests/seccomp-exec.py" "$work/seccomp-exec.py"
"$work/seccomp-exec.py" --resolve "$unit" > "$work/syscalls"
chmod 0644 "$work/syscalls"

# Port 2525, not 25: cgroup programs apply to every descendant cgroup, so a
# port-25 policy already enforced on this host's root cgroup (a developer's
# agent, say) would decide the probe's fate instead of the agent under test.
cat > "$work/smtpgate.toml" <<EOF
mode = "enforce"
action = "reject"
ports = [2525]
allowlist = []

[[attach]]
hook = "tc-ingress"
interface = "sg-lan"

[[attach]]
hook = "cgroup"
path = "$cgroup"
EOF
chmod 0644 "$work/smtpgate.toml"

# Starts the agent in the unit's sandbox with the given capabilities; waits
# until it says "enforcing" (0) or exits (1).
start_agent() {
    local capset=$1 log=$2 syscalls=${3:-$work/syscalls}
    # A nested mount namespace holds the agent's read-only view; this shell
    # keeps a writable one to put a test process into the cgroup.
    # Mount flags in a private namespace are per mount: /sys and the cgroup2
    # mount go read-only here, while the bpffs mounted on /sys/fs/bpf above
    # (a mount of its own) stays writable, which is what ReadWritePaths= does.
    unshare --mount --propagation private bash -c '
        set -e
        mount -o remount,bind,ro /sys
        mount -o remount,bind,ro "$1"
        mount -t proc -o subset=pid,hidepid=invisible proc /proc
        exec setpriv --reuid smtpgate --regid smtpgate --init-groups --no-new-privs \
            --bounding-set "-all,$2" --inh-caps "-all,$2" --ambient-caps "-all,$2" \
            /usr/bin/python3 "$5/seccomp-exec.py" --allowed "$6" -- \
            "$3" run --config "$4"
    ' sandbox "$cg2" "$capset" "$bin" "$work/smtpgate.toml" "$work" "$syscalls" >"$log" 2>&1 &
    agent_pid=$!
    for _ in $(seq 100); do
        grep -qs 'enforcing' "$log" && return 0
        kill -0 "$agent_pid" 2>/dev/null || { agent_pid=; return 1; }
        sleep 0.1
    done
    fail "agent neither started nor failed within 10 s: $(cat "$log")"
}
stop_agent() {
    kill -TERM "$agent_pid"
    wait "$agent_pid" || true
    agent_pid=
}

to_capset() { local IFS=,; local out=(); for c in "$@"; do c=${c#CAP_}; out+=("+${c,,}"); done; echo "${out[*]}"; }

# connect() to 192.0.2.1:25 from inside the attached cgroup. No listener: an
# unenforced connect is refused (ECONNREFUSED); the cgroup connect hook's
# reject makes it fail with EPERM instead.
probe() {
    bash -c 'echo $$ > "$1/cgroup.procs"; exec python3 -c "
import errno, socket, sys
s = socket.socket()
s.settimeout(5)
try:
    s.connect((\"192.0.2.1\", 2525))
    print(\"connected\")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e)))
"' probe "$cgroup"
}

[[ $(probe) == ECONNREFUSED ]] || fail "before the agent runs, connect should be refused by the kernel, got $(probe)"
ok "without the agent: ECONNREFUSED"

start_agent "$(to_capset "${unit_caps[@]}")" "$work/agent.log" ||
    fail "agent did not start in the unit's sandbox: $(cat "$work/agent.log")"
ok "agent starts as smtpgate with only: ${unit_caps[*]}, under the unit's syscall filter"
got=$(probe)
[[ $got == EPERM ]] || fail "with the agent enforcing, connect gave $got, want EPERM (log: $(cat "$work/agent.log"))"
ok "enforced from inside the sandbox: connect from the cgroup gets EPERM"
status=$("$bin" status --socket /run/smtpgate/control.sock 2>&1) || fail "smtpgate status: $status"
ok "smtpgate status over the control socket"
stop_agent
if "$bin" --help | grep -qE '^ +detach'; then
    # Pinned programs: stopping the agent must leave enforcement in place
    # (restarts and upgrades open no gap); `smtpgate detach` lifts it.
    [[ $(probe) == EPERM ]] || fail "after SIGTERM the policy is gone: restarts and upgrades would open a gap"
    ok "SIGTERM: agent stopped, pinned programs still enforce"
    "$bin" detach || fail "smtpgate detach failed"
    [[ $(probe) == ECONNREFUSED ]] || fail "after smtpgate detach the connect is still blocked"
    ok "smtpgate detach lifts enforcement"
else
    # This build does not pin yet: stopping detaches.
    [[ $(probe) == ECONNREFUSED ]] || fail "after SIGTERM the connect is still blocked, and this build has no detach"
    ok "SIGTERM: agent stopped and detached (this build does not pin yet)"
fi

# The seccomp emulation is live: without bpf(2) in the allow list the same
# start fails.
grep -vx bpf "$work/syscalls" > "$work/syscalls-nobpf"
chmod 0644 "$work/syscalls-nobpf"
if start_agent "$(to_capset "${unit_caps[@]}")" "$work/agent-nobpf.log" "$work/syscalls-nobpf"; then
    stop_agent
    fail "the agent started with bpf(2) filtered out: the syscall filter is not being applied"
fi
ok "syscall filter is live (without bpf(2) allowed the agent cannot start)"

# Which of the unit's capabilities does this agent actually need?
for drop in "${unit_caps[@]}"; do
    rest=()
    for c in "${unit_caps[@]}"; do [[ $c == "$drop" ]] || rest+=("$c"); done
    if start_agent "$(to_capset "${rest[@]}")" "$work/agent-$drop.log"; then
        echo "info without $drop: the agent still starts (not needed by this build)"
        stop_agent
    else
        echo "info without $drop: the agent fails: $(grep -m1 -iE 'error|denied|permitted' "$work/agent-$drop.log" || tail -1 "$work/agent-$drop.log")"
    fi
done

echo "sandbox-test: $passed passed, 0 failed"
