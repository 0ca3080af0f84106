#!/bin/bash
# The package and its unit under a real systemd: boots a Debian 12 container
# (systemd-nspawn, systemd as PID 1, its own network namespace, a private
# bpffs), installs the .deb in it and checks the whole lifecycle: installed
# disabled, starts under the full sandbox, enforces, can write its pin
# directory but not /etc, survives an upgrade with a try-restart, and remove
# detaches and purge cleans up.
#
#   deploy/tests/systemd-test.sh [FILE.deb]
#
# Root only. Installs systemd-container and debootstrap if missing, and
# debootstraps a minimal rootfs once (about 3 minutes) into
# $SMTPGATE_ROOTFS_CACHE (default /var/cache/smtpgate-systemd-test), reused
# by later runs. Without FILE.deb it builds one like package-test.sh does.
set -euo pipefail

fail() { echo "systemd-test: FAIL: $*" >&2; exit 1; }
step() { echo "systemd-test: $*"; }
passed=0
ok() { passed=$((passed + 1)); echo "ok   $*"; }

[[ $EUID -eq 0 ]] || fail "must run as root"
root=$(cd "$(dirname "$0")/../.." && pwd)
cache=${SMTPGATE_ROOTFS_CACHE:-/var/cache/smtpgate-systemd-test}

if [[ -z ${SMTPGATE_SYSTEMD_NS:-} ]]; then
    for tool in systemd-nspawn debootstrap; do
        command -v "$tool" >/dev/null || {
            step "installing systemd-container debootstrap"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q systemd-container debootstrap >/dev/null
        }
    done
    if [[ ! -x $cache/rootfs/lib/systemd/systemd ]]; then
        step "debootstrapping a bookworm rootfs into $cache (once)"
        rm -rf "$cache/rootfs.tmp"
        mkdir -p "$cache"
        debootstrap --variant=minbase \
            --include=systemd,systemd-sysv,dbus,adduser,iproute2,python3,man-db \
            bookworm "$cache/rootfs.tmp" >"$cache/debootstrap.log" 2>&1 ||
            fail "debootstrap failed: see $cache/debootstrap.log"
        mv "$cache/rootfs.tmp" "$cache/rootfs"
    fi
    # Private mount namespace: the bpffs for the container goes away with it.
    exec unshare --mount --propagation private env SMTPGATE_SYSTEMD_NS=1 "$0" "$@"
fi

work=$(mktemp -d -p /var/tmp)
nspawn_pid=
# The container gets a cgroup of its own (nspawn --keep-unit puts it in ours):
# the agent in it attaches to the root of its cgroup namespace, which must not
# be this host's root cgroup, or the test would enforce on every process here.
cgroups=()
while read -r _ mnt type opts _; do
    if [[ $type == cgroup2 || ($type == cgroup && $opts == *name=systemd*) ]]; then
        cgroups+=("$mnt")
    fi
done < /proc/self/mounts
leave_cgroups() {
    for mnt in "${cgroups[@]}"; do
        echo $$ > "$mnt/cgroup.procs" 2>/dev/null || true
        rmdir "$mnt/smtpgate-systemd-test-$$" 2>/dev/null || true
    done
}
cleanup() {
    if [[ -n $nspawn_pid ]] && kill -0 "$nspawn_pid" 2>/dev/null; then
        kill -TERM "$nspawn_pid" 2>/dev/null || true   # nspawn: clean container shutdown
        for _ in $(seq 60); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$nspawn_pid" 2>/dev/null || true
    fi
    umount "$work/bpffs" 2>/dev/null || true
    rm -rf "$work"
    leave_cgroups
}
trap cleanup EXIT

