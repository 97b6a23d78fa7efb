#!/usr/bin/env bash
# Build the Debian package canopy_<version>-1_<arch>.deb with cargo-deb
# ([package.metadata.deb] in broker/Cargo.toml): the binary, then its manual
# and completions (`canopy generate-manual`, man pages gzipped), then the
# package.
#
#   scripts/deb.sh                    # release build; .deb in target/debian/
#   scripts/deb.sh --binary PATH      # package an already-built canopy
#                                     # binary instead (no compiling; tests)
#   scripts/deb.sh --output DIR       # write the .deb into DIR
#
# Prints the path of the .deb on its last line. Installs cargo-deb from
# crates.io if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

binary=
output=
while [ $# -gt 0 ]; do
    case "$1" in
    --binary) binary=$2; shift 2 ;;
    --output) output=$2; shift 2 ;;
    *) echo "deb.sh: unknown argument $1; see the comment at the top of $0" >&2; exit 2 ;;
    esac
done

if ! command -v cargo-deb >/dev/null; then
    echo "deb.sh: installing cargo-deb (cargo install cargo-deb --locked)" >&2
    cargo install cargo-deb --locked
fi

target=${CARGO_TARGET_DIR:-$PWD/target}
out=${output:-$target/debian}
if [ -n "$binary" ]; then
    # A private target directory holding just this binary as the release
    # build, so that cargo-deb packages it as it is.
    stage=$(mktemp -d "${TMPDIR:-/tmp}/canopy-deb.XXXXXX")
    trap 'rm -rf "$stage"' EXIT
    mkdir -p "$stage/release"
    cp "$binary" "$stage/release/canopy"
    # The broker alone, the exec helper and the site CA, built next to it.
    for b in canopy-broker canopy-imp canopy-ca; do
        cp "$(dirname "$binary")/$b" "$stage/release/$b"
    done
else
    cargo build --release -p canopy-broker -p canopy-imp -p canopy-ca >&2
    stage=$target
fi

manual=$stage/release/manual
rm -rf "$manual"
"$stage/release/canopy" generate-manual "$manual" >/dev/null
gzip -9n "$manual"/man/*.[15]

mkdir -p "$out"
fast=()
# A test package: stripped, and gzip instead of the slower xz.
[ -n "$binary" ] && fast=(--fast --strip)
CARGO_TARGET_DIR=$stage cargo deb -p canopy-broker --no-build "${fast[@]}" --output "$out"
