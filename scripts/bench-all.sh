#!/usr/bin/env bash
# Re-measure every benchmark in docs/performance.md and regenerate its
# table and the plots in docs/bench/ from the new JSON. One command:
#
#     scripts/bench-all.sh
#
# About 5 minutes on a quiet 2-core machine. Instances are made in
# $CANOPY_BENCH_RUNDIR, else $XDG_RUNTIME_DIR, else /dev/shm (a tmpfs,
# where `canopy start` would put them on a login with a runtime
# directory); the JSON records which directory and file system it was.
# Each scenario writes its JSON only when it completes, so a failure
# leaves the previous results in place. Not part of CI: scripts/test.sh
# runs only `canopy-bench smoke`.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
cargo build --release -q -p canopy-broker -p canopy-bench -p canopy-imp
cargo build --release -q -p canopy-t --bin canopy-t-peer
bench=target/release/canopy-bench
rundir=${CANOPY_BENCH_RUNDIR:-${XDG_RUNTIME_DIR:-/dev/shm}}
out=docs/bench
mkdir -p "$out"
run() {
    local name=$1
    shift
    echo "== $name: canopy-bench $* (loadavg $(cut -d' ' -f1-3 /proc/loadavg))" >&2
    "$bench" --rundir "$rundir" --json "$out/$name.json" "$@"
}
# start last: 1,024 brokers push the 1-minute load average up for a while,
# which would make the next scenario's recorded load look worse than it was.
run acl acl --rules 1000 --runs 5
run rpc rpc --size 8 --ranks 0,1,3,7 --pad 0,1024,65536 --count 2000 --runs 5
run event event --size 8 --window 64 --runs 5
run link link --runs 9
run memory memory --size 8 --messages 1000000 --rounds 3
# exec through the helper needs root (it installs canopy-imp setuid root).
helper=()
[ "$(id -u)" = 0 ] && helper=(--helper target/release/canopy-imp)
run exec exec --sizes 8,64,1024 --runs 20 "${helper[@]}"
run start start --sizes 1,2,4,8,16,64,256,1024 --runs 5
"$bench" report --dir "$out" --doc docs/performance.md
echo "bench-all: done in $(( $(date +%s) - start )) s" >&2
