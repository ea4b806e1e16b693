#!/usr/bin/env bash
# The same load against two builds of edgehub, alternating, so a change is
# judged by its ratio to mosquitto in the same session:
#   benches/before_after.sh BEFORE_TARGET_DIR AFTER_TARGET_DIR [rounds]
# Each target dir holds release/edgehub, release/edgehub-loadtest (and
# release/examples/fsync_rate). Make the "before" one from a worktree of
# the earlier commit:
#   git worktree add /tmp/before <commit> && (cd /tmp/before &&
#     CARGO_TARGET_DIR=/tmp/before-target cargo build --release -p edgehub \
#       -p edgehub-loadtest -p edgehub-benches --bins --example fsync_rate)
# Per round and build: benches/compare.sh (generic QoS 1 fan-in, 1,000 TLS
# devices, pinned: brokers on core 0, load on core 1) and
# benches/store_load.sh (durable IoT Hub telemetry, 1,000 devices).
set -euo pipefail
cd "$(dirname "$0")/.."
before="$1"; after="$2"; rounds="${3:-2}"
for dir in "$before" "$after"; do
    for bin in edgehub edgehub-loadtest; do
        [ -x "$dir/release/$bin" ] || { echo "missing $dir/release/$bin" >&2; exit 2; }
    done
done
for round in $(seq "$rounds"); do
    for which in before after; do
        dir="$before"; [ "$which" = after ] && dir="$after"
        echo
        echo "######## round $round: $which ($dir)"
        PIN=1 QOS_LIST=1 DEVICES_LIST=1000 BENCH_NO_BUILD=1 CARGO_TARGET_DIR="$dir" \
            benches/compare.sh 10
        BENCH_NO_BUILD=1 CARGO_TARGET_DIR="$dir" BENCH_DIR=/tmp benches/store_load.sh 10 1000
    done
done