if [[ $# -ge 1 ]]; then
    deb=$(realpath "$1")
else
    step "building the package"
    (cd "$root" && cargo build --release -p smtpgate && deploy/debian/gen-assets.sh &&
        cargo deb -p smtpgate --no-build --output "$work/") >"$work/build.log" 2>&1 ||
        fail "build failed: $(tail -20 "$work/build.log")"
    deb=$(ls "$work"/*.deb)
fi

# A throwaway copy of the rootfs, so every run starts from a clean system.
cp -a "$cache/rootfs" "$work/rootfs"
cp "$deb" "$work/rootfs/root/smtpgate.deb"
cat > "$work/rootfs/root/probe.py" <<'EOF'
import errno, socket
s = socket.socket()
s.settimeout(5)
try:
    s.connect(("192.0.2.1", 2525))
    print("connected")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e)))
EOF
mkdir "$work/bpffs"
mount -t bpf bpf "$work/bpffs"

for mnt in "${cgroups[@]}"; do
    mkdir "$mnt/smtpgate-systemd-test-$$"
    echo $$ > "$mnt/smtpgate-systemd-test-$$/cgroup.procs"
done
step "booting the container"
setsid systemd-nspawn -D "$work/rootfs" -b --register=no --keep-unit --private-network \
    --capability=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN --system-call-filter='bpf perf_event_open' \
    --bind="$work/bpffs:/sys/fs/bpf" --console=passive -M smtpgate-systemd-test \
    >"$work/nspawn.log" 2>&1 &
nspawn_pid=$!
# The container's PID 1 is nspawn's child named systemd. Not just its first
# child: while the container is set up, that can be a short-lived helper
# process, and a test that latched onto it waited for a dead PID's systemd.
container_init() { pgrep -P "$nspawn_pid" -x systemd | head -1 || true; }
init=
for _ in $(seq 300); do
    init=$(container_init)
    [[ -n $init ]] && break
    sleep 0.2
done
[[ -n $init ]] || fail "container did not start: $(cat "$work/nspawn.log")"
ctr() { nsenter -t "$init" -a env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin TERM=dumb "$@"; }
state=
# Up to 2 minutes: on a loaded 2-core machine the boot alone took over one.
for _ in $(seq 240); do
    state=$(ctr systemctl is-system-running 2>/dev/null || true)
    [[ $state == running || $state == degraded ]] && break
    init=$(container_init)
    sleep 0.5
done
[[ $state == running || $state == degraded ]] || fail "container's systemd is '$state': $(tail -20 "$work/nspawn.log")"
ok "systemd is PID 1 in the container ($state)"
# A process in the container's own cgroup tree (a transient unit), so the
# agent's cgroup attach point covers it.
probe() { ctr systemd-run --wait --pipe --quiet python3 /root/probe.py; }
journal() { ctr journalctl -u smtpgate --no-pager -o cat; }

# --- install -----------------------------------------------------------------------
ctr dpkg -i /root/smtpgate.deb >/dev/null
[[ $(ctr systemctl is-enabled smtpgate || true) == disabled ]] || fail "unit enabled on install"
[[ $(ctr systemctl is-active smtpgate || true) == inactive ]] || fail "unit started on install"
ok "installed disabled and stopped, with systemd running"
ctr ip link set lo up
ctr ip addr add 192.0.2.1/32 dev lo
# A TC attach point too (loopback is refused: it never carries traffic off
# the host): a veth pair inside the container's own network namespace.
ctr ip link add sg-lan type veth peer name sg-peer
ctr ip link set sg-lan up
ctr ip link set sg-peer up
# Port 2525, not 25: cgroup programs apply to every descendant cgroup, so a
# port-25 policy already enforced on this host's root cgroup (a developer's
# agent, say) would decide the probe's fate instead of the agent under test.
cat > "$work/rootfs/etc/smtpgate/smtpgate.toml" <<'EOF'
mode = "enforce"
action = "reject"
ports = [2525]
allowlist = []

[[attach]]
hook = "tc-ingress"
interface = "sg-lan"

[[attach]]
hook = "cgroup"
EOF
got=$(probe); [[ $got == ECONNREFUSED ]] || fail "before start, connect should be refused by the kernel, got: $got"

mkdir -p "$work/rootfs/etc/systemd/system/smtpgate.service.d"
if ! grep -q NOTIFY_SOCKET "$work/rootfs/usr/bin/smtpgate"; then
    # The unit is Type=notify; an agent that never sends READY=1 is killed
    # after TimeoutStartSec. Test everything else with Type=exec until it does.
    echo "note this smtpgate does not implement sd_notify yet: testing with a Type=exec drop-in"
    printf '[Service]\nType=exec\n' > "$work/rootfs/etc/systemd/system/smtpgate.service.d/test-exec.conf"
    notify=no
else
    notify=yes
fi
# Runs in the unit's sandbox (same user, capabilities, namespaces, filter),
# right after the agent starts: what can it write?
cat > "$work/rootfs/etc/systemd/system/smtpgate.service.d/test-probe.conf" <<'EOF'
[Service]
ExecStartPost=/bin/sh -c 'mkdir /sys/fs/bpf/smtpgate/probe && rmdir /sys/fs/bpf/smtpgate/probe && echo PROBE pins-writable; touch /etc/smtpgate/probe 2>/dev/null || echo PROBE etc-readonly; touch /var/lib/smtpgate/probe && rm /var/lib/smtpgate/probe && echo PROBE state-writable; mkdir /sys/fs/bpf/other 2>/dev/null || echo PROBE other-pins-readonly'
EOF
ctr systemctl daemon-reload

# --- start ---------------------------------------------------------------------------
ctr systemctl start smtpgate || fail "start failed: $(journal | tail -20)"
[[ $(ctr systemctl is-active smtpgate) == active ]] || fail "not active: $(journal | tail -20)"
# With Type=notify, start returns once the agent is ready; with the Type=exec
# stand-in, wait for the agent to say so.
wait_enforcing() {
    for _ in $(seq 150); do
        grep -q "enforcing" <<<"$(journal)" && return 0
        sleep 0.2
    done
    fail "agent never reported enforcing: $(journal | tail -20)"
}
wait_enforcing
ok "starts under the full sandbox (Type=$([[ $notify == yes ]] && echo notify || echo exec))"
for probe_line in pins-writable etc-readonly state-writable other-pins-readonly; do
    grep -qx "PROBE $probe_line" <<<"$(journal)" || fail "sandbox probe: no '$probe_line' in $(journal | grep PROBE)"
    ok "in the sandbox: $probe_line"
done
[[ $(probe) == EPERM ]] || fail "connect not refused while enforcing: $(probe)"
ok "enforcing: connect from a unit in the container gets EPERM"
ctr smtpgate status >/dev/null || fail "smtpgate status failed"
ok "smtpgate status over the control socket"
if ctr smtpgate --help | grep -qE '^ +allow'; then
    # Writes the agent's state (StateDirectory) from inside the sandbox.
    ctr smtpgate allow add 198.51.100.7 --comment systemd-test >/dev/null ||
        fail "smtpgate allow add failed: $(journal | tail -5)"
    [[ -n $(ls -A "$work/rootfs/var/lib/smtpgate" 2>/dev/null | grep -v '^spool$') ]] ||
        fail "allow add left nothing in /var/lib/smtpgate"
    ok "smtpgate allow add persists to /var/lib/smtpgate under the sandbox"
fi
if grep -q /readyz "$work/rootfs/usr/bin/smtpgate"; then
    # [metrics] is on by default (127.0.0.1:9725): the sandbox must let it listen.
    for path in /healthz /readyz /metrics; do
        code=$(ctr python3 -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:9725$path', timeout=5).status)" 2>&1) ||
            fail "GET $path: $code"
        [[ $code == 200 ]] || fail "GET $path: $code"
    done
    ok "metrics endpoint answers /healthz, /readyz, /metrics from inside the sandbox"
fi

# A bad config: reload must fail visibly and change nothing.
cp "$work/rootfs/etc/smtpgate/smtpgate.toml" "$work/good.toml"
echo 'ports = [0]' > "$work/rootfs/etc/smtpgate/smtpgate.toml"
if [[ $notify == yes ]]; then
    if ctr systemctl reload smtpgate 2>/dev/null; then
        fail "systemctl reload succeeded with an invalid config"
    fi
    [[ $(ctr systemctl is-active smtpgate) == active && $(probe) == EPERM ]] ||
        fail "a bad config on reload changed the running policy"
    ok "systemctl reload with a bad config fails and changes nothing"
fi
cp "$work/good.toml" "$work/rootfs/etc/smtpgate/smtpgate.toml"
pid=$(ctr systemctl show -p MainPID --value smtpgate)
reload_rc=0
ctr systemctl reload smtpgate 2>/dev/null || reload_rc=$?
sleep 1
newpid=$(ctr systemctl show -p MainPID --value smtpgate)
if [[ $reload_rc == 0 && $pid == "$newpid" && $(ctr systemctl is-active smtpgate) == active ]]; then
    ok "systemctl reload keeps the agent running (same pid)"
elif [[ $notify == no ]]; then
    echo "note reload killed the agent (no SIGHUP handler yet); Restart= brings it back"
    for _ in $(seq 100); do [[ $(ctr systemctl is-active smtpgate) == active ]] && break; sleep 0.2; done
    sleep 3
else
    fail "systemctl reload failed, or restarted or stopped the agent (rc $reload_rc, pid $pid -> $newpid): $(journal | tail -8)"
fi

# --- journald priorities, watchdog ------------------------------------------------------
if [[ $notify == yes ]]; then
    # The refused reload above is a warning, and journald knows it is.
    # Read into a variable first: `journalctl | grep -q` under pipefail
    # fails when grep exits early and journalctl gets SIGPIPE.
    warnings=$(ctr journalctl -u smtpgate -p warning --no-pager -o cat)
    [[ $warnings == *"reload refused"* ]] ||
        fail "journalctl -p warning lacks the refused reload: $(tail -5 <<<"$warnings")"
    [[ $warnings != *"effective config"* ]] ||
        fail "info lines are filed at warning priority or above"
    ok "journald: warnings are warnings (journalctl -p warning), info is not"
    # A main loop that stops (SIGSTOP freezes the whole agent) stops the
    # watchdog pings: systemd restarts the agent. A short WatchdogSec for the
    # test; TimeoutAbortSec because a stopped process cannot act on SIGABRT.
    printf '[Service]\nWatchdogSec=3s\nTimeoutAbortSec=2s\n' \
        > "$work/rootfs/etc/systemd/system/smtpgate.service.d/test-watchdog.conf"
    ctr systemctl daemon-reload
    ctr systemctl reset-failed smtpgate 2>/dev/null || true
    ctr systemctl restart smtpgate || fail "restart with the watchdog drop-in failed: $(journal | tail -5)"
    sleep 5   # longer than WatchdogSec: a healthy agent keeps pinging
    pid=$(ctr systemctl show -p MainPID --value smtpgate)
    [[ $(ctr systemctl show -p NRestarts --value smtpgate) == 0 ]] ||
        fail "the watchdog restarted a healthy agent: $(journal | tail -5)"
    ctr sh -c "kill -STOP $pid"
    newpid=$pid
    for _ in $(seq 60); do
        newpid=$(ctr systemctl show -p MainPID --value smtpgate)
        [[ $newpid != "$pid" && $newpid != 0 && $(ctr systemctl is-active smtpgate) == active ]] && break
        sleep 0.5
    done
    [[ $newpid != "$pid" && $newpid != 0 ]] || fail "a frozen agent was not restarted by the watchdog: $(ctr journalctl --no-pager -n 15 -o cat)"
    seen=
    for _ in $(seq 20); do
        seen=$(ctr journalctl --no-pager -o cat)
        [[ $seen == *"Watchdog timeout"* ]] && break
        sleep 0.5
    done
    [[ $seen == *"Watchdog timeout"* ]] ||
        fail "systemd did not log a watchdog timeout: $(grep -i -E 'watchdog|smtpgate.service' <<<"$seen" | tail -20)"
    [[ $(probe) == EPERM ]] || fail "not enforcing after the watchdog restart"
    ok "watchdog: a frozen agent is restarted (pid $pid -> $newpid), enforcement never lapsed"
    rm "$work/rootfs/etc/systemd/system/smtpgate.service.d/test-watchdog.conf"
    ctr systemctl daemon-reload
    ctr systemctl reset-failed smtpgate 2>/dev/null || true
fi

# --- the relay under the sandbox ---------------------------------------------------------
if ctr smtpgate --help | grep -qE '^ +user' && command -v openssl >/dev/null; then
    # Self-signed certificate, made on the host (the container has no openssl).
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=relay.test \
        -keyout "$work/rootfs/etc/smtpgate/relay.key" -out "$work/rootfs/etc/smtpgate/relay.crt" \
        >/dev/null 2>&1 || fail "openssl could not make a test certificate"
    ctr chown root:smtpgate /etc/smtpgate/relay.key /etc/smtpgate/relay.crt
    ctr chmod 0640 /etc/smtpgate/relay.key /etc/smtpgate/relay.crt
    cp "$work/rootfs/etc/smtpgate/smtpgate.toml" "$work/good.toml"
    # action = "redirect": the agent also sets up its transparent intercept
    # listener and policy routes (netlink), all under the unit's sandbox.
    # No path keys in [relay]: the built-in defaults (users file, spool, TLS
    # files) must be what the package created and the unit lets it use.
    # Redirect steers port 25 only (465/587 and the like get the fallback,
    # reject), so this step needs 25 in ports: it assumes no agent on this
    # host enforces port 25 at the root cgroup (as in CI), whose programs
    # would judge the probe first.
    sed -i -e 's/^action = "reject"/action = "redirect"/' -e 's/^ports = \[2525\]/ports = [25, 2525]/' \
        "$work/rootfs/etc/smtpgate/smtpgate.toml"
    cat >> "$work/rootfs/etc/smtpgate/smtpgate.toml" <<'EOF'

[relay]
enabled = true
hostname = "relay.test"
EOF
    ctr systemctl restart smtpgate || fail "restart with the relay enabled failed: $(journal | tail -10)"
    # The submission listeners are below 1024 (CAP_NET_BIND_SERVICE) and the
    # relay reads the users file through the smtpgate group.
    for port in 587 465; do
        banner=$(ctr python3 -c "
import socket, ssl, sys
s = socket.create_connection(('127.0.0.1', $port), timeout=5)
if $port == 465:
    c = ssl.create_default_context(); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE
    s = c.wrap_socket(s)
print(s.recv(512).decode().strip())" 2>&1) || fail "relay on $port: $banner ($(journal | tail -5))"
        [[ $banner == 220* ]] || fail "relay on $port said: $banner"
        ok "relay answers on $port under the sandbox: ${banner:0:40}"
    done
    # The default spool, where the package made it, written by the agent.
    [[ -d $work/rootfs/var/lib/smtpgate/spool/queue ]] ||
        fail "the relay did not open its default spool /var/lib/smtpgate/spool"
    ok "the relay runs from its built-in paths (users file, spool, TLS files)"
    # A denied connection from a process in the container lands in the relay.
    got=$(ctr systemd-run --wait --pipe --quiet python3 -c "
import socket
s = socket.create_connection(('192.0.2.1', 25), timeout=5)
print(s.recv(512).decode().strip())" 2>&1) || fail "redirected connect failed: $got ($(journal | tail -5))"
    [[ $got == 220* ]] || fail "redirected connect got: $got"
    ok "action = redirect: a denied connect to port 25 lands in the relay: ${got:0:40}"
    # Another SMTP port is not redirected: it gets the fallback, reject.
    got=$(ctr systemd-run --wait --pipe --quiet python3 -c "
import socket
try:
    socket.create_connection(('192.0.2.1', 2525), timeout=5); print('connected')
except OSError as e:
    print(e.errno)" 2>&1)
    [[ $got == 1 ]] || fail "port 2525 under redirect should get EPERM (the fallback), got: $got"
    ok "action = redirect: port 2525 gets the fallback (EPERM)"
    cp "$work/good.toml" "$work/rootfs/etc/smtpgate/smtpgate.toml"
    # Admin-made files survive purge by design; these are the test's own.
    rm "$work/rootfs/etc/smtpgate/relay.key" "$work/rootfs/etc/smtpgate/relay.crt"
    ctr systemctl restart smtpgate
fi

# --- upgrade (same package again) ------------------------------------------------------
pid=$(ctr systemctl show -p MainPID --value smtpgate)
ctr dpkg -i /root/smtpgate.deb >/dev/null
newpid=$(ctr systemctl show -p MainPID --value smtpgate)
[[ $(ctr systemctl is-active smtpgate) == active && $pid != "$newpid" ]] ||
    fail "upgrade did not try-restart the running agent (pid $pid -> $newpid)"
ok "upgrade try-restarted the running agent (pid $pid -> $newpid)"
[[ $notify == yes ]] || sleep 3   # Type=exec: give the new agent time to attach
[[ $(probe) == EPERM ]] || fail "not enforcing after the upgrade"
ok "enforcing after the upgrade"
ctr systemctl stop smtpgate
if ctr smtpgate --help | grep -qE '^ +detach'; then
    [[ $(probe) == EPERM ]] || fail "systemctl stop lifted enforcement; the pins should keep it"
    ok "systemctl stop: the agent stops, the pinned policy keeps enforcing"
fi
ctr dpkg -i /root/smtpgate.deb >/dev/null
[[ $(ctr systemctl is-active smtpgate || true) == inactive ]] || fail "upgrade started a stopped agent"
ok "upgrade leaves a stopped agent stopped"

# --- remove, purge -----------------------------------------------------------------------
ctr systemctl start smtpgate
ctr dpkg -r smtpgate >/dev/null
[[ $(ctr systemctl is-active smtpgate || true) != active ]] || fail "agent still running after remove"
[[ ! -e $work/bpffs/smtpgate ]] || fail "pins still there after remove"
[[ $(probe) == ECONNREFUSED ]] || fail "still enforcing after remove"
ok "remove stops the agent and detaches"
ctr dpkg --purge smtpgate >/dev/null
for path in /etc/smtpgate /var/lib/smtpgate /usr/lib/systemd/system/smtpgate.service; do
    [[ ! -e $work/rootfs$path ]] || fail "$path still there after purge"
done
ok "purge removes config, state and unit"

echo "systemd-test: $passed passed, 0 failed"
