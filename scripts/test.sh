#!/usr/bin/env bash
# Every test: unit, integration (real brokers, real sockets) and a smoke
# run of each benchmark scenario.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
canopy_install_deps
canopy_check_cargo
canopy_install_cargo_deb
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast

# The Python client (python/) against real brokers run by that debug binary.
scripts/test-python.sh
if [ -d bench ]; then
    cargo build --release -q -p canopy-broker -p canopy-bench
    # The hostile scenario (root only) runs canopy-t-peer beside canopy.
    cargo build --release -q -p canopy-t --bin canopy-t-peer
    target/release/canopy-bench smoke
fi
