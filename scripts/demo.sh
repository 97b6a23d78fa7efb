#!/usr/bin/env bash
# The main job: install what is missing, build, start a personal instance of
# 4 brokers, ping the farthest rank through the tree, show overlay status.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
canopy_install_deps
canopy_check_cargo
cargo build --release -q -p canopy-broker
export PATH="$PWD/target/release:$PATH"
set -x
canopy start --size 4 --fanout 2 -- sh -c 'canopy ping --rank 3 --count 3 && canopy overlay status'
