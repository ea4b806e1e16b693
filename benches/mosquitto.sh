# Sourced by brokers.sh and store_load.sh: the reference broker.
# start_mosquitto WORK [extra mosquitto.conf lines] — mosquitto on mqtts
# 127.0.0.1:18884 with edgehub's generated certificate from WORK/hub/tls (so one
# CA serves both), persistence off; sets $mosq_pid. ${broker_run[@]} may prefix it.
start_mosquitto() {
    local work="$1" extra="${2:-}"
    # mosquitto started as root drops to its own user, which must read these.
    chmod a+rx "$work" "$work/hub" "$work/hub/tls"
    chmod a+r "$work/hub/tls/server-key.pem" "$work/hub/tls/server-cert.pem"
    cat > "$work/mosquitto.conf" <<CONF
listener 18884 127.0.0.1
allow_anonymous true
certfile $work/hub/tls/server-cert.pem
keyfile $work/hub/tls/server-key.pem
persistence false
$extra
CONF
    "${broker_run[@]}" mosquitto -c "$work/mosquitto.conf" > "$work/mosquitto.log" 2>&1 &
    mosq_pid=$!
    sleep 0.5
    kill -0 "$mosq_pid" 2>/dev/null || { cat "$work/mosquitto.log"; exit 1; }
}
