#!/bin/bash
# Builds the smtpgate Debian package, then installs, upgrades, removes and
# purges it on this machine, checking each step. Root only; fails loudly.
#
#   deploy/tests/package-test.sh            # build with cargo, then test
#   deploy/tests/package-test.sh FILE.deb   # test an existing package
#
# Needs: cargo-deb (cargo install cargo-deb --locked --version 3.8.0), dpkg,
# adduser, systemd's systemd-analyze (the systemd package; systemd need not
# be running: nothing here starts the service, and the test checks that the
# maintainer scripts do not try to either when systemd is not PID 1).
#
# It runs in a private mount namespace with a fresh bpffs over /sys/fs/bpf,
# so the pins it plays with are its own and a real agent's pins on this
# machine are never touched. The package install itself is real: it refuses
# to run if smtpgate is already installed.
set -euo pipefail

fail() { echo "package-test: FAIL: $*" >&2; exit 1; }
step() { echo "package-test: $*"; }
passed=0
ok() { passed=$((passed + 1)); echo "ok   $*"; }

[[ $EUID -eq 0 ]] || fail "must run as root (it installs a package)"

if [[ -z ${SMTPGATE_PKGTEST_NS:-} ]]; then
    exec unshare --mount --propagation private env SMTPGATE_PKGTEST_NS=1 "$0" "$@"
