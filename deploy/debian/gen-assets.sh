#!/bin/bash
# Generates the man page and shell completions from the clap definitions, by
# running the built binary's hidden `man` and `completions` subcommands, so
# they can never drift from the CLI. Run after `cargo build --release -p
# smtpgate` and before `cargo deb -p smtpgate --no-build`.
#
# Output: <cargo target dir>/release/assets/. cargo-deb rewrites the
# `target/release/` prefix of an asset path to the real target directory
# (CARGO_TARGET_DIR, build.target-dir, ...) and no other prefix, so assets
# under it are found wherever the build put them.
#
# Usage: deploy/debian/gen-assets.sh [path/to/smtpgate]
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
target_dir=$(cd "$root" && cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
bin=${1:-$target_dir/release/smtpgate}
out=$target_dir/release/assets

if [[ ! -x $bin ]]; then
    echo "gen-assets: $bin not found: run 'cargo build --release -p smtpgate' first" >&2
    exit 1
fi

rm -rf "$out"
mkdir -p "$out"
"$bin" man > "$out/smtpgate.1"
gzip -9n < "$out/smtpgate.1" > "$out/smtpgate.1.gz"
"$bin" completions bash > "$out/smtpgate.bash"
"$bin" completions zsh > "$out/_smtpgate"
"$bin" completions fish > "$out/smtpgate.fish"

# An empty file here would ship silently; a roff page starts with ".TH" (or a
# comment line), a completion script is never empty.
for f in smtpgate.1 smtpgate.bash _smtpgate smtpgate.fish; do
    if [[ ! -s $out/$f ]]; then
        echo "gen-assets: $out/$f is empty" >&2
        exit 1
    fi
done
grep -q '^\.TH' "$out/smtpgate.1" || { echo "gen-assets: $out/smtpgate.1 is not a man page" >&2; exit 1; }
echo "gen-assets: wrote $(ls "$out" | tr '\n' ' ')to $out"
