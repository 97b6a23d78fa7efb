#!/usr/bin/env bash
# The main job: install what is missing, build, start a personal instance of
# 4 brokers, ping the farthest rank through the tree, run a command on every
# rank with canopy exec, show overlay status.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
canopy_install_deps
canopy_check_cargo
cargo build --release -q -p canopy-broker
export PATH="$PWD/target/release:$PATH"
set -x
canopy start --size 4 --fanout 2 -- sh -c 'canopy ping --rank 3 --count 3 && canopy exec -n --label-io -r all sh -c "echo hello from rank \$CANOPY_EXEC_RANK" && canopy overlay status'
