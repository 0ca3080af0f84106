#!/bin/bash
# Every deploy/ test, in the order CI should run them, with the tools each
# needs installed first. Root (the package, sandbox and systemd tests install
# things and use namespaces). Exits non-zero on the first failing test.
#
#   deploy/tests/run-all.sh            # everything
#   SMTPGATE_SKIP_SYSTEMD_TEST=1 deploy/tests/run-all.sh
#                                      # without the nspawn boot (saves the
#                                      # one-off 3-minute debootstrap)
#   SMTPGATE_SKIP_CONTAINER_TEST=1 deploy/tests/run-all.sh
#                                      # without the image build and run
set -euo pipefail
cd "$(dirname "$0")/../.."

[[ $EUID -eq 0 ]] || { echo "run-all: must run as root" >&2; exit 1; }

missing=()
for pkg in dpkg adduser systemd python3-seccomp podman runc debootstrap; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "run-all: apt-get install ${missing[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi
if ! cargo deb --version 2>/dev/null | grep -q '3\.8\.0'; then
    echo "run-all: cargo install cargo-deb 3.8.0"
    cargo install cargo-deb --locked --version 3.8.0 --quiet
fi
# helm-sdkpy declares Python >= 3.12 but runs on 3.11 (the CI machines'):
# it only dlopens its bundled Helm library through cffi.
python3 -m pip install -q --disable-pip-version-check pyyaml kubernetes-validate==1.37.0 cffi jsonschema
python3 -m pip install -q --disable-pip-version-check --no-deps --ignore-requires-python helm-sdkpy==0.1.32

cargo build --release -p smtpgate
target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
bin=$target_dir/release/smtpgate
deploy/debian/gen-assets.sh "$bin"
rm -rf "$target_dir/debian"
cargo deb -p smtpgate --no-build --output "$target_dir/debian/"
deb=$(ls "$target_dir"/debian/smtpgate_*.deb)

export CI=${CI:-true}   # validators that cannot run are failures, not skips
deploy/tests/validate-manifests.py --smtpgate "$bin"
deploy/tests/sandbox-test.sh "$bin"
deploy/tests/package-test.sh "$deb"
if [[ -z ${SMTPGATE_SKIP_SYSTEMD_TEST:-} ]]; then
    deploy/tests/systemd-test.sh "$deb"
fi
if [[ -z ${SMTPGATE_SKIP_CONTAINER_TEST:-} ]]; then
    deploy/tests/container-test.sh "$bin"
fi
echo "run-all: every deploy test passed"
