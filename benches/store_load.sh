#!/usr/bin/env bash
# Persisted QoS 1 telemetry through the whole hub: edgehub-loadtest in IoT Hub
# mode (devices with SAS tokens on their telemetry topics, so every message is
# routed and committed to RocksDB before its PUBACK or AMQP Accepted) against
# edgehub with --durability fsync and os-buffered over MQTT and fsync over
# AMQP, in the same session as
#  - the raw sync rate of the same disk (examples/fsync_rate.rs), the physical
#    limit of one-sync-per-message, and
#  - mosquitto (QoS 1, generic topics, persistence off) as the reference broker.
# Usage: benches/store_load.sh [seconds] [devices] [extra edgehub-loadtest args…]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"; devices="${2:-100}"
shift 2 || shift $# || true
if ! command -v mosquitto >/dev/null; then
    apt-get update -qq && apt-get install -y -qq mosquitto >/dev/null
fi
# BENCH_NO_BUILD=1: use the release binaries already in the target dir.
[ "${BENCH_NO_BUILD:-0}" = 1 ] ||
    cargo build -q --release -p edgehub -p edgehub-loadtest -p edgehub-benches --bins --example fsync_rate
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
work="$(mktemp -d -p "${BENCH_DIR:-$PWD}")"
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

source benches/iothub_ids.sh
make_iothub_ids "$work" "$devices"

echo "edgehub $(git rev-parse --short HEAD), $(nproc) cores, disk of $work, $(date -u +%Y-%m-%dT%H:%MZ)"
if [ -x "$target_dir/release/examples/fsync_rate" ]; then
    "$target_dir/release/examples/fsync_rate" "$work" 2000
else
    # Same loop in Python: 4 KiB write + fdatasync, 2000 times.
    python3 - "$work" <<'PY'
import os, sys, time
fd = os.open(os.path.join(sys.argv[1], "fsync-probe"), os.O_WRONLY | os.O_CREAT, 0o600)
buf = b"x" * 4096
t = time.perf_counter()
for _ in range(2000):
    os.write(fd, buf); os.fdatasync(fd)
dt = time.perf_counter() - t
print(f"raw disk: {2000 / dt:.0f} fdatasync/s ({dt / 2000 * 1e3:.3f} ms each, 4 KiB write + fdatasync)")
PY
fi

start_hub() { # durability
    rm -rf "$work/hub"
    "$target_dir/release/edgehub" --data-dir "$work/hub" --mqtts-listen 127.0.0.1:18883 --wss-listen off --quic-listen off \
        --amqps-listen 127.0.0.1:15671 \
        --management-listen 127.0.0.1:0 --hostname localhost --identities "$work/ids.json" \
        --durability "$1" --log warn > "$work/hub.out" 2>&1 &
    pid=$!
    for _ in $(seq 100); do grep -q "listening mqtts" "$work/hub.out" 2>/dev/null && break; sleep 0.1; done
}

# The durable path over MQTT with both durabilities, then over AMQP (the
# same devices and traffic through the AMQP head, --durability fsync).
for run in "fsync mqtts://localhost:18883" "os-buffered mqtts://localhost:18883" \
    "fsync amqps://localhost:15671"; do
    set -- $run "$@"; durability="$1"; target="$2"; shift 2
    start_hub "$durability"
    echo
    echo "== edgehub --durability $durability, ${target%%:*}: QoS 1 telemetry, $devices devices, 256 B, TLS, ${secs}s $*"
    "$target_dir/release/edgehub-loadtest" --target "$target" --ca "$work/hub/ca.pem" \
        --connection-strings "$work/cs.txt" --devices "$devices" --ramp 2000 --qos 1 --payload 256 \
        --inflight 10 --duration "$secs" "$@"
    stored=$(curl -s "http://$(awk '/listening management/ {print $3}' "$work/hub.out")/metrics" | awk '/^edgehub_messages_stored_total/ {print $2}')
    echo "hub metrics: edgehub_messages_stored_total $stored"
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
done

broker_run=()
source benches/mosquitto.sh
start_mosquitto "$work" "max_inflight_messages 32"
pid=$mosq_pid
echo
echo "== mosquitto (reference, in memory): QoS 1, $devices devices, 256 B, TLS, ${secs}s $*"
"$target_dir/release/edgehub-loadtest" --target mqtts://localhost:18884 --ca "$work/hub/ca.pem" \
    --devices "$devices" --ramp 2000 --qos 1 --payload 256 --inflight 10 --duration "$secs" "$@"
