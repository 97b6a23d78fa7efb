#!/usr/bin/env bash
# Build the Debian package canopy_<version>-1_<arch>.deb with cargo-deb:
# the binary, then the manual and completions (`canopy generate-manual`),
# then the package (metadata: [package.metadata.deb] in broker/Cargo.toml).
#
#   scripts/deb.sh                 # release build, .deb in target/debian/
#   scripts/deb.sh --profile dev   # faster: package the debug build (tests)
#   scripts/deb.sh --output DIR    # write the .deb into DIR
#
# Prints the path of the .deb on its last line. Installs cargo-deb from
# crates.io if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
output=
while [ $# -gt 0 ]; do
    case "$1" in
    --profile) profile=$2; shift 2 ;;
    --output) output=$2; shift 2 ;;
    *) echo "deb.sh: unknown argument $1; see the comment at the top of $0" >&2; exit 2 ;;
    esac
done

if ! command -v cargo-deb >/dev/null; then
    echo "deb.sh: installing cargo-deb (cargo install cargo-deb --locked)" >&2
    cargo install cargo-deb --locked
fi

target=${CARGO_TARGET_DIR:-$PWD/target}
case "$profile" in
dev | test) dir=$target/debug ;;
*) dir=$target/$profile ;;
esac

cargo build --profile "$profile" -p canopy-broker >&2
rm -rf "$dir/manual"
"$dir/canopy" generate-manual "$dir/manual" >/dev/null
out=${output:-$target/debian}
mkdir -p "$out"
cargo deb -p canopy-broker --no-build --profile "$profile" --output "$out" --fast
