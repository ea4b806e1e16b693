#!/usr/bin/env bash
# The MQTT head against the AMQP head on the durable IoT Hub path, pinned:
# the hub on core 0, edgehub-loadtest on core 1, so neither borrows the
# other's core. The same SAS-authenticated devices send QoS 1 (MQTT) or
# unsettled (AMQP) 256 B telemetry over TLS, every message routed and
# committed to RocksDB (--durability fsync) before its PUBACK or Accepted.
# The hub's CPU time is read from /proc/<pid>/stat before and after the
# measured window, so the ratio and the CPU per message do not depend on
# how fast the shared machine happens to be.
# The load generator is always this tree's.
# Usage: benches/heads_pinned.sh [seconds] [devices] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"; devices="${2:-1000}"; rounds="${3:-1}"
[ "$(nproc)" -ge 2 ] || { echo "needs two cores to pin hub and load apart" >&2; exit 1; }
[ "${BENCH_NO_BUILD:-0}" = 1 ] || cargo build -q --release -p edgehub -p edgehub-loadtest
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
# BENCH_BIN_DIR: binaries of another build (say, a worktree of the commit
# before a change), to compare in the same session.
bin_dir="${BENCH_BIN_DIR:-$target_dir/release}"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
work="$(mktemp -d -p "${BENCH_DIR:-$PWD}")"
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
source benches/iothub_ids.sh
make_iothub_ids "$work" "$devices"
ticks="$(getconf CLK_TCK)"
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

echo "edgehub $(git rev-parse --short HEAD), $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ), $devices devices, ${secs}s per run"
for round in $(seq "$rounds"); do
    for target in mqtts://localhost:18883 amqps://localhost:15671; do
        rm -rf "$work/hub"
        taskset -c 0 "$bin_dir/edgehub" --data-dir "$work/hub" \
            --mqtts-listen 127.0.0.1:18883 --wss-listen off --quic-listen off --amqps-listen 127.0.0.1:15671 \
            --management-listen 127.0.0.1:0 --hostname localhost --identities "$work/ids.json" \
            --durability fsync --log warn > "$work/hub.out" 2>&1 &
        pid=$!
        for _ in $(seq 100); do grep -q "listening amqps" "$work/hub.out" 2>/dev/null && break; sleep 0.1; done
        taskset -c 1 "$target_dir/release/edgehub-loadtest" --target "$target" --ca "$work/hub/ca.pem" \
            --connection-strings "$work/cs.txt" --devices "$devices" --ramp 2000 --qos 1 --payload 256 \
            --inflight 10 --duration "$((secs + 3))" --json "$work/load.json" > "$work/load.out" 2>&1 &
        load=$!
        # Measure the middle: after the ramp, before the generator stops.
        sleep 3
        before="$(cpu_ticks "$pid")"
        stored_before=$(curl -s "http://$(awk '/listening management/ {print $3}' "$work/hub.out")/metrics" | awk '/^edgehub_messages_stored_total/ {print $2}')
        sleep "$secs"
        after="$(cpu_ticks "$pid")"
        stored_after=$(curl -s "http://$(awk '/listening management/ {print $3}' "$work/hub.out")/metrics" | awk '/^edgehub_messages_stored_total/ {print $2}')
        wait "$load" || true
        python3 - "$target" "$before" "$after" "$ticks" "${stored_before:-0}" "${stored_after:-0}" "$secs" "$work/load.json" <<'PY'
import json, sys
target, before, after, ticks, s0, s1, secs, load = sys.argv[1:]
stored = float(s1) - float(s0)
cpu_us = (int(after) - int(before)) / int(ticks) * 1e6
try:
    reports = json.load(open(load))
    errors = sum(sum(r["errors"].values()) for r in (reports if isinstance(reports, list) else [reports]))
except (OSError, ValueError, KeyError):
    errors = "?"
print(f"{target.split(':')[0]:6} stored {stored / float(secs):9,.0f} msg/s  hub CPU {cpu_us / max(stored, 1):6.1f} µs/msg  load errors {errors}")
PY
        kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
    done
done
