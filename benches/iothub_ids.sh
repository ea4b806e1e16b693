# Sourced by store_load.sh and half_rate.sh: N IoT Hub devices with one SAS
# key, as an --identities file for edgehub ($work/ids.json) and connection
# strings for edgehub-loadtest ($work/cs.txt).
# make_iothub_ids WORK N
make_iothub_ids() {
    python3 - "$1" "$2" <<'PY'
import base64, json, sys
work, n = sys.argv[1], int(sys.argv[2])
key = base64.b64encode(b"loadtest-device-key-0123456789ab").decode()
devs = [f"lt-{i}" for i in range(n)]
json.dump({"iothubHostname": "bench.azure-devices.net",
           "devices": [{"deviceId": d, "primaryKey": key} for d in devs]}, open(f"{work}/ids.json", "w"))
with open(f"{work}/cs.txt", "w") as f:
    for d in devs:
        f.write(f"HostName=bench.azure-devices.net;DeviceId={d};SharedAccessKey={key};GatewayHostName=localhost\n")
PY
}
