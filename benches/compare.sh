#!/usr/bin/env bash
# Runs the same edgehub-loadtest traffic against edgehub and mosquitto on
# loopback, TLS on, and prints both with ratios (edgehub / mosquitto).
# Usage: benches/compare.sh [seconds per run] [extra edgehub-loadtest args…]
#   default 10 s; QOS_LIST (default "0 1") and DEVICES_LIST (default "100 1000")
#   choose the scenarios, e.g. QOS_LIST=1 DEVICES_LIST=1000 benches/compare.sh 10 --rate 16
# Installs mosquitto with apt-get when missing. Both brokers keep messages in
# memory here (anonymous clients on generic topics are not stored); the
# persisted IoT Hub telemetry path is measured by benches/store_load.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
shift || true
HUB_FLAGS="--max-queued-messages 100000"
MOSQUITTO_CONF=$'max_queued_messages 100000\nmax_inflight_messages 32'
source benches/brokers.sh

echo "edgehub $(git rev-parse --short HEAD), mosquitto $(mosquitto -h 2>/dev/null | head -1 | awk '{print $3}'), $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ)"
for qos in ${QOS_LIST:-0 1}; do
    for devices in ${DEVICES_LIST:-100 1000}; do
        echo
        echo "== QoS $qos, $devices devices, 256 B payload, TLS, ${secs}s $*"
        "${load_run[@]}" "$target_dir/release/edgehub-loadtest" --target mqtts://localhost:18883 --compare mqtts://localhost:18884 \
            --ca "$work/hub/ca.pem" --devices "$devices" --ramp 2000 --qos "$qos" --payload 256 \
            --inflight 10 --duration "$secs" --json "$work/q${qos}-d${devices}.json" "$@"
    done
done
