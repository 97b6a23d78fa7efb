#!/usr/bin/env bash
# Before/after on the broker's hot path, in one run: the same benchmark
# client against two canopy binaries, alternating, so both see the same
# machine in the same minutes.
#
#     scripts/bench-compare.sh OLD_CANOPY [NEW_CANOPY] [OUT_DIR]
#
# OLD_CANOPY is a `canopy` built from an earlier commit, e.g.
#     git worktree add /tmp/base <commit> &&
#     (cd /tmp/base && cargo build --release -p canopy-broker)
# Writes OUT_DIR/{before,after}-{rpc,event,start,memory}-N.json (N = round).
set -euo pipefail
cd "$(dirname "$0")/.."
old=${1:?usage: scripts/bench-compare.sh OLD_CANOPY [NEW_CANOPY] [OUT_DIR]}
cargo build --release -q -p canopy-broker -p canopy-bench
new=${2:-target/release/canopy}
out=${3:-target/bench-compare}
rounds=${ROUNDS:-2}
bench=target/release/canopy-bench
rundir=${CANOPY_BENCH_RUNDIR:-${XDG_RUNTIME_DIR:-/dev/shm}}
mkdir -p "$out"
one() {
    local tag=$1 bin=$2 r=$3
    echo "== $tag round $r (loadavg $(cut -d' ' -f1-3 /proc/loadavg))" >&2
    "$bench" --canopy "$bin" --rundir "$rundir" --json "$out/$tag-rpc-$r.json" rpc --size 8 --ranks 0,1,3 --pad 0,65536 --count 2000 --runs 3 >/dev/null
    "$bench" --canopy "$bin" --rundir "$rundir" --json "$out/$tag-event-$r.json" event --size 8 --window 64 --runs 3 >/dev/null
    "$bench" --canopy "$bin" --rundir "$rundir" --json "$out/$tag-start-$r.json" start --sizes 1,8,16,64 --runs 3 >/dev/null
    "$bench" --canopy "$bin" --rundir "$rundir" --json "$out/$tag-memory-$r.json" memory --size 8 --messages 300000 --rounds 2 >/dev/null
}
for r in $(seq 1 "$rounds"); do
    one before "$old" "$r"
    one after "$new" "$r"
done
echo "bench-compare: results in $out" >&2