fi
mount -t bpf bpf /sys/fs/bpf || fail "cannot mount a private bpffs on /sys/fs/bpf"

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
work=$(mktemp -d)
installed_by_us=
cleanup() {
    # A failed run must not leave the package behind: the next run would
    # refuse to start.
    if [[ -n $installed_by_us ]] && dpkg-query -W -f='${Status}' smtpgate 2>/dev/null | grep -q 'ok'; then
        echo "package-test: cleaning up: dpkg --purge smtpgate" >&2
        dpkg --purge smtpgate >/dev/null 2>&1 || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

if dpkg-query -W -f='${Status}' smtpgate 2>/dev/null | grep -q 'install ok'; then
    fail "smtpgate is already installed here; this test installs and purges it, so it will not run over a real install"
fi
for tool in dpkg-deb systemd-analyze adduser; do
    command -v "$tool" >/dev/null || fail "$tool not found (apt-get install dpkg systemd adduser)"
done

# --- Build ---------------------------------------------------------------------
if [[ $# -ge 1 ]]; then
    deb=$1
else
    command -v cargo-deb >/dev/null || fail "cargo-deb not found: cargo install cargo-deb --locked --version 3.8.0"
    step "building"
    cargo build --release -p smtpgate
    deploy/debian/gen-assets.sh
    cargo deb -p smtpgate --no-build --output "$work/"
    deb=$(ls "$work"/*.deb)
fi
[[ -f $deb ]] || fail "no package at $deb"
step "testing $deb"

# --- The package as built --------------------------------------------------------
contents=$(dpkg-deb --contents "$deb" | awk '{print $6}')
for path in ./usr/bin/smtpgate ./usr/lib/systemd/system/smtpgate.service \
    ./usr/share/man/man1/smtpgate.1.gz ./usr/share/bash-completion/completions/smtpgate \
    ./usr/share/zsh/vendor-completions/_smtpgate ./usr/share/fish/vendor_completions.d/smtpgate.fish \
    ./etc/smtpgate/smtpgate.toml ./usr/share/doc/smtpgate/README.md; do
    grep -qx "$path" <<<"$contents" || fail "package lacks $path"
done
ok "package has binary, unit, man page, completions, config, guide"
dpkg-deb -e "$deb" "$work/control"
grep -qx /etc/smtpgate/smtpgate.toml "$work/control/conffiles" || fail "/etc/smtpgate/smtpgate.toml is not a conffile"
ok "/etc/smtpgate/smtpgate.toml is a conffile"
grep -q '^Depends:.*adduser' "$work/control/control" || fail "does not depend on adduser"
ok "depends on adduser"
grep -q 'deb-systemd-invoke try-restart smtpgate.service' "$work/control/postinst" \
    || fail "postinst does not try-restart the unit after an upgrade"
if grep -Eq 'deb-systemd-invoke (start|restart) ' "$work/control/postinst"; then
    fail "postinst starts or unconditionally restarts the unit"
fi
if grep -q 'deb-systemd-helper enable' "$work/control/postinst" &&
    ! grep -q 'was-enabled' "$work/control/postinst"; then
    fail "postinst enables the unit on a fresh install"
fi
ok "postinst: no start or enable on install, try-restart on upgrade"
grep -q '"$1" = remove' "$work/control/prerm" || fail "prerm stops the unit on upgrade too"
ok "prerm: stops only on remove"
for s in postinst prerm postrm; do sh -n "$work/control/$s" || fail "$s: syntax"; done
ok "maintainer scripts parse"

# --- Install -------------------------------------------------------------------------
[[ -d /run/systemd/system ]] && step "note: systemd is running here; the unit stays disabled and stopped all the same"
step "dpkg -i"
installed_by_us=1
dpkg -i "$deb"
dpkg-query -W -f='${Status}' smtpgate | grep -q 'install ok installed' || fail "not installed"
ok "installed"

version=$(dpkg-deb -f "$deb" Version)
out=$(smtpgate --version)
[[ $out == "smtpgate ${version%%-*}" ]] || fail "smtpgate --version says '$out', package is $version"
ok "smtpgate --version: $out"
smtpgate check-config /etc/smtpgate/smtpgate.toml || fail "shipped config does not pass check-config"
ok "smtpgate check-config /etc/smtpgate/smtpgate.toml"
zcat /usr/share/man/man1/smtpgate.1.gz | grep -q '^\.TH' || fail "man page is not roff"
ok "man page"
bash -n /usr/share/bash-completion/completions/smtpgate || fail "bash completion does not parse"
ok "bash completion parses"

unit=/usr/lib/systemd/system/smtpgate.service
verify=$(systemd-analyze verify "$unit" 2>&1) || fail "systemd-analyze verify: $verify"
# Without man-db installed, verify cannot look up Documentation=man:... and
# says so; anything else it prints is a real finding.
findings=$(grep -v "man smtpgate(1)" <<<"$verify" || true)
[[ -z $findings ]] || fail "systemd-analyze verify: $findings"
ok "systemd-analyze verify $unit"
security=$(systemd-analyze security --offline=yes "$unit" 2>&1 | grep 'Overall exposure level') \
    || fail "systemd-analyze security --offline=yes failed"
score=$(grep -oE '[0-9]+\.[0-9]+' <<<"$security" | head -1)
awk -v s="$score" 'BEGIN { exit !(s <= 3.0) }' || fail "exposure $score is above 3.0: $security"
ok "systemd-analyze security: $score (limit 3.0)"

getent passwd smtpgate >/dev/null || fail "no smtpgate user"
uid=$(id -u smtpgate)
(( uid < 1000 )) || fail "smtpgate is not a system user (uid $uid)"
ok "system user smtpgate (uid $uid)"
check_perms() { # path owner:group mode
    local got
    got=$(stat -c '%U:%G %a' "$1") || fail "$1 missing"
    [[ $got == "$2 $3" ]] || fail "$1 is $got, want $2 $3"
    ok "$1 $2 $3"
}
check_perms /etc/smtpgate root:smtpgate 750
check_perms /etc/smtpgate/users.toml root:smtpgate 640
check_perms /etc/smtpgate/dkim smtpgate:smtpgate 700
check_perms /var/lib/smtpgate smtpgate:smtpgate 750
check_perms /var/lib/smtpgate/spool smtpgate:smtpgate 750
[[ ! -e /etc/systemd/system/multi-user.target.wants/smtpgate.service ]] || fail "unit was enabled on install"
ok "unit not enabled"
# Only the installed binary counts: other smtpgate builds may be running
# here (development, lab tests).
for exe in /proc/[0-9]*/exe; do
    [[ $(readlink "$exe" 2>/dev/null) == /usr/bin/smtpgate ]] &&
        fail "/usr/bin/smtpgate is running after install (pid ${exe//[^0-9]/})"
done
ok "nothing started"

# `smtpgate user add` rewrites the users file; the agent (user smtpgate) must
# still be able to read it afterwards.
if smtpgate --help | grep -qE '^ +user'; then
    cp -p /etc/smtpgate/users.toml "$work/users.before"
    echo 'package-test-password' | smtpgate user add pkgtest --sender pkgtest@example.com >/dev/null ||
        fail "smtpgate user add failed"
    if setpriv --reuid smtpgate --regid smtpgate --init-groups cat /etc/smtpgate/users.toml >/dev/null 2>&1; then
        ok "after smtpgate user add, the agent's user can still read users.toml"
    else
        fail "after smtpgate user add, users.toml is $(stat -c '%U:%G %a' /etc/smtpgate/users.toml): the agent cannot read it"
    fi
    cp -p "$work/users.before" /etc/smtpgate/users.toml
fi

# `smtpgate dkim generate` runs as root; the key (0600) must be the agent's.
if smtpgate --help | grep -qE '^ +dkim'; then
    smtpgate dkim generate pkgtest.example --selector pkgtest >/dev/null ||
        fail "smtpgate dkim generate failed"
    key=/etc/smtpgate/dkim/pkgtest.example/pkgtest.key
    check_perms "$key" smtpgate:smtpgate 600
    if setpriv --reuid smtpgate --regid smtpgate --init-groups cat "$key" >/dev/null 2>&1; then
        ok "the agent's user can read a key root generated"
    else
        fail "the agent's user cannot read $key"
    fi
    smtpgate dkim remove pkgtest.example >/dev/null || fail "smtpgate dkim remove failed"
fi

# --- Upgrade (same version again: postinst configure runs with the old version) ----
echo '# local edit' >> /etc/smtpgate/smtpgate.toml
echo '# a user line' >> /etc/smtpgate/users.toml
mkdir /sys/fs/bpf/smtpgate
mkdir /sys/fs/bpf/smtpgate/marker   # stands in for the agent's pins
step "dpkg -i again (upgrade path)"
dpkg -i --force-confold "$deb"
grep -q '^# local edit' /etc/smtpgate/smtpgate.toml || fail "upgrade lost the local config edit"
ok "upgrade kept the edited conffile"
grep -q '^# a user line' /etc/smtpgate/users.toml || fail "upgrade rewrote the users file"
ok "upgrade kept the users file"
[[ -d /sys/fs/bpf/smtpgate/marker ]] || fail "upgrade removed the pins: enforcement would have stopped"
ok "upgrade left the pins alone"
check_perms /etc/smtpgate/users.toml root:smtpgate 640

# --- Remove, then purge -----------------------------------------------------------------
step "dpkg -r"
dpkg -r smtpgate
[[ ! -e /usr/bin/smtpgate ]] || fail "binary still there after remove"
[[ ! -e $unit ]] || fail "unit still there after remove"
[[ ! -e /sys/fs/bpf/smtpgate ]] || fail "pins still there after remove: they would enforce with no agent left"
[[ -f /etc/smtpgate/smtpgate.toml ]] || fail "remove deleted the config (only purge may)"
[[ -d /var/lib/smtpgate/spool ]] || fail "remove deleted the spool (only purge may)"
ok "remove: binary, unit and pins gone; config and spool kept"

step "dpkg --purge"
dpkg --purge smtpgate
for path in /etc/smtpgate /var/lib/smtpgate /run/smtpgate /sys/fs/bpf/smtpgate \
    /usr/share/man/man1/smtpgate.1.gz /usr/share/doc/smtpgate; do
    [[ ! -e $path ]] || fail "$path still there after purge"
done
if dpkg-query -W -f='${Status}' smtpgate 2>/dev/null | grep -q 'installed'; then
    fail "dpkg still lists smtpgate"
fi
ok "purge: config, users, state, spool, runtime dir and pins gone"

echo "package-test: $passed passed, 0 failed"
