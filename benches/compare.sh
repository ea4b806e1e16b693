#!/usr/bin/env bash
# Runs the same edgehub-loadtest traffic against edgehub and mosquitto on
# loopback, TLS on, and prints both with ratios (edgehub / mosquitto).
# Usage: benches/compare.sh [seconds per run] [extra edgehub-loadtest args…]
#   default 10 s; QOS_LIST (default "0 1") and DEVICES_LIST (default "100 1000")
#   choose the scenarios, e.g. QOS_LIST=1 DEVICES_LIST=1000 benches/compare.sh 10 --rate 16
# Installs mosquitto with apt-get when missing. Both brokers keep messages in
# memory here: edgehub's durable store (fsync / os-buffered) is issue 5.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
shift || true
if ! command -v mosquitto >/dev/null; then
    apt-get update -qq && apt-get install -y -qq mosquitto >/dev/null
fi
cargo build -q --release -p edgehub -p edgehub-loadtest
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
# 1,000 devices need more descriptors than the usual soft limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
work="$(mktemp -d)"
cleanup() { kill "${hub_pid:-}" "${mosq_pid:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

"$target_dir/release/edgehub" --data-dir "$work/hub" --mqtts-listen 127.0.0.1:18883 \
    --allow-anonymous --max-queued-messages 100000 --log warn > "$work/hub.out" 2>&1 &
hub_pid=$!
for _ in $(seq 50); do grep -q "listening mqtts" "$work/hub.out" 2>/dev/null && break; sleep 0.1; done
# mosquitto serves the same certificate, so clients trust one CA for both.
cat > "$work/mosquitto.conf" <<CONF
listener 18884 127.0.0.1
allow_anonymous true
certfile $work/hub/tls/server-cert.pem
keyfile $work/hub/tls/server-key.pem
persistence false
max_queued_messages 100000
max_inflight_messages 32
CONF
# mosquitto started as root drops to its own user, which must read these.
chmod a+rx "$work" "$work/hub" "$work/hub/tls"
chmod a+r "$work/hub/tls/server-key.pem" "$work/hub/tls/server-cert.pem"
mosquitto -c "$work/mosquitto.conf" > "$work/mosquitto.log" 2>&1 &
mosq_pid=$!
sleep 0.5
kill -0 "$mosq_pid" 2>/dev/null || { cat "$work/mosquitto.log"; exit 1; }
echo "edgehub $(git rev-parse --short HEAD), mosquitto $(mosquitto -h 2>/dev/null | head -1 | awk '{print $3}'), $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ)"
for qos in ${QOS_LIST:-0 1}; do
    for devices in ${DEVICES_LIST:-100 1000}; do
        echo
        echo "== QoS $qos, $devices devices, 256 B payload, TLS, ${secs}s $*"
        "$target_dir/release/edgehub-loadtest" --target mqtts://localhost:18883 --compare mqtts://localhost:18884 \
            --ca "$work/hub/ca.pem" --devices "$devices" --ramp 2000 --qos "$qos" --payload 256 \
            --inflight 10 --duration "$secs" --json "$work/q${qos}-d${devices}.json" "$@"
    done
done
