# Sourced by compare.sh and idle.sh: builds the release binaries and starts
# edgehub (mqtts 127.0.0.1:18883) and mosquitto (mqtts 127.0.0.1:18884) with the
# same generated certificate, so one CA serves both. Extra edgehub flags come
# from $HUB_FLAGS, extra mosquitto.conf lines from $MOSQUITTO_CONF. Sets
# $work, $target_dir, $hub_pid, $mosq_pid; stops both and cleans up on exit.
# PIN=1 puts both brokers on core 0 and the load generator ($load_run) on
# core 1, so the generator does not steal the brokers' CPU time.
if ! command -v mosquitto >/dev/null; then
    apt-get update -qq && apt-get install -y -qq mosquitto >/dev/null
fi
[ "${BENCH_NO_BUILD:-0}" = 1 ] || cargo build -q --release -p edgehub -p edgehub-loadtest
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
# Thousands of devices need more descriptors than the usual soft limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
work="$(mktemp -d)"
broker_run=()
load_run=()
if [ "${PIN:-0}" = 1 ]; then
    broker_run=(taskset -c 0)
    load_run=(taskset -c 1)
fi
cleanup() { kill "${hub_pid:-}" "${mosq_pid:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# shellcheck disable=SC2086
"${broker_run[@]}" "$target_dir/release/edgehub" --data-dir "$work/hub" --mqtts-listen 127.0.0.1:18883 --wss-listen off --quic-listen off \
    --allow-anonymous --log warn ${HUB_FLAGS:-} > "$work/hub.out" 2>&1 &
hub_pid=$!
for _ in $(seq 50); do grep -q "listening mqtts" "$work/hub.out" 2>/dev/null && break; sleep 0.1; done
source benches/mosquitto.sh
start_mosquitto "$work" "${MOSQUITTO_CONF:-}"
