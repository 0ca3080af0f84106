#!/bin/bash
# The container image, built and run: podman builds it from
# deploy/container/Containerfile's runtime stage on a debootstrapped Debian 12
# rootfs (no registry is reachable here, so `FROM scratch` and the rootfs as
# a tarball instead of debian:bookworm-slim, and the binary from the host's
# build instead of the builder stage), then runs it the way the Helm chart
# runs the pod: host networking (here: a lab network namespace's), only the
# capabilities the chart adds, no privilege escalation, a read-only root,
# the chart's mounts. It attaches with hook = "tc-ingress" to a veth of that
# namespace and must enforce: a port-25 connect from a denied client address
# in a second namespace is refused and counted (`smtpgate stats` in the
# container and /metrics), an allowlisted one connects, and enforcement
# outlives the container (pins).
#
#   deploy/tests/container-test.sh [path/to/smtpgate]
#
# Root only. Needs podman, runc and debootstrap (xtask bootstrap installs them).
# Debootstraps a minimal rootfs once (about 2 minutes) into
# $SMTPGATE_CONTAINER_CACHE (default /var/cache/smtpgate-container-test).
# Everything else is private to the run: its own mount namespace, bpffs,
# podman storage and network namespaces, all gone at the end. Lab addresses
# are documentation addresses (192.0.2.0/24) and nothing is routed out.
set -euo pipefail

fail() { echo "container-test: FAIL: $*" >&2; exit 1; }
step() { echo "container-test: $*"; }
passed=0
ok() { passed=$((passed + 1)); echo "ok   $*"; }

[[ $EUID -eq 0 ]] || fail "must run as root"
root=$(cd "$(dirname "$0")/../.." && pwd)
cache=${SMTPGATE_CONTAINER_CACHE:-/var/cache/smtpgate-container-test}
chart_ds=$root/deploy/kubernetes/helm/smtpgate/templates/daemonset.yaml
raw_ds=$root/deploy/kubernetes/daemonset.yaml
containerfile=$root/deploy/container/Containerfile

for tool in podman runc debootstrap ip nsenter python3; do
    command -v "$tool" >/dev/null ||
        fail "$tool is missing (cargo xtask bootstrap, or apt-get install podman runc debootstrap iproute2 util-linux python3)"
done

if [[ -z ${SMTPGATE_CONTAINER_NS:-} ]]; then
    if [[ ! -x $cache/rootfs/usr/bin/dpkg ]]; then
        step "debootstrapping a minimal bookworm rootfs into $cache (once)"
        rm -rf "$cache/rootfs.tmp"
        mkdir -p "$cache"
        # minbase: glibc and the essential set, as debian:bookworm-slim;
        # ca-certificates is what the Containerfile adds (the relay checks
        # its smarthosts' and MX hosts' certificates).
        debootstrap --variant=minbase --include=ca-certificates \
            bookworm "$cache/rootfs.tmp" >"$cache/debootstrap.log" 2>&1 ||
            fail "debootstrap failed: see $cache/debootstrap.log"
        mv "$cache/rootfs.tmp" "$cache/rootfs"
    fi
    # Private mount namespace: the bpffs, the network namespaces' mounts and
    # podman's storage mounts go away with it.
    exec unshare --mount --propagation private env SMTPGATE_CONTAINER_NS=1 "$0" "$@"
fi

