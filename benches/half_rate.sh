#!/usr/bin/env bash
# Publish→ack latency at a fixed offered rate (issue 7's "p99 at half of the
# reference's saturated rate"): persisted QoS 1 IoT Hub telemetry into edgehub
# (--durability fsync, then os-buffered) and the same traffic into mosquitto
# (generic topics, in memory), each broker pinned to core 0 and the load
# generator to core 1 (PIN=0: no pinning, all share both cores). With PROFILE=1 the fsync run is sampled with
# `perf record -e cpu-clock -g` (no hardware counters needed) and the top of
# the report is printed.
# Latencies are those of messages published after a 3 s warm-up (the TLS
# connection ramp of thousands of devices would otherwise be the tail).
# Usage: benches/half_rate.sh <msgs/s per device> [devices] [seconds measured]
set -euo pipefail
cd "$(dirname "$0")/.."
rate="${1:?msgs/s per device}"; devices="${2:-1000}"; secs="${3:-10}"
warmup=3; run=$((secs + warmup))
if ! command -v mosquitto >/dev/null; then
    apt-get update -qq && apt-get install -y -qq mosquitto >/dev/null
fi
[ "${BENCH_NO_BUILD:-0}" = 1 ] || cargo build -q --release -p edgehub -p edgehub-loadtest
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
on0=(taskset -c 0); on1=(taskset -c 1)
if [ "${PIN:-1}" = 0 ]; then on0=(); on1=(); fi
work="$(mktemp -d -p "${BENCH_DIR:-$PWD}")"
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

source benches/iothub_ids.sh
make_iothub_ids "$work" "$devices"
echo "edgehub $(git rev-parse --short HEAD), $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ)"
echo "offered: $devices devices x $rate msg/s = $(python3 -c "print(int($devices*$rate))") msg/s, QoS 1, 256 B, TLS, ${secs}s"

for durability in fsync os-buffered; do
    rm -rf "$work/hub"
    "${on0[@]}" "$target_dir/release/edgehub" --data-dir "$work/hub" --mqtts-listen 127.0.0.1:18883 --wss-listen off --quic-listen off \
        --management-listen 127.0.0.1:0 --hostname localhost --identities "$work/ids.json" \
        --durability "$durability" --log warn > "$work/hub.out" 2>&1 &
    pid=$!
    for _ in $(seq 100); do grep -q "listening mqtts" "$work/hub.out" 2>/dev/null && break; sleep 0.1; done
    prof=()
    if [ "${PROFILE:-0}" = 1 ] && [ "$durability" = fsync ]; then
        # Sample the hub while the load runs (after the connection ramp).
        (sleep "$warmup"; perf record -q -e cpu-clock -F 499 -g -p "$pid" -o "$work/perf.data" -- sleep "$((secs - 1))" >/dev/null 2>&1) &
        prof=($!)
    fi
    echo
    echo "== edgehub --durability $durability"
    "${on1[@]}" "$target_dir/release/edgehub-loadtest" --target mqtts://localhost:18883 --ca "$work/hub/ca.pem" \
        --connection-strings "$work/cs.txt" --devices "$devices" --ramp 2000 --qos 1 --payload 256 \
        --inflight 10 --rate "$rate" --duration "$run" --warmup "$warmup"
    [ ${#prof[@]} -eq 0 ] || wait "${prof[0]}"
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
    if [ -f "$work/perf.data" ] && [ "$durability" = fsync ]; then
        echo
        echo "== where the hub's CPU time goes (fsync run, perf cpu-clock, self time, top 25)"
        perf report -i "$work/perf.data" --no-children --sort symbol --stdio 2>/dev/null |
            awk '/^ +[0-9]/ && n < 25 { n++; $NF = ""; sub(/ +-? *$/, ""); print }'
        echo "== by thread"
        perf report -i "$work/perf.data" --no-children --sort comm --stdio 2>/dev/null |
            awk '/^ +[0-9]/ && n < 10 { n++; print $1, $2 }'
        echo "== by library"
        perf report -i "$work/perf.data" --no-children --sort dso --stdio 2>/dev/null |
            awk '/^ +[0-9]/ && n < 8 { n++; print $1, $2 }' 
    fi
done

broker_run=("${on0[@]}")
source benches/mosquitto.sh
start_mosquitto "$work" "max_inflight_messages 32"
pid=$mosq_pid
echo
echo "== mosquitto (reference, in memory)"
"${on1[@]}" "$target_dir/release/edgehub-loadtest" --target mqtts://localhost:18884 --ca "$work/hub/ca.pem" \
    --devices "$devices" --ramp 2000 --qos 1 --payload 256 --inflight 10 --rate "$rate" --duration "$run" --warmup "$warmup"
