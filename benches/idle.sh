#!/usr/bin/env bash
# Holds N idle TLS devices (default 10,000) on edgehub and then on mosquitto and
# prints each broker's resident memory while they are held.
# Usage: benches/idle.sh [devices]
set -euo pipefail
cd "$(dirname "$0")/.."
devices="${1:-10000}"
if ! command -v mosquitto >/dev/null; then
    apt-get update -qq && apt-get install -y -qq mosquitto >/dev/null
fi
cargo build -q --release -p edgehub -p edgehub-loadtest
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
work="$(mktemp -d)"
cleanup() { kill "${hub_pid:-}" "${mosq_pid:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
rss_mib() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }

"$target_dir/release/edgehub" --data-dir "$work/hub" --mqtts-listen 127.0.0.1:18883 \
    --allow-anonymous --log warn > "$work/hub.out" 2>&1 &
hub_pid=$!
for _ in $(seq 50); do grep -q "listening mqtts" "$work/hub.out" 2>/dev/null && break; sleep 0.1; done
chmod a+rx "$work" "$work/hub" "$work/hub/tls"
chmod a+r "$work/hub/tls/server-key.pem" "$work/hub/tls/server-cert.pem"
cat > "$work/mosquitto.conf" <<CONF
listener 18884 127.0.0.1
allow_anonymous true
certfile $work/hub/tls/server-cert.pem
keyfile $work/hub/tls/server-key.pem
persistence false
CONF
mosquitto -c "$work/mosquitto.conf" > "$work/mosquitto.log" 2>&1 &
mosq_pid=$!
sleep 0.5
ramp=2000
hold=$(( devices / ramp + 8 ))
for broker in edgehub:18883:$hub_pid mosquitto:18884:$mosq_pid; do
    IFS=: read -r name port pid <<<"$broker"
    before=$(rss_mib "$pid")
    "$target_dir/release/edgehub-loadtest" --target "mqtts://localhost:$port" --ca "$work/hub/ca.pem" \
        --devices "$devices" --ramp "$ramp" --count 0 --hold --duration "$hold" > "$work/$name.txt" 2>&1 &
    lt=$!
    sleep $(( devices / ramp + 4 ))
    held=$(rss_mib "$pid")
    wait "$lt" || true
    connected=$(awk '/connected \/ failed/ {print $4 " / " $6}' "$work/$name.txt")
    echo "$name: $connected devices connected/failed; RSS ${before} MiB idle -> ${held} MiB holding them"
done
