#!/usr/bin/env bash
# Holds N idle TLS devices (default 10,000) on edgehub and then on mosquitto and
# prints each broker's resident memory while they are held.
# Usage: benches/idle.sh [devices]
set -euo pipefail
cd "$(dirname "$0")/.."
devices="${1:-10000}"
source benches/brokers.sh
rss_mib() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }

ramp=2000
hold=$(( devices / ramp + 8 ))
for broker in edgehub:18883:$hub_pid mosquitto:18884:$mosq_pid; do
    IFS=: read -r name port pid <<<"$broker"
    before=$(rss_mib "$pid")
    "${load_run[@]}" "$target_dir/release/edgehub-loadtest" --target "mqtts://localhost:$port" --ca "$work/hub/ca.pem" \
        --devices "$devices" --ramp "$ramp" --count 0 --hold --duration "$hold" > "$work/$name.txt" 2>&1 &
    lt=$!
    sleep $(( devices / ramp + 4 ))
    held=$(rss_mib "$pid")
    wait "$lt" || true
    connected=$(awk '/connected \/ failed/ {print $4 " / " $6}' "$work/$name.txt")
    echo "$name: $connected devices connected/failed; RSS ${before} MiB idle -> ${held} MiB holding them"
done