bin=${1:-}
if [[ -z $bin ]]; then
    target_dir=$(cd "$root" && cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
    bin=$target_dir/release/smtpgate
fi
[[ -x $bin ]] || fail "$bin not found: cargo build --release -p smtpgate"

work=$(mktemp -d -p /var/tmp smtpgate-container-test.XXXXXX)
gw=sgct-gw-$$
cli=sgct-cli-$$
ctr=sgct-$$
listener_pid=
# Podman with storage and state of this run only: no image or container of
# it outlives the run or meets anyone else's. vfs: works on any filesystem.
# runc, not crun: crun 1.8 refuses hybrid cgroup hierarchies (v1 controllers
# plus a v2 mount, as on the machines CI runs on).
podman_args=(--root "$work/storage" --runroot "$work/runroot" --storage-driver vfs
    --cgroup-manager cgroupfs --events-backend file --runtime runc)
pm() { podman "${podman_args[@]}" "$@"; }
cleanup() {
    pm rm -f -t 5 "$ctr" >/dev/null 2>&1 || true
    if [[ -n $listener_pid ]]; then kill "$listener_pid" 2>/dev/null || true; fi
    ip netns del "$cli" 2>/dev/null || true
    ip netns del "$gw" 2>/dev/null || true
    umount "$work/bpffs" 2>/dev/null || true
    rm -rf "$work"
    # podman's cgroupfs manager leaves libpod_parent/conmon behind; rmdir
    # only removes them when empty, so another podman user's stay.
    for d in /sys/fs/cgroup/libpod_parent /sys/fs/cgroup/*/libpod_parent; do
        rmdir "$d/conmon" "$d" 2>/dev/null || true
    done
}
trap cleanup EXIT

# --- what the chart grants, read from the chart ---------------------------------
caps_of() { sed -n 's/^ *add: \[\(.*\)\]$/\1/p' "$1" | tr -d '" ' | tr ',' ' '; }
read -ra caps <<<"$(caps_of "$chart_ds")"
((${#caps[@]})) || fail "no capabilities found in $chart_ds"
[[ "$(caps_of "$raw_ds")" == "${caps[*]}" ]] ||
    fail "the chart adds ${caps[*]}, daemonset.yaml $(caps_of "$raw_ds")"
grep -q 'drop: \["ALL"\]' "$chart_ds" || fail "the chart no longer drops ALL capabilities"
grep -q 'readOnlyRootFilesystem: true' "$chart_ds" || fail "the chart's root is no longer read-only"
grep -q 'allowPrivilegeEscalation: false' "$chart_ds" || fail "the chart allows privilege escalation"
grep -q 'type: RuntimeDefault' "$chart_ds" || fail "the chart's seccomp profile is no longer RuntimeDefault"
step "the chart's capabilities: ${caps[*]}"

# --- the image -------------------------------------------------------------------------
# The Containerfile's last stage, with only what this machine cannot do
# replaced: the base comes from the rootfs tarball, the binary from the host
# build, and ca-certificates is already in the rootfs. Labels, config,
# user, ports, entrypoint and command are the shipped file's own.
mkdir -p "$work/ctx/deploy/config"
# Without the downloaded packages and package lists, as debian:bookworm-slim.
tar -C "$cache/rootfs" --numeric-owner --exclude='./var/cache/apt/archives/*.deb' \
    --exclude='./var/lib/apt/lists/*' -cf "$work/ctx/rootfs.tar" .
install -m 0755 "$bin" "$work/ctx/smtpgate"
cp "$root/deploy/config/smtpgate.toml" "$work/ctx/deploy/config/"
python3 - "$containerfile" "$work/Containerfile" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
# Joined continuation lines, then the final stage.
lines = re.sub(r"\\\n\s*", " ", text).splitlines()
last = max(i for i, l in enumerate(lines) if re.match(r"FROM\s", l))
stage = lines[last:]
out, done = [], set()
for l in stage:
    if re.match(r"FROM\s", l):
        out += ["FROM scratch", "ADD rootfs.tar /"]
        done.add("from")
    elif re.match(r"RUN\s.*apt-get install .*ca-certificates", l):
        done.add("apt")  # debootstrap --include=ca-certificates did this
    elif re.match(r"COPY\s+--from=builder\s+\S+\s+/usr/bin/smtpgate$", l):
        out.append("COPY smtpgate /usr/bin/smtpgate")
        done.add("bin")
    elif re.match(r"RUN\s", l):
        sys.exit(f"unexpected RUN in the runtime stage (no network here): {l}")
    else:
        out.append(l)
missing = {"from", "apt", "bin"} - done
if missing:
    sys.exit(f"Containerfile's runtime stage changed shape, update this test: {sorted(missing)}")
open(sys.argv[2], "w").write("\n".join(out) + "\n")
EOF
step "building the image (podman, FROM scratch + rootfs tarball)"
pm build --network=host -q -t localhost/smtpgate:container-test -f "$work/Containerfile" "$work/ctx" \
    >"$work/build.log" 2>&1 || fail "podman build failed: $(tail -20 "$work/build.log")"
ok "image built from the Containerfile's runtime stage"
# RLIMIT_NOFILE and RLIMIT_NPROC no higher than here, everywhere: podman
# raises both by default, which needs CAP_SYS_RESOURCE, and a CI sandbox may
# not grant that (this one does not; even this shell's own nproc limit was
# refused to the runtime, 4096 was not). The pod's limits are the node
# runtime's business, not the image's.
limits=(--ulimit "nofile=$(ulimit -Sn):$(ulimit -Hn)" --ulimit "nproc=4096:4096")
version=$(pm run --rm "${limits[@]}" --network=none --entrypoint /usr/bin/smtpgate localhost/smtpgate:container-test --version 2>&1) ||
    fail "the binary does not run in the image: $version"
ok "the binary runs in the image: $version"
[[ "$(pm image inspect --format '{{json .Config.Entrypoint}} {{json .Config.Cmd}}' localhost/smtpgate:container-test)" == \
    '["/usr/bin/smtpgate"] ["run","--config","/etc/smtpgate/smtpgate.toml"]' ]] ||
    fail "entrypoint/cmd: $(pm image inspect --format '{{json .Config.Entrypoint}} {{json .Config.Cmd}}' localhost/smtpgate:container-test)"
ok "entrypoint and command are the DaemonSet's"
# Routing is rtnetlink now: the image needs no iproute2.
if pm run --rm "${limits[@]}" --network=none --entrypoint /bin/sh localhost/smtpgate:container-test -c 'command -v ip tc' >/dev/null 2>&1; then
    fail "the image has ip or tc: the test would not show the agent does without them"
fi
ok "no ip or tc in the image"

# --- the lab: a gateway namespace (the pod's host network) and a client ----------------
ip netns add "$gw"
ip netns add "$cli"
ip link add sg-lan netns "$gw" type veth peer name sg-cli netns "$cli"
ip -n "$gw" link set lo up
ip -n "$gw" link set sg-lan up
ip -n "$gw" addr add 192.0.2.1/24 dev sg-lan
ip -n "$cli" link set lo up
ip -n "$cli" link set sg-cli up
ip -n "$cli" addr add 192.0.2.10/24 dev sg-cli     # denied
ip -n "$cli" addr add 192.0.2.20/24 dev sg-cli     # allowlisted
# A port-25 server on the gateway: without enforcement every client connects.
ip netns exec "$gw" python3 -c '
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("192.0.2.1", 25))
s.listen(64)
while True:
    c, _ = s.accept()
    c.close()
' &
listener_pid=$!
# connect() from SOURCE to the gateway's port 25: "connected", or the errno.
probe() {
    ip netns exec "$cli" python3 -c '
import errno, socket, sys
s = socket.socket()
s.settimeout(5)
s.bind((sys.argv[1], 0))
try:
    s.connect(("192.0.2.1", 25))
    print("connected")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e)))
' "$1"
}
for _ in $(seq 50); do [[ $(probe 192.0.2.20) == connected ]] && break; sleep 0.1; done
[[ $(probe 192.0.2.10) == connected && $(probe 192.0.2.20) == connected ]] ||
    fail "before the agent runs both clients should connect: $(probe 192.0.2.10) $(probe 192.0.2.20)"
ok "without the agent: both clients connect to port 25"

# --- the pod, as the chart runs it ----------------------------------------------------
mkdir -p "$work/etc" "$work/state" "$work/bpffs"
mount -t bpf bpf "$work/bpffs"      # the node's bpffs, for this run only
cat > "$work/etc/smtpgate.toml" <<'EOF'
mode = "enforce"
action = "reject"
ports = [25]
allowlist = ["192.0.2.20/32"]

[[attach]]
hook = "tc-ingress"
interface = "sg-lan"

[metrics]
listen = "127.0.0.1:9725"
EOF
printf '# no relay users\n' > "$work/etc/users.toml"

# Kubernetes' RuntimeDefault is the runtime's profile. containerd's allows
# bpf(2) to CAP_BPF and perf_event_open(2) to CAP_PERFMON; podman 4.3's
# (containers-common 0.50, /usr/share/containers/seccomp.json) allows them
# only with CAP_SYS_ADMIN, which the chart does not grant. So: podman's
# profile with containerd's two rules added, and nothing else changed. The
# stock profile is tried first below, to show the difference is real.
python3 - /usr/share/containers/seccomp.json "$work/runtime-default.json" <<'EOF'
import json, sys
p = json.load(open(sys.argv[1]))
moved = {"bpf": "CAP_BPF", "perf_event_open": "CAP_PERFMON"}
for rule in p["syscalls"]:
    if rule.get("action") != "SCMP_ACT_ALLOW":
        rule["names"] = [n for n in rule["names"] if n not in moved]
p["syscalls"] = [r for r in p["syscalls"] if r["names"]]
for name, cap in moved.items():
    p["syscalls"].append({"names": [name], "action": "SCMP_ACT_ALLOW", "includes": {"caps": [cap]}})
json.dump(p, open(sys.argv[2], "w"))
EOF

security=(--user 0 --cap-drop=ALL)
for c in "${caps[@]}"; do security+=(--cap-add="CAP_$c"); done
security+=(--security-opt no-new-privileges --read-only --read-only-tmpfs=false)
# The chart sets AppArmor Unconfined; only meaningful where AppArmor is on.
if [[ $(cat /sys/module/apparmor/parameters/enabled 2>/dev/null) == Y ]]; then
    security+=(--security-opt apparmor=unconfined)
fi
# The chart's volumes: config read-only, the node's bpffs, the node's cgroup
# tree read-only, a host state directory, memory-backed /run/smtpgate, /tmp.
mounts=(-v "$work/etc:/etc/smtpgate:ro" -v "$work/bpffs:/sys/fs/bpf"
    -v /sys/fs/cgroup:/host/sys/fs/cgroup:ro -v "$work/state:/var/lib/smtpgate"
    --tmpfs /run/smtpgate:mode=0700 --tmpfs /tmp)
# hostNetwork: the pod shares the node's network namespace, here the lab
# gateway's (podman runs in it, and --network=host keeps the container there).
run_pod() { # seccomp-profile
    nsenter --net="/run/netns/$gw" podman "${podman_args[@]}" \
        run -d --name "$ctr" "${limits[@]}" --network=host "${security[@]}" --security-opt seccomp="$1" \
        "${mounts[@]}" -e SMTPGATE_LOG=info localhost/smtpgate:container-test >/dev/null
}
metrics() { # path
    ip netns exec "$gw" python3 -c '
import sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen("http://127.0.0.1:9725" + sys.argv[1], timeout=3)
    print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
except OSError as e:
    print("down", e)
' "$1"
}

run_pod /usr/share/containers/seccomp.json
for _ in $(seq 100); do
    [[ $(pm inspect --format '{{.State.Running}}' "$ctr" 2>/dev/null) == true ]] || break
    sleep 0.2
done
if [[ $(pm inspect --format '{{.State.Running}}' "$ctr") == true ]]; then
    fail "the agent runs under podman's stock seccomp profile without CAP_SYS_ADMIN: the profile note above is wrong"
fi
log=$(pm logs "$ctr" 2>&1 | tail -3)
pm rm -f "$ctr" >/dev/null
[[ $log == *"ermission"* || $log == *EPERM* || $log == *"not permitted"* ]] ||
    fail "under podman's stock profile the agent failed, but not for bpf(2): $log"
ok "podman's stock seccomp profile refuses bpf(2) without CAP_SYS_ADMIN (containerd's RuntimeDefault does not): ${log##*$'\n'}"

run_pod "$work/runtime-default.json"
ready=
for _ in $(seq 150); do
    [[ $(pm inspect --format '{{.State.Running}}' "$ctr" 2>/dev/null) == true ]] ||
        fail "the container exited: $(pm logs "$ctr" 2>&1 | tail -20)"
    ready=$(metrics /readyz | sed -n 1p)   # sed reads it all: head would break the pipe
    [[ $ready == 200 ]] && break
    sleep 0.2
done
[[ $ready == 200 ]] || fail "/readyz never answered 200 ($ready): $(pm logs "$ctr" 2>&1 | tail -20)"
ok "the container runs with only ${caps[*]}, read-only, no new privileges; /readyz 200"
status=$(pm exec "$ctr" smtpgate status 2>&1) || fail "smtpgate status in the container: $status"
grep -q 'tc-ingress sg-lan: UP' <<<"$status" || fail "status does not show tc-ingress sg-lan UP: $status"
ok "smtpgate status in the container: tc-ingress sg-lan UP"

# --- enforcing ------------------------------------------------------------------------
got=$(probe 192.0.2.10)
[[ $got == ECONNREFUSED ]] || fail "a denied client's port-25 connect gave $got, want ECONNREFUSED (a RST from reject)"
ok "denied client 192.0.2.10: port-25 connect refused"
got=$(probe 192.0.2.20)
[[ $got == connected ]] || fail "the allowlisted client's connect gave $got"
ok "allowlisted client 192.0.2.20: connects"
# Counted: by the CLI in the container, over its control socket...
stats=$(pm exec "$ctr" smtpgate stats --output json 2>&1) || fail "smtpgate stats in the container: $stats"
rejected=$(python3 -c '
import json, sys
def walk(v):
    # Every object that says verdict "rejected" for reason "not_allowlisted".
    if isinstance(v, dict):
        if v.get("verdict") == "rejected" and v.get("reason") == "not_allowlisted":
            yield v
        for x in v.values():
            yield from walk(x)
    elif isinstance(v, list):
        for x in v:
            yield from walk(x)
rows = list(walk(json.loads(sys.argv[1])))
print(sum(int(r.get("connections", 0)) for r in rows) if rows else "none")
' "$stats")
[[ $rejected =~ ^[0-9]+$ ]] && ((rejected >= 1)) ||
    fail "smtpgate stats counts no rejected not_allowlisted connection ($rejected): $stats"
ok "smtpgate stats in the container counts it: $rejected rejected connection(s), not_allowlisted"
# ...and on /metrics.
scraped=$(metrics /metrics)
n=$(awk '/^smtpgate_egress_connections_total\{/ && /verdict="rejected"/ && /reason="not_allowlisted"/ && /family="ipv4"/ {s += $NF} END {print s + 0}' <<<"$scraped")
((n >= 1)) || fail "/metrics counts no rejected connection: $(grep '^smtpgate_egress_connections_total' <<<"$scraped" | head)"
ok "/metrics counts it: smtpgate_egress_connections_total{verdict=\"rejected\",reason=\"not_allowlisted\",family=\"ipv4\"} $n"

# --- the pod goes, the policy stays ---------------------------------------------------
pm stop -t 10 "$ctr" >/dev/null
[[ $(probe 192.0.2.10) == ECONNREFUSED ]] ||
    fail "after the container stopped, the denied client connects: a rolling update would open a gap"
[[ $(probe 192.0.2.20) == connected ]] || fail "after the container stopped, the allowlisted client is refused"
ok "container stopped: the pinned policy still enforces"
pm rm -f "$ctr" >/dev/null

echo "container-test: $passed passed, 0 failed"
