"""The official Azure IoT device SDK against the real binary. Reuses the
harness of tests/python (process start, ephemeral data dir, logs)."""

import importlib.util
import sys
from pathlib import Path

_here = Path(__file__).resolve()
sys.path.insert(0, str(_here.parents[1] / "python"))
_spec = importlib.util.spec_from_file_location("edgehub_harness", _here.parents[1] / "python" / "conftest.py")
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)

binary = harness.binary
start_hub = harness.start_hub


def start_sdk_gateway(start_hub, tmp_path, hub_hostname, device, modules, *args):
    """A hub that serves `device` (id, key) and its `modules` ([(id, key)])
    for IoT Hub `hub_hostname`, listening on 127.0.0.1:8883: the Azure IoT
    SDKs always dial 8883 (MQTT), 5671 (AMQP) and 443 (either over
    WebSocket)."""
    import json
    import socket

    import pytest

    for port in (8883, 5671, 443):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"port {port} is taken; the Azure SDKs can only dial 8883 (MQTT), 5671 (AMQP) and 443 (WebSocket)")
    ids = tmp_path / "identities.json"
    ids.write_text(json.dumps({
        "iothubHostname": hub_hostname,
        "devices": [{"deviceId": device[0], "primaryKey": device[1],
                     "modules": [{"moduleId": m, "primaryKey": k} for m, k in modules]}],
    }))
    return start_hub("--identities", str(ids), *args, allow_anonymous=False, mqtts="127.0.0.1:8883",
                     amqps="127.0.0.1:5671", wss="127.0.0.1:443")
